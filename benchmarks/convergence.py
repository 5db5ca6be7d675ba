"""Convergence study of the training recipes on the built-in digits: seeds, intervals, one change at a time.

    python benchmarks/convergence.py --tiny                       # seconds on CPU: 2 recipes, 2+1 seeds (the test)
    python benchmarks/convergence.py --jobs 2                     # the CPU study (see the estimate below)
    python benchmarks/convergence.py --gpu                        # the same recipes, longer, larger evaluation

**Recipes, one change at a time.** Every U-ViT recipe trains a small class-conditional U-ViT on the built-in
digits at their native 8×8 (grayscale; hidden 64, 7 layers, 4 heads, patch 2, no skip scaling, 0.38 M parameters)
with the real trainer (configs/quickstart.yaml plus overrides), the same batch, learning-rate schedule and steps;
each differs from the recipe it is compared with in one thing:

* ε, v and x0 prediction with constant weight, and Min-SNR-5 on each (compared with its own constant-weight
  baseline and with the ε baseline);
* SpeeD on the cosine schedule (τ = its pivot) against the ε baseline, and SpeeD on the paper's linear schedule
  with τ = 700 against a linear-schedule baseline;
* the EDM2 ladder: EDM preconditioning with the baseline's weight (ε-constant, i.e. x0-weight SNR) and the
  baseline's noise levels (a normal ln σ with the mean 0 and standard deviation π/2 of ln σ under uniform t on the
  cosine schedule: the EDM schedule only admits a log-normal σ), then + EDM's log-normal σ (−1.2, 1.2), + EDM
  weighting (unit weight on the F-target), + learned uncertainty with EDM2's per-sample sum over pixels
  (``objective.loss_reduction=sum``, as configs/cifar10/edm2_c.yaml); each against the step before;
* the paper's DiT (``model.kind=dit``: adaLN-Zero, learned σ trained with L_vb) sized like the U-ViT, baseline on the
  linear schedule against SpeeD (τ = 700), as configs/imagenet256/dit_b2_{baseline,speed}.yaml.

**Seeds and intervals.** Every recipe runs on the selection seeds (default 0 1 2). Every final metric and speed-up
carries the min–max over seeds and a 95 % percentile bootstrap interval (seeded; the recipe's and the reference's
seeds resampled independently).

**The phase that matters.** A speed-up is measured at a quality the reference reaches late: the target is the
reference's seed-mean curve at ``target_fraction`` (0.8) of the budget; "steps to reach" is each seed's first
step at that quality (linearly interpolated between evaluations), and the speed-up is the reference's mean steps
over the recipe's. A seed that never reaches it counts as the full budget, so the speed-up is then an upper bound.

**The best combination, on held-out seeds.** On the selection seeds, the ε-cosine U-ViT family is split into two
axes, the objective (prediction type and weighting) and the timestep sampler; the option with the largest FD
speed-up over the ε baseline wins each axis. Their combination and the baseline are then trained on the held-out
seeds (default 3 4 5) and only those runs report the combination's speed-up, so the choice never sees them.

**Budget and time (CPU).** The budget is set so that the ε baseline draws recognisable digits (class accuracy
above 0.5) before the end, measured with one-seed trial runs of the baseline (2026-12-01, 2-core AMD EPYC):

* the quickstart's model (16×16, hidden 128) at batch 64: class accuracy 0.13 at step 1500, at ≈ 4 steps/s per
  core — recognisable digits would need ≈ 5 h for the whole study;
* hidden 64 at 16×16, batch 64: class accuracy 0.13 (FD 101) at step 2000;
* hidden 64 at 8×8, batch 64: accuracy 0.41 at step 1600 and 0.64 at 2000; at batch 32 (the same images in twice
  the steps, at ≈ 1.8× the steps per second): 0.48 at step 2400, 0.65 at 3200, 0.77 at 4000.

The 16×16 digits are the 8×8 ones upscaled, so at 16×16 the same noise level leaves four times the signal-to-noise
ratio per original pixel and the uniform-t ε objective spends even less of its weight on the high noise levels that
decide the class. The study therefore trains at 8×8, batch 32, **3200 steps** (evaluations every 320; the target at
step 2560, where the baseline is at ≈ 0.5–0.6): 15 recipes × 3 selection seeds + (combination, baseline) × 3
held-out seeds = 51 runs of ≈ 170 s of training (≈ 19 steps/s per run with two runs at a time) + 10 evaluations
+ set-up, ≈ 200 s; ≈ 1 h 25 min with ``--jobs 2`` on two idle cores, longer while the cores are shared.

**Evaluation** of every checkpoint's exported pipeline (EMA weights):

* **Fréchet distance (FD)** between the held-out digits (the 180-image test split) and class-conditional samples
  (the same number per class and the same initial noise for every recipe), in the penultimate feature space of a
  small CNN trained once on the train split (``digits_classifier.py``); lower is better.
* **class accuracy**: the fraction of samples of class c that the classifier calls c (chance 0.10).
* **held-out x0-MSE**: the unweighted denoising loss on the test split in x0-space, comparable across ε-, v-, x0-
  and EDM models: at the timesteps of the cosine DDPM schedule nearest to ln SNR = −6, −5, ..., 6, the test digits
  are noised with a fixed draw (x_t = √ᾱ·x0 + √(1−ᾱ)·ε for DDPM-trained models; x = x0 + σ·ε with σ = SNR^-½ for
  EDM-trained ones), each model's implied x̂0 is clipped to [−1, 1] (as DDIM does) and mean((x̂0 − x0)²) is
  averaged over pixels, images and levels.

Writes ``results.json`` (every number), ``results.md`` (tables and the reading) and ``convergence.png`` (FD and
class accuracy against steps, one line per recipe, shaded min–max over seeds; matplotlib, the ``bench`` extra) to
``--output_dir``. Finished runs are reused, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits_classifier.py next to this file

from digits_classifier import ClassifierSettings, digits_arrays, load_or_train_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
LOG_SNR_GRID = tuple(float(v) for v in range(-6, 7))
# Per metric: True when lower is better.
METRICS = {"fd": True, "class_accuracy": False, "heldout_x0_mse": True}
# The published claims the reading checks (abstracts of Hang et al. 2023 and Wang et al. 2024).
CLAIMS = {"Min-SNR-γ": 3.4, "SpeeD": 3.0}


# --- recipes -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One training recipe: overrides of the common setting.

    Args:
        label: how tables and the plot name it.
        overrides: ``key.sub=value`` overrides of configs/quickstart.yaml (after the common ones).
        weighting: the whole ``objective.weighting`` mapping (replaced, not merged, so no stray parameters remain).
        sampler: the whole ``objective.sampler`` mapping.
        model: "uvit" or "dit" (the DiT is sized by the setting's ``dit_*`` fields).
        compare_to: the recipes this one differs from in one change; its speed-ups are measured against each.
        group: the plot panel it is drawn in.
        axis: for the combination search, ``("objective" | "sampler", option)``: which choice of the ε-cosine
            U-ViT family this recipe changes; None for recipes outside that family.
    """

    label: str
    overrides: tuple[str, ...] = ()
    weighting: tuple = (("kind", "constant"),)
    sampler: tuple = (("kind", "uniform"),)
    model: str = "uvit"
    compare_to: tuple[str, ...] = ("baseline",)
    group: str = "ε / v / x0 and Min-SNR"
    axis: tuple[str, str] | None = None


