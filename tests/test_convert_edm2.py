"""Conversion of EDM2's network pickles. The pickles are built here from scratch in the official structure
(``torch_utils.persistence`` objects carrying module source, ``dnnlib.util.EasyDict``, ``torch.nn.ModuleDict``,
fp16 tensors pickled by torch), and the converted model is compared with a reference forward written from
networks_edm2.py's formulas on the official parameter names."""

import argparse
import builtins
import collections
import copyreg
import json
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_speedup.convert import CheckpointFormatError
from diffusers_speedup.convert import edm2 as convert_edm2

# Source that a real unpickler would exec; it must never run.
EMBEDDED_SOURCE = "raise RuntimeError('the source embedded in the pickle was executed')\n"
TINY = dict(
    img_resolution=16,
    img_channels=4,
    label_dim=5,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    channels_per_head=16,
    logvar_channels=8,
)
RAW_MEAN, RAW_STD = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# Pickles in the official structure


class _Calls:
    reconstructed = 0


def _fake_reconstruct_persistent_obj(meta):
    _Calls.reconstructed += 1
    raise RuntimeError("torch_utils.persistence._reconstruct_persistent_obj was called")


class _FakeEasyDict(dict):
    pass


@pytest.fixture
def official_modules(monkeypatch):
    """Stand-ins for the official `torch_utils.persistence` and `dnnlib.util`, so that pickle writes references to
    them by those names; their functions raise when called."""
    persistence = types.ModuleType("torch_utils.persistence")
    _fake_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _fake_reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _fake_reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    _FakeEasyDict.__module__, _FakeEasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = _FakeEasyDict
    for name, module in {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    _Calls.reconstructed = 0
    yield
    assert _Calls.reconstructed == 0


class Persistent:
    """Pickles as torch_utils.persistence does: ``_reconstruct_persistent_obj(meta)`` with the module source."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=EMBEDDED_SOURCE, class_name=self.class_name, state=self.state)
        return _fake_reconstruct_persistent_obj, (meta,)


class TorchModuleDict:
    """Pickles as a torch.nn.ModuleDict does: ``cls.__new__(cls)`` then ``__setstate__(__dict__)``."""

    def __init__(self, state):
        self.state = state

    @property
    def __class__(self):  # what pickle checks before writing NEWOBJ for a class
        return torch.nn.ModuleDict

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (torch.nn.ModuleDict,), self.state


def module_state(parameters=(), buffers=(), modules=(), init_kwargs=None, **attributes):
    """A torch.nn.Module's pickled __dict__: torch's own bookkeeping entries plus the given contents."""
    state = {k: v for k, v in torch.nn.Module().__getstate__().items() if k != "_compiled_call_impl"}
    state.update(training=False, **attributes)
    state["_parameters"] = collections.OrderedDict(parameters)
    state["_buffers"] = collections.OrderedDict(buffers)
    state["_modules"] = collections.OrderedDict(modules)
    if init_kwargs is not None:
        state.update(_init_args=(), _init_kwargs=dict(init_kwargs))
    return state


def official_layout(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks,
                    attn_resolutions, channels_per_head, logvar_channels):  # fmt: skip
    """networks_edm2's modules in construction order: (name, kind, spec) with the shapes its constructors make."""
    cblock = [model_channels * m for m in channel_mult]
    cnoise, cemb = cblock[0], max(cblock)
    layout = [("unet.emb_fourier", "fourier", cnoise), ("unet.emb_noise", "conv", (cemb, cnoise))]
    if label_dim:
        layout.append(("unet.emb_label", "conv", (cemb, label_dim)))

    def block(name, cin, cout, flavor, mode="keep", attention=False):
        layout.append((name, "block", dict(cin=cin, cout=cout, flavor=flavor, mode=mode, attention=attention)))
        for sub, shape in [
            ("conv_res0", (cout, cout if flavor == "enc" else cin, 3, 3)),
            ("emb_linear", (cout, cemb)),
            ("conv_res1", (cout, cout, 3, 3)),
            ("conv_skip", (cout, cin, 1, 1) if cin != cout else None),
            ("attn_qkv", (3 * cout, cout, 1, 1) if attention else None),
            ("attn_proj", (cout, cout, 1, 1) if attention else None),
        ]:
            if shape is not None:
                layout.append((f"{name}.{sub}", "conv", shape))

    cout, skips = img_channels + 1, []
    for level, channels in enumerate(cblock):
        res = img_resolution >> level
        if level == 0:
            cin, cout = cout, channels
            layout.append((f"unet.enc.{res}x{res}_conv", "conv", (cout, cin, 3, 3)))
        else:
            block(f"unet.enc.{res}x{res}_down", cout, cout, "enc", mode="down")
        skips.append(cout)
        for idx in range(num_blocks):
            cin, cout = cout, channels
            block(f"unet.enc.{res}x{res}_block{idx}", cin, cout, "enc", attention=res in attn_resolutions)
            skips.append(cout)
    for level, channels in reversed(list(enumerate(cblock))):
        res = img_resolution >> level
        if level == len(cblock) - 1:
            block(f"unet.dec.{res}x{res}_in0", cout, cout, "dec", attention=True)
            block(f"unet.dec.{res}x{res}_in1", cout, cout, "dec")
        else:
            block(f"unet.dec.{res}x{res}_up", cout, cout, "dec", mode="up")
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), channels
            block(f"unet.dec.{res}x{res}_block{idx}", cin, cout, "dec", attention=res in attn_resolutions)
    layout.append(("unet.out_conv", "conv", (img_channels, cout, 3, 3)))
    layout += [("logvar_fourier", "fourier", logvar_channels), ("logvar_linear", "conv", (1, logvar_channels))]
    return layout


