import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("convergence", REPO / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["convergence"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


convergence = load_benchmark()
import digits_encoder  # noqa: E402  (benchmarks/ is on sys.path once convergence.py is loaded)

# --- steps to reach ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "values", "target", "lower_is_better", "expected"),
    [
        # Crosses 2.0 halfway between (200, 3.0) and (300, 1.0).
        ([100, 200, 300], [5.0, 3.0, 1.0], 2.0, True, 250.0),
        # 4.5: a quarter of the way from 5.0 to 3.0.
        ([100, 200, 300], [5.0, 3.0, 1.0], 4.5, True, 125.0),
        # Exactly on an evaluation point.
        ([100, 200, 300], [5.0, 3.0, 1.0], 3.0, True, 200.0),
        # Already reached at the first evaluation.
        ([100, 200, 300], [2.0, 3.0, 1.0], 2.5, True, 100.0),
        # Never reached.
        ([100, 200, 300], [5.0, 3.0, 1.0], 0.5, True, None),
        # The first crossing counts, not a later one after a bump.
        ([100, 200, 300, 400], [4.0, 2.0, 3.0, 1.0], 2.5, True, 175.0),
        # Higher is better (accuracy): 0.8 is reached 3/4 of the way from 0.5 to 0.9.
        ([10, 20, 30], [0.2, 0.5, 0.9], 0.8, False, 27.5),
        ([10, 20, 30], [0.2, 0.5, 0.9], 0.95, False, None),
    ],
)
def test_steps_to_reach_interpolates_linearly_between_evaluations(steps, values, target, lower_is_better, expected):
    reached = convergence.steps_to_reach(steps, values, target, lower_is_better=lower_is_better)
    assert reached == (None if expected is None else pytest.approx(expected))


def test_steps_to_reach_rejects_mismatched_curves():
    with pytest.raises(ValueError, match="equally long"):
        convergence.steps_to_reach([1, 2], [1.0], 0.5)


def test_value_at_interpolates_and_refuses_extrapolation():
    assert convergence.value_at([100, 200], [4.0, 2.0], 150) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="outside"):
        convergence.value_at([100, 200], [4.0, 2.0], 250)


# --- statistics against closed forms -----------------------------------------------------------------------------


def test_bootstrap_of_identical_values_has_zero_width():
    low, high = convergence.bootstrap_interval([[2.5, 2.5, 2.5]], np.mean, samples=500)
    assert low == high == 2.5
    low, high = convergence.bootstrap_interval([[4.0] * 3, [2.0] * 3], lambda a, b: a.mean() / b.mean())
    assert low == high == 2.0


def test_bootstrap_of_two_values_spans_them():
    # Resamples of {0, 1} of size 2 have mean 0 or 1 with probability 1/4 each (> 2.5 %): the 95 % interval is
    # exactly [0, 1].
    assert convergence.bootstrap_interval([[0.0, 1.0]], np.mean, samples=4000) == (0.0, 1.0)


def test_bootstrap_is_seeded():
    values = [[0.3, 1.2, 2.0, 0.7, 1.9]]
    first = convergence.bootstrap_interval(values, np.mean, samples=300, seed=7)
    assert convergence.bootstrap_interval(values, np.mean, samples=300, seed=7) == first
    assert first[0] < np.mean(values) < first[1]


def test_bootstrap_rejects_empty_groups():
    with pytest.raises(ValueError, match="at least one value"):
        convergence.bootstrap_interval([[1.0], []], lambda a, b: 0.0)


def test_spread_is_mean_and_min_max():
    result = convergence.spread([1.0, 2.0, 6.0], samples=200)
    assert result["mean"] == pytest.approx(3.0) and result["min"] == 1.0 and result["max"] == 6.0
    assert 1.0 <= result["ci"][0] <= 3.0 <= result["ci"][1] <= 6.0 and result["n"] == 3


def fake_run(recipe, seed, fd, accuracy=None, steps=(100, 200, 300, 400, 500)):
    accuracy = accuracy or [0.1] * len(steps)
    points = [
        {"step": s, "fd": f, "class_accuracy": a, "heldout_x0_mse": f / 100, "fd_large": f, "class_accuracy_large": a}
        for s, f, a in zip(steps, fd, accuracy)
    ]
    label = convergence.RECIPES[recipe].label if recipe in convergence.RECIPES else recipe
    return {"recipe": recipe, "label": label, "seed": seed, "num_parameters": 10, "train_seconds": 1.0, "curve": points}


SETTING = convergence.Setting(steps=500, eval_every=100, target_fraction=0.8, bootstrap_samples=300)


def test_speedup_of_a_curve_twice_as_fast():
    # The baseline falls linearly from 500 to 100 (FD 180 at step 400, the target); the recipe twice as fast.
    baseline = [fake_run("baseline", s, [500, 400, 300, 200, 100]) for s in (0, 1)]
    fast = [fake_run("min_snr", s, [400, 200, 100, 50, 25]) for s in (0, 1)]
    result = convergence.compare(fast, baseline, "fd", SETTING)
    assert result["target"] == pytest.approx(200.0) and result["target_step"] == 400
    assert result["reference_steps"] == [400.0, 400.0] and result["recipe_steps"] == [200.0, 200.0]
    assert result["speedup"] == pytest.approx(2.0) and result["ci"] == [pytest.approx(2.0)] * 2
    assert result["min"] == result["max"] == pytest.approx(2.0) and not result["censored"]


