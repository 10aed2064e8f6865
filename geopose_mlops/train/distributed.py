"""Data-parallel training across processes: ``torchrun --nproc-per-node N -m geopose_mlops.cli train ...``.

Everything that knows about process groups lives here, so the training loop reads the same with one
process or many. Without torchrun (``WORLD_SIZE`` unset or 1) every function is the identity.

The choices, and why:

- **Backend**: NCCL when each rank has a GPU, gloo on CPU.
- **Training data**: :class:`ShardedEpochSampler` in every case (one process included): the run's
  seeded order per epoch, each rank taking whole micro-batches of it. ``batch_size`` is per rank and
  ``effective_batch_size`` is global (images per optimiser step over all ranks), so two ranks with
  ``batch_size=2, effective_batch_size=4`` compute the very micro-batches one process computes with
  ``batch_size=2, effective_batch_size=4`` (two accumulated micro-batches). DistributedDataParallel
  averages the gradients over ranks: the mean one process accumulates.
- **BatchNorm**: batch statistics over each micro-batch, as configured by ``batch_size``, in both
  cases, so training matches (no ``SyncBatchNorm``: it would normalise over N x B images, which one
  process with micro-batch B never does). The running statistics used at validation differ slightly:
  DDP keeps rank 0's (updated once per step, from its micro-batch), where one process updates them
  after every micro-batch.
- **Validation**: split across ranks (rank r takes images r, r+N, ...: every image exactly once, no
  padding duplicates), predictions gathered to rank 0 in the original order, and the metric computed
  there over all images, then broadcast so every rank takes the same early-stopping and pruning
  decision. Folding the gathered predictions in the original order makes the metric identical to a
  single process's, and rank 0 needs the predictions anyway to write the out-of-fold artifacts.
  (Reducing the metric's running sums instead would also work but would change the order of the
  floating-point sums and cannot give rank 0 the OOF arrays.)
- **Side effects**: only rank 0 talks to MLflow and writes checkpoints; the others get the run ids
  by broadcast where they need them.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from geopose_mlops.data.dataset import EpochSampler
from geopose_mlops.train.oof import OofPredictions
from geopose_mlops.train.tracker import NullTracker, Tracker

T = TypeVar("T")

# A rank waits this long for the others (seconds): long enough for rank 0's checkpoint and MLflow
# uploads, short enough that a crashed rank ends the job instead of hanging it.
PROCESS_GROUP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank, 0..world_size-1.
        world_size: Number of processes.
        local_rank: Rank on this machine (indexes its GPU).
        device: The device this rank computes on.
        backend: ``nccl``, ``gloo``, or None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when a process group spans more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that logs to MLflow and writes checkpoints."""
        return self.rank == 0


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set ``WORLD_SIZE`` above 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Args:
        device: ``cuda`` or ``cpu`` to force one; None picks CUDA where available.

    Returns:
        The context; a single-process one (no group) when not launched by torchrun.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not launched_by_torchrun():
        return DistributedContext(device=torch.device("cuda" if use_cuda else "cpu"))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_obj, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device_obj, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S),
            **({"device_id": device_obj} if use_cuda else {}),
        )
    return DistributedContext(rank, world_size, local_rank, device_obj, backend)


