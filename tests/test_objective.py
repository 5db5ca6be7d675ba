import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler
from tiny_models import TINY_EDM2, wake_gains
from torch import nn

from diffusers_speedup import DiffusionObjective, LogNormalSigmaSampler, SpeeDTimestepSampler

LINEAR = DDPMScheduler(beta_schedule="linear")


class FixedDenoiser(nn.Module):
    """One denoiser x̂0 = f(x_t, t), reported as the ε, v or x0 prediction it implies."""

    def __init__(self, alphas_cumprod, prediction_type):
        super().__init__()
        self.alphas_cumprod, self.prediction_type = alphas_cumprod.double(), prediction_type

    def forward(self, hidden_states, timestep, class_labels=None, return_dict=True):
        alpha_bar = self.alphas_cumprod[timestep].reshape(-1, 1, 1, 1)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x_t = hidden_states.double()
        x0_hat = 0.6 * torch.tanh(x_t) + 0.001 * timestep.reshape(-1, 1, 1, 1)
        eps_hat = (x_t - alpha * x0_hat) / sigma
        prediction = {"sample": x0_hat, "epsilon": eps_hat, "v_prediction": alpha * eps_hat - sigma * x0_hat}
        return (prediction[self.prediction_type].to(hidden_states.dtype),)


class TinyTransformer(nn.Module):
    """A 1×1 convolution behind the DiT call signature."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, hidden_states, timestep, class_labels=None, return_dict=True):
        return (self.conv(hidden_states),)


class FixedTimesteps:
    def __init__(self, timesteps):
        self.timesteps = torch.as_tensor(timesteps)

    def sample(self, batch_size, device=None, generator=None):
        return self.timesteps[:batch_size].to(device), torch.ones(batch_size, device=device)


@pytest.mark.parametrize("kind", ["min_snr", "soft_min_snr", "p2", "edm"])
def test_weighted_losses_agree_across_prediction_types_for_the_same_denoiser(kind):
    x0 = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    timesteps = torch.tensor([0, 10, 150, 400, 700, 999])
    losses = {}
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        objective = DiffusionObjective(
            LINEAR, sampler=FixedTimesteps(timesteps), weighting=kind, prediction_type=prediction_type
        )
        model = FixedDenoiser(LINEAR.alphas_cumprod, prediction_type)
        losses[prediction_type] = objective.loss(model, x0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(losses["epsilon"], losses["sample"], rtol=1e-4, atol=0)
    torch.testing.assert_close(losses["v_prediction"], losses["sample"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("kind", ["constant", "min_snr", "soft_min_snr", "p2"])
def test_zero_terminal_snr_schedule_gives_finite_losses(prediction_type, kind):
    schedule = DDPMScheduler(
        beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type=prediction_type
    )
    assert schedule.alphas_cumprod[-1] == 0
    objective = DiffusionObjective(schedule, sampler=FixedTimesteps([999, 998, 0, 500]), weighting=kind)
    model = TinyTransformer()
    output = objective(model, torch.randn(4, 3, 4, 4))
    assert torch.isfinite(output.loss).all() and output.snr[0] == 0
    output.loss.mean().backward()
    assert torch.isfinite(model.conv.weight.grad).all()


def test_min_snr_loss_equals_hand_computed_epsilon_loss():
    x0 = torch.randn(4, 2, 3, 3)
    timesteps = torch.tensor([5, 200, 600, 900])
    objective = DiffusionObjective(
        LINEAR,
        sampler=FixedTimesteps(timesteps),
        weighting="min_snr",
        weighting_params={"gamma": 5.0},
        prediction_type="epsilon",
    )
    model = nn.Conv2d(2, 2, 1)
    wrapped = lambda hidden_states, timestep, class_labels, return_dict: (model(hidden_states),)
    loss = objective.loss(wrapped, x0, generator=torch.Generator().manual_seed(0))

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    alpha_bar = LINEAR.alphas_cumprod[timesteps].double()
    x_t = alpha_bar.sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - alpha_bar).sqrt().reshape(-1, 1, 1, 1) * noise
    snr = alpha_bar / (1 - alpha_bar)
    mse = ((model(x_t.float()) - noise) ** 2).mean(dim=(1, 2, 3)).double()
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr * mse
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_edm_preconditioning_matches_diffusers_edm_scheduler():
    scheduler = EDMEulerScheduler(sigma_data=0.5)
    x0 = torch.randn(5, 3, 4, 4)
    seen = {}

    def oracle(hidden_states, timestep, class_labels=None, return_dict=True):
        # Recover σ and x from what the model is shown, then return the exact F that makes D = x0.
        sigma = (4 * timestep).exp().reshape(-1, 1, 1, 1)
        noisy = hidden_states * (sigma**2 + 0.25).sqrt()
        seen.update(sigma=sigma.flatten(), noisy=noisy, model_input=hidden_states, timestep=timestep)
        c_skip = 0.25 / (sigma**2 + 0.25)
        c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        return ((x0 - c_skip * noisy) / c_out,)

    objective = DiffusionObjective(scheduler, weighting="edm")
    output = objective(oracle, x0, generator=torch.Generator().manual_seed(0))
    assert output.loss.abs().max() < 1e-8
    # The model saw exactly what diffusers' EDM schedulers feed it at sampling time.
    sigma = seen["sigma"]
    torch.testing.assert_close(seen["timestep"], scheduler.precondition_noise(sigma))
    torch.testing.assert_close(
        seen["model_input"], scheduler.precondition_inputs(seen["noisy"], sigma.reshape(-1, 1, 1, 1))
    )
    # "edm" is unit weight on F, i.e. the same loss as "constant".
    model = lambda hidden_states, timestep, class_labels=None, return_dict=True: (0.3 * hidden_states,)
    edm = DiffusionObjective(scheduler, weighting="edm").loss(model, x0, generator=torch.Generator().manual_seed(1))
    constant = DiffusionObjective(scheduler).loss(model, x0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(edm, constant, rtol=1e-5, atol=0)


class SigmaDenoiser(nn.Module):
    """A model that takes σ and returns the denoised sample (the EDM2UNetModel contract)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, sample, sigma, class_labels=None, return_logvar=False):
        logvar = torch.full((sample.shape[0], 1, 1, 1), 0.3) if return_logvar else None
        return SimpleNamespace(sample=self.scale * sample, logvar=logvar)


