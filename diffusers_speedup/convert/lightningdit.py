"""hustvl/LightningDiT's released LightningDiT-XL/1 checkpoints, with their VA-VAE tokenizer, as pipeline folders.

    diffusers-speedup convert lightningdit lightningdit-xl-imagenet256-800ep.pt --output_dir lightningdit-xl-1-256 \\
        --vae vavae-imagenet256-f16d32-dinov2.pt --latents_stats latents_stats.pt

Layouts, as LightningDiT's ``inference.py`` loads them: a ``train.py`` checkpoint is a dict with ``"model"``, ``"ema"``,
``"opt"`` and ``"config"``, whose ``"ema"`` weights inference takes (the default here too); a plain state dict of
``models/lightningdit.py`` ``LightningDiT`` is taken as it is. `DiTModel` has the official parameter names, the rotary
tables (``feat_rope.freqs_cos``, ``freqs_sin``) included, so the weights load without renaming. The options are read
from the keys (``mlp.w12``: SwiGLU; ``norm1.weight``: RMSNorm; ``feat_rope``: RoPE; ``attn.q_norm``: QK-norm;
``wo_shift``, a 4-chunk adaLN, has no `DiTModel` equivalent and is refused) and the sizes from the shapes; the released
XL/1 is the preset ``lightningdit-xl-1`` (SwiGLU, RMSNorm, RoPE, no QK-norm, no learned σ, 16×16×32 latents).

Time. LightningDiT's transport is SiT's (``transport/path.py`` ``ICPlan``: t = 1 is data), so the network is built with
``time_input="data_at_1"``, fed 1 − t and its velocity negated, as `convert.sit` does.

Sampling, as the README's pre-trained inference runs it (``inference.py`` with ``configs/reproductions/*``):
``sample_ode`` with Euler over ``th.linspace(0, 1, 250)`` warped by ``timestep_shift 0.3``, i.e. 249 Euler steps on the
grid that `FlowScheduler(shift=1 / 0.3)` builds (`scheduling_flow.shift_time`); ``forward_with_cfg`` guides only the
first 3 of the 32 latent channels (``guidance_channels=3``), and only where its time is at least
``cfg_interval_start`` c, which is ``guidance_interval=(0, 1 - c)`` in our time. The 800-epoch model's FID 1.35 uses
cfg 6.7 with c = 0.125, the 64-epoch model's 2.11 cfg 10.0 with c = 0.10 (the main config
``lightningdit_xl_vavae_f16d32.yaml`` says 10.0 and 0.11). Latents are decoded as ``z = x · std + mean`` with
``latents_stats.pt``: the VA-VAE folder must carry them (`convert.vavae`). Code and weights are MIT
(hustvl/LightningDiT ``LICENSE``); the card says so.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models.dit_transformer import LIGHTNINGDIT_PRESETS, DiTModel
from . import dit, vavae
from .common import CheckpointFormatError, check_state_dict_keys, save_converted_pipeline, tensor_shape

SOURCE_URL = "https://huggingface.co/hustvl"
LICENSE = "mit"  # hustvl/LightningDiT LICENSE
WHAT = "a hustvl/LightningDiT checkpoint"
# models/lightningdit.py LightningDiT_models: width → heads (B, L, XL, 1p0B, 1p6B).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16, 1536: 24, 1792: 28}
TIMESTEP_SHIFT = 0.3  # sample.timestep_shift of every released config
NUM_SAMPLING_STEPS = 250  # sample.num_sampling_steps: grid points, so 249 Euler steps
# configs/reproductions/lightningdit_xl_vavae_f16d32_{800ep,64ep}_cfg.yaml, and the main config for other files.
RELEASES = {
    "lightningdit-xl-imagenet256-800ep.pt": {
        "cfg_scale": 6.7,
        "cfg_interval_start": 0.125,
        "fid": "1.35 (2.17 without guidance)",
    },
    "lightningdit-xl-imagenet256-64ep.pt": {
        "cfg_scale": 10.0,
        "cfg_interval_start": 0.10,
        "fid": "2.11 (5.14 without guidance)",
    },
}
DEFAULT_SAMPLING = {"cfg_scale": 10.0, "cfg_interval_start": 0.11, "fid": None}  # lightningdit_xl_vavae_f16d32.yaml

__all__ = [
    "convert_lightningdit_checkpoint",
    "lightningdit_config_from_state_dict",
    "load_lightningdit_checkpoint",
    "official_lightningdit_keys",
    "released_sampling",
]


def official_lightningdit_keys(num_layers: int, swiglu: bool, rmsnorm: bool, rope: bool, qk_norm: bool) -> list[str]:
    """The state-dict keys of ``LightningDiT(use_swiglu, use_rmsnorm, use_rope, use_qknorm, wo_shift=False)`` with
    `num_layers` blocks (``nn.LayerNorm(elementwise_affine=False)`` has no tensors; RMSNorm has a weight)."""
    pair = ("weight", "bias")
    outer = ["pos_embed", "y_embedder.embedding_table.weight"]
    outer += [f"{name}.{part}" for name in ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2") for part in pair]
    outer += [f"final_layer.{name}.{part}" for name in ("linear", "adaLN_modulation.1") for part in pair]
    if rmsnorm:
        outer.append("final_layer.norm_final.weight")
    if rope:
        outer += ["feat_rope.freqs_cos", "feat_rope.freqs_sin"]
    block = [f"{name}.{part}" for name in ("attn.qkv", "attn.proj", "adaLN_modulation.1") for part in pair]
    block += [f"mlp.{name}.{part}" for name in (("w12", "w3") if swiglu else ("fc1", "fc2")) for part in pair]
    if rmsnorm:
        block += ["norm1.weight", "norm2.weight"]
    if qk_norm:
        block += [f"attn.{norm}.{part}" for norm in ("q_norm", "k_norm") for part in (("weight",) if rmsnorm else pair)]
    return outer + [f"blocks.{i}.{key}" for i in range(num_layers) for key in block]


def lightningdit_config_from_state_dict(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike, num_attention_heads: int | None = None
) -> dict:
    """`DiTModel` config (``time_input="data_at_1"``) of an official LightningDiT state dict: the options from its
    keys, the sizes from its shapes, after checking every key.

    Raises:
        CheckpointFormatError: one error naming every missing and unexpected key, or the shape that does not fit.
    """
    block_ids = {int(match.group(1)) for key in state if (match := re.match(r"blocks\.(\d+)\.", key))}
    num_layers = max(block_ids) + 1 if block_ids else 0
    swiglu = "blocks.0.mlp.w12.weight" in state
    rmsnorm = "blocks.0.norm1.weight" in state
    rope = "feat_rope.freqs_cos" in state
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    check_state_dict_keys(state, official_lightningdit_keys(num_layers, swiglu, rmsnorm, rope, qk_norm), path, WHAT)
    if num_layers == 0:
        raise CheckpointFormatError(f"{path}: not {WHAT}: it has no blocks.")

    hidden_size, in_channels, patch_size, _ = tensor_shape(state, "x_embedder.proj.weight", 4, path, WHAT)
    num_tokens = tensor_shape(state, "pos_embed", 3, path, WHAT)[1]
    grid_size = math.isqrt(num_tokens)
    if grid_size**2 != num_tokens:
        raise CheckpointFormatError(f"{path}: pos_embed has {num_tokens} tokens, not a square grid")
    out_features = tensor_shape(state, "final_layer.linear.weight", 2, path, WHAT)[0]
    if out_features % patch_size**2:
        raise CheckpointFormatError(
            f"{path}: final_layer.linear.weight has {out_features} outputs, not a multiple of patch_size² = "
            f"{patch_size**2}"
        )
    modulation = tensor_shape(state, "blocks.0.adaLN_modulation.1.weight", 2, path, WHAT)[0]
    if modulation != 6 * hidden_size:
        raise CheckpointFormatError(
            f"{path}: blocks.0.adaLN_modulation.1.weight has {modulation} outputs, not 6 × {hidden_size}: a model "
            "trained with wo_shift (adaLN without shifts), which DiTModel does not build"
        )
    if num_attention_heads is None:
        if rope:  # the rotary table is (tokens, head_dim): the heads follow from the file itself
            num_attention_heads = hidden_size // tensor_shape(state, "feat_rope.freqs_cos", 2, path, WHAT)[1]
        elif hidden_size in HEADS_BY_WIDTH:
            num_attention_heads = HEADS_BY_WIDTH[hidden_size]
        else:
            raise CheckpointFormatError(
                f"{path}: hidden size {hidden_size} is none of LightningDiT's sizes {sorted(HEADS_BY_WIDTH)}; give "
                "num_attention_heads (--num_attention_heads)"
            )
    if swiglu:
        mlp_ratio = 4.0  # SwiGLUFFN(hidden, int(2/3 · int(hidden · mlp_ratio))): only mlp_ratio 4 is ever built
        width = tensor_shape(state, "blocks.0.mlp.w3.weight", 2, path, WHAT)[1]
        if width != int(2 / 3 * int(hidden_size * mlp_ratio)):
            raise CheckpointFormatError(
                f"{path}: blocks.0.mlp.w3.weight is {width} wide, not LightningDiT's int(2/3 · 4 · {hidden_size}) = "
                f"{int(2 / 3 * int(hidden_size * mlp_ratio))}"
            )
    else:
        mlp_ratio = tensor_shape(state, "blocks.0.mlp.fc1.weight", 2, path, WHAT)[0] / hidden_size
    return {
        "sample_size": grid_size * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": out_features // patch_size**2,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "mlp_ratio": mlp_ratio,
        # the label table's last row is the null label (class_dropout_prob 0.1 in every LightningDiT)
        "num_classes": tensor_shape(state, "y_embedder.embedding_table.weight", 2, path, WHAT)[0] - 1,
        "class_dropout_prob": 0.1,
        "frequency_embedding_size": tensor_shape(state, "t_embedder.mlp.0.weight", 2, path, WHAT)[1],
        "mlp_type": "swiglu" if swiglu else "gelu",
        "norm_type": "rmsnorm" if rmsnorm else "layernorm",
        "use_rope": rope,
        "use_qk_norm": qk_norm,
        "time_input": "data_at_1",
    }


def load_lightningdit_checkpoint(
    path: str | os.PathLike, weights: str = "ema", num_attention_heads: int | None = None
) -> DiTModel:
    """A `DiTModel` holding a LightningDiT ``.pt`` file's weights (the ``"ema"`` entry of a ``train.py`` checkpoint by
    default, as ``inference.py``), called in this package's time direction, in float32 and eval mode."""
    state = dit.read_dit_state_dict(path, weights, WHAT)
    config = lightningdit_config_from_state_dict(state, path, num_attention_heads)
    return dit.build_dit_model(state, config, path, WHAT)


