"""Weight averaging: an exponential moving average of the weights, and the average of the K best epochs.

- :class:`EmaWeights` (``--ema DECAY``): after every optimiser step each floating-point parameter and
  buffer of a copy becomes ``decay x average + (1 - decay) x current``, starting from the weights the fold
  starts with; integer buffers (batch-norm's ``num_batches_tracked``) are copied. Batch-norm running
  statistics are averaged like the weights (they are floating-point buffers), as
  ``torch.optim.swa_utils.AveragedModel(..., use_buffers=True)`` does. The copy is what the fold
  validates and stores as ``best.pt``; ``last.pt`` holds it beside the training weights, for resume.
- :class:`TopKWeights` (``--keep-top K``): the state dicts (copied to the CPU) of the K epochs with the
  highest ``val_score``; :func:`average_state_dicts` averages them at the end of the fold (floating-point
  tensors averaged in float64 and cast back, integer tensors taken from the best epoch). ``last.pt``
  holds them, so a resumed fold averages the same epochs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


class EmaWeights:
    """An exponential moving average of a model's weights, updated after each optimiser step.

    Args:
        model: The model being trained (the plain module, not its DDP wrapper). A copy of it, in eval
            mode and without gradients, holds the average.
        decay: Weight of the previous average per update, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay!r}: expected a number in (0, 1)")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``average = decay x average + (1 - decay) x model`` for float tensors; integer buffers copied."""
        averaged = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = averaged[name]
            if target.is_floating_point():
                target.mul_(self.decay).add_(value.detach().to(target.dtype), alpha=1.0 - self.decay)
            else:
                target.copy_(value)

    def state_dict(self) -> StateDict:
        """The averaged weights (the copy's state dict)."""
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the averaged weights (from ``last.pt``)."""
        self.module.load_state_dict(state)


def cpu_copy(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A detached CPU copy of a state dict (shares no storage with the model)."""
    return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}


@dataclass
class KeptEpoch:
    """One epoch kept for averaging: its ``val_score``, number and weights (on the CPU)."""

    score: float
    epoch: int
    state: StateDict


class TopKWeights:
    """The weights of the ``k`` epochs with the highest ``val_score`` so far.

    Args:
        k: How many epochs to keep (>= 1).
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"keep_top={k}: expected at least 1 epoch")
        self.k = k
        self.kept: list[KeptEpoch] = []  # best first

    def offer(self, epoch: int, score: float, state: Mapping[str, torch.Tensor]) -> bool:
        """Keep this epoch's weights if its score is among the ``k`` best (ties: the earlier epoch stays).

        A non-finite score is never kept. Returns whether it was kept.
        """
        if not math.isfinite(score):
            return False
        if len(self.kept) >= self.k and score <= self.kept[-1].score:
            return False
        self.kept.append(KeptEpoch(float(score), int(epoch), cpu_copy(state)))
        self.kept.sort(key=lambda kept: (-kept.score, kept.epoch))
        del self.kept[self.k :]
        return True

    def average(self) -> StateDict:
        """The average of the kept weights (see :func:`average_state_dicts`).

        Raises:
            ValueError: Nothing kept.
        """
        return average_state_dicts([kept.state for kept in self.kept])

    def average_model(self, like: nn.Module) -> nn.Module:
        """A copy of ``like`` (same device and memory format) holding the average of the kept weights."""
        averaged = copy.deepcopy(like)
        averaged.load_state_dict(self.average())
        return averaged

    def state_dict(self) -> list[dict[str, Any]]:
        """What ``last.pt`` stores: ``[{"score", "epoch", "state"}, ...]``, best first."""
        return [{"score": kept.score, "epoch": kept.epoch, "state": kept.state} for kept in self.kept]

    def load_state_dict(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Restore the kept epochs from ``last.pt``."""
        self.kept = [KeptEpoch(float(e["score"]), int(e["epoch"]), cpu_copy(e["state"])) for e in entries]
        self.kept.sort(key=lambda kept: (-kept.score, kept.epoch))
        del self.kept[self.k :]


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """The element-wise mean of state dicts with the same keys and shapes.

    Floating-point tensors are summed in float64, divided by their number and cast back to their dtype;
    other tensors (integer buffers such as ``num_batches_tracked``) are taken from the first state dict
    (the best epoch's).

    Raises:
        ValueError: No state dicts, or their keys differ.
    """
    if not states:
        raise ValueError("no weights to average")
    first = states[0]
    for other in states[1:]:
        if other.keys() != first.keys():
            raise ValueError(f"state dicts differ in keys: {sorted(set(first) ^ set(other))[:5]}")
    averaged: StateDict = {}
    for name, value in first.items():
        if value.is_floating_point():
            total = sum(state[name].detach().to(torch.float64) for state in states)
            averaged[name] = (total / len(states)).to(value.dtype)
        else:
            averaged[name] = value.detach().clone()
    return averaged


@dataclass
class WeightAverages:
    """A fold's weight averages: the moving average (``ema``) and the best epochs kept (``keep_top``)."""

    ema: EmaWeights | None = None
    top_k: TopKWeights | None = None

    @classmethod
    def start(
        cls, model: nn.Module, ema: float | None, keep_top: int | None, state: Mapping[str, Any] | None = None
    ) -> WeightAverages:
        """The averages a fold asks for: those of its ``last.pt`` (``state``) where it holds them, else new.

        Args:
            model: The model being trained (its weights start a new moving average).
            ema: Moving-average decay per optimiser step (None: none).
            keep_top: Best epochs to keep (None: none).
            state: A loaded ``last.pt`` (its ``ema`` and ``top_k`` entries), or None.
        """
        state = state or {}
        averages = cls()
        if ema is not None:
            averages.ema = EmaWeights(model, ema)
            if state.get("ema") is not None:  # a last.pt written without ema starts the average here
                averages.ema.load_state_dict(state["ema"])
        if keep_top is not None:
            averages.top_k = TopKWeights(keep_top)
            averages.top_k.load_state_dict(state.get("top_k") or [])
        return averages

    def scored(self, model: nn.Module) -> nn.Module:
        """What is validated and stored as ``best.pt``: the moving average when on, else ``model``."""
        return self.ema.module if self.ema is not None else model

    def on_step(self, model: nn.Module) -> Callable[[], None] | None:
        """What to call after each optimiser step of ``model`` (None without a moving average)."""
        ema = self.ema
        return (lambda: ema.update(model)) if ema is not None else None

    def checkpoint_entries(self) -> dict[str, Any]:
        """The ``last.pt`` entries that resume them: ``ema`` (weights) and ``top_k`` (kept epochs)."""
        entries: dict[str, Any] = {}
        if self.ema is not None:
            entries["ema"] = self.ema.state_dict()
        if self.top_k is not None:
            entries["top_k"] = self.top_k.state_dict()
        return entries
