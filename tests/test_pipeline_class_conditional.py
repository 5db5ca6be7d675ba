"""ClassConditionalPipeline: DiT-layout loading, limited-interval guidance, the σ-conditioned unet route, export routes."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMInverseScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ModelMixin,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

import diffusers_speedup
from diffusers_speedup.pipelines import pipeline_class_conditional
from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline
from diffusers_speedup.schedulers import scheduling_edm_heun
from diffusers_speedup.schedulers.scheduling_edm_heun import EDMHeunScheduler

NUM_CLASSES = 1000  # DiT's ImageNet table; the null label is 1000
SIGMA_MAX, SIGMA_MIN, RHO = 80.0, 0.002, 7.0


def karras_sigmas(n):
    hi, lo = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return [(hi + (i / max(n - 1, 1)) * (lo - hi)) ** RHO for i in range(n)]


# ------------------------------------------------------------------------------------------------------------------
# Tiny models


def tiny_dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned σ, like DiT-XL/2
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
    )


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine run several times faster without intra-op threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A tiny model saved exactly as diffusers' DiTPipeline saves it, plus DiT's id2label in model_index.json."""
    folder = tmp_path_factory.mktemp("dit") / "tiny-dit"
    DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(folder)
    model_index = json.loads((folder / "model_index.json").read_text())
    model_index["id2label"] = {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus", "2": "great white shark"}
    (folder / "model_index.json").write_text(json.dumps(model_index))
    return folder


@pytest.fixture
def pipe(dit_folder):
    pipe = ClassConditionalPipeline.from_pretrained(dit_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class GaussianClassDenoiser(ModelMixin, ConfigMixin):
    """Test-only stand-in for EDM2UNetModel: the exact denoiser of x0 ~ N(mean_c, s²), called with raw x and σ."""

    input_is_sigma = True

    @register_to_config
    def __init__(self, num_classes: int = 3, in_channels: int = 2, sample_size: int = 4, data_std: float = 0.5):
        super().__init__()
        # Class c has mean c+1; the null label (= num_classes) has mean 0.
        self.register_buffer("class_means", torch.arange(num_classes + 1, dtype=torch.float32) + 1)
        self.class_means[num_classes] = 0.0
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives ModelMixin a dtype and device

    def forward(self, sample, sigma, class_labels=None):
        mean = self.class_means[class_labels].view(-1, 1, 1, 1)
        s2 = self.config.data_std**2
        return BaseOutput(sample=mean + s2 / (s2 + sigma.view(-1, 1, 1, 1) ** 2) * (sample - mean))


class GaussianClassEpsModel(ModelMixin, ConfigMixin):
    """Test-only stand-in for a DiT-like ε-model: the exact E[ε | x_t] of x0 ~ N(mean_c, s²) under DiT's linear β
    schedule, called as `model(x_t, timestep, class_labels)`; fractional timesteps interpolate σ_t linearly, as
    diffusers' k-diffusion schedulers do. Labels 0..num_classes−1 have means `mean_scale`·(c+1); the null label has
    mean 0, and so does an unconditional model (num_classes = 0, called without labels)."""

    @register_to_config
    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 2,
        sample_size: int = 4,
        data_std: float = 0.5,
        mean_scale: float = 1.0,
    ):
        super().__init__()
        alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
        self.register_buffer("sigma_table", torch.tensor(np.sqrt((1 - alphas_cumprod) / alphas_cumprod)))
        means = mean_scale * (torch.arange(num_classes + 1, dtype=torch.float64) + 1)
        means[num_classes] = 0.0
        self.register_buffer("class_means", means)
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives ModelMixin a dtype and device

    def forward(self, hidden_states, timestep, class_labels=None):
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).clamp(0, 999)
        low = t.floor().long().clamp(max=998)
        sigma = torch.lerp(self.sigma_table[low], self.sigma_table[low + 1], t - low).view(-1, 1, 1, 1)
        alpha_bar = 1 / (1 + sigma**2)
        if class_labels is None:
            mean = torch.zeros(hidden_states.shape[0], 1, 1, 1, dtype=torch.float64)
        else:
            mean = self.class_means[class_labels].view(-1, 1, 1, 1)
        s2 = self.config.data_std**2
        x = hidden_states.double()
        eps = (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * mean) / (alpha_bar * s2 + 1 - alpha_bar)
        return BaseOutput(sample=eps.float())


class CallCounter:
    """Counts network calls and the batch rows they process (a guided evaluation costs twice the rows)."""

    def __init__(self, module):
        self.calls, self.rows = 0, 0
        module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        self.calls += 1
        self.rows += sample.shape[0]


