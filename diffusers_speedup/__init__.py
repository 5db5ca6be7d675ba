"""diffusers-speedup: faster, more stable diffusion training on top of diffusers and accelerate."""

# ModelMixin and SchedulerMixin are re-exported so that a model_index.json naming this library resolves its
# base classes (diffusers looks them up in the library module itself); the model, scheduler and pipeline classes
# are exported here for the same reason.
from diffusers import ModelMixin, SchedulerMixin

from .models import DiTModel, EDM2UNetModel, UViTModel
from .objectives import (
    DiffusionObjective,
    LogitNormalTimestepSampler,
    LogNormalSigmaSampler,
    RepresentationAlignment,
    SpeeDTimestepSampler,
    UniformTimestepSampler,
    compute_loss_weights,
)
from .pipelines import ClassConditionalPipeline
from .schedulers import EDMHeunScheduler, FlowScheduler

__version__ = "0.1.0"

__all__ = [
    "ClassConditionalPipeline",
    "DiTModel",
    "DiffusionObjective",
    "EDM2UNetModel",
    "EDMHeunScheduler",
    "FlowScheduler",
    "LogNormalSigmaSampler",
    "LogitNormalTimestepSampler",
    "ModelMixin",
    "RepresentationAlignment",
    "SchedulerMixin",
    "SpeeDTimestepSampler",
    "UViTModel",
    "UniformTimestepSampler",
    "__version__",
    "compute_loss_weights",
]