def test_speedup_spread_over_seeds_and_censoring():
    baseline = [fake_run("baseline", s, [500, 400, 300, 200, 100]) for s in (0, 1)]
    # Seed 0 reaches FD 200 at step 200 (2×), seed 1 at step 400 (1×): mean steps 300, speed-up 4/3.
    mixed = [fake_run("min_snr", 0, [400, 200, 100, 50, 25]), fake_run("min_snr", 1, [500, 400, 300, 200, 100])]
    result = convergence.compare(mixed, baseline, "fd", SETTING)
    assert result["speedup"] == pytest.approx(4 / 3)
    assert (result["min"], result["max"]) == (pytest.approx(1.0), pytest.approx(2.0))
    assert 1.0 <= result["ci"][0] <= 4 / 3 <= result["ci"][1] <= 2.0
    # A seed that never gets there counts as the full budget (500) and is flagged: an upper bound.
    slow = [fake_run("speed", s, [900, 800, 700, 600, 500]) for s in (0, 1)]
    result = convergence.compare(slow, baseline, "fd", SETTING)
    assert result["censored"] == 2 and result["speedup"] == pytest.approx(400 / 500)
    # Accuracy: higher is better.
    up = [fake_run("baseline", s, [1] * 5, [0.1, 0.2, 0.3, 0.4, 0.5]) for s in (0, 1)]
    result = convergence.compare(up, up, "class_accuracy", SETTING)
    assert result["target"] == pytest.approx(0.4) and result["speedup"] == pytest.approx(1.0)


def test_selection_never_uses_the_heldout_seeds():
    falling = [500, 400, 300, 200, 100]
    results = {
        "baseline": [fake_run("baseline", s, falling) for s in (0, 1, 2, 3)],
        # Min-SNR is 2× faster on the selection seeds 0, 1 and slower on 2, 3; SpeeD the other way round.
        "min_snr": [fake_run("min_snr", s, [400, 200, 100, 50, 25] if s < 2 else [900] * 5) for s in (0, 1, 2, 3)],
        "speed": [fake_run("speed", s, [900] * 5 if s < 2 else [100] * 5) for s in (0, 1, 2, 3)],
    }
    chosen = convergence.select_axes(results, [0, 1], SETTING)
    assert chosen["objective"] == "min_snr" and chosen["sampler"] == "baseline"  # SpeeD is slower on seeds 0, 1
    assert chosen["scores"]["min_snr"] == pytest.approx(2.0)
    # The other seeds would have chosen SpeeD and kept the ε objective.
    other = convergence.select_axes(results, [2, 3], SETTING)
    assert (other["objective"], other["sampler"]) == ("baseline", "speed")
    # Changing every run on the held-out seeds changes nothing.
    for runs in results.values():
        for run in runs:
            if run["seed"] >= 2:
                run["curve"] = fake_run("x", run["seed"], [1] * 5)["curve"]
    assert convergence.select_axes(results, [0, 1], SETTING) == chosen
    with pytest.raises(ValueError, match="selection seeds"):
        convergence.select_axes(results, [9], SETTING)


@pytest.mark.parametrize(
    ("interval", "verdict"),
    [
        ((3.5, 4.0), "supported"),
        ((2.0, 3.5), "consistent"),
        ((1.2, 2.0), "short of"),
        ((0.8, 1.5), "no measurable gain"),
        ((0.5, 0.9), "slower"),
    ],
)
def test_claim_verdict(interval, verdict):
    assert verdict in convergence.claim_verdict(interval, 3.4)


# --- recipes -----------------------------------------------------------------------------------------------------


def aspects(config) -> dict:
    """What a recipe can change, grouped into the changes the study makes one at a time."""
    objective = config.objective
    return {
        "model": (config.model.kind, tuple(sorted(config.model.params.items()))),
        "schedule": (objective.schedule.kind, objective.schedule.beta_schedule, config.sampling.scheduler),
        "path": objective.schedule.path,
        "prediction": objective.prediction_type,
        "variance": objective.learned_variance,
        "sampler": tuple(sorted(objective.sampler.items())),
        "weighting": tuple(sorted(objective.weighting.items())),
        "uncertainty": (objective.learned_uncertainty, objective.loss_reduction),
        "cosine loss": objective.cosine_loss_weight,
    }


# Rectified flow is one change of the objective family, as LightningDiT's rung 1 makes it
# (tests/test_flow_recipes.py): the schedule and its sampler, the target, and (for the DiT) no learned variance.
RECTIFIED_FLOW = ("schedule", "prediction")


@pytest.mark.parametrize(
    ("recipe", "reference", "changed"),
    [
        ("min_snr", "baseline", ("weighting",)),
        ("v_baseline", "baseline", ("prediction",)),
        ("x0_baseline", "baseline", ("prediction",)),
        ("min_snr_v", "v_baseline", ("weighting",)),
        ("min_snr_x0", "x0_baseline", ("weighting",)),
        ("speed", "baseline", ("sampler",)),
        ("linear_baseline", "baseline", ("schedule",)),
        ("speed_linear", "linear_baseline", ("sampler",)),
        ("edm_lognormal", "edm_precond", ("sampler",)),
        ("edm_weighting", "edm_lognormal", ("weighting",)),
        ("edm2", "edm_weighting", ("uncertainty",)),
        ("dit_speed", "dit_baseline", ("sampler",)),
        ("uvit_flow", "baseline", RECTIFIED_FLOW),
        ("dit_flow", "dit_baseline", (*RECTIFIED_FLOW, "variance")),
        ("dit_flow_lognorm", "dit_flow", ("sampler",)),
        ("dit_flow_cosine", "dit_flow_lognorm", ("cosine loss",)),
        ("dit_flow_gvp", "dit_flow", ("path",)),
        ("dit_flow_min_snr", "dit_flow", ("weighting",)),
        ("dit_swiglu", "dit_flow_lognorm", ("model",)),
        ("dit_rmsnorm", "dit_swiglu", ("model",)),
        ("dit_rope", "dit_rmsnorm", ("model",)),
    ],
)
def test_each_comparison_changes_one_thing(recipe, reference, changed, tmp_path):
    setting = convergence.Setting()
    ours, theirs = (aspects(convergence.build_config(n, setting, 0, tmp_path)) for n in (recipe, reference))
    assert [key for key in ours if ours[key] != theirs[key]] == list(changed)
    assert reference in convergence.RECIPES[recipe].compare_to or reference == "baseline"
    if changed == ("model",):  # one LightningDiT rung: one constructor argument of the DiT, the others kept
        ours, theirs = (
            dict(convergence.build_config(n, setting, 0, tmp_path).model.params) for n in (recipe, reference)
        )
        assert len({key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}) == 1


