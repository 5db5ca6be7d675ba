"""The training objective: a noise schedule, a noise-level sampler, a loss weighting and a prediction type."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..schedulers.scheduling_edm_heun import edm_scalings
from .flow import FlowPath
from .samplers import build_sampler, check_sampler_fits
from .weighting import MAX_SNR, MIN_SNR, LossWeighting

LOSS_REDUCTIONS = ("mean", "sum")
# How a model is called (see `DiffusionObjective`'s `conditioning`; the model registry's entries say which).
CONDITIONINGS = ("timestep", "sigma")
# What a flow path's model may regress: its velocity α̇·x0 + σ̇·ε, or (as SiT offers) the noise ε, or x0.
FLOW_PREDICTION_TYPES = ("velocity", "epsilon", "sample")
# SiT keeps t in [ε, 1 − ε] for the targets that blow up at an end of a Linear or GVP path (`create_transport`'s
# train_eps = 1e-3 for every prediction but the velocity, which is stable everywhere and uses [0, 1]).
FLOW_TRAIN_EPS = 1e-3


class UncertaintyHead(nn.Module):
    """EDM2's learned uncertainty u(σ) (Karras et al. 2024, Eq. 21): Fourier features of the noise level → linear.

    The per-sample loss becomes λ(σ)/e^{u(σ)}·‖D − x0‖² + u(σ); the optimum e^u tracks the weighted loss at each
    noise level, which keeps the loss balanced across σ. The output starts at 0 (zero-initialised linear layer),
    where the loss equals the unlearned one. It is a training-only module: it is optimised and checkpointed
    with the model but not exported. Models that have their own log-variance output (EDM2UNetModel) use that instead.

    Args:
        num_features: number of Fourier features.
        seed: seed of the fixed random frequencies and phases, so that every process builds the same head.
    """

    def __init__(self, num_features: int = 128, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", torch.randn(num_features, generator=generator))
        self.register_buffer("phases", torch.rand(num_features, generator=generator))
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        features = math.sqrt(2.0) * torch.cos(2 * math.pi * (c_noise[:, None].float() * self.frequencies + self.phases))
        return self.linear(features).squeeze(1)


@dataclass
class ObjectiveOutput:
    """What one evaluation of the objective returns (all per sample, float32).

    Attributes:
        loss: the loss to average over the batch and back-propagate: the per-element loss averaged or summed over
            C·H·W, as the objective's ``loss_reduction`` says.
        mse: the unweighted mean squared error of the regressed target.
        snr: the signal-to-noise ratio of each sample's noise level (for per-noise-level logging).
        logvar: the learned uncertainty u, when learned_uncertainty is on.
        vb: the variational-bound term of a learned variance in bits per dimension, when learned_variance is on
            (already part of ``loss``).
        terms: the auxiliary losses' terms by name (already part of ``loss``; see `objectives.auxiliary`).
    """

    loss: torch.Tensor
    mse: torch.Tensor
    snr: torch.Tensor
    logvar: torch.Tensor | None = None
    vb: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class _Terms(NamedTuple):
    """What a schedule's path hands to the reduction: the model's prediction of the regressed target, the target,
    the per-sample weights on its MSE, and the model's own log-variance and the variational-bound term, if any."""

    prediction: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor
    model_logvar: torch.Tensor | None = None
    vb: torch.Tensor | None = None


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class DiffusionObjective(nn.Module):
    """Ties a noise schedule, a noise-level sampler, a loss weighting and a prediction type into one loss.

    Each family of noise schedules decides how x_t, the regressed target and the SNR come from (x0, noise, noise
    level); the families meet in the SNR (ᾱ/(1−ᾱ) = 1/σ²), of which the samplers and weightings are functions:

    * **discrete** — any diffusers scheduler with ``alphas_cumprod`` (DDPMScheduler with linear, scaled_linear or
      squaredcos_cap_v2 betas, with or without ``rescale_betas_zero_snr``): x_t = √ᾱ·x0 + √(1−ᾱ)·ε, the model is
      called as ``model(hidden_states=x_t, timestep=t, class_labels=y)`` (DiT, U-ViT) and regresses ε, v or x0.
    * **EDM** — a scheduler with ``config.sigma_data`` (diffusers' EDMEulerScheduler, EDMHeunScheduler):
      x = x0 + σ·n. A σ-conditioned model (``conditioning="sigma"``: EDM2UNetModel) is called as
      ``model(x, σ, y)`` and returns the denoised sample (prediction_type "sample"). A timestep-conditioned one is
      wrapped in EDM's preconditioning exactly as diffusers' EDM schedulers expect at sampling time: input c_in·x,
      timestep c_noise = ln(σ)/4, and it regresses F = (x0 − c_skip·x)/c_out (prediction_type "epsilon";
      "v_prediction" negates c_out).
    * **flow** — a :class:`~diffusers_speedup.objectives.flow.FlowPath` (SiT's Linear or GVP interpolant):
      x_t = α(t)·x0 + σ(t)·ε on continuous t ∈ [0, 1], t = 1 noise. The model is called as
      ``model(hidden_states=x_t, timestep=t, class_labels=y)`` with t itself (unscaled; see `objectives.flow` for
      the convention a sampler follows) and regresses the velocity α̇·x0 + σ̇·ε (prediction_type "velocity", the
      default), ε or x0; for the last two t is drawn in [10⁻³, 1 − 10⁻³] as SiT does. No quantisation of t anywhere.

    A family is its noise-level kind (``_read_schedule``), an SNR method and a terms method (``_FAMILIES``); a new
    family is one more entry of each.

    Every weighting is applied in x0-space and converted to the regressed target (see ``weighting.py``), so ε-, v-
    and x0-prediction minimise the same objective for the same denoiser.

    Args:
        noise_scheduler: the schedule (see above).
        sampler: an object with ``sample(batch_size, device, generator) -> (noise_levels, weights)``; defaults to
            uniform timesteps (discrete) or EDM's log-normal σ (EDM).
        weighting: a kind of :func:`compute_loss_weights` ("constant", "min_snr", "soft_min_snr", "p2", "edm").
        weighting_params: its parameters, e.g. ``{"gamma": 5.0}``. "edm" takes the schedule's σ_data by default.
        prediction_type: "epsilon", "v_prediction" or "sample"; defaults to the scheduler's own.
        conditioning: how the model is called: "timestep" (``model(hidden_states, timestep, class_labels)``, the
            default) or "sigma" (``model(x, σ, class_labels)`` returning the denoised sample; EDM schedules and
            prediction_type "sample" only). The registry in `diffusers_speedup.models` says which for each model kind.
        learned_uncertainty: EDM2's learned uncertainty weighting, from an :class:`UncertaintyHead` owned by this
            objective, or from the model's own log-variance output (``return_logvar``) when
            ``uncertainty_from_model`` is set.
        uncertainty_from_model: the model (EDM2UNetModel) outputs the log-variance itself; no head is built here,
            which DDP needs (a head that gets no gradient is an error there).
        label_dropout: probability of replacing a class label by the null label ``num_classes`` during training,
            for classifier-free guidance. Leave 0 for models that drop labels themselves (diffusers' DiT drops 10%).
        num_classes: number of classes (the null label's id); needed when label_dropout > 0.
        learned_variance: the model also outputs its reverse-process variance (DiT's ``learn_sigma``: 2C output
            channels, the second half v ∈ [-1, 1] interpolating log σ² between the posterior variance β̃_t and β_t).
            It is trained with the variational bound as in Improved DDPM / DiT: the loss becomes the weighted MSE
            plus the unweighted KL term L_vb, computed with the mean prediction detached so that L_vb trains the
            variance alone. Discrete schedules only. Sample with ``DDPMScheduler(variance_type="learned_range")``.
        cosine_loss_weight: LightningDiT's velocity-direction loss (flow family, "velocity" target): this weight times
            1 − cos(v̂, v), the cosine taken over channels at each position and averaged over positions, is added to
            each sample's loss, unweighted by the loss weighting or the sampler (LightningDiT adds its mean to the
            MSE's with weight 1). It is reported as the term "cosine".
        loss_reduction: how each sample's per-element loss becomes one number. "mean" averages it over C·H·W (DDPM,
            DiT, U-ViT, Min-SNR); "sum" adds it up, as EDM2 does (its loss is summed over pixels and divided by the
            batch size only). The two differ by the factor C·H·W, which Adam ignores except through its ε: at
            EDM2's scale the gradients of "mean" are so small that ε (1e-8) changes the steps.
    """

    def __init__(
        self,
        noise_scheduler,
        sampler=None,
        weighting: str = "constant",
        weighting_params: dict | None = None,
        prediction_type: str | None = None,
        conditioning: str = "timestep",
        learned_uncertainty: bool = False,
        uncertainty_from_model: bool = False,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        learned_variance: bool = False,
        loss_reduction: str = "mean",
        cosine_loss_weight: float = 0.0,
    ):
        super().__init__()
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}.")
        self.loss_reduction = loss_reduction
        self.schedule, alphas_cumprod, self.sigma_data = _read_schedule(noise_scheduler)
        if alphas_cumprod is not None:
            self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.path = noise_scheduler if self.schedule == "flow" else None
        config = getattr(noise_scheduler, "config", None)
        default_target = "velocity" if self.schedule == "flow" else "epsilon"
        self.prediction_type = prediction_type or getattr(config, "prediction_type", None) or default_target
        self._check_target()
        self.learned_uncertainty = learned_uncertainty
        self.learned_variance = learned_variance
        self._check_flow_rules()
        if not cosine_loss_weight >= 0:
            raise ValueError(f"cosine_loss_weight must be >= 0, got {cosine_loss_weight}.")
        if cosine_loss_weight > 0 and self.prediction_type != "velocity":
            raise ValueError(
                "cosine_loss_weight (LightningDiT's velocity-direction loss) needs a flow schedule and "
                f"prediction_type 'velocity', not {self.schedule!r} with {self.prediction_type!r}."
            )
        self.cosine_loss_weight = float(cosine_loss_weight)
        self.time_interval = (
            (FLOW_TRAIN_EPS, 1.0 - FLOW_TRAIN_EPS)
            if self.schedule == "flow" and self.prediction_type != "velocity"
            else None
        )
        self.weighting = weighting
        self.weighting_params = dict(weighting_params or {})
        if weighting == "edm" and self.sigma_data is not None:
            self.weighting_params.setdefault("sigma_data", self.sigma_data)
        # The prediction type, the weighting kind and its parameters are checked here, once, not on every step.
        self.loss_weighting = LossWeighting(weighting, self.prediction_type, **self.weighting_params)

        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}.")
        self.conditioning = conditioning
        self._check_conditioning()
        self._snr_of, self._terms_of = (getattr(self, name) for name in _FAMILIES[self.schedule])

        if sampler is None:
            sampler = build_sampler({"kind": "default"}, noise_scheduler)
        check_sampler_fits(type(sampler), noise_scheduler)
        self.sampler = sampler

        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}.")
        if label_dropout > 0 and num_classes is None:
            raise ValueError("label_dropout > 0 needs num_classes (the null label's id).")
        self.label_dropout, self.num_classes = label_dropout, num_classes

        self.uncertainty_head = UncertaintyHead() if learned_uncertainty and not uncertainty_from_model else None
        if learned_variance:
            self._check_learned_variance()

    def _check_target(self) -> None:
        if self.schedule == "flow" and self.prediction_type not in FLOW_PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} does not fit a flow schedule; use one of "
                f"{', '.join(FLOW_PREDICTION_TYPES)} ('velocity' is the flow path's α̇·x0 + σ̇·ε)."
            )
        if self.schedule != "flow" and self.prediction_type == "velocity":
            raise ValueError(
                f"prediction_type 'velocity' is a flow path's target; a {self.schedule!r} schedule regresses "
                "epsilon, v_prediction or sample."
            )

    def _check_flow_rules(self) -> None:
        """What a flow schedule does not combine with, one line each, naming the keys."""
        if self.schedule != "flow":
            return
        if self.learned_variance:
            raise ValueError(
                "learned_variance (DiT's learned σ, trained with DDPM's variational bound) needs schedule kind "
                "'ddpm', not 'flow'."
            )
        if self.learned_uncertainty:
            raise ValueError("learned_uncertainty (EDM2's u(σ)) needs schedule kind 'edm', not 'flow'.")

    def _check_conditioning(self) -> None:
        if self.conditioning == "sigma" and self.schedule != "edm":
            raise ValueError(
                "A σ-conditioned model takes σ and returns the denoised sample; train it with an EDM schedule, "
                f"not a {self.schedule} one."
            )
        if self.conditioning == "sigma" and self.prediction_type != "sample":
            raise ValueError(
                f"A σ-conditioned model returns the denoised sample: use prediction_type 'sample', not "
                f"{self.prediction_type!r}."
            )
        if self.schedule == "edm" and self.conditioning == "timestep" and self.prediction_type == "sample":
            raise ValueError(
                "With an EDM schedule, prediction_type 'sample' is for σ-conditioned models that return the "
                "denoised sample (conditioning='sigma')."
            )

    def _check_learned_variance(self) -> None:
        if self.schedule != "discrete":
            raise ValueError("learned_variance needs a discrete (DDPM-style) schedule; EDM schedules have none.")
        if self.learned_uncertainty:
            raise ValueError("learned_variance and learned_uncertainty cannot be combined.")
        if self.prediction_type == "epsilon" and float(self.alphas_cumprod[-1]) == 0.0:
            raise ValueError(
                "learned_variance with epsilon-prediction cannot recover x0 at zero terminal SNR; "
                "use v_prediction or a schedule without rescale_betas_zero_snr."
            )

    @classmethod
    def from_config(
        cls,
        config: dict,
        noise_scheduler,
        num_classes: int | None = None,
        conditioning: str = "timestep",
        uncertainty_from_model: bool = False,
    ) -> DiffusionObjective:
        """Build from the recipe form, e.g. ``{"sampler": {"kind": "speed", "k": 5}, "weighting": {"kind": "min_snr",
        "gamma": 5}, "prediction_type": "epsilon", "learned_uncertainty": False, "label_dropout": 0.1}``."""
        config = dict(config)
        sampler = build_sampler(dict(config.pop("sampler", {"kind": "default"})), noise_scheduler)
        weighting = dict(config.pop("weighting", {"kind": "constant"}))
        kind = weighting.pop("kind", "constant")
        return cls(
            noise_scheduler,
            sampler=sampler,
            weighting=kind,
            weighting_params=weighting,
            num_classes=num_classes,
            conditioning=conditioning,
            uncertainty_from_model=uncertainty_from_model,
            **config,
        )

    # --- noise levels ---------------------------------------------------------------------------------------

    def snr(self, noise_levels: torch.Tensor) -> torch.Tensor:
        """SNR of the family's noise levels (timesteps, σ), float32."""
        return self._snr_of(noise_levels)

    def _discrete_snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alphas_cumprod = self.alphas_cumprod[timesteps.to(self.alphas_cumprod.device)]
        return (alphas_cumprod / (1.0 - alphas_cumprod)).float().to(timesteps.device)

    def _edm_snr(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas.float().pow(-2)

    def _flow_snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.path.snr(t)

    def _uncertainty(self, model_logvar, snr):
        if not self.learned_uncertainty:
            return None
        if model_logvar is not None:
            return model_logvar.reshape(-1).float()
        if self.uncertainty_head is None:
            raise ValueError(
                "learned_uncertainty with uncertainty_from_model needs a model that returns a log-variance."
            )
        c_noise = -snr.clamp(MIN_SNR, MAX_SNR).log() / 8  # ln(σ)/4 with σ = SNR^(-1/2)
        return self.uncertainty_head(c_noise)

    # --- the loss -----------------------------------------------------------------------------------------------

    def forward(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> ObjectiveOutput:
        """Draw noise levels and noise for the clean batch ``x0`` and return the per-sample loss of ``model``.

        Args:
            model: the denoiser (see the class docstring for the two calling conventions).
            x0: clean samples (B, C, H, W).
            class_labels: class ids (B,), or None for an unconditional model.
            generator: source of every random draw; None uses torch's global RNG.
            shard: ``(rank, world_size)`` when ``x0`` is one process's equal slice of a global batch. The draws are
                then made for the whole global batch (the stream is the same on every process) and sliced, so N
                processes draw exactly what one process would for the same global batch.
        """
        noise_levels, sampler_weights, noise, class_labels = self._draw(x0, class_labels, generator, shard)
        snr = self.snr(noise_levels)
        prediction, target, weights, model_logvar, vb = self._terms_of(
            model, x0, noise, noise_levels, snr, class_labels
        )

        mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        loss = weights * sampler_weights * mse
        terms = {}
        logvar = self._uncertainty(model_logvar, snr)
        if logvar is not None:
            loss = loss / logvar.exp() + logvar
        if vb is not None:
            loss = loss + vb  # unweighted, as in DiT and SpeeD: the weights multiply the MSE term only
        if self.loss_reduction == "sum":
            # Σ over C·H·W of the per-element loss; EDM2's u(σ) is added once per element, so it scales too.
            loss = loss * x0[0].numel()
        if self.cosine_loss_weight > 0:
            cosine = velocity_direction_loss(prediction, target)
            loss = loss + self.cosine_loss_weight * cosine
            terms["cosine"] = cosine.detach()
        return ObjectiveOutput(loss=loss, mse=mse, snr=snr, logvar=logvar, vb=vb, terms=terms)

    def _draw(self, x0, class_labels, generator, shard):
        """This process's slice of the global batch's draws: noise levels, sampler weights, noise, labels after
        dropout. The draws are made in this order for the whole global batch, whatever the shard."""
        rank, world_size = shard
        local_size = x0.shape[0]
        total_size = local_size * world_size
        draw_device = generator.device if generator is not None else x0.device
        mine = slice(rank * local_size, (rank + 1) * local_size)
        noise_levels, sampler_weights = self.sampler.sample(total_size, device=x0.device, generator=generator)
        noise = torch.randn((total_size, *x0.shape[1:]), generator=generator, device=draw_device)[mine]
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        if class_labels is not None and self.training and self.label_dropout > 0:
            drop = torch.rand(total_size, generator=generator, device=draw_device)[mine] < self.label_dropout
            null_labels = torch.full_like(class_labels, self.num_classes)
            class_labels = torch.where(drop.to(class_labels.device), null_labels, class_labels)
        noise_levels = noise_levels[mine]
        if self.time_interval is not None:  # SiT's t0 + (t1 − t0)·t, applied to the drawn time
            start, end = self.time_interval
            noise_levels = start + (end - start) * noise_levels
        return noise_levels, sampler_weights[mine], noise, class_labels

    def _discrete_terms(self, model, x0, noise, timesteps, snr, class_labels) -> _Terms:
        """x_t = √ᾱ·x0 + √(1−ᾱ)·ε; the model regresses ε, v or x0 (and a learned variance, through L_vb)."""
        alphas_cumprod = self.alphas_cumprod[timesteps.to(self.alphas_cumprod.device)].to(x0.device)
        alpha, sigma = _expand(alphas_cumprod.sqrt(), x0), _expand((1.0 - alphas_cumprod).sqrt(), x0)
        noisy = alpha * x0 + sigma * noise
        output = model(hidden_states=noisy, timestep=timesteps, class_labels=class_labels, return_dict=False)[0]
        vb = None
        if self.learned_variance:
            if output.shape[1] != 2 * x0.shape[1]:
                raise ValueError(
                    f"learned_variance needs a model with twice the data's {x0.shape[1]} channels as output "
                    f"(mean, then variance); it returned {output.shape[1]}."
                )
            prediction, variance = output.chunk(2, dim=1)
            vb = self._variational_bound(prediction.detach(), variance, x0, noisy, timesteps, alpha, sigma)
        else:
            prediction = _first_channels(output, x0)
        target = {"epsilon": noise, "v_prediction": alpha * noise - sigma * x0, "sample": x0}[self.prediction_type]
        return _Terms(prediction, target, self.loss_weighting(snr), vb=vb)

    def _edm_terms(self, model, x0, noise, sigmas, snr, class_labels) -> _Terms:
        """x = x0 + σ·n; a σ-input model returns D itself, any other is preconditioned and regresses F."""
        noisy = x0 + _expand(sigmas, x0) * noise
        if self.conditioning == "sigma":
            output = model(noisy, sigmas, class_labels, return_logvar=self.learned_uncertainty)
            return _Terms(output.sample, x0, self._edm_weights(snr), model_logvar=output.logvar)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigmas, self.sigma_data, self.prediction_type)
        output = model(
            hidden_states=_expand(c_in, x0) * noisy, timestep=c_noise, class_labels=class_labels, return_dict=False
        )[0]
        target = (x0 - _expand(c_skip, x0) * noisy) / _expand(c_out, x0)
        # F's error is the x0 error divided by c_out, so a weight w on the x0 error is the weight w·c_out² on F's.
        return _Terms(_first_channels(output, x0), target, self._edm_weights(snr, c_out.float() ** 2))

    def _flow_terms(self, model, x0, noise, t, snr, class_labels) -> _Terms:
        """x_t = α(t)·x0 + σ(t)·ε; the model, called with t itself, regresses α̇·x0 + σ̇·ε, ε or x0.

        The path's coefficients are computed in float32 and cast to the data's dtype, as SiT and REPA compute them
        in the data's dtype."""
        path, t32 = self.path, t.float()
        alpha, sigma = _expand(path.alpha(t32), x0), _expand(path.sigma(t32), x0)
        noisy = alpha * x0 + sigma * noise
        output = model(hidden_states=noisy, timestep=t, class_labels=class_labels, return_dict=False)[0]
        if self.prediction_type == "velocity":
            target = _expand(path.d_alpha(t32), x0) * x0 + _expand(path.d_sigma(t32), x0) * noise
            weights = self.loss_weighting(snr, x0_per_velocity=path.x0_per_velocity(t32))
        else:
            target = noise if self.prediction_type == "epsilon" else x0
            weights = self.loss_weighting(snr)
        return _Terms(_first_channels(output, x0), target, weights)

    def _edm_weights(self, snr: torch.Tensor, target_scale_sq: torch.Tensor | None = None) -> torch.Tensor:
        """Weights on the EDM target (D, or F with ``target_scale_sq`` = c_out²); "constant" is 1 on either."""
        if self.weighting == "constant":
            return torch.ones_like(snr)
        weights = self.loss_weighting.x0_space(snr)
        return weights if target_scale_sq is None else weights * target_scale_sq

    def _variational_bound(self, prediction, variance, x0, noisy, timesteps, alpha, sigma) -> torch.Tensor:
        """Per-sample L_vb in bits per dimension for a learned variance: KL(q(x_{t-1}|x_t, x0) ‖ p(x_{t-1}|x_t))
        for t > 0 and the discretised Gaussian decoder NLL of x0 at t = 0 (Ho et al. 2020; Nichol & Dhariwal 2021).
        ``prediction`` is the (detached) mean prediction, ``variance`` the raw variance output v."""
        prediction, variance, x0, noisy = prediction.float(), variance.float(), x0.float(), noisy.float()
        alpha, sigma = alpha.float(), sigma.float()
        pred_x0 = {
            "epsilon": lambda: (noisy - sigma * prediction) / alpha,
            "v_prediction": lambda: alpha * noisy - sigma * prediction,
            "sample": lambda: prediction,
        }[self.prediction_type]()

        # Posterior q(x_{t-1} | x_t, x0) of the training schedule, in float64 before the cast.
        t = timesteps.to(self.alphas_cumprod.device).long()
        abar = self.alphas_cumprod
        abar_t = abar[t]
        abar_prev = torch.where(t > 0, abar[(t - 1).clamp_min(0)], torch.ones_like(abar_t))
        beta = 1 - abar_t / abar_prev
        coef_x0 = beta * abar_prev.sqrt() / (1 - abar_t)
        coef_xt = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar_t)
        # β̃_t is 0 at t = 0; as in Improved DDPM its log is clipped to β̃_1 there.
        beta_1 = 1 - abar[1] / abar[0]
        posterior_var_1 = beta_1 * (1 - abar[0]) / (1 - abar[1])
        posterior_log_var = torch.where(
            t > 0, (beta * (1 - abar_prev) / (1 - abar_t)).clamp_min(1e-300).log(), posterior_var_1.log()
        )
        cast = lambda values: _expand(values.float().to(x0.device), x0)  # noqa: E731
        coef_x0, coef_xt, posterior_log_var, log_beta = map(cast, (coef_x0, coef_xt, posterior_log_var, beta.log()))

        fraction = (variance + 1) / 2
        model_log_var = fraction * log_beta + (1 - fraction) * posterior_log_var
        model_mean = coef_x0 * pred_x0 + coef_xt * noisy
        true_mean = coef_x0 * x0 + coef_xt * noisy
        kl = 0.5 * (
            model_log_var
            - posterior_log_var
            - 1.0
            + (posterior_log_var - model_log_var).exp()
            + (true_mean - model_mean).square() * (-model_log_var).exp()
        )
        decoder_nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        first_step = _expand(timesteps == 0, x0).bool()
        return torch.where(first_step, decoder_nll, kl).flatten(1).mean(1) / math.log(2.0)

    def loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The per-sample loss (shape (B,)); average it for back-propagation."""
        return self(model, x0, class_labels, generator=generator).loss


# Per family: the names of the objective's SNR and terms methods.
_FAMILIES = {
    "discrete": ("_discrete_snr", "_discrete_terms"),
    "edm": ("_edm_snr", "_edm_terms"),
    "flow": ("_flow_snr", "_flow_terms"),
}


def velocity_direction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LightningDiT's velocity-direction loss per sample: 1 − cos(v̂, v) over the channel dimension at each position,
    averaged over positions (``hustvl/LightningDiT`` `transport/transport.py`: ``mean_flat(1 - cosine_similarity(
    model_output, ut, dim=1))``), in float32."""
    cosine = torch.nn.functional.cosine_similarity(prediction.float(), target.float(), dim=1)
    return (1 - cosine).flatten(1).mean(1)


