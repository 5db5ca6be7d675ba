"""Training: typed recipes, the accelerate trainer loop, EMA and post-hoc EMA, LR schedules, checkpoints."""

from .config import Config, ConfigError, config_to_dict, config_to_yaml
from .preemption import TrainingPreempted
from .recipes import config_from_mapping, load_config
from .step import NonFiniteLossError
from .trainer import Trainer, train

__all__ = [
    "Config",
    "ConfigError",
    "NonFiniteLossError",
    "Trainer",
    "TrainingPreempted",
    "config_from_mapping",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "train",
]