def released_sampling(checkpoint: str | os.PathLike) -> dict:
    """The sampling a checkpoint's release measured its FID with (``RELEASES`` by file name, else the main config's),
    as pipeline arguments (`num_inference_steps`, `guidance_scale`, `guidance_interval`, `guidance_channels`) plus
    the official values."""
    official = RELEASES.get(Path(checkpoint).name, DEFAULT_SAMPLING)
    start = official["cfg_interval_start"]
    return {
        "num_inference_steps": NUM_SAMPLING_STEPS - 1,
        "guidance_scale": official["cfg_scale"],
        "guidance_interval": (0.0, 1.0 - start),
        "guidance_channels": 3,
        "official": official,
    }


def _load_vae(vae, latents_stats):
    """``(AutoencoderKL with LightningDiT's normalisation, training-only tensors left out or None)`` from a VA-VAE
    ``.pt`` file, a folder or Hub id of an ``AutoencoderKL`` (e.g. one written by ``convert vavae``), or a model."""
    from diffusers import AutoencoderKL

    from ..data import load_vae

    if vae is None:
        raise ValueError(
            "convert lightningdit needs --vae: the VA-VAE checkpoint (vavae-imagenet256-f16d32-dinov2.pt) or a "
            "folder written by `diffusers-speedup convert vavae`"
        )
    if isinstance(vae, (str, os.PathLike)) and Path(vae).is_file():
        return vavae.convert_vavae_checkpoint(vae, latents_stats)
    model = vae if isinstance(vae, AutoencoderKL) else load_vae(str(vae))[0]
    if latents_stats is not None:
        model = vavae.normalised_vae(model, latents_stats)
    return model, None