def run(pipe, labels=(1, 2), **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(list(labels), **kwargs).images


# ------------------------------------------------------------------------------------------------------------------
# DiT layout, outputs, saving


def test_loads_dit_layout_unchanged_and_matches_dit_pipeline(dit_folder, pipe):
    assert isinstance(pipe.transformer, DiTTransformer2DModel) and pipe.unet is None
    assert isinstance(pipe.scheduler, DDIMScheduler) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.get_label_ids(["goldfish", "Carassius auratus", "great white shark"]) == [1, 1, 2]

    dit = DiTPipeline.from_pretrained(dit_folder)
    dit.set_progress_bar_config(disable=True)
    for scale in (1.0, 3.0):  # DiTPipeline guides the first (ε) half only, with the null label 1000
        expected = dit([1, 2], guidance_scale=scale, num_inference_steps=4, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        ours = run(pipe, guidance_scale=scale, output_type="np")
        np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_output_types(pipe):
    latents = run(pipe, output_type="latent")
    assert latents.shape == (2, 4, 8, 8)
    images = run(pipe, output_type="pt")
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    array = run(pipe, output_type="np")
    assert array.shape == (2, 16, 16, 3) and array.dtype == np.float32
    np.testing.assert_allclose(array, images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = run(pipe, output_type="pil")
    assert len(pil) == 2 and pil[0].size == (16, 16)
    (as_tuple,) = pipe([1], num_inference_steps=2, output_type="pt", return_dict=False)
    assert as_tuple.shape == (1, 3, 16, 16)


def test_class_names_and_ids_give_the_same_samples(pipe):
    assert torch.equal(run(pipe, labels=["goldfish", "great white shark"]), run(pipe, labels=[1, 2]))


def test_save_and_reload_round_trip(pipe, tmp_path):
    pipe.scheduler = EDMHeunScheduler()
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["_class_name"] == "ClassConditionalPipeline"
    assert model_index["unet"] == [None, None] and model_index["vae"] == ["diffusers", "AutoencoderKL"]
    assert model_index["id2label"]["1"] == "goldfish, Carassius auratus"
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler).__name__ == "EDMHeunScheduler" and loaded.labels == pipe.labels
    assert torch.equal(run(loaded, guidance_scale=2.0), run(pipe, guidance_scale=2.0))


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(),
        DPMSolverMultistepScheduler(),
        EDMEulerScheduler(),
        EDMDPMSolverMultistepScheduler(),
        EDMHeunScheduler(prediction_type="v_prediction"),
        EulerDiscreteScheduler(timestep_type="continuous"),  # continuous only changes v-prediction timesteps
    ],
    ids=lambda s: type(s).__name__,
)
def test_every_supported_scheduler_samples(pipe, scheduler):
    pipe.scheduler = scheduler
    latents = run(pipe, guidance_scale=2.0, guidance_interval=(0.5, 5.0))
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()


def test_ddpm_with_learned_range_samples_with_the_conditional_learned_variance(pipe):
    """Reference: DiT's sampler written out here: guidance on the ε half, the conditional variance kept."""
    scale, noise = 3.0, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pipe.scheduler = DDPMScheduler(variance_type="learned_range")
    ours = run(pipe, latents=noise, guidance_scale=scale, generator=torch.Generator().manual_seed(4))
    pipe.scheduler = DDPMScheduler(variance_type="fixed_small")
    fixed = run(pipe, latents=noise, guidance_scale=scale, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(ours, fixed, atol=1e-3)

    reference = DDPMScheduler(variance_type="learned_range")
    reference.set_timesteps(4)
    generator, x, labels = torch.Generator().manual_seed(4), noise.clone(), torch.tensor([1, 2])
    with torch.no_grad():
        for t in reference.timesteps:
            timestep = torch.full((2,), int(t))
            cond = pipe.transformer(x, timestep=timestep, class_labels=labels).sample
            uncond = pipe.transformer(x, timestep=timestep, class_labels=torch.full_like(labels, NUM_CLASSES)).sample
            eps = uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4])
            x = reference.step(torch.cat([eps, cond[:, 4:]], dim=1), t, x, generator=generator).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_learned_range_needs_a_model_that_outputs_its_variance():
    transformer = tiny_dit()
    transformer.register_to_config(out_channels=4)
    pipe = ClassConditionalPipeline(transformer=transformer, scheduler=DDPMScheduler(variance_type="learned_range"))
    counter = CallCounter(transformer)
    with pytest.raises(ValueError, match="out_channels = 2 × in_channels"):
        pipe([0], num_inference_steps=2)
    assert counter.calls == 0


def test_hub_id_is_downloaded_first(dit_folder, monkeypatch):
    import huggingface_hub

    requested = {}

    def fake_snapshot_download(repo_id, **kwargs):
        requested.update(repo_id=repo_id, **kwargs)
        return str(dit_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = ClassConditionalPipeline.from_pretrained("org/tiny-dit", revision="v1")
    assert requested["repo_id"] == "org/tiny-dit" and requested["revision"] == "v1"
    assert loaded.config._name_or_path == "org/tiny-dit"


# ------------------------------------------------------------------------------------------------------------------
# Limited-interval guidance


def test_guidance_interval_counts_evaluations_exactly_with_heun(pipe):
    pipe.scheduler = EDMHeunScheduler()
    sigmas = karras_sigmas(5)
    counter = CallCounter(pipe.transformer)
    # (σ_3, σ_1] holds steps 1 and 2; each Heun step has two evaluations, so 4 of 9 evaluations are guided.
    run(pipe, num_inference_steps=5, guidance_scale=3.0, guidance_interval=(sigmas[3] * 1.001, sigmas[1] * 1.001))
    assert counter.calls == 9
    assert counter.rows == 2 * 9 + 2 * 4


def test_guidance_interval_counts_evaluations_exactly_with_ddim(pipe):
    counter = CallCounter(pipe.transformer)
    pipe.scheduler.set_timesteps(10)
    timesteps = pipe.scheduler.timesteps.tolist()
    # σ from DiT's linear β schedule, computed here independently of the pipeline.
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1 - betas)
    sigmas = [math.sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]) for t in timesteps]
    lo, hi = 0.5, 3.0
    expected_guided = sum(lo < s <= hi for s in sigmas)
    assert 0 < expected_guided < len(timesteps)
    run(pipe, num_inference_steps=10, guidance_scale=3.0, guidance_interval=(lo, hi))
    assert counter.calls == 10
    assert counter.rows == 2 * 10 + 2 * expected_guided