def test_sigma_input_model_with_edm_weighting_and_learned_uncertainty():
    x0 = torch.randn(4, 3, 4, 4)
    model = SigmaDenoiser()
    objective = DiffusionObjective(
        EDMEulerScheduler(),
        sampler=LogNormalSigmaSampler(-0.4, 1.0),
        weighting="edm",
        prediction_type="sample",
        conditioning="sigma",
        learned_uncertainty=True,
        uncertainty_from_model=True,
    )
    output = objective(model, x0, generator=torch.Generator().manual_seed(0))

    generator = torch.Generator().manual_seed(0)
    sigma = (torch.randn(4, generator=generator) * 1.0 - 0.4).exp()
    noise = torch.randn(x0.shape, generator=generator)
    denoised = 0.5 * (x0 + sigma.reshape(-1, 1, 1, 1) * noise)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = lam / math.exp(0.3) * ((denoised - x0) ** 2).mean(dim=(1, 2, 3)) + 0.3
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    assert objective.uncertainty_head is None  # the model brings its own log-variance


def test_uncertainty_head_starts_at_zero_and_learns_the_loss_level():
    objective = DiffusionObjective(LINEAR, learned_uncertainty=True)
    x0 = torch.randn(64, 3, 4, 4)
    model = TinyTransformer()
    torch.testing.assert_close(
        objective.loss(model, x0, generator=torch.Generator().manual_seed(0)),
        DiffusionObjective(LINEAR).loss(model, x0, generator=torch.Generator().manual_seed(0)),
    )
    # A model that always predicts 2 has ε-mse E[(2 − ε)²] = 5 at every noise level; minimising mse/e^u + u over u
    # gives u = ln 5 everywhere.
    constant = lambda hidden_states, timestep, class_labels=None, return_dict=True: (
        torch.full_like(hidden_states, 2.0),
    )
    optimizer = torch.optim.Adam(objective.uncertainty_head.parameters(), lr=0.05)
    for step in range(150):
        output = objective(constant, x0, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        output.loss.mean().backward()
        optimizer.step()
    assert abs(output.logvar.mean().item() - math.log(5.0)) < 0.15


def test_label_dropout_uses_the_null_label():
    seen = []

    def model(hidden_states, timestep, class_labels=None, return_dict=True):
        seen.append(class_labels)
        return (hidden_states,)

    objective = DiffusionObjective(LINEAR, label_dropout=0.25, num_classes=10)
    objective.loss(model, torch.randn(4000, 1, 1, 1), torch.zeros(4000, dtype=torch.long))
    dropped = (seen[0] == 10).double().mean().item()
    assert set(seen[0].unique().tolist()) <= {0, 10}
    assert abs(dropped - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000)
    objective.eval()
    objective.loss(model, torch.randn(8, 1, 1, 1), torch.zeros(8, dtype=torch.long))
    assert (seen[1] == 0).all()


def test_from_config_and_mismatches_raise_clear_errors():
    objective = DiffusionObjective.from_config(
        {
            "sampler": {"kind": "speed", "k": 5, "tau": 700},
            "weighting": {"kind": "min_snr", "gamma": 5},
            "prediction_type": "v_prediction",
            "label_dropout": 0.1,
        },
        LINEAR,
        num_classes=10,
    )
    assert isinstance(objective.sampler, SpeeDTimestepSampler) and objective.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="'speed' sampler draws discrete timesteps"):
        DiffusionObjective.from_config({"sampler": {"kind": "speed"}}, EDMEulerScheduler())
    with pytest.raises(ValueError, match="needs num_classes"):
        DiffusionObjective(LINEAR, label_dropout=0.1)
    with pytest.raises(ValueError, match="must be a discrete diffusers scheduler"):
        DiffusionObjective(object())
    with pytest.raises(ValueError, match="train it with an EDM schedule"):
        DiffusionObjective(LINEAR, conditioning="sigma")
    with pytest.raises(ValueError, match="use prediction_type 'sample'"):
        DiffusionObjective(EDMEulerScheduler(), conditioning="sigma")


