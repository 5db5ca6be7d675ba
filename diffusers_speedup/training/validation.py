"""What the types alone cannot check in a recipe: the values' ranges, the rules between fields (the objective's by
building it), the machine, and whether a checkpoint may be resumed with it. Every message names the key."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import os
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..models import MODEL_KINDS, model_kind
from ..utils import meant_as_local_path
from .checkpoints import CONFIG_NAME as CONFIG_FILE_NAME
from .checkpoints import TRAINER_STATE_NAME, list_checkpoints, load_trainer_state
from .config import TRACKERS, Config, ConfigError, DataConfig, _omegaconf_message, config_to_dict, report_to_trackers
from .parts import build_noise_scheduler, build_objective
from .training_data import data_change, repa_extra_columns


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}.")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def validate_config(config: Config) -> None:
    """Check what the types alone cannot: the values' ranges, then how the fields fit together.

    Raises:
        ConfigError: naming the key, for the first problem found.
    """
    try:
        OmegaConf.structured(config)  # the types and choices, for a Config built or changed in Python
    except OmegaConfBaseException as error:
        raise ConfigError(_omegaconf_message(error)) from None
    _check_finite(dataclasses.asdict(config))
    _check_ranges(config)
    _check_combinations(config)


# The one place where a recipe may hold an infinite number: a guidance interval open at the top, (sigma_lo, inf],
# guides every step above sigma_lo (the pipeline takes it so).
_MAY_BE_INFINITE = ("sampling.guidance_interval[1]",)
# What to write instead, where an infinite value has a meaning that the recipe spells otherwise.
_INSTEAD_OF_INFINITE = {"optim.max_grad_norm": " (null turns clipping off)"}


def _check_finite(value, key: str = "") -> None:
    """Every number in the recipe is finite, model and objective parameters included. An infinite or NaN learning
    rate, β, ε, decay or scale trains nothing: every step is skipped, or the weights become NaN."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{key}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        if value == math.inf and key in _MAY_BE_INFINITE:
            return
        raise ConfigError(f"{key}: must be a finite number, got {value}{_INSTEAD_OF_INFINITE.get(key, '')}.")


def _check_ranges(config: Config) -> None:
    """Each field on its own: ranges and lengths."""
    data, optim, ema, sampling, hub, train = (
        config.data,
        config.optim,
        config.ema,
        config.sampling,
        config.hub,
        config.train,
    )
    if data.resolution is not None:
        _positive("data.resolution", data.resolution)
    if data.latents_std is not None and min(data.latents_std) <= 0:
        raise ConfigError(f"data.latents_std: must be positive, got {list(data.latents_std)}.")
    _positive("data.latent_target_std", data.latent_target_std)

    _positive("optim.lr", optim.lr)
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise ConfigError(f"optim.betas: needs two values in [0, 1), got {list(optim.betas)}.")
    if optim.max_grad_norm is not None:
        _positive("optim.max_grad_norm", optim.max_grad_norm)
    _positive("optim.warmup_steps", optim.warmup_steps, allow_zero=True)
    _positive("optim.eps", optim.eps)
    _positive("optim.weight_decay", optim.weight_decay, allow_zero=True)

    if not 0 < ema.decay < 1:
        raise ConfigError(f"ema.decay: must lie in (0, 1), got {ema.decay}.")
    _positive("ema.start_step", ema.start_step, allow_zero=True)
    _positive("ema.snapshot_every", ema.snapshot_every, allow_zero=True)
    for sigma_rel in ema.sigma_rels:
        if not 0 < sigma_rel < 0.2887:
            raise ConfigError(f"ema.sigma_rels: each must lie in (0, 0.2887), got {sigma_rel}.")

    # Used only after training (sample grids, export): checked now rather than after hours of work.
    _positive("sampling.num_inference_steps", sampling.num_inference_steps)
    _positive("sampling.images_per_class", sampling.images_per_class)
    _positive("sampling.max_classes", sampling.max_classes)
    _positive("sampling.guidance_scale", sampling.guidance_scale, allow_zero=True)
    _positive("sampling.shift", sampling.shift)
    if sampling.guidance_interval is not None:
        lo_hi = list(sampling.guidance_interval)
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
            raise ConfigError(
                f"sampling.guidance_interval: needs [sigma_lo, sigma_hi] with 0 <= lo <= hi, got {lo_hi}."
            )

    _positive("hub.max_retries", hub.max_retries, allow_zero=True)
    _positive("hub.retry_delay", hub.retry_delay, allow_zero=True)

    _check_repa_ranges(config)

    _positive("train.batch_size", train.batch_size)
    _positive("train.gradient_accumulation_steps", train.gradient_accumulation_steps)
    _positive("train.max_steps", train.max_steps)
    _positive("train.checkpoint_every", train.checkpoint_every, allow_zero=True)
    _positive("train.log_every", train.log_every)
    _positive("train.sample_every", train.sample_every, allow_zero=True)
    _positive("train.max_consecutive_nonfinite", train.max_consecutive_nonfinite)
    if train.checkpoints_total_limit is not None and train.checkpoints_total_limit < 1:
        raise ConfigError(
            f"train.checkpoints_total_limit: must be >= 1 (or null to keep every checkpoint), "
            f"got {train.checkpoints_total_limit}."
        )
    if train.report_to not in ("all", "none"):
        for tracker in train.report_to.split(","):
            _choice("train.report_to", tracker.strip(), (*TRACKERS, "all", "none"))
    if not train.tracker_project_name.strip():
        raise ConfigError("train.tracker_project_name: must not be empty.")
    _check_resume(train.resume)


