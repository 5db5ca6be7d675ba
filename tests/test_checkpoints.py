import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

from diffusers_speedup.training.checkpoints import (
    CONFIG_NAME,
    LATEST_NAME,
    TRAINER_STATE_NAME,
    NamedState,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from diffusers_speedup.training.ema import ConstantEMA
from diffusers_speedup.training.lr_schedules import get_lr_scheduler


@pytest.fixture
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def make_complete(output_dir, step):
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / TRAINER_STATE_NAME).write_text(json.dumps({"step": step}))
    return path


def build(seed):
    """Accelerator(cpu=True) with a tiny model, Adam and a registered EMA."""
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ConstantEMA(model, decay=0.9)
    accelerator.register_for_checkpointing(ema)
    return accelerator, model, optimizer, ema


def train_steps(model, optimizer, ema, steps):
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(8, 3, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step)


def test_save_load_round_trip_with_accelerate(tmp_path, fresh_accelerator_state):
    accelerator, model, optimizer, ema = build(seed=0)
    train_steps(model, optimizer, ema, range(1, 4))

    def write_config(folder):
        (folder / CONFIG_NAME).write_text("model: tiny\n")
        assert folder.name.endswith(".tmp")  # written before the rename

    path = save_checkpoint(
        accelerator, tmp_path, 3, extra_state={"epoch": 1, "batch_in_epoch": 2, "nimg": 24}, save_fn=write_config
    )
    assert path == tmp_path / "checkpoint-3"
    assert (path / CONFIG_NAME).read_text() == "model: tiny\n"
    assert (tmp_path / LATEST_NAME).read_text().strip() == "checkpoint-3"
    assert not list(tmp_path.glob("*.tmp"))

    # Uninterrupted continuation.
    train_steps(model, optimizer, ema, range(4, 7))
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_ema = ema.model.state_dict()

    # A fresh process: different initial weights, then resume.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator2, model2, optimizer2, ema2 = build(seed=123)
    latest = find_latest_checkpoint(tmp_path)
    state = load_checkpoint(accelerator2, latest)
    assert state == {"step": 3, "epoch": 1, "batch_in_epoch": 2, "nimg": 24}
    assert ema2.step == 3 and ema2.num_updates == 3 and not ema2.model.training

    train_steps(model2, optimizer2, ema2, range(state["step"] + 1, 7))
    for key, value in model2.state_dict().items():
        torch.testing.assert_close(value, expected_model[key], rtol=0, atol=0)
    for key, value in ema2.model.state_dict().items():
        torch.testing.assert_close(value, expected_ema[key], rtol=0, atol=0)

    # Saving again after the resume moves `latest`.
    save_checkpoint(accelerator2, tmp_path, 6, extra_state={"epoch": 2})
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6"


def test_resaving_the_same_step_replaces_it(tmp_path, fresh_accelerator_state):
    accelerator, model, optimizer, ema = build(seed=0)
    save_checkpoint(accelerator, tmp_path, 5, extra_state={"run": 1})
    save_checkpoint(accelerator, tmp_path, 5, extra_state={"run": 2})
    assert json.loads((tmp_path / "checkpoint-5" / TRAINER_STATE_NAME).read_text())["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "latest"]


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path):
    make_complete(tmp_path, 10)
    (tmp_path / LATEST_NAME).write_text("checkpoint-10\n")
    # A crash during the save of step 20 leaves a .tmp folder with most of the files.
    crashed = tmp_path / "checkpoint-20.tmp"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    (crashed / TRAINER_STATE_NAME).write_text(json.dumps({"step": 20}))

    assert find_latest_checkpoint(tmp_path, clean=False) == tmp_path / "checkpoint-10"
    assert crashed.exists()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert not crashed.exists()