def test_bad_weighting_or_prediction_type_stop_the_construction():
    with pytest.raises(ValueError, match="unknown parameter"):
        DiffusionObjective(LINEAR, weighting="min_snr", weighting_params={"gama": 5.0})
    with pytest.raises(ValueError, match="Unknown loss weighting kind 'minsnr'"):
        DiffusionObjective.from_config({"weighting": {"kind": "minsnr"}}, LINEAR)
    with pytest.raises(ValueError, match="Unknown prediction_type 'x0'"):
        DiffusionObjective(EDMEulerScheduler(), prediction_type="x0")


def test_learned_sigma_output_uses_the_first_half_of_the_channels():
    model = lambda hidden_states, timestep, class_labels=None, return_dict=True: (torch.cat([hidden_states] * 2, 1),)
    loss = DiffusionObjective(LINEAR).loss(model, torch.randn(2, 4, 2, 2))
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_shards_of_a_global_batch_draw_what_one_process_draws():
    objective = DiffusionObjective(
        LINEAR, sampler=SpeeDTimestepSampler(LINEAR), weighting="min_snr", label_dropout=0.2, num_classes=10
    )
    model = TinyTransformer()
    x0, labels = torch.randn(8, 3, 4, 4), torch.arange(8)
    whole = objective(model, x0, labels, generator=torch.Generator().manual_seed(5))
    halves = [
        objective(
            model,
            x0[rank * 4 : (rank + 1) * 4],
            labels[rank * 4 : (rank + 1) * 4],
            generator=torch.Generator().manual_seed(5),
            shard=(rank, 2),
        )
        for rank in range(2)
    ]
    torch.testing.assert_close(torch.cat([half.loss for half in halves]), whole.loss)
    torch.testing.assert_close(torch.cat([half.snr for half in halves]), whole.snr)


