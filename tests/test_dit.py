"""DiTModel is the DiT of the paper's official code: sizes, initialisation, label dropout, and the diffusers layout.

Expected numbers come from the official definition (facebookresearch/DiT models.py), written out here, and from the
paper's Table 4, never from the class under test.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel

from diffusers_speedup import ClassConditionalPipeline, DiTModel
from diffusers_speedup.hub import export_pipeline
from diffusers_speedup.models.dit_transformer import (
    DIT_PRESETS,
    diffusers_to_dit_state_dict,
    dit_to_diffusers_state_dict,
)

# DiT paper, Table 1 (layers, hidden size, heads) and Table 4 (parameters in millions, rounded).
PAPER_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
PAPER_PARAMS_M = {"s": 33, "b": 130, "l": 458, "xl": 675}


def official_parameter_count(depth, hidden, patch, in_channels=4, input_size=32, num_classes=1000, learn_sigma=True):
    """sum(p.numel()) of the official `DiT(...)`, written out from its modules (timm PatchEmbed, Attention with
    qkv bias, Mlp with ratio 4, TimestepEmbedder with 256 frequencies, LabelEmbedder with the CFG row, the frozen
    pos_embed parameter, FinalLayer)."""

    def linear(i, o):
        return i * o + o

    out_channels = 2 * in_channels if learn_sigma else in_channels
    block = linear(hidden, 6 * hidden) + linear(hidden, 3 * hidden) + linear(hidden, hidden)
    block += linear(hidden, 4 * hidden) + linear(4 * hidden, hidden)
    x_embedder = in_channels * patch * patch * hidden + hidden
    t_embedder = linear(256, hidden) + linear(hidden, hidden)
    y_embedder = (num_classes + 1) * hidden
    pos_embed = (input_size // patch) ** 2 * hidden
    final_layer = linear(hidden, 2 * hidden) + linear(hidden, patch * patch * out_channels)
    return depth * block + x_embedder + t_embedder + y_embedder + pos_embed + final_layer


def tiny(**overrides):
    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=3, hidden_size=32,
                  num_attention_heads=2, num_classes=10)  # fmt: skip
    return DiTModel(**{**config, **overrides})


def randomize(model, seed=0):
    """Non-zero weights everywhere (DiT's zero init would hide most of the network from an output comparison)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":  # the fixed sin-cos table stays
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def inputs(batch=3, size=8, num_classes=10):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=generator)
    t = torch.tensor([0, 421, 999][:batch])
    y = torch.tensor([1, num_classes, 7][:batch])  # includes the null label
    return x, t, y


# --- sizes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(PAPER_SIZES))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_presets_have_the_official_parameter_counts_and_the_papers(size, patch):
    depth, hidden, heads = PAPER_SIZES[size]
    assert DIT_PRESETS[f"dit-{size}-{patch}"] == {
        "num_layers": depth, "hidden_size": hidden, "num_attention_heads": heads, "patch_size": patch,
    }  # fmt: skip
    with torch.device("meta"):
        model = DiTModel.from_preset(f"dit-{size}-{patch}", out_channels=8)  # 256 px latents, learned σ
    count = sum(p.numel() for p in model.parameters())
    assert count == official_parameter_count(depth, hidden, patch)
    # Table 4 rounds to millions (e.g. XL/2 675.13 M → 675, XL/8 675.68 M → 675).
    assert abs(count / 1e6 - PAPER_PARAMS_M[size]) < 1


