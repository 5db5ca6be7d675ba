"""Model cards for exported pipelines: Hub metadata (YAML) plus a README a newcomer can act on."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..models import MODEL_KINDS

# One entry per technique the card can name: Hub tag, display name, citation, and the paper's arXiv id.
TECHNIQUES: dict[str, dict[str, str]] = {
    "min-snr": {
        "name": "Min-SNR-γ loss weighting",
        "citation": "Hang et al., *Efficient Diffusion Training via Min-SNR Weighting Strategy*, ICCV 2023",
        "arxiv": "2303.09556",
    },
    "speed": {
        "name": "SpeeD timestep sampling",
        "citation": "Wang et al., *A Closer Look at Time Steps is Worthy of Triple Speed-Up for Diffusion Model Training*",
        "arxiv": "2405.17403",
    },
    "edm2": {
        "name": "EDM2 magnitude-preserving network and learned loss weighting",
        "citation": "Karras et al., *Analyzing and Improving the Training Dynamics of Diffusion Models*, CVPR 2024",
        "arxiv": "2312.02696",
    },
    "scalelong": {
        "name": "ScaleLong long-skip-connection scaling",
        "citation": "Huang et al., *ScaleLong: Towards More Stable Training of Diffusion Model via Scaling Network "
        "Long Skip Connection*, NeurIPS 2023",
        "arxiv": "2310.13545",
    },
    "limited-interval-guidance": {
        "name": "Classifier-free guidance in a limited interval",
        "citation": "Kynkäänniemi et al., *Applying Guidance in a Limited Interval Improves Sample and Distribution "
        "Quality in Diffusion Models*, NeurIPS 2024",
        "arxiv": "2404.07724",
    },
    "repa": {
        "name": "Representation alignment (REPA)",
        "citation": "Yu et al., *Representation Alignment for Generation: Training Diffusion Transformers Is Easier "
        "Than You Think*, ICLR 2025",
        "arxiv": "2410.06940",
    },
    "u-vit": {
        "name": "U-ViT backbone",
        "citation": "Bao et al., *All are Worth Words: A ViT Backbone for Diffusion Models*, CVPR 2023",
        "arxiv": "2209.12152",
    },
}

# The Hub has no pipeline tag for class-conditional generation; this is the closest one it lists.
PIPELINE_TAG = "unconditional-image-generation"
BASE_TAGS = ["diffusers", "diffusers-speedup", "class-conditional-image-generation", "class-conditional"]


@dataclasses.dataclass
class ModelCardInfo:
    """What the model card says beyond what the training config and the pipeline already tell.

    Args:
        model_name: short name shown as the card's title and in `model-index` (e.g. "uvit-s2-imagenet256").
        repo_id: Hub repository the folder is meant for; used in the copy-paste loading code (a local path is
            shown instead when None).
        description: one paragraph on what the model is; a generic sentence is written when None.
        license: SPDX-like license id for the weights (the Hub's `license` field).
        datasets: Hub dataset ids trained on (e.g. ["ILSVRC/imagenet-1k"]); never local paths. When empty, the
            training config's ``data.path`` is used if it names a Hub dataset (``data.kind: hf_dataset``).
        base_model: Hub id of the model the run started from; when None, the training config's
            ``model.pretrained`` if it names a Hub repository.
        dataset_name: human name of the training data and resolution (e.g. "ImageNet 256×256").
        fid: FID of samples from this model, when an evaluation has run; goes into `model-index`.
        fid_num_samples: number of generated images the FID used (names the metric "FID-50K" and so on).
        fid_split: dataset split the reference statistics came from.
        fid_settings: free text on how the samples for the FID were drawn (steps, guidance, ...).
        training_steps, images_seen, batch_size, hardware, training_time: how it was trained, as reported.
        techniques: Hub tags of techniques used (keys of `TECHNIQUES`); derived from the training config if None.
        extra_tags: more Hub tags.
        num_inference_steps, guidance_scale, guidance_interval: sampling settings shown in the example code; when
            None, the training config's ``sampling`` section (the model's own recipe), else the pipeline defaults.
        guidance_channels: shown in the example code when set (a released model whose guidance covered only its
            first channels, as DiT's and LightningDiT's ``forward_with_cfg``).
        class_labels: class ids used in the example code.
        widget_file: file name, inside the folder, of the image the Hub shows in the model's widget and gallery
            (the sample grid upscaled to a readable size); the card's sample image too.
    """

    model_name: str = "diffusers-speedup-model"
    repo_id: str | None = None
    description: str | None = None
    license: str = "apache-2.0"
    datasets: list[str] = dataclasses.field(default_factory=list)
    base_model: str | None = None
    dataset_name: str | None = None
    fid: float | None = None
    fid_num_samples: int | None = None
    fid_split: str = "train"
    fid_settings: str | None = None
    training_steps: int | None = None
    images_seen: int | None = None
    batch_size: int | None = None
    hardware: str | None = None
    training_time: str | None = None
    techniques: list[str] | None = None
    extra_tags: list[str] = dataclasses.field(default_factory=list)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    guidance_channels: int | None = None
    class_labels: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3])
    widget_file: str | None = None

    @classmethod
    def from_value(cls, value: ModelCardInfo | Mapping[str, Any] | None) -> ModelCardInfo:
        """Accepts a ModelCardInfo, a dict of its fields (unknown keys are an error), or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"card_info must be a ModelCardInfo or a dict, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"card_info has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(value))


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str) and value.lower() in ("", "none", "off", "false"))


