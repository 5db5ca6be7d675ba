"""facebookresearch/DiT's released .pt checkpoints (DiT-XL/2 at 256 and 512 px) as pipeline folders.

    diffusers-speedup convert dit DiT-XL-2-256x256.pt --output_dir dit-xl-2-256 [--vae ema|mse|FOLDER]

The released files (``https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-{256x256,512x512}.pt``) are plain state dicts
of the official ``models.DiT``; a checkpoint written by DiT's ``train.py`` is a dict with ``"model"``, ``"ema"``,
``"opt"`` and ``"args"``, of which the EMA weights are taken by default. `DiTModel` has the official parameter
names, so the weights load without renaming; depth, width, patch size, latent size, channels and classes are read
from the tensor shapes (the number of heads from the width, by the paper's Table 1).

The pipeline samples as DiT's evaluation does: 250 DDPM steps evenly spread over the 1000 (``linspace``, DiT's
``space_timesteps``), the learned variance (``learned_range``), no clipping of the predicted sample, guidance scale
1.5 for FID and the SD ft-EMA VAE. The weights are CC-BY-NC 4.0, and the folder's model card says so.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models.dit_transformer import DIT_PRESETS, DiTModel
from .common import CheckpointFormatError, check_state_dict_keys, load_torch_state_dict, save_converted_pipeline

SOURCE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
RELEASED_FILES = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
LICENSE = "cc-by-nc-4.0"  # facebookresearch/DiT LICENSE.txt: Attribution-NonCommercial 4.0 International
VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
# DiT paper, Table 1: the shapes give the width, not how it splits into heads.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
WHAT = "a facebookresearch/DiT checkpoint"

_OUTER_KEYS = [
    "pos_embed",
    "x_embedder.proj.weight",
    "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias",
]
_BLOCK_KEYS = [
    f"{module}.{part}"
    for module in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    for part in ("weight", "bias")
]

__all__ = [
    "build_dit_model",
    "convert_dit_checkpoint",
    "dit_config_from_state_dict",
    "load_dit_checkpoint",
    "official_dit_keys",
]


_QK_NORM_KEYS = [f"attn.{norm}.{part}" for norm in ("q_norm", "k_norm") for part in ("weight", "bias")]


def official_dit_keys(num_layers: int, qk_norm: bool = False) -> list[str]:
    """The state-dict keys of the official ``models.DiT`` (or SiT, or REPA's SiT without its projectors) with
    `num_layers` blocks; `qk_norm` adds the affine LayerNorms of timm's ``Attention(qk_norm=True)`` (REPA's option)."""
    block_keys = _BLOCK_KEYS + (_QK_NORM_KEYS if qk_norm else [])
    return _OUTER_KEYS + [f"blocks.{i}.{key}" for i in range(num_layers) for key in block_keys]


def read_dit_state_dict(path: str | os.PathLike, weights: str = "ema", what: str = WHAT) -> dict[str, torch.Tensor]:
    """The weights in a DiT ``.pt`` file: the file itself when it is a state dict, else its `weights` entry
    ("ema" or "model") of a ``train.py`` checkpoint. Nothing in the file is executed (weights-only loading; the
    checkpoint's ``argparse.Namespace`` of training arguments is the one non-tensor object allowed). SiT's and
    REPA's files have the same two layouts; `what` names the family in errors."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r}: choose 'ema' or 'model'")
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = load_torch_state_dict(path, what)
    if all(isinstance(value, torch.Tensor) for value in state.values()):
        return state
    if isinstance(state.get(weights), Mapping):
        return dict(state[weights])
    raise CheckpointFormatError(
        f"{path}: not {what}: expected a state dict or a train.py checkpoint with a {weights!r} entry, found the "
        f"entries {sorted(map(str, state))}"
    )


def dit_config_from_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    num_attention_heads: int | None = None,
    what: str = WHAT,
    qk_norm: bool = False,
) -> dict:
    """`DiTModel` config of an official DiT state dict, read from its shapes after checking its keys (those of
    `official_dit_keys(num_layers, qk_norm)`; `what` names the family in errors).

    Raises:
        CheckpointFormatError: one error naming every missing and unexpected key, or the shape that does not fit.
    """
    block_ids = {int(match.group(1)) for key in state if (match := re.match(r"blocks\.(\d+)\.", key))}
    num_layers = max(block_ids) + 1 if block_ids else 0
    check_state_dict_keys(state, official_dit_keys(num_layers, qk_norm), path, what)
    if num_layers == 0:
        raise CheckpointFormatError(f"{path}: not {what}: it has no blocks.")

    hidden_size, in_channels, patch_size, _ = state["x_embedder.proj.weight"].shape
    num_tokens = state["pos_embed"].shape[1]
    grid_size = math.isqrt(num_tokens)
    if grid_size**2 != num_tokens:
        raise CheckpointFormatError(f"{path}: pos_embed has {num_tokens} tokens, not a square grid")
    out_features = state["final_layer.linear.weight"].shape[0]
    if out_features % patch_size**2:
        raise CheckpointFormatError(
            f"{path}: final_layer.linear.weight has {out_features} outputs, not a multiple of patch_size² = "
            f"{patch_size**2}"
        )
    if num_attention_heads is None:
        if hidden_size not in HEADS_BY_WIDTH:
            raise CheckpointFormatError(
                f"{path}: hidden size {hidden_size} is none of the paper's DiT sizes {sorted(HEADS_BY_WIDTH)}; "
                "give num_attention_heads (--num_attention_heads)"
            )
        num_attention_heads = HEADS_BY_WIDTH[hidden_size]
    # The released models train with label dropout, so the table's last row is the null label.
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    return {
        "sample_size": grid_size * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": out_features // patch_size**2,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        "num_classes": num_classes,
        "class_dropout_prob": 0.1,
        "frequency_embedding_size": state["t_embedder.mlp.0.weight"].shape[1],
        "use_qk_norm": qk_norm,
    }


