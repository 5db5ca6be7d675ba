"""The trainer as `accelerate launch` users expect it: the launcher's precision and device unless the recipe says
otherwise, one progress bar, and sample grids in every tracker that takes images."""

import logging
import re
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker

from diffusers_speedup.training import ConfigError, Trainer, load_config
from diffusers_speedup.training.launch import apply_launcher_settings

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def tiny(output_dir, *extra):
    return [
        f"train.output_dir={output_dir}",
        "data.resolution=8",
        "model.params.hidden_size=32",
        "model.params.num_layers=3",
        "model.params.num_attention_heads=2",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.log_every=2",
        "train.report_to=none",
        "sampling.num_inference_steps=2",
        "sampling.images_per_class=1",
        "sampling.max_classes=2",
        "optim.lr_schedule=constant",
        "optim.warmup_steps=0",
        *extra,
    ]


@pytest.fixture
def fresh_accelerate_state():
    """Each Trainer here starts accelerate with other settings; its state is a process-wide singleton."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_launcher_or_recipe_value_training_is_fp32(no_launcher, caplog):
    config = apply_launcher_settings(load_config(QUICKSTART))
    assert (config.train.mixed_precision, config.train.cpu) == ("fp32", False)
    assert not caplog.records


def test_a_recipe_without_mixed_precision_takes_the_launchers(no_launcher, tmp_path, fresh_accelerate_state):
    no_launcher.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    trainer = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run")))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.config.train.mixed_precision == "bf16"  # and so in the saved config


def test_a_recipe_that_contradicts_the_launcher_wins_with_a_warning(
    no_launcher, tmp_path, fresh_accelerate_state, caplog
):
    no_launcher.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.mixed_precision=fp32")))
    assert trainer.accelerator.mixed_precision == "no"
    (warning,) = [r.getMessage() for r in caplog.records if "mixed_precision" in r.getMessage()]
    assert "'fp32' in the recipe" in warning and "asks for 'bf16'" in warning

    caplog.clear()
    no_launcher.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the same value, spelled as accelerate spells it
    apply_launcher_settings(load_config(QUICKSTART, ["train.mixed_precision=fp32"]))
    assert not caplog.records


def test_the_launchers_cpu_flag_is_followed_or_overridden_with_a_warning(no_launcher, caplog):
    no_launcher.setenv("ACCELERATE_USE_CPU", "True")  # `accelerate launch --cpu`
    assert apply_launcher_settings(load_config(QUICKSTART)).train.cpu is True
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        assert apply_launcher_settings(load_config(QUICKSTART, ["train.cpu=false"])).train.cpu is False
    assert "train.cpu is false in the recipe but the launcher" in caplog.text
    no_launcher.setenv("ACCELERATE_USE_CPU", "False")  # what accelerate sets without --cpu: no contradiction
    caplog.clear()
    assert apply_launcher_settings(load_config(QUICKSTART, ["train.cpu=true"])).train.cpu is True
    assert not caplog.records


def test_a_launcher_precision_the_trainer_lacks_is_refused(no_launcher):
    no_launcher.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="train.mixed_precision: the launcher asks for 'fp8'"):
        apply_launcher_settings(load_config(QUICKSTART))


def test_report_to_is_checked():
    with pytest.raises(ConfigError, match="train.report_to: 'tensorbord' is not one of"):
        load_config(QUICKSTART, ["train.report_to=tensorboard,tensorbord"])
    assert load_config(QUICKSTART, ["train.report_to=tensorboard,wandb"]).train.report_to == "tensorboard,wandb"


class RecordingTracker(GeneralTracker):
    """An in-process tracker: what accelerate hands a tracker, kept in lists."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.scalars, self.images = None, [], []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.scalars.append((step, values))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, values))


def test_progress_bar_trackers_and_sample_grids(no_launcher, tmp_path, fresh_accelerate_state, capsys, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    recording = RecordingTracker()
    overrides = tiny(run, "train.report_to=tensorboard", "train.tracker_project_name=digits-uvit")
    trainer = Trainer(load_config(QUICKSTART, overrides), trackers=[recording])
    pipelines = []
    make_pipeline = trainer.pipeline
    trainer.pipeline = lambda: pipelines.append(make_pipeline()) or pipelines[-1]
    with caplog.at_level(logging.INFO):
        trainer.train()
    bar = capsys.readouterr().err
    assert "Training" in bar and "4/4" in bar and "loss=" in bar and "img_per_s=" in bar
    assert "step 4/4  loss" in caplog.text  # log lines still go to the log
    assert trainer.progress.n == 4
    # Only the training bar: the pipeline's own one is off inside the trainer's sample grids.
    assert pipelines[0]._progress_bar_config == {"disable": True}  # the final grid's pipeline (export comes next)
    assert not re.search(r"\| 2/2 \[", bar)  # the 2 sampling steps showed no bar

    # Scalars and the final grid reached both trackers; the project name is the recipe's.
    assert [step for step, _ in recording.scalars] == [2, 4] and "train/loss" in recording.scalars[0][1]
    assert recording.config["train.tracker_project_name"] == "digits-uvit"
    ((step, images),) = recording.images
    grid = images["samples"][0]
    assert step == 4 and grid.ndim == 3 and grid.shape[2] == 3
    events = EventAccumulator(str(run / "logs" / "digits-uvit"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"] and "train/loss" in events.Tags()["scalars"]
    (logged,) = events.Images("samples")
    assert (logged.step, logged.height, logged.width) == (4, grid.shape[0], grid.shape[1])

    # A resumed run's bar starts at the step it resumes from.
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(load_config(QUICKSTART, tiny(run, "train.max_steps=6", "train.resume=latest")))
    resumed.train()
    assert "4/6" in capsys.readouterr().err and resumed.progress.n == 6


def test_weights_and_biases_gets_the_grid_as_an_image(no_launcher, tmp_path, fresh_accelerate_state, monkeypatch):
    """accelerate's own WandBTracker, on a stand-in `wandb` module that records what it is given (no network)."""
    import importlib.machinery
    import sys
    import types

    import accelerate.tracking
    from accelerate.utils import LoggerType

    runs = []

    class Run:
        def __init__(self, project, **kwargs):
            self.project, self.logged = project, []

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    class Image:
        def __init__(self, data):
            assert data.ndim == 3 and data.shape[2] == 3 and data.dtype.name == "uint8"  # what wandb.Image takes
            self.data = data

    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", loader=None)
    wandb.init = lambda project, **kwargs: runs.append(Run(project, **kwargs)) or runs[-1]
    wandb.Image = Image
    wandb.config = types.SimpleNamespace(update=lambda values, allow_val_change=False: None)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [LoggerType.WANDB])

    overrides = tiny(tmp_path / "run", "train.max_steps=2", "train.report_to=wandb", "train.tracker_project_name=p1")
    Trainer(load_config(QUICKSTART, overrides)).train()
    (run,) = runs
    assert run.project == "p1"
    images = [(step, values["samples"]) for step, values in run.logged if "samples" in values]
    ((step, (image,)),) = images
    assert step == 2 and image.data.shape[0] > 0
    assert any("train/loss" in values for _, values in run.logged) and run.finished
