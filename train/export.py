"""Export a trained pipeline with a model card, and optionally push it: ``python train/export.py --help``.

The same command as ``diffusers-speedup export`` (diffusers_speedup/commands/export.py), kept so that the commands
work from a clone.
"""

import sys

from diffusers_speedup.commands import run

if __name__ == "__main__":
    sys.exit(run("export"))
