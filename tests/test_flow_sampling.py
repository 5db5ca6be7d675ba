"""FlowScheduler and flow models in ClassConditionalPipeline: the Gaussian closed form, REPA's samplers, guidance."""

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

import diffusers_speedup
from diffusers_speedup.hub.export import export_pipeline
from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline
from diffusers_speedup.schedulers import scheduling_flow
from diffusers_speedup.schedulers.scheduling_flow import FlowScheduler
from tests.tiny_models import perturb, tiny_dit

NUM_CLASSES = 10  # tiny_dit's label table; the null label is 10 (REPA hard-codes ImageNet's 1000)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------------
# A model with a known exact velocity field


def gaussian_path(t, path):
    t = torch.as_tensor(t, dtype=torch.float64)
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    half_pi = math.pi / 2
    return (
        torch.cos(half_pi * t),
        torch.sin(half_pi * t),
        -half_pi * torch.sin(half_pi * t),
        half_pi * torch.cos(half_pi * t),
    )


class GaussianVelocityModel(ModelMixin, ConfigMixin):
    """Test-only DiT stand-in: the exact velocity E[α̇·x0 + σ̇·ε | x_t] of x0 ~ N(mean_c, s²) per pixel, called as
    `model(x_t, t, class_labels)` with t ∈ [0, 1] (t = 1 noise). Class c has mean c + 1; the null label has mean 0."""

    @register_to_config
    def __init__(
        self, num_classes: int = 3, in_channels: int = 2, sample_size: int = 4, data_std: float = 0.5, path="linear"
    ):
        super().__init__()
        means = torch.arange(num_classes + 1, dtype=torch.float64) + 1
        means[num_classes] = 0.0
        self.register_buffer("class_means", means)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states, timestep, class_labels=None):
        alpha, sigma, d_alpha, d_sigma = (c.view(-1, 1, 1, 1) for c in gaussian_path(timestep, self.config.path))
        mean = self.class_means[class_labels].view(-1, 1, 1, 1)
        s2 = self.config.data_std**2
        x = hidden_states.double()
        variance = alpha**2 * s2 + sigma**2
        x0 = mean + alpha * s2 / variance * (x - alpha * mean)
        eps = sigma / variance * (x - alpha * mean)
        return BaseOutput(sample=(d_alpha * x0 + d_sigma * eps).to(hidden_states.dtype))


def sample_with(model, scheduler, noise, labels, steps, generator=None):
    """Drives the scheduler alone, in float64, one `step` per entry of `timesteps`."""
    scheduler.set_timesteps(steps)
    x = noise.double()
    for t in scheduler.timesteps:
        v = model(x, t.double().expand(len(x)), labels).sample
        x = scheduler.step(v, t, x, generator=generator).prev_sample
    return x


def test_euler_and_heun_solve_the_gaussian_ode_at_their_order():
    # The exact probability-flow map of N(0, 1) at t = 1 onto N(μ, s²) at t = 0 is x0 = μ + s·x1, sample by sample.
    model = GaussianVelocityModel()
    labels = torch.tensor([0, 1, 2, 0])
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = (labels + 1).view(-1, 1, 1, 1) + 0.5 * noise

    def error(sampler, steps):
        return (sample_with(model, FlowScheduler(sampler=sampler), noise, labels, steps) - exact).abs().max().item()

    assert error("euler", 1000) < 3e-3
    assert error("euler", 20) / error("euler", 40) == pytest.approx(2, rel=0.1)  # first order
    assert error("heun", 80) < 5e-4
    assert error("heun", 20) / error("heun", 40) == pytest.approx(4, rel=0.15)  # second order


@pytest.mark.parametrize(
    "path, diffusion_form", [("linear", "sigma"), ("gvp", "sigma"), ("gvp", "time")], ids=lambda v: v
)
def test_euler_maruyama_reaches_the_gaussian_distribution(path, diffusion_form):
    # The reverse SDE with the score taken from the velocity through the path samples N(μ, s²) for any w_t.
    model = GaussianVelocityModel(path=path)
    scheduler = FlowScheduler(sampler="euler_maruyama", path=path, diffusion_form=diffusion_form)
    labels = torch.tensor([1] * 250)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(250, 2, 4, 4, generator=generator, dtype=torch.float64)
    samples = sample_with(model, scheduler, noise, labels, 200, generator=generator)
    assert samples.mean().item() == pytest.approx(2.0, abs=0.02)
    assert samples.std().item() == pytest.approx(0.5, abs=0.02)


