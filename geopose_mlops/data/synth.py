"""A synthetic data set in the competition's layout (SPEC §2), physically consistent so a model can learn.

Each image is a city tile of flat-roofed buildings (rectangular or L-shaped footprints extruded to a
height) and trees, seen obliquely. With the SPEC §1 convention (x = column, y = row downward, flow
direction (sin a, cos a)), a point at ground position p and height h appears in the image at
``p + h * scale * (sin a, cos a)`` (scale in px/m). A pixel q therefore shows the highest solid point
on its line of sight ``{(q - h * v, h)}`` with ``v = scale * (sin a, cos a)``: roofs are displaced along
the flow by height × scale, facades fill the swept area with heights rising linearly from 0 to the roof
along the sweep, and roofs occlude facades and lower buildings. The AGL map is that visible height on
the image grid. Appearance carries the cues a network needs: facades are darker than roofs and striped
by floor (one stripe per 3.5 m, so their extent tells height), shadows on the ground run along a sun
direction with length proportional to height, taller buildings have larger footprints.

Cities differ in tile extent (so gsd, m/px), height distribution (ATL/JAX downtown towers, ARG/OMA
low-rise), off-nadir angle (so scale = tan(off-nadir) / gsd, px/m) and flow-angle range. Everything
comes from one seeded generator per image, so a seed gives the same bytes on every run.
"""

from __future__ import annotations

import csv
import math
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from geopose_mlops.constants import CITIES, METADATA_CSV, TEST_CSV, TRAIN_CSV
from geopose_mlops.data import io

FLOOR_HEIGHT_M = 3.5  # facade stripes: one per storey
TEST_TRUTH_DIR = "test_truth"


@dataclass(frozen=True)
class CityStyle:
    """How a city's tiles look.

    Attributes:
        extent_m: Range of the ground side of a tile, metres (gsd = extent / image side).
        height_median_m: Median building height, metres (log-normal).
        height_sigma: Log-normal sigma of building heights.
        height_max_m: Cap on ordinary building heights, metres.
        tower_prob: Chance that a lot near downtown holds a tower.
        tower_m: Range of tower heights, metres.
        off_nadir_deg: Range of the view's off-nadir angle, degrees (scale = tan / gsd).
        angle_center_rad: Centre of the flow-angle range, radians.
        angle_spread_rad: Half width of the flow-angle range, radians.
        block_m: Side of a street block, metres (roads included).
        ground_rgb: Ground colour in [0, 1].
        tree_prob: Chance that an empty lot holds trees.
    """

    extent_m: tuple[float, float]
    height_median_m: float
    height_sigma: float
    height_max_m: float
    tower_prob: float
    tower_m: tuple[float, float]
    off_nadir_deg: tuple[float, float]
    angle_center_rad: float
    angle_spread_rad: float
    block_m: float
    ground_rgb: tuple[float, float, float]
    tree_prob: float


CITY_STYLES: dict[str, CityStyle] = {
    "ARG": CityStyle((150, 190), 7.0, 0.35, 22.0, 0.0, (0, 0), (12, 30), 1.2, 0.5, 55, (0.52, 0.50, 0.42), 0.5),
    "ATL": CityStyle((220, 280), 12.0, 0.5, 40.0, 0.35, (45, 90), (10, 32), 2.6, 0.6, 80, (0.45, 0.47, 0.40), 0.7),
    "JAX": CityStyle((200, 250), 10.0, 0.45, 35.0, 0.25, (35, 70), (8, 28), -2.0, 0.5, 75, (0.50, 0.48, 0.38), 0.6),
    "OMA": CityStyle((160, 210), 5.5, 0.3, 18.0, 0.0, (0, 0), (5, 22), -0.6, 0.5, 65, (0.42, 0.48, 0.36), 0.8),
}

