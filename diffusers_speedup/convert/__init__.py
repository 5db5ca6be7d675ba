"""Conversion of the papers' released checkpoints into pipeline folders of this package.

    diffusers-speedup convert <format> CHECKPOINT --output_dir DIR [format options]

One module per checkpoint family (``uvit``, ``minsnr_vit``, ``edm2``, ``dit``, ``sit``, ``repa``, ``lightningdit``,
and ``vavae``, LightningDiT's tokenizer, which becomes an ``AutoencoderKL`` folder rather than a pipeline). Each defines

    add_arguments(parser)   the format's own command-line options
    run(args) -> Path       converts ``args.checkpoint`` into a folder at ``args.output_dir``

next to its public ``load_*`` / ``convert_*`` functions. A converted model gives the official network's outputs to
float precision; no code stored in a checkpoint is ever executed (see `common`).
"""

from __future__ import annotations

import argparse
import importlib

from ..errors import one_line_errors
from .common import CheckpointFormatError

# Command-line format name -> module of this package.
FORMATS = {
    "uvit": "uvit",
    "minsnr-vit": "minsnr_vit",
    "edm2": "edm2",
    "dit": "dit",
    "sit": "sit",
    "repa": "repa",
    "lightningdit": "lightningdit",
    "vavae": "vavae",
}

__all__ = ["FORMATS", "CheckpointFormatError", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-speedup convert",
        description="Convert a released checkpoint of U-ViT, the Min-SNR ViT-B, EDM2, DiT, SiT, REPA or LightningDiT into "
        "a pipeline folder, or LightningDiT's VA-VAE into an AutoencoderKL folder.",
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, module_name in FORMATS.items():
        module = importlib.import_module(f".{module_name}", __name__)
        sub = formats.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        sub.add_argument("checkpoint", help="the released checkpoint file")
        sub.add_argument("--output_dir", required=True, help="folder to write (replaced atomically)")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with one_line_errors():
        folder = args.run(args)
    print(f"wrote {folder}")
    return 0
