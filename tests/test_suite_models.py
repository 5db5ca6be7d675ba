"""The properties diffusers' `ModelTesterMixin` checks, for UViTModel and EDM2UNetModel, written for this package.

diffusers' mixins live in its GitHub test folder, which neither the wheel nor the sdist ships, so the same
properties are checked here with tiny configs: save/load round trip, from_config, determinism, output shape and
dict/tuple equivalence, training step and EMA, gradient checkpointing (same gradients), dtype on load and in the
forward pass, sharded checkpoints, variants, big-model loading (device_map, disk offload), layerwise casting, the
repeated blocks of regional compilation, and ConfigMixin's attribute access.

Mixin tests that do not apply, and why:
- `test_set_attn_processor_for_determinism`, `test_set_xformers_attn_processor_for_determinism`,
  `test_fused_qkv_projections`: neither model uses diffusers' `Attention` / attention processors (both call
  PyTorch's SDPA directly), so there is no processor to swap or fuse.
- LoRA / PEFT adapter tests (`test_lora_*`, `test_save_load_lora_adapter`): the models have no adapter loader mixin.
- `test_model_parallelism`, `test_cpu_offload`, `test_group_offloading*`, `test_layerwise_casting_memory`,
  `test_float16_*`: need an accelerator (two devices, or CUDA memory statistics); the CPU-side parts (device_map
  loading, disk offload, fp16/bf16 storage) are checked here.
- `test_torch_compile_*` (recompilation, graph breaks): covered by tests/test_compile.py; here only the structural
  precondition of regional compilation (identical repeated blocks) is checked, which needs no compiler.
- `test_forward_with_norm_groups`, `test_forward_signature` (UNetTesterMixin): they assume UNet2DModel's
  `norm_num_groups` / `block_out_channels` config and its `(sample, timestep)` names; EDM2 has no GroupNorm (its
  normalisation is fixed by the architecture) and takes σ.
- `test_from_save_pretrained_dynamo`: torch.compile in a subprocess; same reason as the compile tests above.
- `test_auto_model`: diffusers' AutoModel resolves a config's `_class_name` inside diffusers only (or through
  `auto_map` remote code); these classes are not part of diffusers.
- `test_deprecated_kwargs`: neither `__init__` takes `**kwargs`, and `_deprecated_kwargs` is empty, which is what
  that test asserts; checked below.
"""

import inspect
import json
import math

import pytest
import torch
from diffusers.training_utils import EMAModel
from tiny_models import TINY_EDM2, wake_gains

from diffusers_speedup.models.edm2_unet import EDM2UNetModel
from diffusers_speedup.models.uvit import UViTModel

UVIT_TINY = dict(
    sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_attention_heads=4, num_classes=10, num_layers=5
)


class UViTCase:
    model_class = UViTModel
    init = UVIT_TINY
    # Layers that layerwise casting must cast (diffusers casts nn.Linear / nn.Conv*), outside its skip patterns.
    cast_layer_types = (torch.nn.Linear, torch.nn.Conv2d)

    def build(self, seed=0, **overrides):
        torch.manual_seed(seed)
        return self.model_class(**{**self.init, **overrides})

    def inputs(self, batch=3):
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, 8, 8, generator=generator)
        return {"hidden_states": x, "timestep": torch.tensor([3.0, 250.0, 999.0])[:batch],
                "class_labels": torch.tensor([0, 7, 10])[:batch]}  # fmt: skip

    def prepare_for_gradients(self, model):
        pass


class EDM2Case(UViTCase):
    model_class = EDM2UNetModel
    init = TINY_EDM2

    def inputs(self, batch=3):
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, 16, 16, generator=generator)
        return {"sample": x, "sigma": torch.tensor([0.05, 1.0, 40.0])[:batch],
                "class_labels": torch.tensor([0, 4, 5])[:batch]}  # fmt: skip

    def prepare_for_gradients(self, model):
        wake_gains(model)


CASES = [UViTCase(), EDM2Case()]


@pytest.fixture(params=CASES, ids=lambda case: case.model_class.__name__)
def case(request):
    return request.param


