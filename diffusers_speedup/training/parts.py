"""The parts of a training run, built from a recipe: the model (fitted to the data), the noise schedule, the
objective, the auxiliary losses (REPA), the EMA, the optimizer, the learning-rate schedule and the sampling scheduler.

One function per part, so that the trainer, the recipe checks and the benchmarks build them the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import model_kind
from .config import Config, ConfigError, ScheduleConfig, config_to_dict
from .ema import ConstantEMA, PowerFunctionEMA
from .lr_schedules import get_lr_scheduler
from .training_data import TrainingData


def build_noise_scheduler(schedule: ScheduleConfig):
    """The training schedule: a diffusers DDPMScheduler (discrete) or EDMEulerScheduler (σ), or a flow path
    (`objectives.flow.FlowPath`, continuous t)."""
    from diffusers import DDPMScheduler, EDMEulerScheduler

    from ..objectives.flow import FlowPath

    if schedule.kind == "flow":
        return FlowPath(schedule.path)
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


def build_model(config: Config, data: TrainingData) -> nn.Module:
    """The recipe's model, with sample size, channels and classes filled in from the data unless given."""
    kind = model_kind(config.model.kind)
    if config.model.pretrained:
        return kind.model_class.from_pretrained(config.model.pretrained)
    fitted = kind.fitted_params(data.sample_shape, data.num_classes, config.objective.learned_variance)
    params = {**fitted, **config.model.params}
    if config.model.preset is None:
        return kind.model_class(**params)
    return kind.model_class.from_preset(config.model.preset, **params)


def build_auxiliary_losses(config: Config, model: nn.Module, data: TrainingData) -> list:
    """The recipe's auxiliary losses on ``model``: REPA (`objectives.repa.RepresentationAlignment`) on block
    ``repa.depth`` when ``repa.enabled``, with its encoder loaded (frozen, resampled to the data's resolution), or
    none when the data brings the encoder's features precomputed. Check the recipe first (`check_repa_fits`)."""
    from ..objectives.repa import FrozenEncoder, RepresentationAlignment

    repa = config.repa
    if not repa.enabled:
        return []
    features = data.encoder_features
    if features is None:
        try:
            encoder = FrozenEncoder.from_pretrained(
                repa.encoder, config.data.resolution, input_size=repa.encoder_resolution
            )
            encoder_dim = None
        except (OSError, ValueError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(f"repa.encoder: {first_line}") from None
    else:
        encoder, encoder_dim = None, int(features["dim"])
    alignment = RepresentationAlignment.attach(
        model,
        repa.depth,
        encoder=encoder,
        encoder_dim=encoder_dim,
        weight=repa.weight,
        projector=repa.projector,
        projector_dim=repa.projector_dim,
        conv_kernel_size=repa.conv_kernel_size,
        zscore_alpha=repa.zscore_alpha,
        stop_after_step=repa.stop_after_step,
    )
    return [alignment]


def build_ema(config: Config, model: nn.Module, snapshot_dir: str | None) -> ConstantEMA | PowerFunctionEMA | None:
    """The recipe's EMA of ``model``, or None. ``snapshot_dir``: where the power-function EMA writes its snapshots
    (None on all but the main process, which keep the same averages without writing)."""
    ema = config.ema
    if ema.kind == "constant":
        return ConstantEMA(model, decay=ema.decay, start_step=ema.start_step)
    if ema.kind == "power":
        return PowerFunctionEMA(
            model, sigma_rels=ema.sigma_rels, snapshot_dir=snapshot_dir, snapshot_every=ema.snapshot_every or None
        )
    return None


def build_optimizer(config: Config, parameters, device: torch.device) -> torch.optim.Optimizer:
    optim = config.optim
    cls = torch.optim.AdamW if optim.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    if device.type in ("cuda", "cpu"):
        # One kernel for the whole update instead of several per tensor, and it can skip a non-finite step on the
        # device (see _step_unless).
        kwargs["fused"] = True
    return cls(parameters, **kwargs)


def build_lr_scheduler(config: Config, optimizer: torch.optim.Optimizer):
    """The recipe's learning-rate schedule, stepped once per optimizer step."""
    optim = config.optim
    batch_dependent = {}
    if optim.lr_schedule == "inverse_sqrt":  # EDM2's: its warm-up is counted in images, so it needs the batch
        batch_dependent = {
            "ref_batches": optim.ref_batches,
            "rampup_images": optim.rampup_images,
            "batch_size": config.train.batch_size,
        }
    return get_lr_scheduler(
        optim.lr_schedule,
        optimizer,
        warmup_steps=optim.warmup_steps,
        total_steps=config.train.max_steps,
        **batch_dependent,
    )


def build_sampling_scheduler(config: Config, noise_scheduler):
    """The scheduler that sample grids and the exported pipeline use."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EDMEulerScheduler

    from ..schedulers.scheduling_edm_heun import EDMHeunScheduler

    schedule, prediction_type = config.objective.schedule, config.objective.prediction_type
    default = {"edm": "edm_heun", "flow": "flow_euler"}.get(schedule.kind, "ddim")
    name = config.sampling.scheduler or default
    if schedule.kind == "flow":
        from ..schedulers.scheduling_flow import FlowScheduler

        # flow_euler / flow_heun: REPA's ODE sampler; flow_sde: the Euler–Maruyama sampler of SiT and REPA.
        sampler = {"flow_euler": "euler", "flow_heun": "heun", "flow_sde": "euler_maruyama"}[name]
        return FlowScheduler(
            sampler=sampler, path=schedule.path, prediction_type=prediction_type, shift=config.sampling.shift
        )
    if schedule.kind == "edm":
        cls = {"edm_heun": EDMHeunScheduler, "edm_euler": EDMEulerScheduler}[name]
        kwargs = {
            "sigma_min": schedule.sigma_min,
            "sigma_max": schedule.sigma_max,
            "sigma_data": schedule.sigma_data,
            "prediction_type": prediction_type,
        }
        return cls(**kwargs)
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm_solver": DPMSolverMultistepScheduler}[name]
    extra = {"timestep_spacing": "trailing"} if schedule.rescale_betas_zero_snr else {}
    if name == "ddpm":  # DDPM samples with a learned variance (DiT's sampler); the others use the mean alone
        extra["variance_type"] = "learned_range" if config.objective.learned_variance else "fixed_small"
        if config.objective.learned_variance:  # DiT's sample_ddp.py: x0 unclipped, steps evenly spread over 0..T-1
            extra["clip_sample"] = False
            extra.setdefault("timestep_spacing", "linspace")
    return cls.from_config(noise_scheduler.config, prediction_type=prediction_type, **extra)
