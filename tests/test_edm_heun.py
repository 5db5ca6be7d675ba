"""EDMHeunScheduler against closed forms: the Karras grid, EDM preconditioning and an exactly solvable Gaussian ODE."""

import math

import pytest
import torch
from diffusers import EDMEulerScheduler

from diffusers_speedup.schedulers.scheduling_edm_heun import EDMHeunScheduler, edm_scalings

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5
# Toy data: x0 ~ N(MU, S²) independently per dimension; its exact denoiser is affine in x.
MU = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
S = torch.tensor([0.5, 0.2, 1.0], dtype=torch.float64)


def karras_sigmas(n):
    """σ_i = (σmax^(1/ρ) + i/(N−1)·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ for i < N, then σ_N = 0 (EDM eq. 5)."""
    hi, lo = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return [(hi + (i / max(n - 1, 1)) * (lo - hi)) ** RHO for i in range(n)] + [0.0]


def exact_denoiser(x, sigma):
    """E[x0 | x] for x = x0 + σ·n with x0 ~ N(MU, S²): MU + S²/(S²+σ²)·(x − MU)."""
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_ode_solution(x_start):
    """The probability-flow ODE dx/dσ = (x − D(x;σ))/σ solved exactly from σ_max to 0 for the toy data."""
    return MU + (x_start - MU) * S / torch.sqrt(S**2 + SIGMA_MAX**2)


def run_heun(scheduler, x_start, denoiser=exact_denoiser, generator=None):
    """Samples with prediction_type 'sample'; returns the final sample and the number of network evaluations."""
    x, calls = x_start.clone(), 0
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        calls += 1
        x = scheduler.step(denoiser(model_input, scheduler.sigma_for_model_input), t, x, generator=generator)
        x = x.prev_sample
    return x, calls


def start_noise(n, seed=0, sigma=SIGMA_MAX):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(MU), generator=generator, dtype=torch.float64) * sigma


def test_grid_matches_karras_formula_and_timesteps_are_c_noise():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(5)
    expected = karras_sigmas(5)
    torch.testing.assert_close(
        scheduler.sigmas.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0
    )
    # Evaluations: σ0, then (σ1, σ1), (σ2, σ2), (σ3, σ3), (σ4, σ4); the last step is Euler to 0.
    eval_sigmas = [expected[0]] + [s for s in expected[1:5] for _ in range(2)]
    assert len(scheduler.timesteps) == 9
    torch.testing.assert_close(scheduler.evaluation_sigmas.double(), torch.tensor(eval_sigmas, dtype=torch.float64))
    torch.testing.assert_close(
        scheduler.timesteps.double(), 0.25 * torch.log(torch.tensor(eval_sigmas, dtype=torch.float64))
    )
    # Both evaluations of step i are decided by σ_i.
    assert scheduler.evaluation_step_indices.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert scheduler.init_noise_sigma == pytest.approx(SIGMA_MAX)


@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_n_steps_take_2n_minus_1_network_evaluations(num_steps):
    scheduler = EDMHeunScheduler(prediction_type="sample")
    scheduler.set_timesteps(num_steps)
    first_order = []
    x, calls = start_noise(4), 0
    for t in scheduler.timesteps:
        first_order.append(scheduler.state_in_first_order)
        calls += 1
        x = scheduler.step(exact_denoiser(x, scheduler.sigma_for_model_input), t, x).prev_sample
    assert calls == 2 * num_steps - 1
    assert first_order == [True] + [False, True] * (num_steps - 1)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, scheduler.timesteps[-1], x)