def test_interval_covering_everything_equals_plain_cfg_bit_for_bit(pipe):
    pipe.scheduler = EDMHeunScheduler()
    plain = run(pipe, guidance_scale=3.0)
    everything = run(pipe, guidance_scale=3.0, guidance_interval=(0.0, float("inf")))
    assert torch.equal(plain, everything)


def test_guidance_scale_one_is_unguided(pipe):
    pipe.scheduler = EDMHeunScheduler()
    counter = CallCounter(pipe.transformer)
    scale_one = run(pipe, guidance_scale=1.0)
    assert counter.rows == 2 * 7  # no unconditional pass at all
    empty_interval = run(pipe, guidance_scale=4.0, guidance_interval=(1000.0, 1000.0))
    assert torch.equal(scale_one, empty_interval)


def test_limited_interval_matches_a_hand_written_sampler(pipe):
    """Reference: EDM Heun written out here, with separate cond/uncond calls and the step-σ guidance rule."""
    num_steps, scale, (lo, hi) = 4, 2.5, (0.3, 20.0)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 2])
    pipe.scheduler = EDMHeunScheduler()
    ours = run(pipe, latents=noise, num_inference_steps=num_steps, guidance_scale=scale, guidance_interval=(lo, hi))

    sigma_data = 0.5

    def denoise(x, sigma, class_labels):
        c_in = 1 / math.sqrt(sigma**2 + sigma_data**2)
        t = torch.full((x.shape[0],), 0.25 * math.log(sigma))
        f = pipe.transformer(x * c_in, timestep=t, class_labels=class_labels).sample[:, :4]
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        return c_skip * x + sigma * sigma_data / math.sqrt(sigma**2 + sigma_data**2) * f

    def guided_denoise(x, sigma, guide):
        cond = denoise(x, sigma, labels)
        if not guide:
            return cond
        uncond = denoise(x, sigma, torch.full_like(labels, NUM_CLASSES))
        return uncond + scale * (cond - uncond)

    sigmas = karras_sigmas(num_steps) + [0.0]
    x = noise * sigmas[0]
    with torch.no_grad():
        for i in range(num_steps):
            guide = lo < sigmas[i] <= hi
            d = (x - guided_denoise(x, sigmas[i], guide)) / sigmas[i]
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
            if sigmas[i + 1] > 0:
                d_next = (x_next - guided_denoise(x_next, sigmas[i + 1], guide)) / sigmas[i + 1]
                x_next = x + (sigmas[i + 1] - sigmas[i]) * (d + d_next) / 2
            x = x_next
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_callback_sees_every_step(pipe):
    pipe.scheduler = EDMHeunScheduler()
    seen = []

    def callback(pipeline, i, t, callback_kwargs):
        seen.append(i)
        assert callback_kwargs["latents"].shape == (2, 4, 8, 8)
        return {}

    run(pipe, num_inference_steps=3, callback_on_step_end=callback)
    assert seen == list(range(5))


# ------------------------------------------------------------------------------------------------------------------
# σ-conditioned unet route (EDM2UNetModel's contract)


@pytest.mark.parametrize("scheduler_class", [EDMHeunScheduler, EDMEulerScheduler])
def test_unet_route_solves_the_gaussian_ode(scheduler_class, tmp_path):
    unet = GaussianClassDenoiser()
    pipe = ClassConditionalPipeline(unet=unet, scheduler=scheduler_class(prediction_type="sample"))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = pipe([0, 1, 2], latents=noise, num_inference_steps=32, guidance_scale=1.0, output_type="latent").images
    # Exact probability-flow solution from σ_max: mean_c + (σ_max·z − mean_c)·s/√(s²+σ_max²).
    means, s = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1), 0.5
    exact = means + (SIGMA_MAX * noise - means) * s / math.sqrt(s**2 + SIGMA_MAX**2)
    tolerance = 0.05 if scheduler_class is EDMHeunScheduler else 0.3  # Euler is first order
    assert (out - exact).abs().max() < tolerance

    # Pixel-space pipeline without a vae saves and reloads (vae is an optional component).
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]


def test_unet_route_guidance_uses_the_null_label():
    pipe = ClassConditionalPipeline(unet=GaussianClassDenoiser(), scheduler=EDMHeunScheduler(prediction_type="sample"))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.zeros(1, 2, 4, 4)  # start at the origin: the result is (almost) the guided mean
    out = pipe([1], latents=noise, num_inference_steps=32, guidance_scale=2.0, output_type="latent").images
    # D̂ = D_null + w·(D_c − D_null) is the denoiser of N(w·mean_c + (1−w)·0, s²) = N(4, s²) for class 1 (mean 2).
    assert out.mean().item() == pytest.approx(4.0 * (1 - 0.5 / math.sqrt(0.25 + SIGMA_MAX**2)), abs=2e-3)


