"""FID of generated samples against a reference; prints it and writes it as JSON.

    diffusers-speedup evaluate samples/run1/samples_50000x256x256x3.npz VIRTUAL_imagenet256_labeled.npz

SAMPLES: an `.npz` with `arr_0` uint8 NHWC images (`diffusers-speedup sample`, ADM) or a folder of images.
REFERENCE: an `.npz` with `mu`/`sigma` (ADM reference batch or --save_reference_stats output), an `.npz` of images,
a folder of images, a folder saved with `datasets.save_to_disk`, or `hf:<dataset id>` (see --split).
Features: torch-fidelity's Inception-v3 (`pip install diffusers-speedup[eval]`).
"""

import argparse
import json
from pathlib import Path

import torch

from diffusers_speedup.distributed import require_single_process
from diffusers_speedup.errors import one_line_errors
from diffusers_speedup.evaluation import InceptionFeatureExtractor, compute_fid_statistics, frechet_distance


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="diffusers-speedup evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("samples", help="sample .npz (arr_0) or image folder")
    parser.add_argument("reference", help="reference statistics .npz, images .npz, image folder, or hf:<dataset>")
    parser.add_argument("--output", default=None, help="JSON result path (default: <samples>.fid.json)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--num_samples", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--resolution", type=int, default=None, help="ADM centre crop of real images to this size")
    parser.add_argument("--split", default="train", help="split of an hf: reference dataset")
    parser.add_argument("--image_column", default=None, help="image column of a reference dataset")
    parser.add_argument("--inception_weights", default=None, help="local torch-fidelity Inception weights (.pth)")
    parser.add_argument("--save_reference_stats", default=None, help="write the reference mu/sigma to this .npz")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        require_single_process("diffusers-speedup evaluate")
        return evaluate(args)


def evaluate(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = InceptionFeatureExtractor(device=device, weights_path=args.inception_weights)
    common = dict(feature_extractor=extractor, batch_size=args.batch_size, show_progress=True)
    sample_stats = compute_fid_statistics(args.samples, max_images=args.num_samples, **common)
    reference_stats = compute_fid_statistics(
        args.reference, resolution=args.resolution, split=args.split, image_column=args.image_column, **common
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
    output = Path(args.output) if args.output else Path(str(args.samples).rstrip("/") + ".fid.json")
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"FID: {fid:.4f}  ({sample_stats.num_images} samples vs {args.reference}); written to {output}")
    return result


if __name__ == "__main__":
    main()
