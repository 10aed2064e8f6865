"""The synthetic data set: exact layout, same bytes for a seed, and physically consistent geometry."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from click.testing import CliRunner

from geopose_mlops.cli import main
from geopose_mlops.constants import CITIES
from geopose_mlops.data import io, layout
from geopose_mlops.data.synth import CITY_STYLES, Solid, make_synthetic_dataset, project_solids, render_image

SIZE = 64


def _tree_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_synthetic_dataset(tmp_path / name, 1, 32, seed, cities=("ARG", "JAX"), test_images_per_city=1)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert len(a) == 2 * 3 + 2 + 2 * 2 + 3  # train triples, test RGBs, test truth pairs, three CSVs
    differing = [k for k in a if k.suffix in (".tif", ".j2k") and a.get(k) != c.get(k)]
    assert len(differing) == sum(1 for k in a if k.suffix in (".tif", ".j2k"))


def test_layout_matches_the_competition(synthetic_data) -> None:
    train, test = layout.find_samples(synthetic_data, "train"), layout.find_samples(synthetic_data, "test")
    assert sorted(s.city for s in train) == sorted(CITIES * 2)
    assert sorted(s.city for s in test) == list(CITIES)
    with (synthetic_data / "geopose_train.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["id", "agl", "json", "rgb"]
    for row in rows:  # bare ids; file names carry the city
        assert "_" not in row["id"] and row["rgb"].endswith(f"_{row['id']}_RGB.j2k")
    meta = layout.read_metadata(synthetic_data)
    assert set(meta) == {s.sample_id for s in train + test}
    for sample in test:  # truth for scoring predictions of the test images
        assert sample.agl_path is None
        truth = synthetic_data / "test_truth" / f"{sample.sample_id}_AGL.tif"
        assert io.read_agl(truth).shape == (SIZE, SIZE)
        assert io.read_vflow(truth.with_name(f"{sample.sample_id}_VFLOW.json"))[0] > 0
    for sample in train:
        assert io.read_rgb(sample.rgb_path).shape == io.read_agl(sample.agl_path).shape + (3,)


def test_roof_is_the_footprint_displaced_by_height_times_scale_along_the_flow() -> None:
    height, scale, angle = 10.0, 1.5, math.radians(30)  # displacement 15 px
    vx, vy = scale * math.sin(angle), scale * math.cos(angle)
    box = Solid(cx=20, cy=20, a=5, b=4, theta=0.0, r=0.0, height_m=height, colour=(1, 1, 1), is_tree=False)
    agl, owner, roof = project_solids([box], 64, vx, vy)
    rows, cols = np.nonzero(roof)
    # Roof pixels: inside the footprint once moved back by height * v.
    assert np.all(np.abs(cols - height * vx - 20) <= 5 + 1e-4) and np.all(np.abs(rows - height * vy - 20) <= 4 + 1e-4)
    assert np.all(agl[roof] == height)
    assert roof.sum() == pytest.approx(10 * 8, abs=12)  # the whole roof (2a x 2b px) is visible
    # Facade: heights between 0 and the roof, rising linearly along the sweep.
    facade = (owner == 0) & ~roof
    assert facade.sum() > 0 and np.all((agl[facade] > 0) & (agl[facade] < height))
    # The visible facade faces the viewer (the -v side, top edge y = 16): in a column crossing it the
    # height rises linearly from 0 at that edge to the roof's height where the roof begins.
    column, rows = 23, np.arange(17, 29)
    assert np.all(facade[rows, column]) and roof[29, column]
    np.testing.assert_allclose(agl[rows, column], (rows - 16) / vy, atol=1e-4)


def test_flow_angle_is_recoverable_from_where_roofs_sit() -> None:
    image = render_image(np.random.default_rng(5), "ATL", 128)
    buildings = [s for s in image.solids if not s.is_tree]

    def roofs_found(angle: float) -> float:
        hits = []
        for s in buildings:
            x = s.cx + s.height_m * image.scale * math.sin(angle)
            y = s.cy + s.height_m * image.scale * math.cos(angle)
            if 0 <= round(x) < 128 and 0 <= round(y) < 128:
                hits.append(abs(image.agl[round(y), round(x)] - s.height_m) < 0.05)
        return float(np.mean(hits))

    candidates = np.radians(np.arange(-180, 180, 5))
    found = np.array([roofs_found(a) for a in candidates])
    # Roofs have an extent, so nearby angles hit them too: take the centre of the best angles.
    best = candidates[found >= 0.9 * found.max()]
    estimate = math.atan2(np.sin(best).mean(), np.cos(best).mean())
    assert roofs_found(image.angle) > 0.8
    assert roofs_found(image.angle + math.pi) < 0.4
    assert abs(math.remainder(estimate - image.angle, 2 * math.pi)) < math.radians(10)


def test_roofs_are_brighter_than_facades_and_ground_is_zero() -> None:
    image = render_image(np.random.default_rng(1), "JAX", 128)
    vx, vy = image.scale * math.sin(image.angle), image.scale * math.cos(image.angle)
    agl, owner, roof = project_solids(image.solids, 128, vx, vy)
    valid = ~np.isnan(image.agl)
    np.testing.assert_array_equal(image.agl[valid], agl[valid])
    assert 0 < (~valid).sum() < 0.02 * valid.size or (~valid).sum() == 0  # small no-data holes only
    trees = np.array([s.is_tree for s in image.solids])
    buildings = (owner >= 0) & ~trees[owner.clip(0)]
    brightness = image.rgb.astype(float).mean(axis=2)
    assert brightness[buildings & roof].mean() > brightness[buildings & ~roof].mean() + 20
    assert np.all(agl[owner < 0] == 0)


def test_cities_differ_in_gsd_heights_and_off_nadir() -> None:
    stats = {}
    for city in CITIES:
        images = [render_image(np.random.default_rng([9, i]), city, SIZE) for i in range(4)]
        heights = [s.height_m for im in images for s in im.solids if not s.is_tree]
        stats[city] = (np.mean([im.gsd for im in images]), np.percentile(heights, 95))
        for im in images:
            off_nadir = math.degrees(math.atan(im.scale * im.gsd))  # scale = tan(off-nadir) / gsd
            low, high = CITY_STYLES[city].off_nadir_deg
            assert low - 1e-3 <= off_nadir <= high + 1e-3
            centre, spread = CITY_STYLES[city].angle_center_rad, CITY_STYLES[city].angle_spread_rad
            assert abs(math.remainder(im.angle - centre, 2 * math.pi)) <= spread + 1e-9
    assert min(stats["ATL"][1], stats["JAX"][1]) > max(stats["ARG"][1], stats["OMA"][1])  # towers
    assert stats["ATL"][0] > stats["ARG"][0]  # larger tiles: coarser gsd at the same size


def test_synth_command_writes_tif_rgb_for_chosen_cities(tmp_path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "synth",
            str(tmp_path / "d"),
            "--images-per-city",
            "1",
            "--size",
            "32",
            "--seed",
            "0",
            "--cities",
            "OMA,ARG",
            "--rgb-format",
            "tif",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "d/train").glob("*_RGB.tif")) == ["ARG", "OMA"]
    bad = CliRunner().invoke(
        main, ["synth", str(tmp_path / "e"), "--images-per-city", "1", "--size", "32", "--seed", "0", "--cities", "NYC"]
    )
    assert bad.exit_code == 2 and "NYC" in bad.output


def test_test_truth_scores_a_perfect_submission_one(synthetic_data) -> None:
    truth = synthetic_data / "test_truth"
    result = CliRunner().invoke(main, ["evaluate", "--predictions-dir", str(truth), "--truth-dir", str(truth)])
    assert result.exit_code == 0, result.output
    assert "final_score 1.000000" in result.output
    assert sorted(p.name.split("_")[0] for p in truth.glob("*_AGL.tif")) == list(CITIES)
