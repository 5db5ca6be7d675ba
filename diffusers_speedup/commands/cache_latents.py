"""Cache AutoencoderKL latents of an image dataset into a 🤗 datasets folder.

One process:            diffusers-speedup cache-latents --image_folder /data/imagenet/train --output_dir cache/in256
Every GPU of a machine: accelerate launch -m diffusers_speedup cache-latents --image_folder ... --output_dir ...
                        (or torchrun --nproc_per_node 8 -m diffusers_speedup cache-latents ...)
Run the same command again to resume an interrupted run; a folder made with other settings is refused.
"""

import argparse
import json
import os

from diffusers_speedup.data.latent_cache import DEFAULT_VAE, cache_latents
from diffusers_speedup.errors import one_line_errors


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
    parser.add_argument("--batch_size", type=int, default=64, help="images per VAE call and process")
    parser.add_argument("--chunk_size", type=int, default=1024, help="images per resumable chunk")
    parser.add_argument("--num_workers", type=int, default=8, help="image-decoding workers per process")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the VAE encoder")
    parser.add_argument("--max_images", type=int, default=None, help="only the first N inputs")
    parser.add_argument("--keep_chunks", action="store_true")
    parser.add_argument(
        "--push_to_hub", default=None, metavar="REPO_ID", help="push the finished cache to this dataset repo"
    )
    parser.add_argument("--public", action="store_true", help="create the Hub repo as public")
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with one_line_errors():
        return run(args)


def run(args) -> dict:
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
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        num_workers=args.num_workers,
        dtype=args.dtype,
        compile=args.compile,
        max_images=args.max_images,
        keep_chunks=args.keep_chunks,
        progress=not args.no_progress,
        push_to_hub=args.push_to_hub,
        private=not args.public,
    )
    if metadata and int(os.environ.get("RANK", "0")) == 0:
        summary = {key: metadata[key] for key in ("num_inputs", "num_accepted", "num_rejected", "latent_shape")}
        print(json.dumps(summary))
    return metadata


if __name__ == "__main__":
    main()
