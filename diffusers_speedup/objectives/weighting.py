"""Loss weights as functions of the signal-to-noise ratio.

Every weighting is defined once, as a weight on the x0 error ‖x̂0 − x0‖², and converted to the target the model
actually regresses. With SNR = ᾱ/(1−ᾱ) = 1/σ² the errors of the three targets are related by

    ‖Δε‖² = SNR·‖Δx0‖²        ‖Δv‖² = (1 + SNR)·‖Δx0‖²

so a weight w on the x0 error is the weight w/SNR on the ε error and w/(SNR + 1) on the v error. A flow path's
velocity v = α̇·x0 + σ̇·ε (``"velocity"``) is not a function of the SNR alone: its error is Δx0 = c·Δv with
c = σ/(α̇σ − ασ̇) (see `objectives.flow.FlowPath.x0_per_velocity`), so w on the x0 error is w·c² on the velocity
error (t²·w on the linear path). The prediction types then minimise the same objective for the same denoiser, which is what Min-SNR-γ (Hang et al.,
ICCV 2023) prescribes and what several diffusers example scripts get wrong for v-prediction.

Two end points need care:

* SNR = 0 (the last step of a zero-terminal-SNR schedule): the x0 error carries no information there, so most
  weightings vanish or become 0/0. As the official Min-SNR code does, the regressed target gets weight 1 at SNR = 0.
* SNR = ∞ (no noise): the formulas are written so that their limits come out without ∞/∞, and SNR is clamped to
  [``MIN_SNR``, ``MAX_SNR``] so that weights which grow with SNR or 1/SNR stay finite.

Weights are always returned in float32, whatever the dtype of ``snr``, so half-precision inputs cannot overflow.
"""

from __future__ import annotations

import torch

# What a network can return: the noise ε, the velocity v, or the denoised sample x0 (diffusers' names).
# schedulers/scheduling_edm_heun.py keeps a marked copy, since it ships on its own.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# And the velocity α̇·x0 + σ̇·ε of a flow path (SiT, REPA, SD3's rectified flow), whose weights need the path.
TARGETS = (*PREDICTION_TYPES, "velocity")

WEIGHTING_KINDS = ("constant", "min_snr", "soft_min_snr", "p2", "edm")

# SNR is clamped into [MIN_SNR, MAX_SNR] before any arithmetic: wide enough to leave every real schedule untouched
# (EDM's σ_min = 0.002 is SNR 2.5e5, its σ_max = 80 is SNR 1.6e-4), narrow enough that weights growing like SNR or
# 1/SNR stay far from float32's limits.
MIN_SNR = 1e-20
MAX_SNR = 1e8

_DEFAULTS = {
    "constant": {},
    "min_snr": {"gamma": 5.0},
    "soft_min_snr": {"gamma": 5.0},
    "p2": {"k": 1.0, "gamma": 1.0},
    "edm": {"sigma_data": 0.5},
}


def _resolve_params(kind: str, params: dict) -> dict:
    if kind not in _DEFAULTS:
        raise ValueError(f"Unknown loss weighting kind {kind!r}; expected one of {', '.join(WEIGHTING_KINDS)}.")
    unknown = set(params) - set(_DEFAULTS[kind])
    if unknown:
        allowed = ", ".join(_DEFAULTS[kind]) or "none"
        raise ValueError(f"Loss weighting {kind!r} got unknown parameter(s) {sorted(unknown)}; it takes: {allowed}.")
    resolved = {**_DEFAULTS[kind], **params}
    for name, value in resolved.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"Loss weighting {kind!r}: {name} must be a number, got {value!r}.")
    if kind in ("min_snr", "soft_min_snr") and not resolved["gamma"] > 0:
        raise ValueError(f"Loss weighting {kind!r}: gamma must be > 0, got {resolved['gamma']}.")
    if kind == "p2" and not (resolved["k"] > 0 and resolved["gamma"] >= 0):
        raise ValueError(
            f"Loss weighting 'p2': needs k > 0 and gamma >= 0, got k={resolved['k']}, gamma={resolved['gamma']}."
        )
    if kind == "edm" and not resolved["sigma_data"] > 0:
        raise ValueError(f"Loss weighting 'edm': sigma_data must be > 0, got {resolved['sigma_data']}.")
    return resolved


