"""Reconstruct EDM2 post-hoc EMA weights after training: ``python train/posthoc_ema.py --help``.

The same command as ``diffusers-speedup posthoc-ema`` (diffusers_speedup/commands/posthoc_ema.py), kept so that the commands
work from a clone.
"""

import sys

from diffusers_speedup.commands import run

if __name__ == "__main__":
    sys.exit(run("posthoc-ema"))
