"""Figure 3, evaluation: ``evaluate_folder`` vs the public baseline's two-pass scorer on one folder.

The reference re-implements ``utilities/evaluate.py`` of pubgeo/monocular-geocentric-pose: per city,
pass 1 reads every truth AGL, its VFLOW json and the prediction, computes the per-image error
statistics (angle, scale, magnitude, end-point and AGL errors, their RMS) and the sums for the R²
means; pass 2 reads every truth image *again* to sum squared deviations from those means. It runs in
this process on one core like ours (the baseline's ``--num-processes`` pool would give both sides the
same extra cores). Both sides decode with ``data.io`` and compute in float64 (the baseline subtracts
in float32; float64 here makes the two scores comparable to 1e-9 and costs the reference only
memory bandwidth). Inputs: a synthetic submission of ``--images`` 2048² AGL maps (blocks of
buildings, 5% no-data) with predictions = truth + noise, written once.

Goals: equal scores to 1e-9, and ours >= 1.5x faster.
"""

from __future__ import annotations

import glob
import math
import os
import sys
import tempfile
from pathlib import Path

import common
import numpy as np

from geopose_mlops.constants import CITIES
from geopose_mlops.data import io
from geopose_mlops.metrics import evaluate_folder

SPEEDUP_GOAL = 1.5
EQUAL_TOLERANCE = 1e-9


