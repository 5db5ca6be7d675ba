"""Schedulers, one self-contained file each."""

from .scheduling_edm_heun import EDMHeunScheduler

__all__ = ["EDMHeunScheduler"]
