"""Train a recipe: ``accelerate launch -m diffusers_speedup train --config <recipe> [key.sub=value ...]``.

The recipe is a YAML file or the name of a shipped one (``quickstart``, ``imagenet256/dit_xl2_speed``).
"""

import argparse
import logging
import sys

from diffusers_speedup.errors import one_line_errors, one_line_interrupt
from diffusers_speedup.training import ConfigError, Trainer, load_config
from diffusers_speedup.training.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted


def resume_point(output_dir) -> str:
    """What an interrupted run keeps: its newest complete checkpoint (checkpoints are written atomically)."""
    from diffusers_speedup.training.checkpoints import find_latest_checkpoint

    checkpoint = find_latest_checkpoint(output_dir, clean=False)
    if checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last complete checkpoint is {checkpoint}; train.resume=latest continues from it"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-speedup train", description=__doc__)
    parser.add_argument(
        "--config", default=None, help="YAML recipe or shipped recipe name, e.g. quickstart (default: defaults)"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with one_line_errors():
        try:
            trainer = Trainer(load_config(args.config, args.overrides))
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        with one_line_interrupt(lambda: resume_point(trainer.output_dir)):
            try:
                export_dir = trainer.train()
            except TrainingPreempted:
                return PREEMPTED_EXIT_CODE  # the log says which checkpoint was saved and how to continue
    if trainer.push_result is not None and not trainer.push_result.ok:
        return 3  # trained and exported, but the final push failed (logged with how to retry)
    if export_dir is not None:
        print(f"Exported pipeline: {export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
