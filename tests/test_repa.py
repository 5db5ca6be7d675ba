"""Representation alignment (REPA) against its official code, written out here in the official layouts and names:
sihyun-yu/REPA@67f7145 (`train.py` preprocess_raw_image and the loss assembly, `loss.py` SILoss, `models/sit.py`
build_mlp, initialize_weights and SiT.forward, `utils.py` load_encoders with timm's resample_abs_pos_embed), and
iREPA's options (End2End-Diffusion/iREPA@99ad4ac `ldm/models/sit.py` ProjectionLayer, `ldm/utils.py`
spatial_zscore). Every encoder is a tiny random DINOv2 built from a config; nothing is downloaded."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, EDMEulerScheduler
from tiny_models import tiny_dit, tiny_edm2, tiny_uvit, wake_gains
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

import diffusers_speedup as ds
from diffusers_speedup.data import Batch
from diffusers_speedup.models import DiTModel
from diffusers_speedup.objectives import DiffusionObjective
from diffusers_speedup.objectives.flow import FlowPath
from diffusers_speedup.objectives.repa import (
    ConvProjector,
    FrozenEncoder,
    RepresentationAlignment,
    encoder_input,
    mlp_projector,
    negative_cosine,
    resample_position_embedding,
    spatial_zscore,
)
from diffusers_speedup.training.step import TrainingModule, optimizer_step
from tests.test_dit_convert import official_state_dict

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)  # timm.data
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def tiny_dinov2(registers: int = 0, hidden: int = 12, seed: int = 0):
    """A two-layer DINOv2 with the real one's 37×37 position table (image_size 518, patch 14)."""
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=518,
                  patch_size=14)  # fmt: skip
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common)).eval()
    return Dinov2Model(Dinov2Config(**common)).eval()


def images(batch=2, resolution=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, resolution, resolution), generator=generator, dtype=torch.uint8)


# --- the official definitions, written out ---------------------------------------------------------------------------


def repa_preprocess_raw_image(x):
    """train.py `preprocess_raw_image`, its 'dinov2' branch (torchvision's Normalize written out). REPA sizes the
    resize `224 * (resolution // 256)`, which is 224·R/256 at its 256 and 512 px; written as 224·R/256 here so that
    the tiny tests can run at 64 px."""
    resolution = x.shape[-1]
    x = x / 255.0
    mean = torch.as_tensor(IMAGENET_DEFAULT_MEAN, dtype=x.dtype)[:, None, None]
    std = torch.as_tensor(IMAGENET_DEFAULT_STD, dtype=x.dtype)[:, None, None]
    x = (x - mean) / std
    return torch.nn.functional.interpolate(x, 224 * resolution // 256, mode="bicubic")


def timm_resample_abs_pos_embed(posemb, new_size, num_prefix_tokens=1, interpolation="bicubic", antialias=True):
    """timm/layers/pos_embed.py `resample_abs_pos_embed` (square old size), as utils.py load_encoders calls it."""
    num_pos_tokens = posemb.shape[1]
    num_new_tokens = new_size[0] * new_size[1] + num_prefix_tokens
    if num_new_tokens == num_pos_tokens and new_size[0] == new_size[1]:
        return posemb
    hw = int(math.sqrt(num_pos_tokens - num_prefix_tokens))
    posemb_prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    embed_dim = posemb.shape[-1]
    orig_dtype = posemb.dtype
    posemb = posemb.float().reshape(1, hw, hw, -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=new_size, mode=interpolation, antialias=antialias)
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, embed_dim).to(orig_dtype)
    return torch.cat([posemb_prefix, posemb], dim=1)


def repa_encoder(model, resolution):
    """utils.py load_encoders for DINOv2: the stored table resampled to 16·R/256 per side, once."""
    encoder = copy.deepcopy(model)
    patch_resolution = 16 * resolution // 256
    encoder.embeddings.position_embeddings.data = timm_resample_abs_pos_embed(
        encoder.embeddings.position_embeddings.data, [patch_resolution, patch_resolution]
    )
    return encoder.eval()


