"""Evaluation: resumable large-scale sample generation and FID against reference statistics."""

from .fid import (
    FIDStatistics,
    InceptionFeatureExtractor,
    RunningStatistics,
    compute_fid,
    compute_fid_statistics,
    frechet_distance,
    iter_image_batches,
    load_fid_statistics,
    save_fid_statistics,
    statistics_from_features,
)
from .npz_io import iter_npz_array, write_adm_npz
from .sampling import (
    float_images_to_uint8,
    generate_samples,
    load_samples,
    make_class_labels,
    merge_shards,
    shard_seed,
)

__all__ = [
    "FIDStatistics",
    "InceptionFeatureExtractor",
    "RunningStatistics",
    "compute_fid",
    "compute_fid_statistics",
    "float_images_to_uint8",
    "frechet_distance",
    "generate_samples",
    "iter_image_batches",
    "iter_npz_array",
    "load_fid_statistics",
    "load_samples",
    "make_class_labels",
    "merge_shards",
    "save_fid_statistics",
    "shard_seed",
    "statistics_from_features",
    "write_adm_npz",
]
