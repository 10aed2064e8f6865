"""Streamed per-city sufficient statistics of K members' out-of-fold predictions.

An ensemble predicts, per image i, the height ``h = f * sum_k w_k p_k`` (weights w, city factor f), a
scale ``s_i`` and an angle ``a_i``. Over a set of images with valid true heights ``y``:

- AGL: ``SSE = f^2 w^T P w - 2 f w^T q + sum y^2`` with ``P = sum p p^T`` (K x K) and ``q = sum p y``;
- VFLOW (both components pooled): ``|h s d(a) - y s_t d(a_t)|^2`` summed is
  ``f^2 w^T P_flow w - 2 f w^T q_flow + sum s_t^2 y^2`` with ``P_flow = sum s_i^2 p p^T`` and
  ``q_flow = sum s_i s_t cos(a_i - a_t) p y``;
- the totals of squares come from ``n``, ``sum y``, ``sum y^2``, ``sum s_t y (sin a_t + cos a_t)`` and
  ``sum s_t^2 y^2``.

So for a fixed scale and angle per image, both SSEs are exact quadratics in the height weights with
O(K^2) coefficients per group. The flow coefficients are not separable in the scale and angle weights
(``s_i^2`` is quadratic in them and the circular mean's ``cos(a_i - a_t)`` is not polynomial), so each
scale/angle choice (a *variant*: the fitted one per method, each member alone, the scale model) is
fixed before the pixels are read and gets its own ``P_flow``, ``q_flow``. Sums are kept per
(city, fold) group, so nested fold checks are exact too and memory does not grow with the images.

Two kinds of numbers are read: the per-image scalars of ``index.csv`` with three sums of each truth
map (``ImageTable``: 2K + 9 numbers per image, what the scale and angle fits and the per-image scale
model need), and the per-group pixel statistics (``PixelStatistics``), streamed one image at a time
from memory-mapped arrays. The true heights are the data's truth set (``train/truth.py``), looked up by
sample id, or the first member's ``agl_true.npy`` in folders written by earlier versions.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geopose_mlops.constants import CITIES, R2_EPS
from geopose_mlops.errors import DataError
from geopose_mlops.train.oof import AGL_PRED_NPY, AGL_TRUE_NPY, INDEX_COLUMNS, INDEX_CSV, has_truth_file
from geopose_mlops.train.truth import TruthSet

_SCALARS = ("gsd", "scale_true", "angle_true", "scale_pred", "angle_pred")


@dataclass(frozen=True)
class MemberOof:
    """One member's out-of-fold folders, ``{fold: oof folder}``, and its name (a cv run id)."""

    name: str
    folds: dict[int, Path]


@dataclass
class ImageTable:
    """Per-image scalars of K aligned members (N images), and where each member's arrays are.

    Attributes:
        members: Member names (cv run ids), K.
        sample_ids: (N,) image ids, sorted.
        cities, folds: (N,) city name and fold of each image (the first member's folds).
        gsd: (N,) m/px at the training resolution.
        scale_true, angle_true: (N,) px/m, rad.
        scale_pred, angle_pred: (N, K) the members' scale (px/m) and angle (rad).
        truth_n, truth_sum, truth_sq: (N,) count, sum (m) and sum of squares (m^2) of valid true heights.
        folders: The OOF folders; ``folder_index`` (N, K) points into it and ``rows`` (N, K) is the row there.
        truth: The truth set of the members' data (None: every first-member folder holds its ``agl_true.npy``).
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
    truth_n: np.ndarray
    truth_sum: np.ndarray
    truth_sq: np.ndarray
    folders: list[Path]
    folder_index: np.ndarray
    rows: np.ndarray
    truth: TruthSet | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def flow_sst(self, mask: np.ndarray) -> float:
        """Total sum of squares of the true VFLOW (px^2, both components pooled) over ``mask``'s images."""
        st, at = self.scale_true[mask], self.angle_true[mask]
        total = (self.truth_sum[mask] * st * (np.sin(at) + np.cos(at))).sum()
        n = self.truth_n[mask].sum()
        return float((self.truth_sq[mask] * st**2).sum() - total**2 / (2 * n)) if n else 0.0


