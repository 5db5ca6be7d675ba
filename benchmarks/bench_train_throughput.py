"""Training throughput and MFU: this package's training step against the plain loop a diffusers user would write.

    python benchmarks/bench_train_throughput.py --tiny                  # CPU smoke run, seconds
    python benchmarks/bench_train_throughput.py --output_dir outputs/bench_train          # one GPU, all models
    python benchmarks/bench_train_throughput.py --models dit-xl-2 --compile --output_dir outputs/bench_train_compile
    python benchmarks/bench_train_throughput.py --models sit-xl-2 --repa --output_dir outputs/bench_train_repa

For each model both loops train the same architecture from the same initial weights on the same random latents
(random latents cost what cached latents cost once they sit on the GPU):

* **package** — what ``Trainer.train`` runs per step: ``TrainingModule`` (model + ``DiffusionObjective``) prepared by
  accelerate with bf16 mixed precision, TF32, fused AdamW that skips non-finite steps on the device (no host read
  per step), PyTorch SDPA attention, gradient clipping, on-device loss and per-log-SNR sums, optionally ``torch.compile``
  (``--compile``) and EMA (``--ema``). The objective is the recipe's: Min-SNR-5 ε-prediction on DDPM's linear
  schedule for DiT and U-ViT; EDM2's σ-sampling, EDM weighting and learned uncertainty for EDM2; SiT's linear
  interpolant, velocity and uniform t for SiT (``configs/imagenet256/sit_xl2.yaml``).
* **plain** — the loop of diffusers' example scripts: ``DDPMScheduler.add_noise``, ``torch.autocast`` bf16, the
  model's default attention, ``F.mse_loss`` on ε (EDM2: its EDM-weighted loss on the denoised sample; SiT: on the
  velocity ε − x0 at x_t = (1 − t)·x0 + t·ε), ``torch.optim.AdamW`` without ``fused``, ``clip_grad_norm_(1.0)``,
  diffusers' ``EMAModel`` with ``--ema``, and a ``loss.item()`` every step for the progress bar.

``--repa`` adds SiT-XL/2 twice: ``sit-xl-2``, and ``sit-xl-2+repa``, the same network with REPA as
``configs/imagenet256/sit_xl2_repa.yaml`` sets it (block 8's output aligned with DINOv2-B's patch tokens, λ 0.5,
projector width 2048), so that the two give REPA's step-time overhead loop by loop. The package loop builds REPA from
the recipe's ``repa`` section as the trainer does (``check_repa_fits``, ``build_auxiliary_losses``) into
``TrainingModule``; the plain loop adds the drop-in ``RepresentationAlignment.attach`` to its own loop (the term's
mean added to the loss, the projector in its AdamW and its clipping). The encoder is a DINOv2-B with random weights
(``Dinov2Config``'s defaults are DINOv2-B's shape; nothing is downloaded, and the weights do not change the time),
saved to a temporary folder that the recipe's ``repa.encoder`` names; the clean images are random uint8
(B, 3, 256, 256) already on the device, as a cache's crops are once gathered.

Warm-up steps are excluded; timing is wall clock around ``--steps`` steps, synchronised with the GPU before and
after. Reports images/s, step time, MFU (model FLOPs from ``flops.py``: 3 × forward, FLOPs = 2 × MACs; with REPA
also the encoder's forward and the projector's forward and backward, as ``flops.py --repa`` counts them), peak
memory and the package/plain ratio, as a markdown table and JSON in ``--output_dir``. Imports nothing outside this
package's own dependencies, downloads nothing (random initialisation).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import (  # noqa: E402
    REPA_ENCODER,
    REPA_MODELS,
    BenchmarkModel,
    get_models,
    mfu,
    peak_flops,
    repa_encoder_flops,
    repa_projector_flops,
    run_forward,
    training_flops_per_image,
)

# Per-device batch that fits one 80 GB GPU without gradient checkpointing for both loops.
DEFAULT_BATCH_SIZES = {
    "dit-b-2": 256,
    "dit-xl-2": 128,
    "uvit-l-2": 128,
    "edm2-xs": 64,
    "sit-xl-2": 128,
    "sit-xl-2+repa": 128,
}
# --repa: this model with REPA (named with the suffix), next to it without.
REPA_MODEL, REPA_SUFFIX = "sit-xl-2", "+repa"
# The DINOv2 of the tiny run: DINOv2's 14 px patches, so REPA's 56 px input of a 64 px image is the tiny SiT's 4×4 grid.
TINY_ENCODER = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14)


@dataclass
class RepaSetting:
    """The recipe's ``repa`` section and the shape of the DINOv2 it aligns with (``Dinov2Config`` fields)."""

    depth: int
    projector_dim: int
    encoder: dict
    weight: float = 0.5


