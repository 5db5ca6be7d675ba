"""Typed training recipes: YAML files validated against dataclasses, with ``key.sub=value`` overrides.

Every field has a type and a default; unknown keys, wrong types and contradictory options stop the run before any
work, with one message naming the key. The resolved config is saved with every checkpoint and export.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..models import MODEL_KINDS, model_kind
from ..objectives import PREDICTION_TYPES
from ..objectives.objective import LOSS_REDUCTIONS
from ..utils import meant_as_local_path
from .checkpoints import CONFIG_NAME as CONFIG_FILE_NAME
from .checkpoints import TRAINER_STATE_NAME, list_checkpoints

# The choices of the recipe fields. OmegaConf checks a value against its field's Literal whenever a recipe or an
# override is merged, and `validate_config` does so for a Config built in Python.
ModelKindName = Literal[tuple(MODEL_KINDS)]
DataKind = Literal["builtin", "image_folder", "hf_dataset", "latents"]
LatentNorm = Literal["vae", "per_channel"]
ScheduleKind = Literal["ddpm", "edm"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal[PREDICTION_TYPES]
LossReduction = Literal[LOSS_REDUCTIONS]
SamplingScheduler = Literal["ddim", "ddpm", "dpm_solver", "edm_euler", "edm_heun"]
EMAKind = Literal["none", "constant", "power"]
OptimizerName = Literal["adamw", "adam"]
# The schedules of `get_lr_scheduler` that need no options beyond the warm-up and the training length (its
# "piecewise_constant" needs step rules, which a recipe does not carry).
LRSchedule = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt"
]
MixedPrecision = Literal["fp32", "bf16", "fp16"]
AttentionBackend = Literal["sdpa", "xformers"]
MIXED_PRECISION = get_args(MixedPrecision)
# accelerate's experiment trackers (accelerate.utils.LoggerType); train.report_to takes one, several joined by
# commas, "all" (every one installed) or "none". The Python module each needs has the same name.
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the key."""


@dataclass
class ModelConfig:
    kind: ModelKindName = "uvit"
    preset: str | None = None  # e.g. uvit-s, edm2-xs, dit-xl-2; None builds from params alone
    params: dict[str, Any] = field(default_factory=dict)  # constructor arguments, overriding the preset
    pretrained: str | None = None  # a saved model folder to start from instead


@dataclass
class DataConfig:
    kind: DataKind = "builtin"
    name: str = "digits"  # the built-in dataset
    path: str | None = None  # image folder, 🤗 dataset name or folder, or cached-latents folder
    resolution: int = 32
    channels: Literal[1, 3] = 3  # 1 keeps the built-in digits grayscale
    random_flip: bool = False
    in_memory: bool = False  # hold the whole dataset on the training device (no reads during training)
    image_column: str = "image"
    label_column: str = "label"
    # Cached latents only. "vae": the VAE config's own normalisation (z * 0.18215 for SD VAEs). "per_channel": each
    # channel to mean 0 and std latent_target_std (EDM2), from latents_mean/latents_std when given, else measured
    # on the cache.
    latent_norm: LatentNorm = "vae"
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None
    latent_target_std: float = 0.5


@dataclass
class ScheduleConfig:
    kind: ScheduleKind = "ddpm"  # ddpm: discrete, DDPMScheduler; edm: continuous σ
    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    rescale_betas_zero_snr: bool = False
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0


@dataclass
class ObjectiveConfig:
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction_type: PredictionType = "epsilon"
    sampler: dict[str, Any] = field(default_factory=lambda: {"kind": "default"})
    weighting: dict[str, Any] = field(default_factory=lambda: {"kind": "constant"})
    learned_uncertainty: bool = False
    learned_variance: bool = False  # DiT's learn_sigma: 2C outputs, variance trained with the VB term
    label_dropout: float = 0.1
    loss_reduction: LossReduction = "mean"  # each sample's loss averaged or summed (EDM2) over C·H·W


@dataclass
class OptimConfig:
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    # inverse_sqrt (EDM2): lr / sqrt(max(step / ref_batches, 1)), ramped up over the first rampup_images images
    ref_batches: float = 70000.0
    rampup_images: float = 10_000_000.0
    max_grad_norm: float | None = 1.0


@dataclass
class EMAConfig:
    kind: EMAKind = "constant"
    decay: float = 0.9999
    start_step: int = 0
    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    snapshot_every: int = 0  # power EMA: steps between snapshots for post-hoc reconstruction (0 = at checkpoints)


