"""willisma/SiT's released checkpoint (SiT-XL/2 at 256 px) as a pipeline folder.

    diffusers-speedup convert sit SiT-XL-2-256x256.pt --output_dir sit-xl-2-256 [--vae ema|mse|FOLDER]

The released file (``download.py``'s ``SiT-XL-2-256x256.pt``) is a plain state dict of SiT's ``models.SiT``, which
is DiT's network with the same parameter names (``learn_sigma=True``: 8 output channels, of which SiT's forward keeps
the first 4); a ``train.py`` checkpoint is a dict with ``"model"``, ``"ema"``, ``"opt"`` and ``"args"``, whose EMA
weights ``download.find_model`` takes. The shapes are read as `convert.dit` reads DiT's.

SiT's code runs time the other way from this package: its ``ICPlan`` (``transport/path.py``) has x_t = t·x_data +
(1 − t)·ε, so t = 0 is noise and the network predicts u = x_data − ε = −dx/dt in our time (t = 1 noise). The
converted `DiTModel` has ``time_input="data_at_1"``: it feeds the network 1 − t and negates its velocity, so the
pipeline drives it as every other flow model.

The pipeline samples as SiT's ``sample_ddp.py SDE`` does: Euler–Maruyama over 250 steps with ``--diffusion-form
sigma`` (w = σ, noise ``sqrt(2·w)``), ``--last-step Mean`` of size 0.04, the linear path, and the SD ft-EMA VAE; the
paper's 2.06 FID uses guidance scale 1.5. SiT's ``forward_with_cfg`` guides only the first 3 of the 4 latent
channels (DiT's "exact reproducibility" choice), which the pipeline repeats with ``guidance_channels=3``. The code and
weights are MIT-licensed (willisma/SiT ``LICENSE.txt``), and the card says so.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..models.dit_transformer import DiTModel
from . import dit
from .common import save_converted_pipeline

SOURCE_URL = (
    "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
    "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"
)
RELEASED_FILES = ("SiT-XL-2-256x256.pt", "SiT-XL-2-256.pt")
LICENSE = "mit"  # willisma/SiT LICENSE.txt
WHAT = "a willisma/SiT checkpoint"
# SiT's `--path-type` (Linear, GVP; VP has no FlowScheduler path) as FlowScheduler's path.
PATHS = {"linear": "linear", "gvp": "gvp"}

__all__ = ["convert_sit_checkpoint", "load_sit_checkpoint"]


def load_sit_checkpoint(
    path: str | os.PathLike, weights: str = "ema", num_attention_heads: int | None = None
) -> DiTModel:
    """A `DiTModel` holding an official SiT ``.pt`` file's weights, called in this package's time direction
    (``time_input="data_at_1"``), in eval mode."""
    state = dit.read_dit_state_dict(path, weights, WHAT)
    config = dit.dit_config_from_state_dict(state, path, num_attention_heads, WHAT)
    return dit.build_dit_model(state, {**config, "time_input": "data_at_1"}, path, WHAT)


def convert_sit_checkpoint(
    path: str | os.PathLike,
    vae="ema",
    weights: str = "ema",
    num_attention_heads: int | None = None,
    path_type: str = "linear",
):
    """A ``ClassConditionalPipeline`` of an official SiT checkpoint that samples as SiT's ``sample_ddp.py SDE``.

    Args:
        path: the ``.pt`` file.
        vae: "ema" or "mse" (``stabilityai/sd-vae-ft-*``), a local folder or Hub id of an ``AutoencoderKL``, or an
            ``AutoencoderKL``.
        weights: for a ``train.py`` checkpoint, which weights to take ("ema" or "model").
        num_attention_heads: heads, for a width that is none of the paper's sizes.
        path_type: the interpolant the model was trained on ("linear", the released model's, or "gvp").
    """
    from ..data import load_vae
    from ..pipelines.pipeline_class_conditional import ClassConditionalPipeline
    from ..schedulers import FlowScheduler

    if path_type not in PATHS:
        raise ValueError(f"path_type={path_type!r}: choose one of {sorted(PATHS)}")
    model = load_sit_checkpoint(path, weights, num_attention_heads)
    vae_model, _ = load_vae(dit.VAES.get(vae, vae) if isinstance(vae, str) else vae)
    scheduler = FlowScheduler(
        sampler="euler_maruyama", path=PATHS[path_type], diffusion_form="sigma", last_step_size=0.04
    )
    return ClassConditionalPipeline(transformer=model, scheduler=scheduler, vae=vae_model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    dit.add_arguments(parser)
    parser.add_argument(
        "--path_type",
        choices=sorted(PATHS),
        default="linear",
        help="the interpolant the model was trained on (SiT's --path-type; default: linear, the released model's)",
    )


def run(args: argparse.Namespace) -> Path:
    pipeline = convert_sit_checkpoint(args.checkpoint, args.vae, args.weights, args.num_attention_heads, args.path_type)
    config = pipeline.transformer.config
    model_name, title, resolution = dit.model_name_and_title(config, "SiT")
    data = "ImageNet" if config.num_classes == 1000 else f"{config.num_classes} classes"
    source = Path(args.checkpoint).name
    if source in RELEASED_FILES:
        source = f"{source} of willisma/SiT ({SOURCE_URL})"
    return save_converted_pipeline(
        pipeline,
        args.output_dir,
        model_name=model_name,
        source=source,
        license=LICENSE,
        description=f"{title} at {resolution}×{resolution} from Ma et al., SiT: Exploring Flow and Diffusion-based "
        f"Generative Models with Scalable Interpolant Transformers (ECCV 2024): class-conditional on {data}, a "
        f"velocity model on the {args.path_type} interpolant. SiT's code runs time from noise (0) to data (1); the "
        "converted network is fed 1 − t and its velocity negated (`time_input: data_at_1`), so it samples in this "
        "package's direction. It samples like SiT's FID evaluation (sample_ddp.py SDE): Euler–Maruyama with 250 "
        "steps, diffusion form sigma, a last mean step of 0.04, guidance scale 1.5 (FID 2.06 in the paper); SiT "
        "guides the first 3 of the 4 latent channels only, which `guidance_channels=3` repeats.",
        sampling={"num_inference_steps": 250, "guidance_scale": 1.5},
    )