def make_submission(root: Path, images: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``truth/`` and ``pred/`` folders of ``images`` AGL tifs and VFLOW jsons, cities in turn."""
    truth, pred = root / "truth", root / "pred"
    truth.mkdir(parents=True, exist_ok=True)
    pred.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        city = CITIES[i % len(CITIES)]
        name = f"{city}_{i:04d}"
        agl = np.zeros((size, size), dtype=np.float32)
        for _ in range(max(4, size // 16)):
            y, x = rng.integers(0, size, 2)
            h, w = rng.integers(size // 64 + 1, size // 8 + 2, 2)
            agl[y : y + h, x : x + w] = rng.uniform(3, 60)
        agl += rng.uniform(0, 0.5, agl.shape).astype(np.float32)
        holes = rng.random((size // 8, size // 8)) < 0.05
        agl[np.kron(holes, np.ones((8, 8), dtype=bool))] = np.nan
        scale, angle = rng.uniform(1, 6), rng.uniform(-math.pi, math.pi)
        io.write_agl(truth / f"{name}_AGL.tif", agl)
        io.write_vflow(truth / f"{name}_VFLOW.json", scale, angle)
        noisy = np.nan_to_num(agl) * rng.uniform(0.8, 1.2) + rng.normal(0, 2, agl.shape).astype(np.float32)
        io.write_agl(pred / f"{name}_AGL.tif", np.clip(noisy, 0, None))
        io.write_vflow(pred / f"{name}_VFLOW.json", scale * rng.uniform(0.9, 1.1), angle + rng.normal(0, 0.2))
    return pred, truth


def _load_vflow(path: str, agl: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, float, float]:
    """The baseline's ``load_vflow(..., return_vflow_pred_mat=True)``: (vflow, mag, xdir, ydir, scale, angle)."""
    scale, angle = io.read_vflow(path)
    xdir, ydir = math.sin(angle), math.cos(angle)
    mag = agl * scale
    vflow = np.zeros((agl.shape[0], agl.shape[1], 2))
    vflow[:, :, 0] = mag * xdir
    vflow[:, :, 1] = mag * ydir
    return vflow, mag, xdir, ydir, scale, angle


def _load_agl(path: str) -> np.ndarray:
    return io.read_agl(path).astype(np.float64)


def _image_metrics(item: tuple[str, str, str, str]) -> tuple[float, ...]:
    """Pass 1 for one image, as the baseline's ``get_current_metrics``."""
    vflow_gt_path, agl_gt_path, vflow_pred_path, agl_pred_path = item
    agl_pred = _load_agl(agl_pred_path)
    vflow_pred, mag_pred, xdir_pred, ydir_pred, scale_pred, _ = _load_vflow(vflow_pred_path, agl_pred)
    agl_gt = _load_agl(agl_gt_path)
    vflow_gt, mag_gt, xdir_gt, ydir_gt, scale_gt, _ = _load_vflow(vflow_gt_path, agl_gt)
    dir_pred = np.array([xdir_pred, ydir_pred])
    dir_pred /= np.linalg.norm(dir_pred)
    dir_gt = np.array([xdir_gt, ydir_gt])
    dir_gt /= np.linalg.norm(dir_gt)
    cos_ang = np.dot(dir_pred, dir_gt)
    sin_ang = abs(dir_pred[0] * dir_gt[1] - dir_pred[1] * dir_gt[0])
    angle_error = np.degrees(np.arctan2(sin_ang, cos_ang))
    scale_error = abs(scale_pred - scale_gt)
    mag_error = np.nanmean(np.abs(mag_pred - mag_gt))
    epe = np.nanmean(np.sqrt(np.sum(np.square(vflow_gt - vflow_pred), axis=2)))
    agl_error = np.nanmean(np.abs(agl_pred - agl_gt))
    mag_rms = np.sqrt(np.nanmean(np.square(mag_pred - mag_gt)))
    epe_rms = np.sqrt(np.nanmean(np.sum(np.square(vflow_gt - vflow_pred), axis=2)))
    agl_rms = np.sqrt(np.nanmean(np.square(agl_pred - agl_gt)))
    agl_count = np.sum(np.isfinite(agl_gt))
    agl_sse = np.nansum(np.square(agl_pred - agl_gt))
    agl_gt_sum = np.nansum(agl_gt)
    vflow_count = np.sum(np.isfinite(vflow_gt))
    vflow_gt_sum = np.nansum(vflow_gt)
    vflow_sse = np.nansum(np.square(vflow_pred - vflow_gt))
    return (
        angle_error, scale_error, mag_error, epe, agl_error, mag_rms, epe_rms, agl_rms,
        agl_count, agl_sse, agl_gt_sum, vflow_count, vflow_sse, vflow_gt_sum,
    )  # fmt: skip


def _r2_denominators(item: tuple[str, str, str, str], agl_mean: float, vflow_mean: float) -> tuple[float, float]:
    """Pass 2 for one image, as the baseline's ``get_r2_denoms``: reads the truth again."""
    vflow_gt_path, agl_gt_path, _, _ = item
    agl_gt = _load_agl(agl_gt_path)
    vflow_gt = _load_vflow(vflow_gt_path, agl_gt)[0]
    return float(np.nansum(np.square(agl_gt - agl_mean))), float(np.nansum(np.square(vflow_gt - vflow_mean)))


def _city_score(predictions_dir: Path, truth_dir: Path, city: str) -> float:
    vflow_gt_paths = sorted(glob.glob(os.path.join(truth_dir, city + "*_VFLOW*.json")))
    if not vflow_gt_paths:
        return math.nan
    items = []
    for vflow_gt_path in vflow_gt_paths:
        vflow_name = os.path.basename(vflow_gt_path)
        agl_name = vflow_name.replace("_VFLOW", "_AGL").replace(".json", ".tif")
        items.append(
            (
                vflow_gt_path,
                os.path.join(truth_dir, agl_name),
                os.path.join(predictions_dir, vflow_name),
                os.path.join(predictions_dir, agl_name),
            )
        )
    results = [_image_metrics(item) for item in items]
    agl_count = agl_sse = agl_gt_sum = vflow_count = vflow_sse = vflow_gt_sum = 0.0
    errors: list[list[float]] = [[] for _ in range(8)]
    for result in results:
        for values, value in zip(errors, result[:8], strict=True):
            values.append(value)
        agl_count += result[8]
        agl_sse += result[9]
        agl_gt_sum += result[10]
        vflow_count += result[11]
        vflow_sse += result[12]
        vflow_gt_sum += result[13]
    # The baseline summarises the per-image errors too (printed, not scored).
    _ = [np.nanmean(values) for values in errors] + [np.sqrt(np.nanmean(np.square(v))) for v in errors]
    agl_mean = agl_gt_sum / (agl_count + 0.0001)
    vflow_mean = vflow_gt_sum / (vflow_count + 0.0001)
    denominators = [_r2_denominators(item, agl_mean, vflow_mean) for item in items]
    agl_denom = np.sum([d[0] for d in denominators])
    vflow_denom = np.sum([d[1] for d in denominators])
    agl_r2 = 1.0 - agl_sse / (agl_denom + 0.0001)
    vflow_r2 = 1.0 - vflow_sse / (vflow_denom + 0.0001)
    return (agl_r2 + vflow_r2) / 2.0


def two_pass_scores(predictions_dir: Path, truth_dir: Path) -> dict[str, float]:
    """The baseline's per-city scores and their mean (``final``), cities without images left out."""
    cities = {city: _city_score(predictions_dir, truth_dir, city) for city in ("ARG", "JAX", "OMA", "ATL")}
    cities = {c: s for c, s in cities.items() if not math.isnan(s)}
    return {**cities, "final": float(np.mean(list(cities.values())))}


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images in the submission folder")
    parser.add_argument("--size", type=int, default=2048, help="image side, pixels")
    opts = parser.parse_args(args)
    common.limit_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-", dir=opts.workdir) as tmp:
        pred, truth = make_submission(Path(tmp), opts.images, opts.size)
        ours_scores = evaluate_folder(pred, truth, progress=False)
        ref_scores = two_pass_scores(pred, truth)
        differences = [abs(ours_scores["final_score"] - ref_scores["final"])]
        differences += [abs(v["score"] - ref_scores[c]) for c, v in ours_scores["cities"].items()]
        ref, ours = common.time_interleaved(
            lambda: two_pass_scores(pred, truth),
            lambda: evaluate_folder(pred, truth, progress=False),
            repeats=opts.repeats,
        )
    speedup, low, high = common.ratio_spread(ref, ours)
    sizes = {"images": opts.images, "size": opts.size, "threads": 1}
    figures = [
        common.figure(
            "evaluate_speedup",
            speedup,
            "x",
            f">= {SPEEDUP_GOAL}x (one pass vs the baseline's two passes, same core)",
            speedup >= SPEEDUP_GOAL,
            ratio_range=[low, high],
            reference_s_per_image=ref.summary(per=opts.images),
            ours_s_per_image=ours.summary(per=opts.images),
            **sizes,
        ),
        common.figure(
            "evaluate_score_difference",
            max(differences),
            "abs",
            f"<= {EQUAL_TOLERANCE:g} (final and per-city scores)",
            max(differences) <= EQUAL_TOLERANCE,
            ours_final=ours_scores["final_score"],
            reference_final=ref_scores["final"],
            **sizes,
        ),
    ]
    common.write_results(figures, opts.results)
    common.print_figures(figures)
    return figures


if __name__ == "__main__":
    run(sys.argv[1:])