def test_dit_xl_2_is_675m_parameters():
    with torch.device("meta"):
        model = DiTModel.from_preset("dit-xl-2", out_channels=8)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_closed_form_count_matches_a_tiny_model_module_by_module():
    model = tiny(num_classes=10)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    assert counts["t_embedder"] == 256 * 32 + 32 + 32 * 32 + 32
    assert counts["y_embedder"] == 11 * 32
    assert counts["blocks"] == 3 * (32 * 192 + 192 + 32 * 96 + 96 + 32 * 32 + 32 + 32 * 128 + 128 + 128 * 32 + 32)
    total = official_parameter_count(3, 32, 2, input_size=8, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == total


# --- initialisation ----------------------------------------------------------------------------------------------


def test_initialisation_is_dits_adaln_zero():
    torch.manual_seed(0)
    model = DiTModel(sample_size=16, patch_size=2, num_layers=2, hidden_size=256, num_attention_heads=4,
                     num_classes=100, out_channels=8)  # fmt: skip
    hidden = 256
    for block in model.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
    final = model.final_layer
    for layer in (final.adaLN_modulation[1], final.linear):
        assert not layer.weight.any() and not layer.bias.any()
    # The network starts at zero output.
    assert not model(*inputs(size=16, num_classes=100)).sample.any()

    # Xavier-uniform linears with zero bias: bound sqrt(6 / (fan_in + fan_out)), std bound / sqrt(3).
    for linear in (model.blocks[0].attn.qkv, model.blocks[1].mlp.fc2):
        bound = math.sqrt(6 / (linear.in_features + linear.out_features))
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.95 * bound
        assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
        assert not linear.bias.any()
    # The patch embedding is initialised as a Linear(C·p², D): xavier-uniform weight and, since the official
    # commit "Fix patchify bias init", `nn.init.constant_(self.x_embedder.proj.bias, 0)`.
    proj = model.x_embedder.proj
    bound = math.sqrt(6 / (4 * 2 * 2 + hidden))
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.9 * bound
    assert proj.bias.shape == (hidden,) and not proj.bias.any()
    # N(0, 0.02²) for the label table and the timestep MLP weights; the MLP biases are zero.
    for weight in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight,
                   model.t_embedder.mlp[2].weight):  # fmt: skip
        assert weight.std().item() == pytest.approx(0.02, rel=0.05) and abs(weight.mean().item()) < 2e-3
    assert not model.t_embedder.mlp[0].bias.any() and not model.t_embedder.mlp[2].bias.any()
    assert model.y_embedder.embedding_table.num_embeddings == 101  # the null row of classifier-free guidance


