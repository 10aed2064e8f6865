"""``geopose-ml data check``: validate a data set in the competition's layout and list every problem.

Unlike ``layout.find_samples``, which stops at the first fault, the check visits every file and
collects each problem with the file it concerns: unreadable or undecodable rasters, wrong band count
or dtype, AGL and RGB of different sizes, VFLOW json without a finite ``scale``/``angle``, ids listed in
a CSV with no file, files with no CSV row, and samples missing from metadata.csv.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from geopose_mlops.constants import AGL_TAG, CITIES, METADATA_CSV, RGB_SUFFIXES, RGB_TAG, TEST_CSV, TRAIN_CSV, VFLOW_TAG
from geopose_mlops.data import io, layout
from geopose_mlops.data.layout import Sample
from geopose_mlops.data.pool import decode_pool, resolve_workers
from geopose_mlops.errors import DataError

_REQUIRED = {"train": (RGB_TAG, AGL_TAG, VFLOW_TAG), "test": (RGB_TAG,)}
_CSV = {"train": TRAIN_CSV, "test": TEST_CSV}


@dataclass
class CheckReport:
    """What ``check_dataset`` found.

    Attributes:
        counts: ``{split: {city: number of samples}}`` for the splits present.
        problems: ``(path, reason)`` for every fault found, in the order found.
        bad_samples: Ids of the samples with at least one problem (a file with no CSV row, or a
            data-set-wide fault such as an unreadable CSV, belongs to no sample).
    """

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    bad_samples: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def add(self, path: str | Path, reason: str) -> None:
        """Record one problem."""
        self.problems.append((Path(path), reason))


def _unlisted_files(folder: Path, listed: dict[str, dict[str, Path]]) -> list[Path]:
    """Files of the layout's naming in ``folder`` that no CSV row names."""
    named = {path.name for paths in listed.values() for path in paths.values()}
    unlisted = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.name in named:
            continue
        try:
            _, _, tag = layout.split_name(path.name)
        except ValueError:
            continue
        if tag in (AGL_TAG, VFLOW_TAG) or (tag == RGB_TAG and path.suffix in RGB_SUFFIXES):
            unlisted.append(path)
    return unlisted


def _check_rgb(report: CheckReport, path: Path, decode: bool) -> tuple[int, int] | None:
    try:
        height, width, count, dtype = io.raster_info(path)
        if count != 3 or dtype != "uint8":
            report.add(path, f"RGB must have 3 uint8 bands, found {count} {dtype} band(s)")
            return None
        if decode:
            io.read_rgb(path)
    except DataError as err:
        report.add(path, err.reason)
        return None
    return height, width


def _check_agl(report: CheckReport, path: Path, rgb_shape: tuple[int, int] | None, decode: bool) -> None:
    try:
        height, width, count, dtype = io.raster_info(path)
        if count != 1 or dtype != "uint16":
            report.add(path, f"AGL must have 1 uint16 band (cm), found {count} {dtype} band(s)")
            return
        if decode:
            io.read_agl(path)
    except DataError as err:
        report.add(path, err.reason)
        return
    if rgb_shape is not None and (height, width) != rgb_shape:
        report.add(path, f"AGL is {height}x{width} pixels but its RGB is {rgb_shape[0]}x{rgb_shape[1]}")


def _check_sample_files(
    folder: Path, sample_id: str, paths: dict[str, Path], split: str, csv_name: str | None, decode: bool
) -> list[tuple[Path, str]]:
    """The problems of one sample's own files, in the order the check finds them (run by pool workers too)."""
    report = CheckReport()
    for tag in _REQUIRED[split]:
        if tag not in paths:
            report.add(folder / f"{sample_id}_{tag}", f"sample {sample_id} has no {tag} file")
    present = {tag: path for tag, path in paths.items() if tag in _REQUIRED[split]}
    for tag, path in present.items():
        if not path.is_file():
            where = f"listed in {csv_name} but " if csv_name is not None else ""
            report.add(path, f"{where}file not found ({tag} of {sample_id})")
    rgb_shape = None
    if RGB_TAG in present and present[RGB_TAG].is_file():
        rgb_shape = _check_rgb(report, present[RGB_TAG], decode)
    if AGL_TAG in present and present[AGL_TAG].is_file():
        _check_agl(report, present[AGL_TAG], rgb_shape, decode)
    if VFLOW_TAG in present and present[VFLOW_TAG].is_file():
        try:
            io.read_vflow(present[VFLOW_TAG])
        except DataError as err:
            report.add(err.path, err.reason)
    return report.problems


