"""Checkpoint folders that are never half-written, around accelerate's `save_state` / `load_state`.

A checkpoint is written to `checkpoint-<step>.tmp` and renamed into place, then `latest` is replaced atomically, so
`latest` only ever names a complete checkpoint. We name folders ourselves instead of using accelerate's
`automatic_checkpoint_naming`, whose counter is not restored by `load_state` (a resumed run would then write
`checkpoint_0` and delete newer checkpoints). The layout of a run folder, `latest` and finding the newest complete
checkpoint are in `diffusers_speedup.run_folder`, which the exporter reads too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..run_folder import (
    CHECKPOINT_PREFIX,
    CONFIG_NAME,
    LATEST_NAME,
    TMP_SUFFIX,
    TRAINER_STATE_NAME,
    checkpoint_name,
    clean_incomplete_checkpoints,
    find_latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    read_latest_pointer,
)
from ..utils import atomic_write, replace_folder

__all__ = [
    "CHECKPOINT_PREFIX",
    "CONFIG_NAME",
    "LATEST_NAME",
    "TMP_SUFFIX",
    "TRAINER_STATE_NAME",
    "checkpoint_name",
    "clean_incomplete_checkpoints",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_trainer_state",
    "rotate_checkpoints",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def rotate_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most `total_limit` remain.

    The newest checkpoint and the one `latest` names are never deleted (so more than `total_limit` may remain if
    `latest` names an old one). `None` keeps everything. Call it on the main process only. Returns the deleted
    folders.
    """
    if total_limit is None:
        return []
    if int(total_limit) < 1:
        raise ValueError(f"checkpoints total_limit must be >= 1 or None, got {total_limit}.")
    output_dir = Path(output_dir)
    complete = list_checkpoints(output_dir)
    protected = set(complete[-1:])
    latest = read_latest_pointer(output_dir)
    if latest is not None:
        protected.add(latest)
    removable = [p for p in complete if p not in protected]
    excess = len(complete) - int(total_limit)
    removed = []
    for path in removable[: max(excess, 0)]:
        logger.info("Removing old checkpoint %s", path)
        shutil.rmtree(path)
        removed.append(path)
    return removed


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    extra_state: dict | None = None,
    save_fn: Callable[[Path], None] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Save the training state atomically as `output_dir/checkpoint-<step>` and point `latest` at it.

    Call it on every process (accelerate's `save_state` needs all of them under DeepSpeed/FSDP); files are moved only
    on the main process.

    Args:
        accelerator (`accelerate.Accelerator`): its prepared models, optimizers, schedulers, dataloaders and objects
            registered with `register_for_checkpointing` (EMA, LR schedule, ...) are saved by `save_state`. It must not
            use `automatic_checkpoint_naming`.
        output_dir: the run's output folder.
        step: optimizer steps done; names the folder and is stored as `trainer_state["step"]`.
        extra_state: JSON-serialisable trainer state to store in `trainer_state.json` (epoch, position in the epoch,
            images seen, ...).
        save_fn: called on the main process with the temporary folder before it is renamed into place; write
            `CONFIG_NAME` (the resolved config) and any other files there.
        total_limit: if given, keep at most this many checkpoints afterwards (`rotate_checkpoints`).

    Returns:
        The final checkpoint folder.
    """
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError(
            "save_checkpoint names checkpoint folders itself; create the Accelerator with "
            "ProjectConfiguration(automatic_checkpoint_naming=False)."
        )
    trainer_state = {**(extra_state or {}), "step": int(step)}
    try:
        trainer_state_text = json.dumps(trainer_state, indent=2, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"save_checkpoint: extra_state must be JSON-serialisable ({err}).") from err

    output_dir = Path(output_dir)
    final_dir = output_dir / checkpoint_name(step)
    tmp_dir = output_dir / (checkpoint_name(step) + TMP_SUFFIX)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir()
    accelerator.wait_for_everyone()

    accelerator.save_state(str(tmp_dir))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        if save_fn is not None:
            save_fn(tmp_dir)
        # trainer_state.json is written last: a folder holding it is a complete checkpoint.
        _write_text_atomic(tmp_dir / TRAINER_STATE_NAME, trainer_state_text + "\n")
        # Re-saving a step (a resumed run passing an old save again) moves the old one aside under a .tmp name, so
        # that a crash between the renames leaves a leftover that clean_incomplete_checkpoints removes.
        replace_folder(tmp_dir, final_dir, aside=output_dir / (checkpoint_name(step) + ".old" + TMP_SUFFIX))
        _write_text_atomic(output_dir / LATEST_NAME, final_dir.name + "\n")
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final_dir


def load_checkpoint(accelerator, checkpoint_dir: str | os.PathLike) -> dict:
    """Restore the state saved by `save_checkpoint` and return its trainer state.

    Register the same objects with `register_for_checkpointing` (in the same order) and prepare the same models,
    optimizers and dataloaders before calling it.

    Args:
        accelerator (`accelerate.Accelerator`): the accelerator to load into.
        checkpoint_dir: a checkpoint folder, e.g. from `find_latest_checkpoint`.

    Returns:
        The dict stored in `trainer_state.json` (`step` and the trainer's `extra_state`).
    """
    checkpoint_dir = Path(checkpoint_dir)
    trainer_state = load_trainer_state(checkpoint_dir)
    accelerator.load_state(str(checkpoint_dir))
    return trainer_state
