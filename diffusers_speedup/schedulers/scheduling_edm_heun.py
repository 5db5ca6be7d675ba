# Copyright 2025 The diffusers-speedup authors. Licensed under the Apache License, Version 2.0.
"""EDM's second-order Heun sampler (Karras et al. 2022, Algorithm 2) as a diffusers scheduler.

Self-contained on purpose: this file imports only the standard library, torch and diffusers, because it is copied
unchanged into exported model folders and loaded there with `trust_remote_code=True`. So `PREDICTION_TYPES` is a
marked copy (``# Copied from``) of the objectives' own, and `edm_scalings` here is the source of the copy in
models/edm2_unet.py.
"""

import math
from collections import namedtuple
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# What a network can return: the noise ε, the velocity v, or the denoised sample x0 (diffusers' names).
# Copied from diffusers_speedup.objectives.weighting.PREDICTION_TYPES
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# EDM's preconditioning coefficients (Karras et al. 2022, Table 1): D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise).
EDMScalings = namedtuple("EDMScalings", ["c_skip", "c_out", "c_in", "c_noise"])


def edm_scalings(sigma: float | torch.Tensor, sigma_data: float, prediction_type: str = "epsilon") -> EDMScalings:
    """
    EDM's preconditioning at noise level σ, elementwise for a tensor σ and in float64 for a Python float.

    Args:
        sigma (`float` or `torch.Tensor`): the noise level σ > 0.
        sigma_data (`float`): standard deviation of the data.
        prediction_type (`str`, defaults to `"epsilon"`): `"v_prediction"` negates c_out, as diffusers' EDM
            schedulers do, so that F is a v-style target; any other value leaves EDM's c_out.
    """
    sqrt, log = (torch.sqrt, torch.log) if isinstance(sigma, torch.Tensor) else (math.sqrt, math.log)
    c_out = sigma * sigma_data / sqrt(sigma**2 + sigma_data**2)
    return EDMScalings(
        c_skip=sigma_data**2 / (sigma**2 + sigma_data**2),
        c_out=-c_out if prediction_type == "v_prediction" else c_out,
        c_in=1 / sqrt(sigma**2 + sigma_data**2),
        c_noise=log(sigma) / 4,
    )


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """
    Output of [`EDMHeunScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`):
            The sample to feed to the next network evaluation (after the last evaluation: the final sample).
        pred_original_sample (`torch.Tensor`):
            The denoised estimate D(x; σ) of this evaluation.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    """
    EDM's deterministic (optionally stochastic) second-order Heun sampler on the Karras σ grid.

    The pipeline calls the model once per entry of `timesteps`, exactly like diffusers' `HeunDiscreteScheduler`:
    N steps take 2N−1 network evaluations, because the last step goes to σ=0 with a plain Euler step. Each step i
    evaluates the network first at σ̂_i (= σ_i, raised by the churn factor when `s_churn > 0`) and then, for the
    Heun correction, at σ_{i+1}.

    Prediction types (what the network returns):
        - `"epsilon"` / `"v_prediction"`: the EDM-preconditioned output F, as in diffusers' `EDMEulerScheduler`:
          the network sees `scale_model_input(x)` = c_in·x and `timestep` = c_noise = ¼·ln σ, and the denoised sample
          is c_skip·x + c_out·F (c_out negated for `"v_prediction"`).
        - `"sample"`: the network returns the denoised sample itself and does its own preconditioning (EDM2's UNet):
          it takes the raw noisy sample and σ (`sigma_for_model_input`), and `scale_model_input` is the identity.

    Stochastic churn (EDM Alg. 2): at a step whose σ_i lies in [s_tmin, s_tmax] the sample is pushed up to
    σ̂_i = σ_i·(1+γ), γ = min(s_churn/N, √2−1), with fresh noise of std s_noise·√(σ̂_i²−σ_i²). The noise for step i+1
    is added at the end of step i, so every network evaluation sees a sample at exactly the σ it is told.

    Args:
        sigma_min (`float`, defaults to 0.002): smallest nonzero σ of the grid.
        sigma_max (`float`, defaults to 80.0): largest σ of the grid (where sampling starts).
        sigma_data (`float`, defaults to 0.5): standard deviation of the data, used by the preconditioning.
        rho (`float`, defaults to 7.0): the grid is uniform in σ^(1/ρ); larger ρ puts more steps at low σ.
        prediction_type (`str`, defaults to `"epsilon"`): one of `"epsilon"`, `"v_prediction"`, `"sample"` (above).
        s_churn (`float`, defaults to 0.0): total amount of stochasticity; 0 gives the deterministic ODE sampler.
        s_tmin (`float`, defaults to 0.0): churn is applied only where σ_i ≥ s_tmin.
        s_tmax (`float`, *optional*): churn is applied only where σ_i ≤ s_tmax; `None` means no upper bound.
        s_noise (`float`, defaults to 1.0): scale of the churn noise (slightly above 1 compensates detail loss).
    """

    config_name = "scheduler_config.json"
    # The EDM schedulers that read the same σ-grid and preconditioning config (sigma_min, sigma_max, sigma_data, rho,
    # prediction_type), so `from_config` can switch between them; like diffusers' own lists, only classes that
    # diffusers exports resolve in `compatibles`.
    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 2

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        prediction_type: str = "epsilon",
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float | None = None,
        s_noise: float = 1.0,
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}.")
        if rho <= 0:
            raise ValueError(f"rho must be positive, got {rho}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if s_churn < 0 or s_noise < 0:
            raise ValueError(f"s_churn and s_noise must be non-negative, got s_churn={s_churn}, s_noise={s_noise}.")

        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._clear_heun_state()
        # A usable default grid, so that the scheduler can be inspected before set_timesteps.
        self.set_timesteps(1)

    # ----------------------------------------------------------------------------------------------------------
    # The σ grid

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """
        Builds the Karras grid σ_0 = sigma_max > … > σ_{N−1} = sigma_min, σ_N = 0 and the list of network evaluations.

        Args:
            num_inference_steps (`int`): number of sampler steps N (network evaluations: 2N−1).
            device (`str` or `torch.device`, *optional*): where `timesteps` live (σ tables stay on the CPU).
        """
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        config = self.config
        n = num_inference_steps
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        max_inv_rho, min_inv_rho = config.sigma_max ** (1 / config.rho), config.sigma_min ** (1 / config.rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** config.rho
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])

        s_tmax = math.inf if config.s_tmax is None else config.s_tmax
        gamma = min(config.s_churn / n, math.sqrt(2) - 1)
        sigma_hats = [
            s * (1 + gamma) if config.s_tmin <= s <= s_tmax and gamma > 0 else s for s in sigmas[:-1].tolist()
        ]

        # One entry per network evaluation: the σ the network sees, and the step it belongs to.
        eval_sigmas, eval_steps = [], []
        for i in range(n):
            eval_sigmas.append(sigma_hats[i])
            eval_steps.append(i)
            if sigmas[i + 1] > 0:
                eval_sigmas.append(float(sigmas[i + 1]))
                eval_steps.append(i)

        self.num_inference_steps = n
        self.sigmas = sigmas.to(torch.float32)
        self.sigma_hats = torch.tensor(sigma_hats, dtype=torch.float32)
        self.evaluation_sigmas = torch.tensor(eval_sigmas, dtype=torch.float32)
        self.evaluation_step_indices = torch.tensor(eval_steps, dtype=torch.long)
        self.timesteps = self.precondition_noise(torch.tensor(eval_sigmas, dtype=torch.float64)).to(
            device=device, dtype=torch.float32
        )
        self._sigmas_f64 = sigmas.tolist()
        self._sigma_hats_f64 = sigma_hats
        self._eval_sigmas_f64 = eval_sigmas
        self._step_index = None
        self._begin_index = None
        self._clear_heun_state()

    @property
    def evaluation_step_sigmas(self) -> torch.Tensor:
        """σ_i of the step each network evaluation belongs to (both evaluations of a Heun step share it), in float64
        as the grid is computed, so that comparisons with σ values given by a user are not blurred by float32."""
        sigmas = torch.tensor(self._sigmas_f64, dtype=torch.float64)
        return sigmas[self.evaluation_step_indices]

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: σ̂_0, i.e. σ_max raised by the first step's churn."""
        sigma, sigma_hat = self._sigmas_f64[0], self._sigma_hats_f64[0]
        return math.sqrt(sigma**2 + (sigma_hat**2 - sigma**2) * self.config.s_noise**2)

    @property
    def step_index(self) -> int | None:
        """Index (into `timesteps`) of the next network evaluation; advanced by one on every `step` call."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first index, when a pipeline sets it with `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """
        Lets a pipeline start at a later evaluation (for example img2img).

        Args:
            begin_index (`int`, defaults to 0): index into `timesteps`; must be the first evaluation of a step (even
                indices 0, 2, 4, …), because a Heun correction needs the step's first evaluation before it.
        """
        self._check_start_index(begin_index)
        self._begin_index = begin_index

    def _check_start_index(self, index: int):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._eval_sigmas_f64):
            raise ValueError(f"A start index must be an integer in [0, {len(self._eval_sigmas_f64)}), got {index!r}.")
        if index > 0 and self.evaluation_step_indices[index] == self.evaluation_step_indices[index - 1]:
            step = int(self.evaluation_step_indices[index])
            raise ValueError(
                f"Evaluation {index} is the Heun correction of step {step}; sampling can only start at the first "
                f"evaluation of a step (index {index + 1} starts step {step + 1})."
            )

    @property
    def sigma_for_model_input(self) -> float:
        """σ at which the next network evaluation happens (pass it to a σ-conditioned model)."""
        return self._eval_sigmas_f64[self._step_index if self._step_index is not None else (self._begin_index or 0)]

    @property
    def state_in_first_order(self) -> bool:
        """True when the next evaluation starts a step (an Euler predictor), False for a Heun correction."""
        return self._derivative is None

    # ----------------------------------------------------------------------------------------------------------
    # EDM preconditioning

    def precondition_noise(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """c_noise = ¼·ln σ, the network's timestep input."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma], dtype=torch.float64)
        return edm_scalings(sigma, self.config.sigma_data).c_noise

    def precondition_inputs(self, sample: torch.Tensor, sigma: float) -> torch.Tensor:
        """c_in·x with c_in = 1/√(σ²+σ_data²); the identity for prediction_type "sample"."""
        if self.config.prediction_type == "sample":
            return sample
        return sample * edm_scalings(sigma, self.config.sigma_data).c_in

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma: float) -> torch.Tensor:
        """The denoised sample D(x; σ) from the network output (c_skip·x + c_out·F, or the output itself)."""
        if self.config.prediction_type == "sample":
            return model_output
        c_skip, c_out, _, _ = edm_scalings(sigma, self.config.sigma_data, self.config.prediction_type)
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """
        The network input for the next evaluation.

        Args:
            sample (`torch.Tensor`): the current sample (as returned by the previous `step`, or the initial noise).
            timestep (`float` or `torch.Tensor`): the entry of `timesteps` being evaluated.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        return self.precondition_inputs(sample, self._eval_sigmas_f64[self._step_index])

    # ----------------------------------------------------------------------------------------------------------
    # Sampling

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """
        Index in `timesteps` at which a loop that starts with `timestep` begins.

        Without churn, a Heun schedule holds every σ but the first and last twice: the correction of step i−1, then
        the first evaluation of step i. As in diffusers' `HeunDiscreteScheduler`, the second match is taken, so a
        loop started mid-schedule (img2img style, without `set_begin_index`) starts a step instead of running a
        correction whose first half never happened.

        Args:
            timestep (`float` or `torch.Tensor`): an entry of `timesteps` (c_noise = ¼·ln σ).
            schedule_timesteps (`torch.Tensor`, *optional*): the schedule to search; defaults to `timesteps`.
        """
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        timestep = torch.as_tensor(timestep, dtype=schedule_timesteps.dtype, device=schedule_timesteps.device)
        matches = (schedule_timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not one of this scheduler's timesteps (c_noise = ln(σ)/4 of the "
                "σ grid set by set_timesteps); pass an entry of `scheduler.timesteps`."
            )
        return int(matches[1 if len(matches) > 1 else 0])

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            self._step_index = self._begin_index
        elif timestep is None:
            self._step_index = 0
        else:
            index = self.index_for_timestep(timestep)
            self._check_start_index(index)
            self._step_index = index

    def _clear_heun_state(self):
        self._derivative = None
        self._dt = None
        self._sample = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EDMHeunSchedulerOutput | tuple:
        """
        Consumes one network evaluation and returns the sample for the next one.

        Args:
            model_output (`torch.Tensor`): the network output at `sample` (interpreted per `prediction_type`).
            timestep (`float` or `torch.Tensor`): the entry of `timesteps` that was evaluated.
            sample (`torch.Tensor`): the sample the network was evaluated at (unscaled).
            generator (`torch.Generator`, *optional*): source of the churn noise (unused when `s_churn` is 0).
            return_dict (`bool`, defaults to `True`): return an `EDMHeunSchedulerOutput` instead of a tuple.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self._eval_sigmas_f64):
            raise ValueError(
                f"step() was called {self._step_index + 1} times but the schedule has only "
                f"{len(self._eval_sigmas_f64)} evaluations; call set_timesteps() before sampling again."
            )
        step = int(self.evaluation_step_indices[self._step_index])
        sigma_next = self._sigmas_f64[step + 1]
        out_dtype = sample.dtype
        x = sample.to(torch.float32)
        denoised = self.precondition_outputs(x, model_output.to(torch.float32), self._eval_sigmas_f64[self._step_index])

        if self.state_in_first_order:
            sigma_hat = self._sigma_hats_f64[step]
            derivative = (x - denoised) / sigma_hat
            dt = sigma_next - sigma_hat
            prev_sample = x + derivative * dt
            if sigma_next > 0:  # keep what the Heun correction needs
                self._derivative, self._dt, self._sample = derivative, dt, x
        else:
            derivative = (x - denoised) / sigma_next
            prev_sample = self._sample + (self._derivative + derivative) * (self._dt / 2)
            self._clear_heun_state()
            prev_sample = self._add_churn(prev_sample, step + 1, generator)

        self._step_index += 1
        prev_sample = prev_sample.to(out_dtype)
        if not return_dict:
            return (prev_sample, denoised)
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _add_churn(self, sample: torch.Tensor, step: int, generator: torch.Generator | None) -> torch.Tensor:
        # Raise the sample from σ_step to σ̂_step before the step's first evaluation (EDM Alg. 2, lines 5-6).
        if step >= self.num_inference_steps:
            return sample
        sigma, sigma_hat = self._sigmas_f64[step], self._sigma_hats_f64[step]
        if sigma_hat <= sigma:
            return sample
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return sample + noise * (self.config.s_noise * math.sqrt(sigma_hat**2 - sigma**2))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x + σ·noise, with σ recovered from the timesteps (c_noise = ¼·ln σ)."""
        sigma = torch.exp(4 * timesteps.to(device=original_samples.device, dtype=torch.float32))
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + noise * sigma.to(original_samples.dtype)

    def __len__(self) -> int:
        return len(self._eval_sigmas_f64)