def convert_lightningdit_checkpoint(
    path: str | os.PathLike,
    vae=None,
    latents_stats: str | os.PathLike | None = None,
    weights: str = "ema",
    num_attention_heads: int | None = None,
):
    """``(pipeline, vae_training_only)``: a ``ClassConditionalPipeline`` of a LightningDiT checkpoint with its VA-VAE,
    sampling with LightningDiT's Euler grid (`FlowScheduler(shift=1 / 0.3)`; `released_sampling` for the rest), and
    the VA-VAE file's training-only tensors that were left out (None for a VAE folder).

    Args:
        path: the ``.pt`` file.
        vae: the VA-VAE ``.pt`` file, or a folder or Hub id of an ``AutoencoderKL`` (``convert vavae``'s output), or an
            ``AutoencoderKL``; its latent channels must be the model's.
        latents_stats: LightningDiT's ``latents_stats.pt``; needed unless the VAE's config already holds
            ``latents_mean`` and ``latents_std``.
        weights: for a ``train.py`` checkpoint, which weights to take ("ema", inference.py's, or "model").
        num_attention_heads: heads, for a width that is none of LightningDiT's sizes and a model without RoPE.
    """
    from ..pipelines.pipeline_class_conditional import ClassConditionalPipeline
    from ..schedulers import FlowScheduler

    model = load_lightningdit_checkpoint(path, weights, num_attention_heads)
    vae_model, training_only = _load_vae(vae, latents_stats)
    channels = vae_model.config.latent_channels
    if channels != model.config.in_channels:
        raise ValueError(
            f"the VAE has {channels} latent channels but the LightningDiT in {path} takes {model.config.in_channels}"
        )
    if vae_model.config.get("latents_mean") is None or vae_model.config.get("latents_std") is None:
        raise ValueError(
            "the VAE's config has no latents_mean / latents_std, so the samples could not be decoded as LightningDiT "
            "decodes them; give --latents_stats latents_stats.pt (hustvl/vavae-imagenet256-f16d32-dinov2)"
        )
    scheduler = FlowScheduler(sampler="euler", path="linear", shift=1 / TIMESTEP_SHIFT)
    return ClassConditionalPipeline(transformer=model, scheduler=scheduler, vae=vae_model), training_only


