"""EDM2's released network pickles (NVlabs/edm2: ImageNet-512 XS…XXL, ImageNet-64 S…XL, the unconditional guides).

    diffusers-speedup convert edm2 edm2-img512-xs-2147483-0.135.pkl --output_dir edm2-img512-xs

An EDM2 ``.pkl`` is a plain ``pickle`` of ``{"ema": Precond, "encoder": ..., "loss_fn": ..., "dataset_kwargs": ...}``
written by ``training_loop.py`` / ``reconstruct_phema.py``. Every network class is a ``torch_utils.persistence``
class: it pickles as ``_reconstruct_persistent_obj(meta)``, where ``meta`` holds the source code of its whole module,
the class name and the object's ``__dict__`` (its parameters, buffers, submodules and constructor arguments).
Unpickling it the usual way ``exec``-utes that source. Here it is read by `EDM2Unpickler`, which admits only the
globals that rebuild plain data (tensors through torch's own rebuild functions, containers, NumPy arrays) and turns
each persistent object into a `PickledObject` that records the class name, the constructor arguments and the state,
without running, compiling or even looking at the embedded source. Anything else is a `CheckpointFormatError` that
names the global.

The network (``Precond`` around ``UNet``) maps one-to-one onto `EDM2UNetModel` with ``architecture="G"``; its
constructor arguments become the model's config, and the official parameter names are renamed (``unet.enc.64x64_
block0.conv_res0.weight`` -> ``encoder.0.conv_res0.weight``, ...). ImageNet-512 models work on sd-vae-ft-mse latents
normalised per channel by the pickled encoder (``x = z·scale + bias``); the exported VAE config records that as
``latents_mean``/``latents_std``/``scaling_factor``, so the pipeline decodes what the model was trained on.
ImageNet-64 models work on pixels in [-1, 1] and get no VAE.

EDM2's code and weights are licensed CC BY-NC-SA 4.0 ("All material, including source code and pre-trained
models"); the converted folder keeps that licence and says so in its model card.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import io
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .common import CheckpointFormatError, check_state_dict_keys, save_converted_pipeline

EDM2_LICENSE = "cc-by-nc-sa-4.0"
EDM2_RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
EDM2_SAMPLING = {"num_inference_steps": 32, "guidance_scale": 1.0}  # generate_images.py: 32 Heun steps, 63 NFE
WHAT = "an EDM2 network pickle"

# The version of torch_utils.persistence that wrote every released pickle.
_PERSISTENCE_VERSION = 6


# ---------------------------------------------------------------------------------------------------------------------
# Reading the pickle without running it


@dataclass
class PickledObject:
    """An object of the pickle as data: its class name, constructor arguments and ``__dict__``.

    Attributes:
        class_name: the class's name in its module (``"Precond"``, ``"MPConv"``, ``"ModuleDict"``, ...).
        state: the object's ``__dict__`` as pickled; for a ``torch.nn.Module``, ``_parameters``, ``_buffers`` and
            ``_modules`` among others.
        persistent: whether it came from ``torch_utils.persistence`` (EDM2's own classes) rather than torch.
    """

    class_name: str
    state: dict = field(default_factory=dict)
    persistent: bool = False

    @property
    def init_kwargs(self) -> dict:
        """The keyword arguments it was constructed with (persistent classes record them)."""
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())


class _TorchModule(PickledObject):
    """Stands in for the torch containers EDM2 nests its blocks in (``ModuleDict``); pickle builds it with
    ``cls.__new__(cls)`` and ``__setstate__(state)``, so no torch module code runs either."""

    container_name = "Module"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"torch.nn.{self.container_name} with a state of type {type(state).__name__}")
        self.class_name, self.state, self.persistent = self.container_name, dict(state), False


def _torch_container(name: str) -> type:
    return type(f"Pickled{name}", (_TorchModule,), {"container_name": name})


class _EasyDict(dict):
    """Stands in for ``dnnlib.util.EasyDict`` (a dict with attribute access): the top-level record is one."""


def _reconstruct_persistent(meta) -> PickledObject:
    """Replaces ``torch_utils.persistence._reconstruct_persistent_obj``: keep the state, ignore the source."""
    if not isinstance(meta, dict) or not {"type", "version", "class_name", "state"} <= set(meta):
        raise CheckpointFormatError(f"a persistent object without type/version/class_name/state: {type(meta).__name__}")
    if meta["type"] != "class" or meta["version"] != _PERSISTENCE_VERSION:
        raise CheckpointFormatError(
            f"a persistent object of type {meta['type']!r}, version {meta['version']!r} (expected 'class', "
            f"version {_PERSISTENCE_VERSION})"
        )
    state = meta["state"] if meta["state"] is not None else {}
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"persistent {meta['class_name']!r} with a state of type {type(state).__name__}")
    return PickledObject(str(meta["class_name"]), dict(state), persistent=True)


def _load_storage_from_bytes(data: bytes):
    """Replaces ``torch.storage._load_from_bytes``: a storage pickled inside the pickle is a small ``torch.save``
    file, read here with ``weights_only=True``."""
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointFormatError(f"a tensor storage given as {type(data).__name__}, not bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation: the legacy format uses it
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    scalar = np.float32(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # NumPy 1 and 2 names
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class EDM2Unpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that rebuilds plain data only.

    Admitted globals: torch's tensor and parameter rebuild functions, a storage reader that uses ``torch.load(...,
    weights_only=True)``, ``collections.OrderedDict``, ``set``/``frozenset``, NumPy arrays and scalars, and stand-ins
    for ``dnnlib.util.EasyDict``, ``torch.nn.ModuleDict``/``ModuleList`` and
    ``torch_utils.persistence._reconstruct_persistent_obj`` that record data and run nothing. Every other global
    raises `CheckpointFormatError`, as does a persistent id (plain pickles have none).
    """

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
        ("torch.nn.modules.container", "ModuleDict"): _torch_container("ModuleDict"),
        ("torch.nn.modules.container", "ModuleList"): _torch_container("ModuleList"),
    }

    def find_class(self, module: str, name: str):
        found = self._ALLOWED.get((module, name))
        if found is None and module.split(".")[0] == "numpy":
            found = _numpy_globals().get((module, name))
        if found is None:
            raise CheckpointFormatError(
                f"refers to {module}.{name}, which an EDM2 network pickle does not need; it is not loaded, since "
                "unpickling it could run code"
            )
        return found

    def persistent_load(self, pid):
        raise CheckpointFormatError(f"has a persistent id {pid!r}; EDM2 pickles are plain pickles")