@dataclass
class SamplingConfig:
    scheduler: SamplingScheduler | None = None  # None picks by the training schedule
    num_inference_steps: int = 50
    guidance_scale: float = 1.0
    guidance_interval: list[float] | None = None  # [sigma_lo, sigma_hi]
    images_per_class: int = 4
    max_classes: int = 10


@dataclass
class HubConfig:
    push_to_hub: bool = False
    hub_model_id: str | None = None
    private: bool = False
    push_checkpoints: bool = False  # also push the export of every checkpoint (in the background)
    max_retries: int = 5
    retry_delay: float = 10.0  # seconds before the first retry, doubled after each failure


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    batch_size: int = 64  # global batch (all processes, all accumulation steps)
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    # Autocast precision (weights stay fp32). None: the launcher's choice (`accelerate launch
    # --mixed_precision`, `accelerate config`), fp32 without one; a value here overrides the launcher, with a warning.
    mixed_precision: MixedPrecision | None = None
    allow_tf32: bool = True
    compile: bool = False
    attention: AttentionBackend = "sdpa"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    log_every: int = 50
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    export_every_checkpoint: bool = False
    max_consecutive_nonfinite: int = 10  # stop after this many skipped steps in a row (checked at each log)
    report_to: str = "tensorboard"  # tensorboard | wandb | ... | "tensorboard,wandb" | all | none
    tracker_project_name: str = "diffusers-speedup"  # the trackers' project (W&B project, TensorBoard run folder)
    cpu: bool | None = None  # None: the launcher's choice (`accelerate launch --cpu`); a value overrides it


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _omegaconf_message(error: OmegaConfBaseException) -> str:
    # OmegaConf appends "full_key: ..., object_type=..." lines; the first line plus the key is what a user needs.
    key = getattr(error, "full_key", None)
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{key}: {first_line}" if key else first_line