def _check_repa_ranges(config: Config) -> None:
    """The ``repa`` section's values, when it is enabled, and whether the model kind has blocks it can read."""
    repa = config.repa
    if not repa.enabled:
        return
    if not repa.encoder.strip():
        raise ConfigError("repa.encoder: must name a DINOv2 (a Hub id such as facebook/dinov2-base, or a folder).")
    if repa.depth < 1:
        raise ConfigError(f"repa.depth: the aligned block is counted from 1, got {repa.depth}.")
    _positive("repa.weight", repa.weight)
    _positive("repa.projector_dim", repa.projector_dim)
    if repa.conv_kernel_size < 1 or repa.conv_kernel_size % 2 == 0:
        raise ConfigError(
            f"repa.conv_kernel_size: must be odd and positive (the token grid keeps its size), got "
            f"{repa.conv_kernel_size}."
        )
    if repa.zscore_alpha is not None and not 0 <= repa.zscore_alpha <= 1:
        raise ConfigError(f"repa.zscore_alpha: must lie in [0, 1] (iREPA's 0.6), or be null, got {repa.zscore_alpha}.")
    if repa.stop_after_step is not None:
        _positive("repa.stop_after_step", repa.stop_after_step)
    if repa.encoder_resolution is not None:
        _positive("repa.encoder_resolution", repa.encoder_resolution)
    if model_kind(config.model.kind).hidden_states is None:
        raise ConfigError(f"repa.enabled: model.kind {config.model.kind!r} has no block that REPA can read.")


def check_repa_fits(config: Config, model, encoder_features: dict | None = None) -> None:
    """Before any training step: the block ``repa.depth`` exists in the built ``model`` and its token grid is the
    target's (REPA aligns token to token): the encoder's patch grid at its input size (REPA's 224·R/256 px give
    DINOv2 R/16 × R/16 patches; ``repa.encoder_resolution`` another), or the grid of precomputed encoder features
    (a latent cache's ``encoder_features`` metadata).

    Raises:
        ConfigError: naming ``repa.depth``, ``repa.encoder_resolution`` or ``data.resolution`` (the grids of every
            block, to choose from).
    """
    repa = config.repa
    if not repa.enabled:
        return
    where = model_kind(config.model.kind).hidden_states
    try:
        where.block(model, repa.depth)
    except ValueError as error:
        raise ConfigError(f"repa.depth: {error}") from None
    resolution = config.data.resolution
    if encoder_features is not None:  # the cache's features are what they are: their grid is the target's
        tokens = int(encoder_features.get("tokens") or 0)
        wanted, source = math.isqrt(tokens), f"the latent cache's encoder features ({tokens} tokens per image)"
        if wanted * wanted != tokens:
            raise ConfigError(f"data.path: the cache's encoder features have {tokens} tokens, not a square grid.")
    else:
        from ..objectives.repa import encoder_config, encoder_grid, encoder_input_size

        try:
            patch = encoder_config(repa.encoder).patch_size
            size = encoder_input_size(resolution or 0, repa.encoder_resolution)
            wanted = encoder_grid(size, patch)
        except ValueError as error:
            key = "repa.encoder_resolution" if repa.encoder_resolution is not None else "data.resolution"
            raise ConfigError(f"{key}: {error}") from None
        source = f"the encoder, which sees the {resolution} px images at {size} px in {patch} px patches,"
    grid = where.grid(model, repa.depth)
    if grid != wanted:
        fitting = [d for d in range(1, where.count(model) + 1) if where.grid(model, d) == wanted]
        choice = f"blocks {fitting[0]} to {fitting[-1]} have it" if fitting else "no block of this model has it"
        raise ConfigError(
            f"repa.depth: {where.what} {repa.depth} of this {type(model).__name__} outputs a {grid}×{grid} token "
            f"grid, but {source} gives {wanted}×{wanted}; REPA aligns token to token, so the grids must be equal "
            f"({choice}; or set repa.encoder_resolution to {grid} × the encoder's patch size)."
        )


