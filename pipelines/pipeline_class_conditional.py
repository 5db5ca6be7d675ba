# Copyright 2025 The diffusers-speedup authors. Licensed under the Apache License, Version 2.0.
"""Class-conditional image generation with classifier-free guidance limited to a σ interval.

Self-contained on purpose: this file imports only the standard library, torch and diffusers (huggingface_hub, a
diffusers dependency, only to download a Hub repo), because it is copied unchanged into exported model folders and
loaded there with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.
"""

import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EDMEulerScheduler
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_DISCRETE_SCHEDULERS = (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler)
# Config keys under which the supported models store their number of classes.
_NUM_CLASSES_KEYS = ("num_classes", "num_embeds_ada_norm", "label_dim")


def _is_edm_heun(scheduler) -> bool:
    # Compared by name: the installed class and a copy loaded with trust_remote_code are different objects.
    return any(klass.__name__ == "EDMHeunScheduler" for klass in type(scheduler).__mro__)


class ClassConditionalPipeline(DiffusionPipeline):
    r"""
    Class-conditional generation (DiT, U-ViT, EDM2) with classifier-free guidance that can be limited to a σ interval.

    Loads DiTPipeline-layout folders unchanged (`transformer/`, `vae/`, `scheduler/`, `model_index.json` with an
    optional `id2label`), as well as folders written by its own `save_pretrained`.

    Args:
        scheduler: one of `DDPMScheduler`, `DDIMScheduler`, `DPMSolverMultistepScheduler`, `EDMEulerScheduler`,
            `EDMHeunScheduler`.
        transformer (*optional*): a class-conditional model called as
            `transformer(hidden_states, timestep, class_labels).sample` (DiTTransformer2DModel, UViTModel). When its
            output has twice the latent channels (learned σ, as DiT), the second half is the variance: a
            `DDPMScheduler` with `variance_type="learned_range"` samples with it (DiT's own sampler), every other
            scheduler uses the first half alone.
        unet (*optional*): a σ-conditioned denoiser with `input_is_sigma = True`, called as
            `unet(sample, sigma, class_labels).sample` and returning the denoised sample (EDM2UNetModel); needs an
            EDM scheduler with `prediction_type="sample"`. Exactly one of `transformer` and `unet` is given.
        vae (`AutoencoderKL`, *optional*): decodes latents to images; without it the model works in pixel space and
            its samples in [-1, 1] are the images.
        id2label (`dict`, *optional*): class id → comma-separated names (ImageNet style), for `get_label_ids` and
            for passing class names to `__call__`.
    """

    model_cpu_offload_seq = "transformer->unet->vae"
    # Every component with a default must be listed, or save_pretrained silently skips it.
    _optional_components = ["transformer", "unet", "vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, scheduler, transformer=None, unet=None, vae=None, id2label: dict | None = None):
        super().__init__()
        if (transformer is None) == (unet is None):
            raise ValueError(
                "ClassConditionalPipeline needs exactly one of `transformer` and `unet`, got "
                f"transformer={type(transformer).__name__}, unet={type(unet).__name__}."
            )
        self.register_modules(transformer=transformer, unet=unet, vae=vae, scheduler=scheduler)
        # Stored in model_index.json with string keys (JSON), like DiT's.
        id2label = None if id2label is None else {str(k): v for k, v in id2label.items()}
        self.register_to_config(id2label=id2label)

        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in value.split(","):
                self.labels[label.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))

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
        config = self.denoiser.config
        for key in _NUM_CLASSES_KEYS:
            value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(
            f"{type(self.denoiser).__name__}'s config has none of {_NUM_CLASSES_KEYS} set to a positive integer, "
            "so the pipeline cannot tell how many classes it has."
        )

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

    def _class_label_ids(self, class_labels) -> list[int]:
        if isinstance(class_labels, torch.Tensor):
            items = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (int, str)):
            items = [class_labels]
        else:
            items = list(class_labels)
        if len(items) == 0:
            raise ValueError("class_labels is empty; pass at least one class id or class name.")
        ids = []
        for item in items:
            if isinstance(item, str):
                ids.extend(self.get_label_ids(item))
            elif isinstance(item, bool) or not float(item).is_integer():
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
        if _is_edm_heun(scheduler) or isinstance(scheduler, EDMEulerScheduler):
            prediction_type = scheduler.config.prediction_type
            if self.unet is not None and prediction_type != "sample":
                raise ValueError(
                    f"The unet returns the denoised sample, so the scheduler needs prediction_type='sample', "
                    f"got {type(scheduler).__name__}(prediction_type={prediction_type!r})."
                )
            return
        if isinstance(scheduler, _DISCRETE_SCHEDULERS):
            if self.unet is not None:
                raise ValueError(
                    f"A σ-conditioned unet needs an EDM scheduler (EDMHeunScheduler or EDMEulerScheduler with "
                    f"prediction_type='sample'), got {type(scheduler).__name__}."
                )
            if getattr(scheduler.config, "use_flow_sigmas", False):
                raise ValueError(f"{type(scheduler).__name__} with use_flow_sigmas=True is not supported.")
            if self._learned_variance_sampling() and self.transformer.config.get(
                "out_channels"
            ) != 2 * self.transformer.config.get("in_channels"):
                raise ValueError(
                    f"DDPMScheduler(variance_type={scheduler.config.variance_type!r}) needs a model that outputs its "
                    f"variance (out_channels = 2 × in_channels); this one has out_channels "
                    f"{self.transformer.config.get('out_channels')}. Use variance_type='fixed_small'."
                )
            return
        raise ValueError(
            f"Unsupported scheduler {type(scheduler).__name__}: ClassConditionalPipeline needs a σ for every step "
            "and knows it for DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EDMEulerScheduler and "
            "EDMHeunScheduler."
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

    def guidance_sigmas(self) -> torch.Tensor:
        """
        σ that decides guidance for each entry of `scheduler.timesteps` (call after `scheduler.set_timesteps`).

        For EDM schedulers it is the step's σ_i (both evaluations of a Heun step share it, as the guidance-interval
        paper requires); for the discrete schedulers it is √((1−ᾱ_t)/ᾱ_t) of the evaluated timestep t.
        """
        scheduler = self.scheduler
        if _is_edm_heun(scheduler):
            return scheduler.evaluation_step_sigmas.double()
        if isinstance(scheduler, EDMEulerScheduler):
            return scheduler.sigmas[: len(scheduler.timesteps)].double()
        alphas_cumprod = scheduler.alphas_cumprod.double()
        t = scheduler.timesteps.detach().cpu().long().clamp(0, len(alphas_cumprod) - 1)
        return ((1 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt()

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        config = self.denoiser.config
        channels = config.get("in_channels", config.get("img_channels"))
        size = config.get("sample_size", config.get("img_resolution"))
        if channels is None or size is None:
            raise ValueError(
                f"{type(self.denoiser).__name__}'s config needs in_channels and sample_size to size the samples."
            )
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, channels, height, width)

    def _learned_variance_sampling(self) -> bool:
        # DPMSolverMultistepScheduler also has variance_type, but it assumes 3 data channels; only DDPM is used here.
        return isinstance(self.scheduler, DDPMScheduler) and self.scheduler.config.variance_type in (
            "learned",
            "learned_range",
        )

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
    # One network evaluation

    def _denoiser_output(self, model_input, timestep, sigma: float, labels, null_labels, guidance_scale, guided):
        if guided:  # conditional and unconditional rows in one batch
            model_input = torch.cat([model_input, model_input])
            labels = torch.cat([labels, null_labels])
        batch = model_input.shape[0]
        dtype = self.denoiser.dtype
        variance = None
        if self.transformer is not None:
            timesteps = torch.as_tensor(timestep, device=model_input.device).reshape(-1)
            if not timesteps.is_floating_point():
                timesteps = timesteps.long()
            output = self.transformer(model_input.to(dtype), timestep=timesteps.expand(batch), class_labels=labels)
            output = output.sample
            channels = model_input.shape[1]
            if output.shape[1] == 2 * channels:  # learned σ: the mean prediction, then the variance
                output, variance = output[:, :channels], output[:, channels:]
        else:
            sigmas = torch.full((batch,), sigma, device=model_input.device, dtype=torch.float32)
            output = self.unet(model_input.to(dtype), sigmas, class_labels=labels).sample
        output = output.to(torch.float32)
        if guided:
            cond, uncond = output.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
            variance = variance.chunk(2)[0] if variance is not None else None  # the conditional variance, as DiT
        if variance is not None and self._learned_variance_sampling():
            output = torch.cat([output, variance.to(torch.float32)], dim=1)
        return output

    # ----------------------------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        guidance_interval: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates one image per class label.

        Args:
            class_labels: class ids, class names (looked up in `id2label`), or a mix; one image each.
            num_inference_steps (`int`, defaults to 50): scheduler steps (EDMHeunScheduler: 2N−1 evaluations).
            guidance_scale (`float`, defaults to 4.0): w in `uncond + w·(cond − uncond)`; 1 disables guidance and
                its unconditional pass.
            guidance_interval (`(sigma_lo, sigma_hi)`, *optional*): guide only at steps whose σ lies in
                (sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024); elsewhere only the conditional pass runs. `None`
                guides every step.
            generator (`torch.Generator`, *optional*): makes sampling deterministic.
            latents (`torch.Tensor`, *optional*): initial unit-variance noise (scaled by the scheduler's
                `init_noise_sigma`); drawn from `generator` when not given.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (NHWC float in [0, 1]), `"pt"` (NCHW in
                [0, 1]) or `"latent"` (the final latents, not decoded).
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): called as `callback(pipe, i, t, callback_kwargs)` after
                every scheduler step (every network evaluation for EDMHeunScheduler); may return a dict replacing
                `latents`.
            callback_on_step_end_tensor_inputs (`list[str]`): tensors passed in `callback_kwargs`.
        """
        # Every check happens before the first network evaluation.
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}.")
        unknown_inputs = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown_inputs:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown_inputs} are not among {self._callback_tensor_inputs}."
            )
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        guidance_scale = float(guidance_scale)
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}.")
        interval = self._check_guidance_interval(guidance_interval)
        self._check_scheduler()
        label_ids = self._class_label_ids(class_labels)

        device = self._execution_device
        batch_size = len(label_ids)
        shape = self._sample_shape(batch_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")

        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        guided_steps = [False] * len(timesteps)
        if guidance_scale != 1.0:
            sigmas = self.guidance_sigmas().tolist()
            lo, hi = interval if interval is not None else (-math.inf, math.inf)
            guided_steps = [lo < sigma <= hi for sigma in sigmas]

        labels = torch.tensor(label_ids, device=device, dtype=torch.long)
        null_labels = torch.full_like(labels, self.num_classes)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma

        edm_heun = _is_edm_heun(scheduler)
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = generator
        # EDMEulerScheduler cannot precondition a denoised output itself; it accepts it ready-made.
        denoised_output = isinstance(scheduler, EDMEulerScheduler) and scheduler.config.prediction_type == "sample"
        sigma_table = scheduler.sigmas if isinstance(scheduler, EDMEulerScheduler) else None

        for i, t in enumerate(self.progress_bar(timesteps)):
            if edm_heun:
                sigma = scheduler.sigma_for_model_input
            elif sigma_table is not None:
                sigma = float(sigma_table[i])
            else:
                sigma = None
            model_input = scheduler.scale_model_input(latents, t)
            if self.unet is not None:
                model_input = latents  # the unet preconditions its raw input itself
            output = self._denoiser_output(model_input, t, sigma, labels, null_labels, guidance_scale, guided_steps[i])
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

        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                samples = self.vae.decode(self._to_vae_latents(latents).to(self.vae.dtype)).sample
            else:
                samples = latents
            images = (samples.to(torch.float32) / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
