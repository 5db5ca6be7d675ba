"""hustvl/LightningDiT's VA-VAE tokenizer (f16d32, aligned to DINOv2) as a diffusers ``AutoencoderKL`` folder.

    diffusers-speedup convert vavae vavae-imagenet256-f16d32-dinov2.pt --output_dir vavae-f16d32 \\
        [--latents_stats latents_stats.pt] [--latent_multiplier 1.0]

VA-VAE is LDM's KL autoencoder (VQGAN-KL) trained with an extra vision-foundation alignment loss; inference runs the
plain autoencoder (hustvl/LightningDiT@2725fed ``tokenizer/autoencoder.py``, built by ``tokenizer/vavae.py`` with
``ch_mult=(1, 1, 2, 2, 4)`` and ``embed_dim=32``; ``tokenizer/configs/vavae_f16d32.yaml``: ``ch 128``,
``num_res_blocks 2``, ``z_channels 32``, ``attn_resolutions [16]`` at resolution 256). The file is the LDM state dict
(``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``), possibly inside a PyTorch-Lightning ``state_dict``
entry, possibly with training-only tensors: the loss (LPIPS, discriminator, ``logvar``: ``loss.*``), the frozen DINOv2
(``foundation_model.*``) and the alignment projection (``linear_proj.*``). Those are left out and counted, as the
official loader leaves them out (``init_from_ckpt``, ``strict=False``); every other key must be the autoencoder's.
The architecture (widths, levels, blocks, latent channels, which levels have attention) is read from the shapes.

Attention at a level. ``attn_resolutions [16]`` at 256 px is the lowest level (16×16), so VA-VAE's encoder has an
``AttnBlock`` after each ResNet block of its last level and its decoder after each of its first level, besides the
mid-block attention every LDM autoencoder has. diffusers expresses these levels as ``AttnDownEncoderBlock2D`` and
``AttnUpDecoderBlock2D`` (one single-head attention per ResNet, GroupNorm(32, eps 1e-6), residual, scale C^-1/2: LDM's
``AttnBlock``). diffusers' own single-file converter (``loaders.single_file_utils.convert_ldm_vae_checkpoint``) maps
only the mid-block attention and would file a level's ``attn.*`` tensors under its ResNets, so the renaming here is
written out (`ldm_to_diffusers_keys`).

Latent normalisation. LightningDiT trains on ``x = (z − mean) / std · latent_multiplier`` with the per-channel
``mean`` and ``std`` of ``latents_stats.pt`` (``datasets/img_latent_dataset.py``) and ``latent_multiplier 1.0``, and
decodes ``z = x · std / latent_multiplier + mean`` (``inference.py``). ``--latents_stats`` writes them into the
AutoencoderKL config as ``latents_mean``, ``latents_std`` and ``scaling_factor = latent_multiplier``, which is the same
map in diffusers' per-channel convention (``x = (z − latents_mean) · scaling_factor / latents_std``), so a pipeline
decodes and ``cache-latents`` records exactly LightningDiT's normalisation. Code and weights are MIT
(hustvl/LightningDiT ``LICENSE``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import (
    CheckpointFormatError,
    check_state_dict_keys,
    load_mapped_state_dict,
    load_torch_state_dict,
    tensor_shape,
)

SOURCE_URL = "https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2"
RELEASED_FILES = ("vavae-imagenet256-f16d32-dinov2.pt",)
LATENTS_STATS_URL = f"{SOURCE_URL}/blob/main/latents_stats.pt"
LICENSE = "mit"  # hustvl/LightningDiT LICENSE
WHAT = "a VA-VAE (LDM AutoencoderKL) checkpoint"
# Tensors of the training objective, not of the autoencoder: LPIPSWithDiscriminator (loss.*), the frozen vision
# foundation model (foundation_model.*) and the VF-loss projection (linear_proj.*).
TRAINING_ONLY_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")
# LDM's Normalize: GroupNorm(32 groups, eps 1e-6) everywhere; the shapes cannot tell the group count.
NORM_GROUPS = 32

__all__ = [
    "LDMAutoencoderShape",
    "convert_vavae_checkpoint",
    "ldm_autoencoder_shape",
    "ldm_to_diffusers_keys",
    "official_ldm_vae_keys",
    "read_latents_stats",
    "read_vavae_state_dict",
]


@dataclass(frozen=True)
class LDMAutoencoderShape:
    """What an LDM ``AutoencoderKL`` state dict says about its network (``ddconfig`` and ``embed_dim``).

    Attributes:
        ch: width after ``conv_in``; ``ch_mult``: each level's width over ``ch``; ``num_res_blocks``: ResNet blocks
        per encoder level (the decoder has one more); ``z_channels``: latent channels; ``in_channels``, ``out_ch``:
        image channels; ``attn_levels``: the levels (0 = full resolution) with an ``AttnBlock`` after each ResNet.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    in_channels: int
    out_ch: int
    attn_levels: tuple[int, ...]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _resnet_keys(prefix: str, in_channels: int, out_channels: int) -> list[str]:
    names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if in_channels != out_channels else [])
    return [f"{prefix}.{name}.{part}" for name in names for part in ("weight", "bias")]


