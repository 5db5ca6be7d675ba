"""Every recipe in configs/ loads and validates as written, and runs a step and a checkpoint on CPU once its model
and data are shrunk by overrides."""

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_vae

from diffusers_speedup.models import model_kind
from diffusers_speedup.training import ConfigError, Trainer, load_config
from diffusers_speedup.training.config import LRSchedule
from diffusers_speedup.training.lr_schedules import get_lr_scheduler
from diffusers_speedup.training.validation import validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))

SHRINK = {
    "uvit": ["model.params.hidden_size=32", "model.params.num_layers=3", "model.params.num_attention_heads=2"],
    "dit": ["model.params.num_layers=2", "model.params.hidden_size=16", "model.params.num_attention_heads=2"],
    "edm2_unet": [
        "model.params.model_channels=16",
        "model.params.channel_mult=[1,2]",
        "model.params.num_blocks=1",
        "model.params.attn_resolutions=[4]",
        "model.params.channels_per_head=8",
        "model.params.logvar_channels=8",
    ],
}


def test_there_is_a_recipe_for_every_paper():
    names = {str(path.relative_to(CONFIGS)) for path in RECIPES}
    for expected in (
        "quickstart.yaml",
        "imagenet256/vit_b_minsnr_eps.yaml",
        "imagenet256/vit_b_minsnr_x0.yaml",
        "imagenet256/vit_b_minsnr_v.yaml",
        "imagenet256/dit_xl2_baseline.yaml",
        "imagenet256/dit_xl2_speed.yaml",
        "imagenet256/dit_b2_baseline.yaml",
        "imagenet256/dit_b2_speed.yaml",
        "imagenet256/sit_b2.yaml",
        "imagenet256/sit_xl2.yaml",
        "imagenet256/lightningdit/lightningdit_xl1_vavae.yaml",
        "imagenet256/sit_xl2_repa.yaml",
        "imagenet256/sit_b2_repa.yaml",
        "imagenet256/lightningdit/lightningdit_xl1_vavae_repa.yaml",
        "cifar10/edm2_c.yaml",
        "cifar10/edm2_e.yaml",
        "imagenet512/edm2_xs.yaml",
    ):
        assert expected in names
    for mode in ("inv_sqrt2", "constant", "learned", "learned_per_skip"):
        assert f"cifar10/uvit_s2_scalelong_{mode}.yaml" in names
        assert f"imagenet256/uvit_l2_scalelong_{mode}.yaml" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: str(path.relative_to(CONFIGS)))
def test_recipe_loads_and_validates(recipe):
    config = load_config(recipe)
    assert config.train.output_dir.startswith("outputs/")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 2-class image folder (16 px) and a latent cache of it made with a tiny AutoencoderKL saved to disk."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / "images" / label).mkdir(parents=True)
        for index in range(6):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{index}.png")
    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    from diffusers_speedup.data import cache_latents

    cache_latents(
        str(root / "latents"),
        image_folder=str(root / "images"),
        vae=str(root / "vae"),
        resolution=16,
        store_images=True,  # what a REPA recipe's encoder looks at
        batch_size=4,
        chunk_size=8,
        num_workers=0,
        progress=False,
    )
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)  # a tiny DINOv2 for the REPA recipes' encoder
    Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2)).save_pretrained(
        root / "dinov2"
    )
    return root


def repa_shrunk(config, tiny_data) -> list[str]:
    """A REPA recipe's encoder replaced by the tiny one, aligned at the first block, its 14 px patches meeting the
    shrunk network's token grid on the 16 px images' 8×8 latents."""
    if not config.repa.enabled:
        return []
    patch = model_kind(config.model.kind).presets[config.model.preset]["patch_size"]
    return [
        f"repa.encoder={tiny_data / 'dinov2'}",
        "repa.depth=1",
        "repa.projector_dim=16",
        f"repa.encoder_resolution={8 // patch * 14}",
    ]


