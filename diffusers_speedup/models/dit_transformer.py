# Copyright 2025 The diffusers-speedup authors. Apache-2.0.
"""DiT (Peebles & Xie, ICCV 2023) as the DiT and SpeeD papers train it, and its conversion to and from diffusers.

A single self-contained file: it imports only the standard library, torch and diffusers (xformers optionally, at the
moment it is asked for), because it is copied unchanged into exported model folders. The pieces it shares with U-ViT
(the attention, `_broadcast_timestep`, `_unpatchify` and the shared config checks) are copies of uvit.py's, marked
``# Copied from`` and kept equal by tests/test_copies.py: edit them in uvit.py.

Why a class of our own. diffusers' ``DiTTransformer2DModel`` was written to run converted weights, and three of its
choices make it a different network to train: every block owns its own timestep MLP and label table (DiT-XL/2 has
749.8 M parameters instead of 675.1 M), every block draws its own label dropout (so a sample's label is dropped in
some blocks and kept in others, which classifier-free guidance cannot use), and nothing is zero-initialised (no
adaLN-Zero). `DiTModel` is the official ``models.DiT``: one timestep embedder and one label table shared by all
blocks, one drop decision per sample, and the official ``initialize_weights``. Its parameter names are those of the
official checkpoints (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks.{i}.adaLN_modulation.1``, ...), so a
released ``.pt`` file loads without renaming.

The same class builds SiT (whose network is DiT's) and LightningDiT (Yao et al., CVPR 2025): four options, each off
by default, are LightningDiT's SwiGLU MLP, RMSNorm, 2-D rotary position embedding and QK-norm, written from
hustvl/LightningDiT ``models/`` and named there as in its checkpoints (``mlp.w12``, ``norm1.weight``, ``feat_rope``).
With every option off the network is the DiT above, operation for operation.

Moving between the layouts: `DiTModel.from_diffusers` and `DiTModel.to_diffusers` convert the weights exactly (see
`diffusers_to_dit_state_dict` for the key mapping). diffusers' port of DiT differs from the official network in two
constants, which the config keeps so that a converted model gives the same outputs: its sinusoidal timestep
frequencies are ``10000^(-k / (128 - 1))`` instead of ``10000^(-k / 128)`` (``downscale_freq_shift`` 1 instead of 0),
and the LayerNorm before each MLP uses diffusers' ``norm_eps`` (1e-5 by default) instead of 1e-6 (``mlp_norm_eps``).
`DiTModel.from_pretrained` also reads a ``DiTTransformer2DModel`` folder or a ``DiTPipeline`` folder (such as
``facebook/DiT-XL-2-256``) and converts it.
"""

import math
import os
from typing import NoReturn

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# DiT paper, Table 1 (layers N, hidden size d, heads), at patch sizes 2, 4 and 8 (Table 4 / the official
# `DiT_models`). Everything else (sample_size, in_channels, out_channels, num_classes) comes from the constructor
# defaults (ImageNet-256 latents: 32×32×4, 1000 classes) or from the overrides given to `DiTModel.from_preset`.
_DIT_SIZES = {
    "s": {"num_layers": 12, "hidden_size": 384, "num_attention_heads": 6},
    "b": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    "l": {"num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16},
    "xl": {"num_layers": 28, "hidden_size": 1152, "num_attention_heads": 16},
}
_DIT_PRESETS = {
    f"dit-{size}-{patch}": {**shape, "patch_size": patch} for size, shape in _DIT_SIZES.items() for patch in (2, 4, 8)
}
# SiT (willisma/SiT models.py `SiT_models`): DiT's network and sizes unchanged, with its default learn_sigma=True (the
# released SiT-XL/2 has it; SiT's forward then drops the variance half). Override in_channels and out_channels
# together for other latents.
SIT_PRESETS = {
    f"sit-{size}-{patch}": {**shape, "patch_size": patch, "in_channels": 4, "out_channels": 8}
    for size, shape in _DIT_SIZES.items()
    for patch in (2, 4, 8)
}
# LightningDiT (hustvl/LightningDiT models/lightningdit.py `LightningDiT_models`, B and XL at patch 1 and 2), with
# the options its shipped configs turn on (use_swiglu, use_rmsnorm, use_rope; use_qknorm false) and its
# learn_sigma=False, on VA-VAE f16d32 latents of 256 px images (16×16×32), as `configs/lightningdit_xl_vavae_f16d32`.
LIGHTNINGDIT_PRESETS = {
    f"lightningdit-{size}-{patch}": {
        **_DIT_SIZES[size],
        "patch_size": patch,
        "sample_size": 16,
        "in_channels": 32,
        "mlp_type": "swiglu",
        "norm_type": "rmsnorm",
        "use_rope": True,
        "use_qk_norm": False,
    }
    for size in ("b", "xl")
    for patch in (1, 2)
}
DIT_PRESETS = {**_DIT_PRESETS, **SIT_PRESETS, **LIGHTNINGDIT_PRESETS}


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, downscale_freq_shift: float = 0.0, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t·f_k), sin(t·f_k)]``, ``f_k = max_period^(-k / (dim // 2 - downscale_freq_shift))``.

    ``downscale_freq_shift`` 0 is DiT's (GLIDE's) embedding; 1 is the one diffusers' DiT port uses. Computed in
    float32; an odd `dim` gets one zero column at the end.
    """
    half = dim // 2
    # The operations in the order of both DiT's and diffusers' code, so the float32 frequencies are bit-identical.
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * steps / (half - downscale_freq_shift))
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def sincos_position_embedding(dim: int, grid_size: int) -> torch.Tensor:
    """DiT's (MAE's) fixed 2-D sin-cos position embedding, shape (grid_size², dim), tokens in row-major order.

    The first half of the channels encodes the column of a token, the second half its row; each half is
    ``[sin(pos·ω_k), cos(pos·ω_k)]`` with ``ω_k = 10000^(-k / (dim / 4))``. Computed in float64 as the official numpy
    code does, then rounded to float32.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a hidden size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(positions):
        angles = positions.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