def _items(mapping: dict) -> tuple:
    return tuple(mapping.items())


MIN_SNR = _items({"kind": "min_snr", "gamma": 5.0})
SPEED_COSINE = _items({"kind": "speed", "k": 5.0, "lam": 0.6, "dual": True})  # τ: the schedule's pivot (the default)
SPEED_PAPER = _items({"kind": "speed", "k": 5.0, "tau": 700, "lam": 0.6, "dual": True})  # configs/imagenet256
LINEAR = ("objective.schedule.beta_schedule=linear", "objective.schedule.beta_start=0.0001")
LINEAR += ("objective.schedule.beta_end=0.02",)
# The U-ViT inside EDM's preconditioning; σ_data is the digits' standard deviation (0.70 in [-1, 1]), as EDM
# prescribes, rather than CIFAR's 0.5.
EDM = ("objective.schedule.kind=edm", "objective.schedule.sigma_data=0.7", "sampling.scheduler=edm_heun")
# Uniform t on the cosine schedule gives ln σ = ln tan(π t / 2T): a hyperbolic-secant law, mean 0, std π/2.
BASELINE_SIGMAS = _items({"kind": "lognormal", "p_mean": 0.0, "p_std": math.pi / 2})
EDM_SIGMAS = _items({"kind": "lognormal", "p_mean": -1.2, "p_std": 1.2})
# x0-space weight SNR: the ε baseline's constant weight, written for a model that regresses EDM's F-target.
EPSILON_WEIGHT = _items({"kind": "p2", "k": 1.0, "gamma": 0.0})
DIT = "DiT (linear β, learned σ)"
EDM_GROUP = "EDM2 ladder"
SPEED_GROUP = "SpeeD"

RECIPES = {
    "baseline": Recipe("ε, constant weight (baseline)", compare_to=(), axis=("objective", "baseline")),
    "min_snr": Recipe("ε, Min-SNR-5", weighting=MIN_SNR, axis=("objective", "min_snr")),
    "v_baseline": Recipe(
        "v, constant weight", ("objective.prediction_type=v_prediction",), axis=("objective", "v_baseline")
    ),
    "min_snr_v": Recipe(
        "v, Min-SNR-5",
        ("objective.prediction_type=v_prediction",),
        weighting=MIN_SNR,
        compare_to=("v_baseline", "baseline"),
        axis=("objective", "min_snr_v"),
    ),
    "x0_baseline": Recipe(
        "x0, constant weight", ("objective.prediction_type=sample",), axis=("objective", "x0_baseline")
    ),
    "min_snr_x0": Recipe(
        "x0, Min-SNR-5",
        ("objective.prediction_type=sample",),
        weighting=MIN_SNR,
        compare_to=("x0_baseline", "baseline"),
        axis=("objective", "min_snr_x0"),
    ),
    "speed": Recipe("SpeeD, cosine (τ = pivot)", sampler=SPEED_COSINE, group=SPEED_GROUP, axis=("sampler", "speed")),
    "linear_baseline": Recipe("ε, linear β, constant weight", LINEAR, group=SPEED_GROUP),
    "speed_linear": Recipe(
        "SpeeD, linear β (τ = 700)",
        LINEAR,
        sampler=SPEED_PAPER,
        compare_to=("linear_baseline", "baseline"),
        group=SPEED_GROUP,
    ),
    "edm_precond": Recipe(
        "EDM precond., baseline weight and σ", EDM, weighting=EPSILON_WEIGHT, sampler=BASELINE_SIGMAS, group=EDM_GROUP
    ),
    "edm_lognormal": Recipe(
        "+ log-normal σ",
        EDM,
        weighting=EPSILON_WEIGHT,
        sampler=EDM_SIGMAS,
        compare_to=("edm_precond", "baseline"),
        group=EDM_GROUP,
    ),
    "edm_weighting": Recipe(
        "+ EDM weighting",
        EDM,
        weighting=_items({"kind": "edm"}),
        sampler=EDM_SIGMAS,
        compare_to=("edm_lognormal", "baseline"),
        group=EDM_GROUP,
    ),
    "edm2": Recipe(
        "+ learned uncertainty, sum over pixels (EDM2)",
        (*EDM, "objective.learned_uncertainty=true", "objective.loss_reduction=sum"),
        weighting=_items({"kind": "edm"}),
        sampler=EDM_SIGMAS,
        compare_to=("edm_weighting", "baseline"),
        group=EDM_GROUP,
    ),
    # Not in the default study: whether EDM2's sum over pixels matters (it changes what max_grad_norm clips).
    "edm2_mean": Recipe(
        "+ learned uncertainty, mean over pixels",
        (*EDM, "objective.learned_uncertainty=true"),
        weighting=_items({"kind": "edm"}),
        sampler=EDM_SIGMAS,
        compare_to=("edm_weighting", "edm2"),
        group=EDM_GROUP,
    ),
    "dit_baseline": Recipe(DIT + ", baseline", LINEAR, model="dit", group=DIT),
    "dit_speed": Recipe(
        DIT + ", SpeeD (τ = 700)", LINEAR, sampler=SPEED_PAPER, model="dit", compare_to=("dit_baseline",), group=DIT
    ),
    # Not in the default study: the other recipes of the earlier one-seed runs (docs/benchmarks.md).
    "soft_min_snr": Recipe("ε, soft-min-SNR (γ=5)", weighting=_items({"kind": "soft_min_snr", "gamma": 5.0})),
    "scalelong_inv_sqrt2": Recipe("ScaleLong 1/√2", ("model.params.skip_scaling=inv_sqrt2",), group="ScaleLong"),
    "scalelong_constant": Recipe(
        "ScaleLong constant κ=0.5",
        ("model.params.skip_scaling=constant", "model.params.skip_kappa=0.5"),
        group="ScaleLong",
    ),
    "scalelong_learned": Recipe("ScaleLong learned", ("model.params.skip_scaling=learned",), group="ScaleLong"),
    "scalelong_learned_per_skip": Recipe(
        "ScaleLong learned per skip", ("model.params.skip_scaling=learned_per_skip",), group="ScaleLong"
    ),
    "min_snr_speed_scalelong": Recipe(
        "Min-SNR-5 + SpeeD + ScaleLong 1/√2",
        ("model.params.skip_scaling=inv_sqrt2",),
        weighting=MIN_SNR,
        sampler=SPEED_COSINE,
        group="ScaleLong",
    ),
}
STUDY_RECIPES = [
    "baseline",
    "min_snr",
    "v_baseline",
    "min_snr_v",
    "x0_baseline",
    "min_snr_x0",
    "speed",
    "linear_baseline",
    "speed_linear",
    "edm_precond",
    "edm_lognormal",
    "edm_weighting",
    "edm2",
    "dit_baseline",
    "dit_speed",
]
COMBINATION = "combination"


