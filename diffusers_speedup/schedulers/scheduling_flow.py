# Copyright 2025 The diffusers-speedup authors. Licensed under the Apache License, Version 2.0.
"""The samplers of SiT and REPA for flow-matching (interpolant) models, as one diffusers scheduler.

Conventions: continuous time t ∈ [0, 1] with t = 1 pure noise, x_t = α(t)·x0 + σ(t)·ε, and a network that predicts
the velocity v = α̇·x0 + σ̇·ε = dx/dt; sampling integrates from t = 1 down to t = 0 (REPA's direction; SiT's own code
runs the other way, with t = 1 data).

Self-contained on purpose: this file imports only the standard library, torch and diffusers, because it is copied
unchanged into exported model folders and loaded there with `trust_remote_code=True`.
"""

import math
from collections import namedtuple
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("euler", "heun", "euler_maruyama")
PATHS = ("linear", "gvp")
DIFFUSION_FORMS = ("sigma", "time")

PathCoefficients = namedtuple("PathCoefficients", ["alpha", "sigma", "d_alpha", "d_sigma"])


def shift_time(t: float | torch.Tensor, shift: float) -> float | torch.Tensor:
    """
    The time warp t' = s·t / (1 + (s − 1)·t) (t = 1 noise), which keeps t = 0 and t = 1 and, for s > 1, spends more
    of a uniform grid at high noise.

    It is SD3's resolution shift (Esser et al. 2024, §5.3.2) and the `shift` of diffusers'
    `FlowMatchEulerDiscreteScheduler`. LightningDiT's `timestep_shift` c (hustvl/LightningDiT `transport/integrators.py`
    `ode.__init__`: t_m = c·t_n / (1 + (c − 1)·t_n) on its grid, in SiT's time where t = 1 is data) is the same warp
    seen from the other end: with t = 1 − u, 1 − c·u/(1 + (c − 1)·u) = (1/c)·t / (1 + (1/c − 1)·t), so its
    `timestep_shift: 0.3` is `shift = 1 / 0.3` here.

    Computed as t / (t + (1 − t)/s), the same value written so that t = 0 and t = 1 stay exactly 0 and 1.
    """
    return t / (t + (1 - t) / shift)


def path_coefficients(t: float | torch.Tensor, path: str) -> PathCoefficients:
    """
    α(t), σ(t) and their time derivatives for x_t = α·x0 + σ·ε (t = 1 is noise).

    Args:
        t (`float` or `torch.Tensor`): the time, elementwise for a tensor.
        path (`str`): `"linear"` (α = 1 − t, σ = t; rectified flow, SiT's Linear) or `"gvp"` (α = cos(πt/2),
            σ = sin(πt/2); SiT's GVP, REPA's "cosine").
    """
    if path == "linear":
        one = torch.ones_like(t) if isinstance(t, torch.Tensor) else 1.0
        return PathCoefficients(alpha=1 - t, sigma=t, d_alpha=-one, d_sigma=one)
    if path == "gvp":
        cos, sin = (torch.cos, torch.sin) if isinstance(t, torch.Tensor) else (math.cos, math.sin)
        half_pi = math.pi / 2
        return PathCoefficients(
            alpha=cos(t * half_pi),
            sigma=sin(t * half_pi),
            d_alpha=-half_pi * sin(t * half_pi),
            d_sigma=half_pi * cos(t * half_pi),
        )
    raise ValueError(f"path must be one of {PATHS}, got {path!r}.")


def score_from_velocity(velocity: torch.Tensor, sample: torch.Tensor, t: float, path: str) -> torch.Tensor:
    """
    ∇ log p_t(x) from the velocity (SiT Eq. 9): s = (α/α̇·v − x) / (σ² − α/α̇·σ̇·σ), written as SiT's and REPA's
    `get_score_from_velocity` write it. Needs α̇ ≠ 0, i.e. t > 0 for the GVP path.
    """
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t, path)
    reverse_alpha_ratio = alpha / d_alpha
    variance = sigma**2 - reverse_alpha_ratio * d_sigma * sigma
    return (reverse_alpha_ratio * velocity - sample) / variance


