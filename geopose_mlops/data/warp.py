"""Height warp: every height multiplied by a factor, the image redrawn so roofs move along the flow.

The 1st-place team's and the public baseline's (pubgeo/monocular-geocentric-pose,
``utilities/augmentation_vflow.py`` ``augment_vflow``, p 0.3) augmentation, written here as a vectorised
forward splat. Geometry (SPEC §1, as ``data/synth.py`` draws it): on the image grid (x = column, y = row
downward) the flow direction is u = (sin a, cos a); a pixel q showing a surface point of height h (m)
shows the point whose ground position is q - h s u (s in px/m), and the height map is registered with
the image (roofs sit displaced from their footprints). With every height multiplied by f, that point
appears at q + (f - 1) h s u: roofs move by the extra (f - 1) x height x scale pixels.

How the new image is drawn:

- every pixel with a height is drawn at its new position with its RGB and its new height f h; where
  several land on one pixel the tallest wins (the higher point hides the lower on the line of sight);
- where heights rise along the flow no faster than a facade seen in the image (about 1/s m per pixel),
  neighbours move apart by up to (f - 1) px more; such a pixel is also drawn at evenly spaced points
  between its new position and its upstream neighbour's, with the heights in between and the
  neighbour's RGB, so a stretched facade keeps no holes;
- pixels nothing is drawn on keep their original RGB and height, as the baseline's do: where a steeper
  rise (a roof edge without a visible facade) opens a gap, the uncovered strip shows the original image;
- no-data (NaN) pixels are not moved and stay no data (a pixel a roof lands on keeps its no-data height
  and takes the roof's RGB; where a no-data roof pixel would have landed, the original shows through).

Unlike the baseline, images with no-data pixels are warped too, and nothing is blurred afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FACADE_SLOPE_TOLERANCE = 2.0  # a rise up to this many times a facade's 1/s m per px counts as one surface
FILL_SPACING_PX = 0.7  # at most this far apart along the flow (under 1/sqrt 2: no holes on diagonal flows)
MAX_FILL_POINTS = 6  # points drawn between a stretched pixel and its upstream neighbour


@dataclass
class _Splats:
    """Points to draw: position (px, float), new height (m) and the source pixel of their RGB (flat index)."""

    y: np.ndarray
    x: np.ndarray
    height: np.ndarray
    source: np.ndarray


def _facade_fill(
    agl: np.ndarray, rows: np.ndarray, cols: np.ndarray, scale: float, angle: float, factor: float
) -> list[_Splats]:
    """Points between each pixel on a rising slope and its upstream neighbour (one pixel against the flow)."""
    h, w = agl.shape
    uy, ux = math.cos(angle), math.sin(angle)
    up_r, up_c = np.floor(rows - uy + 0.5).astype(np.int64), np.floor(cols - ux + 0.5).astype(np.int64)
    inside = (up_r >= 0) & (up_r < h) & (up_c >= 0) & (up_c < w)
    up_height = np.full(rows.shape, np.nan)
    up_height[inside] = agl[up_r[inside], up_c[inside]]
    step = (rows - up_r) * uy + (cols - up_c) * ux  # px along the flow from the neighbour to the pixel
    rise = agl[rows, cols] - up_height  # m; NaN where the neighbour is outside or no data
    with np.errstate(invalid="ignore"):
        slope = (rise > 0) & (rise * scale <= FACADE_SLOPE_TOLERANCE * step)
    rows, cols, up_r, up_c, step, rise = (v[slope] for v in (rows, cols, up_r, up_c, step, rise))
    top = agl[rows, cols].astype(np.float64)
    extra = (factor - 1.0) * scale * top
    gap = step + (factor - 1.0) * scale * rise  # px between the two new positions, along the flow
    count = np.clip(np.ceil(gap / FILL_SPACING_PX) - 1, 0, MAX_FILL_POINTS).astype(np.int64)
    parts = []
    for j in range(1, MAX_FILL_POINTS + 1):
        sel = count >= j
        t = j / (count[sel] + 1.0)  # 0 at the pixel, 1 at its upstream neighbour
        y = rows[sel] + t * (up_r[sel] - rows[sel]) + (extra[sel] - t * (factor - 1.0) * scale * rise[sel]) * uy
        x = cols[sel] + t * (up_c[sel] - cols[sel]) + (extra[sel] - t * (factor - 1.0) * scale * rise[sel]) * ux
        # The points lie on the surface below the pixel's own top: coloured as the lower end (a facade, not the roof).
        parts.append(_Splats(y, x, factor * (top[sel] - t * rise[sel]), up_r[sel] * w + up_c[sel]))
    return parts


def _draw_tallest(rgb: np.ndarray, agl: np.ndarray, splats: list[_Splats]) -> tuple[np.ndarray, np.ndarray]:
    """Draw the points on copies of the images, the tallest one wherever several land on one pixel."""
    h, w = agl.shape
    y, x, height, source = (np.concatenate([getattr(s, k) for s in splats]) for k in ("y", "x", "height", "source"))
    r, c = np.floor(y + 0.5).astype(np.int64), np.floor(x + 0.5).astype(np.int64)
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    dest, height, source = r[inside] * w + c[inside], height[inside], source[inside]
    best = np.full(h * w, -np.inf)
    np.maximum.at(best, dest, height)
    tallest = np.flatnonzero(height == best[dest])
    # Of equal tallest points the last one listed wins, so the result does not hang on the order numpy writes in.
    last = np.full(h * w, -1, np.int64)
    np.maximum.at(last, dest[tallest], tallest)
    win = last[last >= 0]
    channels = rgb.shape[2] if rgb.ndim == 3 else 1
    out_rgb, out_agl = np.array(rgb, order="C"), np.array(agl, dtype=np.float32, order="C")
    out_rgb.reshape(-1, channels)[dest[win]] = np.ascontiguousarray(rgb).reshape(-1, channels)[source[win]]
    out_agl.reshape(-1)[dest[win]] = height[win]
    out_agl[~np.isfinite(agl)] = np.nan
    return out_rgb, out_agl


def height_warp(
    rgb: np.ndarray, agl: np.ndarray, scale: float, angle: float, factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Multiply every height by ``factor`` and move each pixel by the extra ``(factor - 1) x agl x scale`` px.

    See the module docstring for how the new image is drawn. Angle and scale do not change.

    Args:
        rgb: uint8 (H, W, C) image.
        agl: float32 (H, W) height above ground registered with ``rgb``, m; NaN = no data.
        scale: Flow magnitude per metre of height, px/m.
        angle: Flow angle, rad: direction (sin a, cos a) on the (column, row) grid.
        factor: Height factor, >= 1.

    Returns:
        New (rgb, agl), same shapes and dtypes (copies).

    Raises:
        ValueError: ``factor`` below 1 or not finite.
    """
    if not math.isfinite(factor) or factor < 1.0:
        raise ValueError(f"height factor {factor!r}: expected a finite number >= 1")
    if factor == 1.0 or not math.isfinite(scale) or not math.isfinite(angle):
        return np.array(rgb, order="C"), np.array(agl, dtype=np.float32, order="C")
    rows, cols = np.nonzero(np.isfinite(agl))
    heights = agl[rows, cols].astype(np.float64)
    extra = (factor - 1.0) * scale * heights  # px along the flow
    w = agl.shape[1]
    moved = _Splats(rows + extra * math.cos(angle), cols + extra * math.sin(angle), factor * heights, rows * w + cols)
    return _draw_tallest(rgb, agl, [moved, *_facade_fill(agl, rows, cols, scale, angle, factor)])


