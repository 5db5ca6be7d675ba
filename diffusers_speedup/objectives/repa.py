"""Representation alignment: REPA (Yu et al., ICLR 2025, arXiv 2410.06940) as its official code computes it
(sihyun-yu/REPA@67f7145), with iREPA's conv projector and spatial z-score (Singh et al., arXiv 2512.10794;
End2End-Diffusion/iREPA@99ad4ac) and HASTE's early stop (arXiv 2505.16792) as options.

The hidden state of one block of the network, h (B, N, D), goes through a small trainable projector and is pulled
towards the patch features y (B, N, C) of a frozen DINOv2 looking at the clean image:

    term = λ · mean over tokens of −cos(projector(h)ⁿ, yⁿ)          one value per sample, in [−λ, λ]

added to the diffusion loss (REPA's ``loss.py``: the negative cosine, not 1 − cos; ``train.py``: the denoising loss
plus ``--proj-coeff`` 0.5 times it). The encoder sees the image as REPA's ``preprocess_raw_image`` prepares it for
DINOv2 (``encoder_input``): ÷255, ImageNet mean and std, then a bicubic resize to 224·R/256 px; its position table is
resampled once, when it is loaded, to the R/16 × R/16 grid of patches by timm's ``resample_abs_pos_embed``
(``utils.py`` ``load_encoders``; `resample_position_embedding`); its target is ``x_norm_patchtokens``, the patch
tokens after the final LayerNorm, without the class and register tokens. So at 256 px DINOv2's 16×16 patches meet a
SiT-XL/2's 16×16 tokens one to one. A network with another token grid can be met by another input size
(``encoder_resolution`` = grid side × the encoder's patch size; REPA's own rule is the default). The projector is REPA's ``build_mlp`` (Linear D→2048, SiLU, Linear 2048→2048,
SiLU, Linear 2048→C), xavier-uniform with zero biases, as the official ``initialize_weights`` initialises every
Linear of the SiT it lives in.

What this file differs in, on purpose: the cosine is computed in float32 (REPA normalises the fp16 encoder output
outside autocast); one encoder, not a list (REPA divides by their number, 1 for every published run); the encoder is
transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``, not the torch.hub one (the same weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .auxiliary import AuxiliaryLoss

# torchvision / timm IMAGENET_DEFAULT_MEAN and IMAGENET_DEFAULT_STD, which REPA normalises DINOv2's input with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# transformers' model types of the encoders REPA's DINOv2 runs use.
SUPPORTED_ENCODERS = ("dinov2", "dinov2_with_registers")
PROJECTORS = ("mlp", "conv")


def encoder_input_size(resolution: int, encoder_resolution: int | None = None) -> int:
    """The side in px that the clean R px images are resized to for the encoder: ``encoder_resolution`` when given,
    else REPA's 224·R/256 (its ``224 * (resolution // 256)`` at the 256 and 512 px it runs at), which DINOv2's 14 px
    patches cut into R/16 per side, one patch per token of a patch-2 network on f8 latents."""
    if encoder_resolution is not None:
        if encoder_resolution < 1:
            raise ValueError(f"encoder_resolution {encoder_resolution}: must be a positive number of px.")
        return encoder_resolution
    if resolution < 8 or (224 * resolution) % 256:
        raise ValueError(
            f"resolution {resolution}: REPA resizes the images to 224·R/256 px, which needs R to be a multiple of 8; "
            "give the encoder's input side explicitly (encoder_resolution)."
        )
    return 224 * resolution // 256


def encoder_grid(input_size: int, patch_size: int) -> int:
    """The side of the encoder's patch grid for ``input_size`` px inputs cut into ``patch_size`` px patches."""
    if input_size % patch_size:
        raise ValueError(
            f"the encoder's input of {input_size} px is not a whole number of its {patch_size} px patches: use images "
            f"whose side is a multiple of 16 (REPA's 224·R/256 px), or set encoder_resolution to a multiple of "
            f"{patch_size} (the grid side × {patch_size})."
        )
    return input_size // patch_size