# ------------------------------------------------------------------------------------------------------------------
# Bad input fails before any network evaluation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_labels": [1, NUM_CLASSES]}, "out of range"),
        ({"class_labels": [-1]}, "out of range"),
        ({"class_labels": ["no such class"]}, "Unknown class label"),
        ({"class_labels": []}, "empty"),
        ({"guidance_interval": (2.0, 1.0)}, "sigma_lo <= sigma_hi"),
        ({"guidance_interval": (-1.0, 1.0)}, "sigma_lo <= sigma_hi"),
        ({"guidance_interval": (1.0,)}, "pair"),
        ({"output_type": "jpg"}, "output_type"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, "latents must have shape"),
    ],
)
def test_bad_input_raises_before_any_network_call(pipe, kwargs, match):
    counter = CallCounter(pipe.transformer)
    kwargs = {"class_labels": [1, 2], "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)
    assert counter.calls == 0


@pytest.mark.parametrize(
    "scheduler, match",
    [
        (FlowMatchHeunDiscreteScheduler(), "Unsupported scheduler FlowMatchHeunDiscreteScheduler: it has no alphas"),
        (DDIMInverseScheduler(), "DDIMInverseScheduler cannot drive .*inversion"),
        (EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction"), "timestep_type"),
        (DPMSolverMultistepScheduler(variance_type="learned_range"), "first 3 output channels"),
        (UniPCMultistepScheduler(use_flow_sigmas=True), "flow matching"),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else "",
)
def test_unsupported_scheduler_raises_with_its_reason_before_any_network_call(pipe, scheduler, match):
    counter = CallCounter(pipe.transformer)
    pipe.scheduler = scheduler
    with pytest.raises(ValueError, match=match):
        pipe([1], num_inference_steps=2)
    assert counter.calls == 0


def test_unet_needs_an_edm_sample_scheduler():
    unet = GaussianClassDenoiser()
    counter = CallCounter(unet)
    for scheduler, match in [
        (DDIMScheduler(), "needs an EDM scheduler"),
        (EDMHeunScheduler(), "prediction_type='sample'"),
        (EDMDPMSolverMultistepScheduler(prediction_type="sample"), "cannot take a denoised sample"),
    ]:
        pipe = ClassConditionalPipeline(unet=unet, scheduler=scheduler)
        with pytest.raises(ValueError, match=match):
            pipe([0], num_inference_steps=2)
    assert counter.calls == 0


def test_exactly_one_of_transformer_and_unet():
    with pytest.raises(ValueError, match="exactly one of `transformer` and `unet`"):
        ClassConditionalPipeline(scheduler=EDMHeunScheduler())
    with pytest.raises(ValueError, match="exactly one of `transformer` and `unet`"):
        ClassConditionalPipeline(scheduler=EDMHeunScheduler(), transformer=tiny_dit(), unet=GaussianClassDenoiser())


# ------------------------------------------------------------------------------------------------------------------
# Exported folder: both loading routes on the same folder, each in a fresh interpreter


def export_folder(dit_folder, destination):
    """The layout an export must write: code files next to the weights, model_index naming them by file stem."""
    shutil.copytree(dit_folder, destination)
    EDMHeunScheduler().save_pretrained(destination / "scheduler")
    shutil.copy(pipeline_class_conditional.__file__, destination / "pipeline_class_conditional.py")
    shutil.copy(scheduling_edm_heun.__file__, destination / "scheduler" / "scheduling_edm_heun.py")
    model_index = json.loads((destination / "model_index.json").read_text())
    model_index["_class_name"] = ["pipeline_class_conditional", "ClassConditionalPipeline"]
    model_index["scheduler"] = ["scheduling_edm_heun", "EDMHeunScheduler"]
    model_index["unet"] = [None, None]
    (destination / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return destination


def run_fresh(script, tmp_path):
    """Runs `script` (then SAMPLE_AND_SAVE) in a new interpreter with its own dynamic-module cache."""
    script = "import torch\ntorch.set_num_threads(1)\n" + textwrap.dedent(script) + textwrap.dedent(SAMPLE_AND_SAVE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


SAMPLE_AND_SAVE = """
    import numpy, torch
    pipe.set_progress_bar_config(disable=True)
    out = pipe([1, "great white shark"], num_inference_steps=3, guidance_scale=2.0, guidance_interval=(0.1, 10.0),
               generator=torch.Generator().manual_seed(0), output_type="latent").images
    numpy.save(OUT, out.numpy())
"""


@pytest.mark.slow
def test_exported_folder_loads_with_trust_remote_code_without_the_package(dit_folder, tmp_path):
    folder = export_folder(dit_folder, tmp_path / "export")
    out = tmp_path / "remote.npy"
    script = f"""
        import sys
        sys.modules["diffusers_speedup"] = None  # the package is not importable here
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(pipe).__name__ == "ClassConditionalPipeline", type(pipe)
        assert type(pipe).__module__.startswith("diffusers_modules"), type(pipe).__module__
        assert type(pipe.scheduler).__module__.startswith("diffusers_modules"), type(pipe.scheduler).__module__
        OUT = {str(out)!r}
        """
    run_fresh(script, tmp_path)

    pipe = ClassConditionalPipeline.from_pretrained(dit_folder)
    pipe.scheduler = EDMHeunScheduler()
    pipe.set_progress_bar_config(disable=True)
    expected = run(pipe, labels=[1, 2], num_inference_steps=3, guidance_scale=2.0, guidance_interval=(0.1, 10.0))
    np.testing.assert_allclose(np.load(out), expected.numpy(), atol=1e-5)


@pytest.mark.slow
def test_exported_folder_loads_with_installed_classes_and_no_remote_code(dit_folder, tmp_path):
    folder = export_folder(dit_folder, tmp_path / "export")
    out = tmp_path / "installed.npy"
    script = f"""
        import sys
        import diffusers_speedup
        from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline
        from diffusers_speedup.schedulers.scheduling_edm_heun import EDMHeunScheduler
        # The package root exports EDMHeunScheduler once it is wired into diffusers_speedup/__init__.py.
        if not hasattr(diffusers_speedup, "EDMHeunScheduler"):
            diffusers_speedup.EDMHeunScheduler = EDMHeunScheduler
        pipe = ClassConditionalPipeline.from_pretrained({str(folder)!r})  # no trust_remote_code
        assert type(pipe) is ClassConditionalPipeline
        assert type(pipe.scheduler) is EDMHeunScheduler, type(pipe.scheduler)
        assert not [name for name in sys.modules if name.startswith("diffusers_modules")], "remote code was imported"
        OUT = {str(out)!r}
        """
    run_fresh(script, tmp_path)
    assert not (tmp_path / "modules").exists() or not any((tmp_path / "modules").rglob("*.py")), "code was copied"
    assert np.load(out).shape == (2, 4, 8, 8)


def test_package_exports():
    """The scheduler must be reachable from the package root for the installed-class route."""
    if not hasattr(diffusers_speedup, "EDMHeunScheduler"):
        pytest.skip("diffusers_speedup/__init__.py does not export EDMHeunScheduler yet")
    assert diffusers_speedup.EDMHeunScheduler is EDMHeunScheduler


def test_shipped_files_import_only_stdlib_torch_and_diffusers():
    source = Path(pipeline_class_conditional.__file__).read_text() + Path(scheduling_edm_heun.__file__).read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    allowed = ("import ", "from diffusers", "from collections", "from dataclasses")
    roots = {line.split()[1].split(".")[0] for line in imports}
    stdlib = {"math", "os", "sys", "inspect", "functools", "collections", "dataclasses"}
    assert roots <= {"diffusers", "torch"} | stdlib, roots
    assert all(line.startswith(allowed) for line in imports)


# ------------------------------------------------------------------------------------------------------------------
# Every scheduler that samples a discrete-time model, against the Gaussian closed form

# Built with from_config from DiT's scheduler config, as a user switches schedulers. The β schedule is written out:
# from_config replaces keys that a config left at their defaults by the new class's own defaults.
DIT_SCHEDULER_CONFIG = DDPMScheduler(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False
).config
DISCRETE_SCHEDULERS = [
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "SASolverScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "DDIMParallelScheduler",
    "DDPMParallelScheduler",
]


def gaussian_eps_pipe(scheduler_name, **model_kwargs):
    scheduler = getattr(diffusers, scheduler_name).from_config(DIT_SCHEDULER_CONFIG)
    pipe = ClassConditionalPipeline(transformer=GaussianClassEpsModel(**model_kwargs), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler_name", DISCRETE_SCHEDULERS)
def test_every_discrete_scheduler_samples_the_guided_gaussian(scheduler_name):
    """x0 ~ N(c+1, 0.5²) per class, null label N(0, 0.5²): guidance with w is exactly the model of N(w·(c+1), 0.5²),
    so the samples' per-class mean and std are known. Catches a missing init_noise_sigma, a missing
    scale_model_input and fractional timesteps cast to integers."""
    pipe = gaussian_eps_pipe(scheduler_name)
    scale, per_class = 2.0, 48
    images = pipe([0, 1, 2], num_inference_steps=25, guidance_scale=scale, num_images_per_prompt=per_class,
                  generator=torch.Generator().manual_seed(0), output_type="latent").images  # fmt: skip
    assert images.shape == (3 * per_class, 2, 4, 4)
    values = images.double().reshape(3, -1)  # label i's images are consecutive
    expected_means = scale * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(values.mean(1), expected_means, atol=0.06, rtol=0)  # measured ≤ 0.05 for all
    # At 25 steps the std is 0.40 (DDPM, ancestral) to 0.55 (KDPM2 ancestral); LCM returns its x0 estimate, whose
    # spread is smaller by design (0.31). Without init_noise_sigma or scale_model_input it collapses or explodes.
    low = 0.25 if scheduler_name == "LCMScheduler" else 0.38
    assert torch.all((values.std(1) > low) & (values.std(1) < 0.6)), values.std(1)


def heun_like_step_sigmas(num_steps):
    """σ of each step of HeunDiscreteScheduler's default ('linspace') grid, computed here in float64."""
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    table = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    timesteps = np.linspace(0, 999, num_steps)[::-1]
    return np.interp(timesteps, np.arange(1000), table)


@pytest.mark.parametrize("scheduler_name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_second_order_discrete_evaluations_follow_their_step_sigma(scheduler_name):
    """Both evaluations of a step are guided or not by the step's σ, although the correction runs at a lower σ."""
    num_steps = 6
    sigmas = heun_like_step_sigmas(num_steps)
    lo, hi = (sigmas[3] + sigmas[2]) / 2, (sigmas[1] + sigmas[0]) / 2  # steps 1 and 2 lie inside
    pipe = gaussian_eps_pipe(scheduler_name)
    rows = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: rows.append(len(args[0])), with_kwargs=True)
    pipe([0], num_inference_steps=num_steps, guidance_scale=2.0, guidance_interval=(lo, hi), output_type="latent")
    # 2N−1 evaluations: (first, correction) per step, the last step first-order only; guided ones have 2 rows.
    assert rows == [1, 1] + [2, 2] * 2 + [1, 1] * 2 + [1]


@pytest.mark.parametrize("start, stop", [(0, 3), (2, 5), (1, 1), (4, 7)])
def test_interval_ends_on_the_grid_guide_the_official_steps(pipe, start, stop):
    """The official limited-interval sampler guides steps start..stop by index (float64 grid); the same steps must be
    guided when the ends are the grid's σ_{stop+1} and σ_start, whether given in float64 or rounded to float32."""
    num_steps = 8
    sigmas = karras_sigmas(num_steps) + [0.0]  # float64, independently of the scheduler
    guided_evaluations = sum(2 if i < num_steps - 1 else 1 for i in range(start, stop + 1))
    pipe.scheduler = EDMHeunScheduler()
    for lo, hi in [
        (sigmas[stop + 1], sigmas[start]),
        (float(np.float32(sigmas[stop + 1])), float(np.float32(sigmas[start]))),
    ]:
        counter = CallCounter(pipe.transformer)
        run(pipe, labels=[1], num_inference_steps=num_steps, guidance_scale=2.0, guidance_interval=(lo, hi))
        assert counter.rows == (2 * num_steps - 1) + guided_evaluations, (lo, hi)


def test_ddim_interval_ends_on_the_float64_grid():
    pipe = gaussian_eps_pipe("DDIMScheduler")
    pipe.scheduler.set_timesteps(10)
    timesteps = pipe.scheduler.timesteps.tolist()
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    sigmas = [math.sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]) for t in timesteps]
    counter = CallCounter(pipe.transformer)
    pipe(
        [0], num_inference_steps=10, guidance_scale=2.0, guidance_interval=(sigmas[6], sigmas[2]), output_type="latent"
    )
    assert counter.rows == 10 + 4  # steps 2, 3, 4, 5


# ------------------------------------------------------------------------------------------------------------------
# Labels, images per label, callbacks


def test_nested_and_tensor_class_labels_are_flattened(pipe):
    flat = run(pipe, labels=[1, 2])
    assert torch.equal(pipe([[1], [2]], num_inference_steps=4, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).images, flat)  # fmt: skip
    assert torch.equal(pipe(torch.tensor([[1], [2]]), num_inference_steps=4, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).images, flat)  # fmt: skip
    with pytest.raises(ValueError, match="integer class ids"):
        pipe([[1.5]], num_inference_steps=2)


def test_num_images_per_prompt_repeats_each_label_consecutively(pipe):
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    repeated = pipe([1, 2], num_images_per_prompt=2, num_inference_steps=3, output_type="latent",
                    generator=generators).images  # fmt: skip
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    spelled_out = pipe([1, 1, 2, 2], num_inference_steps=3, output_type="latent", generator=generators).images
    assert torch.equal(repeated, spelled_out)
    with pytest.raises(ValueError, match="list of 2 generators, but 4 images"):
        pipe([1, 2], num_images_per_prompt=2, generator=[torch.Generator()] * 2)


def test_callback_sees_num_timesteps_and_can_change_guidance_scale(pipe):
    pipe.scheduler = EDMHeunScheduler()
    counter = CallCounter(pipe.transformer)
    seen = []

    def callback(pipeline, i, t, callback_kwargs):
        seen.append((i, pipeline.num_timesteps, pipeline.guidance_scale))
        pipeline._guidance_scale += 1.0  # diffusers' test_callback_cfg
        return callback_kwargs

    run(pipe, labels=[1], num_inference_steps=3, guidance_scale=1.0, callback_on_step_end=callback)
    assert [i for i, _, _ in seen] == list(range(5)) and all(n == 5 for _, n, _ in seen)
    assert [w for _, _, w in seen] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert pipe.guidance_scale == 1.0 + pipe.num_timesteps
    assert counter.rows == 1 + 2 * 4  # the first evaluation ran at w = 1, without the null-label rows


def test_callback_can_interrupt_and_replace_latents(pipe):
    counter = CallCounter(pipe.transformer)

    def stop_after_two(pipeline, i, t, callback_kwargs):
        pipeline._interrupt = i == 1
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if i == 1 else {}

    latents = run(pipe, num_inference_steps=5, guidance_scale=1.0, callback_on_step_end=stop_after_two)
    assert counter.calls == 2 and pipe.interrupt
    assert torch.equal(latents, torch.zeros_like(latents))


def test_pipeline_callback_objects_bring_their_tensor_inputs(pipe):
    from diffusers.callbacks import PipelineCallback

    class RecordLatents(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.shapes.append(tuple(callback_kwargs["latents"].shape))
            return callback_kwargs

    record = RecordLatents()
    record.shapes = []
    run(pipe, num_inference_steps=3, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["nothing"])
    assert record.shapes == [(2, 4, 8, 8)] * 3


# ------------------------------------------------------------------------------------------------------------------
# DiT's guidance on the first channels only


def test_guidance_channels_three_is_dit_forward_with_cfg(pipe):
    """Reference: DiT's forward_with_cfg written out here: the first 3 ε channels guided, the 4th conditional."""
    scale, noise = 4.0, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = run(pipe, latents=noise, guidance_scale=scale, guidance_channels=3)
    all_channels = run(pipe, latents=noise, guidance_scale=scale)
    assert torch.equal(run(pipe, latents=noise, guidance_scale=scale, guidance_channels=4), all_channels)
    assert not torch.allclose(ours, all_channels, atol=1e-4)

    reference = DDIMScheduler()
    reference.set_timesteps(4)
    x, labels = noise.clone(), torch.tensor([1, 2])
    with torch.no_grad():
        for t in reference.timesteps:
            timestep = torch.full((2,), int(t))
            cond = pipe.transformer(x, timestep=timestep, class_labels=labels).sample
            uncond = pipe.transformer(x, timestep=timestep, class_labels=torch.full_like(labels, NUM_CLASSES)).sample
            guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
            x = reference.step(torch.cat([guided, cond[:, 3:4]], dim=1), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", [0, 5, 2.5, True])
def test_bad_guidance_channels_raise(pipe, value):
    with pytest.raises(ValueError, match="guidance_channels"):
        pipe([1], num_inference_steps=2, guidance_channels=value)


# ------------------------------------------------------------------------------------------------------------------
# Guidance by a separate network


class GaussianGuide(GaussianClassDenoiser):
    """An EDM2-style unconditional guide: the exact denoiser of x0 ~ N(mean, s²), called without labels."""

    @register_to_config
    def __init__(self, in_channels: int = 2, sample_size: int = 4, data_std: float = 0.5, mean: float = 0.5):
        super().__init__(num_classes=0, in_channels=in_channels, sample_size=sample_size, data_std=data_std)
        self.class_means.fill_(mean)

    def forward(self, sample, sigma, class_labels=None):
        assert class_labels is None, "an unconditional guide is called without labels"
        return super().forward(sample, sigma, torch.zeros(sample.shape[0], dtype=torch.long))


def exact_guided_solution(noise, guided_means, s=0.5):
    """Probability-flow ODE solved exactly from σ_max for x0 ~ N(guided mean, s²)."""
    means = torch.tensor(guided_means).view(-1, 1, 1, 1)
    return means + (SIGMA_MAX * noise - means) * s / math.sqrt(s**2 + SIGMA_MAX**2)


def test_unconditional_guide_network_edm2_rule():
    """D = D_guide + w·(D_cond − D_guide) with Gaussian denoisers sharing s is the denoiser of
    N(m_guide + w·(m_c − m_guide), s²): the ODE solution is known in closed form."""
    unet, guide = GaussianClassDenoiser(), GaussianGuide(mean=0.5)
    pipe = ClassConditionalPipeline(unet=unet, guide=guide, scheduler=EDMHeunScheduler(prediction_type="sample"))
    pipe.set_progress_bar_config(disable=True)
    guide_calls, main_labels = CallCounter(guide), []
    unet.register_forward_pre_hook(
        lambda module, args, kwargs: main_labels.append(kwargs["class_labels"]), with_kwargs=True
    )
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    w = 2.0
    out = pipe([0, 1, 2], latents=noise, num_inference_steps=32, guidance_scale=w, output_type="latent").images
    expected = exact_guided_solution(noise, [0.5 + w * (m - 0.5) for m in (1.0, 2.0, 3.0)])
    assert (out - expected).abs().max() < 0.05
    assert guide_calls.calls == 63
    assert all(labels.tolist() == [0, 1, 2] for labels in main_labels)  # the null label is never used


def test_conditional_guide_gets_the_labels_autoguidance():
    unet, weak = GaussianClassDenoiser(), GaussianClassDenoiser()
    weak.class_means.mul_(0.5)  # a "weaker" model: class means 0.5, 1, 1.5
    pipe = ClassConditionalPipeline(unet=unet, guide=weak, scheduler=EDMHeunScheduler(prediction_type="sample"))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    w = 1.5
    out = pipe([0, 1, 2], latents=noise, num_inference_steps=32, guidance_scale=w, output_type="latent").images
    expected = exact_guided_solution(noise, [0.5 * m + w * (m - 0.5 * m) for m in (1.0, 2.0, 3.0)])
    assert (out - expected).abs().max() < 0.05


def test_guide_network_combines_with_the_guidance_interval():
    unet, guide = GaussianClassDenoiser(), GaussianGuide()
    pipe = ClassConditionalPipeline(unet=unet, guide=guide, scheduler=EDMHeunScheduler(prediction_type="sample"))
    pipe.set_progress_bar_config(disable=True)
    guide_calls, main_calls = CallCounter(guide), CallCounter(unet)
    sigmas = karras_sigmas(5)
    pipe([1], num_inference_steps=5, guidance_scale=2.0, guidance_interval=(sigmas[3], sigmas[1]), output_type="latent")
    assert main_calls.calls == 9 and main_calls.rows == 9  # one row each: the guide replaces the null-label rows
    assert guide_calls.calls == 4  # steps 1 and 2, two evaluations each


def test_transformer_route_with_an_unconditional_guide_matches_the_closed_form():
    pipe = gaussian_eps_pipe("DDIMScheduler")
    pipe.guide = GaussianClassEpsModel(num_classes=0)  # every label has mean 0
    images = pipe([0, 1, 2], num_inference_steps=25, guidance_scale=2.0, num_images_per_prompt=48,
                  generator=torch.Generator().manual_seed(0), output_type="latent").images  # fmt: skip
    values = images.double().reshape(3, -1)
    torch.testing.assert_close(values.mean(1), torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64), atol=0.06, rtol=0)


def test_guide_saves_and_loads_with_the_pipeline(tmp_path):
    from diffusers_speedup.models import UViTModel

    def tiny_uvit(num_classes, seed):
        torch.manual_seed(seed)
        return UViTModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, hidden_size=16,
                         num_attention_heads=2, num_classes=num_classes)  # fmt: skip

    pipe = ClassConditionalPipeline(transformer=tiny_uvit(5, 0), guide=tiny_uvit(0, 1), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = run(pipe, labels=[1, 4], guidance_scale=3.0)
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["guide"][1] == "UViTModel" and (tmp_path / "guide" / "config.json").exists()
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.guide, UViTModel) and loaded.guide.config.num_classes == 0
    assert torch.equal(run(loaded, labels=[1, 4], guidance_scale=3.0), expected)
    # A guide from elsewhere replaces the saved one at load time, as any component does.
    other = ClassConditionalPipeline.from_pretrained(tmp_path, guide=tiny_uvit(0, 2))
    other.set_progress_bar_config(disable=True)
    assert not torch.equal(run(other, labels=[1, 4], guidance_scale=3.0), expected)


@pytest.mark.parametrize(
    "guide, match",
    [
        (GaussianClassEpsModel(), "called like the main network"),
        (GaussianGuide(in_channels=3), "shape"),
        (GaussianClassDenoiser(num_classes=7), "7 classes"),
    ],
    ids=["wrong-kind", "wrong-shape", "wrong-classes"],
)
def test_bad_guide_raises_before_any_network_call(guide, match):
    unet = GaussianClassDenoiser()
    pipe = ClassConditionalPipeline(unet=unet, guide=guide, scheduler=EDMHeunScheduler(prediction_type="sample"))
    counter = CallCounter(unet)
    with pytest.raises(ValueError, match=match):
        pipe([0], num_inference_steps=2)
    assert counter.calls == 0


# ------------------------------------------------------------------------------------------------------------------
# Unconditional models (U-ViT on CIFAR-10 / CelebA, EDM2's uncond networks)


def test_unconditional_model_samples_without_labels_and_solves_the_gaussian_ode():
    pipe = ClassConditionalPipeline(
        unet=GaussianClassDenoiser(num_classes=0), scheduler=EDMHeunScheduler(prediction_type="sample")
    )
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = pipe(num_images_per_prompt=3, latents=noise, num_inference_steps=32, guidance_scale=1.0, output_type="latent")
    # x0 ~ N(0, s²): the probability-flow solution from σ_max is σ_max·z·s/√(s²+σ_max²).
    exact = SIGMA_MAX * noise * 0.5 / math.sqrt(0.25 + SIGMA_MAX**2)
    assert (out.images - exact).abs().max() < 0.05


def test_unconditional_model_refuses_labels_and_guidance_without_a_guide():
    pipe = ClassConditionalPipeline(
        unet=GaussianClassDenoiser(num_classes=0), scheduler=EDMHeunScheduler(prediction_type="sample")
    )
    with pytest.raises(ValueError, match="unconditional .* pass no class_labels"):
        pipe([0, 1], guidance_scale=1.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="no null label"):
        pipe(guidance_scale=2.0, num_inference_steps=2)
    # With an unconditional guide network, guidance is D_guide + w·(D − D_guide).
    guided = ClassConditionalPipeline(
        unet=GaussianClassDenoiser(num_classes=0),
        guide=GaussianClassDenoiser(num_classes=0),
        scheduler=EDMHeunScheduler(prediction_type="sample"),
    )
    guided.set_progress_bar_config(disable=True)
    assert guided(guidance_scale=2.0, num_inference_steps=2, output_type="latent").images.shape == (1, 2, 4, 4)


def test_class_conditional_model_needs_class_labels():
    pipe = ClassConditionalPipeline(unet=GaussianClassDenoiser(), scheduler=EDMHeunScheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="class_labels is required"):
        pipe(num_inference_steps=2)


# ------------------------------------------------------------------------------------------------------------------
# Sampling never changes a network


def networks_left_in_training_mode(kind):
    """A pipeline as a user builds it right after a training loop: every network still in training mode."""
    from tiny_models import perturb, tiny_dit, tiny_edm2, tiny_uvit

    if kind == "uvit":
        model = perturb(tiny_uvit(class_dropout_prob=0.5))
        parts = {"transformer": model, "scheduler": DPMSolverMultistepScheduler()}
    elif kind == "dit":
        model = perturb(tiny_dit(class_dropout_prob=0.5))
        parts = {"transformer": model, "scheduler": DDIMScheduler()}
    else:
        parts = {"unet": perturb(tiny_edm2()), "scheduler": EDMHeunScheduler(prediction_type="sample")}
        if kind == "edm2+guide":
            parts["guide"] = perturb(tiny_edm2(num_classes=0), seed=2)
    pipe = ClassConditionalPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.train()
            next(component.children()).eval()  # one submodule in its own mode, which must survive too
    return pipe


@pytest.mark.parametrize("kind", ["uvit", "dit", "edm2", "edm2+guide"])
def test_sampling_leaves_weights_and_modes_unchanged_and_repeats_exactly(kind):
    pipe = networks_left_in_training_mode(kind)
    networks = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    weights = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in networks.items()}
    modes = {name: [m.training for m in net.modules()] for name, net in networks.items()}

    def sample():
        generator = torch.Generator().manual_seed(0)
        return pipe([1, 2, 3, 4], num_inference_steps=3, guidance_scale=2.0, generator=generator, output_type="latent")

    first, second = sample().images, sample().images
    assert torch.equal(first, second), "two calls on the same inputs gave different samples"
    for name, net in networks.items():
        for key, value in net.state_dict().items():
            assert torch.equal(value, weights[name][key]), f"sampling changed {name}.{key}"
        assert [m.training for m in net.modules()] == modes[name], f"sampling changed the modes of {name}"


def test_modes_are_restored_when_a_call_fails():
    pipe = networks_left_in_training_mode("edm2")

    def fail(pipeline, i, t, callback_kwargs):
        assert not pipeline.unet.training  # the networks run in eval mode during the call
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe([1], num_inference_steps=2, guidance_scale=1.0, callback_on_step_end=fail)
    assert pipe.unet.training and not next(pipe.unet.children()).training
