"""Export of a pipeline to a Hub-ready folder and its model card (no network, no Hub)."""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler
from huggingface_hub import ModelCard
from PIL import Image

import diffusers_speedup
from diffusers_speedup.hub import ModelCardInfo, build_model_card, detect_techniques, export_pipeline
from diffusers_speedup.models.uvit import UViTModel
from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline
from diffusers_speedup.schedulers.scheduling_edm_heun import EDMHeunScheduler


def tiny_pipeline(scheduler=None, **model_config):
    model = UViTModel(
        sample_size=8,
        patch_size=2,
        in_channels=3,
        num_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        num_classes=4,
        **model_config,
    )
    return ClassConditionalPipeline(transformer=model, scheduler=scheduler or EDMHeunScheduler())


SAMPLE_KW = dict(class_labels=[0, 3], num_inference_steps=2, guidance_scale=1.0, output_type="pt")


def sample(pipe):
    return pipe(**SAMPLE_KW, generator=torch.Generator().manual_seed(0)).images


root_exports_classes = pytest.mark.xfail(
    not all(hasattr(diffusers_speedup, n) for n in ("UViTModel", "EDMHeunScheduler")),
    reason="ClassConditionalPipeline.from_pretrained needs diffusers_speedup to export UViTModel/EDMHeunScheduler",
    strict=True,
)

CONFIG = {
    "model": {"kind": "uvit", "params": {"skip_scaling": "constant"}},
    "objective": {"weighting": {"kind": "min_snr", "gamma": 5.0}, "sampler": {"kind": "speed"}},
    "sampling": {"guidance_interval": [0.28, 2.9]},
    "hub": {"hub_token": "hf_shouldNeverBeWritten", "repo_id": "me/model"},
}


def test_exported_folder_layout_and_model_index(tmp_path):
    pipe = tiny_pipeline()
    grid = Image.new("RGB", (16, 16), (200, 10, 10))
    out = export_pipeline(
        pipe, tmp_path / "export", training_config=CONFIG, sample_grid=grid, card_info={"model_name": "tiny-uvit"}
    )

    index = json.loads((out / "model_index.json").read_text())
    # Entries name the shipped files, so plain diffusers finds the code with trust_remote_code=True.
    assert index["_class_name"] == ["pipeline_class_conditional", "ClassConditionalPipeline"]
    assert index["transformer"] == ["uvit", "UViTModel"]
    assert index["scheduler"] == ["scheduling_edm_heun", "EDMHeunScheduler"]
    # The shipped files are the installed source files, unchanged.
    import diffusers_speedup.models.uvit as uvit_module
    import diffusers_speedup.pipelines.pipeline_class_conditional as pipeline_module
    import diffusers_speedup.schedulers.scheduling_edm_heun as scheduler_module

    for shipped, module in (
        (out / "transformer" / "uvit.py", uvit_module),
        (out / "scheduler" / "scheduling_edm_heun.py", scheduler_module),
        (out / "pipeline_class_conditional.py", pipeline_module),
    ):
        assert shipped.read_bytes() == open(module.__file__, "rb").read()
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert Image.open(out / "samples.png").size == (16, 16)
    saved_config = yaml.safe_load((out / "training_config.yaml").read_text())
    assert saved_config["objective"] == CONFIG["objective"]
    assert "hub_token" not in saved_config["hub"]
    assert not any("hf_shouldNeverBeWritten" in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    # Nothing but the export is left next to it (the staging folder was renamed into place).
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


# What a file copied into an exported folder may import: the standard library, torch, diffusers and what diffusers
# itself depends on, and optional xformers. Anything else breaks `DiffusionPipeline.from_pretrained(...,
# trust_remote_code=True)` for a user without this package.
SHIPPABLE_IMPORTS = {"torch", "diffusers", "numpy", "PIL", "xformers", "safetensors", "huggingface_hub"}
SHIPPED_FOLDERS = ("diffusers_speedup/models", "diffusers_speedup/schedulers", "pipelines")


def _imports(source):
    """Every module `source` imports, at any depth; relative imports as their leading dots plus the module."""
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), filename=str(source))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def test_shipped_source_files_import_only_what_plain_diffusers_has():
    root = Path(__file__).resolve().parent.parent
    shipped = [path for folder in SHIPPED_FOLDERS for path in sorted((root / folder).glob("*.py"))]
    shipped = [path for path in shipped if path.name != "__init__.py"]
    assert {"uvit.py", "edm2_unet.py", "scheduling_edm_heun.py", "pipeline_class_conditional.py"} <= {
        path.name for path in shipped
    }
    for path in shipped:
        bad = [
            name
            for name in _imports(path)
            if name.startswith(".")
            or (name.split(".")[0] not in SHIPPABLE_IMPORTS and name.split(".")[0] not in sys.stdlib_module_names)
        ]
        assert not bad, f"{path.relative_to(root)} imports {bad}"


