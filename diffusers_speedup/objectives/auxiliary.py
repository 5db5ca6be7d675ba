"""Auxiliary losses: named terms added to the diffusion loss, computed from the hidden state of one block of the
network and from extra per-sample fields of the batch (representation alignment, REPA, is the first).

An auxiliary loss is a module inside the trainer's `TrainingModule`, next to the model and the objective: DDP
averages its parameters, checkpoints save and resume them with the model, the log shows its term as
``train/<name>``, and the exported pipeline, which holds the model alone, leaves it out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def first_output(output):
    """A block's hidden state when its output is a tensor, or a tuple that starts with it."""
    return output[0] if isinstance(output, tuple) else output


class AuxiliaryLoss(nn.Module):
    """Base of an auxiliary loss that reads the output of one block of the network.

    It keeps the block's output from the step's forward pass through a forward hook, so the network itself is
    unchanged (the same model file is trained and exported). A subclass sets `name` and implements `loss`.

    Args:
        block: the network's submodule whose output the loss reads (e.g. the 8th transformer block).
        hidden_state_of: the function from the block's output to the hidden state the loss reads (default: the
            output itself, or the first item of a tuple). E.g. U-ViT's tokens without its time and class tokens, or
            the image stream of an SD3 block's ``(encoder_hidden_states, hidden_states)``.

    Attributes:
        step: the number of optimizer steps taken before the one under way. The trainer sets it before each step,
            from its own count (restored on resume), for losses that change with training (REPA's optional stop).
    """

    name = "auxiliary"

    def __init__(self, block: nn.Module, hidden_state_of: Callable | None = None):
        super().__init__()
        self._hidden_state = None
        self._hidden_state_of = hidden_state_of or first_output
        self.step = 0
        # Not stored as a submodule: the block's parameters belong to the network, not to this loss.
        self._hook = block.register_forward_hook(self._keep_output)

    def _keep_output(self, module, args, output) -> None:
        self._hidden_state = self._hidden_state_of(output)

    def loss(self, hidden_state: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        """The per-sample term (shape (B,)), already weighted, from the block's output and the batch's extras."""
        raise NotImplementedError

    def forward(self, **extras: torch.Tensor) -> torch.Tensor:
        hidden_state, self._hidden_state = self._hidden_state, None
        if hidden_state is None:
            raise RuntimeError(
                f"The auxiliary loss {self.name!r} found no hidden state: the block it reads did not run in this "
                "step's forward pass."
            )
        return self.loss(hidden_state, **extras)

    def detach_from_network(self) -> None:
        """Remove the hook (the network no longer feeds this loss)."""
        self._hook.remove()