def combination_recipe(objective: str, sampler: str) -> Recipe:
    """The ε-cosine U-ViT recipe with the objective of recipe ``objective`` and the sampler of recipe ``sampler``."""
    chosen, sampled = RECIPES[objective], RECIPES[sampler]
    label = f"best combination: {chosen.label} + {'uniform t' if sampler == 'baseline' else sampled.label}"
    return Recipe(label, chosen.overrides, chosen.weighting, sampled.sampler, group="held-out seeds")


@dataclass
class Setting:
    """The budget, models and evaluation shared by every recipe.

    Args:
        resolution, hidden_size, num_layers, num_heads, patch_size: the U-ViT and the data.
        dit_hidden_size, dit_num_layers, dit_num_heads: the DiT (patch as the U-ViT); the defaults give about the
            U-ViT's parameter count.
        batch_size, steps, eval_every, warmup_steps, lr: the training budget (constant LR after warm-up, so a
            curve's value at a step does not depend on the total budget).
        samples_per_class: conditional samples per class at each evaluation.
        inference_steps: network evaluations per sample (DDIM steps; EDM Heun gets (n+1)//2 steps, 2·steps−1 NFE).
        guidance_scale: classifier-free guidance at evaluation (1: none, the conditional model alone).
        classifier_epochs: training epochs of the feature classifier.
        target_fraction: where on the reference's curve the speed-up target lies (0.8: step 0.8·steps).
        bootstrap_samples: resamples of every bootstrap interval.
        recipes: recipe names; seeds: the selection seeds; heldout_seeds: the seeds that report the combination
            (empty: no combination).
    """

    resolution: int = 8
    hidden_size: int = 64
    num_layers: int = 7
    num_heads: int = 4
    patch_size: int = 2
    dit_hidden_size: int = 64
    dit_num_layers: int = 5
    dit_num_heads: int = 4
    batch_size: int = 32
    steps: int = 3200
    eval_every: int = 320
    warmup_steps: int = 50
    lr: float = 1e-3
    samples_per_class: int = 20
    inference_steps: int = 16
    guidance_scale: float = 1.0
    classifier_epochs: int = 20
    target_fraction: float = 0.8
    bootstrap_samples: int = 2000
    recipes: list[str] = field(default_factory=lambda: list(STUDY_RECIPES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    heldout_seeds: list[int] = field(default_factory=lambda: [3, 4, 5])


TINY = dict(
    resolution=8,
    hidden_size=32,
    num_layers=3,
    num_heads=2,
    dit_hidden_size=32,
    dit_num_layers=2,
    dit_num_heads=2,
    batch_size=16,
    steps=4,
    eval_every=2,
    warmup_steps=0,
    samples_per_class=2,
    inference_steps=2,
    classifier_epochs=1,
    bootstrap_samples=200,
    recipes=["baseline", "min_snr"],
    seeds=[0, 1],
    heldout_seeds=[2],
)
# The same recipes and seeds; a budget at which the baseline converges, and a larger evaluation.
GPU = dict(steps=10000, eval_every=500, warmup_steps=100, samples_per_class=100, inference_steps=50)


def build_config(recipe: str | Recipe, setting: Setting, seed: int, run_dir: Path):
    """The typed training config of one recipe (a name of ``RECIPES`` or a Recipe) under the common setting."""
    from diffusers_speedup.training import load_config
    from diffusers_speedup.training.validation import validate_config

    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"--recipes: unknown recipe {recipe!r}; available: {', '.join(RECIPES)}.")
        recipe = RECIPES[recipe]
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
        "objective.prediction_type=epsilon",
        f"optim.lr={setting.lr}",
        "optim.lr_schedule=constant_with_warmup",
        f"optim.warmup_steps={setting.warmup_steps}",
        "sampling.images_per_class=1",
        f"sampling.num_inference_steps={setting.inference_steps}",
    ]
    if recipe.model not in ("uvit", "dit"):
        raise ValueError(f"Recipe {recipe.label!r}: unknown model {recipe.model!r}; use 'uvit' or 'dit'.")
    common += [
        f"model.params.hidden_size={setting.hidden_size}",
        f"model.params.num_layers={setting.num_layers}",
        f"model.params.num_attention_heads={setting.num_heads}",
        f"model.params.patch_size={setting.patch_size}",
        "model.params.skip_scaling=none",
    ]
    config = load_config(QUICKSTART, common + list(recipe.overrides))
    config.objective.weighting = dict(recipe.weighting)
    config.objective.sampler = dict(recipe.sampler)
    if recipe.model == "dit":
        # DiT as configs/imagenet256/dit_b2_baseline.yaml: it drops 10 % of the labels itself and learns its
        # variance with L_vb (the evaluation's DDIM sampler uses the mean prediction). Replaced after loading, as
        # the quickstart's U-ViT parameters are no DiT arguments.
        config.model.kind = "dit"
        config.model.preset = None
        config.model.params = {
            "patch_size": setting.patch_size,
            "hidden_size": setting.dit_hidden_size,
            "num_layers": setting.dit_num_layers,
            "num_attention_heads": setting.dit_num_heads,
        }
        config.objective.label_dropout = 0.0
        config.objective.learned_variance = True
    validate_config(config)
    return config


