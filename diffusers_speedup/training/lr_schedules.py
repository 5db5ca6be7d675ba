"""Learning-rate schedules: EDM2's inverse-square-root decay, plus diffusers' schedules under one dispatcher.

All schedules are `torch.optim.lr_scheduler.LambdaLR` multipliers of the optimizer's base learning rate, stepped once
per optimizer step. Don't pass them through `accelerator.prepare`: accelerate's wrapper steps a scheduler once per
process per call, which would make `t` count `num_processes` times too fast. Step them yourself and save them with
the checkpoint (the trainer registers its schedule, by name, in `checkpoints.NamedState`).
"""

from __future__ import annotations

import logging
import math

from diffusers.optimization import SchedulerType, get_scheduler
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)


def inverse_sqrt_lr_factor(step: int, ref_batches: float, rampup_images: float, batch_size: int) -> float:
    """EDM2's learning-rate multiplier before optimizer step `step` (0-based: the number of steps already taken).

    `1 / sqrt(max(step / ref_batches, 1)) * min(step * batch_size / rampup_images, 1)`: constant for the first
    `ref_batches` iterations, then decaying as `1/sqrt(t)`; `t_ref` counts iterations while the linear warm-up counts
    images, exactly as EDM2's `learning_rate_schedule(cur_nimg, batch_size, ref_lr, ref_batches, rampup_Mimg)` with
    `cur_nimg = step * batch_size` (images seen before this step). Like EDM2 and diffusers' warm-up schedules, the very
    first step gets learning rate 0 when there is a warm-up.
    """
    nimg = step * batch_size
    factor = 1.0
    if ref_batches > 0:
        factor /= math.sqrt(max(nimg / (ref_batches * batch_size), 1.0))
    if rampup_images > 0:
        factor *= min(nimg / rampup_images, 1.0)
    return factor


def get_inverse_sqrt_schedule(
    optimizer: Optimizer,
    ref_batches: float = 70_000,
    rampup_images: float = 10_000_000,
    batch_size: int = 2048,
    last_epoch: int = -1,
) -> LambdaLR:
    """EDM2's schedule `lr = ref_lr / sqrt(max(t / t_ref, 1)) * min(nimg / rampup_images, 1)` as a `LambdaLR`.

    `ref_lr` is the optimizer's learning rate. Defaults are EDM2's img512 settings.

    Args:
        optimizer: the wrapped optimizer.
        ref_batches (`float`): `t_ref`, the iteration count where the decay starts (EDM2: 70k at 512px, 35k at 64px).
            0 disables the decay.
        rampup_images (`float`): length of the linear warm-up in images (EDM2: 10 Mimg). 0 disables it.
        batch_size (`int`): images per optimizer step across all processes (the global batch).
        last_epoch (`int`): index of the last step when resuming without a state dict; -1 for a fresh start.
    """
    if ref_batches < 0:
        raise ValueError(f"get_inverse_sqrt_schedule: ref_batches must be >= 0, got {ref_batches}.")
    if rampup_images < 0:
        raise ValueError(f"get_inverse_sqrt_schedule: rampup_images must be >= 0, got {rampup_images}.")
    if batch_size < 1:
        raise ValueError(f"get_inverse_sqrt_schedule: batch_size must be >= 1, got {batch_size}.")

    def lr_lambda(step: int) -> float:
        return inverse_sqrt_lr_factor(step, ref_batches, rampup_images, batch_size)

    return LambdaLR(optimizer, lr_lambda, last_epoch=last_epoch)


LR_SCHEDULER_NAMES = ("inverse_sqrt",) + tuple(t.value for t in SchedulerType)
_NEED_TOTAL_STEPS = {"linear", "cosine", "cosine_with_restarts", "polynomial"}


def get_lr_scheduler(
    name: str,
    optimizer: Optimizer,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    **kwargs,
) -> LambdaLR:
    """Learning-rate schedule by name.

    Args:
        name: "inverse_sqrt" (EDM2, `get_inverse_sqrt_schedule`) or one of diffusers' schedules: "constant",
            "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant".
        optimizer: the wrapped optimizer.
        warmup_steps: linear warm-up length in optimizer steps. For "inverse_sqrt" it sets
            `rampup_images = warmup_steps * batch_size` unless `rampup_images` is given.
        total_steps: training length in optimizer steps (needed by "linear", "cosine", "cosine_with_restarts",
            "polynomial").
        **kwargs: for "inverse_sqrt": `ref_batches`, `rampup_images`, `batch_size`; for diffusers' schedules:
            `num_cycles`, `power`, `step_rules`.
    """
    name = str(name).lower()
    if name not in LR_SCHEDULER_NAMES:
        raise ValueError(f"Unknown lr scheduler name {name!r}; expected one of {', '.join(LR_SCHEDULER_NAMES)}.")
    if warmup_steps < 0:
        raise ValueError(f"lr scheduler warmup_steps must be >= 0, got {warmup_steps}.")

    if name == "inverse_sqrt":
        unknown = set(kwargs) - {"ref_batches", "rampup_images", "batch_size", "last_epoch"}
        if unknown:
            raise ValueError(f"Unknown options {sorted(unknown)} for lr scheduler 'inverse_sqrt'.")
        batch_size = kwargs.pop("batch_size", 1)
        rampup_images = kwargs.pop("rampup_images", None)
        if rampup_images is None:
            rampup_images = warmup_steps * batch_size
        return get_inverse_sqrt_schedule(optimizer, rampup_images=rampup_images, batch_size=batch_size, **kwargs)

    unknown = set(kwargs) - {"num_cycles", "power", "step_rules", "last_epoch"}
    if unknown:
        raise ValueError(f"Unknown options {sorted(unknown)} for lr scheduler {name!r}.")
    if name in _NEED_TOTAL_STEPS and not total_steps:
        raise ValueError(f"lr scheduler {name!r} needs total_steps (the training length in steps), got {total_steps}.")
    if name == "constant" and warmup_steps:
        logger.warning("lr scheduler 'constant' ignores warmup_steps=%d; use 'constant_with_warmup'.", warmup_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, **kwargs)