def _check_resume(resume: str | None) -> None:
    """train.resume is "latest", None, or a checkpoint folder (a run folder gets a hint naming its newest one)."""
    if resume in (None, "latest"):
        return
    folder = Path(resume)
    if not folder.is_dir():
        raise ConfigError(f"train.resume: {resume!r} is neither 'latest' nor an existing checkpoint folder.")
    if not (folder / TRAINER_STATE_NAME).is_file():
        found = list_checkpoints(folder)
        hint = (
            f"it is a run folder; give one of its checkpoints (newest: {found[-1]}) or train.resume=latest"
            if found
            else "it holds no complete checkpoint"
        )
        raise ConfigError(f"train.resume: {resume!r} is not a checkpoint folder (no {TRAINER_STATE_NAME}); {hint}.")


def _check_combinations(config: Config) -> None:
    """The fields that depend on others: every cross-field rule of a recipe is here, the objective's by building it."""
    model, data, objective, schedule = config.model, config.data, config.objective, config.objective.schedule

    kind = model_kind(model.kind)
    if model.preset is not None:
        _choice("model.preset", model.preset, sorted(kind.presets))
    accepted = set(inspect.signature(kind.model_class.__init__).parameters) - {"self"}
    for key in model.params:
        if key not in accepted:
            raise ConfigError(
                f"model.params.{key}: not an argument of {kind.model_class.__name__} "
                f"(accepted: {', '.join(sorted(accepted))})."
            )

    if data.kind == "builtin":
        from ..data.builtin import BUILTIN_DATASETS

        _choice("data.name", data.name, BUILTIN_DATASETS)
    elif not data.path:
        raise ConfigError(f"data.path: required for data.kind {data.kind!r}.")
    if data.latent_norm != "vae" and data.kind != "latents":
        raise ConfigError(
            f"data.latent_norm: {data.latent_norm!r} applies to cached latents, not data.kind {data.kind!r}."
        )
    if (data.latents_mean is None) != (data.latents_std is None):
        raise ConfigError("data.latents_mean, data.latents_std: give both (per-channel raw statistics) or neither.")
    if data.latents_mean is not None:
        if data.latent_norm != "per_channel":
            raise ConfigError("data.latents_mean: only used with data.latent_norm: per_channel.")
        if len(data.latents_mean) != len(data.latents_std):
            raise ConfigError(
                f"data.latents_std: {len(data.latents_std)} values for {len(data.latents_mean)} in data.latents_mean."
            )

    name = kind.model_class.__name__
    if objective.learned_variance and not kind.learned_variance:
        learners = " or ".join(repr(k) for k, entry in MODEL_KINDS.items() if entry.learned_variance)
        raise ConfigError(
            f"objective.learned_variance: needs model.kind {learners} (DiT's learned σ); {name} outputs no "
            f"variance (model.kind {model.kind!r})."
        )
    if kind.drops_labels_itself and objective.label_dropout > 0:
        raise ConfigError(f"objective.label_dropout: {name} drops labels itself (class_dropout_prob); set it to 0.")
    _check_objective(config)

    if config.sampling.shift != 1 and schedule.kind != "flow":
        raise ConfigError(
            f"sampling.shift: {config.sampling.shift} warps a flow sampler's time grid (FlowScheduler); the "
            f"{schedule.kind!r} training schedule samples with a {'EDM' if schedule.kind == 'edm' else 'DDPM'} "
            "scheduler, which has none. Leave it at 1 or train with objective.schedule.kind: flow."
        )
    scheduler = config.sampling.scheduler
    if scheduler is not None:
        family = "edm" if scheduler.startswith("edm") else "flow" if scheduler.startswith("flow") else "ddpm"
        if family != schedule.kind:
            raise ConfigError(
                f"sampling.scheduler: {scheduler!r} does not fit the {schedule.kind!r} training schedule."
            )
    if config.hub.push_to_hub and not config.hub.hub_model_id:
        raise ConfigError("hub.hub_model_id: required when hub.push_to_hub is true.")
    train = config.train
    if train.batch_size % train.gradient_accumulation_steps:
        raise ConfigError(
            f"train.batch_size: {train.batch_size} is not divisible by "
            f"train.gradient_accumulation_steps={train.gradient_accumulation_steps}."
        )


