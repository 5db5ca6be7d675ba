"""The parts of a training run, built from a recipe: the noise schedule and the objective.

One function per part, so that the trainer, the recipe checks and the benchmarks build them the same way.
"""

from __future__ import annotations

from ..models import model_kind
from .config import Config, ScheduleConfig, config_to_dict


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
