"""UViTModel: architecture against a from-the-paper reference, ScaleLong factors, presets, I/O and options."""

import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from diffusers_speedup.models.uvit import UVIT_PRESETS, UViTModel, timestep_embedding

TINY = dict(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_attention_heads=4, num_classes=10)


def tiny(**overrides):
    return UViTModel(**{**TINY, "num_layers": 5, **overrides})


def inputs(batch=3, channels=3, size=8):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.tensor([3.0, 250.0, 999.0])[:batch]
    y = torch.tensor([0, 7, 10])[:batch]  # 10 == num_classes: the null label
    return x, t, y


def reference_forward(model, x, t, labels, skip_factors):
    """U-ViT written out from the paper with plain tensor ops, reading the model's weights by name."""
    w = model.state_dict()
    cfg = model.config
    dim, heads, p = cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size
    eps = cfg.layer_norm_eps

    patches = F.conv2d(x, w["patch_embed.weight"], w["patch_embed.bias"], stride=p).flatten(2).transpose(1, 2)
    half = dim // 2
    freqs = torch.tensor([10000.0 ** (-k / half) for k in range(half)])
    time_token = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    extra = [time_token[:, None]]
    if labels is not None:
        extra.append(w["class_embed.weight"][labels][:, None])
    h = torch.cat([*extra, patches], dim=1) + w["pos_embed"]

    def linear(v, name):
        out = v @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    def block(prefix, h, skip=None):
        if skip is not None:
            h = linear(torch.cat([h, skip], dim=-1), prefix + "skip_linear")
        batch, length, _ = h.shape
        y = F.layer_norm(h, (dim,), w[prefix + "norm1.weight"], w[prefix + "norm1.bias"], eps)
        q, k, v = linear(y, prefix + "attn.qkv").reshape(batch, length, 3, heads, dim // heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
        h = h + linear((attention @ v).transpose(1, 2).reshape(batch, length, dim), prefix + "attn.proj")
        y = F.layer_norm(h, (dim,), w[prefix + "norm2.weight"], w[prefix + "norm2.bias"], eps)
        return h + linear(F.gelu(linear(y, prefix + "mlp.0")), prefix + "mlp.2")

    num_skips = len(skip_factors)
    skips = []
    for j in range(num_skips):
        h = block(f"in_blocks.{j}.", h)
        skips.append(h)
    h = block("mid_block.", h)
    for i in range(num_skips):
        h = block(f"out_blocks.{i}.", h, skip_factors[i] * skips.pop())
    h = linear(F.layer_norm(h, (dim,), w["norm_out.weight"], w["norm_out.bias"], eps), "proj_out")
    h = h[:, len(extra) :]

    channels, side = cfg.in_channels, cfg.sample_size // p
    image = torch.zeros(x.shape[0], channels, cfg.sample_size, cfg.sample_size)
    for r in range(side):
        for c in range(side):
            for p1 in range(p):
                for p2 in range(p):
                    for ch in range(channels):
                        image[:, ch, r * p + p1, c * p + p2] = h[:, r * side + c, (p1 * p + p2) * channels + ch]
    return F.conv2d(image, w["conv_out.weight"], w["conv_out.bias"], padding=1)


@pytest.mark.parametrize(
    "skip_scaling, kappa, num_layers, factors",
    [
        ("none", 0.5, 7, [1.0, 1.0, 1.0]),
        ("inv_sqrt2", 0.5, 7, [2**-0.5] * 3),
        # out-block order (innermost skip first): kappa^2, kappa^1, kappa^0 for the outermost skip
        ("constant", 0.5, 7, [0.25, 0.5, 1.0]),
        ("constant", 0.8, 5, [0.8, 1.0]),
        ("constant", 0.5, 9, [0.125, 0.25, 0.5, 1.0]),
        ("constant", 0.5, 3, [1.0]),
    ],
)
def test_matches_reference_uvit_with_fixed_skip_factors(skip_scaling, kappa, num_layers, factors):
    model = tiny(num_layers=num_layers, skip_scaling=skip_scaling, skip_kappa=kappa).eval()
    assert model.skip_scales() == pytest.approx(factors)
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y).sample
        expected = reference_forward(model, x, t, y, factors)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_none_equals_unscaled_uvit_and_constant_kappa_one():
    torch.manual_seed(3)
    plain = tiny(skip_scaling="none").eval()
    torch.manual_seed(3)
    kappa_one = tiny(skip_scaling="constant", skip_kappa=1.0).eval()
    x, t, y = inputs()
    with torch.no_grad():
        out = plain(x, t, y).sample
        torch.testing.assert_close(out, reference_forward(plain, x, t, y, [1.0, 1.0]), atol=1e-5, rtol=1e-5)
        assert torch.equal(out, kappa_one(x, t, y).sample)


