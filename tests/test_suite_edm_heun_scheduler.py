"""The properties diffusers' `SchedulerCommonTest` checks, for EDMHeunScheduler, written for this package.

diffusers' mixins live in its GitHub test folder, which neither the wheel nor the sdist ships. Checked here: config
save/load round trips over configs and step counts (the same step output after reloading), `from_pretrained`
keeping the config, step shapes, dict/tuple outputs, the public API (`init_noise_sigma`, `scale_model_input`,
`step`), `add_noise` (shape, and σ of the timestep in closed form), determinism of the stochastic sampler, timesteps
on a device, `set_begin_index`, `_deprecated_kwargs` and ConfigMixin's attribute access. The compatible schedulers
(`test_compatibles`), a mid-schedule start without `set_begin_index` and the samplers' numerics against closed forms
are in tests/test_edm_heun.py.

Mixin tests that do not apply, and why:
- `test_trained_betas`, `test_betas`, `test_schedules`, `test_clip_sample`, `test_thresholding`: EDM has no β
  schedule, no clipping and no thresholding (EDMEulerScheduler's own test skips `test_trained_betas` too).
- `test_scheduler_public_api` and `test_add_noise_device` call `scale_model_input(sample, 0.0)` (the mixin
  special-cases only diffusers' EDMEulerScheduler), and `check_over_configs` / `check_over_forward` default to
  `time_step=0`: EDM timesteps are c_noise = ln(σ)/4 of the grid, so 0 is no timestep of the schedule, and this
  scheduler says so with a ValueError instead of guessing; the checks here use `scheduler.timesteps[i]`.
- `test_full_loop_*` regression sums with the mixin's dummy model: numbers recorded from one implementation; the
  full loops here are checked against the exact Gaussian ODE solution instead (tests/test_edm_heun.py).
- `test_add_noise_device` on an accelerator, and the Hub push tests: no accelerator, no network in these tests.
"""

import inspect
import warnings

import pytest
import torch

from diffusers_speedup.schedulers.scheduling_edm_heun import EDMHeunScheduler, EDMHeunSchedulerOutput

CONFIGS = [
    {},
    {"sigma_max": 14.6, "rho": 3.0},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample", "sigma_data": 1.0},
    {"s_churn": 8.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.007},
]


def dummy_sample(seed=0):
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def one_step(scheduler, sample, index=0, seed=0, **kwargs):
    t = scheduler.timesteps[index]
    model_output = 0.1 * scheduler.scale_model_input(sample, t)
    return scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("num_inference_steps", [1, 4, 10])
def test_save_load_gives_the_same_steps(config, num_inference_steps, tmp_path):
    scheduler = EDMHeunScheduler(**config)
    scheduler.save_config(tmp_path)
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    for s in (scheduler, loaded):
        s.set_timesteps(num_inference_steps)
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps, rtol=0, atol=0)
    sample = dummy_sample()
    for index in range(min(3, len(scheduler.timesteps))):  # a first-order evaluation and its correction
        expected = one_step(scheduler, sample, index).prev_sample
        assert torch.equal(one_step(loaded, sample, index).prev_sample, expected)


def test_from_pretrained_keeps_the_config(tmp_path):
    scheduler = EDMHeunScheduler(sigma_max=14.6, s_churn=1.0)
    scheduler.save_pretrained(tmp_path)
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    config = dict(scheduler.config)
    del config["_use_default_values"]  # written by __init__, not by a saved-and-loaded config
    assert config == loaded.config


def test_step_shape_and_dict_tuple_equivalence():
    scheduler = EDMHeunScheduler(s_churn=8.0)
    scheduler.set_timesteps(10)
    sample = dummy_sample()
    output_0 = one_step(scheduler, sample, 0)
    output_1 = one_step(scheduler, sample, 1)
    assert isinstance(output_0, EDMHeunSchedulerOutput)
    assert output_0.prev_sample.shape == sample.shape == output_1.prev_sample.shape
    assert output_0.pred_original_sample.shape == sample.shape

    for index in (0, 1):  # the second call is a Heun correction, which adds churn noise for the next step
        scheduler.set_timesteps(10)
        as_dict = [one_step(scheduler, sample, i) for i in range(index + 1)][-1]
        scheduler.set_timesteps(10)
        as_tuple = [one_step(scheduler, sample, i, return_dict=False) for i in range(index + 1)][-1]
        assert isinstance(as_tuple, tuple)
        assert torch.equal(as_tuple[0], as_dict.prev_sample) and torch.equal(as_tuple[1], as_dict.pred_original_sample)


def test_public_api():
    scheduler = EDMHeunScheduler()
    for name in ("init_noise_sigma", "scale_model_input", "step", "set_timesteps", "add_noise", "order"):
        assert hasattr(scheduler, name), name
    assert scheduler.order == 2
    scheduler.set_timesteps(5)
    sample = dummy_sample()
    assert scheduler.scale_model_input(sample, scheduler.timesteps[0]).shape == sample.shape
    assert scheduler.init_noise_sigma == pytest.approx(80.0)


def test_add_noise_uses_the_sigma_of_each_timestep():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(100)
    sample, noise = dummy_sample(0), dummy_sample(1)
    t = scheduler.timesteps[5][None]
    noised = scheduler.add_noise(sample, noise, t)
    assert noised.shape == sample.shape
    sigma = float(scheduler.evaluation_sigmas[5])  # timesteps are c_noise = ln(σ)/4
    torch.testing.assert_close(noised, sample + sigma * noise, rtol=1e-5, atol=1e-5)
    per_sample = scheduler.timesteps[[0, 5, 50, 198]]
    noised = scheduler.add_noise(sample, noise, per_sample)
    sigmas = scheduler.evaluation_sigmas[[0, 5, 50, 198]].view(-1, 1, 1, 1)
    torch.testing.assert_close(noised, sample + sigmas * noise, rtol=1e-5, atol=1e-5)


def test_stochastic_sampler_is_deterministic_given_a_generator():
    outputs = []
    for seed in (0, 0, 1):
        scheduler = EDMHeunScheduler(s_churn=8.0)
        scheduler.set_timesteps(4)
        sample = dummy_sample()
        for index in range(len(scheduler.timesteps)):
            sample = one_step(scheduler, sample, index, seed=seed).prev_sample
        outputs.append(sample)
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


def test_timesteps_on_a_device_and_begin_index():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(6, device="meta")
    assert scheduler.timesteps.device.type == "meta" and scheduler.sigmas.device.type == "cpu"
    scheduler.set_timesteps(6)
    assert scheduler.begin_index is None and scheduler.step_index is None
    scheduler.set_begin_index(4)
    assert scheduler.begin_index == 4
    sample = dummy_sample()
    one_step(scheduler, sample, 4)
    assert scheduler.step_index == 5
    scheduler.set_timesteps(6)  # a new schedule forgets where the last one started
    assert scheduler.begin_index is None and scheduler.step_index is None


def test_deprecated_kwargs_and_getattr():
    assert "kwargs" not in inspect.signature(EDMHeunScheduler.__init__).parameters
    assert not EDMHeunScheduler._deprecated_kwargs
    scheduler = EDMHeunScheduler()
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scheduler.dummy_attribute == 5
        assert callable(scheduler.save_pretrained)
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError, match="'EDMHeunScheduler' object has no attribute 'does_not_exist'"):
        _ = scheduler.does_not_exist
