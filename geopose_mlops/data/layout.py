"""Find the samples of a data set in the competition's layout (SPEC §2).

``DATA/train/{CITY}_{id}_RGB.j2k`` (or ``.tif``), ``_AGL.tif`` and ``_VFLOW.json``; ``DATA/test/`` holds
RGB only. ``geopose_train.csv`` / ``geopose_test.csv`` list the file names; ``metadata.csv`` gives gsd
and city. Where a CSV is missing the files are found by their names.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from geopose_mlops.constants import (
    AGL_TAG,
    CITIES,
    METADATA_CSV,
    RGB_SUFFIXES,
    RGB_TAG,
    TEST_CSV,
    TRAIN_CSV,
    VFLOW_TAG,
)
from geopose_mlops.errors import DataError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One image of the data set and the paths of its files.

    Attributes:
        sample_id: ``{CITY}_{id}``, the prefix of its file names (unique across cities).
        city: One of CITIES.
        rgb_path: The RGB image.
        agl_path: The AGL map (train only, else None).
        vflow_path: The VFLOW json (train only, else None).
        gsd: Ground sample distance in metres per pixel; NaN where metadata.csv lacks it.
    """

    sample_id: str
    city: str
    rgb_path: Path
    agl_path: Path | None = None
    vflow_path: Path | None = None
    gsd: float = math.nan


def split_name(file_name: str) -> tuple[str, str, str]:
    """``JAX_abc_RGB.j2k`` -> (``JAX_abc``, ``JAX``, ``RGB``).

    Raises:
        ValueError: The name does not follow ``{CITY}_{id}_{TAG}.ext``.
    """
    stem = Path(file_name).name.split(".")[0]
    parts = stem.split("_")
    if len(parts) < 3 or parts[0] not in CITIES:
        raise ValueError(f"{file_name!r} is not named {{CITY}}_{{id}}_{{TAG}} with CITY in {CITIES}")
    return "_".join(parts[:-1]), parts[0], parts[-1]


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts; a DataError names the file if it cannot be parsed."""
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"unreadable CSV ({err})") from err


def read_metadata(data_dir: str | Path) -> dict[str, tuple[str, float]]:
    """metadata.csv as ``{sample_id: (city, gsd_m_per_px)}``; empty when the file is absent.

    The ``id`` column may hold the bare id (``abc``, with ``city`` beside it) or the full ``JAX_abc``.
    """
    path = Path(data_dir) / METADATA_CSV
    if not path.is_file():
        return {}
    meta = {}
    for line, row in enumerate(read_csv_rows(path), start=2):
        try:
            city, raw_id = row["city"], row["id"]
            gsd = float(row["gsd"]) if row.get("gsd") not in (None, "") else math.nan
        except (KeyError, ValueError) as err:
            raise DataError(path, f"line {line}: expected columns id,city,gsd ({err})") from err
        key = raw_id if raw_id.startswith(f"{city}_") else f"{city}_{raw_id}"
        meta[key] = (city, gsd)
    return meta


def _discover(folder: Path, split: str) -> dict[str, dict[str, Path]]:
    """Group the files of ``folder`` by sample id: ``{id: {"RGB": path, "AGL": path, ...}}``."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            sample_id, _, tag = split_name(path.name)
        except ValueError:
            continue
        if tag == RGB_TAG and path.suffix not in RGB_SUFFIXES:
            continue
        found.setdefault(sample_id, {})[tag] = path
    return found


def _from_csv(csv_path: Path, folder: Path, split: str) -> dict[str, dict[str, Path]]:
    columns = {"rgb": RGB_TAG, "agl": AGL_TAG, "json": VFLOW_TAG} if split == "train" else {"rgb": RGB_TAG}
    listed: dict[str, dict[str, Path]] = {}
    for line, row in enumerate(read_csv_rows(csv_path), start=2):
        missing = [c for c in columns if not row.get(c)]
        if missing:
            raise DataError(csv_path, f"line {line}: empty or missing column(s) {missing}")
        try:
            sample_id, _, _ = split_name(row["rgb"])
        except ValueError as err:
            raise DataError(csv_path, f"line {line}: {err}") from err
        listed[sample_id] = {tag: folder / row[col] for col, tag in columns.items()}
    return listed


def list_files(data_dir: str | Path, split: str = "train") -> tuple[dict[str, dict[str, Path]], Path | None]:
    """The files of a split grouped by sample id, and the CSV they came from (None if discovered)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = Path(data_dir)
    folder = data_dir / split
    if not folder.is_dir():
        raise DataError(folder, f"no {split}/ folder in the data directory")
    csv_path = data_dir / (TRAIN_CSV if split == "train" else TEST_CSV)
    if csv_path.is_file():
        return _from_csv(csv_path, folder, split), csv_path
    return _discover(folder, split), None


def find_samples(data_dir: str | Path, split: str = "train", exclude: Collection[str] = ()) -> list[Sample]:
    """The samples of a split, sorted by id, with gsd from metadata.csv where present.

    Args:
        data_dir: The data set (SPEC §2).
        split: ``train`` or ``test``.
        exclude: Sample ids to leave out (e.g. the bad ones ``check.usable_samples`` found).

    Raises:
        DataError: The split folder is missing, a CSV is malformed, or a sample lacks a required file
            (use ``geopose-ml data check`` for a full report of every problem).
    """
    files, _ = list_files(data_dir, split)
    meta = read_metadata(data_dir)
    required = (RGB_TAG, AGL_TAG, VFLOW_TAG) if split == "train" else (RGB_TAG,)
    samples = []
    for sample_id, paths in sorted(files.items()):
        if sample_id in exclude:
            continue
        for tag in required:
            if tag not in paths:
                raise DataError(Path(data_dir) / split, f"sample {sample_id} has no {tag} file")
        city = sample_id.split("_")[0]
        samples.append(
            Sample(
                sample_id=sample_id,
                city=city,
                rgb_path=paths[RGB_TAG],
                agl_path=paths.get(AGL_TAG),
                vflow_path=paths.get(VFLOW_TAG),
                gsd=meta.get(sample_id, (city, math.nan))[1],
            )
        )
    if not samples:
        raise DataError(Path(data_dir) / split, "no samples found")
    return samples