def capture_skips(model):
    """Record each in-block output and the skip half of each out-block's skip_linear input."""
    produced, consumed = [], {}
    handles = [block.register_forward_hook(lambda m, a, out: produced.append(out)) for block in model.in_blocks]
    for i, block in enumerate(model.out_blocks):

        def hook(module, args, i=i):
            consumed[i] = args[0][..., model.config.hidden_size :]

        handles.append(block.skip_linear.register_forward_pre_hook(hook))
    return produced, consumed, handles


def gate_by_hand(gate, skip):
    pooled = skip.mean(dim=-1)
    hidden = torch.relu(pooled @ gate.fc1.weight.T + gate.fc1.bias)
    return torch.sigmoid(hidden @ gate.fc2.weight.T + gate.fc2.bias)[..., None]


@pytest.mark.parametrize("num_layers", [3, 5, 7])
@pytest.mark.parametrize("skip_scaling", ["none", "inv_sqrt2", "constant", "learned", "learned_per_skip"])
def test_each_out_block_receives_the_scalelong_factor(skip_scaling, num_layers):
    kappa = 0.6
    model = tiny(num_layers=num_layers, skip_scaling=skip_scaling, skip_kappa=kappa).eval()
    num_skips = (num_layers - 1) // 2
    assert model.num_skips == num_skips
    produced, consumed, handles = capture_skips(model)
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y)
    for handle in handles:
        handle.remove()
    assert len(consumed) == num_skips
    for i in range(num_skips):
        skip = produced[num_skips - 1 - i]  # out-block i consumes the skip of in-block N-1-i
        if skip_scaling == "none":
            factor = 1.0
        elif skip_scaling == "inv_sqrt2":
            factor = 1 / math.sqrt(2)
        elif skip_scaling == "constant":
            factor = kappa ** (num_skips - 1 - i)
        elif skip_scaling == "learned":
            factor = gate_by_hand(model.skip_gates[0], skip)
        else:
            factor = gate_by_hand(model.skip_gates[i], skip)
        torch.testing.assert_close(consumed[i], factor * skip, atol=1e-6, rtol=1e-6)


