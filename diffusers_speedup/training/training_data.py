"""The training data of a recipe: pixels held in memory or a latent cache, behind one interface."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..data.batching import Batch
from ..data.latent_dataset import LatentNormalization
from .config import Config, ConfigError

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Pixels held in memory (PixelDataset) or cached latents (LatentDataset) behind one interface."""

    dataset: object
    is_latent: bool
    class_names: list[str]
    sample_shape: tuple[int, int, int]
    # Pixels only: each batch also carries its clean images as ``extras["image"]`` in [0, 255], (x0 + 1)·127.5 (for
    # REPA's encoder; a mirrored sample's image is mirrored with it).
    pixels_as_image: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def encoder_features(self) -> dict | None:
        """What a latent cache's metadata says of the encoder features its batches carry (``encoder``, ``tokens``,
        ``dim``, ...), or None when they carry none."""
        if not self.is_latent or "encoder_features" not in self.dataset.extra_columns:
            return None
        return self.dataset.metadata["encoder_features"]

    def batch(self, indices: torch.Tensor, device) -> Batch:
        batch = self.dataset.batch(indices, device)
        if self.pixels_as_image:
            batch = Batch(batch.x0, batch.class_labels, {**batch.extras, "image": (batch.x0 + 1) * 127.5})
        return batch

    def identity(self) -> dict:
        """What a checkpoint records of the data, for a resume to tell whether it changed (`data_change`).

        ``rows``: the number of samples. ``labels``: a SHA-256 of every label (and the class names). ``contents``:
        a SHA-256 of `IDENTITY_ROWS` evenly spaced rows as stored (uint8 pixels; a latent cache's float16
        posteriors, with its metadata, which names the VAE, the resolution and the images it was made from).
        Cheap for ImageNet: the labels are read already (10 MB for 1.28 M samples) and a few hundred rows are one
        gather. A deleted or added sample changes ``rows``, a relabelled or reordered one ``labels``, a re-encoded
        cache ``contents``; an edit of a single row that the sample misses goes unseen.
        """
        dataset = self.dataset
        rows = len(dataset)
        labels = hashlib.sha256(json.dumps(self.class_names).encode())
        labels.update(dataset.labels.cpu().numpy().astype("<i8").tobytes())
        sample = np.unique(np.linspace(0, rows - 1, min(IDENTITY_ROWS, rows)).round().astype(np.int64))
        if self.is_latent:
            contents = hashlib.sha256(json.dumps(dataset.metadata, sort_keys=True).encode())
            stored = dataset.read_batch(sample)
            stored.pop("index")
        else:
            contents = hashlib.sha256()
            stored = {"images": dataset.images[torch.from_numpy(sample).to(dataset.images.device)]}
        for name in sorted(stored):
            contents.update(name.encode() + stored[name].cpu().contiguous().numpy().tobytes())
        return {"rows": rows, "labels": labels.hexdigest(), "contents": contents.hexdigest()}


# Rows whose stored values `TrainingData.identity` hashes.
IDENTITY_ROWS = 256


def data_change(saved: dict, current: dict) -> str | None:
    """How the data of a checkpoint (its recorded `TrainingData.identity`) differs from the data now, in words, or
    None when it is the same."""
    if saved["rows"] != current["rows"]:
        return f"the number of samples changed: {saved['rows']} -> {current['rows']}"
    if saved["labels"] != current["labels"]:
        return f"the labels changed (the number of samples, {current['rows']}, did not)"
    if saved["contents"] != current["contents"]:
        return f"the data changed (the {current['rows']} samples have the same labels, but other contents)"
    return None


# The side that pixel data is cropped to when a recipe leaves data.resolution out.
DEFAULT_PIXEL_RESOLUTION = 32


def with_data_resolution(config: Config) -> Config:
    """The recipe with ``data.resolution`` as it will be trained, so that every saved config and export records
    that: for cached latents the resolution of the cache (read from its metadata, before any work), for pixels the
    recipe's or 32.

    Raises:
        ConfigError: when the recipe asks for another resolution than a latent cache's, naming both and the cache.
    """
    data = config.data
    resolution = DEFAULT_PIXEL_RESOLUTION if data.resolution is None else data.resolution
    if data.kind == "latents":
        from ..data.latent_cache import read_cache_metadata

        cached = read_cache_metadata(data.path).get("resolution")
        if cached is None:  # a cache that does not record it: nothing to compare, nothing to record
            return config
        if data.resolution is not None and data.resolution != cached:
            raise ConfigError(
                f"data.resolution: {data.resolution}, but the latent cache {data.path} holds {cached} px images; a "
                f"cache trains at its own resolution. Leave data.resolution out (or set it to {cached}), or cache "
                f"the images again at {data.resolution} px (cache-latents --resolution {data.resolution})."
            )
        resolution = cached
    return dataclasses.replace(config, data=dataclasses.replace(data, resolution=resolution))


