"""Export of trained pipelines to Hub-ready folders with model cards, and pushing them to the Hub."""

from .export import export_pipeline, ship_pipeline_code
from .model_card import TECHNIQUES, ModelCardInfo, build_model_card, detect_techniques
from .push import BackgroundHubPusher, PushError, PushResult, push_dataset_folder, push_folder_to_hub

__all__ = [
    "TECHNIQUES",
    "BackgroundHubPusher",
    "ModelCardInfo",
    "PushError",
    "PushResult",
    "build_model_card",
    "detect_techniques",
    "export_pipeline",
    "push_dataset_folder",
    "push_folder_to_hub",
    "ship_pipeline_code",
]
