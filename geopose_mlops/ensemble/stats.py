"""Streamed sufficient statistics of K members' out-of-fold predictions.

The competition score of any ensemble that predicts, per image, height ``f_city * sum_k w_k p_k``, a
scale ``s`` and an angle ``a`` is an exact function of a few numbers per image, whatever its pixels:

- ``n``, ``sum y``, ``sum y^2`` of the valid true heights ``y``;
- ``P = sum p p^T`` (K x K) and ``q = sum p y`` (K) over the valid pixels of the members' heights ``p``.

With ``h = f w^T p``, the AGL error is ``f^2 w^T P w - 2 f w^T q + sum y^2``; the VFLOW error
``sum |h s d(a) - y s_t d(a_t)|^2`` (both components) is
``s^2 f^2 w^T P w - 2 s s_t cos(a - a_t) f w^T q + s_t^2 sum y^2``; and each city's total sums of squares
come from ``n``, ``sum y``, ``sum y^2`` with the true scale and angle. So ``OofStatistics`` reads each
image's arrays once (memory-mapped, one image at a time), keeps these O(K^2) numbers per image, and
everything downstream (weights, city factors, the scale model, nested fold checks) is exact and cheap.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geopose_mlops.constants import CITIES, R2_EPS
from geopose_mlops.errors import DataError
from geopose_mlops.train.oof import AGL_PRED_NPY, AGL_TRUE_NPY, INDEX_CSV


@dataclass(frozen=True)
class MemberOof:
    """One member's out-of-fold folders: ``{fold: oof folder}``, and its name (a cv run id)."""

    name: str
    folds: dict[int, Path]


