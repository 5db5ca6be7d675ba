"""U-ViT's released networks (baofff/U-ViT ``nnet.pth`` / ``nnet_ema.pth``) as pipeline folders of this package.

    diffusers-speedup convert uvit imagenet256_uvit_huge.pth --output_dir uvit-h2-imagenet256

Covers every released size: CIFAR-10 (U-ViT-S/2), CelebA 64 (S/4), ImageNet 64 (M/4, L/4), ImageNet 256 (L/2, H/2)
and ImageNet 512 (L/4, H/4). The architecture is read from the tensor shapes; what shapes cannot tell (the number
of heads, how the network was fed time, the autoencoder and the sampler settings) comes from the official config
the shapes match, or from ``--config`` / ``--num_heads`` / ``--time_input``.

Three differences between the official network and `UViTModel` are absorbed here, so the converted model gives the
official outputs to float precision:

- Token order. U-ViT puts the class token first (``[class, time, patches]``), this package the time token first.
  Attention is equivariant to the order of its tokens and the two extra tokens are dropped at the output, so
  swapping the first two rows of the position embedding is exact.
- Time input. ``train_ldm_discrete.py`` (the H models) feeds the DDPM step ``n ∈ 1..1000`` with
  ``ᾱ_n = ∏_{i≤n}(1 − β_i)`` for SD's scaled-linear betas: diffusers' timestep ``t = n − 1``, so the model config
  gets ``timestep_shift = 1``. ``train.py`` / ``train_ldm.py`` (all other models) train a continuous VP SDE
  (β(s) = 0.1 + 19.9 s) and feed ``999 · s``; the scheduler gets the betas whose ``ᾱ_t`` equals the SDE's
  ``ᾱ(s)`` at ``s = (t + 1) / 1000`` exactly, and the model config ``999 · s = 0.999 · t + 0.999``.
- Labels. U-ViT's label table has ``num_classes`` rows, the null label included where the model was trained for
  guidance (1001 rows on ImageNet 256/512). The ImageNet-64 models have no null label; their converted table gets
  an all-zero row for it, which must not be used for guidance (sample them with ``guidance_scale = 1``).
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
    save_converted_pipeline,
    tensor_shape,
)

SOURCE = "https://github.com/baofff/U-ViT"
LICENSE = "mit"  # baofff/U-ViT's LICENSE (MIT, Copyright (c) 2022 Fan Bao) covers the code and the released weights
WHAT = "a U-ViT nnet.pth (baofff/U-ViT)"
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
VAE_SCALING_FACTOR = 0.18215  # libs/autoencoder.py get_model(scale_factor=0.18215)
NUM_TRAIN_TIMESTEPS = 1000
TIME_INPUTS = ("discrete", "continuous")
# Heads of the published widths (U-ViT paper, Table 1): S 512/8, M 768/12, L 1024/16, H 1152/16.
HEADS_BY_WIDTH = {512: 8, 768: 12, 1024: 16, 1152: 16}


@dataclass(frozen=True)
class UViTRelease:
    """One released network and the official config it was trained with (baofff/U-ViT configs/*.py)."""

    name: str
    title: str
    sample_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int  # the official `depth`: in-blocks + out-blocks, the mid-block not counted
    num_heads: int
    label_rows: int  # rows of `label_emb`; 0 for the unconditional models
    conv: bool
    time_input: str  # "continuous" (train.py, train_ldm.py) or "discrete" (train_ldm_discrete.py)
    autoencoder: str | None  # the official autoencoder file; None in pixel space
    fid: float
    cfg_scale: float | None = None  # U-ViT's s in ε = (1 + s)·ε_c − s·ε_u, i.e. guidance_scale = 1 + s

    @property
    def has_null_label(self) -> bool:
        return self.label_rows == 1001


RELEASES = {
    release.name: release
    for release in (
        UViTRelease("cifar10_uvit_small", "CIFAR-10 32×32, U-ViT-S/2", 32, 2, 3, 512, 12, 8, 0, True, "continuous",
                    None, 3.11),
        UViTRelease("celeba64_uvit_small", "CelebA 64×64, U-ViT-S/4", 64, 4, 3, 512, 12, 8, 0, True, "continuous",
                    None, 2.87),
        UViTRelease("imagenet64_uvit_mid", "ImageNet 64×64, U-ViT-M/4", 64, 4, 3, 768, 16, 12, 1000, True,
                    "continuous", None, 5.85),
        UViTRelease("imagenet64_uvit_large", "ImageNet 64×64, U-ViT-L/4", 64, 4, 3, 1024, 20, 16, 1000, True,
                    "continuous", None, 4.26),
        UViTRelease("imagenet256_uvit_large", "ImageNet 256×256, U-ViT-L/2", 32, 2, 4, 1024, 20, 16, 1001, True,
                    "continuous", "autoencoder_kl.pth", 3.40, 0.4),
        UViTRelease("imagenet256_uvit_huge", "ImageNet 256×256, U-ViT-H/2", 32, 2, 4, 1152, 28, 16, 1001, False,
                    "discrete", "autoencoder_kl_ema.pth", 2.29, 0.4),
        UViTRelease("imagenet512_uvit_large", "ImageNet 512×512, U-ViT-L/4", 64, 4, 4, 1024, 20, 16, 1001, True,
                    "continuous", "autoencoder_kl.pth", 4.67, 0.7),
        UViTRelease("imagenet512_uvit_huge", "ImageNet 512×512, U-ViT-H/4", 64, 4, 4, 1152, 28, 16, 1001, False,
                    "discrete", "autoencoder_kl_ema.pth", 4.05, 0.7),
    )
}  # fmt: skip

BLOCK_PARTS = {  # official name inside a block -> UViTModel name (the timm ViT block both U-ViT and Min-SNR use)
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.0.weight",
    "mlp.fc1.bias": "mlp.0.bias",
    "mlp.fc2.weight": "mlp.2.weight",
    "mlp.fc2.bias": "mlp.2.bias",
}
_TOP_LEVEL = {  # official name -> UViTModel name, for the tensors outside the blocks
    "patch_embed.proj.weight": "patch_embed.weight",
    "patch_embed.proj.bias": "patch_embed.bias",
    "pos_embed": "pos_embed",
    "time_embed.0.weight": "time_embed.0.weight",
    "time_embed.0.bias": "time_embed.0.bias",
    "time_embed.2.weight": "time_embed.2.weight",
    "time_embed.2.bias": "time_embed.2.bias",
    "label_emb.weight": "class_embed.weight",
    "norm.weight": "norm_out.weight",
    "norm.bias": "norm_out.bias",
    "decoder_pred.weight": "proj_out.weight",
    "decoder_pred.bias": "proj_out.bias",
    "final_layer.weight": "conv_out.weight",
    "final_layer.bias": "conv_out.bias",
}


def official_key_map(depth: int, conditional: bool, mlp_time_embed: bool, qkv_bias: bool, conv: bool) -> dict[str, str]:
    """Every key of an official U-ViT state dict with these options, mapped to its `UViTModel` key."""
    mapping = {
        official: ours
        for official, ours in _TOP_LEVEL.items()
        if (conditional or not official.startswith("label_emb"))
        and (mlp_time_embed or not official.startswith("time_embed"))
        and (conv or not official.startswith("final_layer"))
    }
    parts = dict(BLOCK_PARTS, **({"attn.qkv.bias": "attn.qkv.bias"} if qkv_bias else {}))
    prefixes = [f"in_blocks.{i}." for i in range(depth // 2)] + ["mid_block."]
    prefixes += [f"out_blocks.{i}." for i in range(depth // 2)]
    for prefix in prefixes:
        for official, ours in parts.items():
            mapping[prefix + official] = prefix + ours
        if prefix.startswith("out_blocks."):
            mapping[prefix + "skip_linear.weight"] = prefix + "skip_linear.weight"
            mapping[prefix + "skip_linear.bias"] = prefix + "skip_linear.bias"
    return mapping


def _count_blocks(state: Mapping[str, object], prefix: str) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    indices = {int(match.group(1)) for key in state if (match := pattern.match(key))}
    return max(indices) + 1 if indices else 0


@dataclass(frozen=True)
class UViTArchitecture:
    """What the tensor shapes of a U-ViT state dict say about its network."""

    sample_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    label_rows: int
    mlp_ratio: float
    mlp_time_embed: bool
    qkv_bias: bool
    conv: bool

    def matches(self, release: UViTRelease) -> bool:
        return (
            self.sample_size,
            self.patch_size,
            self.in_channels,
            self.hidden_size,
            self.depth,
            self.label_rows,
            self.conv,
        ) == (
            release.sample_size,
            release.patch_size,
            release.in_channels,
            release.hidden_size,
            release.depth,
            release.label_rows,
            release.conv,
        ) and not (self.mlp_time_embed or self.qkv_bias or self.mlp_ratio != 4)


def infer_architecture(state: Mapping[str, torch.Tensor], path="<state dict>") -> UViTArchitecture:
    """Reads the architecture from the keys and shapes; one CheckpointFormatError names every missing/unexpected key."""
    depth = 2 * max(_count_blocks(state, "in_blocks"), _count_blocks(state, "out_blocks"))
    options = dict(
        conditional="label_emb.weight" in state,
        mlp_time_embed="time_embed.0.weight" in state,
        qkv_bias="mid_block.attn.qkv.bias" in state,
        conv="final_layer.weight" in state,
    )
    check_state_dict_keys(state, official_key_map(depth, **options), path, WHAT)
    hidden, in_channels, patch, _ = tensor_shape(state, "patch_embed.proj.weight", 4, path, WHAT)
    _, tokens, _ = tensor_shape(state, "pos_embed", 3, path, WHAT)
    extras = 2 if options["conditional"] else 1
    side = math.isqrt(max(tokens - extras, 0))
    if side * side != tokens - extras or side == 0:
        raise CheckpointFormatError(
            f"{path}: not {WHAT}: pos_embed has {tokens} tokens, which is not {extras} extra token(s) plus a square "
            "grid of patches"
        )
    mlp_hidden = tensor_shape(state, "mid_block.mlp.fc1.weight", 2, path, WHAT)[0]
    return UViTArchitecture(
        sample_size=side * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        label_rows=tensor_shape(state, "label_emb.weight", 2, path, WHAT)[0] if options["conditional"] else 0,
        mlp_ratio=mlp_hidden / hidden,
        mlp_time_embed=options["mlp_time_embed"],
        qkv_bias=options["qkv_bias"],
        conv=options["conv"],
    )


def find_release(architecture: UViTArchitecture, config: str | None = None, path="<state dict>") -> UViTRelease | None:
    """The official config `config` names (checked against the shapes), else the one the shapes match, else None."""
    if config is not None:
        if config not in RELEASES:
            raise ValueError(f"--config {config!r} is not a U-ViT release; choose one of {sorted(RELEASES)}")
        release = RELEASES[config]
        if not architecture.matches(release):
            raise CheckpointFormatError(f"{path}: its tensors do not fit the official config {config}: {architecture}")
        return release
    return next((release for release in RELEASES.values() if architecture.matches(release)), None)


def continuous_vp_betas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_min=0.1, beta_max=20.0) -> list[float]:
    """Betas whose ᾱ_t is U-ViT's VP SDE ᾱ(s) = exp(−β_min·s − (β_max − β_min)·s²/2) at s = (t + 1) / N."""
    s = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    log_alpha_bar = -(beta_min * s + (beta_max - beta_min) * s**2 / 2)
    return (1 - torch.exp(log_alpha_bar[1:] - log_alpha_bar[:-1])).tolist()


def uvit_scheduler(time_input: str):
    """The diffusers scheduler under which a U-ViT trained with `time_input` sees its own noise levels."""
    from diffusers import DPMSolverMultistepScheduler

    if time_input == "discrete":  # train_ldm_discrete.py: stable_diffusion_beta_schedule()
        schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    elif time_input == "continuous":  # sde.VPSDE(beta_min=0.1, beta_max=20)
        schedule = dict(trained_betas=continuous_vp_betas())
    else:
        raise ValueError(f"time_input={time_input!r} is not one of {TIME_INPUTS}")
    return DPMSolverMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="epsilon", algorithm_type="dpmsolver++", **schedule
    )


def timestep_mapping(time_input: str) -> dict[str, float]:
    """`UViTModel` config entries that turn the scheduler's t into the official network's time input."""
    if time_input == "discrete":
        return {"timestep_scale": 1.0, "timestep_shift": 1.0}  # n = t + 1
    if time_input == "continuous":
        scale = (NUM_TRAIN_TIMESTEPS - 1) / NUM_TRAIN_TIMESTEPS
        return {"timestep_scale": scale, "timestep_shift": scale}  # 999 · (t + 1) / 1000
    raise ValueError(f"time_input={time_input!r} is not one of {TIME_INPUTS}")


def convert_uvit_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    config: str | None = None,
    num_heads: int | None = None,
    time_input: str | None = None,
    path="<state dict>",
):
    """Builds the `UViTModel` of an official U-ViT state dict.

    Returns ``(model, release, time_input)``: the model in eval mode, the matched `UViTRelease` (None for shapes of
    no release) and the time convention used.
    """
    from ..models.uvit import UViTModel

    architecture = infer_architecture(state, path)
    release = find_release(architecture, config, path)
    num_heads = num_heads or (release.num_heads if release else HEADS_BY_WIDTH.get(architecture.hidden_size))
    time_input = time_input or (release.time_input if release else None)
    if num_heads is None or time_input is None:
        raise CheckpointFormatError(
            f"{path}: its shapes ({architecture}) match no released U-ViT ({', '.join(RELEASES)}); pass "
            + " and ".join(
                option
                for option, missing in (("--num_heads", num_heads is None), ("--time_input", time_input is None))
                if missing
            )
        )
    has_null = release.has_null_label if release else architecture.label_rows == 1001
    num_classes = 0 if architecture.label_rows == 0 else architecture.label_rows - int(has_null)
    model = UViTModel(
        sample_size=architecture.sample_size,
        patch_size=architecture.patch_size,
        in_channels=architecture.in_channels,
        num_layers=architecture.depth + 1,
        hidden_size=architecture.hidden_size,
        num_attention_heads=num_heads,
        mlp_ratio=architecture.mlp_ratio,
        qkv_bias=architecture.qkv_bias,
        num_classes=num_classes,
        final_conv=architecture.conv,
        mlp_time_embed=architecture.mlp_time_embed,
        **timestep_mapping(time_input),
    )

    def adjust(key, tensor):
        if key == "pos_embed" and num_classes > 0:  # [class, time, patches] -> [time, class, patches]
            return tensor[:, [1, 0, *range(2, tensor.shape[1])]]
        if key == "label_emb.weight" and not has_null:  # a null row that was never trained
            return torch.cat([tensor, tensor.new_zeros(1, tensor.shape[1])])
        return tensor

    key_map = official_key_map(
        architecture.depth, num_classes > 0, architecture.mlp_time_embed, architecture.qkv_bias, architecture.conv
    )
    load_mapped_state_dict(model, state, key_map, path, WHAT, adjust)
    return model.eval(), release, time_input


def load_uvit_checkpoint(path: str | os.PathLike, **options):
    """Reads an official ``nnet.pth`` / ``nnet_ema.pth`` (no code is unpickled) and returns
    ``(model, release, time_input)``; `options` are those of `convert_uvit_state_dict`."""
    state = load_torch_state_dict(path, WHAT)
    return convert_uvit_state_dict(state, path=path, **options)


def convert_uvit_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config: str | None = None,
    num_heads: int | None = None,
    time_input: str | None = None,
    vae: str | os.PathLike | None = None,
) -> Path:
    """Writes a `ClassConditionalPipeline` folder for an official U-ViT checkpoint.

    `vae` (latent models only): a Hub id or folder of the `AutoencoderKL` to decode with (default
    stabilityai/sd-vae-ft-ema); its scaling factor is set to U-ViT's 0.18215.
    """
    from diffusers import AutoencoderKL

    from ..pipelines import ClassConditionalPipeline

    model, release, time_input = load_uvit_checkpoint(
        checkpoint, config=config, num_heads=num_heads, time_input=time_input
    )
    latent = model.config.in_channels == 4
    if not latent and vae is not None:
        raise ValueError(f"{checkpoint}: a pixel-space U-ViT ({model.config.in_channels} channels) takes no --vae")
    autoencoder = None
    if latent:
        autoencoder = AutoencoderKL.from_pretrained(vae or DEFAULT_VAE)
        autoencoder.register_to_config(scaling_factor=VAE_SCALING_FACTOR)
    pipeline = ClassConditionalPipeline(scheduler=uvit_scheduler(time_input), transformer=model, vae=autoencoder)

    name = release.name if release else Path(checkpoint).stem
    trainer = {
        "discrete": "discrete steps (train_ldm_discrete.py)",
        "continuous": "the VP SDE (train.py, train_ldm.py)",
    }
    facts = [
        f"U-ViT (Bao et al., CVPR 2023), {release.title + f', FID {release.fid} in the paper' if release else name}.",
        f"Trained on {trainer[time_input]}; the model config maps the scheduler's timestep onto that time input.",
    ]
    if release is not None and release.autoencoder:
        facts.append(
            f"The official config decodes with {release.autoencoder} (Stable Diffusion's KL-f8 autoencoder); this "
            f"folder uses {vae or DEFAULT_VAE}, with U-ViT's scale factor {VAE_SCALING_FACTOR}."
        )
    if model.config.num_classes == 0:
        facts.append("It is unconditional.")
    elif release is not None and not release.has_null_label:
        facts.append("It was trained without a null label: sample it with guidance_scale=1.")
    guidance = 1.0 + release.cfg_scale if release is not None and release.cfg_scale is not None else 1.0
    return save_converted_pipeline(
        pipeline,
        output_dir,
        model_name=f"uvit-{name}",
        source=f"{SOURCE} ({Path(checkpoint).name})",
        license=LICENSE,
        description=" ".join(facts),
        sampling={"num_inference_steps": 50, "guidance_scale": guidance},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        choices=sorted(RELEASES),
        help="official config of the checkpoint (default: the one its tensor shapes match)",
    )
    parser.add_argument("--num_heads", type=int, help="attention heads, for shapes that match no release")
    parser.add_argument(
        "--time_input",
        choices=TIME_INPUTS,
        help="how the network was fed time: 'discrete' (train_ldm_discrete.py, n = 1..1000) or 'continuous' "
        "(train.py / train_ldm.py, 999·t); default: that of the matched release",
    )
    parser.add_argument(
        "--vae",
        help=f"AutoencoderKL (Hub id or folder) of a latent model; default {DEFAULT_VAE}",
    )


def run(args: argparse.Namespace) -> Path:
    return convert_uvit_checkpoint(
        args.checkpoint,
        args.output_dir,
        config=args.config,
        num_heads=args.num_heads,
        time_input=args.time_input,
        vae=args.vae,
    )