def test_gaussian_toy_reaches_the_exact_ode_solution_and_target_moments():
    scheduler = EDMHeunScheduler(prediction_type="sample")
    scheduler.set_timesteps(32)  # EDM2's default: 63 evaluations
    x_start = start_noise(20000)
    x, _ = run_heun(scheduler, x_start)
    exact = exact_ode_solution(x_start)
    # Pointwise: the ODE solution for starting points spread over ±4·80.
    assert (x - exact).abs().max() < 0.1
    # Moments: the exact push-forward of N(0, σmax²) is N(MU·(1 − S/√(S²+σmax²)), S²·σmax²/(S²+σmax²)).
    shrink = S / torch.sqrt(S**2 + SIGMA_MAX**2)
    target_mean, target_std = MU * (1 - shrink), SIGMA_MAX * shrink
    n = x.shape[0]
    assert torch.all((x.mean(0) - target_mean).abs() < 5 * target_std / math.sqrt(n))  # 5 standard errors
    assert torch.all((x.std(0) / target_std - 1).abs() < 5 / math.sqrt(2 * n) + 0.01)  # 5 s.e. + ODE error


def euler_error(x_start, exact, num_evaluations):
    """Mean error of diffusers' first-order EDMEulerScheduler (same Karras grid parameters) with the exact D."""
    euler = EDMEulerScheduler()
    euler.set_timesteps(num_evaluations)
    x = x_start.clone().float()
    for i, t in enumerate(euler.timesteps):
        euler.scale_model_input(x, t)
        denoised = exact_denoiser(x.double(), float(euler.sigmas[i])).float()
        x = euler.step(denoised, t, x, pred_original_sample=denoised).prev_sample
    return (x.double() - exact).abs().mean()


def heun_error(x_start, exact, num_steps):
    heun = EDMHeunScheduler(prediction_type="sample")
    heun.set_timesteps(num_steps)
    x, calls = run_heun(heun, x_start)
    return (x - exact).abs().mean(), calls


def test_heun_beats_euler_at_equal_network_evaluations():
    x_start = start_noise(2000)
    exact = exact_ode_solution(x_start)
    heun_16, calls_16 = heun_error(x_start, exact, 16)
    heun_32, calls_32 = heun_error(x_start, exact, 32)
    euler_31, euler_63 = euler_error(x_start, exact, calls_16), euler_error(x_start, exact, calls_32)
    assert (calls_16, calls_32) == (31, 63)
    # At EDM2's 63 evaluations Heun is about 3x more accurate (measured 0.0066 vs 0.0194).
    assert heun_32 < euler_63 / 2
    # Second order vs first order: doubling the evaluations cuts Heun's error ~4x, Euler's ~2x.
    assert heun_16 / heun_32 > 3.0
    assert euler_31 / euler_63 < 2.5


def test_edm_scalings_closed_forms_for_floats_and_tensors():
    """EDM Table 1 at σ = 1.2, σ_data = 0.5 (where √(σ²+σ_data²) = 1.3) and at σ = σ_data (where c_skip = ½)."""
    at_1_2 = (0.25 / 1.69, 0.6 / 1.3, 1 / 1.3, math.log(1.2) / 4)
    at_sigma_data = (0.5, 0.5 / math.sqrt(2), math.sqrt(2), math.log(0.5) / 4)
    assert tuple(edm_scalings(1.2, 0.5)) == pytest.approx(at_1_2, rel=1e-15)
    c_skip, c_out, c_in, c_noise = edm_scalings(1.2, 0.5, "v_prediction")
    assert (c_skip, -c_out, c_in, c_noise) == pytest.approx(at_1_2, rel=1e-15)  # only c_out changes sign
    on_tensor = edm_scalings(torch.tensor([1.2, 0.5], dtype=torch.float64), 0.5)
    for value, first, second in zip(on_tensor, at_1_2, at_sigma_data):
        torch.testing.assert_close(value, torch.tensor([first, second], dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_preconditioned_outputs_follow_edm_formulas(prediction_type):
    """A network that sees c_in·x and c_noise and returns the exact F gives the same samples as the exact D."""

    def f_network(model_input, c_noise):
        sigma = math.exp(4 * float(c_noise))  # c_noise = ¼·ln σ
        x = model_input * math.sqrt(sigma**2 + SIGMA_DATA**2)  # undo c_in = 1/√(σ²+σd²)
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        c_out = sigma * SIGMA_DATA / math.sqrt(sigma**2 + SIGMA_DATA**2)
        c_out = -c_out if prediction_type == "v_prediction" else c_out
        return (exact_denoiser(x, sigma) - c_skip * x) / c_out

    x_start = start_noise(64)
    reference = EDMHeunScheduler(prediction_type="sample")
    reference.set_timesteps(6)
    x_ref, _ = run_heun(reference, x_start)

    scheduler = EDMHeunScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(6)
    x = x_start.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(f_network(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)


def test_one_step_matches_diffusers_edm_euler():
    """With one step Heun is a single Euler step to σ=0, so it must agree with EDMEulerScheduler."""
    sample = start_noise(8).float()
    model_output = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))
    ours, theirs = EDMHeunScheduler(), EDMEulerScheduler()
    ours.set_timesteps(1)
    theirs.set_timesteps(1)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)
    torch.testing.assert_close(
        ours.scale_model_input(sample, ours.timesteps[0]), theirs.scale_model_input(sample, theirs.timesteps[0])
    )
    torch.testing.assert_close(
        ours.step(model_output, ours.timesteps[0], sample).prev_sample,
        theirs.step(model_output, theirs.timesteps[0], sample).prev_sample,
    )


