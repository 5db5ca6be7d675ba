# Copyright 2025 The diffusers-speedup authors. Licensed under the Apache License, Version 2.0.
"""Class-conditional image generation with classifier-free guidance, limited to a noise-level interval or by a guide
network, for discrete-time (DDPM), EDM and flow-matching models.

Self-contained on purpose: this file imports only the standard library, torch and diffusers (huggingface_hub, a
diffusers dependency, only to download a Hub repo), because it is copied unchanged into exported model folders and
loaded there with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.
"""

import functools
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence

import diffusers
import torch
from diffusers import (
    DiffusionPipeline,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Config keys under which the supported models store their number of classes.
_NUM_CLASSES_KEYS = ("num_classes", "num_embeds_ada_norm", "label_dim")
# Relative tolerance of the guidance-interval test: an end that equals a grid σ (computed in float64, or rounded to
# float32 by a scheduler's table) counts as equal, as in the official samplers, which select guided steps by index.
# Neighbouring σ of any practical grid differ by far more.
_SIGMA_RTOL = 1e-5
# Schedulers that have an `alphas_cumprod` table but still cannot sample a discrete-time model from noise, and why.
_UNSUPPORTED_SCHEDULERS = {
    "DDIMInverseScheduler": "it integrates from data to noise (inversion), not from noise to data",
    "DPMSolverMultistepInverseScheduler": "it integrates from data to noise (inversion), not from noise to data",
    "RePaintScheduler": "its step needs an original image and a mask (inpainting)",
    "CogVideoXDPMScheduler": "its step needs the previous step's prediction and timestep, which only CogVideoX passes",
    "UnCLIPScheduler": "its step needs unCLIP's prev_timestep and follows unCLIP's own schedule",
}
# Schedulers whose step splits a [mean, variance] output of 2×C channels and samples with the learned variance.
_LEARNED_VARIANCE_SCHEDULERS = ("DDPMScheduler", "DDPMParallelScheduler")


def _is_edm_heun(scheduler) -> bool:
    # Compared by name: the installed class and a copy loaded with trust_remote_code are different objects.
    return any(klass.__name__ == "EDMHeunScheduler" for klass in type(scheduler).__mro__)


def _is_edm(scheduler) -> bool:
    """Schedulers on EDM's σ grid, whose `timesteps` are c_noise = ln(σ)/4 rather than indices of a DDPM schedule."""
    return _is_edm_heun(scheduler) or isinstance(scheduler, (EDMEulerScheduler, EDMDPMSolverMultistepScheduler))


def _is_flow(scheduler) -> bool:
    """Schedulers that sample a velocity model in flow time t ∈ [0, 1] (t = 1 noise): this package's FlowScheduler
    and diffusers' FlowMatchEulerDiscreteScheduler (whose `timesteps` are t·num_train_timesteps and `sigmas` are t)."""
    is_flow_scheduler = any(klass.__name__ == "FlowScheduler" for klass in type(scheduler).__mro__)
    return is_flow_scheduler or isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def _above(sigma: float, bound: float) -> bool:
    """σ > bound, where values within the relative tolerance count as equal."""
    return sigma > bound and not math.isclose(sigma, bound, rel_tol=_SIGMA_RTOL)


def _flatten_labels(class_labels) -> list:
    """Class labels as a flat list: nested lists (`[[1], [1]]`, as batched by diffusers' tests), tensors, arrays."""
    if isinstance(class_labels, (str, int)):
        return [class_labels]
    if hasattr(class_labels, "tolist"):  # torch tensors, numpy arrays and numpy scalars
        class_labels = class_labels.tolist()
        if not isinstance(class_labels, list):
            return [class_labels]
    if isinstance(class_labels, (list, tuple)):
        return [label for item in class_labels for label in _flatten_labels(item)]
    return [class_labels]


def _model_config_value(model, *keys):
    config = model.config
    for key in keys:
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        if value is not None:
            return value
    return None


def _model_num_classes(model) -> int:
    """Number of classes in a model's config (0 for an unconditional model)."""
    for key in _NUM_CLASSES_KEYS:
        value = _model_config_value(model, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _model_sample_shape(model) -> tuple[int, int, int]:
    """(channels, height, width) a model denoises, from its config."""
    channels = _model_config_value(model, "in_channels", "img_channels")
    size = _model_config_value(model, "sample_size", "img_resolution")
    if channels is None or size is None:
        raise ValueError(f"{type(model).__name__}'s config needs in_channels and sample_size to size the samples.")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (channels, height, width)


def _networks_in_eval_mode(call):
    """
    Runs a pipeline call with every network in eval mode, and restores each submodule's own mode afterwards.

    Sampling must never change a model, and a network left in training mode does: EDM2's forced weight normalisation
    rewrites its weights in place on every training-mode forward (NVlabs/edm2 keeps it in the forward, so that the EMA
    averages the raw weights), and DiT's and U-ViT's label dropout swap requested classes for the null class. A
    pipeline built right after a training loop holds such networks.
    """

    @functools.wraps(call)
    def call_in_eval_mode(pipeline, *args, **kwargs):
        networks = [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]
        modes = [(module, module.training) for network in networks for module in network.modules()]
        for network in networks:
            network.eval()
        try:
            return call(pipeline, *args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training

    return call_in_eval_mode


class ClassConditionalPipeline(DiffusionPipeline):
    r"""
    Class-conditional generation (DiT, U-ViT, EDM2, flow-matching DiTs) with classifier-free guidance that can be
    limited to a noise-level interval and can use a separate guide network.

    Loads DiTPipeline-layout folders unchanged (`transformer/`, `vae/`, `scheduler/`, `model_index.json` with an
    optional `id2label`), as well as folders written by its own `save_pretrained` (with a `guide/` folder when a guide
    is set).

    Args:
        scheduler: with a `transformer`, any diffusers scheduler that samples a discrete-time (DDPM-trained) model:
            those with an `alphas_cumprod` table (DDPM, DDIM, PNDM, LMS, Euler, Euler ancestral, Heun, KDPM2, KDPM2
            ancestral, DEIS, UniPC, DPM-Solver multistep / singlestep / SDE, SA-Solver, LCM, TCD, ...), and the EDM
            schedulers (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`, `EDMHeunScheduler`) for models trained
            with EDM's preconditioning; for a flow-matching model (a velocity model called with t ∈ [0, 1], t = 1
            noise: SiT, REPA, LightningDiT), `FlowScheduler` (REPA's and SiT's Euler, Heun and Euler–Maruyama
            samplers) or diffusers' `FlowMatchEulerDiscreteScheduler` (the model gets its `sigmas` entry, which is t,
            not its `timesteps`, which are t·1000). Schedulers that cannot (inversion, inpainting, flow-matching
            variants of the discrete schedulers, ...) are refused with the reason before any network evaluation.
        transformer (*optional*): a class-conditional model called as
            `transformer(hidden_states, timestep, class_labels).sample` (DiT, UViTModel). When its output has twice
            the latent channels (learned σ, as DiT), the second half is the variance: `DDPMScheduler` with
            `variance_type="learned_range"` samples with it (DiT's own sampler), every other scheduler uses the first
            half alone.
        unet (*optional*): a σ-conditioned denoiser (its class says so with `input_is_sigma = True`), called as
            `unet(sample, sigma, class_labels).sample` and returning the denoised sample (EDM2UNetModel); needs
            `EDMHeunScheduler` or `EDMEulerScheduler` with `prediction_type="sample"`. Exactly one of `transformer`
            and `unet` is given.
        vae (`AutoencoderKL`, *optional*): decodes latents to images; without it the model works in pixel space and
            its samples in [-1, 1] are the images.
        guide (*optional*): a second network of the same kind as the main one (same calling convention, input shape
            and prediction type) that replaces the null-label evaluation in guidance: D = D_guide + w·(D − D_guide)
            (EDM2's `generate_images.py`). An unconditional guide (no classes in its config: EDM2's published guided
            FIDs use a small unconditional EDM2 network) is called without labels; a class-conditional one
            (autoguidance, Karras et al. 2024: a smaller or less trained version of the main model) gets the same
            labels as the main model. Combines with `guidance_interval`. Saved in `guide/` by `save_pretrained`;
            a guide from another folder is passed as `from_pretrained(folder, guide=EDM2UNetModel.from_pretrained(...))`.
        id2label (`dict`, *optional*): class id → comma-separated names (ImageNet style), for `get_label_ids` and
            for passing class names to `__call__`.
    """

    model_cpu_offload_seq = "transformer->unet->guide->vae"
    # Every component with a default must be listed, or save_pretrained silently skips it.
    _optional_components = ["transformer", "unet", "vae", "guide"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, scheduler, transformer=None, unet=None, vae=None, guide=None, id2label: dict | None = None):
        super().__init__()
        if (transformer is None) == (unet is None):
            raise ValueError(
                "ClassConditionalPipeline needs exactly one of `transformer` and `unet`, got "
                f"transformer={type(transformer).__name__}, unet={type(unet).__name__}."
            )
        self.register_modules(transformer=transformer, unet=unet, vae=vae, guide=guide, scheduler=scheduler)
        # Stored in model_index.json with string keys (JSON), like DiT's.
        id2label = None if id2label is None else {str(k): v for k, v in id2label.items()}
        self.register_to_config(id2label=id2label)

        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in value.split(","):
                self.labels[label.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._interrupt = False

    # ----------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """
        Loads a pipeline folder or Hub repo id.

        A Hub id is downloaded with `snapshot_download` first: diffusers' own download step rejects components
        whose library is not diffusers or transformers. Components that an exported folder declares as code files
        (`["scheduling_edm_heun", "EDMHeunScheduler"]`) are loaded with the installed classes of the package this
        class comes from, so no downloaded code runs (see `load_config`). Other keyword arguments are those of
        `DiffusionPipeline.from_pretrained`.
        """
        name_or_path = str(pretrained_model_name_or_path)
        if not os.path.isdir(name_or_path):
            from huggingface_hub import snapshot_download

            local_path = snapshot_download(
                name_or_path,
                revision=kwargs.pop("revision", None),
                cache_dir=kwargs.get("cache_dir"),
                local_files_only=kwargs.get("local_files_only", False),
                token=kwargs.get("token"),
            )
            pipeline = super().from_pretrained(local_path, **kwargs)
            pipeline.register_to_config(_name_or_path=name_or_path)
            return pipeline
        return super().from_pretrained(name_or_path, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """
        `ConfigMixin.load_config`, with entries that name shipped code files replaced by installed classes.

        An exported folder declares its custom pieces as files (`"_class_name": ["pipeline_class_conditional",
        "ClassConditionalPipeline"]`, `"scheduler": ["scheduling_edm_heun", "EDMHeunScheduler"]`) so that
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works without this package. When this
        class itself comes from an installed package that exports those class names, the entries are pointed at
        that package instead, so `ClassConditionalPipeline.from_pretrained(folder)` needs no remote code.
        """
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config, dict):
            cls._prefer_installed_classes(config)
        return loaded

    @classmethod
    def _prefer_installed_classes(cls, config: dict):
        package_name = cls.__module__.split(".")[0]
        package = sys.modules.get(package_name)
        if package is None or package_name in ("diffusers", "diffusers_modules", "__main__"):
            return  # loaded as remote code (or a script): the shipped files are the only source
        class_name = config.get("_class_name")
        if isinstance(class_name, (list, tuple)) and len(class_name) == 2 and class_name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        for key, value in config.items():
            if key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
                continue
            library, name = value
            if not isinstance(library, str) or not isinstance(name, str):
                continue
            shipped_code = (
                library not in LOADABLE_CLASSES
                and library not in sys.modules
                and not hasattr(diffusers.pipelines, library)
            )
            if shipped_code and isinstance(getattr(package, name, None), type):
                config[key] = [package_name, name]

    # ----------------------------------------------------------------------------------------------------------
    # Labels and checks

    @property
    def denoiser(self):
        """The network: `transformer` or `unet`, whichever is set."""
        return self.transformer if self.transformer is not None else self.unet

    @property
    def num_classes(self) -> int:
        """Number of classes of the model; the label `num_classes` is the null (unconditional) label."""
        num_classes = _model_num_classes(self.denoiser)
        if num_classes == 0:
            raise ValueError(
                f"{type(self.denoiser).__name__}'s config has none of {_NUM_CLASSES_KEYS} set to a positive integer, "
                "so the pipeline cannot tell how many classes it has."
            )
        return num_classes

    @property
    def guidance_scale(self) -> float:
        """The guidance weight w of the running (or last) call; a `callback_on_step_end` may change
        `pipe._guidance_scale`, and the next evaluation uses the new value."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether evaluations inside the guidance interval are guided: w ≠ 1 (w = 1 is the plain conditional model;
        unlike DiTPipeline's w > 1, a w below 1 moves towards the guide, e.g. w = 0 samples the guide alone)."""
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int:
        """Number of network-evaluation steps of the running (or last) call: `len(scheduler.timesteps)`."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a callback to skip the remaining steps (diffusers' convention)."""
        return self._interrupt

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """
        Maps class names (any comma-separated alias in `id2label`, e.g. "white shark") to class ids.

        Args:
            label (`str` or `list[str]`): one name or a list of names.
        """
        labels = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in labels if name not in self.labels]
        if unknown:
            known = ", ".join(list(self.labels)[:10]) + (", ..." if len(self.labels) > 10 else "")
            raise ValueError(
                f"Unknown class label(s) {unknown}; this pipeline knows {len(self.labels)} label names "
                f"(see `pipe.labels`): {known or 'none, since id2label is not set'}."
            )
        return [self.labels[name] for name in labels]

    def _label_ids_per_image(self, class_labels, num_images_per_prompt: int, guidance_scale: float):
        """The label id of every image (each label repeated `num_images_per_prompt` times), or None for an
        unconditional model, which is refused labels and, without a guide network, guidance."""
        name = type(self.denoiser).__name__
        if _model_num_classes(self.denoiser) > 0:
            if class_labels is None:
                raise ValueError(f"class_labels is required: {name} is class-conditional ({self.num_classes} classes).")
            return [i for i in self._class_label_ids(class_labels) for _ in range(num_images_per_prompt)]
        if class_labels is not None:
            raise ValueError(
                f"{name} is unconditional (its config has none of {_NUM_CLASSES_KEYS} > 0); pass no class_labels "
                "and set num_images_per_prompt to the number of images."
            )
        if guidance_scale != 1 and self.guide is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a null label or a guide network, and the unconditional {name} "
                "has no null label; use guidance_scale=1 or give the pipeline a guide."
            )
        return None

    def _class_label_ids(self, class_labels) -> list[int]:
        items = _flatten_labels(class_labels)
        if len(items) == 0:
            raise ValueError("class_labels is empty; pass at least one class id or class name.")
        ids = []
        for item in items:
            if isinstance(item, str):
                ids.extend(self.get_label_ids(item))
            elif isinstance(item, bool) or not isinstance(item, (int, float)) or not float(item).is_integer():
                raise ValueError(f"class_labels must be integer class ids or class names, got {item!r}.")
            else:
                ids.append(int(item))
        num_classes = self.num_classes
        bad = [i for i in ids if not 0 <= i < num_classes]
        if bad:
            raise ValueError(
                f"class_labels {bad} are out of range: the model has {num_classes} classes (0..{num_classes - 1})."
            )
        return ids

    def _check_scheduler(self):
        scheduler = self.scheduler
        name = type(scheduler).__name__
        config = scheduler.config
        if _is_edm(scheduler):
            prediction_type = config.prediction_type
            if self.unet is not None and prediction_type != "sample":
                raise ValueError(
                    f"The unet returns the denoised sample, so the scheduler needs prediction_type='sample', "
                    f"got {name}(prediction_type={prediction_type!r})."
                )
            if self.unet is not None and isinstance(scheduler, EDMDPMSolverMultistepScheduler):
                raise ValueError(
                    "EDMDPMSolverMultistepScheduler cannot take a denoised sample (prediction_type='sample'), which "
                    "is what the unet returns; use EDMHeunScheduler or EDMEulerScheduler."
                )
            return
        if _is_flow(scheduler):
            if self.unet is not None:
                raise ValueError(
                    f"{name} samples a velocity model called with flow time t in the transformer slot; the unet slot "
                    "holds a σ-conditioned denoiser, which needs an EDM scheduler."
                )
            if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
                if config.use_dynamic_shifting:
                    raise ValueError(
                        f"{name}(use_dynamic_shifting=True) needs `mu` from the image sequence length at every "
                        "set_timesteps call, which this pipeline does not pass; set a fixed `shift` instead."
                    )
                if config.invert_sigmas:
                    raise ValueError(
                        f"{name}(invert_sigmas=True) counts time the other way (Mochi's convention, 0 = noise); "
                        "these models take t = 1 as noise."
                    )
            return
        if name in _UNSUPPORTED_SCHEDULERS:
            raise ValueError(f"{name} cannot drive ClassConditionalPipeline: {_UNSUPPORTED_SCHEDULERS[name]}.")
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"Unsupported scheduler {name}: it has no alphas_cumprod table, so it does not sample a discrete-time "
                "(DDPM-trained) model, and it is not one of the EDM schedulers (EDMHeunScheduler, EDMEulerScheduler, "
                "EDMDPMSolverMultistepScheduler) or the flow schedulers (FlowScheduler, "
                "FlowMatchEulerDiscreteScheduler)."
            )
        if self.unet is not None:
            raise ValueError(
                f"A σ-conditioned unet needs an EDM scheduler (EDMHeunScheduler or EDMEulerScheduler with "
                f"prediction_type='sample'), got {name}."
            )
        if config.get("use_flow_sigmas", False) or config.get("prediction_type") == "flow_prediction":
            raise ValueError(
                f"{name} configured for flow matching (use_flow_sigmas / flow_prediction) is not supported; sample "
                "flow models with FlowScheduler or FlowMatchEulerDiscreteScheduler."
            )
        if config.get("timestep_type") == "continuous" and config.get("prediction_type") == "v_prediction":
            raise ValueError(
                f"{name}(timestep_type='continuous', prediction_type='v_prediction') feeds the model c_noise = "
                "ln(σ)/4 instead of a DDPM timestep; a discrete-time model needs timestep_type='discrete' (an EDM "
                "scheduler serves EDM-trained models)."
            )
        variance_type = config.get("variance_type")
        if variance_type in ("learned", "learned_range"):
            if name not in _LEARNED_VARIANCE_SCHEDULERS:
                raise ValueError(
                    f"{name}(variance_type={variance_type!r}) assumes an RGB model and keeps only the first 3 output "
                    "channels; set variance_type=None (the pipeline passes the mean prediction alone)."
                )
            channels, out_channels = (
                _model_config_value(self.transformer, key) for key in ("in_channels", "out_channels")
            )
            if out_channels != 2 * channels and _model_config_value(self.transformer, "learn_sigma") is not True:
                raise ValueError(
                    f"{name}(variance_type={variance_type!r}) needs a model that outputs its variance "
                    f"(out_channels = 2 × in_channels); this one has out_channels {out_channels}. "
                    "Use variance_type='fixed_small'."
                )

    def _check_guide(self):
        guide = self.guide
        if guide is None:
            return
        main_is_sigma = self.unet is not None
        if bool(getattr(guide, "input_is_sigma", False)) != main_is_sigma:
            kind = "σ-conditioned denoiser (input_is_sigma = True)" if main_is_sigma else "timestep-conditioned model"
            raise ValueError(f"The guide must be called like the main network, a {kind}; got {type(guide).__name__}.")
        main_shape, guide_shape = _model_sample_shape(self.denoiser), _model_sample_shape(guide)
        if guide_shape != main_shape:
            raise ValueError(
                f"The guide denoises samples of shape {guide_shape} (channels, height, width), the main network "
                f"{main_shape}; they must be equal."
            )
        guide_classes, main_classes = _model_num_classes(guide), _model_num_classes(self.denoiser)
        if guide_classes not in (0, main_classes):
            raise ValueError(
                f"The guide has {guide_classes} classes and the main network {main_classes}; a conditional "
                "guide (autoguidance) must share the label set, an unconditional one has none."
            )

    @staticmethod
    def _check_guidance_interval(guidance_interval) -> tuple[float, float] | None:
        if guidance_interval is None:
            return None
        try:
            sigma_lo, sigma_hi = (float(value) for value in guidance_interval)
        except (TypeError, ValueError):
            raise ValueError(
                f"guidance_interval must be None or a pair (sigma_lo, sigma_hi), got {guidance_interval!r}."
            ) from None
        if math.isnan(sigma_lo) or math.isnan(sigma_hi) or sigma_lo < 0 or sigma_lo > sigma_hi:
            raise ValueError(f"guidance_interval needs 0 <= sigma_lo <= sigma_hi, got {guidance_interval!r}.")
        return sigma_lo, sigma_hi

    def _check_guidance_channels(self, guidance_channels) -> int | None:
        if guidance_channels is None:
            return None
        channels = _model_sample_shape(self.denoiser)[0]
        if isinstance(guidance_channels, bool) or not isinstance(guidance_channels, int):
            raise ValueError(f"guidance_channels must be None or an integer, got {guidance_channels!r}.")
        if not 1 <= guidance_channels <= channels:
            raise ValueError(
                f"guidance_channels must lie in 1..{channels} (the model's latent channels), got {guidance_channels}."
            )
        return guidance_channels

    def guidance_sigmas(self) -> torch.Tensor:
        """
        σ (float64) that decides guidance for each entry of `scheduler.timesteps` (call after `set_timesteps`); for
        a flow scheduler, the flow time t instead (t = 1 noise; what diffusers' flow schedulers call sigma).

        It is the σ of the step an evaluation belongs to: both evaluations of a second-order step (EDMHeunScheduler,
        HeunDiscreteScheduler, KDPM2…) share the σ of the step's first evaluation, as the guidance-interval paper's
        sampler decides per step. For EDMHeunScheduler it is the float64 grid; for schedulers with a `sigmas` table
        (Euler, LMS, DPM-Solver, UniPC, DEIS, EDMEuler, …) it is the table's entry, i.e. the σ the scheduler assigns
        to the sample (fractional timesteps included); for the others (DDPM, DDIM, PNDM, LCM, …) it is
        √((1−ᾱ_t)/ᾱ_t) of the evaluated timestep t, with ᾱ recomputed in float64 from the scheduler's betas. For
        FlowScheduler it is the t of the step (float64; a Heun correction shares its step's t, as REPA's sampler
        decides guidance by t_cur); for FlowMatchEulerDiscreteScheduler the entry of its `sigmas` table, which is t.
        """
        scheduler = self.scheduler
        num_evaluations = len(scheduler.timesteps)
        if _is_edm_heun(scheduler):
            return scheduler.evaluation_step_sigmas.double()
        if _is_flow(scheduler) and hasattr(scheduler, "evaluation_step_times"):
            return scheduler.evaluation_step_times.double()
        table = getattr(scheduler, "sigmas", None)
        if isinstance(table, torch.Tensor) and len(table) > num_evaluations:
            sigmas = table[:num_evaluations].detach().cpu().double().clone()
            if scheduler.order == 2 and hasattr(scheduler, "state_in_first_order"):
                # Evaluations alternate: first-order (even index), then the step's correction (odd index).
                corrections = sigmas[1::2]
                sigmas[1::2] = sigmas[0::2][: len(corrections)]
            return sigmas
        betas = getattr(scheduler, "betas", None)
        if isinstance(betas, torch.Tensor):
            alphas_cumprod = torch.cumprod(1 - betas.detach().cpu().double(), dim=0)
        else:
            alphas_cumprod = scheduler.alphas_cumprod.detach().cpu().double()
        t = scheduler.timesteps.detach().cpu().double().round().long().clamp(0, len(alphas_cumprod) - 1)
        return ((1 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt()

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, *_model_sample_shape(self.denoiser))

    def _learned_variance_sampling(self) -> bool:
        return type(self.scheduler).__name__ in _LEARNED_VARIANCE_SCHEDULERS and self.scheduler.config.get(
            "variance_type"
        ) in ("learned", "learned_range")

    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the training normalisation that the VAE config records: per channel (SDXL's convention, used for
        EDM2's normalisation) when it has ``latents_mean`` and ``latents_std``, else ``scaling_factor`` and
        ``shift_factor``."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
            return latents * std / config.scaling_factor + mean
        latents = latents / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        return latents if shift is None else latents + shift

    # ----------------------------------------------------------------------------------------------------------
    # One guided evaluation

    def _evaluate(self, model, model_input, timestep, sigma, labels):
        """One network call; returns the prediction (float32, latent channels) and the learned variance or None."""
        batch, channels = model_input.shape[:2]
        dtype = model.dtype
        if self.unet is not None:  # the unet slot holds a σ-conditioned denoiser, and the guide is called like it
            sigmas = torch.full((batch,), sigma, device=model_input.device, dtype=torch.float32)
            output = model(model_input.to(dtype), sigmas, class_labels=labels).sample
        else:
            timesteps = torch.as_tensor(timestep, device=model_input.device).reshape(-1)
            if not timesteps.is_floating_point():
                timesteps = timesteps.long()
            output = model(model_input.to(dtype), timestep=timesteps.expand(batch), class_labels=labels).sample
        output = output.to(torch.float32)
        if output.shape[1] == 2 * channels:  # learned σ: the mean prediction, then the variance
            return output[:, :channels], output[:, channels:]
        return output, None

    def _guided_output(self, model_input, timestep, sigma, labels, null_labels, guided: bool, guidance_channels):
        """
        The model output for one scheduler evaluation. Guided: `reference + w·(cond − reference)` on the first
        `guidance_channels` channels (all when None), the conditional output on the rest; the reference is the guide
        network when set, else the main network at the null label (both rows in one batch).
        """
        variance = None
        if not guided:
            output, variance = self._evaluate(self.denoiser, model_input, timestep, sigma, labels)
        else:
            if self.guide is None:
                both, variance = self._evaluate(
                    self.denoiser,
                    torch.cat([model_input, model_input]),
                    timestep,
                    sigma,
                    torch.cat([labels, null_labels]),
                )
                cond, reference = both.chunk(2)
                variance = variance.chunk(2)[0] if variance is not None else None  # the conditional variance, as DiT
            else:
                cond, variance = self._evaluate(self.denoiser, model_input, timestep, sigma, labels)
                guide_labels = labels if _model_num_classes(self.guide) > 0 else None
                reference, _ = self._evaluate(self.guide, model_input, timestep, sigma, guide_labels)
            scale = self._guidance_scale
            k = cond.shape[1] if guidance_channels is None else guidance_channels
            output = reference[:, :k] + scale * (cond[:, :k] - reference[:, :k])
            if k < cond.shape[1]:  # DiT's forward_with_cfg: the remaining channels stay conditional
                output = torch.cat([output, cond[:, k:]], dim=1)
        if variance is not None and self._learned_variance_sampling():
            output = torch.cat([output, variance], dim=1)
        return output

    # ----------------------------------------------------------------------------------------------------------
    # Sampling

    def check_inputs(
        self,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        num_inference_steps,
        num_images_per_prompt,
    ) -> list[str]:
        """Check the arguments that need no model; returns the callback's tensor inputs (a `PipelineCallback`
        names its own)."""
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown_inputs = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown_inputs:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown_inputs} are not among {self._callback_tensor_inputs}."
            )
        for name, value in (
            ("num_inference_steps", num_inference_steps),
            ("num_images_per_prompt", num_images_per_prompt),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        return callback_on_step_end_tensor_inputs

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        """Final latents as `output_type`: through the VAE (if any) to [0, 1] images, or unchanged for "latent"."""
        if output_type == "latent":
            return latents
        samples = (
            latents if self.vae is None else self.vae.decode(self._to_vae_latents(latents).to(self.vae.dtype)).sample
        )
        images = (samples.to(torch.float32) / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images

    @torch.no_grad()
    @_networks_in_eval_mode
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        guidance_interval: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        guidance_channels: int | None = None,
        num_images_per_prompt: int = 1,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates `num_images_per_prompt` images per class label.

        Args:
            class_labels: class ids, class names (looked up in `id2label`), or a mix, as a flat or nested list or a
                tensor; images come in the order of the flattened labels. Required for a class-conditional model;
                an unconditional one (no class count in its config: U-ViT on CIFAR-10 or CelebA, EDM2's
                `uncond` networks) takes none and generates `num_images_per_prompt` images.
            num_inference_steps (`int`, defaults to 50): scheduler steps (second-order schedulers such as
                EDMHeunScheduler, HeunDiscreteScheduler and FlowScheduler(sampler="heun") take 2N−1 evaluations).
            guidance_scale (`float`, defaults to 4.0): w in `reference + w·(cond − reference)`, where the reference
                is the null label of the same model, or the `guide` network when the pipeline has one; 1 disables
                guidance and its extra evaluation. An unconditional model has no null label: without a guide it
                takes only w = 1.
            guidance_interval (`(sigma_lo, sigma_hi)`, *optional*): guide only the steps whose σ lies in
                (sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024); elsewhere only the conditional pass runs. Both
                evaluations of a second-order step follow the step's σ (see `guidance_sigmas`). The comparison is in
                float64 with a relative tolerance of 1e-5, so ends taken from the σ grid select exactly the steps the
                official samplers do. `None` guides every step.
                With a flow scheduler (FlowScheduler, FlowMatchEulerDiscreteScheduler) the ends are flow times t
                (t = 1 noise, the t fed to the model; diffusers' flow schedulers call it sigma), not an EDM σ: the
                official flow samplers compare t itself, and no σ = t/(1−t) conversion is applied. REPA's
                `--guidance-low lo --guidance-high hi` (guided where lo ≤ t ≤ hi; 1.42 FID with hi = 0.7) is
                `(lo, hi)`, which selects the same steps since no evaluation happens at t = 0. LightningDiT's
                `cfg_interval_start c` (SiT's time, 1 = data; guided where its time ≥ c) is `(0, 1 - c)`; its
                `forward_with_cfg` also guides only the first 3 channels (`guidance_channels=3`).
            generator (`torch.Generator` or a list, *optional*): makes sampling deterministic; a list gives each
                image its own generator (one per image).
            latents (`torch.Tensor`, *optional*): initial unit-variance noise (scaled by the scheduler's
                `init_noise_sigma`) of shape (images, channels, height, width); drawn from `generator` when not given.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (NHWC float in [0, 1]), `"pt"` (NCHW in
                [0, 1]) or `"latent"` (the final latents, not decoded).
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called as
                `callback(pipe, i, t, callback_kwargs)` after every network evaluation; may return a dict replacing
                `latents`, and may change `pipe._guidance_scale` or set `pipe._interrupt` (diffusers' conventions).
            callback_on_step_end_tensor_inputs (`list[str]`): tensors passed in `callback_kwargs` (of
                `_callback_tensor_inputs`).
            guidance_channels (`int`, *optional*): guide only the first `guidance_channels` channels of the model
                output and keep the conditional prediction for the others. `None` (the default) guides every latent
                channel, as diffusers' DiTPipeline and standard classifier-free guidance do. `3` is the rule of the
                DiT paper's code (`forward_with_cfg` in facebookresearch/DiT guides only ε's first three channels of
                the four SD-VAE latent channels "for exact reproducibility"); the DiT paper's FIDs (XL/2: 2.27 at
                w = 1.5) were measured with it, so use `guidance_channels=3` to reproduce them.
            num_images_per_prompt (`int`, defaults to 1): images per class label (diffusers' name); label i's images
                are consecutive.
        """
        # Every check happens before the first network evaluation.
        callback_on_step_end_tensor_inputs = self.check_inputs(
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            num_inference_steps,
            num_images_per_prompt,
        )
        guidance_scale = float(guidance_scale)
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}.")
        interval = self._check_guidance_interval(guidance_interval)
        guidance_channels = self._check_guidance_channels(guidance_channels)
        self._check_scheduler()
        self._check_guide()
        label_ids = self._label_ids_per_image(class_labels, num_images_per_prompt, guidance_scale)

        device = self._execution_device
        batch_size = num_images_per_prompt if label_ids is None else len(label_ids)
        shape = self._sample_shape(batch_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators, but {batch_size} images are generated "
                f"({batch_size // num_images_per_prompt} labels × num_images_per_prompt={num_images_per_prompt})."
            )

        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        self._guidance_scale = guidance_scale
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        if interval is None:
            in_interval = [True] * len(timesteps)
        else:
            sigma_lo, sigma_hi = interval
            in_interval = [_above(s, sigma_lo) and not _above(s, sigma_hi) for s in self.guidance_sigmas().tolist()]

        labels = null_labels = None
        if label_ids is not None:
            labels = torch.tensor(label_ids, device=device, dtype=torch.long)
            null_labels = torch.full_like(labels, self.num_classes)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        # FlowMatchEulerDiscreteScheduler has no init_noise_sigma: a flow starts from unit noise.
        latents = latents.to(device=device, dtype=torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)

        edm_heun = _is_edm_heun(scheduler)
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = generator
        # EDMEulerScheduler cannot precondition a denoised output itself; it accepts it ready-made.
        denoised_output = isinstance(scheduler, EDMEulerScheduler) and scheduler.config.prediction_type == "sample"

        # diffusers' flow scheduler counts time in training steps (t·num_train_timesteps); the model takes t itself.
        flow_match_euler = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)

        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            if flow_match_euler:
                model_input, model_timestep = latents, scheduler.sigmas[i]
            else:
                # Also sets the scheduler's step index, which the σ lookups below read.
                model_input, model_timestep = scheduler.scale_model_input(latents, t), t
            if edm_heun:
                sigma = scheduler.sigma_for_model_input
            elif isinstance(scheduler, EDMEulerScheduler):
                sigma = float(scheduler.sigmas[scheduler.step_index])
            else:
                sigma = None
            if self.unet is not None:
                model_input = latents  # the unet preconditions its raw input itself
            guided = in_interval[i] and self.do_classifier_free_guidance
            output = self._guided_output(
                model_input, model_timestep, sigma, labels, null_labels, guided, guidance_channels
            )
            if denoised_output:
                latents = scheduler.step(output, t, latents, pred_original_sample=output, **step_kwargs).prev_sample
            else:
                latents = scheduler.step(output, t, latents, **step_kwargs).prev_sample

            if callback_on_step_end is not None:
                callback_kwargs = {}
                for name in callback_on_step_end_tensor_inputs:
                    callback_kwargs[name] = locals()[name]
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.pop("latents", latents)

        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