def imagenet_normalization(device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (1, 3, 1, 1) tensors on ``device``."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def encoder_input(
    images: torch.Tensor, size: int | None = None, normalization: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """REPA's ``preprocess_raw_image`` for DINOv2: the clean images (B, 3, R, R) in [0, 255] (uint8 or float) ÷255,
    then ImageNet mean and std, then a bicubic resize to ``size`` px, by default REPA's 224·R/256
    (``F.interpolate``'s defaults: corners not aligned, no antialiasing), in that order. A grayscale image (1
    channel) is the same gray in each of R, G, B. ``normalization``: `imagenet_normalization` already on the images'
    device (the encoder keeps one, so a training step copies nothing from the host)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (batch, 3, R, R) in [0, 255], got shape {tuple(images.shape)}.")
    size = encoder_input_size(images.shape[-1]) if size is None else size
    x = images.expand(-1, 3, -1, -1).float() / 255.0
    mean, std = normalization or imagenet_normalization(x.device)
    return F.interpolate((x - mean) / std, size=size, mode="bicubic")


def resample_position_embedding(table: torch.Tensor, grid: int, prefix_tokens: int = 1) -> torch.Tensor:
    """A ViT's absolute position table (1, prefix + S², D) resampled to a ``grid`` × ``grid`` patch grid, as timm's
    ``resample_abs_pos_embed`` does it with its defaults (REPA's call): the prefix (class) rows kept, the S × S patch
    rows resized bicubically **with antialiasing**, in float32, then cast back. A table that already has grid²
    patch rows is returned as it is.

    transformers' ``Dinov2Model`` resizes its table on every call instead, bicubic *without* antialiasing (its
    with-registers variant with), which gives other numbers whenever the grid shrinks (37 → 16 for DINOv2 at 224 px):
    the encoder here sets the resampled table once, so transformers uses it as it is.
    """
    patches = table.shape[1] - prefix_tokens
    if patches == grid * grid:
        return table
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"the position table has {patches} patch rows, not a square grid")
    prefix, rows = table[:, :prefix_tokens], table[:, prefix_tokens:]
    dim = table.shape[-1]
    rows = rows.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    rows = F.interpolate(rows, size=(grid, grid), mode="bicubic", antialias=True)
    rows = rows.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(table.dtype)
    return torch.cat([prefix, rows], dim=1)


class FrozenEncoder:
    """A frozen DINOv2 as REPA uses it: clean images (B, 3, R, R) in [0, 255] in, patch tokens (B, grid², C) out.

    Eval mode, no gradients, weights as loaded (float32); it runs under whatever autocast the caller is in (the
    trainer's training precision, as REPA runs it under ``accelerator.autocast()``). Not an ``nn.Module`` on purpose:
    a loss that holds it does not register it, so it is not in any state dict, checkpoint or export, DDP neither
    broadcasts nor averages it, and ``.to()`` on the loss leaves it alone; it follows its input to that input's device.

    Args:
        model: a transformers ``Dinov2Model`` or ``Dinov2WithRegistersModel``; its position table is replaced, once,
            by the one resampled to its patch grid at the input size (`resample_position_embedding`).
        resolution: the side R in px of the clean images it will see.
        name: what it was loaded from (a Hub id or folder), to compare with precomputed features.
        input_size: the side in px the images are resized to (`encoder_input_size`): by default REPA's 224·R/256,
            whose grid is R/16 with DINOv2's 14 px patches. Another size gives another grid (input_size / patch),
            e.g. to meet a network with another token grid.
    """

    def __init__(self, model: nn.Module, resolution: int, name: str | None = None, input_size: int | None = None):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_ENCODERS or not hasattr(model, "embeddings"):
            raise ValueError(
                f"encoder: a {type(model).__name__} (model type {model_type!r}) is not a DINOv2 vision encoder; "
                f"REPA here takes transformers' Dinov2Model or Dinov2WithRegistersModel ({', '.join(SUPPORTED_ENCODERS)})."
            )
        self.input_size = encoder_input_size(resolution, input_size)
        self.grid = encoder_grid(self.input_size, model.config.patch_size)
        self.resolution, self.name = resolution, name
        embeddings = model.embeddings
        with torch.no_grad():
            table = resample_position_embedding(embeddings.position_embeddings.detach(), self.grid)
        embeddings.position_embeddings = nn.Parameter(table, requires_grad=False)
        self.model = model.requires_grad_(False).eval()
        self.dim = model.config.hidden_size
        # x_norm_patchtokens: after the class token and the registers.
        self.first_patch = 1 + getattr(model.config, "num_register_tokens", 0)
        self._normalization = None  # ImageNet's mean and std on the device of the images last seen

    @classmethod
    def from_pretrained(cls, name: str, resolution: int, input_size: int | None = None, **kwargs) -> FrozenEncoder:
        """Load a DINOv2 by Hub id or folder (``facebook/dinov2-base``, ``facebook/dinov2-with-registers-base``);
        ``kwargs`` go to transformers' ``from_pretrained`` (``revision``, ``cache_dir``, ...).

        Raises:
            ValueError: naming ``encoder`` when it cannot be read or is not a DINOv2 vision model.
        """
        from transformers import AutoModel

        encoder_config(name, **kwargs)
        return cls(AutoModel.from_pretrained(name, **kwargs), resolution, name=name, input_size=input_size)

    def to(self, device) -> FrozenEncoder:
        self.model.to(device)
        return self

    @property
    def info(self) -> dict:
        """What a latent cache records of features precomputed with this encoder, and what a REPA recipe must match
        to use them instead of the images: the encoder and the side its input is resized to."""
        return {"encoder": self.name, "input_size": self.input_size, "preprocessing": "repa"}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """DINOv2's normalised patch tokens (B, grid², C) of clean images (B, 3, R, R) in [0, 255]."""
        if images.shape[-1] != self.resolution:
            raise ValueError(
                f"the encoder was set up for {self.resolution} px images (its position table has a "
                f"{self.grid}×{self.grid} grid), got {images.shape[-1]} px."
            )
        if self._normalization is None or self._normalization[0].device != images.device:
            self.model.to(images.device)
            self._normalization = imagenet_normalization(images.device)
        pixels = encoder_input(images, self.input_size, self._normalization)
        hidden = self.model(pixel_values=pixels).last_hidden_state
        return hidden[:, self.first_patch :]


def encoder_config(name: str, **kwargs):
    """The transformers config of the encoder ``name`` (Hub id or folder), read without its weights.

    Raises:
        ValueError: naming ``encoder`` when it cannot be read or is not a DINOv2 vision model.
    """
    from transformers import AutoConfig

    from ..utils import meant_as_local_path

    if meant_as_local_path(str(name)) and not Path(name).expanduser().is_dir():
        raise ValueError(f"encoder {str(name)!r} cannot be read: no such folder (and not a Hub id).")
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"encoder {str(name)!r} cannot be read as a transformers model: {first_line}") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ENCODERS:
        raise ValueError(
            f"encoder {str(name)!r} is a {model_type!r} model, not a DINOv2 vision encoder; REPA here takes "
            f"transformers' DINOv2 ({', '.join(SUPPORTED_ENCODERS)}), e.g. facebook/dinov2-base."
        )
    return config


def mlp_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's ``build_mlp``: Linear(D→P), SiLU, Linear(P→P), SiLU, Linear(P→C), in its layout (parameters ``0``,
    ``2``, ``4``), initialised as REPA's ``initialize_weights`` initialises every Linear of its SiT: xavier-uniform
    weights, zero biases."""
    projector = nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )
    for layer in projector:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return projector


class ConvProjector(nn.Module):
    """iREPA's conv projector: one Conv2d(D→C, kernel k, stride 1, padding k // 2) over the token grid, so each
    projected token also sees its neighbours (``ldm/models/sit.py`` ``ProjectionLayer``). PyTorch's default Conv2d
    initialisation, as iREPA's ``initialize_weights`` touches Linear layers only. iREPA's trainer defaults to
    ``--proj-kwargs-kernel-size 1``; its README shows kernel 3.

    Takes and returns tokens (B, N, ·) of a square grid, in row-major order.
    """

    def __init__(self, hidden_size: int, z_dim: int, kernel_size: int = 1):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size {kernel_size}: must be odd and positive (the grid keeps its size).")
        self.conv = nn.Conv2d(hidden_size, z_dim, kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, width = tokens.shape
        side = math.isqrt(count)
        grid = tokens.reshape(batch, side, side, width).permute(0, 3, 1, 2)
        return self.conv(grid).permute(0, 2, 3, 1).reshape(batch, count, -1)


def spatial_zscore(features: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalisation of the encoder tokens (B, N, C): (x − α·mean_N(x)) / (std_N(x) + ε), mean and
    (unbiased) std over the tokens of each image and channel (``ldm/utils.py`` ``spatial_zscore``; α 0.6 by its
    trainer's default). In float32."""
    features = features.float()
    mean = features.mean(dim=1, keepdim=True)
    std = features.std(dim=1, keepdim=True)
    return (features - alpha * mean) / (std + eps)


