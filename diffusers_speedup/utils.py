"""Small helpers shared by several subpackages.

Files and folders that a later run reads (checkpoints, EMA snapshots, latent-cache chunks, sample shards, npz
archives, exported pipelines) are written under a temporary name next to their destination and renamed into place,
so that a killed process leaves either the old complete version or the new complete one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch


def temporary_name(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden, unique sibling of `path` (`.<name>.<kind>-<pid>-<random>`), for writing before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file path to write; on a normal exit the file is flushed to disk and renamed onto `path`.

    If the block raises, the temporary file is deleted and `path` is left as it was. `os.replace` is atomic on
    POSIX and Windows, so readers see either the old file or the complete new one; every process of a run may
    write the same `path` this way, as each uses its own temporary name.
    """
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def replace_folder(new: str | os.PathLike, target: str | os.PathLike, aside: str | os.PathLike | None = None) -> None:
    """Rename the complete folder `new` to `target`, replacing any existing `target`.

    A folder cannot be renamed onto a non-empty one, so an existing `target` is first moved to `aside` (default: a
    hidden sibling `.<name>.old-...`) and deleted only once `new` is in place: at every moment `target` is either
    the old complete folder or the new one (between the two renames, briefly absent).
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(aside) if aside is not None else temporary_name(target, "old")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder next to `target`; on a normal exit it replaces `target` (`replace_folder`).

    If the block raises, the temporary folder is deleted and `target` is left as it was.
    """
    target = Path(target)
    staging = temporary_name(target)
    staging.mkdir(parents=True)
    try:
        yield staging
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by 🤗 datasets' `save_to_disk`: a `Dataset` (dataset_info.json and
    state.json) or a `DatasetDict` (dataset_dict.json), the files `datasets.load_from_disk` itself looks for."""
    path = Path(path)
    return ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()) or (
        path / "dataset_dict.json"
    ).is_file()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module behind DDP / FSDP / DeepSpeed and `torch.compile` wrappers, nested in any order, so that
    its attributes and plain parameter names are seen. Anything that is not a module (a plain function standing in
    for a model) is returned as it is."""
    from accelerate.utils import extract_model_from_parallel

    while isinstance(model, torch.nn.Module):
        inner = extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
        if inner is model:
            break
        model = inner
    return model


# A Hub repository id as a path-or-id argument can be: ``name`` or ``namespace/name``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def meant_as_local_path(name: str) -> bool:
    """True when ``name`` (an argument that takes a local folder or a Hub id) can only mean a local path: it cannot
    be a Hub repository id, or its first component is a folder here (``vaes/mine`` next to a ``vaes/`` folder). A
    missing folder is then named as such instead of failing as a Hub lookup."""
    first = name.split("/")[0]
    return _HUB_ID.fullmatch(name) is None or (bool(first) and os.path.isdir(first))