def _attention_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{name}.{part}" for name in ("norm", "q", "k", "v", "proj_out") for part in ("weight", "bias")]


def official_ldm_vae_keys(shape: LDMAutoencoderShape) -> list[str]:
    """Every key of LDM's ``AutoencoderKL`` (``Encoder``, ``Decoder``, ``quant_conv``, ``post_quant_conv``) of `shape`,
    as ``tokenizer/autoencoder.py`` names them (ResNet blocks without a time embedding)."""
    widths, levels = shape.widths, len(shape.ch_mult)
    keys = []
    block_in = shape.ch
    keys += [f"encoder.conv_in.{part}" for part in ("weight", "bias")]
    for level in range(levels):
        for block in range(shape.num_res_blocks):
            keys += _resnet_keys(f"encoder.down.{level}.block.{block}", block_in, widths[level])
            block_in = widths[level]
            if level in shape.attn_levels:
                keys += _attention_keys(f"encoder.down.{level}.attn.{block}")
        if level != levels - 1:
            keys += [f"encoder.down.{level}.downsample.conv.{part}" for part in ("weight", "bias")]
    for side in ("encoder", "decoder"):
        keys += _resnet_keys(f"{side}.mid.block_1", widths[-1], widths[-1])
        keys += _attention_keys(f"{side}.mid.attn_1")
        keys += _resnet_keys(f"{side}.mid.block_2", widths[-1], widths[-1])
        keys += [f"{side}.{name}.{part}" for name in ("norm_out", "conv_out", "conv_in") for part in ("weight", "bias")]
    block_in = widths[-1]
    for level in reversed(range(levels)):
        for block in range(shape.num_res_blocks + 1):
            keys += _resnet_keys(f"decoder.up.{level}.block.{block}", block_in, widths[level])
            block_in = widths[level]
            if level in shape.attn_levels:
                keys += _attention_keys(f"decoder.up.{level}.attn.{block}")
        if level != 0:
            keys += [f"decoder.up.{level}.upsample.conv.{part}" for part in ("weight", "bias")]
    keys += [f"{conv}.{part}" for conv in ("quant_conv", "post_quant_conv") for part in ("weight", "bias")]
    return keys


