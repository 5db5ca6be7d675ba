"""Streaming reads and writes of `.npz` image archives in the layout of ADM's evaluation suite.

ADM's `evaluations/evaluator.py` (openai/guided-diffusion) reads a sample batch from the key `arr_0`: uint8 images,
NHWC, values in [0, 255]. Its own `image_sample.py` writes class labels next to them as `arr_1` (int64), which the
evaluator ignores. A reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`) additionally carries precomputed
Inception statistics `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial features).

50K samples at 256² are about 10 GB, so both directions stream: the archive is written member by member from shards
and read back in batches, never holding the whole array in memory. The files stay plain `np.savez` archives
(uncompressed zip of `.npy` members) that `np.load` opens as usual.
"""

import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..utils import atomic_write

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"


def write_npz_atomically(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """`np.savez(path, **arrays)` through a temporary file and `os.replace`, so that `path` is either absent or
    complete, even when the process is killed while writing."""
    # np.savez appends ".npz" to string paths that lack it; an open file object keeps the temporary name exact.
    with atomic_write(path) as temporary, open(temporary, "wb") as file:
        np.savez(file, **arrays)


def write_adm_npz(
    path: str | os.PathLike,
    image_batches: Iterable[np.ndarray],
    num_images: int,
    image_shape: tuple[int, int, int],
    labels: np.ndarray | None = None,
) -> Path:
    """Write an ADM-layout archive (`arr_0` images, optional `arr_1` labels) from an iterable of image batches.

    Args:
        path: destination `.npz`; written to a temporary file first and renamed into place.
        image_batches: uint8 arrays of shape (n_i, H, W, C) whose n_i sum to `num_images`; consumed one at a time.
        num_images: total number of images (the header is written before the data).
        image_shape: (H, W, C) of every image.
        labels: optional int array of length `num_images`, stored as `arr_1`.
    """
    path = Path(path)
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": (int(num_images), *(int(s) for s in image_shape)),
    }
    written = 0
    with (
        atomic_write(path) as temporary,
        zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        with archive.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for batch in image_batches:
                if batch.dtype != np.uint8 or tuple(batch.shape[1:]) != tuple(image_shape):
                    raise ValueError(
                        f"write_adm_npz: every batch must be uint8 of shape (n, {', '.join(map(str, image_shape))}); "
                        f"got {batch.dtype} {tuple(batch.shape)}"
                    )
                member.write(np.ascontiguousarray(batch).tobytes())
                written += len(batch)
        if written != num_images:
            raise ValueError(f"write_adm_npz: expected {num_images} images for {path}, the batches held {written}")
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (num_images,):
                raise ValueError(f"write_adm_npz: labels must have shape ({num_images},), got {labels.shape}")
            with archive.open(f"{LABELS_KEY}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels, allow_pickle=False)
    return path


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Names of the arrays stored in an `.npz` archive, without loading any of them."""
    with zipfile.ZipFile(path) as archive:
        return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]


def iter_npz_array(path: str | os.PathLike, key: str = IMAGES_KEY, batch_size: int = 256) -> Iterator[np.ndarray]:
    """Yield consecutive slices of length `batch_size` (the last may be shorter) of one array in an `.npz`,
    reading only one slice into memory at a time. The slices are writable copies."""
    if batch_size < 1:
        raise ValueError(f"iter_npz_array: batch_size must be >= 1, got {batch_size}")
    with zipfile.ZipFile(path) as archive:
        name = f"{key}.npy"
        if name not in archive.namelist():
            raise KeyError(f"{path} has no array {key!r}; it holds {npz_keys(path)}")
        with archive.open(name) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"{path}: array {key!r} uses .npy format {version}, which is not supported here")
            if fortran_order or dtype.hasobject or len(shape) == 0:
                raise ValueError(f"{path}: array {key!r} must be a C-ordered numeric array with a leading axis")
            item_shape = tuple(shape[1:])
            item_bytes = int(np.prod(item_shape, dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = member.read(count * item_bytes)
                if len(data) != count * item_bytes:
                    raise ValueError(f"{path}: array {key!r} is truncated (expected {shape[0]} rows)")
                yield np.frombuffer(bytearray(data), dtype=dtype).reshape((count, *item_shape))


def npz_array_header(path: str | os.PathLike, key: str = IMAGES_KEY) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an `.npz`, read from its header only."""
    with zipfile.ZipFile(path) as archive:
        with archive.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(member)
            return tuple(shape), dtype


def npz_array_shape(path: str | os.PathLike, key: str = IMAGES_KEY) -> tuple[int, ...]:
    """Shape of one array in an `.npz`, read from its header only."""
    return npz_array_header(path, key)[0]
