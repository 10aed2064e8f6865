"""Height warp: a raised roof lands where its new height says, facades stretch without holes, no-data stays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geopose_mlops.data.augment import build_train_augmentation
from geopose_mlops.data.synth import render_image
from geopose_mlops.data.warp import HeightWarp, height_warp

SIDE = 48
ROOF = (200, 60, 30)
TOP, LEFT, SIZE = 18, 18, 8  # the box's roof in the image, rows/cols


def _box_scene(height: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat textured ground, one box whose roof (height m, registered with the image) is drawn at TOP, LEFT."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 120, (SIDE, SIDE, 3), dtype=np.uint8)
    agl = np.zeros((SIDE, SIDE), np.float32)
    agl[TOP : TOP + SIZE, LEFT : LEFT + SIZE] = height
    rgb[TOP : TOP + SIZE, LEFT : LEFT + SIZE] = ROOF
    agl[2:5, 2:6] = np.nan  # no data on the ground
    return rgb, agl


def _mask(top: int, left: int) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), bool)
    mask[top : top + SIZE, left : left + SIZE] = True
    return mask


@pytest.mark.parametrize(
    ("angle", "scale", "height", "factor"), [(0.6, 1.5, 6.0, 1.7), (-2.2, 1.2, 5.0, 2.0), (math.pi / 2, 2.0, 3.0, 1.4)]
)
def test_raised_roof_lands_where_its_new_height_says(angle: float, scale: float, height: float, factor: float) -> None:
    rgb, agl = _box_scene(height)
    extra = (factor - 1) * height * scale
    dx, dy = round(extra * math.sin(angle)), round(extra * math.cos(angle))
    assert (dx, dy) != (0, 0)
    far = (TOP + dy + (SIZE - 1 if dy > 0 else 0), LEFT + dx + (SIZE - 1 if dx > 0 else 0))
    agl[far] = np.nan  # no data on ground the raised roof covers

    rgb_w, agl_w = height_warp(rgb, agl, scale, angle, factor)

    old, new = _mask(TOP, LEFT), _mask(TOP + dy, LEFT + dx)
    nodata = np.isnan(agl)
    assert agl_w.dtype == np.float32 and rgb_w.dtype == np.uint8 and rgb_w.shape == rgb.shape
    np.testing.assert_array_equal(np.isnan(agl_w), nodata)  # no-data stays no-data, nothing else becomes it
    np.testing.assert_array_equal(agl_w == np.float32(factor * height), new & ~nodata)
    assert (rgb_w[new] == ROOF).all()
    ground = ~old & ~new
    np.testing.assert_array_equal(rgb_w[ground], rgb[ground])  # ground the roof neither left nor reached
    np.testing.assert_array_equal(agl_w[ground & ~nodata], 0.0)
    uncovered = old & ~new  # the steep roof edge opened a gap: the original image shows through
    np.testing.assert_array_equal(rgb_w[uncovered], rgb[uncovered])
    np.testing.assert_array_equal(agl_w[uncovered], agl[uncovered])
    assert uncovered.any()


def test_a_stretched_facade_keeps_no_holes() -> None:
    """Flow down the rows at 1 px/m: a facade rising 1 m per row, then a 10 m roof; heights doubled."""
    agl = np.zeros((48, 6), np.float32)
    agl[10:20] = np.arange(10, dtype=np.float32)[:, None]  # facade: row 10 + k is k m high
    agl[20:28] = 10.0
    rgb = np.full((48, 6, 3), 30, np.uint8)
    rgb[10:20], rgb[20:28] = 100, 250

    rgb_w, agl_w = height_warp(rgb, agl, scale=1.0, angle=0.0, factor=2.0)

    expected = np.zeros(48, np.float32)
    expected[10:30] = np.arange(20)  # the facade now rises over 20 rows, 1 m each, and the roof is 20 m
    expected[30:38] = 20.0
    # drawn points carry the surface's height where they fell, so within half a pixel's rise of the centre's
    np.testing.assert_allclose(agl_w, np.repeat(expected[:, None], 6, axis=1), atol=0.5)
    assert (np.diff(agl_w[:38], axis=0) >= 0).all()  # no hole: an old height (a roof's 10 m) would dip
    assert (rgb_w[30:38] == 250).all() and (rgb_w[10:30] == 100).all() and (rgb_w[38:] == 30).all()


def test_on_a_synthetic_city_every_building_is_redrawn_at_its_new_height() -> None:
    image = render_image(np.random.default_rng(3), "JAX", 96)
    factor = 1.6
    _, agl_w = height_warp(image.rgb, image.agl, image.scale, image.angle, factor)
    assert np.nanmax(agl_w) == pytest.approx(factor * np.nanmax(image.agl), rel=1e-6)
    np.testing.assert_array_equal(np.isnan(agl_w), np.isnan(image.agl))
    # pixels of buildings that kept their old height are holes nothing was drawn on: only at the border
    buildings = agl_w > 0.5
    kept = buildings & (agl_w == image.agl)
    assert buildings.sum() > 0.1 * agl_w.size
    assert kept.sum() < 0.01 * buildings.sum()


def test_the_factor_is_capped_so_the_tallest_stays_under_200_m() -> None:
    warp = HeightWarp(p=1.0, max_factor=2.0, max_height_m=200.0)
    rgb, agl = _box_scene(150.0)
    assert warp.factor_limit(agl) == pytest.approx(200.0 / 150.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, agl_w = warp(rgb, agl, 0.3, 0.05, rng)
        assert np.nanmax(agl_w) <= 200.0 + 1e-3
    assert warp.factor_limit(_box_scene(250.0)[1]) == 1.0  # already taller: left as it is
    assert warp.factor_limit(_box_scene(20.0)[1]) == 2.0


def test_height_warp_step_with_p0_is_the_identity_and_draws_nothing() -> None:
    rgb, agl = _box_scene(6.0)
    rng = np.random.default_rng(5)
    out_rgb, out_agl = HeightWarp(p=0.0)(rgb, agl, 0.6, 1.5, rng)
    assert out_rgb is rgb and out_agl is agl
    assert rng.random() == np.random.default_rng(5).random()
    sample = (rgb, agl, 0.6, 1.5, 0.5)
    plain = build_train_augmentation(crop_size=32, seed=4)(*sample)
    with_p0 = build_train_augmentation(crop_size=32, seed=4, height_warp_p=0.0)(*sample)
    for a, b in zip(plain, with_p0, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_warp_is_seeded() -> None:
    rgb, agl = _box_scene(6.0)
    runs = [HeightWarp(p=1.0)(rgb, agl, 0.6, 1.5, np.random.default_rng(9)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert np.nanmax(runs[0][1]) > 6.0  # it did warp

    sample = (rgb, agl, 0.6, 1.5, 0.5)
    first = build_train_augmentation(crop_size=32, seed=11, height_warp_p=1.0)(*sample)
    second = build_train_augmentation(crop_size=32, seed=11, height_warp_p=1.0)(*sample)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2:] == second[2:]
    assert np.nanmax(first[1]) > 6.0


def test_bad_factor_and_settings_are_refused() -> None:
    rgb, agl = _box_scene(6.0)
    with pytest.raises(ValueError, match="height factor 0.5: expected a finite number >= 1"):
        height_warp(rgb, agl, 1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="p=1.5"):
        HeightWarp(p=1.5)
    with pytest.raises(ValueError, match="max_factor=0.9"):
        HeightWarp(max_factor=0.9)
