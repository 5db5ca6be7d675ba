"""Hub-ready pipeline folders: weights, model_index.json, the single-file code, config, samples and a model card.

Folder layout written by `export_pipeline` (a U-ViT pipeline as the example):

    model_index.json                 {"_class_name": ["pipeline_class_conditional", "ClassConditionalPipeline"],
                                      "transformer": ["uvit", "UViTModel"],
                                      "scheduler": ["diffusers", "DDIMScheduler"], "vae": ["diffusers", ...]}
    pipeline_class_conditional.py    the pipeline's source file, copied unchanged
    transformer/config.json, transformer/diffusion_pytorch_model.safetensors
                                     (config.json has "auto_map": {"AutoModel": "uvit.UViTModel"})
    transformer/uvit.py              the model's source file, copied unchanged
    scheduler/scheduler_config.json  (+ scheduler/<file>.py when the scheduler is not a diffusers class)
    vae/...                          (latent models only)
    training_config.yaml, samples.png, README.md, card_info.json (the card's facts, for a later re-export)
    samples_upscaled.png             the grid enlarged for the card and the Hub widget (pixel-exact, nearest)

Why this model_index.json. diffusers 0.42 resolves a component entry `[library, class]` by first looking for
`<component>/<library>.py` in the folder (custom code, which needs `trust_remote_code=True`), and otherwise takes
`library` from `sys.modules` (it never imports a library just because a folder names it). A `_class_name` given as
`[file, class]` likewise loads the pipeline class from `<file>.py`. So:

- `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` without this package installed finds
  the pipeline and every non-diffusers component in the shipped files. This needs the file-named entries above;
  entries such as `["diffusers_speedup", "UViTModel"]` would fail there, because that library cannot be imported.
- `ClassConditionalPipeline.from_pretrained(folder_or_repo)` with the package installed must not run the shipped
  files, yet diffusers' generic loader takes `<component>/<library>.py` whenever it exists. So the pipeline class
  overrides `load_config` to point file-named entries at the installed package (`["uvit", "UViTModel"]` ->
  `["diffusers_speedup", "UViTModel"]`, and the `_class_name` list back to its own name); this needs the package
  root to export those class names.

- `AutoModel.from_pretrained(folder/transformer, trust_remote_code=True)` loads the network alone, without this
  package, through the `auto_map` of its config.json (diffusers' convention for custom models).

The routes read the same folder; none needs another's entries.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers import ModelMixin

from ..run_folder import TRAINER_STATE_NAME, find_latest_checkpoint
from ..utils import atomic_folder
from .model_card import ModelCardInfo, build_model_card

logger = logging.getLogger(__name__)

# Libraries whose classes diffusers loads by name; anything else is third-party code that ships as a file.
DIFFUSERS_LOADABLE_LIBRARIES = ("diffusers", "transformers", "onnxruntime.training")
# Config keys that may carry credentials; they are never written into an exported folder.
_SECRET_KEY_PARTS = ("token", "password", "secret", "api_key")

MODEL_INDEX = "model_index.json"
TRAINING_CONFIG_FILE = "training_config.yaml"
# The card's facts (steps, images, batch, hardware, time, dataset, sampling settings) as data, so that a folder
# exported again (with an FID, a new name, for a push) keeps them.
CARD_INFO_FILE = "card_info.json"
SAMPLE_GRID_STEM = "samples"
# The card's image is enlarged by a whole factor until its longer side is at least this many pixels: a grid of
# 16-pixel samples (182×20) would be a smudge on the model page otherwise.
DISPLAY_MIN_SIDE = 768


def _is_custom_library(library: str | None) -> bool:
    if library is None or library in DIFFUSERS_LOADABLE_LIBRARIES:
        return False
    from diffusers import pipelines

    return not hasattr(pipelines, library)  # a diffusers pipeline module (e.g. "stable_diffusion")


def _copy_code(cls: type, destination_dir: Path) -> str:
    source = inspect.getsourcefile(cls)
    if source is None:
        raise ValueError(f"Cannot find the source file of {cls.__qualname__} (module {cls.__module__!r})")
    source = Path(source)
    destination_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination_dir / source.name)
    return source.stem


def _write_auto_map(config_file: Path, class_reference: str) -> None:
    """Names the model's code file in its config.json, as diffusers documents for custom models, so that
    `AutoModel.from_pretrained(folder/name, trust_remote_code=True)` loads the network without this package."""
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoModel": class_reference}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def ship_pipeline_code(pipeline, folder: str | os.PathLike) -> dict[str, Any]:
    """Copies the source file of the pipeline class and of each non-diffusers component into `folder` (a folder
    just written by `pipeline.save_pretrained`), rewrites model_index.json to name those files, and writes each
    custom network's `auto_map`. Returns the new model_index dict.
    """
    folder = Path(folder)
    index = json.loads((folder / MODEL_INDEX).read_text())
    for name, entry in list(index.items()):
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, class_name = entry
        if not _is_custom_library(library):
            continue
        component = getattr(pipeline, name)
        component = getattr(component, "_orig_mod", component)  # torch.compile wrapper
        stem = _copy_code(type(component), folder / name)
        index[name] = [stem, class_name]
        if isinstance(component, ModelMixin):
            _write_auto_map(folder / name / "config.json", f"{stem}.{class_name}")

    pipeline_cls = type(pipeline)
    if pipeline_cls.__module__.split(".")[0] != "diffusers":
        stem = _copy_code(pipeline_cls, folder)
        index["_class_name"] = [stem, pipeline_cls.__name__]

    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def _plain_config(config: Any) -> dict:
    if config is None:
        return {}
    try:  # OmegaConf configs (the trainer's own format) resolve their interpolations here.
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"training_config must be a dict, DictConfig or dataclass, got {type(config).__name__}")
    return _without_secrets(config)


def _without_secrets(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): _without_secrets(v)
            for k, v in value.items()
            if not any(part in str(k).lower() for part in _SECRET_KEY_PARTS)
        }
    if isinstance(value, (list, tuple)):
        return [_without_secrets(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _write_yaml(data: dict, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _write_sample_grid(sample_grid, folder: Path) -> str:
    if isinstance(sample_grid, (str, os.PathLike)):
        source = Path(sample_grid)
        if not source.is_file():
            raise FileNotFoundError(f"sample_grid file not found: {source}")
        name = SAMPLE_GRID_STEM + source.suffix.lower()
        shutil.copyfile(source, folder / name)
        return name
    if hasattr(sample_grid, "save"):  # PIL.Image
        name = SAMPLE_GRID_STEM + ".png"
        sample_grid.save(folder / name)
        return name
    raise TypeError(f"sample_grid must be a PIL image or a path, got {type(sample_grid).__name__}")


def _write_display_grid(grid_file: Path) -> str:
    """The sample grid enlarged by a whole factor (nearest neighbour, so every sample pixel stays a sharp square)
    until its longer side reaches `DISPLAY_MIN_SIDE`; written next to it. Returns its file name."""
    from PIL import Image

    with Image.open(grid_file) as grid:
        factor = max(1, -(-DISPLAY_MIN_SIDE // max(grid.size)))
        display = grid.resize((grid.width * factor, grid.height * factor), Image.Resampling.NEAREST)
    name = f"{SAMPLE_GRID_STEM}_upscaled.png"
    display.save(grid_file.with_name(name))
    return name


def _card_info_for(pipeline, info: ModelCardInfo) -> ModelCardInfo:
    """`info` with example class labels the pipeline has (a two-class model cannot sample class 3)."""
    try:
        num_classes = pipeline.num_classes
    except (AttributeError, ValueError):
        return info
    labels = [label for label in info.class_labels if label < num_classes] or list(range(min(4, num_classes)))
    return dataclasses.replace(info, class_labels=labels)


def check_weights_finite(pipeline, output_dir: str | os.PathLike) -> None:
    """Refuse to export weights that are NaN or infinite (a diverged run): such a folder loads, and samples nothing
    but NaN. Every network of the pipeline is checked, one fused reduction each; the message names the first
    tensor that is not finite."""
    import torch

    for component_name, component in pipeline.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        tensors = {name: tensor for name, tensor in component.state_dict().items() if tensor.is_floating_point()}
        if not tensors or torch.stack(torch._foreach_norm(list(tensors.values()), math.inf)).isfinite().all():
            continue
        name, tensor = next((name, t) for name, t in tensors.items() if not torch.isfinite(t).all())
        nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
        raise ValueError(
            f"Refusing to export {output_dir}: {component_name} weight {name!r} is not finite ({nan} NaN and {inf} "
            f"infinite of {tensor.numel()} values). The model diverged; export an earlier checkpoint instead."
        )


def export_pipeline(
    pipeline,
    output_dir: str | os.PathLike,
    *,
    training_config: Mapping[str, Any] | Any | None = None,
    sample_grid=None,
    card_info: ModelCardInfo | Mapping[str, Any] | None = None,
    overwrite: bool = True,
    ship_code: bool = True,
) -> Path:
    """Writes a complete, Hub-ready pipeline folder and returns its path.

    The folder is built next to `output_dir` under a temporary name and renamed into place at the end, so
    `output_dir` is either the previous complete export or the new complete one, never a half-written folder.

    Args:
        pipeline: a `DiffusionPipeline` holding the weights to release (register the EMA weights and unwrapped
            modules, not DDP wrappers).
        output_dir: folder to write; replaced if it exists and `overwrite` is True.
        training_config: the resolved training config (dict, OmegaConf DictConfig or dataclass), written as
            training_config.yaml with any key naming a token/password/secret removed; also read for the card.
        sample_grid: a PIL image or an image file path, written as samples.<ext> and shown in the card.
        card_info: `ModelCardInfo` or a dict of its fields (model name, repo id, FID, training facts, ...).
        overwrite: replace an existing `output_dir` (else raise FileExistsError).
        ship_code: copy the single-file code of non-diffusers classes into the folder so that
            `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works without this package.

    Raises:
        ValueError: naming the tensor, when a network's weights are not finite (`check_weights_finite`); nothing
            is written then.
    """
    target = Path(output_dir)
    if target.exists() and not overwrite:
        raise FileExistsError(f"output_dir already exists and overwrite=False: {target}")
    check_weights_finite(pipeline, target)
    info = ModelCardInfo.from_value(card_info)
    config = _plain_config(training_config)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        if ship_code:
            index = ship_pipeline_code(pipeline, staging)
        else:
            index = json.loads((staging / MODEL_INDEX).read_text())
        if config:
            _write_yaml(config, staging / TRAINING_CONFIG_FILE)
        grid_name = _write_sample_grid(sample_grid, staging) if sample_grid is not None else None
        info = _card_info_for(pipeline, info)
        if grid_name is not None and info.widget_file is None:
            info = dataclasses.replace(info, widget_file=_write_display_grid(staging / grid_name))
        components = {
            name: entry[1]
            for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[1] is not None
        }
        card = build_model_card(info, training_config=config, component_classes=components, sample_grid_file=grid_name)
        card.save(staging / "README.md")
        (staging / CARD_INFO_FILE).write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    logger.info("Exported pipeline to %s", target)
    return target


# --- finding what to export -----------------------------------------------------------------------------------------


def read_card_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The card facts an earlier export wrote into `folder` (empty when it has none, e.g. a foreign pipeline)."""
    path = Path(folder) / CARD_INFO_FILE
    if not path.is_file():
        return {}
    known = {f.name for f in dataclasses.fields(ModelCardInfo)}
    facts = json.loads(path.read_text())
    if facts.get("guidance_interval") is not None:
        facts["guidance_interval"] = tuple(facts["guidance_interval"])
    return {key: value for key, value in facts.items() if key in known}


def _pipeline_subfolder(folder: Path) -> Path | None:
    """A pipeline folder directly inside `folder`, EMA weights first."""
    candidates = sorted(p.parent for p in folder.glob(f"*/{MODEL_INDEX}"))
    ema = [p for p in candidates if "ema" in p.name.lower()]
    return (ema or candidates or [None])[0]


def find_export_source(path: str | os.PathLike) -> tuple[str, Path]:
    """What a folder given to export holds: ``("pipeline", folder)`` or ``("checkpoint", folder)``.

    - a pipeline folder (it has model_index.json) is itself;
    - a checkpoint folder (it has trainer_state.json) gives the pipeline saved inside it (with
      ``train.export_every_checkpoint=true``), else the checkpoint itself, whose weights are then exported;
    - a run folder gives its newest complete checkpoint (the one ``latest`` names), as above; a run folder without
      checkpoints gives the pipeline folder inside it.

    Raises:
        FileNotFoundError: when `path` does not exist or holds none of these.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"input folder does not exist: {path}")
    if (path / MODEL_INDEX).is_file():
        return "pipeline", path
    if (path / TRAINER_STATE_NAME).is_file():
        inner = _pipeline_subfolder(path)
        return ("pipeline", inner) if inner is not None else ("checkpoint", path)
    checkpoint = find_latest_checkpoint(path, clean=False)
    if checkpoint is not None:
        return find_export_source(checkpoint)
    inner = _pipeline_subfolder(path)
    if inner is not None:
        return "pipeline", inner
    raise FileNotFoundError(
        f"{path} is not a pipeline folder (no {MODEL_INDEX}), a checkpoint (no {TRAINER_STATE_NAME}) or a run "
        "folder holding either"
    )


def _facts_from_checkpoint(folder: Path) -> dict[str, Any]:
    """Training facts from the trainer_state.json of the checkpoint that holds the pipeline `folder`, if any."""
    path = folder.parent / TRAINER_STATE_NAME
    if not path.is_file():
        return {}
    state = json.loads(path.read_text())
    facts = {"training_steps": state.get("step"), "images_seen": state.get("images_seen")}
    facts["hardware"] = state.get("hardware")
    if state.get("train_seconds") is not None:
        facts["training_time"] = f"{state['train_seconds'] / 60:.1f} minutes"
    return {key: value for key, value in facts.items() if value is not None}


def card_info_for_reexport(folder: str | os.PathLike, **given: Any) -> ModelCardInfo:
    """The card facts of the pipeline `folder` — those an earlier export saved in it, else those of the checkpoint
    holding it — updated with the fields in `given` that are not None."""
    folder = Path(folder)
    facts = read_card_info(folder) or _facts_from_checkpoint(folder)
    facts.update({key: value for key, value in given.items() if value is not None and value != []})
    if facts.get("images_seen") is None and facts.get("training_steps") and facts.get("batch_size"):
        facts["images_seen"] = facts["training_steps"] * facts["batch_size"]
    return ModelCardInfo.from_value(facts)
