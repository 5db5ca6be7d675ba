import errno
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from diffusers_speedup.data import Batch
from diffusers_speedup.training import ConfigError, Trainer, load_config
from diffusers_speedup.training.checkpoints import find_latest_checkpoint
from diffusers_speedup.training.step import NonFiniteLossError, NonFiniteSteps, optimizer_step
from diffusers_speedup.training.training_data import TrainingData

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
# A checkpoint written before the trainer saved its parts by name, and what that code did with it.
NUMBERED = Path(__file__).resolve().parent / "fixtures" / "numbered_checkpoint"


def tiny(output_dir, *extra):
    """Quickstart shrunk to a few seconds: 8×8 digits, a 3-layer U-ViT, two sampling steps."""
    return [
        f"train.output_dir={output_dir}",
        "data.resolution=8",
        "model.params.hidden_size=32",
        "model.params.num_layers=3",
        "model.params.num_attention_heads=2",
        "train.batch_size=16",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "train.log_every=2",
        "train.report_to=none",
        "sampling.num_inference_steps=2",
        "sampling.images_per_class=1",
        "sampling.max_classes=2",
        "optim.lr_schedule=constant",
        "optim.warmup_steps=0",
        *extra,
    ]


def checkpoint_tensors(folder):
    state = load_file(str(folder / "model.safetensors"))
    optimizer = torch.load(folder / "optimizer.bin", weights_only=False)
    ema = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)["ema"]
    return state, optimizer, ema


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def assert_same_checkpoint(a, b):
    """Model, optimizer and EMA state of two checkpoint folders are bit-identical."""
    for x, y in zip(checkpoint_tensors(a), checkpoint_tensors(b)):
        assert_same(x, y)


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    extra = ("train.gradient_accumulation_steps=2", "objective.sampler.kind=speed")
    straight = Trainer(load_config(QUICKSTART, tiny(tmp_path / "straight", *extra)))
    straight.train()

    # Kill the second run during step 5, after the checkpoint at step 3.
    calls = {"n": 0}
    original = TrainingData.batch

    def dying_batch(self, indices, device):
        calls["n"] += 1
        if calls["n"] == 9:  # micro-batch 9 = first micro-batch of step 5
            raise KeyboardInterrupt("killed")
        return original(self, indices, device)

    monkeypatch.setattr(TrainingData, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(QUICKSTART, tiny(tmp_path / "resumed", *extra))).train()
    monkeypatch.setattr(TrainingData, "batch", original)
    assert find_latest_checkpoint(tmp_path / "resumed").name == "checkpoint-3"

    resumed = Trainer(load_config(QUICKSTART, tiny(tmp_path / "resumed", *extra, "train.resume=latest")))
    resumed.train()
    assert resumed.step == 6
    assert_same_checkpoint(tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")


def digest(state: dict) -> str:
    """One SHA-256 over every tensor of a state dict, by name, as fixtures/numbered_checkpoint/make_fixture.py."""
    lines = ""
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().cpu().contiguous()
        data = f"{tensor.dtype}{tuple(tensor.shape)}".encode() + tensor.view(-1).view(torch.uint8).numpy().tobytes()
        lines += f"{name} {hashlib.sha256(data).hexdigest()}\n"
    return hashlib.sha256(lines.encode()).hexdigest()


def numbered_checkpoint_in(run: Path) -> Path:
    """A copy of the fixture's checkpoint-3 as the newest checkpoint of the run folder `run`."""
    shutil.copytree(NUMBERED / "checkpoint-3", run / "checkpoint-3")
    (run / "latest").write_text("checkpoint-3\n")
    return run / "checkpoint-3"


def test_a_checkpoint_of_numbered_files_resumes_and_continues_as_the_code_that_wrote_it(tmp_path):
    checkpoint = numbered_checkpoint_in(tmp_path / "run")
    overrides = [f"train.output_dir={tmp_path / 'run'}", "train.resume=latest"]
    trainer = Trainer(load_config(checkpoint / "config.yaml", overrides))
    trainer.resume()  # train() resumes again, to the same state
    # custom_checkpoint_0.pkl held the LR schedule and custom_checkpoint_1.pkl the EMA.
    lr_schedule = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    ema = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=False)
    assert trainer.lr_scheduler.state_dict() == lr_schedule and trainer.lr_scheduler.get_last_lr()[0] > 0
    assert trainer.ema.num_updates == ema["num_updates"] == 3
    assert_same(trainer.ema.model.state_dict(), ema["model"])
    trainer.train()

    # Step 6 is bit for bit where the code that wrote the checkpoint took it when resuming it.
    expected = json.loads((NUMBERED / "expected.json").read_text())
    where = f"(recorded with torch {expected['torch']} on a {expected['cpu_capability']} CPU)"
    step_6 = tmp_path / "run" / "checkpoint-6"
    assert sorted(p.name for p in step_6.glob("custom_checkpoint_*")) == ["custom_checkpoint_0.pkl"]
    named = torch.load(step_6 / "custom_checkpoint_0.pkl", weights_only=False)
    optimizer = torch.load(step_6 / "optimizer.bin", weights_only=True)
    moments = {f"{i}.{key}": value for i, state in optimizer["state"].items() for key, value in state.items()}
    continued = {
        "model": digest(load_file(str(step_6 / "model.safetensors"))),
        "optimizer": digest(moments),
        "ema": digest(named["ema"]["model"]),
        "ema_num_updates": named["ema"]["num_updates"],
        "last_lr": named["lr_scheduler"]["_last_lr"],
    }
    assert continued == expected["resumed_to_step_6"], where


