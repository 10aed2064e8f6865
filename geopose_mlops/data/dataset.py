"""A torch Dataset over the preprocessing cache (``data/cache.py``) that yields batch dicts.

Each item is a dict keyed by the names in ``constants`` (units as written there): IMAGE float32
(3, S, S) in [0, 1], AGL float32 (S, S) m with NaN = no data, MAG = AGL x SCALE px (NaN where AGL is),
XYDIR (sin, cos) of ANGLE, ANGLE rad, SCALE px/m, GSD m/px, CITY int64 index into CITIES and SAMPLE_ID.
The default collate function stacks them into batches (SAMPLE_ID becomes a list of strings).

Rows are read from the memory-mapped cache arrays on demand and copied, so DataLoader workers share
the page cache rather than pickled copies of the data.

Reproducible augmentation with any number of (persistent) workers: ``EpochSampler`` runs in the main
process and yields ``(position, item_seed)`` pairs, the seed depending only on the run's seed, the epoch
and the position, and the dataset re-seeds the augmentation with it before each sample. A resumed run
therefore sees exactly the images and augmentations the uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from geopose_mlops.constants import AGL, ANGLE, CITY, GSD, IMAGE, MAG, SAMPLE_ID, SCALE, XYDIR


class Augmentation(Protocol):
    """``data/augment.py``'s training augmentation: geometry moves angle, scale and gsd with the image."""

    def __call__(
        self, rgb: np.ndarray, agl: np.ndarray, angle: float, scale: float, gsd: float
    ) -> tuple[np.ndarray, np.ndarray, float, float, float]:
        """Augment: rgb uint8 (H, W, 3), agl float32 (H, W) m, angle rad, scale px/m, gsd m/px -> same five."""

    def set_seed(self, seed: int | None) -> None:
        """Re-seed every random choice."""


class GeoposeDataset(Dataset):
    """Rows of a SampleCache as training or validation samples.

    Args:
        cache: A ``SampleCache`` (arrays ``rgb``, ``agl``, ``scale``, ``angle``, ``gsd``, ``city_index``
            and the list ``ids``).
        indices: Rows of the cache to serve, in order (e.g. one fold's training rows).
        augmentation: Applied to each sample before it becomes tensors (None: none, for validation).
    """

    def __init__(self, cache: Any, indices: Sequence[int], augmentation: Augmentation | None = None) -> None:
        self.cache = cache
        self.indices = [int(i) for i in indices]
        self.augmentation = augmentation
        rows = len(cache.ids)
        bad = [i for i in self.indices if not 0 <= i < rows]
        if bad:
            raise IndexError(f"cache rows {bad[:5]} out of range: the cache holds {rows} samples")

    def __len__(self) -> int:
        return len(self.indices)

    def raw_sample(self, position: int) -> dict[str, Any]:
        """The un-augmented numpy sample at ``position`` (an index into ``indices``)."""
        row = self.indices[position]
        cache = self.cache
        return {
            IMAGE: np.array(cache.rgb[row], dtype=np.uint8),
            AGL: np.array(cache.agl[row], dtype=np.float32),
            SCALE: float(cache.scale[row]),
            ANGLE: float(cache.angle[row]),
            GSD: float(cache.gsd[row]),
            CITY: int(cache.city_index[row]),
            SAMPLE_ID: str(cache.ids[row]),
        }

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        """A sample by position, or by ``(position, seed)`` as ``EpochSampler`` yields them."""
        position, seed = item if isinstance(item, tuple) else (item, None)
        sample = self.raw_sample(position)
        if self.augmentation is not None:
            if seed is not None:
                self.augmentation.set_seed(seed)
            rgb, agl, angle, scale, gsd = self.augmentation(
                sample[IMAGE], sample[AGL], sample[ANGLE], sample[SCALE], sample[GSD]
            )
            sample.update({IMAGE: rgb, AGL: agl, ANGLE: angle, SCALE: scale, GSD: gsd})
        return to_tensors(sample)


class EpochSampler(Sampler):
    """Positions in a seeded order per epoch, each paired with a seed for its augmentation.

    Args:
        size: Number of samples.
        seed: The run's seed.
        shuffle: Permute the positions each epoch (else in order).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order and seeds of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        seeds = rng.integers(0, 2**31 - 1, size=self.size)
        return iter([(int(p), int(seeds[p])) for p in order])


def to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    """Turn a numpy sample dict into the tensors of a batch item (adds MAG and XYDIR)."""
    image = np.ascontiguousarray(sample[IMAGE]).transpose(2, 0, 1).astype(np.float32) / 255.0
    agl = np.ascontiguousarray(sample[AGL], dtype=np.float32)
    scale, angle = float(sample[SCALE]), float(sample[ANGLE])
    return {
        IMAGE: torch.from_numpy(np.ascontiguousarray(image)),
        AGL: torch.from_numpy(agl),
        # NaN * scale stays NaN, so the no-data mask carries over to the magnitude.
        MAG: torch.from_numpy(agl * np.float32(scale)),
        XYDIR: torch.tensor([math.sin(angle), math.cos(angle)], dtype=torch.float32),
        ANGLE: torch.tensor(angle, dtype=torch.float32),
        SCALE: torch.tensor(scale, dtype=torch.float32),
        GSD: torch.tensor(float(sample[GSD]), dtype=torch.float32),
        CITY: torch.tensor(int(sample[CITY]), dtype=torch.int64),
        SAMPLE_ID: sample[SAMPLE_ID],
    }
