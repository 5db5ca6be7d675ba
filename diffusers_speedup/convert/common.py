"""What every checkpoint converter shares: safe loading, one key check, and writing the pipeline folder."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


class CheckpointFormatError(ValueError):
    """A checkpoint that is not of the expected family, layout or size, or not a readable file at all."""


def load_torch_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Reads a ``torch.save`` file of tensors with ``weights_only=True``, so no pickled code runs.

    `what` names the expected checkpoint in errors ("a U-ViT nnet.pth"). Nested dicts such as DiT's
    ``{"model": ..., "ema": ...}`` are returned as they are; the caller picks the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message advises weights_only=False, which would run whatever code the file holds.
        raise CheckpointFormatError(
            f"{path}: is not {what} of plain tensors, or is truncated ({_unpickler_reason(error)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointFormatError(
            f"{path}: cannot be read as {what} (truncated or not a torch file): {_first_line(error)}"
        ) from None
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
        # A file that is not a zip archive is read as a legacy torch pickle, whose unpickler fails on other bytes
        # (a text file) with whatever lookup went wrong, e.g. KeyError: 101.
        raise CheckpointFormatError(
            f"{path}: cannot be read as {what} (not a torch file): {type(error).__name__}: {_first_line(error)}"
        ) from None
    if not isinstance(state, Mapping):
        raise CheckpointFormatError(f"{path}: expected {what} (a dict of tensors), found {type(state).__name__}")
    return dict(state)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unpickler_reason(error: BaseException) -> str:
    """What torch's weights-only unpickler refused ("unsupported GLOBAL posix.system"), without its advice."""
    for line in str(error).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line.startswith(("Unsupported", "Trying to load")):
            return line.rstrip(".")
    return "not a weights-only torch file"


def check_state_dict_keys(
    state: Mapping[str, object], expected: Iterable[str], path: str | os.PathLike, what: str
) -> None:
    """One error naming every missing and every unexpected key, or nothing when the key sets are equal."""
    expected = set(expected)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_preview(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_preview(unexpected)}")
    raise CheckpointFormatError(f"{path}: not {what}: " + "; ".join(parts))


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def tensor_shape(state: Mapping[str, torch.Tensor], key: str, ndim: int, path, what: str) -> tuple[int, ...]:
    """The shape of ``state[key]``, which must be an `ndim`-d tensor; else one error naming the key."""
    value = state[key]
    if not isinstance(value, torch.Tensor) or value.ndim != ndim:
        found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointFormatError(f"{path}: not {what}: {key} should be a {ndim}-d tensor, found {found}")
    return tuple(value.shape)


def load_mapped_state_dict(model, state, key_map: Mapping[str, str], path, what: str, adjust=None) -> None:
    """Copies ``state[official]`` into ``model``'s ``key_map[official]`` after checking every shape.

    `adjust(official_key, tensor) -> tensor` rewrites a tensor on the way (row order, padding). Every tensor of
    the model must be covered; shape mismatches are reported together, by official key.
    """
    target = model.state_dict()
    uncovered = sorted(set(target) - set(key_map.values()))
    if uncovered:  # a gap in the mapping itself, not in the file
        raise RuntimeError(f"conversion map leaves {type(model).__name__} tensors unset: {uncovered}")
    converted, mismatched = {}, []
    for official, ours in key_map.items():
        tensor = state[official].detach().to(torch.float32)
        if adjust is not None:
            tensor = adjust(official, tensor)
        if tuple(tensor.shape) != tuple(target[ours].shape):
            mismatched.append(f"{official} {tuple(state[official].shape)} (expected {tuple(target[ours].shape)})")
        converted[ours] = tensor
    if mismatched:
        raise CheckpointFormatError(f"{path}: not {what}: tensors of the wrong shape: {', '.join(mismatched)}")
    model.load_state_dict(converted, strict=True)


def save_converted_pipeline(
    pipeline,
    output_dir: str | os.PathLike,
    *,
    model_name: str,
    source: str,
    license: str,
    description: str,
    sampling: Mapping[str, object] | None = None,
) -> Path:
    """Writes `pipeline` as an exported folder whose model card names where the weights came from and their licence.

    `source` is the checkpoint's origin (a URL or the released file's name), `license` a Hub licence id
    ("mit", "cc-by-nc-sa-4.0", ...), `sampling` the card's recommended settings (num_inference_steps,
    guidance_scale, guidance_interval) from the paper that released the weights.
    """
    from ..hub import ModelCardInfo, export_pipeline

    card = ModelCardInfo(
        model_name=model_name,
        license=license,
        description=f"{description}\n\nConverted from the released checkpoint {source}; the weights keep its licence "
        f"({license}).",
        **dict(sampling or {}),
    )
    return export_pipeline(pipeline, output_dir, card_info=card)
