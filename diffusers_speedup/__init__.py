"""diffusers-speedup: faster, more stable diffusion training on top of diffusers and accelerate."""

# ModelMixin and SchedulerMixin are re-exported so that a model_index.json naming this library resolves its
# base classes (diffusers looks them up in the library module itself).
from diffusers import ModelMixin, SchedulerMixin

from .objectives import (
    DiffusionObjective,
    LogitNormalTimestepSampler,
    LogNormalSigmaSampler,
    SpeeDTimestepSampler,
    UniformTimestepSampler,
    compute_loss_weights,
)

__version__ = "0.1.0"

__all__ = [
    "DiffusionObjective",
    "LogNormalSigmaSampler",
    "LogitNormalTimestepSampler",
    "ModelMixin",
    "SchedulerMixin",
    "SpeeDTimestepSampler",
    "UniformTimestepSampler",
    "__version__",
    "compute_loss_weights",
]
