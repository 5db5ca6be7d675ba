"""Converting LightningDiT's released checkpoints with their VA-VAE: files built here in the official layouts
(hustvl/LightningDiT@2725fed ``models/lightningdit.py``, ``train.py``'s checkpoint dict, ``tokenizer/autoencoder.py``,
``latents_stats.pt``), compared against the official forward (test_dit_lightningdit's, written out from
``LightningDiT.forward``), LightningDiT's own sampling (``inference.py``, ``transport/integrators.py`` ``ode`` with
``timestep_shift``, torchdiffeq's fixed-grid Euler, ``forward_with_cfg``) written out below in its own time, and the
LDM decoder of test_convert_vavae."""

import pytest
import torch

from diffusers_speedup import ClassConditionalPipeline, DiTModel
from diffusers_speedup.convert import CheckpointFormatError, build_parser, lightningdit, vavae
from diffusers_speedup.schedulers import FlowScheduler
from tests.test_convert_vavae import TINY, latents_stats, ldm_decode, ldm_state_shapes, random_ldm_state
from tests.test_dit_lightningdit import (
    LIGHTNINGDIT_CONFIG,
    official_forward,
    official_state_shapes,
    random_official_state,
)

DEPTH, HIDDEN, HEADS, CLASSES = 2, 64, 2, 10
LATENT, CHANNELS = 4, TINY["z_channels"]  # 64 px images through the tiny f16d32 VA-VAE
LABELS = torch.tensor([3, 7])


def official_state(seed=0, learn_sigma=False, **options):
    options = {**LIGHTNINGDIT_CONFIG, **options}
    shapes = official_state_shapes(DEPTH, HIDDEN, HEADS, 1, CHANNELS, LATENT, CLASSES, learn_sigma, **options)
    state = random_official_state(shapes, seed)
    # Tame the random network (sharp attention, large modulations, a large output) so that a few guided float32
    # steps do not amplify rounding: the same trajectory in float64 agrees to 1e-13.
    for key in state:
        if key.endswith("attn.qkv.weight") or "adaLN_modulation" in key:
            state[key] = state[key] * 0.3
        elif key.startswith("final_layer.linear"):
            state[key] = state[key] * 0.1
    return state


def lightningdit_forward(state, x, t, y, learn_sigma=False, **options):
    """LightningDiT.forward (eval) in its own time, t = 1 data."""
    options = {**LIGHTNINGDIT_CONFIG, **options}
    return official_forward(state, x, t, y, depth=DEPTH, heads=HEADS, patch=1, learn_sigma=learn_sigma, **options)


