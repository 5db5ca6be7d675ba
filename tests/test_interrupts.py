"""Ctrl-C stops a command with one line, saying what was kept where the command knows, and exit status 130."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# The quickstart shrunk, with a checkpoint every two steps and far more steps than the test waits for.
TINY_ENDLESS = [
    "data.resolution=8",
    "model.params.hidden_size=32",
    "model.params.num_layers=3",
    "model.params.num_attention_heads=2",
    "train.batch_size=16",
    "train.max_steps=1000000",
    "train.checkpoint_every=2",
    "train.checkpoints_total_limit=2",
    "train.report_to=none",
]


def start(argv: list[str], folder: Path) -> subprocess.Popen:
    """`python argv` in `folder`, its stderr going to a file there (a pipe nobody reads could fill up and stall it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(folder)}
    with open(folder / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, *argv], cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def interrupt(process: subprocess.Popen, folder: Path, ready, timeout: float = 120) -> tuple[int, str]:
    """Send SIGINT once `ready()` holds; the exit status and stderr, within `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"the command never got ready: {(folder / 'stderr.txt').read_text()[-3000:]}")
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=max(deadline - time.monotonic(), 30))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"SIGINT did not stop the command: {(folder / 'stderr.txt').read_text()[-3000:]}")
    return process.returncode, (folder / "stderr.txt").read_text()


@pytest.mark.slow
def test_an_interrupted_training_run_names_its_last_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    process = start(
        ["-m", "diffusers_speedup", "train", "--config", "quickstart", f"train.output_dir={run}", *TINY_ENDLESS],
        tmp_path,
    )
    status, stderr = interrupt(process, tmp_path, ready=lambda: (run / "latest").is_file())
    assert status == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    prefix, suffix = "interrupted; the last complete checkpoint is ", "; train.resume=latest continues from it"
    assert last_line.startswith(prefix) and last_line.endswith(suffix), last_line
    checkpoint = Path(last_line[len(prefix) : -len(suffix)])
    assert checkpoint.parent == run and (checkpoint / "trainer_state.json").is_file()


@pytest.mark.slow
def test_any_command_stops_on_ctrl_c_with_one_line(tmp_path):
    # A command that does not know what it keeps says only that it was interrupted.
    (tmp_path / "waiting_command.py").write_text(
        textwrap.dedent("""
        import pathlib, time

        def main(argv):
            pathlib.Path("started").touch()
            time.sleep(120)
    """)
    )
    script = textwrap.dedent("""
        import sys
        from diffusers_speedup import commands

        commands.COMMANDS["wait"] = ("waiting_command", "waits")
        sys.exit(commands.main(["wait"]))
    """)
    process = start(["-c", script], tmp_path)
    status, stderr = interrupt(process, tmp_path, ready=lambda: (tmp_path / "started").exists())
    assert (status, stderr.strip()) == (130, "interrupted")


def test_interrupted_sampling_says_that_its_finished_shards_are_kept(tmp_path, monkeypatch, capsys):
    from diffusers import DDIMScheduler

    from diffusers_speedup import ClassConditionalPipeline, UViTModel
    from diffusers_speedup.commands import sample

    transformer = UViTModel(
        sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_attention_heads=4, num_classes=10, num_layers=3
    )
    ClassConditionalPipeline(transformer=transformer, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "generate_samples", interrupted)
    with pytest.raises(SystemExit) as caught:
        sample.main(["--pipeline", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out"), "--steps", "2"])
    assert caught.value.code == 130
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line == f"interrupted; the finished shards are kept in {tmp_path / 'out'}; the same command resumes"
