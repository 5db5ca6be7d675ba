"""A damaged checkpoint is named, file by file, before anything loads: ``train.resume=latest`` falls back to the
newest sound checkpoint with a warning (and the run still ends bit-identical), a checkpoint named by its folder stops
the run, saying which earlier one to resume from."""

import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from diffusers_speedup.training import Trainer, load_config
from diffusers_speedup.training.checkpoints import DamagedCheckpointError, load_checkpoint, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import QUICKSTART, assert_same_checkpoint, tiny  # noqa: E402


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A finished run with checkpoints at steps 3 and 6."""
    run = tmp_path_factory.mktemp("straight") / "run"
    Trainer(load_config(QUICKSTART, tiny(run, "train.checkpoints_total_limit=null"))).train()
    return run


def truncate(path: Path) -> None:
    """Cut short, as by a full disk or a copy that stopped."""
    data = path.read_bytes()
    path.write_bytes(data[: min(1000, len(data) // 2)])


DAMAGE = {
    "truncated_model": ("model.safetensors", truncate, "model.safetensors cannot be read, it is cut short or corrupt"),
    "truncated_optimizer": ("optimizer.bin", truncate, "optimizer.bin cannot be read, it is cut short or corrupt"),
    "deleted_model": ("model.safetensors", Path.unlink, "model.safetensors is missing"),
    # accelerate itself goes on without the RNG states it cannot read: the resumed run would silently differ.
    "truncated_rng_states": ("random_states_0.pkl", truncate, "random_states_0.pkl cannot be read"),
    "truncated_named_state": ("custom_checkpoint_0.pkl", truncate, "custom_checkpoint_0.pkl cannot be read"),
    "truncated_trainer_state": ("trainer_state.json", truncate, "trainer_state.json is not valid JSON"),
}


def damaged_copy(straight: Path, tmp_path: Path, case: str, step: int = 6) -> Path:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "pipeline")
    name, damage, _ = DAMAGE[case]
    damage(run / f"checkpoint-{step}" / name)
    return run


@pytest.mark.parametrize("case", DAMAGE)
def test_latest_falls_back_to_the_newest_sound_checkpoint_naming_the_damaged_file(case, straight, tmp_path, caplog):
    run = damaged_copy(straight, tmp_path, case)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(load_config(QUICKSTART, tiny(run, "train.resume=latest")))
    assert trainer.resume_from == run / "checkpoint-3"
    warnings = [record.getMessage() for record in caplog.records if "damaged checkpoints" in record.getMessage()]
    assert len(warnings) == 1
    assert f"checkpoint-6: {DAMAGE[case][2]}" in warnings[0]
    assert (
        f"RESUMING FROM {run / 'checkpoint-3'}" in warnings[0] and "steps 4 to 6 will be trained again" in warnings[0]
    )
    assert "pytorch_model.bin" not in warnings[0]
    trainer.train()
    assert trainer.step == 6
    # The damaged checkpoint is written again, as the uninterrupted run wrote it.
    assert_same_checkpoint(straight / "checkpoint-6", run / "checkpoint-6")


@pytest.mark.parametrize("case", ["truncated_model", "truncated_optimizer", "deleted_model"])
def test_a_damaged_checkpoint_named_by_its_folder_stops_before_any_work_naming_the_previous_one(
    case, straight, tmp_path, monkeypatch
):
    from diffusers_speedup.training import trainer as trainer_module

    run = damaged_copy(straight, tmp_path, case)
    monkeypatch.setattr(trainer_module, "load_training_data", lambda *a, **k: pytest.fail("loaded the data"))
    with pytest.raises(DamagedCheckpointError) as caught:
        Trainer(load_config(QUICKSTART, tiny(run, f"train.resume={run / 'checkpoint-6'}")))
    message = str(caught.value)
    assert message.startswith(f"train.resume: {run / 'checkpoint-6'} is damaged: {DAMAGE[case][2]}")
    assert message.endswith(f"to resume from the previous checkpoint, set train.resume={run / 'checkpoint-3'}.")
    assert "pytorch_model.bin" not in message and "\n" not in message


def test_the_command_names_the_damaged_file_in_one_line(straight, tmp_path):
    from diffusers_speedup.commands import main as command_line

    run = damaged_copy(straight, tmp_path, "truncated_optimizer", step=3)
    with pytest.raises(SystemExit) as caught:
        command_line(["train", "--config", str(QUICKSTART), *tiny(run, f"train.resume={run / 'checkpoint-3'}")])
    assert str(caught.value).startswith(f"error: train.resume: {run / 'checkpoint-3'} is damaged: optimizer.bin")
    assert f"{run} holds no earlier checkpoint that is sound" in str(caught.value)


def test_latest_with_every_checkpoint_damaged_stops_naming_each(straight, tmp_path):
    run = damaged_copy(straight, tmp_path, "truncated_model")
    truncate(run / "checkpoint-3" / "optimizer.bin")
    with pytest.raises(DamagedCheckpointError, match=r"every checkpoint in .*run is damaged") as caught:
        Trainer(load_config(QUICKSTART, tiny(run, "train.resume=latest")))
    assert "checkpoint-6: model.safetensors cannot be read" in str(caught.value)
    assert "checkpoint-3: optimizer.bin cannot be read" in str(caught.value)


def test_load_checkpoint_refuses_a_damaged_checkpoint_before_loading_anything(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(accelerator, tmp_path, 1)
    truncate(path / "optimizer.bin")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    changed = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(DamagedCheckpointError, match=r"checkpoint-1 is damaged: optimizer.bin cannot be read"):
        load_checkpoint(accelerator, path)
    assert all(torch.equal(value, changed[name]) for name, value in model.state_dict().items())
    assert not all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    AcceleratorState._reset_state(reset_partial_state=True)
