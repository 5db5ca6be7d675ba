"""What training minimises: noise-level samplers, loss weights, the loss itself and auxiliary losses (REPA)."""

from .auxiliary import AuxiliaryLoss
from .objective import DiffusionObjective, ObjectiveOutput, UncertaintyHead
from .repa import FrozenEncoder, RepresentationAlignment
from .samplers import (
    SAMPLER_KINDS,
    LogitNormalTimestepSampler,
    LogNormalSigmaSampler,
    SpeeDTimestepSampler,
    UniformTimestepSampler,
    build_sampler,
    check_sampler_fits,
    speed_pivot,
)
from .weighting import PREDICTION_TYPES, WEIGHTING_KINDS, LossWeighting, compute_loss_weights

__all__ = [
    "AuxiliaryLoss",
    "DiffusionObjective",
    "FrozenEncoder",
    "LogNormalSigmaSampler",
    "LossWeighting",
    "LogitNormalTimestepSampler",
    "ObjectiveOutput",
    "PREDICTION_TYPES",
    "RepresentationAlignment",
    "SAMPLER_KINDS",
    "SpeeDTimestepSampler",
    "UncertaintyHead",
    "UniformTimestepSampler",
    "WEIGHTING_KINDS",
    "build_sampler",
    "check_sampler_fits",
    "compute_loss_weights",
    "speed_pivot",
]
