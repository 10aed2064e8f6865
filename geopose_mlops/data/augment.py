"""Geometry-aware augmentation: the flow angle, scale and gsd move with the image (SPEC §1).

On the image grid (x = column, y = row downward) the flow direction is (sin a, cos a). Each geometric
operation below sits beside the rule it implies for the angle:

==============  =============================================  ==================
operation       pixels                                         angle (rad)
==============  =============================================  ==================
``hflip``       columns reversed                               -a
``vflip``       rows reversed                                  pi - a
``rot90``       ``np.rot90(k=1)`` (counter-clockwise)          a + pi/2
``rot180``      ``np.rot90(k=2)``                              a + pi
``rot270``      ``np.rot90(k=3)``                              a + 3pi/2
``transpose``   rows <-> columns                               pi/2 - a
``transverse``  transpose of the 180° rotation                 -pi/2 - a
rotate t°       ``cv2.getRotationMatrix2D(centre, t, 1)``      a + t
rescale f       side x f                                       scale x f, gsd / f
crop            window                                         unchanged
height warp f   heights x f, roofs moved along the flow        unchanged
==============  =============================================  ==================

The eight ``D4`` operations are exact permutations of pixels; ``apply_geometric`` and
``invert_geometric`` let test-time augmentation transform an input and undo it on the predicted height
map and angle. Height (AGL, m) is resampled with nearest-neighbour interpolation so no-data (NaN) never
bleeds into valid pixels; pixels rotated in from outside the image are NaN (RGB 0). The height warp
(``data/warp.py``, off unless ``height_warp_p`` > 0) runs first, while angle and scale are the image's own.

The geometric operations are explicit numpy/OpenCV calls rather than albumentations transforms because
the angle update needs the exact sampled parameters; the photometric part (RGB only) is an
albumentations pipeline.
"""

from __future__ import annotations

import math
from typing import Any

import albumentations as A
import cv2
import numpy as np

from geopose_mlops.data.warp import HeightWarp

D4 = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse")

# Each D4 operation's angle rule a -> sign * a + offset (rad), and its inverse operation.
_ANGLE_RULE: dict[str, tuple[int, float]] = {
    "identity": (1, 0.0),
    "hflip": (-1, 0.0),
    "vflip": (-1, math.pi),
    "rot90": (1, math.pi / 2),
    "rot180": (1, math.pi),
    "rot270": (1, 3 * math.pi / 2),
    "transpose": (-1, math.pi / 2),
    "transverse": (-1, -math.pi / 2),
}
_INVERSE = {kind: kind for kind in D4} | {"rot90": "rot270", "rot270": "rot90"}