@pytest.mark.parametrize("recipe", [name for name, r in convergence.RECIPES.items() if r.repa])
def test_each_repa_arm_is_its_reference_plus_repa(recipe):
    # REPA's recipes cannot be built before REPA lands; what they train apart from REPA is their reference's.
    arm = convergence.RECIPES[recipe]
    reference = convergence.RECIPES[arm.compare_to[0]]
    assert arm.repa in ("trained", "random") and reference.repa is None
    for field in ("overrides", "weighting", "sampler", "model", "model_params"):
        assert getattr(arm, field) == getattr(reference, field), field


def test_every_repa_arm_has_its_random_encoder_control_in_the_study():
    # The fairness check: the gain must come from the features, not from the extra loss term.
    trained = {n for n, r in convergence.RECIPES.items() if r.repa == "trained"}
    assert {arm for _, arm in convergence.REPA_CONTROLS} == trained
    for control, arm in convergence.REPA_CONTROLS:
        ours, theirs = convergence.RECIPES[control], convergence.RECIPES[arm]
        assert (ours.repa, theirs.repa) == ("random", "trained")
        assert ours.compare_to == (theirs.compare_to[0], arm)  # against its network without REPA, and the arm
        assert control in convergence.STUDY_RECIPES and arm in convergence.STUDY_RECIPES
        for field in ("overrides", "weighting", "sampler", "model", "model_params"):
            assert getattr(ours, field) == getattr(theirs, field), field


def test_repa_arms_are_in_the_study_and_train_with_the_packages_repa_section(tmp_path):
    assert {n for n, r in convergence.RECIPES.items() if r.repa} <= set(convergence.STUDY_RECIPES)
    for name, encoder in (("dit_flow_repa", "trained"), ("dit_flow_repa_random", "random")):
        assert convergence.repa_overrides(convergence.RECIPES[name], tmp_path) == [
            "repa.enabled=true",
            f"repa.encoder={tmp_path / encoder}",
            "repa.depth=2",
            "repa.weight=0.5",
            "repa.projector_dim=256",
        ]
    assert convergence.repa_overrides(convergence.RECIPES["baseline"], tmp_path) == []
    with pytest.raises(ValueError, match="encoder"):
        convergence.repa_overrides(convergence.RECIPES["dit_repa"], None)
    config = convergence.build_config("uvit_repa", convergence.Setting(), 0, tmp_path, encoder_dir=tmp_path)
    repa = config.repa
    assert (repa.enabled, repa.depth, repa.weight, repa.projector_dim) == (True, 2, 0.5, 256)
    assert repa.encoder == str(tmp_path / "trained") and repa.encoder_resolution == 8  # the digit at its own side
    # A different encoder is a different training: the fingerprint a finished run is reused by names it.
    ours = convergence.recipe_fingerprint(convergence.RECIPES["dit_flow_repa"], tmp_path / "a")
    assert ours != convergence.recipe_fingerprint(convergence.RECIPES["dit_flow_repa"], tmp_path / "b")


def test_every_recipe_builds_a_valid_config(tmp_path):
    setting = convergence.Setting()
    for name in convergence.RECIPES:
        config = convergence.build_config(name, setting, 3, tmp_path / name, encoder_dir=tmp_path / "encoders")
        assert config.train.max_steps == setting.steps and config.train.export_every_checkpoint
        assert config.train.seed == 3 and config.optim.lr_schedule == "constant_with_warmup"
    edm2 = convergence.build_config("edm2", setting, 0, tmp_path)
    assert edm2.objective.learned_uncertainty and edm2.objective.loss_reduction == "sum"
    assert edm2.sampling.scheduler == "edm_heun"
    speed = convergence.build_config("speed_linear", setting, 0, tmp_path).objective
    assert speed.schedule.beta_schedule == "linear" and speed.sampler["tau"] == 700
    dit = convergence.build_config("dit_baseline", setting, 0, tmp_path)
    assert dit.model.kind == "dit" and dit.objective.learned_variance and dit.objective.label_dropout == 0
    flow = convergence.build_config("dit_rope", setting, 0, tmp_path)
    assert (flow.objective.schedule.kind, flow.objective.prediction_type) == ("flow", "velocity")
    assert not flow.objective.learned_variance and flow.sampling.scheduler == "flow_euler"
    assert flow.model.params == {
        "patch_size": 2,
        "hidden_size": 64,
        "num_layers": 5,
        "num_attention_heads": 4,
        "mlp_type": "swiglu",
        "norm_type": "rmsnorm",
        "use_rope": True,
    }
    assert flow.objective.sampler == {"kind": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}
    assert set(convergence.STUDY_RECIPES) <= set(convergence.RECIPES)
    with pytest.raises(ValueError, match="no_such_recipe"):
        convergence.build_config("no_such_recipe", setting, 0, tmp_path)


