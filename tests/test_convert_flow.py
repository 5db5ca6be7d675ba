"""Converting SiT's and REPA's released checkpoints: files built here in the official layouts (willisma/SiT
models.py, sihyun-yu/REPA models/sit.py), compared against the official forward (test_dit_convert's reference, which
is DiT's network, SiT's and REPA's alike) and the official samplers written out in SiT's and REPA's own time."""

import argparse

import pytest
import torch

from diffusers_speedup import ClassConditionalPipeline, DiTModel
from diffusers_speedup.convert import CheckpointFormatError, repa, sit
from diffusers_speedup.schedulers import FlowScheduler
from tests.test_dit_convert import CLASSES, HEADS, LATENT, official_state_dict, reference_forward, vae_folder  # noqa: F401
from tests.test_flow_sampling import repa_euler_maruyama_sampler

LABELS = torch.tensor([3, 7])


def sit_forward(state, x, t_sit, y):
    """willisma/SiT models.SiT.forward (eval): DiT's network; with learn_sigma the variance half is dropped."""
    out = reference_forward(state, x, t_sit, y, heads=HEADS)
    return out[:, : x.shape[1]]


def repa_forward(state, x, t, y):
    """sihyun-yu/REPA models/sit.py SiT.forward(x, t, y)[0] (eval): DiT's network without learn_sigma."""
    return reference_forward(state, x, t, y, heads=HEADS)