def repa_extra_columns(config: Config) -> tuple[str, ...]:
    """The latent-cache columns a REPA recipe reads next to the latents: ``encoder_features`` when the cache holds
    features of ``repa.encoder``, else ``image`` when it holds the clean images; none for pixel data (the image is
    the data itself) or without REPA.

    Raises:
        ConfigError: naming the cache when it holds neither, and how to cache the images.
    """
    data, repa = config.data, config.repa
    if not repa.enabled or data.kind != "latents":
        return ()
    from ..data.latent_cache import read_cache_metadata
    from ..objectives.repa import encoder_input_size

    metadata = read_cache_metadata(data.path)
    features = metadata.get("encoder_features") or {}
    wanted = {
        "encoder": repa.encoder,
        "input_size": encoder_input_size(metadata["resolution"], repa.encoder_resolution),
    }
    if features and all(features.get(key) == value for key, value in wanted.items()):
        return ("encoder_features",)
    if metadata.get("images"):
        return ("image",)
    also = (
        f" (its encoder features are of {features.get('encoder')!r} at {features.get('input_size')} px, not of "
        f"{repa.encoder!r} at {wanted['input_size']} px)"
        if features
        else ""
    )
    raise ConfigError(
        f"repa.enabled: the latent cache {data.path} holds no clean images for REPA's encoder{also}; cache the "
        "images with the latents (diffusers-speedup cache-latents ... --store_images), or the features "
        f"(--encoder_features {repa.encoder})."
    )


def load_training_data(config: Config, device) -> TrainingData:
    from ..data import LatentDataset, load_pixel_dataset

    data = config.data
    if data.kind == "latents":
        dataset = LatentDataset(
            data.path,
            random_flip=data.random_flip,
            in_memory=data.in_memory,
            device=device,
            extra_columns=repa_extra_columns(config),
        )
        if data.latent_norm == "per_channel":
            dataset.normalization = per_channel_normalization(dataset, data)
        names = dataset.class_names or [str(i) for i in range(dataset.num_classes)]
        return TrainingData(dataset, True, list(names), dataset.latent_shape)
    source = data.name if data.kind == "builtin" else data.path
    try:
        dataset = load_pixel_dataset(
            source,
            resolution=DEFAULT_PIXEL_RESOLUTION if data.resolution is None else data.resolution,
            channels=data.channels,
            random_flip=data.random_flip,
            image_column=data.image_column,
            label_column=data.label_column,
        )
    except (OSError, ValueError) as error:  # datasets' own errors name neither the key nor, often, the path
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"data.path: cannot read {source!r} as {data.kind}: {first_line}") from None
    if data.in_memory:
        dataset = dataset.to(device)
    if dataset.rejected:
        logger.warning("%d images were rejected, e.g. %s", len(dataset.rejected), dataset.rejected[:3])
    names = dataset.class_names or [str(i) for i in range(int(dataset.labels.max()) + 1)]
    return TrainingData(dataset, False, list(names), dataset.sample_shape, pixels_as_image=config.repa.enabled)


def per_channel_normalization(dataset, data) -> LatentNormalization:
    """EDM2-style normalisation: the configured raw statistics, or the cache's own, mapped to latent_target_std."""
    channels = dataset.latent_shape[0]
    if data.latents_mean is not None:
        if len(data.latents_mean) != channels:
            raise ConfigError(
                f"data.latents_mean: {len(data.latents_mean)} values, but the latents in {data.path} have "
                f"{channels} channels."
            )
        mean, std = list(data.latents_mean), list(data.latents_std)
    else:
        mean, std = dataset.latent_statistics()
        if min(std) <= 0:
            raise ConfigError(f"data.latent_norm: a channel of the latents in {data.path} is constant (std {std}).")
    normalization = LatentNormalization.per_channel(mean, std, data.latent_target_std)
    logger.info(
        "latents normalised per channel to std %g: mean %s, std %s",
        data.latent_target_std,
        [round(v, 4) for v in mean],
        [round(v, 4) for v in std],
    )
    return normalization