def official_weights(layout, seed=0) -> dict[str, torch.Tensor]:
    """Random weights under the official names, fp16 as the released pickles store them (`.to(torch.float16)`)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {"unet.out_gain": 0.5 + torch.rand((), generator=generator)}
    for name, kind, spec in layout:
        if kind == "conv":
            weights[f"{name}.weight"] = torch.randn(spec, generator=generator)
        elif kind == "fourier":
            weights[f"{name}.freqs"] = 2 * math.pi * torch.randn(spec, generator=generator)
            weights[f"{name}.phases"] = 2 * math.pi * torch.rand(spec, generator=generator)
        else:
            weights[f"{name}.emb_gain"] = 0.5 + torch.rand((), generator=generator)
    return {key: value.half() for key, value in weights.items()}


def official_precond(kwargs, weights, layout):
    """The Precond object tree as pickled: persistent Precond > UNet > ModuleDict enc/dec > Block > MPConv."""
    specs = {name: (kind, spec) for name, kind, spec in layout}

    def conv(name):
        weight = torch.nn.Parameter(weights[f"{name}.weight"], requires_grad=False)
        shape = weight.shape
        return Persistent(
            "MPConv",
            module_state([("weight", weight)], out_channels=shape[0], init_kwargs=dict(kernel=list(shape[2:]))),
        )

    def fourier(name):
        buffers = [("freqs", weights[f"{name}.freqs"]), ("phases", weights[f"{name}.phases"])]
        return Persistent("MPFourier", module_state(buffers=buffers, init_kwargs=dict(num_channels=specs[name][1])))

    def block(name):
        spec = specs[name][1]
        children = [(sub, conv(f"{name}.{sub}")) for sub in ("conv_res0", "emb_linear", "conv_res1")]
        attributes = {}
        for sub in ("conv_skip", "attn_qkv", "attn_proj"):
            if f"{name}.{sub}" in specs:
                children.append((sub, conv(f"{name}.{sub}")))
            else:
                attributes[sub] = None  # None attributes are plain attributes, not submodules
        gain = torch.nn.Parameter(weights[f"{name}.emb_gain"], requires_grad=False)
        state = module_state(
            [("emb_gain", gain)],
            modules=children,
            init_kwargs=dict(in_channels=spec["cin"], out_channels=spec["cout"], flavor=spec["flavor"]),
            out_channels=spec["cout"],
            flavor=spec["flavor"],
            resample_filter=[1, 1],
            resample_mode=spec["mode"],
            num_heads=spec["cout"] // kwargs.get("channels_per_head", 64) if spec["attention"] else 0,
            dropout=0,
            res_balance=0.3,
            attn_balance=0.3,
            clip_act=256,
            **attributes,
        )
        return Persistent("Block", state)

    def children_under(prefix):
        names = [name for name, _, _ in layout if name.startswith(prefix) and "." not in name[len(prefix) :]]
        return [(name[len(prefix) :], conv(name) if specs[name][0] == "conv" else block(name)) for name in names]

    unet_modules = [("emb_fourier", fourier("unet.emb_fourier")), ("emb_noise", conv("unet.emb_noise"))]
    if "unet.emb_label" in specs:
        unet_modules.append(("emb_label", conv("unet.emb_label")))
    unet_modules += [
        ("enc", TorchModuleDict(module_state(modules=children_under("unet.enc.")))),
        ("dec", TorchModuleDict(module_state(modules=children_under("unet.dec.")))),
        ("out_conv", conv("unet.out_conv")),
    ]
    unet_kwargs = {k: v for k, v in kwargs.items() if k != "logvar_channels"}
    out_gain = torch.nn.Parameter(weights["unet.out_gain"], requires_grad=False)
    unet = Persistent(
        "UNet",
        module_state(
            [("out_gain", out_gain)],
            modules=unet_modules,
            init_kwargs=unet_kwargs,
            label_balance=0.5,
            concat_balance=0.5,
            **({} if "unet.emb_label" in specs else {"emb_label": None}),
        ),
    )
    precond_modules = [("unet", unet), ("logvar_fourier", fourier("logvar_fourier"))]
    precond_modules.append(("logvar_linear", conv("logvar_linear")))
    return Persistent(
        "Precond",
        module_state(
            modules=precond_modules,
            init_kwargs={**kwargs, "use_fp16": True},
            img_resolution=kwargs["img_resolution"],
            img_channels=kwargs["img_channels"],
            label_dim=kwargs["label_dim"],
            use_fp16=True,
            sigma_data=0.5,
        ),
    )


def write_official_pickle(path, kwargs=TINY, latent=True, seed=0, mutate=None):
    """An EDM2 snapshot/reconstruction pickle: EasyDict(encoder, dataset_kwargs, loss_fn, ema)."""
    layout = official_layout(**kwargs)
    if mutate is not None:
        layout = mutate(layout)
    weights = official_weights(layout, seed)
    if latent:
        scale = np.float32(0.5) / np.float32(RAW_STD)
        bias = np.float32(0) - np.float32(RAW_MEAN) * scale
        encoder_state = dict(_init_args=(), _init_kwargs={}, vae_name="stabilityai/sd-vae-ft-mse", scale=scale)
        encoder_state.update(bias=bias, batch_size=8, _vae=None)
        encoder = Persistent("StabilityVAEEncoder", encoder_state)
    else:
        encoder = Persistent("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}))
    data = _FakeEasyDict(
        encoder=encoder,
        dataset_kwargs=_FakeEasyDict(class_name="training.dataset.ImageFolderDataset", path="img.zip", use_labels=True),
        loss_fn=Persistent("EDM2Loss", dict(_init_args=(), _init_kwargs={}, P_mean=-0.4, P_std=1.0, sigma_data=0.5)),
    )
    data["ema"] = official_precond(kwargs, weights, layout)
    with open(path, "wb") as file:
        pickle.dump(data, file)
    return {k: v.float() for k, v in weights.items()}, layout


# ---------------------------------------------------------------------------------------------------------------------
# networks_edm2's forward, from its formulas, on the official names


def _normalize(x, dim=None, eps=1e-4):
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    return x / (eps + norm * math.sqrt(norm.numel() / x.numel()))


def reference_denoiser(weights, layout, kwargs, x, sigma, one_hot):
    """D(x; σ) and u(σ) of networks_edm2.Precond (eval mode, float32), labels as one-hot rows."""
    specs = {name: spec for name, _, spec in layout}

    def mpconv(name, x, gain=1.0):
        w = _normalize(weights[f"{name}.weight"])
        w = w * (gain / math.sqrt(w[0].numel()))
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)

    def fourier(name, c):
        return torch.cos(c[:, None] * weights[f"{name}.freqs"] + weights[f"{name}.phases"]) * math.sqrt(2)

    silu = lambda t: F.silu(t) / 0.596  # noqa: E731

    def mp_sum(a, b, t):
        return (a + t * (b - a)) / math.sqrt((1 - t) ** 2 + t**2)

    def resample(x, mode):
        c = x.shape[1]
        f = torch.full((c, 1, 2, 2), 0.25)
        if mode == "down":
            return F.conv2d(x, f, groups=c, stride=2)
        if mode == "up":
            return F.conv_transpose2d(x, f * 4, groups=c, stride=2)
        return x

    def block(name, x, emb):
        spec = specs[name]
        x = resample(x, spec["mode"])
        if spec["flavor"] == "enc":
            if f"{name}.conv_skip" in specs:
                x = mpconv(f"{name}.conv_skip", x)
            x = _normalize(x, dim=1)
        y = mpconv(f"{name}.conv_res0", silu(x))
        c = mpconv(f"{name}.emb_linear", emb, gain=weights[f"{name}.emb_gain"]) + 1
        y = mpconv(f"{name}.conv_res1", silu(y * c[:, :, None, None]))
        if spec["flavor"] == "dec" and f"{name}.conv_skip" in specs:
            x = mpconv(f"{name}.conv_skip", x)
        x = mp_sum(x, y, 0.3)
        if spec["attention"]:
            heads = spec["cout"] // kwargs["channels_per_head"]
            y = mpconv(f"{name}.attn_qkv", x)
            y = y.reshape(y.shape[0], heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = _normalize(y, dim=2).unbind(3)
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = mpconv(f"{name}.attn_proj", torch.einsum("nhqk,nhck->nhcq", w, v).reshape(*x.shape))
            x = mp_sum(x, y, 0.3)
        return x.clip(-256, 256)

    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (0.25 + s**2).sqrt()
    c_noise = sigma.log() / 4
    emb = mpconv("unet.emb_noise", fourier("unet.emb_fourier", c_noise))
    if one_hot is not None:
        emb = mp_sum(emb, mpconv("unet.emb_label", one_hot * math.sqrt(one_hot.shape[1])), 0.5)
    emb = silu(emb)
    h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for name, kind, _ in layout:
        if name.startswith("unet.enc.") and name.count(".") == 2:
            h = mpconv(name, h) if kind == "conv" else block(name, h, emb)
            skips.append(h)
    for name, _kind, _ in layout:
        if name.startswith("unet.dec.") and name.count(".") == 2:
            if "block" in name:
                a, b = h, skips.pop()
                scale = math.sqrt((a.shape[1] + b.shape[1]) / 0.5)
                h = torch.cat([a * (scale / math.sqrt(a.shape[1]) * 0.5), b * (scale / math.sqrt(b.shape[1]) * 0.5)], 1)
            h = block(name, h, emb)
    f_x = mpconv("unet.out_conv", h, gain=weights["unet.out_gain"])
    logvar = mpconv("logvar_linear", fourier("logvar_fourier", c_noise)).reshape(-1, 1, 1, 1)
    return c_skip * x + c_out * f_x, logvar


def _inputs(kwargs, seed=3):
    generator = torch.Generator().manual_seed(seed)
    shape = (3, kwargs["img_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    x = torch.randn(shape, generator=generator) * 2
    sigma = torch.tensor([0.05, 0.9, 12.0])
    labels = torch.tensor([0, 4, 2]) if kwargs["label_dim"] else None
    return x, sigma, labels


def _assert_matches_reference(model, weights, layout, kwargs):
    x, sigma, labels = _inputs(kwargs)
    one_hot = None if labels is None else F.one_hot(labels, kwargs["label_dim"]).float()
    expected, expected_logvar = reference_denoiser(weights, layout, kwargs, x, sigma, one_hot)
    with torch.no_grad():
        out = model(x, sigma, labels, return_logvar=True)
    assert (expected - x * 0.25 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25)).abs().max() > 0.1  # F contributes
    torch.testing.assert_close(out.sample, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logvar, expected_logvar, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_network_converts_to_the_official_outputs_without_running_embedded_code(
    tmp_path, official_modules, monkeypatch
):
    path = tmp_path / "edm2-img512-tiny-0000001-0.100.pkl"
    weights, layout = write_official_pickle(path)
    assert b"torch_utils.persistence" in path.read_bytes() and EMBEDDED_SOURCE.encode() in path.read_bytes()

    seen = []

    def watching(original):
        # Imports that torch makes lazily compile their own code; only the embedded source must never get here.
        def wrapper(source, *args, **kwargs):
            text = source.decode(errors="replace") if isinstance(source, bytes) else source
            if isinstance(text, str) and EMBEDDED_SOURCE.strip() in text:
                seen.append(original.__name__)
            return original(source, *args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in ("exec", "eval", "compile"):
            patch.setattr(builtins, name, watching(getattr(builtins, name)))
        data = convert_edm2.load_edm2_pickle(path)
    assert seen == []
    assert data["ema"].class_name == "Precond" and data["encoder"].class_name == "StabilityVAEEncoder"

    config = convert_edm2.edm2_unet_config(data["ema"])
    assert config == dict(
        architecture="G", sample_size=16, in_channels=4, num_classes=5, model_channels=16, channel_mult=(1, 2),
        num_blocks=1, attn_resolutions=(8,), channels_per_head=16, logvar_channels=8, sigma_data=0.5,
    )  # fmt: skip
    model = convert_edm2.convert_edm2_network(data["ema"], path)
    assert not model.training
    _assert_matches_reference(model, weights, layout, TINY)


def test_latent_pickle_becomes_a_pipeline_folder_with_edm2s_normalisation(tmp_path, official_modules):
    from diffusers import AutoencoderKL

    from diffusers_speedup import ClassConditionalPipeline

    path = tmp_path / "edm2-img512-tiny-0000001-0.100.pkl"
    weights, layout = write_official_pickle(path)
    vae_dir = tmp_path / "vae"
    AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=8, layers_per_block=1,
    ).save_pretrained(vae_dir)  # fmt: skip

    folder = convert_edm2.convert_edm2_pickle(path, tmp_path / "out", vae=str(vae_dir))
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == 0.5
    np.testing.assert_allclose(vae_config["latents_mean"], RAW_MEAN, rtol=1e-6)
    np.testing.assert_allclose(vae_config["latents_std"], RAW_STD, rtol=1e-6)
    card = (folder / "README.md").read_text()
    assert "cc-by-nc-sa-4.0" in card and "nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions" in card

    pipeline = ClassConditionalPipeline.from_pretrained(folder)
    assert type(pipeline.unet).__name__ == "EDM2UNetModel" and pipeline.scheduler.config.prediction_type == "sample"
    _assert_matches_reference(pipeline.unet, weights, layout, TINY)
    # The pipeline's latents → VAE input equals EDM2's StabilityVAEEncoder.decode: (x − bias) / scale.
    x = torch.randn(2, 4, 3, 3)
    scale = torch.tensor(0.5 / np.float32(RAW_STD), dtype=torch.float32).view(1, -1, 1, 1)
    bias = -torch.tensor(RAW_MEAN).view(1, -1, 1, 1) * scale
    torch.testing.assert_close(pipeline._to_vae_latents(x), (x - bias) / scale, rtol=1e-5, atol=1e-5)


def test_pixel_and_unconditional_pickles(tmp_path, official_modules):
    pixel = dict(TINY, img_channels=3)
    weights, layout = write_official_pickle(tmp_path / "img64.pkl", pixel, latent=False)
    folder = convert_edm2.convert_edm2_pickle(tmp_path / "img64.pkl", tmp_path / "img64")
    index = json.loads((folder / "model_index.json").read_text())
    assert index.get("vae", [None, None])[1] is None
    model = convert_edm2.convert_edm2_network(convert_edm2.load_edm2_pickle(tmp_path / "img64.pkl")["ema"])
    _assert_matches_reference(model, weights, layout, pixel)

    # The guides of EDM2's guided presets are unconditional XS networks (label_dim=0, no emb_label).
    uncond = dict(TINY, label_dim=0)
    weights, layout = write_official_pickle(tmp_path / "uncond.pkl", uncond)
    model = convert_edm2.convert_edm2_network(convert_edm2.load_edm2_pickle(tmp_path / "uncond.pkl")["ema"])
    assert model.config.num_classes == 0 and model.label_linear is None
    _assert_matches_reference(model, weights, layout, uncond)


def test_official_defaults_are_the_models():
    # The converter fills every argument a pickle did not record from EDM2UNetModel's defaults, so those must be
    # networks_edm2's (UNet, Block and Precond signatures).
    import inspect

    from diffusers_speedup.models.edm2_unet import EDM2UNetModel

    official = dict(
        model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None, num_blocks=3,
        attn_resolutions=(16, 8), label_balance=0.5, concat_balance=0.5, channels_per_head=64, dropout=0.0,
        res_balance=0.3, attn_balance=0.3, clip_act=256, sigma_data=0.5, logvar_channels=128, architecture="G",
    )  # fmt: skip
    ours = {k: v.default for k, v in inspect.signature(EDM2UNetModel.__init__).parameters.items() if k in official}
    assert ours == official


class _RunsCode:
    def __reduce__(self):
        return (builtins.print, ("this must not be printed",))


def test_refuses_anything_but_plain_data(tmp_path, official_modules, capsys):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as file:
        pickle.dump({"ema": _RunsCode()}, file)
    with pytest.raises(CheckpointFormatError, match=r"builtins\.print"):
        convert_edm2.load_edm2_pickle(path)
    assert "must not be printed" not in capsys.readouterr().out

    with open(path, "wb") as file:
        pickle.dump({"ema": argparse.Namespace(a=1)}, file)
    with pytest.raises(CheckpointFormatError, match=r"argparse\.Namespace"):
        convert_edm2.load_edm2_pickle(path)
    with pytest.raises(FileNotFoundError):
        convert_edm2.load_edm2_pickle(tmp_path / "missing.pkl")


def test_truncated_file_and_other_architectures_get_one_clear_error(tmp_path, official_modules):
    path = tmp_path / "net.pkl"
    write_official_pickle(path)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        convert_edm2.load_edm2_pickle(truncated)

    # A network of another layout under the same constructor arguments: missing and unexpected keys, named.
    def rename_block(layout):
        return [(name.replace("8x8_block1", "8x8_block9"), kind, spec) for name, kind, spec in layout]

    write_official_pickle(path, mutate=rename_block)
    with pytest.raises(CheckpointFormatError) as error:
        convert_edm2.convert_edm2_network(convert_edm2.load_edm2_pickle(path)["ema"], path)
    message = str(error.value)
    assert str(path) in message
    block_keys = ["attn_proj.weight", "attn_qkv.weight", "conv_res0.weight", "conv_res1.weight", "conv_skip.weight"]
    block_keys += ["emb_gain", "emb_linear.weight"]
    missing = ", ".join(f"unet.dec.8x8_block1.{key}" for key in block_keys)
    unexpected = ", ".join(f"unet.dec.8x8_block9.{key}" for key in block_keys)
    assert message == f"{path}: not an EDM2 network pickle: missing keys [{missing}]; unexpected keys [{unexpected}]"

    # More blocks than the recorded arguments say: the extra ones are named.
    more_blocks = dict(TINY, num_blocks=2)
    write_official_pickle(path, mutate=lambda layout: official_layout(**more_blocks))
    with pytest.raises(CheckpointFormatError, match=r"unexpected keys \[unet.dec.16x16_block2.conv_res0.weight"):
        convert_edm2.convert_edm2_network(convert_edm2.load_edm2_pickle(path)["ema"], path)

    # Weights of a wider network than the recorded arguments: the first key whose shape differs is named.
    wider = dict(TINY, model_channels=32)
    write_official_pickle(path, mutate=lambda layout: official_layout(**wider))
    with pytest.raises(CheckpointFormatError, match=r"unet\.emb_fourier\.freqs has shape \(32,\), expected \(16,\)"):
        convert_edm2.convert_edm2_network(convert_edm2.load_edm2_pickle(path)["ema"], path)

    # A different network class under 'ema' (EDM1's preconditioner, say).
    write_official_pickle(path)
    data = convert_edm2.load_edm2_pickle(path)
    data["ema"].class_name = "EDMPrecond"
    with pytest.raises(CheckpointFormatError, match="EDMPrecond, not EDM2's Precond"):
        convert_edm2.convert_edm2_network(data["ema"])
    data["ema"].class_name = "Precond"
    data["ema"].state["_init_kwargs"]["resample_filter"] = [1, 3, 3, 1]
    with pytest.raises(CheckpointFormatError, match="resample_filter"):
        convert_edm2.convert_edm2_network(data["ema"])


def test_command_line(tmp_path, official_modules):
    path = tmp_path / "img64.pkl"
    write_official_pickle(path, dict(TINY, img_channels=3), latent=False)
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--output_dir", required=True)
    convert_edm2.add_arguments(parser)
    args = parser.parse_args([str(path), "--output_dir", str(tmp_path / "out"), "--model_name", "edm2-img64-tiny"])
    folder = convert_edm2.run(args)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "edm2-img64-tiny" in (folder / "README.md").read_text()
