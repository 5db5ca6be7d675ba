"""Convergence study of the training recipes on the built-in digits: seeds, intervals, one change at a time.

    python benchmarks/convergence.py --tiny                       # seconds on CPU: 3 recipes, 2+1 seeds (the test)
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

**The second generation**, on the same data, budget and model sizes:

* **rectified flow** (SiT's linear path α = 1 − t, σ = t, the velocity target, uniform t, no learned variance;
  sampled with the flow ODE, Euler, at the evaluation's number of network evaluations) on the U-ViT against the ε
  baseline itself, and on the DiT against the paper's DiT (LightningDiT's rung 1, and SiT against DiT: the same
  backbone). What a technique buys is measured against the recipe it changes on the same network, so the flow
  ladder runs on the DiT, where LightningDiT's rungs apply; and every recipe is also compared with the U-ViT ε
  baseline, the one reference every row shares;
* on the flow DiT, one change each: SD3's logit-normal(0, 1) t, SiT's GVP path (α = cos(πt/2), σ = sin(πt/2))
  instead of the linear one, and Min-SNR-5 (x0-space min(SNR, 5), carried to the velocity target);
* **LightningDiT's architecture rungs** over the flow DiT with logit-normal t, each over the one before: SwiGLU
  (hidden int(2/3·4d)), RMSNorm, 2-D RoPE (configs/imagenet256/lightningdit/r6–r8). LightningDiT's rung 5, the
  velocity-direction loss, is left out: its cosine runs over the channels at each position, and over the digits'
  one channel it is ±1 with zero gradient, so it cannot act here (``--recipes dit_flow_cosine`` runs it anyway);
* **REPA** (``repa.*``): alignment of block 2 (a third of the depth, as REPA's block 4 of 12 and 8 of 24) to the
  patch tokens of a tiny DINOv2-shaped encoder trained here without labels (``digits_encoder.py``; it sees the 8×8
  digit at its own size, ``repa.encoder_resolution=8``, in 2 px patches: the networks' 4×4 grid), λ 0.5, REPA's MLP
  projector at width 256 (REPA's 2048 is 1.8–2.7× its networks' width; 4× the study's 64 keeps the projector
  smaller than the network), on the flow DiT, the ε DiT and the ε U-ViT; and for each of the three the control that
  aligns the same network to the same encoder at its random initialisation (the same shape and the same extra loss
  term, without the learned features).

**Seeds and intervals.** Every recipe runs on the selection seeds (default 0 1 2). Every final metric and speed-up
carries the min–max over seeds and a 95 % percentile bootstrap interval (seeded; the recipe's and the reference's
seeds resampled independently).

**Two targets.** A speed-up is measured at a quality the reference reaches late: the target is the reference's
seed-mean curve at ``target_fraction`` (0.8) of the budget; "steps to reach" is each seed's first step at that
quality (linearly interpolated between evaluations), and the speed-up is the reference's mean steps over the
recipe's. A seed that never reaches it counts as the full budget, so the speed-up is then an upper bound. That
target only asks for the reference's quality, which the good recipes pass early. The **hard target**, RAEv2's
"epochs to FID ≤ k" with k set by the data, is the quality the best selection recipe (best final seed mean) has at
``hard_fraction`` (0.5) of the budget, in FD@1000 and in class accuracy; every recipe reports its steps to reach it
(on the selection seeds; the held-out runs against the same values). The best recipe reaches it at half the budget,
and a recipe that reaches it at all is at most twice as slow as the best one; it is set on the selection seeds only.

**The best combinations, on held-out seeds.** On the selection seeds each searched family is split into axes,
and the option with the largest FD@1000 speed-up over the axis's reference wins each axis (``AXES``; the first
study chose by FD): the ε-cosine U-ViT's objective (prediction type and weighting) and timestep sampler, against
the ε baseline (the first generation); the flow DiT's objective (time density, path, weighting, Min-SNR from the
first generation) against rectified flow, its architecture (LightningDiT's rungs, cumulative) against the flow DiT
with logit-normal t, and REPA (with the trained encoder) or not against rectified flow (the second; three axes).
The families do not mix: ε/v/x0 and SpeeD belong to the DDPM schedule, the flow options to the flow path, the rungs
to the DiT. Both combinations and the baseline are then trained on the held-out seeds (default 3 4 5),
and only those runs report their speed-ups, so the choice never sees them; the headline is the combination of the
generation whose fastest recipe was fastest against the ε baseline on the selection seeds. When REPA is chosen, the
same flow combination without it is trained on the held-out seeds too (REPA costs ≈ 1.5× the time per step, so its
part in the combination is measured where the choice never looked; 3 more runs).

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
step 2560, where the baseline is at ≈ 0.5–0.6). The default study has 29 recipes × 3 selection seeds + 4 × 3
held-out runs = 99 runs, the classifier (≈ 1 min) and REPA's encoder (≈ 1.5 min). Measured on 2026-12-06 on a
2-core Intel Xeon, ``--jobs 2``, otherwise idle: ≈ 65 s of wall time per run (≈ 28–32 steps/s per run while
training, two at a time; a REPA run ≈ 1.5× the training time of its network), ≈ 1 h 55 min for the whole study;
on the 2-core AMD EPYC of the first study (≈ 19 steps/s per run) about half as long again.

**Evaluation** of every checkpoint's exported pipeline (EMA weights):

* **Fréchet distance (FD)** between the held-out digits (the 180-image test split) and class-conditional samples
  (the same number per class and the same initial noise for every recipe), in the penultimate feature space of a
  small CNN trained once on the train split (``digits_classifier.py``); lower is better.
* **class accuracy**: the fraction of samples of class c that the classifier calls c (chance 0.10).
* **FD@1000 and class accuracy@1000: the larger evaluation**, every second evaluation and at the end: the first
  study's 20 samples per class (the same noise, drawn first and sampled apart, so its FD and accuracy stay exactly
  comparable and are still reported) and 80 more per class. Why: with 200 samples FD's estimate is dominated by its
  finite-sample bias; 200 real training digits are at FD 3.5 from the held-out ones, and the x0 models of the first
  study (3.0–3.3) were below that floor, so FD could not rank the best recipes. The bias falls with the number of
  samples: with 1000 the real-data floor is 2.0, and one-seed trial runs of the flow DiTs (FD 2.9–3.1 at 200
  samples, both under the 200-sample floor) separate at 1000 (2.9 against 2.5, both above the floor; 2026-12-02).
  Not 16×16 (the training resolution would change, and with it every first-study number) and not a new feature
  space (the classifier's is the one the first study is read in). Verdicts on published claims are read in FD@1000.
* **held-out x0-MSE**: the unweighted denoising loss on the test split in x0-space, comparable across ε-, v-, x0-,
  EDM and flow models: at the timesteps of the cosine DDPM schedule nearest to ln SNR = −6, −5, ..., 6, the test
  digits are noised with a fixed draw (x_t = √ᾱ·x0 + √(1−ᾱ)·ε for DDPM-trained models; x = x0 + σ·ε with
  σ = SNR^-½ for EDM-trained ones; x_t = α(t)·x0 + σ(t)·ε for flow models, at the t whose (α/σ)² is the same SNR:
  t = 1/(1 + √SNR) on the linear path, (2/π)·atan(SNR^-½) on GVP), each model's implied x̂0 (for a velocity v:
  x̂0 = (σ̇·x_t − σ·v)/(α·σ̇ − σ·α̇), i.e. x_t − t·v on the linear path) is clipped to [−1, 1] (as DDIM does) and
  mean((x̂0 − x0)²) is averaged over pixels, images and levels.

Writes ``results.json`` (every number), ``results.md`` (tables and the reading) and ``convergence.png`` (FD and
class accuracy against steps, one line per recipe, shaded min–max over seeds; matplotlib, the ``bench`` extra) to
``--output_dir``. Finished runs are reused, so an interrupted study resumes where it stopped; a finished run whose
recipe and training setting match but whose evaluation setting changed is re-evaluated from its kept exports
instead of trained again.
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
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits_classifier.py next to this file

from digits_classifier import ClassifierSettings, digits_arrays, load_or_train_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
LOG_SNR_GRID = tuple(float(v) for v in range(-6, 7))
# Per metric: True when lower is better. The "_large" ones come from the larger evaluation.
METRICS = {
    "fd": True,
    "class_accuracy": False,
    "heldout_x0_mse": True,
    "fd_large": True,
    "class_accuracy_large": False,
}
# The metrics every comparison gets a speed-up in, and those that get a hard target.
SPEEDUP_METRICS = ("fd", "class_accuracy", "fd_large")
# The metric the combinations are chosen by and the reading's verdicts are read in: the larger evaluation's FD,
# which still separates recipes near the real-data floor (the first study's FD is in the tables next to it).
MAIN_METRIC = "fd_large"
HARD_TARGET_METRICS = ("fd_large", "class_accuracy")
# The published speed-up claims the reading checks (abstracts of Hang et al. 2023, Wang et al. 2024, and REPA's
# 17.5×: SiT-XL/2 + REPA at 400K iterations against SiT-XL/2 at 7M, arXiv 2410.06940).
CLAIMS = {"Min-SNR-γ": 3.4, "SpeeD": 3.0, "REPA": 17.5}


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
        compare_to: the recipes this one differs from in one change (or, for a control, the arm it controls); its
            speed-ups are measured against each, and against the ε baseline ``baseline`` in any case.
        group: the plot panel it is drawn in.
        axis: for the combination search, ``(axis, option)``: the axis of ``AXES`` this recipe is an option of
            (``option`` names the recipe itself); None for recipes outside both searched families.
        model_params: extra constructor arguments of the model (LightningDiT's DiT options), on top of the setting's.
        repa: None, or the REPA encoder it aligns to: "trained" (``digits_encoder.py``) or "random" (the control).
    """

    label: str
    overrides: tuple[str, ...] = ()
    weighting: tuple = (("kind", "constant"),)
    sampler: tuple = (("kind", "uniform"),)
    model: str = "uvit"
    compare_to: tuple[str, ...] = ("baseline",)
    group: str = "ε / v / x0 and Min-SNR"
    axis: tuple[str, str] | None = None
    model_params: tuple = ()
    repa: str | None = None


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
# Rectified flow as SiT and LightningDiT's rung 1 train it: the linear path (α = 1 − t, σ = t), velocity target,
# uniform t (the Recipe default), no learned variance, sampled with the flow ODE (Euler, the evaluation's NFE).
FLOW = (
    "objective.schedule.kind=flow",
    "objective.schedule.path=linear",
    "objective.prediction_type=velocity",
    "sampling.scheduler=flow_euler",
)
GVP = tuple(item.replace("path=linear", "path=gvp") for item in FLOW)  # α = cos(πt/2), σ = sin(πt/2)
LOGIT_NORMAL = _items({"kind": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0})  # SD3's lognorm(0, 1)
# LightningDiT's velocity-direction loss: 1 − cos(v̂, v) over the channels at each position, weight 1. On the
# one-channel digits that cosine is sign(v̂)·sign(v), whose gradient is zero: the term cannot act here (the study
# says so instead of spending three runs on it; tests/test_convergence.py checks the zero gradient).
COSINE_LOSS = ("objective.cosine_loss_weight=1.0",)
# LightningDiT's architecture rungs, each over the one before (configs/imagenet256/lightningdit/r6–r8).
SWIGLU = (("mlp_type", "swiglu"),)
RMSNORM = (*SWIGLU, ("norm_type", "rmsnorm"))
ROPE = (*RMSNORM, ("use_rope", True))
FLOW_GROUP = "Flow matching"
RUNG_GROUP = "LightningDiT rungs (DiT, flow)"
REPA_GROUP = "REPA"
# Each REPA arm's control, read as (control, the arm): the same recipe aligned to the encoder at its random init.
REPA_CONTROLS = [
    ("dit_flow_repa_random", "dit_flow_repa"),
    ("dit_repa_random", "dit_repa"),
    ("uvit_repa_random", "uvit_repa"),
]

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
    # The second generation. Flow matching one change at a time: on the U-ViT against the ε baseline itself, and on
    # the DiT against the paper's DiT (LightningDiT's rung 1, and SiT against DiT), then each option over it.
    "uvit_flow": Recipe("U-ViT, rectified flow (linear, velocity, uniform t)", FLOW, group=FLOW_GROUP),
    "dit_flow": Recipe(
        "DiT, rectified flow (linear, velocity, uniform t)",
        FLOW,
        model="dit",
        compare_to=("dit_baseline", "baseline"),
        group=FLOW_GROUP,
        axis=("flow_objective", "dit_flow"),
    ),
    "dit_flow_lognorm": Recipe(
        "DiT flow, + logit-normal(0, 1) t",
        FLOW,
        sampler=LOGIT_NORMAL,
        model="dit",
        compare_to=("dit_flow", "baseline"),
        group=FLOW_GROUP,
        axis=("flow_objective", "dit_flow_lognorm"),
    ),
    # Not in the default study: inert on one channel (see COSINE_LOSS); --recipes dit_flow_cosine runs it.
    "dit_flow_cosine": Recipe(
        "DiT flow, + logit-normal, + velocity-direction loss",
        FLOW + COSINE_LOSS,
        sampler=LOGIT_NORMAL,
        model="dit",
        compare_to=("dit_flow_lognorm", "baseline"),
        group=FLOW_GROUP,
        axis=("flow_objective", "dit_flow_cosine"),
    ),
    "dit_flow_gvp": Recipe(
        "DiT flow, GVP path",
        GVP,
        model="dit",
        compare_to=("dit_flow", "baseline"),
        group=FLOW_GROUP,
        axis=("flow_objective", "dit_flow_gvp"),
    ),
    "dit_flow_min_snr": Recipe(
        "DiT flow, Min-SNR-5",
        FLOW,
        weighting=MIN_SNR,
        model="dit",
        compare_to=("dit_flow", "baseline"),
        group=FLOW_GROUP,
        axis=("flow_objective", "dit_flow_min_snr"),
    ),
    # LightningDiT's architecture rungs on the flow DiT with logit-normal t (its rungs 6–8 follow rung 5, whose
    # velocity-direction loss cannot act on one channel and is left out).
    "dit_swiglu": Recipe(
        "DiT flow + logit-normal, + SwiGLU",
        FLOW,
        sampler=LOGIT_NORMAL,
        model="dit",
        model_params=SWIGLU,
        compare_to=("dit_flow_lognorm", "baseline"),
        group=RUNG_GROUP,
        axis=("architecture", "dit_swiglu"),
    ),
    "dit_rmsnorm": Recipe(
        "DiT flow + logit-normal, + SwiGLU, + RMSNorm",
        FLOW,
        sampler=LOGIT_NORMAL,
        model="dit",
        model_params=RMSNORM,
        compare_to=("dit_swiglu", "baseline"),
        group=RUNG_GROUP,
        axis=("architecture", "dit_rmsnorm"),
    ),
    "dit_rope": Recipe(
        "DiT flow + logit-normal, + SwiGLU, + RMSNorm, + RoPE",
        FLOW,
        sampler=LOGIT_NORMAL,
        model="dit",
        model_params=ROPE,
        compare_to=("dit_rmsnorm", "baseline"),
        group=RUNG_GROUP,
        axis=("architecture", "dit_rope"),
    ),
    # REPA: the DiT with flow, as REPA trains SiT, and with ε; the U-ViT; each with its control, aligned to a
    # randomly initialised encoder of the same shape.
    "dit_flow_repa": Recipe(
        "DiT flow, + REPA (trained encoder)",
        FLOW,
        model="dit",
        compare_to=("dit_flow", "baseline"),
        group=REPA_GROUP,
        axis=("alignment", "dit_flow_repa"),
        repa="trained",
    ),
    "dit_flow_repa_random": Recipe(
        "DiT flow, + REPA (random encoder, control)",
        FLOW,
        model="dit",
        compare_to=("dit_flow", "dit_flow_repa"),
        group=REPA_GROUP,
        repa="random",
    ),
    "dit_repa": Recipe(
        DIT + ", + REPA (trained encoder)",
        LINEAR,
        model="dit",
        compare_to=("dit_baseline", "baseline"),
        group=REPA_GROUP,
        repa="trained",
    ),
    "dit_repa_random": Recipe(
        DIT + ", + REPA (random encoder, control)",
        LINEAR,
        model="dit",
        compare_to=("dit_baseline", "dit_repa"),
        group=REPA_GROUP,
        repa="random",
    ),
    "uvit_repa": Recipe("ε U-ViT, + REPA (trained encoder)", group=REPA_GROUP, repa="trained"),
    "uvit_repa_random": Recipe(
        "ε U-ViT, + REPA (random encoder, control)",
        compare_to=("baseline", "uvit_repa"),
        group=REPA_GROUP,
        repa="random",
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
    # The second generation.
    "uvit_flow",
    "dit_flow",
    "dit_flow_lognorm",
    "dit_flow_gvp",
    "dit_flow_min_snr",
    "dit_swiglu",
    "dit_rmsnorm",
    "dit_rope",
    "dit_flow_repa",
    "dit_flow_repa_random",
    "dit_repa",
    "dit_repa_random",
    "uvit_repa",
    "uvit_repa_random",
]