def test_dit_is_sized_like_the_uvit():
    from diffusers_speedup.models import DiTModel, UViTModel

    s = convergence.Setting()
    common = dict(sample_size=s.resolution, in_channels=1, patch_size=s.patch_size, num_classes=10)
    uvit = UViTModel(**common, hidden_size=s.hidden_size, num_layers=s.num_layers, num_attention_heads=s.num_heads)
    dit = DiTModel(
        **common, out_channels=2, hidden_size=s.dit_hidden_size, num_layers=s.dit_num_layers, num_attention_heads=4
    )
    count = lambda model: sum(p.numel() for p in model.parameters())
    assert abs(count(dit) / count(uvit) - 1) < 0.1


def test_baseline_noise_levels_of_the_edm_ladder_match_uniform_t_on_the_cosine_schedule():
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    log_sigma = 0.5 * ((1 - alphas_cumprod) / alphas_cumprod).log()
    sampler = dict(convergence.BASELINE_SIGMAS)
    assert sampler["p_std"] == pytest.approx(math.pi / 2)
    assert abs(log_sigma.mean().item() - sampler["p_mean"]) < 0.1
    assert log_sigma.std().item() == pytest.approx(sampler["p_std"], rel=0.05)


def test_combination_takes_the_objective_and_the_sampler_of_its_parts(tmp_path):
    recipe = convergence.combination_recipe("min_snr_v", "speed")
    config = convergence.build_config(recipe, convergence.Setting(), 0, tmp_path)
    assert config.objective.prediction_type == "v_prediction" and config.objective.weighting["kind"] == "min_snr"
    assert config.objective.sampler["kind"] == "speed"


def test_flow_combination_takes_the_objective_and_the_architecture_of_its_parts(tmp_path):
    recipe = convergence.flow_combination_recipe("dit_flow_gvp", "dit_rmsnorm")
    config = convergence.build_config(recipe, convergence.Setting(), 0, tmp_path)
    assert (config.objective.schedule.kind, config.objective.schedule.path) == ("flow", "gvp")
    assert config.objective.sampler == {"kind": "uniform"}  # GVP's, not the rung's logit-normal
    assert (config.model.params["mlp_type"], config.model.params["norm_type"]) == ("swiglu", "rmsnorm")
    assert "use_rope" not in config.model.params and "SwiGLU + RMSNorm" in recipe.label
    plain = convergence.flow_combination_recipe("dit_flow", "dit_flow_lognorm")
    assert plain.model_params == () and convergence.build_config(plain, convergence.Setting(), 0, tmp_path)
    assert plain.repa is None and not convergence.build_config(plain, convergence.Setting(), 0, tmp_path).repa.enabled
    aligned = convergence.flow_combination_recipe("dit_flow_lognorm", "dit_rope", "dit_flow_repa")
    config = convergence.build_config(aligned, convergence.Setting(), 0, tmp_path, encoder_dir=tmp_path)
    assert config.repa.enabled and config.repa.encoder == str(tmp_path / "trained")  # never the random control
    assert config.model.params["use_rope"] and config.objective.sampler["kind"] == "logit_normal"
    assert aligned.label.endswith("SwiGLU + RMSNorm + RoPE + REPA")


def test_heldout_seeds_train_the_combinations_and_repas_part_in_the_second():
    setting = convergence.Setting(heldout_seeds=[3, 4])
    chosen = {"objective": "min_snr_x0", "sampler": "speed", "flow_objective": "dit_flow_lognorm"}
    tasks = convergence.heldout_tasks({**chosen, "architecture": "dit_rope", "alignment": "dit_flow_repa"}, setting)
    names = [name for name, _, _ in tasks]
    assert names == [
        name
        for name in ("baseline", "combination", "combination_flow", "combination_flow_without_repa")
        for _ in (3, 4)
    ]
    recipes = {name: recipe for name, recipe, _ in tasks}
    assert recipes["combination_flow"].repa == "trained" and recipes["combination_flow_without_repa"].repa is None
    assert recipes["combination_flow_without_repa"].label.endswith("RoPE, without REPA")
    for field in ("overrides", "weighting", "sampler", "model", "model_params"):  # REPA is all that differs
        assert getattr(recipes["combination_flow"], field) == getattr(recipes["combination_flow_without_repa"], field)
    # REPA not chosen: no ablation; nothing beat the baseline: no first-generation run; no flow DiT: no second.
    plain = convergence.heldout_tasks({**chosen, "architecture": "dit_rope", "alignment": "dit_flow"}, setting)
    assert "combination_flow_without_repa" not in {name for name, _, _ in plain}
    empty = {"objective": "baseline", "sampler": "baseline", **dict.fromkeys(convergence.FLOW_AXES)}
    assert [name for name, _, _ in convergence.heldout_tasks(empty, setting)] == ["baseline", "baseline"]


def test_heldout_reading_and_table_give_repas_part_in_the_combination():
    falling, fast = [500, 400, 300, 200, 100], [400, 200, 100, 50, 25]
    results = {"baseline": [fake_run("baseline", s, falling) for s in (0, 1)]}
    heldout = {
        "baseline": [fake_run("baseline", s, falling) for s in (3, 4)],
        "combination_flow": [fake_run("combination_flow", s, fast) for s in (3, 4)],
        "combination_flow_without_repa": [fake_run("combination_flow_without_repa", s, falling) for s in (3, 4)],
    }
    summary = convergence.summarize(results, SETTING, heldout)
    pairs = {(row["recipe"], row["reference"]) for row in summary["comparisons"] if row["seed_set"] == "held-out"}
    assert pairs == {
        ("combination_flow", "baseline"),
        ("combination_flow", "combination_flow_without_repa"),
        ("combination_flow_without_repa", "baseline"),
    }
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in convergence.glance_table(summary, SETTING)}
    assert rows["combination_flow, held-out seeds"][2] == "2.00× [2.00, 2.00] over `combination_flow_without_repa`"
    assert rows["combination_flow_without_repa, held-out seeds"][2] == "—"  # a held-out run changes no recipe
    selection = {
        "objective": "baseline",
        "sampler": "baseline",
        "flow_objective": "dit_flow_lognorm",
        "architecture": "dit_rope",
        "alignment": "dit_flow_repa",
    }
    (line,) = [line for line in convergence.reading(summary, SETTING, selection) if "Best combinations" in line]
    assert "2.00× [2.00, 2.00] against the same combination without REPA" in line


