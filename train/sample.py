"""Generate class-conditional samples from a pipeline folder: ``accelerate launch train/sample.py --help``.

The same command as ``diffusers-speedup sample`` (diffusers_speedup/commands/sample.py), kept so that the commands
work from a clone.
"""

import sys

from diffusers_speedup.commands import run

if __name__ == "__main__":
    sys.exit(run("sample"))
