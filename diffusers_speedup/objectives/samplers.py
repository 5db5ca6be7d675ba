"""Noise-level samplers for training.

All samplers share one contract::

    noise_levels, weights = sampler.sample(batch_size, device=None, generator=None)

``noise_levels`` are integer timesteps (LongTensor) for discrete schedules, σ (float32) for EDM and the time t ∈ [0, 1]
(float32, t = 1 noise) for a flow path; ``weights`` are per-sample float32 multipliers on the loss (all ones unless the
sampler also reweights, as SpeeD does). A sampler class says what it draws with ``draws``: "timestep", "sigma" or
"time".

A recipe names a sampler by ``kind``; "uniform" and "logit_normal" mean the discrete sampler on a DDPM schedule and
the continuous one on a flow path (`build_sampler` dispatches on the schedule), and "mode" is for flow paths only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from .flow import FlowPath


def _draw_device(generator: torch.Generator | None, device) -> torch.device | str:
    """Random draws happen where the generator lives (a CPU generator cannot fill a CUDA tensor)."""
    if generator is not None:
        return generator.device
    return device if device is not None else "cpu"


def _alphas_cumprod(noise_scheduler, sampler_name: str) -> torch.Tensor:
    alphas_cumprod = getattr(noise_scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"{sampler_name} needs a discrete noise schedule with `alphas_cumprod` (e.g. DDPMScheduler); "
            f"got {type(noise_scheduler).__name__}."
        )
    return torch.as_tensor(alphas_cumprod, dtype=torch.float64)


class UniformTimestepSampler:
    """Timesteps drawn uniformly from {0, …, T−1}: the baseline of DDPM, DiT and Min-SNR.

    Args:
        noise_scheduler: a diffusers scheduler with ``config.num_train_timesteps`` (or pass an int T).
    """

    kind, draws = "uniform", "timestep"

    def __init__(self, noise_scheduler):
        if isinstance(noise_scheduler, int):
            self.num_train_timesteps = noise_scheduler
        else:
            self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        draw_device = _draw_device(generator, device)
        timesteps = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=draw_device)
        return timesteps.to(device), torch.ones(batch_size, device=device)


def speed_pivot(alphas_cumprod: torch.Tensor, threshold: float = 1e-4) -> int:
    """SpeeD's "meaningful steps": the first t at which d√(1−ᾱ_t)/dt falls below ``threshold``, plus one.

    Beyond it the noisy input barely changes from step to step (the paper's convergence area). It is 642 for DiT's
    linear schedule (β from 1e-4 to 0.02, T = 1000) and 959 for the cosine schedule.
    """
    gradient = np.gradient(np.sqrt(1.0 - alphas_cumprod.numpy()))
    below = gradient < threshold
    return int(np.argmax(below)) + 1 if below.any() else len(alphas_cumprod)


class SpeeDTimestepSampler:
    """SpeeD (Wang et al. 2024, "A Closer Look at Time Steps is Worthy of Triple Speed-Up for Diffusion Model
    Training"): asymmetric timestep sampling, dual sampling and change-aware weighting.

    * Sampling: p(t) ∝ k for t < τ and ∝ 1 for t ≥ τ, suppressing the convergence area t ≥ τ.
    * Dual sampling: the second half of the batch mirrors the first about the schedule's pivot τ_ms
      (:func:`speed_pivot`): t′ = |t − τ_ms|. The official code draws ⌊n/2⌋+1 timesteps and mirrors all of them
      before truncating to n, which for even n keeps one mirror fewer than originals; here the first ⌈n/2⌉ draws
      and their mirrors pair up exactly.
    * Change-aware weights: with g_t = d(1−ᾱ_t)/dt min-max normalised over all T steps,
      w_t = (1−λ) + (2λ−1)·g_t for t < τ and w_t = 1 for t ≥ τ (the official code's ``weighting="ours"``).

    Args:
        noise_scheduler: a discrete diffusers scheduler (``alphas_cumprod``), e.g. DDPMScheduler.
        k: suppression factor, > 0 (paper configs: 5; FFHQ: 2). k = 1 turns the asymmetric sampling off.
        tau: start of the suppressed region, in (0, T]. The paper's configs use 700; ``None`` takes τ_ms.
        lam: λ in [0.5, 1] (paper configs: 0.6). λ > 1 would make weights negative, and λ < 0.5 inverts the
            emphasis on fast-changing steps. The official class default of 5 is such an invalid value.
        dual: mirror half of the batch about τ_ms.
        weighting: return the change-aware weights (otherwise all ones).
    """

    kind, draws = "speed", "timestep"

    def __init__(
        self,
        noise_scheduler,
        k: float = 5.0,
        tau: int | None = None,
        lam: float = 0.6,
        dual: bool = True,
        weighting: bool = True,
    ):
        alphas_cumprod = _alphas_cumprod(noise_scheduler, "SpeeDTimestepSampler")
        num_steps = len(alphas_cumprod)
        if not k > 0:
            raise ValueError(f"SpeeDTimestepSampler: k must be > 0, got {k}.")
        if not 0.5 <= lam <= 1.0:
            raise ValueError(
                f"SpeeDTimestepSampler: lam must lie in [0.5, 1], got {lam} (lam > 1 makes the weights negative; "
                "the paper's configs use 0.6)."
            )
        self.pivot = speed_pivot(alphas_cumprod)
        self.tau = self.pivot if tau is None else int(tau)
        if not 0 < self.tau <= num_steps:
            raise ValueError(f"SpeeDTimestepSampler: tau must lie in (0, {num_steps}], got {tau}.")
        self.k, self.lam, self.dual = float(k), float(lam), dual

        steps = torch.arange(num_steps)
        unnormalised = torch.where(steps < self.tau, self.k, 1.0).double()
        self.probabilities = (unnormalised / unnormalised.sum()).float()

        change = torch.from_numpy(np.gradient(1.0 - alphas_cumprod.numpy()))
        change = (change - change.min()) / (change.max() - change.min())
        weights = (1.0 - self.lam) + (2.0 * self.lam - 1.0) * change
        self.weights = torch.where(steps < self.tau, weights, torch.ones_like(weights)).float()
        if not weighting:
            self.weights = torch.ones(num_steps)

    def mirror(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Dual timesteps: t′ = τ_ms − t below the pivot and t − τ_ms above it."""
        return (timesteps - self.pivot).abs()

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        draw_device = _draw_device(generator, device)
        num_drawn = math.ceil(batch_size / 2) if self.dual else batch_size
        probabilities = self.probabilities.to(draw_device)
        drawn = torch.multinomial(probabilities, num_drawn, replacement=True, generator=generator)
        if self.dual:
            drawn = torch.cat([drawn, self.mirror(drawn[: batch_size - num_drawn])])
        weights = self.weights.to(draw_device)[drawn]
        return drawn.to(device), weights.to(device)


class LogNormalSigmaSampler:
    """EDM's training noise levels: ln σ ~ N(P_mean, P_std²).

    EDM (Karras et al. 2022) uses (−1.2, 1.2); EDM2 (Karras et al. 2024) uses (−0.4, 1.0) for ImageNet-512 latents
    and (−0.8, 1.6) for 64×64 pixels.
    """

    kind, draws = "lognormal", "sigma"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if not p_std > 0:
            raise ValueError(f"LogNormalSigmaSampler: p_std must be > 0, got {p_std}.")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        normal = torch.randn(batch_size, generator=generator, device=_draw_device(generator, device)).to(device)
        return (normal * self.p_std + self.p_mean).exp(), torch.ones(batch_size, device=device)


class LogitNormalTimestepSampler:
    """SD3's logit-normal density (Esser et al. 2024) on a discrete schedule: t = ⌊sigmoid(n)·T⌋, n ~ N(m, s²).

    Uses diffusers' ``compute_density_for_timestep_sampling``. Larger t is noisier here, as in the SD3 paper, so a
    positive ``logit_mean`` shifts training towards noise (diffusers' SD3 scripts index a descending table, which
    flips that sign).
    """

    kind, draws = "logit_normal", "timestep"

    def __init__(self, noise_scheduler, logit_mean: float = 0.0, logit_std: float = 1.0):
        if not logit_std > 0:
            raise ValueError(f"LogitNormalTimestepSampler: logit_std must be > 0, got {logit_std}.")
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        u = compute_density_for_timestep_sampling(
            "logit_normal",
            batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            device=_draw_device(generator, device),
            generator=generator,
        )
        timesteps = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return timesteps.to(device), torch.ones(batch_size, device=device)


class FlowTimeSampler:
    """Continuous time t ∈ [0, 1] (t = 1 noise) for a flow path, drawn from one of SD3's densities (Esser et al.
    2024, §3.1) through diffusers' ``compute_density_for_timestep_sampling`` and then shifted.

    The draw u ∈ (0, 1) is used as t itself, not as an index into a descending table as diffusers' SD3 scripts do, so
    t is never quantised and SD3's signs hold: logit_mean m > 0 puts more samples near noise. The shift s is the
    resolution shift of SD3 §5.3.2 (diffusers' ``FlowMatchEulerDiscreteScheduler`` ``shift``):
    t' = s·t / (1 + (s − 1)·t); s > 1 moves training towards noise, s = 1 leaves t as drawn.
    Everything is drawn where the generator lives and moved to ``device``, with no host sync.

    Args:
        shift: s > 0, applied on top of the density.
    """

    kind, draws, density = "", "time", "uniform"

    def __init__(self, shift: float = 1.0):
        if not shift > 0:
            raise ValueError(f"The {self.kind!r} time sampler: shift must be > 0, got {shift}.")
        self.shift = float(shift)

    def _density_params(self) -> dict:
        return {}

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        params = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, **self._density_params()}
        t = compute_density_for_timestep_sampling(
            self.density, batch_size, device=_draw_device(generator, device), generator=generator, **params
        )
        t = shift_time(t.float(), self.shift)
        return t.to(device), torch.ones(batch_size, device=device)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift t' = s·t / (1 + (s − 1)·t), which keeps 0 and 1 fixed."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


class UniformTimeSampler(FlowTimeSampler):
    """t ~ U(0, 1), then shifted: SiT's and REPA's default (SD3's "rf")."""

    kind, density = "uniform", "uniform"


class LogitNormalTimeSampler(FlowTimeSampler):
    """SD3's logit-normal density: t = sigmoid(n), n ~ N(m, s²), then shifted. (0, 1) is SD3's best rf/lognorm and
    LightningDiT's ``use_lognorm``; m > 0 means more noise.

    Args:
        logit_mean: m.
        logit_std: s > 0.
        shift: see :class:`FlowTimeSampler`.
    """

    kind, density = "logit_normal", "logit_normal"

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0):
        super().__init__(shift)
        if not logit_std > 0:
            raise ValueError(f"The 'logit_normal' time sampler: logit_std must be > 0, got {logit_std}.")
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def _density_params(self) -> dict:
        return {"logit_mean": self.logit_mean, "logit_std": self.logit_std}


# f_mode maps [0, 1] onto [0, 1] monotonically only for s in this range (SD3 §3.1).
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


class ModeTimeSampler(FlowTimeSampler):
    """SD3's mode sampling: t = f_mode(u; s) = 1 − u − s·(cos²(πu/2) − 1 + u), u ~ U(0, 1), then shifted.
    s > 0 favours the middle of the path, s < 0 its ends; SD3's ranked choices are 1.29 and 1.75.

    Args:
        mode_scale: s in [−1, 2/(π − 2)].
        shift: see :class:`FlowTimeSampler`.
    """

    kind, density = "mode", "mode"

    def __init__(self, mode_scale: float = 1.29, shift: float = 1.0):
        super().__init__(shift)
        low, high = MODE_SCALE_RANGE
        if not low <= mode_scale <= high:
            raise ValueError(
                f"The 'mode' time sampler: mode_scale must lie in [-1, 2/(π-2) = {high:.4f}], got {mode_scale}."
            )
        self.mode_scale = float(mode_scale)

    def _density_params(self) -> dict:
        return {"mode_scale": self.mode_scale}


def _schedule_family(noise_scheduler) -> str:
    if isinstance(noise_scheduler, FlowPath):
        return "flow"
    return "discrete" if getattr(noise_scheduler, "alphas_cumprod", None) is not None else "edm"


def check_sampler_fits(sampler_class: type, noise_scheduler) -> None:
    """Raise unless the sampler draws the noise levels of the schedule: timesteps for a discrete (DDPM-style)
    schedule, σ for an EDM one, t for a flow path. A sampler class of one's own says what it draws with ``draws``
    ("timestep" when absent) and may name itself with ``kind``."""
    draws = getattr(sampler_class, "draws", "timestep")
    name = repr(getattr(sampler_class, "kind", sampler_class.__name__))
    family = _schedule_family(noise_scheduler)
    discrete = family == "discrete"
    if family == "flow" and draws != "time":
        raise ValueError(
            f"The {name} sampler draws {'discrete timesteps' if draws == 'timestep' else 'σ'} and does not fit a "
            f"flow path (continuous t); use one of {', '.join(FLOW_SAMPLERS)}."
        )
    if draws == "time" and family != "flow":
        raise ValueError(f"The {name} sampler draws flow time t ∈ [0, 1] and needs a flow path.")
    if draws == "timestep" and not discrete:
        raise ValueError(
            f"The {name} sampler draws discrete timesteps and needs a discrete (DDPM-style) schedule; "
            f"{type(noise_scheduler).__name__} is continuous. Use the 'lognormal' sampler."
        )
    if draws == "sigma" and discrete:
        raise ValueError(f"The {name} sampler draws continuous σ and needs an EDM schedule.")


SAMPLERS = {
    cls.kind: cls
    for cls in (UniformTimestepSampler, SpeeDTimestepSampler, LogNormalSigmaSampler, LogitNormalTimestepSampler)
}
# The same kinds on a flow path draw continuous t.
FLOW_SAMPLERS = {cls.kind: cls for cls in (UniformTimeSampler, LogitNormalTimeSampler, ModeTimeSampler)}
# "default" is the schedule's usual sampler: uniform timesteps (discrete), log-normal σ (EDM), uniform t (flow).
SAMPLER_KINDS = ("default", *SAMPLERS, *(kind for kind in FLOW_SAMPLERS if kind not in SAMPLERS))


def build_sampler(config: dict, noise_scheduler):
    """A sampler from its recipe form ``{"kind": ..., **params}``; "default" picks the schedule's usual one."""
    config = dict(config)
    kind = config.pop("kind", "default")
    family = _schedule_family(noise_scheduler)
    if kind == "default":
        kind = "lognormal" if family == "edm" else "uniform"
    registry = {**SAMPLERS, **FLOW_SAMPLERS} if family == "flow" else {**FLOW_SAMPLERS, **SAMPLERS}
    if kind not in registry:
        raise ValueError(f"Unknown sampler kind {kind!r}; expected one of {', '.join(SAMPLER_KINDS)}.")
    cls = registry[kind]
    check_sampler_fits(cls, noise_scheduler)
    try:
        return cls(**config) if cls.draws in ("sigma", "time") else cls(noise_scheduler, **config)
    except TypeError as error:
        raise ValueError(f"Sampler {kind!r}: {error}") from error
