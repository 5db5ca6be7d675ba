import importlib.util
import json
import sys
from pathlib import Path

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


@pytest.mark.parametrize(
    ("steps", "values", "target", "lower_is_better", "expected"),
    [
        # Crosses 2.0 halfway between (200, 3.0) and (300, 1.0).
        ([100, 200, 300], [5.0, 3.0, 1.0], 2.0, True, 250.0),
        # Crosses 4.0 halfway between (100, 5.0) and (200, 3.0).
        ([100, 200, 300], [5.0, 3.0, 1.0], 4.0, True, 150.0),
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


def run(label, fd, mse, steps=(2, 4)):
    curve = [{"step": s, "fd": f, "class_accuracy": 0.5, "heldout_x0_mse": m} for s, f, m in zip(steps, fd, mse)]
    return {"label": label, "seed": 0, "train_seconds": 1.0, "curve": curve}


def test_summary_speedups_are_ratios_of_interpolated_steps():
    results = {
        "baseline": [run("base", [4.0, 2.0], [0.4, 0.2])],
        "fast": [run("fast", [2.0, 1.0], [0.3, 0.1])],  # reaches FD 2.0 at step 2: 2× faster
        "slow": [run("slow", [5.0, 3.0], [0.4, 0.3])],
    }
    summary = convergence.summarize(results)
    assert summary["baseline"]["steps_to_baseline_fd"] == 4.0 and summary["baseline"]["speedup_fd"] == 1.0
    assert summary["fast"]["steps_to_baseline_fd"] == 2.0 and summary["fast"]["speedup_fd"] == pytest.approx(2.0)
    # x0-MSE 0.2 is reached halfway from 0.3 (step 2) to 0.1 (step 4): step 3, speed-up 4/3.
    assert summary["fast"]["speedup_heldout_x0_mse"] == pytest.approx(4 / 3)
    assert summary["slow"]["steps_to_baseline_fd"] is None and summary["slow"]["speedup_fd"] is None
    table = convergence.markdown_tables(summary, {"fd": 0.1, "class_accuracy": 0.99})
    assert summary["fast"]["bound_fd"] and not summary["baseline"]["bound_fd"]  # reached at the first evaluation
    assert "not reached" in table and "≥ 2.00×" in table and "| ≤ 2 |" in table


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match="no_such_recipe"):
        convergence.build_config("no_such_recipe", convergence.Setting(), 0, Path("unused"))


def test_every_recipe_builds_a_valid_config(tmp_path):
    setting = convergence.Setting()
    for name in convergence.RECIPES:
        config = convergence.build_config(name, setting, 0, tmp_path / name)
        assert config.train.max_steps == setting.steps and config.train.export_every_checkpoint
        assert config.optim.lr_schedule == "constant_with_warmup"
        assert config.model.params["patch_size"] == 4 and config.model.params["hidden_size"] == 128
    assert convergence.build_config("baseline", setting, 0, tmp_path).objective.weighting == {"kind": "constant"}
    edm = convergence.build_config("edm2", setting, 0, tmp_path)
    assert edm.objective.schedule.kind == "edm" and edm.objective.learned_uncertainty
    assert edm.sampling.scheduler == "edm_heun"


def test_tiny_benchmark_writes_consistent_results(tmp_path):
    output = tmp_path / "out"
    logged = []
    setting = convergence.Setting(**convergence.TINY)
    convergence.run_benchmark(setting, output, classifier_cache=tmp_path / "classifier", log=logged.append)

    results = json.loads((output / "results.json").read_text())
    assert set(results["summary"]) == {"baseline", "min_snr"}
    assert 0.0 <= results["classifier_test_accuracy"] <= 1.0
    assert len(results["grid_timesteps"]) == len(results["log_snr_grid"]) == 13
    for name, runs in results["runs"].items():
        (only_run,) = runs
        assert [point["step"] for point in only_run["curve"]] == [2, 4]
        for point in only_run["curve"]:
            assert point["fd"] >= -1e-9 and 0.0 <= point["class_accuracy"] <= 1.0
            # Clipped x̂0 and data in [-1, 1]: the x0-MSE of each noise level lies in [0, 4].
            assert len(point["heldout_x0_mse_per_log_snr"]) == 13
            assert all(0.0 <= value <= 4.0 for value in point["heldout_x0_mse_per_log_snr"])
            assert point["heldout_x0_mse"] == pytest.approx(sum(point["heldout_x0_mse_per_log_snr"]) / 13)
        # The summary's final numbers are the last evaluation's.
        assert results["summary"][name]["final_fd"] == pytest.approx(only_run["curve"][-1]["fd"])
        # Every evaluated checkpoint kept its exported pipeline; the bulky training state was removed.
        run_dir = output / "runs" / f"{name}_seed0"
        assert (run_dir / "checkpoint-2" / "pipeline" / "model_index.json").is_file()
        assert not (run_dir / "checkpoint-2" / "optimizer.bin").exists()
    assert results["summary"]["baseline"]["speedup_fd"] == 1.0
    table = (output / "results.md").read_text()
    assert table.count("\n") == 2 + 2 + 1  # header, rule, two recipes, the real-data row
    with Image.open(output / "convergence.png") as plot:
        assert plot.width > 500 and plot.height > 300

    # A second call reuses the finished runs instead of training again, also when it compares fewer recipes.
    logged.clear()
    convergence.run_benchmark(setting, output, classifier_cache=tmp_path / "classifier", log=logged.append)
    assert sum("reusing" in line for line in logged) == 2
    logged.clear()
    fewer = convergence.Setting(**{**convergence.TINY, "recipes": ["baseline"]})
    convergence.run_benchmark(fewer, output, classifier_cache=tmp_path / "classifier", log=logged.append)
    assert sum("reusing" in line for line in logged) == 1
