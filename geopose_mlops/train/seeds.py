"""A fold's random generators: all of them seeded at its start, torch's again at each epoch.

What a fold draws comes from its seed alone (``fold_seed``): the weights' initialisation
from ``seed_everything``; the order and augmentation of each epoch's samples from ``EpochSampler``
(per sample, in the main process, whatever the number of DataLoader workers); the scale head's dropout
from torch's generator, which ``seed_epoch`` re-seeds at each epoch, so a fold resumed at epoch E draws
the masks the uninterrupted fold drew there.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def fold_seed(seed: int, fold: int) -> int:
    """The seed of fold ``fold`` of a cross-validation seeded ``seed`` (its weights, order, augmentation, dropout)."""
    return seed * 1000 + fold


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(fold_seed: int, epoch: int) -> None:
    """Seed torch's generators (CPU and CUDA: dropout) for ``epoch`` from the fold's seed and the epoch alone."""
    torch.manual_seed(int(np.random.SeedSequence([fold_seed, epoch]).generate_state(1)[0]))
