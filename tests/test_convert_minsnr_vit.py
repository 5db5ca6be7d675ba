"""Min-SNR ViT conversion: checkpoints written here in the official layout, against a forward written from
guided_diffusion/vision_transformer.py."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_speedup.convert import minsnr_vit as convert
from diffusers_speedup.convert.common import CheckpointFormatError
from diffusers_speedup.models.uvit import UVIT_PRESETS


def official_shapes(depth, dim, channels, patch, image, label_rows, time_rows=4000, out_dim=None, mean_pool=True,
                    conv_last=False, mlp_ratio=4):  # fmt: skip
    """Every tensor of the official VisionTransformer (qkv_bias=True, no relative position bias), by name."""
    out_dim = out_dim or channels
    hidden = mlp_ratio * dim
    shapes = {
        "patch_embed.proj.weight": (dim, channels, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "pos_embed": (1, (image // patch) ** 2 + (2 if label_rows else 1), dim),
        "linear_projection.weight": (out_dim * patch * patch, dim),
        "linear_projection.bias": (out_dim * patch * patch,),
        "time_embedding.weight": (time_rows, dim),
    }
    if label_rows:
        shapes["class_embedding.weight"] = (label_rows, dim)
    if not mean_pool:
        shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    if conv_last:
        shapes.update({"to_pixel.weight": (out_dim, out_dim, 3, 3), "to_pixel.bias": (out_dim,)})
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.norm1.weight": (dim,), f"blocks.{i}.norm1.bias": (dim,),
            f"blocks.{i}.attn.q_bias": (dim,), f"blocks.{i}.attn.v_bias": (dim,),
            f"blocks.{i}.attn.qkv.weight": (3 * dim, dim),
            f"blocks.{i}.attn.proj.weight": (dim, dim), f"blocks.{i}.attn.proj.bias": (dim,),
            f"blocks.{i}.norm2.weight": (dim,), f"blocks.{i}.norm2.bias": (dim,),
            f"blocks.{i}.mlp.fc1.weight": (hidden, dim), f"blocks.{i}.mlp.fc1.bias": (hidden,),
            f"blocks.{i}.mlp.fc2.weight": (dim, hidden), f"blocks.{i}.mlp.fc2.bias": (dim,),
        })  # fmt: skip
    return shapes


def official_state_dict(seed=0, **architecture):
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator) * (0.3 if len(shape) > 1 else 0.1) + key.endswith("norm1.weight")
        for key, shape in official_shapes(**architecture).items()
    }


def official_forward(w, x, timesteps, y, num_heads):
    """VisionTransformer.forward: [time, class, patches] + pos_embed, BEiT blocks (eps 1e-6), identity norm."""
    dim, channels, patch = w["patch_embed.proj.weight"].shape[:3]
    h = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    extra = [w["time_embedding.weight"][timesteps][:, None]]
    if y is not None:
        extra.append(w["class_embedding.weight"][y][:, None])
    h = torch.cat([*extra, h], dim=1) + w["pos_embed"]
    depth = sum(key.endswith("norm1.weight") for key in w)
    for i in range(depth):
        b = f"blocks.{i}."
        batch, length, _ = h.shape
        a = F.layer_norm(h, (dim,), w[b + "norm1.weight"], w[b + "norm1.bias"], eps=1e-6)
        bias = torch.cat([w[b + "attn.q_bias"], torch.zeros_like(w[b + "attn.v_bias"]), w[b + "attn.v_bias"]])
        qkv = (
            F.linear(a, w[b + "attn.qkv.weight"], bias).reshape(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        )
        q = qkv[0] * (dim // num_heads) ** -0.5
        a = ((q @ qkv[1].transpose(-2, -1)).softmax(-1) @ qkv[2]).transpose(1, 2).reshape(batch, length, -1)
        h = h + F.linear(a, w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
        m = F.layer_norm(h, (dim,), w[b + "norm2.weight"], w[b + "norm2.bias"], eps=1e-6)
        m = F.linear(F.gelu(F.linear(m, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"])), w[b + "mlp.fc2.weight"])
        h = h + m + w[b + "mlp.fc2.bias"]
    if "norm.weight" in w:
        h = F.layer_norm(h, (dim,), w["norm.weight"], w["norm.bias"], eps=1e-6)
    h = F.linear(h[:, len(extra) :], w["linear_projection.weight"], w["linear_projection.bias"])
    out_dim = w["linear_projection.weight"].shape[0] // (patch * patch)
    side = int(h.shape[1] ** 0.5)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(x.shape[0], side, side, patch, patch, out_dim))
    image = h.reshape(x.shape[0], out_dim, side * patch, side * patch)
    if "to_pixel.weight" in w:
        image = F.conv2d(image, w["to_pixel.weight"], w["to_pixel.bias"], padding=1)
    return image


TINY = dict(depth=3, dim=32, channels=4, patch=2, image=8)


@pytest.mark.parametrize(
    "options",
    [
        dict(label_rows=1001),  # as trained with drop_label_prob 0.15: the last row is the null label
        dict(label_rows=10, out_dim=8, mean_pool=False, conv_last=True, time_rows=1000),  # learned σ, norm, conv
        dict(label_rows=0),  # class_cond False
    ],
)
def test_converted_model_gives_the_official_outputs(options):
    state = official_state_dict(**TINY, **options)
    model = convert.convert_minsnr_vit_state_dict(state, num_heads=4)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 321, 999])  # guided-diffusion feeds the DDPM step itself (rescale_timesteps=False)
    labels = options["label_rows"]
    y = None if labels == 0 else torch.tensor([0, 5, 1000]) if labels == 1001 else torch.tensor([0, 5, 9])
    # In float64: in float32 the two attention orders (SDPA, written out) differ by ~1e-5 on some CPUs' kernels.
    state64 = {key: value.double() for key, value in state.items()}
    with torch.no_grad():
        converted = model.double()(x.double(), t, y).sample
        torch.testing.assert_close(converted, official_forward(state64, x.double(), t, y, 4), atol=1e-10, rtol=1e-10)
    if labels == 10:  # no null label in the file: a zero row is added for it
        assert model.config.num_classes == 10 and torch.equal(model.class_embed.weight[10], torch.zeros(32))


@pytest.mark.parametrize("dim, depth, heads", [(768, 12, 12), (1024, 24, 16), (1152, 28, 16)])
def test_official_sizes_convert_to_the_official_parameter_count(dim, depth, heads):
    shapes = official_shapes(depth, dim, 4, 2, 32, label_rows=1001)
    with torch.device("meta"):
        model = convert.convert_minsnr_vit_state_dict({key: torch.empty(shape) for key, shape in shapes.items()})
    official = sum(math.prod(shape) for shape in shapes.values())
    assert sum(p.numel() for p in model.parameters()) == official
    assert model.config.num_attention_heads == heads and model.config.sample_size == 32
    if dim == 768:  # the ViT-B the recipes train is the architecture a converted ViT-B gets
        assert official == 89_109_520
        for key, value in UVIT_PRESETS["vit-b-minsnr"].items():
            assert model.config[key] == value, key


def test_wrong_or_broken_files_get_one_error_naming_the_keys(tmp_path):
    state = official_state_dict(**TINY, label_rows=1001)
    torch.save(state, tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:3000])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        convert.load_minsnr_vit_checkpoint(tmp_path / "truncated.pt", num_heads=4)

    # A U-ViT nnet.pth (baofff/U-ViT libs/uvit.py) is another architecture.
    uvit = {
        "patch_embed.proj.weight": torch.zeros(32, 4, 2, 2), "pos_embed": torch.zeros(1, 18, 32),
        "label_emb.weight": torch.zeros(1001, 32), "in_blocks.0.attn.qkv.weight": torch.zeros(96, 32),
        "mid_block.norm1.weight": torch.zeros(32), "decoder_pred.weight": torch.zeros(16, 32),
    }  # fmt: skip
    with pytest.raises(CheckpointFormatError) as error:
        convert.convert_minsnr_vit_state_dict(uvit, num_heads=4)
    message = str(error.value)
    assert "missing keys [linear_projection.bias, linear_projection.weight, patch_embed.proj.bias" in message
    assert "unexpected keys [decoder_pred.weight, in_blocks.0.attn.qkv.weight, label_emb.weight" in message

    missing = {key: value for key, value in state.items() if key != "blocks.2.attn.v_bias"}
    with pytest.raises(CheckpointFormatError, match=r"missing keys \[blocks\.2\.attn\.v_bias\]"):
        convert.convert_minsnr_vit_state_dict(missing, num_heads=4)
    wrong = dict(state, **{"blocks.1.attn.q_bias": torch.zeros(33)})
    with pytest.raises(CheckpointFormatError, match=r"blocks\.1\.attn\.q_bias \(33,\) \(expected \(32,\)\)"):
        convert.convert_minsnr_vit_state_dict(wrong, num_heads=4)
    with pytest.raises(CheckpointFormatError, match="width 32 .* pass --num_heads"):
        convert.convert_minsnr_vit_state_dict(state)


def test_command_writes_a_pipeline_that_loads_and_samples(tmp_path):
    from diffusers import AutoencoderKL

    from diffusers_speedup import ClassConditionalPipeline

    state = official_state_dict(**TINY, label_rows=1001)
    torch.save(state, tmp_path / "ema_0.9999_b.pt")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=4, sample_size=8,
    ).save_pretrained(tmp_path / "vae")  # fmt: skip
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--output_dir")
    convert.add_arguments(parser)
    args = parser.parse_args([
        str(tmp_path / "ema_0.9999_b.pt"), "--output_dir", str(tmp_path / "out"), "--num_heads", "4",
        "--vae", str(tmp_path / "vae"),
    ])  # fmt: skip
    folder = convert.run(args)
    card = (folder / "README.md").read_text()
    assert "license: other" in card and convert.SOURCE in card
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "squaredcos_cap_v2" and scheduler["prediction_type"] == "sample"
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215

    pipe = ClassConditionalPipeline.from_pretrained(folder)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([7, 999]), torch.tensor([1, 1000])
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.transformer(x, t, y).sample, official_forward(state, x, t, y, 4), atol=1e-5, rtol=1e-5
        )
    images = pipe([1, 2], num_inference_steps=2, guidance_scale=1.5, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
