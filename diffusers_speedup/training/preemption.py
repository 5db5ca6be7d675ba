"""Stopping for preemption: SIGTERM, which SLURM and Kubernetes send some time before they kill a job (and torchrun
and ``accelerate launch`` pass on to every process), ends the run at the next step boundary with a checkpoint, so
that no step is lost.

The handler only sets a flag; the training loop reads it after each optimizer step, where saving a checkpoint is what
a periodic checkpoint does, so a run resumed from it continues bit for bit. On one process the flag is a Python
bool: nothing to synchronise. Several processes must stop at the same step, since they write the checkpoint
together, and a signal reaches them at slightly different moments: there the flag is reduced (a maximum) across them
at every step boundary, as one CPU integer over a gloo process group. That is a round trip between the hosts, not a
device sync: it waits for no GPU work, so the training step stays free of host syncs and the GPUs' queues stay full.
"""

from __future__ import annotations

import signal
import threading

import torch

# What a process that SIGTERM ends returns (128 + 15); the train command returns it after a preemption checkpoint.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class TrainingPreempted(Exception):
    """Training stopped for a SIGTERM, after writing a checkpoint of the step it reached (the message says which)."""


class SigtermFlag:
    """Use as ``with SigtermFlag(num_processes) as sigterm:`` around the loop; ``sigterm.received()`` at each step
    boundary says, the same on every process, whether any of them got a SIGTERM. The previous handler is back after
    the block, so a SIGTERM outside it (during set-up or the final export) ends the process as before.

    Args:
        num_processes: the processes of the run (``accelerator.num_processes``); all of them must create it, as the
            reduction runs over a process group of its own.
    """

    def __init__(self, num_processes: int):
        self._flag = False
        self._group = torch.distributed.new_group(backend="gloo") if num_processes > 1 else None
        self._previous = None

    def __enter__(self) -> SigtermFlag:
        # Python runs signal handlers in the main thread only, and only there can one be installed.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._set)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _set(self, signum, frame) -> None:
        self._flag = True  # nothing else here: the loop may be anywhere, inside a collective or a checkpoint

    def received(self) -> bool:
        """Whether any process of the run got a SIGTERM (on several processes, a collective: call it on all)."""
        if self._group is None:
            return self._flag
        flag = torch.tensor([int(self._flag)], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
