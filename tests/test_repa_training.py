"""REPA in the trainer: a recipe's ``repa`` section, its checks before any work, a tiny run on the built-in digits
killed and resumed bit for bit, the projector in the checkpoint and not in the export, the card naming it."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.tracking import GeneralTracker
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model

from diffusers_speedup.training import ConfigError, Trainer, load_config
from diffusers_speedup.training.checkpoints import find_latest_checkpoint
from diffusers_speedup.training.training_data import TrainingData, repa_extra_columns
from tests.test_trainer import assert_same_checkpoint


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    """A tiny random DINOv2 saved as `repa.encoder` would name a local folder (37×37 position table)."""
    folder = tmp_path_factory.mktemp("encoder") / "dinov2"
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=12, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=518)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def tiny_repa(output_dir, encoder, *extra):
    """A tiny DiT on the 32 px RGB digits: patch 16 gives a 2×2 token grid, as DINOv2 sees 32 px (28 px, 14 px
    patches); REPA on its first block."""
    return [
        f"train.output_dir={output_dir}",
        "model.kind=dit",
        "model.params.patch_size=16",
        "model.params.num_layers=2",
        "model.params.hidden_size=32",
        "model.params.num_attention_heads=2",
        "objective.label_dropout=0",
        "objective.schedule.kind=flow",
        "objective.prediction_type=velocity",
        "data.resolution=32",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "train.report_to=none",
        "sampling.num_inference_steps=2",
        "sampling.images_per_class=1",
        "sampling.max_classes=2",
        "repa.enabled=true",
        f"repa.encoder={encoder}",
        "repa.depth=1",
        "repa.projector_dim=16",
        *extra,
    ]


class Recorder(GeneralTracker):
    """Keeps every logged value, by step."""

    name, requires_logging_directory = "recorder", False

    def __init__(self):
        super().__init__()
        self.logged = {}

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        self.logged[step] = dict(values)


def test_a_repa_run_resumes_bit_identically_across_its_stop_and_exports_without_the_projector(
    tmp_path, dinov2_folder, monkeypatch
):
    """The stop after step 4 lies after the checkpoint at step 3 that the killed run resumes from: only the
    trainer's restored step makes the resumed run stop where the uninterrupted one did."""
    extra = ("repa.stop_after_step=4",)
    recorder = Recorder()
    straight = Trainer(load_config(None, tiny_repa(tmp_path / "straight", dinov2_folder, *extra)), trackers=[recorder])
    straight.train()
    terms = {step: values["train/repa_loss"] for step, values in recorder.logged.items()}
    assert all(-0.5 <= terms[step] < 0 for step in (1, 2, 3, 4)) and terms[5] == terms[6] == 0.0

    calls = {"n": 0}
    original = TrainingData.batch

    def dying_batch(self, indices, device):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the checkpoint at step 3
            raise KeyboardInterrupt("killed")
        return original(self, indices, device)

    monkeypatch.setattr(TrainingData, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(None, tiny_repa(tmp_path / "resumed", dinov2_folder, *extra))).train()
    monkeypatch.setattr(TrainingData, "batch", original)
    assert find_latest_checkpoint(tmp_path / "resumed").name == "checkpoint-3"
    resumed = Trainer(load_config(None, tiny_repa(tmp_path / "resumed", dinov2_folder, *extra, "train.resume=latest")))
    resumed.train()
    assert_same_checkpoint(tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")

    # The projector is trained, checkpointed and left out of the export; the encoder is in neither.
    checkpoint = load_file(str(tmp_path / "straight" / "checkpoint-6" / "model.safetensors"))
    projector = {key for key in checkpoint if key.startswith("auxiliary_losses.0.projector.")}
    assert projector == {f"auxiliary_losses.0.projector.{i}.{part}" for i in (0, 2, 4) for part in ("weight", "bias")}
    assert not any("embeddings" in key or "encoder." in key for key in checkpoint)
    exported = load_file(str(next((tmp_path / "straight" / "pipeline" / "transformer").glob("*.safetensors"))))
    assert not any("projector" in key or "auxiliary" in key for key in exported)
    card = (tmp_path / "straight" / "pipeline" / "README.md").read_text()
    assert "Representation alignment (REPA)" in card and "tags:\n- diffusers" in card and "- repa" in card
    assert "aligned at the output of block 1, λ = 0.5" in card and "switched off after step 4 (HASTE)" in card
    assert str(dinov2_folder) not in card  # a local folder is not named in a card


@pytest.mark.parametrize(
    "override, message",
    [
        ("repa.weight=0", "repa.weight: must be > 0, got 0"),
        ("repa.depth=0", "repa.depth: the aligned block is counted from 1, got 0"),
        ("repa.projector_dim=0", "repa.projector_dim: must be > 0"),
        ("repa.conv_kernel_size=2", "repa.conv_kernel_size: must be odd and positive"),
        ("repa.zscore_alpha=1.5", r"repa.zscore_alpha: must lie in \[0, 1\]"),
        ("repa.stop_after_step=0", "repa.stop_after_step: must be > 0"),
        ("repa.encoder_resolution=0", "repa.encoder_resolution: must be > 0"),
        ("repa.encoder=' '", "repa.encoder: must name a DINOv2"),
        ("repa.projector=linear", "repa.projector: Invalid value 'linear', expected one of"),
    ],
)
def test_bad_repa_values_are_refused_when_the_recipe_loads(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(None, tiny_repa(tmp_path, "facebook/dinov2-base", override))


def test_a_disabled_section_is_not_checked(tmp_path):
    load_config(None, tiny_repa(tmp_path, "facebook/dinov2-base", "repa.enabled=false", "repa.weight=0"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["repa.depth=3"],
            r"repa.depth: depth 3 is not a block of this DiTModel, which has 2 DiT blocks \(depth 1 to 2",
        ),
        (
            ["model.params.patch_size=8"],
            r"repa.depth: DiT block 1 of this DiTModel outputs a 4×4 token grid, but the encoder, which sees the 32 px "
            r"images at 28 px in 14 px patches, gives 2×2; .*no block of this model has it; or set "
            r"repa.encoder_resolution to 4 × the encoder's patch size",
        ),
        (
            ["data.resolution=24", "model.params.patch_size=12"],
            "data.resolution: the encoder's input of 21 px is not a whole number of its 14 px patches",
        ),
        (
            ["model.params.patch_size=8", "repa.encoder_resolution=50"],
            "repa.encoder_resolution: the encoder's input of 50 px is not a whole number of its 14 px patches",
        ),
    ],
)
def test_a_block_or_grid_that_cannot_be_aligned_is_named_before_any_step(overrides, message, tmp_path, dinov2_folder):
    with pytest.raises(ConfigError, match=message):
        Trainer(load_config(None, tiny_repa(tmp_path / "run", dinov2_folder, *overrides)))
    assert not (tmp_path / "run").exists()


def test_encoder_resolution_meets_a_network_with_another_token_grid(tmp_path, dinov2_folder):
    """Patch 8 on 32 px gives a 4×4 grid, which REPA's 28 px input (2×2 DINOv2 patches) cannot meet; a 56 px input
    (4 × 14) can, and the run trains with the term."""
    recorder = Recorder()
    overrides = ("model.params.patch_size=8", "repa.encoder_resolution=56", "train.max_steps=2")
    Trainer(load_config(None, tiny_repa(tmp_path / "run", dinov2_folder, *overrides)), trackers=[recorder]).train()
    terms = [values["train/repa_loss"] for values in recorder.logged.values()]
    assert len(terms) == 2 and all(-0.5 <= term <= 0.5 and term != 0 for term in terms)  # λ·(−cos), λ = 0.5


def test_an_encoder_that_is_not_a_vision_model_is_named_before_any_work(tmp_path):
    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"^repa.encoder: encoder '.*bert' is a 'bert' model, not a DINOv2"):
        Trainer(load_config(None, tiny_repa(tmp_path / "run", tmp_path / "bert")))
    with pytest.raises(ConfigError, match=r"^repa.encoder: encoder '.*missing' cannot be read"):
        Trainer(load_config(None, tiny_repa(tmp_path / "run", tmp_path / "missing")))