def _read_index(folder: Path) -> list[tuple[str, str, int, list[float]]]:
    """``(sample_id, city, row, [gsd, scale_true, angle_true, scale_pred, angle_pred])`` per row."""
    path = folder / INDEX_CSV
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if set(INDEX_COLUMNS) - set(reader.fieldnames or ()):
                raise DataError(path, f"expected columns {','.join(INDEX_COLUMNS)}, got {reader.fieldnames}")
            return [(r["sample_id"], r["city"], int(r["row"]), [float(r[c]) for c in _SCALARS]) for r in reader]
    except (OSError, csv.Error, ValueError) as err:
        raise DataError(path, f"unreadable out-of-fold index ({err})") from err


class _Arrays:
    """Memory-mapped ``agl_pred.npy`` (and an earlier version's ``agl_true.npy``) per folder, opened on first use.

    True heights come from a folder's own ``agl_true.npy`` where it has one, else from the truth set.
    """

    def __init__(self, folders: list[Path], truth: TruthSet | None) -> None:
        self.folders = folders
        self.truth_set = truth
        self.opened: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def _open(self, folder: int) -> tuple[np.ndarray, np.ndarray | None]:
        if folder not in self.opened:
            path = self.folders[folder]
            try:
                truth = np.load(path / AGL_TRUE_NPY, mmap_mode="r") if has_truth_file(path) else None
                self.opened[folder] = (np.load(path / AGL_PRED_NPY, mmap_mode="r"), truth)
            except (OSError, ValueError) as err:
                raise DataError(path, f"unreadable out-of-fold arrays ({err})") from err
        return self.opened[folder]

    def prediction(self, folder: int, row: int) -> np.ndarray:
        """One image's predicted heights as float64, m."""
        return np.asarray(self._open(folder)[0][row], dtype=np.float64)

    def truth(self, folder: int, row: int, sample_id: str) -> np.ndarray:
        """One image's true heights as float64, m, NaN = no data.

        Raises:
            DataError: The folder has no ``agl_true.npy`` and there is no truth set, or it lacks the image.
        """
        own = self._open(folder)[1]
        if own is not None:
            return np.asarray(own[row], dtype=np.float64)
        if self.truth_set is None:
            raise DataError(
                self.folders[folder],
                f"no {AGL_TRUE_NPY}: the truth set of the data the members were trained on is needed",
            )
        return self.truth_set.heights(sample_id).astype(np.float64)


def read_image_table(members: Sequence[MemberOof], truth: TruthSet | None = None) -> ImageTable:
    """Read every member's ``index.csv``, align the members by sample id, and sum each truth map once.

    Arrays are memory-mapped and read one image at a time.

    Args:
        members: The members' OOF folders.
        truth: The truth set of their data (``train/truth.py``); where the first member's folder holds
            an ``agl_true.npy`` (earlier versions) that is read instead.

    Raises:
        DataError: A folder is unreadable, the members do not cover the same images, or the truth of an
            image is in neither place.
    """
    if not members:
        raise DataError(Path("."), "no ensemble members given")
    folders: list[Path] = []
    found: list[dict[str, tuple[int, int, int, str, list[float]]]] = []  # id -> (folder, row, fold, city, scalars)
    for member in members:
        rows: dict[str, tuple[int, int, int, str, list[float]]] = {}
        for fold, folder in sorted(member.folds.items()):
            folders.append(Path(folder))
            for sample_id, city, row, scalars in _read_index(Path(folder)):
                rows[sample_id] = (len(folders) - 1, row, int(fold), city, scalars)
        found.append(rows)
    ids = sorted(found[0])
    for member, rows in zip(members[1:], found[1:], strict=True):
        if rows.keys() != found[0].keys():
            extra, missing = sorted(rows.keys() - found[0].keys()), sorted(found[0].keys() - rows.keys())
            raise DataError(
                Path(member.name),
                f"member {member.name} covers other images than {members[0].name}: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} extra (e.g. {extra[:3]})",
            )
    first = [found[0][i] for i in ids]
    scalars = np.array([[found[m][i][4] for m in range(len(members))] for i in ids]).reshape(len(ids), -1, 5)
    table = ImageTable(
        members=[m.name for m in members],
        sample_ids=ids,
        cities=np.array([f[3] for f in first], dtype=object),
        folds=np.array([f[2] for f in first], dtype=np.int64),
        gsd=scalars[:, 0, 0],
        scale_true=scalars[:, 0, 1],
        angle_true=scalars[:, 0, 2],
        scale_pred=scalars[:, :, 3],
        angle_pred=scalars[:, :, 4],
        truth_n=np.zeros(len(ids)),
        truth_sum=np.zeros(len(ids)),
        truth_sq=np.zeros(len(ids)),
        folders=folders,
        folder_index=np.array([[found[m][i][0] for m in range(len(members))] for i in ids], dtype=np.int64),
        rows=np.array([[found[m][i][1] for m in range(len(members))] for i in ids], dtype=np.int64),
        truth=truth,
    )
    del found, first, scalars
    unknown = sorted(set(table.cities) - set(CITIES))
    if unknown:
        raise DataError(folders[0], f"unknown cities {unknown} in the out-of-fold index; expected {CITIES}")
    arrays = _Arrays(folders, truth)
    for i, sample_id in enumerate(ids):
        y = arrays.truth(table.folder_index[i, 0], table.rows[i, 0], sample_id)
        y = y[np.isfinite(y)]
        table.truth_n[i], table.truth_sum[i], table.truth_sq[i] = y.size, y.sum(), np.square(y).sum()
    return table