@dataclass
class OofStatistics:
    """Per-image statistics of K aligned members (N images).

    Attributes:
        members: Member names (cv run ids), K.
        sample_ids: (N,) image ids.
        cities: (N,) city names.
        folds: (N,) fold of each image.
        gsd: (N,) m/px at the training resolution.
        scale_true, angle_true: (N,) px/m, rad.
        scale_pred, angle_pred: (N, K) members' scale (px/m) and angle (rad).
        n, sum_y, sum_y2: (N,) count, sum and sum of squares of the valid true heights (m).
        gram: (N, K, K) ``sum p p^T`` over valid pixels.
        cross: (N, K) ``sum p y`` over valid pixels.
    """

    members: list[str]
    sample_ids: list[str]
    cities: np.ndarray
    folds: np.ndarray
    gsd: np.ndarray
    scale_true: np.ndarray
    angle_true: np.ndarray
    scale_pred: np.ndarray
    angle_pred: np.ndarray
    n: np.ndarray
    sum_y: np.ndarray
    sum_y2: np.ndarray
    gram: np.ndarray
    cross: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, mask: np.ndarray) -> OofStatistics:
        """The statistics of the images where ``mask`` is true."""
        ids = [s for s, keep in zip(self.sample_ids, mask, strict=True) if keep]
        fields = {k: v[mask] for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        return OofStatistics(members=list(self.members), sample_ids=ids, **fields)


def _read_index(folder: Path) -> list[dict[str, str]]:
    try:
        with (folder / INDEX_CSV).open(newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error) as err:
        raise DataError(folder / INDEX_CSV, f"unreadable out-of-fold index ({err})") from err


def _open_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        return np.load(folder / AGL_PRED_NPY, mmap_mode="r"), np.load(folder / AGL_TRUE_NPY, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(folder, f"unreadable out-of-fold arrays ({err})") from err


def collect_statistics(members: Sequence[MemberOof]) -> OofStatistics:
    """Stream the members' OOF files once and return the per-image statistics.

    Every member must predict the same images (the same sample ids, in any order and fold layout);
    the truth is taken from the first member. Arrays are memory-mapped and read one image at a time,
    so memory does not grow with the images' pixels.

    Raises:
        DataError: A folder is unreadable, or the members do not cover the same images.
    """
    if not members:
        raise DataError(Path("."), "no ensemble members given")
    # where[k][sample_id] = (folder, row, index row)
    where: list[dict[str, tuple[Path, int, dict[str, str], int]]] = []
    for member in members:
        found = {}
        for fold, folder in sorted(member.folds.items()):
            for row in _read_index(Path(folder)):
                found[row["sample_id"]] = (Path(folder), int(row["row"]), row, fold)
        where.append(found)
    ids = sorted(where[0])
    for member, found in zip(members[1:], where[1:], strict=True):
        if set(found) != set(ids):
            extra, missing = sorted(set(found) - set(ids)), sorted(set(ids) - set(found))
            raise DataError(
                Path(member.name),
                f"member {member.name} covers other images than {members[0].name}: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} extra (e.g. {extra[:3]})",
            )
    k, n_images = len(members), len(ids)
    arrays: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    stats = OofStatistics(
        members=[m.name for m in members],
        sample_ids=ids,
        cities=np.empty(n_images, dtype=object),
        folds=np.zeros(n_images, dtype=np.int64),
        gsd=np.zeros(n_images),
        scale_true=np.zeros(n_images),
        angle_true=np.zeros(n_images),
        scale_pred=np.zeros((n_images, k)),
        angle_pred=np.zeros((n_images, k)),
        n=np.zeros(n_images),
        sum_y=np.zeros(n_images),
        sum_y2=np.zeros(n_images),
        gram=np.zeros((n_images, k, k)),
        cross=np.zeros((n_images, k)),
    )
    for i, sample_id in enumerate(ids):
        truth_folder, truth_row, index, fold = where[0][sample_id]
        if truth_folder not in arrays:
            arrays[truth_folder] = _open_arrays(truth_folder)
        y = np.asarray(arrays[truth_folder][1][truth_row], dtype=np.float64)
        valid = np.isfinite(y)
        y = y[valid]
        preds = np.empty((k, y.size))
        for m, found in enumerate(where):
            folder, row, member_index, _ = found[sample_id]
            if folder not in arrays:
                arrays[folder] = _open_arrays(folder)
            pred = np.asarray(arrays[folder][0][row], dtype=np.float64)
            if pred.shape != valid.shape:
                raise DataError(folder, f"{sample_id}: member {m} predicts {pred.shape}, truth is {valid.shape}")
            preds[m] = np.nan_to_num(pred[valid])
            stats.scale_pred[i, m] = float(member_index["scale_pred"])
            stats.angle_pred[i, m] = float(member_index["angle_pred"])
        stats.cities[i] = index["city"]
        stats.folds[i] = fold
        stats.gsd[i] = float(index["gsd"])
        stats.scale_true[i] = float(index["scale_true"])
        stats.angle_true[i] = float(index["angle_true"])
        stats.n[i], stats.sum_y[i], stats.sum_y2[i] = y.size, y.sum(), np.square(y).sum()
        stats.gram[i] = preds @ preds.T
        stats.cross[i] = preds @ y
    return stats


def circular_mean(angles: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted circular mean along the last axis: ``atan2(sum w sin a, sum w cos a)``.

    ``scipy.stats.circmean`` takes no weights, hence this.
    """
    return np.arctan2(np.sin(angles) @ weights, np.cos(angles) @ weights)


def ensemble_score(
    stats: OofStatistics,
    height_weights: np.ndarray,
    scale: np.ndarray,
    angle: np.ndarray,
    city_factors: dict[str, float] | None = None,
    image_factors: np.ndarray | None = None,
) -> dict:
    """The exact competition score of an ensemble on the OOF images.

    Args:
        stats: Per-image statistics.
        height_weights: (K,) weights of the members' heights.
        scale: (N,) the ensemble's scale per image, px/m.
        angle: (N,) the ensemble's angle per image, rad.
        city_factors: Height multiplier per city (missing cities: 1).
        image_factors: (N,) height multiplier per image, instead of ``city_factors`` (nested checks).

    Returns:
        ``{"final_score": f, "cities": {CITY: {"score", "agl_r2", "vflow_r2"}}}``.
    """
    w = np.asarray(height_weights, dtype=np.float64)
    if image_factors is not None:
        factors = np.asarray(image_factors, dtype=np.float64)
    else:
        factors = np.array([(city_factors or {}).get(c, 1.0) for c in stats.cities])
    quad = np.einsum("k,nkl,l->n", w, stats.gram, w) * factors**2
    lin = (stats.cross @ w) * factors
    sse_agl = quad - 2 * lin + stats.sum_y2
    st = stats.scale_true
    sse_flow = scale**2 * quad - 2 * scale * st * np.cos(angle - stats.angle_true) * lin + st**2 * stats.sum_y2
    flow_sum = stats.sum_y * st * (np.sin(stats.angle_true) + np.cos(stats.angle_true))
    flow_sq = stats.sum_y2 * st**2
    cities = {}
    for city in CITIES:
        mask = stats.cities == city
        if not mask.any() or stats.n[mask].sum() == 0:
            continue
        n = stats.n[mask].sum()
        sst_agl = stats.sum_y2[mask].sum() - stats.sum_y[mask].sum() ** 2 / n
        sst_flow = flow_sq[mask].sum() - flow_sum[mask].sum() ** 2 / (2 * n)
        agl_r2 = 1 - sse_agl[mask].sum() / (sst_agl + R2_EPS)
        vflow_r2 = 1 - sse_flow[mask].sum() / (sst_flow + R2_EPS)
        cities[city] = {"score": (agl_r2 + vflow_r2) / 2, "agl_r2": agl_r2, "vflow_r2": vflow_r2}
    scores = [c["score"] for c in cities.values()]
    return {"final_score": float(np.mean(scores)) if scores else math.nan, "cities": cities}
