"""The competition's score (SPEC §1), from running sums, for training validation and ``evaluate``.

Per city, R² pools every valid pixel of every image: ``R2 = 1 - SSE / (SST + 1e-4)``. AGL and VFLOW
(``agl * scale * (sin a, cos a)``, both components pooled) each give one R²; the city's score is their
mean and the final score the mean over cities present. Each image is folded into per-city running
sums with Chan's parallel-variance update (each image's own mean and squared deviations are combined
exactly), so the total is computed in one pass over the files and matches the two-pass definition to
rounding error, without holding more than one image in memory.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from geopose_mlops.constants import AGL_TAG, CITIES, R2_EPS, VFLOW_TAG
from geopose_mlops.data import io
from geopose_mlops.data.layout import split_name
from geopose_mlops.errors import DataError


@dataclass
class PooledR2:
    """Running sums for a pooled R²: count, mean, sum of squared deviations, sum of squared errors."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    sse: float = 0.0

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """Fold in paired values (any shape; already restricted to valid pixels)."""
        truth = np.asarray(truth, dtype=np.float64).ravel()
        pred = np.asarray(pred, dtype=np.float64).ravel()
        count = truth.size
        if count == 0:
            return
        batch_mean = float(truth.mean())
        batch_m2 = float(np.square(truth - batch_mean).sum())
        total = self.n + count
        delta = batch_mean - self.mean
        self.mean += delta * count / total
        self.m2 += batch_m2 + delta * delta * self.n * count / total
        self.n = total
        self.sse += float(np.square(pred - truth).sum())

    @property
    def r2(self) -> float:
        """1 - SSE / (SST + 1e-4), as the competition's scorer computes it; NaN with no values."""
        return 1.0 - self.sse / (self.m2 + R2_EPS) if self.n else math.nan


def angle_error_deg(pred_rad: float, true_rad: float) -> float:
    """Absolute angular difference in degrees, wrapped to [0, 180]."""
    diff = math.remainder(pred_rad - true_rad, 2 * math.pi)
    return abs(math.degrees(diff))


def flow_field(agl_m: np.ndarray, scale_px_per_m: float, angle_rad: float) -> np.ndarray:
    """VFLOW in pixels, shape (..., 2): magnitude ``agl * scale`` along ``(sin a, cos a)``."""
    mag = np.asarray(agl_m, dtype=np.float64) * scale_px_per_m
    return np.stack([mag * math.sin(angle_rad), mag * math.cos(angle_rad)], axis=-1)


@dataclass
class CityAccumulator:
    """Everything SPEC §1 reports for one city, as running sums."""

    agl: PooledR2 = field(default_factory=PooledR2)
    vflow: PooledR2 = field(default_factory=PooledR2)
    mag_sse: float = 0.0
    images: int = 0
    angle_error_sum: float = 0.0
    scale_abs_sum: float = 0.0
    scale_sq_sum: float = 0.0

    def summary(self) -> dict[str, float]:
        """The city's score, R², RMSEs (m, px), mean angle error (deg) and scale errors (px/m)."""
        pixels = max(self.agl.n, 1)
        images = max(self.images, 1)
        agl_r2, vflow_r2 = self.agl.r2, self.vflow.r2
        return {
            "score": (agl_r2 + vflow_r2) / 2,
            "agl_r2": agl_r2,
            "vflow_r2": vflow_r2,
            "agl_rmse": math.sqrt(self.agl.sse / pixels),
            "mag_rmse": math.sqrt(self.mag_sse / pixels),
            "epe_rmse": math.sqrt(self.vflow.sse / pixels),
            "angle_error_deg": self.angle_error_sum / images,
            "scale_error": self.scale_abs_sum / images,
            "scale_rmse": math.sqrt(self.scale_sq_sum / images),
            "images": float(self.images),
            "pixels": float(self.agl.n),
        }


class NoTruthWarning(UserWarning):
    """An image whose AGL truth is no-data everywhere was left out of the pixel scores."""