# --- statistics --------------------------------------------------------------------------------------------------


def bootstrap_interval(
    groups: list, statistic, samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*groups)``, each group resampled with replacement on its own.

    Args:
        groups: sequences of per-seed values (e.g. a recipe's and its reference's steps to reach a target).
        statistic: a function of one resample of every group, returning a number.
        samples: number of resamples.
        confidence: the interval's coverage (0.95: the 2.5th and 97.5th percentiles).
        seed: seed of the resampling, so that a report is reproducible.

    Returns:
        (low, high). Identical values give a zero-width interval.
    """
    arrays = [np.asarray(group, dtype=float) for group in groups]
    if not arrays or any(array.size == 0 for array in arrays):
        raise ValueError("bootstrap_interval: every group needs at least one value.")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_interval: confidence must lie in (0, 1), got {confidence}.")
    rng = np.random.default_rng(seed)
    draws = [array[rng.integers(0, array.size, size=(samples, array.size))] for array in arrays]
    values = np.array([statistic(*(draw[i] for draw in draws)) for i in range(samples)])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def spread(values, samples: int = 2000, seed: int = 0) -> dict:
    """Mean, min–max and a bootstrap interval of the mean of per-seed values."""
    values = [float(v) for v in values]
    low, high = bootstrap_interval([values], np.mean, samples=samples, seed=seed)
    return {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "ci": [low, high], "n": len(values)}


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


def value_at(steps, values, step: float) -> float:
    """A curve's value at ``step``, linearly interpolated between evaluation points."""
    if not steps[0] <= step <= steps[-1]:
        raise ValueError(f"value_at: step {step} lies outside the evaluated range [{steps[0]}, {steps[-1]}].")
    return float(np.interp(step, steps, values))


def curve(run: dict, metric: str) -> tuple[list[int], list[float]]:
    """One run's evaluation steps and its values of ``metric``."""
    return [point["step"] for point in run["curve"]], [point[metric] for point in run["curve"]]


