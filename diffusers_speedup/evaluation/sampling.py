"""Large-scale, resumable sample generation for FID (e.g. 50K class-conditional images).

The N samples are cut into shards of `batch_size` consecutive samples; shard `s` holds samples
`[s * batch_size, min((s + 1) * batch_size, N))` and is produced by one pipeline call. Everything that shard needs is
fixed by the run's settings and `s` alone:

- its class labels are a slice of one label sequence drawn for the whole run (balanced, seeded random, or given),
- its noise comes from a CPU `torch.Generator` seeded with `shard_seed(seed, s)`, so it is the same on any device.

Process `rank` of `world_size` takes the shards with `s % world_size == rank`. Each finished shard is written to
`shards/shard_{s:06d}.npz` through a temporary file and `os.replace`, so a killed run leaves only complete shards; a
rerun skips them. Hence an interrupted-and-resumed run, or one on a different number of processes, produces the same
samples as one uninterrupted run (bit for bit where the pipeline itself is deterministic, e.g. on CPU). At the end
the main process merges the shards into `samples_{N}x{H}x{W}x{C}.npz` in ADM's layout (see `npz_io`).

`sampling_config.json` records what produces the shards: the pipeline (its class, a hash of its weights, its
scheduler and the scheduler's config), the autocast precision, the sampling arguments (steps, guidance, interval),
the seed and the label scheme. A rerun into the same folder that differs in any of them is refused, naming the field
and both values, so one `.npz` never mixes two models or two settings. A folder that holds no samples yet (its run
failed before finishing a shard) is no other run's: a rerun with other settings takes it over.
"""

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils import atomic_write
from .npz_io import IMAGES_KEY, LABELS_KEY, write_adm_npz, write_npz_atomically

logger = logging.getLogger(__name__)

CONFIG_NAME = "sampling_config.json"
SHARDS_DIR = "shards"
PNG_DIR = "png"


def float_images_to_uint8(images: np.ndarray) -> np.ndarray:
    """Map float images in [0, 1] to uint8 by rounding to the nearest level: `floor(clip(x, 0, 1) * 255 + 0.5)`.

    This is the conversion of EDM (`x * 127.5 + 128` on [-1, 1] images, then clip and cast) and of DiT's
    `sample_ddp.py`, written for [0, 1]. ADM's own `image_sample.py` truncates instead (`(x + 1) * 127.5` cast to
    uint8), which is darker by half a level on average; diffusers' `numpy_to_pil` rounds like this function.
    """
    images = np.asarray(images, dtype=np.float32)
    return np.floor(np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def shard_seed(seed: int, shard_index: int) -> int:
    """Seed of the noise generator for one shard: a well-mixed 64-bit function of `(seed, shard_index)` only."""
    return int(np.random.SeedSequence([int(seed), int(shard_index)]).generate_state(1, dtype=np.uint64)[0])


# The label of every sample of an unconditional model; merged archives of such runs have no `arr_1`, as ADM's.
NO_LABEL = -1


def make_class_labels(
    class_labels: str | Sequence[int] | np.ndarray | torch.Tensor,
    num_samples: int,
    num_classes: int | None,
    seed: int,
) -> np.ndarray:
    """The class label of every sample of a run, as an int64 array of length `num_samples`.

    Args:
        class_labels: `"none"`: an unconditional model, every label is `NO_LABEL`; `"balanced"`: sample `i` gets
            class `i % num_classes`, so every class appears
            `num_samples // num_classes` or one more times and each shard mixes many classes; `"random"`: i.i.d.
            uniform classes from `numpy.random.default_rng(seed)`, as ADM, DiT and EDM2 sample them; or an explicit
            sequence of `num_samples` ids.
        num_samples: number of samples in the run.
        num_classes: number of classes (required for "balanced" and "random"; checked against an explicit list).
        seed: the run's seed.
    """
    if isinstance(class_labels, str):
        if class_labels not in ("balanced", "random", "none"):
            raise ValueError(
                f"class_labels must be 'balanced', 'random', 'none' or a list of ids, got {class_labels!r}"
            )
        if class_labels == "none":
            return np.full(num_samples, NO_LABEL, dtype=np.int64)
        if num_classes is None or int(num_classes) < 1:
            raise ValueError(f"class_labels={class_labels!r} needs num_classes >= 1, got num_classes={num_classes!r}")
        if class_labels == "balanced":
            return np.arange(num_samples, dtype=np.int64) % int(num_classes)
        return np.random.default_rng(int(seed)).integers(0, int(num_classes), size=num_samples, dtype=np.int64)
    if isinstance(class_labels, torch.Tensor):
        class_labels = class_labels.cpu().numpy()
    labels = np.asarray(class_labels)
    if labels.ndim != 1 or labels.shape[0] != num_samples or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"class_labels given as a list must hold exactly num_samples={num_samples} integer ids, "
            f"got dtype {labels.dtype} and shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise ValueError(
            f"class_labels must lie in [0, num_classes={num_classes}), got values in [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64)


def _pipeline_images_to_uint8(output: Any, expected: int) -> np.ndarray:
    """uint8 NHWC images from a pipeline's output: `.images` (or the first tuple element) as float [0, 1] NHWC
    numpy (output_type="np"), float NCHW torch (output_type="pt"), uint8 arrays, or PIL images."""
    images = output.images if hasattr(output, "images") else output[0]
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    elif isinstance(images, list | tuple):
        images = np.stack([np.asarray(image) for image in images])
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] != expected:
        raise ValueError(f"the pipeline returned images of shape {images.shape}; expected {expected} NHWC images")
    return images if images.dtype == np.uint8 else float_images_to_uint8(images)