class GeoposeMetric:
    """Accumulates the competition score image by image; ``compute`` gives per-city and final values."""

    def __init__(self) -> None:
        self.cities: dict[str, CityAccumulator] = {}
        self.skipped: list[str] = []

    def update(
        self,
        city: str,
        agl_pred: np.ndarray,
        agl_true: np.ndarray,
        scale_pred: float,
        angle_pred: float,
        scale_true: float,
        angle_true: float,
        sample_id: str = "",
    ) -> None:
        """Fold one image in.

        Args:
            city: The image's city (one of CITIES).
            agl_pred: Predicted height, metres (H, W).
            agl_true: True height, metres (H, W); NaN pixels are left out.
            scale_pred: Predicted scale, pixels per metre.
            angle_pred: Predicted angle, radians.
            scale_true: True scale, pixels per metre.
            angle_true: True angle, radians.
            sample_id: Used only to report images skipped for having no valid pixel.
        """
        if city not in CITIES:
            raise ValueError(f"city must be one of {CITIES}, got {city!r}")
        agl_pred = np.asarray(agl_pred)
        agl_true = np.asarray(agl_true)
        if agl_pred.shape != agl_true.shape:
            raise ValueError(f"{sample_id}: prediction shape {agl_pred.shape} != truth shape {agl_true.shape}")
        valid = np.isfinite(agl_true)
        acc = self.cities.setdefault(city, CityAccumulator())
        acc.images += 1
        acc.angle_error_sum += angle_error_deg(angle_pred, angle_true)
        acc.scale_abs_sum += abs(scale_pred - scale_true)
        acc.scale_sq_sum += (scale_pred - scale_true) ** 2
        if not valid.any():
            # Its R2 terms would be 0/0; it still counts for the angle and scale errors.
            self.skipped.append(sample_id)
            warnings.warn(
                f"{sample_id or 'an image'} ({city}): every AGL pixel is no-data; left out of the AGL and VFLOW "
                "R2 and RMSE",
                NoTruthWarning,
                stacklevel=2,
            )
            return
        true_h = agl_true[valid].astype(np.float64)
        pred_h = np.nan_to_num(agl_pred[valid].astype(np.float64))
        acc.agl.update(true_h, pred_h)
        acc.mag_sse += float(np.square(pred_h * scale_pred - true_h * scale_true).sum())
        acc.vflow.update(flow_field(true_h, scale_true, angle_true), flow_field(pred_h, scale_pred, angle_pred))

    def compute(self) -> dict:
        """``{"final_score": f, "cities": {CITY: {"score", "agl_r2", "vflow_r2", ...}}}`` (SPEC §3)."""
        cities = {city: self.cities[city].summary() for city in CITIES if city in self.cities}
        scores = [c["score"] for c in cities.values() if not math.isnan(c["score"])]
        final = float(np.mean(scores)) if scores else math.nan
        return {"final_score": final, "cities": cities}


def _truth_files(truth_dir: Path) -> dict[str, dict[str, Path]]:
    truth: dict[str, dict[str, Path]] = {}
    for path in sorted(truth_dir.iterdir()):
        try:
            sample_id, _, tag = split_name(path.name)
        except ValueError:
            continue
        if tag in (AGL_TAG, VFLOW_TAG) and not path.name.startswith("."):
            truth.setdefault(sample_id, {})[tag] = path
    return truth


def evaluate_folder(predictions_dir: str | Path, truth_dir: str | Path, progress: bool = True) -> dict:
    """Score a submission folder against a folder of true ``_AGL.tif`` and ``_VFLOW.json`` files.

    Both folders use the competition's names; every truth image must have a prediction.

    Raises:
        DataError: A prediction is missing (all missing ids are named) or a file is unreadable.
    """
    predictions_dir, truth_dir = Path(predictions_dir), Path(truth_dir)
    for folder in (predictions_dir, truth_dir):
        if not folder.is_dir():
            raise DataError(folder, "not a directory")
    truth = {k: v for k, v in _truth_files(truth_dir).items() if AGL_TAG in v and VFLOW_TAG in v}
    if not truth:
        raise DataError(truth_dir, "no {CITY}_{id}_AGL.tif with _VFLOW.json found")
    missing = [
        name
        for sample_id, files in truth.items()
        for name in (files[AGL_TAG].name, files[VFLOW_TAG].name)
        if not (predictions_dir / name).is_file()
    ]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(predictions_dir, f"{len(missing)} prediction file(s) missing: {shown}")
    metric = GeoposeMetric()
    for sample_id, files in tqdm(truth.items(), desc="evaluate", disable=not progress, unit="image"):
        agl_true = io.read_agl(files[AGL_TAG])
        scale_true, angle_true = io.read_vflow(files[VFLOW_TAG])
        pred_agl_path = predictions_dir / files[AGL_TAG].name
        agl_pred = io.read_agl(pred_agl_path)
        if agl_pred.shape != agl_true.shape:
            raise DataError(pred_agl_path, f"size {agl_pred.shape} differs from the truth's {agl_true.shape}")
        scale_pred, angle_pred = io.read_vflow(predictions_dir / files[VFLOW_TAG].name)
        metric.update(
            sample_id.split("_")[0], agl_pred, agl_true, scale_pred, angle_pred, scale_true, angle_true, sample_id
        )
    return metric.compute()


def write_scores_json(scores: dict, path: str | Path) -> None:
    """Write the ``evaluate --output-json`` document (SPEC §3)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(scores, indent=2, sort_keys=True))
