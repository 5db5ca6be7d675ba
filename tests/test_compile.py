"""``train.compile``: every model family traces into one graph and is not recompiled from step to step.

A graph break or a per-step recompilation would not fail a run, it would only make the compiled GPU run slow; this
is where such a change shows. Dynamo's tracing is what decides both, so the cheap ``eager`` backend stands in for
inductor here.
"""

import os
import sys

import pytest
import torch

from diffusers_speedup.models import DiTModel, EDM2UNetModel, UViTModel

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import wake_gains  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(torch.compiler, "set_stance"), reason="torch.compiler.set_stance: torch>=2.6"
)


def uvit():
    return UViTModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=5, num_attention_heads=2,
        num_classes=10, skip_scaling="learned_per_skip",
    )  # fmt: skip


def vit_minsnr():  # learned time table, q/v biases, no long skips
    return UViTModel.from_preset(
        "vit-b-minsnr", sample_size=8, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
        num_classes=10,
    )  # fmt: skip


def dit():
    return DiTModel(
        hidden_size=16, num_attention_heads=2, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_classes=10,
    )  # fmt: skip


def edm2():
    model = EDM2UNetModel(
        sample_size=8, in_channels=4, model_channels=16, channel_mult=(1, 2), num_blocks=1,
        attn_resolutions=(4,), channels_per_head=8, num_classes=10, logvar_channels=8,
    )  # fmt: skip
    wake_gains(model)
    return model


def loss(model, edm: bool, x, level, labels):
    """A stand-in loss that reaches every weight: EDM2 trains its learned uncertainty too."""
    if edm:
        output = model(x, level, labels, return_logvar=True)
        return output.sample.float().square().mean() + output.logvar.mean()
    return model(hidden_states=x, timestep=level, class_labels=labels).sample.float().square().mean()


def step_inputs(step: int, edm: bool):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    level = torch.rand(3, generator=generator) * 10 if edm else torch.randint(0, 1000, (3,), generator=generator)
    return x, level, torch.randint(0, 10, (3,), generator=generator)


@pytest.mark.parametrize("build", [uvit, vit_minsnr, dit, edm2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_forward_and_backward_compile_to_one_graph_without_recompiling(build, dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build().train()
    model.compile(backend="eager", fullgraph=True)  # in place, as the trainer does; fullgraph: a graph break raises
    edm = isinstance(model, EDM2UNetModel)
    for step in range(3):
        # After the first step, new timesteps, noise and labels must reuse the compiled graph.
        stance = "default" if step == 0 else "fail_on_recompile"
        with torch.compiler.set_stance(stance), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            value = loss(model, edm, *step_inputs(step, edm))
        value.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_uvit_compiles_block_by_block_with_diffusers_regional_compilation():
    # Each class of `_repeated_blocks` has one structure, so each is traced exactly once, whatever the depth: the
    # in- and mid-blocks share one graph, the out-blocks (with their skip merge) another.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = uvit().train()
    traced = []

    def counting_backend(graph_module, example_inputs):
        traced.append(graph_module)
        return graph_module.forward

    model.compile_repeated_blocks(backend=counting_backend, fullgraph=True)
    for step in range(3):
        with torch.compiler.set_stance("default" if step == 0 else "fail_on_recompile"):
            loss(model, False, *step_inputs(step, edm=False)).backward()
    assert all(p.grad is not None for p in model.parameters())
    kinds = {type(block).__name__ for block in model.blocks()}
    assert kinds == set(model._repeated_blocks) == {"UViTBlock", "UViTSkipBlock"}
    assert len(traced) == len(kinds)
    for kind in kinds:  # one structure per declared class
        shapes = {
            tuple((name, tuple(p.shape)) for name, p in block.named_parameters())
            for block in model.blocks()
            if type(block).__name__ == kind
        }
        assert len(shapes) == 1