def pipeline_identity(pipeline: Any) -> dict | None:
    """What makes a pipeline's samples what they are: its class, a SHA-256 of every model component's weights (in
    the dtype it samples with) and config, and the scheduler's class and config. None for a plain callable without
    diffusers' ``components``, which cannot be looked into."""
    components = getattr(pipeline, "components", None)
    if not isinstance(components, dict):
        return None
    weights = hashlib.sha256()
    schedulers = {}
    for name in sorted(components):
        component = components[name]
        config = getattr(component, "config", None)
        plain = {} if config is None else {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        if isinstance(component, torch.nn.Module):
            weights.update(f"{name}:{type(component).__name__}:".encode())
            weights.update(json.dumps(plain, sort_keys=True, default=repr).encode())
            for key, tensor in sorted(component.state_dict().items()):
                weights.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif config is not None:
            schedulers[name] = {"class": type(component).__name__, **json.loads(json.dumps(plain, default=repr))}
    return {"class": type(pipeline).__name__, "weights_sha256": weights.hexdigest(), **schedulers}


def _run_config(
    num_samples, batch_size, seed, class_labels, labels, num_classes, sampling_kwargs, pipeline, accelerator
) -> dict:
    mode = class_labels if isinstance(class_labels, str) else "list"
    return {
        # Another model, or the same weights with another scheduler or autocast precision, makes other samples.
        "pipeline": pipeline_identity(pipeline),
        "mixed_precision": str(getattr(accelerator, "mixed_precision", "no")),
        "num_samples": int(num_samples),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "class_labels": mode,
        "num_classes": None if num_classes is None else int(num_classes),
        # A fingerprint of the labels catches a resumed run whose explicit list differs.
        "labels_sha256": hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest(),
        # A JSON round trip normalises tuples to lists, so a reloaded config compares equal.
        "sampling_kwargs": json.loads(json.dumps(sampling_kwargs, sort_keys=True, default=repr)),
    }


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_run_config(output_dir: Path, config: dict) -> bool:
    """Whether `config` is to be written into `output_dir` (False: its sampling_config.json already records this
    run). Refuses a folder holding samples that were made with other settings, naming the first field that differs."""
    path = output_dir / CONFIG_NAME
    if not path.exists():
        return True
    saved, current = _flatten(json.loads(path.read_text())), _flatten(config)
    differing = [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if not differing:
        return False
    key = differing[0]
    if not _holds_samples(output_dir):
        logger.info(
            "%s holds no samples of the run that set %s=%r; this run takes it over", output_dir, key, saved.get(key)
        )
        return True
    raise ValueError(
        f"{output_dir} holds shards of another sampling run: they were made with {key}={saved.get(key)!r}, this run "
        f"has {key}={current.get(key)!r}; use a new output_dir, or the settings and pipeline that made them."
    )


def _holds_samples(output_dir: Path) -> bool:
    """Whether a run wrote any sample into `output_dir`: a shard, a merged archive, or a PNG (written before its
    shard)."""
    patterns = (f"{SHARDS_DIR}/shard_*.npz", "samples_*.npz", f"{PNG_DIR}/*.png")
    return any(next(output_dir.glob(pattern), None) is not None for pattern in patterns)


def shard_path(output_dir: str | os.PathLike, shard_index: int) -> Path:
    """Where shard `shard_index` of a run in `output_dir` is stored."""
    return Path(output_dir) / SHARDS_DIR / f"shard_{shard_index:06d}.npz"


def merged_npz_path(output_dir: str | os.PathLike, num_samples: int, image_shape: tuple[int, int, int]) -> Path:
    """ADM's naming of a sample batch: `samples_{N}x{H}x{W}x{C}.npz`."""
    return Path(output_dir) / f"samples_{num_samples}x{'x'.join(str(s) for s in image_shape)}.npz"


def merge_shards(output_dir: str | os.PathLike, num_samples: int, batch_size: int) -> Path:
    """Concatenate all shards of a finished run, in shard order, into one ADM-layout `.npz` (`arr_0` uint8 NHWC
    images, `arr_1` int64 labels). Streams shard by shard; raises if any shard is missing or malformed."""
    num_shards = math.ceil(num_samples / batch_size)
    missing = [s for s in range(num_shards) if not shard_path(output_dir, s).exists()]
    if missing:
        raise FileNotFoundError(
            f"cannot merge {output_dir}: {len(missing)} of {num_shards} shards are missing (first: "
            f"{shard_path(output_dir, missing[0])}); run the sampling again to finish them"
        )
    with np.load(shard_path(output_dir, 0)) as first:
        image_shape = tuple(first["images"].shape[1:])
    labels = []
    for s in range(num_shards):
        with np.load(shard_path(output_dir, s)) as shard:
            labels.append(shard["labels"])
    labels = np.concatenate(labels)
    if labels.shape[0] != num_samples:
        raise ValueError(f"the shards in {output_dir} hold {labels.shape[0]} samples, expected {num_samples}")

    def image_batches():
        for s in range(num_shards):
            with np.load(shard_path(output_dir, s)) as shard:
                yield shard["images"]

    path = merged_npz_path(output_dir, num_samples, image_shape)
    if (labels == NO_LABEL).all():
        labels = None  # an unconditional run
    return write_adm_npz(path, image_batches(), num_samples, image_shape, labels=labels)


def generate_samples(
    pipeline: Callable[..., Any],
    output_dir: str | os.PathLike,
    num_samples: int,
    batch_size: int,
    class_labels: str | Sequence[int] | np.ndarray | torch.Tensor = "balanced",
    num_classes: int | None = None,
    seed: int = 0,
    save_png: bool = False,
    accelerator: Any = None,
    generator_device: str | torch.device = "cpu",
    show_progress: bool = True,
    **sampling_kwargs: Any,
) -> Path:
    """Generate `num_samples` class-conditional (or unconditional) samples into `output_dir`, resumably, on one or many
    processes.

    Args:
        pipeline: any callable with diffusers' class-conditional calling convention, e.g. `ClassConditionalPipeline`
            or `DiTPipeline`: `pipeline(class_labels=[...], generator=torch.Generator, output_type="np",
            **sampling_kwargs)` returning `.images` as float [0, 1] NHWC numpy. It should already be on its device.
        output_dir: folder for `sampling_config.json`, `shards/`, the merged `.npz` and optionally `png/`.
        num_samples: total number of samples (50_000 for FID-50K).
        batch_size: samples per shard and per pipeline call (per process). Part of the run's identity: a resumed
            run must use the same value.
        class_labels: "balanced", "random" or an explicit sequence of `num_samples` ids (see `make_class_labels`).
        num_classes: number of classes of the model (needed for "balanced" and "random").
        seed: the run's seed; with the shard index it fixes every shard's labels and noise.
        save_png: also write every sample as `png/{index:06d}.png`.
        accelerator: an `accelerate.Accelerator` (or any object with `process_index`, `num_processes`,
            `is_main_process`, `wait_for_everyone()` and optionally `autocast()`); None runs as a single process.
            Process `rank` makes the shards `s` with `s % num_processes == rank`; the main process merges.
        generator_device: device of the per-shard noise generator. The CPU default makes the noise identical on
            every device; pipelines built on diffusers' `randn_tensor` move it to their device.
        show_progress: show a progress bar on the local main process.
        **sampling_kwargs: passed to every pipeline call, e.g. `num_inference_steps`, `guidance_scale`,
            `guidance_interval`. `output_type` defaults to "np".

    Returns:
        The path of the merged `samples_{N}x{H}x{W}x{C}.npz` (on every process; it exists once the main process has
        merged, which happens before this function returns on any process when an accelerator synchronises them).
    """
    _check_arguments(num_samples, batch_size, sampling_kwargs)
    sampling_kwargs.setdefault("output_type", "np")
    rank = 0 if accelerator is None else int(accelerator.process_index)
    world_size = 1 if accelerator is None else int(accelerator.num_processes)
    is_main = accelerator is None or bool(accelerator.is_main_process)

    output_dir = Path(output_dir)
    labels = make_class_labels(class_labels, num_samples, num_classes, seed)
    config = _run_config(
        num_samples, batch_size, seed, class_labels, labels, num_classes, sampling_kwargs, pipeline, accelerator
    )
    write_config = _check_run_config(output_dir, config)
    if accelerator is not None:
        # Every process has read the folder before any writes to it, so all reach the same verdict.
        accelerator.wait_for_everyone()
    (output_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    if save_png:
        (output_dir / PNG_DIR).mkdir(exist_ok=True)
    if write_config:
        # Every process may write it: the content is identical and the rename is atomic.
        with atomic_write(output_dir / CONFIG_NAME) as temporary:
            temporary.write_text(json.dumps(config, indent=2, sort_keys=True))

    num_shards = math.ceil(num_samples / batch_size)
    own_shards = range(rank, num_shards, world_size)
    todo = [s for s in own_shards if not shard_path(output_dir, s).exists()]
    if save_png:
        _save_missing_pngs(output_dir, [s for s in own_shards if s not in todo], batch_size, num_samples)
    autocast = getattr(accelerator, "autocast", None)
    local_main = accelerator is None or getattr(accelerator, "is_local_main_process", is_main)
    for s in tqdm(todo, desc=f"sampling (rank {rank})", disable=not (show_progress and local_main)):
        start, stop = s * batch_size, min((s + 1) * batch_size, num_samples)
        shard_labels = labels[start:stop]
        generator = torch.Generator(device=generator_device).manual_seed(shard_seed(seed, s))
        with torch.no_grad(), autocast() if autocast is not None else nullcontext():
            images = _sample_shard(
                pipeline, None if class_labels == "none" else shard_labels, stop - start, generator, sampling_kwargs
            )
        if save_png:
            _save_pngs(output_dir / PNG_DIR, images, start)
        # The shard file is written last: its existence means the shard (and its PNGs) is complete.
        write_npz_atomically(shard_path(output_dir, s), images=images, labels=shard_labels)

    return _merge_when_all_done(output_dir, num_samples, batch_size, min(rank, num_shards - 1), is_main, accelerator)


def _check_arguments(num_samples, batch_size, sampling_kwargs: dict) -> None:
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for reserved in ("class_labels", "generator"):
        if reserved in sampling_kwargs:
            raise ValueError(f"{reserved!r} is set by generate_samples per shard; do not pass it in sampling_kwargs")


def _merge_when_all_done(
    output_dir: Path, num_samples: int, batch_size: int, own_shard: int, is_main: bool, accelerator
) -> Path:
    """Once every process has written its shards, the main process merges them; every process gets the path."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
    with np.load(shard_path(output_dir, own_shard)) as any_shard:
        image_shape = tuple(any_shard["images"].shape[1:])
    path = merged_npz_path(output_dir, num_samples, image_shape)
    if is_main and not path.exists():
        merge_shards(output_dir, num_samples, batch_size)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return path


def _sample_shard(pipeline, labels: np.ndarray | None, count: int, generator, sampling_kwargs: dict) -> np.ndarray:
    """One shard's images as uint8 NHWC: ``count`` unconditional samples, or one per label."""
    if labels is None:
        output = pipeline(num_images_per_prompt=count, generator=generator, **sampling_kwargs)
    else:
        output = pipeline(class_labels=labels.tolist(), generator=generator, **sampling_kwargs)
    return _pipeline_images_to_uint8(output, count)


def _save_missing_pngs(output_dir: Path, finished_shards, batch_size: int, num_samples: int) -> None:
    """PNGs of shards that an earlier run finished without asking for them."""
    for s in finished_shards:
        last_index = min((s + 1) * batch_size, num_samples) - 1
        if not (output_dir / PNG_DIR / f"{last_index:06d}.png").exists():
            with np.load(shard_path(output_dir, s)) as shard:
                _save_pngs(output_dir / PNG_DIR, shard["images"], s * batch_size)


def _save_pngs(png_dir: Path, images: np.ndarray, first_index: int) -> None:
    from PIL import Image

    for offset, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            png_dir / f"{first_index + offset:06d}.png"
        )


def load_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a merged sample archive: (uint8 NHWC images, int64 labels or None). Loads everything into memory."""
    with np.load(path) as archive:
        labels = archive[LABELS_KEY] if LABELS_KEY in archive.files else None
        return archive[IMAGES_KEY], labels
