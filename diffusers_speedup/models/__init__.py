"""Model classes, one self-contained file per family."""

from .dit_transformer import DIT_PRESETS, DiTModel
from .edm2_unet import EDM2_PRESETS, EDM2UNetModel
from .uvit import UVIT_PRESETS, UViTModel

__all__ = ["DIT_PRESETS", "DiTModel", "EDM2UNetModel", "EDM2_PRESETS", "UVIT_PRESETS", "UViTModel"]
