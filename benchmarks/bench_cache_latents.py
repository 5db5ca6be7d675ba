"""Throughput of latent caching: image decoding alone, VAE encoding alone, and the whole cache_latents run.

    python benchmarks/bench_cache_latents.py --tiny          # seconds on CPU: tiny VAE, 32 px, generated images
    python benchmarks/bench_cache_latents.py                 # GPU: 256 px ImageNet-like JPEGs, sd-vae-ft-ema

The real mode generates ``--num_images`` JPEGs of ImageNet's typical size (500x375, quality 90, smooth content so
they compress like photos) unless ``--image_folder`` is given. ``--vae random-sd`` builds the SD VAE architecture with
random weights (same compute) for machines without Hub access. Goal: >= 1000 img/s end to end on one H100 with 16
CPU cores (both the image and its mirror encoded). ``--store_images`` also stores the uint8 crop (what a REPA recipe
needs). Writes ``caching.json`` to ``--output_dir``: the settings, every rate measured and the cache's bytes per
image on disk, also when a later stage fails (``error`` then says how).
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

SD_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=256,
)
TINY_VAE_CONFIG = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


def _write_image(job):
    path, width, height, seed = job
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    image.save(path, quality=90)


def make_image_folder(root, num_images, size, num_classes=10, workers=None):
    jobs = []
    for index in range(num_images):
        folder = os.path.join(root, f"n{index % num_classes:08d}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"{index:07d}.JPEG"), size[0], size[1], index))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write_image, jobs, chunksize=64))


def build_vae(name):
    from diffusers import AutoencoderKL

    if name in ("tiny", "random-sd"):
        torch.manual_seed(0)
        return AutoencoderKL(**(TINY_VAE_CONFIG if name == "tiny" else SD_VAE_CONFIG))
    return AutoencoderKL.from_pretrained(name, torch_dtype=torch.float32)


def bench_decode(image_folder, resolution, num_workers, batch_size, max_images):
    from torch.utils.data import DataLoader

    from diffusers_speedup.data.latent_cache import _collate, _PreprocessedImages
    from diffusers_speedup.data.sources import ImageFolderSource

    source = ImageFolderSource(image_folder)
    count = min(len(source), max_images or len(source))
    loader = DataLoader(
        _PreprocessedImages(source, resolution),
        batch_sampler=[list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)],
        num_workers=num_workers,
        collate_fn=_collate,
    )
    start = time.perf_counter()
    seen = sum(batch["count"] for batch in loader)
    return seen / (time.perf_counter() - start)


def bench_vae(vae, device, dtype, resolution, batch_size, repeats):
    from diffusers_speedup.data.latent_cache import LatentEncoder

    encoder = LatentEncoder(vae, device, dtype, flip=True)
    pixels = torch.randint(0, 256, (batch_size, resolution, resolution, 3), dtype=torch.uint8)
    encoder(pixels)  # warm-up (cudnn autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        encoder(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * repeats / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode that runs in seconds")
    parser.add_argument("--image_folder", default=None, help="benchmark on this folder instead of generated JPEGs")
    parser.add_argument("--num_images", type=int, default=8192)
    parser.add_argument(
        "--vae", default="stabilityai/sd-vae-ft-ema", help="Hub id, local folder, 'random-sd' or 'tiny'"
    )
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--store_images", action="store_true", help="also store the uint8 crop (REPA's encoder input)")
    parser.add_argument("--output_dir", default="outputs/bench_cache_latents")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_images, args.vae, args.resolution, args.batch_size, args.num_workers = 48, "tiny", 32, 16, 0

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = ("fp16" if device.type == "cuda" else "fp32") if args.dtype == "auto" else args.dtype
    result = {
        "benchmark": "cache_latents",
        "command": "python benchmarks/bench_cache_latents.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "dtype": dtype,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "vae": args.vae,
        "store_images": args.store_images,
        "error": None,
    }
    try:
        measure(args, device, dtype, result)
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "caching.json"), "w") as f:
        json.dump(result, f, indent=2)
    if result["error"]:
        sys.exit(f"error: {result['error']}")
    return result


def measure(args, device, dtype, result: dict) -> None:
    """Runs the three measurements, printing each and filling `result` as it goes."""
    from diffusers_speedup.data.latent_cache import cache_latents

    with tempfile.TemporaryDirectory() as scratch:
        image_folder = args.image_folder
        if image_folder is None:
            image_folder = os.path.join(scratch, "images")
            size = (48, 40) if args.tiny else (500, 375)
            start = time.perf_counter()
            # Explicit: os.cpu_count() can report the host's cores inside a container.
            workers = 1 if args.tiny else max(1, len(os.sched_getaffinity(0)) - 1)
            make_image_folder(image_folder, args.num_images, size, workers=workers)
            seconds = time.perf_counter() - start
            print(f"generated {args.num_images} JPEGs of {size[0]}x{size[1]} in {seconds:.1f} s")
            result.update(
                generated_images=args.num_images, image_width=size[0], image_height=size[1], generation_seconds=seconds
            )
        vae = build_vae(args.vae)
        print(
            f"device={device} dtype={dtype} resolution={args.resolution} batch_size={args.batch_size} "
            f"num_workers={args.num_workers} vae={args.vae}"
        )
        decode_rate = bench_decode(image_folder, args.resolution, args.num_workers, args.batch_size, args.num_images)
        print(f"decode + ADM crop only: {decode_rate:.1f} img/s")
        result["decode_images_per_second"] = decode_rate
        vae_rate = bench_vae(vae, device, dtype, args.resolution, args.batch_size, 2 if args.tiny else 20)
        print(f"VAE encode only (image + mirror): {vae_rate:.1f} img/s")
        result["vae_images_per_second"] = vae_rate
        start = time.perf_counter()
        cache = os.path.join(scratch, "cache")
        metadata = cache_latents(
            cache,
            image_folder=image_folder,
            vae=vae,
            resolution=args.resolution,
            batch_size=args.batch_size,
            chunk_size=max(args.batch_size, 1024 if not args.tiny else 16),
            num_workers=args.num_workers,
            dtype=dtype,
            device=device,
            compile=args.compile,
            max_images=args.num_images,
            store_images=args.store_images,
            progress=not args.tiny,
        )
        elapsed = time.perf_counter() - start
        print(
            f"cache_latents end to end: {metadata['num_accepted'] / elapsed:.1f} img/s "
            f"({metadata['num_accepted']} images in {elapsed:.1f} s, including setup and the final save)"
        )
        result.update(
            end_to_end_images_per_second=metadata["num_accepted"] / elapsed,
            end_to_end_images=metadata["num_accepted"],
            end_to_end_seconds=round(elapsed, 1),
        )
        # The final dataset's Arrow shards, per image: what the cache costs on disk (metadata files aside).
        shards = [name for name in os.listdir(cache) if name.endswith(".arrow")]
        per_image = sum(os.path.getsize(os.path.join(cache, name)) for name in shards) / metadata["num_accepted"]
        print(f"cache on disk: {per_image:,.0f} B per image (columns {', '.join(metadata['columns'])})")
        result.update(cache_bytes_per_image=round(per_image), columns=metadata["columns"])


if __name__ == "__main__":
    main()