def test_a_checkpoint_without_a_pipeline_record_is_refused_with_a_command_that_exports_it(tmp_path):
    from diffusers_speedup.commands import main as command_line
    from diffusers_speedup.hub.pipeline_record import export_checkpoint, resolve_export_input

    checkpoint = numbered_checkpoint_in(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(checkpoint))} has no pipeline_record.json") as no:
        resolve_export_input(checkpoint, tmp_path / "staging")
    assert not (tmp_path / "staging").exists()

    # What the message says to run: resume it for no further steps into a new folder.
    command = re.search(r"`(diffusers-speedup train [^`]+)`", str(no.value)).group(1)
    assert command_line(shlex.split(command.replace("NEW_FOLDER", str(tmp_path / "again")))[1:]) == 0
    for name in os.listdir(NUMBERED / "checkpoint-3"):  # the old checkpoint is as it was
        assert (checkpoint / name).read_bytes() == (NUMBERED / "checkpoint-3" / name).read_bytes()

    # Both exports, the run's and the new checkpoint's, are what the old code exported from the old checkpoint.
    expected = json.loads((NUMBERED / "expected.json").read_text())["export_of_checkpoint_3"]
    for folder in (
        tmp_path / "again" / "pipeline",
        export_checkpoint(tmp_path / "again" / "checkpoint-3", tmp_path / "out"),
    ):
        assert (
            digest(load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors")))
            == expected["weights"]
        )
        for name in ("model_index.json", "transformer/config.json", "scheduler/scheduler_config.json"):
            written = json.loads((folder / name).read_text())
            written.pop("_diffusers_version", None)
            assert written == expected[name], name


def test_a_compiled_run_resumes_uncompiled_and_ends_where_an_uncompiled_run_does(tmp_path, monkeypatch):
    # Dynamo traces as it would for inductor; the eager backend keeps the test fast and the arithmetic unchanged.
    compile_in_place = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_in_place(self, backend="eager"))
    straight = Trainer(load_config(QUICKSTART, tiny(tmp_path / "straight")))
    straight.train()
    compiled = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.compile=true", "train.max_steps=3")))
    compiled.train()
    assert compiled.model._compiled_call_impl is not None
    resumed = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.resume=latest")))
    resumed.train()
    assert resumed.step == 6
    assert_same_checkpoint(tmp_path / "straight" / "checkpoint-6", tmp_path / "run" / "checkpoint-6")


def test_a_fresh_run_refuses_an_output_dir_that_holds_checkpoints(tmp_path):
    Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.max_steps=3"))).train()
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "run").rglob("*")}
    with pytest.raises(ConfigError, match=r"train.output_dir: .*run already holds .*checkpoint-3.*train.resume=latest"):
        Trainer(load_config(QUICKSTART, tiny(tmp_path / "run")))
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "run").rglob("*")} == before


