"""Out-of-fold predictions: the best epoch's predictions for a fold's validation images.

The ``oof/`` folder of a fold run (docs/ARCHITECTURE.md), at the training resolution:

- ``index.csv``: ``row,sample_id,city,gsd,scale_true,angle_true,scale_pred,angle_pred`` (row = position
  in the arrays; scale px/m; angle rad; gsd m/px).
- ``agl_pred.npy``: float16 (N, S, S) metres.
- ``agl_true.npy``: float16 (N, S, S) metres, NaN = no data.

Scores are always computed from the float16 values as stored, so a score logged during training equals
one recomputed from the files.
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

INDEX_CSV = "index.csv"
AGL_PRED_NPY = "agl_pred.npy"
AGL_TRUE_NPY = "agl_true.npy"
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
        agl_true: float16 (N, S, S) m, NaN = no data.
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

    def save(self, folder: str | Path) -> Path:
        """Write the three files into ``folder`` (created), each atomically; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in ((AGL_PRED_NPY, self.agl_pred), (AGL_TRUE_NPY, self.agl_true)):
            with atomic_path(folder / name) as tmp, tmp.open("wb") as handle:
                np.save(handle, np.asarray(array, dtype=np.float16))
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
    def load(cls, folder: str | Path) -> OofPredictions:
        """Read an ``oof/`` folder written by ``save``.

        Raises:
            DataError: A file is missing, unreadable, or the index and arrays disagree in length.
        """
        folder = Path(folder)
        index_path = folder / INDEX_CSV
        try:
            with index_path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            arrays = [np.load(folder / name) for name in (AGL_PRED_NPY, AGL_TRUE_NPY)]
        except (OSError, ValueError, csv.Error) as err:
            raise DataError(folder, f"not a readable oof/ folder ({err})") from err
        if rows and set(INDEX_COLUMNS) - set(rows[0]):
            raise DataError(index_path, f"expected columns {','.join(INDEX_COLUMNS)}")
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


def score_oof_folders(folders: Iterable[str | Path]) -> dict:
    """One ``GeoposeMetric`` over every image of several ``oof/`` folders (the parent's ``cv_score``)."""
    metric = GeoposeMetric()
    for folder in folders:
        OofPredictions.load(folder).update_metric(metric)
    return metric.compute()