def _read_schedule(noise_scheduler) -> tuple[str, torch.Tensor | None, float | None]:
    """("discrete", ᾱ in float64, None) or ("edm", None, σ_data) for a diffusers scheduler, ("flow", None, None) for
    a :class:`FlowPath`."""
    if isinstance(noise_scheduler, FlowPath):
        return "flow", None, None
    config = getattr(noise_scheduler, "config", None)
    if getattr(noise_scheduler, "alphas_cumprod", None) is not None:
        return "discrete", torch.as_tensor(noise_scheduler.alphas_cumprod, dtype=torch.float64), None
    if config is not None and "sigma_data" in config:
        return "edm", None, float(config.sigma_data)
    raise ValueError(
        f"noise_scheduler must be a discrete diffusers scheduler (with alphas_cumprod), an EDM scheduler "
        f"(with config.sigma_data) or a FlowPath; got {type(noise_scheduler).__name__}."
    )


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor):
    """log P(x) of data in [-1, 1] quantised to 256 levels under N(mean, e^{2·log_scale}), with open outer bins."""
    inv_scale = (-log_scale).exp()
    upper = inv_scale * (x - mean + 1 / 255)
    lower = inv_scale * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    log_bin = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin))


def _first_channels(prediction: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """A learned-variance model (DiT with learn_sigma) outputs 2C channels; the mean prediction is the first C."""
    if prediction.shape[1] == 2 * x0.shape[1]:
        return prediction[:, : x0.shape[1]]
    if prediction.shape != x0.shape:
        raise ValueError(f"The model's output has shape {tuple(prediction.shape)}, the data {tuple(x0.shape)}.")
    return prediction