def official_pos_embed(dim, grid_size):
    """MAE's get_2d_sincos_pos_embed as DiT uses it: meshgrid with w first, first half of the channels from it."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_position_embedding_is_the_fixed_sincos_table_and_is_not_trained():
    model = tiny(sample_size=12, hidden_size=48, num_attention_heads=4)
    expected = torch.from_numpy(official_pos_embed(48, 6)).float()[None]
    assert torch.equal(model.pos_embed, expected)
    assert not model.pos_embed.requires_grad


# --- label dropout -----------------------------------------------------------------------------------------------


def test_one_label_drop_decision_per_sample_shared_by_every_block():
    model = randomize(tiny(class_dropout_prob=0.5, num_layers=4))
    x, t, _ = inputs(batch=3)
    x, t = x.repeat(4, 1, 1, 1), t.repeat(4)
    labels = torch.arange(12) % 10
    torch.manual_seed(5)
    trained = model.train()(x, t, labels).sample
    # The same draw, made by hand: each dropped sample sees the null label, every other its own, in all blocks.
    torch.manual_seed(5)
    dropped = torch.rand(12) < 0.5
    assert 0 < dropped.sum() < 12
    expected = model.eval()(x, t, torch.where(dropped, 10, labels)).sample
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)


def test_eval_mode_drops_nothing_and_none_means_the_null_label():
    model = randomize(tiny(class_dropout_prob=0.5)).eval()
    x, t, _ = inputs()
    assert torch.equal(model(x, t, torch.tensor([1, 2, 3])).sample, model(x, t, torch.tensor([1, 2, 3])).sample)
    assert torch.equal(model(x, t, None).sample, model(x, t, torch.full((3,), 10)).sample)


def test_bad_inputs_and_configs_are_named():
    model = tiny()
    with pytest.raises(ValueError, match="hidden_states of shape"):
        model(torch.zeros(1, 3, 8, 8), 1, torch.tensor([0]))
    with pytest.raises(ValueError, match="class_labels has 2 entries"):
        model(torch.zeros(1, 4, 8, 8), 1, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="patch_size=3"):
        tiny(patch_size=3)
    with pytest.raises(ValueError, match="num_attention_heads=5"):
        tiny(num_attention_heads=5)
    with pytest.raises(ValueError, match="Unknown DiT preset"):
        DiTModel.from_preset("dit-xxl-2")
    with pytest.raises(ValueError, match="null label"):
        tiny(class_dropout_prob=0.0)(torch.zeros(1, 4, 8, 8), 1, None)


def test_unconditional_model_has_no_label_table():
    model = tiny(num_classes=0)
    assert model.y_embedder is None
    assert model(torch.zeros(2, 4, 8, 8), 3).sample.shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(2, 4, 8, 8), 3, torch.tensor([0, 1]))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(tiny()).train()  # label dropout on: seeding makes both passes drop the same labels
    x, t, y = inputs()

    def grads():
        model.zero_grad()
        torch.manual_seed(3)
        model(x, t, y).sample.square().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


# --- the diffusers layout ----------------------------------------------------------------------------------------


def tiny_diffusers_dit(share_embedders=True, seed=0):
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)  # fmt: skip
    randomize(model, seed)
    if share_embedders:  # as in every converted DiT checkpoint: each block holds a copy of the same embedders
        state = model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
                    value.copy_(state["transformer_blocks.0." + key.split(".", 2)[2]])
    return model.eval()


def test_from_diffusers_gives_the_same_outputs_and_converts_back_exactly():
    source = tiny_diffusers_dit()
    ours = DiTModel.from_diffusers(source).eval()
    assert ours.config.downscale_freq_shift == 1 and ours.config.mlp_norm_eps == source.config.norm_eps
    x, t, y = inputs()
    torch.testing.assert_close(ours(x, t, y).sample, source(x, t, y).sample, rtol=1e-5, atol=1e-5)
    back = ours.to_diffusers()
    assert back.config.norm_eps == source.config.norm_eps
    original, converted = source.state_dict(), back.state_dict()
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[key], converted[key]) for key in original)


def test_layouts_map_key_by_key():
    ours = randomize(tiny())
    state = ours.state_dict()
    theirs = dit_to_diffusers_state_dict(state, 3)
    assert torch.equal(theirs["transformer_blocks.2.attn1.to_k.weight"], state["blocks.2.attn.qkv.weight"][32:64])
    assert torch.equal(theirs["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"],
                       state["y_embedder.embedding_table.weight"])  # fmt: skip
    assert torch.equal(theirs["proj_out_2.bias"], state["final_layer.linear.bias"])
    back = diffusers_to_dit_state_dict(theirs, 3)
    assert set(back) == set(state) - {"pos_embed"}
    assert all(torch.equal(back[key], state[key]) for key in back)


def test_diverging_embedder_copies_are_refused_with_the_block_and_key():
    source = tiny_diffusers_dit(share_embedders=False)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_1\.weight"):
        DiTModel.from_diffusers(source)
    source = tiny_diffusers_dit()
    with torch.no_grad():
        source.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight[3, 0] += 1e-3
    with pytest.raises(ValueError, match=r"transformer_blocks\.2\.norm1\.emb\.class_embedder"):
        DiTModel.from_diffusers(source)


def test_to_diffusers_refuses_a_model_whose_outputs_it_would_change():
    model = tiny()  # DiT's own timestep frequencies, which diffusers' class cannot express
    with pytest.raises(ValueError, match="downscale_freq_shift"):
        model.to_diffusers()
    assert isinstance(model.to_diffusers(exact=False), DiTTransformer2DModel)
    with pytest.raises(ValueError, match="null row"):
        tiny(class_dropout_prob=0.0).to_diffusers(exact=False)


def tiny_vae():
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8)  # fmt: skip


@pytest.fixture(scope="module")
def dit_pipeline_folder(tmp_path_factory):
    """A tiny model saved exactly as diffusers' DiTPipeline saves it (the layout of facebook/DiT-XL-2-256)."""
    folder = tmp_path_factory.mktemp("dit") / "tiny-dit-pipeline"
    DiTPipeline(transformer=tiny_diffusers_dit(), vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def test_dit_pipeline_folders_still_load_as_diffusers_dit(dit_pipeline_folder):
    pipe = ClassConditionalPipeline.from_pretrained(dit_pipeline_folder)
    assert isinstance(pipe.transformer, DiTTransformer2DModel)
    images = pipe([1, 2], num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("subfolder", [None, "transformer"])
def test_from_pretrained_reads_a_dit_pipeline_folder_and_converts_it(dit_pipeline_folder, subfolder):
    kwargs = {} if subfolder is None else {"subfolder": subfolder}
    ours = DiTModel.from_pretrained(dit_pipeline_folder, **kwargs).eval()
    assert isinstance(ours, DiTModel)
    source = tiny_diffusers_dit()
    x, t, y = inputs()
    torch.testing.assert_close(ours(x, t, y).sample, source(x, t, y).sample, rtol=1e-5, atol=1e-5)


def test_folders_from_before_dit_transformer_2d_load_too(dit_pipeline_folder, tmp_path):
    # facebook/DiT-XL-2-256 was saved by diffusers 0.12, whose DiT was a Transformer2DModel with more config keys.
    folder = tmp_path / "old-dit"
    shutil.copytree(dit_pipeline_folder, folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="Transformer2DModel", _diffusers_version="0.12.0.dev0", cross_attention_dim=None,
                  num_vector_embeds=None, only_cross_attention=False, use_linear_projection=False)  # fmt: skip
    config.pop("norm_eps", None)
    config_path.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))

    assert isinstance(ClassConditionalPipeline.from_pretrained(folder).transformer, DiTTransformer2DModel)
    ours = DiTModel.from_pretrained(folder).eval()
    x, t, y = inputs()
    torch.testing.assert_close(ours(x, t, y).sample, tiny_diffusers_dit()(x, t, y).sample, rtol=1e-5, atol=1e-5)


