"""The flow-matching recipes: SiT as its paper trains it, and LightningDiT's Table 1 ladder, in which every rung is
a `base:` on the one before that changes exactly one aspect."""

import pytest
import torch

from diffusers_speedup.models import model_kind
from diffusers_speedup.training import load_config
from diffusers_speedup.training.config import config_to_dict
from diffusers_speedup.training.recipes import recipes_dir

# Keys that name a run or pace its logging, not what it trains.
BOOKKEEPING = ("train.output_dir", "train.checkpoint_every", "train.sample_every", "train.log_every")

# An aspect is a named set of keys (a key belongs to it when it equals or lies under one of them).
ASPECTS = {
    "rectified flow": (
        "objective.schedule",
        "objective.prediction_type",
        "objective.learned_variance",
        "objective.sampler",
        "sampling",
    ),
    "batch ×4, lr ×2 at equal epochs": ("train.batch_size", "optim.lr", "train.max_steps"),
    "AdamW β2": ("optim.betas",),
    "logit-normal t": ("objective.sampler",),
    "velocity-direction loss": ("objective.cosine_loss_weight",),
    "SwiGLU": ("model.params.mlp_type",),
    "RMSNorm": ("model.params.norm_type",),
    "RoPE": ("model.params.use_rope",),
    "patch 1 on VA-VAE f16d32": ("model.preset", "data"),
    "training length, and the released sampling": ("train.max_steps", "sampling"),
    "REPA (and a cache with the clean images)": ("repa", "data.path"),
}

# (recipe, the aspect it changes from the one before, LightningDiT Table 1 FID without guidance)
LADDER = [
    ("r0_dit_xl2_baseline", None, 19.50),
    ("r1_rectified_flow", "rectified flow", 17.20),
    ("r2_batch1024_lr2e-4", "batch ×4, lr ×2 at equal epochs", 16.59),
    ("r3_adamw_beta2_095", "AdamW β2", 16.61),
    ("r4_logit_normal", "logit-normal t", 13.99),
    ("r5_cosine_loss", "velocity-direction loss", 12.52),
    ("r6_swiglu", "SwiGLU", 10.10),
    ("r7_rmsnorm", "RMSNorm", 9.25),
    ("r8_rope", "RoPE", 7.13),
    ("r9_vavae_patch1", "patch 1 on VA-VAE f16d32", 4.29),
    # the released config: 64 epochs (FID 5.14, Table 3), its grids on LightningDiT's shifted Euler grid
    ("lightningdit_xl1_vavae", "training length, and the released sampling", None),
    # REPA on top: no published number (the paper has no REPA row)
    ("lightningdit_xl1_vavae_repa", "REPA (and a cache with the clean images)", None),
]
LADDER_DIR = recipes_dir() / "imagenet256" / "lightningdit"


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def resolved(name):
    return {
        k: v for k, v in flat(config_to_dict(load_config(LADDER_DIR / f"{name}.yaml"))).items() if k not in BOOKKEEPING
    }


def changed_keys(before, after):
    return {key for key in before.keys() | after.keys() if before.get(key, "<unset>") != after.get(key, "<unset>")}


def in_aspect(key, aspect):
    return any(key == root or key.startswith(root + ".") for root in ASPECTS[aspect])


def test_the_ladder_is_every_recipe_of_its_folder():
    assert sorted(path.stem for path in LADDER_DIR.glob("*.yaml")) == sorted(name for name, _, _ in LADDER)


@pytest.mark.parametrize("index", range(1, len(LADDER)), ids=[name for name, _, _ in LADDER[1:]])
def test_each_rung_changes_exactly_one_aspect_of_the_one_before(index):
    (previous, _, _), (name, aspect, _) = LADDER[index - 1], LADDER[index]
    assert f"base: {previous}.yaml" in (LADDER_DIR / f"{name}.yaml").read_text()
    changed = changed_keys(resolved(previous), resolved(name))
    assert changed, f"{name} changes nothing"
    assert {key for key in changed if not in_aspect(key, aspect)} == set(), f"{name} changes more than {aspect!r}"


def test_every_rung_header_cites_its_table_1_fid():
    for name, _, fid in LADDER:
        if fid is not None:
            assert f"{fid:.2f}" in (LADDER_DIR / f"{name}.yaml").read_text(), name


def test_the_baseline_rung_is_the_dit_baseline():
    baseline = load_config(recipes_dir() / "imagenet256" / "dit_xl2_baseline.yaml")
    rung = load_config(LADDER_DIR / "r0_dit_xl2_baseline.yaml")
    assert changed_keys(flat(config_to_dict(baseline)), flat(config_to_dict(rung))) == {"train.output_dir"}


