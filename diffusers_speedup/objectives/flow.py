"""Flow-matching interpolants: x_t = α(t)·x0 + σ(t)·ε on continuous t ∈ [0, 1], t = 1 being pure noise.

The paths are SiT's (Ma et al. 2024, `willisma/SiT` `transport/path.py`), written in the time direction of REPA, SD3
and RAE (t = 1 is noise; SiT's own code runs the other way, with α = t):

* ``linear`` (rectified flow, SiT's Linear): α = 1 − t, σ = t.
* ``gvp`` (SiT's GVP, REPA's "cosine"): α = cos(πt/2), σ = sin(πt/2), so α² + σ² = 1.

**Time convention.** The model is called with ``timestep = t`` itself: unscaled (in [0, 1], not ×1000), with t = 1
the noise end, as REPA's ``loss.py`` calls it. A sampler integrates the velocity from t = 1 to t = 0 and feeds the
same t. (SiT's and LightningDiT's networks were trained on 1 − t, the time of their data-at-1 path.)

:class:`FlowPath` is what ``build_noise_scheduler`` makes for ``objective.schedule.kind: flow``; the objective reads
its path from it as it reads ᾱ from a DDPM scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOW_PATHS = ("linear", "gvp")


@dataclass(frozen=True)
class FlowPath:
    """One of SiT's interpolants as pure functions of t (float tensors, any shape).

    Args:
        path: "linear" (α = 1 − t, σ = t) or "gvp" (α = cos(πt/2), σ = sin(πt/2)).
    """

    path: str = "linear"

    def __post_init__(self):
        if self.path not in FLOW_PATHS:
            raise ValueError(f"Unknown flow path {self.path!r}; expected one of {', '.join(FLOW_PATHS)}.")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t if self.path == "linear" else torch.cos(t * (math.pi / 2))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.path == "linear" else torch.sin(t * (math.pi / 2))

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """dα/dt."""
        if self.path == "linear":
            return torch.full_like(t, -1.0)
        return -(math.pi / 2) * torch.sin(t * (math.pi / 2))

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """dσ/dt."""
        if self.path == "linear":
            return torch.ones_like(t)
        return (math.pi / 2) * torch.cos(t * (math.pi / 2))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """(α/σ)² in float32: ∞ at t = 0 (data), 0 at t = 1 (noise), never NaN."""
        t = t.float()
        return (self.alpha(t) / self.sigma(t)).square()

    def x0_per_velocity(self, t: torch.Tensor) -> torch.Tensor:
        """∂x̂0/∂v̂ at fixed x_t: the x0 error is this factor times the velocity error.

        With x_t fixed, ε̂ = (x_t − α·x̂0)/σ, so v̂ = α̇·x̂0 + σ̇·ε̂ changes by Δv = (α̇ − σ̇·α/σ)·Δx0, i.e.
        Δx0 = σ/(α̇σ − ασ̇)·Δv. It is −t on the linear path (α̇σ − ασ̇ = −1) and −(2/π)·sin(πt/2) on GVP
        (α̇σ − ασ̇ = −π/2): finite everywhere, 0 at t = 0.
        """
        t = t.float()
        return self.sigma(t) / (self.d_alpha(t) * self.sigma(t) - self.alpha(t) * self.d_sigma(t))