def repa_targets(encoder, raw_image, registers=0):
    """train.py: `encoder.forward_features(preprocess_raw_image(raw_image))['x_norm_patchtokens']`."""
    with torch.no_grad():
        out = encoder(pixel_values=repa_preprocess_raw_image(raw_image)).last_hidden_state
    return out[:, 1 + registers :]


def repa_proj_loss(zs, zs_tilde):
    """loss.py SILoss: the projection loss over encoders and samples."""
    proj_loss = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = torch.nn.functional.normalize(z_tilde_j, dim=-1)
            z_j = torch.nn.functional.normalize(z_j, dim=-1)
            proj_loss += torch.mean(-(z_j * z_tilde_j).sum(dim=-1))
    return proj_loss / (len(zs) * bsz)


def irepa_spatial_zscore(feat, alpha, eps=1e-6):
    """iREPA ldm/utils.py `spatial_zscore`."""
    mean = feat.mean(dim=1, keepdim=True)
    std = feat.std(dim=1, keepdim=True)
    return (feat - alpha * mean) / (std + eps)


def repa_sit_forward(p, x, t, y, encoder_depth, heads, num_classes, dropout_prob):
    """models/sit.py `SiT.forward` in training mode on a state dict of official names: timm's PatchEmbed, the
    fixed sin-cos table, TimestepEmbedder (t unscaled), LabelEmbedder with token_drop, SiTBlocks (timm Attention
    with its fused SDPA, Mlp with tanh GELU), the projector on block `encoder_depth`'s output, the final layer."""

    def linear(h, name):
        return F.linear(h, p[f"{name}.weight"], p[f"{name}.bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    patch = p["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x, p["x_embedder.proj.weight"], p["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + p["pos_embed"]
    n, tokens, d = h.shape
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)
    t_embed = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    drop_ids = torch.rand(y.shape[0]) < dropout_prob  # LabelEmbedder.token_drop
    y = torch.where(drop_ids, num_classes, y)
    c = t_embed + p["y_embedder.embedding_table.weight"][y]
    depth = 1 + max(int(key.split(".")[1]) for key in p if key.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(
            F.silu(c), f"{b}.adaLN_modulation.1"
        ).chunk(6, dim=-1)
        a = modulate(F.layer_norm(h, (d,), eps=1e-6), shift_msa, scale_msa)
        q, k, v = linear(a, f"{b}.attn.qkv").reshape(n, tokens, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, d)
        h = h + gate_msa.unsqueeze(1) * linear(a, f"{b}.attn.proj")
        m = modulate(F.layer_norm(h, (d,), eps=1e-6), shift_mlp, scale_mlp)
        m = linear(F.gelu(linear(m, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        h = h + gate_mlp.unsqueeze(1) * m
        if (i + 1) == encoder_depth:
            z = h.reshape(-1, d)
            z = linear(F.silu(linear(F.silu(linear(z, "projectors.0.0")), "projectors.0.2")), "projectors.0.4")
            zs = [z.reshape(n, tokens, -1)]
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    h = linear(modulate(F.layer_norm(h, (d,), eps=1e-6), shift, scale), "final_layer.linear")
    out = h.shape[-1] // patch**2
    side = int(tokens**0.5)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(n, side, side, patch, patch, out))
    return h.reshape(n, out, side * patch, side * patch), zs


# --- the encoder ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [256, 512])
def test_encoder_input_is_repas_preprocess_raw_image(resolution):
    raw = images(2, resolution)
    ours = encoder_input(raw)
    assert ours.shape == (2, 3, 224 * resolution // 256, 224 * resolution // 256)
    assert torch.equal(ours, repa_preprocess_raw_image(raw))
    # Float images in [0, 255] (pixel-space data, (x0 + 1)·127.5) go the same way; gray is gray in R, G and B.
    assert torch.equal(encoder_input(raw.float()), ours)
    gray = raw[:, :1]
    assert torch.equal(encoder_input(gray), repa_preprocess_raw_image(gray.expand(-1, 3, -1, -1)))


def test_the_position_table_is_timms_resample_and_transformers_own_interpolation_differs():
    """DINOv2's 37×37 table to the 16×16 grid of 224 px. timm resizes bicubically with antialiasing; transformers'
    Dinov2Model, given 224 px images and the stored table, resizes without it: on this random table (std 0.02) its
    positions differ by up to 0.05 (mean 0.011). Its with-registers variant antialiases, as timm does."""
    plain = tiny_dinov2()
    table = plain.embeddings.position_embeddings.detach()
    ours = resample_position_embedding(table, 16)
    timm = timm_resample_abs_pos_embed(table, [16, 16])
    assert ours.shape == (1, 257, 12) and torch.equal(ours, timm)
    assert resample_position_embedding(ours, 16) is ours  # already on the grid: kept as it is, as timm does

    patches = torch.zeros(1, 257, 12)
    transformers_table = plain.embeddings.interpolate_pos_encoding(patches, 224, 224).detach()
    torch.testing.assert_close(transformers_table[:, :1], timm[:, :1])  # the class row is kept by both
    difference = (transformers_table - timm).abs()
    assert difference.max() > 0.02 and difference.mean() > 0.005

    registers = tiny_dinov2(registers=4)
    table = registers.embeddings.position_embeddings.detach()
    with_registers = registers.embeddings.interpolate_pos_encoding(patches, 224, 224).detach()
    torch.testing.assert_close(with_registers, timm_resample_abs_pos_embed(table, [16, 16]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("registers", [0, 4])
def test_the_encoder_gives_repas_x_norm_patchtokens(registers):
    model = tiny_dinov2(registers)
    reference = repa_encoder(model, 64)
    raw = images(2, 64)
    encoder = FrozenEncoder(model, resolution=64)
    ours = encoder(raw)
    assert ours.shape == (2, 16, 12) and (encoder.grid, encoder.dim) == (4, 12)
    torch.testing.assert_close(ours, repa_targets(reference, raw, registers), rtol=1e-5, atol=1e-6)
    # Frozen, in eval mode, no gradient; under autocast it runs in the autocast precision, as REPA's does.
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert not ours.requires_grad
    dtypes = []
    hook = model.encoder.layer[0].mlp.fc1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoder(raw)
    hook.remove()
    assert dtypes == [torch.bfloat16]
    with pytest.raises(ValueError, match="set up for 64 px images"):
        encoder(images(1, 32))


def test_an_encoder_that_is_not_dinov2_is_refused_naming_the_encoder(tmp_path):
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"encoder '.*bert' is a 'bert' model, not a DINOv2 vision encoder"):
        FrozenEncoder.from_pretrained(str(tmp_path / "bert"), 256)
    vit = ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
    with pytest.raises(ValueError, match="ViTModel .*'vit'.* is not a DINOv2 vision encoder"):
        FrozenEncoder(vit, 256)
    with pytest.raises(ValueError, match=r"encoder '.*nowhere' cannot be read"):
        FrozenEncoder.from_pretrained(str(tmp_path / "nowhere"), 256)
    with pytest.raises(ValueError, match="input of 35 px is not a whole number of its 14 px patches"):
        FrozenEncoder(tiny_dinov2(), 40)  # REPA's 224·40/256 = 35 px


# --- the projectors, the loss, iREPA's z-score ----------------------------------------------------------------------


def test_the_mlp_projector_is_repas_build_mlp_initialised_as_its_initialize_weights():
    """SiT-XL/2 (D = 1152) to DINOv2-B (C = 768) through 2048: REPA's shapes and names; `initialize_weights`
    applies xavier_uniform and a zero bias to every nn.Linear of the SiT, the projectors included."""
    torch.manual_seed(0)
    projector = mlp_projector(1152, 2048, 768)
    shapes = {name: tuple(p.shape) for name, p in projector.named_parameters()}
    assert shapes == {
        "0.weight": (2048, 1152), "0.bias": (2048,), "2.weight": (2048, 2048), "2.bias": (2048,),
        "4.weight": (768, 2048), "4.bias": (768,),
    }  # fmt: skip
    assert [type(layer).__name__ for layer in projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    for index in (0, 2, 4):
        weight, bias = projector[index].weight.detach(), projector[index].bias.detach()
        bound = math.sqrt(6 / (weight.shape[0] + weight.shape[1]))  # xavier-uniform: U(−b, b)
        assert torch.count_nonzero(bias) == 0
        assert weight.abs().max() <= bound and weight.abs().max() > 0.999 * bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
        assert abs(weight.mean().item()) < 0.01 * bound


def test_the_conv_projector_is_ireparas_projection_layer():
    """ProjectionLayer('conv'): Conv2d(D, C, k, stride 1, padding k // 2) over the (B, D, H, W) grid, PyTorch's
    default init (iREPA's initialize_weights touches nn.Linear only)."""
    torch.manual_seed(4)
    ours = ConvProjector(16, 12, kernel_size=3)
    torch.manual_seed(4)
    theirs = torch.nn.Conv2d(16, 12, kernel_size=3, stride=1, padding=1)
    assert torch.equal(ours.conv.weight, theirs.weight) and torch.equal(ours.conv.bias, theirs.bias)
    x = torch.randn(2, 25, 16)
    B, T, D = x.shape
    H = W = math.isqrt(T)
    x_ = x.reshape(B, H, W, D).permute(0, 3, 1, 2).contiguous()
    expected = theirs(x_).permute(0, 2, 3, 1).contiguous().reshape(B, T, -1)
    torch.testing.assert_close(ours(x), expected)
    assert ConvProjector(16, 12).conv.kernel_size == (1, 1)  # iREPA's trainer default
    with pytest.raises(ValueError, match="conv_kernel_size 2: must be odd"):
        ConvProjector(16, 12, kernel_size=2)


def test_the_loss_on_fixed_tensors_is_repas_loss_py():
    generator = torch.Generator().manual_seed(0)
    zs = torch.randn(3, 16, 12, generator=generator)
    zs_tilde = torch.randn(3, 16, 12, generator=generator)
    per_sample = negative_cosine(zs_tilde, zs)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), repa_proj_loss([zs], [zs_tilde]))
    # Negative cosine: −1 when aligned, not 1 − cos.
    torch.testing.assert_close(negative_cosine(zs, 2 * zs), torch.full((3,), -1.0))

    # Through the module: λ times that, per sample, from the hooked hidden state and precomputed features.
    block = torch.nn.Identity()
    alignment = RepresentationAlignment(block, hidden_size=8, encoder_dim=12, projector_dim=16, weight=0.5)
    hidden = torch.randn(3, 16, 8, generator=generator)
    block(hidden)
    term = alignment(encoder_features=zs)
    torch.testing.assert_close(term, 0.5 * negative_cosine(alignment.projector(hidden), zs))


def test_the_spatial_zscore_is_ireparas():
    features = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(1)) * 3 + 1
    torch.testing.assert_close(spatial_zscore(features, 0.6), irepa_spatial_zscore(features, 0.6))
    block = torch.nn.Identity()
    alignment = RepresentationAlignment(block, 8, encoder_dim=12, projector_dim=16, zscore_alpha=0.6)
    hidden = torch.randn(2, 16, 8)
    block(hidden)
    expected = 0.5 * negative_cosine(alignment.projector(hidden), irepa_spatial_zscore(features, 0.6))
    torch.testing.assert_close(alignment(encoder_features=features), expected)


# --- one optimizer step against REPA's train.py ---------------------------------------------------------------------


def test_one_optimizer_step_equals_repas_train_py():
    """From the same weights, batch, t, noise and label drops: REPA's SiT forward with zs from block
    `encoder_depth`, SILoss, `loss_mean + proj_coeff * proj_loss_mean`, clipping at 1.0 and AdamW, against the
    trainer's TrainingModule (DiTModel + flow objective + RepresentationAlignment) and optimizer_step."""
    hidden, heads, depth, classes, encoder_depth, batch = 32, 2, 3, 10, 2, 4
    state = official_state_dict(hidden=hidden, depth=depth, classes=classes, learn_sigma=False, seed=1)
    generator = torch.Generator().manual_seed(3)
    projector = {
        "projectors.0.0.weight": torch.randn(16, hidden, generator=generator) * 0.2,
        "projectors.0.0.bias": torch.randn(16, generator=generator) * 0.2,
        "projectors.0.2.weight": torch.randn(16, 16, generator=generator) * 0.2,
        "projectors.0.2.bias": torch.randn(16, generator=generator) * 0.2,
        "projectors.0.4.weight": torch.randn(12, 16, generator=generator) * 0.2,
        "projectors.0.4.bias": torch.randn(12, generator=generator) * 0.2,
    }
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    y = torch.tensor([1, 5, 9, 2])
    raw_image = images(batch, 64, seed=2)
    dino = tiny_dinov2()
    lr = 1e-3

    # REPA's train.py.
    params = {k: v.clone().requires_grad_(k != "pos_embed") for k, v in {**state, **projector}.items()}
    zs = [repa_targets(repa_encoder(dino, 64), raw_image)]
    torch.manual_seed(5)
    time_input = torch.rand((batch, 1, 1, 1))
    noises = torch.randn_like(x)
    model_input = (1 - time_input) * x + time_input * noises
    model_target = -1 * x + 1 * noises
    model_output, zs_tilde = repa_sit_forward(params, model_input, time_input.flatten(), y, encoder_depth, heads,
                                              classes, 0.1)  # fmt: skip
    denoising_loss = torch.mean((model_output - model_target) ** 2, dim=[1, 2, 3])
    proj_loss = repa_proj_loss(zs, zs_tilde)
    loss = denoising_loss.mean() + proj_loss.mean() * 0.5
    loss.backward()
    trained = [p for p in params.values() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8).step()

    # The trainer's path.
    model = DiTModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=depth, hidden_size=hidden,
                     num_attention_heads=heads, num_classes=classes, class_dropout_prob=0.1)  # fmt: skip
    model.load_state_dict(state)
    alignment = RepresentationAlignment.attach(model, encoder_depth, 64, encoder=copy.deepcopy(dino), projector_dim=16)
    alignment.projector.load_state_dict({k.removeprefix("projectors.0."): v for k, v in projector.items()})
    module = TrainingModule(model, DiffusionObjective(FlowPath("linear")), auxiliary_losses=[alignment])
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    accelerator = Accelerator(cpu=True)
    module, optimizer = accelerator.prepare(module, optimizer)
    outputs = []
    module.register_forward_hook(lambda m, args, output: outputs.append(output))
    torch.manual_seed(5)
    grad_norm, skipped = optimizer_step(accelerator, module, optimizer, [Batch(x, y, {"image": raw_image})], 1.0)

    assert not skipped and grad_norm > 1.0  # the clipping is in play
    (output,) = outputs
    torch.testing.assert_close(output.terms["repa_loss"].mean(), 0.5 * proj_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss.mean(), loss.detach(), rtol=1e-5, atol=1e-6)
    ours = {**model.state_dict(), **{f"projectors.0.{k}": v for k, v in alignment.projector.state_dict().items()}}
    for name, value in params.items():
        actual, expected = ours[name], value.detach()
        if name.endswith("attn.qkv.bias"):
            # The key bias adds the same q·b_k to a query's every logit, which softmax ignores: its gradient is 0 up
            # to rounding (~1e-10), and Adam, g / (|g| + ε), turns rounding into steps of up to lr·g/ε. Compared
            # without it; the query and value biases are compared.
            actual, expected = (
                torch.cat([actual[:hidden], actual[2 * hidden :]]),
                torch.cat([expected[:hidden], expected[2 * hidden :]]),
            )
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


# --- every family, every objective ----------------------------------------------------------------------------------


def family_model(family):
    """A tiny model of each family, the block REPA reads, the image side it fits, and how to call it."""
    if family == "dit":  # 8×8 latents, patch 2: a 4×4 grid, as 64 px images give DINOv2
        return tiny_dit(out_channels=4), 2, 64
    if family == "uvit":  # U-ViT's in-block output starts with its time and class tokens
        return tiny_uvit(in_channels=4), 1, 64
    # EDM2's encoder: block 1 at 16×16 (16 channels), block 2 the downsampling one at 8×8, block 3 at 8×8 (32).
    return wake_gains(tiny_edm2(in_channels=4)), 2, 128


def call(model, x):
    labels = torch.tensor([1, 2])
    if isinstance(model, ds.EDM2UNetModel):
        return model(x, torch.tensor([0.5, 2.0]), labels)
    return model(hidden_states=x, timestep=torch.tensor([10, 500]), class_labels=labels)


@pytest.mark.parametrize("family", ["dit", "uvit", "edm2"])
def test_every_family_gives_the_patch_tokens_of_its_block(family):
    model, depth, resolution = family_model(family)
    size = model.config.sample_size
    alignment = RepresentationAlignment.attach(model, depth, resolution, encoder=tiny_dinov2(), projector_dim=16)
    seen = {}
    blocks = getattr(model, {"dit": "blocks", "uvit": "in_blocks", "edm2": "encoder"}[family])
    blocks[depth - 1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    call(model, torch.randn(2, 4, size, size))
    out = seen["out"]
    expected = {
        "dit": lambda: out,  # (B, 16, 32)
        "uvit": lambda: out[:, model.num_extra_tokens :],  # time and class tokens dropped
        "edm2": lambda: out.flatten(2).transpose(1, 2),  # (B, 32, 8, 8) → (B, 64, 32), row-major
    }[family]()
    assert torch.equal(alignment._hidden_state, expected)
    assert expected.shape[1] == (resolution // 16) ** 2
    assert alignment.projector[0].in_features == expected.shape[2]
    term = alignment(image=images(2, resolution))
    assert term.shape == (2,) and torch.isfinite(term).all()


def objective_for(family, schedule, prediction):
    if schedule == "flow":
        return DiffusionObjective(FlowPath("linear"))
    if schedule == "edm":
        conditioning = "sigma" if family == "edm2" else "timestep"
        return DiffusionObjective(EDMEulerScheduler(), prediction_type=prediction, conditioning=conditioning)
    return DiffusionObjective(DDPMScheduler(num_train_timesteps=100), prediction_type=prediction)


@pytest.mark.parametrize(
    "family, schedule, prediction",
    [
        ("dit", "ddpm", "epsilon"), ("dit", "ddpm", "v_prediction"), ("dit", "ddpm", "sample"),
        ("dit", "edm", "epsilon"), ("dit", "flow", "velocity"), ("uvit", "ddpm", "epsilon"),
        ("edm2", "edm", "sample"),
    ],
)  # fmt: skip
def test_the_term_is_added_under_every_objective_family(family, schedule, prediction):
    """REPA reads the hidden state only: with any objective the loss is the objective's plus λ·(−cos), per sample."""
    model, depth, resolution = family_model(family)
    size = model.config.sample_size
    alignment = RepresentationAlignment.attach(model, depth, resolution, encoder=tiny_dinov2(), projector_dim=16)
    objective = objective_for(family, schedule, prediction)
    module = TrainingModule(model, objective, auxiliary_losses=[alignment])
    x0, labels, raw = torch.randn(2, 4, size, size), torch.tensor([1, 2]), images(2, resolution)
    torch.manual_seed(3)
    output = module(x0, labels, image=raw)
    torch.manual_seed(3)
    plain = objective(model, x0, labels)
    term = output.terms["repa_loss"]
    assert term.shape == (2,) and torch.isfinite(term).all() and (term.abs() <= 0.5).all()
    torch.testing.assert_close(output.loss, plain.loss + term)


# --- HASTE's stop ----------------------------------------------------------------------------------------------------


def stopping_module(stop_after_step=2):
    model = tiny_dit(out_channels=4)
    alignment = RepresentationAlignment.attach(
        model, 1, 64, encoder=tiny_dinov2(), projector_dim=16, stop_after_step=stop_after_step
    )
    return TrainingModule(model, DiffusionObjective(FlowPath("linear")), auxiliary_losses=[alignment]), alignment


def test_after_the_stop_the_term_is_zero_the_encoder_idle_and_every_projector_weight_gets_a_zero_gradient(monkeypatch):
    module, alignment = stopping_module(stop_after_step=2)
    x0, labels, raw = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), images(2, 64)
    module.set_step(1)  # the second step: still aligned
    assert module(x0, labels, image=raw).terms["repa_loss"].abs().min() > 0

    def idle(images):
        raise AssertionError("the encoder ran after the stop")

    monkeypatch.setattr(alignment, "encoder", idle)
    module.set_step(2)  # two steps done: the third step no longer aligns
    output = module(x0, labels, image=raw)
    assert torch.equal(output.terms["repa_loss"], torch.zeros(2))
    output.loss.mean().backward()
    for name, parameter in alignment.projector.named_parameters():
        assert parameter.grad is not None and torch.count_nonzero(parameter.grad) == 0, name


def test_ddp_trains_through_the_stop_without_find_unused_parameters():
    """DDP expects a gradient for every trained parameter in every step, and otherwise fails in the next one. The
    stopped term keeps the projector in the graph with a zero gradient, so the run goes on; dropping the term (the
    control) is what breaks."""
    import torch.distributed as dist

    class Dropped(RepresentationAlignment):
        def loss(self, hidden_state, **extras):
            return torch.zeros(hidden_state.shape[0]) if self.stopped else super().loss(hidden_state, **extras)

    x0, labels, raw = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), images(2, 64)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for cls, fails in ((RepresentationAlignment, False), (Dropped, True)):
            module, alignment = stopping_module(stop_after_step=1)
            alignment.__class__ = cls
            ddp = torch.nn.parallel.DistributedDataParallel(module)
            try:
                for step in range(3):
                    module.set_step(step)
                    ddp(x0, labels, image=raw).loss.mean().backward()
            except RuntimeError as error:
                assert fails and "Expected to have finished reduction" in str(error)
            else:
                assert not fails
    finally:
        dist.destroy_process_group()


# --- the drop-in for diffusers transformers ---------------------------------------------------------------------------


def test_attached_to_a_diffusers_dit_it_aligns_a_transformer_blocks_output():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)  # fmt: skip
    keys = set(transformer.state_dict())
    repa = ds.RepresentationAlignment.attach(transformer, depth=1, resolution=64, encoder=tiny_dinov2())
    seen = {}
    transformer.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    transformer(torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 2]), class_labels=torch.tensor([1, 2]))
    raw = images(2, 64)
    loss = repa(image=raw).mean()
    expected = 0.5 * negative_cosine(repa.projector(seen["h"]), repa_targets(repa_encoder(tiny_dinov2(), 64), raw))
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in repa.parameters())
    # The transformer is untouched; the alignment module holds the projector and nothing else (no encoder weights).
    assert set(transformer.state_dict()) == keys
    assert {key.split(".")[0] for key in repa.state_dict()} == {"projector"}
    assert repa.projector[0].in_features == 16  # heads × head dim
    with pytest.raises(ValueError, match="depth 3 is not a block of this DiTTransformer2DModel, which has 2"):
        ds.RepresentationAlignment.attach(transformer, depth=3, resolution=64, encoder=tiny_dinov2())


