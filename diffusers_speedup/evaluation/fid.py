"""Fréchet Inception Distance against reference statistics.

FID = |mu_1 - mu_2|² + tr(Σ_1) + tr(Σ_2) - 2 tr((Σ_1 Σ_2)^½) over Inception-v3 pool_3 features (2048-d).

- Features come from torch-fidelity's `inception-v3-compat` extractor: the TF 2015-12-05 Inception weights with a
  TF1-exact bilinear resize to 299², which reproduces ADM's TensorFlow evaluator to about 1e-6 relative FID, so
  ADM's reference statistics (`VIRTUAL_imagenet256_labeled.npz`: keys `mu`, `sigma`) can be used directly.
  torch-fidelity is an optional dependency (`pip install "diffusers-speedup[eval]"`); any other callable mapping a
  uint8 NCHW batch to (N, D) features can be injected instead.
- Statistics are accumulated in float64 in one pass over the images (only D×D memory, however many images), with
  the unbiased covariance (divisor N - 1) that ADM's `np.cov` uses.
- tr((Σ_1 Σ_2)^½) is computed without scipy as tr((A Σ_2 A)^½) with A = Σ_1^½: both square roots are of symmetric
  positive semi-definite matrices, taken by `numpy.linalg.eigh` with round-off negatives clipped to zero, so
  near-singular covariances give finite, accurate values. The matrices Σ_1 Σ_2 and A Σ_2 A are similar, so the trace
  is the same quantity the standard `scipy.linalg.sqrtm` recipe computes (`method="sqrtm"` uses that recipe).
"""

import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.preprocessing import IMAGE_EXTENSIONS, center_crop_arr
from ..errors import MissingExtraError
from ..utils import is_saved_dataset
from .npz_io import IMAGES_KEY, iter_npz_array, npz_array_header, npz_keys, write_npz_atomically

# Quoted, so that shells which expand brackets (zsh) pass it to pip as written.
EVAL_EXTRA_HINT = 'pip install "diffusers-speedup[eval]"'

FeatureExtractor = Callable[[torch.Tensor], Any]
"""Maps a uint8 tensor of shape (N, 3, H, W) to features of shape (N, D) (tensor or array; a tuple's first item)."""


