"""What a training run's folder holds, and how to find its newest complete checkpoint.

Layout of a run's `output_dir`:

    checkpoint-<step>/        one checkpoint (see `training.checkpoints`); complete once trainer_state.json is there
    checkpoint-<step>.tmp/    a checkpoint being written; left behind only by a crash, ignored and cleaned up
    latest                    text file naming the newest complete checkpoint folder
    samples/step_<step>.png   the sample grids
    pipeline/                 the export at the end of the run
    train.lock                the lock of the training run that writes the folder (`RunFolderLock`)

The trainer writes this folder; resuming and exporting read it. Reading needs neither the trainer nor the training
data, so the exporter (`hub`) reads run folders through this module without importing `training`. Only a training run
takes the lock: commands that read a run folder (export, posthoc-ema) work while it trains.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
LATEST_NAME = "latest"
TRAINER_STATE_NAME = "trainer_state.json"
LOCK_NAME = "train.lock"
# Where the trainer puts the resolved config inside a checkpoint.
CONFIG_NAME = "config.yaml"

_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at `step`."""
    return f"{CHECKPOINT_PREFIX}{int(step)}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint folder, from its name (-1 for a folder not named `checkpoint-<step>`)."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else -1


def _is_complete(path: Path) -> bool:
    return path.is_dir() and _CHECKPOINT_RE.match(path.name) is not None and (path / TRAINER_STATE_NAME).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders in `output_dir`, oldest first (by step)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if _is_complete(p)]
    return sorted(found, key=checkpoint_step)


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


class RunFolderInUse(RuntimeError):
    """Another process holds the lock of a run folder."""


class RunFolderLock:
    """The exclusive right of one training run to write a run folder: an `fcntl.flock` on its `train.lock`.

    The lock belongs to the open file, so the operating system releases it when the process ends, however it ends:
    a crashed or killed run never leaves its folder locked. The holder writes its pid, host and start time into the
    file for the message another run gets. The file stays when the lock is released (deleting it would let a run
    that opened it just before hold a lock on a file that no longer exists while a third run locks a new one).

    Use `RunFolderLock.acquire(output_dir)`, and `release()` when the run ends.
    """

    def __init__(self, output_dir: Path, file, created_folder: bool, locked: bool = True):
        self.output_dir, self.path = output_dir, output_dir / LOCK_NAME
        self._file, self._created_folder, self._locked = file, created_folder, locked

    @classmethod
    def acquire(cls, output_dir: str | os.PathLike) -> RunFolderLock:
        """Lock `output_dir` (created if missing) for this process.

        On a file system without file locks (some network and parallel file systems unless mounted with them), the
        run goes on unlocked with a warning.

        Raises:
            RunFolderInUse: naming the process and host that hold it.
        """
        output_dir = Path(output_dir)
        created_folder = not output_dir.exists()
        output_dir.mkdir(parents=True, exist_ok=True)
        # Opened without truncating: until this process holds the lock, the file speaks for its holder.
        file = os.fdopen(os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
        try:
            _lock_exclusively(file)
        except OSError as error:
            if error.errno in _NO_LOCKS:
                logger.warning(
                    "Cannot lock %s (%s): a second run started into %s will not be stopped.",
                    output_dir / LOCK_NAME, error.strerror, output_dir,
                )  # fmt: skip
                return cls(output_dir, file, created_folder, locked=False)
            holder = file.read()
            file.close()
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise OSError(error.errno, f"cannot lock {output_dir / LOCK_NAME}: {error.strerror}") from None
            raise RunFolderInUse(
                f"{output_dir} is in use by another training run ({describe_lock_holder(holder)}); wait for it to "
                "end or stop it, or choose another folder."
            ) from None
        file.seek(0)
        file.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        file.write(json.dumps(holder) + "\n")
        file.flush()
        return cls(output_dir, file, created_folder)

    def release(self, remove_created_folder: bool = False) -> None:
        """Give the folder up (a second call does nothing). With `remove_created_folder`, a folder that `acquire`
        created and that holds nothing but the lock file is removed, as if the run had never started."""
        if self._file is None:
            return
        if self._locked:
            self._file.seek(0)
            self._file.truncate()  # no stale pid for the next holder's rivals to read
        if remove_created_folder and self._created_folder and os.listdir(self.output_dir) == [LOCK_NAME]:
            # Removed while still locked: a run that opened the file meanwhile finds it held and stops.
            self.path.unlink()
            self.output_dir.rmdir()
        if self._locked:
            import fcntl

            # Explicitly: a process forked meanwhile shares the open file, and closing ours alone would not unlock it.
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


# What flock raises where the file system has no locks.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


def _lock_exclusively(file) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        raise OSError(errno.ENOSYS, "no fcntl on this platform") from None
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)


def describe_lock_holder(text: str) -> str:
    """The holder that a lock file names, in words."""
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "its process has not written its pid and host yet"
