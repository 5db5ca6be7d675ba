"""Export of trained pipelines to Hub-ready folders with model cards (also of a checkpoint, from the record it keeps
of its pipeline), and pushing them to the Hub. Nothing here imports `diffusers_speedup.training`, which uses this."""

from .export import export_pipeline, ship_pipeline_code
from .model_card import TECHNIQUES, ModelCardInfo, build_model_card, detect_techniques
from .pipeline_record import PipelineRecord, export_checkpoint
from .push import BackgroundHubPusher, PushError, PushResult, push_dataset_folder, push_folder_to_hub

__all__ = [
    "TECHNIQUES",
    "BackgroundHubPusher",
    "ModelCardInfo",
    "PipelineRecord",
    "PushError",
    "PushResult",
    "build_model_card",
    "detect_techniques",
    "export_checkpoint",
    "export_pipeline",
    "push_dataset_folder",
    "push_folder_to_hub",
    "ship_pipeline_code",
]
