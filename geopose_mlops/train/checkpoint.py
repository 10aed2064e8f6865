"""Checkpoints: everything needed to resume a fold, or to rebuild its model from the file alone.

``torch.save`` of ``{"format": 1, "model": state_dict, "optimizer", "scaler", "config":
to_dict(TrainConfig), "fold", "epoch" (last finished, 0-based), "best_score", "best_epoch",
"metrics"}``; ``metrics`` holds the finished epoch's logged values, so a resume can log them if the run
was killed after the checkpoint was stored but before the metrics were. Writes go to a temporary file
renamed into place, so a kill mid-write never leaves a truncated checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geopose_mlops.config import TrainConfig, from_dict, to_dict
from geopose_mlops.data.io import atomic_path
from geopose_mlops.errors import DataError

CHECKPOINT_FORMAT = 1


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    config: TrainConfig,
    fold: int,
    epoch: int,
    best_score: float,
    best_epoch: int,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename) and return its path.

    Args:
        path: Destination ``.pt`` file (parent folders are created).
        model: The model (its state dict is saved).
        optimizer: Optimiser whose state is saved (None: not saved).
        scaler: GradScaler whose state is saved (None or disabled: empty).
        config: The run's configuration.
        fold: Fold number.
        epoch: The last finished epoch, 0-based.
        best_score: Best validation score so far.
        best_epoch: Epoch of ``best_score``.
        metrics: The finished epoch's logged metrics.
        extra: More entries to store (``last.pt``: ``ema`` weights, ``top_k`` kept epochs).
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else {},
        "config": to_dict(config),
        "fold": int(fold),
        "epoch": int(epoch),
        "best_score": float(best_score),
        "best_epoch": int(best_epoch),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``.

    Raises:
        DataError: The file is missing, unreadable, or not a checkpoint of this format.
    """
    path = Path(path)
    try:
        # weights_only: a checkpoint holds tensors and plain values, nothing that needs unpickling code.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise DataError(path, f"unreadable checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise DataError(path, f"checkpoint format {found!r}, expected {CHECKPOINT_FORMAT}")
    return state


def config_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> TrainConfig:
    """The TrainConfig stored in a loaded checkpoint."""
    return from_dict(TrainConfig, state["config"], f"{path}: config")


def model_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """Rebuild the trained model from a checkpoint alone, in eval mode.

    The architecture comes from the stored config; encoder weights are not fetched again (the
    checkpoint's state dict holds them).

    Returns:
        (model, the run's TrainConfig).
    """
    from geopose_mlops.models.factory import build_model

    state = load_checkpoint(path, map_location)
    config = config_from_checkpoint(state, path)
    model = build_model(dataclasses.replace(config.model, encoder_weights="none"))
    model.load_state_dict(state["model"])
    model.to(map_location)
    model.eval()
    return model, config
