"""What a training job takes from its launch: the launcher's precision and device choice, the rules that need the
running job (processes, FSDP, the dataset's size), the ownership of its output folder, and a name for the hardware."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from accelerate.utils.environment import str_to_bool

from ..models import model_kind
from ..run_folder import RunFolderInUse, RunFolderLock
from .config import MIXED_PRECISION, Config, ConfigError
from .validation import refuse_existing_checkpoints

logger = logging.getLogger(__name__)

# accelerate's spelling of a precision -> the recipe's.
_LAUNCHER_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8"}


def apply_launcher_settings(config: Config) -> Config:
    """The recipe with ``train.mixed_precision`` and ``train.cpu`` taken from the launcher where it leaves them unset.

    ``accelerate launch`` hands its flags, or the ``accelerate config`` defaults, to the processes it starts as
    ACCELERATE_MIXED_PRECISION and ACCELERATE_USE_CPU. A value in the recipe wins over the launcher's, as the
    ``--mixed_precision`` argument of diffusers' example scripts does, with a warning naming both when they differ.
    Without a launcher and a recipe value: fp32, and the GPU when there is one.
    """
    train = config.train
    launcher_env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    launcher_precision = None if launcher_env is None else _LAUNCHER_PRECISION.get(launcher_env.lower(), launcher_env)
    mixed_precision = train.mixed_precision
    if mixed_precision is None:
        mixed_precision = launcher_precision or "fp32"
        if mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"train.mixed_precision: the launcher asks for {launcher_env!r} (ACCELERATE_MIXED_PRECISION), which "
                f"this trainer does not support; launch with one of no, bf16, fp16, or set it in the recipe."
            )
    elif launcher_precision is not None and launcher_precision != mixed_precision:
        logger.warning(
            "train.mixed_precision is %r in the recipe but the launcher (accelerate launch --mixed_precision, or "
            "accelerate config) asks for %r; training in %r as the recipe says. Leave train.mixed_precision unset "
            "to follow the launcher.",
            mixed_precision,
            launcher_precision,
            mixed_precision,
        )

    # accelerate always sets ACCELERATE_USE_CPU ("False" unless --cpu), so only an asked-for CPU can contradict.
    launcher_cpu = str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")) == 1
    cpu = train.cpu
    if cpu is None:
        cpu = launcher_cpu
    elif launcher_cpu and not cpu:
        logger.warning(
            "train.cpu is false in the recipe but the launcher (accelerate launch --cpu, or accelerate config) asks "
            "for the CPU; training on the accelerator as the recipe says. Leave train.cpu unset to follow the "
            "launcher."
        )
        # accelerate reads the variable again and would force the CPU; the recipe's choice is final here.
        os.environ["ACCELERATE_USE_CPU"] = "false"
    return dataclasses.replace(config, train=dataclasses.replace(train, mixed_precision=mixed_precision, cpu=cpu))


def check_job(config: Config, accelerator: Accelerator, dataset_size: int, dataset_name: str) -> int:
    """Every rule that needs the running job, before any training: the global batch splits evenly into the
    processes' accumulation steps, the dataset fills one global batch, and FSDP only trains what it can shard.
    Returns the micro-batch size (the batch of one process in one accumulation step)."""
    train, processes = config.train, accelerator.num_processes
    world = processes * train.gradient_accumulation_steps
    if train.batch_size % world:
        raise ConfigError(
            f"train.batch_size: {train.batch_size} is not divisible by processes × accumulation steps = "
            f"{processes} × {train.gradient_accumulation_steps}."
        )
    micro_batch_size = train.batch_size // world
    needed = micro_batch_size * processes
    if dataset_size < needed:
        raise ConfigError(
            f"train.batch_size: {train.batch_size} (micro-batches of {micro_batch_size} on {processes} "
            f"process(es)) needs at least {needed} samples, but the dataset ({dataset_name}) has {dataset_size}."
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        # FSDP leaves each process a shard of every parameter; these features need each weight whole.
        if config.ema.kind != "none":
            raise ConfigError(
                "ema.kind: the EMA averages whole parameters, which FSDP shards; train with DDP or set ema.kind=none."
            )
        refused = model_kind(config.model.kind).fsdp_refused
        if refused:
            raise ConfigError(f"model.kind: {refused}.")
    return micro_batch_size


def claim_output_dir(config: Config, accelerator: Accelerator) -> RunFolderLock | None:
    """Make this run the one that writes ``train.output_dir``, before any work; stop every process otherwise.

    The main process takes the folder's lock (`RunFolderLock`) for the run's life, and checks again under it that a
    fresh run finds no checkpoints there (the check before the lock could race another run's first save). The
    outcome is broadcast, so the other processes stop with the same message instead of waiting for the main one.
    Returns the lock on the main process (None on the others).

    Raises:
        ConfigError: naming the folder and the process and host that hold it, or the checkpoints already there.
    """
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = RunFolderLock.acquire(config.train.output_dir)
            refuse_existing_checkpoints(config)
        except (RunFolderInUse, ConfigError, OSError) as error:
            if lock is not None:
                lock.release(remove_created_folder=True)
            problem = str(error) if isinstance(error, ConfigError) else f"train.output_dir: {error}"
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise ConfigError(problem)
    return lock


def hardware_name(accelerator: Accelerator) -> str:
    count = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{count}× {torch.cuda.get_device_name(accelerator.device)}"
    return f"{count}× CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
