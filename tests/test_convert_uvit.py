"""U-ViT conversion: checkpoints written here in baofff/U-ViT's layout, against a forward written from libs/uvit.py."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_speedup.convert import uvit as convert
from diffusers_speedup.convert.common import CheckpointFormatError


def official_shapes(depth, dim, channels, patch, image, label_rows, conv=True, mlp_ratio=4):
    """Every tensor of libs/uvit.py's UViT (mlp_time_embed=False, qkv_bias=False), by its state-dict name."""
    extras = 2 if label_rows else 1
    hidden = mlp_ratio * dim
    shapes = {
        "patch_embed.proj.weight": (dim, channels, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "pos_embed": (1, extras + (image // patch) ** 2, dim),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "decoder_pred.weight": (patch * patch * channels, dim),
        "decoder_pred.bias": (patch * patch * channels,),
    }
    if label_rows:
        shapes["label_emb.weight"] = (label_rows, dim)
    if conv:
        shapes["final_layer.weight"] = (channels, channels, 3, 3)
        shapes["final_layer.bias"] = (channels,)
    blocks = [f"in_blocks.{i}." for i in range(depth // 2)] + ["mid_block."]
    blocks += [f"out_blocks.{i}." for i in range(depth // 2)]
    for prefix in blocks:
        shapes.update({
            prefix + "norm1.weight": (dim,), prefix + "norm1.bias": (dim,),
            prefix + "attn.qkv.weight": (3 * dim, dim),
            prefix + "attn.proj.weight": (dim, dim), prefix + "attn.proj.bias": (dim,),
            prefix + "norm2.weight": (dim,), prefix + "norm2.bias": (dim,),
            prefix + "mlp.fc1.weight": (hidden, dim), prefix + "mlp.fc1.bias": (hidden,),
            prefix + "mlp.fc2.weight": (dim, hidden), prefix + "mlp.fc2.bias": (dim,),
        })  # fmt: skip
        if prefix.startswith("out_blocks"):
            shapes[prefix + "skip_linear.weight"] = (dim, 2 * dim)
            shapes[prefix + "skip_linear.bias"] = (dim,)
    return shapes


def official_state_dict(seed=0, **architecture):
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator) * (0.3 if len(shape) > 1 else 0.1) + (key.endswith("norm1.weight"))
        for key, shape in official_shapes(**architecture).items()
    }


def official_forward(w, x, timesteps, y, num_heads):
    """libs/uvit.py UViT.forward: label token first, then the time token; sinusoidal time of `timesteps` as fed."""
    dim = w["patch_embed.proj.weight"].shape[0]
    channels, patch = w["patch_embed.proj.weight"].shape[1], w["patch_embed.proj.weight"].shape[2]
    h = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    time_token = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    h = torch.cat([time_token[:, None], h], dim=1)
    if y is not None:
        h = torch.cat([w["label_emb.weight"][y][:, None], h], dim=1)
    h = h + w["pos_embed"]

    def block(prefix, h, skip=None):
        if skip is not None:
            h = torch.cat([h, skip], -1) @ w[prefix + "skip_linear.weight"].T + w[prefix + "skip_linear.bias"]
        batch, length, _ = h.shape
        a = F.layer_norm(h, (dim,), w[prefix + "norm1.weight"], w[prefix + "norm1.bias"])
        qkv = (a @ w[prefix + "attn.qkv.weight"].T).reshape(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        attention = (qkv[0] @ qkv[1].transpose(-2, -1) * (dim // num_heads) ** -0.5).softmax(-1)
        a = (attention @ qkv[2]).transpose(1, 2).reshape(batch, length, dim)
        h = h + a @ w[prefix + "attn.proj.weight"].T + w[prefix + "attn.proj.bias"]
        m = F.layer_norm(h, (dim,), w[prefix + "norm2.weight"], w[prefix + "norm2.bias"])
        m = F.gelu(m @ w[prefix + "mlp.fc1.weight"].T + w[prefix + "mlp.fc1.bias"])
        return h + m @ w[prefix + "mlp.fc2.weight"].T + w[prefix + "mlp.fc2.bias"]

    skips = []
    half_depth = sum(key.endswith("norm1.weight") and key.startswith("in_blocks") for key in w)
    for i in range(half_depth):
        h = block(f"in_blocks.{i}.", h)
        skips.append(h)
    h = block("mid_block.", h)
    for i in range(half_depth):
        h = block(f"out_blocks.{i}.", h, skips.pop())
    h = F.layer_norm(h, (dim,), w["norm.weight"], w["norm.bias"]) @ w["decoder_pred.weight"].T + w["decoder_pred.bias"]
    h = h[:, 2 if y is not None else 1 :]
    side = x.shape[-1] // patch  # einops 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'
    h = h.reshape(x.shape[0], side, side, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    image = h.reshape(x.shape[0], channels, side * patch, side * patch)
    if "final_layer.weight" in w:
        image = F.conv2d(image, w["final_layer.weight"], w["final_layer.bias"], padding=1)
    return image


TINY = dict(depth=4, dim=32, channels=4, patch=2, image=8)


@pytest.mark.parametrize("time_input", ["discrete", "continuous"])
@pytest.mark.parametrize("label_rows, conv", [(1001, False), (0, True)])
def test_converted_model_gives_the_official_outputs(time_input, label_rows, conv):
    state = official_state_dict(**TINY, label_rows=label_rows, conv=conv)
    model, release, used = convert.convert_uvit_state_dict(state, num_heads=4, time_input=time_input)
    assert release is None and used == time_input
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0, 417, 999])  # the scheduler's timesteps
    # What the official trainers feed for those noise levels: n = t + 1, or 999 · s with s = (t + 1) / 1000.
    official_t = (t + 1).float() if time_input == "discrete" else 999 * ((t + 1).float() / 1000)
    y = torch.tensor([0, 7, 1000]) if label_rows else None  # 1000: the null label
    with torch.no_grad():
        expected = official_forward(state, x, official_t, y, num_heads=4)
        torch.testing.assert_close(model(x, t, y).sample, expected, atol=1e-4, rtol=1e-4)
    assert model.config.num_classes == (1000 if label_rows else 0)


def test_a_label_table_without_null_row_gets_a_zero_row():
    state = official_state_dict(**TINY, label_rows=10)  # ImageNet-64 style: trained without a null label
    model, _, _ = convert.convert_uvit_state_dict(state, num_heads=4, time_input="continuous")
    assert model.config.num_classes == 10
    torch.testing.assert_close(model.class_embed.weight[:10], state["label_emb.weight"])
    assert torch.equal(model.class_embed.weight[10], torch.zeros(32))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([9, 2])
    with torch.no_grad():
        expected = official_forward(state, x, 999 * ((t + 1).float() / 1000), y, num_heads=4)
        torch.testing.assert_close(model(x, t, y).sample, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(convert.RELEASES))
def test_every_release_is_recognised_from_its_shapes_with_the_official_size(name):
    release = convert.RELEASES[name]
    shapes = official_shapes(
        release.depth, release.hidden_size, release.in_channels, release.patch_size, release.sample_size,
        release.label_rows, conv=release.conv,
    )  # fmt: skip
    with torch.device("meta"):
        state = {key: torch.empty(shape) for key, shape in shapes.items()}
        architecture = convert.infer_architecture(state)
        assert convert.find_release(architecture) is release
        model, found, time_input = convert.convert_uvit_state_dict(state)
    assert found is release and time_input == ("discrete" if "huge" in name else "continuous")
    official = sum(math.prod(shape) for shape in shapes.values())
    added_null_row = release.hidden_size if release.label_rows == 1000 else 0
    assert sum(p.numel() for p in model.parameters()) == official + added_null_row
    assert model.config.num_attention_heads == release.num_heads


def test_schedulers_reproduce_the_official_noise_levels_at_the_time_input_the_model_receives():
    t = torch.arange(1000)
    # train_ldm_discrete.py: betas[1..1000] = stable_diffusion_beta_schedule(), alpha_bar_n = prod_{i<=n}(1 - betas[i]).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    official_alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
    discrete = convert.uvit_scheduler("discrete")
    n = convert.timestep_mapping("discrete")
    fed = (t * n["timestep_scale"] + n["timestep_shift"]).long()
    torch.testing.assert_close(discrete.alphas_cumprod.double(), official_alpha_bar[fed], rtol=1e-5, atol=0)
    # sde.VPSDE: alpha_bar(s) = exp(-(0.1 s + (20 - 0.1) s^2 / 2)); the network is fed 999 s.
    continuous = convert.uvit_scheduler("continuous")
    mapping = convert.timestep_mapping("continuous")
    s = (t * mapping["timestep_scale"] + mapping["timestep_shift"]).double() / 999
    torch.testing.assert_close(
        continuous.alphas_cumprod.double(), torch.exp(-(0.1 * s + 9.95 * s**2)), rtol=1e-5, atol=0
    )


def test_wrong_or_broken_files_get_one_error_naming_the_keys(tmp_path):
    state = official_state_dict(**TINY, label_rows=1001)
    truncated = tmp_path / "truncated.pth"
    torch.save(state, tmp_path / "full.pth")
    truncated.write_bytes((tmp_path / "full.pth").read_bytes()[:2000])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        convert.load_uvit_checkpoint(truncated, num_heads=4, time_input="discrete")

    missing = dict(state)
    del missing["out_blocks.1.skip_linear.weight"]
    with pytest.raises(CheckpointFormatError, match=r"missing keys \[out_blocks\.1\.skip_linear\.weight\]"):
        convert.convert_uvit_state_dict(missing, num_heads=4, time_input="discrete")

    # A Min-SNR ViT (guided_diffusion/vision_transformer.py) is another architecture.
    minsnr = {
        "patch_embed.proj.weight": torch.zeros(32, 4, 2, 2), "patch_embed.proj.bias": torch.zeros(32),
        "pos_embed": torch.zeros(1, 18, 32), "blocks.0.attn.q_bias": torch.zeros(32),
        "blocks.0.attn.qkv.weight": torch.zeros(96, 32), "linear_projection.weight": torch.zeros(16, 32),
        "time_embedding.weight": torch.zeros(4000, 32), "class_embedding.weight": torch.zeros(1001, 32),
    }  # fmt: skip
    with pytest.raises(CheckpointFormatError) as error:
        convert.convert_uvit_state_dict(minsnr, num_heads=4, time_input="discrete")
    message = str(error.value)
    assert "missing keys [decoder_pred.bias" in message and "mid_block.attn.qkv.weight" in message
    assert "unexpected keys [blocks.0.attn.q_bias" in message and "time_embedding.weight" in message

    wrong = dict(state, **{"mid_block.mlp.fc2.bias": torch.zeros(31)})
    with pytest.raises(CheckpointFormatError, match=r"mid_block\.mlp\.fc2\.bias \(31,\) \(expected \(32,\)\)"):
        convert.convert_uvit_state_dict(wrong, num_heads=4, time_input="discrete")

    with pytest.raises(CheckpointFormatError, match="match no released U-ViT.*--num_heads and --time_input"):
        convert.convert_uvit_state_dict(state)
    with pytest.raises(CheckpointFormatError, match="do not fit the official config imagenet256_uvit_huge"):
        convert.convert_uvit_state_dict(state, config="imagenet256_uvit_huge")


def tiny_vae_folder(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=1.0,
    )  # fmt: skip
    vae.save_pretrained(path)
    return path


def test_command_writes_a_pipeline_that_loads_and_samples(tmp_path):
    from diffusers_speedup import ClassConditionalPipeline

    state = official_state_dict(**TINY, label_rows=1001)
    checkpoint = tmp_path / "nnet_ema.pth"
    torch.save(state, checkpoint)
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--output_dir")
    convert.add_arguments(parser)
    args = parser.parse_args([
        str(checkpoint), "--output_dir", str(tmp_path / "out"), "--num_heads", "4", "--time_input", "discrete",
        "--vae", str(tiny_vae_folder(tmp_path / "vae")),
    ])  # fmt: skip
    folder = convert.run(args)
    card = (folder / "README.md").read_text()
    assert "license: mit" in card and convert.SOURCE in card
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == convert.VAE_SCALING_FACTOR

    pipe = ClassConditionalPipeline.from_pretrained(folder)
    assert pipe.transformer.config.timestep_shift == 1.0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 990])
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.transformer(x, t, torch.tensor([3, 1000])).sample,
            official_forward(state, x, (t + 1).float(), torch.tensor([3, 1000]), num_heads=4),
            atol=1e-4,
            rtol=1e-4,
        )
    images = pipe([1, 2], num_inference_steps=2, guidance_scale=1.4, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and (images >= 0).all() and (images <= 1).all()


def test_a_pixel_model_refuses_a_vae(tmp_path):
    state = official_state_dict(**dict(TINY, channels=3), label_rows=0)
    torch.save(state, tmp_path / "nnet.pth")
    with pytest.raises(ValueError, match="pixel-space U-ViT .* takes no --vae"):
        convert.convert_uvit_checkpoint(
            tmp_path / "nnet.pth", tmp_path / "out", num_heads=4, time_input="continuous", vae="some/vae"
        )


def test_the_convert_command_runs_the_uvit_format(tmp_path, monkeypatch, capsys):
    import diffusers_speedup.convert as command

    monkeypatch.setattr(command, "FORMATS", {"uvit": "uvit", "minsnr-vit": "minsnr_vit"})  # formats of this file
    torch.save(official_state_dict(**dict(TINY, channels=3), label_rows=0), tmp_path / "nnet_ema.pth")
    argv = ["uvit", str(tmp_path / "nnet_ema.pth"), "--output_dir", str(tmp_path / "out"), "--num_heads", "4"]
    assert command.main([*argv, "--time_input", "continuous"]) == 0
    assert (tmp_path / "out" / "model_index.json").is_file() and "wrote" in capsys.readouterr().out
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"broken.pth: .*a U-ViT nnet.pth"):
        command.main(["uvit", str(tmp_path / "broken.pth"), "--output_dir", str(tmp_path / "x")])