def mean_curve(runs: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """The seed-averaged curve of ``metric`` (all runs share the evaluation steps)."""
    steps = curve(runs[0], metric)[0]
    return steps, np.mean([curve(run, metric)[1] for run in runs], axis=0).tolist()


def compare(runs: list[dict], reference: list[dict], metric: str, setting: Setting, seed: int = 0) -> dict:
    """The speed-up of ``runs`` over ``reference`` at the quality the reference's mean curve has late in training.

    The target is the reference's seed-mean ``metric`` at step ``target_fraction · steps``. Every seed of both
    gets its own steps to reach it; a seed that never does counts as the full budget (the speed-up is then an
    upper bound, ``censored``). Speed-up = mean reference steps / mean recipe steps; its spread is the min–max of
    the per-seed ratios (the reference's mean over each recipe seed) and a bootstrap interval over both groups.
    """
    lower = METRICS[metric]
    target_step = setting.target_fraction * setting.steps
    target = value_at(*mean_curve(reference, metric), target_step)

    def reach(group):
        reached = [steps_to_reach(*curve(run, metric), target, lower_is_better=lower) for run in group]
        return [setting.steps if r is None else r for r in reached], sum(r is None for r in reached)

    recipe_steps, recipe_missed = reach(runs)
    reference_steps, reference_missed = reach(reference)
    ratio = lambda ref, rec: float(np.mean(ref) / np.mean(rec))
    per_seed = [float(np.mean(reference_steps)) / s for s in recipe_steps]
    low, high = bootstrap_interval([reference_steps, recipe_steps], ratio, setting.bootstrap_samples, seed=seed)
    first_step = runs[0]["curve"][0]["step"]
    return {
        "metric": metric,
        "target": target,
        "target_step": target_step,
        "recipe_steps": recipe_steps,
        "reference_steps": reference_steps,
        "speedup": ratio(reference_steps, recipe_steps),
        "min": min(per_seed),
        "max": max(per_seed),
        "ci": [low, high],
        # Not reached by some recipe seed: the true steps exceed the budget, so the speed-up is at most this.
        "censored": recipe_missed,
        "reference_censored": reference_missed,
        # Reached by every seed at the first evaluation: the true steps are at most that, a lower bound.
        "at_first_evaluation": all(s == first_step for s in recipe_steps),
    }


def select_axes(results: dict[str, list[dict]], selection_seeds, setting: Setting, metric: str = "fd") -> dict:
    """The best option of each axis of the ε-cosine U-ViT family, judged on the selection seeds only.

    Each recipe with an ``axis`` scores its speed-up over the ε baseline (a censored one is worth its bound);
    the baseline itself scores 1. Returns ``{"objective": name, "sampler": name, "scores": {name: speed-up}}``
    (an axis without a measured option keeps the baseline's choice).
    """
    selection = set(selection_seeds)
    picked = {name: [run for run in runs if run["seed"] in selection] for name, runs in results.items()}
    if not picked.get("baseline"):
        raise ValueError("select_axes: the baseline has no run on the selection seeds.")
    scores, best = {}, {"objective": ("baseline", 1.0), "sampler": ("baseline", 1.0)}
    for name, runs in picked.items():
        axis = RECIPES[name].axis if name in RECIPES else None
        if axis is None or not runs or name == "baseline":
            continue
        scores[name] = compare(runs, picked["baseline"], metric, setting)["speedup"]
        if scores[name] > best[axis[0]][1]:
            best[axis[0]] = (name, scores[name])
    return {"objective": best["objective"][0], "sampler": best["sampler"][0], "scores": scores}


def claim_verdict(interval: tuple[float, float], claim: float) -> str:
    """How a measured speed-up interval stands to a published one."""
    low, high = interval
    if low >= claim:
        return "supported"
    if high >= claim:
        return "consistent (the interval includes it)"
    if low > 1.0:
        return "faster than its reference, but short of the claim"
    if high < 1.0:
        return "slower than its reference"
    return "no measurable gain (the interval includes 1×)"


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
    device: str  # where the pipelines run: the GPU when there is one (--gpu), else the CPU

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
            device="cuda" if torch.cuda.is_available() else "cpu",
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

        pipeline = ClassConditionalPipeline.from_pretrained(folder).to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        second_order = getattr(pipeline.scheduler, "order", 1) == 2
        steps = (self.inference_steps + 1) // 2 if second_order else self.inference_steps
        images = pipeline(
            self.sample_labels,
            num_inference_steps=steps,
            guidance_scale=self.guidance_scale,
            latents=self.sample_noise.clone().to(self.device),  # a copy: the pipeline may denoise in place
            output_type="np",
        ).images
        images = np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)
        return {**self.quality(images, self.sample_labels), **self.heldout_x0_mse(pipeline)}

    def heldout_x0_mse(self, pipeline) -> dict:
        """x0-space MSE of the pipeline's denoiser on the test digits over the fixed noise grid (see module doc)."""
        from diffusers_speedup.schedulers.scheduling_edm_heun import edm_scalings

        model, scheduler = pipeline.transformer, pipeline.scheduler
        prediction_type = scheduler.config.prediction_type
        x0, labels = self.test_pixels.to(self.device), self.test_labels.to(self.device)
        per_level = []
        for index, timestep in enumerate(self.grid_timesteps.tolist()):
            alpha_bar = self.grid_alphas_cumprod[index]
            noise = self.grid_noise[index].to(self.device)
            if "sigma_data" in scheduler.config:  # EDM: x = x0 + σ·n through EDM's preconditioning
                sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
                noisy = x0 + sigma * noise
                c_skip, c_out, c_in, c_noise = edm_scalings(sigma, scheduler.config.sigma_data, prediction_type)
                c_noise = torch.full((len(x0),), c_noise.item(), device=self.device)
                output = model(c_in * noisy, c_noise, class_labels=labels, return_dict=False)[0][:, : x0.shape[1]]
                x0_hat = c_skip * noisy + c_out * output
            else:
                alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
                noisy = alpha * x0 + sigma * noise
                t = torch.full((len(x0),), timestep, dtype=torch.long, device=self.device)
                # DiT with a learned variance returns [ε, v] (2C channels); the mean prediction is the first C.
                output = model(noisy, t, class_labels=labels, return_dict=False)[0][:, : x0.shape[1]]
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
    """What decides one run's result: the setting without the lists being compared and the report's statistics."""
    ignored = ("recipes", "seeds", "heldout_seeds", "target_fraction", "bootstrap_samples")
    return {key: value for key, value in setting.items() if key not in ignored}


def run_recipe(
    name: str,
    recipe: Recipe,
    seed: int,
    setting: Setting,
    evaluator: Evaluator,
    output_dir: Path,
    keep_checkpoints: bool = False,
    log=print,
) -> dict:
    """Train one recipe with one seed (or reuse a finished run) and evaluate it at every checkpoint."""
    from diffusers_speedup.training import Trainer

    run_dir = output_dir / "runs" / f"{name}_seed{seed}"
    result_path = run_dir / "evaluation.json"
    if result_path.is_file():
        saved = json.loads(result_path.read_text())
        same = saved.get("label") == recipe.label
        if same and _run_identity(saved.get("setting") or {}) == _run_identity(asdict(setting)):
            log(f"{name} seed {seed}: reusing {result_path}")
            return saved
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or differently configured run: start it again
    config = build_config(recipe, setting, seed, run_dir)
    start = time.perf_counter()
    trainer = Trainer(config)
    trainer.train()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    points = []
    for step in range(setting.eval_every, setting.steps + 1, setting.eval_every):
        folder = run_dir / "pipeline" if step == setting.steps else run_dir / f"checkpoint-{step}" / "pipeline"
        points.append({"step": step, **evaluator.evaluate_pipeline(folder)})
        log(
            f"{name} seed {seed} step {step}: FD {points[-1]['fd']:.3f} "
            f"acc {points[-1]['class_accuracy']:.3f} x0-MSE {points[-1]['heldout_x0_mse']:.4f}"
        )
    if points[-1]["step"] != setting.steps:  # steps not a multiple of eval_every: the final export too
        points.append({"step": setting.steps, **evaluator.evaluate_pipeline(run_dir / "pipeline")})
    result = {
        "recipe": name,
        "label": recipe.label,
        "seed": seed,
        "setting": asdict(setting),
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        "num_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "curve": points,
    }
    if not keep_checkpoints:  # the optimizer states and raw weights are most of the disk; keep the exports
        for checkpoint in run_dir.glob("checkpoint-*"):
            for item in checkpoint.iterdir():
                if item.name != "pipeline":
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
    result_path.write_text(json.dumps(result, indent=1))
    return result