def _check_objective(config: Config) -> None:
    """The objective, by building it as the trainer will (its sampler, weighting and every rule between them, the
    schedule, the prediction type and the model's calling convention are checked by the objects themselves)."""
    from ..objectives import LossWeighting, build_sampler

    objective = config.objective
    noise_scheduler = build_noise_scheduler(objective.schedule)
    # The sampler and the weighting first, so that their errors name their keys.
    try:
        build_sampler(dict(objective.sampler), noise_scheduler)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"objective.sampler: {error}") from None
    weighting = dict(objective.weighting)
    kind = weighting.pop("kind", "constant")
    try:
        LossWeighting(kind, objective.prediction_type, **weighting)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"objective.weighting: {error}") from None
    try:
        # The class count comes from the data; any count serves the check.
        build_objective(config, noise_scheduler, num_classes=1)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"objective: {error}") from None


def check_environment(config: Config) -> None:
    """Checks that depend on the machine rather than the recipe (run when training starts, before any work), so
    that a GPU recipe still loads and validates on a CPU-only machine."""
    import torch

    train = config.train
    if train.mixed_precision == "fp16" and (train.cpu or not torch.cuda.is_available()):
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; use 'bf16' or 'fp32' on CPU.")
    if train.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("train.attention: 'xformers' is not installed (pip install diffusers-speedup[xformers]).")
        refused = model_kind(config.model.kind).xformers_refused
        if refused:
            raise ConfigError(f"train.attention: {refused}.")
    for tracker in report_to_trackers(train.report_to):
        if tracker not in ("all", "tensorboard") and importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"train.report_to: {tracker!r} is not installed (pip install {tracker}).")
    _check_data_path(config.data)
    _check_repa_encoder(config)
    refuse_existing_checkpoints(config)


def _check_repa_encoder(config: Config) -> None:
    """A REPA recipe's data carries what the encoder needs (`repa_extra_columns`) and ``repa.encoder`` is a DINOv2
    (only its config is read here; the weights load when the run is built)."""
    if not config.repa.enabled or "encoder_features" in repa_extra_columns(config):
        return
    from ..objectives.repa import encoder_config

    try:
        encoder_config(config.repa.encoder)
    except ValueError as error:
        raise ConfigError(f"repa.encoder: {error}") from None


def refuse_existing_checkpoints(config: Config) -> None:
    """A fresh run (no ``train.resume``) would write its own checkpoint-<step> folders over those already there."""
    train = config.train
    if train.resume is None:
        existing = list_checkpoints(train.output_dir)
        if existing:
            raise ConfigError(
                f"train.output_dir: {train.output_dir} already holds a run's checkpoints (up to {existing[-1].name}); "
                "set train.resume=latest to continue it, or choose another train.output_dir."
            )


def _check_data_path(data: DataConfig) -> None:
    """The data folder exists (a 🤗 dataset may also be a Hub id, unless the Hub is switched off)."""
    if data.kind == "builtin":
        return
    path = Path(data.path).expanduser()
    if data.kind in ("image_folder", "latents"):
        if not path.is_dir():
            what = "an image folder (one sub-folder per class)" if data.kind == "image_folder" else "a latent cache"
            raise ConfigError(f"data.path: {data.path!r} does not exist or is not a folder; expected {what}.")
        if data.kind == "latents" and not (path / "latents_metadata.json").is_file():
            raise ConfigError(
                f"data.path: {data.path!r} is not a complete latent cache (no latents_metadata.json); "
                "make one with train/cache_latents.py, or finish it by running that command again."
            )
        return
    if path.exists():
        return
    if meant_as_local_path(data.path):
        raise ConfigError(f"data.path: {data.path!r} does not exist (and is not a Hub dataset id).")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ConfigError(
            f"data.path: {data.path!r} is not a local folder, and the Hub is switched off (HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE), so it cannot be downloaded."
        )


