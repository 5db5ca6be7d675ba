"""What training minimises: noise-level samplers, loss weights and the loss itself."""

from .objective import SAMPLER_KINDS, DiffusionObjective, ObjectiveOutput, UncertaintyHead, build_sampler
from .samplers import (
    LogitNormalTimestepSampler,
    LogNormalSigmaSampler,
    SpeeDTimestepSampler,
    UniformTimestepSampler,
    speed_pivot,
)
from .weighting import PREDICTION_TYPES, WEIGHTING_KINDS, compute_loss_weights, x0_space_weights, x0_weights_to_target

__all__ = [
    "DiffusionObjective",
    "LogNormalSigmaSampler",
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
    "x0_space_weights",
    "x0_weights_to_target",
]
