"""DiTModel's SiT and LightningDiT presets and LightningDiT's options (SwiGLU, RMSNorm, 2-D RoPE, QK-norm).

Expected values come from the official code written out here, never from the class under test:
willisma/SiT ``models.py`` (``SiT``, ``SiT_models``) and hustvl/LightningDiT@2725fed ``models/lightningdit.py``
(``LightningDiT``, ``LightningDiT_models``), ``models/rmsnorm.py`` (``RMSNorm``), ``models/swiglu_ffn.py``
(``SwiGLUFFN``) and ``models/pos_embed.py`` (``VisionRotaryEmbeddingFast``, ``rotate_half``, ``broadcat``).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_speedup import DiTModel
from diffusers_speedup.models.dit_transformer import DIT_PRESETS

# `SiT_models` and `LightningDiT_models`: (depth, hidden_size, num_heads) per size.
SIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
LIGHTNINGDIT_SIZES = {"b": (12, 768, 12), "xl": (28, 1152, 16)}
# SiT paper Table 1 / LightningDiT paper: parameters in millions.
PAPER_PARAMS_M = {"s": 33, "b": 130, "l": 458, "xl": 675}
# What configs/lightningdit_xl_vavae_f16d32.yaml sets (use_qknorm false; wo_shift false) and what train.py leaves at
# the class default (learn_sigma=False); 256 px through VA-VAE f16d32 is a 16×16×32 latent.
LIGHTNINGDIT_CONFIG = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True)


def official_state_shapes(depth, hidden, heads, patch, in_channels, input_size, num_classes=1000, learn_sigma=False,
                          use_qknorm=False, use_swiglu=False, use_rmsnorm=False, use_rope=False):  # fmt: skip
    """Key → shape of ``LightningDiT(...).state_dict()``, written out from its modules (mlp_ratio 4, class dropout
    0.1, wo_shift False). With every option off the modules are SiT's (``SiTBlock``, ``FinalLayer``, ...)."""
    out_channels = 2 * in_channels if learn_sigma else in_channels
    head_dim, grid = hidden // heads, input_size // patch
    shapes = {
        "pos_embed": (1, grid * grid, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
    }
    if use_rope:  # VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid): two saved buffers
        shapes["feat_rope.freqs_cos"] = shapes["feat_rope.freqs_sin"] = (grid * grid, head_dim)
    mlp_hidden = int(hidden * 4.0)
    for i in range(depth):
        b = f"blocks.{i}."
        if use_rmsnorm:  # RMSNorm(hidden_size): a weight; nn.LayerNorm(elementwise_affine=False) has none
            shapes[b + "norm1.weight"] = shapes[b + "norm2.weight"] = (hidden,)
        shapes[b + "attn.qkv.weight"], shapes[b + "attn.qkv.bias"] = (3 * hidden, hidden), (3 * hidden,)
        if use_qknorm:  # RMSNorm(head_dim) or nn.LayerNorm(head_dim) (weight and bias)
            for name in ("q_norm", "k_norm"):
                shapes[f"{b}attn.{name}.weight"] = (head_dim,)
                if not use_rmsnorm:
                    shapes[f"{b}attn.{name}.bias"] = (head_dim,)
        shapes[b + "attn.proj.weight"], shapes[b + "attn.proj.bias"] = (hidden, hidden), (hidden,)
        if use_swiglu:  # SwiGLUFFN(hidden_size, int(2/3 * mlp_hidden_dim)), bias=True
            swiglu_hidden = int(2 / 3 * mlp_hidden)
            shapes[b + "mlp.w12.weight"], shapes[b + "mlp.w12.bias"] = (2 * swiglu_hidden, hidden), (2 * swiglu_hidden,)
            shapes[b + "mlp.w3.weight"], shapes[b + "mlp.w3.bias"] = (hidden, swiglu_hidden), (hidden,)
        else:  # timm Mlp
            shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (mlp_hidden, hidden), (mlp_hidden,)
            shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = (hidden, mlp_hidden), (hidden,)
        shapes[b + "adaLN_modulation.1.weight"] = (6 * hidden, hidden)
        shapes[b + "adaLN_modulation.1.bias"] = (6 * hidden,)
    if use_rmsnorm:
        shapes["final_layer.norm_final.weight"] = (hidden,)
    shapes["final_layer.linear.weight"] = (patch * patch * out_channels, hidden)
    shapes["final_layer.linear.bias"] = (patch * patch * out_channels,)
    shapes["final_layer.adaLN_modulation.1.weight"] = (2 * hidden, hidden)
    shapes["final_layer.adaLN_modulation.1.bias"] = (2 * hidden,)
    return shapes


def official_parameter_count(shapes):
    """sum(p.numel() for p in model.parameters()): every entry but the rotary buffers."""
    return sum(math.prod(shape) for key, shape in shapes.items() if not key.startswith("feat_rope."))


def our_shapes(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# --- presets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(SIT_SIZES))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_sit_presets_are_sits_models_with_its_learned_sigma(size, patch):
    depth, hidden, heads = SIT_SIZES[size]
    with torch.device("meta"):
        model = DiTModel.from_preset(f"sit-{size}-{patch}")
    # SiT(input_size=32, in_channels=4, learn_sigma=True): out_channels 8.
    shapes = official_state_shapes(depth, hidden, heads, patch, in_channels=4, input_size=32, learn_sigma=True)
    assert our_shapes(model) == shapes
    count = sum(p.numel() for p in model.parameters())
    assert count == official_parameter_count(shapes)
    assert abs(count / 1e6 - PAPER_PARAMS_M[size]) < 1
    assert model.config.num_attention_heads == heads and model.config.out_channels == 8


@pytest.mark.parametrize("size", sorted(LIGHTNINGDIT_SIZES))
@pytest.mark.parametrize("patch", [1, 2])
def test_lightningdit_presets_are_its_models_with_its_shipped_options(size, patch):
    depth, hidden, heads = LIGHTNINGDIT_SIZES[size]
    with torch.device("meta"):
        model = DiTModel.from_preset(f"lightningdit-{size}-{patch}")
    shapes = official_state_shapes(depth, hidden, heads, patch, in_channels=32, input_size=16, **LIGHTNINGDIT_CONFIG)
    assert our_shapes(model) == shapes  # the same names: an official state dict loads without renaming
    count = sum(p.numel() for p in model.parameters())
    assert count == official_parameter_count(shapes)
    assert abs(count / 1e6 - PAPER_PARAMS_M[size]) < 1
    assert (model.config.sample_size, model.config.in_channels, model.config.out_channels) == (16, 32, 32)


def test_lightningdit_xl_1_count_and_swiglu_width():
    with torch.device("meta"):
        model = DiTModel.from_preset("lightningdit-xl-1")
    assert sum(p.numel() for p in model.parameters()) == 675_256_736
    # int(2/3 * 4608) = 3072; LightningDiT-L's width shows the truncation: int(2/3 * 4096) = 2730.
    assert model.blocks[0].mlp.w3.in_features == 3072
    with torch.device("meta"):
        large = DiTModel(num_layers=1, hidden_size=1024, num_attention_heads=16, mlp_type="swiglu")
    assert large.blocks[0].mlp.w3.in_features == 2730


def test_the_dit_presets_come_first_so_a_dit_checkpoint_is_named_as_one():
    names = list(DIT_PRESETS)
    assert names[:12] == [f"dit-{s}-{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)]
    assert set(names[12:]) == {f"sit-{s}-{p}" for s in SIT_SIZES for p in (2, 4, 8)} | {
        f"lightningdit-{s}-{p}" for s in LIGHTNINGDIT_SIZES for p in (1, 2)
    }


# --- the official forward, written out ---------------------------------------------------------------------------


def official_rope_tables(head_dim, grid):
    """VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid), float32, as EVA-02's code computes it."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(grid) / grid * grid
    freqs = torch.einsum("..., f -> ... f", t, freqs)
    freqs = torch.stack([freqs, freqs], dim=-1).flatten(-2)  # repeat '... n -> ... (n r)', r=2
    freqs = torch.cat([freqs[:, None, :].expand(grid, grid, dim), freqs[None, :, :].expand(grid, grid, dim)], -1)
    return freqs.cos().view(-1, freqs.shape[-1]), freqs.sin().view(-1, freqs.shape[-1])


def official_rotate_half(x):
    x = x.reshape(*x.shape[:-1], -1, 2)  # rearrange '... (d r) -> ... d r', r=2
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).reshape(*x.shape[:-2], -1)


def official_forward(sd, x, t, y, *, depth, heads, patch, learn_sigma=False, use_qknorm=False, use_swiglu=False,
                     use_rmsnorm=False, use_rope=False):  # fmt: skip
    """``LightningDiT.forward`` (eval mode) on a state dict, functionally, in the dtype of `sd`.

    RMSNorm is LLaMA's ``x * rsqrt(mean(x²) + 1e-6) * weight``; its ``x.float()`` upcast is left out so that a
    float64 comparison stays float64. Attention is the explicit ``softmax(q·scale @ kᵀ) @ v`` branch.
    """

    def linear(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def rmsnorm(h, weight, eps=1e-6):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight

    def norm(h, name):
        if use_rmsnorm:
            return rmsnorm(h, sd[name + ".weight"])
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    batch, tokens, hidden = h.shape
    head_dim = hidden // heads
    half = 128  # TimestepEmbedder.timestep_embedding, dim 256, in float32
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(h.dtype)
    c = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    if use_rope:
        cos, sin = sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]
    for i in range(depth):
        b = f"blocks.{i}."
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(
            F.silu(c), b + "adaLN_modulation.1"
        ).chunk(6, dim=1)
        a = modulate(norm(h, b + "norm1"), shift_msa, scale_msa)
        qkv = linear(a, b + "attn.qkv").reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if use_qknorm:
            if use_rmsnorm:
                q, k = rmsnorm(q, sd[b + "attn.q_norm.weight"]), rmsnorm(k, sd[b + "attn.k_norm.weight"])
            else:
                q = F.layer_norm(q, (head_dim,), sd[b + "attn.q_norm.weight"], sd[b + "attn.q_norm.bias"], 1e-5)
                k = F.layer_norm(k, (head_dim,), sd[b + "attn.k_norm.weight"], sd[b + "attn.k_norm.bias"], 1e-5)
        if use_rope:
            q = q * cos + official_rotate_half(q) * sin
            k = k * cos + official_rotate_half(k) * sin
        attn = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(batch, tokens, hidden)
        h = h + gate_msa.unsqueeze(1) * linear(a, b + "attn.proj")
        m = modulate(norm(h, b + "norm2"), shift_mlp, scale_mlp)
        if use_swiglu:
            x1, x2 = linear(m, b + "mlp.w12").chunk(2, dim=-1)
            m = linear(F.silu(x1) * x2, b + "mlp.w3")
        else:
            m = linear(F.gelu(linear(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + gate_mlp.unsqueeze(1) * m
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(norm(h, "final_layer.norm_final"), shift, scale), "final_layer.linear")
    out_channels = h.shape[-1] // (patch * patch)
    side = int(tokens**0.5)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(batch, side, side, patch, patch, out_channels))
    h = h.reshape(batch, out_channels, side * patch, side * patch)
    return h.chunk(2, dim=1)[0] if learn_sigma else h


def random_official_state(shapes, seed=0):
    """Random values for every official key (the rotary buffers are the official tables, as a checkpoint holds)."""
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=generator) * 0.3 for key, shape in shapes.items()}
    for key in state:
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or "_norm" in key:
            state[key] = 1 + state[key]  # norm weights near one, not near zero
    if "feat_rope.freqs_cos" in shapes:
        grid_tokens, head_dim = shapes["feat_rope.freqs_cos"]
        state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = official_rope_tables(
            head_dim, int(grid_tokens**0.5)
        )
    return state


OPTION_SETS = {
    "lightningdit": LIGHTNINGDIT_CONFIG,
    "lightningdit+qknorm": {**LIGHTNINGDIT_CONFIG, "use_qknorm": True},
    "layernorm-qknorm-rope": dict(use_qknorm=True, use_rope=True),
    "swiglu-only": dict(use_swiglu=True),
    "sit": {},
}
OUR_NAMES = dict(use_qknorm="use_qk_norm", use_rope="use_rope")


def our_options(options):
    ours = {OUR_NAMES[k]: v for k, v in options.items() if k in OUR_NAMES}
    if options.get("use_swiglu"):
        ours["mlp_type"] = "swiglu"
    if options.get("use_rmsnorm"):
        ours["norm_type"] = "rmsnorm"
    return ours


@pytest.mark.parametrize("options", sorted(OPTION_SETS))
@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_official_weights_give_the_official_forward(options, patch, learn_sigma):
    options = OPTION_SETS[options]
    depth, hidden, heads, size, channels, classes = 2, 32, 2, 8, 4, 10
    shapes = official_state_shapes(depth, hidden, heads, patch, channels, size, classes, learn_sigma, **options)
    state = random_official_state(shapes)
    model = DiTModel(sample_size=size, patch_size=patch, in_channels=channels,
                     out_channels=2 * channels if learn_sigma else channels, num_layers=depth, hidden_size=hidden,
                     num_attention_heads=heads, num_classes=classes, **our_options(options))  # fmt: skip
    model.load_state_dict(state, strict=True)  # the official names, unchanged
    model = model.double().eval()

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, channels, size, size, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.0, 0.37, 1.0])  # continuous time, as SiT and LightningDiT feed it
    y = torch.tensor([1, classes, 7])  # with the null label
    with torch.no_grad():
        ours = model(x, t, y).sample
    expected = official_forward({k: v.double() for k, v in state.items()}, x, t, y, depth=depth, heads=heads,
                                patch=patch, learn_sigma=learn_sigma, **options)  # fmt: skip
    if learn_sigma:  # the official forward keeps the mean half; ours returns both, mean first
        assert ours.shape[1] == 2 * channels
        ours = ours[:, :channels]
    assert ours.shape == expected.shape == (3, channels, size, size)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


# --- the pieces ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim, grid", [(16, 8), (72, 16), (64, 7)])
def test_rotary_tables_are_evas_bit_for_bit(head_dim, grid):
    model = DiTModel(sample_size=grid, patch_size=1, num_layers=1, hidden_size=2 * head_dim, num_attention_heads=2,
                     num_classes=0, use_rope=True)  # fmt: skip
    cos, sin = official_rope_tables(head_dim, grid)
    assert model.feat_rope.freqs_cos.dtype == torch.float32
    assert torch.equal(model.feat_rope.freqs_cos, cos) and torch.equal(model.feat_rope.freqs_sin, sin)


def test_rotary_scores_depend_only_on_the_offset_in_rows_and_columns():
    # Closed form of RoPE: <R(p) q, R(p') k> depends on p' - p only; the first half of the head turns with the row.
    grid, head_dim = 6, 16
    model = DiTModel(sample_size=grid, patch_size=1, num_layers=1, hidden_size=2 * head_dim, num_attention_heads=2,
                     num_classes=0, use_rope=True).double()  # fmt: skip
    rope = model.feat_rope
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    same = torch.stack([q] * grid * grid)[None, :, None]
    q_rot, k_rot = rope(same)[0, :, 0], rope(torch.stack([k] * grid * grid)[None, :, None])[0, :, 0]

    def score(row, col, row2, col2):
        return (q_rot[row * grid + col] * k_rot[row2 * grid + col2]).sum()

    torch.testing.assert_close(score(0, 0, 2, 3), score(3, 1, 5, 4))
    torch.testing.assert_close(score(1, 4, 1, 4), (q * k).sum())  # no offset, no rotation
    # A row offset turns only the first half of the dimensions, a column offset only the second.
    row_only = rope(same)[0, grid, 0] - q  # token (1, 0) against (0, 0)
    col_only = rope(same)[0, 1, 0] - q  # token (0, 1)
    assert row_only[: head_dim // 2].abs().max() > 0 and not row_only[head_dim // 2 :].any()
    assert col_only[head_dim // 2 :].abs().max() > 0 and not col_only[: head_dim // 2].any()


def test_continuous_time_goes_into_the_sinusoidal_embedding_unscaled():
    model = DiTModel(sample_size=4, num_layers=1, hidden_size=32, num_attention_heads=2, num_classes=0)
    t = torch.tensor([0.0, 0.25, 1.0])
    k = torch.arange(128, dtype=torch.float64)
    args = t.double()[:, None] * torch.exp(-math.log(10000) * k / 128)[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    mlp = model.t_embedder.mlp.double()
    expected = mlp[2](F.silu(mlp[0](features)))
    torch.testing.assert_close(model.t_embedder(t), expected, rtol=1e-6, atol=1e-6)
    # A Python float for the whole batch is the same time for every sample.
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    model = model.double()
    torch.testing.assert_close(model(x, 0.25).sample, model(x, torch.tensor([0.25, 0.25])).sample)


def test_lightningdit_initialisation_is_its_initialize_weights():
    model = DiTModel(sample_size=8, patch_size=1, num_layers=2, hidden_size=64, num_attention_heads=4, num_classes=10,
                     mlp_type="swiglu", norm_type="rmsnorm", use_rope=True, use_qk_norm=True)  # fmt: skip
    # RMSNorm weights start at ones (nothing in initialize_weights touches them).
    for name, parameter in model.named_parameters():
        if "norm" in name:
            assert torch.equal(parameter, torch.ones_like(parameter)), name
    # Every Linear, SwiGLU's fused w12 included, is xavier-uniform with zero bias; adaLN-Zero starts at zero output.
    for linear in (model.blocks[0].mlp.w12, model.blocks[1].mlp.w3):
        bound = math.sqrt(6 / (linear.in_features + linear.out_features))
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
        assert not linear.bias.any()
    assert not model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])).sample.any()


def test_gradient_checkpointing_with_rope_gives_the_same_gradients():
    model = DiTModel(sample_size=8, patch_size=1, num_layers=2, hidden_size=32, num_attention_heads=2, num_classes=10,
                     **our_options({**LIGHTNINGDIT_CONFIG, "use_qknorm": True}))  # fmt: skip
    model.load_state_dict(random_official_state(our_shapes(model)))
    model.eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 3])

    def grads():
        model.zero_grad()
        model(x, t, y).sample.square().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_save_and_load_keep_the_options_and_the_rotary_tables(tmp_path):
    model = DiTModel.from_preset("lightningdit-b-2", num_layers=1, hidden_size=64, num_attention_heads=4,
                                 num_classes=10)  # fmt: skip
    model.save_pretrained(tmp_path)
    loaded = DiTModel.from_pretrained(tmp_path)
    assert {k: loaded.config[k] for k in ("mlp_type", "norm_type", "use_rope", "use_qk_norm")} == {
        "mlp_type": "swiglu", "norm_type": "rmsnorm", "use_rope": True, "use_qk_norm": False,
    }  # fmt: skip
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(mlp_type="geglu"), "mlp_type='geglu'"),
        (dict(norm_type="layer_norm"), "norm_type='layer_norm'"),
        (dict(use_rope=1), "use_rope=1"),
        (dict(use_qk_norm="yes"), "use_qk_norm='yes'"),
        (dict(use_rope=True, hidden_size=36, num_attention_heads=2), "use_rope=True .*divisible by 4"),
    ],
)
def test_bad_options_are_named(overrides, match):
    config = dict(sample_size=8, num_layers=1, hidden_size=32, num_attention_heads=2, num_classes=10)
    with pytest.raises(ValueError, match=match):
        DiTModel(**{**config, **overrides})


def test_to_diffusers_refuses_lightningdits_options():
    model = DiTModel(sample_size=8, num_layers=1, hidden_size=32, num_attention_heads=2, num_classes=10,
                     norm_type="rmsnorm", use_rope=True)  # fmt: skip
    with pytest.raises(ValueError, match="none of LightningDiT's options.*norm_type"):
        model.to_diffusers(exact=False)
