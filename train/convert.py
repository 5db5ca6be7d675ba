"""Convert a released checkpoint into a pipeline folder: ``python train/convert.py <format> --help``.

The same command as ``diffusers-speedup convert`` (diffusers_speedup/convert/), kept so that the commands work from
a clone.
"""

import sys

from diffusers_speedup.commands import run

if __name__ == "__main__":
    sys.exit(run("convert"))
