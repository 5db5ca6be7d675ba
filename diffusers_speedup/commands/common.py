"""What several commands share: one spelling for each of their common options, and loading a pipeline.

The commands spell a concept as the recipes do (the recipes are the package's main interface), and as diffusers'
example scripts do where the two agree:

- precision: `--mixed_precision fp32|bf16|fp16`, the values of a recipe's `train.mixed_precision`. `fp32` rather
  than accelerate's `no` names what is computed in, and is the same word `posthoc-ema --dtype` uses for the dtype
  it stores. A launcher's `no` still reaches the trainer as `fp32`;
- privacy: `--private`, public without it (a recipe's `hub.private: false`);
- pushing: the `--push_to_hub` flag, with the repository in `--hub_model_id` (a model) or `--hub_dataset_id` (a
  dataset), as a recipe's `hub.push_to_hub` and `hub.hub_model_id` and diffusers' example scripts.

An old spelling keeps working for one release and warns (`FutureWarning`) with the new one.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable

from diffusers_speedup.utils import meant_as_local_path

PRECISIONS = ("fp32", "bf16", "fp16")
"""The values of every precision option, spelled as a recipe's `train.mixed_precision`."""


def warn_deprecated(old: str, instead: str) -> None:
    """Warn that the spelling `old` goes in the next release; `instead` says what to write now."""
    warnings.warn(f"{old} is deprecated and will stop working in the next release; {instead}.", FutureWarning, 2)


def renamed_values(option: str, renames: dict[str, str]) -> Callable[[str], str]:
    """An argparse `type` for `option` that turns an old value (a key of `renames`) into its new one, warning.

    Give the argument `choices` with the new values only: argparse checks them after this conversion, so `--help`
    lists the new values alone and any other value is refused with a message naming `option`.
    """

    def new_spelling(value: str) -> str:
        if value in renames:
            warn_deprecated(f"{option} {value}", f"use {option} {renames[value]}")
            return renames[value]
        return value

    return new_spelling


def positive_int(value: str) -> int:
    """An argparse `type` for counts (samples, steps, batch sizes): argparse names the option when it refuses one."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def load_pipeline(name_or_path: str | os.PathLike, *, class_conditional: bool = False):
    """The pipeline of a folder or Hub id, loaded without running code shipped inside it.

    By default, the class its `model_index.json` names: `ClassConditionalPipeline` with the classes installed with
    this package (an exported folder also ships them as code files), any other pipeline through `DiffusionPipeline`.
    With `class_conditional=True` every pipeline loads as `ClassConditionalPipeline`, which takes DiTPipeline's
    layout unchanged and adds guidance intervals, guide networks and DiT's guidance channels (what `sample` needs).
    """
    from diffusers import DiffusionPipeline

    from diffusers_speedup.pipelines.pipeline_class_conditional import ClassConditionalPipeline

    # Without this, a mistyped folder is looked up on the Hub and answered as a malformed repository id.
    if meant_as_local_path(str(name_or_path)) and not os.path.exists(name_or_path):
        raise FileNotFoundError(f"pipeline folder {name_or_path} does not exist")
    if not class_conditional:
        class_name = DiffusionPipeline.load_config(name_or_path).get("_class_name")
        # An exported folder names its pipeline as a shipped file: ["pipeline_class_conditional", "ClassConditional..."].
        class_name = class_name[1] if isinstance(class_name, list) else class_name
        if class_name != ClassConditionalPipeline.__name__:
            return DiffusionPipeline.from_pretrained(name_or_path)
    return ClassConditionalPipeline.from_pretrained(name_or_path)