def load_edm2_pickle(path: str | os.PathLike) -> dict:
    """Read an EDM2 ``.pkl`` into plain data (see `EDM2Unpickler`); no code stored in it runs.

    Returns the top-level dict: ``"ema"`` is a `PickledObject` for the ``Precond`` network, ``"encoder"`` (when
    present) one for the pixel or latent encoder.

    Raises:
        FileNotFoundError: no such file.
        CheckpointFormatError: not a pickle, truncated, or one that needs anything beyond plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with open(path, "rb") as file:
            data = EDM2Unpickler(file).load()
    except CheckpointFormatError as error:
        raise CheckpointFormatError(f"{path}: not {WHAT}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise CheckpointFormatError(
            f"{path}: cannot be read as {WHAT} (truncated or not a pickle): {type(error).__name__}: {error}"
        ) from None
    except RuntimeError as error:  # a damaged tensor storage
        raise CheckpointFormatError(f"{path}: a tensor in {WHAT} cannot be read: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("ema"), PickledObject):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointFormatError(f"{path}: not {WHAT}: expected a dict with the network under 'ema', found {found}")
    return dict(data)


def _modules_of(obj: PickledObject) -> dict:
    modules = obj.state.get("_modules") or {}
    return {name: child for name, child in modules.items() if child is not None}


def pickled_state_dict(module: PickledObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict()`` the pickled module would have: parameters and persistent buffers, by dotted name."""
    state = {}
    skipped = set(module.state.get("_non_persistent_buffers_set") or ())
    for name, value in (module.state.get("_parameters") or {}).items():
        if value is not None:
            state[prefix + name] = value.detach()
    for name, value in (module.state.get("_buffers") or {}).items():
        if value is not None and name not in skipped:
            state[prefix + name] = value.detach()
    for name, child in _modules_of(module).items():
        if not isinstance(child, PickledObject):
            raise CheckpointFormatError(f"submodule {prefix + name} is a {type(child).__name__}, not a module")
        state.update(pickled_state_dict(child, f"{prefix}{name}."))
    return state


