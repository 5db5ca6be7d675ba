"""Pixel-space data for small datasets (built-in digits, CIFAR-style folders or 🤗 datasets), held in memory.

The whole dataset is one ``uint8`` tensor ``(N, C, H, W)``; a trainer indexes whole batches with the index batches
of :func:`~diffusers_speedup.data.batching.index_batches` and gets floats in [-1, 1] (optionally mirrored).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..utils import is_saved_dataset
from .batching import Batch, index_batches
from .builtin import BUILTIN_DATASETS, DIGITS_CLASS_NAMES, load_builtin_arrays
from .preprocessing import ImageRejectedError, apply_exif_orientation, center_crop_arr, open_image, to_rgb
from .sources import ImageFolderSource, ImageSource, make_source


@dataclass
class PixelDataset:
    """An in-memory image dataset.

    Attributes:
        images: ``torch.uint8`` tensor ``(N, C, H, W)``.
        labels: ``torch.int64`` tensor ``(N,)``.
        class_names: name of each class id.
        random_flip: whether :meth:`batch` mirrors each sample with probability 1/2 by default.
        rejected: inputs that were skipped, ``{"path": ..., "reason": ...}``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    random_flip: bool = False
    rejected: list[dict] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str) -> PixelDataset:
        """Move images and labels to ``device`` (a small dataset fits on the GPU and needs no loader)."""
        return PixelDataset(
            self.images.to(device), self.labels.to(device), self.class_names, self.random_flip, self.rejected
        )

    def batch(
        self,
        indices: torch.Tensor,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        random_flip: bool | None = None,
    ) -> Batch:
        """Gather a batch as ``Batch(pixels float32 in [-1, 1] (B, C, H, W), labels int64 (B,), extras={})``.

        Args:
            indices: row indices (``LongTensor``), e.g. from :meth:`index_batches`.
            device: where to put the batch (default: where the images are).
            generator: RNG for the mirror choice (on the images' device); ``None`` uses the global RNG.
            random_flip: override :attr:`random_flip` for this call.
        """
        indices = indices.to(self.images.device)
        images = self.images[indices]
        if device is not None:
            images = images.to(device, non_blocking=True)
        pixels = images.float() / 127.5 - 1.0
        flip = self.random_flip if random_flip is None else random_flip
        if flip:
            mirrored = torch.rand(pixels.shape[0], generator=generator, device=generator.device if generator else None)
            mirrored = mirrored.to(pixels.device) < 0.5
            pixels = torch.where(mirrored[:, None, None, None], pixels.flip(-1), pixels)
        return Batch(pixels, self.labels[indices].to(pixels.device), {})

    def index_batches(
        self, batch_size: int, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1, **kwargs
    ) -> Iterator[torch.Tensor]:
        """This rank's index batches of one epoch; see :func:`~diffusers_speedup.data.batching.index_batches`."""
        return index_batches(len(self), batch_size, epoch, seed, rank, world_size, **kwargs)


def _images_from_source(
    source: ImageSource, resolution: int | None, channels: int
) -> tuple[np.ndarray, list[int], list[dict]]:
    arrays, labels, rejected = [], [], list(source.listing_rejected)
    for index in range(len(source)):
        try:
            image = to_rgb(apply_exif_orientation(open_image(source.read(index))))
            if resolution is not None:
                if min(image.size) < resolution:
                    raise ImageRejectedError(
                        f"too small: {image.size[0]}x{image.size[1]} below the resolution {resolution}"
                    )
                array = center_crop_arr(image, resolution)
            else:
                array = np.asarray(image)
        except ImageRejectedError as error:
            rejected.append({"path": source.keys[index], "reason": str(error)})
            continue
        if arrays and array.shape != arrays[0].shape:
            rejected.append(
                {
                    "path": source.keys[index],
                    "reason": f"size {array.shape[:2]} differs from {arrays[0].shape[:2]}; give a resolution",
                }
            )
            continue
        arrays.append(array)
        labels.append(source.labels[index])
    if not arrays:
        raise ValueError(f"no usable images in {source.description}; rejected: {rejected[:5]}")
    if isinstance(source, ImageFolderSource):
        _refuse_classes_without_images(source, set(labels), rejected)
    images = np.stack(arrays)  # (N, H, W, 3)
    if channels == 1:
        # ITU-R 601 luma, the weights PIL's convert("L") uses.
        images = np.rint(images @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)[..., None]
    return images, labels, rejected


def _refuse_classes_without_images(source: ImageFolderSource, kept_labels: set[int], rejected: list[dict]) -> None:
    """A class folder whose every image was rejected would be a label id that never trains (see ImageFolderSource)."""
    for label, class_name in enumerate(source.class_names):
        if label not in kept_labels:
            reasons = [entry["reason"] for entry in rejected if entry["path"].startswith(f"{class_name}/")]
            raise ValueError(
                f"image_folder={source.root!r}: every image in the class folder {class_name!r} was rejected "
                f"(first: {reasons[0] if reasons else 'unknown'}); a class without images would never train"
            )


def load_pixel_dataset(
    source: str = "digits",
    resolution: int | None = None,
    split: str = "train",
    channels: int | None = None,
    random_flip: bool | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> PixelDataset:
    """Load a small image dataset into memory as ``uint8 (N, C, H, W)`` plus labels.

    Args:
        source: a built-in dataset name (``"digits"``), an image folder (one sub-folder per class, e.g. CIFAR-10
            exported as PNGs), or a 🤗 dataset (Hub name or local folder).
        resolution: output side in pixels. Built-in default 32. For folders/datasets, images are centre-cropped
            with ADM's crop to this size (``None`` keeps them as they are; they must then all have one size).
        split: dataset split (built-in: ``"train"``, ``"test"``, ``"all"``).
        channels: 1 (grayscale) or 3 (RGB). Default 1 for digits, 3 otherwise.
        random_flip: mirror samples at random in :meth:`PixelDataset.batch`. Default off for digits (mirrored
            digits are not digits), on otherwise.
        image_column, label_column: column names for a 🤗 dataset (CIFAR-10 on the Hub uses ``"img"``).
    """
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if source in BUILTIN_DATASETS:
        images, labels = load_builtin_arrays(source, resolution or 32, split)
        images = np.repeat(images[..., None], channels or 1, axis=-1)
        return PixelDataset(
            torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
            torch.from_numpy(labels.copy()),
            list(DIGITS_CLASS_NAMES),
            random_flip=bool(random_flip),
            rejected=[],
        )
    if os.path.isdir(source) and not is_saved_dataset(source):
        image_source = make_source(image_folder=source)
    else:
        image_source = make_source(dataset=source, split=split, image_column=image_column, label_column=label_column)
    images, labels, rejected = _images_from_source(image_source, resolution, channels or 3)
    return PixelDataset(
        torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
        torch.tensor(labels, dtype=torch.int64),
        list(image_source.class_names or []),
        random_flip=True if random_flip is None else random_flip,
        rejected=rejected,
    )
