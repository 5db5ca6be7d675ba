"""Experiment trackers: the hyper-parameters they record and the images they log."""

from __future__ import annotations

from accelerate import Accelerator

from .config import Config, config_to_dict


def tracker_config(config: Config) -> dict:
    """Flat scalar hyper-parameters, which TensorBoard's hparams view accepts."""
    flat = {}

    def visit(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                visit(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", config_to_dict(config))
    return flat


def log_image_to_trackers(accelerator: Accelerator, name: str, image, step: int) -> None:
    """Log one PIL image to every tracker of `accelerator` that takes images, in the form each one's
    ``log_images`` expects (trackers without it, such as MLflow's in accelerate, are skipped)."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if not callable(getattr(tracker, "log_images", None)):
            continue
        if tracker.name == "tensorboard":
            tracker.log_images({name: pixels[None]}, step=step, dataformats="NHWC")
        elif tracker.name in ("aim", "clearml"):
            tracker.log_images({name: pixels}, step=step)
        else:  # W&B, SwanLab and trackers of one's own: a list of images per key
            tracker.log_images({name: [pixels]}, step=step)