_WORKER_EVALUATORS: dict = {}


def _worker(task) -> dict:
    """One run in a worker process (its own evaluator, built once per process from the cached classifier)."""
    name, recipe, seed, setting, output_dir, classifier_cache, keep_checkpoints, threads = task
    torch.set_num_threads(threads)
    key = json.dumps(_run_identity(asdict(setting)), sort_keys=True)
    if key not in _WORKER_EVALUATORS:
        _WORKER_EVALUATORS[key] = Evaluator.build(setting, classifier_cache)
    log = lambda line: print(line, flush=True)
    return run_recipe(name, recipe, seed, setting, _WORKER_EVALUATORS[key], output_dir, keep_checkpoints, log)


def run_all(tasks, setting, evaluator, output_dir, classifier_cache, keep_checkpoints, jobs, threads, log):
    """Run ``[(name, recipe, seed)]``, ``jobs`` at a time (one process each beyond the first), in order."""
    if jobs <= 1:
        return [run_recipe(n, r, s, setting, evaluator, output_dir, keep_checkpoints, log) for n, r, s in tasks]
    payload = [(n, r, s, setting, output_dir, classifier_cache, keep_checkpoints, threads) for n, r, s in tasks]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_worker, payload))


# --- the report --------------------------------------------------------------------------------------------------


def summarize(results: dict[str, list[dict]], setting: Setting, heldout: dict[str, list[dict]] | None = None) -> dict:
    """Final metrics with spreads per recipe, and every recipe's speed-ups over each recipe it is compared with."""
    finals, comparisons = {}, []
    groups = [(name, runs) for name, runs in results.items()]
    groups += [(f"{name} (held-out seeds)", runs) for name, runs in (heldout or {}).items()]
    for key, runs in groups:
        finals[key] = {
            "label": runs[0]["label"] + (", held-out seeds" if key.endswith("(held-out seeds)") else ""),
            "seeds": [run["seed"] for run in runs],
            "num_parameters": runs[0]["num_parameters"],
            "train_seconds": float(np.mean([run["train_seconds"] for run in runs])),
            **{m: spread([run["curve"][-1][m] for run in runs], setting.bootstrap_samples) for m in METRICS},
        }
    for name, runs in results.items():
        recipe = RECIPES[name]
        for reference in recipe.compare_to:
            if reference in results:
                comparisons.append(_comparison(name, runs, reference, results[reference], setting, "selection"))
    if heldout and COMBINATION in heldout and "baseline" in heldout:
        comparisons.append(
            _comparison(COMBINATION, heldout[COMBINATION], "baseline", heldout["baseline"], setting, "held-out")
        )
    return {"finals": finals, "comparisons": comparisons}


def _comparison(name, runs, reference, reference_runs, setting, seeds) -> dict:
    return {
        "recipe": name,
        "label": runs[0]["label"],
        "reference": reference,
        "reference_label": reference_runs[0]["label"],
        "seed_set": seeds,
        "seeds": [run["seed"] for run in runs],
        **{metric: compare(runs, reference_runs, metric, setting) for metric in ("fd", "class_accuracy")},
    }


def _fmt_speedup(entry: dict) -> str:
    mark = "≤ " if entry["censored"] else "≥ " if entry["at_first_evaluation"] else ""
    low, high = entry["ci"]
    return f"{mark}{entry['speedup']:.2f}× [{low:.2f}, {high:.2f}] ({entry['min']:.2f}–{entry['max']:.2f})"


def _fmt_spread(entry: dict, spec: str) -> str:
    low, high = entry["ci"]
    return f"{format(entry['mean'], spec)} [{format(low, spec)}, {format(high, spec)}]"