# --- REPA ----------------------------------------------------------------------------------------------------------
REPA_WEIGHT = 0.5  # λ of REPA's paper and code, everywhere
REPA_PROJECTOR_DIM = 256  # REPA's 2048 is 1.8–2.7× SiT's width; 4× the study's 64
# The block whose output is aligned: REPA uses block 4 of SiT-B/2's 12 and 8 of L/XL's 24/28, a third of the depth;
# a third of the study's 5 DiT blocks and 7 U-ViT blocks is 2.
REPA_DEPTH = {"dit": 2, "uvit": 2}


def repa_overrides(recipe: Recipe, encoder_dir: Path | None) -> list[str]:
    """The ``key=value`` overrides that switch REPA on for ``recipe`` (its encoder from ``encoder_dir``)."""
    if recipe.repa is None:
        return []
    if recipe.repa not in ("trained", "random"):
        raise ValueError(f"Recipe {recipe.label!r}: repa must be 'trained' or 'random', got {recipe.repa!r}.")
    if encoder_dir is None:
        raise ValueError(f"Recipe {recipe.label!r} needs the REPA encoders' folder (encoder_dir).")
    return [
        "repa.enabled=true",
        f"repa.encoder={Path(encoder_dir) / recipe.repa}",
        f"repa.depth={REPA_DEPTH[recipe.model]}",
        f"repa.weight={REPA_WEIGHT}",
        f"repa.projector_dim={REPA_PROJECTOR_DIM}",
    ]


