# Copyright 2025 The diffusers-speedup authors. Apache-2.0.
"""U-ViT (Bao et al., CVPR 2023) with ScaleLong long-skip scaling (Huang et al., NeurIPS 2023).

A single self-contained file: it imports only the standard library, torch and diffusers (xformers optionally, at the
moment it is asked for), because it is copied unchanged into exported model folders. dit_transformer.py repeats its
attention, `_broadcast_timestep`, `_unpatchify` and shared config checks for the same reason; the copies there are
marked ``# Copied from diffusers_speedup.models.uvit...``, so after editing one of these pieces here, run
``python tests/check_copies.py --fix`` to bring them along.

Every input is a token: ``[time, class?, patch_1 ... patch_n] + learned position embedding``. The transformer has
``num_layers = 2N + 1`` pre-LayerNorm blocks: N in-blocks, one mid-block and N out-blocks. The output of in-block
``j`` is carried over a long skip to out-block ``N - 1 - j`` (the deepest skip is consumed first), where it is joined
to the main path by concatenation and a ``Linear(2D, D)``. ScaleLong multiplies the skip tensor by a factor before
that concatenation.
"""

import math
from typing import NoReturn

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

SKIP_SCALING_MODES = ("none", "inv_sqrt2", "constant", "learned", "learned_per_skip")
TIME_EMBEDDING_TYPES = ("sinusoidal", "learned")
INIT_SCHEMES = ("uvit", "beit")
# BEiT's `init_scale`: the output projection starts 1000 times smaller than the other linear layers.
BEIT_OUTPUT_INIT_SCALE = 1e-3

