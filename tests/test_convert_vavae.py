"""Converting LightningDiT's VA-VAE into a diffusers AutoencoderKL, and caching latents with it.

Files are built here in the official layout of hustvl/LightningDiT@2725fed ``tokenizer/autoencoder.py`` (LDM's
``AutoencoderKL``: ``Encoder``, ``Decoder``, ``ResnetBlock``, ``AttnBlock``, ``Downsample``, ``Upsample``,
``DiagonalGaussianDistribution``), whose forward is written out below as functions of the state dict; the converted
model is compared against it, never against the code under test.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from diffusers_speedup.convert import CheckpointFormatError, build_parser, vavae

# VA-VAE f16d32's shape (tokenizer/configs/vavae_f16d32.yaml: ch 128, ch_mult 1 1 2 2 4, num_res_blocks 2,
# z_channels 32, attn_resolutions [16] at 256 px: the lowest of the five levels) at a quarter of the width and an
# image of 32 px (the lowest level is then 2×2).
TINY = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32, attn_levels=(4,))
IMAGE = 32


# --- the official network, written out -----------------------------------------------------------------------------


def ldm_state_shapes(ch, ch_mult, num_res_blocks, z_channels, attn_levels, in_channels=3, out_ch=3):
    """Key → shape of LDM ``AutoencoderKL(embed_dim=z_channels, ...).state_dict()`` as tokenizer/autoencoder.py
    builds it: ``Encoder`` (``down.{level}.block.{i}``, ``.attn.{i}`` where the resolution is in
    ``attn_resolutions``, ``.downsample`` but on the last level), ``mid``, ``Decoder`` (``up.{level}``, one more block
    per level, ``.upsample`` but on level 0), and the two 1×1 convolutions around the latent."""
    shapes = {}

    def conv(name, cin, cout, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, k=1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, k=1)

    levels = len(ch_mult)
    conv("encoder.conv_in", in_channels, ch)
    block_in = ch
    for level in range(levels):
        block_out = ch * ch_mult[level]
        for i in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{i}", block_in, block_out)
            block_in = block_out
            if level in attn_levels:
                attn(f"encoder.down.{level}.attn.{i}", block_in)
        if level != levels - 1:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in)
    resnet("encoder.mid.block_1", block_in, block_in)
    attn("encoder.mid.attn_1", block_in)
    resnet("encoder.mid.block_2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * z_channels)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", z_channels, block_in)
    resnet("decoder.mid.block_1", block_in, block_in)
    attn("decoder.mid.attn_1", block_in)
    resnet("decoder.mid.block_2", block_in, block_in)
    for level in reversed(range(levels)):
        block_out = ch * ch_mult[level]
        for i in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{i}", block_in, block_out)
            block_in = block_out
            if level in attn_levels:
                attn(f"decoder.up.{level}.attn.{i}", block_in)
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, out_ch)
    conv("quant_conv", 2 * z_channels, 2 * z_channels, k=1)
    conv("post_quant_conv", z_channels, z_channels, k=1)
    return shapes


def random_ldm_state(shapes, seed=0):
    """Weights of order one per layer: convolutions ~ N(0, 1/fan_in), norms near (1, 0), biases small."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 4:
            state[key] = noise / math.sqrt(shape[1] * shape[2] * shape[3])
        elif "norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * noise
        else:
            state[key] = 0.1 * noise
    return state


def _conv(sd, name, h, stride=1, padding=None):
    weight = sd[f"{name}.weight"]
    padding = weight.shape[-1] // 2 if padding is None else padding
    return F.conv2d(h, weight, sd[f"{name}.bias"], stride=stride, padding=padding)


def _normalize(sd, name, h):  # Normalize: GroupNorm(32, eps 1e-6, affine)
    return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _resnet(sd, name, x):  # ResnetBlock(temb_channels=0), dropout 0
    h = _conv(sd, f"{name}.conv1", F.silu(_normalize(sd, f"{name}.norm1", x)))
    h = _conv(sd, f"{name}.conv2", F.silu(_normalize(sd, f"{name}.norm2", h)))
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{name}.nin_shortcut", x)
    return x + h


