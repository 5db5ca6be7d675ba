"""A checkpoint records which data it was trained on; a resume on changed data stops, naming the change, unless
``train.allow_data_change=true`` (then with a warning); a checkpoint without the record resumes with one warning."""

import json
import logging
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk
from PIL import Image

from diffusers_speedup.training import ConfigError, Trainer, load_config

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint_export import CASES, CONFIGS, SHARED  # noqa: E402
from test_trainer import QUICKSTART, tiny  # noqa: E402
from tiny_models import tiny_vae  # noqa: E402


def images(root: Path, per_class: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / label / f"{index:02d}.png")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A latent cache of 48 images, made with a tiny AutoencoderKL."""

    from diffusers_speedup.data import cache_latents

    root = tmp_path_factory.mktemp("data")
    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    cache_latents(
        str(root / "latents"), image_folder=str(images(root / "images")), vae=str(root / "vae"), resolution=16,
        batch_size=16, num_workers=0, progress=False,
    )  # fmt: skip
    return root / "latents"


def latent_run(cache: Path, run: Path, *extra: str):
    recipe, _, overrides = CASES["latents"]
    return load_config(
        CONFIGS / recipe,
        [*SHARED, *overrides, f"data.path={cache}", f"train.output_dir={run}", "train.max_steps=3", *extra],
    )


def rewrite_cache(cache: Path, change) -> None:
    """Apply `change` to the cache's rows and save it in place, keeping its metadata file (as a hand edit would)."""
    changed = change(load_from_disk(str(cache)))
    changed.save_to_disk(str(cache) + ".new")
    shutil.copy(cache / "latents_metadata.json", str(cache) + ".new")
    shutil.rmtree(cache)
    Path(str(cache) + ".new").rename(cache)


def without_row(dataset, index: int):
    return dataset.select([i for i in range(len(dataset)) if i != index])


def relabelled(dataset):
    return dataset.map(lambda row, i: {"label": 1 - row["label"] if i == 5 else row["label"]}, with_indices=True)


def other_latents(dataset):
    return dataset.map(lambda row, i: {"mean": (np.asarray(row["mean"]) + (i == 0)).tolist()}, with_indices=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda dataset: without_row(dataset, 20), "the number of samples changed: 48 -> 47"),
        (relabelled, "the labels changed (the number of samples, 48, did not)"),
        (other_latents, "the data changed (the 48 samples have the same labels, but other contents)"),
    ],
    ids=["deleted_row", "relabelled_row", "re_encoded_row"],
)
def test_resuming_on_a_changed_latent_cache_stops_naming_the_change_unless_allowed(
    change, message, cache, tmp_path, caplog
):
    data = tmp_path / "latents"
    shutil.copytree(cache, data)
    run = tmp_path / "run"
    Trainer(latent_run(data, run, "train.checkpoint_every=2")).train()
    rewrite_cache(data, change)

    with pytest.raises(ConfigError) as caught:
        Trainer(latent_run(data, run, "train.max_steps=4", "train.resume=latest"))
    assert str(caught.value).startswith(f"train.resume: {run / 'checkpoint-3'} was trained on other data than {data}")
    assert message in str(caught.value) and "train.allow_data_change=true" in str(caught.value)

    with caplog.at_level(logging.WARNING):
        resumed = Trainer(
            latent_run(data, run, "train.max_steps=4", "train.resume=latest", "train.allow_data_change=true")
        )
        resumed.train()
    warnings = [record.getMessage() for record in caplog.records if "allow_data_change" in record.getMessage()]
    assert len(warnings) == 1 and message in warnings[0] and "no longer an exact continuation" in warnings[0]
    assert resumed.step == 4
    # The new checkpoint records the data it now trains on: the next resume needs no permission.
    Trainer(latent_run(data, run, "train.max_steps=5", "train.resume=latest")).train()


def test_the_same_cache_read_into_memory_or_from_disk_resumes_without_a_word(cache, tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(latent_run(cache, run, "train.max_steps=2")).train()
    with caplog.at_level(logging.WARNING):
        Trainer(latent_run(cache, run, "train.max_steps=3", "data.in_memory=true", "train.resume=latest")).train()
    assert not [record for record in caplog.records if "data" in record.getMessage()]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda folder: (folder / "dog" / "07.png").unlink(), "the number of samples changed: 48 -> 47"),
        (
            lambda folder: Image.new("RGB", (16, 16), "white").save(folder / "cat" / "00.png"),
            "the data changed (the 48 samples have the same labels, but other contents)",
        ),
    ],
    ids=["deleted_image", "replaced_image"],
)
def test_resuming_on_changed_pixel_data_stops_naming_the_change(change, message, tmp_path):
    folder = images(tmp_path / "images")
    overrides = ["data.kind=image_folder", f"data.path={folder}", "data.channels=3", "train.max_steps=3"]
    Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", *overrides))).train()
    change(folder)
    with pytest.raises(ConfigError, match=re.escape(f"was trained on other data than {folder}: {message}.")):
        Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", *overrides, "train.resume=latest")))


def test_a_checkpoint_without_a_record_of_its_data_resumes_with_one_warning(tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(load_config(QUICKSTART, tiny(run, "train.max_steps=3"))).train()
    state_file = run / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["rows"] == 1617
    del state["data"]  # as written before checkpoints recorded their data
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        resumed = Trainer(load_config(QUICKSTART, tiny(run, "train.resume=latest")))
        resumed.train()
    warnings = [
        record.getMessage() for record in caplog.records if "which data it was trained on" in record.getMessage()
    ]
    assert len(warnings) == 1 and "cannot be checked" in warnings[0] and "checkpoint-3" in warnings[0]
    assert resumed.step == 6
