"""Drop the parts of a wheel that the benchmarks never load, so the wheels copied to an offline GPU machine stay small.

    python benchmarks/gpu/slim_wheel.py .whl/pyarrow-26.0.1-cp312-cp312-manylinux_2_28_x86_64.whl

The wheel is rewritten in place under its own name, with the dropped files also removed from its ``RECORD``, so pip
installs it as usual. What is dropped (``DROP`` below) is what ``import datasets`` and ``cache_latents`` do not touch:

* pyarrow: the Flight RPC and S3 libraries (their Python modules import them lazily and report them missing only
  when used), the C++ test module, C++ headers and Cython sources (for building extensions), and the two extra
  copies of each versioned library (the extensions link against ``libX.so.NNNN``, the copy that is kept).
  55 MB → about 34 MB for pyarrow 26.
* pandas: its own test suite.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import zipfile

# Distribution name → glob patterns (fnmatch, ``*`` also matches ``/``) of the wheel members to drop.
DROP = {
    "pyarrow": [
        "pyarrow/include/*",
        "pyarrow/tests/*",
        "pyarrow/src/*",
        "*.pyx",
        "*.pxd",
        "*.pxi",
        "pyarrow/libarrow_flight.so*",
        "pyarrow/libarrow_python_flight.so*",
        "pyarrow/_flight.*.so",
        "pyarrow/libarrow_s3.so*",
        "pyarrow/_s3fs.*.so",
        "pyarrow/_pyarrow_cpp_tests.*.so",
        # libarrow_python.so.NNNN is what the extensions link against; the unversioned and the full-version names
        # are identical copies (symlinks flattened by the wheel format).
        "pyarrow/libarrow_python.so",
        "pyarrow/libarrow_python.so.*.*.*",
        "pyarrow/libarrow_python_parquet_encryption.so",
        "pyarrow/libarrow_python_parquet_encryption.so.*.*.*",
    ],
    "pandas": ["pandas/tests/*"],
}


def distribution_of(wheel_path: str) -> str:
    """The normalised distribution name of a wheel file, e.g. ``python_dateutil-4.0.0-py3-none-any.whl`` →
    ``python-dateutil``."""
    name = os.path.basename(wheel_path).split("-")[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def slim_wheel(wheel_path: str, patterns: list[str]) -> tuple[int, int]:
    """Remove the members of ``wheel_path`` matching any of ``patterns`` (and their ``RECORD`` lines), in place.

    Args:
        wheel_path: the ``.whl`` file to rewrite.
        patterns: fnmatch patterns of member paths to drop; the ``.dist-info`` folder is never dropped.

    Returns:
        (size before, size after) in bytes.
    """
    before = os.path.getsize(wheel_path)
    with zipfile.ZipFile(wheel_path) as source:
        members = source.infolist()
        record = next((m.filename for m in members if m.filename.endswith(".dist-info/RECORD")), None)
        if record is None:
            raise ValueError(f"{wheel_path}: not a wheel (no .dist-info/RECORD)")
        dropped = {
            m.filename
            for m in members
            if ".dist-info/" not in m.filename and any(fnmatch.fnmatch(m.filename, p) for p in patterns)
        }
        temporary = wheel_path + ".slim"
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as target:
            for member in members:
                if member.filename in dropped:
                    continue
                data = source.read(member.filename)
                if member.filename == record:
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
                target.writestr(member, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(temporary, wheel_path)
    return before, os.path.getsize(wheel_path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", nargs="+", help="wheel files; those of distributions without DROP rules are kept")
    args = parser.parse_args(argv)
    for wheel in args.wheels:
        patterns = DROP.get(distribution_of(wheel))
        if not patterns:
            continue
        before, after = slim_wheel(wheel, patterns)
        print(f"slimmed {os.path.basename(wheel)}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