def test_learned_gates_have_the_paper_shapes_and_start_from_default_init():
    model = UViTModel(**{**TINY, "sample_size": 16, "num_layers": 7, "skip_scaling": "learned_per_skip"})
    tokens = 2 + (16 // 2) ** 2  # time + class + 64 patches
    assert len(model.skip_gates) == 3
    shared = UViTModel(**{**TINY, "sample_size": 16, "num_layers": 7, "skip_scaling": "learned"})
    assert len(shared.skip_gates) == 1
    for gate in [*model.skip_gates, *shared.skip_gates]:
        assert gate.fc1.weight.shape == (tokens // 16, tokens)
        assert gate.fc1.bias.shape == (tokens // 16,)
        assert gate.fc2.weight.shape == (tokens, tokens // 16)
        assert gate.fc2.bias.shape == (tokens,)
        # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, not U-ViT's
        # trunc-normal(0.02) with zero bias.
        for layer in (gate.fc1, gate.fc2):
            bound = 1 / math.sqrt(layer.in_features)
            assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
            assert layer.weight.std() > bound / 3  # U(-b, b) has std b/sqrt(3)
        out = gate(torch.randn(2, tokens, 32))
        assert out.shape == (2, tokens, 1) and (out > 0).all() and (out < 1).all()
    # the rest of the model has U-ViT's init: timm's trunc_normal_(std=0.02) cuts at +-2 absolute, i.e. ~N(0, 0.02²)
    qkv = model.in_blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx(0.02, rel=0.2) and qkv.abs().max() < 0.2
    assert torch.equal(model.in_blocks[0].mlp[0].bias, torch.zeros(128))
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)


def test_tiny_token_count_still_gets_a_gate():
    model = tiny(skip_scaling="learned")  # 2 + 16 tokens: 18 // 16 = 1 hidden unit
    assert model.skip_gates[0].fc1.out_features == 1
    model_small = tiny(sample_size=4, skip_scaling="learned")  # 6 tokens: hidden width floored to 1
    assert model_small.skip_gates[0].fc1.out_features == 1


def realigned(model):
    """Copy every tensor into freshly allocated memory.

    from_pretrained maps the safetensors file, so weights can start at addresses that are not 64-byte aligned; CPU
    kernels then pick another summation order and the output can move in the last bit although every weight is
    bit-identical. Fresh allocations are aligned like those of the original model.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return model


def test_save_load_round_trip_bit_exact(tmp_path):
    model = tiny(skip_scaling="learned_per_skip", out_channels=6).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = UViTModel.from_pretrained(tmp_path).eval()
    assert loaded.config.skip_scaling == "learned_per_skip" and loaded.config.out_channels == 6
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key in original_state:
        assert torch.equal(original_state[key], loaded_state[key]), key
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y).sample, model(x, t, y).sample, atol=1e-6, rtol=0)
        assert torch.equal(realigned(loaded)(x, t, y).sample, model(x, t, y).sample)


def test_folders_saved_before_the_vit_options_existed_load_unchanged(tmp_path):
    import json

    model = tiny(skip_scaling="constant", skip_kappa=0.7).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("final_norm", "time_embedding_type", "num_time_embeddings", "timestep_scale", "timestep_shift",
                "init_scheme"):  # fmt: skip
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = UViTModel.from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()  # out_blocks.i.skip_linear, norm_out, ...
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y).sample, model(x, t, y).sample)


def test_timestep_scale_and_shift_map_the_time_input():
    torch.manual_seed(0)
    plain = tiny().eval()
    mapped = tiny(timestep_scale=0.999, timestep_shift=0.999).eval()
    mapped.load_state_dict(plain.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(mapped(x, t, y).sample, plain(x, 0.999 * t + 0.999, y).sample)


@pytest.mark.slow
def test_from_pretrained_in_a_fresh_process(tmp_path):
    model = tiny(skip_scaling="constant", skip_kappa=0.7).eval()
    model.save_pretrained(tmp_path / "model")
    x, t, y = inputs()
    torch.save({"x": x, "t": t, "y": y}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        "from diffusers_speedup.models.uvit import UViTModel\n"
        "folder = sys.argv[1]\n"
        "model = UViTModel.from_pretrained(folder + '/model').eval()\n"
        "for tensor in model.parameters():\n"
        "    tensor.data = tensor.data.clone()  # aligned memory, as in realigned()\n"
        "batch = torch.load(folder + '/inputs.pt')\n"
        "with torch.no_grad():\n"
        "    out = model(batch['x'], batch['t'], batch['y']).sample\n"
        "torch.save(out, folder + '/out.pt')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = model(x, t, y).sample
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


@pytest.mark.parametrize("skip_scaling", ["none", "learned_per_skip"])
def test_gradient_checkpointing_gives_the_same_gradients(skip_scaling):
    model = tiny(skip_scaling=skip_scaling)
    x, t, y = inputs()

    def gradients():
        model.zero_grad()
        model(x, t, y).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patch_size": 3}, r"patch_size=3 does not divide sample_size=8"),
        ({"num_attention_heads": 5}, r"num_attention_heads=5 does not divide hidden_size=32"),
        ({"skip_scaling": "cs"}, r"skip_scaling='cs'"),
        ({"skip_scaling": "constant", "skip_kappa": 0.0}, r"skip_kappa=0.0"),
        ({"skip_scaling": "constant", "skip_kappa": -0.5}, r"skip_kappa=-0.5"),
        ({"num_layers": 6}, r"num_layers=6 must be odd"),
        ({"use_long_skips": False, "skip_scaling": "inv_sqrt2"}, r"skip_scaling='inv_sqrt2' needs use_long_skips"),
        ({"num_classes": -1}, r"num_classes=-1"),
        ({"qkv_bias": "k"}, r"qkv_bias='k' must be False, True or 'qv'"),
        ({"time_embedding_type": "fourier"}, r"time_embedding_type='fourier'"),
        ({"num_time_embeddings": 0}, r"num_time_embeddings=0"),
        ({"init_scheme": "dit"}, r"init_scheme='dit'"),
        ({"class_dropout_prob": 1.0}, r"class_dropout_prob=1.0"),
    ],
)
def test_invalid_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match=r"name='uvit-xxl'.*uvit-s"):
        UViTModel.from_preset("uvit-xxl")


# Published sizes (U-ViT paper, Table 1) at the setting each was trained in: S/2 on CIFAR-10 pixels, S-Deep/2 on
# 32x32x4 MS-COCO latents (its text tokens are not part of this class), M/4 on ImageNet-64 pixels, L/2 and H/2 on
# ImageNet-256 latents (1000 classes + null). The Min-SNR ViT-B has its own closed-form count below.
PUBLISHED = [
    ("uvit-s", 44e6, dict(sample_size=32, patch_size=2, in_channels=3)),
    ("uvit-s-deep", 58e6, dict(sample_size=32, patch_size=2, in_channels=4)),
    ("uvit-m", 131e6, dict(sample_size=64, patch_size=4, in_channels=3, num_classes=1000)),
    ("uvit-l", 287e6, dict(sample_size=32, patch_size=2, in_channels=4, num_classes=1000)),
    ("uvit-h", 501e6, dict(sample_size=32, patch_size=2, in_channels=4, num_classes=1000)),
]


@pytest.mark.parametrize("name, published, setting", PUBLISHED)
def test_preset_parameter_counts(name, published, setting):
    with torch.device("meta"):
        model = UViTModel.from_preset(name, **setting)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - published) / published < 0.02, count
    assert model.config.num_layers == UVIT_PRESETS[name]["num_layers"]


def official_minsnr_vit_parameter_count(width, depth, patch, channels, image, label_rows, time_rows, mlp_ratio=4):
    """Parameters of the Min-SNR code's VisionTransformer, summed layer by layer from its definition."""
    tokens = (image // patch) ** 2 + 2  # time + class + patches
    patch_embed = channels * patch * patch * width + width  # PatchEmbed.proj, a Conv2d with bias
    hidden = mlp_ratio * width
    block = (
        2 * width  # norm1
        + 3 * width * width  # attn.qkv.weight (Linear without bias)
        + 2 * width  # attn.q_bias, attn.v_bias
        + (width * width + width)  # attn.proj
        + 2 * width  # norm2
        + (width * hidden + hidden)  # mlp.fc1
        + (hidden * width + width)  # mlp.fc2
    )
    head = width * patch * patch * channels + patch * patch * channels  # linear_projection; `norm` is an Identity
    return patch_embed + tokens * width + depth * block + head + label_rows * width + time_rows * width


def test_vit_b_minsnr_has_the_official_parameter_count():
    # vit_base_patch2_32 as configs/in256/..._bs8x32.sh builds it: 32x32x4 latents, depth 12, width 768, 1000
    # classes plus the null label (drop_label_prob 0.15 > 0), the default num_steps=4000 time table.
    expected = official_minsnr_vit_parameter_count(768, 12, 2, 4, 32, label_rows=1001, time_rows=4000)
    assert expected == 89_109_520
    with torch.device("meta"):
        model = UViTModel.from_preset("vit-b-minsnr", sample_size=32, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vit_b_minsnr_architecture_and_init():
    torch.manual_seed(0)
    model = UViTModel.from_preset(
        "vit-b-minsnr", sample_size=8, in_channels=4, num_classes=10, hidden_size=128, num_attention_heads=4,
        num_layers=4,
    )  # fmt: skip
    assert isinstance(model.norm_out, torch.nn.Identity) and isinstance(model.conv_out, torch.nn.Identity)
    attn = model.in_blocks[0].attn
    assert attn.qkv.bias is None and attn.q_bias.shape == attn.v_bias.shape == (128,)
    assert model.time_table.weight.shape == (4000, 128)
    # The class and time tables are built after the init in the official code: PyTorch's N(0, 1).
    assert model.time_table.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.class_embed.weight.std().item() == pytest.approx(1.0, rel=0.2)
    for layer, block in enumerate(model.in_blocks, start=1):
        scale = 0.02 / math.sqrt(2 * layer)  # fix_init_weight: block `layer` (from 1) divided by sqrt(2 * layer)
        assert block.attn.proj.weight.std().item() == pytest.approx(scale, rel=0.05)
        assert block.mlp[2].weight.std().item() == pytest.approx(scale, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.proj_out.weight.std().item() == pytest.approx(0.02 * 1e-3, rel=0.1)  # init_scale = 0.001
    assert torch.equal(model.proj_out.bias, torch.zeros(16))


def minsnr_reference_forward(model, x, t, labels):
    """The Min-SNR ViT written out from its official definition, reading the model's weights by name."""
    w = model.state_dict()
    cfg = model.config
    dim, heads, p = cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size
    h = F.conv2d(x, w["patch_embed.weight"], w["patch_embed.bias"], stride=p).flatten(2).transpose(1, 2)
    h = torch.cat([w["time_table.weight"][t][:, None], w["class_embed.weight"][labels][:, None], h], 1) + w["pos_embed"]
    for i in range(cfg.num_layers):
        pre = f"in_blocks.{i}."
        y = F.layer_norm(h, (dim,), w[pre + "norm1.weight"], w[pre + "norm1.bias"], 1e-6)
        bias = torch.cat([w[pre + "attn.q_bias"], torch.zeros(dim), w[pre + "attn.v_bias"]])
        q, k, v = (y @ w[pre + "attn.qkv.weight"].T + bias).reshape(*y.shape[:2], 3, heads, -1).permute(2, 0, 3, 1, 4)
        attention = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (attention @ v).transpose(1, 2).reshape(h.shape)
        h = h + y @ w[pre + "attn.proj.weight"].T + w[pre + "attn.proj.bias"]
        y = F.layer_norm(h, (dim,), w[pre + "norm2.weight"], w[pre + "norm2.bias"], 1e-6)
        y = F.gelu(y @ w[pre + "mlp.0.weight"].T + w[pre + "mlp.0.bias"])
        h = h + y @ w[pre + "mlp.2.weight"].T + w[pre + "mlp.2.bias"]
    h = (h @ w["proj_out.weight"].T + w["proj_out.bias"])[:, 2:]  # no final norm
    side, channels = cfg.sample_size // p, model.out_channels
    h = h.reshape(x.shape[0], side, side, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(x.shape[0], channels, side * p, side * p)


def test_vit_b_minsnr_forward_matches_the_official_definition():
    torch.manual_seed(0)
    model = UViTModel.from_preset(
        "vit-b-minsnr", sample_size=8, in_channels=4, num_classes=10, hidden_size=32, num_attention_heads=4,
        num_layers=3,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():  # away from the init, so that every term shows
            parameter.normal_(0, 0.2)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([0, 3, 10])
    with torch.no_grad():
        expected = minsnr_reference_forward(model, x, t, y)
        torch.testing.assert_close(model(x, t, y).sample, expected, atol=1e-5, rtol=1e-5)
        # A float step from a scheduler selects the same row.
        torch.testing.assert_close(model(x, t.double(), y).sample, expected, atol=1e-5, rtol=1e-5)


def test_presets_accept_overrides_and_vit_b_has_no_long_skips():
    with torch.device("meta"):
        vit = UViTModel.from_preset("VIT-B-MINSNR", sample_size=16, num_classes=10)
    assert vit.num_skips == 0 and vit.mid_block is None and len(vit.in_blocks) == 12
    assert vit.in_blocks[0].attn.qkv.bias is None and vit.in_blocks[0].attn.q_bias is not None
    assert not hasattr(vit.in_blocks[0], "skip_linear")
    assert vit.config.sample_size == 16 and vit.config.patch_size == 2


def test_plain_vit_forward():
    model = tiny(num_layers=4, use_long_skips=False, num_classes=0).eval()
    x, t, _ = inputs()
    assert model(x, t).sample.shape == x.shape
    assert model.skip_scales() == []


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 2.5, -1.0])
    # dim 4: frequencies 1 and 10000^(-1/2) = 0.01
    expected = torch.stack([torch.cos(t), torch.cos(0.01 * t), torch.sin(t), torch.sin(0.01 * t)], dim=1)
    torch.testing.assert_close(timestep_embedding(t, 4), expected)
    assert timestep_embedding(t, 5)[:, 4].eq(0).all()


def test_long_float_scalar_and_zero_dim_timesteps_agree():
    model = tiny().eval()
    x, _, y = inputs()
    with torch.no_grad():
        reference = model(x, torch.full((3,), 17.0), y).sample
        for timestep in (torch.full((3,), 17, dtype=torch.long), torch.tensor(17), torch.tensor([17.0]), 17, 17.0):
            assert torch.equal(model(x, timestep, y).sample, reference), timestep
        # continuous EDM noise levels c_noise = ln(sigma) / 4, negative values included
        c_noise = torch.log(torch.tensor([0.002, 1.0, 80.0])) / 4
        out = model(x, c_noise, y).sample
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.zeros(2), y)


def test_null_label_and_unconditional_calls():
    model = tiny().eval()
    x, t, _ = inputs()
    null = torch.full((3,), 10)
    with torch.no_grad():
        unconditional = model(x, t, null).sample
        assert torch.equal(model(x, t).sample, unconditional)  # None means "all unconditional"
        assert not torch.equal(model(x, t, torch.tensor([1, 2, 3])).sample, unconditional)
    assert model.class_embed.weight.shape == (11, 32)


def test_unconditional_model():
    model = tiny(num_classes=0).eval()
    assert model.class_embed is None and model.pos_embed.shape == (1, 1 + 16, 32)
    x, t, _ = inputs()
    assert model(x, t).sample.shape == x.shape
    with pytest.raises(ValueError, match="num_classes=0"):
        model(x, t, torch.tensor([0, 1, 2]))


def test_class_dropout_replaces_labels_with_the_null_label_in_training_only():
    model = tiny(class_dropout_prob=0.5)
    x = torch.randn(1, 3, 8, 8).expand(16, -1, -1, -1)
    t = torch.full((16,), 100.0)
    labels = torch.full((16,), 4)
    model.eval()
    with torch.no_grad():
        conditional = model(x, t, labels).sample
        unconditional = model(x, t, torch.full((16,), 10)).sample
        model.train()
        mixed = model(x, t, labels).sample
    dropped = [torch.allclose(mixed[k], unconditional[k], atol=1e-6) for k in range(16)]
    kept = [torch.allclose(mixed[k], conditional[k], atol=1e-6) for k in range(16)]
    assert all(d != k for d, k in zip(dropped, kept))
    assert any(dropped) and any(kept)


def test_out_channels_and_wrong_input_shape():
    model = tiny(out_channels=6)
    x, t, y = inputs()
    assert model(x, t, y, return_dict=False)[0].shape == (3, 6, 8, 8)
    with pytest.raises(ValueError, match=r"\(batch, 3, 8, 8\)"):
        model(torch.randn(3, 3, 16, 16), t, y)


def test_xformers_missing_raises(monkeypatch):
    model = tiny()
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails even where xformers is installed
    with pytest.raises(ModuleNotFoundError, match="xformers"):
        model.enable_xformers_memory_efficient_attention()


def test_xformers_path_matches_sdpa(monkeypatch):
    """A stand-in xformers with the documented (batch, length, heads, head_dim) layout must give SDPA's result."""
    calls = []

    def memory_efficient_attention(q, k, v, op=None):
        calls.append(q.shape)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(dim=-1), v)

    fake = types.ModuleType("xformers")
    fake.ops = types.ModuleType("xformers.ops")
    fake.ops.memory_efficient_attention = memory_efficient_attention
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)

    model = tiny().eval()
    x, t, y = inputs()
    with torch.no_grad():
        native = model(x, t, y).sample
        model.enable_xformers_memory_efficient_attention()
        via_xformers = model(x, t, y).sample
        assert calls and calls[0] == (3, 18, 4, 8)
        model.disable_xformers_memory_efficient_attention()
        count = len(calls)
        assert torch.equal(model(x, t, y).sample, native) and len(calls) == count
    torch.testing.assert_close(via_xformers, native, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_minsnr_recipes_build_the_official_vit_b(prediction):
    from diffusers_speedup.training.parts import build_model
    from diffusers_speedup.training.recipes import load_config

    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet256", f"vit_b_minsnr_{prediction}.yaml")
    config = load_config(recipe)
    data = types.SimpleNamespace(sample_shape=(4, 32, 32), num_classes=1000)  # ImageNet-256 SD-VAE latents
    with torch.device("meta"):
        model = build_model(config, data)
    assert sum(p.numel() for p in model.parameters()) == 89_109_520
    assert model.config.time_embedding_type == "learned" and model.config.init_scheme == "beit"
    # The table is indexed by the DDPM step, as guided-diffusion feeds it (rescale_timesteps=False).
    schedule = config.objective.schedule
    assert schedule.kind == "ddpm" and schedule.num_train_timesteps == 1000 <= model.config.num_time_embeddings
    assert model.config.timestep_scale == 1.0 and model.config.timestep_shift == 0.0
