"""Schedulers, one self-contained file each."""

from .scheduling_edm_heun import EDMHeunScheduler
from .scheduling_flow import FlowScheduler

__all__ = ["EDMHeunScheduler", "FlowScheduler"]
