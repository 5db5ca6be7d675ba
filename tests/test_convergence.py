import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("convergence", REPO / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["convergence"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


convergence = load_benchmark()


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
        {"step": s, "fd": f, "class_accuracy": a, "heldout_x0_mse": f / 100} for s, f, a in zip(steps, fd, accuracy)
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
        "prediction": objective.prediction_type,
        "sampler": tuple(sorted(objective.sampler.items())),
        "weighting": tuple(sorted(objective.weighting.items())),
        "uncertainty": (objective.learned_uncertainty, objective.loss_reduction),
    }


@pytest.mark.parametrize(
    ("recipe", "reference", "changed"),
    [
        ("min_snr", "baseline", "weighting"),
        ("v_baseline", "baseline", "prediction"),
        ("x0_baseline", "baseline", "prediction"),
        ("min_snr_v", "v_baseline", "weighting"),
        ("min_snr_x0", "x0_baseline", "weighting"),
        ("speed", "baseline", "sampler"),
        ("linear_baseline", "baseline", "schedule"),
        ("speed_linear", "linear_baseline", "sampler"),
        ("edm_lognormal", "edm_precond", "sampler"),
        ("edm_weighting", "edm_lognormal", "weighting"),
        ("edm2", "edm_weighting", "uncertainty"),
        ("dit_speed", "dit_baseline", "sampler"),
    ],
)
def test_each_comparison_changes_one_thing(recipe, reference, changed, tmp_path):
    setting = convergence.Setting()
    ours, theirs = (aspects(convergence.build_config(n, setting, 0, tmp_path)) for n in (recipe, reference))
    assert [key for key in ours if ours[key] != theirs[key]] == [changed]
    assert reference in convergence.RECIPES[recipe].compare_to or reference == "baseline"


def test_every_recipe_builds_a_valid_config(tmp_path):
    setting = convergence.Setting()
    for name in convergence.RECIPES:
        config = convergence.build_config(name, setting, 3, tmp_path / name)
        assert config.train.max_steps == setting.steps and config.train.export_every_checkpoint
        assert config.train.seed == 3 and config.optim.lr_schedule == "constant_with_warmup"
    edm2 = convergence.build_config("edm2", setting, 0, tmp_path)
    assert edm2.objective.learned_uncertainty and edm2.objective.loss_reduction == "sum"
    assert edm2.sampling.scheduler == "edm_heun"
    speed = convergence.build_config("speed_linear", setting, 0, tmp_path).objective
    assert speed.schedule.beta_schedule == "linear" and speed.sampler["tau"] == 700
    dit = convergence.build_config("dit_baseline", setting, 0, tmp_path)
    assert dit.model.kind == "dit" and dit.objective.learned_variance and dit.objective.label_dropout == 0
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
    assert comparisons == {("min_snr", "baseline", "selection"), ("combination", "baseline", "held-out")}
    report = (output / "results.md").read_text()
    assert "### Reading" in report and "Min-SNR-γ, published 3.4×" in report and "held-out seeds" in report
    with Image.open(output / "convergence.png") as plot:
        assert plot.width > 500 and plot.height > 300

    # A second call reuses every finished run instead of training again.
    logged.clear()
    convergence.run_benchmark(setting, output, classifier_cache=tmp_path / "classifier", log=logged.append)
    assert sum("reusing" in line for line in logged) == 2 * 2 + len(trained_heldout)
