"""The data of a cross-validation: the training samples checked, decoded into the cache, and given folds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from geopose_mlops.config import TrainConfig
from geopose_mlops.constants import FOLDS_CSV
from geopose_mlops.data.cache import SampleCache, build_cache
from geopose_mlops.data.check import usable_samples
from geopose_mlops.data.folds import make_folds, read_folds
from geopose_mlops.errors import BadFilesError, ConfigError


@dataclass
class PreparedData:
    """The samples decoded into the cache and their folds (a table with columns id, city, fold).

    Attributes:
        cache: The decoded samples.
        folds_table: Columns id, city, fold.
        skipped: ``(file, reason)`` of every bad file left out (``skip_bad``); empty otherwise.
    """

    cache: SampleCache
    folds_table: pd.DataFrame
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def folds_table_for(samples: list, data_dir: str | Path, k: int, seed: int) -> pd.DataFrame:
    """``DATA/folds.csv`` when it covers every sample with folds 0..k-1, else seeded stratified folds."""
    path = Path(data_dir) / FOLDS_CSV
    if path.is_file():
        folds = read_folds(path)
        if {s.sample_id for s in samples} <= set(folds) and set(folds.values()) == set(range(k)):
            rows = [(s.sample_id, s.city, folds[s.sample_id]) for s in samples]
            return pd.DataFrame(rows, columns=["id", "city", "fold"])
    return pd.DataFrame(make_folds(samples, k, seed), columns=["id", "city", "fold"])


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
        ConfigError: Fewer good samples than folds.
    """
    samples, problems = usable_samples(config.data_dir, "train")
    if folds_table is not None:  # a resumed run trains on the samples it started with
        wanted = set(folds_table["id"])
        missing = wanted - {s.sample_id for s in samples}
        samples = [s for s in samples if s.sample_id in wanted]
        problems += [
            (Path(config.data_dir), f"sample {m} of the run's folds.csv is bad or gone") for m in sorted(missing)
        ]
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
    if folds_table is None:
        try:
            folds_table = folds_table_for(samples, config.data_dir, config.k, config.seed)
        except ValueError as err:
            raise ConfigError(f"k={config.k}: {err} (after leaving out {len(problems)} bad file(s))") from err
    return PreparedData(cache=cache, folds_table=folds_table, skipped=problems)