# --- learned variance (DiT's learn_sigma) -------------------------------------------------------------------------


class MeanAndVarianceModel(nn.Module):
    """Returns a given mean prediction and variance output v, and records the noisy input it was called with."""

    def __init__(self, mean, variance):
        super().__init__()
        self.mean, self.variance = nn.Parameter(mean.clone()), nn.Parameter(variance.clone())

    def forward(self, hidden_states, timestep, class_labels=None, return_dict=True):
        self.noisy = hidden_states.detach().double()
        return (torch.cat([self.mean, self.variance], dim=1),)


def _reference_vb(x0, x_t, t, eps_hat, v):
    """L_vb in bits/dim from the DDPM formulas, written out in float64 from the linear betas."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = 1.0 if t == 0 else abar[t - 1]
    beta = betas[t]
    x0_hat = (x_t - (1 - abar[t]).sqrt() * eps_hat) / abar[t].sqrt()

    def posterior_mean(x_start):
        return (math.sqrt(abar_prev) * beta * x_start + (1 - beta).sqrt() * (1 - abar_prev) * x_t) / (1 - abar[t])

    tilde_beta_1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    log_tilde = math.log(tilde_beta_1) if t == 0 else math.log(beta * (1 - abar_prev) / (1 - abar[t]))
    log_var = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * log_tilde
    mean = posterior_mean(x0_hat)
    if t == 0:  # decoder NLL of 8-bit data in [-1, 1]
        cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
        scale = (0.5 * log_var).exp()
        upper = torch.where(x0 > 0.999, torch.ones_like(x0), cdf((x0 - mean + 1 / 255) / scale))
        lower = torch.where(x0 < -0.999, torch.zeros_like(x0), cdf((x0 - mean - 1 / 255) / scale))
        return -(upper - lower).log().mean() / math.log(2)
    true_mean = posterior_mean(x0)
    kl = 0.5 * (log_var - log_tilde - 1 + (log_tilde - log_var).exp() + (true_mean - mean) ** 2 / log_var.exp())
    return kl.mean() / math.log(2)


def test_learned_variance_adds_the_variational_bound_of_improved_ddpm():
    timesteps = [0, 1, 37, 500, 999]
    x0 = torch.rand(5, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # both open edge bins of the decoder
    eps_hat = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    v = torch.rand(5, 2, 3, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
    objective = DiffusionObjective(
        LINEAR,
        sampler=FixedTimesteps(timesteps),
        weighting="min_snr",
        weighting_params={"gamma": 5.0},
        learned_variance=True,
    )
    model = MeanAndVarianceModel(eps_hat, v)
    output = objective(model, x0, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(timesteps):
        expected = _reference_vb(x0[i].double(), model.noisy[i], t, eps_hat[i].double(), v[i].double())
        torch.testing.assert_close(output.vb[i].double(), expected, rtol=2e-4, atol=1e-6)
    # The weights multiply the MSE only; the VB term is added unweighted.
    snr = objective.snr(torch.tensor(timesteps))
    weights = torch.minimum(snr, torch.tensor(5.0)) / snr
    weights[snr == 0] = 1.0
    torch.testing.assert_close(output.loss, weights * output.mse + output.vb)

    # The bound trains the variance only: the mean channels get exactly the gradient of the weighted MSE.
    output.loss.sum().backward()
    mse_only = MeanAndVarianceModel(eps_hat, v)
    plain = DiffusionObjective(
        LINEAR, sampler=FixedTimesteps(timesteps), weighting="min_snr", weighting_params={"gamma": 5.0}
    )
    plain(mse_only, x0, generator=torch.Generator().manual_seed(3)).loss.sum().backward()
    torch.testing.assert_close(model.mean.grad, mse_only.mean.grad)
    assert model.variance.grad.abs().sum() > 0 and not mse_only.variance.grad.any()


def test_with_a_perfect_mean_the_bound_is_smallest_at_the_posterior_variance():
    x0 = torch.rand(1, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bounds = []
    for value in (-1.0, -0.5, 0.0, 1.0):
        objective = DiffusionObjective(
            LINEAR, sampler=FixedTimesteps([300]), prediction_type="sample", learned_variance=True
        )
        model = MeanAndVarianceModel(x0, torch.full_like(x0, value))
        bounds.append(objective(model, x0, generator=torch.Generator().manual_seed(1)).vb.detach().item())
    assert abs(bounds[0]) < 1e-5 and bounds == sorted(bounds)


def test_learned_variance_rejects_what_it_cannot_train():
    x0 = torch.randn(2, 3, 4, 4)
    objective = DiffusionObjective(LINEAR, learned_variance=True)
    with pytest.raises(ValueError, match="twice the data's 3 channels"):
        objective(TinyTransformer(), x0)
    with pytest.raises(ValueError, match="discrete"):
        DiffusionObjective(EDMEulerScheduler(), learned_variance=True)
    zero_snr = DDPMScheduler(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DiffusionObjective(zero_snr, learned_variance=True)
    DiffusionObjective(zero_snr, learned_variance=True, prediction_type="v_prediction")


# ---------------------------------------------------------------------------------------------------------------------
# EDM2's loss at EDM2's scale


class _RecordingDenoiser(nn.Module):
    """Passes through to an EDM2UNetModel and keeps what the objective fed it (noisy input, σ)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, sample, sigma, class_labels=None, return_logvar=False):
        self.calls.append((sample.detach().clone(), sigma.detach().clone()))
        return self.net(sample, sigma, class_labels, return_logvar=return_logvar)