# --- the second generation's evaluation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "snr", "t"),
    [
        ("linear", 1.0, 0.5),  # α = σ at t = 1/2
        ("linear", 4.0, 1 / 3),  # (1 − t)/t = 2
        ("linear", 1 / 9, 0.75),  # (1 − t)/t = 1/3
        ("gvp", 1.0, 0.5),  # cos = sin at π/4
        ("gvp", 3.0, 1 / 3),  # cot(π/6) = √3
        ("gvp", 1 / 3, 2 / 3),  # cot(π/3) = 1/√3
    ],
)
def test_flow_time_of_snr_against_closed_forms(path, snr, t):
    from diffusers_speedup.objectives.flow import FlowPath

    found = convergence.flow_time_of_snr(torch.tensor([snr], dtype=torch.float64), path)
    assert found.item() == pytest.approx(t, abs=1e-12)
    assert FlowPath(path).snr(found).item() == pytest.approx(snr, rel=1e-5)


def test_flow_time_of_snr_rejects_unknown_paths():
    with pytest.raises(ValueError, match="cosine"):
        convergence.flow_time_of_snr(torch.ones(1), "cosine")


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_flow_x0_from_velocity_against_closed_forms(path):
    generator = torch.Generator().manual_seed(0)
    x0, noise, velocity = (torch.randn(4, 1, 8, 8, generator=generator) for _ in range(3))
    t = torch.tensor(0.3, dtype=torch.float64)
    half_pi = math.pi / 2
    if path == "linear":  # α = 1 − t, σ = t, α̇ = −1, σ̇ = 1
        alpha, sigma, d_alpha, d_sigma = 1 - t, t, -1.0, 1.0
    else:  # α = cos(πt/2), σ = sin(πt/2)
        alpha, sigma = torch.cos(half_pi * t), torch.sin(half_pi * t)
        d_alpha, d_sigma = -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t)
    noisy = alpha * x0 + sigma * noise
    x0_hat = convergence.flow_x0_from_velocity(velocity, noisy, alpha, sigma, d_alpha, d_sigma)
    closed = (
        noisy - t * velocity
        if path == "linear"
        else torch.cos(half_pi * t) * noisy - torch.sin(half_pi * t) * velocity / half_pi
    )
    torch.testing.assert_close(x0_hat, closed.to(x0_hat.dtype), rtol=1e-6, atol=1e-6)
    # The true velocity α̇·x0 + σ̇·ε gives back x0.
    true_velocity = d_alpha * x0 + d_sigma * noise
    recovered = convergence.flow_x0_from_velocity(true_velocity, noisy, alpha, sigma, d_alpha, d_sigma)
    torch.testing.assert_close(recovered, x0.to(recovered.dtype), rtol=1e-6, atol=1e-6)


class FakeFlowPipeline:
    """What heldout_x0_mse reads from a pipeline: ``transformer`` (a velocity model) and a FlowScheduler."""

    def __init__(self, path, velocity):
        from diffusers_speedup.schedulers.scheduling_flow import FlowScheduler

        self.scheduler = FlowScheduler(path=path)
        self.transformer = lambda x, t, class_labels, return_dict: (velocity(x, t),)


def small_evaluator(images=6):
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(0)
    alphas_cumprod = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    timesteps = torch.tensor([100, 500, 900])
    return convergence.Evaluator(
        classifier=None,
        classifier_accuracy=1.0,
        reference=None,
        test_pixels=torch.rand(images, 1, 8, 8, generator=generator) * 2 - 1,
        test_labels=torch.arange(images) % 10,
        sample_labels=[],
        sample_noise=torch.zeros(0),
        grid_timesteps=timesteps,
        grid_alphas_cumprod=alphas_cumprod[timesteps].float(),
        grid_noise=torch.randn(len(timesteps), images, 1, 8, 8, generator=generator),
        inference_steps=1,
        guidance_scale=1.0,
        device="cpu",
    )


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_heldout_x0_mse_of_a_flow_model_at_the_grids_snr(path):
    evaluator = small_evaluator()
    x0 = evaluator.test_pixels
    snr = evaluator.grid_alphas_cumprod.double() / (1 - evaluator.grid_alphas_cumprod.double())

    def coefficients(t):  # written out: SiT's paths, t = 1 noise
        t = t.double()
        if path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        h = math.pi / 2
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)

    def oracle(x, t):  # the exact velocity of the noised test digits: x̂0 = x0 at every level
        alpha, sigma, d_alpha, d_sigma = coefficients(t[0])
        noise = (x.double() - alpha * x0.double()) / sigma
        return (d_alpha * x0.double() + d_sigma * noise).float()

    result = evaluator.heldout_x0_mse(FakeFlowPipeline(path, oracle))
    assert result["heldout_x0_mse_per_log_snr"] == [pytest.approx(0.0, abs=1e-9)] * 3

    # A model that returns zero velocity: x̂0 = σ̇·x_t/(α·σ̇ − σ·α̇), at the t whose (α/σ)² is the grid's SNR.
    seen = []
    result = evaluator.heldout_x0_mse(FakeFlowPipeline(path, lambda x, t: seen.append(t[0].item()) or 0 * x))
    for level, (value, t) in enumerate(zip(result["heldout_x0_mse_per_log_snr"], seen)):
        alpha, sigma, d_alpha, d_sigma = coefficients(torch.tensor(t))
        assert (alpha / sigma).square().item() == pytest.approx(snr[level].item(), rel=1e-4)
        noisy = alpha * x0.double() + sigma * evaluator.grid_noise[level].double()
        x0_hat = d_sigma * noisy / (alpha * d_sigma - sigma * d_alpha)
        assert value == pytest.approx((x0_hat.clamp(-1, 1) - x0.double()).square().mean().item(), rel=1e-5)


