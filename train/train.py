"""Train a recipe: ``accelerate launch train/train.py --config configs/quickstart.yaml [key.sub=value ...]``.

The same command as ``diffusers-speedup train`` (diffusers_speedup/commands/train.py), kept so that the commands
work from a clone.
"""

import sys

from diffusers_speedup.commands import run

if __name__ == "__main__":
    sys.exit(run("train"))