_ROOF_PALETTE = np.array(
    [[0.78, 0.76, 0.72], [0.62, 0.60, 0.58], [0.70, 0.45, 0.35], [0.55, 0.57, 0.62], [0.85, 0.84, 0.80]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class _Solid:
    """A vertical prism: a rotated rectangle (half sides a, b) or a disc (radius r > 0); pixel units."""

    cx: float
    cy: float
    a: float
    b: float
    theta: float
    r: float
    height_m: float
    colour: tuple[float, float, float]
    is_tree: bool


@dataclass(frozen=True)
class SynthImage:
    """One rendered image and its truth.

    Attributes:
        rgb: uint8 (S, S, 3).
        agl: float32 (S, S) metres of the visible surface; NaN = no-data hole.
        scale: Pixels per metre of height.
        angle: Flow angle, radians, in (-pi, pi].
        gsd: Metres per pixel.
    """

    rgb: np.ndarray
    agl: np.ndarray
    scale: float
    angle: float
    gsd: float


def _line_of_sight(solid: _Solid, xs: np.ndarray, ys: np.ndarray, vx: float, vy: float):
    """Heights h (metres) where ``(x, y) - h * (vx, vy)`` lies in the solid's footprint: (lo, hi) arrays."""
    dx, dy = xs - np.float32(solid.cx), ys - np.float32(solid.cy)
    if solid.r > 0:
        vv = vx * vx + vy * vy
        b = dx * vx + dy * vy
        c = dx * dx + dy * dy - solid.r**2
        disc = b * b - vv * c
        root = np.sqrt(np.maximum(disc, 0))
        lo, hi = (b - root) / vv, (b + root) / vv
        return np.where(disc >= 0, lo, np.inf), np.where(disc >= 0, hi, -np.inf)
    cos, sin = math.cos(solid.theta), math.sin(solid.theta)
    lo, hi = np.float32(-np.inf), np.float32(np.inf)
    axes = ((dx * cos + dy * sin, vx * cos + vy * sin, solid.a), (dy * cos - dx * sin, vy * cos - vx * sin, solid.b))
    for u, vu, half in axes:
        if abs(vu) < 1e-9:
            inside = np.abs(u) <= half
            lo, hi = np.where(inside, lo, np.inf), np.where(inside, hi, -np.inf)
        else:
            t1, t2 = (u - half) / vu, (u + half) / vu
            lo, hi = np.maximum(lo, np.minimum(t1, t2)), np.minimum(hi, np.maximum(t1, t2))
    return lo, hi


def _window(solid: _Solid, vx: float, vy: float, size: int) -> tuple[int, int, int, int] | None:
    """Image rows/cols (r0, r1, c0, c1) covering the footprint swept by height × v, or None if outside."""
    if solid.r > 0:
        ex = ey = solid.r
    else:
        cos, sin = abs(math.cos(solid.theta)), abs(math.sin(solid.theta))
        ex, ey = solid.a * cos + solid.b * sin, solid.a * sin + solid.b * cos
    sx, sy = solid.height_m * vx, solid.height_m * vy
    c0 = max(0, math.floor(solid.cx - ex + min(0.0, sx)))
    c1 = min(size, math.ceil(solid.cx + ex + max(0.0, sx)) + 1)
    r0 = max(0, math.floor(solid.cy - ey + min(0.0, sy)))
    r1 = min(size, math.ceil(solid.cy + ey + max(0.0, sy)) + 1)
    return None if c0 >= c1 or r0 >= r1 else (r0, r1, c0, c1)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise in [0, 1] varying over ``size / cells`` pixels (bilinear upsampling of a coarse grid)."""
    coarse = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _layout(rng: np.random.Generator, style: CityStyle, size: int, gsd: float, margin_px: float):
    """Street grid and the solids on it: (solids, grid angle, block side px, road width px)."""
    block = style.block_m / gsd
    road = 0.18 * block
    grid = rng.uniform(-math.pi / 4, math.pi / 4)
    cos, sin = math.cos(grid), math.sin(grid)
    corners = np.array([[x, y] for x in (-margin_px, size + margin_px) for y in (-margin_px, size + margin_px)])
    u, w = corners @ np.array([cos, sin]), corners @ np.array([-sin, cos])
    downtown = rng.uniform(0.2, 0.8, 2) * size
    solids: list[_Solid] = []
    lot = (block - road) / 2
    for i in range(math.floor(u.min() / block), math.ceil(u.max() / block)):
        for j in range(math.floor(w.min() / block), math.ceil(w.max() / block)):
            for k in range(4):
                lu = i * block + road + lot * (k % 2 + 0.5)
                lw = j * block + road + lot * (k // 2 + 0.5)
                cx, cy = lu * cos - lw * sin, lu * sin + lw * cos
                near = math.exp(-(((cx - downtown[0]) ** 2 + (cy - downtown[1]) ** 2) / (0.35 * size) ** 2))
                if rng.random() < 0.25:
                    if rng.random() < style.tree_prob:
                        for _ in range(int(rng.integers(1, 4))):
                            off = rng.uniform(-0.3, 0.3, 2) * lot
                            green = (0.18 + 0.1 * rng.random(), 0.36 + 0.12 * rng.random(), 0.14)
                            r = lot * rng.uniform(0.12, 0.25)
                            h = rng.uniform(4, 14)
                            solids.append(_Solid(cx + off[0], cy + off[1], 0, 0, 0, r, h, green, True))
                    continue
                if rng.random() < style.tower_prob * near:
                    height = rng.uniform(*style.tower_m)
                else:
                    height = min(
                        style.height_max_m, style.height_median_m * math.exp(style.height_sigma * rng.normal())
                    )
                    height = max(3.0, height)
                # Taller buildings take more of their lot: footprint size is a cue for height.
                fill = min(0.92, 0.45 + 0.45 * height / max(style.tower_m[1], style.height_max_m))
                a, b = lot / 2 * fill * rng.uniform(0.8, 1.0), lot / 2 * fill * rng.uniform(0.6, 1.0)
                colour = tuple(
                    float(c) for c in _ROOF_PALETTE[rng.integers(len(_ROOF_PALETTE))] * rng.uniform(0.9, 1.1)
                )
                if rng.random() < 0.3:  # L shape: the rectangle less one quadrant, as two boxes
                    su, sw = rng.choice([-1.0, 1.0], 2)
                    for ou, ow, hu in ((0.0, sw * b / 2, a), (su * a / 2, -sw * b / 2, a / 2)):
                        solids.append(
                            _Solid(
                                cx + ou * cos - ow * sin,
                                cy + ou * sin + ow * cos,
                                hu,
                                b / 2,
                                grid,
                                0.0,
                                height,
                                colour,
                                False,
                            )
                        )
                else:
                    solids.append(_Solid(cx, cy, a, b, grid, 0.0, height, colour, False))
    return solids, grid, block, road


def render_image(rng: np.random.Generator, city: str, size: int) -> SynthImage:
    """Draw one tile of ``city`` at ``size``² pixels from ``rng``."""
    style = CITY_STYLES[city]
    gsd = round(rng.uniform(*style.extent_m) / size, 6)  # as written to metadata.csv
    off_nadir = math.radians(rng.uniform(*style.off_nadir_deg))
    scale = math.tan(off_nadir) / gsd
    angle = math.remainder(style.angle_center_rad + rng.uniform(-1, 1) * style.angle_spread_rad, 2 * math.pi)
    vx, vy = scale * math.sin(angle), scale * math.cos(angle)
    sun_elev = math.radians(rng.uniform(35, 65))
    shadow_az = rng.uniform(-math.pi, math.pi)  # direction shadows fall, same convention as the flow
    shadow_len = 1 / math.tan(sun_elev) / gsd  # ground pixels of shadow per metre of height
    sx, sy = shadow_len * math.sin(shadow_az), shadow_len * math.cos(shadow_az)
    margin = max(style.tower_m[1], style.height_max_m) * max(scale, shadow_len)
    solids, grid, block, road = _layout(rng, style, size, gsd, margin)

    agl = np.zeros((size, size), np.float32)
    owner = np.full((size, size), -1, np.int32)
    roof = np.zeros((size, size), bool)
    shadow = np.zeros((size, size), bool)
    for index, solid in enumerate(solids):
        for view, (px, py) in (("image", (vx, vy)), ("shadow", (sx, sy))):
            win = _window(solid, px, py, size)
            if win is None:
                continue
            r0, r1, c0, c1 = win
            ys = np.arange(r0, r1, dtype=np.float32)[:, None]
            xs = np.arange(c0, c1, dtype=np.float32)[None, :]
            lo, hi = _line_of_sight(solid, xs, ys, px, py)
            top = np.minimum(hi, np.float32(solid.height_m))
            hit = np.maximum(lo, 0) <= top
            if view == "shadow":
                shadow[r0:r1, c0:c1] |= hit
                continue
            visible = hit & (top > agl[r0:r1, c0:c1])
            agl[r0:r1, c0:c1] = np.where(visible, top, agl[r0:r1, c0:c1])
            owner[r0:r1, c0:c1] = np.where(visible, index, owner[r0:r1, c0:c1])
            roof[r0:r1, c0:c1] = np.where(visible, hi >= solid.height_m, roof[r0:r1, c0:c1])

    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    cos, sin = math.cos(grid), math.sin(grid)
    u, w = (cols * cos + rows * sin) % block, (rows * cos - cols * sin) % block
    is_road = (u < road) | (w < road)
    ground = np.asarray(style.ground_rgb, np.float32) * (0.8 + 0.4 * _smooth_noise(rng, size, 6))[..., None]
    ground[is_road] = 0.33 + 0.04 * _smooth_noise(rng, size, 12)[is_road, None]
    image = np.where(shadow[..., None], ground * 0.45, ground)
    if solids:
        colours = np.array([s.colour for s in solids], np.float32)
        trees = np.array([s.is_tree for s in solids])
        built = owner >= 0
        base = colours[owner[built]]
        # Facades face the viewer; lit when the sun is behind the viewer (shadows fall along the flow).
        lit = 0.6 + 0.25 * math.cos(shadow_az - angle)
        stripes = 0.82 + 0.18 * np.cos(2 * np.pi * agl[built] / FLOOR_HEIGHT_M)
        facade = np.where(trees[owner[built]], 0.75, lit * stripes)[:, None]
        image[built] = np.where(roof[built][:, None], base, base * facade)
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    rgb = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)

    for _ in range(int(rng.integers(0, 4))):  # small no-data holes, as in the lidar-derived truth
        cy, cx = rng.integers(0, size, 2)
        radius = max(1, size // 48)
        agl[max(0, cy - radius) : cy + radius, max(0, cx - radius) : cx + radius] = np.nan
    return SynthImage(rgb=rgb, agl=agl, scale=float(scale), angle=float(angle), gsd=float(gsd))


def _new_id(rng: np.random.Generator, taken: set[str]) -> str:
    letters = np.array(list(string.ascii_letters))
    while True:
        candidate = "".join(rng.choice(letters, 6))
        if candidate not in taken:
            taken.add(candidate)
            return candidate


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    with io.atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def make_synthetic_dataset(
    out_dir: str | Path,
    images_per_city: int,
    size: int,
    seed: int,
    cities: Sequence[str] = CITIES,
    test_images_per_city: int = 0,
    rgb_format: str = "j2k",
    progress: bool = False,
) -> list[str]:
    """Write a synthetic data set in the competition's layout (SPEC §2).

    Writes ``train/{CITY}_{id}_RGB.{j2k|tif}``, ``_AGL.tif``, ``_VFLOW.json``, ``test/{CITY}_{id}_RGB``,
    ``geopose_train.csv`` (id,agl,json,rgb), ``geopose_test.csv`` (id,rgb) and ``metadata.csv``
    (id,city,gsd for train and test; ``id`` is the bare id). The truth of the test images (AGL and
    VFLOW, same file names) goes to ``out_dir/test_truth/`` so that ``geopose-ml evaluate
    --truth-dir OUT/test_truth`` can score predictions for them.

    Args:
        out_dir: Folder to write (created if missing).
        images_per_city: Training images per city.
        size: Image side, pixels.
        seed: Seed; the same seed writes the same bytes.
        cities: Cities to draw, a subset of CITIES.
        test_images_per_city: Test images per city (0 writes no test split).
        rgb_format: ``"j2k"`` (lossless JPEG 2000) or ``"tif"``.
        progress: Show a progress bar.

    Returns:
        The sample ids written (``JAX_abc``), training images first.
    """
    unknown = [c for c in cities if c not in CITY_STYLES]
    if unknown:
        raise ValueError(f"unknown city/cities {unknown}; expected some of {CITIES}")
    if rgb_format not in ("j2k", "tif"):
        raise ValueError(f"rgb_format must be 'j2k' or 'tif', got {rgb_format!r}")
    if size < 8 or images_per_city < 0 or test_images_per_city < 0:
        raise ValueError(f"need size >= 8 px and counts >= 0, got size={size}, images_per_city={images_per_city}")
    out = Path(out_dir)
    for folder in ("train", "test", TEST_TRUTH_DIR) if test_images_per_city else ("train",):
        (out / folder).mkdir(parents=True, exist_ok=True)
    jobs = [
        (split, city, i)
        for split, count in (("train", images_per_city), ("test", test_images_per_city))
        for city in cities
        for i in range(count)
    ]
    taken: set[str] = set()
    train_rows, test_rows, meta_rows, written = [], [], [], []
    for split, city, i in tqdm(jobs, desc="synth", unit="image", disable=not progress):
        rng = np.random.default_rng([seed, CITIES.index(city), i, split == "test"])
        bare = _new_id(rng, taken)
        sample_id = f"{city}_{bare}"
        image = render_image(rng, city, size)
        rgb_name, agl_name, json_name = (
            f"{sample_id}_RGB.{rgb_format}",
            f"{sample_id}_AGL.tif",
            f"{sample_id}_VFLOW.json",
        )
        io.write_rgb(out / split / rgb_name, image.rgb)
        truth_dir = out / ("train" if split == "train" else TEST_TRUTH_DIR)
        io.write_agl(truth_dir / agl_name, image.agl)
        io.write_vflow(truth_dir / json_name, image.scale, image.angle)
        if split == "train":
            train_rows.append((bare, agl_name, json_name, rgb_name))
        else:
            test_rows.append((bare, rgb_name))
        meta_rows.append((bare, city, f"{image.gsd:.6f}"))
        written.append(sample_id)
    _write_csv(out / TRAIN_CSV, ("id", "agl", "json", "rgb"), train_rows)
    if test_images_per_city:
        _write_csv(out / TEST_CSV, ("id", "rgb"), test_rows)
    _write_csv(out / METADATA_CSV, ("id", "city", "gsd"), meta_rows)
    return written