def test_training_writes_checkpoints_samples_and_a_loadable_pipeline(tmp_path):
    trainer = Trainer(
        load_config(
            QUICKSTART, tiny(tmp_path / "run", "train.report_to=tensorboard", "train.checkpoints_total_limit=1")
        )
    )
    export_dir = trainer.train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (run / "checkpoint-6" / "config.yaml").is_file()
    assert list((run / "samples").glob("step_*.png"))
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline

    pipeline = ClassConditionalPipeline.from_pretrained(export_dir)
    images = pipeline([0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    # The exported model carries the EMA weights.
    ema_weights = trainer.ema.model.state_dict()
    for name, value in pipeline.transformer.state_dict().items():
        assert torch.equal(value, ema_weights[name])


def test_non_finite_losses_skip_steps_then_stop_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = TrainingData.batch
    calls = {"n": 0}

    def poisoned(self, indices, device):
        calls["n"] += 1
        x0, labels, extras = original(self, indices, device)
        return Batch(x0 * float("nan") if calls["n"] > 3 else x0, labels, extras)

    monkeypatch.setattr(TrainingData, "batch", poisoned)
    trainer = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.max_consecutive_nonfinite=2")))
    weights_before = None
    # Steps 4, 5 and 6 are skipped; the run is checked at the log of step 6 (log_every 2, max_consecutive 2).
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row.*step 6.*checkpoint-3"):
        trainer.train()
    weights_before = load_checkpoint_weights(tmp_path / "run" / "checkpoint-3")
    # The skipped steps left the weights finite and equal to the step-3 ones.
    for name, value in trainer.model.state_dict().items():
        assert torch.isfinite(value).all()
        assert torch.equal(value, weights_before[f"model.{name}"])


def test_non_finite_steps_count_runs_and_stop_at_the_limit(tmp_path, caplog):
    counts = NonFiniteSteps(max_in_a_row=3, device="cpu")
    for skipped in (True, False, True, True):
        counts.record(torch.tensor(skipped))
    assert counts.current_run() == 2 and not counts.allow_checkpoint(step=4)
    counts.check(steps=4, step=4, output_dir=tmp_path)  # 3 skipped, at most 2 in a row: a warning only
    assert "3 of the last 4 optimizer steps (up to step 4)" in caplog.text
    assert (int(counts.since_log), int(counts.longest_run)) == (0, 2)  # the next log counts afresh
    counts.record(torch.tensor(True))
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row .*step 5.*none saved"):
        counts.check(steps=1, step=5, output_dir=tmp_path)
    counts.restore(1)  # a checkpoint written one skipped step into a run
    counts.record(torch.tensor(False))
    assert counts.current_run() == 0 and counts.allow_checkpoint(step=6) and int(counts.longest_run) == 1


def load_checkpoint_weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_stepz=3"], "train.max_stepz"),
        (["train.max_steps=many"], "train.max_steps"),
        (["objective.schedule.kind=edm", "objective.sampler.kind=speed"], "objective.sampler"),
        (["model.params.hidden_sise=3"], "model.params.hidden_sise"),
        (["model.kind=dit", "objective.label_dropout=0.1"], "objective.label_dropout"),
        (["model.kind=edm2_unet"], "objective: .*train it with an EDM schedule"),
        (["objective.weighting.kind=min_snr", "objective.weighting.gamma=-1"], "objective.weighting"),
        (["train.batch_size=10", "train.gradient_accumulation_steps=4"], "train.batch_size"),
        (["sampling.guidance_interval=[2.0,1.0]"], "sampling.guidance_interval"),
        (["ema.kind=power", "ema.sigma_rels=[0.5]"], "ema.sigma_rels"),
        (["model.preset=uvit-xxl"], "model.preset"),
        (["objective.learned_variance=true"], "objective.learned_variance: needs model.kind 'dit'"),
        (["train.resume=/no/such/checkpoint"], "train.resume"),
        (["hub.push_to_hub=true"], "hub.hub_model_id"),
        (["train.max_steps"], "not of the form"),
        (["data.name=mnist"], "data.name: 'mnist' is not one of digits"),
        (["optim.warmup_steps=-5"], "optim.warmup_steps: must be >= 0"),
        (["ema.start_step=-1"], "ema.start_step: must be >= 0"),
        (["sampling.num_inference_steps=0"], "sampling.num_inference_steps: must be > 0"),
        (["sampling.images_per_class=-1"], "sampling.images_per_class: must be > 0"),
        (["train.checkpoints_total_limit=0"], "train.checkpoints_total_limit: must be >= 1"),
        (["train.sample_every=-1"], "train.sample_every: must be >= 0"),
        (["train.max_consecutive_nonfinite=0"], "train.max_consecutive_nonfinite: must be > 0"),
    ],
)
def test_bad_configs_fail_before_any_work_naming_the_key(overrides, message, tmp_path):
    # Model switches start from the defaults: the quickstart's U-ViT parameters would be the first error.
    recipe = None if "model.kind" in overrides[0] else QUICKSTART
    with pytest.raises(ConfigError, match=message):
        load_config(recipe, [f"train.output_dir={tmp_path}", *overrides])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=inf",
        "optim.lr=nan",
        "optim.betas=[0.9,inf]",
        "optim.eps=inf",
        "optim.weight_decay=nan",
        "optim.max_grad_norm=inf",
        "ema.decay=nan",
        "ema.sigma_rels=[0.05,nan]",
        "sampling.guidance_scale=inf",
        "objective.schedule.sigma_max=inf",
        "objective.weighting.gamma=.inf",
        "data.latent_target_std=nan",
        "hub.retry_delay=inf",
    ],
)
def test_a_non_finite_number_in_a_recipe_is_refused_naming_the_key(override, tmp_path):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}(\[\d\])?: must be a finite number, got (inf|nan)"):
        load_config(QUICKSTART, [f"train.output_dir={tmp_path}", override])
    # A guidance interval open at the top guides every step above its lower end.
    assert load_config(QUICKSTART, ["sampling.guidance_interval=[0.3,inf]"]).sampling.guidance_interval[1] == math.inf


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"model: {kind: uvit\ntrain: [", "is not valid YAML"),
        (b"- model\n- data\n", "holds a YAML list, not a mapping"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not a YAML text file"),
        (b"just some words", "not a mapping"),
    ],
)
def test_a_recipe_that_is_not_a_yaml_mapping_is_one_error_naming_the_file(content, message, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(recipe, [f"train.output_dir={tmp_path / 'run'}"])
    assert str(recipe) in str(caught.value)


def test_a_resume_folder_without_a_checkpoint_is_refused_by_name(tmp_path):
    Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.max_steps=3"))).train()
    with pytest.raises(
        ConfigError, match=r"train.resume: .* is not a checkpoint folder .*it is a run folder.*checkpoint-3"
    ):
        load_config(QUICKSTART, tiny(tmp_path / "run", f"train.resume={tmp_path / 'run'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        load_config(QUICKSTART, tiny(tmp_path / "run", f"train.resume={tmp_path / 'empty'}"))


@pytest.mark.parametrize("kind", ["image_folder", "latents", "hf_dataset"])
def test_a_missing_data_path_is_named_before_any_work(kind, tmp_path):
    missing = tmp_path / "no" / "such" / "data"
    config = load_config(None, [f"train.output_dir={tmp_path / 'run'}", f"data.kind={kind}", f"data.path={missing}"])
    with pytest.raises(ConfigError, match=rf"data.path: '{missing}' does not exist"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def test_an_hf_dataset_id_while_offline_is_named_without_trying_the_hub(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "data.kind=hf_dataset", "data.path=mnist"])
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="data.path: 'mnist' is not a local folder, and the Hub is switched off"):
        Trainer(config)
    assert time.perf_counter() - started < 5


def test_a_latent_cache_trains_at_its_own_resolution_and_refuses_another(tmp_path):
    import yaml
    from test_checkpoint_export import CASES, SHARED, latent_cache

    cache = latent_cache(tmp_path / "data")  # 16 px images
    recipe, _, overrides = CASES["latents"]
    recipe = REPO / "configs" / recipe

    def config(run, *extra):
        return load_config(recipe, [*SHARED, *overrides, f"data.path={cache}", f"train.output_dir={run}", *extra])

    with pytest.raises(ConfigError, match=rf"data.resolution: 8, but the latent cache {cache} holds 16 px images"):
        Trainer(config(tmp_path / "refused", "data.resolution=8"))
    assert not (tmp_path / "refused").exists()

    # Left out, the resolution is the cache's, and every saved config says so.
    run = tmp_path / "run"
    Trainer(config(run)).train()
    for saved in (run / "config.yaml", run / "checkpoint-2" / "config.yaml", run / "pipeline" / "training_config.yaml"):
        assert yaml.safe_load(saved.read_text())["data"]["resolution"] == 16, saved

    # Checkpoints of earlier versions recorded the unused default there; they still resume.
    saved = run / "checkpoint-2" / "config.yaml"
    saved.write_text(saved.read_text().replace("resolution: 16", "resolution: 32"))
    resumed = Trainer(config(run, "train.resume=latest", "train.max_steps=3", "data.resolution=16"))
    resumed.train()
    assert resumed.step == 3


def test_a_batch_larger_than_the_dataset_is_named_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size: 4096 .* needs at least 4096 samples, .* has 1617"):
        Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.batch_size=4096")))
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_model_naming_each_key_and_allows_cadence_changes(tmp_path):
    Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.max_steps=3"))).train()
    changed = ("model.params.hidden_size=64", "model.params.num_layers=5", "train.seed=1", "train.resume=latest")
    with pytest.raises(ConfigError) as caught:
        Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", *changed)))
    message = str(caught.value)
    for key in ("model.params.hidden_size: 32 -> 64", "model.params.num_layers: 3 -> 5", "train.seed: 0 -> 1"):
        assert key in message
    assert "size mismatch" not in message and "\n" not in message
    # More steps, other cadences and hub settings continue the same run.
    allowed = ("train.max_steps=5", "train.log_every=1", "train.checkpoint_every=2", "hub.private=true")
    resumed = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", *allowed, "train.resume=latest")))
    resumed.train()
    assert resumed.step == 5


def test_resume_config_changes_lists_what_breaks_the_run_and_ignores_the_rest():
    from diffusers_speedup.training.validation import resume_config_changes

    saved = {
        "model": {"params": {"hidden_size": 32}},
        "data": {"path": "a"},
        "objective": {"weighting": {"kind": "min_snr"}},
        "train": {"batch_size": 16, "max_steps": 6, "log_every": 2, "seed": 0},
        "hub": {"push_to_hub": False},
        "optim": {"lr": 1e-3, "optimizer": "adamw"},
    }
    current = {
        "model": {"params": {"hidden_size": 32}},
        "data": {"path": "b"},
        "objective": {"weighting": {"kind": "constant"}},
        "train": {"batch_size": 32, "max_steps": 60, "log_every": 5, "seed": 0},
        "hub": {"push_to_hub": True},
        "optim": {"lr": 5e-4, "optimizer": "adam"},
    }
    assert resume_config_changes(saved, current) == [
        "data.path: 'a' -> 'b'",
        "objective.weighting.kind: 'min_snr' -> 'constant'",
        "optim.optimizer: 'adamw' -> 'adam'",
        "train.batch_size: 16 -> 32",
    ]


def test_resume_latest_with_nothing_there_warns_that_it_starts_from_scratch(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        trainer = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.max_steps=2", "train.resume=latest")))
        trainer.train()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "STARTS FROM SCRATCH" in r.message]
    assert len(warnings) == 1 and str(tmp_path / "run") in warnings[0].message


def test_no_checkpoint_is_written_inside_a_non_finite_run(tmp_path, monkeypatch):
    original = TrainingData.batch
    calls = {"n": 0}

    def poisoned(self, indices, device):
        calls["n"] += 1
        x0, labels, extras = original(self, indices, device)
        return Batch(x0 * float("nan") if calls["n"] > 3 else x0, labels, extras)

    monkeypatch.setattr(TrainingData, "batch", poisoned)
    overrides = ("train.checkpoint_every=1", "train.max_consecutive_nonfinite=3", "train.checkpoints_total_limit=10")
    trainer = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", *overrides)))
    # Steps 4, 5 and 6 are skipped: no checkpoint at 4 or 5 (or at the end), and checkpoint-3 is named.
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row.*last good checkpoint is .*checkpoint-3"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (1, 2, 3)]


def poison_batches_after(monkeypatch, calls: int) -> None:
    """From micro-batch ``calls + 1`` on, every batch is NaN: those steps have a non-finite loss and are skipped."""
    original, seen = TrainingData.batch, {"n": 0}

    def poisoned(self, indices, device):
        seen["n"] += 1
        x0, labels, extras = original(self, indices, device)
        return Batch(x0 * float("nan") if seen["n"] > calls else x0, labels, extras)

    monkeypatch.setattr(TrainingData, "batch", poisoned)


def test_a_run_that_ends_on_skipped_steps_stops_without_a_last_checkpoint_or_export(tmp_path, monkeypatch):
    poison_batches_after(monkeypatch, 3)
    trainer = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run")))
    # Steps 4 to 6 are skipped, fewer than train.max_consecutive_nonfinite (10): the run still may not end as if
    # it had trained.
    with pytest.raises(
        NonFiniteLossError, match=r"ended on 3 skipped optimizer step.*steps 4 to 6.*last good checkpoint is .*checkp"
    ):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (tmp_path / "run" / "pipeline").exists()


def test_a_learning_rate_that_blows_up_the_weights_stops_at_that_step_and_exports_nothing(tmp_path):
    # lr 1e30: the update of step 1 sends the weights to ~1e30, with a finite gradient, and every later step is
    # skipped; the run used to end there with exit 0 and export them.
    trainer = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "optim.lr=1e30", "train.checkpoint_every=1")))
    with pytest.raises(
        NonFiniteLossError, match=r"update of step 1 left weights that are not finite .*seen at step 2.*none saved"
    ):
        trainer.train()
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "pipeline").exists()


