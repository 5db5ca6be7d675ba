"""The seam that auxiliary losses (REPA) use: a block's hidden state and a batch's extra fields in, a named, logged
term out, trained with the model inside TrainingModule and left out of the exported network."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import Array2D, load_from_disk
from diffusers import DDPMScheduler
from PIL import Image
from tiny_models import tiny_uvit, tiny_vae

from diffusers_speedup.data import Batch, LatentDataset, cache_latents
from diffusers_speedup.objectives import AuxiliaryLoss, DiffusionObjective
from diffusers_speedup.training.step import LossTracker, TrainingModule, optimizer_step


class AlignMeanToken(AuxiliaryLoss):
    """A toy alignment: a linear projection of the block's mean token regresses a per-sample target vector."""

    name = "align_loss"

    def __init__(self, block, hidden_size, target_size, weight=0.5):
        super().__init__(block)
        self.projector = torch.nn.Linear(hidden_size, target_size)
        self.weight = weight

    def loss(self, hidden_state, target):
        projected = self.projector(hidden_state.mean(1))
        return self.weight * (projected - target).square().mean(1)


def build(seed=0):
    model = tiny_uvit(num_classes=10)
    auxiliary = AlignMeanToken(model.in_blocks[0], hidden_size=32, target_size=6)
    objective = DiffusionObjective(DDPMScheduler(num_train_timesteps=100))
    return model, auxiliary, objective


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (4,), generator=generator)
    return Batch(x0, labels, {"target": torch.randn(4, 6, generator=generator)})


def test_the_term_is_added_to_the_loss_and_logged_under_its_name():
    model, auxiliary, objective = build()
    x0, labels, extras = batch()
    module = TrainingModule(model, objective, auxiliary_losses=[auxiliary])
    torch.manual_seed(1)
    output = module(x0, labels, **extras)
    torch.manual_seed(1)
    hidden = {}
    hook = model.in_blocks[0].register_forward_hook(lambda m, a, out: hidden.setdefault("h", out))
    plain = objective(model, x0, labels)
    hook.remove()
    # Written out: the diffusion loss of the same draws plus λ·‖W·mean(h) + b − target‖² / 6.
    expected_term = 0.5 * (auxiliary.projector(hidden["h"].mean(1)) - extras["target"]).square().mean(1)
    torch.testing.assert_close(output.terms["align_loss"], expected_term.detach())
    torch.testing.assert_close(output.loss, plain.loss + expected_term)

    tracker = LossTracker("cpu")
    tracker.add(output)
    torch.testing.assert_close(tracker.terms["align_loss"], expected_term.mean().detach())


def test_one_optimizer_step_trains_the_auxiliary_module_and_the_export_leaves_it_out():
    model, auxiliary, objective = build()
    accelerator = Accelerator(cpu=True)
    module = TrainingModule(model, objective, auxiliary_losses=[auxiliary])
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module, optimizer = accelerator.prepare(module, optimizer)
    projector_before = auxiliary.projector.weight.detach().clone()
    tracker = LossTracker("cpu")
    grad_norm, skipped = optimizer_step(accelerator, module, optimizer, [batch(0), batch(1)], 1.0, tracker)
    assert not skipped and torch.isfinite(grad_norm)
    assert not torch.equal(auxiliary.projector.weight, projector_before)
    assert "align_loss" in tracker.terms
    # The network's own state dict (what a pipeline exports) has no trace of the auxiliary module; the training
    # module's (what a checkpoint holds) has it under its own prefix.
    assert not any("projector" in key for key in model.state_dict())
    assert {"auxiliary_losses.0.projector.weight", "auxiliary_losses.0.projector.bias"} <= set(module.state_dict())


def test_a_block_that_did_not_run_is_named():
    model, auxiliary, _ = build()
    with pytest.raises(RuntimeError, match="'align_loss' found no hidden state"):
        auxiliary(target=torch.zeros(1, 6))


def test_extra_columns_of_a_latent_cache_come_in_the_same_batch(tmp_path):
    cache = tmp_path / "cache"
    images = tmp_path / "images"
    for folder in ("a", "b"):
        (images / folder).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / folder / f"{i}.png")
    tiny_vae().save_pretrained(tmp_path / "vae")
    cache_latents(
        str(cache), image_folder=str(images), vae=str(tmp_path / "vae"), resolution=16, num_workers=0, progress=False
    )
    # An extra per-row field, stored next to the latents as a cache for REPA would store encoder features.
    dataset = load_from_disk(str(cache))
    features = np.arange(len(dataset) * 2 * 3, dtype=np.float32).reshape(len(dataset), 2, 3)
    extended = dataset.add_column("features", features.tolist(), feature=Array2D((2, 3), "float32"))
    extended.save_to_disk(str(tmp_path / "extended"))
    (tmp_path / "extended" / "latents_metadata.json").write_text((cache / "latents_metadata.json").read_text())

    for in_memory in (False, True):
        latents = LatentDataset(str(tmp_path / "extended"), extra_columns=["features"], in_memory=in_memory)
        z, labels, extras = latents.batch(torch.tensor([4, 1]))
        assert z.shape == (2, *latents.latent_shape) and labels.tolist() == [dataset[4]["label"], dataset[1]["label"]]
        torch.testing.assert_close(extras["features"], torch.from_numpy(features[[4, 1]]))
    with pytest.raises(ValueError, match="has no column 'image'"):
        LatentDataset(str(tmp_path / "extended"), extra_columns=["image"])