def test_attached_to_sd3_and_flux_it_reads_the_image_stream_of_a_joint_block():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)  # fmt: skip
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4))  # fmt: skip
    text, pooled, t = torch.randn(2, 5, 16), torch.randn(2, 8), torch.tensor([0.3, 0.6])
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    runs = {  # Flux's depth 2 is its first single-stream block, after the one double-stream block
        "sd3": (sd3, 1, lambda: sd3(torch.randn(2, 4, 8, 8), text, pooled, t)),
        "flux": (flux, 2, lambda: flux(torch.randn(2, 16, 16), text, pooled, t, img_ids=img_ids.reshape(-1, 3),
                                       txt_ids=torch.zeros(5, 3))),
    }  # fmt: skip
    for name, (transformer, depth, forward) in runs.items():
        repa = ds.RepresentationAlignment.attach(transformer, depth, 64, encoder=tiny_dinov2(), projector_dim=16)
        blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", ())]
        seen = {}
        blocks[depth - 1].register_forward_hook(lambda m, a, out, seen=seen: seen.setdefault("out", out))
        forward()
        encoder_states, image_states = seen["out"]
        assert encoder_states.shape[1] == 5 and image_states.shape[1] == 16, name
        assert torch.equal(repa._hidden_state, image_states), name
        assert torch.isfinite(repa(image=images(2, 64))).all(), name