class LossWeighting:
    """A loss weighting with its kind, parameters and regressed target checked once, when it is built.

    Calling it costs only the arithmetic, so it belongs in a training step; :func:`compute_loss_weights` is the
    one-call form.

    Args:
        kind: one of ``WEIGHTING_KINDS`` (see :func:`compute_loss_weights`).
        prediction_type: "epsilon", "v_prediction", "sample" (x0) or a flow path's "velocity", the target the model
            regresses.
        **params: the kind's parameters (``gamma``; ``k`` and ``gamma`` for "p2"; ``sigma_data`` for "edm");
            missing ones take their defaults.
    """

    def __init__(self, kind: str, prediction_type: str = "epsilon", **params):
        if prediction_type not in TARGETS:
            raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {', '.join(TARGETS)}.")
        self.kind, self.prediction_type, self.params = kind, prediction_type, _resolve_params(kind, params)

    def x0_space(self, snr: torch.Tensor) -> torch.Tensor:
        """The weight on the x0 error ‖x̂0 − x0‖² (float32, SNR clamped to [``MIN_SNR``, ``MAX_SNR``]).

        "constant" is not SNR-based (it puts weight 1 on whatever target is regressed) and has no x0-space form.
        """
        kind, params = self.kind, self.params
        if kind == "constant":
            raise ValueError("The 'constant' weighting is defined on the regressed target, not in x0-space.")
        snr = snr.float().clamp(MIN_SNR, MAX_SNR)
        if kind == "min_snr":
            return snr.clamp(max=params["gamma"])
        if kind == "soft_min_snr":
            # The harmonic soft minimum (1/SNR + 1/γ)⁻¹, written to give 0 at SNR = 0 and γ at SNR = ∞.
            gamma = params["gamma"]
            return gamma / (1.0 + gamma / snr)
        if kind == "p2":
            # P2 (Choi et al. 2022) is 1/(k + SNR)^γ on the ε error, hence SNR/(k + SNR)^γ on the x0 error.
            return snr * (params["k"] + snr).pow(-params["gamma"])
        # EDM's λ(σ) = (σ² + σ_d²)/(σ σ_d)², with σ² = 1/SNR.
        return 1.0 / params["sigma_data"] ** 2 + snr

    def __call__(self, snr: torch.Tensor, x0_per_velocity: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample float32 weights, with the shape of ``snr``, on the mean squared error of the regressed target.

        ``x0_per_velocity``: for the "velocity" target only, the path's c = σ/(α̇σ − ασ̇) at each sample's t.
        """
        if (x0_per_velocity is None) != (self.prediction_type != "velocity"):
            raise ValueError("x0_per_velocity is needed for the 'velocity' target, and only for it.")
        if self.kind == "constant":
            return torch.ones_like(snr, dtype=torch.float32)
        weights = self.x0_space(snr)
        clamped = snr.float().clamp(MIN_SNR, MAX_SNR)
        if self.prediction_type == "epsilon":
            weights = weights / clamped
        elif self.prediction_type == "v_prediction":
            weights = weights / (clamped + 1.0)
        elif self.prediction_type == "velocity":
            weights = weights * x0_per_velocity.float().square()
        # At SNR = 0 the x0 error says nothing; the official Min-SNR code gives the target weight 1 there.
        return torch.where(snr == 0, torch.ones_like(weights), weights)


def compute_loss_weights(kind: str, snr: torch.Tensor, prediction_type: str, **params) -> torch.Tensor:
    """Per-sample weights for the mean squared error of the regressed target.

    A drop-in for the ``--snr_gamma`` block of diffusers' example training scripts::

        snr = diffusers.training_utils.compute_snr(noise_scheduler, timesteps)
        weights = compute_loss_weights("min_snr", snr, noise_scheduler.config.prediction_type, gamma=5.0)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()

    Args:
        kind: "constant" (weight 1 on the regressed target: the baseline), "min_snr" (x0-space min(SNR, γ),
            ``gamma`` = 5), "soft_min_snr" (x0-space SNR·γ/(SNR + γ), ``gamma`` = 5; γ = 1 in σ_data units is
            k-diffusion's soft-min-snr), "p2" (ε-space 1/(k + SNR)^γ, ``k`` = 1, ``gamma`` = 1) or "edm"
            (EDM's λ(σ) = (σ² + σ_d²)/(σ σ_d)², ``sigma_data`` = 0.5, i.e. unit weight on EDM's F-target).
        snr: signal-to-noise ratio ᾱ/(1 − ᾱ) = 1/σ² per sample, any shape and float dtype; 0 and ∞ are allowed.
        prediction_type: "epsilon", "v_prediction" or "sample" (x0), the target the model regresses.

    Returns:
        float32 weights with the shape of ``snr``, finite and non-negative everywhere.
    """
    return LossWeighting(kind, prediction_type, **params)(snr)