def wrap_angle(angle: Any) -> Any:
    """Angle (rad) wrapped into [-pi, pi); works on floats, numpy arrays and torch tensors."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _check_kind(kind: str) -> None:
    if kind not in _ANGLE_RULE:
        raise ValueError(f"unknown geometric operation {kind!r}; valid: {', '.join(D4)}")


def transform_array(kind: str, array: Any, axes: tuple[int, int] = (0, 1)) -> Any:
    """Apply a D4 operation to a numpy array or torch tensor whose (row, column) axes are ``axes``."""
    _check_kind(kind)
    row, col = axes
    if kind == "identity":
        return array
    if kind in ("hflip", "vflip"):
        axis = col if kind == "hflip" else row
        return np.flip(array, axis) if isinstance(array, np.ndarray) else array.flip(axis)
    if kind.startswith("rot"):
        k = {"rot90": 1, "rot180": 2, "rot270": 3}[kind]
        if isinstance(array, np.ndarray):
            return np.rot90(array, k, axes=(row, col))
        return array.rot90(k, dims=(row, col))
    if kind == "transverse":
        array = transform_array("rot180", array, axes)
    return np.swapaxes(array, row, col) if isinstance(array, np.ndarray) else array.transpose(row, col)


def transform_angle(kind: str, angle: Any) -> Any:
    """The flow angle (rad) after the D4 operation ``kind``, wrapped into [-pi, pi)."""
    _check_kind(kind)
    sign, offset = _ANGLE_RULE[kind]
    return wrap_angle(sign * angle + offset)


def inverse_geometric(kind: str) -> str:
    """The D4 operation that undoes ``kind``."""
    _check_kind(kind)
    return _INVERSE[kind]


def apply_geometric(
    kind: str, rgb: np.ndarray | None, agl: np.ndarray | None, angle: float
) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """Apply a D4 operation to an RGB image (H, W, C), a height map (H, W) and the flow angle (rad).

    Scale and gsd do not change under D4. Either array may be None. Returns contiguous copies.
    """
    out_rgb = None if rgb is None else np.ascontiguousarray(transform_array(kind, rgb))
    out_agl = None if agl is None else np.ascontiguousarray(transform_array(kind, agl))
    return out_rgb, out_agl, float(transform_angle(kind, angle))


def invert_geometric(kind: str, agl: Any, angle: Any, axes: tuple[int, int] = (-2, -1)) -> tuple[Any, Any]:
    """Undo a D4 operation on a predicted height map (numpy or torch, spatial ``axes``) and angle (rad).

    Used by test-time augmentation: predict on ``transform_array(kind, image)``, then map the prediction
    back to the original grid.
    """
    undo = inverse_geometric(kind)
    return transform_array(undo, agl, axes), transform_angle(undo, angle)


def rotate(rgb: np.ndarray, agl: np.ndarray, angle: float, degrees: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Rotate by ``degrees`` about the image centre as ``cv2.getRotationMatrix2D`` makes it.

    Positive degrees turn the picture counter-clockwise; the flow angle becomes a + t. RGB is
    interpolated bilinearly with 0 outside; height with nearest neighbour and NaN outside.
    """
    h, w = agl.shape
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
    rgb_out = cv2.warpAffine(rgb, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    agl_out = cv2.warpAffine(
        agl.astype(np.float32),
        matrix,
        (w, h),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float("nan"),
    )
    return rgb_out.reshape(rgb.shape), agl_out, float(wrap_angle(angle + math.radians(degrees)))


def rescale(
    rgb: np.ndarray, agl: np.ndarray, scale: float, gsd: float, factor: float
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Resize by ``factor``: scale (px/m) is multiplied and gsd (m/px) divided by the realised factor.

    The realised factor is new height / old height (sides are rounded to whole pixels).
    """
    h, w = agl.shape
    new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
    realised = new_h / h
    interp = cv2.INTER_AREA if realised < 1 else cv2.INTER_LINEAR
    rgb_out = cv2.resize(rgb, (new_w, new_h), interpolation=interp).reshape(new_h, new_w, *rgb.shape[2:])
    # INTER_NEAREST_EXACT samples at pixel centres as INTER_LINEAR/AREA do; plain INTER_NEAREST floors
    # the source coordinate and would shift the height map by up to half a pixel against the RGB.
    agl_out = cv2.resize(agl.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)
    return rgb_out, agl_out, scale * realised, gsd / realised


def crop_or_pad(rgb: np.ndarray, agl: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random ``size`` x ``size`` window; a side shorter than ``size`` is padded (RGB 0, height NaN)."""
    h, w = agl.shape
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if pad_h or pad_w:
        top, left = pad_h // 2, pad_w // 2
        pads = ((top, pad_h - top), (left, pad_w - left))
        rgb = np.pad(rgb, pads + ((0, 0),) * (rgb.ndim - 2))
        agl = np.pad(agl, pads, constant_values=np.nan)
        h, w = agl.shape
    y0 = int(rng.integers(0, h - size + 1))
    x0 = int(rng.integers(0, w - size + 1))
    return rgb[y0 : y0 + size, x0 : x0 + size], agl[y0 : y0 + size, x0 : x0 + size]


class TrainAugmentation:
    """Random height warp, D4 operation, free rotation, rescale, crop and colour jitter with consistent targets.

    Call with ``(rgb uint8 (H, W, 3), agl float32 (H, W) m with NaN, angle rad, scale px/m, gsd m/px)``;
    returns the same five, the arrays contiguous and ``crop_size`` square (the input size when
    ``crop_size`` is None, so a rescaled image is cropped or padded back).

    Args:
        crop_size: Output side in px (None: the input's).
        p: Probability of each of: a D4 operation other than identity, a free rotation, a rescale, the
            colour jitter.
        max_rotation_deg: Free rotations are uniform in [-max, max] degrees.
        scale_range: Rescale factors are log-uniform in this range.
        seed: Seed of the random generator (None: fresh entropy).
        height_warp_p: Probability of the height warp (``data/warp.py``: heights x a factor in [1, 2],
            the tallest kept under 200 m); 0 (default) draws nothing, so the other choices are unchanged.
    """

    def __init__(
        self,
        crop_size: int | None = None,
        p: float = 0.5,
        max_rotation_deg: float = 45.0,
        scale_range: tuple[float, float] = (0.8, 1.25),
        seed: int | None = None,
        height_warp_p: float = 0.0,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation probability p={p}: expected a value in [0, 1]")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size={crop_size}: expected a positive number of pixels")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range={scale_range}: expected 0 < low <= high")
        self.crop_size = crop_size
        self.p = p
        self.max_rotation_deg = max_rotation_deg
        self.scale_range = scale_range
        self.height_warp = HeightWarp(p=height_warp_p)
        self.colour = A.Compose(
            [
                A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=1.0),
                A.GaussNoise(std_range=(0.01, 0.03), p=0.2),
            ],
            p=p,
        )
        self.set_seed(seed)

    def set_seed(self, seed: int | None) -> None:
        """Re-seed every random choice (e.g. per DataLoader worker)."""
        self.rng = np.random.default_rng(seed)
        self.colour.set_random_seed(None if seed is None else int(seed))

    def __call__(
        self, rgb: np.ndarray, agl: np.ndarray, angle: float, scale: float, gsd: float
    ) -> tuple[np.ndarray, np.ndarray, float, float, float]:
        """Augment one sample; see the class docstring for units."""
        size = self.crop_size or agl.shape[0]
        rng = self.rng
        rgb, agl = self.height_warp(rgb, agl, angle, scale, rng)
        if rng.random() < self.p:
            kind = D4[int(rng.integers(1, len(D4)))]
            rgb, agl, angle = apply_geometric(kind, rgb, agl, angle)
        if self.max_rotation_deg > 0 and rng.random() < self.p:
            degrees = float(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg))
            rgb, agl, angle = rotate(rgb, agl, angle, degrees)
        if rng.random() < self.p:
            factor = float(np.exp(rng.uniform(*np.log(self.scale_range))))
            rgb, agl, scale, gsd = rescale(rgb, agl, scale, gsd, factor)
        if agl.shape != (size, size):
            rgb, agl = crop_or_pad(rgb, agl, size, rng)
        rgb = self.colour(image=np.ascontiguousarray(rgb))["image"]
        return np.ascontiguousarray(rgb), np.ascontiguousarray(agl, dtype=np.float32), angle, scale, gsd


def build_train_augmentation(
    crop_size: int | None = None,
    p: float = 0.5,
    seed: int | None = None,
    max_rotation_deg: float = 45.0,
    scale_range: tuple[float, float] = (0.8, 1.25),
    height_warp_p: float = 0.0,
) -> TrainAugmentation:
    """The training augmentation: ``(rgb, agl, angle, scale, gsd) -> (rgb, agl, angle, scale, gsd)``.

    See ``TrainAugmentation`` for the arguments and units.
    """
    return TrainAugmentation(
        crop_size=crop_size,
        p=p,
        max_rotation_deg=max_rotation_deg,
        scale_range=scale_range,
        seed=seed,
        height_warp_p=height_warp_p,
    )
