"""Trainer-side reader of a latent cache: whole batches from Arrow, ``z`` sampled afresh every step.

Typical use in a training loop (every rank)::

    latents = LatentDataset("cache/imagenet256")
    for indices in latents.index_batches(batch_size, epoch=epoch, seed=seed, rank=rank, world_size=world, start_step=k):
        z, labels, extras = latents.batch(indices, device)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .batching import Batch, index_batches
from .latent_cache import (
    FEATURES_COLUMN,
    FEATURES_FLIP_COLUMN,
    IMAGE_COLUMN,
    cached_encoder_inputs,
    read_cache_metadata,
)

_LATENT_COLUMNS = ("mean", "std", "mean_flip", "std_flip")
# How to make a cache that has a column a recipe asks for.
_HOW_TO_CACHE = {
    IMAGE_COLUMN: "cache the images again with `cache-latents --store_images` (cache_latents(..., store_images=True))",
    FEATURES_COLUMN: "cache the images again with cache_latents(..., feature_encoder=...)",
    FEATURES_FLIP_COLUMN: "cache the images again with cache_latents(..., feature_encoder=...) and mirrors",
}


@dataclass(frozen=True)
class LatentNormalization:
    """How raw VAE latents ``z`` become the model's data, in the terms of diffusers' ``AutoencoderKL`` config.

    With per-channel ``latents_mean`` and ``latents_std`` (SDXL-style, and EDM2's normalisation)::

        x = (z - latents_mean) * scaling_factor / latents_std        z = x * latents_std / scaling_factor + latents_mean

    otherwise ``x = (z - shift_factor) * scaling_factor`` (SD: no shift; SD3/Flux VAEs: a scalar shift). Exported
    pipelines carry these four values in their ``vae/config.json``, so they decode what the model was trained on.

    Attributes:
        scaling_factor: multiplies the centred latents (0.18215 for SD VAEs; EDM2 uses 0.5 with per-channel std).
        shift_factor: scalar subtracted first, or ``None``; ignored when ``latents_mean`` is given.
        latents_mean: per-channel mean subtracted first, or ``None``.
        latents_std: per-channel std the centred latents are divided by, or ``None``.
    """

    scaling_factor: float
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self):
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std must be given together (or neither)")
        if self.latents_std is not None:
            if len(self.latents_mean) != len(self.latents_std):
                raise ValueError(
                    f"latents_mean has {len(self.latents_mean)} channels but latents_std has {len(self.latents_std)}"
                )
            if min(self.latents_std) <= 0:
                raise ValueError(f"latents_std must be positive, got {list(self.latents_std)}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @classmethod
    def from_vae_config(cls, config) -> LatentNormalization:
        """The normalisation a VAE's config (or a cache's metadata, which copies those keys) describes."""
        mean, std = config.get("latents_mean"), config.get("latents_std")
        return cls(
            scaling_factor=float(config["scaling_factor"]),
            shift_factor=None if config.get("shift_factor") is None else float(config["shift_factor"]),
            latents_mean=None if mean is None else tuple(float(v) for v in mean),
            latents_std=None if std is None else tuple(float(v) for v in std),
        )

    @classmethod
    def per_channel(cls, mean, std, target_std: float = 0.5) -> LatentNormalization:
        """Map each channel to mean 0 and std ``target_std`` (EDM2: the raw SD-VAE statistics, target 0.5)."""
        return cls(
            scaling_factor=float(target_std),
            latents_mean=tuple(float(v) for v in mean),
            latents_std=tuple(float(v) for v in std),
        )

    def _affine(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """``(mean, scale)`` with ``x = (z - mean) * scale``, shaped to broadcast over ``(B, C, h, w)``."""
        if self.latents_mean is not None:
            channels = like.shape[1]
            if len(self.latents_mean) != channels:
                raise ValueError(
                    f"the latent normalisation has {len(self.latents_mean)} channels but the latents have {channels}"
                )
            mean = torch.tensor(self.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
            std = torch.tensor(self.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
            return mean, self.scaling_factor / std
        return self.shift_factor or 0.0, self.scaling_factor

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents → model data."""
        mean, scale = self._affine(z)
        return (z - mean) * scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model data → raw VAE latents, ready for ``vae.decode``."""
        mean, scale = self._affine(x)
        return x / scale + mean

    def vae_config(self) -> dict:
        """The four ``AutoencoderKL`` config entries that describe this normalisation (``vae.register_to_config``)."""
        as_list = lambda values: None if values is None else list(values)  # noqa: E731
        return {
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": as_list(self.latents_mean),
            "latents_std": as_list(self.latents_std),
        }


def sample_latents(
    batch: dict[str, torch.Tensor],
    normalization: LatentNormalization,
    random_flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``z = mean + std * eps`` for a batch of cached posteriors and normalise it.

    Args:
        batch: ``mean`` and ``std`` (and optionally ``mean_flip``, ``std_flip``), each ``(B, C, h, w)``, any float dtype.
        normalization: maps raw latents to the model's data (:class:`LatentNormalization`).
        random_flip: pick each sample's mirrored posterior with probability 1/2 (needs the ``*_flip`` entries).
        generator: RNG on the batch's device for the mirror choice and ``eps`` (``None``: global RNG).

    Returns:
        ``float32`` tensor ``(B, C, h, w)``.
    """
    return _sample_latents(batch, normalization, random_flip, generator)[0]


