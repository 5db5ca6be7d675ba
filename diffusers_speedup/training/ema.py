"""Exponential moving averages of model weights.

Two kinds:

- `ConstantEMA`: the constant-decay EMA that DiT and U-ViT use (decay 0.9999 from the first update). diffusers'
  `EMAModel(decay=0.9999)` warms the decay up as `(1 + n) / (10 + n)` by default; with `min_decay=0.9999` it
  computes the same average.
- `PowerFunctionEMA`: EDM2's power-function EMA (Karras et al. 2024, App. C). Each profile averages the whole
  trajectory with weights proportional to `t^gamma`, so its length is a fixed fraction of training time (`sigma_rel`).
  Periodic snapshots of the profiles allow any other `sigma_rel` to be reconstructed after training
  (`reconstruct_posthoc_ema`).

Both keep the averaged weights in fp32 in a deep copy of the live model (`.model`, always in eval mode, usable for
sampling and `save_pretrained`).

Why not `EMAModel`: diffusers has no EDM2 power-function EMA, and the trainer treats both kinds alike, through one
interface (`update(model, step, nimg)`, `.model`, `state_dict`, and `MODEL_STATE_KEYS`, where the state dict keeps
the weights of `.model`, which the exporter reads from a checkpoint). `EMAModel` keeps a list of shadow tensors that are
swapped into the live model (`store` / `copy_to` / `restore`) to sample or save, matched to its parameters by position
and counted by its own number of calls; here the average is a module of its own (buffers included) that the sampling
pipeline and the export use as it is, matched by parameter name (once, behind DDP and torch.compile wrappers), and
updated by the trainer's optimizer step, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import atomic_write, unwrap_model

# sigma_rel must stay below this: it is the profile width at gamma = 0, and gamma must be positive.
MAX_SIGMA_REL = 12**-0.5

SNAPSHOT_DIR_NAME = "ema_snapshots"
SNAPSHOT_PATTERN = re.compile(r"^phema-(\d+)-(\d+\.\d+)\.safetensors$")


def _make_shadow_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A detached fp32 deep copy of `model` in eval mode, without accelerate's autocast forward wrapper."""
    shadow = copy.deepcopy(unwrap_model(model))
    # accelerate.prepare() stores an autocast-wrapped forward on the instance; the copy is a plain module.
    for name in ("forward", "_original_forward"):
        shadow.__dict__.pop(name, None)
    shadow.float()  # not .to(dtype): diffusers' ModelMixin.to warns about fp32-kept modules on every dtype cast
    shadow.requires_grad_(False)
    shadow.eval()
    return shadow


def _float_params(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, p) for name, p in module.named_parameters() if p.is_floating_point()]


