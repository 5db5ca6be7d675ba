"""What training minimises: noise-level samplers, loss weights and the loss itself."""

from .objective import DiffusionObjective, ObjectiveOutput, UncertaintyHead
from .samplers import (
    SAMPLER_KINDS,
    LogitNormalTimestepSampler,
    LogNormalSigmaSampler,
    SpeeDTimestepSampler,
    UniformTimestepSampler,
    build_sampler,
    speed_pivot,
)
from .weighting import PREDICTION_TYPES, WEIGHTING_KINDS, LossWeighting, compute_loss_weights

__all__ = [
    "DiffusionObjective",
    "LogNormalSigmaSampler",
    "LossWeighting",
    "LogitNormalTimestepSampler",
    "ObjectiveOutput",
    "PREDICTION_TYPES",
    "SAMPLER_KINDS",
    "SpeeDTimestepSampler",
    "UncertaintyHead",
    "UniformTimestepSampler",
    "WEIGHTING_KINDS",
    "build_sampler",
    "compute_loss_weights",
    "speed_pivot",
]
