#!/usr/bin/env bash
# Download the wheels that an offline GPU machine lacks into .whl/ (an ignored folder), to be copied there with the
# working tree and installed by benchmarks/gpu/run_suite.sh. Run here, where the package registry is reachable:
#
#     PYTHON=/path/to/dev-venv/bin/python bash benchmarks/gpu/fetch_wheels.sh
#
# The versions are the ones installed in $PYTHON's environment (the development environment the benchmarks were
# tested in); the wheels are built for the GPU machine's Python ($TARGET_PYTHON_VERSION, manylinux x86_64).
#
# The GPU machine has torch, accelerate, transformers, safetensors, huggingface_hub and, with them, numpy, requests,
# pyyaml, tqdm, filelock, packaging and regex. What it lacks:
set -euo pipefail

# diffusers and omegaconf for every benchmark (omegaconf 2.4 vendors its antlr4 runtime, so antlr4-python3-runtime is
# not needed); Pillow because diffusers and bench_cache_latents import PIL and torch does not bring it.
SPEED_PACKAGES="diffusers omegaconf pillow"
# `import datasets` (the latent cache is written with datasets' ArrowWriter): datasets' own requirements that are
# not among the machine's packages above. pandas needs python-dateutil; multiprocess needs dill.
CACHING_PACKAGES="datasets pyarrow pandas python-dateutil dill multiprocess xxhash fsspec"
# scikit-learn (with scipy, joblib, threadpoolctl, about 50 MB) is only needed by benchmarks/convergence.py, which
# run_suite.sh does not run; copying it too would exceed a 64 MiB cap on the copied tree.

PYTHON=${PYTHON:-python3}
TARGET_PYTHON_VERSION=${TARGET_PYTHON_VERSION:-3.12}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SIZE_TARGET_MIB=45   # leaves room for the working tree under a 64 MiB cap on what is copied to the machine
SIZE_LIMIT_MIB=62

packages="$SPEED_PACKAGES $CACHING_PACKAGES"
if (($#)); then
    echo "fetch_wheels.sh: takes no arguments (got '$1'); set PYTHON, TARGET_PYTHON_VERSION or WHEEL_DIR instead" >&2
    exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

# Exact versions from the development environment.
pins=$("$PYTHON" - $packages <<'EOF'
import importlib.metadata
import sys

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(
        f"fetch_wheels.sh: {', '.join(missing)} not installed in {sys.executable}; run with the development "
        "environment's python, e.g. PYTHON=/path/to/venv/bin/python"
    )
EOF
)
echo "carrying for Python $TARGET_PYTHON_VERSION:" $pins

# The wheel folder must stay out of git (it is carried as an ignored path).
if [[ "$WHEEL_DIR" != /* ]]; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    entry="/${WHEEL_DIR%/}/"
    grep -qxF "$entry" "$exclude" 2>/dev/null || echo "$entry" >> "$exclude"
fi

# Download into a fresh folder and replace .whl/ only when everything arrived, so no stale or partial wheel remains.
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$TARGET_PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$staging" $pins
"$PYTHON" "$repo/benchmarks/gpu/slim_wheel.py" "$staging"/*.whl
rm -rf "$WHEEL_DIR"
mkdir -p "$WHEEL_DIR"
mv "$staging"/*.whl "$WHEEL_DIR"/

ls -l "$WHEEL_DIR"
total=$(du -cb "$WHEEL_DIR"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
awk -v w="$total" -v t="$tree" 'BEGIN { printf "wheels: %.1f MiB; working tree: %.1f MiB; copied in all: %.1f MiB\n", w / 2^20, t / 2^20, (w + t) / 2^20 }'
if (( total > SIZE_LIMIT_MIB * 1024 * 1024 )); then
    echo "fetch_wheels.sh: the wheels exceed ${SIZE_LIMIT_MIB} MiB and will not fit a 64 MiB copy" >&2
    exit 1
elif (( total > SIZE_TARGET_MIB * 1024 * 1024 )); then
    echo "note: over the ${SIZE_TARGET_MIB} MiB target; it still fits a 64 MiB copy with this working tree"
fi