def negative_cosine(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's alignment term before λ: −cos between each projected token and its target token, averaged over the
    tokens, one value per sample (B,). In float32."""
    projected = F.normalize(projected.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return -(projected * target).sum(dim=-1).mean(dim=-1)


def _image_stream(output):
    """The image tokens of a diffusers transformer block's output: the output itself, or the ``hidden_states`` of
    the ``(encoder_hidden_states, hidden_states)`` that SD3's and Flux's blocks return."""
    return output[1] if isinstance(output, tuple) else output


class RepresentationAlignment(AuxiliaryLoss):
    """REPA's alignment term on the hidden state of one block of a network (see the module docstring).

    It reads the block's output through a forward hook (the network is unchanged) and owns the projector, the only
    trained part: give its parameters to the optimizer with the network's. Call it after the network's training
    forward pass, with the clean images of the batch (``image``: (B, 3, R, R) in [0, 255]) or the encoder's
    features of them computed beforehand (``encoder_features``: (B, N, C)); it returns the per-sample term (B,),
    already times λ. `attach` builds one for a diffusers transformer or a model of this package.

    Args:
        block: the network's block whose output is aligned.
        hidden_size: the width D of that output's tokens.
        encoder: the frozen encoder (`FrozenEncoder`); None when every call brings ``encoder_features``.
        encoder_dim: the width C of the encoder's features, when there is no ``encoder``.
        weight: λ (REPA's ``--proj-coeff``, 0.5; iREPA's config uses 1.0).
        projector: ``"mlp"`` (REPA's) or ``"conv"`` (iREPA's).
        projector_dim: the MLP's hidden width (REPA's 2048).
        conv_kernel_size: the conv projector's kernel (iREPA's trainer default 1).
        zscore_alpha: iREPA's spatial z-score of the encoder tokens with this α (0.6 in iREPA), or None for none.
        stop_after_step: HASTE's stop: once this many optimizer steps are done (``step``, which the trainer sets),
            the term is 0 and the encoder no longer runs; None aligns throughout.
        tokens_of: the function from the block's output to its patch tokens (B, N, D), row-major on a square grid
            (default: the output itself, or the image stream of an SD3 or Flux block's tuple).
    """

    name = "repa_loss"

    def __init__(
        self,
        block: nn.Module,
        hidden_size: int,
        encoder: FrozenEncoder | None = None,
        encoder_dim: int | None = None,
        weight: float = 0.5,
        projector: str = "mlp",
        projector_dim: int = 2048,
        conv_kernel_size: int = 1,
        zscore_alpha: float | None = None,
        stop_after_step: int | None = None,
        tokens_of: Callable[[object], torch.Tensor] | None = None,
    ):
        if not weight > 0:
            raise ValueError(f"weight {weight}: λ must be > 0.")
        if projector not in PROJECTORS:
            raise ValueError(f"projector {projector!r} is not one of {', '.join(PROJECTORS)}.")
        if projector_dim < 1:
            raise ValueError(f"projector_dim {projector_dim}: must be positive.")
        if zscore_alpha is not None and not 0 <= zscore_alpha <= 1:
            raise ValueError(f"zscore_alpha {zscore_alpha}: must lie in [0, 1] (iREPA's 0.6), or be None for none.")
        if stop_after_step is not None and stop_after_step < 1:
            raise ValueError(f"stop_after_step {stop_after_step}: must be >= 1, or None to align throughout.")
        if (encoder is None) == (encoder_dim is None):
            raise ValueError("give either an encoder or, for precomputed features only, encoder_dim (not both).")
        super().__init__(block, hidden_state_of=tokens_of or _image_stream)
        self.encoder = encoder
        z_dim = encoder.dim if encoder is not None else encoder_dim
        self.weight, self.zscore_alpha, self.stop_after_step = weight, zscore_alpha, stop_after_step
        self.projector = (
            mlp_projector(hidden_size, projector_dim, z_dim)
            if projector == "mlp"
            else ConvProjector(hidden_size, z_dim, conv_kernel_size)
        )

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        depth: int,
        resolution: int | None = None,
        encoder: str | nn.Module | FrozenEncoder | None = "facebook/dinov2-base",
        encoder_resolution: int | None = None,
        **options,
    ) -> RepresentationAlignment:
        """REPA on the output of block ``depth`` (1 = the first) of ``model``.

        ``model`` is a diffusers transformer with ``transformer_blocks`` (``DiTTransformer2DModel``,
        ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, whose ``single_transformer_blocks`` count after them;
        the image stream of SD3's and Flux's block outputs is taken), or a model of this package (the registry says
        which block list and how its output becomes tokens: DiT/SiT/LightningDiT blocks, U-ViT in-blocks, EDM2
        encoder blocks).

        Args:
            resolution: the side in px of the clean images (needed to load an encoder).
            encoder: a Hub id or folder of a DINOv2, a loaded ``Dinov2Model``, a `FrozenEncoder`, or None when the
                features come precomputed (then pass ``encoder_dim``).
            encoder_resolution: the side in px the images are resized to for the encoder (default REPA's 224·R/256,
                a R/16 grid for DINOv2); set it to the block's token grid side × the encoder's patch size for a
                network with another grid (SD3 at 1024 px has 64×64 image tokens: 896 px with DINOv2).
            options: the remaining arguments of `RepresentationAlignment` (``weight``, ``projector``, ...).
        """
        from ..models import model_kind_of

        kind = model_kind_of(model)
        if kind is not None:
            if kind.hidden_states is None:
                raise ValueError(f"{type(model).__name__} has no block that an auxiliary loss can read.")
            where = kind.hidden_states
            block, hidden_size = where.block(model, depth), where.width(model, depth)
            options.setdefault("tokens_of", where.tokens_of(model))
        else:
            blocks = [*getattr(model, "transformer_blocks", ()), *getattr(model, "single_transformer_blocks", ())]
            if not blocks:
                raise ValueError(
                    f"{type(model).__name__} has no transformer_blocks; pass a block, its width and tokens_of to "
                    "RepresentationAlignment directly."
                )
            if not 1 <= depth <= len(blocks):
                raise ValueError(
                    f"depth {depth} is not a block of this {type(model).__name__}, which has {len(blocks)} "
                    f"transformer blocks (depth 1 to {len(blocks)})."
                )
            block = blocks[depth - 1]
            hidden_size = getattr(model, "inner_dim", None) or (
                model.config.num_attention_heads * model.config.attention_head_dim
            )
        if isinstance(encoder, (str, nn.Module)):
            if resolution is None:
                raise ValueError("resolution: the side in px of the clean images is needed to set up the encoder.")
            if isinstance(encoder, str):
                encoder = FrozenEncoder.from_pretrained(encoder, resolution, input_size=encoder_resolution)
            else:
                encoder = FrozenEncoder(encoder, resolution, input_size=encoder_resolution)
        return cls(block, hidden_size, encoder=encoder, **options)

    @property
    def stopped(self) -> bool:
        """Whether HASTE's stop has come: ``stop_after_step`` optimizer steps are done."""
        return self.stop_after_step is not None and self.step >= self.stop_after_step

    def loss(
        self,
        hidden_state: torch.Tensor,
        image: torch.Tensor | None = None,
        encoder_features: torch.Tensor | None = None,
        **unused: torch.Tensor,
    ) -> torch.Tensor:
        batch = hidden_state.shape[0]
        if self.stopped:
            # 0, but through every projector parameter: each still gets a (zero) gradient, so DDP, which expects a
            # gradient for every trained parameter in every step, needs no find_unused_parameters.
            zero = sum(parameter.sum() for parameter in self.projector.parameters()) * 0.0
            return zero.float().expand(batch)
        if encoder_features is not None:
            target = encoder_features
        elif image is not None:
            if self.encoder is None:
                raise ValueError(f"{self.name}: got images but has no encoder; pass encoder_features.")
            target = self.encoder(image)
        else:
            raise ValueError(f"{self.name}: needs the clean images (image=...) or encoder_features=... of the batch.")
        if target.shape[:2] != hidden_state.shape[:2]:
            raise ValueError(
                f"{self.name}: the block gives {hidden_state.shape[1]} tokens per sample but the encoder's features "
                f"have {target.shape[1]} ({_grid(target.shape[1])} grid); REPA aligns token to token, so the "
                "network's token grid must be the encoder's (by default the image side / 16; see encoder_resolution)."
            )
        if self.zscore_alpha is not None:
            target = spatial_zscore(target, self.zscore_alpha)
        return self.weight * negative_cosine(self.projector(hidden_state), target)


def _grid(count: int) -> str:
    side = math.isqrt(count)
    return f"a {side}×{side}" if side * side == count else "not a square"
