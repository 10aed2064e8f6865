"""k cross-validation folds stratified by city, written as ``folds.csv`` (id,city,fold).

Each city's images are shuffled with the seed and dealt round-robin, starting at the fold that has
received the fewest images so far, so every city's count per fold differs by at most one and the
fold sizes overall stay within one image of each other.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from geopose_mlops.constants import CITIES
from geopose_mlops.data import io
from geopose_mlops.data.layout import Sample, read_csv_rows
from geopose_mlops.errors import DataError

FOLDS_HEADER = ("id", "city", "fold")


def make_folds(samples: Iterable[Sample | tuple[str, str]], k: int, seed: int) -> list[tuple[str, str, int]]:
    """Assign each sample to one of ``k`` folds, stratified by city.

    Args:
        samples: Samples, or ``(sample_id, city)`` pairs.
        k: Number of folds (>= 2).
        seed: Seed of the shuffle; the same seed gives the same folds.

    Returns:
        ``(sample_id, city, fold)`` rows sorted by sample id.

    Raises:
        ValueError: k < 2, fewer samples than folds, or a sample id appears twice.
    """
    pairs = [(s.sample_id, s.city) if isinstance(s, Sample) else (str(s[0]), str(s[1])) for s in samples]
    if k < 2:
        raise ValueError(f"k must be at least 2 folds, got {k}")
    if len(pairs) < k:
        raise ValueError(f"{len(pairs)} sample(s) cannot fill {k} folds")
    ids = [sample_id for sample_id, _ in pairs]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"sample id(s) appear more than once: {duplicates[:10]}")
    rng = np.random.default_rng(seed)
    fold_sizes = np.zeros(k, dtype=np.int64)
    rows = []
    by_city: dict[str, list[str]] = {}
    for sample_id, city in sorted(pairs):
        by_city.setdefault(city, []).append(sample_id)
    for city in sorted(by_city, key=lambda c: (CITIES.index(c) if c in CITIES else len(CITIES), c)):
        members = by_city[city]
        order = rng.permutation(len(members))
        # Deal round-robin over folds ordered smallest first (ties broken by a seeded shuffle).
        folds = sorted(rng.permutation(k), key=lambda f: fold_sizes[f])
        for position, index in enumerate(order):
            fold = int(folds[position % k])
            rows.append((members[index], city, fold))
            fold_sizes[fold] += 1
    return sorted(rows)


def write_folds(path: str | Path, rows: Iterable[tuple[str, str, int]]) -> None:
    """Write ``folds.csv`` (id,city,fold) atomically."""
    with io.atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FOLDS_HEADER)
        writer.writerows(rows)


def read_folds(path: str | Path) -> dict[str, int]:
    """Read ``folds.csv`` as ``{sample_id: fold}``.

    Raises:
        DataError: The file is missing, lacks the id/fold columns, holds a non-integer or negative
            fold, or lists an id twice (the line is named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "folds file not found (make one with `geopose-ml folds DATA`)")
    folds: dict[str, int] = {}
    for line, row in enumerate(read_csv_rows(path), start=2):
        if not row.get("id") or row.get("fold") in (None, ""):
            raise DataError(path, f"line {line}: expected columns {','.join(FOLDS_HEADER)} with values")
        try:
            fold = int(row["fold"])
        except ValueError as err:
            raise DataError(path, f"line {line}: fold {row['fold']!r} is not an integer") from err
        if fold < 0:
            raise DataError(path, f"line {line}: fold must be >= 0, got {fold}")
        if row["id"] in folds:
            raise DataError(path, f"line {line}: id {row['id']!r} listed twice")
        folds[row["id"]] = fold
    if not folds:
        raise DataError(path, "no rows")
    return folds