def test_the_velocity_direction_loss_has_no_gradient_on_one_channel():
    # LightningDiT's term, mean_flat(1 − cosine_similarity(v̂, v, dim=1)) (transport/transport.py), written out:
    # over one channel the cosine is sign(v̂)·sign(v), flat in v̂, so the study leaves the arm out.
    from diffusers_speedup.objectives.objective import velocity_direction_loss

    generator = torch.Generator().manual_seed(0)
    for channels, zero in ((1, True), (2, False)):
        prediction = torch.randn(4, channels, 8, 8, generator=generator, requires_grad=True)
        target = torch.randn(4, channels, 8, 8, generator=generator)
        official = (1 - torch.nn.functional.cosine_similarity(prediction, target, dim=1)).flatten(1).mean(1)
        (gradient,) = torch.autograd.grad(official.sum(), prediction)
        (ours,) = torch.autograd.grad(velocity_direction_loss(prediction, target).sum(), prediction)
        assert (gradient.abs().max().item() < 1e-6) == zero and (ours.abs().max().item() < 1e-6) == zero


def test_the_first_studys_samples_and_grid_stay_when_the_larger_evaluation_is_added(tmp_path):
    setting = convergence.Setting(classifier_epochs=1, samples_per_class=2, large_samples_per_class=5)
    evaluator = convergence.Evaluator.build(setting, tmp_path)
    generator = torch.Generator().manual_seed(1234)  # the first study's draws, in its order
    torch.testing.assert_close(evaluator.sample_noise, torch.randn(20, 1, 8, 8, generator=generator))
    torch.testing.assert_close(evaluator.grid_noise, torch.randn(13, 180, 1, 8, 8, generator=generator))
    assert evaluator.extra_labels == [c for c in range(10) for _ in range(3)] and len(evaluator.extra_noise) == 30


def test_evaluation_steps_and_the_settings_checks():
    steps = convergence.evaluation_steps(convergence.Setting())
    assert [s for s, _ in steps] == list(range(320, 3201, 320))
    assert [s for s, large in steps if large] == [640, 1280, 1920, 2560, 3200]
    odd = convergence.evaluation_steps(convergence.Setting(steps=1000, eval_every=300, large_eval_every=600))
    assert odd == [(300, False), (600, True), (900, False), (1000, True)]  # the end always gets both
    for change, option in (
        ({"large_eval_every": 500}, "large_eval_every"),
        ({"large_samples_per_class": 10}, "large_samples_per_class"),
        ({"hard_fraction": 0.1}, "hard_fraction"),
        ({"target_fraction": 1.5}, "target_fraction"),
    ):
        with pytest.raises(ValueError, match=option):
            convergence.check_setting(convergence.Setting(**change))


def test_glance_table_has_each_recipes_gain_over_what_it_changes_and_over_the_baseline():
    falling = [500, 400, 300, 200, 100]  # the target (80 % of 500 steps) is 180, at step 400
    results = {
        "baseline": [fake_run("baseline", s, falling) for s in (0, 1)],
        "min_snr": [fake_run("min_snr", s, [400, 200, 100, 50, 25]) for s in (0, 1)],  # 180 at step 200: 2×
        "dit_baseline": [fake_run("dit_baseline", s, falling) for s in (0, 1)],
        "dit_repa": [fake_run("dit_repa", s, [400, 200, 100, 50, 25]) for s in (0, 1)],
        "dit_repa_random": [fake_run("dit_repa_random", s, falling) for s in (0, 1)],
    }
    rows = {
        line.split(" | ")[0][2:]: line
        for line in convergence.glance_table(convergence.summarize(results, SETTING), SETTING)
    }
    assert rows["ε, Min-SNR-5"].split(" | ")[2:4] == ["(it changes the baseline)", "2.00× [2.00, 2.00]"]
    repa = rows[convergence.RECIPES["dit_repa"].label].split(" | ")
    assert repa[2] == "2.00× [2.00, 2.00] over `dit_baseline`" and repa[3] == "2.00× [2.00, 2.00]"
    control = rows[convergence.RECIPES["dit_repa_random"].label].split(" | ")
    # The control never reaches dit_repa's FD at step 400 (50): counted as the budget, 400/500, an upper bound.
    assert control[2] == "1.00× [1.00, 1.00] over `dit_baseline`; ≤ 0.80× [0.80, 0.80] over `dit_repa`"
    assert control[3] == "1.00× [1.00, 1.00]"  # every recipe against the ε baseline, though not in its compare_to
    assert rows["ε, constant weight (baseline)"].split(" | ")[2:4] == ["—", "—"]


def test_reading_says_whether_repas_gain_comes_from_the_features():
    falling, fast = [500, 400, 300, 200, 100], [400, 200, 100, 50, 25]
    results = {
        "baseline": [fake_run("baseline", s, falling) for s in (0, 1)],
        "dit_baseline": [fake_run("dit_baseline", s, falling) for s in (0, 1)],
        "dit_repa": [fake_run("dit_repa", s, fast) for s in (0, 1)],
        "dit_repa_random": [fake_run("dit_repa_random", s, falling) for s in (0, 1)],  # slower than the trained arm
        "uvit_repa": [fake_run("uvit_repa", s, fast) for s in (0, 1)],
        "uvit_repa_random": [fake_run("uvit_repa_random", s, fast) for s in (0, 1)],  # as fast: the loss term
    }
    lines = convergence.reading(convergence.summarize(results, SETTING), SETTING, None)
    (controls,) = [line for line in lines if line.startswith("- **REPA's controls**")]
    trained, random = controls.split("; ")
    assert "DiT (linear β, learned σ), + REPA (random encoder" in trained and "its features count" in trained
    assert "ε U-ViT, + REPA (random encoder" in random and "no gain is shown to come from the features" in random