def test_grids_are_the_official_ones():
    euler, heun, sde = FlowScheduler(), FlowScheduler(sampler="heun"), FlowScheduler(sampler="euler_maruyama")
    for scheduler in (euler, heun, sde):
        scheduler.set_timesteps(5)
    assert torch.equal(euler.time_grid, torch.linspace(1, 0, 6, dtype=torch.float64))
    assert torch.equal(euler.timesteps, torch.linspace(1, 0, 6, dtype=torch.float64)[:5].float())
    # Heun: a correction at the end of every step but the last, which REPA takes with Euler alone.
    assert len(heun) == 9 and heun.timesteps[1] == heun.timesteps[2] == pytest.approx(0.8)
    assert heun.evaluation_step_times.tolist() == pytest.approx([1, 1, 0.8, 0.8, 0.6, 0.6, 0.4, 0.4, 0.2])
    # Euler–Maruyama: linspace(1, 0.04, N), then the mean step to 0.
    expected = torch.cat([torch.linspace(1, 0.04, 5, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    assert torch.equal(sde.time_grid, expected) and len(sde) == 5
    assert sde.init_noise_sigma == 1.0


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_maruyama"])
@pytest.mark.parametrize("shift", [3.0, 1 / 0.3, 0.5])
def test_shift_warps_every_grid_by_sd3s_closed_form(sampler, shift):
    plain, shifted = FlowScheduler(sampler=sampler), FlowScheduler(sampler=sampler, shift=shift)
    plain.set_timesteps(7)
    shifted.set_timesteps(7)
    t = plain.time_grid
    expected = shift * t / (1 + (shift - 1) * t)  # SD3 §5.3.2; diffusers' FlowMatchEulerDiscreteScheduler(shift=s)
    torch.testing.assert_close(shifted.time_grid, expected, rtol=1e-15, atol=1e-15)
    assert shifted.time_grid[0] == 1 and shifted.time_grid[-1] == 0  # the ends stay exact
    assert len(shifted) == len(plain)
    torch.testing.assert_close(shifted.evaluation_step_times, expected[plain.evaluation_step_indices])


def test_shift_is_lightningdits_timestep_shift_seen_from_the_other_end():
    # hustvl/LightningDiT transport/integrators.py ode: t = linspace(0, 1, N) in SiT's time (1 = data), then
    # t_m = c·t_n / (1 + (c − 1)·t_n) with timestep_shift c; 250 points make 249 Euler steps. (The official grid is
    # float32; the identity is checked in float64 here, the float32 trajectory in test_convert_lightningdit.)
    c, points = 0.3, 250
    t_sit = torch.linspace(0, 1, points, dtype=torch.float64)
    t_sit = torch.stack([c * t_n / (1 + (c - 1) * t_n) for t_n in t_sit])
    scheduler = FlowScheduler(shift=1 / c)
    scheduler.set_timesteps(points - 1)
    torch.testing.assert_close(scheduler.time_grid, 1 - t_sit, rtol=0, atol=1e-15)


def test_shift_one_leaves_the_grids_bit_identical():
    for sampler in ("euler", "heun", "euler_maruyama"):
        default, explicit = FlowScheduler(sampler=sampler), FlowScheduler(sampler=sampler, shift=1.0)
        default.set_timesteps(9)
        explicit.set_timesteps(9)
        assert torch.equal(default.time_grid, explicit.time_grid)
    assert torch.equal(FlowScheduler().time_grid, torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shift=0.0), "shift"),
        (dict(shift=float("inf")), "shift"),
        (dict(shift=True), "shift"),
        (dict(sampler="dopri5"), "sampler"),
        (dict(path="vp"), "path"),
        (dict(prediction_type="epsilon"), "velocity"),
        (dict(diffusion_form="SBDM"), "diffusion_form"),
        (dict(last_step_size=0.0), "last_step_size"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowScheduler(**kwargs)


# ------------------------------------------------------------------------------------------------------------------
# REPA's samplers (sihyun-yu/REPA, samplers.py), written out from the official code; `model(x, t, y)[0]` is the
# velocity, `y_null` the null label, and torch.randn_like(x_cur) draws from an explicit generator.


def repa_score_from_velocity(vt, xt, t, path_type):
    t = t.view(t.size(0), *([1] * (xt.dim() - 1)))
    if path_type == "linear":
        alpha_t, d_alpha_t = 1 - t, torch.ones_like(xt) * -1
        sigma_t, d_sigma_t = t, torch.ones_like(xt)
    else:  # "cosine"
        alpha_t, sigma_t = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        d_alpha_t, d_sigma_t = -math.pi / 2 * torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)
    reverse_alpha_ratio = alpha_t / d_alpha_t
    var = sigma_t**2 - reverse_alpha_ratio * d_sigma_t * sigma_t
    return (reverse_alpha_ratio * vt - xt) / var


def repa_euler_sampler(model, latents, y, num_steps, heun, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0):
    y_null = torch.full_like(y, NUM_CLASSES)
    _dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)

    def velocity(x, t_eval, t_cur):
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        model_input, y_cur = (torch.cat([x] * 2), torch.cat([y, y_null])) if guided else (x, y)
        time_input = torch.ones(model_input.size(0), dtype=torch.float64) * t_eval
        d = model(model_input.to(_dtype), time_input.to(_dtype), y_cur)[0].to(torch.float64)
        if guided:
            d_cond, d_uncond = d.chunk(2)
            d = d_uncond + cfg_scale * (d_cond - d_uncond)
        return d

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = velocity(x_cur, t_cur, t_cur)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_prime = velocity(x_next, t_next, t_cur)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def repa_euler_maruyama_sampler(
    model, latents, y, num_steps, generator, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, path_type="linear"
):
    y_null = torch.full_like(y, NUM_CLASSES)
    _dtype = latents.dtype
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)])
    x_next = latents.to(torch.float64)

    def drift(x_cur, t_cur, diffusion):
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        model_input, y_cur = (torch.cat([x_cur] * 2), torch.cat([y, y_null])) if guided else (x_cur, y)
        time_input = torch.ones(model_input.size(0), dtype=torch.float64) * t_cur
        v_cur = model(model_input.to(_dtype), time_input.to(_dtype), y_cur)[0].to(torch.float64)
        s_cur = repa_score_from_velocity(v_cur, model_input, time_input, path_type)
        d_cur = v_cur - 0.5 * diffusion * s_cur
        if guided:
            d_cur_cond, d_cur_uncond = d_cur.chunk(2)
            d_cur = d_cur_uncond + cfg_scale * (d_cur_cond - d_cur_uncond)
        return d_cur

    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt = t_next - t_cur
        x_cur = x_next
        diffusion = 2 * t_cur  # REPA's compute_diffusion
        eps_i = torch.randn(x_cur.shape, generator=generator, dtype=x_cur.dtype)
        deps = eps_i * torch.sqrt(torch.abs(dt))
        d_cur = drift(x_cur, t_cur, diffusion)
        x_next = x_cur + d_cur * dt + torch.sqrt(diffusion) * deps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    return x_next + (t_next - t_cur) * drift(x_next, t_cur, 2 * t_cur)


