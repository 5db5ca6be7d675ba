"""Checkpoint folders that are never half-written, around accelerate's `save_state` / `load_state`, and the
trainer's own state saved in them by name.

A checkpoint folder `output_dir/checkpoint-<step>` holds:

    model.safetensors, optimizer.bin, random_states_<rank>.pkl, ...
                              accelerate's state: the prepared model and optimizer, every RNG
    custom_checkpoint_0.pkl   the trainer's other parts, by name (`NamedState`): {"lr_scheduler": ..., "ema": ...}
    config.yaml, pipeline_record.json
                              the resolved config and what an export needs, written by the trainer (`save_fn`)
    trainer_state.json        step, data position, images seen, ...; written last: a folder holding it is complete

A checkpoint is written to `checkpoint-<step>.tmp` and renamed into place, then `latest` is replaced atomically, so
`latest` only ever names a complete one. We name folders ourselves instead of using accelerate's
`automatic_checkpoint_naming`, whose counter is not restored by `load_state` (a resumed run would then write
`checkpoint_0` and delete newer checkpoints). Folder names, `latest` and finding the newest complete checkpoint are
in `diffusers_speedup.run_folder`, which the exporter reads too.

Why one named object: accelerate saves each object given to `register_for_checkpointing` as
`custom_checkpoint_<i>.pkl`, numbered in the order of registration, and loads them back by position, so registering
one more object before another would renumber the files. The trainer registers a single `NamedState` instead; a new
part (an auxiliary loss's state) is one more name in it. Checkpoints written before held one numbered file per part
(`custom_checkpoint_0.pkl` the LR schedule, `custom_checkpoint_1.pkl` the EMA: `NUMBERED_PARTS`); their
trainer_state.json lists no named parts, and `load_checkpoint` loads them as they were written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
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
    "DamagedCheckpointError",
    "LATEST_NAME",
    "NAMED_STATE_FILE",
    "NUMBERED_PARTS",
    "TMP_SUFFIX",
    "TRAINER_STATE_NAME",
    "NamedState",
    "checkpoint_damage",
    "checkpoint_name",
    "clean_incomplete_checkpoints",
    "explain_failed_write",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_trainer_state",
    "rotate_checkpoints",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

# accelerate's name for the file of the first (here: the only) object registered for checkpointing.
NAMED_STATE_FILE = "custom_checkpoint_0.pkl"
# The trainer_state.json entry listing the parts saved in NAMED_STATE_FILE; checkpoints without it are numbered.
NAMED_STATE_KEY = "named_state"
# What the numbered files of a checkpoint written before NamedState hold, file 0 first: the trainer registered the
# LR schedule, then the EMA when the run had one.
NUMBERED_PARTS = ("lr_scheduler", "ema")


class NamedState:
    """Objects with ``state_dict`` / ``load_state_dict`` saved as one object, each under its name, so that no
    registration order decides which file or entry holds what.

    Register it with ``accelerator.register_for_checkpointing`` (and nothing else) and pass it to `save_checkpoint`
    and `load_checkpoint`.

    Args:
        parts: name -> object; a None value (a part this run does not have, such as the EMA of a run without one)
            is left out.
    """

    def __init__(self, **parts):
        self.parts = {name: part for name, part in parts.items() if part is not None}

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore each part from its entry; nothing is restored when an entry is missing or unknown."""
        self.check_saved_parts(state_dict.keys())
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])

    def check_saved_parts(self, saved: Iterable[str], where: str = "the checkpoint") -> None:
        """Raise a ValueError naming each part that `where` lacks but this run needs, or holds but this run lacks."""
        saved = list(saved)
        problems = [f"it has no {name!r} state, which this run needs" for name in self.parts if name not in saved]
        problems += [
            f"it has a {name!r} state, which this run does not know" for name in saved if name not in self.parts
        ]
        if problems:
            raise ValueError(f"{where}: {'; '.join(problems)} (this run's parts: {', '.join(self.parts) or 'none'}).")


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
    named_state: NamedState | None = None,
) -> Path:
    """Save the training state atomically as `output_dir/checkpoint-<step>` and point `latest` at it.

    Call it on every process (accelerate's `save_state` needs all of them under DeepSpeed/FSDP); files are moved only
    on the main process.

    Args:
        accelerator (`accelerate.Accelerator`): its prepared models, optimizers, schedulers, dataloaders and objects
            registered with `register_for_checkpointing` (the trainer's `NamedState`) are saved by `save_state`. It
            must not use `automatic_checkpoint_naming`.
        output_dir: the run's output folder.
        step: optimizer steps done; names the folder and is stored as `trainer_state["step"]`.
        extra_state: JSON-serialisable trainer state to store in `trainer_state.json` (epoch, position in the epoch,
            images seen, ...).
        save_fn: called on the main process with the temporary folder before it is renamed into place; write
            `CONFIG_NAME` (the resolved config) and any other files there.
        total_limit: if given, keep at most this many checkpoints afterwards (`rotate_checkpoints`).
        named_state: the `NamedState` registered with `accelerator`; its part names are listed in
            `trainer_state.json`, which tells `load_checkpoint` the layout.

    Returns:
        The final checkpoint folder.
    """
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError(
            "save_checkpoint names checkpoint folders itself; create the Accelerator with "
            "ProjectConfiguration(automatic_checkpoint_naming=False)."
        )
    trainer_state = {**(extra_state or {}), "step": int(step)}
    if named_state is not None:
        trainer_state[NAMED_STATE_KEY] = list(named_state.parts)
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