def repa_projectors(hidden, projector_dim=16, z_dim=12, count=1, seed=3):
    """REPA's build_mlp per encoder: Linear, SiLU, Linear, SiLU, Linear."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"0": (projector_dim, hidden), "2": (projector_dim, projector_dim), "4": (z_dim, projector_dim)}
    return {
        f"projectors.{k}.{layer}.{part}": torch.randn(*(shape if part == "weight" else shape[:1]), generator=generator)
        for k in range(count)
        for layer, shape in shapes.items()
        for part in ("weight", "bias")
    }


def convert(module, checkpoint, output_dir, *options):
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--output_dir", required=True)
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(checkpoint), "--output_dir", str(output_dir), *options]))


def sit_euler_maruyama_sampler(model, latents, y, num_steps, generator, cfg_scale=1.0, guided_channels=3):
    """willisma/SiT sample_ddp.py SDE in SiT's own time (t = 0 noise, t = 1 data): transport.sample_sde with
    Euler, diffusion_form "sigma" (w = 1 − t), last_step "Mean" of 0.04; the score from the velocity by ICPlan
    (α = t, σ = 1 − t); forward_with_cfg guiding the first 3 channels. `model(x, t, y)` is SiT's velocity; the
    noise is drawn as the REPA sampler of test_flow_sampling draws it."""
    t_grid = torch.linspace(0, 1 - 0.04, num_steps, dtype=torch.float64)
    dt = t_grid[1] - t_grid[0]
    x = latents.to(torch.float64)
    y_null = torch.full_like(y, CLASSES)

    def velocity(x, t):
        time = torch.full((len(x),), float(t))
        if cfg_scale == 1.0:
            return model(x.float(), time, y).double()
        out = model(torch.cat([x, x]).float(), torch.cat([time, time]), torch.cat([y, y_null])).double()
        cond, uncond = out.chunk(2)
        guided = uncond[:, :guided_channels] + cfg_scale * (cond - uncond)[:, :guided_channels]
        return torch.cat([guided, cond[:, guided_channels:]], dim=1)

    def sde_drift(x, t):
        v = velocity(x, t)
        score = (t * v - x) / (1 - t)  # ICPlan.get_score_from_velocity: var = σ² − α/α̇·σ̇·σ = 1 − t
        return v + (1 - t) * score  # drift + diffusion · score

    for t in t_grid[:-1]:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x + sde_drift(x, t) * dt + torch.sqrt(2 * (1 - t)) * noise * torch.sqrt(dt)
    return x + sde_drift(x, t_grid[-1]) * 0.04


# --- SiT ---------------------------------------------------------------------------------------------------------


def test_sit_network_is_fed_one_minus_t_and_its_velocity_negated_in_float64(tmp_path):
    state = official_state_dict(seed=4)
    checkpoint = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(state, checkpoint)
    model = sit.load_sit_checkpoint(checkpoint, num_attention_heads=HEADS).double()
    assert model.config.time_input == "data_at_1" and model.config.out_channels == 8
    x = torch.randn(3, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_sit, y = torch.tensor([0.0, 0.25, 0.875], dtype=torch.float64), torch.tensor([3, CLASSES, 0])
    state64 = {key: value.double() for key, value in state.items()}
    with torch.no_grad():
        ours = model(x, 1 - t_sit, y).sample
        official = reference_forward(state64, x, t_sit, y, heads=HEADS)
    torch.testing.assert_close(ours[:, :4], -official[:, :4], rtol=1e-12, atol=1e-12 * official.abs().max().item())
    torch.testing.assert_close(ours[:, 4:], official[:, 4:], rtol=1e-12, atol=1e-12 * official.abs().max().item())


def test_time_input_default_leaves_dit_unchanged():
    model = DiTModel(sample_size=8, num_layers=1, hidden_size=32, num_attention_heads=2, num_classes=CLASSES)
    assert model.config.time_input == "noise_at_1"
    flipped = DiTModel(**{**model.config, "time_input": "data_at_1"})
    flipped.load_state_dict(model.state_dict())
    for module in (model, flipped):
        torch.nn.init.normal_(module.final_layer.linear.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(
            flipped(x, torch.tensor([0.25, 1.0]), LABELS).sample, -model(x, torch.tensor([0.75, 0.0]), LABELS).sample
        )
    with pytest.raises(ValueError, match="time_input"):
        DiTModel(time_input="reversed")
    with pytest.raises(ValueError, match="time direction"):
        flipped.to_diffusers(exact=False)


def test_sit_pipeline_samples_as_sits_sde_with_three_guided_channels(tmp_path, vae_folder):  # noqa: F811
    state = official_state_dict(seed=5)
    for key in state:  # tame the random network so 6 SDE steps stay of order one
        if key.startswith("final_layer.linear"):
            state[key] = state[key] * 0.05
    checkpoint = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(state, checkpoint)
    folder = convert(sit, checkpoint, tmp_path / "pipe", "--vae", str(vae_folder), "--num_attention_heads", "2")
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    scheduler = pipe.scheduler
    assert isinstance(scheduler, FlowScheduler)
    assert (scheduler.config.sampler, scheduler.config.path, scheduler.config.diffusion_form) == (
        "euler_maruyama", "linear", "sigma",
    )  # fmt: skip
    noise = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    ours = pipe(LABELS, num_inference_steps=6, guidance_scale=1.5, guidance_channels=3, latents=noise,
                generator=torch.Generator().manual_seed(5), output_type="latent").images  # fmt: skip
    with torch.no_grad():
        official = sit_euler_maruyama_sampler(
            lambda x, t, y: sit_forward(state, x, t, y), noise, LABELS, 6, torch.Generator().manual_seed(5), 1.5
        )
    assert (ours.double() - official).abs().max().item() < 1e-5 * max(1.0, official.abs().max().item())

    card = (folder / "README.md").read_text()
    assert "license: mit" in card and "willisma/SiT" in card and "dl.dropboxusercontent.com" in card


def test_sit_training_checkpoint_takes_the_ema(tmp_path):
    ema, live = official_state_dict(seed=1), official_state_dict(seed=2)
    checkpoint = tmp_path / "0400000.pt"
    torch.save({"model": live, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="SiT-XL/2")}, checkpoint)  # fmt: skip
    model = sit.load_sit_checkpoint(checkpoint, num_attention_heads=HEADS)
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc1.weight"], ema["blocks.1.mlp.fc1.weight"])


# --- REPA --------------------------------------------------------------------------------------------------------


def test_repa_last_pt_converts_with_the_official_outputs_and_drops_the_projectors(tmp_path, vae_folder, capsys):  # noqa: F811
    state = official_state_dict(seed=6, learn_sigma=False)
    checkpoint = tmp_path / "last.pt"
    torch.save({**state, **repa_projectors(32)}, checkpoint)  # generate.py: model.load_state_dict(last.pt)
    folder = convert(repa, checkpoint, tmp_path / "pipe", "--vae", str(vae_folder), "--num_attention_heads", "2")
    assert "left out 1 REPA projector(s): 6 tensors" in capsys.readouterr().out
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    model = pipe.transformer
    assert type(model) is DiTModel and model.config.out_channels == 4 and model.config.time_input == "noise_at_1"
    x = torch.randn(3, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([3, CLASSES, 0])
    with torch.no_grad():
        expected = repa_forward(state, x, t, y)
        torch.testing.assert_close(model(x, t, y).sample, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())

    scheduler = pipe.scheduler
    assert (scheduler.config.sampler, scheduler.config.path, scheduler.config.diffusion_form) == (
        "euler_maruyama", "linear", "time",
    )  # fmt: skip
    card = (folder / "README.md").read_text()
    assert "license: mit" in card and "sihyun-yu/REPA" in card and "dl.dropboxusercontent.com" in card
    assert "1.8" in card and "0.7" in card and "250" in card
    assert "FID 1.80 (Table 4) guides every step with scale 1.35: `guidance_scale=1.35`" in card


def test_repa_pipeline_equals_repas_euler_maruyama_sampler_with_the_guidance_interval(tmp_path):
    state = official_state_dict(seed=7, learn_sigma=False)
    for key in state:
        if key.startswith("final_layer.linear"):
            state[key] = state[key] * 0.05
    checkpoint = tmp_path / "0100000.pt"
    torch.save({"model": official_state_dict(seed=8, learn_sigma=False), "ema": {**state, **repa_projectors(32)},
                "opt": {"state": {}, "param_groups": []}, "args": argparse.Namespace(model="SiT-XL/2"),
                "steps": 100000}, checkpoint)  # fmt: skip
    model, projectors = repa.load_repa_checkpoint(checkpoint, num_attention_heads=HEADS)
    assert len(projectors) == 6
    scheduler = FlowScheduler(sampler="euler_maruyama", path="linear", diffusion_form="time")
    pipe = ClassConditionalPipeline(transformer=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    ours = pipe(LABELS, num_inference_steps=6, guidance_scale=1.8, guidance_interval=(0.0, 0.7), latents=noise,
                generator=torch.Generator().manual_seed(5), output_type="latent").images  # fmt: skip
    with torch.no_grad():
        official = repa_euler_maruyama_sampler(
            lambda x, t, y: (repa_forward(state, x, t, y),), noise, LABELS, 6, torch.Generator().manual_seed(5),
            1.8, 0.0, 0.7,
        )  # fmt: skip
    assert (ours.double() - official).abs().max().item() < 1e-5 * max(1.0, official.abs().max().item())


def test_repa_qk_norm_and_legacy_decoder_blocks(tmp_path):
    state = official_state_dict(seed=9, depth=3, learn_sigma=False, qk_norm=True)
    # generate.py --legacy: the blocks after encoder_depth (here 1) were saved as decoder_blocks.{i - 1}.
    legacy = {re_key(key): value for key, value in state.items()}
    checkpoint = tmp_path / "legacy.pt"
    torch.save({**legacy, **repa_projectors(32, count=2)}, checkpoint)
    model, projectors = repa.load_repa_checkpoint(checkpoint, num_attention_heads=HEADS)
    assert model.config.use_qk_norm and len(projectors) == 12
    x = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        expected = repa_forward(state, x, t, LABELS)
        torch.testing.assert_close(
            model(x, t, LABELS).sample, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item()
        )


def re_key(key):
    parts = key.split(".")
    if parts[0] == "blocks" and int(parts[1]) >= 1:
        return ".".join(["decoder_blocks", str(int(parts[1]) - 1), *parts[2:]])
    return key


def test_truncated_repa_and_sit_files_name_the_missing_keys(tmp_path):
    state = official_state_dict(learn_sigma=False)
    del state["blocks.1.attn.qkv.bias"]
    checkpoint = tmp_path / "last.pt"
    torch.save({**state, **repa_projectors(32)}, checkpoint)
    with pytest.raises(CheckpointFormatError) as error:
        repa.load_repa_checkpoint(checkpoint, num_attention_heads=HEADS)
    message = str(error.value)
    assert "REPA" in message and "missing keys [blocks.1.attn.qkv.bias]" in message and "projectors" not in message

    cut = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(official_state_dict(), cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    with pytest.raises(CheckpointFormatError, match="willisma/SiT.*truncated or not a torch file"):
        sit.load_sit_checkpoint(cut, num_attention_heads=HEADS)


def test_the_convert_command_lists_sit_and_repa():
    from diffusers_speedup.convert import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"sit", "repa"} <= set(choices)