def _sample_latents(
    batch: dict[str, torch.Tensor], normalization: LatentNormalization, random_flip: bool, generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sample_latents` and the mirror choice it made: a bool ``(B,)`` on the batch's device, or ``None`` when
    no sample was mirrored. The draws (mirror, then ``eps``) are what they have always been, so runs resume."""
    mean, std = batch["mean"].float(), batch["std"].float()
    mirrored = None
    if random_flip and "mean_flip" in batch:
        mirrored = torch.rand(mean.shape[0], generator=generator, device=mean.device) < 0.5
        as_latent = mirrored[:, None, None, None]
        mean = torch.where(as_latent, batch["mean_flip"].float(), mean)
        std = torch.where(as_latent, batch["std_flip"].float(), std)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return normalization.normalize(mean + std * eps), mirrored


def _take_rows(views: list[np.ndarray], starts: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` (global) of a column held as per-chunk ``views`` starting at rows ``starts``, in order."""
    if len(views) == 1:
        return views[0][indices]
    chunks = np.searchsorted(starts, indices, side="right") - 1
    out = np.empty((len(indices), *views[0].shape[1:]), dtype=views[0].dtype)
    for chunk in np.unique(chunks):
        rows = chunks == chunk
        out[rows] = views[chunk][indices[rows] - starts[chunk]]
    return out


def _mirrored_extra(name: str, batch: dict[str, torch.Tensor], mirrored: torch.Tensor) -> torch.Tensor:
    """Extra column ``name`` of each row as its chosen view shows it: the image flipped along its width (exact for
    uint8) and the features of the mirrored crop where ``mirrored``; as stored elsewhere. No host sync."""
    value = batch[name]
    where = mirrored.view(-1, *[1] * (value.ndim - 1))
    if name == IMAGE_COLUMN:
        return torch.where(where, value.flip(-1), value)
    if name == FEATURES_COLUMN:
        return torch.where(where, batch[FEATURES_FLIP_COLUMN], value)
    return value


class LatentDataset:
    """A latent cache written by :func:`~diffusers_speedup.data.latent_cache.cache_latents`.

    Args:
        path: the cache folder.
        random_flip: default for :meth:`sample`: use the mirrored posterior for half of the samples.
        in_memory: read every row into RAM now (``device`` moves it further, e.g. onto the GPU: ImageNet-256's mean
            and std with both mirrors are 4 × 32 × 32 × 2 B × 4 = 32 KB per image, 42 GB); otherwise batches are
            copied out of the memory-mapped Arrow files.
        device: where to keep the in-memory tensors.
        normalization: how :meth:`sample` maps raw latents to the model's data; default: the VAE's own config as
            the cache recorded it (``z * 0.18215`` for SD VAEs). See :meth:`latent_statistics` for EDM2-style
            per-channel normalisation.
        extra_columns: further columns of the cache that every batch also carries in its ``extras``, read in the
            same gather. ``"image"`` (uint8 ``(3, R, R)``, the crop the VAE encoded) and ``"encoder_features"``
            (float16 ``(N, C)``) follow the mirror choice of :meth:`sample`: a row whose mirrored posterior is
            picked gets its image flipped along the width and the features of the mirrored crop (the
            ``encoder_features_flip`` column, read in the same gather); other rows get them as stored. Any other
            column comes as stored. ``in_memory`` holds them too (ImageNet-256 images: 252 GB, so not on a GPU).

    Attributes:
        metadata: the cache's ``latents_metadata.json``, as stored.
        latent_shape, scaling_factor, num_classes, class_names, has_flip, normalization.
        has_images: whether the rows carry the ``image`` crop.
        encoder_features: ``None``, or the feature encoder's ``info`` with ``tokens`` and ``dim``.
        labels: ``int64`` tensor of every row's label.
    """

    def __init__(
        self,
        path: str,
        random_flip: bool = True,
        in_memory: bool = False,
        device: str | torch.device = "cpu",
        normalization: LatentNormalization | None = None,
        extra_columns: tuple[str, ...] | list[str] = (),
    ):
        from datasets import load_from_disk

        # The metadata is written last, so reading it first names an unfinished or missing cache as such.
        self.metadata = read_cache_metadata(path)
        self.dataset = load_from_disk(path)
        self.features = self.dataset.features
        self.latent_shape = tuple(self.metadata["latent_shape"])
        self.scaling_factor = float(self.metadata["scaling_factor"])
        self.normalization = normalization or LatentNormalization.from_vae_config(self.metadata)
        self.class_names = self.metadata.get("class_names")
        self.num_classes = int(self.metadata["num_classes"])
        self.has_flip = "mean_flip" in self.dataset.column_names
        self.random_flip = random_flip and self.has_flip
        encoder_inputs = cached_encoder_inputs(self.metadata)
        self.has_images, self.encoder_features = encoder_inputs["images"], encoder_inputs["encoder_features"]
        self.extra_columns = tuple(extra_columns)
        # A mirrored row's features come from their own column, read in the same gather when mirrors are picked
        # (a cache with mirrors always has it; only a hand-made one can lack it). Without random flips (REPA trains
        # without augmentation) it is not read: that would double the features' reads for nothing.
        mirror_columns = []
        if FEATURES_COLUMN in self.extra_columns and self.random_flip:
            mirror_columns.append(FEATURES_FLIP_COLUMN)
        wanted = [*self.extra_columns, *mirror_columns]
        missing = [name for name in dict.fromkeys(wanted) if name not in self.dataset.column_names]
        if missing:
            hints = [_HOW_TO_CACHE.get(name, "cache it with the column") for name in missing]
            raise ValueError(
                f"The latent cache {path} has no column {', '.join(map(repr, missing))} (it has "
                f"{', '.join(self.dataset.column_names)}); to train with it, {'; '.join(dict.fromkeys(hints))}."
            )
        self.columns = [name for name in _LATENT_COLUMNS if name in self.dataset.column_names]
        self.columns += [name for name in wanted if name not in self.columns]
        self.labels = torch.from_numpy(np.array(self.dataset.data.table.column("label").to_numpy(), dtype=np.int64))
        self._views = {name: self._row_views(name) for name in self.columns}
        self._memory = None
        if in_memory:
            everything = self._gather(np.arange(len(self)))
            self._memory = {name: tensor.to(device) for name, tensor in everything.items()}

    def __len__(self) -> int:
        return len(self.dataset)

    def _shape(self, name: str) -> tuple[int, ...]:
        return self.latent_shape if name in _LATENT_COLUMNS else tuple(getattr(self.features[name], "shape", ()))

    def _row_views(self, name: str) -> tuple[list[np.ndarray], np.ndarray] | None:
        """Zero-copy ``(rows, *shape)`` numpy views of column ``name``'s memory-mapped values, one per Arrow chunk,
        with each chunk's first row; ``None`` where there are none (nulls, a non-numeric column)."""
        shape, views, starts = self._shape(name), [], []
        row = 0
        for chunk in self.dataset.data.table.column(name).chunks:
            values = chunk.storage if hasattr(chunk, "storage") else chunk  # datasets' Array*D are extension arrays
            for _ in shape:
                values = values.flatten()
            if values.null_count or len(values) != len(chunk) * math.prod(shape):
                return None
            try:
                array = values.to_numpy(zero_copy_only=True)
            except (pa.ArrowInvalid, NotImplementedError):
                return None
            views.append(array.reshape(len(chunk), *shape))
            starts.append(row)
            row += len(chunk)
        return views, np.array(starts, dtype=np.int64)

    def _gather(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        # Rows copied straight out of the memory-mapped Arrow values with numpy: no per-row Python, and much faster
        # than Arrow's `take` on nested lists (about 7x for 256 px uint8 images), which stays for other columns.
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        batch, others = {}, []
        for name in self.columns:
            if self._views[name] is None:
                others.append(name)
            else:
                # Fancy indexing copies: the views are read-only, and torch must not write to them.
                batch[name] = torch.from_numpy(_take_rows(*self._views[name], indices))
        if others:
            taken = self.dataset.data.table.select(others).take(pa.array(indices, type=pa.int64()))
            for name in others:
                column = taken.column(name).combine_chunks()
                values = column.storage if hasattr(column, "storage") else column
                shape = self._shape(name)
                for _ in shape:
                    values = values.flatten()
                # np.array copies: Arrow buffers are read-only and torch warns about (and must not write to) them.
                array = np.array(values.to_numpy(zero_copy_only=False)).reshape(len(indices), *shape)
                batch[name] = torch.from_numpy(array)
        return {name: batch[name] for name in self.columns}

    def read_batch(self, indices) -> dict[str, torch.Tensor]:
        """Rows ``indices`` as ``float16`` ``mean``, ``std`` (``mean_flip``, ``std_flip``) ``(B, C, h, w)``, the
        extra columns as stored (with ``encoder_features_flip`` when ``encoder_features`` is asked for and mirrors
        are cached), ``int64`` ``label`` ``(B,)`` and ``index`` (the row numbers), on CPU (or on the in-memory
        device)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if self._memory is not None:
            device_indices = indices.to(self._memory["mean"].device)
            batch = {name: tensor[device_indices] for name, tensor in self._memory.items()}
            batch["label"] = self.labels.to(device_indices.device)[device_indices]
        else:
            batch = self._gather(indices.numpy())
            batch["label"] = self.labels[indices]
        batch["index"] = indices
        return batch

    def batch(
        self,
        indices,
        device: str | torch.device | None = None,
        generator: torch.Generator | None = None,
        random_flip: bool | None = None,
    ) -> Batch:
        """Rows ``indices`` as the model's data, on ``device``: :meth:`read_batch`, then :meth:`sample`."""
        return self.sample(self.read_batch(indices), generator=generator, device=device, random_flip=random_flip)

    def sample(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
        random_flip: bool | None = None,
    ) -> Batch:
        """Move a batch to ``device`` and draw ``Batch(z float32 (B, C, h, w), labels int64 (B,), extras)``; see
        :func:`sample_latents`. ``generator`` must live on ``device``. The extras follow each row's mirror choice
        (see ``extra_columns``); the draws are the same as without extras."""
        if device is not None:
            batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
        flip = self.random_flip if random_flip is None else random_flip and self.has_flip
        if flip and FEATURES_COLUMN in self.extra_columns and FEATURES_FLIP_COLUMN not in self.columns:
            raise ValueError(
                "sample(random_flip=True) on a LatentDataset made with random_flip=False: the features of mirrored "
                "crops were not read; make it with random_flip=True to mirror samples"
            )
        z, mirrored = _sample_latents(batch, self.normalization, flip, generator)
        if mirrored is None:
            extras = {name: batch[name] for name in self.extra_columns}
        else:
            extras = {name: _mirrored_extra(name, batch, mirrored) for name in self.extra_columns}
        return Batch(z, batch["label"], extras)

    def latent_statistics(self, max_rows: int = 16384) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of raw latents ``z = mean + std * eps`` (no normalisation), in float64.

        Exact for the posterior mixture, no sampling: ``E[z] = E[mean]`` and ``Var[z] = E[mean² + std²] - E[z]²``
        over rows and positions. Uses at most ``max_rows`` evenly spaced rows (unmirrored), so every process of a
        run computes the same numbers.
        """
        rows = np.unique(np.linspace(0, len(self) - 1, min(max_rows, len(self))).round().astype(np.int64))
        channels = self.latent_shape[0]
        first = torch.zeros(channels, dtype=torch.float64)
        second = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, len(rows), 1024):
            batch = self.read_batch(rows[start : start + 1024])
            mean, std = batch["mean"].double(), batch["std"].double()
            first += mean.sum(dim=(0, 2, 3)).cpu()
            second += (mean.square() + std.square()).sum(dim=(0, 2, 3)).cpu()
        count = len(rows) * math.prod(self.latent_shape[1:])
        channel_mean = first / count
        channel_std = (second / count - channel_mean.square()).clamp_min(0).sqrt()
        return channel_mean.tolist(), channel_std.tolist()

    def index_batches(
        self, batch_size: int, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1, **kwargs
    ) -> Iterator[torch.Tensor]:
        """This rank's index batches of one epoch (``shuffle``, ``drop_last``, ``start_step`` as in
        :func:`~diffusers_speedup.data.batching.index_batches`)."""
        return index_batches(len(self), batch_size, epoch, seed, rank, world_size, **kwargs)
