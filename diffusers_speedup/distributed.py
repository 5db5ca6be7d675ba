"""Checks that a process runs in the world it was launched into.

A launcher says how many processes it started through the environment (torchrun and ``accelerate launch`` set
``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``; MPI sets its own names). The process group that accelerate then builds
can be smaller without any error: on a machine without a GPU, ``Accelerator()`` (no ``cpu=True``) ignores the
torchrun variables, so N "rank 0 of 1" processes train independently into one output folder; and
``accelerate launch --cpu --num_processes N`` runs the script only once (accelerate's ``--cpu`` launcher without a
config file starts a single process). Entry points call :func:`check_world_size` right after building their
``Accelerator`` and stop before any work when the two disagree.
"""

from __future__ import annotations

import os

# How launchers announce the number of processes: torchrun / accelerate, then the MPI flavours accelerate reads.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchError(RuntimeError):
    """The processes that run are not the ones that were launched; the message says how to launch correctly."""


def launched_world_size(environ=None) -> int | None:
    """The number of processes the launcher started, from the environment; None when no launcher says."""
    environ = os.environ if environ is None else environ
    for name in WORLD_SIZE_VARIABLES:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"{name}={value!r} in the environment is not a number of processes.") from None
    return None


def wants_cpu_process_group(environ=None) -> bool:
    """True when several processes were launched on a machine without a GPU: only accelerate's ``cpu=True`` then
    joins them into one (gloo) process group."""
    import torch

    return (launched_world_size(environ) or 1) > 1 and not torch.cuda.is_available()


def check_world_size(num_processes: int, script: str, cpu_flag: str = "", environ=None) -> None:
    """Stop unless this process runs in a world of the size it was launched into.

    Args:
        num_processes: the size of the process group this process is part of (``accelerator.num_processes``).
        script: how the entry point is run (``train/train.py``), for the message.
        cpu_flag: the setting that asks this entry point for the CPU process group (``train.cpu=true``), if any.
        environ: the environment to read (default: ``os.environ``).

    Raises:
        LaunchError: naming both sizes and how to launch correctly.
    """
    environ = os.environ if environ is None else environ
    launched = launched_world_size(environ)
    hint = _cpu_launch_hint(script, cpu_flag)
    if launched is None:
        # accelerate's --cpu launcher exports a rendezvous address only when asked for several processes, and
        # then starts the script once anyway.
        if _truthy(environ.get("ACCELERATE_USE_CPU")) and environ.get("MASTER_ADDR") and num_processes == 1:
            raise LaunchError(
                f"{script} was started by `accelerate launch --cpu --num_processes N` with N > 1, which runs a "
                f"single process (accelerate's --cpu launcher starts the script once). {hint}"
            )
        return
    if launched != num_processes:
        import torch

        if torch.cuda.is_available():
            hint = (
                f"Launch N GPU processes with `torchrun --nproc_per_node N {script} ...` or `accelerate launch "
                f"--multi_gpu --num_processes N {script} ...`, and check that each process can see a GPU."
            )
        reason = ""
        if num_processes == 1 and wants_cpu_process_group(environ):
            reason = (
                " This machine has no GPU, and without the CPU process group every process would run alone, "
                "all writing into one output folder."
            )
        raise LaunchError(
            f"{script} was launched as {launched} processes (WORLD_SIZE={launched}), but this process is one of "
            f"{num_processes}.{reason} {hint}"
        )


def _cpu_launch_hint(script: str, cpu_flag: str) -> str:
    arguments = f"{script} ... {cpu_flag}".strip()
    return (
        f"To run N processes on CPU, use `torchrun --nproc_per_node N {arguments}` or "
        f"`accelerate launch --multi_gpu --num_processes N {arguments}`; to run one process, use `python {script} ...`."
    )


def require_single_process(script: str, environ=None) -> None:
    """For entry points that run in one process only: refuse a multi-process launch, which would make every
    process do the same work into the same files."""
    launched = launched_world_size(environ)
    if launched is not None and launched > 1:
        raise LaunchError(
            f"{script} runs in one process, but was launched as {launched} (WORLD_SIZE={launched}); "
            f"run it with `python {script} ...`."
        )


def _truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")