@dataclass
class FIDStatistics:
    """Mean and covariance of a set of feature vectors, as stored in ADM's reference `.npz` files."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None

    def frechet_distance(self, other: "FIDStatistics", method: str = "eigh") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, method=method)

    def save(self, path: str | os.PathLike) -> None:
        save_fid_statistics(path, self)


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    root1 = _symmetric_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2  # symmetric up to round-off; eigvalsh reads one triangle only
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product of covariances; adding {eps} to their diagonals", stacklevel=3)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, method: str = "eigh", eps: float = 1e-6
) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Args:
        mu1, mu2: mean vectors of shape (D,) (scalars are treated as D = 1).
        sigma1, sigma2: covariance matrices of shape (D, D).
        method: "eigh" (default; numpy only, robust to near-singular covariances) or "sqrtm" (the standard
            `scipy.linalg.sqrtm` recipe of TTUR/ADM with its `eps` diagonal offset fallback; needs scipy).
        eps: diagonal offset for the "sqrtm" fallback.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance: shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    if method == "eigh":
        trace_sqrt = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        try:
            trace_sqrt = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
        except ImportError as error:
            raise MissingExtraError(f"frechet_distance(method='sqrtm') needs scipy: {EVAL_EXTRA_HINT}") from error
    else:
        raise ValueError(f"frechet_distance: method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


class RunningStatistics:
    """One-pass float64 accumulation of the mean and unbiased covariance of feature batches.

    Sums are taken around the first batch's mean, which keeps the subtraction in `sigma = (S - n m mᵀ) / (n - 1)`
    well conditioned even when features have a large common offset.
    """

    def __init__(self):
        self.count = 0
        self.shift = None
        self.total = None
        self.total_outer = None

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {features.shape}")
        if self.shift is None:
            self.shift = features.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.total_outer = np.zeros((features.shape[1], features.shape[1]))
        elif features.shape[1] != self.shift.shape[0]:
            raise ValueError(f"features changed dimension from {self.shift.shape[0]} to {features.shape[1]}")
        centered = features - self.shift
        self.count += features.shape[0]
        self.total += centered.sum(axis=0)
        self.total_outer += centered.T @ centered

    def statistics(self) -> FIDStatistics:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean_centered = self.total / self.count
        sigma = (self.total_outer - self.count * np.outer(mean_centered, mean_centered)) / (self.count - 1)
        return FIDStatistics(self.shift + mean_centered, sigma, self.count)


def statistics_from_features(features: np.ndarray | torch.Tensor) -> FIDStatistics:
    """Mean and unbiased covariance of an (N, D) array of features (what ADM computes with `np.cov`)."""
    running = RunningStatistics()
    running.update(features)
    return running.statistics()


def save_fid_statistics(path: str | os.PathLike, statistics: FIDStatistics) -> None:
    """Save statistics as an `.npz` with keys `mu` and `sigma` (ADM's reference layout), plus `num_images`."""
    arrays = {"mu": statistics.mu, "sigma": statistics.sigma}
    if statistics.num_images is not None:
        arrays["num_images"] = np.asarray(statistics.num_images)
    write_npz_atomically(path, **arrays)


def load_fid_statistics(path: str | os.PathLike) -> FIDStatistics:
    """Load `mu`/`sigma` from an `.npz` (ours, or an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz)."""
    with np.load(path) as archive:
        if "mu" not in archive.files or "sigma" not in archive.files:
            raise KeyError(f"{path} holds no FID statistics (keys 'mu' and 'sigma'); it has {archive.files}")
        num_images = int(archive["num_images"]) if "num_images" in archive.files else None
        return FIDStatistics(archive["mu"].astype(np.float64), archive["sigma"].astype(np.float64), num_images)


class InceptionFeatureExtractor:
    """torch-fidelity's standard Inception-v3 pool_3 (2048-d) feature extractor, as a callable on uint8 NCHW batches.

    Args:
        device: where to run it.
        weights_path: a local copy of `weights-inception-2015-12-05-6726825d.pth` for offline machines; None
            downloads it on first use into the torch hub cache.
    """

    def __init__(self, device: str | torch.device = "cpu", weights_path: str | os.PathLike | None = None):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise MissingExtraError(
                f"FID features need the optional dependency torch-fidelity; install it with `{EVAL_EXTRA_HINT}` "
                "(or pass your own feature_extractor)"
            ) from error
        self.device = torch.device(device)
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path
        ).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device))[0]


def _as_nchw_rgb_uint8(batch: np.ndarray) -> torch.Tensor:
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255] (ADM layout), got dtype {batch.dtype}")
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be NHWC with 1, 3 or 4 channels, got shape {batch.shape}")
    if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)
    elif batch.shape[-1] == 4:
        batch = batch[..., :3]
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)


def _pil_to_array(image, resolution: int | None) -> np.ndarray:
    image = image.convert("RGB")
    if resolution is not None:
        return center_crop_arr(image, resolution)
    return np.asarray(image, dtype=np.uint8)


def _batched_pil(images: Iterable, batch_size: int, resolution: int | None) -> Iterator[np.ndarray]:
    pending = []
    for image in images:
        pending.append(_pil_to_array(image, resolution))
        if len(pending) == batch_size:
            yield from _stack_same_size(pending)
            pending = []
    if pending:
        yield from _stack_same_size(pending)


