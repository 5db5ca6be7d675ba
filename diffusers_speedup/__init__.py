"""diffusers-speedup: faster, more stable diffusion training on top of diffusers and accelerate."""

# ModelMixin and SchedulerMixin are re-exported so that a model_index.json naming this library resolves its
# base classes (diffusers looks them up in the library module itself).
from diffusers import ModelMixin, SchedulerMixin

__version__ = "0.1.0"

__all__ = ["ModelMixin", "SchedulerMixin", "__version__"]
