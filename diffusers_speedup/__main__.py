"""``python -m diffusers_speedup <command> ...``, so that ``accelerate launch -m diffusers_speedup train ...`` works."""

import sys

from diffusers_speedup.commands import main

if __name__ == "__main__":
    sys.exit(main())
