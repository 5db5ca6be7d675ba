"""Checkpoint folders that are never half-written, around accelerate's `save_state` / `load_state`.

Layout of `output_dir`:

    checkpoint-<step>/        accelerate state (model, optimizer, RNG, registered objects) + trainer_state.json
                              (+ config.yaml and anything else the trainer writes through `save_fn`)
    checkpoint-<step>.tmp/    a checkpoint being written; left behind only by a crash, ignored and cleaned up
    latest                    text file naming the newest complete checkpoint folder

A checkpoint is written to `checkpoint-<step>.tmp` and renamed into place, then `latest` is replaced atomically, so
`latest` only ever names a complete checkpoint. We name folders ourselves instead of using accelerate's
`automatic_checkpoint_naming`, whose counter is not restored by `load_state` (a resumed run would then write
`checkpoint_0` and delete newer checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..utils import atomic_write, replace_folder

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
LATEST_NAME = "latest"
TRAINER_STATE_NAME = "trainer_state.json"
# Where the trainer puts the resolved config inside a checkpoint (written through `save_fn`).
CONFIG_NAME = "config.yaml"

_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at `step`."""
    return f"{CHECKPOINT_PREFIX}{int(step)}"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and _CHECKPOINT_RE.match(path.name) is not None and (path / TRAINER_STATE_NAME).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders in `output_dir`, oldest first (by step)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if _is_complete(p)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _read_latest_pointer(output_dir: Path) -> Path | None:
    pointer = output_dir / LATEST_NAME
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    target = output_dir / name
    if name and _CHECKPOINT_RE.match(name) and _is_complete(target):
        return target
    logger.warning("%s names %r, which is not a complete checkpoint; using the newest complete one.", pointer, name)
    return None


def clean_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete `*.tmp` leftovers of interrupted saves in `output_dir`; returns what was removed."""
    output_dir = Path(output_dir)
    removed = []
    if not output_dir.is_dir():
        return removed
    for path in output_dir.iterdir():
        if path.name.startswith(CHECKPOINT_PREFIX) and path.name.endswith(TMP_SUFFIX):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def find_latest_checkpoint(output_dir: str | os.PathLike, clean: bool = True) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, else the complete `checkpoint-N` with the largest N.

    Args:
        output_dir: the run's output folder.
        clean: also delete `checkpoint-*.tmp` leftovers of interrupted saves. In a multi-process run pass
            `accelerator.is_main_process`.

    Returns:
        The folder, or None when there is no complete checkpoint.
    """
    output_dir = Path(output_dir)
    if clean:
        for path in clean_incomplete_checkpoints(output_dir):
            logger.info("Removed incomplete checkpoint %s", path)
    latest = _read_latest_pointer(output_dir) if output_dir.is_dir() else None
    if latest is not None:
        return latest
    complete = list_checkpoints(output_dir)
    return complete[-1] if complete else None


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
    latest = _read_latest_pointer(output_dir)
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


def load_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The `trainer_state.json` of a checkpoint folder."""
    path = Path(checkpoint_dir) / TRAINER_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: {str(checkpoint_dir)!r} is not a complete checkpoint.")
    return json.loads(path.read_text(encoding="utf-8"))


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
