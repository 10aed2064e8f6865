"""Augmentation keeps angle, scale and gsd consistent with the moved pixels.

Two independent checks per geometric operation:
- the flow field F = agl * scale * (sin a, cos a), moved as a vector field (pixels moved by the same
  operation, vectors by the operation's linear map measured from how pixel coordinates move), equals
  the field recomputed from the transformed height, scale and angle;
- a displaced-roof picture (a block shifted by h * scale along (sin a, cos a) from its footprint) still
  has its roof shifted by h * scale' along (sin a', cos a') from the transformed footprint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from geopose_mlops.data.augment import (
    D4,
    apply_geometric,
    build_train_augmentation,
    invert_geometric,
    rescale,
    rotate,
    transform_array,
)

SIDE = 64
Sample = tuple[np.ndarray, np.ndarray, float, float, float]
Op = Callable[[np.ndarray, np.ndarray, float, float, float], Sample]


def _d4(kind: str) -> Op:
    def op(rgb, agl, angle, scale, gsd):
        rgb, agl, angle = apply_geometric(kind, rgb, agl, angle)
        return rgb, agl, angle, scale, gsd

    return op


def _rotate(degrees: float) -> Op:
    def op(rgb, agl, angle, scale, gsd):
        rgb, agl, angle = rotate(rgb, agl, angle, degrees)
        return rgb, agl, angle, scale, gsd

    return op


def _rescale(factor: float) -> Op:
    def op(rgb, agl, angle, scale, gsd):
        rgb, agl, scale, gsd = rescale(rgb, agl, scale, gsd, factor)
        return rgb, agl, angle, scale, gsd

    return op


OPS: dict[str, Op] = {kind: _d4(kind) for kind in D4}
OPS |= {"rotate+30": _rotate(30.0), "rotate-17": _rotate(-17.0), "rotate+120": _rotate(120.0)}
OPS |= {"rescale0.75": _rescale(0.75), "rescale1.5": _rescale(1.5)}


def _move_pixels(op: Op, image: np.ndarray) -> np.ndarray:
    """Move a float image's pixels as ``op`` moves the height map (nearest, NaN outside)."""
    rgb = np.zeros((*image.shape, 3), np.uint8)
    return op(rgb, image.astype(np.float32), 0.0, 1.0, 1.0)[1]


def _vector_map(op: Op, shape: tuple[int, int]) -> np.ndarray:
    """2x2 matrix taking an (x, y) displacement before ``op`` to the displacement after it.

    Measured by moving the coordinate images: each output pixel tells where it came from; a linear fit of
    source coordinates on output coordinates gives the inverse map.
    """
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    src_x, src_y = _move_pixels(op, cols), _move_pixels(op, rows)
    out_rows, out_cols = np.mgrid[0 : src_x.shape[0], 0 : src_x.shape[1]]
    ok = np.isfinite(src_x) & np.isfinite(src_y)
    design = np.stack([out_cols[ok], out_rows[ok], np.ones(ok.sum())], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.stack([src_x[ok], src_y[ok]], axis=1), rcond=None)
    inverse = coef[:2].T  # source displacement = inverse @ output displacement
    return np.linalg.inv(inverse)


def _sample(seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    agl = (rng.random((SIDE, SIDE)) * 25.0).astype(np.float32)
    agl[5:9, 40:50] = np.nan
    rgb = rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
    return rgb, agl, 0.6, 1.7, 0.5


@pytest.mark.parametrize("name", list(OPS))
def test_angle_matches_the_flow_moved_as_a_vector_field(name: str) -> None:
    op = OPS[name]
    rgb, agl, angle, scale, gsd = _sample()
    _, agl_t, angle_t, scale_t, _ = op(rgb, agl, angle, scale, gsd)

    flow = agl[..., None] * scale * np.array([math.sin(angle), math.cos(angle)], np.float32)
    moved = np.stack([_move_pixels(op, flow[..., 0]), _move_pixels(op, flow[..., 1])], axis=-1)
    expected = moved @ _vector_map(op, agl.shape).T
    recomputed = agl_t[..., None] * scale_t * np.array([math.sin(angle_t), math.cos(angle_t)])

    ok = np.isfinite(expected).all(-1) & np.isfinite(recomputed).all(-1)
    assert ok.mean() > 0.4
    np.testing.assert_allclose(recomputed[ok], expected[ok], rtol=0.03, atol=0.02 * np.nanmax(np.abs(flow)))


def _roof_scene(angle: float, scale: float, height: float, side: int = SIDE) -> Sample:
    """Footprint block of ``height`` m in the AGL map; the roof drawn in RGB shifted along the flow."""
    shift = height * scale * np.array([math.sin(angle), math.cos(angle)])  # (dx, dy) px
    agl = np.zeros((side, side), np.float32)
    top, left, size = side // 2 - 10, side // 2 - 10, 8
    agl[top : top + size, left : left + size] = height
    agl[2:5, 2:5] = np.nan
    rgb = np.zeros((side, side, 3), np.uint8)
    dx, dy = int(round(shift[0])), int(round(shift[1]))
    rgb[top + dy : top + dy + size, left + dx : left + dx + size] = 255
    return rgb, agl, math.atan2(dx, dy), math.hypot(dx, dy) / height, 0.5


def _centroid(weights: np.ndarray) -> np.ndarray:
    rows, cols = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
    return np.array([(cols * weights).sum(), (rows * weights).sum()]) / weights.sum()


def _roof_weights(rgb: np.ndarray) -> np.ndarray:
    """Roof brightness above the background; interpolated edge pixels keep their share of the roof."""
    brightness = rgb.astype(np.float64).sum(-1)
    above = np.clip(brightness - np.median(brightness), 0, None)
    return np.where(above > 0.15 * above.max(), above, 0.0)


def _roof_shift(rgb: np.ndarray, agl: np.ndarray) -> np.ndarray:
    footprint = np.nan_to_num(agl) > 0.5 * np.nanmax(agl)
    return _centroid(_roof_weights(rgb)) - _centroid(footprint.astype(np.float64))


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("angle", [0.6, -2.2])
def test_displaced_roof_points_along_the_new_angle(name: str, angle: float) -> None:
    height = 6.0
    rgb, agl, angle, scale, gsd = _roof_scene(angle, scale=1.5, height=height)
    np.testing.assert_allclose(_roof_shift(rgb, agl), height * scale * np.array([math.sin(angle), math.cos(angle)]))

    rgb_t, agl_t, angle_t, scale_t, gsd_t = OPS[name](rgb, agl, angle, scale, gsd)
    predicted = height * scale_t * np.array([math.sin(angle_t), math.cos(angle_t)])
    np.testing.assert_allclose(_roof_shift(rgb_t, agl_t), predicted, atol=0.6)
    assert scale_t * gsd_t == pytest.approx(scale * gsd)  # px/m x m/px: unchanged by any resampling


def test_spec_angle_rules() -> None:
    a = 0.4
    expected = {
        "hflip": -a,
        "vflip": math.pi - a,
        "rot90": a + math.pi / 2,
        "rot180": a + math.pi,
        "transpose": math.pi / 2 - a,
    }
    for kind, value in expected.items():
        got = apply_geometric(kind, None, None, a)[2]
        assert (math.sin(got), math.cos(got)) == pytest.approx((math.sin(value), math.cos(value)), abs=1e-12)
    got = rotate(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), a, 30.0)[2]
    assert got == pytest.approx(a + math.radians(30.0))
    _, _, scale, gsd = rescale(np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40), np.float32), 2.0, 0.5, 0.5)
    assert (scale, gsd) == (1.0, 1.0)


