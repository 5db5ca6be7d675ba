"""The distribution: public names, the command line, and a built wheel that works without the checkout."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import diffusers
import pytest

import diffusers_speedup as ds
from diffusers_speedup.commands import COMMANDS, main, run

REPO = Path(__file__).resolve().parents[1]


def test_reexports_diffusers_base_classes():
    assert ds.ModelMixin is diffusers.ModelMixin
    assert ds.SchedulerMixin is diffusers.SchedulerMixin


def test_pipelines_package_is_installed_under_the_library():
    import diffusers_speedup.pipelines  # noqa: F401


def test_every_command_module_has_a_main():
    import importlib

    for name, (module_name, _) in COMMANDS.items():
        assert callable(importlib.import_module(module_name).main), name
    assert set(COMMANDS) >= {"train", "cache-latents", "sample", "evaluate", "export", "posthoc-ema", "convert"}


def test_dispatcher_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    for name in COMMANDS:
        assert name in usage
    assert main([]) == 2
    with pytest.raises(SystemExit, match="unknown command 'trian'"):
        main(["trian"])
    with pytest.raises(SystemExit) as exit_info:  # a command's own --help exits through argparse
        run("cache_latents", ["--help"])
    assert exit_info.value.code == 0
    assert "--image_folder" in capsys.readouterr().out


def test_checkout_scripts_are_thin_entry_points():
    """train/*.py hold no logic: each calls the package's command of the same name."""
    for script in sorted((REPO / "train").glob("*.py")):
        text = script.read_text()
        command = script.stem.replace("_", "-")
        assert command in COMMANDS, script
        assert f'run("{command}")' in text and len(text.splitlines()) < 20, script


def _installed_source_tree(destination: Path) -> Path:
    """The files a source distribution holds, copied out so that building leaves the checkout untouched."""
    source = destination / "src"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "pipelines")  # the package's pipelines/ is a dev link
    for folder in ("diffusers_speedup", "pipelines", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore if folder == "diffusers_speedup" else None)
    return source


@pytest.mark.slow
def test_wheel_installs_and_trains_the_quickstart_outside_the_checkout(tmp_path):
    source = _installed_source_tree(tmp_path)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source], check=True)
    (wheel,) = (tmp_path / "dist").glob("diffusers_speedup-*.whl")

    # The wheel holds every recipe and the pipelines package; the entry point is the dispatcher.
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (REPO / "configs").rglob("*.yaml"):
        assert f"diffusers_speedup/configs/{recipe.relative_to(REPO / 'configs').as_posix()}" in names
    assert {"diffusers_speedup/pipelines/pipeline_class_conditional.py", "diffusers_speedup/__main__.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "diffusers-speedup = diffusers_speedup.commands:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # Installed next to this environment's dependencies; run from a folder that cannot see the checkout.
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    # The installed copy is the one imported, and a recipe of one's own can start from a shipped one by name.
    (work / "mine.yaml").write_text("base: imagenet256/dit_xl2_speed\ntrain:\n  max_steps: 5\n")
    check = (
        "import diffusers_speedup; from diffusers_speedup.training import load_config; c = load_config('mine.yaml'); "
        "print(diffusers_speedup.__file__, c.objective.sampler['kind'], c.model.preset, c.train.max_steps)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", check], cwd=work, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert Path(loaded[0]).is_relative_to(site), loaded
    assert loaded[1:] == ["speed", "dit-xl-2", "5"]

    overrides = [
        "train.output_dir=run",
        "data.resolution=8",
        "model.params.hidden_size=32",
        "model.params.num_layers=3",
        "model.params.num_attention_heads=2",
        "train.batch_size=16",
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "train.report_to=none",
        "sampling.num_inference_steps=2",
        "sampling.images_per_class=1",
        "sampling.max_classes=2",
    ]
    command = [site / "bin" / "diffusers-speedup", "train", "--config", "quickstart", *overrides]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Exported pipeline" in result.stdout
    assert "skip_scaling: inv_sqrt2" in (work / "run" / "checkpoint-2" / "config.yaml").read_text()  # the recipe
    index = json.loads(next((work / "run").rglob("model_index.json")).read_text())
    assert index["_class_name"][1] == "ClassConditionalPipeline"
