"""diffusers pipelines, one self-contained file each; installed as ``diffusers_speedup.pipelines``."""

from .pipeline_class_conditional import ClassConditionalPipeline

__all__ = ["ClassConditionalPipeline"]