# Architecture of the published models. Anything else (sample_size, in_channels, num_classes, ...) comes from the
# constructor defaults or from the overrides given to `UViTModel.from_preset`.
UVIT_PRESETS = {
    # U-ViT paper, Table 1: layers include the mid block (the official configs' `depth` is layers - 1).
    "uvit-s": {"num_layers": 13, "hidden_size": 512, "num_attention_heads": 8},
    "uvit-s-deep": {"num_layers": 17, "hidden_size": 512, "num_attention_heads": 8},
    "uvit-m": {"num_layers": 17, "hidden_size": 768, "num_attention_heads": 12},
    "uvit-l": {"num_layers": 21, "hidden_size": 1024, "num_attention_heads": 16},
    # The official ImageNet-256 U-ViT-H/2 drops the final 3x3 conv (`conv=False`).
    "uvit-h": {"num_layers": 29, "hidden_size": 1152, "num_attention_heads": 16, "final_conv": False},
    # The ViT-B of the Min-SNR paper, `vit_base_patch2_32` of its official code: no long skips, biases on query and
    # value only, LayerNorm eps 1e-6, no final LayerNorm (its `use_mean_pooling` makes that norm an identity), no
    # final conv, a learned 4000-row table of time embeddings indexed by the DDPM step, and BEiT's init.
    "vit-b-minsnr": {
        "num_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "patch_size": 2,
        "qkv_bias": "qv",
        "use_long_skips": False,
        "final_conv": False,
        "final_norm": False,
        "layer_norm_eps": 1e-6,
        "time_embedding_type": "learned",
        "num_time_embeddings": 4000,
        "init_scheme": "beit",
    },
}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t·f_k), sin(t·f_k)]`` with ``f_k = max_period^(-k / (dim // 2))``.

    Works for integer DDPM indices and for continuous noise levels alike (e.g. EDM's ``c_noise = ln(σ)/4``); the
    arithmetic is always done in float32. An odd ``dim`` gets one zero column at the end.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class UViTAttention(nn.Module):
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
                    "xformers attention was requested for UViTModel, but the `xformers` package is not installed; "
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


class UViTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool | str = False,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = UViTAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class UViTSkipBlock(UViTBlock):
    """Out-block: first merges the long skip into the main path with ``Linear(cat([x, skip]))``, then a `UViTBlock`.

    A class of its own, not an optional layer of `UViTBlock`, so that each class named in `_repeated_blocks` has one
    structure and diffusers' regional compilation traces each exactly once.
    """

    def __init__(self, dim: int, *args, **kwargs):
        super().__init__(dim, *args, **kwargs)
        self.skip_linear = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return super().forward(self.skip_linear(torch.cat([x, skip], dim=-1)))


class SkipGate(nn.Module):
    """ScaleLong's learnable skip coefficient: an SE-style gate over tokens.

    ``gate(s) = sigmoid(fc2(relu(fc1(mean(s, dim=-1)))))`` of shape (batch, tokens, 1): each token of the skip feature
    gets a factor in (0, 1) computed from the feature itself. ``fc1: Linear(tokens, tokens // reduction)``,
    ``fc2: Linear(tokens // reduction, tokens)``, both with bias and PyTorch's default Linear initialisation, as in
    the official code (which builds the gates after the U-ViT init). The hidden width is at least 1 so that tiny
    models with fewer than ``reduction`` tokens still have a working gate.
    """

    def __init__(self, num_tokens: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, num_tokens // reduction)
        self.fc1 = nn.Linear(num_tokens, hidden)
        self.fc2 = nn.Linear(hidden, num_tokens)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(skip.mean(dim=-1))))).unsqueeze(-1)


class UViTModel(ModelMixin, ConfigMixin):
    r"""U-ViT for class-conditional or unconditional diffusion on pixels or latents, with ScaleLong skip scaling.

    Tokens: ``[time, class (only if num_classes > 0), patches]`` plus a learned position embedding. The time token
    embeds ``timestep_scale · timestep + timestep_shift`` (the identity by default): sinusoidally, or as a row of a
    learned table (`time_embedding_type`), optionally followed by an MLP. The class token embeds labels
    ``0 .. num_classes - 1``; label ``num_classes`` is the learned null label used for classifier-free guidance.
    The head is ``LayerNorm (optional) → Linear(D, patch_size² · out_channels)``, the extra tokens are dropped, the
    patches are put back into an image and an optional 3×3 convolution follows (U-ViT's ``conv=True``).

    Long skips and ScaleLong. With ``use_long_skips`` the ``num_layers = 2N + 1`` blocks are N in-blocks, a mid-block
    and N out-blocks. Skip ``i`` (``i = 0 .. N-1``) is the one consumed by ``out_blocks[i]``; it carries the output of
    ``in_blocks[N-1-i]``, so ``i = 0`` is the innermost skip and ``i = N-1`` the outermost (first in-block ↔ last
    out-block). The skip tensor ``s`` (batch, tokens, D) is multiplied by its factor *before* the
    ``Linear(cat([x, factor · s]))`` merge of the out-block; the main path ``x`` is never scaled:

    - ``"none"``: factor 1 (plain U-ViT).
    - ``"inv_sqrt2"``: factor ``2^-1/2`` for every skip (ScaleLong's 1/√2-CS).
    - ``"constant"``: factor ``skip_kappa^(N-1-i)`` (ScaleLong's CS): the outermost skip gets ``κ⁰ = 1`` and each
      skip further in is ``κ`` times smaller; equivalently, the skip leaving ``in_blocks[j]`` gets ``κ^j`` (the paper's
      ``κ_i = κ^(i-1)`` counted from 1 at the outermost skip).
    - ``"learned"``: factor ``SkipGate(s)`` of shape (batch, tokens, 1), one gate shared by all skips (ScaleLong's LS).
    - ``"learned_per_skip"``: factor ``skip_gates[i](s)``, one gate per skip (ScaleLong's LS, non-shared).

    ``skip_scales()`` returns the fixed factors per skip; the learned gates live in ``skip_gates``.

    Args:
        sample_size (`int`, defaults to 32): height = width of the input (pixels or latents), in pixels.
        patch_size (`int`, defaults to 2): side of the square patches; must divide `sample_size`.
        in_channels (`int`, defaults to 4): channels of the input (3 for RGB, 4 for SD-VAE latents).
        out_channels (`int`, *optional*): channels of the output; defaults to `in_channels` (use `2 * in_channels`
            for a learned-σ head).
        num_layers (`int`, defaults to 13): number of transformer blocks, mid-block included; odd when
            `use_long_skips` (in-blocks = out-blocks = (num_layers - 1) // 2).
        hidden_size (`int`, defaults to 512): token width D.
        num_attention_heads (`int`, defaults to 8): attention heads; must divide `hidden_size`.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width as a multiple of `hidden_size`.
        qkv_bias (`bool` or `"qv"`, defaults to `False`): bias of the query/key/value projection: `True` for all
            three, `"qv"` for query and value only (BEiT's layout, the Min-SNR ViT).
        num_classes (`int`, defaults to 0): number of classes; 0 builds an unconditional model (no class token).
        class_dropout_prob (`float`, defaults to 0.0): probability, in training mode only, of replacing a label by
            the null label (classifier-free guidance training). Leave at 0 when the training objective drops labels.
        use_long_skips (`bool`, defaults to `True`): U-ViT's long skips; `False` gives a plain ViT with time/class
            tokens (the Min-SNR paper's ViT).
        skip_scaling (`str`, defaults to `"none"`): one of "none", "inv_sqrt2", "constant", "learned",
            "learned_per_skip" (see above). Must be "none" without long skips.
        skip_kappa (`float`, defaults to 0.5): κ of the "constant" mode; must be > 0 (ScaleLong suggests 0.5 – 0.95).
        skip_gate_reduction (`int`, defaults to 16): hidden-width reduction r of the learned gates.
        final_conv (`bool`, defaults to `True`): 3×3 convolution on the output image, as U-ViT.
        mlp_time_embed (`bool`, defaults to `False`): pass the sinusoidal time embedding through
            `Linear(D, 4D) → SiLU → Linear(4D, D)` (U-ViT's `mlp_time_embed`).
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of every LayerNorm.
        final_norm (`bool`, defaults to `True`): LayerNorm before the output projection (U-ViT has it; the Min-SNR
            ViT has none).
        time_embedding_type (`str`, defaults to `"sinusoidal"`): `"sinusoidal"` (U-ViT) or `"learned"`: row
            ``round(t)`` of a learned `num_time_embeddings`-row table (the Min-SNR ViT; ``t`` must then be a DDPM
            step index in ``[0, num_time_embeddings)``).
        num_time_embeddings (`int`, defaults to 4000): rows of the learned time table (used by `"learned"` only).
        timestep_scale (`float`, defaults to 1.0) and timestep_shift (`float`, defaults to 0.0): the network embeds
            ``timestep_scale · timestep + timestep_shift``. They map the scheduler's timestep onto the time input a
            converted network was trained with (U-ViT's discrete models take the step ``n = t + 1``, its continuous
            ones ``999 · t_continuous``); leave them at the identity when training from scratch.
        init_scheme (`str`, defaults to `"uvit"`): `"uvit"` or `"beit"` (the Min-SNR ViT: additionally divides the
            attention output projection and second MLP layer of block ``l = 1 .. num_layers`` by ``√(2l)`` and
            multiplies the output projection by 0.001).

    ``forward(hidden_states, timestep, class_labels=None, return_dict=True)`` returns
    ``Transformer2DModelOutput(sample=...)`` of shape (batch, out_channels, sample_size, sample_size).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["UViTBlock", "UViTSkipBlock"]
    # For diffusers' regional compilation (compile_repeated_blocks): one graph per class.
    _repeated_blocks = ["UViTBlock", "UViTSkipBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 13,
        hidden_size: int = 512,
        num_attention_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool | str = False,
        num_classes: int = 0,
        class_dropout_prob: float = 0.0,
        use_long_skips: bool = True,
        skip_scaling: str = "none",
        skip_kappa: float = 0.5,
        skip_gate_reduction: int = 16,
        final_conv: bool = True,
        mlp_time_embed: bool = False,
        layer_norm_eps: float = 1e-5,
        final_norm: bool = True,
        time_embedding_type: str = "sinusoidal",
        num_time_embeddings: int = 4000,
        timestep_scale: float = 1.0,
        timestep_shift: float = 0.0,
        init_scheme: str = "uvit",
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
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
            use_long_skips=use_long_skips,
            skip_scaling=skip_scaling,
            skip_kappa=skip_kappa,
            skip_gate_reduction=skip_gate_reduction,
            qkv_bias=qkv_bias,
            time_embedding_type=time_embedding_type,
            num_time_embeddings=num_time_embeddings,
            init_scheme=init_scheme,
        )
        self.out_channels = out_channels
        self.gradient_checkpointing = False

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        learned_time = time_embedding_type == "learned"
        self.time_table = nn.Embedding(num_time_embeddings, hidden_size) if learned_time else None
        self.time_embed = (
            nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(), nn.Linear(4 * hidden_size, hidden_size))
            if mlp_time_embed
            else nn.Identity()
        )
        # One extra row: label `num_classes` is the null label of classifier-free guidance.
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.num_extra_tokens = 2 if num_classes > 0 else 1
        num_tokens = self.num_extra_tokens + (sample_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))

        block_args = (hidden_size, num_attention_heads, mlp_ratio, qkv_bias, layer_norm_eps)
        if use_long_skips:
            num_skips = (num_layers - 1) // 2
            self.in_blocks = nn.ModuleList([UViTBlock(*block_args) for _ in range(num_skips)])
            self.mid_block = UViTBlock(*block_args)
            self.out_blocks = nn.ModuleList([UViTSkipBlock(*block_args) for _ in range(num_skips)])
        else:
            num_skips = 0
            self.in_blocks = nn.ModuleList([UViTBlock(*block_args) for _ in range(num_layers)])
            self.mid_block = None
            self.out_blocks = nn.ModuleList()

        self.norm_out = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if final_norm else nn.Identity()
        self.proj_out = nn.Linear(hidden_size, patch_size**2 * out_channels)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1) if final_conv else nn.Identity()

        # U-ViT init: trunc-normal(0.02) Linear weights, zero biases, LayerNorm (1, 0), trunc-normal position
        # embedding; convolutions and the class and time tables keep PyTorch's defaults (N(0, 1) for the tables,
        # which the Min-SNR code builds after its init). Like timm's trunc_normal_, the cut is at ±2 absolute (100σ),
        # so this is in effect N(0, 0.02²), exactly what the official models started from.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_uvit_weights)
        if init_scheme == "beit":
            # BEiT's fix_init_weight: the residual branches of deeper blocks start smaller, 1/√(2l) for block l.
            with torch.no_grad():
                for layer, block in enumerate(self.blocks(), start=1):
                    block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                    block.mlp[2].weight.div_(math.sqrt(2.0 * layer))
                self.proj_out.weight.mul_(BEIT_OUTPUT_INIT_SCALE)
                self.proj_out.bias.mul_(BEIT_OUTPUT_INIT_SCALE)

        gate_count = {"learned": min(1, num_skips), "learned_per_skip": num_skips}.get(skip_scaling, 0)
        self.skip_gates = nn.ModuleList([SkipGate(num_tokens, skip_gate_reduction) for _ in range(gate_count)])
        # ScaleLong builds its gates after the U-ViT init, so they start from PyTorch's default Linear init.
        for gate in self.skip_gates:
            gate.reset_parameters()

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # An exported config.json also names this file for diffusers' AutoModel (`auto_map`, for trust_remote_code);
        # it is not a constructor argument, so it is left out rather than reported as an unexpected one.
        config_dict = {key: value for key, value in config_dict.items() if key != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UViTModel":
        """Build a published architecture by name (see `UVIT_PRESETS`); `overrides` replace or add config values.

        Example: ``UViTModel.from_preset("uvit-l", sample_size=32, in_channels=4, num_classes=1000)``.
        """
        key = name.lower() if isinstance(name, str) else name
        if key not in UVIT_PRESETS:
            raise ValueError(f"Unknown U-ViT preset name={name!r}; choose one of {sorted(UVIT_PRESETS)}")
        return cls(**{**UVIT_PRESETS[key], **overrides})

    def blocks(self) -> list:
        """All transformer blocks in the order they run: in-blocks, mid-block, out-blocks."""
        middle = [self.mid_block] if self.mid_block is not None else []
        return [*self.in_blocks, *middle, *self.out_blocks]

    @property
    def num_skips(self) -> int:
        """Number of long skip connections N (0 without long skips)."""
        return len(self.out_blocks)

    def skip_scales(self) -> list:
        """Fixed factor applied to each skip, indexed like `out_blocks` (0 = innermost); see the class docstring.

        Entries are floats, or None in the learned modes, where the factor depends on the skip feature
        (use ``skip_gates[0](s)`` / ``skip_gates[i](s)``).
        """
        return [self._fixed_skip_scale(i) for i in range(self.num_skips)]

    def _fixed_skip_scale(self, index: int):
        mode = self.config.skip_scaling
        if mode == "none":
            return 1.0
        if mode == "inv_sqrt2":
            return 2.0**-0.5
        if mode == "constant":
            return float(self.config.skip_kappa) ** (self.num_skips - 1 - index)
        return None

    def scale_skip(self, skip: torch.Tensor, index: int) -> torch.Tensor:
        """Return skip `index` (as consumed by ``out_blocks[index]``) multiplied by its ScaleLong factor."""
        mode = self.config.skip_scaling
        if mode == "learned":
            return skip * self.skip_gates[0](skip)
        if mode == "learned_per_skip":
            return skip * self.skip_gates[index](skip)
        scale = self._fixed_skip_scale(index)
        return skip if scale == 1.0 else skip * scale

    def _run_block(self, block: nn.Module, *args) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple:
        """Predict the network output for a batch of noisy samples.

        Args:
            hidden_states (`torch.Tensor`): (batch, in_channels, sample_size, sample_size) noisy input.
            timestep (`torch.Tensor`, `float` or `int`): noise level per sample, shape (batch,), (1,) or 0-d, or a
                Python number; long DDPM indices and float noise levels (e.g. EDM's ``ln(σ)/4``) are both fine.
            class_labels (`torch.LongTensor`, *optional*): (batch,) labels in ``[0, num_classes]``, where
                ``num_classes`` means "unconditional". `None` on a class-conditional model means all unconditional.
                Must be `None` when `num_classes == 0`.
            return_dict (`bool`, defaults to `True`): return a `Transformer2DModelOutput` instead of a tuple.
        """
        config = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1:] != (
            config.in_channels,
            config.sample_size,
            config.sample_size,
        ):
            raise ValueError(
                f"UViTModel expects hidden_states of shape (batch, {config.in_channels}, {config.sample_size}, "
                f"{config.sample_size}), got {tuple(hidden_states.shape)}"
            )
        batch = hidden_states.shape[0]
        timestep = _broadcast_timestep(timestep, batch, hidden_states.device)

        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2)
        time_token = self.time_embed(self._embed_time(timestep).to(x.dtype))
        tokens = [time_token[:, None]]
        if self.class_embed is not None:
            tokens.append(self.class_embed(self._prepare_labels(class_labels, batch, x.device))[:, None])
        elif class_labels is not None:
            raise ValueError("class_labels were given to an unconditional UViTModel (num_classes=0); pass None")
        x = torch.cat([*tokens, x], dim=1) + self.pos_embed

        skips = []
        for block in self.in_blocks:
            x = self._run_block(block, x)
            skips.append(x)
        if self.mid_block is not None:
            x = self._run_block(self.mid_block, x)
            for index, block in enumerate(self.out_blocks):
                x = self._run_block(block, x, self.scale_skip(skips.pop(), index))

        x = self.proj_out(self.norm_out(x))[:, self.num_extra_tokens :]
        sample = self.conv_out(self._unpatchify(x))
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)

    def _embed_time(self, timestep: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.timestep_scale != 1.0 or config.timestep_shift != 0.0:
            timestep = timestep.float() * config.timestep_scale + config.timestep_shift
        if self.time_table is None:
            return timestep_embedding(timestep, config.hidden_size)
        # Schedulers may hand over float steps (e.g. 999.0); the table is indexed by the nearest integer step, as
        # the Min-SNR sampler rounds σ to its grid. An index out of range is reported by nn.Embedding.
        index = timestep.round().long() if timestep.is_floating_point() else timestep.long()
        return self.time_table(index)

    def _prepare_labels(self, class_labels, batch: int, device: torch.device) -> torch.Tensor:
        null_label = self.config.num_classes
        if class_labels is None:
            return torch.full((batch,), null_label, dtype=torch.long, device=device)
        class_labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if class_labels.shape[0] != batch:
            raise ValueError(f"class_labels has {class_labels.shape[0]} entries for a batch of {batch}")
        if self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(batch, device=device) < self.config.class_dropout_prob
            class_labels = torch.where(drop, torch.full_like(class_labels, null_label), class_labels)
        return class_labels

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, h·w, p·p·C) with the channel fastest: U-ViT's '(p1 p2 C)' layout, DiT's 'nhwpqc -> nchpwq'.
        p = self.config.patch_size
        side = self.config.sample_size // p
        x = x.reshape(x.shape[0], side, side, p, p, self.out_channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], self.out_channels, side * p, side * p)


def _init_uvit_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _broadcast_timestep(timestep, batch: int, device: torch.device) -> torch.Tensor:
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 0 or timestep.numel() == 1:
        return timestep.reshape(1).expand(batch)
    if timestep.ndim != 1 or timestep.shape[0] != batch:
        raise ValueError(f"timestep must be a number or have shape (batch,) = ({batch},), got {tuple(timestep.shape)}")
    return timestep


def _check_config(**c) -> None:
    _check_transformer_config(c)
    if c["skip_scaling"] not in SKIP_SCALING_MODES:
        _reject_config(c, "skip_scaling", f"is not one of {SKIP_SCALING_MODES}")
    if c["use_long_skips"] and c["num_layers"] % 2 == 0:
        _reject_config(c, "num_layers", "must be odd with use_long_skips=True (in-blocks + 1 mid-block + out-blocks)")
    if not c["use_long_skips"] and c["skip_scaling"] != "none":
        _reject_config(c, "skip_scaling", "needs use_long_skips=True (there are no long skips to scale)")
    if c["skip_scaling"] == "constant" and not c["skip_kappa"] > 0:
        _reject_config(c, "skip_kappa", "must be > 0 for skip_scaling='constant'")
    if not isinstance(c["skip_gate_reduction"], int) or c["skip_gate_reduction"] < 1:
        _reject_config(c, "skip_gate_reduction", "must be a positive integer")
    if not (isinstance(c["qkv_bias"], bool) or c["qkv_bias"] == "qv"):
        _reject_config(c, "qkv_bias", "must be False, True or 'qv' (query and value biases only)")
    if c["time_embedding_type"] not in TIME_EMBEDDING_TYPES:
        _reject_config(c, "time_embedding_type", f"is not one of {TIME_EMBEDDING_TYPES}")
    if not isinstance(c["num_time_embeddings"], int) or c["num_time_embeddings"] < 1:
        _reject_config(c, "num_time_embeddings", "must be a positive integer (rows of the learned time table)")
    if c["init_scheme"] not in INIT_SCHEMES:
        _reject_config(c, "init_scheme", f"is not one of {INIT_SCHEMES}")


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


def _reject_config(c: dict, name: str, why: str) -> NoReturn:
    raise ValueError(f"Invalid UViTModel config: {name}={c[name]!r} {why}")
