"""What a checkpoint records for its export, and the export of a checkpoint from it.

Every checkpoint holds `pipeline_record.json` (`PipelineRecord`), written by the trainer: what a pipeline needs besides
the weights. `export_checkpoint` builds the pipeline from it and from the checkpoint's weights, so a checkpoint
exports without the training data, an optimizer, accelerate or a trainer. The trainer builds its sample-grid and
export pipelines with the same `build_pipeline` from the record it is about to save, so that the export of a
checkpoint and the run's own export of that step cannot drift apart.

A record (a U-ViT on the built-in digits, with an EMA):

    {"format": 1,
     "model": {"_class_name": "UViTModel", "hidden_size": 16, ...},  the model's config.json, as diffusers writes it
     "slot": "transformer",                                          the pipeline component it fills
     "weights": {"file": "custom_checkpoint_0.pkl", "keys": ["ema", "model"]},
     "class_names": ["0", "1", ...], "sample_shape": [1, 8, 8],
     "scheduler": {"_class_name": "DDIMScheduler", ...},             its scheduler_config.json, as diffusers writes it
     "vae": null,                      for latents: {"id", "revision", "subfolder", "config": the latent normalisation}
     "card": {"model_name": "run", "training_steps": 3, ...},        the card's training facts (`ModelCardInfo` fields)
     "sample_grid": "samples/step_0000003.png"}                      relative to the run folder

`weights` says where the checkpoint keeps the inference weights: the nested `keys` of a torch-saved file that lead
to a state dict (the EMA's averaged model), or the names with a `prefix` in a safetensors file (the live model,
without an EMA). Reading them needs torch and safetensors only.

Why its own file rather than a key of trainer_state.json: trainer_state.json is what a resume reads and, written last,
marks a checkpoint complete; the record is read only by an export. It is written before trainer_state.json, so every
complete checkpoint has it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..run_folder import CONFIG_NAME, load_trainer_state
from .export import export_pipeline, find_export_source
from .model_card import ModelCardInfo

logger = logging.getLogger(__name__)

PIPELINE_RECORD_NAME = "pipeline_record.json"
# Incremented when the record changes in a way that an older reader would misread.
RECORD_FORMAT = 1


@dataclasses.dataclass
class PipelineRecord:
    """What a checkpoint's pipeline needs besides the weights (see the module doc for an example).

    Args:
        model: the denoiser's config.json as diffusers writes it; ``_class_name`` names its class.
        slot: the pipeline component it fills (the model kind's `pipeline_slot` in `diffusers_speedup.models`).
        weights: where the checkpoint keeps the inference weights: ``{"file", "keys"}`` or ``{"file", "prefix"}``.
        class_names: the class names by class id (the pipeline's ``id2label``).
        sample_shape: channels, height and width of what the model generates (latents for a latent model).
        scheduler: the sampling scheduler's config as diffusers writes it; ``_class_name`` names its class.
        vae: for a latent model, where its VAE comes from (``id``, ``revision``, ``subfolder``) and the training
            normalisation registered into its config (``config``); None for a pixel model.
        card: the model card's training facts, `ModelCardInfo` fields.
        sample_grid: the run's sample grid of this step, relative to the run folder; it may be written after the
            checkpoint (the last grid of a run is), or never.
    """

    model: dict[str, Any]
    slot: str
    weights: dict[str, Any]
    class_names: list[str]
    sample_shape: list[int]
    scheduler: dict[str, Any]
    vae: dict[str, Any] | None
    card: dict[str, Any]
    sample_grid: str | None = None

    def save(self, checkpoint_dir: str | os.PathLike) -> Path:
        path = Path(checkpoint_dir) / PIPELINE_RECORD_NAME
        record = {"format": RECORD_FORMAT, **dataclasses.asdict(self)}
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike) -> PipelineRecord:
        path = Path(checkpoint_dir) / PIPELINE_RECORD_NAME
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a JSON file ({error}).") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}: a pipeline record is a JSON object, not {type(record).__name__}.")
        if record.get("format") != RECORD_FORMAT:
            raise ValueError(
                f"{path}: format {record.get('format')!r}, but this version of diffusers-speedup reads format "
                f"{RECORD_FORMAT}."
            )
        fields = {field.name: field for field in dataclasses.fields(cls)}
        required = [name for name, field in fields.items() if field.default is dataclasses.MISSING]
        missing = [name for name in required if name not in record]
        unknown = sorted(set(record) - set(fields) - {"format"})
        if missing or unknown:
            raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}.")
        return cls(**{name: record[name] for name in fields if name in record})

    def card_info(self) -> ModelCardInfo:
        facts = dict(self.card)
        if facts.get("guidance_interval") is not None:  # a tuple, as the card writes it; JSON has only lists
            facts["guidance_interval"] = tuple(facts["guidance_interval"])
        return ModelCardInfo.from_value(facts)


def _class_named(name: str) -> type:
    """A model or scheduler class a record names: this package's own (as its exported folders name them), else
    diffusers'."""
    import diffusers

    from .. import models, schedulers

    for module in (models, schedulers, diffusers):
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return cls
    raise ValueError(
        f"{PIPELINE_RECORD_NAME}: no model or scheduler class named {name!r} in diffusers_speedup or diffusers."
    )


def build_pipeline(record: PipelineRecord, model: torch.nn.Module, vae=None):
    """The pipeline of `record` around `model` (the network to sample with) and `vae` (None for a pixel model)."""
    from ..pipelines.pipeline_class_conditional import ClassConditionalPipeline

    scheduler = _class_named(record.scheduler["_class_name"]).from_config(record.scheduler)
    return ClassConditionalPipeline(
        scheduler=scheduler,
        vae=vae,
        id2label=dict(enumerate(record.class_names)),
        **{record.slot: model},
    )


def export_recorded_pipeline(
    record: PipelineRecord,
    model: torch.nn.Module,
    vae,
    output_dir: str | os.PathLike,
    *,
    training_config=None,
    sample_grid=None,
) -> Path:
    """Export the pipeline of `record` (`build_pipeline`) with the card its facts make: the one export path of the
    trainer and of `export_checkpoint`. The other arguments are `export_pipeline`'s."""
    return export_pipeline(
        build_pipeline(record, model, vae),
        output_dir,
        training_config=training_config,
        sample_grid=sample_grid,
        card_info=record.card_info(),
    )


def load_recorded_vae(vae_record: dict[str, Any]):
    """The VAE a record names, with the training latent normalisation in its config, in eval mode."""
    from .. import data

    vae, _ = data.load_vae(vae_record["id"], revision=vae_record.get("revision"), subfolder=vae_record.get("subfolder"))
    vae.register_to_config(**vae_record["config"])
    return vae.eval()


def load_recorded_model(record: PipelineRecord, checkpoint_dir: str | os.PathLike) -> torch.nn.Module:
    """The denoiser of `record`, built from its config, with the inference weights of `checkpoint_dir`."""
    cls = _class_named(record.model["_class_name"])
    model = cls.from_config(record.model)
    source = Path(checkpoint_dir) / record.weights["file"]
    try:
        model.load_state_dict(_read_weights(source, record.weights))
    except RuntimeError as error:  # torch lists the missing and unexpected names
        raise ValueError(
            f"{source}: the weights {PIPELINE_RECORD_NAME} names do not fit {cls.__name__}: {error}"
        ) from error
    return model.eval()


def _read_weights(source: Path, location: dict[str, Any]) -> dict[str, torch.Tensor]:
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found; the checkpoint's {PIPELINE_RECORD_NAME} names it as the weights.")
    if "prefix" in location:
        from safetensors.torch import load_file

        prefix = location["prefix"]
        return {name[len(prefix) :]: value for name, value in load_file(str(source)).items() if name.startswith(prefix)}
    # mmap: only the tensors on the way are read, not the whole file (an EMA with several profiles, say).
    state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    for key in location["keys"]:
        try:
            state = state[key]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(f"{source}: no entry {key!r} on the way {location['keys']} to the weights.") from error
    return state


def export_checkpoint(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Export the inference weights of a checkpoint as the trainer exports them at the end of a run: a pipeline
    folder with its card (the facts of that step), the run's sample grid of that step when the run folder has it, and
    the checkpoint's config as training_config.yaml.

    Reads only the checkpoint (its record, weights and config), the VAE the record names, and the sample grid; nothing
    in the run folder changes.

    Raises:
        FileNotFoundError: for a checkpoint without a record (written by an earlier version), saying how to export it.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / PIPELINE_RECORD_NAME).is_file():
        step = load_trainer_state(checkpoint_dir)["step"]
        raise FileNotFoundError(
            f"{checkpoint_dir} has no {PIPELINE_RECORD_NAME}: it was written by an earlier version of "
            "diffusers-speedup, which exported a checkpoint by rebuilding its whole run, data included. Resume it for "
            f"no further steps with this version, which saves it again with the record and exports it: "
            f"`diffusers-speedup train --config {checkpoint_dir / CONFIG_NAME} train.resume={checkpoint_dir} "
            f"train.max_steps={step} train.output_dir=NEW_FOLDER` (it reads the run's data once more); the export is "
            "then NEW_FOLDER/pipeline, and NEW_FOLDER's checkpoint exports without the data."
        )
    record = PipelineRecord.load(checkpoint_dir)
    model = load_recorded_model(record, checkpoint_dir)
    vae = load_recorded_vae(record.vae) if record.vae is not None else None
    config_file = checkpoint_dir / CONFIG_NAME
    training_config = None
    if config_file.is_file():
        import yaml

        training_config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    grid = checkpoint_dir.parent / record.sample_grid if record.sample_grid is not None else None
    grid = grid if grid is not None and grid.is_file() else None
    return export_recorded_pipeline(record, model, vae, output_dir, training_config=training_config, sample_grid=grid)


def resolve_export_input(path: str | os.PathLike, staging_dir: str | os.PathLike) -> Path:
    """The pipeline folder to export for `path` (see `find_export_source`). A checkpoint without a saved pipeline
    is exported first, from its pipeline record and weights (`export_checkpoint`), into `staging_dir` (card facts
    included), and that folder is returned."""
    kind, folder = find_export_source(path)
    if kind == "pipeline":
        return folder
    logger.info("%s holds no pipeline; exporting its weights as the trainer does", folder)
    return export_checkpoint(folder, staging_dir)