@contextlib.contextmanager
def explain_failed_write(output_dir: str | os.PathLike, step: int) -> Iterator[None]:
    """Around `save_checkpoint`: a write that fails (a full disk, most often) becomes one OSError that says so, names
    the checkpoint being written and the last complete one. A failed save never moves `latest`, and a resume removes
    the partial folder, so that message is all there is to know.

    torch's zip writer reports a failed write without its OSError ("PytorchStreamWriter failed writing file", or
    "unexpected pos" when the archive closes), and safetensors as its own error naming the OS error; other errors
    pass unchanged.
    """
    try:
        yield
    except Exception as error:
        text = f"{error}"
        if not isinstance(error, OSError) and not any(sign in text for sign in _FAILED_WRITE_SIGNS):
            raise
        output_dir = Path(output_dir)
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text:
            reason, remedy = f"no space left on device, the disk is full ({error})", "Free some space"
        elif isinstance(error, OSError):
            reason, remedy = f"the write failed ({type(error).__name__}: {text})", "Fix that"
        else:  # torch's writer says neither why nor which errno
            reason = f"the write failed ({type(error).__name__}: {text}), most often because the disk is full"
            remedy = "Free some space"
        try:
            reason += f"; {shutil.disk_usage(output_dir).free / 2**20:.0f} MiB free there now"
        except OSError:
            pass
        last = find_latest_checkpoint(output_dir, clean=False)
        kept = (
            f"`latest` names the last complete checkpoint, {last}"
            if last is not None
            else "there is no complete checkpoint yet, so a resume starts afresh"
        )
        partial = output_dir / (checkpoint_name(step) + TMP_SUFFIX)
        message = (
            f"Could not write checkpoint {partial}: {reason}. Nothing else is lost: {kept}. {remedy}, then continue "
            f"with train.resume=latest, which removes the partial {partial.name}."
        )
        raise OSError(" ".join(message.split())) from error


# How torch's zip writer and safetensors report a write that failed (see `explain_failed_write`).
_FAILED_WRITE_SIGNS = ("PytorchStreamWriter failed", "unexpected pos", "No space left on device", "StorageFull")


def load_checkpoint(accelerator, checkpoint_dir: str | os.PathLike, named_state: NamedState | None = None) -> dict:
    """Restore the state saved by `save_checkpoint` and return its trainer state.

    Prepare the same models, optimizers and dataloaders, and register the same objects with
    `register_for_checkpointing`, before calling it.

    Args:
        accelerator (`accelerate.Accelerator`): the accelerator to load into.
        checkpoint_dir: a checkpoint folder, e.g. from `find_latest_checkpoint`.
        named_state: the `NamedState` registered with `accelerator`, when that is how the state is kept. Its parts
            are restored by name, or, from a checkpoint written before named parts, from the numbered files.

    Returns:
        The dict stored in `trainer_state.json` (`step` and the trainer's `extra_state`).

    Raises:
        DamagedCheckpointError: naming each file that is missing or cannot be read (`checkpoint_damage`);
            nothing is loaded then.
        ValueError: naming the part, when the checkpoint lacks a part that `named_state` has or holds one it lacks;
            nothing is loaded then.
    """
    checkpoint_dir = Path(checkpoint_dir)
    damage = checkpoint_damage(accelerator, checkpoint_dir)
    if damage:
        raise DamagedCheckpointError(f"{checkpoint_dir} is damaged: {'; '.join(damage)}.")
    trainer_state = load_trainer_state(checkpoint_dir)
    if named_state is None:
        accelerator.load_state(str(checkpoint_dir))
    elif NAMED_STATE_KEY in trainer_state:
        named_state.check_saved_parts(trainer_state[NAMED_STATE_KEY], where=str(checkpoint_dir))
        accelerator.load_state(str(checkpoint_dir))
    else:
        _load_numbered(accelerator, checkpoint_dir, named_state)
    return trainer_state


