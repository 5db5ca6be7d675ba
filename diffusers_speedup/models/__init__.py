"""Model classes, one self-contained file per family, and the registry of the model kinds a recipe can name.

Each model file imports only the standard library, torch and diffusers: it is copied unchanged into exported model
folders. This module is not: it is the package's registry (``MODEL_KINDS``), one entry per ``model.kind`` holding
everything the rest of the package needs to know about a model family. The recipe schema, the trainer, the
objective, the pipeline slot and the model card read these entries; nothing else branches on a kind. A new kind is
one model file in this folder plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .dit_transformer import DIT_PRESETS, DiTModel
from .edm2_unet import EDM2_PRESETS, EDM2UNetModel
from .uvit import UVIT_PRESETS, UViTModel

Conditioning = Literal["timestep", "sigma"]
TokenLayout = Literal["tokens", "extra_tokens_first", "feature_map"]


@dataclass(frozen=True)
class HiddenStates:
    """Where an auxiliary loss (REPA) reads a model's hidden state, and how that state becomes patch tokens.

    Attributes:
        blocks: the attribute holding the blocks whose output can be read, numbered from 1 in the order the forward
            pass runs them (a recipe's ``repa.depth``).
        what: what one of those blocks is called, for messages.
        layout: how a block's output becomes patch tokens (B, N, D), N = grid², in row-major order, as an image
            encoder orders its patches. ``"tokens"``: the output is the patch tokens. ``"extra_tokens_first"``: the
            output starts with the model's ``num_extra_tokens`` time and class tokens, which are dropped.
            ``"feature_map"``: the output is a (B, C, H, W) map, flattened to (B, H·W, C); its side is the model's
            ``sample_size`` halved by every block up to it whose ``resample_mode`` is ``"down"``, its width the
            block's ``out_channels``.
    """

    blocks: str
    what: str
    layout: TokenLayout = "tokens"

    def count(self, model: nn.Module) -> int:
        """How many blocks can be read."""
        return len(getattr(model, self.blocks))

    def block(self, model: nn.Module, depth: int) -> nn.Module:
        """Block ``depth`` (1 = the first), or a ValueError naming the range."""
        count = self.count(model)
        if not 1 <= depth <= count:
            raise ValueError(
                f"depth {depth} is not a block of this {type(model).__name__}, which has {count} {self.what}s "
                f"(depth 1 to {count})."
            )
        return getattr(model, self.blocks)[depth - 1]

    def tokens_of(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function from a block's output to its patch tokens (B, N, D)."""
        if self.layout == "extra_tokens_first":
            extra = model.num_extra_tokens
            return lambda output: output[:, extra:]
        if self.layout == "feature_map":
            return lambda output: output.flatten(2).transpose(1, 2)
        return lambda output: output

    def grid(self, model: nn.Module, depth: int) -> int:
        """The side of the square token grid that block ``depth`` outputs."""
        if self.layout == "feature_map":
            blocks = getattr(model, self.blocks)[:depth]
            return model.config.sample_size >> sum(block.resample_mode == "down" for block in blocks)
        return model.config.sample_size // model.config.patch_size

    def width(self, model: nn.Module, depth: int) -> int:
        """The width D of block ``depth``'s tokens."""
        if self.layout == "feature_map":
            return getattr(model, self.blocks)[depth - 1].out_channels
        return model.config.hidden_size


@dataclass(frozen=True)
class ModelKind:
    """What the package knows about one model family.

    Attributes:
        name: the recipe's ``model.kind``.
        model_class: the diffusers-style model class (its file is copied into exported folders).
        presets: the published sizes, by name (``model.preset``), as constructor arguments.
        conditioning: how the objective and the pipeline call it. ``"timestep"``:
            ``model(hidden_states, timestep, class_labels)`` with the objective family's noise-level input (a DDPM
            step, EDM's c_noise after the objective's preconditioning), regressing ε, v or x0. ``"sigma"``:
            ``model(x, σ, class_labels)`` on the raw noisy sample; it preconditions itself and returns the denoised
            sample (EDM2), so it trains on EDM's σ schedule with ``prediction_type: sample``.
        learned_variance: it can also output its reverse-process variance (DiT's ``learn_sigma``: ``out_channels``
            is twice the data's channels when ``objective.learned_variance`` is on).
        drops_labels_itself: its own ``class_dropout_prob`` drops labels for classifier-free guidance, so the
            objective's ``label_dropout`` must stay 0 (DiT).
        logvar_output: it outputs EDM2's learned uncertainty itself (``return_logvar``), so the objective builds no
            uncertainty head of its own.
        fsdp_refused: why it cannot be trained under FSDP, or None when it can.
        xformers_refused: why it has no xformers attention path, or None when it has one.
        card_tag: the technique tag its model card gets (a key of ``hub.model_card.TECHNIQUES``), or None.
        hidden_states: where an auxiliary loss (REPA) reads its hidden state (`HiddenStates`); None when none can.
    """

    name: str
    model_class: type
    presets: Mapping[str, dict]
    conditioning: Conditioning = "timestep"
    learned_variance: bool = False
    drops_labels_itself: bool = False
    logvar_output: bool = False
    fsdp_refused: str | None = None
    xformers_refused: str | None = None
    card_tag: str | None = None
    hidden_states: HiddenStates | None = None

    @property
    def pipeline_slot(self) -> str:
        """The `ClassConditionalPipeline` component that holds it: ``unet`` is the σ-called denoiser."""
        return "unet" if self.conditioning == "sigma" else "transformer"

    def fitted_params(self, sample_shape, num_classes: int, learned_variance: bool = False) -> dict:
        """The constructor arguments that come from the data: sample size, channels, classes (and DiT's doubled
        output channels for a learned variance). A recipe's ``model.params`` override them."""
        channels, size = sample_shape[0], sample_shape[1]
        fitted = {"sample_size": size, "in_channels": channels, "num_classes": num_classes}
        if self.learned_variance:
            fitted["out_channels"] = 2 * channels if learned_variance else channels  # mean, then variance
        return fitted


MODEL_KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        # An in-block: the long-skip encoder half (every block without long skips); its output starts with the
        # time and class tokens.
        ModelKind(
            "uvit",
            UViTModel,
            UVIT_PRESETS,
            card_tag="u-vit",
            hidden_states=HiddenStates("in_blocks", "U-ViT in-block", "extra_tokens_first"),
        ),
        ModelKind(
            "edm2_unet",
            EDM2UNetModel,
            EDM2_PRESETS,
            conditioning="sigma",
            logvar_output=True,
            fsdp_refused="EDM2UNetModel renormalises each whole weight in place as it trains (forced weight "
            "normalisation), which FSDP's shards would not keep; train it with DDP",
            xformers_refused="EDM2UNetModel's cosine attention has no xformers path; use 'sdpa'",
            card_tag="edm2",
            # The output of an encoder block (downsampling blocks included), a feature map flattened to tokens; its
            # grid halves at each level (at 512 px on 64×64 latents: 64, 32, 16, 8).
            hidden_states=HiddenStates("encoder", "EDM2 encoder block", "feature_map"),
        ),
        ModelKind(
            "dit",
            DiTModel,
            DIT_PRESETS,
            learned_variance=True,
            drops_labels_itself=True,
            hidden_states=HiddenStates("blocks", "DiT block"),  # DiT, SiT and LightningDiT: a block's output tokens
        ),
    )
}
# The kind a recipe trains when it names none.
DEFAULT_MODEL_KIND = "uvit"


def model_kind(name: str) -> ModelKind:
    """The registry entry of a recipe's ``model.kind``."""
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise ValueError(f"model.kind: {name!r} is not one of {', '.join(MODEL_KINDS)}.") from None


def model_kind_of(model) -> ModelKind | None:
    """The entry whose class ``model`` (a model or a class) is, or None for a model of another family."""
    cls = model if isinstance(model, type) else type(model)
    return next((kind for kind in MODEL_KINDS.values() if issubclass(cls, kind.model_class)), None)


__all__ = [
    "DEFAULT_MODEL_KIND",
    "DIT_PRESETS",
    "DiTModel",
    "EDM2UNetModel",
    "EDM2_PRESETS",
    "HiddenStates",
    "MODEL_KINDS",
    "ModelKind",
    "UVIT_PRESETS",
    "UViTModel",
    "model_kind",
    "model_kind_of",
]
