import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler

from diffusers_speedup import LogNormalSigmaSampler, SpeeDTimestepSampler, UniformTimestepSampler
from diffusers_speedup.objectives import LogitNormalTimestepSampler, build_sampler, speed_pivot

LINEAR = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def test_speed_pivot_of_dit_and_cosine_schedules():
    # Published values: 642 for DiT's linear schedule, 959 for the cosine one.
    assert speed_pivot(LINEAR.alphas_cumprod.double()) == 642
    cosine = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    assert speed_pivot(cosine.alphas_cumprod.double()) == 959


def test_speed_frequencies_match_probabilities():
    k, tau, num_steps, draws = 5.0, 700, 1000, 400_000
    sampler = SpeeDTimestepSampler(LINEAR, k=k, tau=tau, dual=False)
    timesteps, _ = sampler.sample(draws, generator=torch.Generator().manual_seed(0))
    # p(t) = k/(kτ + T − τ) below τ and 1/(kτ + T − τ) above, computed here from the paper's definition.
    normaliser = k * tau + num_steps - tau
    buckets = [(0, 100), (100, 400), (400, 700), (700, 850), (850, 1000)]
    for lo, hi in buckets:
        expected = sum(k if t < tau else 1.0 for t in range(lo, hi)) / normaliser
        observed = ((timesteps >= lo) & (timesteps < hi)).double().mean().item()
        # Binomial standard error √(p(1−p)/N); five of them make a false failure about 1 in 10⁶ per bucket.
        tolerance = 5 * math.sqrt(expected * (1 - expected) / draws)
        assert abs(observed - expected) < tolerance, (lo, hi, observed, expected)


def test_speed_dual_sampling_is_the_exact_mirror_about_the_pivot():
    sampler = SpeeDTimestepSampler(LINEAR, k=5.0, tau=700)
    for batch_size in (1, 2, 7, 64):
        timesteps, weights = sampler.sample(batch_size, generator=torch.Generator().manual_seed(batch_size))
        assert timesteps.shape == weights.shape == (batch_size,)
        first = timesteps[: math.ceil(batch_size / 2)]
        mirrored = timesteps[math.ceil(batch_size / 2) :]
        expected = torch.where(first < 642, 642 - first, first - 642)[: len(mirrored)]
        assert torch.equal(mirrored, expected)
        assert (mirrored <= 642).all()


def test_speed_change_aware_weights_closed_form():
    lam, tau = 0.6, 700
    sampler = SpeeDTimestepSampler(LINEAR, k=5.0, tau=tau, lam=lam)
    one_minus = (1.0 - LINEAR.alphas_cumprod.double()).numpy()
    # d(1 − ᾱ)/dt: one-sided differences at the ends, central differences inside.
    change = np.empty_like(one_minus)
    change[0], change[-1] = one_minus[1] - one_minus[0], one_minus[-1] - one_minus[-2]
    change[1:-1] = (one_minus[2:] - one_minus[:-2]) / 2
    normalised = (change - change.min()) / (change.max() - change.min())
    expected = np.where(np.arange(1000) < tau, (1 - lam) + (2 * lam - 1) * normalised, 1.0)
    np.testing.assert_allclose(sampler.weights.numpy(), expected, rtol=1e-6)
    # Min and max are taken over all T steps, so below τ the weights lie in [1 − λ, λ] and reach λ at the peak.
    assert sampler.weights[:tau].min() >= 0.4 and abs(sampler.weights[:tau].max().item() - 0.6) < 1e-6
    assert int(sampler.weights[:tau].argmax()) == 218  # the peak of d(1 − ᾱ)/dt on the linear schedule
    timesteps, weights = sampler.sample(32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(weights, sampler.weights[timesteps])


@pytest.mark.parametrize("lam", [0.5, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("k", [0.2, 1.0, 5.0, 25.0])
def test_speed_weights_non_negative_over_documented_range(lam, k):
    sampler = SpeeDTimestepSampler(LINEAR, k=k, lam=lam, tau=700)
    assert (sampler.weights >= 0).all()
    assert torch.isclose(sampler.probabilities.sum(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": 5.0}, "lam must lie in"),
        ({"lam": 0.3}, "lam must lie in"),
        ({"k": 0.0}, "k must be > 0"),
        ({"tau": 0}, "tau must lie in"),
        ({"tau": 1001}, "tau must lie in"),
    ],
)
def test_speed_bad_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeeDTimestepSampler(LINEAR, **kwargs)


def test_speed_tau_defaults_to_the_schedule_pivot():
    assert SpeeDTimestepSampler(LINEAR).tau == 642


def test_uniform_lognormal_logit_normal_contract():
    generator = torch.Generator().manual_seed(0)
    timesteps, weights = UniformTimestepSampler(LINEAR).sample(10_000, generator=generator)
    assert timesteps.dtype == torch.long and timesteps.min() >= 0 and timesteps.max() <= 999
    assert torch.equal(weights, torch.ones(10_000))
    assert abs(timesteps.double().mean().item() - 499.5) < 5 * 288.7 / math.sqrt(10_000)

    sigmas, _ = LogNormalSigmaSampler(p_mean=-1.2, p_std=1.2).sample(20_000, generator=generator)
    log_sigma = sigmas.log()
    assert abs(log_sigma.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(20_000)
    assert abs(log_sigma.std().item() - 1.2) < 0.05

    timesteps, _ = LogitNormalTimestepSampler(LINEAR).sample(20_000, generator=generator)
    assert timesteps.min() >= 0 and timesteps.max() <= 999
    assert abs(timesteps.double().median().item() - 500) < 15


def test_samplers_are_deterministic_for_a_generator():
    sampler = SpeeDTimestepSampler(LINEAR)
    first = sampler.sample(16, generator=torch.Generator().manual_seed(3))
    second = sampler.sample(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_build_sampler_refuses_mismatched_schedules():
    edm = EDMEulerScheduler()
    with pytest.raises(ValueError, match="'speed' sampler draws discrete timesteps"):
        build_sampler({"kind": "speed"}, edm)
    with pytest.raises(ValueError, match="'lognormal' sampler draws continuous"):
        build_sampler({"kind": "lognormal"}, LINEAR)
    with pytest.raises(ValueError, match="Unknown sampler kind 'fast'"):
        build_sampler({"kind": "fast"}, LINEAR)
    with pytest.raises(ValueError, match="Sampler 'speed'"):
        build_sampler({"kind": "speed", "kappa": 3}, LINEAR)
    assert isinstance(build_sampler({"kind": "default"}, edm), LogNormalSigmaSampler)
    with pytest.raises(ValueError, match="SpeeDTimestepSampler needs a discrete noise schedule"):
        SpeeDTimestepSampler(edm)
