"""Sampling speed: ClassConditionalPipeline against diffusers' DiTPipeline, and what limited-interval guidance saves.

    python benchmarks/bench_sampling.py --tiny                        # CPU smoke run, seconds
    python benchmarks/bench_sampling.py --output_dir outputs/bench_sampling       # one GPU

Two measurements, all with random weights (speed does not depend on them) and nothing downloaded:

1. **Same DiT, two pipelines.** A DiT-XL/2 with learned σ (the layout of facebook/DiT-XL-2-256) and the SD VAE
   architecture, sampled by ``ClassConditionalPipeline`` and by ``DiTPipeline`` with the same scheduler, number of
   steps and guidance scale (``--cases``, default DDIM 250 steps at w = 1.5 and DPM-Solver++ 50 steps at w = 4).
   Both decode with the VAE, as DiTPipeline always does.
2. **Limited-interval guidance** (Kynkäänniemi et al. 2024): an EDM2-XS UNet with the 32-step EDM Heun sampler
   (63 network evaluations) and w = 2, guided at every step versus only for σ in (0.19, 1.61] — the published
   FID-optimal interval of EDM2-XXL, 6 of the 32 steps — and unguided. Latents only (no VAE decode).

Network evaluations are counted by a hook on the denoiser: the rows it sees per image, so a guided evaluation of a
batch (conditional and unconditional halves) counts 2. Timing is wall clock, synchronised with the GPU, after one
short warm-up call of each pipeline. Writes ``sampling.json`` and ``sampling.md`` to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cache_latents import SD_VAE_CONFIG, TINY_VAE_CONFIG  # noqa: E402

DEFAULT_CASES = ("ddim:250:1.5", "dpm_solver:50:4.0")
TINY_CASES = ("ddim:10:1.5", "dpm_solver:5:4.0")
# EDM2-XXL's FID-optimal interval on the 32-step grid (steps 17–22), guidance-interval paper Table 1.
PUBLISHED_INTERVAL = (0.19, 1.61)
HEUN_STEPS = 32
INTERVAL_GUIDANCE_SCALE = 2.0
# DiT's training schedule (facebook/DiT-XL-2-256's scheduler config).
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


@dataclass
class SamplingResult:
    case: str
    pipeline: str
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    guidance_interval: tuple[float, float] | None
    batch_size: int
    seconds: float
    images_per_second: float
    nfe_per_image: float


def parse_case(text: str) -> tuple[str, int, float]:
    """ "scheduler:steps:guidance" → (scheduler, steps, guidance), e.g. "ddim:250:1.5"."""
    try:
        scheduler, steps, guidance = text.split(":")
        steps, guidance = int(steps), float(guidance)
    except ValueError:
        raise ValueError(f"--cases: {text!r} is not 'scheduler:steps:guidance', e.g. 'ddim:250:1.5'.") from None
    if scheduler not in ("ddim", "dpm_solver"):
        raise ValueError(f"--cases: scheduler {scheduler!r} in {text!r} must be 'ddim' or 'dpm_solver'.")
    if steps < 1:
        raise ValueError(f"--cases: steps in {text!r} must be >= 1.")
    return scheduler, steps, guidance


def make_scheduler(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler(**DIT_SCHEDULE)
    return DPMSolverMultistepScheduler(**DIT_SCHEDULE)


def build_dit(tiny: bool):
    from diffusers import DiTTransformer2DModel

    # The layout of facebook/DiT-XL-2-256, which both pipelines load. DiTPipeline's null label is hard-coded as
    # 1000, so even the tiny model has 1000 classes.
    xl_2 = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2, sample_size=32)
    size = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8) if tiny else {}
    return DiTTransformer2DModel(**{**xl_2, **size, "in_channels": 4, "out_channels": 8, "num_embeds_ada_norm": 1000})


def build_vae(tiny: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD_VAE_CONFIG))


def build_edm2(tiny: bool):
    from diffusers_speedup.models.edm2_unet import EDM2UNetModel

    if tiny:
        return EDM2UNetModel.from_preset(
            "edm2-xs",
            sample_size=8,
            model_channels=16,
            channel_mult=(1, 2),
            num_blocks=1,
            attn_resolutions=(4,),
            channels_per_head=16,
            num_classes=10,
        )
    return EDM2UNetModel.from_preset("edm2-xs")


class EvaluationCounter:
    """Counts the rows a denoiser evaluates (a forward pre-hook), to get network evaluations per image."""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.rows += args[0].shape[0]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(pipeline, counter: EvaluationCounter, device, batch_size: int, **kwargs) -> tuple[float, float]:
    """Run one pipeline call; returns (seconds, network evaluations per image)."""
    counter.rows = 0
    _synchronize(device)
    start = time.perf_counter()
    pipeline(**kwargs)
    _synchronize(device)
    return time.perf_counter() - start, counter.rows / batch_size


def bench_pipelines(args, device, dtype) -> list[SamplingResult]:
    """ClassConditionalPipeline vs DiTPipeline on one DiT, for each case."""
    from diffusers import DiTPipeline

    from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline

    torch.manual_seed(0)
    transformer = build_dit(args.tiny).to(device=device, dtype=dtype).eval()
    vae = build_vae(args.tiny).to(device=device, dtype=dtype).eval()
    counter = EvaluationCounter(transformer)
    labels = [i % 1000 for i in range(args.batch_size)]
    results = []
    for case in args.cases:
        scheduler_name, steps, guidance = parse_case(case)
        pipelines = {
            "ClassConditionalPipeline": ClassConditionalPipeline(
                transformer=transformer, vae=vae, scheduler=make_scheduler(scheduler_name)
            ),
            "DiTPipeline": DiTPipeline(transformer=transformer, vae=vae, scheduler=make_scheduler(scheduler_name)),
        }
        for name, pipeline in pipelines.items():
            pipeline.set_progress_bar_config(disable=True)
            call = dict(class_labels=labels, guidance_scale=guidance, output_type="pt")
            pipeline(**{**call, "num_inference_steps": 2})  # warm-up: kernels, allocator, cuDNN autotuning
            seconds, nfe = timed_call(
                pipeline,
                counter,
                device,
                args.batch_size,
                **call,
                num_inference_steps=steps,
                generator=torch.Generator(device).manual_seed(0),
            )
            results.append(
                SamplingResult(
                    case,
                    name,
                    scheduler_name,
                    steps,
                    guidance,
                    None,
                    args.batch_size,
                    seconds,
                    args.batch_size / seconds,
                    nfe,
                )  # fmt: skip
            )
            print(_format_line(results[-1]), flush=True)
    counter.handle.remove()
    return results


def bench_guidance_interval(args, device, dtype) -> list[SamplingResult]:
    """EDM Heun, 32 steps: guidance everywhere, in the published interval only, and none."""
    from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline
    from diffusers_speedup.schedulers.scheduling_edm_heun import EDMHeunScheduler

    torch.manual_seed(0)
    # Weights stay float32 (EDM2 keeps its Fourier features in float32) and autocast runs the matmuls in ``dtype``.
    unet = build_edm2(args.tiny).to(device=device).eval()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    counter = EvaluationCounter(unet)
    pipeline = ClassConditionalPipeline(unet=unet, scheduler=EDMHeunScheduler(prediction_type="sample"))
    pipeline.set_progress_bar_config(disable=True)
    labels = [i % pipeline.num_classes for i in range(args.batch_size)]
    with autocast:
        pipeline(
            class_labels=labels, num_inference_steps=2, guidance_scale=INTERVAL_GUIDANCE_SCALE, output_type="latent"
        )
    variants = [
        ("full CFG", INTERVAL_GUIDANCE_SCALE, None),
        ("interval CFG", INTERVAL_GUIDANCE_SCALE, PUBLISHED_INTERVAL),
        ("no CFG", 1.0, None),
    ]
    results = []
    for label, guidance, interval in variants:
        with autocast:
            seconds, nfe = timed_call(
                pipeline,
                counter,
                device,
                args.batch_size,
                class_labels=labels,
                num_inference_steps=HEUN_STEPS,
                guidance_scale=guidance,
                guidance_interval=interval,
                output_type="latent",
                generator=torch.Generator(device).manual_seed(0),
            )
        results.append(
            SamplingResult(
                f"edm2-xs heun {label}",
                "ClassConditionalPipeline",
                "edm_heun",
                HEUN_STEPS,
                guidance,
                interval,
                args.batch_size,
                seconds,
                args.batch_size / seconds,
                nfe,
            )  # fmt: skip
        )
        print(_format_line(results[-1]), flush=True)
    counter.handle.remove()
    return results


def _format_line(result: SamplingResult) -> str:
    return (
        f"{result.case:28s} {result.pipeline:25s} {result.images_per_second:9.2f} img/s  "
        f"{result.seconds:8.2f} s  NFE/img {result.nfe_per_image:6.1f}"
    )


def format_markdown(results: list[SamplingResult], environment: dict) -> str:
    lines = [
        f"Device: {environment['device']}; dtype {environment['dtype']}; batch {environment['batch_size']}; "
        f"torch {environment['torch']}.",
        "",
        "| case | pipeline | scheduler | steps | w | interval | NFE / image | wall (s) | img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        interval = "—" if r.guidance_interval is None else f"({r.guidance_interval[0]}, {r.guidance_interval[1]}]"
        lines.append(
            f"| {r.case} | {r.pipeline} | {r.scheduler} | {r.num_inference_steps} | {r.guidance_scale} | {interval} "
            f"| {r.nfe_per_image:.0f} | {r.seconds:.2f} | {r.images_per_second:.2f} |"
        )
    full = next((r for r in results if r.case.endswith("full CFG")), None)
    limited = next((r for r in results if r.case.endswith("interval CFG")), None)
    if full and limited:
        lines += [
            "",
            f"Limited-interval guidance saves {1 - limited.nfe_per_image / full.nfe_per_image:.0%} of the network "
            f"evaluations ({full.nfe_per_image:.0f} → {limited.nfe_per_image:.0f} per image) and "
            f"{1 - limited.seconds / full.seconds:.0%} of the wall time.",
        ]
    return "\n".join(lines)


def main(argv=None) -> list[SamplingResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=None, help=f"scheduler:steps:guidance, default {DEFAULT_CASES}")
    parser.add_argument("--batch_size", type=int, default=None, help="images per call (default 64; tiny 2)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU")
    parser.add_argument("--skip_interval", action="store_true", help="only the pipeline comparison")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU, few steps: a smoke run")
    parser.add_argument("--output_dir", default="outputs/bench_sampling")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
    args.cases = args.cases or list(TINY_CASES if args.tiny else DEFAULT_CASES)
    for case in args.cases:
        try:
            parse_case(case)
        except ValueError as error:
            parser.error(str(error))
    args.batch_size = args.batch_size or (2 if args.tiny else 64)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]

    results = bench_pipelines(args, device, dtype)
    if not args.skip_interval:
        results += bench_guidance_interval(args, device, dtype)

    environment = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": dtype_name,
        "batch_size": args.batch_size,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "command": "python benchmarks/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    table = format_markdown(results, environment)
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "sampling.json"), "w") as f:
        json.dump({"environment": environment, "results": [asdict(r) for r in results]}, f, indent=2)
    with open(os.path.join(args.output_dir, "sampling.md"), "w") as f:
        f.write(table + "\n")
    return results


if __name__ == "__main__":
    main()