def test_diffusers_classes_ship_no_code(tmp_path):
    out = export_pipeline(tiny_pipeline(DDIMScheduler(num_train_timesteps=50)), tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert sorted(p.name for p in (out / "scheduler").iterdir()) == ["scheduler_config.json"]


def test_export_replaces_atomically_and_refuses_without_overwrite(tmp_path):
    target = tmp_path / "export"
    export_pipeline(tiny_pipeline(), target)
    (target / "stale.txt").write_text("from an older export")
    export_pipeline(tiny_pipeline(), target)
    assert not (target / "stale.txt").exists()
    with pytest.raises(FileExistsError, match="overwrite=False"):
        export_pipeline(tiny_pipeline(), target, overwrite=False)

    class Broken(RuntimeError):
        pass

    pipe = tiny_pipeline()
    pipe.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(Broken("disk full"))
    with pytest.raises(Broken):
        export_pipeline(pipe, target)
    assert (target / "model_index.json").is_file()  # the previous export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_export_refuses_weights_that_are_not_finite_naming_the_tensor(bad, tmp_path):
    target = tmp_path / "export"
    export_pipeline(tiny_pipeline(), target)
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.transformer.proj_out.weight[0, 1] = bad
    with pytest.raises(
        ValueError, match=r"Refusing to export .*export: transformer weight 'proj_out.weight' is not fin"
    ):
        export_pipeline(pipe, target)
    reloaded = ClassConditionalPipeline.from_pretrained(target)  # the previous export is intact
    assert all(torch.isfinite(value).all() for value in reloaded.transformer.state_dict().values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@root_exports_classes
def test_export_loads_with_installed_classes(tmp_path):
    pipe = tiny_pipeline()
    out = export_pipeline(pipe, tmp_path / "export")
    loaded = ClassConditionalPipeline.from_pretrained(out)
    # The installed classes, not copies from the folder's code.
    assert type(loaded.transformer) is UViTModel and type(loaded.scheduler) is EDMHeunScheduler
    torch.testing.assert_close(sample(loaded), sample(pipe))


def test_model_card_metadata_parses_and_carries_fid(tmp_path):
    info = ModelCardInfo(
        model_name="uvit-tiny",
        repo_id="me/uvit-tiny",
        datasets=["ILSVRC/imagenet-1k"],
        dataset_name="ImageNet 256x256",
        fid=7.25,
        fid_num_samples=50_000,
        training_steps=1000,
        images_seen=256_000,
        batch_size=256,
        hardware="1x H100",
        training_time="2h",
    )
    out = export_pipeline(tiny_pipeline(), tmp_path / "export", training_config=CONFIG, card_info=info)
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "diffusers"
    assert data.pipeline_tag == "unconditional-image-generation"
    assert data.license == "apache-2.0"
    assert data.datasets == ["ILSVRC/imagenet-1k"]
    for tag in ("diffusers", "min-snr", "speed", "scalelong", "limited-interval-guidance", "u-vit"):
        assert tag in data.tags
    assert "edm2" not in data.tags
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value, result.metric_name) == ("fid", 7.25, "FID-50K")
    raw = yaml.safe_load(card.content.split("---")[1])
    assert raw["model-index"][0]["results"][0]["metrics"][0]["value"] == 7.25
    text = card.text
    for needle in ("2303.09556", "2405.17403", "2310.13545", "2404.07724", "2209.12152"):
        assert needle in text
    assert "256,000" in text and "1x H100" in text
    assert 'ClassConditionalPipeline.from_pretrained("me/uvit-tiny")' in text
    assert 'DiffusionPipeline.from_pretrained("me/uvit-tiny", trust_remote_code=True)' in text
    assert "guidance_interval=" in text


def test_model_card_without_fid_has_no_model_index():
    card = build_model_card({"model_name": "x"}, component_classes={"transformer": "UViTModel"})
    assert "model-index" not in card.content
    assert card.data.eval_results is None


def test_detect_techniques_from_config_and_classes():
    assert detect_techniques({"objective": {"weighting": {"kind": "soft_min_snr", "gamma": 2.0}}}) == ["min-snr"]
    assert (
        detect_techniques({"model": {"params": {"skip_scaling": "none"}}, "sampling": {"guidance_interval": None}})
        == []
    )
    assert detect_techniques({}, ["EDM2UNetModel"]) == ["edm2"]
    assert detect_techniques({"objective": {"sampler": {"kind": "speed", "k": 5.0}}}) == ["speed"]


# The tags of every shipped recipe, with the classes its export holds.
RECIPE_TAGS = {
    "quickstart.yaml": ["scalelong", "min-snr", "u-vit"],
    "cifar10/edm2_c.yaml": ["edm2"],
    "cifar10/uvit_s2.yaml": ["u-vit"],
    "cifar10/uvit_s2_scalelong_learned_per_skip.yaml": ["scalelong", "u-vit"],
    "imagenet256/dit_b2_baseline.yaml": [],
    "imagenet256/dit_xl2_speed.yaml": ["speed"],
    "imagenet256/sit_xl2.yaml": [],
    "imagenet256/lightningdit/lightningdit_xl1_vavae.yaml": [],
    "imagenet256/vit_b_minsnr_v.yaml": ["min-snr", "u-vit"],
    "imagenet512/edm2_xs.yaml": ["edm2"],
}


@pytest.mark.parametrize("recipe", sorted(RECIPE_TAGS))
def test_detect_techniques_reads_the_typed_recipes(recipe):
    from diffusers_speedup.training.config import config_to_dict
    from diffusers_speedup.training.recipes import load_config, recipes_dir

    config = load_config(recipes_dir() / recipe)
    classes = {"uvit": "UViTModel", "edm2_unet": "EDM2UNetModel", "dit": "DiTModel"}[config.model.kind]
    assert detect_techniques(config_to_dict(config), [classes, "EDMHeunScheduler"]) == RECIPE_TAGS[recipe]


def test_bad_card_info_is_named():
    with pytest.raises(ValueError, match="unknown keys.*'fdi'"):
        ModelCardInfo.from_value({"fdi": 3.0})
    with pytest.raises(ValueError, match="techniques.*'dreambooth'"):
        build_model_card({"techniques": ["dreambooth"]})


def load_export_script():
    from diffusers_speedup.commands import export

    return export


def make_run_folder(tmp_path):
    """A run folder as the trainer leaves it: `latest` -> checkpoint with an EMA pipeline, state and config."""
    checkpoint = tmp_path / "run" / "checkpoint-10"
    tiny_pipeline(**CONFIG["model"]["params"]).save_pretrained(checkpoint / "pipeline_ema")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 10}))
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    Image.new("RGB", (8, 8)).save(checkpoint / "samples.png")
    (tmp_path / "run" / "latest").write_text("checkpoint-10\n")
    return tmp_path / "run"