def _attn(sd, name, x):  # AttnBlock: single-head attention over positions with 1×1 convolutions
    h = _normalize(sd, f"{name}.norm", x)
    q, k, v = (_conv(sd, f"{name}.{part}", h) for part in ("q", "k", "v"))
    b, c, height, width = q.shape
    weights = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * int(c) ** (-0.5)
    weights = weights.softmax(dim=2)
    h = torch.bmm(v.reshape(b, c, -1), weights.permute(0, 2, 1)).reshape(b, c, height, width)
    return x + _conv(sd, f"{name}.proj_out", h)


def _levels(sd, side):
    prefix = "down" if side == "encoder" else "up"
    return 1 + max(int(key.split(".")[2]) for key in sd if key.startswith(f"{side}.{prefix}."))


def _mid(sd, side, h):
    h = _resnet(sd, f"{side}.mid.block_1", h)
    h = _attn(sd, f"{side}.mid.attn_1", h)
    return _resnet(sd, f"{side}.mid.block_2", h)


def ldm_encoder(sd, x):
    """Encoder.forward: conv_in, levels (ResNets, attention, asymmetric-padded stride-2 convolution), mid, out."""
    h = _conv(sd, "encoder.conv_in", x)
    levels = _levels(sd, "encoder")
    for level in range(levels):
        i = 0
        while f"encoder.down.{level}.block.{i}.conv1.weight" in sd:
            h = _resnet(sd, f"encoder.down.{level}.block.{i}", h)
            if f"encoder.down.{level}.attn.{i}.q.weight" in sd:
                h = _attn(sd, f"encoder.down.{level}.attn.{i}", h)
            i += 1
        if level != levels - 1:
            h = _conv(sd, f"encoder.down.{level}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _mid(sd, "encoder", h)
    return _conv(sd, "encoder.conv_out", F.silu(_normalize(sd, "encoder.norm_out", h)))


def ldm_decoder(sd, z):
    """Decoder.forward: conv_in, mid, levels from the lowest (ResNets, attention, nearest ×2 and a convolution)."""
    h = _mid(sd, "decoder", _conv(sd, "decoder.conv_in", z))
    for level in reversed(range(_levels(sd, "decoder"))):
        i = 0
        while f"decoder.up.{level}.block.{i}.conv1.weight" in sd:
            h = _resnet(sd, f"decoder.up.{level}.block.{i}", h)
            if f"decoder.up.{level}.attn.{i}.q.weight" in sd:
                h = _attn(sd, f"decoder.up.{level}.attn.{i}", h)
            i += 1
        if level != 0:
            h = _conv(sd, f"decoder.up.{level}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", F.silu(_normalize(sd, "decoder.norm_out", h)))


def ldm_encode(sd, x):
    """AutoencoderKL.encode → DiagonalGaussianDistribution: (mean, std), logvar clamped to [−30, 20]."""
    moments = _conv(sd, "quant_conv", ldm_encoder(sd, x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def ldm_decode(sd, z):
    """AutoencoderKL.decode."""
    return ldm_decoder(sd, _conv(sd, "post_quant_conv", z))


def training_only_tensors(z_channels, seed=1):
    """What a VA-VAE training checkpoint holds besides the autoencoder (LPIPSWithDiscriminator, the frozen DINOv2,
    the reverse projection Conv2d(embed_dim, 1024, 1, bias=False))."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4, generator=generator),
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(8, 3, 3, 3, generator=generator),
        "foundation_model.model.cls_token": torch.randn(1, 1, 16, generator=generator),
        "foundation_model.model.blocks.0.attn.qkv.weight": torch.randn(48, 16, generator=generator),
        "linear_proj.weight": torch.randn(1024, z_channels, 1, 1, generator=generator),
    }


def latents_stats(channels, seed=2):
    generator = torch.Generator().manual_seed(seed)
    mean = 0.3 * torch.randn(1, channels, 1, 1, generator=generator)
    std = 0.5 + torch.rand(1, channels, 1, 1, generator=generator)
    return {"mean": mean, "std": std}  # ImgLatentDataset.compute_latent_stats: keepdim means and stds


def convert(checkpoint, output_dir, *options):
    """`diffusers-speedup convert vavae`, through the command's own parser; returns the folder written."""
    args = build_parser().parse_args(["vavae", str(checkpoint), "--output_dir", str(output_dir), *options])
    return args.run(args)


@pytest.fixture(scope="module")
def tiny_vavae(tmp_path_factory):
    """A tiny VA-VAE in the official layout, saved as a Lightning checkpoint with its training-only tensors, and its
    latents_stats.pt."""
    root = tmp_path_factory.mktemp("vavae")
    state = random_ldm_state(ldm_state_shapes(**TINY))
    checkpoint = root / "vavae-imagenet256-f16d32-dinov2.pt"
    torch.save({"state_dict": {**state, **training_only_tensors(TINY["z_channels"])}, "epoch": 49,
                "global_step": 250000}, checkpoint)  # fmt: skip
    stats = root / "latents_stats.pt"
    torch.save(latents_stats(TINY["z_channels"]), stats)
    return {"root": root, "state": state, "checkpoint": checkpoint, "stats": stats}


# --- tests ---------------------------------------------------------------------------------------------------------


def test_converted_vavae_encodes_and_decodes_as_the_ldm_autoencoder(tiny_vavae, tmp_path, capsys):
    folder = convert(tiny_vavae["checkpoint"], tmp_path / "vae", "--latents_stats", str(tiny_vavae["stats"]))
    assert (
        "left out 6 training-only tensors (3 loss.*, 2 foundation_model.*, 1 linear_proj.*" in capsys.readouterr().out
    )
    vae = AutoencoderKL.from_pretrained(folder).double().eval()
    config = vae.config
    assert config.latent_channels == 32 and tuple(config.block_out_channels) == (32, 32, 64, 64, 128)
    assert (
        config.down_block_types[-1] == "AttnDownEncoderBlock2D" and config.up_block_types[0] == "AttnUpDecoderBlock2D"
    )
    assert set(config.down_block_types[:-1]) == {"DownEncoderBlock2D"} and config.layers_per_block == 2

    state = {key: value.double() for key, value in tiny_vavae["state"].items()}
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, IMAGE, IMAGE, generator=generator, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        mean, std = ldm_encode(state, images)
        assert posterior.mean.shape == (2, 32, IMAGE // 16, IMAGE // 16)
        torch.testing.assert_close(posterior.mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(posterior.std, std, rtol=1e-10, atol=1e-10)
        z = mean + std * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(vae.decode(z).sample, ldm_decode(state, z), rtol=1e-10, atol=1e-10)

    # float32, as the folder loads
    vae32 = AutoencoderKL.from_pretrained(folder).eval()
    with torch.no_grad():
        decoded = vae32.decode(z.float()).sample.double()
    reference = ldm_decode(state, z)
    assert (decoded - reference).abs().max() <= 1e-5 * reference.abs().max()

    card = (folder / "README.md").read_text()
    assert "license: mit" in card and "hustvl/vavae-imagenet256-f16d32-dinov2" in card


def test_latents_stats_become_lightningdits_normalisation(tiny_vavae, tmp_path):
    folder = convert(tiny_vavae["checkpoint"], tmp_path / "vae", "--latents_stats", str(tiny_vavae["stats"]))
    config = AutoencoderKL.from_pretrained(folder).config
    stats = torch.load(tiny_vavae["stats"])
    assert config.latents_mean == stats["mean"].flatten().double().tolist()
    assert config.latents_std == stats["std"].flatten().double().tolist()
    assert config.scaling_factor == 1.0  # latent_multiplier
    # datasets/img_latent_dataset.py: (z − mean) / std · latent_multiplier; diffusers: (z − mean) · scaling / std
    from diffusers_speedup.data.latent_dataset import LatentNormalization

    z = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(0))
    lightningdit = (z - stats["mean"]) / stats["std"] * 1.0
    ours = LatentNormalization.from_vae_config(config).normalize(z)
    torch.testing.assert_close(ours, lightningdit, rtol=1e-6, atol=1e-6)

    plain = convert(tiny_vavae["checkpoint"], tmp_path / "plain", "--latent_multiplier", "0.5")
    config = AutoencoderKL.from_pretrained(plain).config
    assert config.latents_mean is None and config.scaling_factor == 0.5


def test_a_plain_state_dict_without_level_attention_converts_too(tmp_path):
    # MAR's KL-16 (tokenizer/autoencoder.py model_type "marvae": no attention but the mid block), three levels here.
    shape = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, attn_levels=())
    state = random_ldm_state(ldm_state_shapes(**shape), seed=5)
    checkpoint = tmp_path / "kl.pt"
    torch.save(state, checkpoint)
    vae, dropped = vavae.load_vavae_checkpoint(checkpoint)
    assert not dropped and set(vae.config.down_block_types) == {"DownEncoderBlock2D"}
    vae = vae.double()
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state = {key: value.double() for key, value in state.items()}
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(images).latent_dist.mean, ldm_encode(state, images)[0])
        z = ldm_encode(state, images)[0]
        torch.testing.assert_close(vae.decode(z).sample, ldm_decode(state, z))


def test_wrong_and_truncated_files_name_the_keys(tiny_vavae, tmp_path):
    state = dict(tiny_vavae["state"])
    del state["decoder.up.4.attn.2.proj_out.bias"]
    state["encoder.down.1.extra.weight"] = torch.zeros(1)
    checkpoint = tmp_path / "broken.pt"
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointFormatError) as error:
        vavae.load_vavae_checkpoint(checkpoint)
    message = str(error.value)
    assert "VA-VAE" in message and "missing keys [decoder.up.4.attn.2.proj_out.bias]" in message
    assert "unexpected keys [encoder.down.1.extra.weight]" in message

    not_a_vae = tmp_path / "dit.pt"
    torch.save({"pos_embed": torch.zeros(1, 4, 8), "x_embedder.proj.weight": torch.zeros(8, 4, 2, 2)}, not_a_vae)
    with pytest.raises(
        CheckpointFormatError, match=r"missing keys \[decoder.conv_in.weight.*unexpected keys \[pos_embed"
    ):
        vavae.load_vavae_checkpoint(not_a_vae)

    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_vavae["checkpoint"].read_bytes()[:5000])
    with pytest.raises(CheckpointFormatError, match="VA-VAE.*truncated or not a torch file"):
        vavae.load_vavae_checkpoint(cut)

    stats = tmp_path / "latents_stats.pt"
    torch.save(latents_stats(16), stats)
    with pytest.raises(CheckpointFormatError, match="mean has 16 values .* 32 latent channels"):
        vavae.convert_vavae_checkpoint(tiny_vavae["checkpoint"], latents_stats=stats)
    torch.save({"mean": torch.zeros(32)}, stats)
    with pytest.raises(CheckpointFormatError, match="no 'std' tensor"):
        vavae.convert_vavae_checkpoint(tiny_vavae["checkpoint"], latents_stats=stats)