# ---------------------------------------------------------------------------------------------------------------------
# The network: Precond(UNet) -> EDM2UNetModel

# Constructor arguments of networks_edm2.Precond / UNet / Block and the EDM2UNetModel argument each one is.
_PRECOND_KWARGS = {"img_resolution": "sample_size", "img_channels": "in_channels", "label_dim": "num_classes"}
_PRECOND_KWARGS.update(sigma_data="sigma_data", logvar_channels="logvar_channels")
_UNET_KWARGS = (
    "model_channels",
    "channel_mult",
    "channel_mult_noise",
    "channel_mult_emb",
    "num_blocks",
    "attn_resolutions",
    "label_balance",
    "concat_balance",
)
_BLOCK_KWARGS = ("channels_per_head", "dropout", "res_balance", "attn_balance", "clip_act")
_IGNORED_KWARGS = ("use_fp16",)  # a runtime choice of the official code; the caller picks the dtype here


def edm2_unet_config(precond: PickledObject, path: str | os.PathLike = "<pickle>") -> dict[str, Any]:
    """`EDM2UNetModel` arguments for a pickled ``Precond``, from the constructor arguments it recorded."""
    if precond.class_name != "Precond" or not precond.persistent:
        raise CheckpointFormatError(f"{path}: not {WHAT}: 'ema' is a {precond.class_name}, not EDM2's Precond")
    kwargs = precond.init_kwargs
    if precond.init_args:
        raise CheckpointFormatError(f"{path}: Precond was built with positional arguments {precond.init_args!r}")
    config: dict[str, Any] = {"architecture": "G"}
    unknown = []
    for key, value in kwargs.items():
        if key in _PRECOND_KWARGS:
            config[_PRECOND_KWARGS[key]] = value
        elif key in _UNET_KWARGS or key in _BLOCK_KWARGS:
            config[key] = value
        elif key == "resample_filter":
            if list(value) != [1, 1]:
                raise CheckpointFormatError(
                    f"{path}: resample_filter={value!r}; EDM2UNetModel resamples with the [1, 1] box filter only"
                )
        elif key not in _IGNORED_KWARGS:
            unknown.append(key)
    if unknown:
        raise CheckpointFormatError(f"{path}: Precond was built with arguments EDM2UNetModel does not have: {unknown}")
    missing = [key for key in ("img_resolution", "img_channels", "label_dim") if key not in kwargs]
    if missing:
        raise CheckpointFormatError(f"{path}: not {WHAT}: Precond's recorded arguments lack {missing}")
    for key in ("channel_mult", "attn_resolutions"):
        if key in config:
            config[key] = tuple(config[key])
    # Precond's attribute is what its forward uses (the recorded arguments hold it only when it was passed).
    config["sigma_data"] = float(precond.state.get("sigma_data", config.get("sigma_data", 0.5)))
    return config


def _official_module_names(config: dict) -> tuple[list[str], list[str], str]:
    """networks_edm2.UNet's encoder and decoder keys in construction order, and its first conv's key."""
    from ..models.edm2_unet import EDM2UNetModel

    defaults = {k: v.default for k, v in inspect.signature(EDM2UNetModel.__init__).parameters.items()}
    resolution = config["sample_size"]
    channel_mult = config.get("channel_mult", defaults["channel_mult"])
    num_blocks = config.get("num_blocks", defaults["num_blocks"])
    encoder, decoder = [], []
    for level in range(len(channel_mult)):
        res = resolution >> level
        if level > 0:
            encoder.append(f"{res}x{res}_down")
        encoder += [f"{res}x{res}_block{i}" for i in range(num_blocks)]
    for level in reversed(range(len(channel_mult))):
        res = resolution >> level
        decoder += [f"{res}x{res}_in0", f"{res}x{res}_in1"] if level == len(channel_mult) - 1 else [f"{res}x{res}_up"]
        decoder += [f"{res}x{res}_block{i}" for i in range(num_blocks + 1)]
    return encoder, decoder, f"{resolution}x{resolution}_conv"