def _check_metadata(
    report: CheckReport, data_dir: Path, split: str, sample_id: str, metadata: dict[str, tuple[str, float]]
) -> None:
    city = sample_id.split("_")[0]
    if sample_id not in metadata:
        report.add(data_dir / METADATA_CSV, f"no row for {sample_id} ({split})")
        return
    meta_city, gsd = metadata[sample_id]
    if meta_city != city:
        report.add(data_dir / METADATA_CSV, f"{sample_id}: city {meta_city!r}, file names say {city!r}")
    if not (math.isfinite(gsd) and gsd > 0):
        report.add(data_dir / METADATA_CSV, f"{sample_id}: gsd must be a positive number of m/px")


def _files_problems(tasks: list[tuple], workers: int, bar: tqdm) -> Iterator[list[tuple[Path, str]]]:
    """``_check_sample_files(*task)`` for each task, in the tasks' order: here, or in a pool of processes."""
    if workers == 1:
        for task in tasks:
            yield _check_sample_files(*task)
            bar.update()
        return
    pool = decode_pool(workers)
    try:
        futures = [pool.submit(_check_sample_files, *task) for task in tasks]
        for future in futures:
            yield future.result()
            bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_split(
    report: CheckReport,
    data_dir: Path,
    split: str,
    metadata: dict[str, tuple[str, float]] | None,
    decode: bool,
    progress: bool,
    workers: int | None,
) -> None:
    try:
        files, csv_path = layout.list_files(data_dir, split)
    except DataError as err:
        report.add(err.path, err.reason)
        return
    folder = data_dir / split
    csv_name = csv_path.name if csv_path is not None else None
    if csv_path is not None:
        for path in _unlisted_files(folder, files):
            report.add(path, f"file has no row in {csv_name}")
    samples = sorted(files.items())
    tasks = [(folder, sample_id, paths, split, csv_name, decode) for sample_id, paths in samples]
    # Reading headers and json takes milliseconds a sample: only a full decode is worth worker processes.
    workers = resolve_workers(workers, len(tasks)) if decode else 1
    counts: Counter[str] = Counter()
    with (
        tqdm(total=len(tasks), desc=f"check {split}", unit="sample", disable=not progress) as bar,
        contextlib.closing(_files_problems(tasks, workers, bar)) as found,  # closing it stops its pool
    ):
        for (sample_id, _), problems in zip(samples, found, strict=True):
            problems_before = len(report.problems)
            counts[sample_id.split("_")[0]] += 1
            report.problems += problems
            if metadata is not None:
                _check_metadata(report, data_dir, split, sample_id, metadata)
            if len(report.problems) > problems_before:
                report.bad_samples.add(sample_id)
    report.counts[split] = {city: counts[city] for city in CITIES if counts[city]}


def check_dataset(
    data_dir: str | Path,
    decode: bool = True,
    progress: bool = False,
    splits: tuple[str, ...] = layout.SPLITS,
    workers: int | None = None,
) -> CheckReport:
    """Validate every file of a data set and collect every problem (none stops the check).

    Args:
        data_dir: Folder in the layout of SPEC §2 (``train/`` required, ``test/`` checked if present).
        decode: Decode every raster's pixels (finds truncated files; about a second per 2048² JPEG
             2000). False reads the headers only.
        progress: Show a progress bar.
        splits: The splits to check (``train`` is required to exist; ``test`` is checked if present).
        workers: Processes that decode (None: the usable cores; 1: this process); the report is the same,
            problems in the same order. Only a full decode uses them.

    Returns:
        Counts per split and city, and ``(path, reason)`` for every problem.
    """
    data_dir = Path(data_dir)
    report = CheckReport()
    if not data_dir.is_dir():
        report.add(data_dir, "not a directory")
        return report
    metadata: dict[str, tuple[str, float]] | None
    try:
        metadata = layout.read_metadata(data_dir)
    except DataError as err:
        report.add(err.path, err.reason)
        metadata = None
    if metadata == {}:
        report.add(data_dir / METADATA_CSV, "metadata.csv (id,city,gsd) is missing or empty")
        metadata = None
    for split in splits:
        if split == "test" and not (data_dir / split).is_dir():
            continue
        _check_split(report, data_dir, split, metadata, decode, progress, workers)
    return report


def usable_samples(data_dir: str | Path, split: str = "train") -> tuple[list[Sample], list[tuple[Path, str]]]:
    """The samples of a split that pass the header check, and every problem the check found.

    Training runs this check (headers, json, CSV and metadata; milliseconds per file) rather than a
    full decode: the cache build decodes every source exactly once anyway and reports each file that
    fails to decode (``cache.build_cache``), so a separate full decode would double the cost of a first
    run and add it to every run that reuses the cache.

    Returns:
        (samples with no problem, sorted by id; ``(path, reason)`` of every problem found).
    """
    report = check_dataset(data_dir, decode=False, splits=(split,))
    if report.counts.get(split) is None:  # the split folder, its CSV or metadata.csv is unreadable
        return [], report.problems
    try:
        samples = layout.find_samples(data_dir, split, exclude=report.bad_samples)
    except DataError as err:  # every sample is bad
        return [], report.problems or [(err.path, err.reason)]
    return samples, report.problems
