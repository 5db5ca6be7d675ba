"""Convergence speed-up of the training recipes on the built-in digits, at equal budgets.

    python benchmarks/convergence.py --tiny                 # seconds on CPU: 2 recipes, a few steps (the test)
    python benchmarks/convergence.py                        # CPU default: 8 recipes, 500 steps each, < 30 min
    python benchmarks/convergence.py --gpu                  # larger: all recipes, 4000 steps, 3 seeds (GPU)

Every recipe trains the same small class-conditional U-ViT (the quickstart's: 16×16 grayscale digits, hidden 128,
7 layers, patch 4) with the real trainer and the same steps, batch, seed and learning-rate schedule; only the
objective (noise schedule, noise-level sampler, loss weighting) and the long-skip scaling change. Every
checkpoint exports a pipeline, and each is evaluated with its EMA weights:

* **Fréchet distance (FD)** between the held-out digits (the 180-image test split) and class-conditional samples
  (the same number per class and the same initial noise for every recipe), in the penultimate feature space of a
  small CNN trained once on the train split (``digits_classifier.py``); lower is better.
* **class accuracy**: the fraction of samples of class c that the classifier calls c.
* **held-out x0-MSE**: the unweighted denoising loss on the test split, made comparable across ε-, v-, x0- and EDM
  models by measuring every model's implied clean-image estimate x̂0: for each noise level of a fixed grid (the
  timesteps of the benchmark's DDPM schedule nearest to ln SNR = -6, -5, ..., 6), noise the test digits with a fixed
  noise draw (x_t = √ᾱ·x0 + √(1−ᾱ)·ε for DDPM-trained models; x = x0 + σ·ε with σ = SNR^-½ for EDM-trained ones),
  compute x̂0 (from ε̂, v̂ or the EDM denoiser D), clip it to the data range [-1, 1] (as DDIM does; otherwise the
  division by √ᾱ ≈ 0 at the noisiest levels dominates), and average mean((x̂0 − x0)²) over pixels, images and grid.

"Steps to reach" is the first step at which a recipe's curve reaches the baseline's final value, interpolating
linearly between evaluation points; the speed-up is the baseline's own steps-to-reach over the recipe's. Writes
``results.json`` (every number), ``results.md`` (the tables) and ``convergence.png`` (FD and x0-MSE against steps)
to ``--output_dir``. Finished runs are reused, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits_classifier.py next to this file

from digits_classifier import ClassifierSettings, digits_arrays, load_or_train_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
LOG_SNR_GRID = tuple(float(v) for v in range(-6, 7))


# --- recipes -----------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """One training recipe: overrides of the common setting.

    Args:
        label: how tables and the plot name it.
        overrides: ``key.sub=value`` overrides of configs/quickstart.yaml (after the common ones).
        weighting: the whole ``objective.weighting`` mapping (replaced, not merged, so no stray parameters remain).
        sampler: the whole ``objective.sampler`` mapping.
    """

    label: str
    overrides: list[str] = field(default_factory=list)
    weighting: dict = field(default_factory=lambda: {"kind": "constant"})
    sampler: dict = field(default_factory=lambda: {"kind": "uniform"})


SPEED_SAMPLER = {"kind": "speed", "k": 5.0, "lam": 0.6, "dual": True}  # τ: the schedule's pivot (the default)
RECIPES = {
    "baseline": Recipe("baseline (uniform t, ε, constant weight)"),
    "min_snr": Recipe("Min-SNR-5", weighting={"kind": "min_snr", "gamma": 5.0}),
    "soft_min_snr": Recipe("soft-min-SNR (γ=5)", weighting={"kind": "soft_min_snr", "gamma": 5.0}),
    "speed": Recipe("SpeeD (k=5, λ=0.6, dual)", sampler=SPEED_SAMPLER),
    "edm2": Recipe(
        "EDM2 weighting (EDM σ, log-normal, learned uncertainty)",
        # The U-ViT runs inside EDM's preconditioning; σ_data is the digits' standard deviation (0.70 in [-1, 1]),
        # as EDM prescribes, rather than CIFAR's 0.5.
        overrides=[
            "objective.schedule.kind=edm",
            "objective.schedule.sigma_data=0.7",
            "objective.learned_uncertainty=true",
            "sampling.scheduler=edm_heun",
        ],
        weighting={"kind": "edm"},
        sampler={"kind": "lognormal", "p_mean": -1.2, "p_std": 1.2},
    ),
    "scalelong_inv_sqrt2": Recipe("ScaleLong 1/√2", overrides=["model.params.skip_scaling=inv_sqrt2"]),
    "scalelong_constant": Recipe(
        "ScaleLong constant κ=0.5", overrides=["model.params.skip_scaling=constant", "model.params.skip_kappa=0.5"]
    ),
    "scalelong_learned": Recipe("ScaleLong learned", overrides=["model.params.skip_scaling=learned"]),
    "scalelong_learned_per_skip": Recipe(
        "ScaleLong learned per skip", overrides=["model.params.skip_scaling=learned_per_skip"]
    ),
    "min_snr_speed_scalelong": Recipe(
        "Min-SNR-5 + SpeeD + ScaleLong 1/√2",
        overrides=["model.params.skip_scaling=inv_sqrt2"],
        weighting={"kind": "min_snr", "gamma": 5.0},
        sampler=SPEED_SAMPLER,
    ),
}
DEFAULT_RECIPES = [
    "baseline",
    "min_snr",
    "soft_min_snr",
    "speed",
    "edm2",
    "scalelong_inv_sqrt2",
    "scalelong_constant",
    "min_snr_speed_scalelong",
]


@dataclass
class Setting:
    """The budget and evaluation shared by every recipe.

    Args:
        resolution, hidden_size, num_layers, num_heads, patch_size: the U-ViT and the data.
        batch_size, steps, eval_every, warmup_steps, lr: the training budget (constant LR after warm-up, so a
            curve's value at a step does not depend on the total budget).
        samples_per_class: conditional samples per class at each evaluation.
        inference_steps: network evaluations per sample (DDIM steps; EDM Heun gets (n+1)//2 steps, 2·steps−1 NFE).
        guidance_scale: classifier-free guidance at evaluation (1: none, the conditional model alone).
        classifier_epochs: training epochs of the feature classifier.
        recipes: recipe names; seeds: training seeds.
    """

    resolution: int = 16
    hidden_size: int = 128
    num_layers: int = 7
    num_heads: int = 4
    patch_size: int = 4
    batch_size: int = 64
    steps: int = 500
    eval_every: int = 100
    warmup_steps: int = 50
    lr: float = 1e-3
    samples_per_class: int = 20
    inference_steps: int = 16
    guidance_scale: float = 1.0
    classifier_epochs: int = 20
    recipes: list[str] = field(default_factory=lambda: list(DEFAULT_RECIPES))
    seeds: list[int] = field(default_factory=lambda: [0])


TINY = dict(
    resolution=8,
    hidden_size=32,
    num_layers=3,
    num_heads=2,
    batch_size=16,
    steps=4,
    eval_every=2,
    warmup_steps=0,
    samples_per_class=2,
    inference_steps=2,
    classifier_epochs=1,
    recipes=["baseline", "min_snr"],
)
GPU = dict(
    steps=4000,
    eval_every=250,
    warmup_steps=100,
    samples_per_class=100,
    inference_steps=50,
    recipes=list(RECIPES),
    seeds=[0, 1, 2],
)


def build_config(recipe_name: str, setting: Setting, seed: int, run_dir: Path):
    """The typed training config of one recipe under the common setting."""
    from diffusers_speedup.training import load_config
    from diffusers_speedup.training.config import validate_config

    if recipe_name not in RECIPES:
        raise ValueError(f"--recipes: unknown recipe {recipe_name!r}; available: {', '.join(RECIPES)}.")
    recipe = RECIPES[recipe_name]
    common = [
        f"train.output_dir={run_dir}",
        f"train.seed={seed}",
        f"train.batch_size={setting.batch_size}",
        f"train.max_steps={setting.steps}",
        f"train.checkpoint_every={setting.eval_every}",
        "train.checkpoints_total_limit=null",
        "train.export_every_checkpoint=true",
        "train.report_to=none",
        f"train.log_every={max(setting.steps // 6, 1)}",
        f"data.resolution={setting.resolution}",
        f"model.params.hidden_size={setting.hidden_size}",
        f"model.params.num_layers={setting.num_layers}",
        f"model.params.num_attention_heads={setting.num_heads}",
        f"model.params.patch_size={setting.patch_size}",
        "model.params.skip_scaling=none",
        "objective.prediction_type=epsilon",
        f"optim.lr={setting.lr}",
        "optim.lr_schedule=constant_with_warmup",
        f"optim.warmup_steps={setting.warmup_steps}",
        "sampling.images_per_class=1",
        f"sampling.num_inference_steps={setting.inference_steps}",
    ]
    config = load_config(QUICKSTART, common + recipe.overrides)
    config.objective.weighting = dict(recipe.weighting)
    config.objective.sampler = dict(recipe.sampler)
    validate_config(config)
    return config


# --- "steps to reach" --------------------------------------------------------------------------------------------


def steps_to_reach(steps, values, target: float, lower_is_better: bool = True) -> float | None:
    """The first step at which a curve reaches ``target``, linearly interpolated between evaluation points.

    Args:
        steps: increasing evaluation steps.
        values: the metric at those steps.
        target: the value to reach.
        lower_is_better: True for distances and losses, False for accuracies.

    Returns:
        The step (a float), ``steps[0]`` if the first point already reaches it, or None if the curve never does.
    """
    if len(steps) != len(values) or not steps:
        raise ValueError(f"steps_to_reach: need equally long, non-empty curves, got {len(steps)} and {len(values)}.")
    sign = 1.0 if lower_is_better else -1.0
    previous = None
    for step, value in zip(steps, values):
        if sign * value <= sign * target:
            if previous is None:
                return float(step)
            prev_step, prev_value = previous
            return float(prev_step + (step - prev_step) * (prev_value - target) / (prev_value - value))
        previous = (step, value)
    return None


# --- evaluation ---------------------------------------------------------------------------------------------------


@dataclass
class Evaluator:
    """Everything an evaluation compares against, built once and shared by every recipe."""

    classifier: object
    classifier_accuracy: float
    reference: object  # FIDStatistics of the held-out digits
    test_pixels: torch.Tensor  # (N, 1, H, W) in [-1, 1]
    test_labels: torch.Tensor
    sample_labels: list[int]
    sample_noise: torch.Tensor
    grid_timesteps: torch.Tensor
    grid_alphas_cumprod: torch.Tensor
    grid_noise: torch.Tensor  # (len(grid), N, 1, H, W)
    inference_steps: int
    guidance_scale: float

    @classmethod
    def build(cls, setting: Setting, cache_dir: Path, seed: int = 1234) -> Evaluator:
        from diffusers import DDPMScheduler

        from diffusers_speedup.evaluation import compute_fid_statistics

        classifier, accuracy = load_or_train_classifier(
            ClassifierSettings(setting.resolution, epochs=setting.classifier_epochs), cache_dir
        )
        test_images, test_labels = digits_arrays(setting.resolution, "test")
        reference = compute_fid_statistics(
            test_images.permute(0, 2, 3, 1).numpy(), feature_extractor=classifier.feature_extractor
        )
        # The grid of noise levels: timesteps of the quickstart's DDPM schedule nearest to the ln SNR targets.
        schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        alphas_cumprod = schedule.alphas_cumprod.double()
        log_snr = (alphas_cumprod / (1 - alphas_cumprod)).log()
        timesteps = torch.stack([(log_snr - target).abs().argmin() for target in LOG_SNR_GRID])
        generator = torch.Generator().manual_seed(seed)
        labels = [c for c in range(10) for _ in range(setting.samples_per_class)]
        shape = (1, setting.resolution, setting.resolution)
        return cls(
            classifier=classifier,
            classifier_accuracy=accuracy,
            reference=reference,
            test_pixels=test_images.float() / 127.5 - 1.0,
            test_labels=test_labels,
            sample_labels=labels,
            sample_noise=torch.randn((len(labels), *shape), generator=generator),
            grid_timesteps=timesteps,
            grid_alphas_cumprod=alphas_cumprod[timesteps].float(),
            grid_noise=torch.randn((len(timesteps), len(test_labels), *shape), generator=generator),
            inference_steps=setting.inference_steps,
            guidance_scale=setting.guidance_scale,
        )

    def quality(self, images_uint8: np.ndarray, labels) -> dict:
        """FD to the held-out digits and class accuracy of uint8 NHWC images with their intended labels."""
        from diffusers_speedup.evaluation import compute_fid_statistics

        statistics = compute_fid_statistics(images_uint8, feature_extractor=self.classifier.feature_extractor)
        predicted = self.classifier.predict(torch.from_numpy(images_uint8).permute(0, 3, 1, 2))
        return {
            "fd": statistics.frechet_distance(self.reference),
            "class_accuracy": (predicted == torch.as_tensor(labels)).float().mean().item(),
        }

    @torch.no_grad()
    def evaluate_pipeline(self, folder: Path) -> dict:
        """Sample from and measure the exported pipeline in ``folder``."""
        from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline

        pipeline = ClassConditionalPipeline.from_pretrained(folder)
        pipeline.set_progress_bar_config(disable=True)
        second_order = getattr(pipeline.scheduler, "order", 1) == 2
        steps = (self.inference_steps + 1) // 2 if second_order else self.inference_steps
        images = pipeline(
            self.sample_labels,
            num_inference_steps=steps,
            guidance_scale=self.guidance_scale,
            latents=self.sample_noise.clone(),
            output_type="np",
        ).images
        images = np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)
        return {**self.quality(images, self.sample_labels), **self.heldout_x0_mse(pipeline)}

    def heldout_x0_mse(self, pipeline) -> dict:
        """x0-space MSE of the pipeline's denoiser on the test digits over the fixed noise grid (see module doc)."""
        model, scheduler = pipeline.transformer, pipeline.scheduler
        prediction_type = scheduler.config.prediction_type
        x0, labels = self.test_pixels, self.test_labels
        per_level = []
        for index, timestep in enumerate(self.grid_timesteps.tolist()):
            alpha_bar = self.grid_alphas_cumprod[index]
            noise = self.grid_noise[index]
            if "sigma_data" in scheduler.config:  # EDM: x = x0 + σ·n through EDM's preconditioning
                sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
                sigma_data = scheduler.config.sigma_data
                noisy = x0 + sigma * noise
                c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
                c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
                c_out = -c_out if prediction_type == "v_prediction" else c_out
                c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
                c_noise = torch.full((len(x0),), sigma.log().item() / 4)
                output = model(c_in * noisy, c_noise, class_labels=labels, return_dict=False)[0]
                x0_hat = c_skip * noisy + c_out * output
            else:
                alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
                noisy = alpha * x0 + sigma * noise
                t = torch.full((len(x0),), timestep, dtype=torch.long)
                output = model(noisy, t, class_labels=labels, return_dict=False)[0]
                if prediction_type == "epsilon":
                    x0_hat = (noisy - sigma * output) / alpha
                elif prediction_type == "v_prediction":
                    x0_hat = alpha * noisy - sigma * output
                else:
                    x0_hat = output
            # Clipped to the data range, as DDIM does: at low SNR an ε-model's implied x̂0 = (x − σ·ε̂)/α divides
            # by α ≈ 0 and would otherwise dominate the average with errors no sampler ever sees.
            per_level.append((x0_hat.clamp(-1, 1) - x0).pow(2).mean().item())
        return {"heldout_x0_mse": float(np.mean(per_level)), "heldout_x0_mse_per_log_snr": per_level}


# --- running ------------------------------------------------------------------------------------------------------


def _run_identity(setting: dict) -> dict:
    """What decides one run's result: the setting without the lists of recipes and seeds being compared."""
    return {key: value for key, value in setting.items() if key not in ("recipes", "seeds")}


def run_recipe(
    recipe_name: str,
    seed: int,
    setting: Setting,
    evaluator: Evaluator,
    output_dir: Path,
    keep_checkpoints: bool = False,
    log=print,
) -> dict:
    """Train one recipe with one seed (or reuse a finished run) and evaluate it at every checkpoint."""
    from diffusers_speedup.training import Trainer

    run_dir = output_dir / "runs" / f"{recipe_name}_seed{seed}"
    result_path = run_dir / "evaluation.json"
    if result_path.is_file():
        saved = json.loads(result_path.read_text())
        if _run_identity(saved.get("setting") or {}) == _run_identity(asdict(setting)):
            log(f"{recipe_name} seed {seed}: reusing {result_path}")
            return saved
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or differently configured run: start it again
    config = build_config(recipe_name, setting, seed, run_dir)
    start = time.perf_counter()
    trainer = Trainer(config)
    trainer.train()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    curve = []
    for step in range(setting.eval_every, setting.steps + 1, setting.eval_every):
        folder = run_dir / "pipeline" if step == setting.steps else run_dir / f"checkpoint-{step}" / "pipeline"
        curve.append({"step": step, **evaluator.evaluate_pipeline(folder)})
        log(
            f"{recipe_name} seed {seed} step {step}: FD {curve[-1]['fd']:.3f} "
            f"acc {curve[-1]['class_accuracy']:.3f} x0-MSE {curve[-1]['heldout_x0_mse']:.4f}"
        )
    if curve[-1]["step"] != setting.steps:  # steps not a multiple of eval_every: the final export too
        curve.append({"step": setting.steps, **evaluator.evaluate_pipeline(run_dir / "pipeline")})
    result = {
        "recipe": recipe_name,
        "label": RECIPES[recipe_name].label,
        "seed": seed,
        "setting": asdict(setting),
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        "num_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "curve": curve,
    }
    if not keep_checkpoints:  # the optimizer states and raw weights are most of the disk; keep the exports
        for checkpoint in run_dir.glob("checkpoint-*"):
            for item in checkpoint.iterdir():
                if item.name != "pipeline":
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
    result_path.write_text(json.dumps(result, indent=1))
    return result


def mean_curve(runs: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """The seed-averaged curve of ``metric`` (all runs share the evaluation steps)."""
    steps = [point["step"] for point in runs[0]["curve"]]
    values = np.mean([[point[metric] for point in run["curve"]] for run in runs], axis=0)
    return steps, values.tolist()


def summarize(results: dict[str, list[dict]], baseline: str = "baseline") -> dict:
    """Per recipe: final metrics (seed mean and std) and steps to reach the baseline's final FD and x0-MSE."""
    summary = {}
    targets = {}
    if baseline in results:
        for metric in ("fd", "heldout_x0_mse"):
            targets[metric] = mean_curve(results[baseline], metric)[1][-1]
    base_steps = {m: steps_to_reach(*mean_curve(results[baseline], m), t) for m, t in targets.items()}
    for name, runs in results.items():
        row = {"label": runs[0]["label"], "seeds": [run["seed"] for run in runs]}
        for metric in ("fd", "class_accuracy", "heldout_x0_mse"):
            finals = [run["curve"][-1][metric] for run in runs]
            row[f"final_{metric}"] = float(np.mean(finals))
            row[f"final_{metric}_std"] = float(np.std(finals, ddof=1)) if len(finals) > 1 else None
        for metric, target in targets.items():
            reached = steps_to_reach(*mean_curve(runs, metric), target)
            row[f"steps_to_baseline_{metric}"] = reached
            # Reached at the first evaluation: the true step is at most that, so the speed-up is a lower bound.
            first_step = runs[0]["curve"][0]["step"]
            row[f"bound_{metric}"] = reached is not None and reached == first_step and name != baseline
            row[f"speedup_{metric}"] = base_steps[metric] / reached if reached and base_steps[metric] else None
        row["train_seconds"] = float(np.mean([run["train_seconds"] for run in runs]))
        summary[name] = row
    return summary


def _fmt_steps(value, bound: bool) -> str:
    return "not reached" if value is None else f"{'≤ ' if bound else ''}{value:.0f}"


def _fmt_speedup(value, bound: bool = False) -> str:
    return "—" if value is None else f"{'≥ ' if bound else ''}{value:.2f}×"


def _with_std(row: dict, metric: str, spec: str) -> str:
    std = row[f"final_{metric}_std"]
    return format(row[f"final_{metric}"], spec) + (f" ± {format(std, spec)}" if std is not None else "")


def markdown_tables(summary: dict, reference: dict) -> str:
    lines = [
        "| recipe | steps to baseline's final FD | speed-up (FD) | steps to baseline's final x0-MSE "
        "| speed-up (x0-MSE) | final FD ↓ | final class accuracy ↑ | final held-out x0-MSE ↓ | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary.values():
        lines.append(
            f"| {row['label']} | {_fmt_steps(row.get('steps_to_baseline_fd'), row.get('bound_fd'))} "
            f"| {_fmt_speedup(row.get('speedup_fd'), row.get('bound_fd'))} "
            f"| {_fmt_steps(row.get('steps_to_baseline_heldout_x0_mse'), row.get('bound_heldout_x0_mse'))} "
            f"| {_fmt_speedup(row.get('speedup_heldout_x0_mse'), row.get('bound_heldout_x0_mse'))} "
            f"| {_with_std(row, 'fd', '.3f')} | {_with_std(row, 'class_accuracy', '.3f')} "
            f"| {_with_std(row, 'heldout_x0_mse', '.4f')} "
            f"| {row['train_seconds']:.0f} |"
        )
    lines.append(
        f"| *real digits (train subset vs held-out)* | | | | | {reference['fd']:.3f} "
        f"| {reference['class_accuracy']:.3f} | | |"
    )
    return "\n".join(lines) + "\n"


# --- the plot (PIL; matplotlib is not a dependency) ------------------------------------------------------------

COLORS = ["#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


ASCII_FALLBACK = {
    "é": "e",
    "ε": "eps",
    "σ": "sigma",
    "√": "sqrt",
    "γ": "gamma",
    "κ": "kappa",
    "λ": "lambda",
    "τ": "tau",
    "↓": "",
    "↑": "",
    "×": "x",
}


def _font_and_text():
    """A font with Greek letters when DejaVu Sans is installed; else PIL's default and ASCII-only text."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", 11), str
    except OSError:
        return ImageFont.load_default(), lambda text: "".join(ASCII_FALLBACK.get(c, c) for c in text)


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = max(high - low, 1e-12)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def draw_panel(curves: dict[str, tuple[list, list]], title: str, ylabel: str, size=(520, 380)):
    """A line plot of ``{label: (steps, values)}`` with axes, ticks and a title, as a PIL image."""
    from PIL import Image, ImageDraw

    font, text = _font_and_text()
    width, height = size
    left, right, top, bottom = 62, 12, 28, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs = [x for steps, _ in curves.values() for x in steps]
    ys = [y for _, values in curves.values() for y in values if math.isfinite(y)]
    x_low, x_high = 0.0, max(xs)
    y_low, y_high = min(ys), max(ys)
    pad = 0.05 * max(y_high - y_low, 1e-9)
    y_low, y_high = y_low - pad, y_high + pad

    def to_pixel(x, y):
        px = left + (x - x_low) / (x_high - x_low) * (width - left - right)
        py = height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for x in _nice_ticks(x_low, x_high):
        px, _ = to_pixel(x, y_low)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px, height - bottom + 6), f"{x:g}", fill="black", font=font, anchor="ma")
    for y in _nice_ticks(y_low, y_high):
        _, py = to_pixel(x_low, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.line([left + 1, py, width - right - 1, py], fill="#e8e8e8")
        draw.text((left - 6, py), f"{y:.3g}", fill="black", font=font, anchor="rm")
    draw.text((width / 2, 8), text(title), fill="black", font=font, anchor="ma")
    draw.text(((left + width - right) / 2, height - 14), "training steps", fill="black", font=font, anchor="ma")
    draw.text((left, top - 14), text(ylabel), fill="black", font=font, anchor="ma")
    for index, (steps, values) in enumerate(curves.values()):
        color = COLORS[index % len(COLORS)]
        points = [to_pixel(x, y) for x, y in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=color)
    return image


def draw_plot(results: dict[str, list[dict]], path: Path) -> None:
    """FD and held-out x0-MSE against steps, side by side, with a shared legend below; saved as PNG."""
    from PIL import Image, ImageDraw

    labels = {name: runs[0]["label"] for name, runs in results.items()}
    panels = [
        draw_panel(
            {labels[n]: mean_curve(r, "fd") for n, r in results.items()},
            "Fréchet distance (classifier features) to held-out digits",
            "FD",
        ),
        draw_panel(
            {labels[n]: mean_curve(r, "heldout_x0_mse") for n, r in results.items()},
            "held-out x0-MSE (mean over ln SNR -6..6)",
            "x0-MSE",
        ),
    ]
    font, text = _font_and_text()
    legend_rows = math.ceil(len(labels) / 2)
    width = sum(panel.width for panel in panels)
    height = panels[0].height + 10 + 16 * legend_rows
    figure = Image.new("RGB", (width, height), "white")
    x = 0
    for panel in panels:
        figure.paste(panel, (x, 0))
        x += panel.width
    draw = ImageDraw.Draw(figure)
    for index, label in enumerate(labels.values()):
        row, column = index % legend_rows, index // legend_rows
        lx, ly = 70 + column * width // 2, panels[0].height + 4 + 16 * row
        draw.line([lx, ly + 6, lx + 22, ly + 6], fill=COLORS[index % len(COLORS)], width=3)
        draw.text((lx + 28, ly), text(label), fill="black", font=font)
    figure.save(path, optimize=True)


# --- entry point --------------------------------------------------------------------------------------------------


def run_benchmark(
    setting: Setting,
    output_dir: str | Path,
    classifier_cache: str | Path | None = None,
    keep_checkpoints: bool = False,
    log=print,
) -> dict:
    """Train and evaluate every recipe × seed of ``setting``; write results.json, results.md and convergence.png.

    Returns the results dictionary written to results.json.
    """
    unknown = [name for name in setting.recipes if name not in RECIPES]
    if unknown:
        raise ValueError(f"--recipes: unknown recipe(s) {unknown}; available: {', '.join(RECIPES)}.")
    if setting.steps % setting.eval_every and setting.steps < setting.eval_every:
        raise ValueError(f"--eval_every={setting.eval_every} is larger than --steps={setting.steps}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    evaluator = Evaluator.build(setting, Path(classifier_cache or output_dir / "classifier"))
    log(f"classifier held-out accuracy {evaluator.classifier_accuracy:.4f}")

    # The floor: real training digits (as many as the samples, a fixed subset) against the held-out ones.
    train_images, train_labels = digits_arrays(setting.resolution, "train")
    subset = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
    subset = subset[: len(evaluator.sample_labels)]
    reference = evaluator.quality(train_images[subset].permute(0, 2, 3, 1).numpy(), train_labels[subset])

    results = {name: [] for name in setting.recipes}
    for name in setting.recipes:
        for seed in setting.seeds:
            results[name].append(run_recipe(name, seed, setting, evaluator, output_dir, keep_checkpoints, log))
    summary = summarize(results)
    table = markdown_tables(summary, reference)
    everything = {
        "setting": asdict(setting),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "classifier_test_accuracy": evaluator.classifier_accuracy,
        "log_snr_grid": list(LOG_SNR_GRID),
        "grid_timesteps": evaluator.grid_timesteps.tolist(),
        "real_data_reference": reference,
        "summary": summary,
        "runs": results,
        "total_seconds": time.perf_counter() - start,
    }
    (output_dir / "results.json").write_text(json.dumps(everything, indent=1))
    (output_dir / "results.md").write_text(table)
    draw_plot(results, output_dir / "convergence.png")
    log(table)
    return everything


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="seconds on CPU: 8×8 digits, 2 recipes, 4 steps")
    mode.add_argument("--gpu", action="store_true", help="larger: all recipes, 4000 steps, 3 seeds")
    parser.add_argument("--output_dir", default=None, help="default outputs/benchmarks/convergence[_tiny|_gpu]")
    parser.add_argument("--classifier_cache", default=None, help="default <output_dir>/classifier")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"any of: {' '.join(RECIPES)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    for name in ("steps", "eval_every", "batch_size", "samples_per_class", "inference_steps"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these sizes)")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep optimizer states and raw weights")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    preset = TINY if args.tiny else GPU if args.gpu else {}
    chosen = {
        key: getattr(args, key)
        for key in (
            "recipes",
            "seeds",
            "steps",
            "eval_every",
            "batch_size",
            "samples_per_class",
            "inference_steps",
            "guidance_scale",
        )
        if getattr(args, key) is not None
    }
    setting = Setting(**{**preset, **chosen})
    suffix = "_tiny" if args.tiny else "_gpu" if args.gpu else ""
    run_benchmark(
        setting,
        args.output_dir or f"outputs/benchmarks/convergence{suffix}",
        args.classifier_cache,
        args.keep_checkpoints,
    )


if __name__ == "__main__":
    main()
