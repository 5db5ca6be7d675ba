import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from diffusers_speedup.training import ConfigError, Trainer, load_config
from diffusers_speedup.training.checkpoints import find_latest_checkpoint
from diffusers_speedup.training.trainer import NonFiniteLossError, TrainingData, optimizer_step

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


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
    ema = torch.load(folder / "custom_checkpoint_1.pkl", weights_only=False)
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
        x0, labels = original(self, indices, device)
        return (x0 * float("nan") if calls["n"] > 3 else x0), labels

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
        (["model.kind=edm2_unet"], "objective.schedule.kind"),
        (["objective.weighting.kind=min_snr", "objective.weighting.gamma=-1"], "objective.weighting"),
        (["train.batch_size=10", "train.gradient_accumulation_steps=4"], "train.batch_size"),
        (["sampling.guidance_interval=[2.0,1.0]"], "sampling.guidance_interval"),
        (["ema.kind=power", "ema.sigma_rels=[0.5]"], "ema.sigma_rels"),
        (["model.preset=uvit-xxl"], "model.preset"),
        (["objective.learned_variance=true"], "objective.learned_variance: needs model.kind 'dit'"),
        (["train.resume=/no/such/checkpoint"], "train.resume"),
        (["hub.push_to_hub=true"], "hub.hub_model_id"),
        (["train.max_steps"], "not of the form"),
    ],
)
def test_bad_configs_fail_before_any_work_naming_the_key(overrides, message, tmp_path):
    # Model switches start from the defaults: the quickstart's U-ViT parameters would be the first error.
    recipe = None if "model.kind" in overrides[0] else QUICKSTART
    with pytest.raises(ConfigError, match=message):
        load_config(recipe, [f"train.output_dir={tmp_path}", *overrides])
    assert not any(tmp_path.iterdir())


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
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
            *recipe,
            *common,
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
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
            return optimizer_step(accelerator, module, optimizer, [(batch, None)], max_grad_norm=1.0)

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
