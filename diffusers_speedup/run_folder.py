"""What a training run's folder holds, and how to find its newest complete checkpoint.

Layout of a run's `output_dir`:

    checkpoint-<step>/        one checkpoint (see `training.checkpoints`); complete once trainer_state.json is there
    checkpoint-<step>.tmp/    a checkpoint being written; left behind only by a crash, ignored and cleaned up
    latest                    text file naming the newest complete checkpoint folder
    samples/step_<step>.png   the sample grids
    pipeline/                 the export at the end of the run

The trainer writes this folder; resuming and exporting read it. Reading needs neither the trainer nor the training
data, so the exporter (`hub`) reads run folders through this module without importing `training`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
LATEST_NAME = "latest"
TRAINER_STATE_NAME = "trainer_state.json"
# Where the trainer puts the resolved config inside a checkpoint.
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


def read_latest_pointer(output_dir: Path) -> Path | None:
    """The complete checkpoint that `latest` names, or None (with a warning when it names something else)."""
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
    latest = read_latest_pointer(output_dir) if output_dir.is_dir() else None
    if latest is not None:
        return latest
    complete = list_checkpoints(output_dir)
    return complete[-1] if complete else None


def load_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The `trainer_state.json` of a checkpoint folder."""
    path = Path(checkpoint_dir) / TRAINER_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: {str(checkpoint_dir)!r} is not a complete checkpoint.")
    return json.loads(path.read_text(encoding="utf-8"))
