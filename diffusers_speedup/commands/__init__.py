"""The command line: ``diffusers-speedup <command> [options]``, one module of this package per command.

    diffusers-speedup train --config quickstart
    accelerate launch -m diffusers_speedup train --config imagenet256/dit_xl2_speed
    diffusers-speedup cache-latents --image_folder /data/imagenet/train --output_dir cache/in256
    diffusers-speedup sample | evaluate | export | posthoc-ema | convert ...

Each command module has ``main(argv)`` and runs on its own too (``python -m diffusers_speedup.commands.train``);
the checkout's ``train/*.py`` scripts call the same functions. Modules are imported only when their command runs,
so ``diffusers-speedup --help`` stays fast and one command's optional dependencies never break another.
"""

from __future__ import annotations

import importlib
import sys

# Command name -> (module that implements it, one-line summary for --help).
COMMANDS = {
    "train": ("diffusers_speedup.commands.train", "train a recipe (run it under `accelerate launch` for GPUs)"),
    "cache-latents": ("diffusers_speedup.commands.cache_latents", "cache AutoencoderKL latents of an image dataset"),
    "sample": ("diffusers_speedup.commands.sample", "generate many class-conditional samples, resumably"),
    "evaluate": ("diffusers_speedup.commands.evaluate", "FID of generated samples against a reference"),
    "export": ("diffusers_speedup.commands.export", "export a trained pipeline with a model card; push it"),
    "posthoc-ema": ("diffusers_speedup.commands.posthoc_ema", "reconstruct EDM2 post-hoc EMA weights"),
    "convert": ("diffusers_speedup.convert", "convert a released checkpoint into a pipeline folder"),
}

__all__ = ["COMMANDS", "main", "run"]


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: diffusers-speedup <command> [options]\n"
        "       accelerate launch [launch options] -m diffusers_speedup <command> [options]\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n`diffusers-speedup <command> --help` describes a command's options."
    )


def run(command: str, argv: list[str] | None = None) -> int:
    """Run `command` (a key of `COMMANDS`; ``_`` and ``-`` are interchangeable) on `argv`; returns its exit status.

    A command's `main` returns an exit status, or a result for in-process callers (a summary dict, the written
    paths), which counts as success.
    """
    from diffusers_speedup.errors import one_line_interrupt

    name = command.replace("_", "-")
    if name not in COMMANDS:
        raise SystemExit(f"diffusers-speedup: unknown command {command!r}; the commands are: {', '.join(COMMANDS)}")
    # Ctrl-C is one line for every command; those that know what was kept say so themselves.
    with one_line_interrupt():
        module = importlib.import_module(COMMANDS[name][0])
        result = module.main(argv)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffusers-speedup`` console script and of ``python -m diffusers_speedup``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from diffusers_speedup import __version__

        print(f"diffusers-speedup {__version__}")
        return 0
    return run(argv[0], argv[1:])