def train_checkpoint(path, ema, model=None):
    """train.py's checkpoint: {"model", "ema", "opt", "config"} (config: the yaml as a plain dict)."""
    torch.save({"model": model if model is not None else official_state(seed=99), "ema": ema,
                "opt": {"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.95), "params": []}]},
                "config": {"model": {"model_type": "LightningDiT-XL/1", "use_qknorm": False}, "sample": {"cfg_scale": 6.7}}},
               path)  # fmt: skip
    return path


def lightningdit_euler_sampler(forward, z, y, num_steps, cfg_scale, cfg_interval_start, timestep_shift):
    """inference.py do_sample → Sampler.sample_ode(sampling_method="euler", num_steps, timestep_shift) in float32:
    the grid th.linspace(0, 1, num_steps) warped by compute_tm, torchdiffeq's Euler on it (num_steps − 1 steps), the
    drift the velocity, and model.forward_with_cfg(x, t, y, cfg_scale, cfg_interval=True, cfg_interval_start) on the
    doubled batch: 3 guided channels, conditional below cfg_interval_start. Returns the conditional half."""
    t = torch.linspace(0, 1, num_steps)
    if timestep_shift > 0:
        t = torch.tensor([timestep_shift * t_n / (1 + (timestep_shift - 1) * t_n) for t_n in t])
    x = torch.cat([z, z], 0)
    y = torch.cat([y, torch.full_like(y, CLASSES)], 0)
    for t0, t1 in zip(t[:-1], t[1:]):
        time = torch.ones(x.size(0)) * t0
        half = x[: len(x) // 2]
        model_out = forward(torch.cat([half, half], dim=0), time, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if time[0] < cfg_interval_start:
            half_eps = cond_eps
        velocity = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
        x = x + (t1 - t0) * velocity
    return x.chunk(2, dim=0)[0]


def convert(checkpoint, output_dir, *options):
    """`diffusers-speedup convert lightningdit`, through the command's own parser; returns the folder written."""
    args = build_parser().parse_args(["lightningdit", str(checkpoint), "--output_dir", str(output_dir), *options])
    return args.run(args)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The released files, tiny: the 800-epoch train.py checkpoint, the VA-VAE Lightning checkpoint, latents_stats.pt."""
    root = tmp_path_factory.mktemp("lightningdit")
    ema = official_state(seed=1)
    checkpoint = train_checkpoint(root / "lightningdit-xl-imagenet256-800ep.pt", ema)
    vae_state = random_ldm_state(ldm_state_shapes(**TINY), seed=4)
    vae_file = root / "vavae-imagenet256-f16d32-dinov2.pt"
    torch.save({"state_dict": {**vae_state, "loss.logvar": torch.zeros(()), "linear_proj.weight": torch.zeros(1024, 32, 1, 1)}},
               vae_file)  # fmt: skip
    stats = root / "latents_stats.pt"
    torch.save(latents_stats(CHANNELS, seed=6), stats)
    return {"root": root, "ema": ema, "checkpoint": checkpoint, "vae_state": vae_state, "vae": vae_file, "stats": stats}


# --- the network -----------------------------------------------------------------------------------------------------


def test_the_release_converts_with_the_official_forward_and_sampling_settings(release, tmp_path, capsys):
    folder = convert(release["checkpoint"], tmp_path / "pipe", "--vae", str(release["vae"]), "--latents_stats",
                     str(release["stats"]))  # fmt: skip
    assert "VA-VAE: left out 2 training-only tensors (1 loss.*, 1 linear_proj.*" in capsys.readouterr().out
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    model = pipe.transformer
    assert type(model) is DiTModel
    assert {k: model.config[k] for k in ("mlp_type", "norm_type", "use_rope", "use_qk_norm", "time_input")} == {
        "mlp_type": "swiglu", "norm_type": "rmsnorm", "use_rope": True, "use_qk_norm": False, "time_input": "data_at_1",
    }  # fmt: skip
    assert (model.config.num_attention_heads, model.config.in_channels, model.config.out_channels) == (HEADS, 32, 32)

    model = model.double()
    x = torch.randn(3, CHANNELS, LATENT, LATENT, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_official, y = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64), torch.tensor([1, CLASSES, 7])
    with torch.no_grad():
        ours = model(x, 1 - t_official, y).sample
    expected = lightningdit_forward({k: v.double() for k, v in release["ema"].items()}, x, t_official, y)
    torch.testing.assert_close(ours, -expected, rtol=1e-10, atol=1e-10)  # SiT's velocity is −dx/dt in our time

    scheduler = pipe.scheduler
    assert isinstance(scheduler, FlowScheduler)
    assert (scheduler.config.sampler, scheduler.config.path, scheduler.config.shift) == ("euler", "linear", 1 / 0.3)
    stats = torch.load(release["stats"])
    assert pipe.vae.config.latents_mean == stats["mean"].flatten().double().tolist()
    assert pipe.vae.config.scaling_factor == 1.0

    card = (folder / "README.md").read_text()
    assert "license: mit" in card and "huggingface.co/hustvl/lightningdit-xl-imagenet256-800ep" in card
    assert "6.7" in card and "0.125" in card and "guidance_channels=3" in card and "1.35" in card
    assert "num_inference_steps=249" in card and "    guidance_channels=3,\n" in card  # in the example code
    assert "while the flow time t (1 is noise) is between 0 and 0.875" in card  # not a σ interval


def test_train_checkpoint_takes_the_ema_unless_asked_for_the_live_weights(release):
    model = lightningdit.load_lightningdit_checkpoint(release["checkpoint"])
    assert torch.equal(model.state_dict()["blocks.1.mlp.w12.weight"], release["ema"]["blocks.1.mlp.w12.weight"])
    live = lightningdit.load_lightningdit_checkpoint(release["checkpoint"], weights="model")
    assert not torch.equal(live.state_dict()["blocks.1.mlp.w12.weight"], release["ema"]["blocks.1.mlp.w12.weight"])


@pytest.mark.parametrize(
    "options, learn_sigma",
    [
        ({"use_qknorm": True}, False),  # the README's advice against NaN losses: RMSNorm QK-norm
        ({"use_rmsnorm": False, "use_qknorm": True}, False),  # LayerNorm QK-norm
        ({"use_swiglu": False, "use_rope": False}, True),  # SiT's blocks with RMSNorm, learn_sigma
    ],
)
def test_other_options_are_read_from_the_keys(tmp_path, options, learn_sigma):
    state = official_state(seed=2, learn_sigma=learn_sigma, **options)
    checkpoint = tmp_path / "0080000.pt"
    torch.save(state, checkpoint)  # a plain state dict
    model = lightningdit.load_lightningdit_checkpoint(checkpoint, num_attention_heads=HEADS).double()
    x = torch.randn(2, CHANNELS, LATENT, LATENT, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    with torch.no_grad():
        ours = model(x, 1 - t, LABELS).sample[:, :CHANNELS]
    expected = lightningdit_forward({k: v.double() for k, v in state.items()}, x, t, LABELS, learn_sigma, **options)
    torch.testing.assert_close(ours, -expected, rtol=1e-10, atol=1e-10)


def test_wrong_and_truncated_files_name_the_keys(release, tmp_path):
    state = dict(release["ema"])
    del state["blocks.1.attn.proj.bias"]
    state["blocks.0.attn.q_norm.weight"] = torch.ones(HIDDEN // HEADS)  # QK-norm in one block only
    checkpoint = train_checkpoint(tmp_path / "broken.pt", state)
    with pytest.raises(CheckpointFormatError) as error:
        lightningdit.load_lightningdit_checkpoint(checkpoint)
    message = str(error.value)
    assert "not a hustvl/LightningDiT checkpoint: missing keys [blocks.0.attn.k_norm.weight" in message
    assert "blocks.1.attn.proj.bias" in message and "\n" not in message

    wo_shift = dict(release["ema"])
    for i in range(DEPTH):  # LightningDiTBlock(wo_shift=True): adaLN_modulation → 4 chunks
        wo_shift[f"blocks.{i}.adaLN_modulation.1.weight"] = torch.zeros(4 * HIDDEN, HIDDEN)
        wo_shift[f"blocks.{i}.adaLN_modulation.1.bias"] = torch.zeros(4 * HIDDEN)
    with pytest.raises(CheckpointFormatError, match="wo_shift"):
        lightningdit.load_lightningdit_checkpoint(train_checkpoint(tmp_path / "wo_shift.pt", wo_shift))

    cut = tmp_path / "lightningdit-xl-imagenet256-64ep.pt"
    cut.write_bytes(release["checkpoint"].read_bytes()[:4000])
    with pytest.raises(CheckpointFormatError, match="LightningDiT.*truncated or not a torch file"):
        lightningdit.load_lightningdit_checkpoint(cut)


def test_the_vae_comes_from_a_converted_folder_and_must_carry_the_statistics(release, tmp_path):
    folder = tmp_path / "vavae"
    vavae.save_vae_folder(vavae.convert_vavae_checkpoint(release["vae"], release["stats"])[0], folder, source="x",
                          note="")  # fmt: skip
    pipe, dropped = lightningdit.convert_lightningdit_checkpoint(release["checkpoint"], str(folder))
    assert dropped is None and pipe.vae.config.latents_std == torch.load(release["stats"])["std"].flatten().tolist()

    plain = tmp_path / "plain"
    vavae.save_vae_folder(vavae.load_vavae_checkpoint(release["vae"])[0], plain, source="x", note="")
    with pytest.raises(ValueError, match="no latents_mean / latents_std.*--latents_stats"):
        lightningdit.convert_lightningdit_checkpoint(release["checkpoint"], str(plain))
    with pytest.raises(ValueError, match="needs --vae"):
        lightningdit.convert_lightningdit_checkpoint(release["checkpoint"])
    other = tmp_path / "other.pt"
    torch.save(random_ldm_state(ldm_state_shapes(**{**TINY, "z_channels": 16})), other)
    torch.save(latents_stats(16), tmp_path / "stats16.pt")
    with pytest.raises(ValueError, match="16 latent channels but the LightningDiT .* takes 32"):
        lightningdit.convert_lightningdit_checkpoint(release["checkpoint"], str(other), tmp_path / "stats16.pt")
    with pytest.raises(CheckpointFormatError, match="mean has 32 values .* 16 latent channels"):
        lightningdit.convert_lightningdit_checkpoint(release["checkpoint"], str(other), release["stats"])


# --- sampling --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale, start", [(6.7, 0.125), (10.0, 0.10)])  # the 800- and 64-epoch settings
def test_pipeline_samples_as_lightningdits_euler_with_its_shift_and_guidance_interval(
    release, tmp_path, cfg_scale, start
):
    pipe, _ = lightningdit.convert_lightningdit_checkpoint(release["checkpoint"], str(release["vae"]), release["stats"])
    pipe.set_progress_bar_config(disable=True)
    points = 8  # LightningDiT's num_sampling_steps: grid points; the shift leaves the first 3 unguided at 0.125
    noise = torch.randn(2, CHANNELS, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    settings = dict(num_inference_steps=points - 1, guidance_scale=cfg_scale, guidance_interval=(0.0, 1.0 - start),
                    guidance_channels=3, latents=noise)  # fmt: skip
    ours = pipe(LABELS, output_type="latent", **settings).images
    with torch.no_grad():
        official = lightningdit_euler_sampler(
            lambda x, t, y: lightningdit_forward(release["ema"], x, t, y), noise, LABELS, points, cfg_scale, start, 0.3
        )
    scale = max(1.0, official.abs().max().item())
    assert (ours - official).abs().max().item() < 2e-5 * scale

    # Decoded as inference.py decodes: z = x · std / latent_multiplier + mean through the LDM decoder, then
    # decode_to_images' 127.5·x + 128 clipped to uint8, which is round((x/2 + 0.5)·255) of the "pil" output.
    images = pipe(LABELS, output_type="pt", **settings).images
    stats = torch.load(release["stats"])
    with torch.no_grad():
        decoded = ldm_decode(release["vae_state"], official * stats["std"] / 1.0 + stats["mean"])
    assert images.shape == (2, 3, 16 * LATENT, 16 * LATENT)
    assert (images - (decoded / 2 + 0.5).clamp(0, 1)).abs().max().item() < 1e-4


def test_released_sampling_settings_by_file():
    assert lightningdit.released_sampling("x/lightningdit-xl-imagenet256-800ep.pt") == {
        "num_inference_steps": 249, "guidance_scale": 6.7, "guidance_interval": (0.0, 0.875), "guidance_channels": 3,
        "official": {"cfg_scale": 6.7, "cfg_interval_start": 0.125, "fid": "1.35 (2.17 without guidance)"},
    }  # fmt: skip
    assert lightningdit.released_sampling("lightningdit-xl-imagenet256-64ep.pt")["guidance_interval"] == (0.0, 0.9)
    assert lightningdit.released_sampling("mine.pt")["guidance_scale"] == 10.0  # the main config's


def test_the_convert_command_lists_lightningdit_and_vavae():
    from diffusers_speedup.convert import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"lightningdit", "vavae"} <= set(choices)


def test_the_released_xl_1_shapes_give_the_lightningdit_xl_1_preset():
    from diffusers_speedup.models.dit_transformer import DIT_PRESETS

    shapes = official_state_shapes(28, 1152, 16, 1, 32, 16, 1000, **LIGHTNINGDIT_CONFIG)
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    config = lightningdit.lightningdit_config_from_state_dict(state, "lightningdit-xl-imagenet256-800ep.pt")
    assert {**DIT_PRESETS["lightningdit-xl-1"], "time_input": "data_at_1"}.items() <= config.items()
    assert (config["num_classes"], config["out_channels"], config["num_attention_heads"]) == (1000, 32, 16)
    with torch.device("meta"):
        model = DiTModel(**config)
    assert lightningdit.model_name_and_title(model.config, 16) == ("lightningdit-xl-1-256", "LightningDiT-XL/1", 256)