def test_training_can_start_from_a_dit_pipeline_folder(dit_pipeline_folder):
    from diffusers_speedup.training.parts import build_model
    from diffusers_speedup.training.recipes import load_config

    config = load_config(None, ["model.kind=dit", f"model.pretrained={dit_pipeline_folder}", "objective.label_dropout=0",
                                "objective.learned_variance=true"])  # fmt: skip
    model = build_model(config, data=None)
    assert isinstance(model, DiTModel) and model.config.num_layers == 3


def test_exported_dit_model_folder_loads_with_and_without_the_package(tmp_path):
    model = randomize(tiny()).eval()
    pipe = ClassConditionalPipeline(transformer=model, scheduler=DDIMScheduler())
    folder = export_pipeline(pipe, tmp_path / "export")
    index = json.loads((folder / "model_index.json").read_text())
    # The file name must not be one of diffusers' pipeline modules (diffusers.pipelines.dit), or diffusers would
    # look the class up there.
    assert index["transformer"] == ["dit_transformer", "DiTModel"]
    assert (folder / "transformer" / "dit_transformer.py").is_file()
    x, t, y = inputs()
    loaded = ClassConditionalPipeline.from_pretrained(folder)
    assert type(loaded.transformer) is DiTModel  # the installed class, no downloaded code
    assert torch.equal(loaded.transformer(x, t, y).sample, model(x, t, y).sample)
    assert not loaded.transformer.pos_embed.requires_grad
    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(remote.transformer).__module__ != DiTModel.__module__  # the shipped file
    assert torch.equal(remote.transformer(x, t, y).sample, model(x, t, y).sample)