def recipes_dir() -> Path:
    """The folder of the shipped recipes: ``diffusers_speedup/configs`` in an installed wheel, the checkout's
    ``configs/`` when the package is imported from a clone (including ``pip install -e``)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def list_recipes() -> list[str]:
    """Names of the shipped recipes, e.g. ``quickstart``, ``imagenet256/dit_xl2_speed``."""
    root = recipes_dir()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def resolve_recipe(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """The recipe file that `name_or_path` means.

    An existing file wins (relative to `relative_to` when given, as for ``base:``); otherwise it is the name of a
    shipped recipe, with or without ``.yaml`` and with or without a leading ``configs/``, so that
    ``imagenet256/dit_xl2_speed`` and ``configs/imagenet256/dit_xl2_speed.yaml`` work with or without a clone.
    """
    path = Path(name_or_path)
    candidate = relative_to / path if relative_to is not None else path
    if candidate.is_file():
        return candidate
    name = path.as_posix().removesuffix(".yaml")
    name = name.removeprefix("configs/")
    shipped = recipes_dir() / f"{name}.yaml"
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"{candidate} does not exist and is not the name of a shipped recipe")


def _read_recipe_file(path: Path) -> DictConfig:
    """One recipe file as a mapping; anything else (not text, not YAML, a list, a scalar) is one ConfigError."""
    import yaml

    try:
        parsed = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not a YAML text file (it is not UTF-8 text).") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"Config file {path} is not valid YAML{line}: {problem}.") from None
    if parsed is None:
        return OmegaConf.create({})
    if not isinstance(parsed, dict):
        kind = {list: "list", str: "string"}.get(type(parsed), type(parsed).__name__)
        raise ConfigError(
            f"Config file {path} holds a YAML {kind}, not a mapping of sections (model:, data:, train:, ...)."
        )
    try:
        recipe = OmegaConf.load(path)  # OmegaConf's own YAML reading (its float syntax, duplicate-key check)
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise ConfigError(f"Config file {path}: {' '.join(str(error).split())}") from None
    return recipe


def _load_recipe(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """A recipe file merged over the recipe its ``base:`` key names (a file relative to this one, or the name of a
    shipped recipe), recursively."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'base' chain loops back to itself ({' -> '.join(map(str, chain + (path,)))}).")
    recipe = _read_recipe_file(path)
    base = recipe.pop("base", None) if isinstance(recipe, DictConfig) else None
    if base is None:
        return recipe
    try:
        base_path = resolve_recipe(str(base), relative_to=path.parent)
    except FileNotFoundError as error:
        raise ConfigError(f"Config file {error} (named as base by {path}).") from None
    return OmegaConf.merge(_load_recipe(base_path, chain + (path,)), recipe)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a recipe, apply ``key.sub=value`` overrides, validate, and return the typed config.

    `path` is a YAML file or the name of a shipped recipe (``quickstart``, ``imagenet256/dit_xl2_speed``; see
    `list_recipes`). A recipe may start with ``base: other.yaml`` (a file relative to its own folder, or a shipped
    recipe's name) to take that recipe and change only what it lists.

    Raises:
        ConfigError: naming the file and the key for unknown keys, wrong types and contradictory options.
    """
    schema = OmegaConf.structured(Config)
    source = "defaults"
    try:
        if path is not None:
            source = str(path)
            try:
                recipe_path = resolve_recipe(path)
            except FileNotFoundError as error:
                raise ConfigError(f"Config file {error}; shipped recipes: {', '.join(list_recipes())}.") from None
            schema = OmegaConf.merge(schema, _load_recipe(recipe_path))
        for override in overrides:
            source = f"override {override!r}"
            if "=" not in override:
                raise ConfigError(f"Override {override!r} is not of the form key.sub=value.")
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist([override]))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_omegaconf_message(error)}") from None
    config: Config = OmegaConf.to_object(schema)
    validate_config(config)
    return config


def config_to_dict(config: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def config_to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


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
    _check_ranges(config)
    _check_combinations(config)


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
    if sampling.guidance_interval is not None:
        lo_hi = list(sampling.guidance_interval)
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
            raise ConfigError(
                f"sampling.guidance_interval: needs [sigma_lo, sigma_hi] with 0 <= lo <= hi, got {lo_hi}."
            )

    _positive("hub.max_retries", hub.max_retries, allow_zero=True)
    _positive("hub.retry_delay", hub.retry_delay, allow_zero=True)

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

    scheduler = config.sampling.scheduler
    if scheduler is not None and scheduler.startswith("edm") != (schedule.kind == "edm"):
        raise ConfigError(f"sampling.scheduler: {scheduler!r} does not fit the {schedule.kind!r} training schedule.")
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


def report_to_trackers(report_to: str) -> list[str]:
    """train.report_to as the list of tracker names that accelerate's ``log_with`` takes ("all" stays "all")."""
    return [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none")]


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
    if train.resume is None:
        # A fresh run would write its own checkpoint-<step> folders over these.
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

    Refused: anything under ``model``, ``objective`` and ``data`` (but ``data.in_memory``), the global batch and its
    split into accumulation steps, the seed (which fixes the data order), the optimizer, and the EMA kind and
    profiles (whose state the checkpoint holds). Allowed: everything else — ``train.max_steps``, the log, sample
    and checkpoint cadences, the output and hub settings, the learning-rate values, mixed precision, compilation.
    """
    fixed_sections = ("model", "objective", "data")
    # Where the data is read from changes nothing of what is read.
    free_keys = ("data.in_memory",)
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
    for key in sorted(set(old) | set(new)):
        if key in free_keys or not (key.split(".")[0] in fixed_sections or key in fixed_keys):
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


def build_noise_scheduler(schedule: ScheduleConfig):
    """The training schedule as a diffusers scheduler: DDPMScheduler (discrete) or EDMEulerScheduler (σ)."""
    from diffusers import DDPMScheduler, EDMEulerScheduler

    if schedule.kind == "ddpm":
        return DDPMScheduler(
            num_train_timesteps=schedule.num_train_timesteps,
            beta_schedule=schedule.beta_schedule,
            beta_start=schedule.beta_start,
            beta_end=schedule.beta_end,
            rescale_betas_zero_snr=schedule.rescale_betas_zero_snr,
        )
    return EDMEulerScheduler(sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max, sigma_data=schedule.sigma_data)


def build_objective(config: Config, noise_scheduler, num_classes: int):
    """The recipe's training objective for ``num_classes`` classes, calling the model as its kind is called."""
    from ..objectives import DiffusionObjective

    objective = config_to_dict(config)["objective"]
    objective.pop("schedule")
    kind = model_kind(config.model.kind)
    return DiffusionObjective.from_config(
        objective,
        noise_scheduler,
        num_classes=num_classes,
        conditioning=kind.conditioning,
        uncertainty_from_model=kind.logvar_output,
    )


def config_from_mapping(mapping: dict | DictConfig) -> Config:
    """A typed, validated config from a plain mapping (e.g. the ``config.yaml`` saved with a checkpoint)."""
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), mapping))
    except OmegaConfBaseException as error:
        raise ConfigError(_omegaconf_message(error)) from None
    validate_config(config)
    return config