@pytest.mark.parametrize(
    "recipe", [r for r in RECIPES if r.name != "quickstart.yaml"], ids=lambda path: str(path.relative_to(CONFIGS))
)
def test_recipe_runs_a_step_and_checkpoints_when_shrunk(recipe, tiny_data, tmp_path):
    config = load_config(recipe)
    kind = config.model.kind
    data = (
        [f"data.path={tiny_data / 'latents'}", "data.in_memory=true"]  # also the in-memory reader
        if config.data.kind == "latents"
        else [f"data.path={tiny_data / 'images'}", "data.resolution=8"]
    )
    overrides = [
        *SHRINK[kind],
        *data,
        *repa_shrunk(config, tiny_data),
        f"train.output_dir={tmp_path}",
        "train.cpu=true",
        "train.mixed_precision=fp32",
        "train.batch_size=4",
        "train.max_steps=1",
        "train.checkpoint_every=1",
        "train.report_to=none",
        "sampling.num_inference_steps=2",
        "sampling.images_per_class=1",
        "sampling.max_classes=2",
    ]
    if config.ema.kind == "power":
        overrides.append("ema.snapshot_every=1")
    trainer = Trainer(load_config(recipe, overrides))
    export_dir = trainer.train()
    assert (tmp_path / "checkpoint-1" / "config.yaml").is_file()
    assert (export_dir / "model_index.json").is_file()
    if config.objective.learned_variance:  # DiT's learned σ: 2C outputs, sampled with DDPM's learned range
        transformer = json.loads((export_dir / "transformer" / "config.json").read_text())
        scheduler = json.loads((export_dir / "scheduler" / "scheduler_config.json").read_text())
        assert transformer["out_channels"] == 2 * transformer["in_channels"]
        assert scheduler["_class_name"] == "DDPMScheduler" and scheduler["variance_type"] == "learned_range"


def test_fp16_on_cpu_fails_before_any_work(tmp_path):
    config = load_config(
        CONFIGS / "imagenet256" / "vit_b_minsnr_x0.yaml", [f"train.output_dir={tmp_path / 'run'}", "train.cpu=true"]
    )
    with pytest.raises(ConfigError, match="train.mixed_precision: fp16 needs a GPU"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def test_base_chains_are_followed_and_checked(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain:\n  max_steps: 7\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "c.yaml")
    speed = load_config(CONFIGS / "imagenet256" / "dit_xl2_speed.yaml")
    assert speed.objective.sampler["kind"] == "speed" and speed.model.preset == "dit-xl-2"


def test_recipes_resolve_by_name_or_path(tmp_path, monkeypatch):
    from diffusers_speedup.training.recipes import list_recipes, resolve_recipe

    assert set(list_recipes()) == {str(path.relative_to(CONFIGS).with_suffix("")) for path in RECIPES}
    monkeypatch.chdir(tmp_path)  # names do not depend on the working folder
    expected = (CONFIGS / "imagenet256" / "dit_xl2_speed.yaml").resolve()
    for spelling in (
        "imagenet256/dit_xl2_speed",
        "imagenet256/dit_xl2_speed.yaml",
        "configs/imagenet256/dit_xl2_speed.yaml",
    ):
        assert resolve_recipe(spelling).resolve() == expected
    assert load_config("quickstart").model.params["skip_scaling"] == "inv_sqrt2"
    # A file of that name in the working folder wins over the shipped recipe.
    (tmp_path / "quickstart.yaml").write_text("train:\n  max_steps: 3\n")
    assert load_config("quickstart.yaml").train.max_steps == 3
    # A recipe of one's own starts from a shipped one by name.
    (tmp_path / "mine.yaml").write_text("base: imagenet256/dit_xl2_speed\ntrain:\n  max_steps: 5\n")
    mine = load_config("mine.yaml")
    assert (mine.objective.sampler["kind"], mine.model.preset, mine.train.max_steps) == ("speed", "dit-xl-2", 5)
    with pytest.raises(ConfigError, match="imagenet256/dit_xl3 does not exist.*shipped recipes: cifar10/edm2_c"):
        load_config("imagenet256/dit_xl3")


def test_per_channel_latent_normalisation_is_measured_trained_on_and_exported(tiny_data, tmp_path):
    from diffusers_speedup.data import LatentDataset
    from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline

    overrides = [
        *SHRINK["edm2_unet"],
        f"data.path={tiny_data / 'latents'}",
        "data.latents_mean=null",  # measured on the cache instead of EDM2's ImageNet numbers
        "data.latents_std=null",
        f"train.output_dir={tmp_path}",
        "train.cpu=true",
        "train.mixed_precision=fp32",
        "train.batch_size=4",
        "train.max_steps=1",
        "train.report_to=none",
        "sampling.num_inference_steps=2",
        "sampling.images_per_class=1",
        "ema.snapshot_every=1",
    ]
    trainer = Trainer(load_config(CONFIGS / "imagenet512" / "edm2_xs.yaml", overrides))
    mean, std = LatentDataset(str(tiny_data / "latents")).latent_statistics()
    assert trainer.data.dataset.normalization.vae_config() == {
        "scaling_factor": 0.5,
        "shift_factor": None,
        "latents_mean": mean,
        "latents_std": std,
    }
    export_dir = trainer.train()

    pipeline = ClassConditionalPipeline.from_pretrained(export_dir)
    assert pipeline.vae.config.latents_mean == mean and pipeline.vae.config.scaling_factor == 0.5
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([x[:, c] * std[c] / 0.5 + mean[c] for c in range(4)], dim=1)
    torch.testing.assert_close(pipeline._to_vae_latents(x), expected)


def test_a_latent_run_loads_its_vae_once_for_every_grid_and_export(tiny_data, tmp_path, monkeypatch):
    from diffusers_speedup import data

    loads, load_vae = [], data.load_vae
    monkeypatch.setattr(data, "load_vae", lambda *args, **kwargs: loads.append(args) or load_vae(*args, **kwargs))
    overrides = [
        *SHRINK["dit"],
        f"data.path={tiny_data / 'latents'}",
        f"train.output_dir={tmp_path}",
        "train.cpu=true",
        "train.mixed_precision=fp32",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.sample_every=1",
        "train.checkpoint_every=1",
        "train.export_every_checkpoint=true",
        "train.report_to=none",
        "sampling.num_inference_steps=2",
        "sampling.images_per_class=1",
    ]
    Trainer(load_config(CONFIGS / "imagenet256" / "dit_b2_baseline.yaml", overrides)).train()
    # A grid and an export at step 1, and again at the end: one load.
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2 and (tmp_path / "checkpoint-1" / "pipeline").is_dir()
    assert loads == [(str(tiny_data / "vae"),)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.latent_norm=channels"], "data.latent_norm"),
        (["data.latents_std=null"], "data.latents_mean, data.latents_std"),
        (["data.latents_std=[1.0,2.0]"], "data.latents_std: 2 values for 4"),
        (["data.latents_std=[1.0,2.0,0.0,1.0]"], "data.latents_std: must be positive"),
        (["data.latent_norm=vae"], "data.latents_mean: only used with"),
        (["data.latent_target_std=0"], "data.latent_target_std"),
    ],
)
def test_bad_latent_normalisation_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "imagenet512" / "edm2_xs.yaml", overrides)


