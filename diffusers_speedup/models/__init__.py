"""Model classes, one self-contained file per family (DiT is reused from diffusers; see dit.py for its presets)."""

from .dit import DIT_PRESETS, dit_from_preset
from .edm2_unet import EDM2_PRESETS, EDM2UNetModel
from .uvit import UVIT_PRESETS, UViTModel

__all__ = ["DIT_PRESETS", "EDM2UNetModel", "EDM2_PRESETS", "UVIT_PRESETS", "UViTModel", "dit_from_preset"]
