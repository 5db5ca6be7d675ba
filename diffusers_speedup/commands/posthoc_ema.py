"""Reconstruct power-function EMA weights of any sigma_rel after training (EDM2 post-hoc EMA).

    diffusers-speedup posthoc-ema --run_dir runs/edm2-s --sigma_rel 0.05 0.1 0.15 --output_dir runs/edm2-s/posthoc

For each sigma_rel it writes `phema-<sigma_rel>.safetensors` (a state dict for `model.load_state_dict`). When the run
has an exported pipeline folder (given with --pipeline_dir, or the only folder with a model_index.json in --run_dir),
it also writes `phema-<sigma_rel>/`, a copy of that pipeline whose model weights are the reconstructed ones.

The reconstruction is computed in float32; --dtype is the dtype the state dicts are stored in, spelled as a recipe's
precisions (fp32, bf16, fp16). The old values float32, bfloat16 and float16 still work for one release, with a
warning.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_speedup.commands.common import PRECISIONS, renamed_values
from diffusers_speedup.distributed import require_single_process
from diffusers_speedup.training.ema import SNAPSHOT_DIR_NAME, SNAPSHOT_PATTERN, reconstruct_posthoc_ema
from diffusers_speedup.utils import atomic_folder, atomic_write

logger = logging.getLogger("posthoc_ema")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # spelled as PRECISIONS
OLD_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="diffusers-speedup posthoc-ema", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--run_dir", type=Path, help=f"training output folder (snapshots in <run_dir>/{SNAPSHOT_DIR_NAME})"
    )
    source.add_argument("--snapshot_dir", type=Path, help="folder holding the phema-*.safetensors snapshots")
    parser.add_argument("--sigma_rel", type=float, nargs="+", required=True, help="profile width(s) to reconstruct")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--target_nimg", type=int, default=None, help="training time to reconstruct at (default: last)")
    parser.add_argument(
        "--pipeline_dir", type=Path, default=None, help="exported pipeline folder to copy the weights into"
    )
    parser.add_argument(
        "--dtype",
        type=renamed_values("--dtype", OLD_DTYPE_NAMES),
        choices=PRECISIONS,
        default="fp32",
        help="dtype the state dicts are stored in (pipeline copies keep the exported weights' dtypes)",
    )
    return parser.parse_args(argv)


def _has_snapshots(folder: Path) -> bool:
    return folder.is_dir() and any(SNAPSHOT_PATTERN.match(p.name) for p in folder.iterdir())


def resolve_snapshot_dir(args: argparse.Namespace) -> Path:
    if args.snapshot_dir is not None:
        return args.snapshot_dir
    for candidate in (args.run_dir / SNAPSHOT_DIR_NAME, args.run_dir):
        if _has_snapshots(candidate):
            return candidate
    raise FileNotFoundError(
        f"--run_dir {str(args.run_dir)!r}: no phema-*.safetensors snapshots in it or its {SNAPSHOT_DIR_NAME}/."
    )


def resolve_pipeline_dir(args: argparse.Namespace) -> Path | None:
    if args.pipeline_dir is not None:
        if not (args.pipeline_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"--pipeline_dir {str(args.pipeline_dir)!r} has no model_index.json.")
        return args.pipeline_dir
    if args.run_dir is None or not args.run_dir.is_dir():
        return None
    found = [p for p in [args.run_dir, *sorted(args.run_dir.iterdir())] if (p / "model_index.json").is_file()]
    if len(found) > 1:
        logger.warning("Several pipeline folders in %s (%s); pass --pipeline_dir to pick one.", args.run_dir, found)
        return None
    return found[0] if found else None


def find_model_weights(pipeline_dir: Path, keys: set[str]) -> Path:
    """The component weights file of `pipeline_dir` whose tensor names are exactly `keys`."""
    for path in sorted(pipeline_dir.glob(f"*/{WEIGHTS_NAME}")):
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) == keys:
                return path
    raise ValueError(
        f"No component of pipeline {str(pipeline_dir)!r} has a {WEIGHTS_NAME} with the reconstructed parameter names "
        "(sharded weights are not supported)."
    )


def write_pipeline_copy(pipeline_dir: Path, state_dict: dict[str, torch.Tensor], destination: Path) -> Path:
    source_weights = find_model_weights(pipeline_dir, set(state_dict))
    with safe_open(str(source_weights), framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    target_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    tensors = {
        name: tensor.to(target_dtype.get(dtypes[name], tensor.dtype)).contiguous()
        for name, tensor in state_dict.items()
    }
    with atomic_folder(destination) as staging:
        shutil.copytree(pipeline_dir, staging, dirs_exist_ok=True)
        save_file(tensors, str(staging / source_weights.relative_to(pipeline_dir)), metadata={"format": "pt"})
    return destination


def main(argv=None) -> list[Path]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    require_single_process("diffusers-speedup posthoc-ema")
    try:
        return write_reconstructions(args)
    except (ValueError, OSError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from None


def write_reconstructions(args: argparse.Namespace) -> list[Path]:
    """Write the state dicts (and pipeline copies) that `args` asks for; returns the written paths."""
    snapshot_dir = resolve_snapshot_dir(args)
    pipeline_dir = resolve_pipeline_dir(args)
    state_dicts = reconstruct_posthoc_ema(
        snapshot_dir, args.sigma_rel, target_t=args.target_nimg, dtype=DTYPES[args.dtype]
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for sigma_rel, state_dict in zip(args.sigma_rel, state_dicts):
        path = args.output_dir / f"phema-{sigma_rel:.3f}.safetensors"
        tensors = {name: tensor.contiguous() for name, tensor in state_dict.items()}
        metadata = {"format": "pt", "sigma_rel": repr(sigma_rel), "target_nimg": str(args.target_nimg or "last")}
        with atomic_write(path) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
        logger.info("sigma_rel %.3f -> %s", sigma_rel, path)
        written.append(path)
        if pipeline_dir is not None:
            folder = write_pipeline_copy(pipeline_dir, state_dict, args.output_dir / f"phema-{sigma_rel:.3f}")
            logger.info("sigma_rel %.3f -> pipeline %s", sigma_rel, folder)
            written.append(folder)
    return written


if __name__ == "__main__":
    main()