# --- the best combinations ---------------------------------------------------------------------------------------
# Each searched family splits into axes; an option is a measured recipe, scored on the selection seeds by its FD
# speed-up over the axis's reference (the recipe it differs from in that axis only, itself an option worth 1×).
AXES = {
    # The first generation: the ε-cosine U-ViT, objective (prediction type and weighting) and timestep sampler.
    "objective": ("first", "baseline"),
    "sampler": ("first", "baseline"),
    # The second: the flow DiT, objective (path, time density, weighting), LightningDiT's architecture rungs, and
    # REPA or not (its random-encoder control is not an option: it only tells where a gain comes from).
    "flow_objective": ("second", "dit_flow"),
    "architecture": ("second", "dit_flow_lognorm"),
    "alignment": ("second", "dit_flow"),
}
FLOW_AXES = ("flow_objective", "architecture", "alignment")
COMBINATION = "combination"  # the first generation's, as in the first study
FLOW_COMBINATION = "combination_flow"  # the second generation's
# The second generation's combination without REPA, trained on the held-out seeds too when REPA was chosen: REPA
# costs ≈ 1.5× the time per step, so its part in the combination is measured where the choice never looked.
FLOW_COMBINATION_WITHOUT_REPA = "combination_flow_without_repa"
HELDOUT_COMPARISONS = [
    (COMBINATION, "baseline"),
    (FLOW_COMBINATION, "baseline"),
    (FLOW_COMBINATION, FLOW_COMBINATION_WITHOUT_REPA),
    (FLOW_COMBINATION_WITHOUT_REPA, "baseline"),
]


def combination_recipe(objective: str, sampler: str) -> Recipe:
    """The ε-cosine U-ViT recipe with the objective of recipe ``objective`` and the sampler of recipe ``sampler``."""
    chosen, sampled = RECIPES[objective], RECIPES[sampler]
    label = f"best combination: {chosen.label} + {'uniform t' if sampler == 'baseline' else sampled.label}"
    return Recipe(label, chosen.overrides, chosen.weighting, sampled.sampler, group="held-out seeds")


RUNG_NAMES = {"mlp_type": "SwiGLU", "norm_type": "RMSNorm", "use_rope": "RoPE"}


def flow_combination_recipe(objective: str, architecture: str, alignment: str = "dit_flow") -> Recipe:
    """The flow DiT with the objective of recipe ``objective``, the architecture of recipe ``architecture`` and the
    representation alignment (REPA's or none) of recipe ``alignment``."""
    chosen, built, aligned = RECIPES[objective], RECIPES[architecture], RECIPES[alignment]
    rungs = " + ".join(RUNG_NAMES[key] for key, _ in built.model_params) or "DiT's own blocks"
    return Recipe(
        f"best flow combination: {chosen.label} + {rungs}" + (" + REPA" if aligned.repa else ""),
        chosen.overrides,
        chosen.weighting,
        chosen.sampler,
        model="dit",
        group="held-out seeds",
        model_params=built.model_params,
        repa=aligned.repa,
    )


def heldout_tasks(selection: dict, setting: Setting) -> list[tuple[str, Recipe, int]]:
    """What trains on the held-out seeds: the baseline; the first generation's combination unless it is the
    baseline; the second's when its axes were measured, and that combination without REPA when REPA was chosen."""
    tasks = [("baseline", RECIPES["baseline"])]
    if (selection["objective"], selection["sampler"]) != ("baseline", "baseline"):
        tasks.append((COMBINATION, combination_recipe(selection["objective"], selection["sampler"])))
    if all(selection[axis] is not None for axis in FLOW_AXES):
        flow = flow_combination_recipe(*(selection[axis] for axis in FLOW_AXES))
        tasks.append((FLOW_COMBINATION, flow))
        if flow.repa:
            plain = flow_combination_recipe(selection["flow_objective"], selection["architecture"])
            tasks.append((FLOW_COMBINATION_WITHOUT_REPA, replace(plain, label=f"{plain.label}, without REPA")))
    return [(name, recipe, seed) for name, recipe in tasks for seed in setting.heldout_seeds]