def sample_from_velocity(velocity: torch.Tensor, sample: torch.Tensor, t: float, path: str) -> torch.Tensor:
    """The denoised estimate x0 = (σ̇·x − σ·v) / (α·σ̇ − σ·α̇), solving x = α·x0 + σ·ε and v = α̇·x0 + σ̇·ε."""
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t, path)
    return (d_sigma * sample - sigma * velocity) / (alpha * d_sigma - sigma * d_alpha)


@dataclass
class FlowSchedulerOutput(BaseOutput):
    """
    Output of [`FlowScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`):
            The sample to feed to the next network evaluation (after the last evaluation: the final sample).
        pred_original_sample (`torch.Tensor`):
            The denoised estimate x0 implied by this evaluation's velocity.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class FlowScheduler(SchedulerMixin, ConfigMixin):
    """
    Fixed-step samplers for velocity-predicting flow models, exactly as REPA's and SiT's code run them.

    - `"euler"` and `"heun"`: the probability-flow ODE dx = v dt, REPA's `euler_sampler` (`heun=False/True`). The
      time grid is `linspace(1, 0, N + 1)`; Heun evaluates each step at its start and, for the correction, at its
      end, except the last step (to t = 0), which is a plain Euler step, as REPA writes it: N steps take 2N − 1
      evaluations.
    - `"euler_maruyama"`: the reverse SDE dx = (v − ½·w_t·s) dt + √w_t dW̄ with the score s from the velocity, REPA's
      `euler_maruyama_sampler` and SiT's `sample_sde` (Euler, `last_step="Mean"`). The grid is
      `linspace(1, last_step_size, N)`: N − 1 Euler–Maruyama steps, then one last step of the drift alone (the mean,
      no noise) from `last_step_size` to 0; N evaluations. The diffusion coefficient is the official code's, which is
      twice the paper's notation: w_t = 2·σ(t) (SiT's `--diffusion-form sigma`, noise `sqrt(2 * diffusion)`) or
      w_t = 2·t (REPA's `compute_diffusion`, whatever the path); the two agree on the linear path.

    With `shift` s ≠ 1 every grid above is warped by t' = s·t / (1 + (s − 1)·t) (`shift_time`; SD3's shift, and
    LightningDiT's `timestep_shift` c as s = 1/c) before anything else uses it; the steps then run on the warped
    grid (for the SDE the last mean step starts at the warped `last_step_size`).

    The pipeline calls the model once per entry of `timesteps` (the t fed to the model, in [0, 1], unscaled) and then
    `step` once, as diffusers' Heun schedulers are driven. Guidance belongs to the caller: the velocity passed to
    `step` may already be guided (the SDE drift is affine in v with weights that sum to one, so guiding v equals
    REPA's guiding of the drift).

    Args:
        sampler (`str`, defaults to `"euler"`): `"euler"`, `"heun"` or `"euler_maruyama"` (above).
        path (`str`, defaults to `"linear"`): the interpolant the model was trained on, `"linear"` or `"gvp"`; the
            SDE's score is computed from the velocity through it (the ODE samplers do not need it).
        prediction_type (`str`, defaults to `"velocity"`): what the network returns; only the velocity dx/dt.
        diffusion_form (`str`, defaults to `"sigma"`): the SDE's w_t: `"sigma"`, 2·norm·σ(t) (SiT), or `"time"`,
            2·norm·t (REPA's hard-coded 2t).
        diffusion_norm (`float`, defaults to 1.0): SiT's `--diffusion-norm`, a factor on w_t.
        last_step_size (`float`, defaults to 0.04): the SDE's final deterministic step to t = 0 (SiT's and REPA's
            0.04).
        shift (`float`, defaults to 1.0): the time-grid warp s (above); 1 leaves the official grids unchanged, bit
            for bit. LightningDiT's released sampling (`timestep_shift: 0.3`) is `shift = 1 / 0.3`.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        sampler: str = "euler",
        path: str = "linear",
        prediction_type: str = "velocity",
        diffusion_form: str = "sigma",
        diffusion_norm: float = 1.0,
        last_step_size: float = 0.04,
        shift: float = 1.0,
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
        if prediction_type != "velocity":
            raise ValueError(f"prediction_type must be 'velocity' (the model predicts dx/dt), got {prediction_type!r}.")
        if diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"diffusion_form must be one of {DIFFUSION_FORMS}, got {diffusion_form!r}.")
        if not diffusion_norm >= 0:
            raise ValueError(f"diffusion_norm must be non-negative, got {diffusion_norm}.")
        if not 0 < last_step_size < 1:
            raise ValueError(f"last_step_size must lie in (0, 1), got {last_step_size}.")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
            raise ValueError(f"shift must be a positive finite number (1 for no warp), got {shift!r}.")
        # Diffusers' pipelines read `order` for progress bars; a Heun step takes two evaluations.
        self.order = 2 if sampler == "heun" else 1
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._clear_heun_state()
        self.set_timesteps(1)

    # ----------------------------------------------------------------------------------------------------------
    # The time grid

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """
        Builds the official time grid t_0 = 1 > … > t_N = 0 (warped by `shift`) and the list of network evaluations.

        Args:
            num_inference_steps (`int`): REPA's and SiT's `num_steps` N: ODE steps (Heun: 2N − 1 evaluations), or the
                SDE's evaluations (N − 1 stochastic steps and the last mean step).
            device (`str` or `torch.device`, *optional*): where `timesteps` live (the grid stays on the CPU).
        """
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        n = num_inference_steps
        if self.config.sampler == "euler_maruyama":
            grid = torch.linspace(1.0, self.config.last_step_size, n, dtype=torch.float64)
            grid = torch.cat([grid, grid.new_zeros(1)])
        else:
            grid = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
        if self.config.shift != 1:
            grid = shift_time(grid, float(self.config.shift))
        times = grid.tolist()

        # One entry per network evaluation: the t the network sees, and the step it belongs to.
        eval_times, eval_steps = [], []
        for i in range(n):
            eval_times.append(times[i])
            eval_steps.append(i)
            if self.config.sampler == "heun" and i < n - 1:
                eval_times.append(times[i + 1])
                eval_steps.append(i)

        self.num_inference_steps = n
        self.time_grid = grid
        self.evaluation_times = torch.tensor(eval_times, dtype=torch.float64)
        self.evaluation_step_indices = torch.tensor(eval_steps, dtype=torch.long)
        # The model takes t itself; float32, as REPA casts its float64 grid to the latents' dtype.
        self.timesteps = self.evaluation_times.to(device=device, dtype=torch.float32)
        self._times = times
        self._eval_times = eval_times
        self._step_index = None
        self._begin_index = None
        self._clear_heun_state()

    @property
    def evaluation_step_times(self) -> torch.Tensor:
        """t_i of the step each network evaluation belongs to (both evaluations of a Heun step share it, as REPA
        decides guidance by the step's t_cur), in float64 as the grid is computed."""
        return self.time_grid[self.evaluation_step_indices]

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: x_1 = ε."""
        return 1.0

    # Copied from diffusers_speedup.schedulers.scheduling_edm_heun.EDMHeunScheduler.step_index
    @property
    def step_index(self) -> int | None:
        """Index (into `timesteps`) of the next network evaluation; advanced by one on every `step` call."""
        return self._step_index

    # Copied from diffusers_speedup.schedulers.scheduling_edm_heun.EDMHeunScheduler.begin_index
    @property
    def begin_index(self) -> int | None:
        """The first index, when a pipeline sets it with `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """
        Lets a pipeline start at a later evaluation (for example img2img).

        Args:
            begin_index (`int`, defaults to 0): index into `timesteps`; must be the first evaluation of a step.
        """
        self._check_start_index(begin_index)
        self._begin_index = begin_index

    def _check_start_index(self, index: int):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._eval_times):
            raise ValueError(f"A start index must be an integer in [0, {len(self._eval_times)}), got {index!r}.")
        if index > 0 and self.evaluation_step_indices[index] == self.evaluation_step_indices[index - 1]:
            step = int(self.evaluation_step_indices[index])
            raise ValueError(
                f"Evaluation {index} is the Heun correction of step {step}; sampling can only start at the first "
                f"evaluation of a step (index {index + 1} starts step {step + 1})."
            )

    @property
    def state_in_first_order(self) -> bool:
        """True when the next evaluation starts a step, False for a Heun correction."""
        return self._velocity is None

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """
        The network input for the next evaluation: the sample itself (a flow model takes x_t unscaled).

        Args:
            sample (`torch.Tensor`): the current sample.
            timestep (`float` or `torch.Tensor`, *optional*): the entry of `timesteps` being evaluated.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        return sample

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """
        Index in `timesteps` at which a loop that starts with `timestep` begins. A Heun schedule holds every inner t
        twice (the correction of step i − 1, then the start of step i); as in diffusers' Heun schedulers, the second
        match is taken, so a loop started mid-schedule starts a step.

        Args:
            timestep (`float` or `torch.Tensor`): an entry of `timesteps`.
            schedule_timesteps (`torch.Tensor`, *optional*): the schedule to search; defaults to `timesteps`.
        """
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        timestep = torch.as_tensor(timestep, dtype=schedule_timesteps.dtype, device=schedule_timesteps.device)
        matches = (schedule_timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not one of this scheduler's timesteps (the t grid set by "
                "set_timesteps); pass an entry of `scheduler.timesteps`."
            )
        return int(matches[1 if len(matches) > 1 else 0])

    # Copied from diffusers_speedup.schedulers.scheduling_edm_heun.EDMHeunScheduler._init_step_index
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
        self._velocity = None
        self._sample = None

    # ----------------------------------------------------------------------------------------------------------
    # Sampling

    def diffusion(self, t: float) -> float:
        """The SDE's w_t as the official code uses it: 2·norm·σ(t) (`"sigma"`) or 2·norm·t (`"time"`)."""
        scale = t if self.config.diffusion_form == "time" else path_coefficients(t, self.config.path).sigma
        return 2 * self.config.diffusion_norm * scale

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> FlowSchedulerOutput | tuple:
        """
        Consumes one network evaluation and returns the sample for the next one. The arithmetic runs in float64 (as
        REPA's samplers do) and the result comes back in `sample`'s dtype.

        Args:
            model_output (`torch.Tensor`): the (guided) velocity at `sample`.
            timestep (`float` or `torch.Tensor`): the entry of `timesteps` that was evaluated.
            sample (`torch.Tensor`): the sample the network was evaluated at.
            generator (`torch.Generator` or a list, *optional*): source of the SDE's noise (unused by the ODE
                samplers); a list gives each sample its own generator.
            return_dict (`bool`, defaults to `True`): return a `FlowSchedulerOutput` instead of a tuple.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self._eval_times):
            raise ValueError(
                f"step() was called {self._step_index + 1} times but the schedule has only {len(self._eval_times)} "
                "evaluations; call set_timesteps() before sampling again."
            )
        step = int(self.evaluation_step_indices[self._step_index])
        t_cur, t_next = self._times[step], self._times[step + 1]
        dt = t_next - t_cur
        out_dtype = sample.dtype
        x = sample.to(torch.float64)
        velocity = model_output.to(torch.float64)
        t_eval = self._eval_times[self._step_index]
        denoised = sample_from_velocity(velocity, x, t_eval, self.config.path)

        sampler = self.config.sampler
        if sampler == "euler_maruyama":
            diffusion = self.diffusion(t_cur)
            drift = velocity - 0.5 * diffusion * score_from_velocity(velocity, x, t_cur, self.config.path)
            prev_sample = x + drift * dt
            if step < self.num_inference_steps - 1:  # the last step is the mean, without noise
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float64)
                prev_sample = prev_sample + math.sqrt(diffusion) * (noise * math.sqrt(abs(dt)))
        elif sampler == "heun" and not self.state_in_first_order:
            prev_sample = self._sample + dt * (0.5 * self._velocity + 0.5 * velocity)
            self._clear_heun_state()
        else:
            prev_sample = x + dt * velocity
            if sampler == "heun" and step < self.num_inference_steps - 1:  # keep what the correction needs
                self._velocity, self._sample = velocity, x

        self._step_index += 1
        prev_sample = prev_sample.to(out_dtype)
        denoised = denoised.to(out_dtype)
        if not return_dict:
            return (prev_sample, denoised)
        return FlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α(t)·x0 + σ(t)·ε at the given times t."""
        t = timesteps.to(device=original_samples.device, dtype=torch.float32)
        t = t.reshape(-1, *([1] * (original_samples.ndim - 1)))
        alpha, sigma, _, _ = path_coefficients(t, self.config.path)
        return (alpha * original_samples + sigma * noise).to(original_samples.dtype)

    def __len__(self) -> int:
        return len(self._eval_times)
