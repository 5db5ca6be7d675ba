"""Data: the built-in dataset, image preprocessing, latent caching with AutoencoderKL, and the trainer-side readers."""

from .batching import Batch, epoch_permutation, index_batches, steps_per_epoch
from .builtin import DIGITS_CLASS_NAMES, load_builtin_arrays, load_builtin_dataset
from .latent_cache import (
    DEFAULT_VAE,
    LatentEncoder,
    cache_latents,
    cached_encoder_inputs,
    load_vae,
    read_cache_metadata,
    vae_fingerprint,
)
from .latent_dataset import LatentDataset, LatentNormalization, sample_latents
from .pixels import PixelDataset, load_pixel_dataset
from .preprocessing import ImageRejectedError, center_crop_arr, open_image, preprocess_image, to_rgb
from .sources import HFDatasetSource, ImageFolderSource, ImageSource, make_source

__all__ = [
    "Batch",
    "DEFAULT_VAE",
    "DIGITS_CLASS_NAMES",
    "HFDatasetSource",
    "ImageFolderSource",
    "ImageRejectedError",
    "ImageSource",
    "LatentDataset",
    "LatentEncoder",
    "LatentNormalization",
    "PixelDataset",
    "cache_latents",
    "cached_encoder_inputs",
    "center_crop_arr",
    "epoch_permutation",
    "index_batches",
    "load_builtin_arrays",
    "load_builtin_dataset",
    "load_pixel_dataset",
    "load_vae",
    "make_source",
    "open_image",
    "preprocess_image",
    "read_cache_metadata",
    "sample_latents",
    "steps_per_epoch",
    "to_rgb",
    "vae_fingerprint",
]
