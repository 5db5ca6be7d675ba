# Copyright 2026 The diffusers-speedup authors. Licensed under the Apache License, Version 2.0.
"""EDM2's magnitude-preserving UNet (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", arXiv 2312.02696), written from the paper's formulas.

Self-contained: imports only the standard library, torch and diffusers, because this file is copied into exported
model folders and loaded there with `trust_remote_code=True`. For that reason `edm_scalings`, EDM's preconditioning,
is a marked copy (``# Copied from``) of the scheduler's in scheduling_edm_heun.py; edit it there.

The model is the full EDM denoiser D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise): it takes the raw noisy sample
x = x0 + σ·n and σ, and returns the denoised estimate of x0 (plus, on request, the learned log-variance u(σ) used by
EDM2's uncertainty loss weighting).

Three points of the paper's config ladder (Table 1) are options of the one class, `architecture="C" | "E" | "G"`:

* "C" (streamlined baseline): no biases anywhere; a ones channel concatenated to the input; Fourier features for the
  noise level; group norms without mean subtraction or learned scale; cosine attention; ADM's pre-activation residual
  blocks (norm → SiLU → conv on the residual branch, resampling on both branches, plain sums and concatenations);
  two embedding layers; weights used as stored, He-uniform initialised.
* "E" = C + magnitude-preserving learned layers: every weight is N(0, 1) initialised, normalised on use (standard
  weight normalisation) and renormalised in place after every training step (forced weight normalisation). The
  inverse-square-root learning-rate decay that completes the paper's Config E is the trainer's business.
* "G" (the published EDM2 network) = E + Config F's layout (no group norms; pixel norm at the start of each encoder
  block; resampling and a 1×1 conv on the main path; one embedding layer; no SiLU before the output) + Config G's
  magnitude-preserving fixed-function layers: MP-Fourier (√2), MP-SiLU (/0.596), MP-Sum (t=0.3 for residual and
  attention branches, 0.5 for the label), MP-Cat (t=0.5) and zero-initialised learned gains on the conditioning and
  the output, so D(x; σ) = c_skip·x at initialisation.

C and E are our reading of the paper's ladder (its code ships only G); the balances `res_balance`, `attn_balance`,
`label_balance` and `concat_balance` and the learned gains exist only in G.
"""

import inspect
import math
import re
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

ARCHITECTURES = ("C", "E", "G")

# ---------------------------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives (paper App. B; equation numbers from the arXiv version).


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Rescale `x` to unit RMS over the dimensions `dim` (default: all but the first), eq. 47.

    For a weight of shape (out, in, *kernel) each output unit's row ends up with norm √fan_in. The norm is taken in
    float32; `eps` keeps all-zero slices finite.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def pixel_norm(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Rescale each pixel's channel vector of an (N, C, H, W) tensor to unit RMS (eq. 30)."""
    return normalize(x, dim=1, eps=eps)


def group_rms_norm(x: torch.Tensor, num_groups: int, eps: float = 1e-4) -> torch.Tensor:
    """Config C's group norm: unit RMS per group of channels, without mean subtraction or learned scale."""
    n, c, h, w = x.shape
    return normalize(x.reshape(n, num_groups, c // num_groups * h * w), dim=2, eps=eps).reshape(n, c, h, w)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its RMS under a unit Gaussian input, E[silu(x)²]^½ ≈ 0.596 (eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Blend (1-t)·a + t·b, rescaled so that two uncorrelated unit-magnitude inputs give a unit-magnitude output (eq. 88)."""
    return (a * (1 - t) + b * t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate along `dim` so that `a` and `b` contribute in ratio (1-t):t whatever their sizes, and the result
    keeps unit magnitude (eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], dim=dim)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """2× box-filter downsampling ('down'), nearest-neighbour upsampling ('up') or identity ('keep')."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class MPFourier(nn.Module):
    """Random Fourier features of a scalar per sample (eq. 75).

    Args:
        num_channels: number of features.
        bandwidth: standard deviation of the frequencies, in cycles per unit of input.
        magnitude_preserving: scale by √2 so that the features have unit RMS (Config G); 1 otherwise (Config C/E).
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0, magnitude_preserving: bool = True):
        super().__init__()
        # Persistent buffers: the random frequencies are part of the trained model and must round-trip.
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))
        self.scale = math.sqrt(2) if magnitude_preserving else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float().ger(self.freqs.float()) + self.phases.float()
        return (torch.cos(y) * self.scale).to(x.dtype)