def _one_step_against_edm2(loss_reduction: str, lr: float = 0.01):
    """One optimizer step of the ImageNet-512 EDM2 recipe's objective and optimizer, and one step written from EDM2's
    definitions on a copy of the same weights and batch. Returns, per parameter, the two updates and the reference
    gradient."""
    import copy
    from pathlib import Path

    from diffusers_speedup.models.edm2_unet import EDM2UNetModel
    from diffusers_speedup.training.parts import build_noise_scheduler, build_objective, build_optimizer
    from diffusers_speedup.training.recipes import load_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "imagenet512" / "edm2_xs.yaml"
    config = load_config(recipe, [f"objective.loss_reduction={loss_reduction}"])
    torch.manual_seed(0)
    overrides = {"sample_size": 32, "in_channels": 4, "num_classes": 10, "attn_resolutions": (16,)}
    net = EDM2UNetModel(**{**TINY_EDM2, **overrides}).train()
    wake_gains(net, 0.7)  # non-zero gains, so that every weight gets a gradient
    reference = copy.deepcopy(net)
    start = {name: param.detach().clone() for name, param in net.named_parameters()}

    recorder = _RecordingDenoiser(net)
    objective = build_objective(config, build_noise_scheduler(config.objective.schedule), 10)
    optimizer = build_optimizer(config, list(net.parameters()), torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = lr  # the schedule's value at step 0 is 0 (ramp-up); any fixed lr serves the comparison
    generator = torch.Generator().manual_seed(1)
    x0 = 0.5 * torch.randn(4, 4, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (4,), generator=generator)
    objective(recorder, x0, labels, generator=generator).loss.mean().backward()  # as the trainer reduces it
    optimizer.step()

    # EDM2 (training_loop.py): λ(σ) = (σ² + σ_d²)/(σ·σ_d)², loss = λ/e^u·(D − y)² + u per element, then
    # loss.sum()·(loss_scaling = 1)/batch backward, and Adam(β = (0.9, 0.99)) with torch's defaults otherwise.
    noisy, sigma = recorder.calls[-1]
    s = sigma.reshape(-1, 1, 1, 1)
    denoised, logvar = reference(noisy, sigma, labels, return_logvar=True, return_dict=False)
    loss = ((s**2 + 0.25) / (s * 0.5) ** 2 / logvar.exp()) * (denoised - x0) ** 2 + logvar
    loss.sum().mul(1 / x0.shape[0]).backward()
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=lr, betas=(0.9, 0.99))
    gradients = {name: param.grad.clone() for name, param in reference.named_parameters()}
    reference_optimizer.step()

    optimizer_settings = optimizer.param_groups[0]
    results = {}
    for (name, ours), (_, theirs) in zip(net.named_parameters(), reference.named_parameters()):
        results[name] = (ours.detach() - start[name], theirs.detach() - start[name], gradients[name])
    return results, optimizer_settings, type(optimizer)


