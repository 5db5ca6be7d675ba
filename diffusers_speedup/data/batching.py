"""Seedable, resumable data order shared by every in-memory and Arrow-backed reader.

The order of an epoch is a pure function of ``(num_rows, seed, epoch)``: one global permutation, cut into global
batches of ``batch_size * world_size``; rank ``r`` takes the ``r``-th slice of each global batch. A trainer resumes
mid-epoch exactly by asking for the same epoch with ``start_step`` set to the number of steps already taken, with
no data read for the skipped steps (accelerate's ``skip_first_batches`` on a RandomSampler replays a *different*
permutation unless the sampler is seeded; huggingface/accelerate#1451).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    """One training batch, read in one gather: the model's data, the class labels, and the extra per-sample fields
    that an auxiliary loss reads (for example the clean image an encoder looks at, or precomputed encoder features),
    keyed by name."""

    x0: torch.Tensor
    class_labels: torch.Tensor
    extras: Mapping[str, torch.Tensor]


def epoch_permutation(num_rows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global order of ``num_rows`` rows in ``epoch`` (``np.int64``); identical on every rank and every run."""
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    # SeedSequence mixes (seed, epoch) properly: seed=0/epoch=1 and seed=1/epoch=0 give unrelated orders.
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_rows).astype(np.int64)


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Number of optimizer steps (batches per rank) in one epoch."""
    global_batch = batch_size * world_size
    return num_rows // global_batch if drop_last else -(-num_rows // global_batch)


def index_batches(
    num_rows: int,
    batch_size: int,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    drop_last: bool = True,
    start_step: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield this rank's index batches for one epoch.

    Args:
        num_rows: rows in the dataset.
        batch_size: rows per batch on each rank.
        epoch: epoch number; each epoch has its own permutation.
        seed: base seed of the run.
        rank: this process's index (``accelerator.process_index``).
        world_size: number of processes (``accelerator.num_processes``).
        shuffle: permute the rows (``False`` keeps dataset order, e.g. for evaluation).
        drop_last: drop the final incomplete global batch so every rank gets full batches. With ``False`` the last
            global batch is filled up with rows from the start of the permutation (as ``DistributedSampler`` pads),
            so every row appears at least once and ranks stay in lock-step.
        start_step: number of batches of this epoch already consumed; they are skipped without reading data.

    Yields:
        ``torch.LongTensor`` of shape ``(batch_size,)`` per step.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    global_batch = batch_size * world_size
    num_steps = steps_per_epoch(num_rows, batch_size, world_size, drop_last)
    if num_steps == 0:
        raise ValueError(
            f"batch_size * world_size = {global_batch} exceeds the {num_rows} rows and drop_last=True leaves no batch"
        )
    order = epoch_permutation(num_rows, seed, epoch, shuffle)
    padded_length = num_steps * global_batch
    if padded_length > num_rows:
        order = np.concatenate([order, np.resize(order, padded_length - num_rows)])
    order = torch.from_numpy(order)
    for step in range(start_step, num_steps):
        start = step * global_batch + rank * batch_size
        yield order[start : start + batch_size]