def rotary_position_tables(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LightningDiT's 2-D rotary tables (EVA-02's ``VisionRotaryEmbeddingFast``): ``(cos, sin)``, each of shape
    (grid_size², head_dim), tokens in row-major order.

    The first half of a head's dimensions rotates by the token's row, the second half by its column. Within a half
    of ``h = head_dim / 2`` dimensions, the pair (2k, 2k + 1) turns by the angle ``pos · θ^(-2k / h)``. Computed in
    float32 with EVA's operations, including its positions ``arange(n) / n · n``, so the tables are bit-identical.
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary embedding needs a head dimension divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)
    positions = torch.arange(grid_size) / grid_size * grid_size
    angles = (positions[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, half): one angle per pair
    rows = angles[:, None, :].expand(grid_size, grid_size, half)
    cols = angles[None, :, :].expand(grid_size, grid_size, half)
    table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    return table.cos(), table.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) → (-x1, x0, -x3, x2, ...)``: each consecutive pair turned by 90° (EVA's rotate_half)."""
    first, second = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-second, first), dim=-1).flatten(-2)


class VisionRotaryEmbedding(nn.Module):
    """Applies `rotary_position_tables` to (batch, tokens, heads, head_dim) queries or keys: ``x·cos + rot(x)·sin``.

    The tables are saved buffers named as LightningDiT's ``feat_rope`` (``freqs_cos``, ``freqs_sin``), so its
    checkpoints load without renaming. The result has the input's dtype (LightningDiT's is float32 under autocast,
    which SDPA casts back, to the same values).
    """

    def __init__(self, head_dim: int, grid_size: int):
        super().__init__()
        cos, sin = rotary_position_tables(head_dim, grid_size)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.freqs_cos[:, None], self.freqs_sin[:, None]  # broadcast over the heads
        return (x * cos + rotate_pairs(x) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """LightningDiT's RMSNorm (LLaMA's, `models/rmsnorm.py`): ``x / sqrt(mean(x²) + eps)`` computed in at least
    float32, cast back to the input's dtype, times a learned per-channel weight that starts at ones."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LLaMA's x.float(), without rounding a float64 input down.
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _norm_layer(norm_type: str, dim: int, eps: float) -> nn.Module:
    """The blocks' and final layer's norm: DiT's LayerNorm without affine parameters, or LightningDiT's RMSNorm."""
    if norm_type == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


class PatchEmbedder(nn.Module):
    """``Conv2d(kernel = stride = patch_size)`` turning (B, C, H, W) into (B, H·W / p², D) tokens (timm's PatchEmbed)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep followed by ``Linear → SiLU → Linear``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, downscale_freq_shift: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(timesteps, self.frequency_embedding_size, self.downscale_freq_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """One label table for the whole network; row `num_classes` is the null label of classifier-free guidance.

    In training mode each sample's label is replaced by the null label with probability `dropout_prob`. The decision
    is drawn once per sample here, and every block sees the same conditioning vector, as in DiT.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        # DiT has the null row only when it trains with label dropout; the released models all do.
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# Copied from diffusers_speedup.models.uvit.UViTAttention with UViT->DiT
class DiTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's Attention) through PyTorch SDPA, or xformers'
    memory-efficient kernel after `model.enable_xformers_memory_efficient_attention()`. (diffusers'
    `set_attention_backend` does not reach this module: it only retargets diffusers' own `Attention` processors.)

    `qkv_bias`: False (no bias), True (one bias for query, key and value, in ``qkv.bias``; DiT's) or "qv" (BEiT's
    layout: learned ``q_bias`` and ``v_bias``, the key's bias fixed at zero; softmax ignores a key bias anyway, since
    it adds the same ``q·b_k`` to every logit of a query).

    `qk_norm`: None, or a norm class built as ``qk_norm(head_dim)`` for the queries and for the keys and applied to
    each head's vectors before attention (QK-norm, as timm's ``Attention(qk_norm=True)``). ``forward(x, rope)``
    applies `rope`, a callable on (batch, length, heads, head_dim) tensors, to the queries and keys after it.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool | str = False, qk_norm: type | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.q_norm = qk_norm(dim // num_heads) if qk_norm is not None else None
        self.k_norm = qk_norm(dim // num_heads) if qk_norm is not None else None
        self.proj = nn.Linear(dim, dim)
        self.use_xformers = False
        self.xformers_op = None

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        # Called by ModelMixin.enable/disable_xformers_memory_efficient_attention on every submodule.
        if valid:
            try:
                import xformers.ops  # noqa: F401
            except ImportError as error:
                raise ModuleNotFoundError(
                    "xformers attention was requested for DiTModel, but the `xformers` package is not installed; "
                    "install it (`pip install xformers` matching your torch) or keep the default SDPA "
                    "attention"
                ) from error
        self.use_xformers = valid
        self.xformers_op = attention_op if valid else None

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return F.linear(x, self.qkv.weight, bias.to(x.dtype))

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self._qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.unbind(dim=2)  # (batch, length, heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        if self.use_xformers:
            import xformers.ops

            x = xformers.ops.memory_efficient_attention(q, k, v, op=self.xformers_op)
        else:
            # SDPA wants (batch, heads, length, head_dim); these views have the strides of permute(2, 0, 3, 1, 4).
            x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return self.proj(x.reshape(batch, length, dim))


class DiTMlp(nn.Module):
    """``Linear → GELU(tanh) → Linear`` (timm's Mlp as DiT builds it)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLUMlp(nn.Module):
    """``w3(SiLU(a) · b)`` with ``(a, b) = w12(x)`` split in halves: LightningDiT's ``SwiGLUFFN`` (fused first
    projection, biases on both linears)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero: shift, scale and gate of both branches regressed from the conditioning vector."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        norm_eps: float,
        mlp_norm_eps: float,
        mlp_type: str = "gelu",
        norm_type: str = "layernorm",
        use_qk_norm: bool = False,
    ):
        super().__init__()
        self.norm1 = _norm_layer(norm_type, hidden_size, norm_eps)
        # LightningDiT's QK-norm is its RMSNorm (eps 1e-6) with RMSNorm blocks, else an affine nn.LayerNorm (eps 1e-5).
        qk_norm = (RMSNorm if norm_type == "rmsnorm" else nn.LayerNorm) if use_qk_norm else None
        self.attn = DiTAttention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = _norm_layer(norm_type, hidden_size, mlp_norm_eps)
        if mlp_type == "swiglu":
            # LightningDiT's width, int(2/3 · int(d · mlp_ratio)), which keeps the parameter count of the GELU MLP.
            self.mlp = SwiGLUMlp(hidden_size, int(2 / 3 * int(hidden_size * mlp_ratio)))
        else:
            self.mlp = DiTMlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then ``Linear(D, p² · out_channels)`` per token."""

    def __init__(
        self, hidden_size: int, patch_size: int, out_channels: int, norm_eps: float, norm_type: str = "layernorm"
    ):
        super().__init__()
        self.norm_final = _norm_layer(norm_type, hidden_size, norm_eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTModel(ModelMixin, ConfigMixin):
    r"""The Diffusion Transformer of Peebles & Xie (2023), exactly as its official code builds and initialises it.

    ``x → patch tokens + fixed sin-cos position embedding``; ``c = t_embedder(t) + y_embedder(y)``, one vector per
    sample shared by every block; ``num_layers`` adaLN-Zero blocks; an adaLN final layer; the patches are put back
    into an image. With a learned σ (``out_channels = 2 · in_channels``) the first half of the output is the mean
    prediction and the second the variance interpolation, as DiT's ``learn_sigma``.

    Initialisation is the official ``initialize_weights``: xavier-uniform linears with zero bias, the patch
    embedding initialised as if it were a linear (xavier-uniform weight, zero bias), N(0, 0.02²) for
    the label table and both timestep-MLP weights, and zeros for every adaLN modulation and for the final linear
    (adaLN-Zero: each block starts as the identity and the model outputs zeros).

    Args:
        sample_size (`int`, defaults to 32): height = width of the input latents (32 for 256 px with the SD VAE).
        patch_size (`int`, defaults to 2): side of the square patches; must divide `sample_size`.
        in_channels (`int`, defaults to 4): channels of the input.
        out_channels (`int`, *optional*): channels of the output; defaults to `in_channels`. Use
            `2 * in_channels` for a learned σ (DiT's `learn_sigma=True`, the released models).
        num_layers (`int`, defaults to 28): number of DiT blocks (the paper's N).
        hidden_size (`int`, defaults to 1152): token width d; divisible by 4 (the 2-D sin-cos embedding).
        num_attention_heads (`int`, defaults to 16): attention heads; must divide `hidden_size`.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width as a multiple of `hidden_size`.
        num_classes (`int`, defaults to 1000): number of classes; label `num_classes` is the null label. 0 builds an
            unconditional model (no label table).
        class_dropout_prob (`float`, defaults to 0.1): probability, in training mode only, of replacing a sample's
            label by the null label (classifier-free guidance training; DiT's `class_dropout_prob`). The label table
            has the null row only when this is > 0, as in DiT.
        frequency_embedding_size (`int`, defaults to 256): width of the sinusoidal timestep features.
        downscale_freq_shift (`float`, defaults to 0): 0 gives DiT's timestep frequencies
            ``10000^(-k / (F/2))``; 1 gives diffusers' ``10000^(-k / (F/2 - 1))`` (kept by `from_diffusers`).
        norm_eps (`float`, defaults to 1e-6): epsilon of the LayerNorms (DiT's 1e-6).
        mlp_norm_eps (`float`, *optional*): epsilon of the LayerNorm before each MLP; defaults to `norm_eps`.
            diffusers' DiT uses its `norm_eps` there (1e-5 by default), which `from_diffusers` keeps.
        mlp_type (`str`, defaults to `"gelu"`): `"gelu"` is DiT's ``Linear → GELU(tanh) → Linear``; `"swiglu"` is
            LightningDiT's SwiGLU FFN (hustvl/LightningDiT `models/swiglu_ffn.py`, ``use_swiglu``): hidden width
            ``int(2/3 · int(hidden_size · mlp_ratio))``, a fused first projection ``mlp.w12`` and ``mlp.w3``, both
            with biases.
        norm_type (`str`, defaults to `"layernorm"`): `"layernorm"` is DiT's LayerNorm without affine parameters;
            `"rmsnorm"` is LightningDiT's RMSNorm (``use_rmsnorm``, LLaMA's, with a learned weight starting at ones)
            in the blocks' two norms and the final layer's, with epsilons `norm_eps` and `mlp_norm_eps`.
        use_rope (`bool`, defaults to `False`): LightningDiT's 2-D rotary position embedding (``use_rope``, EVA-02's
            ``VisionRotaryEmbeddingFast``) on every block's queries and keys: half of each head's dimensions turn with
            the token's row, half with its column (see `rotary_position_tables`). The fixed sin-cos embedding is
            kept, as LightningDiT keeps it. Needs a head dimension divisible by 4.
        use_qk_norm (`bool`, defaults to `False`): LightningDiT's QK-norm (``use_qknorm``): each head's queries and
            keys are normalised before RoPE and attention, by RMSNorm (eps 1e-6) when `norm_type` is `"rmsnorm"`,
            else by an affine ``nn.LayerNorm`` (eps 1e-5), as its ``Attention`` builds them. Its configs ship it off.
            (REPA's ``--qk-norm``, timm's ``Attention(qk_norm=True)``, is the LayerNorm one.)
        time_input (`str`, defaults to `"noise_at_1"`): the time direction the weights were trained in.
            `"noise_at_1"` is this package's (and REPA's): t = 1 is noise and a flow model predicts dx/dt.
            `"data_at_1"` is willisma/SiT's code (``transport/path.py`` ``ICPlan``: x_t = t·x_data + (1 − t)·ε): the
            network is fed ``1 − t`` and its output negated (SiT's velocity is −dx/dt in our time), so a released
            SiT checkpoint is called like every other flow model here. With a learned σ only the mean half is negated
            (SiT discards the variance half).

    The presets (`DIT_PRESETS`) are DiT's ``dit-{s,b,l,xl}-{2,4,8}``, SiT's ``sit-{s,b,l,xl}-{2,4,8}`` (the same
    network with SiT's learn_sigma, out_channels 8) and LightningDiT's ``lightningdit-{b,xl}-{1,2}`` (SwiGLU,
    RMSNorm, RoPE, on 16×16×32 VA-VAE latents). Parameter names are the official ones in each case, so SiT and
    LightningDiT checkpoints load without renaming too (LightningDiT's rotary tables included).

    ``forward(hidden_states, timestep, class_labels=None, return_dict=True)`` returns
    ``Transformer2DModelOutput(sample=...)`` of shape (batch, out_channels, sample_size, sample_size), the calling
    convention of ``DiTTransformer2DModel``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _repeated_blocks = ["DiTBlock"]  # for diffusers' regional compilation, compile_repeated_blocks()
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        hidden_size: int = 1152,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        frequency_embedding_size: int = 256,
        downscale_freq_shift: float = 0.0,
        norm_eps: float = 1e-6,
        mlp_norm_eps: float | None = None,
        mlp_type: str = "gelu",
        norm_type: str = "layernorm",
        use_rope: bool = False,
        use_qk_norm: bool = False,
        time_input: str = "noise_at_1",
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        mlp_norm_eps = norm_eps if mlp_norm_eps is None else mlp_norm_eps
        _check_config(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
            frequency_embedding_size=frequency_embedding_size,
            mlp_type=mlp_type,
            norm_type=norm_type,
            use_rope=use_rope,
            use_qk_norm=use_qk_norm,
            time_input=time_input,
        )
        # The resolved values go into the config, so pipelines that read out_channels (DiTPipeline,
        # ClassConditionalPipeline's learned-σ check) see the number.
        self.register_to_config(out_channels=out_channels, mlp_norm_eps=mlp_norm_eps)
        self.out_channels = out_channels
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbedder(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size, downscale_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        grid_size = sample_size // patch_size
        # A parameter that is never trained, as in DiT (so it is counted and saved like the official model's).
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size**2, hidden_size), requires_grad=False)
        # One rotary table for all blocks, as LightningDiT's `feat_rope`.
        self.feat_rope = VisionRotaryEmbedding(hidden_size // num_attention_heads, grid_size) if use_rope else None
        self.blocks = nn.ModuleList(
            [
                DiTBlock(
                    hidden_size,
                    num_attention_heads,
                    mlp_ratio,
                    norm_eps,
                    mlp_norm_eps,
                    mlp_type=mlp_type,
                    norm_type=norm_type,
                    use_qk_norm=use_qk_norm,
                )
                for _ in range(num_layers)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, norm_eps, norm_type=norm_type)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation (see the class docstring); called by the constructor."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid_size = self.config.sample_size // self.config.patch_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_position_embedding(self.config.hidden_size, grid_size)[None])
        patch_weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for modulation in [block.adaLN_modulation[-1] for block in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)

    # Copied from diffusers_speedup.models.uvit.UViTModel.extract_init_dict
    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # An exported config.json also names this file for diffusers' AutoModel (`auto_map`, for trust_remote_code);
        # it is not a constructor argument, so it is left out rather than reported as an unexpected one.
        config_dict = {key: value for key, value in config_dict.items() if key != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTModel":
        """Build a published size by name (see `DIT_PRESETS`: "dit-s-2" … "dit-xl-8", "sit-s-2" … "sit-xl-8",
        "lightningdit-b-1" … "lightningdit-xl-2"); `overrides` replace or add config values.

        Example: ``DiTModel.from_preset("dit-xl-2", out_channels=8)`` is the released DiT-XL/2 at 256 px;
        ``DiTModel.from_preset("lightningdit-xl-1")`` is the released LightningDiT-XL/1.
        """
        key = name.lower() if isinstance(name, str) else name
        if key not in DIT_PRESETS:
            raise ValueError(f"Unknown DiT preset name={name!r}; choose one of {sorted(DIT_PRESETS)}")
        return cls(**{**DIT_PRESETS[key], **overrides})

    # --- forward -----------------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple:
        """Predict the network output for a batch of noisy latents.

        Args:
            hidden_states (`torch.Tensor`): (batch, in_channels, sample_size, sample_size) noisy input.
            timestep (`torch.Tensor`, `float` or `int`): the noise level's input per sample, shape (batch,), (1,)
                or 0-d, or a Python number: a DDPM timestep, or a continuous time t ∈ [0, 1] fed as is into the
                same sinusoidal embedding (SiT, REPA, LightningDiT).
            class_labels (`torch.LongTensor`, *optional*): (batch,) labels in ``[0, num_classes]``, where
                ``num_classes`` is the null label. `None` on a class-conditional model means all null labels. Must
                be `None` when `num_classes == 0`.
            return_dict (`bool`, defaults to `True`): return a `Transformer2DModelOutput` instead of a tuple.
        """
        config = self.config
        expected = (config.in_channels, config.sample_size, config.sample_size)
        if hidden_states.ndim != 4 or tuple(hidden_states.shape[1:]) != expected:
            raise ValueError(
                f"DiTModel expects hidden_states of shape (batch, {', '.join(map(str, expected))}), "
                f"got {tuple(hidden_states.shape)}"
            )
        batch, device = hidden_states.shape[0], hidden_states.device

        # Like DiT, the fixed position table is added in its own precision: under autocast the residual stream stays
        # in float32.
        x = self.x_embedder(hidden_states) + self.pos_embed
        timestep = _broadcast_timestep(timestep, batch, device)
        data_at_1 = config.time_input == "data_at_1"
        if data_at_1:
            timestep = 1 - timestep
        c = self.t_embedder(timestep)
        if self.y_embedder is not None:
            c = c + self.y_embedder(self._prepare_labels(class_labels, batch, device))
        elif class_labels is not None:
            raise ValueError("class_labels were given to an unconditional DiTModel (num_classes=0); pass None")
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, self.feat_rope)
            else:
                x = block(x, c, self.feat_rope)
        sample = self._unpatchify(self.final_layer(x, c))
        if data_at_1:  # SiT's velocity points to the data; ours to the noise. A learned σ half keeps its sign.
            channels = config.in_channels
            sample = torch.cat([-sample[:, :channels], sample[:, channels:]], dim=1)
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)

    def _prepare_labels(self, class_labels, batch: int, device: torch.device) -> torch.Tensor:
        if class_labels is None:
            if self.y_embedder.embedding_table.num_embeddings == self.config.num_classes:
                raise ValueError(
                    "class_labels=None needs the null label, which a DiTModel with class_dropout_prob=0 lacks"
                )
            return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        class_labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if class_labels.shape[0] != batch:
            raise ValueError(f"class_labels has {class_labels.shape[0]} entries for a batch of {batch}")
        return class_labels

    # Copied from diffusers_speedup.models.uvit.UViTModel._unpatchify
    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, h·w, p·p·C) with the channel fastest: U-ViT's '(p1 p2 C)' layout, DiT's 'nhwpqc -> nchpwq'.
        p = self.config.patch_size
        side = self.config.sample_size // p
        x = x.reshape(x.shape[0], side, side, p, p, self.out_channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], self.out_channels, side * p, side * p)

    # --- the diffusers layout ----------------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, model) -> "DiTModel":
        """The same network as a ``DiTTransformer2DModel`` (e.g. the transformer of ``facebook/DiT-XL-2-256``).

        The weights move without change; the per-block copies of the timestep MLP and label table must be equal
        (they are in every converted DiT checkpoint) and a ValueError names the first block and key that differ.
        The result gives the diffusers model's outputs: it keeps diffusers' timestep frequencies and pre-MLP
        LayerNorm epsilon (``downscale_freq_shift=1``, ``mlp_norm_eps=norm_eps``).
        """
        config = model.config
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or config.get("norm_elementwise_affine"):
            raise ValueError(
                "only DiTTransformer2DModel with norm_type='ada_norm_zero' and norm_elementwise_affine=False is DiT, "
                f"got norm_type={config.get('norm_type')!r}, norm_elementwise_affine={config.get('norm_elementwise_affine')!r}"
            )
        if config.get("activation_fn", "gelu-approximate") != "gelu-approximate" or not config.get(
            "attention_bias", True
        ):
            raise ValueError(
                "DiT uses activation_fn='gelu-approximate' and attention_bias=True, got "
                f"activation_fn={config.get('activation_fn')!r}, attention_bias={config.get('attention_bias')!r}"
            )
        with torch.device("meta"):  # every weight comes from `model`
            dit = cls(
                sample_size=config.sample_size,
                patch_size=config.patch_size,
                in_channels=config.in_channels,
                out_channels=config.out_channels if config.out_channels is not None else config.in_channels,
                num_layers=config.num_layers,
                hidden_size=config.num_attention_heads * config.attention_head_dim,
                num_attention_heads=config.num_attention_heads,
                num_classes=config.num_embeds_ada_norm,
                class_dropout_prob=0.1,  # diffusers' CombinedTimestepLabelEmbeddings always drops 10 %
                downscale_freq_shift=1.0,
                mlp_norm_eps=config.get("norm_eps", 1e-5),
            )
        state = diffusers_to_dit_state_dict(model.state_dict(), config.num_layers)
        # diffusers does not save the fixed position table; it computes the same one as DiTModel.
        grid_size = config.sample_size // config.patch_size
        position = sincos_position_embedding(dit.config.hidden_size, grid_size)[None]
        state.setdefault("pos_embed", position.to(device=model.device, dtype=model.dtype))
        # Copies, so that the two models do not share storage; device, dtype and mode follow `model`.
        dit.load_state_dict({key: value.clone() for key, value in state.items()}, strict=True, assign=True)
        return dit.train(model.training)

    def to_diffusers(self, exact: bool = True):
        """This network as a ``DiTTransformer2DModel``, with the shared embedders copied into every block.

        diffusers' class hard-codes two things: timestep frequencies with ``downscale_freq_shift=1`` and the
        LayerNorm epsilon 1e-6 before attention. A model built with other values (every model trained with this
        package's defaults) has the same weights there but not the same outputs; `exact=True` refuses it with a
        ValueError, `exact=False` converts the weights anyway.
        """
        from diffusers import DiTTransformer2DModel

        config = self.config
        problems = []
        if self.y_embedder is None or self.y_embedder.embedding_table.num_embeddings != config.num_classes + 1:
            problems.append(
                "diffusers' DiT needs a label table with the null row (num_classes > 0, class_dropout_prob > 0)"
            )
        if config.mlp_ratio != 4.0 or config.frequency_embedding_size != 256:
            problems.append(
                f"diffusers' DiT has mlp_ratio 4 and 256 timestep features, got mlp_ratio={config.mlp_ratio}, "
                f"frequency_embedding_size={config.frequency_embedding_size}"
            )
        options = {
            "mlp_type": "gelu",
            "norm_type": "layernorm",
            "use_rope": False,
            "use_qk_norm": False,
            "time_input": "noise_at_1",
        }
        changed = {name: config[name] for name, default in options.items() if config[name] != default}
        if changed:
            problems.append(
                f"diffusers' DiT has none of LightningDiT's options nor SiT's time direction, got {changed}"
            )
        if problems:
            raise ValueError("cannot convert to DiTTransformer2DModel: " + "; ".join(problems))
        if exact and (config.downscale_freq_shift != 1 or config.norm_eps != 1e-6):
            raise ValueError(
                "DiTTransformer2DModel would not give this model's outputs: it fixes downscale_freq_shift=1 and "
                f"norm_eps=1e-6 before attention, this model has downscale_freq_shift={config.downscale_freq_shift}, "
                f"norm_eps={config.norm_eps}. Pass exact=False to convert the weights anyway."
            )
        model = DiTTransformer2DModel(
            num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.hidden_size // config.num_attention_heads,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            num_layers=config.num_layers,
            sample_size=config.sample_size,
            patch_size=config.patch_size,
            num_embeds_ada_norm=config.num_classes,
            norm_eps=config.mlp_norm_eps,
        )
        model.load_state_dict(dit_to_diffusers_state_dict(self.state_dict(), config.num_layers), strict=True)
        return model if model.dtype == self.dtype else model.to(self.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "DiTModel":
        """`ModelMixin.from_pretrained`, which also reads diffusers' DiT and converts it (`from_diffusers`).

        Accepts a folder (or Hub repo) saved by this class, a ``DiTTransformer2DModel`` folder, or a ``DiTPipeline``
        folder such as ``facebook/DiT-XL-2-256``, whose ``transformer`` subfolder is read when no `subfolder` is
        given.
        """
        path = pretrained_model_name_or_path
        lookup = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
            if key in kwargs
        }
        given_subfolder = lookup.get("subfolder") is not None
        local = os.path.isdir(os.fspath(path))
        if not given_subfolder and local and _is_pipeline_folder(path):
            kwargs["subfolder"] = lookup["subfolder"] = "transformer"
        try:
            config = cls.load_config(path, **lookup)
        except OSError as error:
            if given_subfolder or local:
                raise
            # A Hub repo without a root config.json: a pipeline repo, whose model is in `transformer`.
            kwargs["subfolder"] = lookup["subfolder"] = "transformer"
            try:
                config = cls.load_config(path, **lookup)
            except OSError:
                raise error from None
        # Folders saved before diffusers had DiTTransformer2DModel (facebook/DiT-XL-2-256 among them) name
        # Transformer2DModel, which diffusers itself maps to DiTTransformer2DModel for norm_type "ada_norm_zero".
        if config.get("_class_name") in _DIFFUSERS_DIT_CLASSES:
            import diffusers

            source = getattr(diffusers, config["_class_name"]).from_pretrained(path, **kwargs)
            if not isinstance(source, diffusers.DiTTransformer2DModel):
                raise ValueError(
                    f"{path}: a {config['_class_name']} with norm_type={config.get('norm_type')!r} is not a DiT "
                    "(DiT has norm_type 'ada_norm_zero')"
                )
            return cls.from_diffusers(source)
        return super().from_pretrained(path, **kwargs)


_DIFFUSERS_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def _is_pipeline_folder(path) -> bool:
    """A local pipeline folder: model_index.json at its root and no config.json there."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "model_index.json")) and not os.path.isfile(
        os.path.join(path, "config.json")
    )


# --- key mapping between the official / DiTModel layout and diffusers' DiTTransformer2DModel ------------------------

# (DiTModel key, DiTTransformer2DModel key) for the weights outside the blocks.
_OUTER_KEYS = [
    ("x_embedder.proj.weight", "pos_embed.proj.weight"),
    ("x_embedder.proj.bias", "pos_embed.proj.bias"),
    ("final_layer.adaLN_modulation.1.weight", "proj_out_1.weight"),
    ("final_layer.adaLN_modulation.1.bias", "proj_out_1.bias"),
    ("final_layer.linear.weight", "proj_out_2.weight"),
    ("final_layer.linear.bias", "proj_out_2.bias"),
]
# The shared embedders, which diffusers keeps one copy of per block under transformer_blocks.{i}.norm1.emb.
_EMBEDDER_KEYS = [
    ("t_embedder.mlp.0.weight", "timestep_embedder.linear_1.weight"),
    ("t_embedder.mlp.0.bias", "timestep_embedder.linear_1.bias"),
    ("t_embedder.mlp.2.weight", "timestep_embedder.linear_2.weight"),
    ("t_embedder.mlp.2.bias", "timestep_embedder.linear_2.bias"),
    ("y_embedder.embedding_table.weight", "class_embedder.embedding_table.weight"),
]
# Per block: (DiTModel key under blocks.{i}., diffusers key under transformer_blocks.{i}.).
_BLOCK_KEYS = [
    ("adaLN_modulation.1.weight", "norm1.linear.weight"),
    ("adaLN_modulation.1.bias", "norm1.linear.bias"),
    ("attn.proj.weight", "attn1.to_out.0.weight"),
    ("attn.proj.bias", "attn1.to_out.0.bias"),
    ("mlp.fc1.weight", "ff.net.0.proj.weight"),
    ("mlp.fc1.bias", "ff.net.0.proj.bias"),
    ("mlp.fc2.weight", "ff.net.2.weight"),
    ("mlp.fc2.bias", "ff.net.2.bias"),
]
_QKV = ("to_q", "to_k", "to_v")  # the fused qkv's rows, in this order


def diffusers_to_dit_state_dict(state: dict, num_layers: int) -> dict:
    """A ``DiTTransformer2DModel`` state dict in the official DiT / `DiTModel` layout.

    Key mapping (diffusers → DiT): ``pos_embed.proj`` → ``x_embedder.proj``; ``transformer_blocks.{i}.norm1.emb.
    timestep_embedder.linear_1 / linear_2`` → ``t_embedder.mlp.0 / mlp.2`` and ``...norm1.emb.class_embedder.
    embedding_table`` → ``y_embedder.embedding_table`` (one copy kept; all blocks must agree); ``norm1.linear`` →
    ``blocks.{i}.adaLN_modulation.1``; ``attn1.to_q, to_k, to_v`` → ``blocks.{i}.attn.qkv`` (concatenated along the
    output dimension); ``attn1.to_out.0`` → ``attn.proj``; ``ff.net.0.proj`` → ``mlp.fc1``; ``ff.net.2`` →
    ``mlp.fc2``; ``proj_out_1`` → ``final_layer.adaLN_modulation.1``; ``proj_out_2`` → ``final_layer.linear``.
    ``pos_embed`` (a non-saved buffer in diffusers) is recomputed by `DiTModel`.

    Raises:
        ValueError: naming the block and key where a copy of the shared embedders differs from block 0's.
    """
    out = {ours: state[theirs] for ours, theirs in _OUTER_KEYS}
    for ours, theirs in _EMBEDDER_KEYS:
        reference = state[f"transformer_blocks.0.norm1.emb.{theirs}"]
        for i in range(1, num_layers):
            key = f"transformer_blocks.{i}.norm1.emb.{theirs}"
            if not torch.equal(state[key], reference):
                raise ValueError(
                    f"{key} differs from transformer_blocks.0's copy (largest difference "
                    f"{(state[key].float() - reference.float()).abs().max().item():.3g}): DiT shares one timestep "
                    "embedder and one label table across blocks, so this model has no DiTModel equivalent"
                )
        out[ours] = reference
    for i in range(num_layers):
        prefix = f"transformer_blocks.{i}."
        for ours, theirs in _BLOCK_KEYS:
            out[f"blocks.{i}.{ours}"] = state[prefix + theirs]
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state[f"{prefix}attn1.{n}.{part}"] for n in _QKV])
    if "pos_embed.pos_embed" in state:  # diffusers saves it only with pos_embed_max_size, which DiT does not use
        out["pos_embed"] = state["pos_embed.pos_embed"]
    return out


def dit_to_diffusers_state_dict(state: dict, num_layers: int) -> dict:
    """The inverse of `diffusers_to_dit_state_dict`: the shared embedders are copied into every block, the fused
    qkv is split into ``to_q, to_k, to_v``; ``pos_embed`` is dropped (diffusers recomputes the same table)."""
    out = {theirs: state[ours] for ours, theirs in _OUTER_KEYS}
    for i in range(num_layers):
        prefix = f"transformer_blocks.{i}."
        for ours, theirs in _EMBEDDER_KEYS:
            out[f"{prefix}norm1.emb.{theirs}"] = state[ours].clone()
        for ours, theirs in _BLOCK_KEYS:
            out[prefix + theirs] = state[f"blocks.{i}.{ours}"]
        for part in ("weight", "bias"):
            for name, chunk in zip(_QKV, state[f"blocks.{i}.attn.qkv.{part}"].chunk(3)):
                out[f"{prefix}attn1.{name}.{part}"] = chunk.clone()
    return out


# Copied from diffusers_speedup.models.uvit._broadcast_timestep
def _broadcast_timestep(timestep, batch: int, device: torch.device) -> torch.Tensor:
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 0 or timestep.numel() == 1:
        return timestep.reshape(1).expand(batch)
    if timestep.ndim != 1 or timestep.shape[0] != batch:
        raise ValueError(f"timestep must be a number or have shape (batch,) = ({batch},), got {tuple(timestep.shape)}")
    return timestep


def _check_config(**c) -> None:
    _check_transformer_config(c)
    if c["hidden_size"] % 4:
        _reject_config(c, "hidden_size", "must be divisible by 4 (the 2-D sin-cos position embedding)")
    if not isinstance(c["frequency_embedding_size"], int) or c["frequency_embedding_size"] < 2:
        _reject_config(c, "frequency_embedding_size", "must be an integer >= 2")
    if c["mlp_type"] not in ("gelu", "swiglu"):
        _reject_config(c, "mlp_type", "must be 'gelu' (DiT's MLP) or 'swiglu' (LightningDiT's)")
    if c["norm_type"] not in ("layernorm", "rmsnorm"):
        _reject_config(c, "norm_type", "must be 'layernorm' (DiT's) or 'rmsnorm' (LightningDiT's)")
    for name in ("use_rope", "use_qk_norm"):
        if not isinstance(c[name], bool):
            _reject_config(c, name, "must be True or False")
    if c["time_input"] not in ("noise_at_1", "data_at_1"):
        _reject_config(c, "time_input", "must be 'noise_at_1' (this package's, REPA's) or 'data_at_1' (SiT's code)")
    if c["use_rope"] and (c["hidden_size"] // c["num_attention_heads"]) % 4:
        _reject_config(c, "use_rope", "needs a head dimension (hidden_size / num_attention_heads) divisible by 4")


# Copied from diffusers_speedup.models.uvit._check_transformer_config
def _check_transformer_config(c: dict) -> None:
    """The checks every transformer of this package makes: sizes, heads, patches, MLP ratio, classes, label drop."""
    for name in ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers", "hidden_size"):
        if not isinstance(c[name], int) or isinstance(c[name], bool) or c[name] < 1:
            _reject_config(c, name, "must be a positive integer")
    if not isinstance(c["num_attention_heads"], int) or c["num_attention_heads"] < 1:
        _reject_config(c, "num_attention_heads", "must be a positive integer")
    if c["sample_size"] % c["patch_size"]:
        _reject_config(c, "patch_size", f"does not divide sample_size={c['sample_size']}")
    if c["hidden_size"] % c["num_attention_heads"]:
        _reject_config(c, "num_attention_heads", f"does not divide hidden_size={c['hidden_size']}")
    if not c["mlp_ratio"] > 0:
        _reject_config(c, "mlp_ratio", "must be > 0")
    if not isinstance(c["num_classes"], int) or c["num_classes"] < 0:
        _reject_config(c, "num_classes", "must be an integer >= 0 (0 builds an unconditional model)")
    if not 0 <= c["class_dropout_prob"] < 1:
        _reject_config(c, "class_dropout_prob", "must be in [0, 1)")


# Copied from diffusers_speedup.models.uvit._reject_config with UViT->DiT
def _reject_config(c: dict, name: str, why: str) -> NoReturn:
    raise ValueError(f"Invalid DiTModel config: {name}={c[name]!r} {why}")