def tiny_flow_dit():
    return perturb(tiny_dit(out_channels=4)).eval()


def as_repa_model(network):
    return lambda x, t, y: (network(x, t, y).sample,)


def flow_pipe(scheduler, network=None, guide=None):
    pipe = ClassConditionalPipeline(transformer=network or tiny_flow_dit(), scheduler=scheduler, guide=guide)
    pipe.set_progress_bar_config(disable=True)
    return pipe


LABELS = torch.tensor([3, 7])


def noise_for(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_ode_scheduler_follows_repa_euler_sampler_to_float64_precision(sampler):
    network, noise = tiny_flow_dit(), noise_for()
    with torch.no_grad():
        ours = sample_with(
            lambda x, t, y: network(x.float(), t.float(), y), FlowScheduler(sampler=sampler), noise, LABELS, 7
        )
        official = repa_euler_sampler(as_repa_model(network), noise, LABELS, 7, heun=sampler == "heun")
    assert (ours - official).abs().max().item() < 1e-12


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_sde_scheduler_follows_repa_euler_maruyama_sampler_to_float64_precision(path):
    network, noise = tiny_flow_dit(), noise_for()
    scheduler = FlowScheduler(sampler="euler_maruyama", path=path, diffusion_form="time")
    with torch.no_grad():
        ours = sample_with(
            lambda x, t, y: network(x.float(), t.float(), y),
            scheduler,
            noise,
            LABELS,
            6,
            generator=torch.Generator().manual_seed(5),
        )
        official = repa_euler_maruyama_sampler(
            as_repa_model(network), noise, LABELS, 6, torch.Generator().manual_seed(5), path_type=path
        )
    assert (ours - official).abs().max().item() < 1e-12


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_maruyama"])
def test_pipeline_follows_repa_with_guidance_interval(sampler):
    # REPA's 1.42 setting in miniature: cfg only where t <= guidance_high.
    network, noise = tiny_flow_dit(), noise_for()
    pipe = flow_pipe(FlowScheduler(sampler=sampler), network)
    images = pipe(
        LABELS,
        num_inference_steps=6,
        guidance_scale=1.8,
        guidance_interval=(0.0, 0.7),
        latents=noise,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
    ).images
    model = as_repa_model(network)
    with torch.no_grad():
        if sampler == "euler_maruyama":
            official = repa_euler_maruyama_sampler(
                model, noise, LABELS, 6, torch.Generator().manual_seed(5), 1.8, 0.0, 0.7
            )
        else:
            official = repa_euler_sampler(model, noise, LABELS, 6, sampler == "heun", 1.8, 0.0, 0.7)
    # The pipeline keeps float32 latents between evaluations; REPA keeps float64.
    assert (images.double() - official).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------------------------
# The pipeline


class CallCounter:
    def __init__(self, module):
        self.calls, self.rows = 0, 0
        module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs["hidden_states"]
        self.calls += 1
        self.rows += sample.shape[0]


@pytest.mark.parametrize(
    "sampler, steps, expected_guided",
    [
        ("euler", 10, 7),  # t = 0.7, 0.6, ..., 0.1: the end t = 0.7 on the grid is guided, as REPA's t <= 0.7
        ("heun", 10, 13),  # both evaluations of each of those 7 steps, but one for the last (Euler) step
        ("euler_maruyama", 25, 17),  # linspace(1, 0.04, 25) has t = 0.68 ... 0.04 below 0.7
    ],
)
def test_guidance_interval_in_flow_time_counts_evaluations_exactly(sampler, steps, expected_guided):
    pipe = flow_pipe(FlowScheduler(sampler=sampler))
    counter = CallCounter(pipe.transformer)
    pipe(LABELS, num_inference_steps=steps, guidance_scale=2.0, guidance_interval=(0, 0.7), output_type="latent")
    evaluations = len(pipe.scheduler.timesteps)
    times = pipe.scheduler.evaluation_step_times
    assert int(((times > 0) & (times <= 0.7 + 1e-9)).sum()) == expected_guided
    assert counter.calls == evaluations
    assert counter.rows == 2 * (evaluations + expected_guided)


def test_flow_match_euler_discrete_drives_a_flow_model_and_equals_our_euler():
    # With num_train_timesteps = N its grid is linspace(1, 1/N, N) and 0, i.e. REPA's linspace(1, 0, N + 1);
    # its timesteps are t·N, and the model must get t.
    network, noise = tiny_flow_dit(), noise_for()
    seen = []
    network.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"][0].item()), with_kwargs=True
    )
    kwargs = dict(num_inference_steps=8, guidance_scale=1.5, latents=noise, output_type="latent")
    theirs = flow_pipe(FlowMatchEulerDiscreteScheduler(num_train_timesteps=8), network)(LABELS, **kwargs).images
    assert seen == pytest.approx([1 - i / 8 for i in range(8)], abs=1e-6)
    ours = flow_pipe(FlowScheduler(), network)(LABELS, **kwargs).images
    assert (ours - theirs).abs().max().item() < 1e-5


