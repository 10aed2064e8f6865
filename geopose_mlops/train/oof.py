"""Out-of-fold predictions: the best epoch's predictions for a fold's validation images.

The ``oof/`` folder of a fold run (docs/ARCHITECTURE.md), at the training resolution:

- ``index.csv``: ``row,sample_id,city,gsd,scale_true,angle_true,scale_pred,angle_pred`` (row = position
  in the arrays; scale px/m; angle rad; gsd m/px).
- ``agl_pred.npy``: float16 (N, S, S) metres.

The true heights are not stored again by every fold run of every architecture: they are the truth set of
the data (``train/truth.py``), looked up by sample id when a folder is loaded. Folders written by earlier
versions also hold ``agl_true.npy`` (float16 (N, S, S) m, NaN = no data); where it is present it is read
instead. Both hold the same float16 values, and scores are always computed from the float16 values as
stored, so a score logged during training equals one recomputed from the files.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geopose_mlops.data.io import atomic_path
from geopose_mlops.errors import DataError
from geopose_mlops.metrics import GeoposeMetric
from geopose_mlops.train.truth import TruthSet

INDEX_CSV = "index.csv"
AGL_PRED_NPY = "agl_pred.npy"
AGL_TRUE_NPY = "agl_true.npy"  # only in folders written by earlier versions (or ``save(with_truth=True)``)
INDEX_COLUMNS = ("row", "sample_id", "city", "gsd", "scale_true", "angle_true", "scale_pred", "angle_pred")


@dataclass
class OofPredictions:
    """Predictions and truth for N validation images of side S.

    Attributes:
        sample_ids: ``JAX_abc`` per image.
        cities: City name per image.
        gsd: (N,) m/px at the training resolution.
        scale_true: (N,) px/m.
        angle_true: (N,) rad.
        scale_pred: (N,) px/m.
        angle_pred: (N,) rad.
        agl_pred: float16 (N, S, S) m.
        agl_true: float16 (N, S, S) m, NaN = no data (the truth set's values; ``save`` stores them only
            ``with_truth``).
    """

    sample_ids: list[str]
    cities: list[str]
    gsd: np.ndarray
    scale_true: np.ndarray
    angle_true: np.ndarray
    scale_pred: np.ndarray
    angle_pred: np.ndarray
    agl_pred: np.ndarray
    agl_true: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_ids)

    def update_metric(self, metric: GeoposeMetric) -> GeoposeMetric:
        """Fold every image into ``metric`` (float16 heights as stored) and return it."""
        for i, sample_id in enumerate(self.sample_ids):
            metric.update(
                self.cities[i],
                self.agl_pred[i].astype(np.float32),
                self.agl_true[i].astype(np.float32),
                float(self.scale_pred[i]),
                float(self.angle_pred[i]),
                float(self.scale_true[i]),
                float(self.angle_true[i]),
                sample_id,
            )
        return metric

    def score(self) -> dict:
        """``GeoposeMetric.compute()`` over these predictions."""
        return self.update_metric(GeoposeMetric()).compute()

    def save(self, folder: str | Path, *, with_truth: bool = False) -> Path:
        """Write ``index.csv`` and ``agl_pred.npy`` into ``folder`` (created), each atomically; returns the folder.

        Args:
            folder: The ``oof/`` folder.
            with_truth: Write ``agl_true.npy`` too, as earlier versions did (a self-contained folder).
                Without it any ``agl_true.npy`` left there is removed: the truth set is what it is read with.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = [(AGL_PRED_NPY, self.agl_pred)] + ([(AGL_TRUE_NPY, self.agl_true)] if with_truth else [])
        for name, array in arrays:
            with atomic_path(folder / name) as tmp, tmp.open("wb") as handle:
                np.save(handle, np.asarray(array, dtype=np.float16))
        if not with_truth:
            (folder / AGL_TRUE_NPY).unlink(missing_ok=True)
        with atomic_path(folder / INDEX_CSV) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(INDEX_COLUMNS)
            for i, sample_id in enumerate(self.sample_ids):
                writer.writerow(
                    [i, sample_id, self.cities[i]]
                    + [repr(float(a[i])) for a in (self.gsd, self.scale_true, self.angle_true)]
                    + [repr(float(a[i])) for a in (self.scale_pred, self.angle_pred)]
                )
        return folder

    @classmethod
    def load(cls, folder: str | Path, truth: TruthSet | None = None) -> OofPredictions:
        """Read an ``oof/`` folder written by ``save``, with its true heights.

        Args:
            folder: The ``oof/`` folder.
            truth: The truth set of the data it was trained on; the folder's own ``agl_true.npy`` is read
                instead where there is one (folders of earlier versions).

        Raises:
            DataError: A file is missing or unreadable, the index and arrays disagree in length, or the
                folder has no ``agl_true.npy`` and ``truth`` is None or lacks some of its images.
        """
        folder = Path(folder)
        index_path = folder / INDEX_CSV
        try:
            with index_path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            names = (AGL_PRED_NPY, AGL_TRUE_NPY) if has_truth_file(folder) else (AGL_PRED_NPY,)
            arrays = [np.load(folder / name) for name in names]
        except (OSError, ValueError, csv.Error) as err:
            raise DataError(folder, f"not a readable oof/ folder ({err})") from err
        if rows and set(INDEX_COLUMNS) - set(rows[0]):
            raise DataError(index_path, f"expected columns {','.join(INDEX_COLUMNS)}")
        if len(arrays) == 1:
            if truth is None:
                raise DataError(folder, f"no {AGL_TRUE_NPY}: the truth set of the data it was trained on is needed")
            arrays.append(truth.stack(r["sample_id"] for r in rows))
        if any(len(a) != len(rows) for a in arrays):
            raise DataError(folder, f"index.csv has {len(rows)} rows but the arrays hold {[len(a) for a in arrays]}")

        def column(name: str) -> np.ndarray:
            return np.array([float(r[name]) for r in rows], dtype=np.float64)

        return cls(
            sample_ids=[r["sample_id"] for r in rows],
            cities=[r["city"] for r in rows],
            gsd=column("gsd"),
            scale_true=column("scale_true"),
            angle_true=column("angle_true"),
            scale_pred=column("scale_pred"),
            angle_pred=column("angle_pred"),
            agl_pred=arrays[0],
            agl_true=arrays[1],
        )


def has_truth_file(folder: str | Path) -> bool:
    """Whether an ``oof/`` folder holds its own ``agl_true.npy`` (written by earlier versions)."""
    return (Path(folder) / AGL_TRUE_NPY).is_file()


def score_oof_folders(folders: Iterable[str | Path], truth: TruthSet | None = None) -> dict:
    """One ``GeoposeMetric`` over every image of several ``oof/`` folders (the parent's ``cv_score``).

    Args:
        folders: The folds' ``oof/`` folders.
        truth: The truth set of their data (not needed where every folder holds its ``agl_true.npy``).
    """
    metric = GeoposeMetric()
    for folder in folders:
        OofPredictions.load(folder, truth).update_metric(metric)
    return metric.compute()