def repa_setting(tiny: bool) -> RepaSetting:
    """REPA as sit_xl2_repa.yaml sets it (block 8, λ 0.5, projector 2048, DINOv2-B), or its tiny counterpart."""
    if tiny:
        return RepaSetting(depth=2, projector_dim=32, encoder=TINY_ENCODER)
    return RepaSetting(depth=REPA_MODELS[REPA_MODEL], projector_dim=2048, encoder=REPA_ENCODER)


def save_random_encoder(folder: str, repa: RepaSetting) -> None:
    """A DINOv2 of ``repa.encoder``'s shape with random weights, saved where the recipe's ``repa.encoder`` points:
    the GPU machine cannot download facebook/dinov2-base. Its 518 px position table (dinov2-base's config) is
    resampled to the patch grid when it is loaded, as the released one is."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**repa.encoder, image_size=518)).save_pretrained(folder)


def repa_flops_per_image(spec: BenchmarkModel, repa: RepaSetting) -> int:
    """REPA's model FLOPs per training image: the encoder's forward and the projector's forward and backward."""
    with torch.device("meta"):
        model = spec.build()
    tokens = (model.config.sample_size // model.config.patch_size) ** 2
    encoder = repa_encoder_flops(spec.resolution, repa.encoder)
    return encoder + repa_projector_flops(
        model.config.hidden_size, tokens, repa.projector_dim, repa.encoder["hidden_size"]
    )


def _is_flow(spec: BenchmarkModel) -> bool:
    return spec.name.startswith(("sit-", "lightningdit-"))


@dataclass
class Result:
    model: str
    loop: str  # "package" or "plain"
    batch_size: int
    steps: int
    train_gflops_per_image: float | None = None  # model FLOPs of one image's step (3 × forward, 2 per MAC)
    images_per_second: float | None = None
    step_seconds: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    final_loss: float | None = None
    error: str | None = None
    failed: bool = False  # an error other than running out of memory


def _recipe(spec: BenchmarkModel, repa: RepaSetting | None = None, encoder: str | None = None) -> dict:
    """The objective and optimiser part of a training recipe for this model (the trainer's config format), with
    REPA's section when ``repa`` is given (``encoder``: the folder of its DINOv2)."""
    if _is_flow(spec):
        objective = {
            "schedule": {"kind": "flow", "path": "linear"},
            "prediction_type": "velocity",
            "sampler": {"kind": "uniform"},
            "weighting": {"kind": "constant"},
            "learned_variance": False,
            "label_dropout": 0.0,  # SiT's network drops labels itself
        }
    elif spec.takes_sigma:
        objective = {
            "schedule": {"kind": "edm"},
            "prediction_type": "sample",
            "weighting": {"kind": "edm"},
            "learned_uncertainty": True,
            "label_dropout": 0.0,
        }
    else:
        # diffusers' DiT drops labels itself (class_dropout_prob 0.1); U-ViT leaves it to the objective.
        objective = {
            "schedule": {"kind": "ddpm", "beta_schedule": "linear"},
            "prediction_type": "epsilon",
            "weighting": {"kind": "min_snr", "gamma": 5.0},
            "label_dropout": 0.0 if spec.name.startswith("dit") else 0.1,
        }
    # The model kind says how the objective calls the network (σ for EDM2, a timestep for the others) and, for REPA,
    # which blocks it reads.
    model = {"kind": "edm2_unet" if spec.takes_sigma else "dit" if _is_flow(spec) else "uvit"}
    recipe = {
        "model": model,
        "data": {"resolution": spec.resolution},
        "objective": objective,
        "optim": {"lr": 1e-4, "max_grad_norm": 1.0},
    }
    if repa is not None:
        recipe["repa"] = {
            "enabled": True,
            "encoder": encoder,
            "depth": repa.depth,
            "weight": repa.weight,
            "projector_dim": repa.projector_dim,
        }
    return recipe


def _fresh_accelerator(mixed_precision: str, device: torch.device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision; this
    # benchmark is single-process, so starting from a clean state is safe.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def package_step(
    spec: BenchmarkModel,
    model,
    device,
    mixed_precision: str,
    compile: bool,
    ema: bool,
    repa: RepaSetting | None = None,
    encoder: str | None = None,
):
    """Build this package's training step around ``model`` (with REPA when ``repa`` is given, its DINOv2 loaded
    from the folder ``encoder``); returns ``step(x0, labels, extras) -> loss tensor``."""
    from diffusers_speedup.data import Batch
    from diffusers_speedup.training.ema import ConstantEMA
    from diffusers_speedup.training.parts import (
        build_auxiliary_losses,
        build_noise_scheduler,
        build_objective,
        build_optimizer,
    )
    from diffusers_speedup.training.recipes import config_from_mapping
    from diffusers_speedup.training.step import LossTracker, NonFiniteSteps, TrainingModule, optimizer_step
    from diffusers_speedup.training.validation import check_repa_fits

    config = config_from_mapping(_recipe(spec, repa, encoder))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = _fresh_accelerator(mixed_precision, device)
    objective = build_objective(config, build_noise_scheduler(config.objective.schedule), spec.num_classes)
    # As the trainer builds them: none without REPA; with it, the batches bring the clean images, not features.
    check_repa_fits(config, model)
    auxiliary_losses = build_auxiliary_losses(config, model, SimpleNamespace(encoder_features=None))
    if compile:
        model.compile()  # in place, as the trainer does
    module = TrainingModule(model, objective, auxiliary_losses=auxiliary_losses)
    optimizer = build_optimizer(config, module.parameters(), accelerator.device)
    module, optimizer = accelerator.prepare(module, optimizer)
    averaged = ConstantEMA(model, decay=0.9999).to(accelerator.device) if ema else None
    tracker = LossTracker(device)
    nonfinite = NonFiniteSteps(config.train.max_consecutive_nonfinite, accelerator.device)
    trained = [p for p in module.parameters() if p.requires_grad]
    counter = {"step": 0}
    module.train()

    def step(x0, labels, extras):
        # The trainer's own optimizer step (one accumulation step), with its loss tracking, its non-finite
        # bookkeeping (the skipped steps and the weights' check after the update) and EMA.
        batches = [Batch(x0, labels, extras)]
        _, skipped = optimizer_step(accelerator, module, optimizer, batches, config.optim.max_grad_norm, tracker)
        nonfinite.record(skipped)
        nonfinite.record_weights(trained, counter["step"] + 1)
        counter["step"] += 1
        if averaged is not None:
            averaged.update(model, counter["step"])
        return tracker.loss

    return step


def plain_step(
    spec: BenchmarkModel,
    model,
    device,
    mixed_precision: str,
    ema: bool,
    repa: RepaSetting | None = None,
    encoder: str | None = None,
):
    """The training step of a hand-written diffusers-style script, with the drop-in REPA when ``repa`` is given;
    returns ``step(x0, labels, extras) -> loss tensor``."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    parameters = list(model.parameters())
    alignment = None
    if repa is not None:
        from diffusers_speedup import RepresentationAlignment

        alignment = RepresentationAlignment.attach(
            model,
            repa.depth,
            resolution=spec.resolution,
            encoder=encoder,
            weight=repa.weight,
            projector_dim=repa.projector_dim,
        ).to(device)
        parameters += list(alignment.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    ema_model = None
    if ema:
        from diffusers.training_utils import EMAModel

        ema_model = EMAModel(model.parameters(), decay=0.9999)
        ema_model.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    model.train()

    def step(x0, labels, extras):
        noise = torch.randn_like(x0)
        with autocast:
            if _is_flow(spec):
                # The linear interpolant, t = 1 being noise, regressed on the velocity.
                t = torch.rand(x0.shape[0], device=device)
                t4d = t[:, None, None, None]
                prediction = run_forward(spec, model, (1 - t4d) * x0 + t4d * noise, t, labels)
                loss = F.mse_loss(prediction.float(), (noise - x0).float())
            elif spec.takes_sigma:
                # EDM: log-normal σ, D(x0 + σn; σ) regressed on x0 with λ(σ) = (σ² + σ_d²) / (σ·σ_d)².
                sigma = (torch.randn(x0.shape[0], device=device) * 1.2 - 1.2).exp()
                sigma4d = sigma[:, None, None, None]
                denoised = run_forward(spec, model, x0 + sigma4d * noise, sigma, labels)
                weight = (sigma4d**2 + 0.25) / (sigma4d * 0.5) ** 2
                loss = (weight * (denoised.float() - x0) ** 2).mean()
            else:
                timesteps = torch.randint(0, 1000, (x0.shape[0],), device=device)
                noisy = noise_scheduler.add_noise(x0, noise, timesteps)
                prediction = run_forward(spec, model, noisy, timesteps, labels)
                loss = F.mse_loss(prediction.float(), noise.float())
            if alignment is not None:
                loss = loss + alignment(**extras).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if ema_model is not None:
            ema_model.step(model.parameters())
        loss.item()  # the per-step read of the progress bar / logger
        return loss

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, spec, batch_size, steps, warmup_steps, device, flops_per_image, peak, images=False) -> dict:
    """Time ``steps`` steps after ``warmup_steps`` untimed ones; same data every step. ``images``: the batch also
    brings clean uint8 images (B, 3, R, R), for REPA's encoder."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch_size, *spec.sample_shape, generator=generator).to(device)
    labels = torch.randint(0, spec.num_classes, (batch_size,), generator=generator).to(device)
    extras = {}
    if images:
        shape = (batch_size, 3, spec.resolution, spec.resolution)
        extras["image"] = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(device)
    for _ in range(warmup_steps):
        step(x0, labels, extras)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(x0, labels, extras)
    _synchronize(device)
    seconds = time.perf_counter() - start
    images_per_second = batch_size * steps / seconds
    return {
        "images_per_second": images_per_second,
        "step_seconds": seconds / steps,
        "mfu": mfu(images_per_second, flops_per_image, peak),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": float(loss.detach()),
    }


def run_model(spec: BenchmarkModel, args, device, peak, encoder: str | None = None) -> list[Result]:
    """Both loops on ``spec``; a ``+repa`` model with REPA, its DINOv2 loaded from the folder ``encoder``."""
    batch_size = args.batch_size or (4 if args.tiny else DEFAULT_BATCH_SIZES[spec.name])
    repa = repa_setting(args.tiny) if spec.name.endswith(REPA_SUFFIX) else None
    flops_per_image = training_flops_per_image(spec) + (0 if repa is None else repa_flops_per_image(spec, repa))
    results = []
    for loop in ("package", "plain"):
        result = Result(spec.name, loop, batch_size, args.steps, train_gflops_per_image=flops_per_image / 1e9)
        model = step = None
        try:
            torch.manual_seed(0)  # same initial weights for both loops
            model = spec.build().to(device)
            if loop == "package":
                step = package_step(spec, model, device, args.mixed_precision, args.compile, args.ema, repa, encoder)
            else:
                step = plain_step(spec, model, device, args.mixed_precision, args.ema, repa, encoder)
            for key, value in measure(
                step, spec, batch_size, args.steps, args.warmup_steps, device, flops_per_image, peak, repa is not None
            ).items():
                setattr(result, key, value)
        except torch.cuda.OutOfMemoryError as error:
            result.error = f"out of memory at batch {batch_size}: {str(error).splitlines()[0]}"
        except Exception as error:  # recorded, and the script exits non-zero: the other models still get measured
            traceback.print_exc()
            result.error = f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            result.failed = True
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(result)
        print(_format_line(result), flush=True)
    return results


def _format_line(result: Result) -> str:
    if result.error:
        return f"{result.model:13s} {result.loop:8s} {result.error}"
    line = f"{result.model:13s} {result.loop:8s} {result.images_per_second:10.1f} img/s  {1e3 * result.step_seconds:8.1f} ms/step"
    if result.mfu is not None:
        line += f"  MFU {100 * result.mfu:5.1f} %"
    if result.peak_memory_gib is not None:
        line += f"  {result.peak_memory_gib:5.1f} GiB"
    return line


def _fmt(value, pattern: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, pattern)


def format_markdown(results: list[Result], environment: dict) -> str:
    lines = [
        f"Device: {environment['device']}; mixed precision {environment['mixed_precision']}; "
        f"compile {environment['compile']}; EMA {environment['ema']}; {environment['steps']} timed steps after "
        f"{environment['warmup_steps']} warm-up steps; torch {environment['torch']}.",
        "",
        "| model | batch | loop | img/s | step (ms) | MFU | peak mem (GiB) | package / plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_model = {}
    for result in results:
        by_model.setdefault(result.model, {})[result.loop] = result
    for model, loops in by_model.items():
        package, plain = loops.get("package"), loops.get("plain")
        ratio = None
        if package and plain and package.images_per_second and plain.images_per_second:
            ratio = package.images_per_second / plain.images_per_second
        for loop, result in loops.items():
            if result.error:
                lines.append(f"| {model} | {result.batch_size} | {loop} | {result.error} | | | | |")
                continue
            lines.append(
                f"| {model} | {result.batch_size} | {loop} | {result.images_per_second:.1f} "
                f"| {_fmt(result.step_seconds, '.1f', 1e3)} | {_fmt(result.mfu, '.1%')} "
                f"| {_fmt(result.peak_memory_gib, '.1f')} | {_fmt(ratio, '.2f') + '×' if loop == 'package' and ratio else ''} |"
            )
    return "\n".join(lines)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="subset of dit-b-2 dit-xl-2 uvit-l-2 edm2-xs")
    parser.add_argument(
        "--repa", action="store_true", help=f"also {REPA_MODEL} with REPA (a random DINOv2-B) and without, after them"
    )
    parser.add_argument("--batch_size", type=int, default=None, help=f"per model default: {DEFAULT_BATCH_SIZES}")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per loop")
    parser.add_argument("--warmup_steps", type=int, default=10, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in the package loop")
    parser.add_argument("--ema", action="store_true", help="update an EMA copy every step in both loops")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--mixed_precision", default=None, choices=["bf16", "no"], help="default: bf16 on GPU")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU, 2 timed steps: a smoke run")
    parser.add_argument("--output_dir", default="outputs/bench_train_throughput")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
        args.steps, args.warmup_steps = min(args.steps, 2), min(args.warmup_steps, 1)
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error(f"--steps must be >= 1 and --warmup_steps >= 0, got {args.steps} and {args.warmup_steps}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    args.mixed_precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    specs = get_models(args.models, tiny=args.tiny)
    peak = peak_flops(device)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_repa_encoder_") as encoder:
        if args.repa:
            base = get_models([REPA_MODEL], tiny=args.tiny)[0]
            specs = [s for s in specs if s.name != REPA_MODEL] + [base, replace(base, name=REPA_MODEL + REPA_SUFFIX)]
            save_random_encoder(encoder, repa_setting(args.tiny))
        for spec in specs:
            results.extend(run_model(spec, args, device, peak, encoder))

    environment = {
        "device": describe_device(device),
        "peak_tflops": None if peak is None else peak / 1e12,
        "mixed_precision": args.mixed_precision,
        "compile": args.compile,
        "ema": args.ema,
        "repa": args.repa,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "command": "python benchmarks/bench_train_throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    table = format_markdown(results, environment)
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "train_throughput.json"), "w") as f:
        json.dump({"environment": environment, "results": [asdict(r) for r in results]}, f, indent=2)
    with open(os.path.join(args.output_dir, "train_throughput.md"), "w") as f:
        f.write(table + "\n")
    if any(r.final_loss is not None and not math.isfinite(r.final_loss) for r in results):
        print("warning: a loop ended with a non-finite loss", file=sys.stderr)
    return results


if __name__ == "__main__":
    failed = [f"{r.model} {r.loop}" for r in main() if r.failed]
    if failed:
        sys.exit(f"failed (see the tracebacks above): {', '.join(failed)}")