def detect_techniques(training_config: Mapping[str, Any] | None, pipeline_class_names: list[str] = ()) -> list[str]:
    """Techniques (keys of `TECHNIQUES`) a training config and the pipeline's component classes show.

    `training_config` is the trainer's resolved config as a dict (sections ``model``, ``objective``,
    ``sampling``, ...; see `diffusers_speedup.training.config.Config`); missing sections count as defaults. The
    tags come in the config's order (model parameters, objective, sampling), then the model family's tag.
    """
    model = _recipe_section(training_config, "model")
    objective = _recipe_section(training_config, "objective")
    sampling = _recipe_section(training_config, "sampling")
    repa = _recipe_section(training_config, "repa")
    params = model.get("params") if isinstance(model.get("params"), Mapping) else {}

    def kind(section: Mapping[str, Any], key: str) -> str | None:
        value = section.get(key)
        return value.get("kind") if isinstance(value, Mapping) else None

    used = [
        ("scalelong", not _is_off(params.get("skip_scaling"))),
        ("speed", kind(objective, "sampler") == "speed"),
        ("min-snr", kind(objective, "weighting") in ("min_snr", "soft_min_snr")),
        ("limited-interval-guidance", not _is_off(sampling.get("guidance_interval"))),
        ("repa", repa.get("enabled") is True),
    ]
    # The model family's own tag (the registry's), from the recipe's model.kind or the exported classes.
    used += [
        (entry.card_tag, entry.card_tag is not None)
        for entry in MODEL_KINDS.values()
        if entry.name == model.get("kind") or entry.model_class.__name__ in pipeline_class_names
    ]
    return list(dict.fromkeys(tag for tag, present in used if present))


def hub_repo_id(name: Any) -> str | None:
    """`name` when it can only be a Hub repository id (``namespace/name``, not an existing local path), else None.

    Used for fields the Hub links (``datasets``, ``base_model``): a local path there would be wrong and leak a
    machine's file layout.
    """
    if not isinstance(name, str) or name.count("/") != 1 or name.startswith((".", "~")) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _recipe_section(training_config: Mapping[str, Any] | None, section: str) -> Mapping[str, Any]:
    value = (training_config or {}).get(section)
    return value if isinstance(value, Mapping) else {}


def _recipe_datasets(training_config: Mapping[str, Any] | None) -> list[str]:
    data = _recipe_section(training_config, "data")
    repo_id = hub_repo_id(data.get("path")) if data.get("kind") == "hf_dataset" else None
    return [repo_id] if repo_id else []


def _check_repo_ids(key: str, values: list[str]) -> None:
    for value in values:
        if hub_repo_id(value) != value:
            raise ValueError(
                f"card_info.{key}: {value!r} is not a Hub repository id ('namespace/name'); local paths do not "
                "belong in a model card."
            )


