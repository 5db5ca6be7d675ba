"""Every entry point runs in the world it was launched into, or stops before any work saying how to launch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_speedup.distributed import (
    LaunchError,
    check_world_size,
    launched_world_size,
    require_single_process,
)

REPO = Path(__file__).resolve().parents[1]
# What torchrun and `accelerate launch --multi_gpu` export for each of two processes on one machine.
TORCHRUN_2 = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
# What accelerate 1.15's --cpu launcher exports for `--num_processes 2` before starting the script once.
ACCELERATE_CPU_2 = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_a_matching_world_passes():
    check_world_size(1, "train/train.py", environ={})
    check_world_size(2, "train/train.py", environ=TORCHRUN_2)
    assert launched_world_size({}) is None and launched_world_size(TORCHRUN_2) == 2
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4


def test_processes_that_run_alone_although_launched_together_are_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LaunchError) as caught:
        check_world_size(1, "train/train.py", cpu_flag="train.cpu=true", environ=TORCHRUN_2)
    message = str(caught.value)
    assert "launched as 2 processes" in message and "one of 1" in message and "no GPU" in message
    assert "torchrun --nproc_per_node N train/train.py ... train.cpu=true" in message
    assert "accelerate launch --multi_gpu --num_processes N" in message and "\n" not in message


def test_accelerate_cpu_launch_of_several_processes_is_refused():
    with pytest.raises(LaunchError, match=r"accelerate launch --cpu --num_processes N.*runs a single process"):
        check_world_size(1, "train/sample.py", environ=ACCELERATE_CPU_2)
    check_world_size(1, "train/sample.py", environ={"ACCELERATE_USE_CPU": "True"})  # --num_processes 1


def test_single_process_tools_refuse_a_multi_process_launch():
    require_single_process("train/export.py", environ={})
    with pytest.raises(LaunchError, match=r"train/export.py runs in one process.*python train/export.py"):
        require_single_process("train/export.py", environ=TORCHRUN_2)


def _launch(command, tmp_path, timeout=180):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=tmp_path)


TINY_RUN = [
    "data.resolution=8",
    "model.params.hidden_size=32",
    "model.params.num_layers=3",
    "model.params.num_attention_heads=2",
    "train.batch_size=16",
    "train.max_steps=2",
    "train.report_to=none",
]


@pytest.mark.slow
def test_torchrun_on_a_machine_without_gpu_and_without_train_cpu_stops_every_rank_before_any_work(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(REPO / "train" / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml")]
    command += [f"train.output_dir={tmp_path / 'run'}", *TINY_RUN]
    result = _launch(command, tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("error: train/train.py was launched as 2 processes") == 2  # each rank says it once
    # torchrun reports the failed children with its own traceback; none comes from the ranks themselves.
    assert "train.cpu=true" in result.stderr and "diffusers_speedup" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_accelerate_cpu_launch_with_two_processes_is_refused(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    command += [str(REPO / "train" / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml")]
    command += [f"train.output_dir={tmp_path / 'run'}", *TINY_RUN]
    result = _launch(command, tmp_path)
    assert result.returncode != 0
    assert "error: train/train.py was started by `accelerate launch --cpu --num_processes N`" in result.stderr
    # accelerate reports the failed script with its own traceback; none comes from the script itself.
    assert "diffusers_speedup" not in result.stderr and not (tmp_path / "run").exists()
