"""sihyun-yu/REPA's released SiT checkpoints (SiT-XL/2 trained 4M steps with REPA, FID 1.42) as pipeline folders.

    diffusers-speedup convert repa last.pt --output_dir repa-sit-xl-2-256 [--vae ema|mse|FOLDER]

Layouts, as REPA's ``generate.py`` loads them: the released ``last.pt`` (``utils.download_model``) is a plain state
dict of REPA's ``models/sit.py`` ``SiT``; a ``train.py`` checkpoint is a dict with ``"model"``, ``"ema"``,
``"opt"``, ``"args"`` and ``"steps"``, whose ``"ema"`` weights ``generate.py --ckpt`` takes. Both hold the REPA
projectors (``projectors.{k}.{0,2,4}``, the MLPs that map block ``encoder_depth``'s tokens to the encoder's
features), which only training uses: they are left out and counted. ``generate.py --legacy`` checkpoints, whose
blocks after the encoder depth are named ``decoder_blocks.{i}``, are renumbered as ``load_legacy_checkpoints`` does
(``blocks.{i + encoder_depth}``, the encoder depth being the number of ``blocks.*`` in the file).

REPA's SiT is DiT's network with the official names, so it is a `DiTModel` read from the shapes as `convert.dit` reads
DiT: no learned σ (``out_channels = in_channels``), the null label row (``class_dropout_prob`` 0.1), the timestep
fed unscaled in [0, 1] with t = 1 noise (this package's direction), and, when trained with ``--qk-norm``, timm's
affine LayerNorm QK-norm (`DiTModel`'s ``use_qk_norm``; found from the keys). ``--fused-attn`` only picks the
attention kernel.

The pipeline samples as the README's FID-1.42 command: ``generate.py --mode sde --num-steps 250 --path-type linear
--cfg-scale 1.8 --guidance-high 0.7``: REPA's ``euler_maruyama_sampler`` (w = 2t, linspace(1, 0.04, 250) and a last
mean step to 0), guidance 1.8 for t ≤ 0.7, and the SD ft-EMA VAE. Code and weights are MIT (sihyun-yu/REPA
``LICENSE``); the card says so.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models.dit_transformer import DiTModel
from . import dit
from .common import save_converted_pipeline

SOURCE_URL = (
    "https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
    "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0"
)
RELEASED_FILES = ("last.pt",)
LICENSE = "mit"  # sihyun-yu/REPA LICENSE
WHAT = "a sihyun-yu/REPA SiT checkpoint"
# REPA's --path-type as FlowScheduler's path ("cosine" is SiT's GVP: α = cos(πt/2), σ = sin(πt/2)).
PATHS = {"linear": "linear", "cosine": "gvp"}
# The README's FID-1.42 command (generate.py --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7).
SAMPLING = {"num_inference_steps": 250, "guidance_scale": 1.8, "guidance_interval": (0.0, 0.7)}

__all__ = ["convert_repa_checkpoint", "load_repa_checkpoint", "read_repa_state_dict"]


def read_repa_state_dict(
    path: str | os.PathLike, weights: str = "ema"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(network, projectors)``: the SiT weights of a REPA ``.pt`` file in the official names (legacy
    ``decoder_blocks`` renumbered), and the projector tensors that training alone uses, split off."""
    state = dit.read_dit_state_dict(path, weights, WHAT)
    projectors = {key: value for key, value in state.items() if key.startswith("projectors.")}
    network = {key: value for key, value in state.items() if not key.startswith("projectors.")}
    return _renumber_legacy_blocks(network), projectors


