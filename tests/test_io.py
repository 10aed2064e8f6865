"""Round trip of every file type of the layout through data/io.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geopose_mlops.constants import AGL_NODATA
from geopose_mlops.data import io
from geopose_mlops.errors import DataError

SIZE = 32


@pytest.mark.parametrize("suffix", [".j2k", ".tif"])
def test_rgb_round_trip_is_exact(tmp_path, suffix) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path / f"JAX_abc_RGB{suffix}"
    io.write_rgb(path, rgb)
    np.testing.assert_array_equal(io.read_rgb(path), rgb)
    assert io.raster_info(path) == (SIZE, SIZE, 3, "uint8")


def test_rgb_decodes_straight_to_a_smaller_size_by_area_average(tmp_path) -> None:
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[:, SIZE // 2 :] = 200
    io.write_rgb(tmp_path / "a.tif", rgb)
    small = io.read_rgb(tmp_path / "a.tif", size=SIZE // 4)
    assert small.shape == (SIZE // 4, SIZE // 4, 3)
    assert small[0, 0, 0] == 0 and small[0, -1, 0] == 200


def test_agl_round_trip_keeps_centimetres_and_nan(tmp_path) -> None:
    agl = np.array([[0.0, 1.234], [12.345, np.nan]], dtype=np.float32)
    path = tmp_path / "OMA_x_AGL.tif"
    io.write_agl(path, agl)
    back = io.read_agl(path)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back[~np.isnan(back)], [0.0, 1.23, 12.35], atol=1e-6)  # rounded to 1 cm
    assert np.isnan(back[1, 1])
    assert io.raster_info(path) == (2, 2, 1, "uint16")
    assert io.agl_to_centimetres(agl)[1, 1] == AGL_NODATA


def test_vflow_json_stores_px_per_cm_and_reads_px_per_m(tmp_path) -> None:
    path = tmp_path / "ATL_y_VFLOW.json"
    io.write_vflow(path, 2.5, -1.0)
    assert json.loads(path.read_text()) == pytest.approx({"scale": 0.025, "angle": -1.0})
    scale, angle = io.read_vflow(path)
    assert scale == pytest.approx(2.5) and angle == -1.0


@pytest.mark.parametrize(("scale", "angle"), [(-0.5, 0.0), (float("nan"), 0.0), (1.0, float("inf"))])
def test_vflow_json_that_read_vflow_would_reject_is_not_written(tmp_path, scale, angle) -> None:
    path = tmp_path / "JAX_w_VFLOW.json"
    io.write_vflow(path, 2.0, 0.5)
    with pytest.raises(DataError, match="JAX_w_VFLOW.json"):
        io.write_vflow(path, scale, angle)
    assert io.read_vflow(path) == pytest.approx((2.0, 0.5))  # the file written before is kept


@pytest.mark.parametrize(
    ("text", "reason"),
    [('{"scale": 0.01}', "missing key 'angle'"), ('{"scale": NaN, "angle": 0}', "finite"), ("{", "not valid json")],
)
def test_bad_vflow_json_names_the_file_and_the_fault(tmp_path, text, reason) -> None:
    path = tmp_path / "ARG_z_VFLOW.json"
    path.write_text(text)
    with pytest.raises(DataError, match=reason) as err:
        io.read_vflow(path)
    assert err.value.path == path