# --- cache-latents with a converted VA-VAE ----------------------------------------------------------------------------


def test_cache_latents_with_a_converted_vavae_and_train_on_its_per_channel_statistics(tiny_vavae, tmp_path):
    from diffusers_speedup.commands import cache_latents
    from diffusers_speedup.data.latent_dataset import LatentDataset
    from diffusers_speedup.training import load_config
    from diffusers_speedup.training.training_data import load_training_data

    folder = convert(tiny_vavae["checkpoint"], tmp_path / "vae", "--latents_stats", str(tiny_vavae["stats"]))
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png"
            )
    metadata = cache_latents.main(["--image_folder", str(tmp_path / "images"), "--output_dir", str(tmp_path / "cache"),
                                   "--vae", str(folder), "--resolution", str(IMAGE), "--batch_size", "4",
                                   "--num_workers", "0", "--no_progress"])  # fmt: skip
    assert metadata["latent_shape"] == [32, IMAGE // 16, IMAGE // 16] and metadata["num_accepted"] == 6
    stats = torch.load(tiny_vavae["stats"])
    assert metadata["latents_mean"] == stats["mean"].flatten().double().tolist()

    # The cached posterior is the LDM encoder's, on the ADM centre crop in [−1, 1].
    from diffusers_speedup.data.preprocessing import preprocess_image

    dataset = LatentDataset(str(tmp_path / "cache"), random_flip=False)
    index = next(i for i, path in enumerate(dataset.dataset["path"]) if path.endswith("a/0.png"))
    row = dataset.read_batch(np.array([index]))
    image = Image.open(tmp_path / "images" / "a" / "0.png")
    pixels = torch.from_numpy(np.array(preprocess_image(image, IMAGE))).permute(2, 0, 1)[None].double() / 127.5 - 1
    state = {key: value.double() for key, value in tiny_vavae["state"].items()}
    mean, std = ldm_encode(state, pixels)
    torch.testing.assert_close(row["mean"].double(), mean, rtol=0, atol=2e-3 * mean.abs().max().item())  # fp16 storage
    torch.testing.assert_close(row["std"].double(), std, rtol=0, atol=2e-3 * std.abs().max().item())

    def training_normalisation(*overrides):
        config = load_config(
            "imagenet256/lightningdit/lightningdit_xl1_vavae",
            [f"data.path={tmp_path / 'cache'}", "train.cpu=true", *overrides],
        )
        return load_training_data(config, "cpu").dataset.normalization

    # The recipe's per-channel normalisation to std 1 (LightningDiT's latent_norm with latent_multiplier 1.0,
    # statistics measured on the cache as extract_features.py measures them on its own) ...
    measured_mean, measured_std = dataset.latent_statistics()
    normalisation = training_normalisation()
    assert normalisation.latents_mean == tuple(measured_mean) and normalisation.latents_std == tuple(measured_std)
    assert normalisation.scaling_factor == 1.0
    # ... or the released latents_stats.pt that the converted VAE's config carries.
    recorded = training_normalisation("data.latent_norm=vae")
    assert recorded.latents_mean == tuple(metadata["latents_mean"]) and recorded.scaling_factor == 1.0


def test_the_released_f16d32_shape_is_read_and_mapped_onto_every_autoencoderkl_tensor():
    # tokenizer/configs/vavae_f16d32.yaml at full size, as shapes only (meta tensors).
    shapes = ldm_state_shapes(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32, attn_levels=(4,))
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    shape = vavae.ldm_autoencoder_shape(state, "vavae-imagenet256-f16d32-dinov2.pt")
    assert (shape.widths, shape.downsampling, shape.attn_levels) == ((128, 128, 256, 256, 512), 16, (4,))
    with torch.device("meta"):
        model = AutoencoderKL(**vavae.diffusers_vae_config(shape))
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    mapping = vavae.ldm_to_diffusers_keys(shape)
    assert set(mapping) == set(shapes) and set(mapping.values()) == set(ours)
    for official, name in mapping.items():  # 1×1 attention convolutions become linears
        expected = shapes[official][:2] if ".attn" in official and shapes[official][-1:] == (1,) else shapes[official]
        assert ours[name] == expected, official
