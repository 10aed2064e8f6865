"""What every benchmark script shares: timing, summaries, machine facts and the results files.

Every figure is a ratio of our path to a re-implementation of the public baseline's way of doing the
same work, measured side by side in one process on the same inputs. The two are timed *interleaved*
(reference, ours, reference, ours, ...) after a warm-up of each, so load from other processes on a
shared machine falls on both alike; the table reports the median of the repeats and their spread.

``results.json`` is a list of figures ``{"figure", "value", "unit", "goal", "met", ...}``; each script
merges its own figures into it (replacing earlier ones of the same name), so scripts can run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "results.json"


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed repeat (warm-up excluded)."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: 0.1 means the repeats lay within 10% of each other."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median > 0 else 0.0

    def summary(self, per: float = 1.0, unit: str = "s") -> dict[str, Any]:
        """Median, mean, min and max of ``seconds / per`` (e.g. per image) with the unit and repeat count."""
        values = [s / per for s in self.seconds]
        return {
            "median": statistics.median(values),
            "mean": statistics.mean(values),
            "min": min(values),
            "max": max(values),
            "spread": self.spread,
            "repeats": len(values),
            "unit": unit,
        }


def time_call(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(
    reference: Callable[[], Any], ours: Callable[[], Any], repeats: int, warmup: int = 1
) -> tuple[Timing, Timing]:
    """Time two ways of doing the same work, alternating them so both see the same machine load.

    Args:
        reference: The baseline's way (one unit of work per call).
        ours: Our way (the same work).
        repeats: Timed calls of each.
        warmup: Untimed calls of each first (caches, lazy imports, allocator, JIT paths).

    Returns:
        (reference timing, our timing).
    """
    for _ in range(warmup):
        reference()
        ours()
    ref_s, ours_s = [], []
    for _ in range(repeats):
        ref_s.append(time_call(reference))
        ours_s.append(time_call(ours))
    return Timing(ref_s), Timing(ours_s)


def ratio_spread(reference: Timing, ours: Timing) -> tuple[float, float, float]:
    """Median speed-up (reference median / our median) and its range over the paired repeats."""
    pairs = [r / o for r, o in zip(reference.seconds, ours.seconds, strict=True) if o > 0]
    return reference.median / ours.median, min(pairs), max(pairs)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """CPU model, cores, GPU (if any), Python and the versions of the libraries that are timed."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in ("torch", "numpy", "mlflow", "optuna", "segmentation-models-pytorch", "rasterio"):
        info[package] = _version(package)
    info["opencv"] = _version("opencv-python-headless")
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        info["gpu"] = "none"
    return info


def figure(
    name: str,
    value: float,
    unit: str,
    goal: str,
    met: bool,
    **details: Any,
) -> dict[str, Any]:
    """One row of results.json: the figure, its value and unit, the goal in words and whether it is met.

    ``details`` holds the raw numbers (reference/ours medians and spreads, sizes, notes).
    """
    return {"figure": name, "value": float(value), "unit": unit, "goal": goal, "met": bool(met), **details}


def write_results(figures: Sequence[dict[str, Any]], path: str | Path = DEFAULT_RESULTS) -> Path:
    """Merge figures into ``path`` (replacing earlier entries of the same name); add the machine facts."""
    path = Path(path)
    existing: list[dict[str, Any]] = []
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            existing = []
    names = {f["figure"] for f in figures}
    machine = machine_info()
    merged = [f for f in existing if f.get("figure") not in names]
    merged += [{**f, "machine": machine} for f in figures]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return path


def print_figures(figures: Sequence[dict[str, Any]]) -> None:
    """One line per figure: name, value, unit, goal and MET/MISSED."""
    for f in figures:
        state = "MET" if f["met"] else "MISSED"
        print(f"{f['figure']}: {f['value']:.4g} {f['unit']} (goal {f['goal']}) {state}", flush=True)


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--results`` (the results.json to merge into) and ``--repeats``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results.json to merge into")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each side (median reported)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    return parser


def limit_threads(threads: int) -> None:
    """Pin torch and OpenCV to ``threads`` threads (1 gives per-core figures)."""
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