def public_config(model) -> dict:
    """The config as JSON stores it (tuples become lists), without the bookkeeping keys."""
    return {k: v for k, v in json.loads(model.to_json_string()).items() if not k.startswith("_")}


def forward(model, inputs, **kwargs):
    return model(**inputs, **kwargs)[0]


# ------------------------------------------------------------------------------------------------------------------
# Saving, loading, configs


def test_save_load_round_trip(case, tmp_path):
    model = case.build().eval()
    model.save_pretrained(tmp_path)
    loaded = case.model_class.from_pretrained(tmp_path).eval()
    assert public_config(loaded) == public_config(model)
    for (name, a), (other, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(forward(model, case.inputs()), forward(loaded, case.inputs()))


def test_from_config_builds_the_same_architecture(case):
    model = case.build().eval()
    rebuilt = case.model_class.from_config(model.config).eval()
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(forward(model, case.inputs()), forward(rebuilt, case.inputs()))


def test_sharded_checkpoint_and_variant(case, tmp_path):
    model = case.build().eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    model.save_pretrained(tmp_path / "variant", variant="fp16")
    assert (tmp_path / "variant" / "diffusion_pytorch_model.fp16.safetensors").exists()
    with pytest.raises(OSError):
        case.model_class.from_pretrained(tmp_path / "variant")  # no plain weights in a variant-only folder
    with torch.no_grad():
        expected = forward(model, case.inputs())
        for loaded in (
            case.model_class.from_pretrained(tmp_path / "sharded"),
            case.model_class.from_pretrained(tmp_path / "variant", variant="fp16"),
        ):
            assert torch.equal(forward(loaded.eval(), case.inputs()), expected)


def test_big_model_loading_with_device_map_and_disk_offload(case, tmp_path):
    model = case.build().eval()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = forward(model, case.inputs())
        on_cpu = case.model_class.from_pretrained(tmp_path, device_map="cpu")
        assert torch.equal(forward(on_cpu.eval(), case.inputs()), expected)
    if case.model_class._no_split_modules is None:
        pytest.skip(
            f"{case.model_class.__name__} sets no _no_split_modules, so diffusers refuses device_map='auto' "
            "(the mixin skips its offload tests for the same reason)"
        )
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    offloaded = case.model_class.from_pretrained(
        tmp_path, device_map="auto", max_memory={"cpu": size // 3}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    with torch.no_grad():
        torch.testing.assert_close(forward(offloaded.eval(), case.inputs()), expected)


def test_getattr_and_deprecated_kwargs(case):
    model = case.build()
    model.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning):
        assert model.test_attribute == 5
    with pytest.raises(AttributeError, match=f"'{case.model_class.__name__}' object has no attribute 'nope'"):
        _ = model.nope
    assert "kwargs" not in inspect.signature(case.model_class.__init__).parameters
    assert not case.model_class._deprecated_kwargs


# ------------------------------------------------------------------------------------------------------------------
# Forward pass


def test_determinism_output_shape_and_tuple_output(case):
    model = case.build().eval()
    inputs = case.inputs()
    with torch.no_grad():
        first, second = forward(model, inputs), forward(model, inputs)
        as_dict = model(**inputs).sample
    assert torch.equal(first, second) and torch.equal(first, as_dict)
    sample = next(iter(inputs.values()))
    assert first.shape == sample.shape and torch.isfinite(first).all()


def test_dtype_on_load_and_in_the_forward_pass(case, tmp_path):
    model = case.build().eval()
    with torch.no_grad():
        reference = forward(model, case.inputs())
    keep_fp32 = tuple(case.model_class._keep_in_fp32_modules or ())
    for dtype in (torch.float16, torch.bfloat16):
        model.to(dtype).save_pretrained(tmp_path / str(dtype))
        loaded = case.model_class.from_pretrained(tmp_path / str(dtype), torch_dtype=dtype)
        for name, param in loaded.named_parameters():
            kept = any(name.startswith(prefix + ".") for prefix in keep_fp32)
            assert param.dtype == (torch.float32 if kept else dtype), name
        model.float()
    loaded = case.model_class.from_pretrained(tmp_path / str(torch.bfloat16), torch_dtype=torch.bfloat16).eval()
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in case.inputs().items()}
    with torch.no_grad():
        low = forward(loaded, inputs).float()
    relative = (low - reference).norm() / reference.norm()
    assert relative < 0.05, relative


# ------------------------------------------------------------------------------------------------------------------
# Training


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    output = forward(model, inputs)
    loss = (output.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_step_and_ema(case):
    model = case.build().train()
    case.prepare_for_gradients(model)
    ema = EMAModel(model.parameters(), decay=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    loss, grads = loss_and_grads(model, case.inputs())
    assert torch.isfinite(loss) and len(grads) > 0.9 * len(before)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ema.step(model.parameters())
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed > 0
    shadow = ema.shadow_params
    for old, new, avg in zip(before, model.parameters(), shadow):  # one step from the initial weights
        torch.testing.assert_close(avg, old + (1 - ema.cur_decay_value) * (new.detach() - old))


def test_gradient_checkpointing_gives_the_same_gradients(case):
    model = case.build().train()
    case.prepare_for_gradients(model)
    assert not model.is_gradient_checkpointing
    loss, grads = loss_and_grads(model, case.inputs())
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(model, case.inputs())
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


# ------------------------------------------------------------------------------------------------------------------
# Layerwise casting and regional compilation


@pytest.mark.parametrize("model_case", CASES, ids=lambda case: case.model_class.__name__)
def test_layerwise_casting_stores_weights_in_the_storage_dtype(model_case):
    model = model_case.build().eval()
    with torch.no_grad():
        reference = forward(model, model_case.inputs())
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    weights = [p for p in model.parameters() if p.ndim >= 2]
    stored = [p for p in weights if p.dtype == torch.float8_e4m3fn]
    # Everything but the layers diffusers deliberately skips (embeddings, norms, patch/pos embeddings) is cast.
    assert len(stored) >= len(weights) // 2, f"{len(stored)} of {len(weights)} weight matrices stored in float8"
    with torch.no_grad():
        output = forward(model, model_case.inputs())
    assert all(p.dtype == torch.float8_e4m3fn for p in stored)  # cast back for storage after the forward pass
    cosine = torch.nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.9, cosine


def test_layerwise_casting_trains_like_the_storage_rounded_weights(case):
    """A training step with float8 storage computes what float32 weights rounded to float8 compute.

    The weights a forward pass uses must stay readable by backward after layerwise casting has put them back into
    storage (EDM2's weight normalisation once saved the Parameter itself, whose storage then turned float8)."""
    cast = case.build().train()
    case.prepare_for_gradients(cast)
    cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    rounded = case.build().train()
    case.prepare_for_gradients(rounded)
    with torch.no_grad():
        for p_cast, p_rounded in zip(cast.parameters(), rounded.parameters()):
            p_rounded.copy_(p_cast.float())
    assert any(p.dtype == torch.float8_e4m3fn for p in cast.parameters())
    loss, grads = loss_and_grads(cast, case.inputs())
    loss_rounded, grads_rounded = loss_and_grads(rounded, case.inputs())
    torch.testing.assert_close(loss, loss_rounded)
    assert grads.keys() == grads_rounded.keys()
    for name in grads:
        torch.testing.assert_close(grads[name].float(), grads_rounded[name], msg=name)


def block_structure(block: torch.nn.Module):
    return [(name, type(module).__name__) for name, module in block.named_modules()]


def test_uvit_repeated_blocks_are_identical_for_regional_compilation():
    model = UViTCase().build()
    for class_name in model._repeated_blocks:
        blocks = [m for m in model.modules() if type(m).__name__ == class_name]
        assert len(blocks) > 1
        structures = {tuple(block_structure(block)) for block in blocks}
        assert len(structures) == 1, f"{len(structures)} different {class_name} structures"


def test_edm2_layerwise_casting_keeps_the_fourier_features_in_float32():
    """What must stay true once EDM2's weights are cast: the _keep_in_fp32_modules are never cast."""
    model = EDM2Case().build()
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    for prefix in model._keep_in_fp32_modules:
        for name, tensor in getattr(model, prefix).state_dict().items():
            assert tensor.dtype == torch.float32, f"{prefix}.{name}"
    assert math.isfinite(forward(model, EDM2Case().inputs()).abs().max().item())
