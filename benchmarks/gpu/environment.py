"""Describe the machine and check that the benchmarks' imports work, before any benchmark spends device time.

    python benchmarks/gpu/environment.py --json environment.json --ready ready.sh [--tiny]

Prints the GPU (torch's view and ``nvidia-smi``'s), CPU count, memory, Python and the versions of every package the
benchmarks use, then tries the imports of each group of benchmarks:

* ``speed`` (training and sampling): torch, diffusers, omegaconf, PIL, accelerate and this package with its pipelines;
* ``caching`` (latent caching): those and datasets (with pyarrow and pandas).

A failed import is printed with its error. ``--json`` receives all of it; ``--ready`` receives shell assignments
``READY_SPEED=0|1``, ``READY_CACHING=0|1`` and ``NO_GPU_REASON=...`` for run_suite.sh to source. Without ``--tiny``, a
group is ready only when CUDA is available, since the full-size benchmarks are pointless on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import traceback

PACKAGES = [
    "torch", "numpy", "diffusers", "accelerate", "transformers", "huggingface-hub", "safetensors", "omegaconf",
    "pillow", "datasets", "pyarrow", "pandas", "fsspec", "dill", "multiprocess", "xxhash", "packaging",
]  # fmt: skip
IMPORT_GROUPS = {
    "speed": [
        "torch",
        "diffusers",
        "omegaconf",
        "PIL",
        "accelerate",
        "diffusers_speedup",
        "diffusers_speedup.pipelines",
    ],
    "caching": ["datasets", "pyarrow", "pandas", "diffusers_speedup.data.latent_cache"],
}
NVIDIA_SMI_FIELDS = "name,driver_version,memory.total,power.limit,clocks.max.sm,pcie.link.gen.max"


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def try_imports(modules: list[str]) -> dict[str, str | None]:
    """``{module: None}`` where the import works, else the last line of its error."""
    errors = {}
    for module in modules:
        try:
            importlib.import_module(module)
            errors[module] = None
        except Exception as error:  # any import-time failure is a finding to report, not a crash
            errors[module] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
    return errors


def nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    query = ["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader"]
    try:
        lines = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    except (subprocess.SubprocessError, OSError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {"gpus": [dict(zip(NVIDIA_SMI_FIELDS.split(","), (v.strip() for v in line.split(",")))) for line in lines]}


def torch_info() -> dict:
    try:
        import torch
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    info = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        info.update(
            device_count=torch.cuda.device_count(),
            device_name=properties.name,
            capability=f"{properties.major}.{properties.minor}",
            memory_gib=round(properties.total_memory / 2**30, 1),
            multiprocessors=properties.multi_processor_count,
        )
    return info


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the description here")
    parser.add_argument("--ready", default=None, help="write READY_* shell assignments here")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode: CUDA is not required")
    args = parser.parse_args(argv)

    environment = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": platform.processor() or platform.machine(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpus_reported": os.cpu_count(),
        "memory_gib": memory_gib(),
        "nvidia_smi": nvidia_smi(),
        "torch": torch_info(),
        "packages": package_versions(),
    }
    print(json.dumps({k: environment[k] for k in ("date", "python", "cpus_usable", "memory_gib")}))
    print("torch:", json.dumps(environment["torch"]))
    print("nvidia-smi:", json.dumps(environment["nvidia_smi"]))
    print("packages:", " ".join(f"{k}={v}" for k, v in environment["packages"].items()))

    imports = {group: try_imports(modules) for group, modules in IMPORT_GROUPS.items()}
    environment["imports"] = imports
    for results in imports.values():
        for module, error in results.items():
            print(f"import {module}: {'ok' if error is None else 'FAILED: ' + error}")
    speed_ok = all(error is None for error in imports["speed"].values())
    caching_ok = speed_ok and all(error is None for error in imports["caching"].values())
    no_gpu = "" if args.tiny or environment["torch"].get("cuda_available") else "CUDA is not available to torch"
    if no_gpu:
        print(f"error: {no_gpu}; the full-size benchmarks will not run (use --tiny for the CPU smoke mode)")
    environment["ready"] = {"speed": speed_ok and not no_gpu, "caching": caching_ok and not no_gpu}

    if args.json:
        with open(args.json, "w") as f:
            json.dump(environment, f, indent=2)
    if args.ready:
        with open(args.ready, "w") as f:
            f.write(f"READY_SPEED={int(environment['ready']['speed'])}\n")
            f.write(f"READY_CACHING={int(environment['ready']['caching'])}\n")
            f.write(f"NO_GPU_REASON={shlex.quote(no_gpu)}\n")
    return environment


if __name__ == "__main__":
    main()