def test_latest_pointer_and_fallback(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    for step in (2, 10, 9):
        make_complete(tmp_path, step)
    (tmp_path / "checkpoint-11").mkdir()  # no trainer_state.json: not complete
    # Without a pointer: the highest complete step (numeric order, not string order).
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    # The pointer wins.
    (tmp_path / LATEST_NAME).write_text("checkpoint-9\n")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-9"
    # A pointer to something incomplete or gone falls back.
    (tmp_path / LATEST_NAME).write_text("checkpoint-11\n")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    (tmp_path / LATEST_NAME).write_text("checkpoint-99\n")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_rotation_keeps_newest_and_latest(tmp_path):
    for step in (100, 200, 300, 400, 500):
        make_complete(tmp_path, step)
    (tmp_path / "checkpoint-600.tmp").mkdir()
    (tmp_path / LATEST_NAME).write_text("checkpoint-200\n")

    removed = rotate_checkpoints(tmp_path, total_limit=2)
    assert sorted(p.name for p in removed) == ["checkpoint-100", "checkpoint-300", "checkpoint-400"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-200", "checkpoint-500"]

    (tmp_path / LATEST_NAME).write_text("checkpoint-500\n")
    rotate_checkpoints(tmp_path, total_limit=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-500"]
    assert rotate_checkpoints(tmp_path, total_limit=None) == []
    with pytest.raises(ValueError, match="total_limit"):
        rotate_checkpoints(tmp_path, total_limit=0)


def test_save_with_total_limit(tmp_path, fresh_accelerator_state):
    accelerator, model, optimizer, ema = build(seed=0)
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def test_bad_inputs(tmp_path, fresh_accelerator_state):
    accelerator, *_ = build(seed=0)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(accelerator, tmp_path, 1, extra_state={"bad": object()})
    assert not list(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(accelerator, tmp_path)

    AcceleratorState._reset_state(reset_partial_state=True)
    automatic = Accelerator(
        cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True)
    )
    with pytest.raises(ValueError, match="automatic_checkpoint_naming"):
        save_checkpoint(automatic, tmp_path, 1)


class Counter:
    """A part with state of its own (as an auxiliary loss would have)."""

    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def build_parts(seed, with_ema=True):
    """Accelerator(cpu=True), a tiny model and Adam, and the parts a trainer keeps besides them, unregistered."""
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    lr_scheduler = get_lr_scheduler("cosine", optimizer, warmup_steps=2, total_steps=10)
    ema = ConstantEMA(model, decay=0.9) if with_ema else None
    return accelerator, model, optimizer, lr_scheduler, ema


def advance(model, optimizer, lr_scheduler, ema, steps):
    for step in steps:
        model(torch.randn(4, 3, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        lr_scheduler.step()
        if ema is not None:
            ema.update(model, step)


def test_named_parts_keep_their_entry_whatever_the_registration_order(tmp_path, fresh_accelerator_state):
    orders = {
        "scheduler_first": lambda lr_scheduler, ema: NamedState(lr_scheduler=lr_scheduler, ema=ema),
        "ema_first": lambda lr_scheduler, ema: NamedState(ema=ema, lr_scheduler=lr_scheduler),
        "another_part_first": lambda lr_scheduler, ema: NamedState(aux=Counter(7), lr_scheduler=lr_scheduler, ema=ema),
    }
    for name, arrange in orders.items():
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator, model, optimizer, lr_scheduler, ema = build_parts(seed=0)
        advance(model, optimizer, lr_scheduler, ema, range(1, 4))
        named_state = arrange(lr_scheduler, ema)
        accelerator.register_for_checkpointing(named_state)
        save_checkpoint(accelerator, tmp_path / name, 3, named_state=named_state)

        folder = tmp_path / name / "checkpoint-3"
        assert sorted(p.name for p in folder.glob("custom_checkpoint_*")) == ["custom_checkpoint_0.pkl"]
        saved = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)
        assert sorted(saved) == sorted(named_state.parts)
        expected = ema.model.state_dict()
        assert saved["ema"]["model"].keys() == expected.keys()
        assert all(torch.equal(saved["ema"]["model"][key], value) for key, value in expected.items())
        assert saved["lr_scheduler"] == lr_scheduler.state_dict()
        assert json.loads((folder / TRAINER_STATE_NAME).read_text())["named_state"] == list(named_state.parts)

    # Loaded back into parts arranged in yet another order, each part gets its own state.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, model, optimizer, lr_scheduler, ema = build_parts(seed=1)
    aux = Counter()
    named_state = NamedState(ema=ema, aux=aux, lr_scheduler=lr_scheduler)
    accelerator.register_for_checkpointing(named_state)
    load_checkpoint(accelerator, tmp_path / "another_part_first" / "checkpoint-3", named_state)
    assert aux.value == 7 and lr_scheduler.last_epoch == 3 and ema.step == 3
    assert all(torch.equal(ema.model.state_dict()[key], value) for key, value in expected.items())


def test_a_missing_or_unknown_part_is_named_and_nothing_is_loaded(tmp_path, fresh_accelerator_state):
    accelerator, model, optimizer, lr_scheduler, _ = build_parts(seed=0, with_ema=False)
    named_state = NamedState(lr_scheduler=lr_scheduler)
    accelerator.register_for_checkpointing(named_state)
    save_checkpoint(accelerator, tmp_path, 1, named_state=named_state)

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, model, optimizer, lr_scheduler, ema = build_parts(seed=1)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    named_state = NamedState(lr_scheduler=lr_scheduler, ema=ema)
    accelerator.register_for_checkpointing(named_state)
    with pytest.raises(ValueError, match=r"checkpoint-1: it has no 'ema' state, which this run needs"):
        load_checkpoint(accelerator, tmp_path / "checkpoint-1", named_state)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())

    with pytest.raises(ValueError, match=r"it has a 'aux' state, which this run does not know.*lr_scheduler, ema"):
        named_state.load_state_dict({"lr_scheduler": lr_scheduler.state_dict(), "ema": ema.state_dict(), "aux": {}})
    assert lr_scheduler.last_epoch == 0  # nothing was restored


@pytest.mark.parametrize("with_ema", [True, False], ids=["with_ema", "without_ema"])
def test_a_checkpoint_of_numbered_files_loads_each_into_its_part(with_ema, tmp_path, fresh_accelerator_state):
    # Written as before named parts: the LR schedule, then the EMA, each registered on its own.
    accelerator, model, optimizer, lr_scheduler, ema = build_parts(seed=0, with_ema=with_ema)
    accelerator.register_for_checkpointing(*[part for part in (lr_scheduler, ema) if part is not None])
    advance(model, optimizer, lr_scheduler, ema, range(1, 4))
    save_checkpoint(accelerator, tmp_path, 3)
    assert len(list((tmp_path / "checkpoint-3").glob("custom_checkpoint_*.pkl"))) == (2 if with_ema else 1)
    advance(model, optimizer, lr_scheduler, ema, range(4, 6))
    expected_model = {key: value.clone() for key, value in model.state_dict().items()}
    expected_ema = ema.state_dict() if with_ema else None

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, model, optimizer, lr_scheduler, ema = build_parts(seed=1, with_ema=with_ema)
    named_state = NamedState(lr_scheduler=lr_scheduler, ema=ema)
    accelerator.register_for_checkpointing(named_state)
    load_checkpoint(accelerator, tmp_path / "checkpoint-3", named_state)
    assert accelerator._custom_objects == [named_state]  # registered as it was before the load
    assert lr_scheduler.last_epoch == 3
    advance(model, optimizer, lr_scheduler, ema, range(4, 6))
    assert all(torch.equal(value, expected_model[key]) for key, value in model.state_dict().items())
    if with_ema:
        assert all(torch.equal(value, expected_ema["model"][key]) for key, value in ema.model.state_dict().items())

    # Saved again, it is written by name.
    save_checkpoint(accelerator, tmp_path, 5, named_state=named_state)
    assert sorted(p.name for p in (tmp_path / "checkpoint-5").glob("custom_checkpoint_*")) == [
        "custom_checkpoint_0.pkl"
    ]