def load_dit_checkpoint(
    path: str | os.PathLike, weights: str = "ema", num_attention_heads: int | None = None
) -> DiTModel:
    """A `DiTModel` holding the weights of an official DiT ``.pt`` file (see `read_dit_state_dict`), in eval mode."""
    state = read_dit_state_dict(path, weights)
    return build_dit_model(state, dit_config_from_state_dict(state, path, num_attention_heads), path)


def build_dit_model(
    state: Mapping[str, torch.Tensor], config: dict, path: str | os.PathLike, what: str = WHAT
) -> DiTModel:
    """A `DiTModel` of `config` holding `state` (checked keys, official names), in float32 and eval mode."""
    try:
        with torch.device("meta"):  # every weight comes from the file: skip initialising 675 M parameters
            model = DiTModel(**config)
    except ValueError as error:
        raise CheckpointFormatError(f"{path}: the shapes give an impossible network: {error}") from None
    try:
        model.load_state_dict({key: value.float() for key, value in state.items()}, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointFormatError(f"{path}: not {what} of consistent shapes: {error}") from None
    return model.eval()


def convert_dit_checkpoint(
    path: str | os.PathLike, vae="ema", weights: str = "ema", num_attention_heads: int | None = None
):
    """A ``ClassConditionalPipeline`` of an official DiT checkpoint that samples as DiT's ``sample_ddp.py``.

    Args:
        path: the ``.pt`` file.
        vae: "ema" or "mse" (``stabilityai/sd-vae-ft-*``, which DiT decodes with), a local folder or Hub id of an
            ``AutoencoderKL``, or an ``AutoencoderKL``.
        weights: for a ``train.py`` checkpoint, which weights to take ("ema" or "model").
        num_attention_heads: heads, for a width that is none of the paper's sizes.
    """
    from diffusers import DDPMScheduler

    from ..data import load_vae
    from ..pipelines.pipeline_class_conditional import ClassConditionalPipeline

    model = load_dit_checkpoint(path, weights, num_attention_heads)
    vae_model, _ = load_vae(VAES.get(vae, vae) if isinstance(vae, str) else vae)
    # DiT's diffusion: linear β from 1e-4 to 0.02 over 1000 steps, sampled with the learned variance, without
    # clipping the predicted x0 (sample_ddp.py's clip_denoised=False), respaced evenly (space_timesteps).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        variance_type="learned_range",
        clip_sample=False,
        timestep_spacing="linspace",
    )
    return ClassConditionalPipeline(transformer=model, scheduler=scheduler, vae=vae_model)


def model_name_and_title(config, family: str = "DiT") -> tuple[str, str, int]:
    """The folder's model name ("dit-xl-2-256"), the title ("DiT-XL/2") and the image resolution of a converted
    DiT-shaped network (DiT, SiT, REPA's SiT: `family`), from its config."""
    resolution = config.sample_size * 8  # the SD VAE's downsampling
    preset = next(
        (
            name
            for name, shape in DIT_PRESETS.items()
            if name.startswith("dit-")
            and all(config[key] == value for key, value in shape.items() if key != "num_attention_heads")
        ),
        None,
    )
    if preset is None:
        name = f"{family.lower()}-{config.num_layers}x{config.hidden_size}-{config.patch_size}-{resolution}"
        title = (
            f"A {family} of {config.num_layers} blocks of width {config.hidden_size}, patch size {config.patch_size},"
        )
        return name, title, resolution
    size, patch = preset[len("dit-") :].rsplit("-", 1)
    return f"{family.lower()}-{size}-{patch}-{resolution}", f"{family}-{size.upper()}/{patch}", resolution


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vae",
        default="ema",
        help="'ema' or 'mse' (stabilityai/sd-vae-ft-ema / -mse; DiT's, SiT's and REPA's FIDs use ema), or a folder or Hub id of an "
        "AutoencoderKL (default: ema)",
    )
    add_weight_arguments(parser, "ema; ignored for the released files", "the paper's DiT")


def add_weight_arguments(parser: argparse.ArgumentParser, default_note: str, family: str) -> None:
    """``--weights`` (a train.py checkpoint's EMA or raw weights) and ``--num_attention_heads``, the options of every
    DiT-shaped checkpoint (DiT, SiT, REPA, LightningDiT); ``default_note`` and ``family`` fill their help."""
    parser.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help=f"which weights of a train.py checkpoint to convert (default: {default_note})",
    )
    parser.add_argument(
        "--num_attention_heads",
        type=int,
        default=None,
        help=f"attention heads, for a width that is none of {family} sizes (inferred otherwise)",
    )


def run(args: argparse.Namespace) -> Path:
    pipeline = convert_dit_checkpoint(args.checkpoint, args.vae, args.weights, args.num_attention_heads)
    config = pipeline.transformer.config
    model_name, title, resolution = model_name_and_title(config)
    data = "ImageNet" if config.num_classes == 1000 else f"{config.num_classes} classes"
    source = Path(args.checkpoint).name
    if source in RELEASED_FILES:
        source = SOURCE_URL + source
    return save_converted_pipeline(
        pipeline,
        args.output_dir,
        model_name=model_name,
        source=source,
        license=LICENSE,
        description=f"{title} at {resolution}×{resolution} from Peebles & Xie, Scalable Diffusion Models with "
        f"Transformers (ICCV 2023): class-conditional on {data}, with a learned σ. "
        "It samples like DiT's FID evaluation with 250 DDPM steps, the learned variance and guidance scale 1.5.",
        sampling={"num_inference_steps": 250, "guidance_scale": 1.5},
    )
