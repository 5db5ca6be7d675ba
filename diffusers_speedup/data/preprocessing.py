"""Image decoding, mode conversion and the ADM/DiT centre crop used for ImageNet-256.

Every image that reaches the VAE goes through :func:`preprocess_image`: decode fully (so truncated files fail here and
not later), turn it upright as its EXIF orientation tag says, convert any PIL mode to RGB, reject images smaller than
the target resolution, then apply ADM's ``center_crop_arr``. Failures raise :class:`ImageRejectedError` whose message is the reason recorded in the cache
metadata.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

# Name of the crop recorded in cache metadata; a cache made with another crop is a different dataset.
CROP_METHOD = "adm_center_crop"
# How the EXIF orientation tag is treated, also recorded in the cache identity. ADM (`image_datasets.py`), EDM2's
# `dataset_tool.py` and torchvision's `pil_loader` ignore it and store the sensor's pixel order, so a photo taken
# with the camera turned comes out lying on its side; every viewer, and `torchvision.io.decode_jpeg(...,
# apply_exif_orientation=True)`, shows it upright. We store what the viewer shows (`ImageOps.exif_transpose`).
# ImageNet's training JPEGs carry almost no orientation tags, so this changes little there and much on user photos.
EXIF_ORIENTATION = "exif_transpose"


class ImageRejectedError(ValueError):
    """An input image that cannot be used; ``str(error)`` is the reason stored with the rejected file."""


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Open and fully decode an image from a file path or encoded bytes.

    Args:
        source: a path to an image file, or the encoded file contents.

    Returns:
        The decoded PIL image, in whatever mode the file stores (use :func:`to_rgb` next).

    Raises:
        ImageRejectedError: the file is missing, unreadable, not an image, corrupt or truncated.
    """
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* is only a size notice; the hard limit still raises below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            # Image.open is lazy: load() decodes every pixel so truncated files fail now.
            image.load()
    except Image.DecompressionBombError as error:
        raise ImageRejectedError(f"too large to decode safely: {error}") from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad files
        raise ImageRejectedError(f"corrupt or unreadable image ({type(error).__name__}: {error})") from error
    return image


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image turned upright as its EXIF orientation tag (1-8) says, without the tag; unchanged when untagged."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # a malformed EXIF block must not reject an otherwise good image
        warnings.warn(f"ignoring an unreadable EXIF orientation ({type(error).__name__}: {error})", stacklevel=2)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    - ``RGBA``, ``LA``, ``PA`` and palette images with a transparent colour are composited on a **white** background.
      Dropping alpha (what ``convert("RGB")`` does, and what ADM/DiT do) exposes whatever colour the encoder left
      under fully transparent pixels, often black or noise; white is how these images are displayed.
    - ``I;16*`` and ``I`` (16-bit grayscale PNG/TIFF) are rescaled from 0..65535 to 0..255; ``PIL.convert`` would
      clip them instead. ``F`` (float) is clipped to 0..255.
    - ``L``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and palette images use PIL's own conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        if image.mode == "RGB":
            return image
    if image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, used unchanged by DiT, SiT, REPA and fast-DiT).

    While the shorter side is at least twice the target, halve the image with a BOX filter (anti-aliased and fast),
    then resize with BICUBIC so the shorter side equals ``resolution``, then cut the central square.

    Args:
        image: a PIL image (any size; smaller images are upsampled, see :func:`preprocess_image` for the check).
        resolution: side of the output square in pixels.

    Returns:
        ``np.uint8`` array of shape ``(resolution, resolution, channels)`` (or ``(resolution, resolution)`` for "L").
    """
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def preprocess_image(source: str | os.PathLike | bytes | Image.Image, resolution: int) -> np.ndarray:
    """Decode, convert to RGB, check the size and centre-crop one image, as ADM/DiT prepare ImageNet.

    Args:
        source: a path, encoded bytes, or an already opened PIL image.
        resolution: side of the output square in pixels.

    Returns:
        ``np.uint8`` array of shape ``(resolution, resolution, 3)``.

    Raises:
        ImageRejectedError: corrupt/truncated/unreadable file, or shorter side below ``resolution``
            (upsampling would feed the VAE blurry images that ImageNet recipes never see).
    """
    image = source if isinstance(source, Image.Image) else open_image(source)
    image = apply_exif_orientation(image)
    width, height = image.size
    if min(width, height) < resolution:
        raise ImageRejectedError(f"too small: {width}x{height} pixels, shorter side below the resolution {resolution}")
    try:
        rgb = to_rgb(image)
    except Exception as error:
        raise ImageRejectedError(
            f"cannot convert mode {image.mode!r} to RGB ({type(error).__name__}: {error})"
        ) from error
    return center_crop_arr(rgb, resolution)
