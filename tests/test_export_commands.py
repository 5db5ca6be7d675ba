"""The README's export and push commands, as written, on a run trained with the defaults (tiny settings)."""

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants

from diffusers_speedup.training import Trainer, load_config

sys.path.insert(0, os.path.dirname(__file__))
from fake_hub import FakeHub  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_ExportCommandToken0123456789"
# The quickstart shrunk; checkpoints hold no pipeline (train.export_every_checkpoint stays false, the default).
TINY = [
    "data.resolution=8",
    "model.params.hidden_size=32",
    "model.params.num_layers=3",
    "model.params.num_attention_heads=2",
    "train.batch_size=16",
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "train.report_to=none",
    "sampling.num_inference_steps=3",
    "sampling.images_per_class=1",
    "sampling.max_classes=2",
]
FACTS = ("**Optimizer steps:** 4", "**Images seen:** 64", "**Global batch size:** 16", "**Hardware:** 1× CPU")


def export_script():
    return importlib.import_module("diffusers_speedup.commands.export")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs") / "run"
    Trainer(load_config(REPO / "configs" / "quickstart.yaml", [f"train.output_dir={folder}", *TINY])).train()
    assert not list(folder.glob("checkpoint-*/**/model_index.json"))  # the case the README's command must handle
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    fake = FakeHub(upload_mode="lfs").install()  # datasets deletes its parquet files right after preupload
    yield fake
    fake.uninstall()


def assert_card_keeps_the_training_facts(folder: Path, step: int = 4):
    text = (folder / "README.md").read_text()
    facts = [fact.replace("steps:** 4", f"steps:** {step}").replace("64", str(16 * step)) for fact in FACTS]
    for fact in facts + ["**Training time:**", "**Data:** built-in digits (pixels, 1×8×8)"]:
        assert fact in text, fact
    assert "num_inference_steps=3" in text  # the run's sampling settings, not generic defaults
    assert json.loads((folder / "card_info.json").read_text())["training_steps"] == step


def test_export_run_folder_and_push_as_in_the_readme(run, hub, tmp_path):
    # diffusers-speedup export outputs/run --output_dir export --push_to_hub --hub_model_id user/name
    assert export_script().main([str(run), "--output_dir", str(tmp_path / "export"), "--push_to_hub",
                                 "--hub_model_id", "user/name"]) == 0  # fmt: skip
    assert_card_keeps_the_training_facts(tmp_path / "export")
    assert {"model_index.json", "README.md", "card_info.json"} <= set(hub.repos["user/name"])
    from diffusers_speedup import ClassConditionalPipeline

    images = ClassConditionalPipeline.from_pretrained(tmp_path / "export")([0], num_inference_steps=2).images
    assert len(images) == 1
    assert not list(tmp_path.glob(".export-*"))  # the staging folder is gone