# --- the hard target and the second generation's selection -------------------------------------------------------


def test_hard_target_is_the_best_recipes_quality_at_half_the_budget():
    results = {
        "baseline": [fake_run("baseline", s, [500, 400, 300, 200, 100], [0.1, 0.2, 0.3, 0.4, 0.5]) for s in (0, 1)],
        # The best final FD (20): at step 250 (half of 500) its mean curve is 45, between 60 and 30.
        "min_snr": [fake_run("min_snr", s, [100, 60, 30, 25, 20], [0.2, 0.4, 0.6, 0.8, 0.9]) for s in (0, 1)],
    }
    targets = convergence.hard_targets(results, SETTING)
    assert targets["fd_large"]["recipe"] == "min_snr" and targets["fd_large"]["step"] == 250
    assert targets["fd_large"]["value"] == pytest.approx(45.0)
    assert targets["class_accuracy"]["recipe"] == "min_snr"  # higher is better
    assert targets["class_accuracy"]["value"] == pytest.approx(0.5)
    # The best recipe reaches its own target at half the budget; the baseline never does: counted as the budget.
    best = convergence.steps_to_target(results["min_snr"], "fd_large", 45.0, SETTING)
    assert best["steps"] == [pytest.approx(250.0)] * 2 and best["reached"] == 2
    never = convergence.steps_to_target(results["baseline"], "fd_large", 45.0, SETTING)
    assert never["steps"] == [500.0, 500.0] and never["reached"] == 0
    summary = convergence.summarize(results, SETTING)
    assert summary["steps_to_hard_target"]["baseline"]["class_accuracy"]["steps"] == [500.0, 500.0]


def test_selection_of_the_second_generation():
    falling = [500, 400, 300, 200, 100]
    twice = [400, 200, 100, 50, 25]  # reaches the reference's FD at step 400 (200) at step 200: 2×
    slow = [900, 800, 700, 600, 500]
    results = {
        "baseline": [fake_run("baseline", s, falling) for s in (0, 1)],
        "min_snr": [fake_run("min_snr", s, slow) for s in (0, 1)],
        "dit_flow": [fake_run("dit_flow", s, falling) for s in (0, 1)],
        "dit_flow_gvp": [fake_run("dit_flow_gvp", s, slow) for s in (0, 1)],
        "dit_flow_lognorm": [fake_run("dit_flow_lognorm", s, twice) for s in (0, 1)],
        "dit_swiglu": [fake_run("dit_swiglu", s, slow) for s in (0, 1)],
        "dit_flow_repa": [fake_run("dit_flow_repa", s, twice) for s in (0, 1)],
        "dit_flow_repa_random": [fake_run("dit_flow_repa_random", s, [300, 150, 75, 40, 20]) for s in (0, 1)],
    }
    chosen = convergence.select_axes(results, [0, 1], SETTING)
    assert (chosen["objective"], chosen["sampler"]) == ("baseline", "baseline")
    assert (chosen["flow_objective"], chosen["architecture"]) == ("dit_flow_lognorm", "dit_flow_lognorm")
    # REPA is an axis of its own; its faster random-encoder control is not an option.
    assert chosen["alignment"] == "dit_flow_repa" and "dit_flow_repa_random" not in chosen["scores"]
    assert chosen["scores"]["dit_flow_lognorm"] == pytest.approx(2.0) and chosen["scores"]["dit_swiglu"] < 1
    assert chosen["generations"]["first"] == ("baseline", 1.0)
    assert chosen["generations"]["second"][0] == "dit_flow_lognorm" and chosen["best"] == "second"
    # Without the flow DiT, its axes stay empty and the first generation is the headline.
    del results["dit_flow"], results["dit_flow_lognorm"]
    chosen = convergence.select_axes(results, [0, 1], SETTING)
    assert all(chosen[axis] is None for axis in convergence.FLOW_AXES) and chosen["best"] == "first"


# --- the REPA encoder --------------------------------------------------------------------------------------------


def test_encoder_pixels_are_repas_preprocessing_of_dinov2s():
    encoder = digits_encoder
    gray = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    pixels = encoder.encoder_pixels(gray)
    assert pixels.shape == (2, 3, 1, 1)
    for channel, (mean, std) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        assert pixels[0, channel].item() == pytest.approx(-mean / std)
        assert pixels[1, channel].item() == pytest.approx((1 - mean) / std)


def test_the_repa_encoder_trains_in_tiny_mode_and_is_cached(tmp_path):
    from transformers import Dinov2Model

    encoder = digits_encoder
    logged = []
    folder, report = encoder.load_or_train_encoders(encoder.TINY, tmp_path, log=logged.append)
    assert logged and report["training"]["seconds"] > 0 and report["training"]["machine"]
    trained = Dinov2Model.from_pretrained(folder / "trained")
    control = Dinov2Model.from_pretrained(folder / "random")
    assert (folder / "trained" / "preprocessor_config.json").is_file()
    # REPA resizes the clean image to token grid × encoder patch: 8×8 here, and the grid is the study DiT's 4×4.
    setting = convergence.Setting()
    tokens = encoder.patch_tokens(trained.eval(), torch.rand(3, 1, 8, 8))
    assert tokens.shape == (3, (setting.resolution // setting.patch_size) ** 2, encoder.TINY.hidden_size)
    assert trained.config.patch_size * 4 == setting.resolution
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, control.state_dict()[k])]
    assert changed  # the control is the initialisation, the trained encoder moved away from it
    for name in ("trained", "random"):
        assert 0 <= report["features"][name]["linear_probe_accuracy"] <= 1
        assert report["features"][name]["own_patch_r2"] <= 1
    assert report["features"]["pixels"]["knn5_accuracy"] > 0.9  # raw digits are easy: the reference line
    # A second call reuses the cached encoders.
    logged.clear()
    assert encoder.load_or_train_encoders(encoder.TINY, tmp_path, log=logged.append) == (folder, report)
    assert not logged