def read_vavae_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(autoencoder, training_only)``: the LDM autoencoder tensors of a VA-VAE ``.pt`` file (the file itself, or
    its ``state_dict`` entry as PyTorch Lightning saves it), and the loss / foundation-model / projection tensors
    split off. Nothing in the file is executed (weights-only loading)."""
    state = load_torch_state_dict(path, WHAT)
    if isinstance(state.get("state_dict"), Mapping):
        state = dict(state["state_dict"])
    elif not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointFormatError(
            f"{path}: not {WHAT}: expected a state dict or a checkpoint with a 'state_dict' entry, found the entries "
            f"{sorted(map(str, state))}"
        )
    training_only = {key: value for key, value in state.items() if key.startswith(TRAINING_ONLY_PREFIXES)}
    network = {key: value for key, value in state.items() if not key.startswith(TRAINING_ONLY_PREFIXES)}
    return network, training_only


def ldm_autoencoder_shape(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> LDMAutoencoderShape:
    """The LDM autoencoder of `state`, read from its shapes after checking every key.

    Raises:
        CheckpointFormatError: one error naming every missing and unexpected key, or the shape that does not fit.
    """
    basics = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
    if not all(key in state for key in basics):  # not an LDM autoencoder at all: name what is there instead
        check_state_dict_keys(state, basics, path, WHAT)
    ch, in_channels = tensor_shape(state, "encoder.conv_in.weight", 4, path, WHAT)[:2]
    out_ch = tensor_shape(state, "decoder.conv_out.weight", 4, path, WHAT)[0]
    z_channels = tensor_shape(state, "decoder.conv_in.weight", 4, path, WHAT)[1]
    levels = sorted({int(m.group(1)) for key in state if (m := re.match(r"encoder\.down\.(\d+)\.", key))})
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
    if not levels or not blocks:
        raise CheckpointFormatError(f"{path}: not {WHAT}: it has no encoder.down.0.block.0 (no encoder levels)")
    widths = []
    for level in range(max(levels) + 1):
        key = f"encoder.down.{level}.block.0.conv1.weight"
        widths.append(tensor_shape(state, key, 4, path, WHAT)[0] if key in state else ch)
    if any(width % ch for width in widths):
        raise CheckpointFormatError(f"{path}: not {WHAT}: level widths {widths} are not multiples of ch = {ch}")
    attn_levels = tuple(
        sorted({int(m.group(1)) for key in state if (m := re.match(r"encoder\.down\.(\d+)\.attn\.", key))})
    )
    shape = LDMAutoencoderShape(
        ch=ch,
        ch_mult=tuple(width // ch for width in widths),
        num_res_blocks=max(blocks) + 1,
        z_channels=z_channels,
        in_channels=in_channels,
        out_ch=out_ch,
        attn_levels=attn_levels,
    )
    check_state_dict_keys(state, official_ldm_vae_keys(shape), path, WHAT)
    if shape.ch_mult[0] != 1:
        # diffusers' Encoder feeds conv_in's output (block_out_channels[0] wide) straight into the first level.
        raise CheckpointFormatError(f"{path}: ch_mult {shape.ch_mult} starts above 1, which AutoencoderKL cannot hold")
    if any(width % NORM_GROUPS for width in shape.widths):
        raise CheckpointFormatError(f"{path}: level widths {shape.widths} are not multiples of LDM's 32 norm groups")
    embed_dim = tensor_shape(state, "post_quant_conv.weight", 4, path, WHAT)[1]
    if embed_dim != z_channels or tensor_shape(state, "quant_conv.weight", 4, path, WHAT)[:2] != (
        2 * z_channels,
        2 * z_channels,
    ):
        raise CheckpointFormatError(
            f"{path}: embed_dim {embed_dim} differs from z_channels {z_channels}; AutoencoderKL needs them equal"
        )
    return shape


def diffusers_vae_config(shape: LDMAutoencoderShape, sample_size: int = 256) -> dict:
    """``AutoencoderKL`` arguments of the same network: a level with attention is an ``AttnDownEncoderBlock2D`` /
    ``AttnUpDecoderBlock2D``, the others the plain blocks; diffusers' up blocks run from the lowest level up."""
    levels = range(len(shape.ch_mult))
    return {
        "in_channels": shape.in_channels,
        "out_channels": shape.out_ch,
        "down_block_types": tuple(
            "AttnDownEncoderBlock2D" if level in shape.attn_levels else "DownEncoderBlock2D" for level in levels
        ),
        "up_block_types": tuple(
            "AttnUpDecoderBlock2D" if level in shape.attn_levels else "UpDecoderBlock2D" for level in reversed(levels)
        ),
        "block_out_channels": shape.widths,
        "layers_per_block": shape.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": shape.z_channels,
        "norm_num_groups": NORM_GROUPS,
        "sample_size": sample_size,
        "mid_block_add_attention": True,
    }


