"""Prediction with test-time augmentation: each view undone on the height map and the angle (SPEC §1)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geopose_mlops.constants import AGL, SCALE, XYDIR
from geopose_mlops.data import io
from geopose_mlops.ensemble.fit import EnsembleSpec
from geopose_mlops.inference import EnsemblePredictor, predict_folder


class _Equivariant(torch.nn.Module):
    """Height = 10 x red channel; direction = from the image centre to the brightest red pixel."""

    def forward(self, image, gsd, city):
        red = image[:, 0]
        b, h, w = red.shape
        flat = red.reshape(b, -1).argmax(1)
        rows, cols = (flat // w).float(), (flat % w).float()
        dx, dy = cols - (w - 1) / 2, rows - (h - 1) / 2
        norm = torch.sqrt(dx**2 + dy**2)
        return {AGL: 10 * red, XYDIR: torch.stack([dx / norm, dy / norm], 1), SCALE: torch.full((b,), 2.0)}


def _fake_predictor() -> EnsemblePredictor:
    predictor = EnsemblePredictor.__new__(EnsemblePredictor)
    predictor.spec = EnsembleSpec(["m"], "equal", [1.0], [1.0], [1.0], image_size=8)
    predictor.device = torch.device("cpu")
    predictor.members = [[_Equivariant()]]
    predictor.scale_model = None
    return predictor


def test_tta_undoes_each_view_on_heights_and_angles() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 200, (1, 8, 8, 3), dtype=np.uint8)
    rgb[0, 1, 6, 0] = 255  # the brightest red pixel: up and to the right of the centre
    predictor = _fake_predictor()
    plain = predictor.predict(rgb, np.array([0.5]), ["JAX"], "none")
    for tta in ("flip", "d4"):
        out = predictor.predict(rgb, np.array([0.5]), ["JAX"], tta)
        np.testing.assert_allclose(out["agl"], plain["agl"], atol=1e-5)
        assert out["angle"][0] == pytest.approx(plain["angle"][0], abs=1e-6)
    # A horizontally flipped image gives the flipped height map and the angle -a (SPEC §1).
    flipped = predictor.predict(np.ascontiguousarray(rgb[:, :, ::-1]), np.array([0.5]), ["JAX"], "flip")
    np.testing.assert_allclose(flipped["agl"][0], plain["agl"][0][:, ::-1], atol=1e-5)
    assert flipped["angle"][0] == pytest.approx(-plain["angle"][0], abs=1e-6)


def test_flipped_image_file_gives_the_flipped_submission_with_tta_flip(tmp_path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
    rgb[5, 25, 0] = 255  # up and to the right of the centre
    images = tmp_path / "images"
    images.mkdir()
    io.write_rgb(images / "JAX_a_RGB.tif", rgb)
    io.write_rgb(images / "JAX_b_RGB.tif", np.ascontiguousarray(rgb[:, ::-1]))  # b = a flipped left-right
    predictor = _fake_predictor()
    out = tmp_path / "submission"
    assert sorted(predict_folder(predictor, images, out, "flip", progress=False, image_size=32)) == ["JAX_a", "JAX_b"]
    agl_a, agl_b = io.read_agl(out / "JAX_a_AGL.tif"), io.read_agl(out / "JAX_b_AGL.tif")
    np.testing.assert_allclose(agl_b, agl_a[:, ::-1], atol=0.006)  # 1 cm files: rounding only
    (scale_a, angle_a), (scale_b, angle_b) = (
        io.read_vflow(out / "JAX_a_VFLOW.json"),
        io.read_vflow(out / "JAX_b_VFLOW.json"),
    )
    assert angle_a == pytest.approx(math.atan2(25 - 15.5, 5 - 15.5), abs=1e-6)  # (sin, cos) = (dx, dy) / norm
    assert angle_b == pytest.approx(-angle_a, abs=1e-6)
    assert scale_a == scale_b == pytest.approx(2.0)  # px/m; 32 px predicted at 32 px: no rescaling
    assert json.loads((out / "JAX_a_VFLOW.json").read_text())["scale"] == pytest.approx(0.02)  # px/cm on disk
    # A re-run finds both images complete, writes nothing, and says so.
    said = []
    assert predict_folder(predictor, images, out, "flip", progress=False, image_size=32, say=said.append) == []
    assert said == [f"skipped 2 image(s) whose _AGL.tif and _VFLOW.json already exist in {out}"]
    # An image with only one of its two files is predicted again.
    (out / "JAX_b_VFLOW.json").unlink()
    assert predict_folder(predictor, images, out, "flip", progress=False, image_size=32) == ["JAX_b"]


class _NegativeScale(_Equivariant):
    """An undertrained member: its least-squares scale slope comes out negative."""

    def forward(self, image, gsd, city):
        out = super().forward(image, gsd, city)
        return out | {SCALE: torch.full_like(out[SCALE], -0.3)}


def test_negative_member_scale_is_written_as_zero_and_reads_back(tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    io.write_rgb(images / "OMA_a_RGB.tif", np.full((32, 32, 3), 90, np.uint8))
    predictor = _fake_predictor()
    predictor.members = [[_NegativeScale()]]
    predict_folder(predictor, images, tmp_path / "out", "none", progress=False, image_size=32)
    scale, _ = io.read_vflow(tmp_path / "out" / "OMA_a_VFLOW.json")  # io rejects a negative scale
    assert scale == 0.0