def test_sample_prediction_leaves_model_input_unscaled():
    scheduler = EDMHeunScheduler(prediction_type="sample")
    scheduler.set_timesteps(3)
    sample = torch.randn(2, 3)
    assert torch.equal(scheduler.scale_model_input(sample, scheduler.timesteps[0]), sample)
    assert scheduler.sigma_for_model_input == pytest.approx(SIGMA_MAX)


def test_churn_raises_sigma_as_in_edm_and_is_reproducible():
    s_churn, num_steps, s_tmin, s_tmax = 8.0, 8, 0.05, 50.0
    scheduler = EDMHeunScheduler(prediction_type="sample", s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=1.0)
    scheduler.set_timesteps(num_steps)
    gamma = min(s_churn / num_steps, math.sqrt(2) - 1)
    sigmas = karras_sigmas(num_steps)
    hats = [s * (1 + gamma) if s_tmin <= s <= s_tmax else s for s in sigmas[:-1]]
    first_order = list(range(0, 2 * num_steps - 1, 2))  # index of each step's first evaluation
    torch.testing.assert_close(
        scheduler.evaluation_sigmas[first_order].double(), torch.tensor(hats, dtype=torch.float64)
    )
    assert scheduler.init_noise_sigma == pytest.approx(hats[0])  # σ_max = 80 lies above s_tmax: no churn there

    x_start = start_noise(16)
    runs = []
    for seed in (0, 0, 1):
        scheduler.set_timesteps(num_steps)
        runs.append(run_heun(scheduler, x_start, generator=torch.Generator().manual_seed(seed))[0])
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_churn_keeps_the_target_distribution():
    # Churn adds discretization error of its own (5% on the std at 32 steps), so this uses a fine grid.
    scheduler = EDMHeunScheduler(prediction_type="sample", s_churn=80.0, s_tmin=0.01, s_tmax=10.0)
    scheduler.set_timesteps(128)
    x, _ = run_heun(scheduler, start_noise(20000), generator=torch.Generator().manual_seed(0))
    shrink = S / torch.sqrt(S**2 + SIGMA_MAX**2)
    target_std = SIGMA_MAX * shrink  # churn does not change the marginals of the exact process
    n = x.shape[0]
    assert torch.all((x.mean(0) - MU * (1 - shrink)).abs() < 5 * target_std / math.sqrt(n))
    assert torch.all((x.std(0) / target_std - 1).abs() < 5 / math.sqrt(2 * n) + 0.01)


def test_config_round_trip(tmp_path):
    scheduler = EDMHeunScheduler(sigma_max=14.6, rho=3.0, prediction_type="v_prediction", s_churn=1.0)
    scheduler.save_pretrained(tmp_path)
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.config) == public(scheduler.config)
    loaded.set_timesteps(4)
    assert float(loaded.sigmas[0]) == pytest.approx(14.6)