def test_an_update_that_leaves_nan_weights_stops_the_run_at_the_next_check(tmp_path, monkeypatch):
    from diffusers_speedup.training import trainer as trainer_module

    real_step = trainer_module.optimizer_step

    def ruinous_step(accelerator, module, *args, **kwargs):
        result = real_step(accelerator, module, *args, **kwargs)
        if ruinous_step.calls == 3:  # the update of step 4 leaves a NaN weight, with a finite gradient
            with torch.no_grad():
                next(module.parameters()).view(-1)[0] = float("nan")
        ruinous_step.calls += 1
        return result

    ruinous_step.calls = 0
    monkeypatch.setattr(trainer_module, "optimizer_step", ruinous_step)
    trainer = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.checkpoint_every=2", "train.log_every=6")))
    with pytest.raises(
        NonFiniteLossError, match=r"update of step 4 left weights that are not finite .*seen at step 6.*checkpoint-2"
    ):
        trainer.train()
    # No checkpoint from step 4 on, where the weights were already lost; nothing exported.
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "run" / "pipeline").exists()


def test_the_weights_are_checked_after_each_update_without_reading_anything_on_the_host(monkeypatch):
    counts = NonFiniteSteps(max_in_a_row=3, device="cpu")
    weights = [torch.ones(3, 2), torch.zeros(4)]

    def host_read(*args, **kwargs):
        raise AssertionError("the weight check read a tensor on the host")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
            patch.setattr(torch.Tensor, name, host_read)
        counts.record_weights(weights, step=1)
        weights[1][2] = float("inf")
        counts.record_weights(weights, step=2)
        weights[1][2] = float("nan")
        counts.record_weights(weights, step=3)
    assert int(counts.weights_broken_at) == 2 and not counts.allow_checkpoint(step=3)


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        # torch's zip writer reports a full disk without the OSError: at the next file, or when the archive closes.
        (RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 179072 vs 178960"), "unexpected pos"),
        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "file write failed"),
    ],
)
def test_a_checkpoint_that_cannot_be_written_says_so_and_names_the_last_complete_one(
    failure, reason, tmp_path, monkeypatch
):
    real_save = torch.save

    def save_on_a_full_disk(obj, file, *args, **kwargs):
        if "checkpoint-6" in str(file):
            raise failure
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    run = tmp_path / "run"
    with pytest.raises(OSError) as caught:
        Trainer(load_config(QUICKSTART, tiny(run))).train()
    message = str(caught.value)
    assert f"Could not write checkpoint {run / 'checkpoint-6.tmp'}" in message and reason in message
    assert "disk is full" in message and f"last complete checkpoint, {run / 'checkpoint-3'}" in message
    assert "\n" not in message and "train.resume=latest" in message
    assert find_latest_checkpoint(run, clean=False) == run / "checkpoint-3"

    # Nothing is lost: with space again, the run resumes from checkpoint-3, clears the partial folder and finishes.
    monkeypatch.setattr(torch, "save", real_save)
    Trainer(load_config(QUICKSTART, tiny(run, "train.resume=latest"))).train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_a_resumed_run_logs_every_step_once_in_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ("train.report_to=tensorboard", "train.log_every=1")
    original, calls = TrainingData.batch, {"n": 0}

    def dying_batch(self, indices, device):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6, after the checkpoint at step 3 and the logs of steps 1 to 5
            raise KeyboardInterrupt("killed")
        return original(self, indices, device)

    monkeypatch.setattr(TrainingData, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", *extra))).train()
    monkeypatch.setattr(TrainingData, "batch", original)
    Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", *extra, "train.resume=latest"))).train()
    # (The hyper-parameters go to sub-folders of their own.)
    event_files = list((tmp_path / "run" / "logs" / "diffusers-speedup").glob("events.out.tfevents.*"))
    assert len(event_files) == 2  # one file per run
    # TensorBoard reads the folder as one log: the resumed run's start purges steps 4 and 5 of the first run.
    accumulator = EventAccumulator(str(event_files[0].parent)).Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_the_non_finite_stop_is_one_line_without_a_traceback(tmp_path):
    # A learning rate of 1e30 sends the weights to ~1e30 in one step, which stops the run at the next check.
    overrides = tiny(tmp_path / "run", "optim.lr=1e30", "train.max_consecutive_nonfinite=2", "train.checkpoint_every=1")
    result = subprocess.run(
        [sys.executable, str(REPO / "train" / "train.py"), "--config", str(QUICKSTART), *overrides],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "The update of step 1 left weights that are not finite" in errors[0]
    assert "Traceback" not in result.stderr


def test_train_script_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train" / "train.py"), "--config", str(QUICKSTART), "train.nonsense=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "train.nonsense" in result.stderr and "Traceback" not in result.stderr


EDM2_TINY = [
    "model.kind=edm2_unet",
    "model.params.model_channels=16",
    "model.params.channel_mult=[1,2]",
    "model.params.num_blocks=1",
    "model.params.attn_resolutions=[4]",
    "model.params.channels_per_head=8",
    "model.params.logvar_channels=8",
    "objective.schedule.kind=edm",
    "objective.prediction_type=sample",
    "objective.sampler.kind=lognormal",
    "objective.weighting.kind=edm",
    "objective.learned_uncertainty=true",
    "data.channels=1",
    "data.resolution=8",
]


@pytest.mark.parametrize(
    ("edm2", "message"), [(False, "ema.kind: the EMA averages whole parameters"), (True, "model.kind: EDM2UNetModel")]
)
def test_fsdp_refuses_what_needs_whole_weights_before_any_work(edm2, message, tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    if edm2:  # from the defaults, as the quickstart's U-ViT parameters do not fit EDM2
        config = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "ema.kind=none", *EDM2_TINY])
    else:
        config = load_config(QUICKSTART, tiny(tmp_path / "run"))
    with pytest.raises(ConfigError, match=message):
        Trainer(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["uvit", "edm2_unet"])
def test_two_process_ddp_on_cpu_matches_one_process(tmp_path, model):
    script = REPO / "train" / "train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(nproc, name):
        common = [
            f"train.output_dir={tmp_path / name}",
            "train.batch_size=16",
            "train.max_steps=2",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "train.report_to=none",
            "ema.kind=none",
            "train.cpu=true",
            "optim.lr_schedule=constant",
            "sampling.num_inference_steps=2",
            "sampling.images_per_class=1",
            "sampling.max_classes=2",
        ]
        # The EDM2 run starts from the defaults (no --config), the U-ViT run from the quickstart.
        recipe = ["--config", str(QUICKSTART), *tiny(tmp_path / name)] if model == "uvit" else EDM2_TINY
        if nproc > 1 and model == "uvit":  # the README's command
            launcher = [
                "accelerate.commands.launch",
                "--multi_gpu",
                f"--num_processes={nproc}",
                "--main_process_port=0",
            ]
        else:
            launcher = ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        command = [sys.executable, "-m", *launcher, str(script), *recipe, *common]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        # Each process logs its place in the process group it really joined.
        for rank in range(nproc):
            assert f"process {rank} of {nproc} " in result.stderr
        return load_file(str(tmp_path / name / "checkpoint-2" / "model.safetensors"))

    one, two = run(1, "one"), run(2, "two")
    # Same global batch, same draws: the weights after two steps agree up to the order of float sums.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)


def test_pushes_checkpoints_and_the_final_model_through_failures_without_leaking_the_token(
    tmp_path, monkeypatch, caplog
):
    import logging

    from huggingface_hub import constants

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_hub import FakeHub

    token = "hf_TrainerTestToken0123456789"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    hub = FakeHub().install()
    try:
        hub.fail_requests(2, r"/commit/")  # the first two upload attempts fail
        overrides = tiny(
            tmp_path / "run",
            "hub.push_to_hub=true",
            "hub.hub_model_id=me/digits",
            "hub.push_checkpoints=true",
            "hub.retry_delay=0.01",
            "train.report_to=tensorboard",
        )
        with caplog.at_level(logging.INFO):
            trainer = Trainer(load_config(QUICKSTART, overrides))
            trainer.train()
    finally:
        hub.uninstall()
    assert trainer.push_result.ok
    messages = [message for repo, message, _ in hub.commits if repo == "me/digits"]
    assert messages[-1] == "Final model after 6 steps"
    assert "model_index.json" in hub.repos["me/digits"] and "README.md" in hub.repos["me/digits"]
    assert token not in caplog.text
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_power_ema_snapshots_reconstruct_into_a_loadable_pipeline(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(
        load_config(QUICKSTART, tiny(run, "ema.kind=power", "ema.sigma_rels=[0.05,0.10]", "ema.snapshot_every=2"))
    )
    export_dir = trainer.train()
    from diffusers_speedup.commands import posthoc_ema as posthoc

    posthoc.main(
        [
            "--run_dir",
            str(run),
            "--sigma_rel",
            "0.07",
            "--output_dir",
            str(tmp_path / "posthoc"),
            "--pipeline_dir",
            str(export_dir),
        ]
    )
    from diffusers_speedup import ClassConditionalPipeline

    pipeline = ClassConditionalPipeline.from_pretrained(tmp_path / "posthoc" / "phema-0.070")
    reconstructed = load_file(str(tmp_path / "posthoc" / "phema-0.070.safetensors"))
    for name, value in pipeline.transformer.state_dict().items():
        assert torch.equal(value, reconstructed[name].to(value.dtype))
    # σ_rel 0.07 lies between the two tracked profiles, and so do its weights.
    tracked = [model.state_dict() for model in trainer.ema.models]
    name = next(n for n in reconstructed if n.endswith("weight"))
    low, high = torch.minimum(tracked[0][name], tracked[1][name]), torch.maximum(tracked[0][name], tracked[1][name])
    inside = ((reconstructed[name] >= low - 1e-3) & (reconstructed[name] <= high + 1e-3)).float().mean()
    assert inside > 0.9


class _SquaredOutput(torch.nn.Module):
    """A linear map whose per-sample loss is its squared output, in the objective's output form."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x0, class_labels):
        loss = self.linear(x0).square().mean(1)
        return SimpleNamespace(loss=loss, snr=torch.ones_like(loss), vb=None)


def test_a_fused_step_skips_non_finite_gradients_without_reading_anything_on_the_host(monkeypatch):
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    module = _SquaredOutput()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, fused=True)
    module, optimizer = accelerator.prepare(module, optimizer)
    x = torch.randn(3, 4)

    def host_read(*args, **kwargs):
        raise AssertionError("the training step read a tensor on the host")

    def step(batch):
        with monkeypatch.context() as patch:
            for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
                patch.setattr(torch.Tensor, name, host_read)
            return optimizer_step(accelerator, module, optimizer, [Batch(batch, None, {})], max_grad_norm=1.0)

    before = {name: value.clone() for name, value in module.state_dict().items()}
    grad_norm, skipped = step(x)
    assert not skipped and torch.isfinite(grad_norm)
    assert not torch.equal(module.linear.weight, before["linear.weight"])

    state = {name: value.clone() for name, value in module.state_dict().items()}
    moments = {key: value.clone() for key, value in optimizer.state_dict()["state"][0].items()}
    grad_norm, skipped = step(x * float("nan"))
    assert skipped and not torch.isfinite(grad_norm)
    for name, value in module.state_dict().items():
        assert torch.equal(value, state[name])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, moments[key]), key  # step count, exp_avg, exp_avg_sq untouched
