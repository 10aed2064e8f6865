"""Figure 4, ensemble fit: time and peak memory from OOF folders at N and 4N images.

Inputs: ``--members`` models' out-of-fold folders (``train.oof.OofPredictions.save``: float16 AGL
prediction and truth (N, S, S), ``index.csv``) of ``--images`` (N) and 4N synthetic images; each
member's heights are the truth times its own bias plus its own noise, so the best weights are unequal.

- **reference** (the in-memory way): load every member's OOF arrays whole, stack them as float32,
  and minimise the pooled AGL squared error over simplex weights with ``scipy.optimize.minimize``
  (SLSQP), every evaluation touching every pixel.
- **ours**: ``geopose_mlops.ensemble`` fitting from the same folders (streamed sufficient
  statistics: image by image from memory-mapped files, then an optimisation on small matrices).

Peak memory is ``tracemalloc``'s peak of Python and numpy allocations during one fit (memory-mapped
pages are the page cache's, not the process's); time is the median of interleaved repeats.

Goals: our peak memory flat in N (4N / N <= 1.2) while the in-memory way grows ~4x.
"""

from __future__ import annotations

import math
import sys
import tempfile
import tracemalloc
from pathlib import Path

import common
import numpy as np
from scipy.optimize import minimize

from geopose_mlops.constants import CITIES
from geopose_mlops.train.oof import OofPredictions

FLAT_GOAL = 1.2
REFERENCE_GROWTH = 3.0  # "~4x": the in-memory way must at least triple to show the contrast


def make_oof_folders(root: Path, members: int, images: int, size: int, seed: int = 0) -> list[Path]:
    """One ``oof/`` folder per member over the same ``images`` truth maps; returns the folders."""
    rng = np.random.default_rng(seed)
    truth = rng.gamma(2.0, 4.0, (images, size, size)).astype(np.float32)
    truth[rng.random(truth.shape) < 0.03] = np.nan
    cities = [CITIES[i % len(CITIES)] for i in range(images)]
    scale_true = rng.uniform(1, 5, images)
    angle_true = rng.uniform(-math.pi, math.pi, images)
    folders = []
    for member in range(members):
        bias, noise = 1.0 + 0.15 * (member - members / 2), 1.0 + member
        pred = np.clip(np.nan_to_num(truth) * bias + rng.normal(0, noise, truth.shape), 0, None)
        oof = OofPredictions(
            sample_ids=[f"{c}_{i:05d}" for i, c in enumerate(cities)],
            cities=cities,
            gsd=np.full(images, 0.5),
            scale_true=scale_true,
            angle_true=angle_true,
            scale_pred=scale_true * rng.uniform(0.9, 1.1, images),
            angle_pred=angle_true + rng.normal(0, 0.1, images),
            agl_pred=pred.astype(np.float16),
            agl_true=truth.astype(np.float16),
        )
        folders.append(oof.save(root / f"member_{member}" / "oof", with_truth=True))  # self-contained folders
    return folders


def reference_fit(folders: list[Path]) -> np.ndarray:
    """Load every OOF array whole and fit simplex weights on all pixels in memory."""
    loaded = [OofPredictions.load(folder) for folder in folders]
    truth = loaded[0].agl_true.astype(np.float32)
    valid = np.isfinite(truth)
    preds = np.stack([oof.agl_pred.astype(np.float32)[valid] for oof in loaded])  # (M, pixels)
    target = truth[valid]
    members = len(loaded)

    def sse(weights: np.ndarray) -> float:
        return float(np.square(weights @ preds - target).mean())

    result = minimize(
        sse,
        np.full(members, 1.0 / members),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * members,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
    )
    return result.x


def our_fit(folders: list[Path]):
    """Fit the ensemble with the project's streamed path (``geopose_mlops.ensemble``)."""
    from geopose_mlops.ensemble.fit import fit_from_oof_folders

    return fit_from_oof_folders(folders)


def peak_mb(fn) -> float:
    """Peak traced allocation (MB) during one call."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="N: OOF images of the small case (the large is 4N)")
    parser.add_argument("--size", type=int, default=256, help="OOF image side, pixels")
    parser.add_argument("--members", type=int, default=3, help="ensemble members")
    opts = parser.parse_args(args)
    common.limit_threads(1)
    measured: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-", dir=opts.workdir) as tmp:
        for label, count in (("N", opts.images), ("4N", 4 * opts.images)):
            folders = make_oof_folders(Path(tmp) / label, opts.members, count, opts.size)
            ref, ours = common.time_interleaved(
                lambda folders=folders: reference_fit(folders),
                lambda folders=folders: our_fit(folders),
                repeats=opts.repeats,
            )
            measured[label] = {
                "images": count,
                "reference_peak_mb": peak_mb(lambda folders=folders: reference_fit(folders)),
                "ours_peak_mb": peak_mb(lambda folders=folders: our_fit(folders)),
                "reference_fit": ref.summary(),
                "ours_fit": ours.summary(),
            }
    small, large = measured["N"], measured["4N"]
    ours_growth = large["ours_peak_mb"] / small["ours_peak_mb"]
    ref_growth = large["reference_peak_mb"] / small["reference_peak_mb"]
    details = {
        "members": opts.members,
        "size": opts.size,
        "N": small,
        "4N": large,
        "reference_fit": large["reference_fit"],
        "ours_fit": large["ours_fit"],
    }
    figures = [
        common.figure(
            "ensemble_fit_peak_memory_growth_ours", ours_growth, "x (4N / N)", f"<= {FLAT_GOAL:g} (flat in N)",
            ours_growth <= FLAT_GOAL, **details,
        ),
        common.figure(
            "ensemble_fit_peak_memory_growth_reference", ref_growth, "x (4N / N)",
            f"~4 (>= {REFERENCE_GROWTH:g}: the in-memory way grows with N)", ref_growth >= REFERENCE_GROWTH, **details,
        ),
    ]  # fmt: skip
    common.write_results(figures, opts.results)
    common.print_figures(figures)
    for label in ("N", "4N"):
        row = measured[label]
        print(
            f"{label} = {row['images']} images: peak {row['reference_peak_mb']:.1f} MB in memory vs "
            f"{row['ours_peak_mb']:.1f} MB ours; fit {row['reference_fit']['median']:.3f} s vs "
            f"{row['ours_fit']['median']:.3f} s",
            flush=True,
        )
    return figures


if __name__ == "__main__":
    run(sys.argv[1:])