def test_add_noise_uses_sigma_of_the_timestep():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(4)
    x0, noise = torch.zeros(2, 3), torch.ones(2, 3)
    noisy = scheduler.add_noise(x0, noise, scheduler.timesteps[[0, 3]])
    torch.testing.assert_close(noisy[:, 0], scheduler.evaluation_sigmas[[0, 3]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"sigma_min": 1.0, "sigma_max": 0.5}, "sigma_min"),
        ({"sigma_data": 0.0}, "sigma_data"),
        ({"s_churn": -1.0}, "s_churn"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EDMHeunScheduler(**kwargs)


def test_bad_step_count_raises():
    with pytest.raises(ValueError, match="num_inference_steps"):
        EDMHeunScheduler().set_timesteps(0)


# ------------------------------------------------------------------------------------------------------------------
# Starting mid-schedule, compatible schedulers, float64 grid


def test_mid_schedule_start_without_begin_index_starts_a_step():
    """Without churn each inner σ appears twice (correction of step k−1, then step k): a loop that starts at
    timesteps[2k] must start step k, as diffusers' HeunDiscreteScheduler does, and solve the ODE from σ_k."""
    num_steps, k = 32, 8
    scheduler = EDMHeunScheduler(prediction_type="sample")
    scheduler.set_timesteps(num_steps)
    first_evaluations = list(range(2, 2 * num_steps - 1, 2))
    assert [scheduler.index_for_timestep(scheduler.timesteps[j]) for j in first_evaluations] == first_evaluations

    sigma_k = karras_sigmas(num_steps)[k]
    x_start = MU + start_noise(4000, sigma=sigma_k)
    x = x_start.clone()
    for t in scheduler.timesteps[2 * k :]:  # img2img style: no set_begin_index
        x = scheduler.step(exact_denoiser(scheduler.scale_model_input(x, t), scheduler.sigma_for_model_input), t, x)
        x = x.prev_sample
    # Exact solution of the probability-flow ODE from σ_k for the Gaussian toy data.
    exact = MU + (x_start - MU) * S / torch.sqrt(S**2 + sigma_k**2)
    assert (x - exact).abs().max() < 0.1  # measured 0.05; starting on step k−1's correction instead gives 1.8

    with_begin_index = EDMHeunScheduler(prediction_type="sample")
    with_begin_index.set_timesteps(num_steps)
    with_begin_index.set_begin_index(2 * k)
    y = x_start.clone()
    for t in with_begin_index.timesteps[2 * k :]:
        y = with_begin_index.step(exact_denoiser(y, with_begin_index.sigma_for_model_input), t, y).prev_sample
    assert torch.equal(x, y)


def test_a_loop_cannot_start_on_a_heun_correction():
    scheduler = EDMHeunScheduler(prediction_type="sample", s_churn=4.0)  # churn makes every first σ̂_i unique
    scheduler.set_timesteps(4)
    sample = start_noise(2)
    with pytest.raises(ValueError, match="Heun correction of step 0"):
        scheduler.step(sample, scheduler.timesteps[1], sample)
    with pytest.raises(ValueError, match="Heun correction of step 1"):
        scheduler.set_begin_index(3)
    with pytest.raises(ValueError, match="start index"):
        scheduler.set_begin_index(7)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        scheduler.scale_model_input(sample, 0.0)


def test_compatible_edm_schedulers_round_trip_the_config():
    scheduler = EDMHeunScheduler(sigma_max=14.6, rho=3.0, prediction_type="v_prediction")
    assert {c.__name__ for c in scheduler.compatibles} == {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}
    for compatible in scheduler.compatibles:
        other = compatible.from_config(scheduler.config)
        for key in ("sigma_min", "sigma_max", "sigma_data", "rho", "prediction_type"):
            assert other.config[key] == scheduler.config[key], (compatible.__name__, key)
        back = EDMHeunScheduler.from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config)


def test_step_sigmas_are_the_float64_grid():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(5)
    expected = karras_sigmas(5)
    step_sigmas = scheduler.evaluation_step_sigmas
    assert step_sigmas.dtype == torch.float64
    steps = [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert step_sigmas.tolist() == pytest.approx([expected[i] for i in steps], rel=1e-15)