@pytest.mark.parametrize("kind", D4)
def test_inverse_undoes_each_d4_operation_on_height_and_angle(kind: str) -> None:
    rgb, agl, angle, _, _ = _sample(seed=3)
    _, agl_t, angle_t = apply_geometric(kind, rgb, agl, angle)
    back, angle_back = invert_geometric(kind, agl_t, angle_t, axes=(0, 1))
    np.testing.assert_array_equal(back, agl)
    assert angle_back == pytest.approx(angle)

    batch = torch.from_numpy(np.stack([agl, agl * 2]))  # (B, H, W) predictions, as TTA sees them
    moved = transform_array(kind, batch, axes=(-2, -1))
    restored, angles = invert_geometric(kind, moved, torch.tensor([angle_t, angle_t]))
    torch.testing.assert_close(restored, batch, equal_nan=True)
    torch.testing.assert_close(angles, torch.tensor([angle, angle]).float())


def test_training_pipeline_keeps_the_roof_consistent_and_nodata_nan() -> None:
    augment = build_train_augmentation(crop_size=64, p=0.8, seed=7)
    height = 5.0
    checked = 0
    for trial in range(12):
        rgb, agl, angle, scale, gsd = _roof_scene(0.3 + trial, scale=1.2, height=height, side=96)
        rgb_t, agl_t, angle_t, scale_t, gsd_t = augment(rgb, agl, angle, scale, gsd)
        assert rgb_t.shape == (64, 64, 3) and rgb_t.dtype == np.uint8
        assert agl_t.shape == (64, 64) and agl_t.dtype == np.float32
        # nearest resampling: every height is an input value (0 or the block) or no-data
        assert set(np.unique(agl_t[np.isfinite(agl_t)])) <= {0.0, height}
        assert scale_t * gsd_t == pytest.approx(scale * gsd)
        touches_border = lambda m: m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()  # noqa: E731
        roof = _roof_weights(rgb_t) > 0
        if not roof.any() or np.nanmax(agl_t) < height:
            continue
        if touches_border(np.nan_to_num(agl_t) > 0) or touches_border(roof):
            continue
        predicted = height * scale_t * np.array([math.sin(angle_t), math.cos(angle_t)])
        np.testing.assert_allclose(_roof_shift(rgb_t, agl_t), predicted, atol=0.6)
        checked += 1
    assert checked >= 6


def test_nodata_stays_nan_under_rotation_and_rescale() -> None:
    _, agl, *_ = _sample()
    rotated = rotate(np.zeros((SIDE, SIDE, 3), np.uint8), agl, 0.0, 90.0)[1]
    assert np.isnan(rotated).sum() == np.isnan(agl).sum()  # a quarter turn about the centre is exact
    small = rescale(np.zeros((SIDE, SIDE, 3), np.uint8), agl, 1.0, 1.0, 0.5)[1]
    assert np.isnan(small).any()
    assert set(np.unique(small[np.isfinite(small)])) <= set(np.unique(agl[np.isfinite(agl)]))


def test_same_seed_gives_the_same_augmentation() -> None:
    sample = _sample()
    first = build_train_augmentation(crop_size=32, seed=11)(*sample)
    second = build_train_augmentation(crop_size=32, seed=11)(*sample)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2:] == second[2:]
