"""Cache the AutoencoderKL posterior of an image dataset into a 🤗 datasets folder, resumably, on any number of processes.

Layout of ``output_dir``::

    cache_config.json        identity of the cache (VAE weights hash, resolution, crop, input list hash, ...);
                             written first, a later run with a different identity is refused
    chunks/000123.arrow      rows of chunk 123 (``chunk_size`` consecutive inputs), written to a temp file + renamed
    chunks/000123.json       its rejected inputs; its presence marks the chunk as done
    data-*.arrow, dataset_info.json, state.json    the final dataset (``datasets.load_from_disk``)
    latents_metadata.json    written last: its presence marks the cache as complete

Chunks, not processes, are the unit of work: chunk ``c`` belongs to rank ``c % world_size``, and the final dataset
concatenates chunks in order. So the rows and their order depend only on the input list, never on the number of
processes, and a killed run (or one resumed with another number of processes) redoes at most the unfinished chunks.

Every row stores the posterior mean and std of the image *and of its horizontal mirror* (fp16), so a trainer can
sample ``z = mean + std * eps`` afresh each step (normalised as the VAE config, or per channel, says) with a random mirror
(REPA/EDM2/U-ViT practice) instead of freezing one sample and one flip (fast-DiT).

A REPA recipe's frozen encoder looks at the clean image, so a row can also carry what it needs (both are part of the
cache's identity and recorded in its metadata as ``images`` and ``encoder_features``):

- ``image`` (``store_images=True``): the uint8 ``(3, R, R)`` ADM centre crop that the VAE encoded, the same pixels.
  Only the unmirrored crop is kept: the mirror is an exact ``flip(-1)`` of it, which the reader applies to the rows
  whose mirrored latent it picks, so storing it would double the column (196,608 B per image at 256 px) for nothing.
- ``encoder_features`` and, with mirrors, ``encoder_features_flip`` (``feature_encoder=...``): an encoder's float16
  ``(N, C)`` tokens of the crop and of its mirror. A mirror's features are not a flip of the features (patches are
  not mirror-symmetric), so both are computed. DINOv2-B at 256 px: 256 × 768 × 2 B = 393,216 B per image and view.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..utils import atomic_write, meant_as_local_path
from .preprocessing import CROP_METHOD, EXIF_ORIENTATION, ImageRejectedError, preprocess_image
from .sources import ImageSource, make_source

CONFIG_NAME = "cache_config.json"
METADATA_NAME = "latents_metadata.json"
CHUNKS_DIR = "chunks"
# The image and encoder-feature columns came later without a new version: they are optional, and a cache written
# before them reads as one without them (`_IDENTITY_DEFAULTS`), so every earlier cache stays loadable and resumable.
FORMAT_VERSION = 1
IMAGE_COLUMN = "image"
FEATURES_COLUMN = "encoder_features"
FEATURES_FLIP_COLUMN = "encoder_features_flip"
# What a cache that does not record these keys (one written before they existed) holds.
_IDENTITY_DEFAULTS = {"images": False, "encoder_features": None}
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------------------------
# The VAE


def vae_fingerprint(vae) -> str:
    """SHA-256 of a VAE's config and weights: two caches are compatible only if it matches."""
    digest = hashlib.sha256(json.dumps(_plain_config(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain_config(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def load_vae(vae: str = DEFAULT_VAE, revision: str | None = None, subfolder: str | None = None):
    """Load an ``AutoencoderKL`` in fp32 on CPU and describe where it came from.

    Args:
        vae: Hub id or local folder of an ``AutoencoderKL`` (or an already built ``AutoencoderKL``).
        revision: Hub branch, tag or commit.
        subfolder: sub-folder of the repo holding the VAE (e.g. ``"vae"`` in a full pipeline repo).

    Returns:
        ``(vae, info)`` where ``info`` has ``vae_id``, ``vae_revision``, ``vae_subfolder``, ``vae_commit`` (resolved
        Hub commit when known) and ``vae_fingerprint``.
    """
    from diffusers import AutoencoderKL

    if isinstance(vae, AutoencoderKL):
        model, vae_id, commit = vae, vae.config.get("_name_or_path") or "<in-memory AutoencoderKL>", None
    else:
        _check_local_path(vae)
        vae_id = os.path.abspath(vae) if os.path.isdir(vae) else vae
        try:
            model = AutoencoderKL.from_pretrained(
                vae, revision=revision, subfolder=subfolder, torch_dtype=torch.float32
            )
        except Exception as error:
            raise OSError(f"cannot load an AutoencoderKL from vae={vae!r} (revision={revision!r}): {error}") from error
        commit = None if os.path.isdir(vae) else _hub_commit(vae, revision, subfolder)
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        model = model.to("cpu", torch.float32)
    model = model.eval().requires_grad_(False)
    info = {
        "vae_id": vae_id,
        "vae_revision": revision,
        "vae_subfolder": subfolder,
        "vae_commit": commit,
        "vae_fingerprint": vae_fingerprint(model),
    }
    return model, info


def _check_local_path(vae: str) -> None:
    """A ``vae`` that is meant as a local folder but does not exist fails here, not as a Hub lookup."""
    if not os.path.isdir(vae) and meant_as_local_path(vae):
        raise FileNotFoundError(f"vae={vae!r}: the local folder {os.path.abspath(vae)} does not exist")


def _optional_floats(values) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _hub_commit(repo_id: str, revision: str | None, subfolder: str | None) -> str | None:
    """Commit hash of the downloaded config (from the local cache path), or ``None`` if it cannot be told."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import extract_commit_hash

        path = hf_hub_download(repo_id, "config.json", subfolder=subfolder, revision=revision)
        return extract_commit_hash(path, None)
    except Exception:
        return None


def latent_shape_of(vae, resolution: int) -> tuple[int, int, int]:
    """``(latent_channels, resolution / f, resolution / f)`` with ``f = 2 ** (len(block_out_channels) - 1)``."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution={resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return (vae.config.latent_channels, resolution // factor, resolution // factor)


class LatentEncoder:
    """Encodes uint8 ``(B, H, W, 3)`` pixel batches into fp16 posterior mean/std of each image and its mirror.

    Args:
        vae: an fp32 ``AutoencoderKL`` (moved to ``device`` here).
        device: where to encode.
        dtype: ``"fp16"``, ``"bf16"`` (autocast) or ``"fp32"``. A batch whose low-precision result is not finite is
            encoded again in fp32 (fp16 VAE overflows are documented for some VAEs).
        flip: also encode the horizontal mirror.
        compile: ``torch.compile`` the encoder (worth it for long runs on GPU).
    """

    def __init__(self, vae, device: torch.device, dtype: str = "fp32", flip: bool = True, compile: bool = False):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {tuple(_DTYPES)}")
        self.device, self.flip = torch.device(device), flip
        self.amp_dtype = None if dtype == "fp32" else _DTYPES[dtype]
        self.vae = vae.to(self.device)
        if self.device.type == "cuda":
            self.vae.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.encoder_call = torch.compile(self.vae.encode) if compile else self.vae.encode

    def _moments(self, pixels: torch.Tensor, amp_dtype) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            distribution = self.encoder_call(pixels).latent_dist
        return distribution.mean.float(), distribution.std.float()

    @torch.no_grad()
    def __call__(self, pixels_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns fp16 CPU tensors ``mean``, ``std`` (and ``mean_flip``, ``std_flip``) of shape ``(B, C, h, w)``."""
        count = pixels_uint8.shape[0]
        pixels = pixels_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if self.flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        if self.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        mean, std = self._moments(pixels, self.amp_dtype)
        if self.amp_dtype is not None and not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            mean, std = self._moments(pixels, None)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise FloatingPointError("the VAE produced non-finite latents even in fp32")
        mean, std = mean.half().cpu(), std.half().cpu()
        out = {"mean": mean[:count], "std": std[:count]}
        if self.flip:
            out.update(mean_flip=mean[count:], std_flip=std[count:])
        return out


# --------------------------------------------------------------------------------------------------------------------
# Encoder features (what REPA's frozen encoder sees, computed once instead of every step)


def feature_encoder_identity(feature_encoder, resolution: int, device: torch.device) -> dict:
    """What a cache records of a feature encoder: ``{**feature_encoder.info, "tokens": N, "dim": C}``, with ``N`` and
    ``C`` read from one call on a black ``resolution``² crop.

    Raises:
        TypeError: ``feature_encoder`` is not callable, or its ``info`` is not a JSON-serialisable dict.
        ValueError: ``info`` uses the reserved keys ``tokens`` or ``dim``, or the call does not return ``(B, N, C)``.
    """
    if not callable(feature_encoder):
        raise TypeError(
            f"feature_encoder must be callable (uint8 images (B, 3, R, R) -> (B, N, C)), got {feature_encoder!r}"
        )
    info = getattr(feature_encoder, "info", None)
    if not isinstance(info, dict):
        raise TypeError(
            "feature_encoder.info must be a dict describing the encoder (e.g. its model id, revision and weights "
            f"hash), which the cache records and compares on resume; got {info!r}"
        )
    reserved = sorted({"tokens", "dim"} & set(info))
    if reserved:
        raise ValueError(f"feature_encoder.info must not set {reserved}: the cache fills them in from the features")
    try:
        plain = json.loads(json.dumps(info))  # tuples become lists now, so a resume compares equal values
    except (TypeError, ValueError) as error:
        raise TypeError(f"feature_encoder.info is not JSON-serialisable: {error}") from error
    probe = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8, device=device)
    tokens, dim = encode_features(feature_encoder, probe).shape[1:]
    return {**plain, "tokens": int(tokens), "dim": int(dim)}


@torch.no_grad()
def encode_features(feature_encoder, images: torch.Tensor) -> torch.Tensor:
    """``feature_encoder(images)`` checked and stored as float16 on the CPU.

    Args:
        feature_encoder: callable taking uint8 ``(B, 3, R, R)`` images on their device, returning a float ``(B, N, C)``.
        images: uint8 ``(B, 3, R, R)``.

    Raises:
        ValueError: the result is not a float tensor ``(B, N, C)``.
        FloatingPointError: a feature is not finite, or not within float16's range.
    """
    features = feature_encoder(images)
    count = images.shape[0]
    if not (
        isinstance(features, torch.Tensor)
        and features.is_floating_point()
        and features.ndim == 3
        and features.shape[0] == count
    ):
        described = (
            f"{features.dtype} tensor of shape {tuple(features.shape)}"
            if isinstance(features, torch.Tensor)
            else type(features).__name__
        )
        raise ValueError(
            f"feature_encoder returned a {described} for {count} images; expected a float (B, N, C) tensor"
        )
    stored = features.detach().half()
    if not torch.isfinite(stored).all():
        largest = features.detach().float().abs().nan_to_num(float("inf")).max().item()
        raise FloatingPointError(
            f"feature_encoder returned features that are not finite in float16 (largest |value| {largest:.4g}; "
            "float16 holds up to 65504)"
        )
    return stored.cpu()


# --------------------------------------------------------------------------------------------------------------------
# Decoding images on DataLoader workers


class _PreprocessedImages(TorchDataset):
    """Item ``i`` of the source, decoded and centre-cropped on a worker: ``(i, uint8 HWC array or None, reason)``."""

    def __init__(self, source: ImageSource, resolution: int):
        self.source, self.resolution = source, resolution

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return index, preprocess_image(self.source.read(index), self.resolution), None
        except ImageRejectedError as error:
            return index, None, str(error)
        except Exception as error:  # an unexpected failure on one file must not end a 1.28M-image run
            return index, None, f"failed to read ({type(error).__name__}: {error})"


def _collate(items):
    accepted = [(index, array) for index, array, _ in items if array is not None]
    pixels = torch.from_numpy(np.stack([array for _, array in accepted])) if accepted else None
    return {
        "indices": [index for index, _ in accepted],
        "pixels": pixels,
        "rejected": [(index, reason) for index, array, reason in items if array is None],
        "count": len(items),
    }


def _chunk_range(chunk: int, chunk_size: int, num_items: int) -> range:
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, num_items))


# --------------------------------------------------------------------------------------------------------------------
# Output folder: identity, chunks, final dataset


def _atomic_write_json(path: str, payload) -> None:
    with atomic_write(path) as temporary, open(temporary, "w") as file:
        json.dump(payload, file, indent=2, default=str)


def _check_output_dir(output_dir: str, identity: dict) -> None:
    """Refuse an output folder made for a different cache (never append to it)."""
    if not os.path.isdir(output_dir):
        return
    config_path = os.path.join(output_dir, CONFIG_NAME)
    if not os.path.exists(config_path):
        if os.listdir(output_dir):
            raise FileExistsError(
                f"output_dir={output_dir!r} is not empty and has no {CONFIG_NAME}: it is not a latent cache; "
                "choose an empty or new folder"
            )
        return
    with open(config_path) as file:
        stored = {**_IDENTITY_DEFAULTS, **json.load(file)}
    differences = _differences(stored, identity)
    if differences:
        raise ValueError(
            f"output_dir={output_dir!r} holds a latent cache made with different settings, refusing to append to it "
            f"({'; '.join(differences)}). Use a new output_dir, or delete this one to start over."
        )


def _differences(stored, current, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(stored) | set(current)):
            found += _differences(stored.get(key), current.get(key), f"{prefix}{key}.")
        return found
    if stored != current:
        return [f"{prefix.rstrip('.')}: cache has {stored!r}, this run has {current!r}"]
    return []


def _array_columns(
    latent_shape: tuple[int, int, int], flip: bool, resolution: int, store_images: bool, encoder_features: dict | None
) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{column: (shape of one row, dtype)}`` of every array column, in the order the rows store them."""
    latent = (tuple(latent_shape), "float16")
    columns = {"mean": latent, "std": latent}
    if flip:
        columns.update(mean_flip=latent, std_flip=latent)
    if store_images:
        columns[IMAGE_COLUMN] = ((3, resolution, resolution), "uint8")
    if encoder_features is not None:
        features = ((encoder_features["tokens"], encoder_features["dim"]), "float16")
        columns[FEATURES_COLUMN] = features
        if flip:
            columns[FEATURES_FLIP_COLUMN] = features
    return columns


def _features(class_names: list[str] | None, array_columns: dict[str, tuple[tuple[int, ...], str]]):
    from datasets import Array2D, Array3D, ClassLabel, Features, Value

    columns = {
        "index": Value("int64"),
        "path": Value("string"),
        "label": ClassLabel(names=class_names) if class_names else Value("int64"),
    }
    for name, (shape, dtype) in array_columns.items():
        columns[name] = (Array3D if len(shape) == 3 else Array2D)(shape=shape, dtype=dtype)
    return Features(columns)


def _write_chunk(chunk_dir: str, chunk: int, rows: dict, rejected: list[dict], features, writer_rank=(0, 1)) -> None:
    from datasets.arrow_writer import ArrowWriter

    arrow_path = os.path.join(chunk_dir, f"{chunk:06d}.arrow")
    with atomic_write(arrow_path) as temporary:
        writer = ArrowWriter(features=features, path=str(temporary))
        writer.write_batch(rows)
        writer.finalize()
        writer.close()
    # The JSON goes last: a chunk counts as done only once both files are in place.
    # Which process of how many wrote it: evidence, kept with --keep_chunks, that the work really was shared.
    rank, world_size = writer_rank
    record = {"chunk": chunk, "rejected": rejected, "rank": rank, "world_size": world_size}
    _atomic_write_json(os.path.join(chunk_dir, f"{chunk:06d}.json"), record)


def _chunk_done(chunk_dir: str, chunk: int) -> bool:
    return os.path.exists(os.path.join(chunk_dir, f"{chunk:06d}.json")) and os.path.exists(
        os.path.join(chunk_dir, f"{chunk:06d}.arrow")
    )


def _finalize(output_dir: str, num_chunks: int, listing_rejected: list[dict], metadata: dict, keep_chunks: bool):
    from datasets import Dataset, concatenate_datasets

    chunk_dir = os.path.join(output_dir, CHUNKS_DIR)
    missing = [chunk for chunk in range(num_chunks) if not _chunk_done(chunk_dir, chunk)]
    if missing:
        raise RuntimeError(f"chunks {missing[:10]} of {num_chunks} are missing in {chunk_dir!r}; run again to resume")
    parts, rejected = [], list(listing_rejected)
    for chunk in range(num_chunks):
        parts.append(Dataset.from_file(os.path.join(chunk_dir, f"{chunk:06d}.arrow")))
        with open(os.path.join(chunk_dir, f"{chunk:06d}.json")) as file:
            rejected += json.load(file)["rejected"]
    dataset = concatenate_datasets(parts)
    dataset.save_to_disk(output_dir)
    metadata.update(num_accepted=len(dataset), num_rejected=len(rejected), rejected=rejected)
    _atomic_write_json(os.path.join(output_dir, METADATA_NAME), metadata)
    if not keep_chunks:
        shutil.rmtree(chunk_dir, ignore_errors=True)


def _check_something_accepted(chunk_dir: str, num_chunks: int, listing_rejected: list[dict], output_dir: str) -> None:
    """Fail when every input was rejected (read by every process, so that all of them stop together): an empty
    cache would look finished and give a trainer nothing to train on."""
    from datasets import Dataset

    if not all(_chunk_done(chunk_dir, chunk) for chunk in range(num_chunks)):
        return  # _finalize names the missing chunks
    if any(len(Dataset.from_file(os.path.join(chunk_dir, f"{chunk:06d}.arrow"))) for chunk in range(num_chunks)):
        return
    rejected = list(listing_rejected)
    for chunk in range(num_chunks):
        with open(os.path.join(chunk_dir, f"{chunk:06d}.json")) as file:
            rejected += json.load(file)["rejected"]
    examples = "; ".join(f"{item['path']}: {item['reason']}" for item in rejected[:3])
    raise ValueError(
        f"no image was accepted: all {len(rejected)} inputs were rejected (e.g. {examples}); the cache in "
        f"{output_dir} stays incomplete"
    )


def read_cache_metadata(output_dir: str) -> dict:
    """The ``latents_metadata.json`` of a complete cache, as stored (raises if the cache is incomplete).

    A cache written before the image and feature columns existed has no ``images`` or ``encoder_features`` keys:
    read them with :func:`cached_encoder_inputs`. They are not filled in here, so the metadata (which a training
    checkpoint hashes to tell whether its data changed) reads as it always did.
    """
    path = os.path.join(output_dir, METADATA_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{output_dir!r} is not a complete latent cache (no {METADATA_NAME})")
    with open(path) as file:
        return json.load(file)


def cached_encoder_inputs(metadata: dict) -> dict:
    """What a cache holds for a representation encoder, from its metadata: ``images`` (whether rows carry the uint8
    ``image`` crop) and ``encoder_features`` (``None``, or the encoder's ``info`` with ``tokens`` and ``dim``).
    A cache that does not record them (one written before they existed) holds neither."""
    return {key: metadata.get(key, default) for key, default in _IDENTITY_DEFAULTS.items()}


# --------------------------------------------------------------------------------------------------------------------
# The entry point


def cache_latents(
    output_dir: str,
    *,
    image_folder: str | None = None,
    dataset: str | None = None,
    builtin: str | None = None,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    vae=DEFAULT_VAE,
    vae_revision: str | None = None,
    vae_subfolder: str | None = None,
    resolution: int = 256,
    flip: bool = True,
    store_images: bool = False,
    feature_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 64,
    chunk_size: int = 1024,
    num_workers: int = 8,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    compile: bool = False,
    max_images: int | None = None,
    keep_chunks: bool = False,
    progress: bool = True,
    push_to_hub: str | None = None,
    private: bool = True,
    on_chunk_written: Callable[[int], None] | None = None,
) -> dict:
    """Encode every image of one input with an ``AutoencoderKL`` and save the posteriors as a 🤗 datasets folder.

    Run it in every process of ``accelerate launch`` / ``torchrun`` (or in one plain process): each process encodes
    its own chunks; the main process assembles the final dataset.

    Args:
        output_dir: folder of the cache. Resumed if it holds an unfinished cache with the same identity; refused if
            it holds a different one.
        image_folder: ImageNet-style folder (one sub-folder per class; class id = sorted folder index).
        dataset: 🤗 dataset name on the Hub or local folder, with ``image_column`` and ``label_column``.
        builtin: name of a built-in dataset (``"digits"``). Exactly one of ``image_folder``, ``dataset``,
            ``builtin`` is given.
        split: split of ``dataset`` / ``builtin``.
        image_column, label_column: columns of ``dataset``.
        vae: Hub id or local folder of an ``AutoencoderKL`` (or the model itself).
        vae_revision, vae_subfolder: where in the Hub repo the VAE is.
        resolution: side of the ADM centre crop fed to the VAE; smaller images are rejected.
        flip: also store the posterior of each image's horizontal mirror (``mean_flip``, ``std_flip``).
        store_images: also store, in the column ``image``, the uint8 ``(3, R, R)`` crop that the VAE encoded (the
            clean image a REPA encoder looks at; ``3·R²`` bytes per image). Only the unmirrored crop: the mirror is
            its exact ``flip(-1)``, which :class:`~diffusers_speedup.data.latent_dataset.LatentDataset` applies
            to the rows whose mirrored latent it picks, so storing it would double the column for nothing.
        feature_encoder: a callable from uint8 images ``(B, 3, R, R)`` on the encoding device to a float tensor
            ``(B, N, C)`` (an ``nn.Module`` is moved to the device), with an attribute ``info``: a small
            JSON-serialisable dict describing it (model id, revision, weights hash, preprocessing), which the
            cache's identity and metadata record together with ``tokens`` ``N`` and ``dim`` ``C``. Its features of
            the crop go to ``encoder_features`` and, with ``flip``, those of the mirrored crop (computed, not a flip
            of the features) to ``encoder_features_flip``; both float16, ``2·N·C`` bytes per image and view. It
            runs under ``torch.no_grad`` in whatever precision it chooses.
        batch_size: images per VAE call (the mirror doubles the VAE batch).
        chunk_size: inputs per chunk file, the unit of resumption and of work split. Part of the cache identity.
        num_workers: DataLoader workers decoding images per process (``0`` decodes in the main thread).
        dtype: VAE compute precision: ``"auto"`` (fp16 on GPU, fp32 on CPU), ``"fp16"``, ``"bf16"``, ``"fp32"``.
        device: encoding device (default: this process's accelerator device).
        compile: ``torch.compile`` the VAE encoder.
        max_images: only the first ``max_images`` inputs (for trials and benchmarks).
        keep_chunks: keep the chunk files after the final dataset is written.
        progress: show a tqdm bar (images/s) on the main process.
        push_to_hub: dataset repo id to push the finished cache to (``Dataset.push_to_hub`` + the metadata JSON).
        private: create the Hub repo as private.
        on_chunk_written: called with the chunk number after each chunk is safely on disk.

    Returns:
        The cache metadata (also in ``output_dir/latents_metadata.json``): VAE id/revision/fingerprint,
        ``scaling_factor``, ``shift_factor``, ``latents_mean``, ``latents_std`` (the VAE config's normalisation),
        ``resolution``, ``latent_shape``, ``crop_method``, ``images`` (bool), ``encoder_features`` (``None`` or the
        encoder's ``info`` with ``tokens`` and ``dim``), counts, rejected files with reasons, class names.
    """
    from accelerate import PartialState

    from ..distributed import check_world_size

    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if dtype not in ("auto", *_DTYPES):
        raise ValueError(f"dtype={dtype!r} is not one of ('auto', 'fp16', 'bf16', 'fp32')")
    if not isinstance(store_images, bool):
        raise TypeError(f"store_images must be True or False, got {store_images!r}")

    # Without cpu=True accelerate treats a CPU-only torchrun as one process per rank and would skip the barriers.
    on_cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    check_world_size(state.num_processes, "train/cache_latents.py")
    device = torch.device(device) if device is not None else state.device
    encode_dtype = ("fp16" if device.type == "cuda" else "fp32") if dtype == "auto" else dtype
    output_dir = os.path.abspath(output_dir)

    source = make_source(image_folder, dataset, builtin, split, image_column, label_column, resolution)
    if max_images is not None:
        source.keys, source.labels = source.keys[:max_images], source.labels[:max_images]
        source.description["max_images"] = max_images
    if len(source) == 0:
        raise ValueError(f"no images found in the input {source.description}")
    model, vae_info = load_vae(vae, vae_revision, vae_subfolder)
    latent_shape = latent_shape_of(model, resolution)
    features_identity = None
    if feature_encoder is not None:
        if isinstance(feature_encoder, torch.nn.Module):
            feature_encoder.to(device)
        features_identity = feature_encoder_identity(feature_encoder, resolution, device)
    identity = {
        "format_version": FORMAT_VERSION,
        "vae_fingerprint": vae_info["vae_fingerprint"],
        "resolution": resolution,
        "crop_method": CROP_METHOD,
        "exif_orientation": EXIF_ORIENTATION,
        "flip": flip,
        "images": store_images,
        "encoder_features": features_identity,
        "encode_dtype": encode_dtype,
        "chunk_size": chunk_size,
        "input": {**source.description, "num_items": len(source), "fingerprint": source.fingerprint()},
    }

    # Every rank checks (read-only) before anyone writes, so a refusal stops all ranks instead of hanging them.
    _check_output_dir(output_dir, identity)
    state.wait_for_everyone()
    chunk_dir = os.path.join(output_dir, CHUNKS_DIR)
    if state.is_main_process:
        os.makedirs(chunk_dir, exist_ok=True)
        if not os.path.exists(os.path.join(output_dir, CONFIG_NAME)):
            _atomic_write_json(os.path.join(output_dir, CONFIG_NAME), identity)
    state.wait_for_everyone()
    _check_output_dir(output_dir, identity)  # also catches ranks that listed a different input

    if os.path.exists(os.path.join(output_dir, METADATA_NAME)):
        metadata = read_cache_metadata(output_dir)
        _maybe_push(metadata, output_dir, push_to_hub, private, state.is_main_process)
        return metadata

    num_chunks = math.ceil(len(source) / chunk_size)
    array_columns = _array_columns(latent_shape, flip, resolution, store_images, features_identity)
    features = _features(source.class_names, array_columns)
    encoded_here, encode_seconds = _encode_own_chunks(
        source,
        LatentEncoder(model, device, encode_dtype, flip, compile),
        state,
        chunk_dir,
        features,
        array_columns=array_columns,
        store_images=store_images,
        feature_encoder=feature_encoder,
        resolution=resolution,
        batch_size=batch_size,
        chunk_size=chunk_size,
        num_workers=num_workers,
        progress=progress,
        on_chunk_written=on_chunk_written,
    )

    state.wait_for_everyone()
    _check_something_accepted(chunk_dir, num_chunks, source.listing_rejected, output_dir)
    metadata_path = os.path.join(output_dir, METADATA_NAME)
    if state.is_main_process:
        metadata = _cache_metadata(identity, vae_info, model, latent_shape, features, source)
        _finalize(output_dir, num_chunks, source.listing_rejected, metadata, keep_chunks)
        if progress:
            print(
                f"latent cache: {metadata['num_accepted']} images encoded, {metadata['num_rejected']} rejected; "
                f"rank 0 encoded at {encoded_here / max(encode_seconds, 1e-9):.1f} img/s; saved to {output_dir}"
            )
    state.wait_for_everyone()
    metadata = read_cache_metadata(output_dir) if os.path.exists(metadata_path) else {}
    _maybe_push(metadata, output_dir, push_to_hub, private, state.is_main_process)
    return metadata


def _cache_metadata(identity: dict, vae_info: dict, model, latent_shape, features, source) -> dict:
    """What ``latents_metadata.json`` records besides the counts: the identity, the VAE and its normalisation, the
    layout and the classes."""
    return {
        **identity,
        **vae_info,
        "scaling_factor": float(model.config.scaling_factor),
        "shift_factor": None if model.config.get("shift_factor") is None else float(model.config.shift_factor),
        "latents_mean": _optional_floats(model.config.get("latents_mean")),
        "latents_std": _optional_floats(model.config.get("latents_std")),
        "latent_shape": list(latent_shape),
        "storage_dtype": "float16",
        "columns": list(features),
        "class_names": source.class_names,
        "num_classes": len(source.class_names or []) or (max(source.labels) + 1),
        "num_inputs": len(source) + len(source.listing_rejected),
        "source": source.description,
    }


def _encode_own_chunks(
    source,
    encoder,
    state,
    chunk_dir: str,
    features,
    *,
    array_columns: dict[str, tuple[tuple[int, ...], str]],
    store_images: bool,
    feature_encoder: Callable[[torch.Tensor], torch.Tensor] | None,
    resolution: int,
    batch_size: int,
    chunk_size: int,
    num_workers: int,
    progress: bool,
    on_chunk_written: Callable[[int], None] | None,
) -> tuple[int, float]:
    """Encode this process's unfinished chunks (chunk ``c`` belongs to rank ``c % num_processes``) and write each
    one as soon as its last batch is encoded. Returns the images this process encoded and the seconds it took."""
    from tqdm.auto import tqdm

    num_items = len(source)
    num_chunks = math.ceil(num_items / chunk_size)
    my_chunks = [
        chunk
        for chunk in range(state.process_index, num_chunks, state.num_processes)
        if not _chunk_done(chunk_dir, chunk)
    ]
    batches = []  # (chunk, indices) in order; batches never cross a chunk boundary
    for chunk in my_chunks:
        indices = list(_chunk_range(chunk, chunk_size, num_items))
        batches += [(chunk, indices[start : start + batch_size]) for start in range(0, len(indices), batch_size)]

    loader = DataLoader(
        _PreprocessedImages(source, resolution),
        batch_sampler=[indices for _, indices in batches],
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    bar = tqdm(
        total=sum(len(indices) for _, indices in batches),
        unit="img",
        desc=f"encoding (rank 0 of {state.num_processes})",
        disable=not (progress and state.is_main_process),
        smoothing=0.05,
    )
    rows, rejected, started = _empty_rows(array_columns), [], time.perf_counter()
    for (chunk, indices), batch in zip(batches, loader):
        if batch["indices"]:
            encoded = encoder(batch["pixels"])
            # The very pixels the VAE just encoded, channels first: (B, 3, R, R) uint8.
            if store_images:
                encoded[IMAGE_COLUMN] = batch["pixels"].permute(0, 3, 1, 2)
            if feature_encoder is not None:
                images = batch["pixels"].to(encoder.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
                # In the VAE's precision: fp16 autocast on a GPU by default, as REPA runs its encoder in training.
                amp_dtype = encoder.amp_dtype
                with torch.autocast(encoder.device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
                    encoded[FEATURES_COLUMN] = encode_features(feature_encoder, images)
                    if encoder.flip:
                        encoded[FEATURES_FLIP_COLUMN] = encode_features(feature_encoder, images.flip(-1))
            for name, values in encoded.items():
                expected = array_columns[name][0]
                if tuple(values.shape[1:]) != expected:  # datasets does not validate Array3D shapes on write
                    raise RuntimeError(f"{name} has shape {tuple(values.shape[1:])} per image, expected {expected}")
                rows[name].append(values.numpy())
            rows["index"] += batch["indices"]
            rows["path"] += [source.keys[index] for index in batch["indices"]]
            rows["label"] += [source.labels[index] for index in batch["indices"]]
        rejected += [
            {"index": index, "path": source.keys[index], "reason": reason} for index, reason in batch["rejected"]
        ]
        bar.update(batch["count"])
        if indices[-1] == _chunk_range(chunk, chunk_size, num_items)[-1]:
            _write_chunk(
                chunk_dir,
                chunk,
                _stack_rows(rows, array_columns),
                rejected,
                features,
                (state.process_index, state.num_processes),
            )
            if on_chunk_written is not None:
                on_chunk_written(chunk)
            rows, rejected = _empty_rows(array_columns), []
    bar.close()
    return bar.n, time.perf_counter() - started


def _empty_rows(array_columns: dict) -> dict:
    return {"index": [], "path": [], "label": [], **{name: [] for name in array_columns}}


def _stack_rows(rows: dict, array_columns: dict[str, tuple[tuple[int, ...], str]]) -> dict:
    stacked = dict(rows)
    for name, (shape, dtype) in array_columns.items():
        parts = rows[name]
        stacked[name] = np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)
    return stacked


def _maybe_push(metadata: dict, output_dir: str, repo_id: str | None, private: bool, is_main: bool) -> None:
    if not repo_id or not is_main:
        return
    from ..hub.push import push_dataset_folder

    # Parquet shards plus the metadata files; a failure is one token-free PushError line.
    push_dataset_folder(output_dir, repo_id, private=private, commit_message="Add cached VAE latents")