def markdown_report(summary: dict, setting: Setting, reference: dict, selection: dict | None) -> str:
    """The tables and the reading, in markdown."""
    lines = [
        f"Budget {setting.steps} steps (batch {setting.batch_size}), evaluations every {setting.eval_every}; "
        f"selection seeds {setting.seeds}"
        + (f", held-out seeds {setting.heldout_seeds}" if setting.heldout_seeds else "")
        + f". Speed-up target: the reference's seed-mean value at step {setting.target_fraction * setting.steps:.0f}. "
        "Speed-ups: estimate [95 % bootstrap interval] (min–max over seeds); ≤: some seed never reached the target "
        "(counted as the full budget); ≥: reached at the first evaluation.",
        "",
        "| recipe | compared with | seeds | speed-up (FD) | speed-up (class accuracy) |",
        "|---|---|---|---:|---:|",
    ]
    for row in summary["comparisons"]:
        lines.append(
            f"| {row['label']} | {row['reference_label']} | {', '.join(map(str, row['seeds']))} "
            f"| {_fmt_speedup(row['fd'])} "
            f"| {_fmt_speedup(row['class_accuracy'])} |"
        )
    lines += [
        "",
        "Final values (seed mean [95 % bootstrap interval]):",
        "",
        "| recipe | parameters | final FD ↓ | final class accuracy ↑ | final held-out x0-MSE ↓ | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary["finals"].values():
        lines.append(
            f"| {row['label']} | {row['num_parameters'] / 1e6:.2f} M | {_fmt_spread(row['fd'], '.1f')} "
            f"| {_fmt_spread(row['class_accuracy'], '.3f')} | {_fmt_spread(row['heldout_x0_mse'], '.4f')} "
            f"| {row['train_seconds']:.0f} |"
        )
    lines.append(
        f"| *real digits (train subset vs held-out)* | | {reference['fd']:.1f} | {reference['class_accuracy']:.3f} | | |"
    )
    lines += ["", "### Reading", ""] + reading(summary, setting, selection)
    return "\n".join(lines) + "\n"


def reading(summary: dict, setting: Setting, selection: dict | None) -> list[str]:
    """The honest reading, generated from the numbers: claims, what hurts, what this scale cannot test."""
    by_pair = {(row["recipe"], row["reference"]): row for row in summary["comparisons"]}
    lines = []
    baseline = summary["finals"].get("baseline")
    if baseline is not None:
        accuracy = baseline["class_accuracy"]["mean"]
        lines.append(
            f"- **Budget.** The baseline's final samples have class accuracy {accuracy:.2f} (chance 0.10): "
            + (
                "recognisable digits, so the speed-ups are measured past the noise phase."
                if accuracy >= 0.5
                else "still not recognisable digits; the speed-ups below are measured before the phase that matters "
                "and a longer budget (--steps) is needed to test the claims."
            )
        )
    claims = [
        ("Min-SNR-γ", [("min_snr", "baseline"), ("min_snr_v", "v_baseline"), ("min_snr_x0", "x0_baseline")]),
        ("SpeeD", [("speed_linear", "linear_baseline"), ("speed", "baseline"), ("dit_speed", "dit_baseline")]),
    ]
    for claim, pairs in claims:
        parts = []
        for pair in pairs:
            if pair in by_pair:
                row = by_pair[pair]["fd"]
                parts.append(
                    f"{by_pair[pair]['label']} vs {by_pair[pair]['reference_label']}: {row['speedup']:.2f}× "
                    f"[{row['ci'][0]:.2f}, {row['ci'][1]:.2f}], {claim_verdict(row['ci'], CLAIMS[claim])}"
                )
        if parts:
            lines.append(f"- **{claim}, published {CLAIMS[claim]}×** (FD speed-up): " + "; ".join(parts) + ".")
    hurts = [
        f"{row['label']} vs {row['reference_label']} ({row['fd']['speedup']:.2f}× [{row['fd']['ci'][0]:.2f}, "
        f"{row['fd']['ci'][1]:.2f}])"
        for row in summary["comparisons"]
        if row["fd"]["ci"][1] < 1.0
    ]
    lines.append(
        "- **Where a technique hurts** (the whole FD interval below 1×): "
        + ("; ".join(hurts) if hurts else "none")
        + "."
    )
    ladder = [("edm_lognormal", "edm_precond"), ("edm_weighting", "edm_lognormal"), ("edm2", "edm_weighting")]
    steps = [
        f"{by_pair[p]['label']} {by_pair[p]['fd']['speedup']:.2f}× [{by_pair[p]['fd']['ci'][0]:.2f}, "
        f"{by_pair[p]['fd']['ci'][1]:.2f}]"
        for p in [("edm_precond", "baseline"), *ladder]
        if p in by_pair
    ]
    if steps:
        lines.append(
            "- **EDM2, one change at a time** (each over the step before; the first over the ε baseline): "
            + "; ".join(steps)
            + "."
        )
    if selection is not None:
        held = by_pair.get((COMBINATION, "baseline"))
        text = (
            f"- **Best combination**, chosen on the selection seeds: objective of `{selection['objective']}`, "
            f"sampler of `{selection['sampler']}`"
        )
        if held is not None:
            text += (
                f"; on the held-out seeds it is {held['fd']['speedup']:.2f}× [{held['fd']['ci'][0]:.2f}, "
                f"{held['fd']['ci'][1]:.2f}] faster than the baseline in FD"
            )
        lines.append(text + ".")
    lines.append(
        "- **What this scale cannot test**: the published numbers are FID-50k speed-ups of 33–675 M-parameter "
        "models trained for 10⁵–10⁶ steps on ImageNet (pixels or latents); here a "
        f"{baseline['num_parameters'] / 1e6 if baseline else float('nan'):.2f} M-parameter model sees "
        f"{setting.resolution}×{setting.resolution} digits for {setting.steps} steps, quality is measured in a small "
        f"classifier's feature space with {10 * setting.samples_per_class} samples, and "
        f"{len(setting.seeds)} seeds resolve only large differences. A gain that needs long training (SpeeD's "
        "skipped near-zero-noise steps, Min-SNR's conflict between timesteps at scale) may not show, and a "
        "loss here does not refute a claim there."
    )
    return lines


# --- the plot (matplotlib, the bench extra) --------------------------------------------------------------------


def draw_plot(results: dict[str, list[dict]], path: Path, heldout: dict[str, list[dict]] | None = None) -> None:
    """Per group of recipes, FD and class accuracy against steps: seed-mean lines, min–max over seeds shaded; the
    ε baseline (dashed) in every panel; the held-out seeds in a panel of their own. Saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    groups: dict[str, list[tuple[str, list[dict]]]] = {}
    for name, runs in results.items():
        groups.setdefault(RECIPES[name].group, []).append((runs[0]["label"], runs))
    if heldout:
        groups["held-out seeds"] = [(runs[0]["label"], runs) for runs in heldout.values()]
    figure, axes = pyplot.subplots(2, len(groups), figsize=(4.4 * len(groups), 7.5), squeeze=False)
    for column, (group, members) in enumerate(groups.items()):
        if group != "held-out seeds" and "baseline" in results and results["baseline"] not in [r for _, r in members]:
            members = [(results["baseline"][0]["label"], results["baseline"]), *members]
        for row, (metric, title) in enumerate((("fd", "FD ↓"), ("class_accuracy", "class accuracy ↑"))):
            axis = axes[row][column]
            for label, runs in members:
                steps = curve(runs[0], metric)[0]
                values = np.array([curve(run, metric)[1] for run in runs])
                dashed = runs[0]["recipe"] == "baseline"
                line = axis.plot(
                    steps,
                    values.mean(0),
                    label=label,
                    linewidth=1.5,
                    linestyle="--" if dashed else "-",
                    color="black" if dashed else None,
                )[0]
                axis.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
            axis.set_title(f"{group}: {title}", fontsize=9)
            axis.set_xlabel("training steps")
            axis.grid(alpha=0.3)
            if metric == "fd":
                axis.set_yscale("log")
        axes[0][column].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


# --- entry point --------------------------------------------------------------------------------------------------


def run_benchmark(
    setting: Setting,
    output_dir: str | Path,
    classifier_cache: str | Path | None = None,
    keep_checkpoints: bool = False,
    jobs: int = 1,
    threads: int = 1,
    log=print,
) -> dict:
    """Train and evaluate every recipe × selection seed, then the chosen combination and the baseline on the
    held-out seeds; write results.json, results.md and convergence.png. Returns what results.json holds."""
    unknown = [name for name in setting.recipes if name not in RECIPES]
    if unknown:
        raise ValueError(f"--recipes: unknown recipe(s) {unknown}; available: {', '.join(RECIPES)}.")
    if setting.eval_every > setting.steps:
        raise ValueError(f"--eval_every={setting.eval_every} is larger than --steps={setting.steps}.")
    if not setting.seeds:
        raise ValueError("--seeds: at least one selection seed is needed.")
    overlap = set(setting.seeds) & set(setting.heldout_seeds)
    if overlap:
        raise ValueError(f"--heldout_seeds: {sorted(overlap)} also among the selection seeds --seeds.")
    if not 0 < setting.target_fraction <= 1 or setting.target_fraction * setting.steps < setting.eval_every:
        raise ValueError(
            f"--target_fraction={setting.target_fraction}: the target step must lie between the first evaluation "
            f"({setting.eval_every}) and the budget ({setting.steps})."
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    classifier_cache = Path(classifier_cache or output_dir / "classifier")
    start = time.perf_counter()
    evaluator = Evaluator.build(setting, classifier_cache)  # trains the classifier once, before any worker starts
    log(f"classifier held-out accuracy {evaluator.classifier_accuracy:.4f}")

    # The floor: real training digits (as many as the samples, a fixed subset) against the held-out ones.
    train_images, train_labels = digits_arrays(setting.resolution, "train")
    subset = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
    subset = subset[: len(evaluator.sample_labels)]
    reference = evaluator.quality(train_images[subset].permute(0, 2, 3, 1).numpy(), train_labels[subset])

    common = (setting, evaluator, output_dir, classifier_cache, keep_checkpoints, jobs, threads, log)
    tasks = [(name, RECIPES[name], seed) for name in setting.recipes for seed in setting.seeds]
    results = {name: [] for name in setting.recipes}
    for (name, _, _), result in zip(tasks, run_all(tasks, *common)):
        results[name].append(result)

    selection, heldout = None, None
    if setting.heldout_seeds and "baseline" in results:
        selection = select_axes(results, setting.seeds, setting)
        log(f"chosen on seeds {setting.seeds}: {selection}")
        combination = combination_recipe(selection["objective"], selection["sampler"])
        tasks = [("baseline", RECIPES["baseline"], s) for s in setting.heldout_seeds]
        if (selection["objective"], selection["sampler"]) != ("baseline", "baseline"):
            tasks += [(COMBINATION, combination, s) for s in setting.heldout_seeds]
        heldout = {"baseline": [], COMBINATION: []}
        for (name, _, _), result in zip(tasks, run_all(tasks, *common)):
            heldout[name].append(result)
        if not heldout[COMBINATION]:  # nothing beat the baseline on the selection seeds: it is its own best
            heldout[COMBINATION] = [
                {**run, "recipe": COMBINATION, "label": combination.label} for run in heldout["baseline"]
            ]

    summary = summarize(results, setting, heldout)
    report = markdown_report(summary, setting, reference, selection)
    everything = {
        "setting": asdict(setting),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": threads,
            "jobs": jobs,
        },
        "classifier_test_accuracy": evaluator.classifier_accuracy,
        "log_snr_grid": list(LOG_SNR_GRID),
        "grid_timesteps": evaluator.grid_timesteps.tolist(),
        "real_data_reference": reference,
        "selection": selection,
        "summary": summary,
        "runs": results,
        "heldout_runs": heldout,
        "total_seconds": time.perf_counter() - start,
    }
    (output_dir / "results.json").write_text(json.dumps(everything, indent=1))
    (output_dir / "results.md").write_text(report)
    draw_plot(results, output_dir / "convergence.png", heldout)
    log(report)
    return everything


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="seconds on CPU: 8×8 digits, 2 recipes, 4 steps, 2+1 seeds")
    mode.add_argument("--gpu", action="store_true", help="the same recipes, 10000 steps, larger evaluation")
    parser.add_argument("--output_dir", default=None, help="default outputs/benchmarks/convergence[_tiny|_gpu]")
    parser.add_argument("--classifier_cache", default=None, help="default <output_dir>/classifier")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"any of: {' '.join(RECIPES)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="selection seeds (default 0 1 2)")
    parser.add_argument("--heldout_seeds", nargs="*", type=int, default=None, help="default 3 4 5; none: skip")
    for name in ("steps", "eval_every", "batch_size", "samples_per_class", "inference_steps", "bootstrap_samples"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--target_fraction", type=float, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each (2 on two cores)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (1 is fastest here)")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep optimizer states and raw weights")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    preset = TINY if args.tiny else GPU if args.gpu else {}
    keys = [f.name for f in Setting.__dataclass_fields__.values()]
    chosen = {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}
    setting = Setting(**{**preset, **chosen})
    suffix = "_tiny" if args.tiny else "_gpu" if args.gpu else ""
    run_benchmark(
        setting,
        args.output_dir or f"outputs/benchmarks/convergence{suffix}",
        args.classifier_cache,
        args.keep_checkpoints,
        args.jobs,
        args.threads,
    )


if __name__ == "__main__":
    main()
