"""A checkpoint exports from what it records (pipeline_record.json) and its weights: without the training data, an
optimizer, accelerate or a trainer, and exactly as the run itself exported that step while it had the data."""

import json
import shutil
from pathlib import Path

import accelerate
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_vae

from diffusers_speedup.hub.pipeline_record import PIPELINE_RECORD_NAME, PipelineRecord, resolve_export_input
from diffusers_speedup.training import Trainer, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHARED = [
    "train.cpu=true",
    "train.mixed_precision=fp32",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.checkpoint_every=2",
    "train.report_to=none",
    "sampling.num_inference_steps=2",
    "sampling.images_per_class=1",
]


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / "images" / label).mkdir(parents=True)
        for index in range(4):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{index}.png")
    return root / "images"


def latent_cache(root: Path) -> Path:
    """The images cached with a tiny AutoencoderKL saved in `root`/vae (which stays: the export loads it by id)."""
    from diffusers_speedup.data import cache_latents

    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    images = image_folder(root)
    cache_latents(
        str(root / "latents"), image_folder=str(images), vae=str(root / "vae"), resolution=16, batch_size=4,
        num_workers=0, progress=False,
    )  # fmt: skip
    shutil.rmtree(images)
    return root / "latents"


# A U-ViT on pixels without an EMA (the live weights; a `transformer`), and EDM2's UNet on latents with a
# power-function EMA (its first profile; a `unet`), its VAE and the per-channel normalisation measured on the cache.
CASES = {
    "pixels": (
        "quickstart.yaml",
        image_folder,
        ["data.kind=image_folder", "data.resolution=8", "data.channels=3", "ema.kind=none",
         "model.params.hidden_size=32", "model.params.num_layers=3", "model.params.num_attention_heads=2"],
    ),
    "latents": (
        "imagenet512/edm2_xs.yaml",
        latent_cache,
        ["data.latents_mean=null", "data.latents_std=null", "model.params.model_channels=16",
         "model.params.channel_mult=[1,2]", "model.params.num_blocks=1", "model.params.attn_resolutions=[4]",
         "model.params.channels_per_head=8", "model.params.logvar_channels=8"],
    ),
}  # fmt: skip


def refuse(what):
    def refused(*args, **kwargs):
        raise AssertionError(f"exporting a checkpoint built {what}")

    return refused


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_exports_without_its_data_exactly_as_the_run_exported_it(case, tmp_path, monkeypatch):
    recipe, make_data, overrides = CASES[case]
    dataset = make_data(tmp_path / "data")
    run = tmp_path / "run"
    config = load_config(CONFIGS / recipe, [*SHARED, *overrides, f"data.path={dataset}", f"train.output_dir={run}"])
    Trainer(config).train()  # the last checkpoint, then the run's own export of that step: run/pipeline
    record = PipelineRecord.load(run / "checkpoint-2")
    assert record.slot == ("transformer" if case == "pixels" else "unet")
    assert (record.vae is None) == (case == "pixels")

    shutil.rmtree(dataset)
    monkeypatch.setattr(Trainer, "__init__", refuse("a Trainer"))
    monkeypatch.setattr(accelerate.Accelerator, "__init__", refuse("an Accelerator"))
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse("an optimizer"))
    exported = resolve_export_input(run / "checkpoint-2", tmp_path / "export")

    assert exported == tmp_path / "export"
    written = sorted(p.relative_to(run / "pipeline") for p in (run / "pipeline").rglob("*") if p.is_file())
    assert sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file()) == written
    for name in written:  # weights, model_index.json, configs, training_config.yaml, samples, card and its facts
        assert (exported / name).read_bytes() == (run / "pipeline" / name).read_bytes(), name


def test_a_pipeline_record_that_is_not_one_is_refused_naming_the_file_and_keys(tmp_path):
    path = tmp_path / PIPELINE_RECORD_NAME
    path.write_text(json.dumps({"format": 1, "model": {}, "slot": "transformer", "colour": "blue"}))
    with pytest.raises(
        ValueError, match=rf"{PIPELINE_RECORD_NAME}: missing keys \['weights', .*unknown keys \['colour'\]"
    ):
        PipelineRecord.load(tmp_path)
    path.write_text(json.dumps({"format": 2}))
    with pytest.raises(ValueError, match=r"format 2, but this version of diffusers-speedup reads format 1"):
        PipelineRecord.load(tmp_path)