def test_export_script_from_run_folder(tmp_path):
    script = load_export_script()
    run = make_run_folder(tmp_path)
    out = tmp_path / "hub-ready"
    (tmp_path / "samples.npz.fid.json").write_text(json.dumps({"fid": 3.5, "num_samples": 10_000, "reference": "ref"}))
    args = [str(run), "--output_dir", str(out), "--fid_json", str(tmp_path / "samples.npz.fid.json")]
    assert script.main([*args, "--batch_size", "4", "--model_name", "tiny"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results[0].metric_value == 3.5 and card.data.eval_results[0].metric_name == "FID-10K"
    assert "**Images seen:** 40" in card.text and "min-snr" in card.data.tags
    assert (out / "samples.png").is_file() and (out / "transformer" / "uvit.py").is_file()
    with pytest.raises(SystemExit):
        script.parse_args([str(run), "--output_dir", str(out), "--push_to_hub"])  # no --hub_model_id
    from diffusers_speedup.hub.export import find_export_source

    with pytest.raises(FileNotFoundError, match="is not a pipeline folder"):
        find_export_source(tmp_path / "hub-ready" / "transformer")


HUB_RECIPE = {
    "model": {"kind": "uvit", "pretrained": "me/uvit-base"},
    "data": {"kind": "hf_dataset", "path": "ILSVRC/imagenet-1k"},
    "objective": {"weighting": {"kind": "min_snr", "gamma": 5.0}},
    "sampling": {"num_inference_steps": 3, "guidance_scale": 1.5, "guidance_interval": [0.3, 2.0]},
}


def test_card_metadata_passes_huggingface_hubs_own_parsing(tmp_path):
    from huggingface_hub import ModelCardData, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    grid = Image.new("RGB", (16, 16), (200, 10, 10))
    info = ModelCardInfo(model_name="uvit-tiny", fid=7.25, fid_num_samples=50_000, dataset_name="ImageNet 256")
    out = export_pipeline(
        tiny_pipeline(), tmp_path / "export", training_config=HUB_RECIPE, sample_grid=grid, card_info=info
    )

    metadata = metadata_load(out / "README.md")
    assert metadata["datasets"] == ["ILSVRC/imagenet-1k"]  # from the recipe's Hub dataset
    assert metadata["base_model"] == "me/uvit-base" and metadata["base_model_relation"] == "finetune"
    name, (result,) = model_index_to_eval_results(metadata["model-index"])
    assert name == "uvit-tiny"
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("fid", 7.25, "ILSVRC/imagenet-1k")
    data = ModelCardData(**metadata)  # validates eval results, as the Hub's card loader does
    assert data.eval_results[0].metric_name == "FID-50K"
    assert ModelCard.load(out / "README.md").data.to_dict()["base_model"] == "me/uvit-base"

    # The widget and the card show the grid enlarged by a whole factor, pixel for pixel.
    (widget,) = metadata["widget"]
    shown = Image.open(out / widget["output"]["url"])
    assert shown.size == (768, 768)
    assert shown.getpixel((0, 0)) == (200, 10, 10) and Image.open(out / "samples.png").size == (16, 16)
    text = ModelCard.load(out / "README.md").text
    assert f"]({widget['output']['url']})" in text
    # Sampling settings are the recipe's own, not another model's.
    assert "guidance_interval=(0.3, 2.0)" in text and "guidance_scale=1.5" in text and "num_inference_steps=3" in text
    assert "0.28" not in text and "2.9" not in text


def test_card_never_names_a_local_path_as_a_dataset_or_base_model(tmp_path):
    local = tmp_path / "my/data"
    local.mkdir(parents=True)
    recipe = {"model": {"pretrained": str(tmp_path)}, "data": {"kind": "hf_dataset", "path": str(local)}}
    card = build_model_card({"model_name": "x"}, training_config=recipe)
    assert card.data.datasets is None and card.data.base_model is None
    with pytest.raises(ValueError, match="card_info.datasets: '/data/imagenet' is not a Hub repository id"):
        build_model_card({"datasets": ["/data/imagenet"]})


def test_usage_snippets_in_the_card_run_against_the_exported_folder(tmp_path, monkeypatch):
    import re

    recipe = {"sampling": {"num_inference_steps": 2, "guidance_scale": 1.5, "guidance_interval": [0.5, 5.0]}}
    out = export_pipeline(tiny_pipeline(), tmp_path / "export", training_config=recipe)
    text = ModelCard.load(out / "README.md").text
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2 and "ClassConditionalPipeline.from_pretrained" in blocks[0]
    assert "trust_remote_code=True" in blocks[1]
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        namespace = {}
        exec(code.replace("path/to/this/folder", str(out)), namespace)  # noqa: S102 - the card's own code
        assert len(namespace["images"]) == 4  # class_labels=[0, 1, 2, 3]: the tiny model's four classes
    assert (tmp_path / "sample.png").is_file()
    assert type(namespace["pipe"]).__module__ != ClassConditionalPipeline.__module__  # the shipped file's class


@pytest.mark.slow
def test_each_exported_network_loads_through_automodel_without_the_package(tmp_path):
    """diffusers' documented route for custom models: `auto_map` in config.json names the shipped code file."""
    import subprocess
    import textwrap

    from tiny_models import perturb, tiny_dit, tiny_edm2, tiny_uvit

    networks = {
        "uvit": ("transformer", perturb(tiny_uvit()), EDMHeunScheduler()),
        "dit": ("transformer", perturb(tiny_dit()), DDIMScheduler()),
        "edm2": ("unet", perturb(tiny_edm2()), EDMHeunScheduler(prediction_type="sample")),
    }
    expected = {}
    for kind, (slot, network, scheduler) in networks.items():
        out = export_pipeline(ClassConditionalPipeline(**{slot: network}, scheduler=scheduler), tmp_path / kind)
        config = json.loads((out / slot / "config.json").read_text())
        stem = Path(sys.modules[type(network).__module__].__file__).stem
        assert config["auto_map"] == {"AutoModel": f"{stem}.{type(network).__name__}"}
        generator = torch.Generator().manual_seed(0)
        size = network.config.sample_size
        x = torch.randn(2, network.config.in_channels, size, size, generator=generator)
        with torch.no_grad():
            expected[kind] = network.eval()(x, torch.tensor([0.5, 2.0]), torch.tensor([1, 3])).sample
        torch.save(x, tmp_path / f"{kind}_input.pt")

    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["diffusers_speedup"] = None  # the package is not importable here
        from diffusers import AutoModel
        for kind, slot in {[(kind, slot) for kind, (slot, _, _) in networks.items()]!r}:
            model = AutoModel.from_pretrained({str(tmp_path)!r} + f"/{{kind}}/{{slot}}", trust_remote_code=True)
            assert type(model).__module__.startswith("diffusers_modules"), type(model).__module__
            x = torch.load({str(tmp_path)!r} + f"/{{kind}}_input.pt")
            with torch.no_grad():
                out = model.eval()(x, torch.tensor([0.5, 2.0]), torch.tensor([1, 3])).sample
            torch.save(out, {str(tmp_path)!r} + f"/{{kind}}_output.pt")
    """)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    for kind, value in expected.items():
        torch.testing.assert_close(torch.load(tmp_path / f"{kind}_output.pt"), value, rtol=0, atol=0)


def test_hub_imports_nothing_from_training():
    """training imports hub (to export, record and push); hub importing training back would close a cycle."""
    hub = Path(diffusers_speedup.__file__).parent / "hub"
    found = []
    for path in sorted(hub.glob("*.py")):
        package = ["diffusers_speedup", "hub"]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):  # imports inside functions too
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
                module = ".".join(part for part in (base, node.module) if part)
                modules = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {m}" for m in modules if m.startswith("diffusers_speedup.training")]
    assert not found


def test_an_exported_network_loads_without_a_warning_about_its_auto_map(tmp_path):
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    config_logger = logging.getLogger("diffusers.configuration_utils")
    config_logger.addHandler(handler)
    try:
        out = export_pipeline(tiny_pipeline(), tmp_path / "export")
        loaded = UViTModel.from_pretrained(out / "transformer")
    finally:
        config_logger.removeHandler(handler)
    assert json.loads((out / "transformer" / "config.json").read_text())["auto_map"]
    assert not [message for message in messages if "auto_map" in message], messages
    assert "auto_map" not in loaded.config


def test_a_training_config_is_compared_with_the_network_as_the_trainer_builds_it(tmp_path):
    from diffusers_speedup.hub.training_config import check_training_config

    (tmp_path / "unet").mkdir()
    network = {"_class_name": "EDM2UNetModel", "model_channels": 128, "sample_size": 16, "num_classes": 3}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(network))
    # The trainer takes the sample size and classes from the data over the preset's; the rest of the preset holds.
    check_training_config({"model": {"kind": "edm2_unet", "preset": "edm2-cifar10"}}, tmp_path, "run.yaml")
    with pytest.raises(
        ValueError,
        match=r"run.yaml does not describe the network in .*: model.preset 'edm2-xl' sets model_channels = 384, but "
        r"the network's unet/config.json has model_channels = 128",
    ):
        check_training_config({"model": {"kind": "edm2_unet", "preset": "edm2-xl"}}, tmp_path, "run.yaml")
    with pytest.raises(ValueError, match=r"model.kind 'uvit' is a UViTModel in the pipeline's 'transformer' slot"):
        check_training_config({"model": {"kind": "uvit"}}, tmp_path, "run.yaml")
    # A network started from model.pretrained brings its own architecture; only the kind is compared.
    check_training_config(
        {"model": {"kind": "edm2_unet", "pretrained": "x", "params": {"model_channels": 8}}}, tmp_path, "run.yaml"
    )
