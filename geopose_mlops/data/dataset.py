"""A torch Dataset over the preprocessing cache (``data/cache.py``) that yields batch dicts.

Each item is a dict keyed by the names in ``constants`` (units as written there): IMAGE float32
(3, S, S) in [0, 1], AGL float32 (S, S) m with NaN = no data, MAG = AGL x SCALE px (NaN where AGL is),
XYDIR (sin, cos) of ANGLE, ANGLE rad, SCALE px/m, GSD m/px, CITY int64 index into CITIES and SAMPLE_ID.
The default collate function stacks them into batches (SAMPLE_ID becomes a list of strings).

Rows are read from the memory-mapped cache arrays on demand and copied, so DataLoader workers share
the page cache rather than pickled copies of the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from geopose_mlops.constants import AGL, ANGLE, CITY, GSD, IMAGE, MAG, SAMPLE_ID, SCALE, XYDIR

# An augmentation takes and returns a sample dict of numpy values: IMAGE uint8 (H, W, 3), AGL float32
# (H, W) m, and SCALE px/m, ANGLE rad, GSD m/px as floats; geometry moves angle, scale and gsd with it.
Augmentation = Callable[[dict[str, Any]], dict[str, Any]]


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

    def __getitem__(self, position: int) -> dict[str, Any]:
        sample = self.raw_sample(position)
        if self.augmentation is not None:
            sample = self.augmentation(sample)
        return to_tensors(sample)


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