def test_the_released_lightningdit_config_values():
    # hustvl/LightningDiT@2725fed configs/lightningdit_xl_vavae_f16d32.yaml and train.py.
    config = load_config(LADDER_DIR / "lightningdit_xl1_vavae.yaml")
    assert config.model.preset == "lightningdit-xl-1"
    assert config.model.params == {"mlp_type": "swiglu", "norm_type": "rmsnorm", "use_rope": True}
    assert (config.train.batch_size, config.train.max_steps) == (1024, 80000)
    assert (config.optim.lr, config.optim.betas, config.optim.weight_decay) == (2e-4, [0.9, 0.95], 0.0)
    assert config.optim.max_grad_norm is None
    assert (config.ema.kind, config.ema.decay) == ("constant", 0.9999)
    objective = config.objective
    assert (objective.schedule.kind, objective.schedule.path, objective.prediction_type) == (
        "flow",
        "linear",
        "velocity",
    )
    assert objective.sampler == {"kind": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}
    assert objective.cosine_loss_weight == 1.0 and not objective.learned_variance
    assert (config.data.latent_norm, config.data.latent_target_std) == ("per_channel", 1.0)  # latent_multiplier 1.0
    # sample.num_sampling_steps 250 grid points (249 Euler steps), timestep_shift 0.3 in SiT's time
    assert (config.sampling.scheduler, config.sampling.num_inference_steps) == ("flow_euler", 249)
    assert config.sampling.shift == 1 / 0.3


# SiT (arXiv 2401.08740 Table 1, same as DiT's Table 4): B/2 130 M, XL/2 675 M parameters. SiT's network has
# learn_sigma (8 outputs, the variance half unused); the recipes output the 4 trained channels.
@pytest.mark.parametrize(
    ("recipe", "millions", "official"), [("sit_b2", 130, 130_512_416), ("sit_xl2", 675, 675_129_632)]
)
def test_sit_recipes_build_the_papers_model(recipe, millions, official):
    config = load_config(recipes_dir() / "imagenet256" / f"{recipe}.yaml")
    assert (config.objective.schedule.kind, config.objective.schedule.path) == ("flow", "linear")
    assert config.objective.prediction_type == "velocity" and config.objective.sampler == {"kind": "uniform"}
    assert (config.optim.lr, config.optim.weight_decay, config.train.batch_size, config.ema.decay) == (
        1e-4,
        0.0,
        256,
        0.9999,
    )
    assert (config.sampling.scheduler, config.sampling.num_inference_steps) == ("flow_sde", 250)
    kind = model_kind(config.model.kind)
    params = {**kind.fitted_params((4, 32, 32), 1000, config.objective.learned_variance), **config.model.params}
    with torch.device("meta"):
        model = kind.model_class.from_preset(config.model.preset, **params)
    count = sum(p.numel() for p in model.parameters())
    hidden, patch = model.config.hidden_size, model.config.patch_size
    assert model.config.out_channels == 4
    assert count == official - (hidden + 1) * patch * patch * 4  # the unused variance half of the final linear
    assert int(count / 1e6) == millions  # the papers truncate: 130.5 M is "130M"


@pytest.mark.parametrize(
    "overrides, target",
    [
        ([], "epsilon"),  # DDPM: diffusers' default
        (["objective.schedule.kind=flow"], "velocity"),  # SiT, REPA, LightningDiT, SD3
        (["model.kind=edm2_unet", "objective.schedule.kind=edm"], "sample"),  # a σ-conditioned network returns x0
        (["objective.schedule.kind=flow", "objective.prediction_type=epsilon"], "epsilon"),  # a named one is kept
    ],
)
def test_a_recipe_without_a_target_trains_its_familys_own_and_says_so(overrides, target):
    config = load_config(None, overrides)
    assert config.objective.prediction_type == target
    assert config_to_dict(config)["objective"]["prediction_type"] == target  # the saved config names it


@pytest.mark.parametrize(
    "recipe, preset, depth, fid", [("sit_xl2_repa", "sit-xl-2", 8, "7.9"), ("sit_b2_repa", "sit-b-2", 4, "24.4")]
)
def test_the_repa_recipes_train_as_the_paper(recipe, preset, depth, fid):
    """arXiv 2410.06940 App. D and G: DINOv2-B, block 8 (L, XL) or 4 (B), λ 0.5, projector width 2048, AdamW 1e-4
    without decay, batch 256, clipping at 1.0, EMA 0.9999, no augmentation, fp16, linear path, velocity, uniform t,
    400K steps; the header cites the Table 3 FID it reproduces."""
    path = recipes_dir() / "imagenet256" / f"{recipe}.yaml"
    config = load_config(path)
    repa = config.repa
    assert (repa.enabled, repa.encoder, repa.depth, repa.weight, repa.projector, repa.projector_dim) == (
        True, "facebook/dinov2-base", depth, 0.5, "mlp", 2048)  # fmt: skip
    assert (repa.zscore_alpha, repa.stop_after_step, repa.encoder_resolution) == (None, None, None)
    assert config.model.preset == preset and config.data.random_flip is False
    assert (config.optim.lr, config.optim.weight_decay, config.optim.max_grad_norm) == (1e-4, 0.0, 1.0)
    assert (config.train.batch_size, config.train.max_steps, config.train.mixed_precision) == (256, 400_000, "fp16")
    assert (config.ema.kind, config.ema.decay, config.ema.start_step) == ("constant", 0.9999, 0)
    objective = config.objective
    assert (objective.schedule.kind, objective.schedule.path, objective.prediction_type) == (
        "flow",
        "linear",
        "velocity",
    )
    assert objective.sampler == {"kind": "uniform"} and objective.weighting == {"kind": "constant"}
    assert (config.sampling.scheduler, config.sampling.num_inference_steps) == ("flow_sde", 250)
    assert f"FID-50K {fid} without guidance at 400K" in path.read_text()
