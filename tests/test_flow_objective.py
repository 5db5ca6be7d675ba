"""The flow-matching family: SiT's paths, SD3's time densities, weightings on the velocity, LightningDiT's
velocity-direction loss, checked against closed forms and against the official loss code written out here."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from diffusers_speedup import DiffusionObjective
from diffusers_speedup.objectives import LossWeighting, build_sampler
from diffusers_speedup.objectives.flow import FlowPath
from diffusers_speedup.objectives.samplers import (
    LogitNormalTimeSampler,
    LogitNormalTimestepSampler,
    ModeTimeSampler,
    UniformTimeSampler,
    UniformTimestepSampler,
    shift_time,
)
from diffusers_speedup.training import ConfigError, load_config
from diffusers_speedup.training.parts import build_noise_scheduler, build_sampling_scheduler

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TIMES = torch.tensor([0.0, 1e-4, 0.1, 0.35, 0.5, 0.8, 0.999, 1.0])


class FixedTimes:
    kind, draws = "fixed", "time"

    def __init__(self, t):
        self.t = torch.as_tensor(t, dtype=torch.float32)

    def sample(self, batch_size, device=None, generator=None):
        return self.t[:batch_size].to(device), torch.ones(batch_size, device=device)


class TimeConv(nn.Module):
    """A 1×1 convolution whose output depends on the timestep, behind the DiT call signature; records its inputs."""

    def __init__(self, channels=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 1)
        self.time = nn.Parameter(torch.randn(channels))
        self.calls = []

    def forward(self, hidden_states, timestep, class_labels=None, return_dict=True):
        self.calls.append((hidden_states.detach().clone(), timestep.detach().clone()))
        return (self.conv(hidden_states) + self.time.reshape(1, -1, 1, 1) * timestep.reshape(-1, 1, 1, 1),)


# --- the paths ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "gvp"])
def test_paths_are_sits_interpolants_with_t_one_as_noise(name):
    path, t = FlowPath(name), TIMES.double()
    alpha, sigma = {"linear": (1 - t, t), "gvp": (torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2))}[name]
    torch.testing.assert_close(path.alpha(t), alpha)
    torch.testing.assert_close(path.sigma(t), sigma)
    # The derivatives against central differences, away from the ends.
    inner, h = t[2:-2], 1e-6
    torch.testing.assert_close(path.d_alpha(inner), (path.alpha(inner + h) - path.alpha(inner - h)) / (2 * h))
    torch.testing.assert_close(path.d_sigma(inner), (path.sigma(inner + h) - path.sigma(inner - h)) / (2 * h))
    snr = path.snr(t)
    assert snr.dtype == torch.float32 and snr[0] == math.inf and snr[-1] < 1e-12 and not snr.isnan().any()
    torch.testing.assert_close(snr[2:-1], ((alpha / sigma) ** 2)[2:-1].float())


def test_an_unknown_path_is_refused():
    with pytest.raises(ValueError, match="Unknown flow path 'vp'"):
        FlowPath("vp")


# --- weightings on the velocity ---------------------------------------------------------------------------------------


class FlowDenoiser(nn.Module):
    """One denoiser x̂0 = f(x_t, t), reported as the velocity, ε or x0 prediction it implies on ``path``."""

    def __init__(self, path, prediction_type):
        super().__init__()
        self.path, self.prediction_type = path, prediction_type

    def forward(self, hidden_states, timestep, class_labels=None, return_dict=True):
        t = timestep.double().reshape(-1, 1, 1, 1)
        alpha, sigma = self.path.alpha(t), self.path.sigma(t)
        x_t = hidden_states.double()
        x0_hat = 0.6 * torch.tanh(x_t) + 0.1 * t
        eps_hat = (x_t - alpha * x0_hat) / sigma
        velocity = self.path.d_alpha(t) * x0_hat + self.path.d_sigma(t) * eps_hat
        prediction = {"sample": x0_hat, "epsilon": eps_hat, "velocity": velocity}[self.prediction_type]
        return (prediction.to(hidden_states.dtype),)


@pytest.mark.parametrize("name", ["linear", "gvp"])
@pytest.mark.parametrize("kind", ["min_snr", "soft_min_snr", "p2", "edm"])
def test_weighted_losses_agree_across_flow_targets_for_the_same_denoiser(name, kind):
    path, t = FlowPath(name), torch.tensor([0.02, 0.1, 0.35, 0.5, 0.8, 0.97])
    x0 = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    losses = {}
    for prediction_type in ("velocity", "epsilon", "sample"):
        objective = DiffusionObjective(path, sampler=FixedTimes(t), weighting=kind, prediction_type=prediction_type)
        objective.time_interval = None  # the same t for every target
        losses[prediction_type] = objective.loss(
            FlowDenoiser(path, prediction_type), x0, generator=torch.Generator().manual_seed(1)
        )
    torch.testing.assert_close(losses["velocity"], losses["sample"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["epsilon"], losses["sample"], rtol=1e-5, atol=1e-7)


def test_min_snr_on_the_velocity_is_the_closed_form():
    # Linear path: ‖Δv‖ = ‖Δx0‖/t, so min(SNR, γ) on the x0 error is min(((1 − t)/t)², γ)·t² on the velocity's;
    # GVP: ‖Δv‖ = (π/2)·‖Δx0‖/σ, so it is min(cot²(πt/2), γ)·(2/π)²·sin²(πt/2).
    t, gamma = torch.tensor([0.05, 0.2, 0.3, 0.5, 0.9]), 5.0
    weighting = LossWeighting("min_snr", "velocity", gamma=gamma)
    linear, gvp = FlowPath("linear"), FlowPath("gvp")
    expected_linear = torch.minimum(((1 - t) / t) ** 2, torch.tensor(gamma)) * t**2
    torch.testing.assert_close(weighting(linear.snr(t), x0_per_velocity=linear.x0_per_velocity(t)), expected_linear)
    half_angle = math.pi * t / 2
    expected_gvp = torch.minimum(1 / torch.tan(half_angle) ** 2, torch.tensor(gamma)) * (2 / math.pi) ** 2
    expected_gvp = expected_gvp * torch.sin(half_angle) ** 2
    torch.testing.assert_close(weighting(gvp.snr(t), x0_per_velocity=gvp.x0_per_velocity(t)), expected_gvp)
    with pytest.raises(ValueError, match="x0_per_velocity"):
        weighting(linear.snr(t))


@pytest.mark.parametrize("prediction_type", ["velocity", "epsilon", "sample"])
@pytest.mark.parametrize("kind", ["constant", "min_snr", "soft_min_snr", "edm"])
def test_flow_losses_are_finite_at_both_ends_of_the_path(prediction_type, kind):
    objective = DiffusionObjective(
        FlowPath("linear"), sampler=FixedTimes(TIMES), weighting=kind, prediction_type=prediction_type
    )
    output = objective(TimeConv(3), torch.randn(len(TIMES), 3, 4, 4))
    assert torch.isfinite(output.loss).all() and not output.snr.isnan().any()


# --- the official losses -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "gvp"])
def test_loss_equals_repas_loss_py(name):
    """REPA's `SILoss.__call__` (sihyun-yu/REPA loss.py), its denoising term written out: its interpolant, x_t, the
    velocity target, the model called with t unscaled (t = 1 noise), and mean_flat of the squared error."""
    t = torch.tensor([0.05, 0.4, 0.77, 0.93])
    images = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    model = TimeConv()
    objective = DiffusionObjective(FlowPath(name), sampler=FixedTimes(t))
    ours = objective.loss(model, images, generator=torch.Generator().manual_seed(7))

    noises = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))  # drawn as the objective does
    time_input = t.reshape(-1, 1, 1, 1)
    if name == "linear":
        alpha_t, sigma_t, d_alpha_t, d_sigma_t = 1 - time_input, time_input, -1, 1
    else:  # REPA's "cosine"
        alpha_t, sigma_t = torch.cos(time_input * math.pi / 2), torch.sin(time_input * math.pi / 2)
        d_alpha_t = -math.pi / 2 * torch.sin(time_input * math.pi / 2)
        d_sigma_t = math.pi / 2 * torch.cos(time_input * math.pi / 2)
    model_input = alpha_t * images + sigma_t * noises
    model_target = d_alpha_t * images + d_sigma_t * noises
    model_output = model(model_input, time_input.flatten())[0]
    reference = torch.mean((model_output - model_target) ** 2, dim=[1, 2, 3])

    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    fed_input, fed_time = model.calls[0]
    torch.testing.assert_close(fed_input, model_input)
    assert torch.equal(fed_time, t)  # t itself, unscaled


def test_one_step_equals_lightningdits_transport_with_cosine_loss():
    """LightningDiT's `Transport.training_losses` (hustvl/LightningDiT@2725fed transport/transport.py, path.py
    ICPlan) with use_cosine_loss and train.py's `loss = cos_loss.mean() + loss.mean()`, then one AdamW step
    (β2 = 0.95, wd 0, its recipe). Its time runs the other way (α = t_L, t_L = 1 is data) and its velocity is
    d/dt_L = −d/dt, so its network is ours called at 1 − t_L with the output negated."""
    config = load_config(
        QUICKSTART, [*FLOW, "objective.sampler={kind: logit_normal}", "objective.cosine_loss_weight=1.0"]
    )
    config.objective.weighting = {"kind": "constant"}  # LightningDiT's plain MSE (the quickstart has Min-SNR)
    config.objective.label_dropout = 0.0
    objective = build_objective_for(config)
    ours = TimeConv()
    theirs = copy.deepcopy(ours)
    x1 = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    lr = 1e-3
    optimizer = torch.optim.AdamW(ours.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0)
    output = objective(ours, x1, generator=torch.Generator().manual_seed(5))
    output.loss.mean().backward()
    optimizer.step()

    noisy, t = ours.calls[0]
    noise = (noisy - (1 - t).reshape(-1, 1, 1, 1) * x1) / t.reshape(-1, 1, 1, 1)
    t_l, x0 = 1 - t, noise  # LightningDiT's names: x0 is the noise, x1 the data
    xt = t_l.reshape(-1, 1, 1, 1) * x1 + (1 - t_l.reshape(-1, 1, 1, 1)) * x0
    ut = 1 * x1 + (-1) * x0
    model_output = -theirs(xt, 1 - t_l)[0]
    mse = torch.mean((model_output - ut) ** 2, dim=[1, 2, 3])
    cos_loss = torch.mean(1 - nn.functional.cosine_similarity(model_output, ut, dim=1), dim=[1, 2])
    reference_optimizer = torch.optim.AdamW(theirs.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0)
    (cos_loss.mean() + mse.mean()).backward()
    reference_optimizer.step()

    torch.testing.assert_close(output.loss.detach(), (mse + cos_loss).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.terms["cosine"], cos_loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def build_objective_for(config):
    from diffusers_speedup.training.parts import build_objective

    return build_objective(config, build_noise_scheduler(config.objective.schedule), num_classes=10)


def test_epsilon_and_sample_targets_keep_t_inside_sits_train_interval():
    objective = DiffusionObjective(FlowPath("linear"), sampler=FixedTimes([0.0, 1.0]), prediction_type="epsilon")
    model = TimeConv(3)
    objective(model, torch.randn(2, 3, 4, 4))
    assert torch.allclose(model.calls[0][1], torch.tensor([1e-3, 1 - 1e-3]))
    velocity = DiffusionObjective(FlowPath("linear"), sampler=FixedTimes([0.0, 1.0]))
    assert velocity.prediction_type == "velocity" and velocity.time_interval is None


# --- the time samplers -------------------------------------------------------------------------------------------------


def test_logit_normal_time_has_sd3s_mean_and_the_shift_adds_log_s():
    # logit(s·t/(1 + (s − 1)·t)) = logit(t) + ln s, so a shifted logit-normal(m, σ) is logit-normal(m + ln s, σ).
    for mean, std, shift in [(0.0, 1.0, 1.0), (0.5, 0.6, 1.0), (1.0, 0.6, 3.0), (-0.3, 1.2, 0.5)]:
        sampler = LogitNormalTimeSampler(logit_mean=mean, logit_std=std, shift=shift)
        t, weights = sampler.sample(200_000, generator=torch.Generator().manual_seed(0))
        assert t.dtype == torch.float32 and (weights == 1).all() and ((t > 0) & (t < 1)).all()
        logit = torch.logit(t.double())
        assert abs(logit.mean().item() - (mean + math.log(shift))) < 0.01
        assert abs(logit.std().item() - std) < 0.01


def test_mode_time_has_the_quantiles_of_sd3s_f_mode():
    # f_mode is decreasing in u, so P(t ≤ f_mode(q)) = 1 − q.
    scale = 1.29
    t, _ = ModeTimeSampler(mode_scale=scale).sample(200_000, generator=torch.Generator().manual_seed(0))
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        f_mode = 1 - q - scale * (math.cos(math.pi * q / 2) ** 2 - 1 + q)
        assert abs((t <= f_mode).double().mean().item() - (1 - q)) < 0.005
    with pytest.raises(ValueError, match="mode_scale must lie in"):
        ModeTimeSampler(mode_scale=2.0)


def test_uniform_time_and_the_shift_formula():
    t, _ = UniformTimeSampler().sample(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(t.mean().item() - 0.5) < 0.005 and t.min() >= 0 and t.max() < 1
    shifted, _ = UniformTimeSampler(shift=3.0).sample(200_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, 3 * t / (1 + 2 * t))
    # E[3u/(1 + 2u)] over U(0, 1) = 3/2 − (3/4)·ln 3.
    assert abs(shifted.mean().item() - (1.5 - 0.75 * math.log(3))) < 0.005
    assert shift_time(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="shift must be > 0"):
        UniformTimeSampler(shift=0)


def test_time_draws_are_reproducible_from_the_generator_and_never_quantised():
    sampler = LogitNormalTimeSampler()
    a, _ = sampler.sample(64, generator=torch.Generator().manual_seed(4))
    b, _ = sampler.sample(64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and len(set(a.tolist())) == 64
    assert not torch.equal(a * 1000, (a * 1000).round())


def test_sampler_kinds_dispatch_on_the_schedule():
    flow, ddpm = FlowPath("linear"), DDPMScheduler()
    assert type(build_sampler({"kind": "default"}, flow)) is UniformTimeSampler
    assert type(build_sampler({"kind": "uniform"}, flow)) is UniformTimeSampler
    assert type(build_sampler({"kind": "logit_normal", "logit_mean": 0.5, "shift": 2}, flow)) is LogitNormalTimeSampler
    assert type(build_sampler({"kind": "mode", "mode_scale": 1.75}, flow)) is ModeTimeSampler
    # The discrete meanings are kept.
    assert type(build_sampler({"kind": "uniform"}, ddpm)) is UniformTimestepSampler
    assert type(build_sampler({"kind": "logit_normal"}, ddpm)) is LogitNormalTimestepSampler
    with pytest.raises(ValueError, match="flow time .* needs a flow path"):
        build_sampler({"kind": "mode"}, ddpm)
    with pytest.raises(ValueError, match="'speed' sampler draws discrete timesteps and does not fit a flow path"):
        build_sampler({"kind": "speed"}, flow)
    with pytest.raises(ValueError, match="'lognormal' sampler draws σ"):
        build_sampler({"kind": "lognormal"}, flow)


# --- recipes -----------------------------------------------------------------------------------------------------------


# The quickstart names the DDIM sampler, which does not fit a flow schedule.
FLOW = ["objective.schedule.kind=flow", "objective.prediction_type=velocity", "sampling.scheduler=null"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.sampler={kind: speed}"], "objective.sampler: The 'speed' sampler draws discrete timesteps"),
        (
            ["model.kind=dit", "objective.learned_variance=true", "objective.label_dropout=0"],
            "objective: learned_variance .* needs schedule kind 'ddpm', not 'flow'",
        ),
        (["objective.learned_uncertainty=true"], "objective: learned_uncertainty .* needs schedule kind 'edm'"),
        (["objective.prediction_type=v_prediction"], "prediction_type 'v_prediction' does not fit a flow schedule"),
        (["objective.prediction_type=epsilon", "objective.cosine_loss_weight=1"], "cosine_loss_weight"),
        (["objective.sampler={kind: mode, mode_scale: 3}"], "objective.sampler: .*mode_scale must lie in"),
        (["objective.schedule.path=vp"], "objective.schedule.path"),
        (["sampling.scheduler=ddim"], "sampling.scheduler: 'ddim' does not fit the 'flow' training schedule"),
        (["sampling.shift=0"], "sampling.shift: must be > 0"),
    ],
)
def test_flow_recipes_that_cannot_run_are_refused_naming_the_keys(overrides, message):
    # Model switches start from the defaults: the quickstart's U-ViT parameters would be the first error.
    recipe = None if "model.kind" in overrides[0] else QUICKSTART
    with pytest.raises(ConfigError, match=message):
        load_config(recipe, [*FLOW, *overrides])


def test_a_sampling_shift_on_a_ddpm_or_edm_schedule_is_refused():
    with pytest.raises(ConfigError, match="sampling.shift: 3.0 warps a flow sampler's time grid .*'ddpm'"):
        load_config(QUICKSTART, ["sampling.shift=3.0"])
    with pytest.raises(ConfigError, match="sampling.shift: .*'edm' training schedule samples with a EDM"):
        load_config("cifar10/edm2_c", ["sampling.shift=2"])


def test_velocity_on_a_ddpm_schedule_is_refused():
    with pytest.raises(ConfigError, match="'velocity' is a flow path's target"):
        load_config(QUICKSTART, ["objective.prediction_type=velocity"])


def test_flow_recipes_build_with_the_flow_sampling_scheduler():
    config = load_config(
        QUICKSTART, [*FLOW, "objective.schedule.path=gvp", "objective.sampler={kind: logit_normal, shift: 2.0}"]
    )
    assert build_noise_scheduler(config.objective.schedule) == FlowPath("gvp")
    objective = build_objective_for(config)
    assert objective.schedule == "flow" and objective.prediction_type == "velocity"
    sampling = build_sampling_scheduler(config, FlowPath("gvp"))
    assert type(sampling).__name__ == "FlowScheduler" and sampling.config.path == "gvp"
    assert sampling.config.sampler == "euler" and sampling.config.prediction_type == "velocity"
    assert sampling.config.shift == 1.0
    shifted = build_sampling_scheduler(load_config(QUICKSTART, [*FLOW, "sampling.shift=3.5"]), FlowPath("linear"))
    assert shifted.config.shift == 3.5


def test_a_tiny_flow_run_trains_through_the_trainer(tmp_path, monkeypatch):
    """The quickstart as a flow recipe trains, logs a finite loss, checkpoints, and exports a pipeline that samples
    with the flow scheduler, also from its checkpoint without the trainer."""
    from diffusers_speedup import ClassConditionalPipeline
    from diffusers_speedup.hub import export_checkpoint
    from diffusers_speedup.training import Trainer
    from diffusers_speedup.training import trainer as trainer_module

    overrides = [
        *FLOW,
        "objective.sampler={kind: logit_normal}",
        "objective.cosine_loss_weight=1.0",
        f"train.output_dir={tmp_path / 'run'}",
        "data.resolution=8",
        "model.params.hidden_size=32",
        "model.params.num_layers=3",
        "model.params.num_attention_heads=2",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.log_every=2",
        "train.report_to=none",
        "optim.lr_schedule=constant",
        "optim.warmup_steps=0",
    ]
    trainer = Trainer(load_config(QUICKSTART, overrides))
    start = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    losses = []
    original = trainer_module.Trainer._log

    def recording_log(self, tracker, *args):
        losses.append(tracker.loss.item())
        return original(self, tracker, *args)

    monkeypatch.setattr(trainer_module.Trainer, "_log", recording_log)
    trainer.train()
    assert trainer.step == 4 and len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert any(not torch.equal(p, start[name]) for name, p in trainer.model.named_parameters())
    assert (tmp_path / "run" / "samples" / "step_0000004.png").is_file()
    for folder in (tmp_path / "run" / "pipeline", export_checkpoint(tmp_path / "run" / "checkpoint-2", tmp_path / "x")):
        pipeline = ClassConditionalPipeline.from_pretrained(folder)
        assert type(pipeline.scheduler).__name__ == "FlowScheduler"
        pipeline.set_progress_bar_config(disable=True)
        images = pipeline([0, 1], num_inference_steps=3, output_type="np").images
        assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_a_checkpoint_written_before_the_flow_keys_resumes_but_a_changed_one_is_named():
    from diffusers_speedup.training.config import config_to_dict
    from diffusers_speedup.training.validation import resume_config_changes

    current = config_to_dict(load_config(QUICKSTART))
    saved = copy.deepcopy(current)
    del saved["objective"]["schedule"]["path"], saved["objective"]["cosine_loss_weight"]
    assert resume_config_changes(saved, current) == []
    current["objective"]["cosine_loss_weight"] = 1.0
    assert resume_config_changes(saved, current) == ["objective.cosine_loss_weight: None -> 1.0"]
