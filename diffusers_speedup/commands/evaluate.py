"""FID of generated samples against a reference; prints it and writes it as JSON.

    diffusers-speedup evaluate samples/run1/samples_50000x256x256x3.npz VIRTUAL_imagenet256_labeled.npz

SAMPLES: an `.npz` with `arr_0` uint8 NHWC images (`diffusers-speedup sample`, ADM) or a folder of images.
REFERENCE: an `.npz` with `mu`/`sigma` (ADM reference batch or --save_reference_stats output), an `.npz` of images,
a folder of images, a folder saved with `datasets.save_to_disk`, or `hf:<dataset id>` (see --split).
Features: torch-fidelity's Inception-v3 (`pip install "diffusers-speedup[eval]"`). Every input and option is checked,
and both sources are opened, before the first image goes through the network.
"""

import argparse
import json
from pathlib import Path

import torch

from diffusers_speedup.commands.common import positive_int
from diffusers_speedup.distributed import require_single_process
from diffusers_speedup.errors import one_line_errors
from diffusers_speedup.evaluation import (
    FIDStatistics,
    InceptionFeatureExtractor,
    compute_fid_statistics,
    frechet_distance,
)
from diffusers_speedup.evaluation.fid import open_fid_source


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="diffusers-speedup evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("samples", help="sample .npz (arr_0) or image folder")
    parser.add_argument("reference", help="reference statistics .npz, images .npz, image folder, or hf:<dataset>")
    parser.add_argument("--output", default=None, help="JSON result path (default: <samples>.fid.json)")
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--num_samples", type=positive_int, default=None, help="use only the first N samples")
    parser.add_argument(
        "--resolution", type=positive_int, default=None, help="ADM centre crop of real images to this size"
    )
    parser.add_argument(
        "--split", default="train", help="split of an hf: reference dataset, or of a saved one that holds several"
    )
    parser.add_argument("--image_column", default=None, help="image column of a reference dataset")
    parser.add_argument("--inception_weights", default=None, help="local torch-fidelity Inception weights (.pth)")
    parser.add_argument("--save_reference_stats", default=None, help="write the reference mu/sigma to this .npz")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        require_single_process("diffusers-speedup evaluate")
        return evaluate(args)


def check_options(args) -> Path:
    """Every option that names a file or a device, checked before any work; returns the JSON result's path."""
    if args.num_samples is not None and args.num_samples < 2:
        raise ValueError(f"--num_samples {args.num_samples}: FID needs at least 2 samples")
    output = Path(args.output) if args.output else Path(str(args.samples).rstrip("/") + ".fid.json")
    for option, path in (("--output", output), ("--save_reference_stats", args.save_reference_stats)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"{option} {path}: its folder {Path(path).parent} does not exist")
        if path is not None and Path(path).is_dir():
            raise IsADirectoryError(f"{option} {path} is a folder; give the file to write")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise FileNotFoundError(f"--inception_weights {args.inception_weights} does not exist")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    return output


def evaluate(args):
    output = check_options(args)
    samples = open_fid_source(args.samples, "samples")
    reference = open_fid_source(args.reference, "reference", split=args.split, image_column=args.image_column)
    extractor = None
    if not (isinstance(samples, FIDStatistics) and isinstance(reference, FIDStatistics)):
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        extractor = InceptionFeatureExtractor(device=device, weights_path=args.inception_weights)
    common = dict(feature_extractor=extractor, batch_size=args.batch_size, show_progress=True)
    sample_stats = compute_fid_statistics(samples, max_images=args.num_samples, **common)
    reference_stats = compute_fid_statistics(
        reference, resolution=args.resolution, split=args.split, image_column=args.image_column, **common
    )
    if args.save_reference_stats:
        reference_stats.save(args.save_reference_stats)
    fid = frechet_distance(sample_stats.mu, sample_stats.sigma, reference_stats.mu, reference_stats.sigma)

    result = {
        "fid": fid,
        "samples": str(args.samples),
        "num_samples": sample_stats.num_images,
        "reference": str(args.reference),
        "num_reference_images": reference_stats.num_images,
        "feature_extractor": "torch-fidelity inception-v3-compat pool_3 (2048)",
    }
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"FID: {fid:.4f}  ({sample_stats.num_images} samples vs {args.reference}); written to {output}")
    return result


if __name__ == "__main__":
    main()