def _load_numbered(accelerator, checkpoint_dir: Path, named_state: NamedState) -> None:
    """Load a checkpoint whose parts are numbered files (`NUMBERED_PARTS`), written before `NamedState`."""
    count = len(list(checkpoint_dir.glob("custom_checkpoint_*.pkl")))
    if count > len(NUMBERED_PARTS):
        raise ValueError(
            f"{checkpoint_dir}: {count} numbered state files (custom_checkpoint_*.pkl), but checkpoints written "
            f"before named parts held at most {len(NUMBERED_PARTS)} ({', '.join(NUMBERED_PARTS)})."
        )
    names = NUMBERED_PARTS[:count]
    named_state.check_saved_parts(names, where=f"{checkpoint_dir} (numbered files: {', '.join(names) or 'none'})")
    # accelerate loads registered objects by position and refuses a folder with another number of files, so the
    # parts stand in for the named state while it loads, in the order in which they were numbered. accelerate has
    # no public way to change what is registered.
    registered = accelerator._custom_objects
    if registered != [named_state]:
        raise ValueError(
            "load_checkpoint: a checkpoint with numbered files loads only when named_state is the one object "
            "registered for checkpointing."
        )
    registered[:] = [named_state.parts[name] for name in names]
    try:
        accelerator.load_state(str(checkpoint_dir))
    finally:
        registered[:] = [named_state]


class DamagedCheckpointError(ValueError):
    """A checkpoint lacks a file that loading it reads, or holds one that cannot be read."""


def checkpoint_damage(
    accelerator, checkpoint_dir: str | os.PathLike, models: int | None = None, optimizers: int | None = None
) -> list[str]:
    """What would keep `checkpoint_dir` from loading into `accelerator`, found before anything loads: one line per
    file that `load_checkpoint` reads and that is missing or cannot be read. Empty when the files are sound.

    Raises FileNotFoundError for a folder without trainer_state.json, which is not a checkpoint at all.

    Reads no tensor: a safetensors file's header must describe the whole file, a torch file (optimizer, RNG states,
    the named state) must be a zip archive whose directory, at its end, is readable, and trainer_state.json and
    config.yaml must parse. A file cut short (a full disk, a copy that stopped) fails these; a flipped bit inside
    the tensors does not.

    Args:
        accelerator (`accelerate.Accelerator`): the accelerator the checkpoint is for (its processes and scaler).
        checkpoint_dir: the checkpoint folder.
        models, optimizers: how many of each accelerate will load; default: as many as `accelerator` has prepared
            (give them to check before preparing).
    """
    import yaml
    from accelerate.utils import DistributedType

    checkpoint_dir = Path(checkpoint_dir)
    problems = []
    try:
        trainer_state = load_trainer_state(checkpoint_dir)  # without it, a folder is no checkpoint: FileNotFoundError
    except ValueError as error:
        problems.append(f"{TRAINER_STATE_NAME} is not valid JSON ({error})")
        trainer_state = {}
    if (checkpoint_dir / CONFIG_NAME).is_file():
        try:
            yaml.safe_load((checkpoint_dir / CONFIG_NAME).read_text(encoding="utf-8"))
        except (yaml.YAMLError, ValueError) as error:
            problems.append(f"{CONFIG_NAME} is not valid YAML ({' '.join(str(error).split())})")

    torch_files = []
    # FSDP, DeepSpeed and Megatron-LM write models and optimizers in layouts of their own, which they check.
    own_layouts = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if accelerator.distributed_type not in own_layouts:
        for i in range(len(accelerator._models) if models is None else models):
            ending = f"_{i}" if i else ""
            safetensors_file = checkpoint_dir / f"model{ending}.safetensors"
            # accelerate reads pytorch_model.bin only when there is no safetensors file, which is what it writes.
            if safetensors_file.is_file() or not (checkpoint_dir / f"pytorch_model{ending}.bin").is_file():
                problems += _safetensors_problems(safetensors_file)
            else:
                torch_files.append(f"pytorch_model{ending}.bin")
        count = len(accelerator._optimizers) if optimizers is None else optimizers
        torch_files += [f"optimizer{f'_{i}' if i else ''}.bin" for i in range(count)]
    if accelerator.scaler is not None:
        torch_files.append("scaler.pt")
    # Each process reads its own RNG states; a run on more processes than the checkpoint's finds none for the rest.
    saved_processes = int(trainer_state.get("world_size", accelerator.num_processes))
    torch_files += [f"random_states_{rank}.pkl" for rank in range(min(accelerator.num_processes, saved_processes))]
    if NAMED_STATE_KEY in trainer_state:
        torch_files.append(NAMED_STATE_FILE)
    torch_files += sorted(path.name for path in checkpoint_dir.glob("custom_checkpoint_*.pkl"))
    for name in dict.fromkeys(torch_files):
        problems += _torch_file_problems(checkpoint_dir / name)
    return problems


def _safetensors_problems(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return [f"{path.name} is missing"]
    try:
        with safe_open(str(path), framework="pt"):
            return []
    except (SafetensorError, OSError) as error:
        return [f"{path.name} cannot be read, it is cut short or corrupt ({error})"]


def _torch_file_problems(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path.name} is missing"]
    try:
        with zipfile.ZipFile(path):  # torch.save writes a zip archive; its directory is the last thing written
            return []
    except (zipfile.BadZipFile, OSError) as error:
        return [f"{path.name} cannot be read, it is cut short or corrupt ({error})"]
