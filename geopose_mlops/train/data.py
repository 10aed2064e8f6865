"""The data of a cross-validation: the training samples checked, decoded into the cache, and given folds.

Folds come from ``DATA/folds.csv`` when there is one (a team's agreed split): it must list every training
sample, by its ``CITY_id`` or by the competition's bare id (the form of ``geopose_train.csv`` and
``metadata.csv``, with the city in its ``city`` column), with folds ``0..K-1`` and ``K`` equal to the
configuration's ``k``; anything else is a ``ConfigError`` naming the file and what disagrees. Without the
file the folds are seeded and stratified by city (``data.folds.make_folds``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from geopose_mlops.config import TrainConfig
from geopose_mlops.constants import FOLDS_CSV
from geopose_mlops.data.cache import SampleCache, build_cache
from geopose_mlops.data.check import usable_samples
from geopose_mlops.data.folds import make_folds, read_folds
from geopose_mlops.data.layout import Sample, read_csv_rows
from geopose_mlops.errors import BadFilesError, ConfigError


@dataclass
class PreparedData:
    """The samples decoded into the cache and their folds (a table with columns id, city, fold).

    Attributes:
        cache: The decoded samples.
        folds_table: Columns id, city, fold.
        skipped: ``(file, reason)`` of every bad file left out (``skip_bad``); empty otherwise.
        folds_source: Where the folds came from: the ``folds.csv`` used, or ``seeded k=K seed=S``
            (empty for a resumed run, which keeps its own).
    """

    cache: SampleCache
    folds_table: pd.DataFrame
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    folds_source: str = ""


def check_data_dir(data_dir: str | Path) -> None:
    """Refuse a ``--data-dir`` that is not a folder, before anything is created.

    Raises:
        ConfigError: It does not exist or is a file (it is named).
    """
    path = Path(data_dir)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ConfigError(f"--data-dir {path}: {what}; expected the data set's folder (with train/)")


def folds_file_k(data_dir: str | Path) -> int | None:
    """The number of folds in ``DATA/folds.csv`` (its largest fold + 1); None without the file.

    Raises:
        DataError: The file is malformed (the line is named).
    """
    path = Path(data_dir) / FOLDS_CSV
    return max(read_folds(path).values()) + 1 if path.is_file() else None


def folds_table_for(samples: list[Sample], data_dir: str | Path, k: int, seed: int) -> tuple[pd.DataFrame, str]:
    """``(folds table, where it came from)``: ``DATA/folds.csv`` if present, else seeded stratified folds.

    Raises:
        ConfigError: ``folds.csv`` leaves out training samples, skips a fold number, or has another
            number of folds than ``k`` (the file and what disagrees are named).
        DataError: ``folds.csv`` is malformed.
        ValueError: Fewer samples than ``k`` (seeded folds).
    """
    path = Path(data_dir) / FOLDS_CSV
    if not path.is_file():
        rows = make_folds(samples, k, seed)
        return pd.DataFrame(rows, columns=["id", "city", "fold"]), f"seeded k={k} seed={seed}"
    folds = _folds_by_sample(path, samples)
    missing = sorted({s.sample_id for s in samples} - set(folds))
    if missing:
        raise ConfigError(
            f"{path} does not list {len(missing)} of the {len(samples)} training samples (e.g. {missing[:5]}); "
            "add them, or remake it with `geopose-ml folds DATA --k K`"
        )
    numbers = sorted(set(folds.values()))
    if numbers != list(range(len(numbers))):
        raise ConfigError(f"{path}: the training samples' folds are {numbers}; expected 0..K-1 with none left out")
    if len(numbers) != k:
        raise ConfigError(
            f"{path} has {len(numbers)} folds but k={k}; give --k {len(numbers)} (or leave --k out), "
            "or remove the file for seeded folds"
        )
    rows = [(s.sample_id, s.city, folds[s.sample_id]) for s in samples]
    return pd.DataFrame(rows, columns=["id", "city", "fold"]), str(path.resolve())


def _folds_by_sample(path: Path, samples: list[Sample]) -> dict[str, int]:
    """``{sample id: fold}`` of the training samples ``folds.csv`` lists, by ``CITY_id`` or by bare id.

    A bare id is matched with its ``city`` column, or, without one, with the one sample of that bare id.

    Raises:
        ConfigError: Two rows name the same sample with different folds.
    """
    folds = read_folds(path)  # checks the columns and values
    cities = {row.get("id", ""): (row.get("city") or "").strip() for row in read_csv_rows(path)}
    known = {s.sample_id for s in samples}
    by_bare: dict[str, list[str]] = {}
    for s in samples:
        by_bare.setdefault(s.sample_id.removeprefix(f"{s.city}_"), []).append(s.sample_id)
    found: dict[str, int] = {}
    for raw, fold in folds.items():
        with_city = f"{cities.get(raw, '')}_{raw}"
        sample_id = raw if raw in known else with_city if with_city in known else None
        if sample_id is None and len(by_bare.get(raw, [])) == 1 and not cities.get(raw):
            sample_id = by_bare[raw][0]
        if sample_id is None:
            continue  # not a training sample here (a bad file left out, another split)
        if found.setdefault(sample_id, fold) != fold:
            raise ConfigError(f"{path}: sample {sample_id} is listed twice, in folds {found[sample_id]} and {fold}")
    return found


def prepare_data(
    config: TrainConfig, cache_root: str | Path | None = None, folds_table: pd.DataFrame | None = None
) -> PreparedData:
    """Check the training samples, build or reuse their cache, and assign folds (unless given).

    Every bad file is found before anything is trained: the header check (``check.usable_samples``)
    names missing, empty, mis-sized and malformed files, and the cache build names every file that
    fails to decode. With ``config.skip_bad`` the samples they belong to are left out and listed in
    ``PreparedData.skipped``; otherwise nothing is trained.

    Raises:
        BadFilesError: Bad files and ``skip_bad`` off (every file named), or no good sample left.
        ConfigError: Fewer good samples than folds, or a ``folds.csv`` that disagrees (:func:`folds_table_for`).
    """
    samples, problems = usable_samples(config.data_dir, "train")
    if folds_table is not None:  # a resumed run trains on the samples it started with
        wanted = set(folds_table["id"])
        missing = wanted - {s.sample_id for s in samples}
        samples = [s for s in samples if s.sample_id in wanted]
        problems += [
            (Path(config.data_dir), f"sample {m} of the run's folds.csv is bad or gone") for m in sorted(missing)
        ]
    if folds_table is None and (Path(config.data_dir) / FOLDS_CSV).is_file():
        folds_table_for(samples, config.data_dir, config.k, config.seed)  # one that disagrees fails before the cache
    try:
        cache = build_cache(samples, cache_root, config.image_size) if samples else None
    except BadFilesError as err:
        problems += err.problems
        cache = None
    if problems and not config.skip_bad:
        raise BadFilesError(config.data_dir, problems)
    if cache is None:
        bad_paths = {path for path, _ in problems}
        samples = [s for s in samples if not bad_paths & {s.rgb_path, s.agl_path, s.vflow_path}]
        if not samples:
            raise BadFilesError(config.data_dir, problems or [(Path(config.data_dir), "no samples")])
        cache = build_cache(samples, cache_root, config.image_size)
    source = ""
    if folds_table is None:
        try:
            folds_table, source = folds_table_for(samples, config.data_dir, config.k, config.seed)
        except ValueError as err:
            raise ConfigError(f"k={config.k}: {err} (after leaving out {len(problems)} bad file(s))") from err
    return PreparedData(cache=cache, folds_table=folds_table, skipped=problems, folds_source=source)
