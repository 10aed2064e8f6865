"""The truth set: the true heights of a data set's training images, kept once per data fingerprint.

Every architecture trained on the same data is scored against the same true heights, so a fold run's
``oof/`` holds its predictions only (``train/oof.py``) and the truth is kept once per data fingerprint
(the cache fingerprint, which includes the image size): in the preprocessing cache where it is on this
machine, else in the ``truth/`` artifact of that data's ``data`` run (``tracking/truth.py``). The
``truth/`` folder, at the training resolution:

- ``index.csv``: ``row,sample_id`` (row = position in the array), every training image of the cache.
- ``agl_true.npy``: float16 (N, S, S) metres, NaN = no data.

The heights are the cache's float32 values rounded to float16 (round to nearest even), exactly what the
fold runs validated on and what earlier versions stored as ``oof/agl_true.npy``, so scores recomputed
against the truth set equal the logged ones.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from geopose_mlops.data.cache import SampleCache
from geopose_mlops.data.io import atomic_path
from geopose_mlops.errors import DataError

TRUTH_DIR = "truth"  # artifact folder of a data run
TRUTH_INDEX_CSV = "index.csv"
TRUTH_NPY = "agl_true.npy"
_WRITE_ROWS = 64  # images converted per step when a truth folder is written (64 x 1024² x 6 B = 400 MB)


@dataclass(frozen=True)
class TruthSet:
    """True heights of N training images of side S, by sample id, memory-mapped.

    Attributes:
        source: The cache entry or ``truth/`` folder the heights are read from (named in errors).
        ids: Sample id of each row.
        agl: (N, S, S) metres, NaN = no data: the cache's float32 or a truth folder's float16 values.
    """

    source: Path
    ids: list[str]
    agl: np.ndarray
    _rows: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rows", {sample_id: row for row, sample_id in enumerate(self.ids)})

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._rows

    @property
    def image_size(self) -> int:
        """Side S of the images, pixels."""
        return int(self.agl.shape[-1])

    def heights(self, sample_id: str) -> np.ndarray:
        """One image's true heights, float16 (S, S) m, NaN = no data.

        Raises:
            DataError: The truth set has no such image.
        """
        row = self._rows.get(sample_id)
        if row is None:
            raise DataError(self.source, f"no true heights of {sample_id} here (the truth of other data?)")
        return np.asarray(self.agl[row]).astype(np.float16)

    def stack(self, sample_ids: Iterable[str]) -> np.ndarray:
        """The true heights of several images, float16 (n, S, S) m, in the order given.

        Raises:
            DataError: Some images are not in the truth set (they are counted and the first named).
        """
        sample_ids = list(sample_ids)
        missing = [s for s in sample_ids if s not in self._rows]
        if missing:
            raise DataError(
                self.source,
                f"no true heights of {len(missing)} image(s), e.g. {missing[:3]} (the truth of other data?)",
            )
        out = np.empty((len(sample_ids), *self.agl.shape[1:]), dtype=np.float16)
        for i, sample_id in enumerate(sample_ids):
            out[i] = self.agl[self._rows[sample_id]]
        return out

    @classmethod
    def from_cache(cls, cache: SampleCache) -> TruthSet:
        """The truth set of a cache entry, read from its memory-mapped ``agl.npy`` (nothing is copied)."""
        return cls(source=cache.path, ids=list(cache.ids), agl=cache.agl)

    @classmethod
    def open(cls, folder: str | Path) -> TruthSet:
        """Open a ``truth/`` folder written by :meth:`save` (the array memory-mapped).

        Raises:
            DataError: A file is missing or unreadable, or the index and the array disagree.
        """
        folder = Path(folder)
        try:
            with (folder / TRUTH_INDEX_CSV).open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            agl = np.load(folder / TRUTH_NPY, mmap_mode="r")
            ids = [row["sample_id"] for row in sorted(rows, key=lambda r: int(r["row"]))]
        except (OSError, ValueError, KeyError, csv.Error) as err:
            raise DataError(folder, f"not a readable truth/ folder ({err})") from err
        if agl.ndim != 3 or len(agl) != len(ids):
            raise DataError(folder, f"{TRUTH_INDEX_CSV} has {len(ids)} rows but {TRUTH_NPY} is {agl.shape}")
        return cls(source=folder, ids=ids, agl=agl)

    def save(self, folder: str | Path) -> Path:
        """Write ``index.csv`` and float16 ``agl_true.npy`` into ``folder`` (created), each atomically.

        The array is written through a memory map a few images at a time, so memory stays flat however
        many images there are. Returns the folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / TRUTH_NPY) as tmp:
            out = open_memmap(tmp, mode="w+", dtype=np.float16, shape=self.agl.shape)
            for start in range(0, len(self), _WRITE_ROWS):
                out[start : start + _WRITE_ROWS] = np.asarray(self.agl[start : start + _WRITE_ROWS]).astype(np.float16)
            out.flush()
            del out  # closes the map before the rename
        with atomic_path(folder / TRUTH_INDEX_CSV) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("row", "sample_id"))
            writer.writerows(enumerate(self.ids))
        return folder