def _sampling_kwargs(info: ModelCardInfo, training_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings the model's own recipe samples with (`info` first), for the copy-paste code."""
    sampling = _recipe_section(training_config, "sampling")
    steps = info.num_inference_steps if info.num_inference_steps is not None else sampling.get("num_inference_steps")
    scale = info.guidance_scale if info.guidance_scale is not None else sampling.get("guidance_scale")
    interval = info.guidance_interval if info.guidance_interval is not None else sampling.get("guidance_interval")
    kwargs: dict[str, Any] = {}
    if steps is not None:
        kwargs["num_inference_steps"] = int(steps)
    if scale is not None:
        kwargs["guidance_scale"] = float(scale)
    if interval is not None and (scale is None or float(scale) != 1.0):
        lo, hi = (float(v) for v in interval)
        kwargs["guidance_interval"] = (lo, hi)
    if info.guidance_channels is not None and "guidance_scale" in kwargs:
        kwargs["guidance_channels"] = int(info.guidance_channels)
    return kwargs


def _call(info: ModelCardInfo, kwargs: Mapping[str, Any], indent: str) -> str:
    labels = ", ".join(str(c) for c in info.class_labels)
    arguments = [f"class_labels=[{labels}]"] + [f"{key}={value!r}" for key, value in kwargs.items()]
    return f"pipe(\n{indent}" + f",\n{indent}".join([*arguments, "generator=torch.Generator().manual_seed(0)"]) + ",\n)"


def _loading_code(
    location: str, info: ModelCardInfo, training_config: Mapping[str, Any] | None, flow_time: bool = False
) -> str:
    kwargs = _sampling_kwargs(info, training_config)
    settings = ", ".join(f"`{key}={value!r}`" for key, value in kwargs.items()) or "the pipeline's defaults"
    if "guidance_interval" in kwargs:
        lo, hi = kwargs["guidance_interval"]
        level = "the flow time t (1 is noise)" if flow_time else "the noise level σ"
        guidance = (
            f"Guidance runs only while {level} is between {lo:g} and {hi:g} (limited-interval guidance, "
            "Kynkäänniemi et al., 2024): outside it the unconditional pass is skipped, which the paper found both "
            "faster and better than guiding at every step."
        )
    else:
        bounds = "(t_lo, t_hi)` in flow time" if flow_time else "(sigma_lo, sigma_hi)`"
        guidance = (
            f"`guidance_interval={bounds} limits classifier-free guidance to noise levels in that interval "
            "(Kynkäänniemi et al., 2024); this model's recipe does not use it, so tune it for this model before "
            "relying on it."
        )
    return f"""The settings below are the ones this model's own training recipe samples with: {settings}.
{guidance}

With this package installed (`pip install diffusers-speedup`), the installed classes are used and no code from
the repository runs:

```python
import torch
from diffusers_speedup import ClassConditionalPipeline

pipe = ClassConditionalPipeline.from_pretrained("{location}")
images = {_call(info, kwargs, "    ")}.images
images[0].save("sample.png")
```

With plain 🤗 diffusers only, the single-file code shipped in this repository is used (read it first: it runs on
your machine):

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{location}", trust_remote_code=True)
images = {_call(info, kwargs, "    ")}.images
```
"""


def _fid_result(info: ModelCardInfo, datasets: list[str]) -> EvalResult:
    """The card's `model-index` entry for `info.fid`."""
    return EvalResult(
        task_type="image-generation",
        task_name="Class-conditional image generation",
        dataset_type=datasets[0] if datasets else "custom",
        dataset_name=info.dataset_name or (datasets[0] if datasets else "training data"),
        dataset_split=info.fid_split,
        metric_type="fid",
        metric_name=f"FID-{info.fid_num_samples // 1000}K" if info.fid_num_samples else "FID",
        metric_value=float(info.fid),
    )


def _technique_details(training_config: Mapping[str, Any] | None) -> dict[str, str]:
    """How the recipe used a technique, where the card should say it (REPA: the encoder, the block and λ)."""
    repa = _recipe_section(training_config, "repa")
    if repa.get("enabled") is not True:
        return {}
    encoder = repa.get("encoder")
    # A Hub id is named; a local folder is not (it would leak a machine's file layout).
    named = f"`{encoder}`" if hub_repo_id(encoder) else "a local DINOv2 folder"
    details = f"encoder {named}, aligned at the output of block {repa.get('depth')}, λ = {repa.get('weight')}"
    if repa.get("projector") == "conv":
        details += f", iREPA's conv projector (kernel {repa.get('conv_kernel_size')})"
    if repa.get("zscore_alpha") is not None:
        details += f", iREPA's spatial z-score (α = {repa.get('zscore_alpha')})"
    if repa.get("stop_after_step") is not None:
        details += f", switched off after step {repa.get('stop_after_step')} (HASTE)"
    return {"repa": details}


def _training_lines(
    info: ModelCardInfo,
    datasets: list[str],
    base_model: str | None,
    has_config: bool,
    techniques: list[str],
    details: Mapping[str, str] | None = None,
) -> list[str]:
    """The card's "How it was trained" section: data, starting point, the reported facts, and the techniques."""
    recipe = []
    if info.dataset_name or datasets:
        recipe.append(f"- **Data:** {info.dataset_name or ', '.join(datasets)}")
    if base_model:
        recipe.append(f"- **Started from:** [{base_model}](https://huggingface.co/{base_model})")
    for label, value in (
        ("Optimizer steps", info.training_steps),
        ("Images seen", info.images_seen),
        ("Global batch size", info.batch_size),
        ("Hardware", info.hardware),
        ("Training time", info.training_time),
    ):
        if value is not None:
            recipe.append(f"- **{label}:** {value:,}" if isinstance(value, int) else f"- **{label}:** {value}")
    if has_config:
        recipe.append("- **Full recipe:** [`training_config.yaml`](training_config.yaml) (the resolved config)")
    lines = ["## How it was trained", "", *(recipe or ["Not recorded."]), ""]
    if techniques:
        lines += ["### Techniques", ""]
        for tag in techniques:
            t = TECHNIQUES[tag]
            used = f"; {details[tag]}" if details and tag in details else ""
            lines.append(
                f"- **{t['name']}**: {t['citation']} ([arXiv:{t['arxiv']}](https://arxiv.org/abs/{t['arxiv']})){used}"
            )
        lines += [""]
    return lines


def build_model_card(
    info: ModelCardInfo | Mapping[str, Any] | None = None,
    *,
    training_config: Mapping[str, Any] | None = None,
    component_classes: Mapping[str, str] | None = None,
    sample_grid_file: str | None = None,
    location: str | None = None,
) -> ModelCard:
    """Builds the README.md model card of an exported pipeline.

    Args:
        info: what to say about the model (`ModelCardInfo` or a dict of its fields).
        training_config: the resolved training config; techniques and the training recipe are read from it.
        component_classes: component name -> class name (from model_index.json), e.g. {"transformer": "UViTModel"}.
        sample_grid_file: file name of the sample grid inside the folder, shown in the card when given.
        location: repo id or path shown in the loading code; `info.repo_id` or "path/to/this/folder" when None.
    """
    info = ModelCardInfo.from_value(info)
    component_classes = dict(component_classes or {})
    techniques = (
        list(info.techniques)
        if info.techniques is not None
        else detect_techniques(training_config, list(component_classes.values()))
    )
    unknown = [t for t in techniques if t not in TECHNIQUES]
    if unknown:
        raise ValueError(f"card_info.techniques has unknown entries {unknown}; known: {sorted(TECHNIQUES)}")
    datasets = list(info.datasets) or _recipe_datasets(training_config)
    _check_repo_ids("datasets", datasets)
    base_model = info.base_model or hub_repo_id(_recipe_section(training_config, "model").get("pretrained"))
    if base_model is not None:
        _check_repo_ids("base_model", [base_model])

    eval_results = [_fid_result(info, datasets)] if info.fid is not None else None
    tags = list(dict.fromkeys(BASE_TAGS + techniques + list(info.extra_tags)))
    shown_image = info.widget_file or sample_grid_file
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        license=info.license,
        tags=tags,
        datasets=datasets or None,
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        model_name=info.model_name,
        eval_results=eval_results,
        # The Hub shows widget outputs on the model page and in its gallery.
        widget=[{"text": "Samples, one column per class", "output": {"url": shown_image}}] if shown_image else None,
    )

    location = location or info.repo_id or "path/to/this/folder"
    backbone = component_classes.get("transformer") or component_classes.get("unet") or "diffusion model"
    space = "the latent space of a Stable Diffusion VAE (`vae/`)" if "vae" in component_classes else "pixel space"
    description = info.description or (
        f"A class-conditional image generation model ({backbone}) trained in {space}"
        + (f" on {info.dataset_name}" if info.dataset_name else "")
        + " with diffusers-speedup, a set of training speed-ups for 🤗 diffusers."
    )

    lines = [f"# {info.model_name}", "", description, ""]
    if shown_image:
        lines += [f"![Samples, one column per class]({shown_image})", ""]

    lines += ["## Components", ""]
    lines += [f"- `{name}`: `{cls}`" for name, cls in component_classes.items()]
    lines += [""]

    details = _technique_details(training_config)
    lines += _training_lines(info, datasets, base_model, bool(training_config), techniques, details)

    if info.fid is not None:
        lines += ["## Evaluation", ""]
        lines.append(f"- **{eval_results[0].metric_name}:** {info.fid:.2f}")
        if info.fid_settings:
            lines.append(f"- **Sampling settings:** {info.fid_settings}")
        lines += [""]

    flow_time = "Flow" in component_classes.get("scheduler", "")  # FlowScheduler, FlowMatchEulerDiscreteScheduler
    lines += ["## Usage", "", _loading_code(location, info, training_config, flow_time)]

    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"
    return ModelCard(content)
