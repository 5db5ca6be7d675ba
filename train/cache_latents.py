"""Cache AutoencoderKL latents of an image dataset: ``accelerate launch train/cache_latents.py --help``.

The same command as ``diffusers-speedup cache-latents`` (diffusers_speedup/commands/cache_latents.py), kept so that the commands
work from a clone.
"""

import sys

from diffusers_speedup.commands import run

if __name__ == "__main__":
    sys.exit(run("cache-latents"))