@dataclass
class Setting:
    """The budget, models and evaluation shared by every recipe.

    Args:
        resolution, hidden_size, num_layers, num_heads, patch_size: the U-ViT and the data.
        dit_hidden_size, dit_num_layers, dit_num_heads: the DiT (patch as the U-ViT); the defaults give about the
            U-ViT's parameter count.
        batch_size, steps, eval_every, warmup_steps, lr: the training budget (constant LR after warm-up, so a
            curve's value at a step does not depend on the total budget).
        samples_per_class: conditional samples per class at each evaluation (FD and class accuracy, as in the first
            study).
        large_samples_per_class: conditional samples per class of the larger evaluation (FD and class accuracy
            "at N samples"), the first ``samples_per_class`` of each class being the ones above; made every
            ``large_eval_every`` steps (a multiple of ``eval_every``) and at the end.
        inference_steps: network evaluations per sample (DDIM steps; EDM Heun gets (n+1)//2 steps, 2·steps−1 NFE).
        guidance_scale: classifier-free guidance at evaluation (1: none, the conditional model alone).
        classifier_epochs: training epochs of the feature classifier.
        encoder_steps: training steps of REPA's encoder (``digits_encoder.py``; only for REPA recipes).
        target_fraction: where on the reference's curve the speed-up target lies (0.8: step 0.8·steps).
        hard_fraction: the hard target is the best selection recipe's seed-mean quality at step hard_fraction·steps.
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
    encoder_steps: int = 800
    large_samples_per_class: int = 100
    large_eval_every: int = 640
    target_fraction: float = 0.8
    hard_fraction: float = 0.5
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
    encoder_steps=2,
    large_samples_per_class=4,
    large_eval_every=2,
    bootstrap_samples=200,
    recipes=["baseline", "min_snr", "dit_flow", "dit_flow_repa"],
    seeds=[0, 1],
    heldout_seeds=[2],
)
# The same recipes and seeds; a budget at which the baseline converges, and a larger evaluation.
GPU = dict(
    steps=10000,
    eval_every=500,
    warmup_steps=100,
    samples_per_class=100,
    large_samples_per_class=500,
    large_eval_every=1000,
    inference_steps=50,
)


def build_config(recipe: str | Recipe, setting: Setting, seed: int, run_dir: Path, encoder_dir: Path | None = None):
    """The typed training config of one recipe (a name of ``RECIPES`` or a Recipe) under the common setting
    (``encoder_dir``: the REPA encoders' folder, for REPA recipes)."""
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
    repa = repa_overrides(recipe, encoder_dir)
    if repa:  # the encoder sees the digit at its own side, in its 2 px patches: the networks' grid (digits_encoder.py)
        repa.append(f"repa.encoder_resolution={setting.resolution}")
    config = load_config(QUICKSTART, common + list(recipe.overrides) + repa)
    config.objective.weighting = dict(recipe.weighting)
    config.objective.sampler = dict(recipe.sampler)
    if recipe.model == "dit":
        # DiT as configs/imagenet256/dit_b2_baseline.yaml: it drops 10 % of the labels itself and learns its
        # variance with L_vb (the evaluation's DDIM sampler uses the mean prediction); on a flow path it learns no
        # variance (SiT; LightningDiT's rung 1). Replaced after loading, as the quickstart's U-ViT parameters are
        # no DiT arguments.
        config.model.kind = "dit"
        config.model.preset = None
        config.model.params = {
            "patch_size": setting.patch_size,
            "hidden_size": setting.dit_hidden_size,
            "num_layers": setting.dit_num_layers,
            "num_attention_heads": setting.dit_num_heads,
        }
        config.objective.label_dropout = 0.0
        config.objective.learned_variance = config.objective.schedule.kind != "flow"
    config.model.params.update(dict(recipe.model_params))
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
    """One run's evaluation steps and its values of ``metric`` (the steps that measured it: the larger
    evaluation's metrics come at fewer steps)."""
    points = [point for point in run["curve"] if metric in point]
    return [point["step"] for point in points], [point[metric] for point in points]


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
    first_step = curve(runs[0], metric)[0][0]
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


def select_axes(results: dict[str, list[dict]], selection_seeds, setting: Setting, metric: str = MAIN_METRIC) -> dict:
    """The best option of each axis of ``AXES``, judged on the selection seeds only.

    Each recipe with an ``axis`` scores its speed-up in ``metric`` over that axis's reference (a censored one is
    worth its bound); the reference scores 1. A generation whose reference was not run keeps None on its axes. The headline
    generation ("best") is the one whose fastest measured recipe is fastest against the ε baseline; both
    generations' combinations go to the held-out seeds.

    Returns ``{axis: option or None, ..., "scores": {name: speed-up over its axis reference},
    "generations": {generation: (fastest recipe, its speed-up over the ε baseline)}, "best": generation}``.
    """
    selection = set(selection_seeds)
    picked = {name: [run for run in runs if run["seed"] in selection] for name, runs in results.items()}
    if not picked.get("baseline"):
        raise ValueError("select_axes: the baseline has no run on the selection seeds.")
    chosen, scores = {}, {}
    for axis, (_, reference) in AXES.items():
        if not picked.get(reference):
            chosen[axis] = None
            continue
        best = (reference, 1.0)
        for name, runs in picked.items():
            if name == reference or not runs or name not in RECIPES or (RECIPES[name].axis or ("",))[0] != axis:
                continue
            scores[name] = compare(runs, picked[reference], metric, setting)["speedup"]
            if scores[name] > best[1]:
                best = (name, scores[name])
        chosen[axis] = best[0]
    generations = {}
    for axis, (generation, reference) in AXES.items():
        if chosen[axis] is None:
            continue
        options = [reference] + [n for n in picked if n in RECIPES and (RECIPES[n].axis or ("",))[0] == axis]
        for name in options:
            if not picked.get(name):
                continue
            speedup = (
                1.0 if name == "baseline" else compare(picked[name], picked["baseline"], metric, setting)["speedup"]
            )
            if generation not in generations or speedup > generations[generation][1]:
                generations[generation] = (name, speedup)
    best = max(generations, key=lambda generation: generations[generation][1])
    return {**chosen, "scores": scores, "generations": generations, "best": best}


# --- evaluation ---------------------------------------------------------------------------------------------------


def flow_time_of_snr(snr: torch.Tensor, path: str) -> torch.Tensor:
    """The flow time t at which ``path`` has the signal-to-noise ratio ``snr`` = (α/σ)²: the inverse of
    ``FlowPath.snr``. Linear (α = 1 − t, σ = t): (1 − t)/t = √SNR, so t = 1/(1 + √SNR). GVP (α = cos(πt/2),
    σ = sin(πt/2)): cot(πt/2) = √SNR, so t = (2/π)·atan(1/√SNR)."""
    root = snr.double().sqrt()
    if path == "linear":
        return 1 / (1 + root)
    if path == "gvp":
        return (2 / math.pi) * torch.atan(1 / root)
    raise ValueError(f"flow_time_of_snr: unknown flow path {path!r}; expected 'linear' or 'gvp'.")


def flow_x0_from_velocity(velocity, noisy, alpha, sigma, d_alpha, d_sigma):
    """The x0 a velocity implies at x_t: solving x_t = α·x0 + σ·ε and v = α̇·x0 + σ̇·ε for x0 gives
    x0 = (σ̇·x_t − σ·v)/(α·σ̇ − σ·α̇): x_t − t·v on the linear path, cos(πt/2)·x_t − (2/π)·sin(πt/2)·v on GVP."""
    return (d_sigma * noisy - sigma * velocity) / (alpha * d_sigma - sigma * d_alpha)


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
    # The larger evaluation: these samples come after the ones above (same classes, then more of each).
    extra_labels: list[int] = field(default_factory=list)
    extra_noise: torch.Tensor | None = None

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
        # Drawn in the first study's order (samples, then the grid), so its samples and grid stay the same; the
        # larger evaluation's extra samples are drawn after them.
        sample_noise = torch.randn((len(labels), *shape), generator=generator)
        grid_noise = torch.randn((len(timesteps), len(test_labels), *shape), generator=generator)
        extra = max(setting.large_samples_per_class - setting.samples_per_class, 0)
        extra_labels = [c for c in range(10) for _ in range(extra)]
        return cls(
            classifier=classifier,
            classifier_accuracy=accuracy,
            reference=reference,
            test_pixels=test_images.float() / 127.5 - 1.0,
            test_labels=test_labels,
            sample_labels=labels,
            sample_noise=sample_noise,
            grid_timesteps=timesteps,
            grid_alphas_cumprod=alphas_cumprod[timesteps].float(),
            grid_noise=grid_noise,
            inference_steps=setting.inference_steps,
            guidance_scale=setting.guidance_scale,
            device="cuda" if torch.cuda.is_available() else "cpu",
            extra_labels=extra_labels,
            extra_noise=torch.randn((len(extra_labels), *shape), generator=generator),
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

    def large_quality(self, images_uint8: np.ndarray, labels) -> dict:
        """``quality`` under the larger evaluation's names (``fd_large``, ``class_accuracy_large``)."""
        return {f"{name}_large": value for name, value in self.quality(images_uint8, labels).items()}

    def _sample(self, pipeline, labels: list[int], noise: torch.Tensor) -> np.ndarray:
        second_order = getattr(pipeline.scheduler, "order", 1) == 2
        steps = (self.inference_steps + 1) // 2 if second_order else self.inference_steps
        images = pipeline(
            labels,
            num_inference_steps=steps,
            guidance_scale=self.guidance_scale,
            latents=noise.clone().to(self.device),  # a copy: the pipeline may denoise in place
            output_type="np",
        ).images
        return np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)

    @torch.no_grad()
    def evaluate_pipeline(self, folder: Path, large: bool = False) -> dict:
        """Sample from and measure the exported pipeline in ``folder``; with ``large``, also the larger evaluation
        (the same samples and as many more as it needs, sampled apart so the first ones stay bit-identical)."""
        from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline

        pipeline = ClassConditionalPipeline.from_pretrained(folder).to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        images = self._sample(pipeline, self.sample_labels, self.sample_noise)
        result = {**self.quality(images, self.sample_labels), **self.heldout_x0_mse(pipeline)}
        if large:
            if self.extra_labels:
                images = np.concatenate([images, self._sample(pipeline, self.extra_labels, self.extra_noise)])
            result.update(self.large_quality(images, self.sample_labels + self.extra_labels))
        return result

    def heldout_x0_mse(self, pipeline) -> dict:
        """x0-space MSE of the pipeline's denoiser on the test digits over the fixed noise grid (see module doc)."""
        from diffusers_speedup.schedulers.scheduling_edm_heun import edm_scalings
        from diffusers_speedup.schedulers.scheduling_flow import path_coefficients

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
            elif "path" in scheduler.config:  # flow: x_t = α(t)·x0 + σ(t)·ε at the t of the same SNR
                path = scheduler.config.path
                t = flow_time_of_snr(alpha_bar.double() / (1 - alpha_bar.double()), path).float()
                alpha, sigma, d_alpha, d_sigma = path_coefficients(t, path)
                noisy = alpha * x0 + sigma * noise
                times = torch.full((len(x0),), t.item(), device=self.device)
                velocity = model(noisy, times, class_labels=labels, return_dict=False)[0][:, : x0.shape[1]]
                x0_hat = flow_x0_from_velocity(velocity, noisy, alpha, sigma, d_alpha, d_sigma)
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

# The setting's fields by what they decide: the training of a run, or its evaluation (the rest, the recipe and seed
# lists and the report's statistics, decide neither).
TRAINING_FIELDS = (
    "resolution",
    "hidden_size",
    "num_layers",
    "num_heads",
    "patch_size",
    "dit_hidden_size",
    "dit_num_layers",
    "dit_num_heads",
    "batch_size",
    "steps",
    "eval_every",
    "warmup_steps",
    "lr",
)
EVALUATION_FIELDS = (
    "samples_per_class",
    "inference_steps",
    "guidance_scale",
    "classifier_epochs",
    "large_samples_per_class",
    "large_eval_every",
)


def _run_identity(setting: dict, fields=TRAINING_FIELDS + EVALUATION_FIELDS) -> dict:
    """What of the setting decides one run's result (by default its training and its evaluation)."""
    return {key: setting.get(key) for key in fields}


def recipe_fingerprint(recipe: Recipe, encoder_dir: Path | None = None) -> dict:
    """What of a recipe decides its training (not its label, group or comparisons), as JSON data."""
    fingerprint = {
        "overrides": recipe.overrides,
        "weighting": recipe.weighting,
        "sampler": recipe.sampler,
        "model": recipe.model,
        "model_params": recipe.model_params,
        "repa": repa_overrides(recipe, encoder_dir) if recipe.repa else None,
    }
    return json.loads(json.dumps(fingerprint))


def evaluation_steps(setting: Setting) -> list[tuple[int, bool]]:
    """The evaluated steps and whether each gets the larger evaluation (every ``large_eval_every`` and the end)."""
    steps = list(range(setting.eval_every, setting.steps + 1, setting.eval_every))
    if not steps or steps[-1] != setting.steps:  # steps not a multiple of eval_every: the final export too
        steps.append(setting.steps)
    return [(step, step % setting.large_eval_every == 0 or step == setting.steps) for step in steps]


def evaluate_run(name: str, seed: int, run_dir: Path, setting: Setting, evaluator: Evaluator, log=print) -> list:
    """Evaluate every exported checkpoint of a finished run: its curve."""
    points = []
    for step, large in evaluation_steps(setting):
        folder = run_dir / "pipeline" if step == setting.steps else run_dir / f"checkpoint-{step}" / "pipeline"
        points.append({"step": step, **evaluator.evaluate_pipeline(folder, large=large)})
        log(
            f"{name} seed {seed} step {step}: FD {points[-1]['fd']:.3f} "
            f"acc {points[-1]['class_accuracy']:.3f} x0-MSE {points[-1]['heldout_x0_mse']:.4f}"
            + (
                f" FD@{len(evaluator.sample_labels) + len(evaluator.extra_labels)} {points[-1]['fd_large']:.3f}"
                if large
                else ""
            )
        )
    return points


def run_recipe(
    name: str,
    recipe: Recipe,
    seed: int,
    setting: Setting,
    evaluator: Evaluator,
    output_dir: Path,
    keep_checkpoints: bool = False,
    log=print,
    encoder_dir: Path | None = None,
) -> dict:
    """Train one recipe with one seed and evaluate it at every checkpoint. A finished run of the same recipe and
    training setting is reused: as it is when its evaluation matches too, else re-evaluated from its exports."""
    from diffusers_speedup.training import Trainer

    run_dir = output_dir / "runs" / f"{name}_seed{seed}"
    result_path = run_dir / "evaluation.json"
    fingerprint = recipe_fingerprint(recipe, encoder_dir)
    if result_path.is_file():
        saved = json.loads(result_path.read_text())
        trained = saved.get("recipe_fingerprint") == fingerprint and _run_identity(
            saved.get("setting") or {}, TRAINING_FIELDS
        ) == _run_identity(asdict(setting), TRAINING_FIELDS)
        if trained and _run_identity(saved["setting"]) == _run_identity(asdict(setting)):
            log(f"{name} seed {seed}: reusing {result_path}")
            return {**saved, "label": recipe.label}
        exports = [run_dir / "pipeline"] + [
            run_dir / f"checkpoint-{s}" / "pipeline" for s, _ in evaluation_steps(setting)[:-1]
        ]
        if trained and all((folder / "model_index.json").is_file() for folder in exports):
            log(f"{name} seed {seed}: re-evaluating the exports of {run_dir} (the evaluation setting changed)")
            start = time.perf_counter()
            points = evaluate_run(name, seed, run_dir, setting, evaluator, log)
            result = {
                **saved,
                "label": recipe.label,
                "setting": asdict(setting),
                "eval_seconds": time.perf_counter() - start,
                "curve": points,
            }
            result_path.write_text(json.dumps(result, indent=1))
            return result
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or differently configured run: start it again
    config = build_config(recipe, setting, seed, run_dir, encoder_dir)
    start = time.perf_counter()
    trainer = Trainer(config)
    trainer.train()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    points = evaluate_run(name, seed, run_dir, setting, evaluator, log)
    result = {
        "recipe": name,
        "label": recipe.label,
        "seed": seed,
        "setting": asdict(setting),
        "recipe_fingerprint": fingerprint,
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
    name, recipe, seed, setting, output_dir, classifier_cache, encoder_dir, keep_checkpoints, threads = task
    torch.set_num_threads(threads)
    key = json.dumps(_run_identity(asdict(setting)), sort_keys=True)
    if key not in _WORKER_EVALUATORS:
        _WORKER_EVALUATORS[key] = Evaluator.build(setting, classifier_cache)
    log = lambda line: print(line, flush=True)
    evaluator = _WORKER_EVALUATORS[key]
    return run_recipe(name, recipe, seed, setting, evaluator, output_dir, keep_checkpoints, log, encoder_dir)


def run_all(tasks, setting, evaluator, output_dir, classifier_cache, encoder_dir, keep_checkpoints, jobs, threads, log):
    """Run ``[(name, recipe, seed)]``, ``jobs`` at a time (one process each beyond the first), in order."""
    if jobs <= 1:
        return [
            run_recipe(n, r, s, setting, evaluator, output_dir, keep_checkpoints, log, encoder_dir) for n, r, s in tasks
        ]
    payload = [
        (n, r, s, setting, output_dir, classifier_cache, encoder_dir, keep_checkpoints, threads) for n, r, s in tasks
    ]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_worker, payload))


