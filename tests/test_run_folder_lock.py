"""A training run owns its output folder: a second run into it stops before any work, naming the process that holds
it; the lock dies with its process; commands that only read a run folder are not blocked by it."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusers_speedup.run_folder import LOCK_NAME, RunFolderInUse, RunFolderLock
from diffusers_speedup.training import ConfigError, Trainer, load_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TRAIN = REPO / "train" / "train.py"
sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import tiny  # noqa: E402


def wait_until_training(run: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until `process` holds `run` and has started training (it writes config.yaml then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the first run ended before it started training"
        try:
            if json.loads((run / LOCK_NAME).read_text())["pid"] == process.pid and (run / "config.yaml").exists():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"process {process.pid} did not start training in {run} within {timeout} s")


@pytest.mark.slow
def test_a_second_run_into_a_training_runs_folder_stops_before_any_work_naming_that_process(tmp_path):
    run = tmp_path / "run"
    # A first run that trains until it is killed: no checkpoints, no samples, nothing logged in between.
    long_run = tiny(run, "train.max_steps=100000000", "train.checkpoint_every=0", "train.log_every=100000000")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, str(TRAIN), "--config", str(QUICKSTART), *long_run], stdout=log, stderr=log
        )
    try:
        wait_until_training(run, first)
        before = sorted((path.name, path.stat().st_mtime_ns) for path in run.iterdir())

        second = subprocess.run(
            [sys.executable, str(TRAIN), "--config", str(QUICKSTART), *tiny(run)],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in second.stderr
        assert f"train.output_dir: {run} is in use by another training run" in errors[0]
        assert f"process {first.pid} on host {socket.gethostname()}" in errors[0]
        # The second run wrote nothing, and the first one trains on.
        assert sorted((path.name, path.stat().st_mtime_ns) for path in run.iterdir()) == before
        assert first.poll() is None
    finally:
        first.kill()
        first.wait(timeout=60)
    # Killed, the first run holds nothing any more: the system released its lock.
    RunFolderLock.acquire(run).release()


@pytest.mark.slow
def test_every_process_of_a_multi_process_run_stops_when_its_folder_is_taken(tmp_path):
    run = tmp_path / "run"
    holder = RunFolderLock.acquire(run)
    try:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(TRAIN), "--config", str(QUICKSTART), *tiny(run), "train.cpu=true",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    finally:
        holder.release()
    assert result.returncode != 0, result.stderr[-3000:]
    # Both processes stop with the main process's message: none waits for the other. The two processes write to
    # one stderr at the same moment, so their lines can run together: count the messages, not the lines.
    holder = f"in use by another training run (process {os.getpid()} on host {socket.gethostname()}"
    assert result.stderr.count("error: train.output_dir: ") == 2, result.stderr[-3000:]
    assert result.stderr.count(holder) == 2, result.stderr[-3000:]
    assert sorted(path.name for path in run.iterdir()) == [LOCK_NAME]


def test_the_lock_names_its_holder_and_is_free_again_once_released(tmp_path):
    lock = RunFolderLock.acquire(tmp_path / "run")
    with pytest.raises(RunFolderInUse, match=rf"in use by another training run \(process {os.getpid()} on host "):
        RunFolderLock.acquire(tmp_path / "run")
    lock.release()
    lock.release()  # a second release does nothing
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # no stale pid
    RunFolderLock.acquire(tmp_path / "run").release()


def test_a_file_system_without_locks_gets_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl
    import logging

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        RunFolderLock.acquire(tmp_path / "run").release()
    assert f"Cannot lock {tmp_path / 'run' / LOCK_NAME} (No locks available)" in caplog.text


def test_a_trainer_refused_after_taking_the_folder_gives_it_up_and_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size: 4096"):
        Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.batch_size=4096")))
    assert not (tmp_path / "run").exists()
    # A folder that was there stays, free.
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="train.batch_size: 4096"):
        Trainer(load_config(QUICKSTART, tiny(tmp_path / "run", "train.batch_size=4096")))
    RunFolderLock.acquire(tmp_path / "run").release()


def test_a_trainer_into_a_folder_held_by_another_stops_before_any_work(tmp_path, monkeypatch):
    from diffusers_speedup.training import trainer as trainer_module

    holder = RunFolderLock.acquire(tmp_path / "run")
    monkeypatch.setattr(trainer_module, "load_training_data", lambda *a, **k: pytest.fail("loaded the data"))
    try:
        with pytest.raises(ConfigError, match=rf"train.output_dir: .*run is in use .*process {os.getpid()} on host"):
            Trainer(load_config(QUICKSTART, tiny(tmp_path / "run")))
    finally:
        holder.release()


def test_a_run_ends_its_ownership_however_training_ends(tmp_path, monkeypatch):
    from diffusers_speedup.training.training_data import TrainingData

    def killed(*args):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(TrainingData, "batch", killed)
    trainer = Trainer(load_config(QUICKSTART, tiny(tmp_path / "run")))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    RunFolderLock.acquire(tmp_path / "run").release()  # while `trainer` and its traceback are alive


def test_export_and_posthoc_ema_read_a_run_folder_while_a_run_holds_it(tmp_path):
    from diffusers_speedup.commands import export, posthoc_ema

    run = tmp_path / "run"
    Trainer(load_config(QUICKSTART, tiny(run, "ema.kind=power", "ema.snapshot_every=2"))).train()
    holder = RunFolderLock.acquire(run)
    try:
        assert export.main([str(run / "checkpoint-6"), "--output_dir", str(tmp_path / "export")]) in (0, None)
        assert (tmp_path / "export" / "model_index.json").is_file()
        posthoc_ema.main(["--run_dir", str(run), "--sigma_rel", "0.07", "--output_dir", str(tmp_path / "posthoc")])
        assert (tmp_path / "posthoc" / "phema-0.070.safetensors").is_file()
    finally:
        holder.release()
