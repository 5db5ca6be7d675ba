"""Cache AutoencoderKL latents of an image dataset into a 🤗 datasets folder.

One process:            diffusers-speedup cache-latents --image_folder /data/imagenet/train --output_dir cache/in256
Every GPU of a machine: accelerate launch -m diffusers_speedup cache-latents --image_folder ... --output_dir ...
                        (or torchrun --nproc_per_node 8 -m diffusers_speedup cache-latents ...)
Run the same command again to resume an interrupted run; a folder made with other settings is refused.
--store_images also keeps the uint8 crop the VAE encoded (what a REPA recipe's encoder looks at), 3·R² bytes per image.
--encoder_features facebook/dinov2-base stores that encoder's patch tokens of the crop (and of its mirror) instead,
computed as REPA computes them in training (393,216 B per image and mirror for DINOv2-B at 256 px, fp16).
Push the finished cache with --push_to_hub --hub_dataset_id user/name [--private].

Old spellings still work for one release, with a warning: --dtype (now --mixed_precision), --push_to_hub REPO_ID
(now --push_to_hub --hub_dataset_id REPO_ID; this form still creates a private repository unless --public is given)
and --public (repositories are public unless --private is given).
"""

import argparse
import json
import os

from diffusers_speedup.commands.common import PRECISIONS, warn_deprecated
from diffusers_speedup.data.latent_cache import DEFAULT_VAE, cache_latents
from diffusers_speedup.errors import one_line_errors, one_line_interrupt


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="diffusers-speedup cache-latents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output_dir", required=True, help="folder of the cache (created, resumed or refused)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image_folder", help="one sub-folder per class (ImageNet train layout)")
    source.add_argument("--dataset", help="🤗 dataset name on the Hub or local folder")
    source.add_argument("--builtin", choices=["digits"], help="the built-in dataset")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL Hub id or local folder")
    parser.add_argument("--vae_revision", default=None)
    parser.add_argument("--vae_subfolder", default=None)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--no_flip", action="store_true", help="do not store the mirrored posterior")
    parser.add_argument(
        "--store_images",
        action="store_true",
        help="also store the uint8 (3, R, R) centre crop the VAE encoded, for a REPA recipe's encoder (196,608 B per "
        "image at 256 px); not its mirror, which is an exact flip of it",
    )
    parser.add_argument(
        "--encoder_features",
        default=None,
        metavar="ENCODER",
        help="also store the patch tokens of this DINOv2 (Hub id or folder) for the crop and its mirror, as a REPA "
        "recipe with repa.encoder=ENCODER computes them; the recipe then never runs the encoder",
    )
    parser.add_argument(
        "--encoder_resolution",
        type=int,
        default=None,
        help="with --encoder_features: the side in px the crops are resized to for the encoder (REPA's 224·R/256 "
        "when left out), as the recipe's repa.encoder_resolution",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per VAE call and process")
    parser.add_argument("--chunk_size", type=int, default=1024, help="images per resumable chunk")
    parser.add_argument("--num_workers", type=int, default=8, help="image-decoding workers per process")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--mixed_precision",
        choices=["auto", *PRECISIONS],
        default="auto",
        help="precision the VAE encodes in: fp32, or bf16/fp16 autocast; auto: fp16 on a GPU, fp32 on the CPU",
    )
    precision.add_argument("--dtype", choices=["auto", *PRECISIONS], default=None, help=argparse.SUPPRESS)  # old name
    parser.add_argument("--compile", action="store_true", help="torch.compile the VAE encoder")
    parser.add_argument("--max_images", type=int, default=None, help="only the first N inputs")
    parser.add_argument("--keep_chunks", action="store_true")
    parser.add_argument(
        "--push_to_hub",
        nargs="?",
        const=True,
        default=False,
        metavar="REPO_ID",
        help="push the finished cache to the dataset repository --hub_dataset_id (a REPO_ID here is the old form)",
    )
    parser.add_argument("--hub_dataset_id", default=None, help="'user/name' of the dataset repository")
    privacy = parser.add_mutually_exclusive_group()
    privacy.add_argument(
        "--private", action="store_true", help="create the Hub repository as private (default: public)"
    )
    privacy.add_argument("--public", action="store_true", help=argparse.SUPPRESS)  # the old default was private
    parser.add_argument("--no_progress", action="store_true")
    return _accept_old_spellings(parser, parser.parse_args(argv))


def _accept_old_spellings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """`args` in the new spelling, warning about each old one used."""
    if args.dtype is not None:
        warn_deprecated(f"--dtype {args.dtype}", f"use --mixed_precision {args.dtype}")
        args.mixed_precision = args.dtype
    if isinstance(args.push_to_hub, str):
        repo_id, args.push_to_hub = args.push_to_hub, True
        if args.hub_dataset_id is not None and args.hub_dataset_id != repo_id:
            parser.error(f"--push_to_hub {repo_id} and --hub_dataset_id {args.hub_dataset_id} name two repositories")
        args.hub_dataset_id = repo_id
        # The old form made a private repository unless --public; it still does, so no cache turns public unnoticed.
        args.private = args.private or not args.public
        new_form = f"--push_to_hub --hub_dataset_id {repo_id}" + (" --private" if args.private else "")
        warn_deprecated(
            f"--push_to_hub {repo_id}", f"use {new_form} (the new form's repository is public unless --private)"
        )
    if args.public:
        warn_deprecated("--public", "repositories are now public unless --private is given, so leave it out")
    if args.push_to_hub and not args.hub_dataset_id:
        parser.error("--push_to_hub needs --hub_dataset_id user/name")
    if args.encoder_resolution is not None and args.encoder_features is None:
        parser.error("--encoder_resolution only applies with --encoder_features")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors():
        return run(args)


def _feature_encoder(args):
    """REPA's frozen encoder for ``--encoder_features``, as a REPA recipe with the same ``repa.encoder`` and
    ``repa.encoder_resolution`` would run it, or None."""
    if args.encoder_features is None:
        return None
    from diffusers_speedup.objectives.repa import FrozenEncoder

    return FrozenEncoder.from_pretrained(args.encoder_features, args.resolution, input_size=args.encoder_resolution)


def run(args) -> dict:
    kept = f"the finished chunks are kept in {args.output_dir}; the same command resumes"
    with one_line_interrupt(lambda: kept):
        metadata = cache_latents(
            args.output_dir,
            image_folder=args.image_folder,
            dataset=args.dataset,
            builtin=args.builtin,
            split=args.split,
            image_column=args.image_column,
            label_column=args.label_column,
            vae=args.vae,
            vae_revision=args.vae_revision,
            vae_subfolder=args.vae_subfolder,
            resolution=args.resolution,
            flip=not args.no_flip,
            store_images=args.store_images,
            feature_encoder=_feature_encoder(args),
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            num_workers=args.num_workers,
            dtype=args.mixed_precision,
            compile=args.compile,
            max_images=args.max_images,
            keep_chunks=args.keep_chunks,
            progress=not args.no_progress,
            push_to_hub=args.hub_dataset_id if args.push_to_hub else None,
            private=args.private,
        )
    if metadata and int(os.environ.get("RANK", "0")) == 0:
        summary = {key: metadata[key] for key in ("num_inputs", "num_accepted", "num_rejected", "latent_shape")}
        print(json.dumps(summary))
    return metadata


if __name__ == "__main__":
    main()