def fabricated_cache(folder: Path, **metadata) -> Path:
    """A folder with only the metadata of a latent cache, which is all the checks before any work read."""
    folder.mkdir(parents=True)
    (folder / "latents_metadata.json").write_text(json.dumps({"resolution": 256, **metadata}))
    return folder


def test_a_latent_cache_gives_features_of_the_same_encoder_else_images_else_one_line_naming_it(tmp_path):
    def columns(**metadata):
        cache = fabricated_cache(tmp_path / f"cache{len(list(tmp_path.iterdir()))}", **metadata)
        config = load_config(None, tiny_repa(tmp_path / "run", "facebook/dinov2-base", "data.kind=latents",
                                             f"data.path={cache}", "data.resolution=null"))  # fmt: skip
        return repa_extra_columns(config), config

    features = {"encoder": "facebook/dinov2-base", "input_size": 224, "tokens": 256, "dim": 768}
    assert columns(images=True, encoder_features=features)[0] == ("encoder_features",)
    resized = {**features, "input_size": 448}  # another repa.encoder_resolution: other features
    assert columns(images=True, encoder_features=resized)[0] == ("image",)
    other = {**features, "encoder": "facebook/dinov2-large"}
    assert columns(images=True, encoder_features=other)[0] == ("image",)
    assert columns(images=True, encoder_features=None)[0] == ("image",)
    with pytest.raises(ConfigError, match=r"repa.enabled: the latent cache .*cache\d holds no clean images for REPA's "
                       r"encoder; cache the images with the latents \(.*cache-latents .* --store_images\), or the "
                       r"features \(--encoder_features facebook/dinov2-base\)"):  # fmt: skip
        columns(images=False, encoder_features=None)
    with pytest.raises(
        ConfigError,
        match="its encoder features are of 'facebook/dinov2-large' at 224 px, not of 'facebook/dinov2-base' at 224 px",
    ):
        columns(encoder_features=other)
    # In the trainer, before anything else is read.
    cache = fabricated_cache(tmp_path / "bare", images=False)
    config = load_config(None, tiny_repa(tmp_path / "run", "facebook/dinov2-base", "data.kind=latents",
                                         f"data.path={cache}", "data.resolution=null"))  # fmt: skip
    with pytest.raises(ConfigError, match="holds no clean images"):
        Trainer(config)


