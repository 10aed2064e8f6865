"""``make bench``: run every figure's script, then write results.json and the Markdown table.

Each script runs in its own process (so thread settings and peak-memory figures do not leak between
them) and merges its figures into ``--out-dir/results.json``; this script then writes
``results.md``: one row per figure with its value, goal, MET/MISSED, the reference and our medians
with their spread, and the machine and library versions. ``--quick`` runs every script at its
smallest sizes (a smoke test, not figures to quote).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import common

SCRIPTS: list[tuple[str, list[str]]] = [
    ("bench_data_feed.py", ["--images", "4", "--size", "128", "--image-size", "64", "--repeats", "1"]),
    ("bench_train_step.py", ["--size", "64", "--batch", "1", "--steps", "1", "--encoder", "resnet18"]),
    ("bench_evaluate.py", ["--images", "4", "--size", "64", "--repeats", "1"]),
    ("bench_ensemble_fit.py", ["--images", "8", "--size", "32", "--members", "2", "--repeats", "1"]),
    ("bench_tracking.py", ["--size", "32", "--images-per-city", "2", "--epochs", "2", "--repeats", "1"]),
    ("bench_pruning.py", ["--trials", "6"]),
    ("bench_predict.py", ["--images", "1", "--size", "256", "--image-size", "128", "--members", "2", "--folds", "2",
                          "--repeats", "1"]),
    ("bench_cache.py", ["--images", "4", "--size", "256", "--image-size", "128", "--repeats", "1"]),
    ("bench_promote.py", ["--members", "2", "--folds", "1", "--encoder", "tu-mobilenetv3_small_050", "--repeats", "1",
                          "--no-reference"]),
    ("bench_scale.py", ["--size", "128", "--image-size", "64", "--workers", "1"]),
    ("bench_recipes.py", ["--images-per-city", "2", "--k", "2", "--epochs", "2", "--seeds", "1"]),
]  # fmt: skip


# A script whose project module is missing from this checkout is skipped (and the table says so).
REQUIRES = {"bench_ensemble_fit.py": "geopose_mlops.ensemble.fit"}


def _missing_module(script: str) -> str | None:
    module = REQUIRES.get(script)
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else module


def _medians(row: dict) -> tuple[str, str, str]:
    """(reference, ours, spread) cells from whichever raw numbers a figure carries."""
    if "interval_90_percent" in row:  # a ratio of means with its bootstrap interval (bench_tracking)
        ref, ours = row["untracked_epoch_s"], row["tracked_epoch_s"]
        low, high = row["interval_90_percent"]
        spread = f"90% interval {low:.2f} to {high:.2f} % ({row['pairs']} pairs)"
        return f"{ref['mean']:.4g} {ref['unit']} (mean)", f"{ours['mean']:.4g} {ours['unit']} (mean)", spread
    for ref_key, our_key in (
        ("reference_s_per_sample", "ours_s_per_sample"),
        ("reference_s_per_image", "ours_s_per_image"),
        ("reference_fit", "ours_fit"),
        ("untracked_epoch_s", "tracked_epoch_s"),
    ):
        if ref_key in row and our_key in row:
            ref, ours = row[ref_key], row[our_key]
            spread = f"{ref['spread']:.0%} / {ours['spread']:.0%} (n={ours['repeats']})"
            return f"{ref['median']:.4g} {ref['unit']}", f"{ours['median']:.4g} {ours['unit']}", spread
    if "reference_epochs" in row:
        return f"{row['reference_epochs']} epochs", f"{row['ours_epochs']} epochs", "deterministic (seeded)"
    return "", "", ""


def markdown_table(results: list[dict], seconds: float | None = None, skipped: list[str] | None = None) -> str:
    """The results as a Markdown table, with the machine and versions underneath."""
    lines = [
        "| figure | value | goal | met | reference (median) | ours (median) | spread ref / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results:
        ref, ours, spread = _medians(row)
        state = "MET" if row["met"] else "**MISSED**"
        value = f"{row['value']:.4g} {row['unit']}"
        lines.append(f"| {row['figure']} | {value} | {row['goal']} | {state} | {ref} | {ours} | {spread} |")
    for script in skipped or []:
        lines.append(f"| {script} | not measured | | **NOT RUN**: {REQUIRES[script]} is not in this checkout | | | |")
    machine = results[0].get("machine", {}) if results else common.machine_info()
    lines += [
        "",
        "Spread: (max - min) / median over the timed repeats; per-image or per-sample times. Tracking: the mean",
        "epoch time of each side and the 90% bootstrap interval of the overhead (see bench_tracking.py).",
    ]
    lines.append("")
    lines.append(
        f"Machine: {machine.get('cpu')}, {machine.get('cores')} usable cores, GPU: {machine.get('gpu')}; "
        f"{machine.get('platform')}."
    )
    versions = ", ".join(
        f"{k} {machine.get(k)}"
        for k in ("python", "torch", "numpy", "mlflow", "optuna", "segmentation-models-pytorch", "rasterio", "opencv")
    )
    lines.append(f"Versions: {versions}.")
    if seconds is not None:
        lines.append(f"Wall time of the whole run: {seconds / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=common.BENCH_DIR, help="where results.json/.md go")
    parser.add_argument("--quick", action="store_true", help="smallest sizes (smoke test)")
    parser.add_argument("--only", default=None, help="comma-separated script names to run (default: all)")
    opts = parser.parse_args(argv)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    results_path = opts.out_dir / "results.json"
    only = set(opts.only.split(",")) if opts.only else None
    if only is None and results_path.exists():
        results_path.unlink()  # a full run starts a fresh file
    start = time.perf_counter()
    failed, skipped = [], []
    for script, quick_flags in SCRIPTS:
        if only is not None and script not in only and script.removesuffix(".py") not in only:
            continue
        missing = _missing_module(script)
        if missing:
            print(f"== {script}: skipped, {missing} is not in this checkout", flush=True)
            skipped.append(script)
            continue
        command = [sys.executable, str(common.BENCH_DIR / script), "--results", str(results_path)]
        command += quick_flags if opts.quick else []
        print(f"== {script}", flush=True)
        script_start = time.perf_counter()
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(script)
        print(f"== {script}: {time.perf_counter() - script_start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    table = markdown_table(results, seconds, skipped)
    (opts.out_dir / "results.md").write_text(table)
    print(table, flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
