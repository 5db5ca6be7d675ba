"""One optimizer step: the model, the objective and the auxiliary losses as one module, the running loss sums, the
bookkeeping of skipped non-finite steps, and the step itself, with no host read on the way."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..objectives import AuxiliaryLoss, DiffusionObjective
from ..run_folder import find_latest_checkpoint

logger = logging.getLogger(__name__)

# Edges of the log-SNR buckets in which the loss is also logged (ln SNR; 0 is SNR = 1).
LOG_SNR_EDGES = (-6.0, -3.0, 0.0, 3.0, 6.0)
LOG_SNR_BUCKETS = (
    [f"<{LOG_SNR_EDGES[0]:g}"]
    + [f"{lo:g}..{hi:g}" for lo, hi in zip(LOG_SNR_EDGES, LOG_SNR_EDGES[1:])]
    + [f">{LOG_SNR_EDGES[-1]:g}"]
)


class NonFiniteLossError(RuntimeError):
    """The run went non-finite: too many optimizer steps in a row had a non-finite loss or gradient, the run ended on
    such steps, or an update left weights that are not finite."""


class TrainingModule(nn.Module):
    """The model, the objective and the auxiliary losses as one module, so that DDP also averages the objective's
    own parameters (EDM2's uncertainty head) and the auxiliary losses' (REPA's projector), checkpoints hold them
    all, and a single forward returns the per-sample losses. The exported pipeline takes ``model`` alone."""

    def __init__(
        self,
        model: nn.Module,
        objective: DiffusionObjective,
        rank: int = 0,
        world_size: int = 1,
        auxiliary_losses: list[AuxiliaryLoss] | tuple[AuxiliaryLoss, ...] = (),
    ):
        super().__init__()
        self.model, self.objective = model, objective
        self.shard = (rank, world_size)
        self.auxiliary_losses = nn.ModuleList(auxiliary_losses)

    def set_step(self, step: int) -> None:
        """Tell the auxiliary losses how many optimizer steps were taken before the next one (their ``step``)."""
        for auxiliary in self.auxiliary_losses:
            auxiliary.step = step

    def forward(self, x0: torch.Tensor, class_labels: torch.Tensor, **extras: torch.Tensor):
        # Every process draws the noise of the whole global batch and keeps its slice: N processes train on exactly
        # what one process would, and no two processes reuse the same noise.
        output = self.objective(self.model, x0, class_labels, shard=self.shard)
        for auxiliary in self.auxiliary_losses:  # each reads the hidden state that the objective's forward made
            term = auxiliary(**extras)
            output.loss = output.loss + term
            output.terms[auxiliary.name] = term.detach()
        return output


class LossTracker:
    """Running sums of the loss, overall and per log-SNR bucket, kept on the device: reading them (one host sync)
    happens only when they are logged."""

    def __init__(self, device):
        self.edges = torch.tensor(LOG_SNR_EDGES, device=device)
        self.loss = torch.zeros((), device=device)
        self.bucket_sum = torch.zeros(len(LOG_SNR_EDGES) + 1, device=device)
        self.bucket_count = torch.zeros(len(LOG_SNR_EDGES) + 1, device=device)
        self.vb = None  # the variational-bound part of the loss, for learned-variance models
        self.terms = {}  # the auxiliary losses' terms, by name

    def add(self, output, weight: float = 1.0) -> None:
        per_sample = output.loss.detach()
        self.loss += per_sample.mean() * weight
        if output.vb is not None:
            self.vb = (0 if self.vb is None else self.vb) + output.vb.detach().mean() * weight
        for name, term in output.terms.items():
            self.terms[name] = self.terms.get(name, 0) + term.mean() * weight
        buckets = torch.bucketize(output.snr.clamp_min(1e-20).log(), self.edges)
        self.bucket_sum.index_add_(0, buckets, per_sample)
        self.bucket_count.index_add_(0, buckets, torch.ones_like(per_sample))

    def reset(self) -> None:
        for total in (self.loss, self.bucket_sum, self.bucket_count):
            total.zero_()
        self.vb = None
        self.terms = {}


# `NonFiniteSteps.weights_broken_at` while every update left finite weights.
_NEVER = torch.iinfo(torch.long).max


class NonFiniteSteps:
    """The optimizer steps skipped for a non-finite gradient, and the first update that left a weight NaN or
    infinite, tracked on the device (no host read per step) and read only when the loss is logged (`check`), at
    checkpoints (`allow_checkpoint`) and when the run ends (`check_end`).

    Args:
        max_in_a_row: ``train.max_consecutive_nonfinite``: the run stops once this many steps in a row were skipped.
        device: where the counts live.
    """

    def __init__(self, max_in_a_row: int, device):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)  # the latest steps, all skipped
        self.longest_run = self.in_a_row.clone()  # the longest run of skipped steps since the last log
        self.since_log = self.in_a_row.clone()  # steps skipped since the last log
        # The first step whose update left a weight that is not finite; _NEVER while none has.
        self.weights_broken_at = torch.full((), _NEVER, dtype=torch.long, device=device)

    def restore(self, in_a_row: int) -> None:
        """Continue from a checkpoint whose latest ``in_a_row`` steps were skipped."""
        self.in_a_row.fill_(in_a_row)
        self.longest_run.fill_(in_a_row)

    def record(self, skipped: torch.Tensor) -> None:
        """Count one optimizer step; ``skipped`` is the 0-dim bool tensor that `optimizer_step` returns."""
        self.in_a_row = (self.in_a_row + 1) * skipped
        self.longest_run = torch.maximum(self.longest_run, self.in_a_row)
        self.since_log += skipped

    def record_weights(self, parameters: list[torch.Tensor], step: int) -> None:
        """After the update of ``step``: remember it if it left weights that are not finite. A finite gradient does
        not make a finite update (an enormous learning rate), and no later step can repair NaN weights, so they are
        looked at after each update, as the gradient is before it: their norms, in the one fused kernel that
        gradient clipping uses, on the device. As for the gradient, a norm that overflows counts as not finite:
        weights beyond ~1e19 are as lost as NaN ones."""
        finite = torch.stack(torch._foreach_norm(parameters)).isfinite().all()
        self.weights_broken_at = torch.where(finite, self.weights_broken_at, self.weights_broken_at.clamp(max=step))

    def current_run(self) -> int:
        return int(self.in_a_row)

    def _weights_broken_at(self) -> int | None:
        """The first step that left a weight NaN or infinite on any process (FSDP's shards may differ), or None."""
        broken_at = self.weights_broken_at
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            broken_at = broken_at.clone()
            torch.distributed.all_reduce(broken_at, op=torch.distributed.ReduceOp.MIN)
        broken_at = int(broken_at)
        return None if broken_at == _NEVER else broken_at

    def allow_checkpoint(self, step: int) -> bool:
        """False, with a warning, while the latest steps were skipped or the weights are not finite: a checkpoint
        written then would be named as the last good one although the run had already gone wrong."""
        broken_at = self._weights_broken_at()
        if broken_at is not None:
            logger.warning(
                "No checkpoint at step %d: the weights have not been finite since the update of step %d.",
                step,
                broken_at,
            )
            return False
        in_a_row = self.current_run()
        if in_a_row:
            logger.warning(
                "No checkpoint at step %d: the last %d optimizer steps were non-finite and skipped.", step, in_a_row
            )
        return not in_a_row

    def check(self, steps: int, step: int, output_dir: Path) -> None:
        """At a log: raise `NonFiniteLossError` if an update left weights that are not finite; warn about the steps
        skipped among the last ``steps``, raise once too many came in a row, and start counting for the next log."""
        self._raise_if_weights_broken(step, output_dir)
        skipped, longest_run = int(self.since_log), int(self.longest_run)
        self.since_log.zero_()
        self.longest_run.copy_(self.in_a_row)
        if not skipped:
            return
        logger.warning(
            "%d of the last %d optimizer steps (up to step %d) had a non-finite gradient norm and were skipped.",
            skipped,
            steps,
            step,
        )
        if longest_run >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{longest_run} optimizer steps in a row had a non-finite loss or gradient (seen at step {step}; "
                f"train.max_consecutive_nonfinite is {self.max_in_a_row}); stopping. {_last_good(output_dir)}"
            )

    def check_end(self, step: int, output_dir: Path) -> None:
        """When the last step is done: raise `NonFiniteLossError` unless the run ends on a step that trained and
        finite weights, so that a run that went wrong is neither checkpointed nor exported, and exits non-zero."""
        self._raise_if_weights_broken(step, output_dir)
        in_a_row = self.current_run()
        if in_a_row:
            raise NonFiniteLossError(
                f"The run ended on {in_a_row} skipped optimizer step(s) with a non-finite loss or gradient (steps "
                f"{step - in_a_row + 1} to {step}; fewer than train.max_consecutive_nonfinite={self.max_in_a_row}), "
                f"so its final weights are not those of a finished run: no checkpoint or export is written for step "
                f"{step}. {_last_good(output_dir)}"
            )

    def _raise_if_weights_broken(self, step: int, output_dir: Path) -> None:
        broken_at = self._weights_broken_at()
        if broken_at is not None:
            raise NonFiniteLossError(
                f"The update of step {broken_at} left weights that are not finite (NaN, infinite, or so large that "
                f"their norm overflows; seen at step {step}): no later step can repair them, so the run stops "
                f"without a checkpoint or export. {_last_good(output_dir)}"
            )


def _last_good(output_dir: Path) -> str:
    last = find_latest_checkpoint(output_dir, clean=False)
    return f"The last good checkpoint is {last or 'none (none saved)'}."


def optimizer_step(
    accelerator, module, optimizer, micro_batches, max_grad_norm: float | None, tracker: LossTracker | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``micro_batches`` (an iterable of `Batch`, one per accumulation step, read lazily):
    forward and backward each, clip, and step unless the gradient is not finite.

    Returns the gradient norm and a 0-dim bool tensor telling whether the step was skipped, both left on the device:
    with a fused optimizer (the default) nothing here waits for the GPU.
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    grad_norm, skipped = torch.zeros(()), torch.zeros((), dtype=torch.bool)
    for x0, class_labels, extras in micro_batches:
        with accelerator.accumulate(module):
            output = module(x0, class_labels, **extras)
            accelerator.backward(output.loss.mean())
            if accelerator.sync_gradients:
                # With no clipping asked for, an infinite bound still returns the norm (for logging and the check).
                grad_norm = accelerator.clip_grad_norm_(
                    parameters, math.inf if max_grad_norm is None else max_grad_norm
                )
                grad_norm = torch.as_tensor(grad_norm)
                skipped = ~torch.isfinite(grad_norm)
                if accelerator.scaler is not None:
                    optimizer.step()  # fp16's loss scaler skips non-finite steps itself
                else:
                    _step_unless(optimizer, skipped)
                optimizer.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.add(output, weight=1.0 / accelerator.gradient_accumulation_steps)
    return grad_norm, skipped


def _step_unless(optimizer, skip: torch.Tensor) -> None:
    """Step unless ``skip`` (a 0-dim bool tensor) is set, deciding on the device when the optimizer is fused.

    Fused Adam/AdamW read a ``found_inf`` flag inside their kernel (the hook GradScaler uses) and then leave the
    parameters, moments and step count untouched, so the skip costs no host read. Other optimizers need the
    decision on the host: one scalar read per step.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
    if all(group.get("fused") for group in inner.param_groups):
        inner.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skip):
        optimizer.step()
