"""The recipe schema: typed dataclasses, one per section, that every training recipe is checked against.

Every field has a type and a default; OmegaConf checks the types and the choices (``Literal`` fields) whenever a
recipe or an override is merged. Loading a recipe is `training.recipes`; what the types alone cannot check (ranges,
rules between fields, the machine) is `training.validation`; building the run's parts from a recipe is
`training.parts`. The resolved config is saved with every checkpoint and export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..models import DEFAULT_MODEL_KIND, MODEL_KINDS
from ..objectives import PREDICTION_TYPES
from ..objectives.flow import FLOW_PATHS
from ..objectives.objective import LOSS_REDUCTIONS
from ..objectives.repa import PROJECTORS

# The choices of the recipe fields. OmegaConf checks a value against its field's Literal whenever a recipe or an
# override is merged, and `validate_config` does so for a Config built in Python.
ModelKindName = Literal[tuple(MODEL_KINDS)]
DataKind = Literal["builtin", "image_folder", "hf_dataset", "latents"]
LatentNorm = Literal["vae", "per_channel"]
ScheduleKind = Literal["ddpm", "edm", "flow"]
FlowPathName = Literal[FLOW_PATHS]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal[(*PREDICTION_TYPES, "velocity")]  # velocity: a flow path's α̇·x0 + σ̇·ε
LossReduction = Literal[LOSS_REDUCTIONS]
SamplingScheduler = Literal[
    "ddim", "ddpm", "dpm_solver", "edm_euler", "edm_heun", "flow_euler", "flow_heun", "flow_sde"
]
EMAKind = Literal["none", "constant", "power"]
OptimizerName = Literal["adamw", "adam"]
# The schedules of `get_lr_scheduler` that need no options beyond the warm-up and the training length (its
# "piecewise_constant" needs step rules, which a recipe does not carry).
LRSchedule = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt"
]
MixedPrecision = Literal["fp32", "bf16", "fp16"]
AttentionBackend = Literal["sdpa", "xformers"]
Projector = Literal[PROJECTORS]
MIXED_PRECISION = get_args(MixedPrecision)
# accelerate's experiment trackers (accelerate.utils.LoggerType); train.report_to takes one, several joined by
# commas, "all" (every one installed) or "none". The Python module each needs has the same name.
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the key."""


@dataclass
class ModelConfig:
    kind: ModelKindName = DEFAULT_MODEL_KIND
    preset: str | None = None  # e.g. uvit-s, edm2-xs, dit-xl-2; None builds from params alone
    params: dict[str, Any] = field(default_factory=dict)  # constructor arguments, overriding the preset
    pretrained: str | None = None  # a saved model folder to start from instead


@dataclass
class DataConfig:
    kind: DataKind = "builtin"
    name: str = "digits"  # the built-in dataset
    path: str | None = None  # image folder, 🤗 dataset name or folder, or cached-latents folder
    # Pixels: the side images are cropped to (None: 32). Cached latents: the cache's own, filled in from it when
    # None; another value is refused. The saved config holds the resolution trained at.
    resolution: int | None = None
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
    kind: ScheduleKind = "ddpm"  # ddpm: discrete, DDPMScheduler; edm: continuous σ; flow: continuous t, t = 1 noise
    path: FlowPathName = "linear"  # flow only: SiT's linear (α = 1 − t, σ = t) or gvp (α = cos(πt/2), σ = sin(πt/2))
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
    # None: the family's own target (`family_prediction_type`), filled in when the recipe is loaded.
    prediction_type: PredictionType | None = None
    sampler: dict[str, Any] = field(default_factory=lambda: {"kind": "default"})
    weighting: dict[str, Any] = field(default_factory=lambda: {"kind": "constant"})
    learned_uncertainty: bool = False
    learned_variance: bool = False  # DiT's learn_sigma: 2C outputs, variance trained with the VB term
    label_dropout: float = 0.1
    loss_reduction: LossReduction = "mean"  # each sample's loss averaged or summed (EDM2) over C·H·W
    cosine_loss_weight: float = 0.0  # flow + velocity: LightningDiT's velocity-direction loss (1 in its recipe)


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
    # Flow schedules only: FlowScheduler's time-grid warp t' = s·t / (1 + (s − 1)·t), SD3's shift (1: none);
    # LightningDiT's timestep_shift c is 1 / c (its released sampling: 1 / 0.3).
    shift: float = 1.0
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
    allow_data_change: bool = False  # resume on data that changed since the checkpoint (warned; no longer exact)
    log_every: int = 50
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    export_every_checkpoint: bool = False
    max_consecutive_nonfinite: int = 10  # stop after this many skipped steps in a row (checked at each log)
    report_to: str = "tensorboard"  # tensorboard | wandb | ... | "tensorboard,wandb" | all | none
    tracker_project_name: str = "diffusers-speedup"  # the trackers' project (W&B project, TensorBoard run folder)
    cpu: bool | None = None  # None: the launcher's choice (`accelerate launch --cpu`); a value overrides it


@dataclass
class RepaConfig:
    """Representation alignment (REPA; `objectives.repa`): off unless ``enabled``."""

    enabled: bool = False
    encoder: str = "facebook/dinov2-base"  # a transformers DINOv2 (with registers or not): Hub id or folder
    depth: int = 8  # the block whose output is aligned, from 1 (REPA: 8 for L and XL, 4 for B)
    weight: float = 0.5  # λ (REPA's --proj-coeff)
    projector: Projector = "mlp"  # mlp: REPA's three Linear layers; conv: iREPA's Conv2d over the token grid
    projector_dim: int = 2048  # the MLP's hidden width
    conv_kernel_size: int = 1  # the conv projector's kernel (iREPA's trainer default; its README shows 3)
    zscore_alpha: float | None = None  # iREPA's spatial z-score of the encoder tokens with this α (0.6); null: off
    stop_after_step: int | None = None  # HASTE: no alignment after this many optimizer steps; null: throughout
    # The side in px the clean images are resized to for the encoder; null: REPA's 224·R/256 (a R/16 grid with
    # DINOv2's 14 px patches). Set it to the aligned block's grid side × the encoder's patch size for another grid.
    encoder_resolution: int | None = None


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
    repa: RepaConfig = field(default_factory=RepaConfig)


def with_family_defaults(config: Config) -> Config:
    """`config` with the fields whose default depends on the objective family filled in, so the saved config says
    what was trained: the target is the flow family's velocity, a σ-conditioned network's denoised sample (EDM2), and
    ε otherwise (DDPM's and diffusers' default)."""
    objective = config.objective
    if objective.prediction_type is None:
        if objective.schedule.kind == "flow":
            objective.prediction_type = "velocity"
        elif config.model.kind in MODEL_KINDS and MODEL_KINDS[config.model.kind].conditioning == "sigma":
            objective.prediction_type = "sample"
        else:
            objective.prediction_type = "epsilon"
    return config


def _omegaconf_message(error: OmegaConfBaseException) -> str:
    # OmegaConf appends "full_key: ..., object_type=..." lines; the first line plus the key is what a user needs.
    key = getattr(error, "full_key", None)
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{key}: {first_line}" if key else first_line


def config_to_dict(config: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def config_to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def report_to_trackers(report_to: str) -> list[str]:
    """train.report_to as the list of tracker names that accelerate's ``log_with`` takes ("all" stays "all")."""
    return [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none")]
