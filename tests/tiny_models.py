"""Tiny networks of each model family, built from configs, shared by the tests that need one of each."""

import torch

from diffusers_speedup.models.dit_transformer import DiTModel
from diffusers_speedup.models.edm2_unet import EDM2UNetModel
from diffusers_speedup.models.uvit import UViTModel

TINY_UVIT = dict(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_attention_heads=4, num_layers=3)
TINY_DIT = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, hidden_size=32,
                num_attention_heads=2)  # fmt: skip
TINY_EDM2 = dict(sample_size=16, in_channels=3, num_classes=5, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(8,), channels_per_head=16, logvar_channels=16)  # fmt: skip


def tiny_vae(sample_size: int = 16):
    """A two-level AutoencoderKL with 4 latent channels (8× smaller images than an SD VAE's cost, same layout)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Adds seeded noise to every weight, so that zero-initialised heads and gains (DiT's adaLN, EDM2's config G)
    do not hide most of the network from an output comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def tiny_uvit(**overrides) -> UViTModel:
    torch.manual_seed(0)
    return UViTModel(**{**TINY_UVIT, "num_classes": 10, **overrides})


def tiny_dit(**overrides) -> DiTModel:
    torch.manual_seed(0)
    return DiTModel(**{**TINY_DIT, "num_classes": 10, **overrides})


def tiny_edm2(**overrides) -> EDM2UNetModel:
    torch.manual_seed(0)
    return EDM2UNetModel(**{**TINY_EDM2, **overrides})


def wake_gains(model: EDM2UNetModel, value: float = 0.7) -> EDM2UNetModel:
    """EDM2's config G starts with zero gains (F = 0, no conditioning, most weights without gradient); give them a
    value so that every weight takes part."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("emb_gain") or name == "out_gain":
                param.fill_(value)
    return model