# --- the report --------------------------------------------------------------------------------------------------


def hard_targets(results: dict[str, list[dict]], setting: Setting) -> dict:
    """The hard targets, from the selection runs only: per metric of ``HARD_TARGET_METRICS``, the seed-mean value
    at step ``hard_fraction · steps`` of the recipe with the best final seed-mean value. The best recipe reaches it
    in ``hard_fraction`` of the budget by construction; a recipe that reaches it at all is at most
    1/``hard_fraction`` times slower than the best one."""
    targets = {}
    step = setting.hard_fraction * setting.steps
    for metric in HARD_TARGET_METRICS:
        finals = {name: float(np.mean([curve(run, metric)[1][-1] for run in runs])) for name, runs in results.items()}
        best = (min if METRICS[metric] else max)(finals, key=finals.get)
        targets[metric] = {
            "recipe": best,
            "label": results[best][0]["label"],
            "step": step,
            "value": value_at(*mean_curve(results[best], metric), step),
        }
    return targets


def steps_to_target(runs: list[dict], metric: str, target: float, setting: Setting) -> dict:
    """Each seed's steps to reach ``target`` (a seed that never does counts as the budget) and their spread."""
    reached = [steps_to_reach(*curve(run, metric), target, lower_is_better=METRICS[metric]) for run in runs]
    steps = [float(setting.steps) if r is None else r for r in reached]
    return {**spread(steps, setting.bootstrap_samples), "steps": steps, "reached": sum(r is not None for r in reached)}


def summarize(results: dict[str, list[dict]], setting: Setting, heldout: dict[str, list[dict]] | None = None) -> dict:
    """Final metrics with spreads per recipe, every recipe's speed-ups over each recipe it is compared with, and
    every recipe's steps to the hard targets (selection runs; the held-out runs against the same values)."""
    finals, comparisons = {}, []
    groups = [(name, runs) for name, runs in results.items()]
    groups += [(f"{name} (held-out seeds)", runs) for name, runs in (heldout or {}).items()]
    for key, runs in groups:
        finals[key] = {
            "label": runs[0]["label"] + (", held-out seeds" if key.endswith("(held-out seeds)") else ""),
            "seeds": [run["seed"] for run in runs],
            "num_parameters": runs[0]["num_parameters"],
            "train_seconds": float(np.mean([run["train_seconds"] for run in runs])),
            **{m: spread([curve(run, m)[1][-1] for run in runs], setting.bootstrap_samples) for m in METRICS},
        }
    for name, runs in results.items():
        # Every recipe against the ε baseline too, the one reference all rows share.
        references = RECIPES[name].compare_to + (("baseline",) if name != "baseline" else ())
        for reference in dict.fromkeys(references):
            if reference in results:
                comparisons.append(_comparison(name, runs, reference, results[reference], setting, "selection"))
    for combination, reference in HELDOUT_COMPARISONS:
        if heldout and heldout.get(combination) and heldout.get(reference):
            comparisons.append(
                _comparison(combination, heldout[combination], reference, heldout[reference], setting, "held-out")
            )
    targets = hard_targets(results, setting)
    reach = {
        key: {metric: steps_to_target(runs, metric, targets[metric]["value"], setting) for metric in targets}
        for key, runs in groups
    }
    return {"finals": finals, "comparisons": comparisons, "hard_targets": targets, "steps_to_hard_target": reach}