@dataclass(frozen=True)
class HeightWarp:
    """Augmentation step: with probability ``p``, ``height_warp`` by a factor uniform in [1, limit].

    The limit is ``max_factor``, lowered so the tallest valid pixel stays at or under ``max_height_m``
    (1 when it is already taller).

    Args:
        p: Probability of warping a sample.
        max_factor: Largest height factor.
        max_height_m: Tallest height the warp may make, m.
    """

    p: float = 0.3
    max_factor: float = 2.0
    max_height_m: float = 200.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"height warp probability p={self.p}: expected a value in [0, 1]")
        if not self.max_factor >= 1.0:
            raise ValueError(f"height warp max_factor={self.max_factor}: expected a number >= 1")
        if not self.max_height_m > 0:
            raise ValueError(f"height warp max_height_m={self.max_height_m}: expected a positive number of metres")

    def factor_limit(self, agl: np.ndarray) -> float:
        """The largest factor for this height map (m): ``max_factor`` capped by ``max_height_m`` / tallest."""
        finite = agl[np.isfinite(agl)]
        tallest = float(finite.max()) if finite.size else 0.0
        if tallest <= 0:
            return self.max_factor
        return max(1.0, min(self.max_factor, self.max_height_m / tallest))

    def draw_factor(self, agl: np.ndarray, rng: np.random.Generator) -> float | None:
        """The factor for one sample drawn from ``rng`` (None: not warped). Draws nothing when ``p`` is 0."""
        if self.p == 0.0 or rng.random() >= self.p:
            return None
        return float(rng.uniform(1.0, self.factor_limit(agl)))

    def __call__(
        self, rgb: np.ndarray, agl: np.ndarray, angle: float, scale: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Warp one sample (rgb uint8 (H, W, C), agl m with NaN, angle rad, scale px/m) -> (rgb, agl)."""
        factor = self.draw_factor(agl, rng)
        if factor is None:
            return rgb, agl
        return height_warp(rgb, agl, scale, angle, factor)
