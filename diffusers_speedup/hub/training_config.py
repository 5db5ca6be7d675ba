"""Whether a training config describes the network of a pipeline folder.

An export writes the training config into the folder as `training_config.yaml`, and the model card is built from it
(tags, sampling settings), so the config of another run would publish a card that describes a different model. The
check compares what the config's ``model`` section fixes (the kind, and the architecture its preset and params set)
with the network's own ``config.json``, which its weights were saved with. It reads only the pipeline folder, so it
holds however that folder was made (saved by the trainer, or exported from a checkpoint's weights).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..models import DEFAULT_MODEL_KIND, ModelKind, model_kind


def architecture_fixed_by(model: Mapping[str, Any]) -> tuple[ModelKind, dict[str, tuple[Any, str]]]:
    """The model kind a recipe's ``model`` section builds, and each constructor argument it fixes, as
    ``{argument: (value, where the recipe sets it)}``.

    The trainer builds the network from the preset, then the values it reads from the data (sample size, channels,
    classes), then ``model.params``; so a preset fixes everything but those data values, and params fix all they
    name. A ``model.pretrained`` network brings its own architecture: only the kind is fixed then.
    """
    kind = model_kind(model.get("kind", DEFAULT_MODEL_KIND))
    if model.get("pretrained"):
        return kind, {}
    fixed = {}
    preset = model.get("preset")
    if preset is not None:
        if preset not in kind.presets:
            raise ValueError(f"model.preset {preset!r} is not a preset of model.kind {kind.name!r}")
        # Only the names matter here: the arguments that the trainer takes from the data over the preset's.
        from_data = kind.fitted_params((1, 1, 1), num_classes=1)
        for key, value in kind.presets[preset].items():
            if key not in from_data:
                fixed[key] = (value, f"model.preset {preset!r} sets {key}")
    for key, value in (model.get("params") or {}).items():
        fixed[key] = (value, f"model.params.{key}")
    return kind, fixed


def check_training_config(
    config: Mapping[str, Any], pipeline_dir: str | os.PathLike, config_name: str, pipeline_name: str | None = None
) -> None:
    """Raise ValueError, naming the first key that differs and both values, unless the training `config` (a plain
    mapping, as saved with a run) may describe the network in `pipeline_dir`.

    `config_name` and `pipeline_name` (default: the folder's path) say in the message what the user gave, e.g. a
    checkpoint whose weights were exported into a temporary `pipeline_dir`. An argument that the network's
    config.json does not record (one its class gained later) cannot be compared and is passed over.
    """
    pipeline_dir = Path(pipeline_dir)
    mismatch = f"{config_name} does not describe the network in {pipeline_name or pipeline_dir}"
    model = config.get("model")
    if model is not None and not isinstance(model, Mapping):
        raise ValueError(f"{config_name}: its model section is a {type(model).__name__}, not a mapping")
    try:
        kind, fixed = architecture_fixed_by(model or {})
    except ValueError as error:
        raise ValueError(f"{config_name}: {error}") from None
    network_file = f"{kind.pipeline_slot}/config.json"
    class_name = kind.model_class.__name__
    if not (pipeline_dir / network_file).is_file():
        raise ValueError(
            f"{mismatch}: its model.kind {kind.name!r} is a {class_name} in the pipeline's {kind.pipeline_slot!r} "
            f"slot, and the pipeline has no {network_file}"
        )
    network = json.loads((pipeline_dir / network_file).read_text())
    if network.get("_class_name") != class_name:
        raise ValueError(
            f"{mismatch}: its model.kind {kind.name!r} builds a {class_name}, but the network's {network_file} "
            f"holds a {network.get('_class_name')}"
        )
    for key, (value, where) in fixed.items():
        if key in network and not _same_value(network[key], value):
            raise ValueError(
                f"{mismatch}: {where} = {value!r}, but the network's {network_file} has {key} = {network[key]!r}"
            )


def _same_value(saved: Any, recipe: Any) -> bool:
    # JSON and YAML both read sequences as lists, and 4 == 4.0; but a flag is not a number (True == 1 in Python).
    if isinstance(saved, bool) or isinstance(recipe, bool):
        return type(saved) is type(recipe) and saved == recipe
    if isinstance(saved, (list, tuple)) and isinstance(recipe, (list, tuple)):
        return len(saved) == len(recipe) and all(_same_value(a, b) for a, b in zip(saved, recipe))
    return saved == recipe