def official_name_map(model, config: dict) -> dict[str, str]:
    """Our state-dict key -> networks_edm2's ``Precond`` state-dict key, for every key of `model`."""
    encoder, decoder, first_conv = _official_module_names(config)
    prefixes = {
        "noise_fourier.": "unet.emb_fourier.",
        "noise_linear.": "unet.emb_noise.",
        "label_linear.": "unet.emb_label.",
        "conv_in.": f"unet.enc.{first_conv}.",
        "conv_out.": "unet.out_conv.",
        "logvar_fourier.": "logvar_fourier.",
        "logvar_linear.": "logvar_linear.",
    }
    prefixes.update({f"encoder.{i}.": f"unet.enc.{name}." for i, name in enumerate(encoder)})
    prefixes.update({f"decoder.{i}.": f"unet.dec.{name}." for i, name in enumerate(decoder)})
    mapping = {}
    for key in model.state_dict():
        if key == "out_gain":
            mapping[key] = "unet.out_gain"
            continue
        prefix = re.match(r"^((?:encoder|decoder)\.\d+\.|[a-z_]+\.)", key)
        if prefix is None or prefix.group(1) not in prefixes:
            raise CheckpointFormatError(f"EDM2UNetModel key {key!r} has no counterpart in EDM2's network")
        mapping[key] = prefixes[prefix.group(1)] + key[len(prefix.group(1)) :]
    return mapping


def convert_edm2_network(
    precond: PickledObject, path: str | os.PathLike = "<pickle>", torch_dtype: torch.dtype = torch.float32
):
    """An `EDM2UNetModel` (in eval mode) holding a pickled ``Precond``'s weights.

    Raises:
        CheckpointFormatError: another architecture, or weights that do not fit it; one message names every missing
            and unexpected official key, or the first key whose shape differs.
    """
    from ..models.edm2_unet import EDM2UNetModel

    config = edm2_unet_config(precond, path)
    try:
        with torch.device("meta"):
            skeleton = EDM2UNetModel(**config)
    except (ValueError, TypeError) as error:
        raise CheckpointFormatError(f"{path}: its network arguments do not make an EDM2UNetModel: {error}") from None
    official = pickled_state_dict(precond)
    names = official_name_map(skeleton, config)
    check_state_dict_keys(official, names.values(), path, WHAT)
    expected_shapes = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    state = {}
    for ours, theirs in names.items():
        value = official[theirs]
        if tuple(value.shape) != expected_shapes[ours]:
            raise CheckpointFormatError(
                f"{path}: not {WHAT} of these arguments: {theirs} has shape {tuple(value.shape)}, expected "
                f"{expected_shapes[ours]}"
            )
        state[ours] = value.to(torch_dtype)
    model = EDM2UNetModel(**config)
    model.load_state_dict(state, strict=True, assign=False)
    return model.to(torch_dtype).eval()


# ---------------------------------------------------------------------------------------------------------------------
# The encoder: pixels or sd-vae-ft-mse latents


def latent_normalization(encoder: PickledObject | None, path: str | os.PathLike = "<pickle>"):
    """`LatentNormalization` of a pickled ``StabilityVAEEncoder`` (``x = z·scale + bias``), or None for pixels."""
    from ..data import LatentNormalization

    if encoder is None or encoder.class_name == "StandardRGBEncoder":
        return None
    if encoder.class_name != "StabilityVAEEncoder":
        raise CheckpointFormatError(f"{path}: unknown encoder {encoder.class_name!r} in {WHAT}")
    try:
        scale = [float(v) for v in encoder.state["scale"]]
        bias = [float(v) for v in encoder.state["bias"]]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointFormatError(f"{path}: its StabilityVAEEncoder has no usable scale/bias: {error}") from None
    if len(scale) != len(bias) or min(abs(s) for s in scale) == 0:
        raise CheckpointFormatError(f"{path}: its StabilityVAEEncoder has scale {scale} and bias {bias}")
    # x = z·scale + bias  <=>  z = x·(target/scale)/target + (−bias/scale), in the VAE config's per-channel terms.
    target = 0.5
    return LatentNormalization.per_channel(
        mean=[-b / s for b, s in zip(bias, scale)], std=[target / s for s in scale], target_std=target
    )


