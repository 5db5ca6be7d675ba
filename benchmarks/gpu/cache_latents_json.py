"""Run benchmarks/bench_cache_latents.py and save its measurements as JSON (the script itself only prints them).

    python benchmarks/gpu/cache_latents_json.py --json caching.json --vae random-sd --num_workers 15

Every argument other than ``--json`` goes to bench_cache_latents.py unchanged. Its output is shown as usual and read
back line by line: image generation time, the decode-only, VAE-only and end-to-end rates, and the settings it ran
with. The JSON is written even when the benchmark fails (with ``error`` set, and the rates it reached before), and
the exit status is then non-zero; a rate missing from a successful run's output is an error too (the script's
output format changed), named in ``error``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import traceback

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What bench_cache_latents.py prints, and the fields each line fills.
PATTERNS = {
    r"generated (\d+) JPEGs of (\d+)x(\d+) in ([\d.]+) s": [
        ("generated_images", int),
        ("image_width", int),
        ("image_height", int),
        ("generation_seconds", float),
    ],
    r"device=(\S+) dtype=(\S+) resolution=(\d+) batch_size=(\d+) num_workers=(\d+) vae=(\S+)": [
        ("device", str),
        ("dtype", str),
        ("resolution", int),
        ("batch_size", int),
        ("num_workers", int),
        ("vae", str),
    ],
    r"decode \+ ADM crop only: ([\d.]+) img/s": [("decode_images_per_second", float)],
    r"VAE encode only \(image \+ mirror\): ([\d.]+) img/s": [("vae_images_per_second", float)],
    r"cache_latents end to end: ([\d.]+) img/s \((\d+) images in ([\d.]+) s": [
        ("end_to_end_images_per_second", float),
        ("end_to_end_images", int),
        ("end_to_end_seconds", float),
    ],
}
REQUIRED = ("decode_images_per_second", "vae_images_per_second", "end_to_end_images_per_second")


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.stream.write(text)
        self.stream.flush()
        return self.copy.write(text)

    def flush(self):
        self.stream.flush()


def parse_output(text: str) -> dict:
    """The fields of ``PATTERNS`` found in bench_cache_latents.py's printed output."""
    fields = {}
    for pattern, names in PATTERNS.items():
        match = re.search(pattern, text)
        if match:
            fields.update({name: cast(value) for (name, cast), value in zip(names, match.groups())})
    return fields


def _device_name(device: str | None) -> str | None:
    if not device or not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(0)


def build_parser() -> argparse.ArgumentParser:
    """This wrapper's own options; ``parse_known_args`` leaves the rest for bench_cache_latents.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the measurements")
    return parser


def main(argv=None) -> int:
    args, bench_argv = build_parser().parse_known_args(argv)

    sys.path.insert(0, BENCHMARKS)
    import bench_cache_latents

    tee = _Tee(sys.stdout)
    error = None
    try:
        with contextlib.redirect_stdout(tee):
            bench_cache_latents.main(bench_argv)
    except SystemExit as exit_:  # argparse errors
        if exit_.code not in (0, None):
            error = f"bench_cache_latents.py exited with status {exit_.code}"
    except Exception as exception:  # recorded in the JSON, then reported by the exit status
        traceback.print_exc()
        error = f"{type(exception).__name__}: {exception}"
    result = {
        "benchmark": "cache_latents",
        "command": "python benchmarks/bench_cache_latents.py " + " ".join(bench_argv),
        **parse_output(tee.copy.getvalue()),
    }
    missing = [name for name in REQUIRED if name not in result]
    if error is None and missing:
        error = f"no {', '.join(missing)} in bench_cache_latents.py's output (did its format change?)"
    result["device_name"] = _device_name(result.get("device"))
    result["cpus_usable"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result["error"] = error
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    if error:
        print(f"error: {error}", file=sys.stderr)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