def _stack_same_size(arrays: list[np.ndarray]) -> Iterator[np.ndarray]:
    # Images of different sizes cannot share a batch; the Inception extractor resizes each to 299² anyway.
    if all(a.shape == arrays[0].shape for a in arrays):
        yield np.stack(arrays)
    else:
        for array in arrays:
            yield array[None]


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder` (recursively), in sorted order."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return files


def iter_image_batches(
    source: Any,
    batch_size: int = 64,
    resolution: int | None = None,
    image_column: str | None = None,
    split: str = "train",
) -> Iterator[np.ndarray]:
    """Yield uint8 NHWC batches from an image source.

    Args:
        source: an `.npz` with `arr_0` images (ADM layout; streamed), a folder of image files, a folder written by
            `datasets.Dataset.save_to_disk`, `"hf:<dataset id>"` for a Hub dataset, a `datasets.Dataset`, or a
            uint8 NHWC array.
        batch_size: images per batch.
        resolution: if set, images decoded from files or datasets get ADM's centre crop to this size (use it for
            real images, so they match the samples' preprocessing).
        image_column: image column of a dataset (default: the first column of type Image, else "image").
        split: split of a Hub dataset.
    """
    if isinstance(source, np.ndarray):
        for start in range(0, len(source), batch_size):
            yield source[start : start + batch_size]
        return
    if isinstance(source, str) and source.startswith("hf:"):
        import datasets

        source = datasets.load_dataset(source[len("hf:") :], split=split)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_file() and path.suffix == ".npz":
            if IMAGES_KEY not in npz_keys(path):
                raise KeyError(f"{path} holds no images under {IMAGES_KEY!r} (keys: {npz_keys(path)})")
            yield from iter_npz_array(path, IMAGES_KEY, batch_size)
            return
        if path.is_dir() and is_saved_dataset(path):
            import datasets

            source = datasets.load_from_disk(str(path))
        elif path.is_dir():
            from PIL import Image

            def open_files():
                for file in list_image_files(path):
                    with Image.open(file) as image:
                        yield image.convert("RGB")

            yield from _batched_pil(open_files(), batch_size, resolution)
            return
        else:
            raise FileNotFoundError(f"image source {source} is neither an .npz file nor a folder")
    if isinstance(source, dict) and hasattr(source, "column_names"):
        raise ValueError(f"got a DatasetDict with splits {list(source)}; pass one split")
    if hasattr(source, "features") and hasattr(source, "column_names"):
        column = image_column or _default_image_column(source)
        if column not in source.column_names:
            raise KeyError(f"dataset has no image column {column!r}; its columns are {source.column_names}")
        yield from _batched_pil((row[column] for row in source), batch_size, resolution)
        return
    raise TypeError(f"unsupported image source of type {type(source).__name__}: {source!r}")


def _default_image_column(dataset) -> str:
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    return "image"


def open_fid_source(source: str | os.PathLike, what: str, split: str = "train", image_column: str | None = None) -> Any:
    """Open `source` as `compute_fid_statistics` would and check it without computing any feature, so that a bad
    input is named before a pass over the other one; `what` names it in errors ("reference").

    Returns what to give `compute_fid_statistics`: the statistics of an `.npz` holding `mu`/`sigma`, the opened
    `datasets.Dataset` of a saved dataset folder (its `split` if it holds several) or of `hf:<id>` (fetched here),
    else the path.
    """
    if isinstance(source, str) and source.startswith("hf:"):
        import datasets

        return _checked_dataset(datasets.load_dataset(source[len("hf:") :], split=split), what, source, image_column)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        if is_saved_dataset(path):
            import datasets

            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"{what} {path} has the splits {list(dataset)}, not split {split!r}")
                dataset = dataset[split]
            return _checked_dataset(dataset, what, path, image_column)
        if len(list_image_files(path)[:2]) < 2:
            raise ValueError(f"{what} {path} holds a single image; FID needs at least 2")
        return path
    if path.suffix != ".npz":
        raise ValueError(f"{what} {path} is neither an .npz file nor a folder of images or a saved dataset")
    try:
        keys = npz_keys(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{what} {path} is not a readable .npz archive (truncated, or another kind of file)") from None
    if "mu" in keys or "sigma" in keys:
        try:
            return load_fid_statistics(path)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
    if IMAGES_KEY not in keys:
        raise ValueError(f"{what} {path} holds neither FID statistics (mu, sigma) nor images ({IMAGES_KEY}): {keys}")
    shape, dtype = npz_array_header(path, IMAGES_KEY)
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"{what} {path}: {IMAGES_KEY} must hold uint8 NHWC images with 1, 3 or 4 channels (ADM layout), got "
            f"{dtype} of shape {shape}"
        )
    if shape[0] < 2:
        raise ValueError(f"{what} {path} holds {shape[0]} image(s); FID needs at least 2")
    return path


def _checked_dataset(dataset, what: str, name, image_column: str | None):
    column = image_column or _default_image_column(dataset)
    if column not in dataset.column_names:
        raise ValueError(f"{what} {name} has no image column {column!r}; its columns are {dataset.column_names}")
    if len(dataset) < 2:
        raise ValueError(f"{what} {name} holds {len(dataset)} image(s); FID needs at least 2")
    return dataset


def compute_fid_statistics(
    source: Any,
    feature_extractor: FeatureExtractor | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    resolution: int | None = None,
    image_column: str | None = None,
    split: str = "train",
    max_images: int | None = None,
    show_progress: bool = False,
) -> FIDStatistics:
    """FID statistics of an image source, or the stored ones if `source` already holds them.

    Args:
        source: FIDStatistics; an `.npz` with `mu`/`sigma` (loaded as is, like ADM's evaluator does for reference
            batches); or anything `iter_image_batches` reads (images `.npz`, folder, saved/Hub dataset, array).
        feature_extractor: callable from uint8 NCHW batches to (N, D) features; default `InceptionFeatureExtractor`
            (needs torch-fidelity).
        batch_size: images per feature-extractor call.
        device: device for the default extractor (default: CUDA if available).
        resolution, image_column, split: see `iter_image_batches`.
        max_images: use only the first `max_images` images.
        show_progress: show a progress bar.
    """
    if isinstance(source, FIDStatistics):
        return source
    if isinstance(source, str | os.PathLike) and Path(source).suffix == ".npz" and Path(source).is_file():
        if "mu" in npz_keys(source):
            return load_fid_statistics(source)
    if feature_extractor is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        feature_extractor = InceptionFeatureExtractor(device=device)
    running = RunningStatistics()
    batches = iter_image_batches(source, batch_size, resolution, image_column, split)
    if show_progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="FID features", unit="batch")
    for batch in batches:
        if max_images is not None:
            batch = batch[: max_images - running.count]
            if len(batch) == 0:
                break
        features = feature_extractor(_as_nchw_rgb_uint8(batch))
        if isinstance(features, tuple | list):
            features = features[0]
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        running.update(np.asarray(features).reshape(len(batch), -1))
    return running.statistics()


def compute_fid(
    samples: Any,
    reference: Any,
    feature_extractor: FeatureExtractor | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    method: str = "eigh",
    **source_kwargs: Any,
) -> float:
    """FID between generated samples and a reference.

    Args:
        samples: a sample `.npz` (`arr_0`, e.g. from `generate_samples`), a folder of images, an array, statistics.
        reference: an ADM reference `.npz` (`mu`, `sigma`), saved statistics, or real images in any form that
            `compute_fid_statistics` accepts.
        feature_extractor: see `compute_fid_statistics`; built once and shared by both sides.
        batch_size, device: see `compute_fid_statistics`.
        method: see `frechet_distance`.
        **source_kwargs: `resolution`, `image_column`, `split`, `max_images` for image sources.
    """
    needs_features = [s for s in (samples, reference) if not _holds_statistics(s)]
    if needs_features and feature_extractor is None:
        feature_extractor = InceptionFeatureExtractor(device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sample_stats = compute_fid_statistics(samples, feature_extractor, batch_size, device, **source_kwargs)
    reference_stats = compute_fid_statistics(reference, feature_extractor, batch_size, device, **source_kwargs)
    return sample_stats.frechet_distance(reference_stats, method=method)


def _holds_statistics(source: Any) -> bool:
    if isinstance(source, FIDStatistics):
        return True
    if isinstance(source, str | os.PathLike) and Path(source).suffix == ".npz" and Path(source).is_file():
        return "mu" in npz_keys(source)
    return False
