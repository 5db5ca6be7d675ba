"""The built-in dataset: scikit-learn's handwritten digits, upscaled, as a 🤗 ``datasets.Dataset``.

1797 grayscale 8×8 digits (UCI optdigits test set) ship inside scikit-learn, so the quickstart and the tests need
no network. Pixel values 0..16 are mapped to 0..255 and upscaled with PIL. The split is deterministic: every 10th
image (index 0, 10, 20, ...) is held out as ``test`` (180 images), the rest (1617) is ``train``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

BUILTIN_DATASETS = ("digits",)
DIGITS_CLASS_NAMES = [str(digit) for digit in range(10)]
_SPLITS = ("train", "test", "all")
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def _check_args(name: str, resolution: int, split: str, channels: int, interpolation: str) -> None:
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset name={name!r}; available: {', '.join(BUILTIN_DATASETS)}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split={split!r} for the built-in dataset; expected one of {_SPLITS}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (mode 'L') or 3 (mode 'RGB'), got {channels}")
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8 (the digits are 8x8), got {resolution!r}")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"unknown interpolation={interpolation!r}; expected one of {tuple(_RESAMPLE)}")


@lru_cache(maxsize=8)
def _digits_arrays(resolution: int, split: str, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    indices = np.arange(len(digits.images))
    if split == "train":
        indices = indices[indices % 10 != 0]
    elif split == "test":
        indices = indices[indices % 10 == 0]
    small = np.rint(digits.images[indices] * (255.0 / 16.0)).astype(np.uint8)  # values are integers 0..16
    resample = _RESAMPLE[interpolation]
    images = np.stack(
        [np.asarray(Image.fromarray(img, mode="L").resize((resolution, resolution), resample)) for img in small]
    )
    images.setflags(write=False)  # shared by the cache: callers must copy before modifying
    labels = digits.target[indices].astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def load_builtin_arrays(
    name: str = "digits", resolution: int = 32, split: str = "train", interpolation: str = "bicubic"
) -> tuple[np.ndarray, np.ndarray]:
    """The built-in dataset as arrays: ``uint8`` images ``(N, resolution, resolution)`` and ``int64`` labels ``(N,)``.

    Same arguments as :func:`load_builtin_dataset`; the arrays are read-only and cached per argument set.
    """
    _check_args(name, resolution, split, 1, interpolation)
    return _digits_arrays(resolution, split, interpolation)


def load_builtin_dataset(
    name: str = "digits",
    resolution: int = 32,
    split: str = "train",
    channels: int = 1,
    interpolation: str = "bicubic",
):
    """Load the built-in dataset as a 🤗 ``datasets.Dataset``.

    Args:
        name: only ``"digits"`` (scikit-learn's handwritten digits).
        resolution: side of the upscaled square images in pixels (default 32).
        split: ``"train"`` (1617 images), ``"test"`` (every 10th image, 180) or ``"all"`` (1797).
        channels: 1 for PIL mode ``"L"``, 3 for ``"RGB"`` (gray replicated, e.g. to feed an RGB VAE).
        interpolation: upscaling filter, ``"bicubic"`` (default), ``"bilinear"`` or ``"nearest"``.

    Returns:
        A ``datasets.Dataset`` with columns ``image`` (``datasets.Image``) and ``label``
        (``ClassLabel`` with names ``"0"`` … ``"9"``), in a fixed order.
    """
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    _check_args(name, resolution, split, channels, interpolation)
    images, labels = _digits_arrays(resolution, split, interpolation)
    mode = "L" if channels == 1 else "RGB"
    pil_images = [Image.fromarray(image, mode="L").convert(mode) for image in images]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=DIGITS_CLASS_NAMES)})
    return Dataset.from_dict({"image": pil_images, "label": labels.tolist()}, features=features)