def _comparison(name, runs, reference, reference_runs, setting, seeds) -> dict:
    return {
        "recipe": name,
        "label": runs[0]["label"],
        "reference": reference,
        "reference_label": reference_runs[0]["label"],
        "seed_set": seeds,
        "seeds": [run["seed"] for run in runs],
        **{metric: compare(runs, reference_runs, metric, setting) for metric in SPEEDUP_METRICS},
    }


def _fmt_speedup(entry: dict) -> str:
    return f"{_fmt_short(entry)} ({entry['min']:.2f}–{entry['max']:.2f})"


def _fmt_spread(entry: dict, spec: str) -> str:
    low, high = entry["ci"]
    return f"{format(entry['mean'], spec)} [{format(low, spec)}, {format(high, spec)}]"


def _fmt_reach(entry: dict) -> str:
    if not entry["reached"]:
        return "not reached"
    low, high = entry["ci"]
    mark = "≥ " if entry["reached"] < entry["n"] else ""  # a seed counted as the budget: the true mean is larger
    return f"{mark}{entry['mean']:.0f} [{low:.0f}, {high:.0f}] ({entry['reached']}/{entry['n']})"


def glance_table(summary: dict, setting: Setting) -> list[str]:
    """One row per recipe, in the main metric: what it buys over the recipe it changes and over the ε baseline, its
    final value and its steps to the hard target. The table to read first; the others hold every metric."""
    large = 10 * setting.large_samples_per_class
    target = summary["hard_targets"].get(MAIN_METRIC)
    rows = {(row["recipe"], row["reference"], row["seed_set"]): row for row in summary["comparisons"]}
    lines = [
        f"| recipe | seeds | over the recipe it changes | over the ε baseline | final FD@{large} ↓ |"
        + (f" steps to FD@{large} ≤ {target['value']:.3f} |" if target else ""),
        "|---|---|---|---:|---:|" + ("---:|" if target else ""),
    ]
    for key, final in summary["finals"].items():
        name = key.removesuffix(" (held-out seeds)")
        seed_set = "held-out" if name != key else "selection"
        own = (
            RECIPES[name].compare_to
            if name in RECIPES
            else tuple(reference for combination, reference in HELDOUT_COMPARISONS if combination == name)
        )
        changes = [
            f"{_fmt_short(rows[name, ref, seed_set][MAIN_METRIC])} over `{ref}`"
            for ref in own
            if ref != "baseline" and (name, ref, seed_set) in rows
        ]
        if not changes and name in RECIPES and own[:1] == ("baseline",):
            changes = ["(it changes the baseline)"]
        baseline = rows.get((name, "baseline", seed_set))
        lines.append(
            f"| {final['label']} | {', '.join(map(str, final['seeds']))} | {'; '.join(changes) or '—'} "
            f"| {_fmt_short(baseline[MAIN_METRIC]) if baseline else '—'} | {_fmt_spread(final[MAIN_METRIC], '.2f')} |"
            + (f" {_fmt_reach(summary['steps_to_hard_target'][key][MAIN_METRIC])} |" if target else "")
        )
    return lines


def _fmt_short(entry: dict) -> str:
    mark = "≤ " if entry["censored"] else "≥ " if entry["at_first_evaluation"] else ""
    low, high = entry["ci"]
    return f"{mark}{entry['speedup']:.2f}× [{low:.2f}, {high:.2f}]"