def test_export_a_checkpoint_without_a_pipeline(run, tmp_path):
    assert export_script().main([str(run / "checkpoint-2"), "--output_dir", str(tmp_path / "export")]) == 0
    assert_card_keeps_the_training_facts(tmp_path / "export", step=2)
    # The exported weights are the checkpoint's EMA weights.
    import torch
    from safetensors.torch import load_file

    ema = torch.load(run / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=False)["ema"]
    exported = load_file(str(tmp_path / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
    shadow = ema["model"] if "model" in ema else ema
    name = next(iter(exported))
    candidates = [value for key, value in shadow.items() if key.endswith(name)] if isinstance(shadow, dict) else []
    assert candidates and torch.equal(candidates[0], exported[name])


def test_export_the_run_pipeline_folder_keeps_the_card(run, tmp_path):
    assert export_script().main([str(run / "pipeline"), "--output_dir", str(tmp_path / "export"), "--fid", "9.5"]) == 0
    assert_card_keeps_the_training_facts(tmp_path / "export")
    assert ModelCard.load(tmp_path / "export" / "README.md").data.eval_results[0].metric_value == 9.5


def test_push_a_dataset_folder_as_in_the_readme(hub, tmp_path):
    from datasets import Dataset

    # diffusers-speedup export --push_to_hub --dataset_folder data/imagenet256_latents --hub_dataset_id user/latents
    folder = tmp_path / "data" / "imagenet256_latents"
    Dataset.from_dict({"index": [0, 1], "label": [0, 1]}).save_to_disk(str(folder))
    (folder / "latents_metadata.json").write_text(json.dumps({"vae_id": "tiny"}))
    argv = ["--push_to_hub", "--dataset_folder", str(folder), "--hub_dataset_id", "user/latents"]
    assert export_script().main(argv) == 0
    assert "latents_metadata.json" in hub.repos["user/latents"]


@pytest.mark.parametrize("what", ["model", "dataset"])
def test_a_failed_foreground_push_is_one_line_without_the_token(what, run, hub, tmp_path, capsys):
    hub.fail_requests(100, r"/(commit|preupload)/", echo_headers=True)
    if what == "model":
        argv = [str(run / "pipeline"), "--output_dir", str(tmp_path / "export"), "--push_to_hub", "--hub_model_id"]
        argv += ["user/name"]
    else:
        from datasets import Dataset

        Dataset.from_dict({"index": [0, 1]}).save_to_disk(str(tmp_path / "latents"))
        argv = ["--push_to_hub", "--dataset_folder", str(tmp_path / "latents"), "--hub_dataset_id", "user/latents"]
    with pytest.raises(SystemExit) as caught:
        export_script().main(argv)
    message = str(caught.value)
    assert message.startswith("error: pushing ") and "simulated outage" in message and "\n" not in message
    assert any(TOKEN in str(headers) for headers in hub.seen_headers)  # the server did see, and echo, the token
    assert TOKEN not in message and TOKEN not in capsys.readouterr().err
    assert "authorization" in message.lower() and "***" in message


# ------------------------------------------------------------------------- one spelling: --private, --push_to_hub


def saved_dataset(folder: Path) -> Path:
    from datasets import Dataset

    Dataset.from_dict({"index": [0, 1]}).save_to_disk(str(folder))
    return folder


def test_repositories_are_public_unless_private_as_in_the_recipes(run, hub, tmp_path):
    folder = saved_dataset(tmp_path / "latents")
    push_dataset = ["--push_to_hub", "--dataset_folder", str(folder), "--hub_dataset_id"]
    assert export_script().main([*push_dataset, "user/public-latents"]) == 0
    assert export_script().main([*push_dataset, "user/private-latents", "--private"]) == 0
    push_model = [str(run / "pipeline"), "--output_dir", str(tmp_path / "export"), "--push_to_hub", "--hub_model_id"]
    assert export_script().main([*push_model, "user/private-model", "--private"]) == 0
    assert hub.private == {"user/public-latents": False, "user/private-latents": True, "user/private-model": True}


def test_nothing_is_pushed_without_push_to_hub(run, hub, tmp_path):
    argv = [str(run / "pipeline"), "--output_dir", str(tmp_path / "export"), "--hub_model_id", "user/name"]
    assert export_script().main(argv) == 0
    assert hub.repos == {} and (tmp_path / "export" / "model_index.json").is_file()


def test_the_old_dataset_push_without_push_to_hub_still_pushes_and_names_the_new_form(hub, tmp_path):
    folder = saved_dataset(tmp_path / "latents")
    with pytest.warns(FutureWarning, match="use --push_to_hub --dataset_folder .* --hub_dataset_id user/latents"):
        assert export_script().main(["--dataset_folder", str(folder), "--hub_dataset_id", "user/latents"]) == 0
    assert any(path.endswith(".parquet") for path in hub.repos["user/latents"])


@pytest.mark.parametrize(
    "argv, missing",
    [
        (["pipeline", "--output_dir", "export", "--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--push_to_hub", "--dataset_folder", "latents"], "--dataset_folder needs --hub_dataset_id"),
    ],
)
def test_a_push_without_its_repository_is_a_one_line_error_naming_the_option(argv, missing, capsys):
    with pytest.raises(SystemExit) as caught:
        export_script().parse_args(argv)
    assert caught.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("diffusers-speedup export: error: ") and missing in last_line


# ------------------------------------------------------------------------- the training config must be the network's


def config_of_another_run(run: Path, tmp_path: Path, **model) -> Path:
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"].update(model)
    path = tmp_path / "other" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("source", ["checkpoint-2", "pipeline"])
def test_a_config_of_another_architecture_is_refused_naming_the_key_and_both_values(source, run, tmp_path):
    other = config_of_another_run(run, tmp_path, params={**load_run_params(run), "patch_size": 2})
    with pytest.raises(SystemExit) as caught:
        export_script().main([str(run / source), "--output_dir", str(tmp_path / "export"), "--config", str(other)])
    message = str(caught.value)
    assert message.startswith(f"error: --config {other} does not describe the network in {run / source}: ")
    assert "model.params.patch_size = 2, but the network's transformer/config.json has patch_size = 4" in message
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export-*"))


def test_a_config_of_another_model_kind_is_refused(run, tmp_path):
    other = config_of_another_run(run, tmp_path, kind="dit", params={})
    with pytest.raises(
        SystemExit,
        match=r"model.kind 'dit' builds a DiTModel, but the network's transformer/config.json holds a UViTModel",
    ):
        export_script().main([str(run / "pipeline"), "--output_dir", str(tmp_path / "export"), "--config", str(other)])
    assert not (tmp_path / "export").exists()


def test_the_runs_own_config_given_as_config_is_exported_with_the_weights(run, tmp_path):
    argv = [str(run / "checkpoint-2"), "--output_dir", str(tmp_path / "export"), "--config", str(run / "config.yaml")]
    assert export_script().main(argv) == 0
    assert "patch_size: 4" in (tmp_path / "export" / "training_config.yaml").read_text()


def load_run_params(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["model"]["params"]


@pytest.mark.parametrize(
    "config, problem", [("folder", "is a directory, not a YAML file"), ("missing.yaml", "does not exist")]
)
def test_an_unreadable_config_is_one_line_naming_it(config, problem, run, tmp_path):
    (tmp_path / "folder").mkdir()
    argv = [str(run / "checkpoint-2"), "--output_dir", str(tmp_path / "export"), "--config", str(tmp_path / config)]
    with pytest.raises(SystemExit, match=f"^error: training config {tmp_path / config} {problem}$"):
        export_script().main(argv)
    assert not (tmp_path / "export").exists()