def cleanup_distributed(context: DistributedContext) -> None:
    """Leave the process group (a no-op for a single process)."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Move ``model`` to the rank's device and wrap it in DistributedDataParallel when distributed.

    DDP broadcasts rank 0's weights at construction, so every rank starts from the same model.
    """
    model = model.to(context.device)
    if not context.enabled:
        return model
    if context.device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[context.local_rank])
    return nn.parallel.DistributedDataParallel(model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (what a checkpoint stores, loadable without a process group)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ShardedEpochSampler(EpochSampler):
    """``EpochSampler``'s order and augmentation seeds, cut so each rank gets whole micro-batches.

    The epoch's order is padded by wrapping around to a multiple of ``world_size`` (as
    ``DistributedSampler`` does) so every rank takes the same number of optimiser steps, which DDP
    needs. It is then read in blocks of ``world_size x batch_size`` positions, rank r taking the r-th
    ``batch_size`` positions of each block (an equal share of a short last block). So N ranks with
    micro-batch B see exactly the micro-batches one process sees with B and N-fold gradient
    accumulation, and with one process the order is exactly ``EpochSampler``'s.

    Args:
        size: Number of training samples.
        seed: The run's seed.
        context: This rank's place in the job.
        batch_size: Micro-batch per rank.
        shuffle: Permute the positions each epoch.
    """

    def __init__(
        self, size: int, seed: int, context: DistributedContext, batch_size: int, shuffle: bool = True
    ) -> None:
        super().__init__(size, seed, shuffle)
        self.rank, self.world_size, self.batch_size = context.rank, context.world_size, batch_size

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self):
        pairs = list(super().__iter__())
        pairs += pairs[: len(self) * self.world_size - len(pairs)]
        mine = []
        block = self.world_size * self.batch_size
        for start in range(0, len(pairs), block):
            chunk = pairs[start : start + block]
            share = len(chunk) // self.world_size
            mine += chunk[self.rank * share : (self.rank + 1) * share]
        return iter(mine)


def shard_indices(count: int, context: DistributedContext) -> list[int]:
    """Indices ``rank, rank + N, ...`` of ``count`` items: each item on exactly one rank, none padded."""
    return list(range(context.rank, count, context.world_size))


def gather_to_main(items: Sequence[T], context: DistributedContext) -> list[T] | None:
    """Gather every rank's :func:`shard_indices`-ordered items to rank 0 in the original order.

    Args:
        items: This rank's items, in the order of its :func:`shard_indices`.
        context: The process group.

    Returns:
        On rank 0, all items ordered as ``range(count)``; None on the other ranks.
    """
    if not context.enabled:
        return list(items)
    parts: list[list[T]] | None = [[] for _ in range(context.world_size)] if context.is_main else None
    dist.gather_object(list(items), parts, dst=0)
    if not context.is_main:
        return None
    merged: list[T] = []
    for position in range(max(len(part) for part in parts)):
        merged.extend(part[position] for part in parts if position < len(part))
    return merged


def gather_oof(oof: OofPredictions, context: DistributedContext) -> OofPredictions | None:
    """Every rank's validation predictions (of its :func:`shard_indices`) as one, in the original order.

    Returns:
        On rank 0 the predictions for all validation images; None on the other ranks.
    """
    if not context.enabled:
        return oof
    arrays = ("gsd", "scale_true", "angle_true", "scale_pred", "angle_pred", "agl_pred", "agl_true")
    rows = [(oof.sample_ids[i], oof.cities[i], *(getattr(oof, name)[i] for name in arrays)) for i in range(len(oof))]
    merged = gather_to_main(rows, context)
    if merged is None:
        return None
    columns = list(zip(*merged, strict=True))
    values = {name: np.stack(column) for name, column in zip(arrays, columns[2:], strict=True)}
    return OofPredictions(sample_ids=list(columns[0]), cities=list(columns[1]), **values)


def broadcast_from_main(value: T, context: DistributedContext) -> T:
    """Rank 0's ``value`` on every rank (run ids, scores, the pruning decision)."""
    if not context.enabled:
        return value
    box: list[Any] = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_sum(values: Sequence[float], context: DistributedContext) -> list[float]:
    """Element-wise sum of ``values`` over ranks, in float64 (e.g. loss sums and image counts)."""
    if not context.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def main_rank_tracker(tracker: Tracker, context: DistributedContext) -> Tracker:
    """``tracker`` on rank 0; a :class:`~geopose_mlops.train.tracker.NullTracker` on every other rank.

    Only rank 0 talks to the tracking store (an SQLite store opened by several processes at once
    would even race on its schema). What other ranks need from it, rank 0 broadcasts with
    :func:`broadcast_from_main`.
    """
    return tracker if context.is_main else NullTracker()


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if context.enabled:
        dist.barrier()