def test_flow_match_euler_discrete_guidance_interval_is_in_t():
    pipe = flow_pipe(FlowMatchEulerDiscreteScheduler(num_train_timesteps=10))
    counter = CallCounter(pipe.transformer)
    pipe(LABELS, num_inference_steps=10, guidance_scale=2.0, guidance_interval=(0.25, 0.6), output_type="latent")
    assert counter.rows == 2 * (10 + 4)  # t = 0.6, 0.5, 0.4, 0.3


def test_guidance_applies_to_the_velocity_and_solves_the_guided_gaussian():
    # Guiding the exact velocities of two Gaussians of equal std gives the velocity field of N(μ_g, s²) with
    # μ_g = μ_null + w·(μ_c − μ_null), so Heun lands on μ_g + s·x1.
    pipe = flow_pipe(FlowScheduler(sampler="heun"), GaussianVelocityModel())
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    images = pipe([0, 2], num_inference_steps=100, guidance_scale=1.5, latents=noise, output_type="latent").images
    exact = 1.5 * torch.tensor([1.0, 3.0]).view(-1, 1, 1, 1) + 0.5 * noise
    assert (images - exact).abs().max().item() < 1e-3


def test_guide_network_replaces_the_null_label():
    network, guide = tiny_flow_dit(), perturb(tiny_dit(out_channels=4), seed=2).eval()
    pipe = flow_pipe(FlowScheduler(), network, guide=guide)
    counter, guide_counter = CallCounter(network), CallCounter(guide)
    noise = noise_for()
    images = pipe(LABELS, num_inference_steps=4, guidance_scale=2.0, latents=noise, output_type="latent").images
    assert counter.rows == 4 * 2 and guide_counter.rows == 4 * 2  # no null-label rows
    x = noise.double()
    with torch.no_grad():
        for t in torch.linspace(1, 0, 5, dtype=torch.float64)[:-1]:
            time = torch.full((2,), float(t))
            cond, reference = (net(x.float(), time, LABELS).sample.double() for net in (network, guide))
            x = (x + (-0.25) * (reference + 2.0 * (cond - reference))).float().double()
    assert (images.double() - x).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "scheduler, match",
    [
        (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "use_dynamic_shifting"),
        (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
    ],
    ids=["dynamic_shifting", "invert_sigmas"],
)
def test_unsupported_flow_match_settings_raise_before_any_network_call(scheduler, match):
    pipe = flow_pipe(scheduler)
    counter = CallCounter(pipe.transformer)
    with pytest.raises(ValueError, match=match):
        pipe(LABELS, num_inference_steps=2)
    assert counter.calls == 0