def _renumber_legacy_blocks(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """REPA's ``utils.load_legacy_checkpoints``: ``decoder_blocks.{i}`` → ``blocks.{i + encoder_depth}``."""
    if not any(key.startswith("decoder_blocks.") for key in state):
        return dict(state)
    encoder_depth = len({match.group(1) for key in state if (match := re.match(r"blocks\.(\d+)\.", key))})
    renamed = {}
    for key, value in state.items():
        if match := re.match(r"decoder_blocks\.(\d+)\.(.*)", key):
            key = f"blocks.{int(match.group(1)) + encoder_depth}.{match.group(2)}"
        renamed[key] = value
    return renamed


def load_repa_checkpoint(
    path: str | os.PathLike, weights: str = "ema", num_attention_heads: int | None = None
) -> tuple[DiTModel, dict[str, torch.Tensor]]:
    """A `DiTModel` holding a REPA checkpoint's SiT weights (in eval mode), and the projector tensors left out."""
    state, projectors = read_repa_state_dict(path, weights)
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    config = dit.dit_config_from_state_dict(state, path, num_attention_heads, WHAT, qk_norm=qk_norm)
    return dit.build_dit_model(state, config, path, WHAT), projectors


def convert_repa_checkpoint(
    path: str | os.PathLike,
    vae="ema",
    weights: str = "ema",
    num_attention_heads: int | None = None,
    path_type: str = "linear",
):
    """``(pipeline, projectors)``: a ``ClassConditionalPipeline`` of a REPA checkpoint that samples as REPA's
    ``generate.py --mode sde`` (`SAMPLING` for the FID-1.42 settings), and the projector tensors left out.

    Args:
        path: the ``.pt`` file.
        vae: "ema" or "mse" (``stabilityai/sd-vae-ft-*``; REPA's default is ema), a local folder or Hub id of an
            ``AutoencoderKL``, or an ``AutoencoderKL``.
        weights: for a ``train.py`` checkpoint, which weights to take ("ema", generate.py's, or "model").
        num_attention_heads: heads, for a width that is none of the paper's sizes.
        path_type: REPA's ``--path-type``, "linear" (the released model's) or "cosine".
    """
    from ..data import load_vae
    from ..pipelines.pipeline_class_conditional import ClassConditionalPipeline
    from ..schedulers import FlowScheduler

    if path_type not in PATHS:
        raise ValueError(f"path_type={path_type!r}: choose one of {sorted(PATHS)}")
    model, projectors = load_repa_checkpoint(path, weights, num_attention_heads)
    vae_model, _ = load_vae(dit.VAES.get(vae, vae) if isinstance(vae, str) else vae)
    # REPA's euler_maruyama_sampler: diffusion 2t whatever the path, last mean step from 0.04.
    scheduler = FlowScheduler(
        sampler="euler_maruyama", path=PATHS[path_type], diffusion_form="time", last_step_size=0.04
    )
    return ClassConditionalPipeline(transformer=model, scheduler=scheduler, vae=vae_model), projectors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    dit.add_arguments(parser)
    parser.add_argument(
        "--path_type",
        choices=sorted(PATHS),
        default="linear",
        help="REPA's --path-type the model was trained with (default: linear, the released model's)",
    )


def run(args: argparse.Namespace) -> Path:
    pipeline, projectors = convert_repa_checkpoint(
        args.checkpoint, args.vae, args.weights, args.num_attention_heads, args.path_type
    )
    count = len({key.split(".")[1] for key in projectors})
    parameters = sum(value.numel() for value in projectors.values())
    print(f"left out {count} REPA projector(s): {len(projectors)} tensors, {parameters:,} parameters (training only)")
    config = pipeline.transformer.config
    model_name, title, resolution = dit.model_name_and_title(config, "SiT")
    data = "ImageNet" if config.num_classes == 1000 else f"{config.num_classes} classes"
    source = Path(args.checkpoint).name
    if source in RELEASED_FILES:
        source = f"{source} of sihyun-yu/REPA ({SOURCE_URL})"
    low, high = SAMPLING["guidance_interval"]
    return save_converted_pipeline(
        pipeline,
        args.output_dir,
        model_name=f"repa-{model_name}",
        source=source,
        license=LICENSE,
        description=f"{title} at {resolution}×{resolution} trained with REPA, from Yu et al., Representation "
        "Alignment for Generation: Training Diffusion Transformers Is Easier Than You Think (ICLR 2025): "
        f"class-conditional on {data}, a velocity model on the {args.path_type} path (t = 1 noise). The "
        f"{count} projector(s) of the alignment loss ({parameters:,} parameters) are used only in training and are "
        "left out. It samples like REPA's FID-1.42 command (generate.py --mode sde --num-steps 250): "
        f"Euler–Maruyama with w = 2t, guidance scale {SAMPLING['guidance_scale']} for {low} ≤ t ≤ {high}. The "
        "paper's FID 1.80 (Table 4) guides every step with scale 1.35: `guidance_scale=1.35` and no "
        "`guidance_interval`.",
        sampling=SAMPLING,
    )