def markdown_report(summary: dict, setting: Setting, reference: dict, selection: dict | None) -> str:
    """The tables and the reading, in markdown."""
    large = 10 * setting.large_samples_per_class
    targets = summary["hard_targets"]
    lines = [
        f"Budget {setting.steps} steps (batch {setting.batch_size}), evaluations every {setting.eval_every} "
        f"({10 * setting.samples_per_class} samples; {large} samples every {setting.large_eval_every} and at the "
        f"end); selection seeds {setting.seeds}"
        + (f", held-out seeds {setting.heldout_seeds}" if setting.heldout_seeds else "")
        + f". Speed-up target: the reference's seed-mean value at step {setting.target_fraction * setting.steps:.0f}. "
        "Speed-ups: estimate [95 % bootstrap interval] (min–max over seeds); ≤: some seed never reached the target "
        "(counted as the full budget); ≥: reached at the first evaluation. FD@N, accuracy@N: the larger evaluation.",
        "",
        f"**At a glance** (FD@{large} speed-ups; every recipe against the same ε baseline, and against the recipe it "
        "differs from in one thing where that is not the baseline):",
        "",
        *glance_table(summary, setting),
        "",
        "Every comparison in every metric:",
        "",
        f"| recipe | compared with | seeds | speed-up (FD) | speed-up (class accuracy) | speed-up (FD@{large}) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in summary["comparisons"]:
        lines.append(
            f"| {row['label']} | {row['reference_label']} | {', '.join(map(str, row['seeds']))} "
            + "".join(f"| {_fmt_speedup(row[metric])} " for metric in SPEEDUP_METRICS)
            + "|"
        )
    names = {"fd_large": f"FD@{large} ≤", "class_accuracy": "class accuracy ≥"}
    lines += [
        "",
        "Steps to the hard targets: the best selection recipe's seed-mean quality at step "
        f"{setting.hard_fraction * setting.steps:.0f} ("
        + "; ".join(
            f"{names[metric]} {target['value']:.3f}, from {target['label']}" for metric, target in targets.items()
        )
        + "). Mean steps [95 % bootstrap interval] (seeds that reached it / seeds); a seed that never reached it "
        "counts as the full budget (≥).",
        "",
        "| recipe | seeds | "
        + " | ".join(f"steps to {names[metric]} {targets[metric]['value']:.3f}" for metric in targets)
        + " |",
        "|---|---|" + "---:|" * len(targets),
    ]
    for key, row in summary["steps_to_hard_target"].items():
        final = summary["finals"][key]
        lines.append(
            f"| {final['label']} | {', '.join(map(str, final['seeds']))} | "
            + " | ".join(_fmt_reach(row[metric]) for metric in targets)
            + " |"
        )
    lines += [
        "",
        "Final values (seed mean [95 % bootstrap interval]):",
        "",
        f"| recipe | parameters | final FD ↓ | final class accuracy ↑ | final FD@{large} ↓ "
        f"| final class accuracy@{large} ↑ | final held-out x0-MSE ↓ | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["finals"].values():
        lines.append(
            f"| {row['label']} | {row['num_parameters'] / 1e6:.2f} M | {_fmt_spread(row['fd'], '.1f')} "
            f"| {_fmt_spread(row['class_accuracy'], '.3f')} | {_fmt_spread(row['fd_large'], '.2f')} "
            f"| {_fmt_spread(row['class_accuracy_large'], '.3f')} | {_fmt_spread(row['heldout_x0_mse'], '.4f')} "
            f"| {row['train_seconds']:.0f} |"
        )
    lines.append(
        f"| *real digits (train subset vs held-out)* | | {reference['fd']:.1f} | {reference['class_accuracy']:.3f} "
        f"| {reference['fd_large']:.2f} | {reference['class_accuracy_large']:.3f} | | |"
    )
    lines += ["", "### Reading", ""] + reading(summary, setting, selection, reference)
    return "\n".join(lines) + "\n"


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


def direction_verdict(interval: tuple[float, float], claim: str = "better") -> str:
    """How a measured speed-up interval stands to a published direction: "better" (the technique reaches a quality
    sooner) or "parity" (no difference)."""
    low, high = interval
    if claim == "parity":
        return "consistent (the interval includes 1×)" if low <= 1.0 <= high else "differs here"
    if low > 1.0:
        return "supported (faster)"
    if high < 1.0:
        return "contradicted here (slower)"
    return "cannot tell (the interval includes 1×)"


# Directional claims of the second generation: (claim, [(recipe, reference)], "better" | "parity").
DIRECTION_CLAIMS = [
    (
        "SiT over DiT at equal steps (SiT Table 1: FID 43.5 → 33.0 for B/2 at 400K; LightningDiT rung 1: "
        "19.50 → 17.20)",
        [("dit_flow", "dit_baseline"), ("uvit_flow", "baseline")],
        "better",
    ),
    (
        "SD3's logit-normal(0, 1) over uniform t (SD3 Tables 1–2: rank 1.54 against 5.67; LightningDiT rung 4: "
        "16.61 → 13.99)",
        [("dit_flow_lognorm", "dit_flow")],
        "better",
    ),
    (
        "GVP against linear (SiT-B/2 with the ODE: FID 34.6 against 34.8, parity)",
        [("dit_flow_gvp", "dit_flow")],
        "parity",
    ),
    ("LightningDiT + velocity-direction loss (13.99 → 12.52)", [("dit_flow_cosine", "dit_flow_lognorm")], "better"),
    ("LightningDiT + SwiGLU (12.52 → 10.10)", [("dit_swiglu", "dit_flow_lognorm")], "better"),
    ("LightningDiT + RMSNorm (10.10 → 9.25)", [("dit_rmsnorm", "dit_swiglu")], "better"),
    ("LightningDiT + RoPE (9.25 → 7.13)", [("dit_rope", "dit_rmsnorm")], "better"),
]


def _fmt_pair(row: dict, metric: str = MAIN_METRIC) -> str:
    entry = row[metric]
    return f"{entry['speedup']:.2f}× [{entry['ci'][0]:.2f}, {entry['ci'][1]:.2f}]"


def reading(summary: dict, setting: Setting, selection: dict | None, reference: dict | None = None) -> list[str]:
    """The honest reading, generated from the numbers: claims, what hurts, what this scale cannot test."""
    by_pair = {
        (row["recipe"], row["reference"]): row for row in summary["comparisons"] if row["seed_set"] == "selection"
    }
    heldout = {
        (row["recipe"], row["reference"]): row for row in summary["comparisons"] if row["seed_set"] == "held-out"
    }
    large = 10 * setting.large_samples_per_class
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
    lines.append(
        f"- Verdicts are read in FD@{large} speed-ups (estimate [95 % interval]); the first study's FD (on "
        f"{10 * setting.samples_per_class} samples) is in the table."
    )
    claims = [
        (
            "Min-SNR-γ",
            [
                ("min_snr", "baseline"),
                ("min_snr_v", "v_baseline"),
                ("min_snr_x0", "x0_baseline"),
                ("dit_flow_min_snr", "dit_flow"),
            ],
        ),
        ("SpeeD", [("speed_linear", "linear_baseline"), ("speed", "baseline"), ("dit_speed", "dit_baseline")]),
        ("REPA", [("dit_flow_repa", "dit_flow"), ("dit_repa", "dit_baseline"), ("uvit_repa", "baseline")]),
    ]
    for claim, pairs in claims:
        parts = [
            f"{by_pair[pair]['label']} vs {by_pair[pair]['reference_label']}: {_fmt_pair(by_pair[pair])}, "
            f"{claim_verdict(by_pair[pair][MAIN_METRIC]['ci'], CLAIMS[claim])}"
            for pair in pairs
            if pair in by_pair
        ]
        if parts:
            lines.append(f"- **{claim}, published {CLAIMS[claim]}×**: " + "; ".join(parts) + ".")
    controls = [
        f"{by_pair[pair]['label']}: {_fmt_pair(by_pair[pair])}, "
        + (
            "the trained encoder is faster: its features count"
            if by_pair[pair][MAIN_METRIC]["ci"][1] < 1.0
            else "the random encoder does as well: no gain is shown to come from the features"
        )
        for pair in REPA_CONTROLS
        if pair in by_pair
    ]
    if controls:
        lines.append(
            "- **REPA's controls**, the random encoder against the trained one (below 1×: the trained encoder is "
            "faster): " + "; ".join(controls) + "."
        )
    for claim, pairs, kind in DIRECTION_CLAIMS:
        parts = [
            f"{by_pair[pair]['label']} vs {by_pair[pair]['reference_label']}: {_fmt_pair(by_pair[pair])}, "
            f"{direction_verdict(by_pair[pair][MAIN_METRIC]['ci'], kind)}"
            for pair in pairs
            if pair in by_pair
        ]
        cosine = "velocity-direction" in claim
        if cosine:
            parts.append(
                "cannot be tested here: on the one-channel digits the cosine over channels is ±1 and its gradient "
                "zero" + ("" if parts else " (so the study does not run it)")
            )
        if parts and (cosine or any(pair in by_pair for pair in pairs)):
            lines.append(f"- **{claim}**: " + "; ".join(parts) + ".")
    hurts = [
        f"{row['label']} vs {row['reference_label']} ({_fmt_pair(row)})"
        for row in summary["comparisons"]
        if row[MAIN_METRIC]["ci"][1] < 1.0
    ]
    lines.append(
        f"- **Where a technique hurts** (the whole FD@{large} interval below 1×): "
        + ("; ".join(hurts) if hurts else "none")
        + "."
    )
    ladder = [("edm_lognormal", "edm_precond"), ("edm_weighting", "edm_lognormal"), ("edm2", "edm_weighting")]
    steps = [
        f"{by_pair[p]['label']} {_fmt_pair(by_pair[p])}" for p in [("edm_precond", "baseline"), *ladder] if p in by_pair
    ]
    if steps:
        lines.append(
            "- **EDM2, one change at a time** (each over the step before; the first over the ε baseline): "
            + "; ".join(steps)
            + "."
        )
    if selection is not None:
        texts = []
        for name, axes in (
            (COMBINATION, ("objective", "sampler")),
            (FLOW_COMBINATION, FLOW_AXES),
        ):
            if any(selection.get(axis) is None for axis in axes):
                continue
            text = ", ".join(f"{axis} of `{selection[axis]}`" for axis in axes)
            if (name, "baseline") in heldout:
                text += f": on the held-out seeds {_fmt_pair(heldout[name, 'baseline'])} against the baseline"
            if (name, FLOW_COMBINATION_WITHOUT_REPA) in heldout:
                text += (
                    f", and {_fmt_pair(heldout[name, FLOW_COMBINATION_WITHOUT_REPA])} against the same combination "
                    "without REPA"
                )
            texts.append(text)
        best = selection.get("best")
        if texts:
            lines.append(
                "- **Best combinations**, chosen on the selection seeds: "
                + "; ".join(texts)
                + (
                    f". The headline is the {best} generation's (its fastest recipe, "
                    f"`{selection['generations'][best][0]}`, was the fastest against the ε baseline on the selection "
                    "seeds)."
                    if best in selection.get("generations", {})
                    else "."
                )
            )
    targets, reach = summary["hard_targets"], summary["steps_to_hard_target"]
    for metric, target in targets.items():
        every = [
            key for key, row in reach.items() if row[metric]["reached"] == row[metric]["n"] and "held-out" not in key
        ]
        some = [
            key for key, row in reach.items() if 0 < row[metric]["reached"] < row[metric]["n"] and "held-out" not in key
        ]
        held = [
            f"{summary['finals'][key]['label']} {reach[key][metric]['reached']}/{reach[key][metric]['n']}"
            for key in reach
            if "held-out" in key
        ]
        lines.append(
            f"- **Hard target** ({'FD@' + str(large) if metric == 'fd_large' else metric} {target['value']:.3f}, what "
            f"`{target['recipe']}` has at step {target['step']:.0f}): reached by every selection seed of "
            + (", ".join(f"`{key}`" for key in every) or "no recipe")
            + (f"; by some seeds of {', '.join(f'`{key}`' for key in some)}" if some else "")
            + (f"; on the held-out seeds: {'; '.join(held)}" if held else "")
            + "."
        )
    if reference is not None:
        floors = []
        for metric, floor in (("fd", reference["fd"]), ("fd_large", reference["fd_large"])):
            at_floor = [
                key for key, row in summary["finals"].items() if row[metric]["ci"][0] <= floor and "held-out" not in key
            ]
            floors.append(
                f"{len(at_floor)} of {sum('held-out' not in k for k in summary['finals'])} recipes reach the real-data "
                f"floor of {'FD' if metric == 'fd' else f'FD@{large}'} ({floor:.2f})"
            )
        lines.append("- **Evaluation resolution.** " + "; ".join(floors) + " (interval's lower end at or below it).")
    lines.append(
        "- **What this scale cannot test**: the published numbers are FID-50k results of 33–675 M-parameter "
        "models trained for 10⁵–10⁶ steps on ImageNet (pixels or latents); here a "
        f"{baseline['num_parameters'] / 1e6 if baseline else float('nan'):.2f} M-parameter model sees "
        f"{setting.resolution}×{setting.resolution} one-channel digits for {setting.steps} steps, quality is measured "
        f"in a small classifier's feature space with {10 * setting.samples_per_class} and {large} samples, and "
        f"{len(setting.seeds)} seeds resolve only large differences. A gain that needs long training (SpeeD's "
        "skipped near-zero-noise steps, Min-SNR's conflict between timesteps at scale, RoPE's and SwiGLU's gains "
        "with many tokens and wide layers over 16 tokens of width 64) may not show, and a loss here does not "
        "refute a claim there."
    )
    return lines


# --- the plot (matplotlib, the bench extra) --------------------------------------------------------------------


def draw_plot(results: dict[str, list[dict]], path: Path, heldout: dict[str, list[dict]] | None = None) -> None:
    """Per group of recipes, FD and class accuracy against steps: seed-mean lines, min–max over seeds shaded; the
    ε baseline (dashed) in every panel, and the recipe each member is compared with first; the held-out seeds in a
    panel of their own. Five groups to a row. Saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    groups: dict[str, list[str]] = {}
    for name in results:
        groups.setdefault(RECIPES[name].group, []).append(name)
    panels = []
    for group, names in groups.items():
        shown = ["baseline"] if "baseline" in results else []
        for name in names:
            reference = (RECIPES[name].compare_to or (None,))[0]
            shown += [n for n in (reference, name) if n in results and n not in shown]
        panels.append((group, [(results[n][0]["label"], results[n]) for n in shown]))
    if heldout:
        panels.append(("held-out seeds", [(runs[0]["label"], runs) for runs in heldout.values() if runs]))
    columns = min(len(panels), 5)
    rows = -(-len(panels) // columns)
    figure, axes = pyplot.subplots(2 * rows, columns, figsize=(4.4 * columns, 7.5 * rows), squeeze=False)
    for index, (group, members) in enumerate(panels):
        top, column = 2 * (index // columns), index % columns
        for row, (metric, title) in enumerate((("fd", "FD ↓"), ("class_accuracy", "class accuracy ↑"))):
            axis = axes[top + row][column]
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
        axes[top][column].legend(fontsize=6)
    for index in range(len(panels), rows * columns):  # empty cells of the last row
        for row in (0, 1):
            axes[2 * (index // columns) + row][index % columns].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


# --- entry point --------------------------------------------------------------------------------------------------


def check_setting(setting: Setting) -> None:
    """Every contradiction of a setting, one message each naming the option, before any work."""
    unknown = [name for name in setting.recipes if name not in RECIPES]
    if unknown:
        raise ValueError(f"--recipes: unknown recipe(s) {unknown}; available: {', '.join(RECIPES)}.")
    if setting.eval_every > setting.steps:
        raise ValueError(f"--eval_every={setting.eval_every} is larger than --steps={setting.steps}.")
    if setting.large_eval_every % setting.eval_every or setting.large_eval_every > setting.steps:
        raise ValueError(
            f"--large_eval_every={setting.large_eval_every} must be a multiple of --eval_every={setting.eval_every} "
            f"and at most --steps={setting.steps}."
        )
    if setting.large_samples_per_class < setting.samples_per_class:
        raise ValueError(
            f"--large_samples_per_class={setting.large_samples_per_class} is smaller than --samples_per_class="
            f"{setting.samples_per_class}; the larger evaluation contains the smaller one."
        )
    if not setting.seeds:
        raise ValueError("--seeds: at least one selection seed is needed.")
    overlap = set(setting.seeds) & set(setting.heldout_seeds)
    if overlap:
        raise ValueError(f"--heldout_seeds: {sorted(overlap)} also among the selection seeds --seeds.")
    for option, fraction in (("target_fraction", setting.target_fraction), ("hard_fraction", setting.hard_fraction)):
        if not 0 < fraction <= 1 or fraction * setting.steps < setting.large_eval_every:
            raise ValueError(
                f"--{option}={fraction}: the target step must lie between the first evaluation of every metric "
                f"({setting.large_eval_every}, the larger evaluation's) and the budget ({setting.steps})."
            )


def run_benchmark(
    setting: Setting,
    output_dir: str | Path,
    classifier_cache: str | Path | None = None,
    keep_checkpoints: bool = False,
    jobs: int = 1,
    threads: int = 1,
    log=print,
    encoder_cache: str | Path | None = None,
) -> dict:
    """Train and evaluate every recipe × selection seed, then both generations' chosen combinations and the
    baseline on the held-out seeds; write results.json, results.md and convergence.png. Returns what results.json
    holds."""
    check_setting(setting)
    output_dir = Path(output_dir)
    repa_recipes = [name for name in setting.recipes if RECIPES[name].repa]
    output_dir.mkdir(parents=True, exist_ok=True)
    classifier_cache = Path(classifier_cache or output_dir / "classifier")
    start = time.perf_counter()
    evaluator = Evaluator.build(setting, classifier_cache)  # trains the classifier once, before any worker starts
    log(f"classifier held-out accuracy {evaluator.classifier_accuracy:.4f}")
    encoder_dir, encoder_report = None, None
    if repa_recipes:  # trained once, before any worker starts, like the classifier
        from digits_encoder import EncoderSettings, load_or_train_encoders

        encoder_dir, encoder_report = load_or_train_encoders(
            EncoderSettings(resolution=setting.resolution, steps=setting.encoder_steps),
            Path(encoder_cache or output_dir / "encoder"),
            log=log,
        )

    # The floors: real training digits (as many as the samples, a fixed subset) against the held-out ones.
    train_images, train_labels = digits_arrays(setting.resolution, "train")
    subset = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
    small = subset[: len(evaluator.sample_labels)]
    reference = evaluator.quality(train_images[small].permute(0, 2, 3, 1).numpy(), train_labels[small])
    # The larger floor: as many training digits as its samples, or all of them (1617) when there are more samples.
    large = subset[: len(evaluator.sample_labels) + len(evaluator.extra_labels)]
    reference.update(evaluator.large_quality(train_images[large].permute(0, 2, 3, 1).numpy(), train_labels[large]))
    reference["num_large"] = len(large)

    common = (setting, evaluator, output_dir, classifier_cache, encoder_dir, keep_checkpoints, jobs, threads, log)
    tasks = [(name, RECIPES[name], seed) for name in setting.recipes for seed in setting.seeds]
    results = {name: [] for name in setting.recipes}
    for (name, _, _), result in zip(tasks, run_all(tasks, *common)):
        results[name].append(result)

    selection, heldout = None, None
    if setting.heldout_seeds and "baseline" in results:
        selection = select_axes(results, setting.seeds, setting)
        log(f"chosen on seeds {setting.seeds}: {selection}")
        tasks = heldout_tasks(selection, setting)
        heldout = {name: [] for name, _, _ in tasks}
        for (name, _, _), result in zip(tasks, run_all(tasks, *common)):
            heldout[name].append(result)
        if COMBINATION not in heldout:  # nothing beat the baseline on the selection seeds: it is its own best
            label = combination_recipe(selection["objective"], selection["sampler"]).label
            heldout[COMBINATION] = [{**run, "recipe": COMBINATION, "label": label} for run in heldout["baseline"]]

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
        "repa_encoders": encoder_report,
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
    mode.add_argument("--tiny", action="store_true", help="seconds on CPU: 8×8 digits, 3 recipes, 4 steps, 2+1 seeds")
    mode.add_argument("--gpu", action="store_true", help="the same recipes, 10000 steps, larger evaluation")
    parser.add_argument("--output_dir", default=None, help="default outputs/benchmarks/convergence[_tiny|_gpu]")
    parser.add_argument("--classifier_cache", default=None, help="default <output_dir>/classifier")
    parser.add_argument("--encoder_cache", default=None, help="REPA's encoders; default <output_dir>/encoder")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"any of: {' '.join(RECIPES)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="selection seeds (default 0 1 2)")
    parser.add_argument("--heldout_seeds", nargs="*", type=int, default=None, help="default 3 4 5; none: skip")
    integers = ("steps", "eval_every", "batch_size", "samples_per_class", "large_samples_per_class")
    integers += ("large_eval_every", "inference_steps", "bootstrap_samples")
    for name in integers:
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--target_fraction", type=float, default=None)
    parser.add_argument("--hard_fraction", type=float, default=None)
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
        encoder_cache=args.encoder_cache,
    )


if __name__ == "__main__":
    main()