class _ShadowModule:
    """Shared plumbing for an averaged copy of a model: parameter matching, buffers, copy_to."""

    _param_names: list[str]  # of the averaged copy, set by the subclass
    _bound_model: torch.nn.Module | None = None  # the live model of the latest update, and its parameters
    _bound_params: list[torch.Tensor]

    def _live_params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The floating-point parameters of `model`, in the order of the averaged ones.

        They are matched by name once, on the first update with this model, and reused after that: the parameter
        objects stay the same when the model is moved, compiled in place or wrapped by DDP.
        """
        if model is self._bound_model:
            return self._bound_params
        live = _float_params(unwrap_model(model))
        names = [name for name, _ in live]
        if names != self._param_names:
            missing = sorted(set(self._param_names) - set(names))
            extra = sorted(set(names) - set(self._param_names))
            raise ValueError(
                f"{type(self).__name__}.update: the model's parameters differ from the ones the EMA was built from "
                f"(missing: {missing[:5]}, unexpected: {extra[:5]})."
            )
        self._bound_model, self._bound_params = model, [p for _, p in live]
        return self._bound_params

    @staticmethod
    @torch.no_grad()
    def _copy_buffers(model: torch.nn.Module, shadow: torch.nn.Module) -> None:
        shadow_buffers = dict(shadow.named_buffers())
        for name, buffer in unwrap_model(model).named_buffers():
            if name in shadow_buffers:
                shadow_buffers[name].copy_(buffer)

    @staticmethod
    @torch.no_grad()
    def _copy_params(source: torch.nn.Module, target: torch.nn.Module) -> None:
        target = unwrap_model(target)
        target_params = dict(target.named_parameters())
        for name, p in source.named_parameters():
            if name not in target_params:
                raise ValueError(f"copy_to: the target model has no parameter named {name!r}.")
            target_params[name].copy_(p)


class ConstantEMA(_ShadowModule):
    """Constant-decay EMA of a model's weights, as in DiT: `ema = decay * ema + (1 - decay) * param`.

    The average starts as a copy of the model at construction time (DiT's `update_ema(ema, model, decay=0)`), and
    every update uses the same decay: there is no warm-up.

    Args:
        model (`torch.nn.Module`): the live model (it may still be wrapped by DDP or torch.compile).
        decay (`float`, defaults to 0.9999): decay applied at every update. The averaging horizon is about
            `1 / (1 - decay)` optimizer steps.
        start_step (`int`, defaults to 0): up to and including this step the average simply copies the model;
            averaging starts at the first update after it.
    """

    # Where `state_dict()` keeps the weights of `.model`: a checkpoint's reader finds them without building an EMA.
    MODEL_STATE_KEYS = ("model",)

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ConstantEMA: decay must be in [0, 1), got {decay}.")
        if start_step < 0:
            raise ValueError(f"ConstantEMA: start_step must be >= 0, got {start_step}.")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.step = 0
        self.num_updates = 0
        self.model = _make_shadow_copy(model)
        self._param_names = [name for name, _ in _float_params(self.model)]
        self._shadow_params = [p for _, p in _float_params(self.model)]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, nimg: int | None = None) -> None:
        """Fold the current weights of `model` into the average.

        Args:
            model: the live model.
            step: optimizer steps done, this one included.
            nimg: images seen; unused (the decay is the same at every step), taken so that both EMA kinds are
                updated by the same call.
        """
        live = self._live_params(model)
        self.step = int(step)
        if step <= self.start_step:
            decay = 0.0
        else:
            decay = self.decay
            self.num_updates += 1
        live = [p.to(device=s.device, dtype=s.dtype) for p, s in zip(live, self._shadow_params)]
        if live:
            torch._foreach_lerp_(self._shadow_params, live, 1.0 - decay)
        self._copy_buffers(model, self.model)

    def copy_to(self, model: torch.nn.Module) -> None:
        """Copy the averaged weights into `model` (cast to its dtype and device)."""
        self._copy_params(self.model, model)

    def to(self, device=None, dtype=None) -> ConstantEMA:
        """Move the average to `device`; a `dtype` other than fp32 is refused, since the average must stay fp32."""
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"ConstantEMA.to: the average is kept in float32, got dtype={dtype}.")
        self.model.to(device)
        return self

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "step": self.step,
            "num_updates": self.num_updates,
            "model": self.model.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        for key in ("decay", "start_step"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"ConstantEMA.load_state_dict: checkpoint has {key}={state_dict[key]}, this EMA has "
                    f"{key}={getattr(self, key)}."
                )
        self.step = int(state_dict["step"])
        self.num_updates = int(state_dict["num_updates"])
        self.model.load_state_dict(state_dict["model"])
        self.model.eval()


# ------------------------------------------------------------------------------------------------------------------
# Power-function EMA (EDM2)
# ------------------------------------------------------------------------------------------------------------------


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile with exponent `gamma` (EDM2 eq. 123)."""
    gamma = float(gamma)
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}.")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def _check_sigma_rel(sigma_rel: float, name: str = "sigma_rel") -> float:
    sigma_rel = float(sigma_rel)
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(
            f"{name}={sigma_rel} is outside the valid range (0, {MAX_SIGMA_REL:.4f}) of power-function EMA profiles "
            "(reconstruction is accurate for about 0.015 to 0.25)."
        )
    return sigma_rel


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent `gamma` of the power-function profile whose relative std is `sigma_rel`.

    Inverts `gamma_to_sigma_rel`: `gamma` is the largest real root of
    `gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0`.
    """
    sigma_rel = _check_sigma_rel(sigma_rel)
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))


def power_function_ema_beta(t: float, delta_t: float, gamma: float) -> float:
    """Decay of one power-function EMA update: `beta = (1 - delta_t / t) ** (gamma + 1)`.

    `t` is the training time after the update and `delta_t` the time since the previous one (EDM2 counts both in
    images: `t = cur_nimg`, `delta_t = batch_size`; with a constant batch size, steps give the same result).
    """
    if not 0 < delta_t <= t:
        raise ValueError(f"power-function EMA needs 0 < delta_t <= t, got t={t}, delta_t={delta_t}.")
    return (1.0 - delta_t / t) ** (gamma + 1.0)


def _snapshot_path(snapshot_dir: str | os.PathLike, t: int, sigma_rel: float) -> Path:
    return Path(snapshot_dir) / f"phema-{int(t):012d}-{sigma_rel:.3f}.safetensors"


class PowerFunctionEMA(_ShadowModule):
    """EDM2's power-function EMA with one averaged copy per profile, plus snapshots for post-hoc reconstruction.

    Profile `gamma` at time `t` is `(gamma + 1) / t^(gamma + 1) * integral_0^t tau^gamma theta(tau) dtau`. Each update
    at time `t` (after the optimizer step) with `delta_t` = time since the previous update does
    `ema <- beta * ema + (1 - beta) * theta`, `beta = (1 - delta_t / t)^(gamma + 1)`. Time is images seen (`nimg`)
    when `update` gets it, as in EDM2, and optimizer steps otherwise; don't mix the two in one run.

    Args:
        model (`torch.nn.Module`): the live model (it may still be wrapped by DDP or torch.compile).
        sigma_rels (`Sequence[float]`, defaults to `(0.05, 0.10)`): the tracked profiles' widths relative to the
            training time; each must be in (0, 12^-0.5).
        snapshot_dir (`str`, *optional*): folder for snapshots. Pass it only on the main process; other ranks keep
            the same averages without writing anything.
        snapshot_every (`int`, *optional*): write a snapshot of every profile each time the optimizer step count
            crosses a multiple of this (counted in steps even when `t` is images; EDM2 snapshots every 8Mi images,
            i.e. 4096 steps at batch 2048).
        snapshot_dtype (`torch.dtype`, defaults to `torch.float16`): dtype of the stored parameters (buffers keep
            their own dtype). fp16 halves the disk use, as in EDM2.
    """

    # Where `state_dict()` keeps the weights of `.model` (the first profile); see ConstantEMA.
    MODEL_STATE_KEYS = ("models", 0)

    def __init__(
        self,
        model: torch.nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_dir: str | os.PathLike | None = None,
        snapshot_every: int | None = None,
        snapshot_dtype: torch.dtype = torch.float16,
    ):
        if isinstance(sigma_rels, (int, float)):
            sigma_rels = (sigma_rels,)
        if len(sigma_rels) == 0:
            raise ValueError("PowerFunctionEMA: sigma_rels must name at least one profile.")
        self.sigma_rels = [_check_sigma_rel(s, "sigma_rels") for s in sigma_rels]
        if len({f"{s:.3f}" for s in self.sigma_rels}) != len(self.sigma_rels):
            raise ValueError(f"PowerFunctionEMA: sigma_rels must differ in the third decimal, got {self.sigma_rels}.")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        if snapshot_every is not None and snapshot_every <= 0:
            raise ValueError(f"PowerFunctionEMA: snapshot_every must be positive, got {snapshot_every}.")
        self.snapshot_dir = snapshot_dir
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = snapshot_dtype
        self.t = 0
        self.step = 0
        self.models = [_make_shadow_copy(model) for _ in self.sigma_rels]
        self._param_names = [name for name, _ in _float_params(self.models[0])]
        self._shadow_params = [[p for _, p in _float_params(m)] for m in self.models]

    @property
    def model(self) -> torch.nn.Module:
        """The first profile's averaged model (the default one for sampling during training)."""
        return self.models[0]

    def get_model(self, sigma_rel: float | None = None) -> torch.nn.Module:
        """The averaged model of the tracked profile `sigma_rel` (the first profile when None)."""
        return self.models[self._profile_index(sigma_rel)]

    def _profile_index(self, sigma_rel: float | None) -> int:
        if sigma_rel is None:
            return 0
        for i, s in enumerate(self.sigma_rels):
            if abs(s - sigma_rel) < 1e-9:
                return i
        raise ValueError(f"PowerFunctionEMA: sigma_rel={sigma_rel} is not tracked (tracked: {self.sigma_rels}).")

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, nimg: int | None = None) -> None:
        """Fold the current weights of `model` into every profile.

        Args:
            model: the live model.
            step: optimizer steps done, this one included.
            nimg: images seen, this step included. When given it is the EMA's time `t` (EDM2's choice, correct with
                a changing batch size); otherwise `t = step`.
        """
        live = self._live_params(model)
        t = int(nimg if nimg is not None else step)
        if t <= self.t:
            raise ValueError(
                f"PowerFunctionEMA.update: training time must increase, got {'nimg' if nimg is not None else 'step'}="
                f"{t} after {self.t}."
            )
        delta_t = t - self.t
        previous_step, self.t, self.step = self.step, t, int(step)
        live_by_device: dict = {}
        for gamma, shadow_params, shadow in zip(self.gammas, self._shadow_params, self.models):
            key = (shadow_params[0].device, shadow_params[0].dtype) if shadow_params else None
            if key not in live_by_device:
                live_by_device[key] = [p.to(device=s.device, dtype=s.dtype) for p, s in zip(live, shadow_params)]
            beta = power_function_ema_beta(t, delta_t, gamma)
            if shadow_params:
                torch._foreach_lerp_(shadow_params, live_by_device[key], 1.0 - beta)
            self._copy_buffers(model, shadow)
        if self.snapshot_dir is not None and self.snapshot_every is not None:
            if self.step // self.snapshot_every > previous_step // self.snapshot_every:
                self.save_snapshot()

    def save_snapshot(self, snapshot_dir: str | os.PathLike | None = None) -> list[Path]:
        """Write every profile's current average to `snapshot_dir` (default: the one given at construction).

        Files are named `phema-<t:012d>-<sigma_rel:.3f>.safetensors` and carry `t`, `step`, `sigma_rel`, `gamma` and
        the buffer names as metadata. Each is written to a temporary name and renamed into place, so a crash never
        leaves a partial snapshot. Call it once more at the end of training so the final time has a snapshot.
        """
        snapshot_dir = snapshot_dir if snapshot_dir is not None else self.snapshot_dir
        if snapshot_dir is None:
            raise ValueError("PowerFunctionEMA.save_snapshot: no snapshot_dir given.")
        if self.t == 0:
            raise ValueError("PowerFunctionEMA.save_snapshot: nothing to save before the first update.")
        os.makedirs(snapshot_dir, exist_ok=True)
        paths = []
        for sigma_rel, gamma, shadow in zip(self.sigma_rels, self.gammas, self.models):
            buffer_names = {name for name, _ in shadow.named_buffers()}
            tensors = {}
            for name, tensor in shadow.state_dict().items():
                dtype = tensor.dtype if name in buffer_names or not tensor.is_floating_point() else self.snapshot_dtype
                tensors[name] = tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
            metadata = {
                "t": str(self.t),
                "step": str(self.step),
                "sigma_rel": repr(sigma_rel),
                "gamma": repr(gamma),
                "buffers": json.dumps(sorted(buffer_names & tensors.keys())),
            }
            path = _snapshot_path(snapshot_dir, self.t, sigma_rel)
            with atomic_write(path) as temporary:
                save_file(tensors, str(temporary), metadata=metadata)
            paths.append(path)
        return paths

    def copy_to(self, model: torch.nn.Module, sigma_rel: float | None = None) -> None:
        """Copy the averaged weights of profile `sigma_rel` (default: the first) into `model`."""
        self._copy_params(self.get_model(sigma_rel), model)

    def to(self, device=None, dtype=None) -> PowerFunctionEMA:
        """Move the averages to `device`; a `dtype` other than fp32 is refused, since the averages must stay fp32."""
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"PowerFunctionEMA.to: the averages are kept in float32, got dtype={dtype}.")
        for shadow in self.models:
            shadow.to(device)
        return self

    def state_dict(self) -> dict:
        return {
            "sigma_rels": list(self.sigma_rels),
            "t": self.t,
            "step": self.step,
            "models": [shadow.state_dict() for shadow in self.models],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [float(s) for s in state_dict["sigma_rels"]]
        if len(saved) != len(self.sigma_rels) or any(abs(a - b) > 1e-12 for a, b in zip(saved, self.sigma_rels)):
            raise ValueError(
                f"PowerFunctionEMA.load_state_dict: checkpoint tracks sigma_rels={saved}, this EMA {self.sigma_rels}."
            )
        self.t = int(state_dict["t"])
        self.step = int(state_dict["step"])
        for shadow, shadow_state in zip(self.models, state_dict["models"]):
            shadow.load_state_dict(shadow_state)
            shadow.eval()


# ------------------------------------------------------------------------------------------------------------------
# Post-hoc reconstruction (EDM2 App. C.3, Algorithm 3)
# ------------------------------------------------------------------------------------------------------------------


def _profile_inner_products(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """Inner products <p_a, p_b> of power-function response functions (broadcasting over the inputs).

    For t_a <= t_b: (gamma_a+1)(gamma_b+1)(t_a/t_b)^gamma_b / ((gamma_a+gamma_b+1) t_b); symmetric otherwise.
    """
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(
        *(np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    )
    swap = t_a > t_b
    t_lo, t_hi = np.where(swap, t_b, t_a), np.where(swap, t_a, t_b)
    g_lo, g_hi = np.where(swap, gamma_b, gamma_a), np.where(swap, gamma_a, gamma_b)
    return (g_lo + 1) * (g_hi + 1) * (t_lo / t_hi) ** g_hi / ((g_lo + g_hi + 1) * t_hi)


def solve_posthoc_coefficients(
    snapshot_ts, snapshot_gammas, target_t, target_gamma, normalize: bool = True
) -> np.ndarray:
    """Least-squares weights that combine power-function EMA snapshots into another profile.

    Minimises `|| sum_i x_i p_i - p_target ||^2` over the response functions `p_i = (t_i, gamma_i)`, i.e. solves
    `A x = b` with `A_ij = <p_i, p_j>`, `b_i = <p_i, p_target>` (closed-form inner products).

    Args:
        snapshot_ts: times of the snapshots (images or steps, the same unit as `target_t`).
        snapshot_gammas: exponent of each snapshot's profile.
        target_t: time(s) to reconstruct at (scalar or 1-D).
        target_gamma: exponent(s) of the wanted profile(s), broadcast against `target_t`.
        normalize: rescale each solution to sum to 1, so a constant parameter is reproduced exactly (as EDM2's code
            does).

    Returns:
        `np.ndarray` of shape `(num_snapshots,)` for scalar targets, else `(num_snapshots, num_targets)`.
    """
    ts = np.asarray(snapshot_ts, dtype=np.float64).reshape(-1)
    gammas = np.asarray(snapshot_gammas, dtype=np.float64).reshape(-1)
    if ts.shape != gammas.shape or ts.size == 0:
        raise ValueError(
            f"solve_posthoc_coefficients: need as many snapshot_ts as snapshot_gammas (>0), got {ts.size} and "
            f"{gammas.size}."
        )
    if np.any(ts <= 0):
        raise ValueError(f"solve_posthoc_coefficients: snapshot_ts must be positive, got min {ts.min()}.")
    scalar = np.ndim(target_t) == 0 and np.ndim(target_gamma) == 0
    target_t, target_gamma = np.broadcast_arrays(
        np.asarray(target_t, dtype=np.float64).reshape(-1), np.asarray(target_gamma, dtype=np.float64).reshape(-1)
    )
    gram = _profile_inner_products(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])
    rhs = _profile_inner_products(ts[:, None], gammas[:, None], target_t[None, :], target_gamma[None, :])
    coefficients = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    if normalize:
        coefficients = coefficients / coefficients.sum(axis=0, keepdims=True)
    return coefficients[:, 0] if scalar else coefficients


def list_snapshots(snapshot_dir: str | os.PathLike) -> list[dict]:
    """The snapshots in `snapshot_dir`, oldest first: dicts with `path`, `t`, `step`, `sigma_rel`, `gamma`, `buffers`."""
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        raise FileNotFoundError(f"snapshot_dir {str(snapshot_dir)!r} is not a folder.")
    snapshots = []
    for path in sorted(snapshot_dir.iterdir()):
        if not SNAPSHOT_PATTERN.match(path.name):
            continue
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        try:
            snapshots.append(
                {
                    "path": path,
                    "t": int(metadata["t"]),
                    "step": int(metadata["step"]),
                    "sigma_rel": float(metadata["sigma_rel"]),
                    "gamma": float(metadata["gamma"]),
                    "buffers": set(json.loads(metadata.get("buffers", "[]"))),
                }
            )
        except (KeyError, ValueError) as err:
            raise ValueError(f"snapshot {str(path)!r} has missing or bad metadata ({err}).") from err
    snapshots.sort(key=lambda s: (s["t"], s["sigma_rel"]))
    return snapshots


def reconstruct_posthoc_ema(
    snapshot_dir: str | os.PathLike,
    sigma_rel: float | Sequence[float],
    target_t: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """Reconstruct the power-function EMA of any `sigma_rel` from the snapshots a `PowerFunctionEMA` wrote.

    Snapshots up to `target_t` are combined with the least-squares weights of `solve_posthoc_coefficients`; each
    file is read once, whatever the number of targets. Buffers come from the latest snapshot used.

    Args:
        snapshot_dir: folder holding `phema-*.safetensors` snapshots.
        sigma_rel: wanted profile width(s), each in (0, 12^-0.5); about 0.015 to 0.25 reconstructs well.
        target_t: training time (same unit as the snapshots: images when the EMA got `nimg`) to reconstruct at;
            defaults to the latest snapshot.
        dtype: dtype of the returned floating tensors.

    Returns:
        A state dict (loadable with `model.load_state_dict`) for a single `sigma_rel`, a list of them for a sequence.
    """
    single = isinstance(sigma_rel, (int, float))
    sigma_rels = [sigma_rel] if single else list(sigma_rel)
    if not sigma_rels:
        raise ValueError("reconstruct_posthoc_ema: sigma_rel is empty.")
    target_gammas = [sigma_rel_to_gamma(_check_sigma_rel(s)) for s in sigma_rels]
    snapshots = list_snapshots(snapshot_dir)
    if not snapshots:
        raise FileNotFoundError(f"reconstruct_posthoc_ema: no phema-*.safetensors snapshots in {str(snapshot_dir)!r}.")
    if target_t is None:
        target_t = snapshots[-1]["t"]
    snapshots = [s for s in snapshots if s["t"] <= target_t]
    if not snapshots:
        raise ValueError(
            f"reconstruct_posthoc_ema: no snapshot at or before target_t={target_t} in {str(snapshot_dir)!r}."
        )

    coefficients = solve_posthoc_coefficients(
        [s["t"] for s in snapshots], [s["gamma"] for s in snapshots], target_t, target_gammas
    )
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    latest = snapshots[-1]
    for i, snapshot in enumerate(snapshots):
        with safe_open(str(snapshot["path"]), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                is_buffer = name in snapshot["buffers"] or not tensor.is_floating_point()
                for out, weight in zip(outputs, coefficients[i]):
                    if is_buffer:
                        if snapshot is latest:
                            out[name] = tensor.clone()
                        continue
                    contribution = tensor.to(torch.float32) * float(weight)
                    out[name] = out[name] + contribution if name in out else contribution
    for out in outputs:
        for name, tensor in out.items():
            if tensor.is_floating_point():
                out[name] = tensor.to(dtype)
    return outputs[0] if single else outputs
