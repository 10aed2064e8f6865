"""Every file read and write of the competition layout (SPEC §2): rasterio for rasters, json for VFLOW.

Units in memory: RGB uint8 (H, W, 3); AGL float32 metres with NaN for no data; scale in pixels per
metre; angle in radians. Files keep the competition's units (AGL uint16 cm, scale px/cm).
Writes go to a temporary name in the same folder and are renamed into place, so an interrupted
write never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from geopose_mlops.constants import AGL_NODATA, CM_PER_M
from geopose_mlops.errors import DataError

_DRIVERS = {".j2k": "JP2OpenJPEG", ".jp2": "JP2OpenJPEG", ".tif": "GTiff", ".tiff": "GTiff"}


@contextmanager
def _open(path: Path) -> Iterator[rasterio.DatasetReader]:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                yield src
    except RasterioError as err:
        raise DataError(path, f"unreadable raster ({err})") from err


def raster_info(path: str | Path) -> tuple[int, int, int, str]:
    """Header of a raster file without decoding its pixels.

    Returns:
        (height, width, band count, dtype name).
    """
    with _open(Path(path)) as src:
        return src.height, src.width, src.count, src.dtypes[0]


def _read(src: rasterio.DatasetReader, path: Path, size: int | None, resampling: Resampling) -> np.ndarray:
    out_shape = None if size is None else (src.count, size, size)
    try:
        return src.read(out_shape=out_shape, resampling=resampling)
    except (RasterioError, ValueError, MemoryError) as err:
        raise DataError(path, f"pixels cannot be decoded ({err})") from err


def read_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read an RGB image (JPEG 2000 or GeoTIFF).

    Args:
        path: ``{CITY}_{id}_RGB.j2k`` or ``.tif``.
        size: Decode straight to ``size`` x ``size`` pixels (area averaging); None keeps the full size.

    Returns:
        uint8 array of shape (H, W, 3).
    """
    path = Path(path)
    with _open(path) as src:
        if src.count != 3 or src.dtypes[0] != "uint8":
            raise DataError(path, f"expected 3 uint8 bands, found {src.count} {src.dtypes[0]} band(s)")
        bands = _read(src, path, size, Resampling.average)
    return np.ascontiguousarray(bands.transpose(1, 2, 0))


def read_agl(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read an AGL height map and convert it to metres.

    Args:
        path: ``{CITY}_{id}_AGL.tif``, uint16 centimetres, 65535 = no data.
        size: Resample to ``size`` x ``size`` (nearest neighbour, so no-data never mixes with
            heights, as the public baseline does); None keeps the full size.

    Returns:
        float32 array (H, W) of metres above ground, NaN where the file has no data.
    """
    path = Path(path)
    with _open(path) as src:
        if src.count != 1 or src.dtypes[0] != "uint16":
            raise DataError(path, f"expected 1 uint16 band (cm), found {src.count} {src.dtypes[0]} band(s)")
        raw = _read(src, path, size, Resampling.nearest)[0]
    agl = raw.astype(np.float32) / np.float32(CM_PER_M)
    agl[raw == AGL_NODATA] = np.nan
    return agl


def agl_to_centimetres(agl_m: np.ndarray) -> np.ndarray:
    """Metres (NaN = no data) to the file encoding: uint16 cm, clipped to [0, 65534], NaN -> 65535."""
    agl_m = np.asarray(agl_m, dtype=np.float64)
    cm = np.clip(np.round(np.nan_to_num(agl_m, nan=0.0) * CM_PER_M), 0, AGL_NODATA - 1).astype(np.uint16)
    cm[np.isnan(agl_m)] = AGL_NODATA
    return cm


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_raster(path: Path, bands: np.ndarray, **profile: object) -> None:
    driver = _DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise DataError(path, f"unknown raster suffix {path.suffix!r}; expected one of {sorted(_DRIVERS)}")
    count, height, width = bands.shape
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            tmp, "w", driver=driver, height=height, width=width, count=count, dtype=bands.dtype, **profile
        ) as dst:
            dst.write(bands)


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) image; the suffix picks the format (``.j2k`` lossless JPEG 2000, ``.tif``)."""
    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DataError(path, f"RGB must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    profile: dict[str, object] = {"QUALITY": 100, "REVERSIBLE": "YES"} if path.suffix == ".j2k" else {
        "compress": "deflate"
    }
    _write_raster(path, rgb.transpose(2, 0, 1), **profile)


def write_agl(path: str | Path, agl_m: np.ndarray) -> None:
    """Write an AGL map given in metres (NaN = no data) as deflate-compressed uint16 cm GeoTIFF."""
    cm = agl_to_centimetres(agl_m)
    _write_raster(Path(path), cm[None], compress="deflate", nodata=AGL_NODATA)


def read_vflow(path: str | Path) -> tuple[float, float]:
    """Read a VFLOW json.

    Returns:
        (scale in pixels per metre, angle in radians).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DataError(path, "file not found") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"not valid json ({err})") from err
    if not isinstance(record, dict):
        raise DataError(path, "expected a json object with 'scale' and 'angle'")
    values = {}
    for key in ("scale", "angle"):
        if key not in record:
            raise DataError(path, f"missing key {key!r}")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(path, f"{key!r} must be a finite number, got {value!r}")
        values[key] = float(value)
    if values["scale"] < 0:
        raise DataError(path, f"'scale' must be >= 0 px/cm, got {values['scale']}")
    return values["scale"] * CM_PER_M, values["angle"]


def write_vflow(path: str | Path, scale_px_per_m: float, angle_rad: float) -> None:
    """Write a VFLOW json: ``scale`` in px/cm (converted from px/m), ``angle`` in radians.

    Raises:
        DataError: The scale is negative or either value is not finite (``read_vflow`` would reject
            the file); nothing is written.
    """
    scale, angle = float(scale_px_per_m), float(angle_rad)
    if not (math.isfinite(scale) and math.isfinite(angle)) or scale < 0:
        raise DataError(path, f"not written: scale must be finite and >= 0 px/m and angle finite, got {scale}, {angle}")
    record = {"scale": scale / CM_PER_M, "angle": angle}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record))