class MPConv(nn.Module):
    """Bias-free convolution (or linear layer when `kernel_size=()`) with EDM2's weight normalisation (eqs. 47, 66).

    With `weight_norm=True` the stored weight is N(0, 1) initialised and each output unit's row is kept at norm
    √fan_in (unit RMS per element, less EDM2's ε = 1e-4): in training mode it is renormalised in place before use
    (forced weight normalisation, so the effective learning rate is fixed), and it is normalised again on use with
    gradients flowing through (standard weight normalisation). The row actually applied has norm `gain`. In eval mode the stored weight
    is never touched, so EMA or inference copies stay exactly as they were saved.

    With `weight_norm=False` (Config C) the weight is He-uniform initialised and used as stored, times `gain`.

    Args:
        in_channels: input channels (fan-in per kernel tap).
        out_channels: output channels.
        kernel_size: `()` for a linear layer on (N, C) inputs, `(k, k)` for a 2-D convolution with 'same' padding.
        weight_norm: forced plus standard weight normalisation (Config E and G) or none (Config C).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(), weight_norm: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight_norm = weight_norm
        weight = torch.randn(out_channels, in_channels, *kernel_size)
        if not weight_norm:
            # He-uniform with unit gain: U(±√(3/fan_in)) has variance 1/fan_in.
            bound = math.sqrt(3 / weight[0].numel())
            weight = torch.rand_like(weight).mul(2 * bound).sub(bound)
        self.weight = nn.Parameter(weight)

    def _float_weight(self) -> torch.Tensor:
        # A view of the Parameter, not the Parameter itself, enters the autograd graph: layerwise casting swaps the
        # Parameter's storage back to the storage dtype (e.g. float8) right after the forward pass, and backward
        # must still read the float32 values this forward used. The view keeps them alive without a copy.
        return self.weight.view_as(self.weight).float()

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self._float_weight()
        if self.weight_norm:
            if self.training:
                # Forced WN with EDM2's ε = 1e-4, as on use below: r ↦ r / (r + ε) has its fixed point at row RMS
                # 1 − ε with slope ε, so a repeat (a gradient-checkpoint recompute) moves a row only ε times its
                # distance from there and never shrinks it further; the stored rows equal the official ones.
                with torch.no_grad():
                    self.weight.copy_(normalize(w))
                w = self._float_weight()
            w = normalize(w) * (1 / math.sqrt(w[0].numel()))
        w = (w * gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


# ---------------------------------------------------------------------------------------------------------------------
# Blocks


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Cosine self-attention over the pixels of a (N, 3C, H, W) tensor of queries, keys and values.

    q, k and v are pixel-normalised per head, so the logits are cosine similarities scaled by √(C/heads)."""
    n, c3, h, w = qkv.shape
    c = c3 // 3
    qkv = qkv.reshape(n, num_heads, c // num_heads, 3, h * w)
    q, k, v = normalize(qkv, dim=2).permute(3, 0, 1, 4, 2).unbind(0)  # each (N, heads, HW, C/heads)
    y = F.scaled_dot_product_attention(q, k, v)
    return y.permute(0, 1, 3, 2).reshape(n, c, h, w)


def _num_groups(channels: int) -> int:
    """EDM's group count: up to 32 groups of at least 4 channels, dividing `channels`."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


class EDM2Block(nn.Module):
    """One UNet block: a residual unit with noise/label conditioning, optional resampling and optional attention.

    Args:
        in_channels: input channels (for decoder blocks, after concatenation with the skip).
        out_channels: output channels.
        emb_channels: width of the conditioning embedding.
        flavor: "enc" or "dec"; in Config G encoder blocks pixel-normalise their main path, decoder blocks do not.
        resample_mode: "keep", "down" or "up".
        attention: whether a cosine self-attention unit follows the residual unit.
        magnitude_preserving: Config G layout and fixed-function layers; otherwise Config C/E pre-activation layout.
        weight_norm: passed to every `MPConv`.
        channels_per_head: attention head width.
        dropout: dropout probability before the second convolution.
        res_balance: MP-Sum weight t of the residual branch (Config G).
        attn_balance: MP-Sum weight t of the attention branch (Config G).
        clip_act: clamp the output to ±clip_act (keeps fp16 finite); None disables.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        attention: bool = False,
        magnitude_preserving: bool = True,
        weight_norm: bool = True,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.magnitude_preserving = magnitude_preserving
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act

        # Config G's encoder blocks change width on the main path before the residual unit (conv_res0 out→out);
        # everywhere else the residual unit changes width itself (in→out) and the skip path gets a 1×1 conv.
        g_encoder = magnitude_preserving and flavor == "enc"
        self.conv_res0 = MPConv(out_channels if g_encoder else in_channels, out_channels, (3, 3), weight_norm)
        self.emb_linear = MPConv(emb_channels, out_channels, (), weight_norm)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3), weight_norm)
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1), weight_norm) if in_channels != out_channels else None
        if magnitude_preserving:
            self.emb_gain = nn.Parameter(torch.zeros([]))  # c = 1 at initialisation: no conditioning yet
        if self.num_heads:
            self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1), weight_norm)
            self.attn_proj = MPConv(out_channels, out_channels, (1, 1), weight_norm)
        self.num_groups_in = _num_groups(in_channels)
        self.num_groups_out = _num_groups(out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self._forward_mp(x, emb) if self.magnitude_preserving else self._forward_preactivation(x, emb)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _forward_mp(self, x, emb):
        """Config G (Fig. 21): main path normalised in the encoder, residual and attention blended by MP-Sum."""
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            y = self.attn_proj(attention(self.attn_qkv(x), self.num_heads))
            x = mp_sum(x, y, t=self.attn_balance)
        return x

    def _forward_preactivation(self, x, emb):
        """Config C/E (ADM layout without biases): norm → SiLU → conv on the residual branch, plain sums."""
        y = F.silu(group_rms_norm(x, self.num_groups_in))
        y = self.conv_res0(resample(y, self.resample_mode))
        scale = self.emb_linear(emb) + 1  # adaptive scale; the shift went with the biases in Config C
        y = F.silu(group_rms_norm(y, self.num_groups_out) * scale[:, :, None, None].to(y.dtype))
        y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        x = resample(x, self.resample_mode)
        if self.conv_skip is not None:
            x = self.conv_skip(x)
        x = x + y
        if self.num_heads:
            x = x + self.attn_proj(attention(self.attn_qkv(group_rms_norm(x, self.num_groups_out)), self.num_heads))
        return x


# ---------------------------------------------------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1): the definition of scheduling_edm_heun.py, repeated because this
# file ships on its own.

# Copied from diffusers_speedup.schedulers.scheduling_edm_heun.EDMScalings
EDMScalings = namedtuple("EDMScalings", ["c_skip", "c_out", "c_in", "c_noise"])


# Copied from diffusers_speedup.schedulers.scheduling_edm_heun.edm_scalings
def edm_scalings(sigma: float | torch.Tensor, sigma_data: float, prediction_type: str = "epsilon") -> EDMScalings:
    """
    EDM's preconditioning at noise level σ, elementwise for a tensor σ and in float64 for a Python float.

    Args:
        sigma (`float` or `torch.Tensor`): the noise level σ > 0.
        sigma_data (`float`): standard deviation of the data.
        prediction_type (`str`, defaults to `"epsilon"`): `"v_prediction"` negates c_out, as diffusers' EDM
            schedulers do, so that F is a v-style target; any other value leaves EDM's c_out.
    """
    sqrt, log = (torch.sqrt, torch.log) if isinstance(sigma, torch.Tensor) else (math.sqrt, math.log)
    c_out = sigma * sigma_data / sqrt(sigma**2 + sigma_data**2)
    return EDMScalings(
        c_skip=sigma_data**2 / (sigma**2 + sigma_data**2),
        c_out=-c_out if prediction_type == "v_prediction" else c_out,
        c_in=1 / sqrt(sigma**2 + sigma_data**2),
        c_noise=log(sigma) / 4,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class EDM2UNetOutput(BaseOutput):
    """Output of `EDM2UNetModel`.

    Args:
        sample: the denoised estimate D(x; σ) of the clean sample, shape (B, C, H, W), float32.
        logvar: the learned log-variance u(σ) of shape (B, 1, 1, 1) when `return_logvar=True`, else None.
    """

    sample: torch.Tensor
    logvar: torch.Tensor | None = None


# Size ladder of the paper (Table 2) for ImageNet-512 latents (64×64×4 from sd-vae-ft-mse, 1000 classes), plus a
# CIFAR-size pixel model. Dropout follows the official training presets (10% from M up).
_IMG512 = dict(
    sample_size=64,
    in_channels=4,
    num_classes=1000,
    architecture="G",
    channel_mult=(1, 2, 3, 4),
    num_blocks=3,
    attn_resolutions=(16, 8),
)
EDM2_PRESETS = {
    "edm2-xs": dict(_IMG512, model_channels=128, dropout=0.0),  # 124.7M parameters published
    "edm2-s": dict(_IMG512, model_channels=192, dropout=0.0),  # 280.2M
    "edm2-m": dict(_IMG512, model_channels=256, dropout=0.1),  # 497.8M
    "edm2-l": dict(_IMG512, model_channels=320, dropout=0.1),  # 777.5M
    "edm2-xl": dict(_IMG512, model_channels=384, dropout=0.1),  # 1119.3M
    "edm2-xxl": dict(_IMG512, model_channels=448, dropout=0.1),  # 1523.2M
    # CIFAR-10 (32×32×3 pixels): the widths, depth, attention level and dropout of the public C/E re-implementation
    # that reached FID 2.72 (E); Config G was reported worse than E in pixel space, hence E by default.
    "edm2-cifar10": dict(
        sample_size=32,
        in_channels=3,
        num_classes=10,
        architecture="E",
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_blocks=3,
        attn_resolutions=(16,),
        dropout=0.13,
    ),
}


class EDM2UNetModel(ModelMixin, ConfigMixin):
    """EDM2's UNet with the EDM preconditioning inside: D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise).

    `forward(sample, sigma)` takes the raw noisy sample x = x0 + σ·n and returns the denoised sample (and optionally
    the learned log-variance of EDM2's uncertainty weighting). See the module docstring for what the architectures
    "C", "E" and "G" change.

    Args:
        sample_size: height and width of the input (square), e.g. 64 for 512-px latents.
        in_channels: channels of the input and of the denoised output.
        num_classes: number of class labels; 0 for an unconditional model. Label id `num_classes` means "no label".
        architecture: "C", "E" or "G", the point on the paper's config ladder (G is the published EDM2 network).
        model_channels: base width; level i has model_channels·channel_mult[i] channels.
        channel_mult: width multiplier per resolution level; its length is the number of levels.
        channel_mult_noise: width of the Fourier noise features as a multiple of model_channels
            (default: channel_mult[0]).
        channel_mult_emb: width of the conditioning embedding as a multiple of model_channels
            (default: max(channel_mult)).
        num_blocks: encoder blocks per level (the decoder has one more per level).
        attn_resolutions: resolutions at which blocks have self-attention (the lowest-resolution middle block always
            has it); each must be a resolution the network reaches.
        channels_per_head: attention head width.
        dropout: dropout probability inside the residual units.
        res_balance: MP-Sum t of residual branches (G only).
        attn_balance: MP-Sum t of attention branches (G only).
        label_balance: MP-Sum t of the label embedding against the noise embedding (G only).
        concat_balance: MP-Cat t of the skip against the decoder path (G only).
        clip_act: clamp block outputs to ±clip_act; None disables.
        sigma_data: standard deviation of the data, used by the preconditioning.
        logvar_channels: Fourier features of the log-variance head.
    """

    _supports_gradient_checkpointing = True
    # A block's skip connections and residual sums stay on one device under device_map="auto".
    _no_split_modules = ["EDM2Block"]
    _keep_in_fp32_modules = ["noise_fourier", "logvar_fourier"]
    # Takes σ and returns the denoised sample (not ε or v). The registry says so for the package; this flag says so
    # for the shipped pipeline, which checks a guide network against it.
    input_is_sigma = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 4,
        num_classes: int = 1000,
        architecture: str = "G",
        model_channels: int = 192,
        channel_mult: tuple = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: tuple = (16, 8),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        clip_act: float | None = 256.0,
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
    ):
        super().__init__()
        self._validate_config()
        mp = architecture == "G"
        weight_norm = architecture in ("E", "G")
        self.gradient_checkpointing = False
        self._layerwise_compute_dtype = None  # set by enable_layerwise_casting

        block_channels = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * (channel_mult_noise or channel_mult[0])
        emb_channels = model_channels * (channel_mult_emb or max(channel_mult))
        block_kwargs = dict(
            emb_channels=emb_channels,
            magnitude_preserving=mp,
            weight_norm=weight_norm,
            channels_per_head=channels_per_head,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
        )

        # Conditioning embedding.
        self.noise_fourier = MPFourier(noise_channels, magnitude_preserving=mp)
        self.noise_linear = MPConv(noise_channels, emb_channels, (), weight_norm)
        self.noise_linear2 = None if mp else MPConv(emb_channels, emb_channels, (), weight_norm)  # removed in F
        self.label_linear = MPConv(num_classes, emb_channels, (), weight_norm) if num_classes else None

        # Encoder; a ones channel lets the bias-free first conv see the image border.
        self.conv_in = MPConv(in_channels + 1, block_channels[0], (3, 3), weight_norm)
        self.encoder = nn.ModuleList()
        channels = block_channels[0]
        skip_channels = [channels]
        for level, level_channels in enumerate(block_channels):
            resolution = sample_size >> level
            if level > 0:
                self.encoder.append(EDM2Block(channels, channels, flavor="enc", resample_mode="down", **block_kwargs))
                skip_channels.append(channels)
            for _ in range(num_blocks):
                attn = resolution in attn_resolutions
                self.encoder.append(EDM2Block(channels, level_channels, flavor="enc", attention=attn, **block_kwargs))
                channels = level_channels
                skip_channels.append(channels)

        # Decoder: middle blocks at the lowest resolution, then per level an upsampling block and num_blocks + 1
        # blocks that each take one encoder skip.
        self.decoder = nn.ModuleList()
        self._decoder_takes_skip = []
        for level, level_channels in reversed(list(enumerate(block_channels))):
            resolution = sample_size >> level
            if level == len(block_channels) - 1:
                self.decoder.append(EDM2Block(channels, channels, flavor="dec", attention=True, **block_kwargs))
                self.decoder.append(EDM2Block(channels, channels, flavor="dec", **block_kwargs))
                self._decoder_takes_skip += [False, False]
            else:
                self.decoder.append(EDM2Block(channels, channels, flavor="dec", resample_mode="up", **block_kwargs))
                self._decoder_takes_skip.append(False)
            for _ in range(num_blocks + 1):
                attn = resolution in attn_resolutions
                in_ch = channels + skip_channels.pop()
                self.decoder.append(EDM2Block(in_ch, level_channels, flavor="dec", attention=attn, **block_kwargs))
                self._decoder_takes_skip.append(True)
                channels = level_channels

        self.conv_out = MPConv(channels, in_channels, (3, 3), weight_norm)
        self.out_gain = nn.Parameter(torch.zeros([])) if mp else None  # F = 0, D = c_skip·x at initialisation
        self.num_groups_out = _num_groups(channels)

        # Learned log-variance u(σ) for the uncertainty loss weighting; used in training only.
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, (), weight_norm=True)

    def _validate_config(self):
        c = self.config
        if c.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={c.architecture!r} is unknown; expected one of {ARCHITECTURES}.")
        if not c.channel_mult:
            raise ValueError(f"channel_mult={c.channel_mult!r} must name at least one resolution level.")
        if any(int(m) != m or m < 1 for m in c.channel_mult):
            raise ValueError(f"channel_mult={c.channel_mult!r} must be positive integers.")
        for key in ("sample_size", "in_channels", "model_channels", "num_blocks", "channels_per_head"):
            if not isinstance(getattr(c, key), int) or getattr(c, key) < 1:
                raise ValueError(f"{key}={getattr(c, key)!r} must be a positive integer.")
        if not isinstance(c.num_classes, int) or c.num_classes < 0:
            raise ValueError(f"num_classes={c.num_classes!r} must be a non-negative integer (0: unconditional).")
        levels = len(c.channel_mult)
        if c.sample_size % (1 << (levels - 1)):
            raise ValueError(
                f"sample_size={c.sample_size} must be divisible by 2**(len(channel_mult)-1)={1 << (levels - 1)}."
            )
        resolutions = [c.sample_size >> level for level in range(levels)]
        missing = [r for r in c.attn_resolutions if r not in resolutions]
        if missing:
            raise ValueError(
                f"attn_resolutions={tuple(c.attn_resolutions)}: {missing} never reached; resolutions are {resolutions}."
            )
        attn_levels = [i for i, r in enumerate(resolutions) if r in c.attn_resolutions] + [levels - 1]
        for level in attn_levels:
            width = c.model_channels * c.channel_mult[level]
            if width % c.channels_per_head:
                raise ValueError(
                    f"channels_per_head={c.channels_per_head} must divide the width {width} of the attention blocks "
                    f"at resolution {resolutions[level]}."
                )
        if not 0 <= c.dropout < 1:
            raise ValueError(f"dropout={c.dropout} must be in [0, 1).")
        for key in ("res_balance", "attn_balance", "label_balance", "concat_balance"):
            if not 0 <= getattr(c, key) <= 1:
                raise ValueError(f"{key}={getattr(c, key)} must be in [0, 1].")
        if c.sigma_data <= 0:
            raise ValueError(f"sigma_data={c.sigma_data} must be positive.")
        if c.clip_act is not None and c.clip_act <= 0:
            raise ValueError(f"clip_act={c.clip_act} must be positive or None.")

    # Copied from diffusers_speedup.models.uvit.UViTModel.extract_init_dict
    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # An exported config.json also names this file for diffusers' AutoModel (`auto_map`, for trust_remote_code);
        # it is not a constructor argument, so it is left out rather than reported as an unexpected one.
        config_dict = {key: value for key, value in config_dict.items() if key != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EDM2UNetModel":
        """Build a freshly initialised model from a named preset in `EDM2_PRESETS`, e.g. "edm2-s" or
        "edm2-cifar10"; `overrides` replace any constructor argument (e.g. `architecture="E"`, `num_classes=0`)."""
        if name not in EDM2_PRESETS:
            raise ValueError(f"preset {name!r} is unknown; expected one of {sorted(EDM2_PRESETS)}.")
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"from_preset({name!r}): unknown argument(s) {unknown}; expected some of {sorted(known)}.")
        return cls(**{**EDM2_PRESETS[name], **overrides})

    def enable_layerwise_casting(
        self,
        storage_dtype: torch.dtype = torch.float8_e4m3fn,
        compute_dtype: torch.dtype | None = None,
        skip_modules_pattern: tuple[str, ...] | None = None,
        skip_modules_classes: tuple[type, ...] | None = None,
        non_blocking: bool = False,
    ) -> None:
        """Store the weights in `storage_dtype` and compute in `compute_dtype`, as diffusers' layerwise casting does.

        diffusers' `ModelMixin.enable_layerwise_casting` hooks only the torch layer types it knows (nn.Conv2d,
        nn.Linear, ...), and every weight of this model lives in an `MPConv`, so the inherited method would cast
        nothing. This gives each `MPConv` diffusers' own layerwise-casting hook instead: its weight rests in
        `storage_dtype` and is cast to `compute_dtype` around its forward, and the network's activations run in
        `compute_dtype`. The weight normalisation still runs in float32 on the cast weight, as always.

        Args:
            storage_dtype: dtype the weights are kept in between uses (e.g. `torch.float8_e4m3fn`).
            compute_dtype: dtype of the computation; defaults to the model's dtype.
            skip_modules_pattern: regular expressions; an `MPConv` whose dotted name, or a parent's, matches one
                keeps its dtype. Defaults to diffusers' defaults; `_keep_in_fp32_modules` is always added.
            skip_modules_classes: module classes whose `MPConv`s keep their dtype.
            non_blocking: cast without blocking the host.
        """
        from diffusers.hooks import apply_layerwise_casting_hook
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN if skip_modules_pattern is None else skip_modules_pattern)
        patterns += tuple(self._keep_in_fp32_modules or ()) + tuple(self._skip_layerwise_casting_patterns or ())
        compute_dtype = compute_dtype or self.dtype
        modules = dict(self.named_modules())
        for name, module in modules.items():
            if not isinstance(module, MPConv):
                continue
            # As in diffusers, a skipped module skips everything under it.
            parents = [".".join(name.split(".")[: i + 1]) for i in range(name.count(".") + 1)]
            if any(re.search(pattern, parent) for pattern in patterns for parent in parents):
                continue
            if skip_modules_classes and any(isinstance(modules[parent], skip_modules_classes) for parent in parents):
                continue
            apply_layerwise_casting_hook(module, storage_dtype, compute_dtype, non_blocking)
        self._layerwise_compute_dtype = compute_dtype

    # -----------------------------------------------------------------------------------------------------------------

    def _label_vectors(self, class_labels, batch_size, device):
        """Integer ids (B,) → one-hot rows scaled to unit RMS; id == num_classes (or None) → the zero vector."""
        num_classes = self.config.num_classes
        if class_labels is None:
            return torch.zeros(batch_size, num_classes, device=device)
        if not num_classes:
            raise ValueError("class_labels were given to an unconditional model (num_classes=0).")
        class_labels = torch.as_tensor(class_labels, device=device)
        if class_labels.ndim == 0:
            class_labels = class_labels.expand(batch_size)
        if class_labels.dtype.is_floating_point or class_labels.shape != (batch_size,):
            raise ValueError(
                f"class_labels must be integer ids of shape ({batch_size},); got dtype {class_labels.dtype} and "
                f"shape {tuple(class_labels.shape)}."
            )
        # A comparison rather than F.one_hot: no host sync, and the "no label" id falls out as all zeros.
        one_hot = class_labels[:, None] == torch.arange(num_classes, device=device)
        return one_hot.float() * math.sqrt(num_classes)

    def _embedding(self, c_noise, labels):
        mp = self.config.architecture == "G"
        emb = self.noise_linear(self.noise_fourier(c_noise))
        if not mp:
            emb = self.noise_linear2(F.silu(emb))
        if self.label_linear is not None:
            label_emb = self.label_linear(labels)
            emb = mp_sum(emb, label_emb, t=self.config.label_balance) if mp else emb + label_emb
        return mp_silu(emb) if mp else F.silu(emb)

    def _run_block(self, block, x, emb):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, emb)
        return block(x, emb)

    def unet(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The raw network F(x; c_noise, labels), without preconditioning."""
        mp = self.config.architecture == "G"
        emb = self._embedding(c_noise, labels)
        x = self.conv_in(torch.cat([x, torch.ones_like(x[:, :1])], dim=1))
        skips = [x]
        for block in self.encoder:
            x = self._run_block(block, x, emb)
            skips.append(x)
        for block, takes_skip in zip(self.decoder, self._decoder_takes_skip):
            if takes_skip:
                skip = skips.pop()
                x = mp_cat(x, skip, t=self.config.concat_balance) if mp else torch.cat([x, skip], dim=1)
            x = self._run_block(block, x, emb)
        if mp:
            return self.conv_out(x, gain=self.out_gain)
        return self.conv_out(F.silu(group_rms_norm(x, self.num_groups_out)))

    def forward(
        self,
        sample: torch.Tensor,
        sigma,
        class_labels: torch.Tensor | None = None,
        return_logvar: bool = False,
        return_dict: bool = True,
    ):
        """Denoise `sample`.

        Args:
            sample: noisy input x = x0 + σ·n of shape (B, in_channels, H, W), not scaled by c_in.
            sigma: noise level σ > 0, a tensor of shape (B,) or a scalar (broadcast over the batch).
            class_labels: integer class ids of shape (B,); id `num_classes` or None means unconditional (the label
                vector is zero, as with label dropout for classifier-free guidance).
            return_logvar: also return the learned log-variance u(σ) of shape (B, 1, 1, 1).
            return_dict: return an `EDM2UNetOutput` rather than a tuple.

        Returns:
            `EDM2UNetOutput(sample=D(x; σ), logvar=u(σ) or None)`, or the tuple `(sample,)` / `(sample, logvar)`.
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must have shape (B, {self.config.in_channels}, H, W); got {tuple(sample.shape)}.")
        levels = len(self.config.channel_mult)
        if sample.shape[2] % (1 << (levels - 1)) or sample.shape[3] % (1 << (levels - 1)):
            raise ValueError(
                f"sample height and width {tuple(sample.shape[2:])} must be divisible by {1 << (levels - 1)}."
            )
        batch_size = sample.shape[0]
        x = sample.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch_size)
        if sigma.shape != (batch_size,):
            raise ValueError(f"sigma must be a scalar or have {batch_size} elements; got shape {tuple(sigma.shape)}.")
        labels = self._label_vectors(class_labels, batch_size, x.device)

        # D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise); the noise embeddings take c_noise as one number per sample.
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma[:, None, None, None], self.config.sigma_data)
        c_noise = c_noise.flatten()

        dtype = self._layerwise_compute_dtype or self.conv_in.weight.dtype
        f_x = self.unet((c_in * x).to(dtype), c_noise, labels)  # the embedding stays in float32, as in EDM2
        denoised = c_skip * x + c_out * f_x.float()

        logvar = None
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).float().reshape(-1, 1, 1, 1)
        if not return_dict:
            return (denoised, logvar) if return_logvar else (denoised,)
        return EDM2UNetOutput(sample=denoised, logvar=logvar)