def model_name_and_title(config, downsampling: int) -> tuple[str, str, int]:
    """``("lightningdit-xl-1-256", "LightningDiT-XL/1", 256)`` from a converted network's config."""
    resolution = config.sample_size * downsampling
    for name, shape in LIGHTNINGDIT_PRESETS.items():
        keys = ("num_layers", "hidden_size", "patch_size", "mlp_type", "norm_type", "use_rope", "use_qk_norm")
        if all(config[key] == shape[key] for key in keys):
            size, patch = name[len("lightningdit-") :].rsplit("-", 1)
            return f"{name}-{resolution}", f"LightningDiT-{size.upper()}/{patch}", resolution
    name = f"lightningdit-{config.num_layers}x{config.hidden_size}-{config.patch_size}-{resolution}"
    title = (
        f"A LightningDiT of {config.num_layers} blocks of width {config.hidden_size}, patch size {config.patch_size},"
    )
    return name, title, resolution


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vae",
        default=None,
        help="the VA-VAE checkpoint (vavae-imagenet256-f16d32-dinov2.pt) or a folder written by `convert vavae` "
        "(required)",
    )
    parser.add_argument(
        "--latents_stats",
        default=None,
        help="LightningDiT's latents_stats.pt (per-channel mean and std); needed unless the VAE folder records them",
    )
    dit.add_weight_arguments(parser, "ema, as inference.py", "LightningDiT's")


def run(args: argparse.Namespace) -> Path:
    pipeline, training_only = convert_lightningdit_checkpoint(
        args.checkpoint, args.vae, args.latents_stats, args.weights, args.num_attention_heads
    )
    if training_only is not None:
        print(f"VA-VAE: {vavae.describe_training_only(training_only)}")
    config, vae_config = pipeline.transformer.config, pipeline.vae.config
    downsampling = 2 ** (len(vae_config.block_out_channels) - 1)
    model_name, title, resolution = model_name_and_title(config, downsampling)
    data = "ImageNet" if config.num_classes == 1000 else f"{config.num_classes} classes"
    name = Path(args.checkpoint).name
    source = f"{name} of {SOURCE_URL}/{name.removesuffix('.pt')}" if name in RELEASES else name
    sampling = released_sampling(args.checkpoint)
    official = sampling["official"]
    low, high = sampling["guidance_interval"]
    fid = f" (FID-50K {official['fid']})" if official["fid"] else ""
    vae_path = Path(str(args.vae))  # a file, a local folder (named, not its full path), or a Hub id
    vae_source = vavae.source_name(vae_path) if vae_path.is_file() else vae_path.name if vae_path.is_dir() else args.vae
    return save_converted_pipeline(
        pipeline,
        args.output_dir,
        model_name=model_name,
        source=source,
        license=LICENSE,
        description=f"{title} at {resolution}×{resolution} from Yao, Yang & Wang, Reconstruction vs. Generation: "
        "Taming Optimization Dilemma in Latent Diffusion Models (CVPR 2025): class-conditional on "
        f"{data}, a velocity model on the linear path over {config.in_channels}-channel VA-VAE latents "
        f"(f{downsampling}d{vae_config.latent_channels}, from {vae_source}), decoded with the per-channel statistics "
        "of latents_stats.pt. LightningDiT's code runs time from noise (0) to data (1); the converted network is fed "
        "1 − t and its velocity negated (`time_input: data_at_1`). It samples like LightningDiT's inference.py: "
        f"Euler over its {NUM_SAMPLING_STEPS}-point grid ({NUM_SAMPLING_STEPS - 1} steps) warped by timestep_shift "
        f"{TIMESTEP_SHIFT} (the scheduler's `shift` = 1/{TIMESTEP_SHIFT}), guidance scale {official['cfg_scale']} "
        f"where its time is at least cfg_interval_start {official['cfg_interval_start']} (`guidance_interval=({low}, "
        f"{high:g})`){fid}. Its forward_with_cfg guides only the first 3 of the {config.in_channels} latent "
        "channels, and so does the example below (`guidance_channels=3`).",
        sampling={
            key: sampling[key]
            for key in ("num_inference_steps", "guidance_scale", "guidance_interval", "guidance_channels")
        },
    )