def _resnet_map(official: str, ours: str, in_channels: int, out_channels: int) -> dict[str, str]:
    renames = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
    if in_channels != out_channels:
        renames["nin_shortcut"] = "conv_shortcut"
    return {f"{official}.{a}.{p}": f"{ours}.{b}.{p}" for a, b in renames.items() for p in ("weight", "bias")}


def _attention_map(official: str, ours: str) -> dict[str, str]:
    renames = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    return {f"{official}.{a}.{p}": f"{ours}.{b}.{p}" for a, b in renames.items() for p in ("weight", "bias")}


def ldm_to_diffusers_keys(shape: LDMAutoencoderShape) -> dict[str, str]:
    """LDM key → ``AutoencoderKL`` key for every tensor (`official_ldm_vae_keys` on the left). LDM's decoder
    ``up.{level}`` is diffusers' ``up_blocks.{levels − 1 − level}``; ``nin_shortcut`` is ``conv_shortcut``; an
    ``AttnBlock``'s ``norm``, ``q``, ``k``, ``v``, ``proj_out`` are ``group_norm``, ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0`` (1×1 convolutions there, linears here)."""
    widths, levels = shape.widths, len(shape.ch_mult)
    mapping = {}

    def same(*names):
        for name in names:
            mapping.update({f"{name}.{p}": f"{name}.{p}" for p in ("weight", "bias")})

    same("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv")
    for side in ("encoder", "decoder"):
        mapping.update({f"{side}.norm_out.{p}": f"{side}.conv_norm_out.{p}" for p in ("weight", "bias")})
        for i in (1, 2):
            mapping.update(
                _resnet_map(f"{side}.mid.block_{i}", f"{side}.mid_block.resnets.{i - 1}", widths[-1], widths[-1])
            )
        mapping.update(_attention_map(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0"))
    block_in = shape.ch
    for level in range(levels):
        ours = f"encoder.down_blocks.{level}"
        for block in range(shape.num_res_blocks):
            mapping.update(
                _resnet_map(f"encoder.down.{level}.block.{block}", f"{ours}.resnets.{block}", block_in, widths[level])
            )
            block_in = widths[level]
            if level in shape.attn_levels:
                mapping.update(_attention_map(f"encoder.down.{level}.attn.{block}", f"{ours}.attentions.{block}"))
        if level != levels - 1:
            mapping.update(
                {
                    f"encoder.down.{level}.downsample.conv.{p}": f"{ours}.downsamplers.0.conv.{p}"
                    for p in ("weight", "bias")
                }
            )
    block_in = widths[-1]
    for level in reversed(range(levels)):
        ours = f"decoder.up_blocks.{levels - 1 - level}"
        for block in range(shape.num_res_blocks + 1):
            mapping.update(
                _resnet_map(f"decoder.up.{level}.block.{block}", f"{ours}.resnets.{block}", block_in, widths[level])
            )
            block_in = widths[level]
            if level in shape.attn_levels:
                mapping.update(_attention_map(f"decoder.up.{level}.attn.{block}", f"{ours}.attentions.{block}"))
        if level != 0:
            mapping.update(
                {f"decoder.up.{level}.upsample.conv.{p}": f"{ours}.upsamplers.0.conv.{p}" for p in ("weight", "bias")}
            )
    return mapping


def _squeeze_attention(official_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """An ``AttnBlock``'s 1×1 convolution weight (C, C, 1, 1) as the linear weight (C, C) diffusers' attention holds."""
    if re.search(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", official_key) and tensor.ndim == 4:
        return tensor[:, :, 0, 0]
    return tensor


def read_latents_stats(path: str | os.PathLike, channels: int | None = None) -> tuple[list[float], list[float]]:
    """``(mean, std)`` per channel from LightningDiT's ``latents_stats.pt`` (``{"mean": (1, C, 1, 1), "std": ...}``,
    as ``ImgLatentDataset.compute_latent_stats`` saves it); `channels` is the latent channel count it must have."""
    what = "a LightningDiT latents_stats.pt ({'mean', 'std'} per channel)"
    stats = load_torch_state_dict(path, what)
    values = {}
    for key in ("mean", "std"):
        value = stats.get(key)
        if not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(
                f"{path}: not {what}: no {key!r} tensor (its entries: {sorted(map(str, stats))})"
            )
        if channels is not None and value.numel() != channels:
            raise CheckpointFormatError(
                f"{path}: {key} has {value.numel()} values {tuple(value.shape)}, but the VAE has {channels} latent channels"
            )
        values[key] = [float(v) for v in value.detach().double().flatten()]
    if not all(math.isfinite(v) for v in values["mean"] + values["std"]) or min(values["std"]) <= 0:
        raise CheckpointFormatError(f"{path}: mean and std must be finite and std positive, got std {values['std']}")
    return values["mean"], values["std"]


def load_vavae_checkpoint(path: str | os.PathLike, sample_size: int = 256):
    """``(vae, training_only)``: an ``AutoencoderKL`` (float32, eval mode) holding a VA-VAE file's autoencoder, and the
    training-only tensors left out. Its config has diffusers' default normalisation; see `convert_vavae_checkpoint`."""
    from diffusers import AutoencoderKL

    state, training_only = read_vavae_state_dict(path)
    shape = ldm_autoencoder_shape(state, path)
    vae = AutoencoderKL(**diffusers_vae_config(shape, sample_size))
    load_mapped_state_dict(vae, state, ldm_to_diffusers_keys(shape), path, WHAT, adjust=_squeeze_attention)
    return vae.eval(), training_only


def normalised_vae(vae, latents_stats: str | os.PathLike | None = None, latent_multiplier: float = 1.0):
    """`vae`, changed in place, with LightningDiT's latent normalisation in its config: ``latents_mean`` / ``latents_std`` from
    `latents_stats` (when given; else those the config already has) and ``scaling_factor = latent_multiplier``."""
    if not 0 < latent_multiplier < math.inf:
        raise ValueError(f"latent_multiplier must be a positive finite number, got {latent_multiplier}")
    if latents_stats is not None:
        mean, std = read_latents_stats(latents_stats, vae.config.latent_channels)
        vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.register_to_config(scaling_factor=float(latent_multiplier), shift_factor=None)
    return vae


def convert_vavae_checkpoint(
    path: str | os.PathLike,
    latents_stats: str | os.PathLike | None = None,
    latent_multiplier: float = 1.0,
    sample_size: int = 256,
):
    """``(vae, training_only)``: a VA-VAE ``.pt`` file as an ``AutoencoderKL`` whose config carries LightningDiT's latent
    normalisation (`normalised_vae`), and the training-only tensors left out.

    Args:
        path: the VA-VAE checkpoint (``vavae-imagenet256-f16d32-dinov2.pt``).
        latents_stats: LightningDiT's ``latents_stats.pt`` (per-channel mean and std of the latents); without it the
            folder records no statistics and decodes ``z = x / latent_multiplier``.
        latent_multiplier: LightningDiT's ``data.latent_multiplier`` (1.0 in its VA-VAE configs).
        sample_size: the image size the autoencoder was trained at (its config's ``sample_size``; 256).
    """
    vae, training_only = load_vavae_checkpoint(path, sample_size)
    return normalised_vae(vae, latents_stats, latent_multiplier), training_only


def describe_training_only(training_only: Mapping[str, torch.Tensor]) -> str:
    """One line saying which training-only tensors were left out, by prefix."""
    if not training_only:
        return "no training-only tensors in the file"
    counts = {prefix: 0 for prefix in TRAINING_ONLY_PREFIXES}
    for key in training_only:
        counts[next(prefix for prefix in TRAINING_ONLY_PREFIXES if key.startswith(prefix))] += 1
    parts = ", ".join(f"{count} {prefix}*" for prefix, count in counts.items() if count)
    parameters = sum(value.numel() for value in training_only.values())
    return f"left out {len(training_only)} training-only tensors ({parts}; {parameters:,} values)"


def save_vae_folder(vae, output_dir: str | os.PathLike, *, source: str, note: str) -> Path:
    """Writes `vae` (safetensors and config) and a model card naming the source and the licence, atomically."""
    from ..utils import atomic_folder

    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = vae.config
    if config.get("latents_mean") is not None:
        normalisation = (
            "The config carries LightningDiT's latent normalisation: x = (z − latents_mean) · scaling_factor / "
            f"latents_std per channel, scaling_factor = latent_multiplier = {config.scaling_factor}."
        )
    else:
        normalisation = (
            "The config carries no latent statistics (convert with --latents_stats latents_stats.pt to record "
            "LightningDiT's per-channel normalisation)."
        )
    factor = 2 ** (len(config.block_out_channels) - 1)
    card = (
        f"---\nlicense: {LICENSE}\nlibrary_name: diffusers\ntags:\n- autoencoder\n- va-vae\n- diffusers-speedup\n---\n\n"
        f"# VA-VAE f{factor}d{config.latent_channels}\n\n"
        "The vision-foundation-model aligned VAE of Yao, Yang & Wang, Reconstruction vs. Generation: Taming "
        "Optimization Dilemma in Latent Diffusion Models (CVPR 2025), as a diffusers `AutoencoderKL` "
        f"({config.latent_channels} latent channels, {factor}× downsampling).\n\n"
        f"Converted from the released checkpoint {source} (hustvl/LightningDiT, MIT); the weights keep its licence "
        f"({LICENSE}). {note}\n\n{normalisation}\n\n"
        '```python\nfrom diffusers import AutoencoderKL\n\nvae = AutoencoderKL.from_pretrained("path/to/this/folder")\n```\n\n'
        "Cache latents for training with `diffusers-speedup cache-latents --vae path/to/this/folder ...`.\n"
    )
    with atomic_folder(target) as staging:
        vae.save_pretrained(staging, safe_serialization=True)
        (staging / "README.md").write_text(card)
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--latents_stats",
        default=None,
        help="LightningDiT's latents_stats.pt (per-channel mean and std of the latents), written into the config",
    )
    parser.add_argument(
        "--latent_multiplier",
        type=float,
        default=1.0,
        help="LightningDiT's data.latent_multiplier, the config's scaling_factor (default: 1.0, its VA-VAE configs')",
    )
    parser.add_argument(
        "--sample_size", type=int, default=256, help="image size the autoencoder was trained at (default: 256)"
    )


def source_name(checkpoint: str | os.PathLike) -> str:
    name = Path(checkpoint).name
    return f"{name} of {SOURCE_URL}" if name in RELEASED_FILES else name


def run(args: argparse.Namespace) -> Path:
    vae, training_only = convert_vavae_checkpoint(
        args.checkpoint, args.latents_stats, args.latent_multiplier, args.sample_size
    )
    dropped = describe_training_only(training_only)
    print(dropped)
    if args.latents_stats is None:
        print("note: no --latents_stats; the folder records no latent statistics")
    return save_vae_folder(
        vae, args.output_dir, source=source_name(args.checkpoint), note=f"Only the autoencoder is kept: {dropped}."
    )
