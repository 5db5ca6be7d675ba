"""Training FLOPs per image and model FLOPs utilisation (MFU) for the benchmarked models.

    python benchmarks/flops.py                      # the published models (and the flow presets) at 256 / 512 px
    python benchmarks/flops.py --tiny               # the tiny CPU configurations of the smoke benchmarks
    python benchmarks/flops.py --repa               # also REPA's share of a training step (encoder, projector)

Counting convention:

* The "Gflops" that the DiT, U-ViT and EDM2 papers report are multiply-accumulates (MACs). One MAC is two floating
  point operations, so **FLOPs = 2 × MACs**. This file counts FLOPs and prints both.
* Only matrix products count (linear layers, convolutions, attention's two batched products), as in the papers;
  element-wise work (norms, activations, the optimizer) is not model FLOPs.
* A training step costs **3 × the forward pass** per image (the backward pass is about twice the forward).
  Gradient-checkpoint recompute is not counted, so MFU stays comparable across runs.
* MFU = achieved model FLOP/s ÷ the accelerator's dense bf16 peak (``PEAK_BF16_TFLOPS``); none is reported on CPU.

The count uses ``torch.utils.flop_counter.FlopCounterMode`` on a model built on the ``meta`` device at batch 1, so
it needs no memory and takes about a second even for DiT-XL/2 (and because torch registers no FLOP formula for
CPU's fused attention kernel, so a CPU count would miss attention; on meta, attention runs as two counted bmm). It reproduces the papers' figures: DiT-XL/2 118.62
GMAC against 118.64 (DiT Table 4), DiT-B/2 23.00 against 23.01, U-ViT-L/2 76.46 against 76.5 (counted from the
official config) and EDM2-XS 44.95 against 45.5 (EDM2 Table 2; -1.2 %, EDM2's counter also counts some element-wise work).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, SXM parts).
# Matched in order against the device name: the PCIe and NVL H100s have lower clocks than the SXM part.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.5,
    "H100 NVL": 835.5,
    "H100": 989.4,
    "H800": 989.4,
    "A100": 312.0,
}

# Forward-pass GMAC per image as published, with their sources.
PUBLISHED_FORWARD_GMACS = {
    "dit-b-2": (23.01, "DiT paper (Peebles & Xie 2023), Table 4"),
    "dit-xl-2": (118.64, "DiT paper, Table 4"),
    "uvit-l-2": (76.5, "counted from baofff/U-ViT configs/imagenet256_uvit_large.py"),
    "edm2-xs": (45.5, "EDM2 paper (Karras et al. 2024), Table 2"),
    "sit-xl-2": (118.64, "SiT paper (Ma et al. 2024), Table 1: DiT-XL/2's network and Gflops"),
    "sit-b-2": (23.01, "SiT paper (Ma et al. 2024), Table 1: DiT-B/2's network and Gflops"),
}


@dataclass
class BenchmarkModel:
    """A model of the benchmarks: how to build it and what one training sample looks like.

    Attributes:
        name: the benchmark's name for it, e.g. "dit-xl-2".
        build: returns a freshly initialised model (called inside a device context, so ``meta`` works).
        sample_shape: (channels, height, width) of one latent.
        num_classes: number of class labels; label ``num_classes`` is the null label.
        takes_sigma: True for σ-conditioned denoisers (EDM2UNetModel), called as ``model(x, sigma, labels)``;
            False for ``model(hidden_states=x, timestep=t, class_labels=labels)`` (DiT, U-ViT).
        resolution: image resolution the latent stands for (8× the latent size with the SD VAE).
    """

    name: str
    build: Callable[[], torch.nn.Module]
    sample_shape: tuple[int, int, int]
    num_classes: int
    takes_sigma: bool
    resolution: int


def _dit(preset: str, **overrides):
    def build():
        from diffusers_speedup.models.dit_transformer import DiTModel

        return DiTModel.from_preset(preset, **overrides)

    return build


def _uvit(preset: str, **overrides):
    def build():
        from diffusers_speedup.models.uvit import UViTModel

        return UViTModel.from_preset(preset, **overrides)

    return build


def _edm2(preset: str, **overrides):
    def build():
        from diffusers_speedup.models.edm2_unet import EDM2UNetModel

        return EDM2UNetModel.from_preset(preset, **overrides)

    return build


_LATENT_256 = dict(sample_size=32, in_channels=4)
# The published models at their paper resolutions: ImageNet-256 latents (32×32×4) for DiT and U-ViT, ImageNet-512
# latents (64×64×4) for EDM2. The DiTs predict the mean only (out_channels 4), as this package trains them.
MODELS = {
    "dit-b-2": BenchmarkModel(
        "dit-b-2",
        _dit("dit-b-2", **_LATENT_256, out_channels=4, num_classes=1000),
        (4, 32, 32),
        1000,
        False,
        256,
    ),
    "dit-xl-2": BenchmarkModel(
        "dit-xl-2",
        _dit("dit-xl-2", **_LATENT_256, out_channels=4, num_classes=1000),
        (4, 32, 32),
        1000,
        False,
        256,
    ),
    "uvit-l-2": BenchmarkModel(
        "uvit-l-2", _uvit("uvit-l", **_LATENT_256, patch_size=2, num_classes=1000), (4, 32, 32), 1000, False, 256
    ),
    "edm2-xs": BenchmarkModel("edm2-xs", _edm2("edm2-xs"), (4, 64, 64), 1000, True, 512),
}
# The flow-matching presets, counted by this script only (the throughput benchmark keeps to MODELS by default).
# SiT-XL/2 is DiT-XL/2's network. LightningDiT's SwiGLU has hidden width int(2/3 · 4d), so its three matrix products
# cost what GELU's two do (d·2h + h·d with h = 8d/3 is 8d², as 2·4d²); RoPE and RMSNorm are element-wise and not
# model FLOPs. LightningDiT-XL/1 on VA-VAE f16d32 latents (16×16×32) has DiT-XL/2's 256 tokens; only its patch
# embedding and final linear (32 values per token instead of 16) differ. The LightningDiT paper gives no Gflops.
FLOW_MODELS = {
    "sit-b-2": BenchmarkModel(
        "sit-b-2", _dit("sit-b-2", **_LATENT_256, out_channels=4, num_classes=1000), (4, 32, 32), 1000, False, 256
    ),
    "sit-xl-2": BenchmarkModel(
        "sit-xl-2", _dit("sit-xl-2", **_LATENT_256, out_channels=4, num_classes=1000), (4, 32, 32), 1000, False, 256
    ),
    "lightningdit-xl-2-sdvae": BenchmarkModel(  # the ladder's last SD-VAE rung: DiT-XL/2 + SwiGLU, RMSNorm, RoPE
        "lightningdit-xl-2-sdvae",
        _dit("lightningdit-xl-2", **_LATENT_256, out_channels=4, num_classes=1000),
        (4, 32, 32),
        1000,
        False,
        256,
    ),
    "lightningdit-xl-1": BenchmarkModel(
        "lightningdit-xl-1",
        _dit("lightningdit-xl-1", sample_size=16, in_channels=32, out_channels=32, num_classes=1000),
        (32, 16, 16),
        1000,
        False,
        256,
    ),
}
# Same families and code paths, a few thousand parameters each: the CPU smoke mode.
TINY_MODELS = {
    "dit-b-2": BenchmarkModel(
        "dit-b-2",
        _dit("dit-b-2", sample_size=8, in_channels=4, out_channels=4, num_layers=2, hidden_size=16,
             num_attention_heads=2, num_classes=10),
        (4, 8, 8), 10, False, 64,
    ),
    "dit-xl-2": BenchmarkModel(
        "dit-xl-2",
        _dit("dit-xl-2", sample_size=8, in_channels=4, out_channels=4, num_layers=3, hidden_size=24,
             num_attention_heads=2, num_classes=10),
        (4, 8, 8), 10, False, 64,
    ),
    "uvit-l-2": BenchmarkModel(
        "uvit-l-2",
        _uvit("uvit-l", sample_size=8, in_channels=4, patch_size=2, num_layers=3, hidden_size=32,
              num_attention_heads=2, num_classes=10),
        (4, 8, 8), 10, False, 64,
    ),
    "edm2-xs": BenchmarkModel(
        "edm2-xs",
        _edm2("edm2-xs", sample_size=8, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
              channels_per_head=16, num_classes=10),
        (4, 8, 8), 10, True, 64,
    ),
    # Measured only when named (the throughput benchmark's --repa): a 4×4 token grid, which DINOv2's 14 px patches
    # meet at REPA's 224·64/256 = 56 px.
    "sit-xl-2": BenchmarkModel(
        "sit-xl-2",
        _dit("sit-xl-2", sample_size=8, in_channels=4, out_channels=4, num_layers=3, hidden_size=24,
             num_attention_heads=2, num_classes=10),
        (4, 8, 8), 10, False, 64,
    ),
}  # fmt: skip


def get_models(names: list[str] | None = None, tiny: bool = False) -> list[BenchmarkModel]:
    """The benchmark models called ``names`` (all when None), full size or tiny."""
    registry = TINY_MODELS if tiny else {**MODELS, **FLOW_MODELS}
    names = list(MODELS) if names is None else names  # the tiny ones by the same names
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; choose from {sorted(registry)}.")
    return [registry[name] for name in names]


def model_inputs(spec: BenchmarkModel, batch_size: int, device="cpu") -> tuple:
    """Positional-free inputs of one forward pass: (noisy sample, noise level, class labels)."""
    x = torch.randn(batch_size, *spec.sample_shape, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    level = torch.ones(batch_size, device=device) if spec.takes_sigma else torch.full((batch_size,), 500, device=device)
    return x, level, labels


def run_forward(spec: BenchmarkModel, model: torch.nn.Module, x, level, labels) -> torch.Tensor:
    """One forward pass with the model family's calling convention; returns the output sample."""
    if spec.takes_sigma:
        return model(x, level, labels).sample
    return model(hidden_states=x, timestep=level, class_labels=labels).sample


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-accumulate) of the matrix products that ``fn()`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops_per_image(spec: BenchmarkModel) -> int:
    """Forward-pass FLOPs of one image, counted on a ``meta``-device copy of the model at batch 1."""
    with torch.device("meta"):
        model = spec.build()
    model.eval()  # dropout and label dropout off; EDM2's forced weight normalisation happens in training only
    inputs = model_inputs(spec, 1, device="meta")
    with torch.no_grad():
        return count_flops(lambda: run_forward(spec, model, *inputs))


def training_flops_per_image(spec: BenchmarkModel) -> int:
    """Model FLOPs of one image in one training step: forward + backward = 3 × forward."""
    return 3 * forward_flops_per_image(spec)


def parameter_count(spec: BenchmarkModel) -> int:
    with torch.device("meta"):
        model = spec.build()
    return sum(p.numel() for p in model.parameters())


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak in FLOP/s of ``device`` from ``PEAK_BF16_TFLOPS``; None on CPU or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    tflops = peak_bf16_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (e.g. "NVIDIA H100 80GB HBM3"), or None if it is not listed."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def mfu(images_per_second: float, flops_per_image: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s ÷ peak FLOP/s (None without a peak)."""
    if not peak:
        return None
    return images_per_second * flops_per_image / peak


@dataclass
class FlopsRow:
    model: str
    resolution: int
    parameters: int
    forward_gmacs: float
    forward_gflops: float
    published_forward_gmacs: float | None
    published_source: str | None
    relative_to_published: float | None
    training_gflops_per_image: float
    ideal_images_per_second_h100: float


def flops_table(names: list[str] | None = None, tiny: bool = False) -> list[FlopsRow]:
    rows = []
    if names is None and not tiny:
        names = [*MODELS, *FLOW_MODELS]
    for spec in get_models(names, tiny):
        forward = forward_flops_per_image(spec)
        published, source = (None, None) if tiny else PUBLISHED_FORWARD_GMACS.get(spec.name, (None, None))
        gmacs = forward / 2e9
        rows.append(
            FlopsRow(
                model=spec.name,
                resolution=spec.resolution,
                parameters=parameter_count(spec),
                forward_gmacs=gmacs,
                forward_gflops=forward / 1e9,
                published_forward_gmacs=published,
                published_source=source,
                relative_to_published=None if published is None else gmacs / published - 1,
                training_gflops_per_image=3 * forward / 1e9,
                ideal_images_per_second_h100=PEAK_BF16_TFLOPS["H100"] * 1e12 / (3 * forward),
            )
        )
    return rows


# REPA's extra work per training image (sihyun-yu/REPA's defaults): the frozen DINOv2-B/14 runs forward only, on the
# image resized to 224·R/256 px (R/16 × R/16 patches and the class token), and the projector (Linear D→2048, SiLU,
# Linear 2048→2048, SiLU, Linear 2048→768) runs forward and backward over the model's tokens. The block depth is the
# paper's (4 for B, 8 for L and XL); it changes no count.
REPA_ENCODER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14)
REPA_MODELS = {"sit-b-2": 4, "sit-xl-2": 8}


def repa_encoder_flops(resolution: int, encoder: dict = REPA_ENCODER) -> int:
    """Forward FLOPs of DINOv2-B/14 (or the DINOv2 of the ``Dinov2Config`` fields ``encoder``) on one image of
    ``resolution`` px as REPA feeds it (224·R/256 px), counted on the meta device with eager attention, so both
    attention products are counted."""
    from transformers import Dinov2Config, Dinov2Model

    side = 224 * resolution // 256
    config = Dinov2Config(**encoder, image_size=side, attn_implementation="eager")
    with torch.device("meta"):
        encoder = Dinov2Model(config).eval()
        pixels = torch.zeros(1, 3, side, side)
    with torch.no_grad():
        return count_flops(lambda: encoder(pixel_values=pixels))


def repa_projector_flops(hidden_size: int, tokens: int, projector_dim: int = 2048, z_dim: int = 768) -> int:
    """Training FLOPs (forward + backward = 3 × forward) of REPA's projector over ``tokens`` tokens of one image."""
    from diffusers_speedup.objectives.repa import mlp_projector

    with torch.device("meta"):
        projector = mlp_projector(hidden_size, projector_dim, z_dim)
        hidden = torch.zeros(1, tokens, hidden_size)
    with torch.no_grad():
        return 3 * count_flops(lambda: projector(hidden))


@dataclass
class RepaRow:
    model: str
    depth: int
    model_training_gflops: float
    encoder_gflops: float
    projector_gflops: float
    encoder_share: float  # ÷ the model's own training FLOPs per image
    projector_share: float


def repa_table(names: list[str] | None = None) -> list[RepaRow]:
    """REPA's share of a training step for the REPA models (`REPA_MODELS`), in training FLOPs per image."""
    rows = []
    for spec in get_models(list(REPA_MODELS) if names is None else names):
        with torch.device("meta"):
            model = spec.build()
        tokens = (model.config.sample_size // model.config.patch_size) ** 2
        training = training_flops_per_image(spec)
        encoder = repa_encoder_flops(spec.resolution)
        projector = repa_projector_flops(model.config.hidden_size, tokens)
        rows.append(
            RepaRow(
                model=spec.name,
                depth=REPA_MODELS.get(spec.name, 8),
                model_training_gflops=training / 1e9,
                encoder_gflops=encoder / 1e9,
                projector_gflops=projector / 1e9,
                encoder_share=encoder / training,
                projector_share=projector / training,
            )
        )
    return rows


def format_repa_table(rows: list[RepaRow]) -> str:
    lines = [
        "| model + REPA (DINOv2-B) | depth | model train GFLOP/img | encoder fwd GFLOP (share) "
        "| projector fwd+bwd GFLOP (share) | REPA in all |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.depth} | {_num(row.model_training_gflops)} "
            f"| {_num(row.encoder_gflops)} (+{100 * row.encoder_share:.1f} %) "
            f"| {_num(row.projector_gflops)} (+{100 * row.projector_share:.1f} %) "
            f"| +{100 * (row.encoder_share + row.projector_share):.1f} % |"
        )
    return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def format_table(rows: list[FlopsRow]) -> str:
    lines = [
        "| model | res | params (M) | fwd GMAC (counted) | fwd GMAC (published) | diff | train GFLOP/img "
        "| img/s at 100 % of H100 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        published = "—" if row.published_forward_gmacs is None else f"{row.published_forward_gmacs:.2f}"
        diff = "—" if row.relative_to_published is None else f"{100 * row.relative_to_published:+.2f} %"
        lines.append(
            f"| {row.model} | {row.resolution} | {_num(row.parameters / 1e6)} | {_num(row.forward_gmacs)} | {published} "
            f"| {diff} | {_num(row.training_gflops_per_image)} | {row.ideal_images_per_second_h100:,.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[FlopsRow]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help=f"subset of {[*MODELS, *FLOW_MODELS]}")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU configurations instead")
    parser.add_argument("--output_dir", default=None, help="also write flops.json and flops.md here")
    parser.add_argument("--repa", action="store_true", help=f"also REPA's share of a step for {list(REPA_MODELS)}")
    args = parser.parse_args(argv)
    rows = flops_table(args.models, args.tiny)
    table = format_table(rows)
    repa_rows = repa_table() if args.repa else []
    if repa_rows:
        table += "\n\n" + format_repa_table(repa_rows)
    print(table)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "flops.json"), "w") as f:
            json.dump([asdict(row) for row in rows], f, indent=2)
        if repa_rows:
            with open(os.path.join(args.output_dir, "flops_repa.json"), "w") as f:
                json.dump([asdict(row) for row in repa_rows], f, indent=2)
        with open(os.path.join(args.output_dir, "flops.md"), "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
