"""FID of generated samples against a reference: ``python train/evaluate.py --help``.

The same command as ``diffusers-speedup evaluate`` (diffusers_speedup/commands/evaluate.py), kept so that the commands
work from a clone.
"""

import sys

from diffusers_speedup.commands import run

if __name__ == "__main__":
    sys.exit(run("evaluate"))