def _worst_step_difference(results, lr):
    """Largest |Δθ − Δθ_EDM2| / lr over the elements whose gradient float32 resolves. Adam's first step is
    g/(|g| + ε) per element, so rounding in an element whose gradient nearly cancels (|g| far below its tensor's
    largest) flips its step whatever the loss scale; both sides compute in float32, so those are left out."""
    worst = 0.0
    for ours, theirs, gradient in results.values():
        resolved = gradient.abs() >= 1e-3 * gradient.abs().max()
        if resolved.any() and gradient.abs().max() > 0:
            worst = max(worst, ((ours - theirs)[resolved].abs().max() / lr).item())
    return worst


def test_edm2_recipe_takes_the_official_optimizer_step():
    lr = 0.01
    results, settings, optimizer_class = _one_step_against_edm2("sum", lr)
    # EDM2's optimizer: Adam, β = (0.9, 0.99), ε = 1e-8, no weight decay.
    assert optimizer_class is torch.optim.Adam
    assert tuple(settings["betas"]) == (0.9, 0.99) and settings["eps"] == 1e-8 and settings["weight_decay"] == 0
    assert _worst_step_difference(results, lr) < 1e-4
    # Averaging over C·H·W instead shrinks the gradients 4096-fold towards Adam's ε, and the steps move off EDM2's.
    mean_results, _, _ = _one_step_against_edm2("mean", lr)
    assert _worst_step_difference(mean_results, lr) > 1e-3


def test_sum_reduction_is_the_mean_times_the_element_count():
    x0 = torch.randn(4, 3, 4, 4)
    outputs = {}
    for reduction in ("mean", "sum"):
        objective = DiffusionObjective(
            EDMEulerScheduler(),
            weighting="edm",
            prediction_type="sample",
            conditioning="sigma",
            learned_uncertainty=True,
            uncertainty_from_model=True,
            loss_reduction=reduction,
        )
        outputs[reduction] = objective(SigmaDenoiser(), x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outputs["sum"].loss, outputs["mean"].loss * 48)
    torch.testing.assert_close(outputs["sum"].mse, outputs["mean"].mse)  # the logged MSE stays a mean
    with pytest.raises(ValueError, match="loss_reduction"):
        DiffusionObjective(EDMEulerScheduler(), loss_reduction="total")


def test_only_the_edm2_recipes_sum_the_loss():
    from pathlib import Path

    from diffusers_speedup.training.recipes import load_config

    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
    reductions = {path.name: load_config(path).objective.loss_reduction for path in recipes}
    summed = {name for name, reduction in reductions.items() if reduction == "sum"}
    assert summed == {"edm2_c.yaml", "edm2_e.yaml", "edm2_xs.yaml"}, reductions