def test_flow_scheduler_needs_the_transformer_slot():
    from tests.tiny_models import tiny_edm2

    pipe = ClassConditionalPipeline(unet=tiny_edm2(), scheduler=FlowScheduler())
    with pytest.raises(ValueError, match="transformer slot"):
        pipe([0], num_inference_steps=2)


# ------------------------------------------------------------------------------------------------------------------
# Export and the package


def test_export_ships_the_scheduler_file_and_reloads(tmp_path):
    pipe = flow_pipe(FlowScheduler(sampler="euler_maruyama", path="gvp"))
    out = export_pipeline(pipe, tmp_path / "export", card_info={"model_name": "tiny-flow"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["scheduling_flow", "FlowScheduler"]
    shipped = (out / "scheduler" / "scheduling_flow.py").read_text()
    assert shipped == open(scheduling_flow.__file__).read()
    loaded = ClassConditionalPipeline.from_pretrained(out)
    assert type(loaded.scheduler) is FlowScheduler
    assert loaded.scheduler.config.sampler == "euler_maruyama" and loaded.scheduler.config.path == "gvp"


def test_package_exports_and_shipped_file_imports():
    assert diffusers_speedup.FlowScheduler is FlowScheduler
    assert diffusers_speedup.schedulers.FlowScheduler is FlowScheduler
    imports = [
        line for line in open(scheduling_flow.__file__).read().splitlines() if line.startswith(("import ", "from "))
    ]
    roots = {line.split()[1].split(".")[0] for line in imports}
    assert roots <= {"diffusers", "torch", "math", "collections", "dataclasses"}, roots
