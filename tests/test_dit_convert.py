"""Converting facebookresearch/DiT .pt checkpoints: files built here in the official layout, compared against a
reference forward pass written from the official models.py (not from DiTModel)."""

import argparse
import importlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

from diffusers_speedup import ClassConditionalPipeline, DiTModel
from diffusers_speedup.convert import CheckpointFormatError, dit

HIDDEN, HEADS, DEPTH, PATCH, LATENT, CLASSES = 32, 2, 2, 2, 8, 10


# --- the official layout, from scratch ---------------------------------------------------------------------------


def official_pos_embed(dim, grid_size):
    """MAE's get_2d_sincos_pos_embed (numpy, float64), as DiT calls it."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    grid = grid.reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def official_state_dict(
    hidden=HIDDEN, depth=DEPTH, patch=PATCH, latent=LATENT, classes=CLASSES, channels=4, seed=0, learn_sigma=True,
    qk_norm=False,
):  # fmt: skip
    """A state dict with the key names and shapes of the official DiT(learn_sigma=True), random non-zero values
    (SiT's is the same; REPA's SiT has learn_sigma=False and, with --qk-norm, timm's q_norm / k_norm LayerNorms)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    out = 2 * channels if learn_sigma else channels
    state = {
        "pos_embed": torch.from_numpy(official_pos_embed(hidden, latent // patch)).float()[None],
        "x_embedder.proj.weight": rand(hidden, channels, patch, patch),
        "x_embedder.proj.bias": rand(hidden),
        "t_embedder.mlp.0.weight": rand(hidden, 256),
        "t_embedder.mlp.0.bias": rand(hidden),
        "t_embedder.mlp.2.weight": rand(hidden, hidden),
        "t_embedder.mlp.2.bias": rand(hidden),
        "y_embedder.embedding_table.weight": rand(classes + 1, hidden),
    }
    for i in range(depth):
        for name, (rows, cols) in {
            "attn.qkv": (3 * hidden, hidden),
            "attn.proj": (hidden, hidden),
            "mlp.fc1": (4 * hidden, hidden),
            "mlp.fc2": (hidden, 4 * hidden),
            "adaLN_modulation.1": (6 * hidden, hidden),
        }.items():
            state[f"blocks.{i}.{name}.weight"] = rand(rows, cols)
            state[f"blocks.{i}.{name}.bias"] = rand(rows)
        if qk_norm:
            for name in ("q_norm", "k_norm"):
                state[f"blocks.{i}.attn.{name}.weight"] = 1 + rand(hidden // HEADS)
                state[f"blocks.{i}.attn.{name}.bias"] = rand(hidden // HEADS)
    state["final_layer.linear.weight"] = rand(patch * patch * out, hidden)
    state["final_layer.linear.bias"] = rand(patch * patch * out)
    state["final_layer.adaLN_modulation.1.weight"] = rand(2 * hidden, hidden)
    state["final_layer.adaLN_modulation.1.bias"] = rand(2 * hidden)
    return state


def reference_forward(state, x, t, y, heads=HEADS):
    """The official DiT.forward in eval mode, written out with functional ops (timm's affine LayerNorm QK-norm, eps
    1e-5, when the state has it)."""

    def linear(h, name):
        return F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    patch = state["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + state["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(state["t_embedder.mlp.0.weight"].dtype)
    c = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + state["y_embedder.embedding_table.weight"][y]
    batch, tokens, dim = h.shape
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    for i in range(depth):
        block = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), f"{block}.adaLN_modulation.1").chunk(6, 1)
        a = modulate(F.layer_norm(h, (dim,), eps=1e-6), shift1, scale1)
        q, k, v = linear(a, f"{block}.attn.qkv").reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        if f"{block}.attn.q_norm.weight" in state:
            q, k = (
                F.layer_norm(x, (dim // heads,), state[f"{block}.attn.{n}.weight"], state[f"{block}.attn.{n}.bias"])
                for x, n in ((q, "q_norm"), (k, "k_norm"))
            )
        weights = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
        a = (weights.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        h = h + gate1[:, None] * linear(a, f"{block}.attn.proj")
        m = modulate(F.layer_norm(h, (dim,), eps=1e-6), shift2, scale2)
        m = linear(F.gelu(linear(m, f"{block}.mlp.fc1"), approximate="tanh"), f"{block}.mlp.fc2")
        h = h + gate2[:, None] * m
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(F.layer_norm(h, (dim,), eps=1e-6), shift, scale), "final_layer.linear")
    out = h.shape[-1] // patch**2
    side = int(tokens**0.5)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(batch, side, side, patch, patch, out))
    return h.reshape(batch, out, side * patch, side * patch)


def assert_official(actual, expected):
    """Equal to float32 precision, relative to the output's scale (random weights give outputs of order 10-100)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def sample_inputs(batch=3, latent=LATENT, classes=CLASSES):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 4, latent, latent, generator=generator)
    t = torch.tensor([0, 500, 999][:batch])
    y = torch.tensor([3, classes, 0][:batch])
    return x, t, y


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    AutoencoderKL(down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                  layers_per_block=1, latent_channels=4, norm_num_groups=8).save_pretrained(folder)  # fmt: skip
    return folder


def convert(checkpoint, output_dir, *options):
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--output_dir", required=True)
    dit.add_arguments(parser)
    return dit.run(parser.parse_args([str(checkpoint), "--output_dir", str(output_dir), *options]))


# --- tests -------------------------------------------------------------------------------------------------------


def test_reference_forward_is_the_official_network_at_init():
    # A sanity check of the reference itself: with DiT's zero-initialised final layer the output is zero.
    state = official_state_dict()
    state["final_layer.linear.weight"].zero_()
    state["final_layer.linear.bias"].zero_()
    assert not reference_forward(state, *sample_inputs()).any()


def test_released_file_converts_to_a_pipeline_with_the_official_outputs(tmp_path, vae_folder):
    state = official_state_dict()
    checkpoint = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(state, checkpoint)
    folder = convert(checkpoint, tmp_path / "pipeline", "--vae", str(vae_folder), "--num_attention_heads", "2")

    pipe = ClassConditionalPipeline.from_pretrained(folder)
    model = pipe.transformer
    assert type(model) is DiTModel and not model.pos_embed.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "pos_embed")
    assert (model.config.num_layers, model.config.hidden_size) == (DEPTH, HIDDEN)
    assert (model.config.sample_size, model.config.out_channels, model.config.num_classes) == (LATENT, 8, CLASSES)
    x, t, y = sample_inputs()
    with torch.no_grad():
        assert_official(model(x, t, y).sample, reference_forward(state, x, t, y))

    # DiT's sampler: DDPM with the learned variance, no clipping, 1000 steps respaced evenly.
    scheduler = pipe.scheduler
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type == "learned_range"
    assert not scheduler.config.clip_sample and scheduler.config.timestep_spacing == "linspace"
    scheduler.set_timesteps(250)
    expected = [round(i * 999 / 249) for i in range(250)][::-1]  # DiT's space_timesteps(1000, "250")
    assert scheduler.timesteps.tolist() == expected
    images = pipe([1, 2], num_inference_steps=3, guidance_scale=1.5, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()

    card = (folder / "README.md").read_text()
    assert "cc-by-nc-4.0" in card and "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in card
    assert json.loads((folder / "model_index.json").read_text())["transformer"] == ["dit_transformer", "DiTModel"]


def test_training_checkpoint_takes_the_ema_or_the_model_weights(tmp_path):
    ema, live = official_state_dict(seed=1), official_state_dict(seed=2)
    checkpoint = tmp_path / "0400000.pt"
    # train.py's layout, including its argparse.Namespace of arguments.
    torch.save({"model": live, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=64)}, checkpoint)  # fmt: skip
    x, t, y = sample_inputs()
    for weights, state in (("ema", ema), ("model", live)):
        model = dit.load_dit_checkpoint(checkpoint, weights=weights, num_attention_heads=HEADS)
        with torch.no_grad():
            assert_official(model(x, t, y).sample, reference_forward(state, x, t, y))


def test_shapes_give_the_architecture_and_the_paper_sizes_give_the_heads(tmp_path):
    # DiT-S width (384 → 6 heads by Table 1), patch 4, 16×16 latents (128 px), 7 classes, 1 block.
    state = official_state_dict(hidden=384, depth=1, patch=4, latent=16, classes=7)
    checkpoint = tmp_path / "s4.pt"
    torch.save(state, checkpoint)
    model = dit.load_dit_checkpoint(checkpoint)
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.patch_size, config.sample_size) == (384, 6, 4, 16)
    assert (config.num_layers, config.num_classes, config.in_channels, config.out_channels) == (1, 7, 4, 8)
    x, t, y = sample_inputs(latent=16, classes=7)
    with torch.no_grad():
        expected = reference_forward(state, x, t, y, heads=6)
        assert_official(model(x, t, y).sample, expected)


def test_unknown_width_needs_the_number_of_heads(tmp_path):
    checkpoint = tmp_path / "odd.pt"
    torch.save(official_state_dict(), checkpoint)
    with pytest.raises(CheckpointFormatError, match="hidden size 32 .*--num_attention_heads"):
        dit.load_dit_checkpoint(checkpoint)


def test_truncated_state_dict_names_the_missing_keys(tmp_path):
    state = official_state_dict(depth=3)
    del state["blocks.1.mlp.fc2.weight"], state["final_layer.linear.bias"]
    checkpoint = tmp_path / "partial.pt"
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointFormatError) as error:
        dit.load_dit_checkpoint(checkpoint, num_attention_heads=HEADS)
    message = str(error.value)
    assert "missing keys" in message and "blocks.1.mlp.fc2.weight" in message
    assert "final_layer.linear.bias" in message and "unexpected" not in message


def test_truncated_file_is_one_clear_error(tmp_path):
    checkpoint = tmp_path / "cut.pt"
    torch.save(official_state_dict(), checkpoint)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or not a torch file"):
        dit.load_dit_checkpoint(checkpoint, num_attention_heads=HEADS)


def test_another_architectures_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    # A U-ViT nnet.pth: its own key names.
    uvit = {"patch_embed.proj.weight": torch.zeros(8, 4, 2, 2), "pos_embed": torch.zeros(1, 18, 8),
            "in_blocks.0.attn.qkv.weight": torch.zeros(24, 8), "label_emb.weight": torch.zeros(11, 8)}  # fmt: skip
    checkpoint = tmp_path / "nnet_ema.pth"
    torch.save(uvit, checkpoint)
    with pytest.raises(CheckpointFormatError) as error:
        dit.load_dit_checkpoint(checkpoint)
    message = str(error.value)
    # The preview lists the first missing keys in order and counts them all (the 11 outside the blocks).
    assert "nnet_ema.pth" in message and "missing keys [final_layer.adaLN_modulation.1.bias" in message
    assert "(11 in all)" in message
    assert "unexpected keys" in message and "in_blocks.0.attn.qkv.weight" in message and "label_emb.weight" in message


def test_inconsistent_shapes_are_a_format_error(tmp_path):
    state = official_state_dict()
    state["blocks.1.attn.proj.weight"] = torch.zeros(HIDDEN, HIDDEN + 1)
    checkpoint = tmp_path / "bad.pt"
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointFormatError, match=r"blocks\.1\.attn\.proj\.weight"):
        dit.load_dit_checkpoint(checkpoint, num_attention_heads=HEADS)


def test_pickled_code_is_refused(tmp_path):
    checkpoint = tmp_path / "evil.pt"
    torch.save({"ema": official_state_dict(), "hook": np.dtype}, checkpoint)
    with pytest.raises(CheckpointFormatError, match="plain tensors"):
        dit.read_dit_state_dict(checkpoint)


def test_the_convert_command_lists_dit(tmp_path, vae_folder):
    for module in ("uvit", "minsnr_vit", "edm2"):  # the command builds every format's options
        try:
            importlib.import_module(f"diffusers_speedup.convert.{module}")
        except ModuleNotFoundError:
            pytest.skip(f"diffusers_speedup.convert.{module} is not available here")
    from diffusers_speedup.convert import main

    checkpoint = tmp_path / "DiT.pt"
    torch.save(official_state_dict(), checkpoint)
    args = ["dit", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--vae", str(vae_folder)]
    assert main([*args, "--num_attention_heads", "2"]) == 0
    assert (tmp_path / "out" / "transformer" / "config.json").is_file()
