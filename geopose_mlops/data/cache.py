"""Preprocessing cache: decode every source image once, resampled, into memory-mappable arrays.

Decoding a 2048² JPEG 2000 costs most of a second on one core, so training must never decode sources
again after the first pass. ``build_cache`` decodes each sample once with ``io.read_rgb`` /
``io.read_agl`` straight to ``image_size``², and stores the result under
``cache_root/<fingerprint>/`` as ``.npy`` files that are opened with ``mmap_mode="r"``. The sources
are decoded by ``workers`` processes (``data.pool``; default: the usable cores), each writing its rows
into the memory-mapped arrays of the build, so the entry is the same bytes as a one-process build's.

The fingerprint hashes every source file's path, size and modification time (ns), each sample's city
and gsd, the image size and the cache format version, so a changed source, a changed metadata.csv or a
different resolution gives a new entry. An entry is written into a temporary folder and renamed into
place only when complete, so a build killed half way never leaves an entry that would be reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from geopose_mlops.constants import CITIES
from geopose_mlops.data import io
from geopose_mlops.data.layout import Sample
from geopose_mlops.data.pool import decode_pool, resolve_workers
from geopose_mlops.errors import BadFilesError, DataError

CACHE_FORMAT_VERSION = 1
CACHE_DIR_NAME = ".geopose_cache"
_INDEX = "index.json"
_ARRAYS = ("rgb", "agl", "scale", "angle", "gsd", "city_index")
_SMALL_DTYPES = (np.float32, np.float32, np.float32, np.int64)  # of scale, angle, gsd, city_index


@dataclass(frozen=True)
class SampleCache:
    """Decoded samples at one resolution, memory-mapped from ``path``.

    Attributes:
        path: The entry folder ``cache_root/<fingerprint>``.
        fingerprint: Hex digest of the sources and settings (logged as the runs' data fingerprint).
        image_size: Side S of every cached image, pixels.
        ids: Sample ids (``JAX_abc``), one per row.
        cities: City name of each row.
        rgb: uint8 (N, S, S, 3).
        agl: float32 (N, S, S), metres above ground; NaN = no data (all NaN for images without truth).
        scale: float32 (N,), pixels per metre at the cached resolution (NaN without truth).
        angle: float32 (N,), radians (NaN without truth).
        gsd: float32 (N,), metres per pixel at the cached resolution (NaN where unknown).
        city_index: int64 (N,), index into CITIES.
    """

    path: Path
    fingerprint: str
    image_size: int
    ids: list[str]
    cities: list[str]
    rgb: np.ndarray
    agl: np.ndarray
    scale: np.ndarray
    angle: np.ndarray
    gsd: np.ndarray
    city_index: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, sample_ids: Iterable[str]) -> np.ndarray:
        """Row numbers (int64) of the given sample ids, in the order given.

        Raises:
            KeyError: Some ids are not in the cache (they are named).
        """
        position = {sample_id: row for row, sample_id in enumerate(self.ids)}
        sample_ids = list(sample_ids)
        missing = [s for s in sample_ids if s not in position]
        if missing:
            raise KeyError(f"{len(missing)} sample id(s) not in cache {self.path}: {missing[:10]}")
        return np.array([position[s] for s in sample_ids], dtype=np.int64)

    @classmethod
    def open(cls, path: str | Path) -> SampleCache:
        """Open a finished cache entry (arrays memory-mapped read-only).

        Raises:
            DataError: The folder is not a complete cache entry of this format version.
        """
        path = Path(path)
        index_path = path / _INDEX
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(index_path, f"not a complete cache entry ({err})") from err
        if index.get("format") != CACHE_FORMAT_VERSION:
            raise DataError(index_path, f"cache format {index.get('format')}, expected {CACHE_FORMAT_VERSION}")
        arrays = {}
        for name in _ARRAYS:
            try:
                arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as err:
                raise DataError(path / f"{name}.npy", f"unreadable cache array ({err})") from err
        return cls(
            path=path,
            fingerprint=index["fingerprint"],
            image_size=int(index["image_size"]),
            ids=list(index["ids"]),
            cities=list(index["cities"]),
            **arrays,
        )


def default_cache_root(data_dir: str | Path) -> Path:
    """``DATA/.geopose_cache``, the cache root used when none is given."""
    return Path(data_dir) / CACHE_DIR_NAME


def _source_paths(sample: Sample) -> list[Path]:
    return [p for p in (sample.rgb_path, sample.agl_path, sample.vflow_path) if p is not None]


def cache_fingerprint(samples: Sequence[Sample], image_size: int) -> str:
    """Hex digest of every source file's path, size and mtime (ns), city, gsd, size and format version.

    Raises:
        DataError: A source file does not exist.
    """
    record: list[object] = [CACHE_FORMAT_VERSION, int(image_size)]
    for sample in samples:
        files = []
        for path in _source_paths(sample):
            try:
                stat = path.stat()
            except OSError as err:
                raise DataError(path, f"source file not readable ({err})") from err
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        gsd = None if math.isnan(sample.gsd) else sample.gsd
        record.append([sample.sample_id, sample.city, gsd, files])
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:20]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(cache_root: Path, fingerprint: str) -> None:
    """Delete temporary folders of this fingerprint left by builds whose process has died."""
    for tmp in cache_root.glob(f".tmp-{fingerprint}-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _decode_row(rgb: np.ndarray, agl: np.ndarray, row: int, sample: Sample, size: int) -> tuple:
    """Decode one sample into row ``row`` of ``rgb`` and ``agl``.

    Returns:
        (scale px/m, angle rad, gsd m/px, city index), scale and gsd at the cached resolution.
    """
    height, width, _, _ = io.raster_info(sample.rgb_path)
    if height != width:
        raise DataError(sample.rgb_path, f"expected a square image, found {height}x{width} pixels")
    if sample.city not in CITIES:
        raise DataError(sample.rgb_path, f"city {sample.city!r} is not one of {CITIES}")
    factor = size / width  # cached pixels per source pixel
    rgb[row] = io.read_rgb(sample.rgb_path, size=size)
    agl[row] = io.read_agl(sample.agl_path, size=size) if sample.agl_path is not None else np.nan
    scale = angle = math.nan
    if sample.vflow_path is not None:
        scale_px_per_m, angle = io.read_vflow(sample.vflow_path)
        scale = scale_px_per_m * factor
    return scale, angle, sample.gsd / factor, CITIES.index(sample.city)


# The memory-mapped rgb/agl arrays of the build, opened once in each worker process (``_open_build``).
_BUILD_ARRAYS: dict[str, np.ndarray] = {}


def _open_build(tmp: str) -> None:
    _BUILD_ARRAYS["rgb"] = open_memmap(Path(tmp) / "rgb.npy", mode="r+")
    _BUILD_ARRAYS["agl"] = open_memmap(Path(tmp) / "agl.npy", mode="r+")


def _decode_in_worker(row: int, sample: Sample, size: int) -> tuple[tuple | None, tuple[Path, str] | None]:
    """One task of the pool: (the row's values, None), or (None, (file, reason)) for a bad file."""
    try:
        return _decode_row(_BUILD_ARRAYS["rgb"], _BUILD_ARRAYS["agl"], row, sample, size), None
    except DataError as err:
        return None, (err.path, err.reason)


def _decode_rows(tmp: Path, samples: Sequence[Sample], size: int, workers: int, bar: tqdm) -> list:
    """Per row, (values, None) or (None, (file, reason)): decoded in this process or by a pool.

    With 1 worker the rows are decoded here; otherwise by a pool of processes that write straight into the
    memory-mapped arrays of ``tmp``, so the bytes are the same either way.
    """
    if workers == 1:
        rgb, agl = (open_memmap(tmp / f"{name}.npy", mode="r+") for name in ("rgb", "agl"))
        results = []
        for row, sample in enumerate(samples):
            try:
                results.append((_decode_row(rgb, agl, row, sample, size), None))
            except DataError as err:
                results.append((None, (err.path, err.reason)))
            bar.update()
        rgb.flush()
        agl.flush()
        return results
    pool = decode_pool(workers, _open_build, (str(tmp),))
    try:
        futures = [pool.submit(_decode_in_worker, row, sample, size) for row, sample in enumerate(samples)]
        for future in as_completed(futures):
            future.result()  # a worker's unexpected error (not a DataError) stops the build here
            bar.update()
    finally:
        # On an error or Ctrl-C: rows not started are dropped, the ones being decoded are waited for.
        pool.shutdown(wait=True, cancel_futures=True)
    for name in ("rgb", "agl"):  # the workers' rows to disk before the entry is renamed into place
        with open(tmp / f"{name}.npy", "rb+") as handle:
            os.fsync(handle.fileno())
    return [future.result() for future in futures]


def _decode_into(tmp: Path, samples: Sequence[Sample], image_size: int, progress: bool, workers: int) -> None:
    """Decode every sample into ``tmp``; a bad file does not stop the pass, all are reported at the end."""
    n, size = len(samples), image_size
    for name, dtype, shape in (("rgb", np.uint8, (n, size, size, 3)), ("agl", np.float32, (n, size, size))):
        open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()  # rows filled through r+
    with tqdm(total=n, desc=f"cache {size}px", unit="image", disable=not progress) as bar:
        results = _decode_rows(tmp, samples, size, workers, bar)
    problems = [problem for _, problem in results if problem is not None]
    if problems:
        raise BadFilesError(tmp.parent, problems)
    columns = list(zip(*(values for values, _ in results), strict=True))
    for name, dtype, values in zip(("scale", "angle", "gsd", "city_index"), _SMALL_DTYPES, columns, strict=True):
        np.save(tmp / f"{name}.npy", np.array(values, dtype=dtype))


def build_cache(
    samples: Sequence[Sample],
    cache_root: str | Path | None,
    image_size: int,
    progress: bool = True,
    workers: int | None = None,
) -> SampleCache:
    """Decode the samples once at ``image_size``² (or reuse the entry made before) and memory-map them.

    Reusing an existing entry decodes nothing. Scale (px/m) and gsd (m/px) are converted to the cached
    resolution: scale × S / source side, gsd × source side / S.

    Args:
        samples: The samples, in the row order wanted (see ``layout.find_samples``).
        cache_root: Folder holding the cache entries; None uses ``DATA/.geopose_cache`` beside the
            first sample's split folder.
        image_size: Side S of the cached images, pixels.
        progress: Show a progress bar while decoding.
        workers: Decoding processes (None: the usable cores; 1: decode in this process). Each writes its
            rows straight into the entry's memory-mapped arrays, so the entry is byte-identical to a
            one-process build.

    Returns:
        The cache, arrays opened with ``mmap_mode="r"``.

    Raises:
        BadFilesError: Sources that are missing, unreadable, undecodable or not square: every one is
            named (the pass goes on past the first), and no entry is written.
        DataError: No samples.
    """
    samples = list(samples)
    if not samples:
        raise DataError(Path(cache_root or "."), "no samples to cache")
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    root = Path(cache_root) if cache_root is not None else default_cache_root(samples[0].rgb_path.parent.parent)
    fingerprint = cache_fingerprint(samples, image_size)
    final = root / fingerprint
    if (final / _INDEX).is_file():
        return SampleCache.open(final)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root, fingerprint)
    tmp = root / f".tmp-{fingerprint}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _decode_into(tmp, samples, image_size, progress, resolve_workers(workers, len(samples)))
        index = {
            "format": CACHE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "image_size": image_size,
            "ids": [s.sample_id for s in samples],
            "cities": [s.city for s in samples],
            "sources": [[str(p) for p in _source_paths(s)] for s in samples],
        }
        (tmp / _INDEX).write_text(json.dumps(index))
        if final.exists() and not (final / _INDEX).is_file():
            # An incomplete folder under the final name (not made by this module): replace it.
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same entry first; theirs is identical.
            if not (final / _INDEX).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SampleCache.open(final)
