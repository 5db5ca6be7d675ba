"""The Min-SNR paper's ViTs (TiankaiHang/Min-SNR-Diffusion-Training, e.g. ``ema_0.9999_xl.pt``) as pipeline folders.

    diffusers-speedup convert minsnr-vit ema_0.9999_xl.pt --output_dir minsnr-vit-xl2-imagenet256

Reads a state dict of ``guided_diffusion/vision_transformer.py``'s VisionTransformer (`vit_base_patch2_32`,
`vit_large_patch2_32`, `vit_xl_patch2_32`, ...) into `UViTModel` with the `vit-b-minsnr` options: learned time table,
query/value biases, no long skips, no final norm. The network takes the DDPM step ``t ∈ 0..999`` exactly as
guided-diffusion feeds it with ``rescale_timesteps=False``, under the cosine schedule (diffusers'
``squaredcos_cap_v2``), so neither the time input nor the token order (``[time, class, patches]`` in both) needs a
mapping. What the tensors cannot tell: the number of heads (from the width, as the official model functions set it,
or ``--num_heads``) and the regression target (``--prediction_type``; the released ImageNet-256 ViT-XL predicts x0).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..objectives import PREDICTION_TYPES
from .common import (
    CheckpointFormatError,
    check_state_dict_keys,
    load_mapped_state_dict,
    load_torch_state_dict,
    save_converted_pipeline,
    tensor_shape,
)
from .uvit import BLOCK_PARTS

SOURCE = "https://github.com/TiankaiHang/Min-SNR-Diffusion-Training"
# The repository publishes no licence file; its code builds on openai/guided-diffusion (MIT).
LICENSE = "other"
WHAT = "a Min-SNR VisionTransformer state dict (TiankaiHang/Min-SNR-Diffusion-Training)"
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # scripts_vit/sampler_edm.py decodes with it, latents / 0.18215
VAE_SCALING_FACTOR = 0.18215
# Heads of the official model functions by width: vit_base 768/12, vit_large 1024/16, vit_xl 1152/16.
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16}
NAMES_BY_WIDTH = {768: "B", 1024: "L", 1152: "XL"}

# Official name inside blocks.{i} -> UViTModel name inside in_blocks.{i}: U-ViT's block with q and v biases only.
_BLOCK_PARTS = {**BLOCK_PARTS, "attn.q_bias": "attn.q_bias", "attn.v_bias": "attn.v_bias"}


def official_key_map(depth: int, class_cond: bool, final_norm: bool, conv_last: bool) -> dict[str, str]:
    """Every key of an official VisionTransformer state dict with these options, mapped to its `UViTModel` key."""
    mapping = {
        "patch_embed.proj.weight": "patch_embed.weight",
        "patch_embed.proj.bias": "patch_embed.bias",
        "pos_embed": "pos_embed",
        "time_embedding.weight": "time_table.weight",
        "linear_projection.weight": "proj_out.weight",
        "linear_projection.bias": "proj_out.bias",
    }
    if class_cond:
        mapping["class_embedding.weight"] = "class_embed.weight"
    if final_norm:  # use_mean_pooling=False
        mapping.update({"norm.weight": "norm_out.weight", "norm.bias": "norm_out.bias"})
    if conv_last:
        mapping.update({"to_pixel.weight": "conv_out.weight", "to_pixel.bias": "conv_out.bias"})
    for i in range(depth):
        for official, ours in _BLOCK_PARTS.items():
            mapping[f"blocks.{i}.{official}"] = f"in_blocks.{i}.{ours}"
    return mapping


def convert_minsnr_vit_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    has_null_label: bool | None = None,
    path="<state dict>",
):
    """Builds the `UViTModel` (eval mode) holding an official Min-SNR VisionTransformer state dict.

    The official label table has ``num_classes + 1`` rows when trained with label dropout (the last is the null
    label) and ``num_classes`` otherwise. `has_null_label` says which; None takes 1001 rows as ImageNet with its
    null label and any other count as a table without one. A table without a null label gets an all-zero null row,
    which must not be used for guidance.
    """
    from ..models.uvit import UViTModel

    pattern = re.compile(r"blocks\.(\d+)\.")
    indices = {int(match.group(1)) for key in state if (match := pattern.match(key))}
    depth = max(indices) + 1 if indices else 0
    options = dict(
        class_cond="class_embedding.weight" in state,
        final_norm="norm.weight" in state,
        conv_last="to_pixel.weight" in state,
    )
    key_map = official_key_map(depth, **options)
    check_state_dict_keys(state, key_map, path, WHAT)
    hidden, in_channels, patch, _ = tensor_shape(state, "patch_embed.proj.weight", 4, path, WHAT)
    tokens = tensor_shape(state, "pos_embed", 3, path, WHAT)[1]
    extras = 2 if options["class_cond"] else 1
    side = math.isqrt(max(tokens - extras, 0))
    if side == 0 or side * side != tokens - extras:
        raise CheckpointFormatError(
            f"{path}: not {WHAT}: pos_embed has {tokens} tokens, not {extras} extra token(s) plus a square grid"
        )
    out_channels = tensor_shape(state, "linear_projection.weight", 2, path, WHAT)[0] // (patch * patch)
    label_rows = tensor_shape(state, "class_embedding.weight", 2, path, WHAT)[0] if options["class_cond"] else 0
    has_null = label_rows == 1001 if has_null_label is None else has_null_label and label_rows > 0
    num_heads = num_heads or HEADS_BY_WIDTH.get(hidden)
    if num_heads is None:
        raise CheckpointFormatError(
            f"{path}: width {hidden} is none of the official ViTs' ({sorted(HEADS_BY_WIDTH)}); pass --num_heads"
        )
    model = UViTModel(
        sample_size=side * patch,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=depth,
        hidden_size=hidden,
        num_attention_heads=num_heads,
        mlp_ratio=tensor_shape(state, "blocks.0.mlp.fc1.weight", 2, path, WHAT)[0] / hidden,
        qkv_bias="qv",
        num_classes=label_rows - int(has_null),
        use_long_skips=False,
        final_conv=options["conv_last"],
        final_norm=options["final_norm"],
        layer_norm_eps=1e-6,
        time_embedding_type="learned",
        num_time_embeddings=tensor_shape(state, "time_embedding.weight", 2, path, WHAT)[0],
        init_scheme="beit",
    )

    def adjust(key, tensor):
        if key == "class_embedding.weight" and not has_null:
            return torch.cat([tensor, tensor.new_zeros(1, tensor.shape[1])])
        return tensor

    load_mapped_state_dict(model, state, key_map, path, WHAT, adjust)
    return model.eval()


def minsnr_scheduler(prediction_type: str = "sample"):
    """guided-diffusion's cosine schedule with 1000 steps (diffusers' squaredcos_cap_v2, β capped at 0.999)."""
    from diffusers import DPMSolverMultistepScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type
    )


def load_minsnr_vit_checkpoint(path: str | os.PathLike, **options):
    """Reads an official checkpoint (plain tensors only; no pickled code runs) into a `UViTModel`; `options` are
    those of `convert_minsnr_vit_state_dict`."""
    state = load_torch_state_dict(path, WHAT)
    return convert_minsnr_vit_state_dict(state, path=path, **options)


def convert_minsnr_vit_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    prediction_type: str = "sample",
    num_heads: int | None = None,
    has_null_label: bool | None = None,
    vae: str | os.PathLike | None = None,
) -> Path:
    """Writes a `ClassConditionalPipeline` folder for an official Min-SNR ViT checkpoint.

    `prediction_type`: what the network was trained to predict (`--predict_xstart True` -> "sample", the default
    and the released model; `--predict_v True` -> "v_prediction"; neither -> "epsilon"). `vae` (latent models): a
    Hub id or folder of the AutoencoderKL, default stabilityai/sd-vae-ft-mse, with scaling factor 0.18215.
    """
    from diffusers import AutoencoderKL

    from ..pipelines import ClassConditionalPipeline

    scheduler = minsnr_scheduler(prediction_type)
    model = load_minsnr_vit_checkpoint(checkpoint, num_heads=num_heads, has_null_label=has_null_label)
    latent = model.config.in_channels == 4
    if not latent and vae is not None:
        raise ValueError(f"{checkpoint}: a pixel-space model ({model.config.in_channels} channels) takes no --vae")
    autoencoder = None
    if latent:
        autoencoder = AutoencoderKL.from_pretrained(vae or DEFAULT_VAE)
        autoencoder.register_to_config(scaling_factor=VAE_SCALING_FACTOR)
    pipeline = ClassConditionalPipeline(scheduler=scheduler, transformer=model, vae=autoencoder)

    config = model.config
    size = NAMES_BY_WIDTH.get(config.hidden_size, f"width {config.hidden_size}")
    resolution = config.sample_size * (8 if latent else 1)
    target = {"sample": "x0", "epsilon": "ε", "v_prediction": "v"}[prediction_type]
    facts = [
        f"The ViT-{size}/{config.patch_size} of Min-SNR-γ (Hang et al., ICCV 2023): {config.num_layers} blocks, "
        f"{config.num_classes} classes, {resolution}×{resolution} images, predicting {target}.",
        "It takes the DDPM step 0..999 of guided-diffusion's cosine schedule; the official sampler (EDM Heun on the "
        "same steps) is replaced here by DPM-Solver on that schedule.",
    ]
    if latent:
        facts.append(
            f"Decoded with {vae or DEFAULT_VAE} (scaling factor {VAE_SCALING_FACTOR}), as the official sampler."
        )
    facts.append("The repository publishes no licence file; ask its authors before redistributing the weights.")
    return save_converted_pipeline(
        pipeline,
        output_dir,
        model_name=f"minsnr-vit-{size.lower()}-{config.patch_size}",
        source=f"{SOURCE} ({Path(checkpoint).name})",
        license=LICENSE,
        description=" ".join(facts),
        # configs/in256/inference.sh: 50 steps, guidance 1.5 (ε = ε_u + 1.5·(ε_c − ε_u), diffusers' convention).
        sampling={"num_inference_steps": 50, "guidance_scale": 1.5 if config.num_classes > 0 else 1.0},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prediction_type",
        choices=PREDICTION_TYPES,
        default="sample",
        help="what the network predicts: 'sample' (x0, --predict_xstart True; the released model), 'epsilon' or "
        "'v_prediction' (--predict_v True)",
    )
    parser.add_argument("--num_heads", type=int, help="attention heads, for a width none of the official ViTs has")
    parser.add_argument(
        "--null_label",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the last label row is the null label (trained with --drop_label_prob > 0); default: yes for "
        "1001 rows, no otherwise",
    )
    parser.add_argument("--vae", help=f"AutoencoderKL (Hub id or folder) of a latent model; default {DEFAULT_VAE}")


def run(args: argparse.Namespace) -> Path:
    return convert_minsnr_vit_checkpoint(
        args.checkpoint,
        args.output_dir,
        prediction_type=args.prediction_type,
        num_heads=args.num_heads,
        has_null_label=args.null_label,
        vae=args.vae,
    )