def resume_config_changes(saved: dict, current: dict) -> list[str]:
    """The changes between a checkpoint's saved config and the config resuming it that would break the model or
    the exactness of the resumed run, as ``key: saved -> current`` lines (empty when the resume is sound).

    Refused: anything under ``model``, ``objective``, ``data`` (but ``data.in_memory``) and ``repa``, the global
    batch and its split into accumulation steps, the seed (which fixes the data order), the optimizer, and the EMA
    kind and profiles (whose state the checkpoint holds). Allowed: everything else — ``train.max_steps``, the log, sample
    and checkpoint cadences, the output and hub settings, the learning-rate values, mixed precision, compilation.
    """
    fixed_sections = ("model", "objective", "data", "repa")
    # Where the data is read from changes nothing of what is read.
    free_keys = ("data.in_memory",)
    if (current.get("data") or {}).get("kind") == "latents":
        # A latent cache fixes its resolution (and data.path is compared); checkpoints written before the cache's
        # value was recorded hold the unused default there.
        free_keys += ("data.resolution",)
    fixed_keys = (
        "train.batch_size",
        "train.gradient_accumulation_steps",
        "train.seed",
        "optim.optimizer",
        "ema.kind",
        "ema.sigma_rels",
    )
    changes = []

    def flatten(mapping, prefix=""):
        flat = {}
        for key, value in (mapping or {}).items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                flat.update(flatten(value, name + "."))
            else:
                flat[name] = value
        return flat

    old, new = flatten(saved), flatten(current)
    # A key added to the schema after the checkpoint was written, left at its default, keeps what that code did.
    defaults = flatten(config_to_dict(Config()))
    for key in sorted(set(old) | set(new)):
        if key in free_keys or not (key.split(".")[0] in fixed_sections or key in fixed_keys):
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def check_resume_config(config: Config, checkpoint_dir: str | Path) -> None:
    """Refuse to resume ``checkpoint_dir`` with a config that changes what it trained (see `resume_config_changes`).

    Raises:
        ConfigError: naming every changed key with the checkpoint's value and the new one.
    """
    import yaml

    saved_path = Path(checkpoint_dir) / CONFIG_FILE_NAME
    if not saved_path.is_file():
        return  # a checkpoint written without the config cannot be compared
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    changes = resume_config_changes(saved, config_to_dict(config))
    if changes:
        raise ConfigError(
            f"train.resume: {checkpoint_dir} was trained with another model, objective, data or batch; resuming it "
            f"would not continue that run ({'; '.join(changes)}). Use the checkpoint's settings (its "
            f"{CONFIG_FILE_NAME}), or start a new run in another train.output_dir."
        )


def check_resume_data(config: Config, checkpoint_dir: str | Path, identity: dict) -> str | None:
    """Refuse to resume ``checkpoint_dir`` on data other than it was trained on (its recorded
    `TrainingData.identity` against ``identity``, the data's now), unless ``train.allow_data_change`` is set.

    Returns a warning to log, or None: the change, when it is allowed; that the data cannot be checked, for a
    checkpoint written before checkpoints recorded their data.

    Raises:
        ConfigError: naming the change (the number of samples before and after, or which part changed).
    """
    saved = load_trainer_state(checkpoint_dir).get("data")
    if saved is None:
        return (
            f"{checkpoint_dir} does not record which data it was trained on (it was written by an earlier version), "
            "so whether the data changed since cannot be checked; resuming as before."
        )
    change = data_change(saved, identity)
    if change is None:
        return None
    if not config.train.allow_data_change:
        raise ConfigError(
            f"train.resume: {checkpoint_dir} was trained on other data than {config.data.path or config.data.name}: "
            f"{change}. It would continue its epoch at its place in different data, which is not the run it "
            "continues. Resume on the data it was trained on, or set train.allow_data_change=true to continue "
            "anyway (no longer an exact continuation)."
        )
    return (
        f"train.allow_data_change=true: {change} since {checkpoint_dir}. Resuming anyway at its place in the epoch; "
        "the run is no longer an exact continuation of the one that wrote it."
    )