@dataclass
class PixelStatistics:
    """Pixel sums of K members per (city, fold) group (G groups) and per scale/angle variant (V).

    Attributes:
        groups: ``(city, fold)`` of each group.
        variants: Variant names, in the order of the first axis of ``flow_gram`` and ``flow_cross``.
        n, sum_y, sum_y2: (G,) truth count, sum (m), sum of squares (m^2).
        flow_sum, flow_sq: (G,) ``sum s_t y (sin a_t + cos a_t)`` (px) and ``sum s_t^2 y^2`` (px^2).
        gram, cross: (G, K, K) ``sum p p^T`` and (G, K) ``sum p y``.
        flow_gram, flow_cross: (V, G, K, K) ``sum s^2 p p^T`` and (V, G, K) ``sum s s_t cos(a - a_t) p y``.
    """

    groups: list[tuple[str, int]]
    variants: list[str]
    n: np.ndarray
    sum_y: np.ndarray
    sum_y2: np.ndarray
    flow_sum: np.ndarray
    flow_sq: np.ndarray
    gram: np.ndarray
    cross: np.ndarray
    flow_gram: np.ndarray
    flow_cross: np.ndarray

    @property
    def group_cities(self) -> np.ndarray:
        """(G,) the city of each group."""
        return np.array([city for city, _ in self.groups], dtype=object)

    @property
    def group_folds(self) -> np.ndarray:
        """(G,) the fold of each group."""
        return np.array([fold for _, fold in self.groups], dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics' arrays, bytes."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


def accumulate_statistics(table: ImageTable, variants: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> PixelStatistics:
    """Stream every member's heights once, one image at a time, into per-(city, fold) sums.

    Args:
        table: The aligned members (``read_image_table``).
        variants: ``{name: (scale (N,) px/m, angle (N,) rad)}``, the per-image scale and angle of each
            ensemble whose VFLOW score will be asked for.
    """
    groups = sorted({(str(c), int(f)) for c, f in zip(table.cities, table.folds, strict=True)})
    group_of = {g: j for j, g in enumerate(groups)}
    k, g, v = len(table.members), len(groups), len(variants)
    names = list(variants)
    scales = np.stack([np.asarray(variants[name][0], np.float64) for name in names]) if v else np.zeros((0, len(table)))
    cosines = (
        np.stack([np.cos(np.asarray(variants[name][1], np.float64) - table.angle_true) for name in names])
        if v
        else np.zeros((0, len(table)))
    )
    stats = PixelStatistics(
        groups=groups,
        variants=names,
        n=np.zeros(g),
        sum_y=np.zeros(g),
        sum_y2=np.zeros(g),
        flow_sum=np.zeros(g),
        flow_sq=np.zeros(g),
        gram=np.zeros((g, k, k)),
        cross=np.zeros((g, k)),
        flow_gram=np.zeros((v, g, k, k)),
        flow_cross=np.zeros((v, g, k)),
    )
    arrays = _Arrays(table.folders, table.truth)
    for i, sample_id in enumerate(table.sample_ids):
        j = group_of[(str(table.cities[i]), int(table.folds[i]))]
        y = arrays.truth(table.folder_index[i, 0], table.rows[i, 0], sample_id)
        valid = np.isfinite(y)
        y = y[valid]
        preds = np.empty((k, y.size))
        for m in range(k):
            pred = arrays.prediction(table.folder_index[i, m], table.rows[i, m])
            if pred.shape != valid.shape:
                raise DataError(
                    table.folders[table.folder_index[i, m]],
                    f"{sample_id}: member {table.members[m]} predicts {pred.shape}, the truth is {valid.shape}",
                )
            preds[m] = np.nan_to_num(pred[valid])
        gram, cross = preds @ preds.T, preds @ y
        st, at = table.scale_true[i], table.angle_true[i]
        stats.n[j] += table.truth_n[i]
        stats.sum_y[j] += table.truth_sum[i]
        stats.sum_y2[j] += table.truth_sq[i]
        stats.flow_sum[j] += table.truth_sum[i] * st * (math.sin(at) + math.cos(at))
        stats.flow_sq[j] += table.truth_sq[i] * st**2
        stats.gram[j] += gram
        stats.cross[j] += cross
        stats.flow_gram[:, j] += scales[:, i, None, None] ** 2 * gram
        stats.flow_cross[:, j] += (scales[:, i] * st * cosines[:, i])[:, None] * cross
    return stats


def circular_mean(angles: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted circular mean along the last axis, rad: ``atan2(sum w sin a, sum w cos a)``.

    ``scipy.stats.circmean`` takes no weights, hence this.
    """
    return np.arctan2(np.sin(angles) @ weights, np.cos(angles) @ weights)


def ensemble_score(
    stats: PixelStatistics,
    variant: str,
    height_weights: np.ndarray,
    group_factors: np.ndarray | Mapping[str, float] | None = None,
    groups: np.ndarray | None = None,
) -> dict:
    """The exact competition score of an ensemble, from the statistics.

    Args:
        stats: Pixel statistics.
        variant: Which per-image scale and angle (a key of ``accumulate_statistics``'s ``variants``).
        height_weights: (K,) weights of the members' heights.
        group_factors: Height multiplier per group (G,) (nested fold checks), or per city (missing: 1).
        groups: (G,) bool, the groups to score (default all).

    Returns:
        ``{"final_score": f, "cities": {CITY: {"score", "agl_r2", "vflow_r2"}}}``.
    """
    w = np.asarray(height_weights, dtype=np.float64)
    cities = stats.group_cities
    if group_factors is None or isinstance(group_factors, Mapping):
        factors = np.array([(group_factors or {}).get(c, 1.0) for c in cities])
    else:
        factors = np.asarray(group_factors, dtype=np.float64)
    j = stats.variants.index(variant)
    sse_agl = factors**2 * np.einsum("k,gkl,l->g", w, stats.gram, w) - 2 * factors * (stats.cross @ w) + stats.sum_y2
    sse_flow = (
        factors**2 * np.einsum("k,gkl,l->g", w, stats.flow_gram[j], w)
        - 2 * factors * (stats.flow_cross[j] @ w)
        + stats.flow_sq
    )
    chosen = np.ones(len(cities), bool) if groups is None else np.asarray(groups, bool)
    result = {}
    for city in CITIES:
        mask = chosen & (cities == city)
        n = stats.n[mask].sum()
        if n == 0:
            continue
        sst_agl = stats.sum_y2[mask].sum() - stats.sum_y[mask].sum() ** 2 / n
        sst_flow = stats.flow_sq[mask].sum() - stats.flow_sum[mask].sum() ** 2 / (2 * n)
        agl_r2 = 1 - sse_agl[mask].sum() / (sst_agl + R2_EPS)
        vflow_r2 = 1 - sse_flow[mask].sum() / (sst_flow + R2_EPS)
        result[city] = {"score": float((agl_r2 + vflow_r2) / 2), "agl_r2": float(agl_r2), "vflow_r2": float(vflow_r2)}
    scores = [c["score"] for c in result.values()]
    return {"final_score": float(np.mean(scores)) if scores else math.nan, "cities": result}
