"""One epoch of training and one validation pass, written to be read top to bottom (nanoGPT style).

- **Precision**: an explicit autocast context. With ``amp`` on CUDA: bf16 where the GPU supports it,
  else fp16 with a ``GradScaler`` (bf16 has fp32's exponent range and needs no loss scaling). With
  ``amp`` on a CPU that has bf16 instructions (AVX512-BF16 or AMX): bf16 autocast, which oneDNN runs
  ~1.9x faster than fp32 for a ResNet34 U-Net step (bench/bench_train_step.py); on other CPUs bf16
  would be emulated and slower, so they, and ``amp`` off, run fp32 with a disabled pass-through scaler.
- **Gradient accumulation**: one optimiser step per group of ``accumulation_steps`` micro-batches.
  Each micro-batch's loss is weighted by its share of the group's images, so a group of 4 x 2 images
  gives the gradient of one batch of 8, and a short last group (or a short last micro-batch) is
  averaged over the images it really holds instead of being shrunk. (Losses that average over valid
  pixels weigh them per micro-batch, so with no-data pixels this is the standard approximation.)
- **Learning rate**: ``learning_rate(step, ...)``, a pure function of the optimiser step (linear
  warm-up, cosine decay), set on the optimiser before every step; nothing to checkpoint for it.
- ``zero_grad(set_to_none=True)``, unscale before clipping, ``channels_last`` images and weights.
- A non-finite loss stops training with a ``GeoposeError`` before the optimiser touches the weights,
  so the last checkpoint written stays the last good one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from geopose_mlops.constants import AGL, ANGLE, CITIES, CITY, GSD, IMAGE, SAMPLE_ID, SCALE, XYDIR
from geopose_mlops.errors import GeoposeError
from geopose_mlops.train.oof import OofPredictions

WARMUP_FRACTION = 0.05  # of all optimiser steps of a fold
MIN_LR_RATIO = 0.1  # cosine decays to this fraction of the peak learning rate
GRAD_CLIP_NORM = 1.0  # max global L2 norm of the gradients

LossFn = Callable[[dict, dict], tuple[torch.Tensor, dict[str, float]]]


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int | None = None) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up, then cosine to 10% of peak.

    Args:
        step: Optimiser step, counted over the whole fold (epoch x steps per epoch + step in epoch).
        total_steps: Optimiser steps of the whole fold.
        peak_lr: Learning rate at the end of warm-up.
        warmup_steps: Steps of linear warm-up (None: 5% of ``total_steps``, at least 1).
    """
    if warmup_steps is None:
        warmup_steps = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup_steps:
        return peak_lr * (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = MIN_LR_RATIO * peak_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


@dataclass
class Precision:
    """Where and in which precision the model runs.

    Attributes:
        device: The torch device.
        dtype: Autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for plain fp32.
        scaler: GradScaler, enabled only for fp16.
    """

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler = field(repr=False)

    @property
    def name(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes (a no-op context in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX tiles), as oneDNN needs it."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def make_precision(device: str | torch.device, amp: bool) -> Precision:
    """The precision ``amp`` gives on ``device``.

    CUDA: bf16 where supported, else fp16 with loss scaling. CPU: bf16 where the CPU has bf16
    instructions (``cpu_has_bf16``), else fp32. ``amp`` off: fp32 everywhere.
    """
    device = torch.device(device)
    dtype = None
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp and device.type == "cpu" and cpu_has_bf16():
        dtype = torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return Precision(device=device, dtype=dtype, scaler=scaler)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and kernels only (not biases or norm scales)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every tensor in one pass instead of one loop per tensor: one launch per
    # step on CUDA, and on CPU ~4x faster than the default per-tensor loop (0.017 s vs 0.063 s a step
    # for a ResNet34 U-Net here). Older torch builds without it fall back to the per-tensor loop.
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    """A DataLoader over a GeoposeDataset (in order unless a sampler, e.g. ``EpochSampler``, is given).

    Workers are kept alive between epochs (no re-fork, no re-opening of the memory-mapped cache). The
    loader draws its workers' seeds from a generator of its own: torch's default one, which dropout
    uses, would otherwise lose a draw to each iteration of a loader without persistent workers, so the
    number of workers would change the training.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        generator=torch.Generator().manual_seed(0),  # the samples' augmentation is seeded per item (EpochSampler)
    )


def micro_batch_weights(dataset_size: int, batch_size: int, accumulation_steps: int) -> list[float]:
    """Weight of each micro-batch's mean loss: its images over the images of its accumulation group.

    With 8 images as 4 micro-batches of 2 each weight is 1/4; 10 images (groups of 8 and 2) give four
    weights of 1/4 and one of 1 for the short last group.
    """
    sizes = [min(batch_size, dataset_size - start) for start in range(0, dataset_size, batch_size)]
    weights = []
    for group_start in range(0, len(sizes), accumulation_steps):
        group = sizes[group_start : group_start + accumulation_steps]
        weights += [size / sum(group) for size in group]
    return weights


def memory_format(device: str | torch.device) -> torch.memory_format:
    """channels_last on CUDA (tensor-core convolutions want NHWC); contiguous NCHW on CPU.

    On CPU, oneDNN's NCHW kernels were faster for these U-Nets: channels_last measured ~30% slower per
    training step here (bench/bench_train_step.py).
    """
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch to ``device`` (images in the device's memory format); others stay."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key == IMAGE:
                value = value.contiguous(memory_format=memory_format(device))
        moved[key] = value
    return moved


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every batch-norm layer in eval mode (running statistics used, not updated)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@dataclass
class EpochResult:
    """What one training epoch did: mean loss (per image), last learning rate, steps, seconds."""

    train_loss: float
    lr: float
    steps: int
    seconds: float
    parts: dict[str, float]


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision, lr: float, grad_clip: float | None
) -> None:
    """One optimiser step on the accumulated gradients at learning rate ``lr``, then clear them."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if grad_clip is not None:
        # Gradients must be in true units (not fp16-scaled) before their norm is clipped.
        precision.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    precision: Precision,
    accumulation_steps: int,
    lr_at_step: Callable[[int], float],
    first_step: int = 0,
    epoch: int = 0,
    batchnorm_frozen: bool = False,
    grad_clip: float | None = GRAD_CLIP_NORM,
    on_step: Callable[[], None] | None = None,
) -> EpochResult:
    """Train for one pass over ``loader``.

    Args:
        model: The GeoposeModel (already on ``precision.device``, in ``memory_format``).
        loader: Training batches (its dataset length and batch size define the accumulation groups).
        optimizer: The optimiser; its learning rate is set from ``lr_at_step`` before each step.
        loss_fn: ``loss_fn(outputs, batch) -> (total, parts)``.
        precision: Device, autocast dtype and GradScaler.
        accumulation_steps: Micro-batches per optimiser step.
        lr_at_step: Learning rate of an optimiser step counted over the fold.
        first_step: The fold-wide index of this epoch's first optimiser step.
        epoch: The epoch number, for error messages.
        batchnorm_frozen: Keep batch-norm layers in eval mode (e.g. with tiny micro-batches).
        grad_clip: Clip the global gradient norm to this (None: no clipping).
        on_step: Called after every optimiser step (e.g. ``EmaWeights.update``).

    Raises:
        GeoposeError: The loss became NaN or infinite (the weights are left as before that step).
    """
    model.train()
    if batchnorm_frozen:
        freeze_batchnorm(model)
    # The sampler's length: under torchrun it is this rank's share of the dataset.
    weights = micro_batch_weights(len(loader.sampler), loader.batch_size, accumulation_steps)
    n_batches = len(weights)
    start = time.perf_counter()
    loss_sum, part_sums, images, step, lr = 0.0, {}, 0, first_step, lr_at_step(first_step)
    optimizer.zero_grad(set_to_none=True)
    for index, batch in enumerate(loader):
        batch = to_device(batch, precision.device)
        with precision.autocast():
            outputs = model(batch[IMAGE], batch[GSD], batch[CITY])
        loss, parts = loss_fn(outputs, batch)
        # .item() is a CPU-GPU sync point; the loss parts already needed one.
        value = loss.item()
        if not math.isfinite(value):
            raise GeoposeError(
                f"training loss is {value} at epoch {epoch}, micro-batch {index} (samples "
                f"{list(batch[SAMPLE_ID])}); stopped before the optimiser step, last checkpoint kept. "
                "Try a lower --lr or --no-amp."
            )
        precision.scaler.scale(loss * weights[index]).backward()
        size = batch[IMAGE].shape[0]
        loss_sum += value * size
        images += size
        for key, part in parts.items():
            part_sums[key] = part_sums.get(key, 0.0) + part * size
        group_end = (index + 1) % accumulation_steps == 0 or index + 1 == n_batches
        if group_end:
            lr = lr_at_step(step)
            optimizer_step(model, optimizer, precision, lr, grad_clip)
            step += 1
            if on_step is not None:
                on_step()
    return EpochResult(
        train_loss=loss_sum / max(images, 1),
        lr=lr,
        steps=step - first_step,
        seconds=time.perf_counter() - start,
        parts={key: total / max(images, 1) for key, total in part_sums.items()},
    )


@torch.no_grad()
def predict_validation(model: nn.Module, loader: DataLoader, precision: Precision) -> OofPredictions:
    """Predict every validation image in the loader's order.

    Heights are clipped at 0 m (as a submission holds them) and stored float16; the angle is
    atan2(sin, cos) of the predicted direction.
    """
    model.eval()
    ids, cities, columns, agl_pred, agl_true = [], [], {k: [] for k in ("gsd", "st", "at", "sp", "ap")}, [], []
    for batch in loader:
        moved = to_device(batch, precision.device)
        with precision.autocast():
            outputs = model(moved[IMAGE], moved[GSD], moved[CITY])
        xydir = outputs[XYDIR].float().cpu()
        agl_pred.append(outputs[AGL].float().clamp_min(0).cpu().numpy().astype(np.float16))
        agl_true.append(batch[AGL].numpy().astype(np.float16))
        ids += list(batch[SAMPLE_ID])
        cities += [CITIES[int(c)] for c in batch[CITY]]
        columns["gsd"].append(batch[GSD].numpy())
        columns["st"].append(batch[SCALE].numpy())
        columns["at"].append(batch[ANGLE].numpy())
        columns["sp"].append(outputs[SCALE].float().cpu().numpy())
        columns["ap"].append(torch.atan2(xydir[:, 0], xydir[:, 1]).numpy())
    joined = {key: np.concatenate(values).astype(np.float64) for key, values in columns.items()}
    return OofPredictions(
        sample_ids=ids,
        cities=cities,
        gsd=joined["gsd"],
        scale_true=joined["st"],
        angle_true=joined["at"],
        scale_pred=joined["sp"],
        angle_pred=joined["ap"],
        agl_pred=np.concatenate(agl_pred),
        agl_true=np.concatenate(agl_true),
    )


def validation_metrics(scores: dict) -> dict[str, float]:
    """``val_*`` metric names (SPEC §4) from a ``GeoposeMetric.compute()`` result.

    RMSEs and errors are means over the cities present (each city's value pools its images).
    """
    cities = scores["cities"]
    metrics = {"val_score": scores["final_score"]}
    for name in ("agl_r2", "vflow_r2", "agl_rmse", "mag_rmse", "angle_error_deg", "scale_error"):
        metrics[f"val_{name}"] = float(np.mean([c[name] for c in cities.values()])) if cities else math.nan
    for city, values in cities.items():
        metrics[f"val_score_{city}"] = values["score"]
    return metrics
