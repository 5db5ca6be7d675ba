"""SIGTERM (what SLURM and Kubernetes send before they kill a job) stops a run at the next step boundary with a
checkpoint of that step and exit status 143; resumed from it, the run ends bit-identical to an uninterrupted one. On
several processes, a signal to one of them stops all of them at the same step."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffusers_speedup.training import Trainer, load_config
from diffusers_speedup.training.preemption import PREEMPTED_EXIT_CODE, SigtermFlag

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import QUICKSTART, assert_same_checkpoint, tiny  # noqa: E402

TRAIN = Path(__file__).resolve().parents[1] / "train" / "train.py"
STEPS = 100
# Long enough that the signal, sent once step 3 is logged, lands well before the end; no periodic checkpoints, so the
# only one before the end is the one SIGTERM writes.
PREEMPTIBLE = ("train.gradient_accumulation_steps=2", f"train.max_steps={STEPS}", "train.checkpoint_every=0",
               "train.log_every=1")  # fmt: skip
STOPPED = re.compile(rf"SIGTERM: stopped at step (\d+) of {STEPS}; saved (\S+)\. Continue with train.resume=latest\.")


def run_until_sigterm(command, log: Path, stop_pid=None, timeout: float = 240) -> tuple[int, str]:
    """Start `command`, send SIGTERM (to the process `stop_pid(process)` names, default itself) once step 3 is logged,
    and return its exit status and everything it wrote on stderr."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if re.search(rf"step 3/{STEPS} ", line):
                os.kill(stop_pid(process) if stop_pid else process.pid, signal.SIGTERM)
                break
        lines += process.stderr.readlines()
        return process.wait(timeout=timeout), "".join(lines)
    finally:
        process.kill()
        process.wait()
        log.write_text("".join(lines))


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_resumed_run_ends_bit_identical(tmp_path):
    Trainer(load_config(QUICKSTART, tiny(tmp_path / "straight", *PREEMPTIBLE))).train()

    run = tmp_path / "run"
    command = [sys.executable, str(TRAIN), "--config", str(QUICKSTART), *tiny(run, *PREEMPTIBLE)]
    status, stderr = run_until_sigterm(command, tmp_path / "preempted.log")
    assert status == PREEMPTED_EXIT_CODE == 143, stderr[-3000:]
    stopped = STOPPED.search(stderr)
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < STEPS and stopped.group(2) == str(run / f"checkpoint-{step}")
    assert "Traceback" not in stderr
    assert sorted(path.name for path in run.glob("checkpoint-*")) == [f"checkpoint-{step}"]
    assert (run / "latest").read_text().strip() == f"checkpoint-{step}"
    assert not (run / "pipeline").exists()

    resumed = Trainer(load_config(QUICKSTART, tiny(run, *PREEMPTIBLE, "train.resume=latest")))
    resumed.train()
    assert resumed.step == STEPS
    assert_same_checkpoint(tmp_path / "straight" / f"checkpoint-{STEPS}", run / f"checkpoint-{STEPS}")


def worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker process of `rank` that torchrun started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environment:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under process {launcher.pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_sigterm_to_one_process_stops_every_process_at_the_same_step_with_one_checkpoint(tmp_path):
    def command(name, *extra):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        overrides = tiny(tmp_path / name, *PREEMPTIBLE, "train.cpu=true", "ema.kind=none", *extra)
        return [*launcher, str(TRAIN), "--config", str(QUICKSTART), *overrides]

    run = tmp_path / "run"
    # Only rank 1 is signalled: rank 0 learns it through the reduction at the step boundary.
    status, stderr = run_until_sigterm(command("run"), tmp_path / "preempted.log", lambda p: worker_of_rank(p, 1))
    assert status != 0
    stopped = STOPPED.search(stderr)
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))
    checkpoint = run / f"checkpoint-{step}"
    assert sorted(path.name for path in run.glob("checkpoint-*")) == [checkpoint.name]
    # Written by both processes together: each one's RNG states are there.
    assert sorted(path.name for path in checkpoint.glob("random_states_*")) == [
        f"random_states_{i}.pkl" for i in (0, 1)
    ]
    # (torchrun reports a worker that exits with 143 as failed, with a traceback of its own.)

    for name, extra in (("straight", ()), ("run", ("train.resume=latest",))):
        result = subprocess.run(command(name, *extra), capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    straight = load_file(str(tmp_path / "straight" / f"checkpoint-{STEPS}" / "model.safetensors"))
    resumed = load_file(str(run / f"checkpoint-{STEPS}" / "model.safetensors"))
    assert straight.keys() == resumed.keys() and all(straight[key].equal(resumed[key]) for key in straight)


def test_the_flag_is_set_by_sigterm_only_inside_its_block():
    before = signal.getsignal(signal.SIGTERM)
    with SigtermFlag(num_processes=1) as sigterm:
        assert not sigterm.received()
        os.kill(os.getpid(), signal.SIGTERM)
        assert sigterm.received()
    assert signal.getsignal(signal.SIGTERM) is before