def test_resuming_with_another_repa_section_is_refused():
    from diffusers_speedup.training.config import config_to_dict
    from diffusers_speedup.training.validation import resume_config_changes

    saved = config_to_dict(load_config(None, ["repa.enabled=true"]))
    current = config_to_dict(load_config(None, ["repa.enabled=true", "repa.depth=4"]))
    assert resume_config_changes(saved, current) == ["repa.depth: 8 -> 4"]
    del saved["repa"]  # a checkpoint written before the section existed resumes with it off
    assert resume_config_changes(saved, config_to_dict(load_config(None))) == []


@pytest.mark.parametrize("column", ["image", "encoder_features"])
def test_a_latent_cache_with_images_or_features_trains_with_repa(column, tmp_path, dinov2_folder, monkeypatch):
    """A cache made by ``cache-latents --store_images`` trains with the encoder run on its crops; one made with
    ``--encoder_features`` (REPA's encoder on each crop and mirror, at cache time) trains without loading the encoder,
    on the very features the encoder gives the stored crops."""
    from diffusers_speedup.commands import cache_latents as command
    from diffusers_speedup.objectives import repa
    from tests.tiny_models import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    option = ["--store_images"] if column == "image" else ["--store_images", "--encoder_features", str(dinov2_folder)]
    command.main(["--output_dir", str(tmp_path / "extended"), "--builtin", "digits", "--vae", str(tmp_path / "vae"),
                  "--resolution", "32", "--num_workers", "0", "--max_images", "32", "--no_progress", *option])  # fmt: skip
    if column == "encoder_features":
        from datasets import load_from_disk

        rows = load_from_disk(str(tmp_path / "extended")).with_format("torch")[:4]
        encoder = repa.FrozenEncoder.from_pretrained(str(dinov2_folder), 32)
        for name, images in (("encoder_features", rows["image"]), ("encoder_features_flip", rows["image"].flip(-1))):
            torch.testing.assert_close(rows[name].float(), encoder(images).half().float(), rtol=0, atol=0)

    loaded = []
    original = repa.FrozenEncoder.from_pretrained
    monkeypatch.setattr(repa.FrozenEncoder, "from_pretrained", lambda *a, **k: loaded.append(a) or original(*a, **k))
    overrides = ["data.kind=latents", f"data.path={tmp_path / 'extended'}", "data.resolution=null",
                 "model.params.patch_size=8", "train.max_steps=2", "train.checkpoint_every=0"]  # fmt: skip
    trainer = Trainer(load_config(None, tiny_repa(tmp_path / "run", dinov2_folder, *overrides)))
    assert trainer.data.dataset.extra_columns == (column,)
    trainer.train()
    assert trainer.step == 2 and len(loaded) == (column == "image")  # features stand in for the encoder
    alignment = trainer.auxiliary_losses[0]
    assert (alignment.encoder is None) == (column == "encoder_features")


def test_cache_latents_takes_an_encoder_resolution_only_with_encoder_features(capsys):
    from diffusers_speedup.commands.cache_latents import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--output_dir", "x", "--builtin", "digits", "--encoder_resolution", "112"])
    assert "--encoder_resolution only applies with --encoder_features" in capsys.readouterr().err