def test_heldout_seeds_must_differ_from_the_selection_seeds(tmp_path):
    setting = convergence.Setting(**{**convergence.TINY, "heldout_seeds": [1]})
    with pytest.raises(ValueError, match="heldout_seeds"):
        convergence.run_benchmark(setting, tmp_path)


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_study_runs_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    output = tmp_path / "out"
    logged = []
    setting = convergence.Setting(**convergence.TINY)
    assert len(setting.seeds) >= 2 and not set(setting.seeds) & set(setting.heldout_seeds)
    convergence.run_benchmark(setting, output, classifier_cache=tmp_path / "classifier", log=logged.append)

    results = json.loads((output / "results.json").read_text())
    for name, runs in results["runs"].items():
        assert [run["seed"] for run in runs] == setting.seeds
        for run in runs:
            assert [point["step"] for point in run["curve"]] == [2, 4]
            for point in run["curve"]:
                assert point["fd"] >= -1e-9 and 0.0 <= point["class_accuracy"] <= 1.0
                assert point["fd_large"] >= -1e-9 and 0.0 <= point["class_accuracy_large"] <= 1.0
                # Clipped x̂0 and data in [-1, 1]: the x0-MSE of each noise level lies in [0, 4].
                assert len(point["heldout_x0_mse_per_log_snr"]) == 13
                assert all(0.0 <= value <= 4.0 for value in point["heldout_x0_mse_per_log_snr"])
        final = results["summary"]["finals"][name]["fd"]
        assert final["mean"] == pytest.approx(np.mean([run["curve"][-1]["fd"] for run in runs]))
        assert final["min"] <= final["ci"][0] <= final["mean"] <= final["ci"][1] <= final["max"]
        run_dir = output / "runs" / f"{name}_seed0"
        assert (run_dir / "checkpoint-2" / "pipeline" / "model_index.json").is_file()
        assert not (run_dir / "checkpoint-2" / "optimizer.bin").exists()  # the bulky training state is gone

    # The combination was chosen on the selection seeds and trained, with the baseline, on the held-out ones only.
    assert results["selection"]["objective"] in ("baseline", "min_snr")
    assert {name: [run["seed"] for run in runs] for name, runs in results["heldout_runs"].items()} == {
        "combination": [2],
        "baseline": [2],
    }
    trained_heldout = sorted(path.name for path in (output / "runs").iterdir() if path.name.endswith("seed2"))
    is_baseline = (results["selection"]["objective"], results["selection"]["sampler"]) == ("baseline", "baseline")
    assert trained_heldout == (["baseline_seed2"] if is_baseline else ["baseline_seed2", "combination_seed2"])
    comparisons = {(row["recipe"], row["reference"], row["seed_set"]) for row in results["summary"]["comparisons"]}
    assert comparisons == {
        ("min_snr", "baseline", "selection"),
        ("dit_flow", "baseline", "selection"),  # its DiT reference is not in the tiny study
        ("dit_flow_repa", "dit_flow", "selection"),  # REPA, with the encoder trained on the digits first
        ("dit_flow_repa", "baseline", "selection"),
        ("combination", "baseline", "held-out"),
    }
    # The flow DiT is the second generation's only option: no architecture axis, so no second combination.
    assert results["selection"]["flow_objective"] == "dit_flow" and results["selection"]["architecture"] is None
    assert set(results["summary"]["hard_targets"]) == {"fd_large", "class_accuracy"}
    assert results["real_data_reference"]["num_large"] == 40
    report = (output / "results.md").read_text()
    assert "### Reading" in report and "Min-SNR-γ, published 3.4×" in report and "held-out seeds" in report
    assert "Steps to the hard targets" in report
    assert "REPA, published 17.5×**: DiT flow, + REPA (trained encoder) vs DiT, rectified flow" in report
    assert (output / "encoder").is_dir()  # REPA's encoder, trained once and cached
    with Image.open(output / "convergence.png") as plot:
        assert plot.width > 500 and plot.height > 300

    # A second call reuses every finished run instead of training again.
    logged.clear()
    convergence.run_benchmark(setting, output, classifier_cache=tmp_path / "classifier", log=logged.append)
    assert sum("reusing" in line for line in logged) == 4 * 2 + len(trained_heldout)
    # A changed evaluation re-evaluates the kept exports; nothing is trained again.
    logged.clear()
    larger = convergence.Setting(**{**convergence.TINY, "large_samples_per_class": 3})
    evaluator = convergence.Evaluator.build(larger, tmp_path / "classifier")
    run = convergence.run_recipe(
        "baseline", convergence.RECIPES["baseline"], 0, larger, evaluator, output, log=logged.append
    )
    assert "re-evaluating" in logged[0] and run["setting"]["large_samples_per_class"] == 3
    assert run["train_seconds"] == results["runs"]["baseline"][0]["train_seconds"]
    # The first study's samples are kept, so its numbers are unchanged.
    assert run["curve"][-1]["fd"] == pytest.approx(results["runs"]["baseline"][0]["curve"][-1]["fd"])