def convert_edm2_pickle(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    vae=None,
    model_name: str | None = None,
    source: str | None = None,
) -> Path:
    """Convert an EDM2 ``.pkl`` into a `ClassConditionalPipeline` folder (unet, EDM Heun scheduler, and for latent
    models the VAE with EDM2's normalisation in its config) whose card names the source and the licence.

    Args:
        checkpoint: the released pickle.
        output_dir: pipeline folder to write (replaced atomically).
        vae: for latent models, an ``AutoencoderKL`` or its Hub id / folder; defaults to the VAE the pickle names
            (``stabilityai/sd-vae-ft-mse``).
        model_name: the card's title; defaults to the file name without ``.pkl``.
        source: where the weights came from, for the card; defaults to EDM2's release URL of the file name.
    """
    from ..pipelines.pipeline_class_conditional import ClassConditionalPipeline
    from ..schedulers import EDMHeunScheduler

    checkpoint = Path(checkpoint)
    data = load_edm2_pickle(checkpoint)
    unet = convert_edm2_network(data["ema"], checkpoint)
    encoder = data.get("encoder")
    normalization = latent_normalization(encoder if isinstance(encoder, PickledObject) else None, checkpoint)
    vae_model = None
    if normalization is not None:
        from ..data import load_vae

        vae_model, _ = load_vae(vae or encoder.state.get("vae_name") or "stabilityai/sd-vae-ft-mse")
        vae_model.register_to_config(**normalization.vae_config())
        vae_model.eval()
    elif vae is not None:
        raise CheckpointFormatError(f"{checkpoint}: a pixel-space model (its pickle has no VAE encoder) takes no vae")
    scheduler = EDMHeunScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=unet.config.sigma_data, rho=7.0)
    scheduler.register_to_config(prediction_type="sample")
    pipeline = ClassConditionalPipeline(scheduler=scheduler, unet=unet, vae=vae_model)

    config = unet.config
    space = "sd-vae-ft-mse latents" if normalization is not None else "pixels"
    size = config.sample_size * (8 if normalization is not None else 1)
    conditioning = f"{config.num_classes}-class conditional" if config.num_classes else "unconditional"
    loss = data.get("loss_fn")
    training = ""
    if isinstance(loss, PickledObject) and {"P_mean", "P_std"} <= set(loss.state):
        training = f" Trained with ln σ ~ N({loss.state['P_mean']}, {loss.state['P_std']}²)."
    description = (
        f"EDM2 (Karras et al., CVPR 2024) network of {config.model_channels} channels, {conditioning}, on "
        f"{size}×{size} images ({space}).{training} EDM2 samples with 32 deterministic Heun steps and guides its "
        "conditional models with a separate unconditional network (generate_images.py): D = D_guide + w·(D − "
        "D_guide)."
    )
    if not config.num_classes:
        description += (
            " This unconditional network is such a guide: load it with "
            '`EDM2UNetModel.from_pretrained(folder, subfolder="unet")`.'
        )
    return save_converted_pipeline(
        pipeline,
        output_dir,
        model_name=model_name or checkpoint.stem,
        source=source or f"{EDM2_RELEASE_URL}/{checkpoint.name}",
        license=EDM2_LICENSE,
        description=description,
        sampling=EDM2_SAMPLING,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``diffusers-speedup convert edm2``."""
    parser.add_argument(
        "--vae",
        default=None,
        help="AutoencoderKL (Hub id or folder) for latent models; default: the one the pickle names "
        "(stabilityai/sd-vae-ft-mse)",
    )
    parser.add_argument("--model_name", default=None, help="title of the model card (default: the file name)")
    parser.add_argument(
        "--source", default=None, help="where the weights came from, for the card (default: EDM2's release URL)"
    )


def run(args: argparse.Namespace) -> Path:
    """Convert ``args.checkpoint`` into the pipeline folder ``args.output_dir``."""
    return convert_edm2_pickle(
        args.checkpoint, args.output_dir, vae=args.vae, model_name=args.model_name, source=args.source
    )


__all__ = [
    "EDM2Unpickler",
    "PickledObject",
    "add_arguments",
    "convert_edm2_network",
    "convert_edm2_pickle",
    "edm2_unet_config",
    "latent_normalization",
    "load_edm2_pickle",
    "official_name_map",
    "pickled_state_dict",
    "run",
]
