"""Size presets for diffusers' DiTTransformer2DModel (Peebles & Xie 2023), which this package reuses as it is.

The presets leave ``out_channels`` to the caller. The trainer sets it to 2× the input channels when
``objective.learned_variance`` is on (DiT's ``learn_sigma``: the mean prediction, then the variance, trained by the
VB term and sampled with ``DDPMScheduler(variance_type="learned_range")``), and to the input channels otherwise.

diffusers' DiT gives every block its own timestep and class embedder, so its parameter counts exceed the paper's
(DiT-B/2 147M instead of 130M, DiT-XL/2 750M instead of 675M); the transformer blocks, and so the compute per
image, are the paper's.
"""

from diffusers import DiTTransformer2DModel

# DiT paper, Table 1: layers, hidden size (= heads × head dim), heads; all with patch size 2 at 256 px (32×32×4).
DIT_PRESETS = {
    "dit-s-2": {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64, "patch_size": 2},
    "dit-b-2": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64, "patch_size": 2},
    "dit-l-2": {"num_layers": 24, "num_attention_heads": 16, "attention_head_dim": 64, "patch_size": 2},
    "dit-xl-2": {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "patch_size": 2},
}


def dit_from_preset(name: str, **overrides) -> DiTTransformer2DModel:
    """A freshly initialised DiT of a published size, e.g. ``dit_from_preset("dit-b-2", num_embeds_ada_norm=10)``."""
    if name not in DIT_PRESETS:
        raise ValueError(f"Unknown DiT preset {name!r}; expected one of {sorted(DIT_PRESETS)}.")
    return DiTTransformer2DModel(**{**DIT_PRESETS[name], **overrides})