def test_configured_statistics_must_match_the_cache_channels(tiny_data, tmp_path):
    overrides = [
        *SHRINK["edm2_unet"],
        f"data.path={tiny_data / 'latents'}",
        "data.latents_mean=[0.0,0.0,0.0]",
        "data.latents_std=[1.0,1.0,1.0]",
        f"train.output_dir={tmp_path}",
        "train.cpu=true",
        "train.mixed_precision=fp32",
        "train.report_to=none",
    ]
    with pytest.raises(ConfigError, match="data.latents_mean: 3 values, but the latents in .* have 4 channels"):
        Trainer(load_config(CONFIGS / "imagenet512" / "edm2_xs.yaml", overrides))


def test_choices_are_checked_from_their_types_also_for_a_config_changed_in_python():
    with pytest.raises(ConfigError, match="optim.lr_schedule: Invalid value 'cosine_annealing', expected one of"):
        load_config(CONFIGS / "quickstart.yaml", ["optim.lr_schedule=cosine_annealing"])
    config = load_config(CONFIGS / "quickstart.yaml")
    config.ema.kind = "polyak"
    with pytest.raises(ConfigError, match="ema.kind: Invalid value 'polyak'"):
        validate_config(config)


def test_every_schedule_a_recipe_can_name_builds():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for name in get_args(LRSchedule):
        get_lr_scheduler(name, optimizer, warmup_steps=2, total_steps=10)


def test_a_config_that_is_a_directory_is_named_as_one(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=f"^Config file {tmp_path / 'run'} is a directory, not a recipe file"):
        load_config(tmp_path / "run")
    (tmp_path / "mine.yaml").write_text("base: run\n")
    with pytest.raises(ConfigError, match=f"^Config file {tmp_path / 'run'} is a directory, not a recipe file"):
        load_config(tmp_path / "mine.yaml")
