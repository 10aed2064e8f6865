"""GPU check in one command: the platform's own fold, prediction and step paths on a CUDA card.

``bench/gpu_check.sh prepare`` (on a CPU machine with the project's venv) downloads into ``.whl/`` the
wheels a bare GPU host lacks (``gpu_wheels.py`` computes the list); ``bench/gpu_check.sh run`` (on the host,
from the repository root, ``.whl/`` carried along) installs the missing ones into ``.whl/site`` and runs
this script under ``timeout 480``. Four parts, each writing its rows as soon as it ends (a timeout keeps
what finished):

1. **fold**: ``train.fold.train_fold`` as ``train`` runs it (AMP precision, fused AdamW, the learning-rate
   schedule, DataLoader workers over a ``SampleCache`` with the training augmentation, validation, OOF,
   ``best.pt``/``last.pt``, the ``FoldRecorder``), with a ``NullTracker``: no tracking store, which is not
   what is checked here. A U-Net/ResNet-34 (weights none) at 1024², ``--epochs`` x (training images /
   ``--batch``) optimiser steps (by default 15 x 16 = 240) on synthetic images rendered in memory by
   ``data.synth.render_image`` in worker processes (no JPEG 2000 written or decoded: decoding is the CPU's
   work, timed by bench_cache.py and bench_scale.py). Rows: the last epoch's training loss over the
   first (every loss finite), and the training passes' images/s after the first epoch (warm-up).
2. **predict**: a 5 members x 5 folds U-Net/ResNet-34 ensemble of fresh weights, packaged as ``promote``
   packages one (``package_ensemble``); ``EnsemblePredictor(folder, device)`` on batches of
   1024² images with TTA none and D4 (the models' time: ``predict_folder`` decodes in worker processes
   and writes from threads beside it). Rows: images/s each way, and the 1,025 test images with D4
   extrapolated from the D4 rate (goal <= 10 min; the seed: 6 hours on a T4).
3. **step**: ``bench_train_step.run``: AMP vs fp32, images/s and the fraction of the card's dense bf16 peak.
4. **cache**: ``bench_cache.run`` with as many decoding processes as the host has usable cores (16 on the
   H200 host) against the one-process build, on ``--cache-images`` synthetic 2048² JPEG 2000 images
   (1024² entries, byte-identical both ways), and the training set's 5,923 images extrapolated from our
   rate: what issue 14 priced at ~1.5 h "while a GPU host's other cores idle". On a 2-core machine one
   process already decodes on both cores (bench_cache.py's docstring); a host with more cores than one
   JPEG 2000 decode keeps busy is where the processes can show. Last, since it needs no GPU.

Rows are merged into ``--results`` (results.json), ``--rows`` (``bench/gpu_check.json``, the committed copy
``bench_scale.py`` reads, since ``make bench`` starts results.json afresh) and the marked section of
``--readme``. ``--device cpu --quick`` is the dry run: the same code, tiny sizes (64 px, 2 x 2 ensemble);
its files go to a temporary folder unless given.

The host gets rasterio (36 MB of the wheels) rather than a way round it: ``train.loop`` imports
``train.oof``, which imports ``data.io`` (rasterio) at module level, as ``train.checkpoint`` and
``inference`` do, and this check runs the platform's modules unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import common

ENCODER = "resnet34"
TEST_IMAGES = 1025
TRAINING_IMAGES = 5923
CACHE_SPEEDUP_GOAL = 1.7  # bench_cache.py's goal for 2 processes, asked of all the host's cores here
GOAL_MINUTES = 10.0
RATE_GOAL = TEST_IMAGES / (GOAL_MINUTES * 60)  # images/s
FOLD_RATE_GOAL = 60.0  # images/s at 1024² (bench_train_step's H100-class goal)
START, END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"
PRESETS = {  # full: on the GPU host; quick: the dry run
    "full": {"size": 1024, "images": 160, "k": 5, "batch": 8, "epochs": 15, "members": 5, "folds": 5,
             "predict_batch": 4, "predict_repeats": 3, "repeats": 3, "cache_images": 16},
    "quick": {"size": 64, "images": 8, "k": 2, "batch": 2, "epochs": 2, "members": 2, "folds": 2,
              "predict_batch": 2, "predict_repeats": 1, "repeats": 1, "cache_images": 4},
}  # fmt: skip
GOALS = {
    "gpu_check_fold_loss_ratio": "< 1 (the loss falls), every epoch's loss finite, all planned AMP steps run",
    "gpu_check_fold_train_images_per_s": f">= {FOLD_RATE_GOAL:g} images/s at 1024² (H100-class), data feed included",
    "gpu_check_predict_images_per_s_none": f">= {RATE_GOAL:.2f} images/s (1,025 images in 10 min)",
    "gpu_check_predict_images_per_s_d4": f">= {RATE_GOAL:.2f} images/s (1,025 images in 10 min)",
    "gpu_check_predict_minutes_1025_d4": "<= 10 min for 1,025 images, 25 checkpoints, D4 (the seed: 6 h on a T4)",
    "train_step_speedup_gpu": ">= 2.5x with AMP",
    "train_step_images_per_s_gpu": ">= 60 images/s at 1024² (H100-class)",
    "gpu_check_cache_build_speedup_all_cores": f">= {CACHE_SPEEDUP_GOAL:g}x with one decoding process per usable core "
    "vs 1, entries byte-identical",
}


def _render(job: tuple[int, int, int]) -> tuple:
    """One synthetic image (in a worker process): city, rgb, agl, scale, angle, gsd."""
    import numpy as np

    from geopose_mlops.constants import CITIES
    from geopose_mlops.data.synth import render_image

    index, size, seed = job
    city = CITIES[index % len(CITIES)]
    image = render_image(np.random.default_rng([seed, index]), city, size)
    return city, image.rgb, image.agl, image.scale, image.angle, image.gsd


def synthetic_cache(images: int, size: int, folder: Path, workers: int):
    """A ``SampleCache`` of ``images`` synthetic images of ``size``², held in memory (rendered by ``workers``)."""
    import numpy as np

    from geopose_mlops.constants import CITIES
    from geopose_mlops.data.cache import SampleCache
    from geopose_mlops.data.pool import decode_pool

    jobs = [(i, size, 0) for i in range(images)]
    if workers > 1:
        with decode_pool(min(workers, images)) as pool:
            rendered = list(pool.map(_render, jobs))
    else:
        rendered = [_render(job) for job in jobs]
    cities = [r[0] for r in rendered]
    column = [np.array([r[i] for r in rendered], dtype=np.float32) for i in (3, 4, 5)]
    return SampleCache(
        path=folder, fingerprint=f"gpu-check-{images}x{size}", image_size=size,
        ids=[f"{city}_{i:05d}" for i, city in enumerate(cities)], cities=cities,
        rgb=np.stack([r[1] for r in rendered]), agl=np.stack([r[2] for r in rendered]).astype(np.float32),
        scale=column[0], angle=column[1], gsd=column[2],
        city_index=np.array([CITIES.index(c) for c in cities], dtype=np.int64),
    )  # fmt: skip


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed_training_passes(passes: list[tuple[int, float]], device):
    """Record ``(optimiser steps, seconds)`` of each ``loop.train_one_epoch`` call (fold.py calls it via the module)."""
    from geopose_mlops.train import loop

    original = loop.train_one_epoch

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        _synchronize(device)
        passes.append((result.steps, time.perf_counter() - start))
        return result

    loop.train_one_epoch = timed
    try:
        yield
    finally:
        loop.train_one_epoch = original


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, dry run)"


def fold_rows(opts: argparse.Namespace, device, cache) -> list[dict]:
    """Part 1: one fold of ``train_fold`` on the cache; the loss ratio and training-rate rows."""
    import pandas as pd

    from geopose_mlops.config import ModelConfig, TrainConfig
    from geopose_mlops.train import distributed, loop
    from geopose_mlops.train.data import PreparedData
    from geopose_mlops.train.fold import FoldRequest, train_fold
    from geopose_mlops.train.tracker import NullTracker

    folds = [i % opts.k for i in range(len(cache))]
    table = pd.DataFrame({"id": cache.ids, "city": cache.cities, "fold": folds})
    train_images = sum(f != 0 for f in folds)
    config = TrainConfig(
        data_dir=str(opts.workdir), model=ModelConfig(encoder=ENCODER, decoder="Unet", encoder_weights="none"),
        epochs=opts.epochs, batch_size=opts.batch, image_size=cache.image_size, k=opts.k, folds=(0,),
        num_workers=opts.loader_workers, amp=True,
    )  # fmt: skip
    epochs: list[dict[str, float]] = []
    request = FoldRequest(
        config=config, data=PreparedData(cache, table), fold=0, cv_run_id="gpu-check", work_dir=opts.workdir / "fold0",
        progress=False, on_epoch_end=lambda fold, epoch, metrics: epochs.append(dict(metrics)),
    )  # fmt: skip
    passes: list[tuple[int, float]] = []
    start = time.perf_counter()
    with timed_training_passes(passes, device):
        result = train_fold(request, NullTracker(), distributed.DistributedContext(device=device))
    losses = [m["train_loss"] for m in epochs]
    steady = passes[1:] or passes
    rate = train_images * len(steady) / sum(seconds for _, seconds in steady)
    planned = opts.epochs * math.ceil(train_images / opts.batch)
    steps = sum(s for s, _ in passes)
    details = {
        "device": _device_name(device), "precision": loop.make_precision(device, True).name,
        "encoder": ENCODER, "size": cache.image_size, "batch": opts.batch, "train_images": train_images,
        "val_images": len(cache) - train_images, "epochs": len(epochs), "optimiser_steps": steps,
        "planned_steps": planned, "train_losses": losses, "best_val_score": result.best_score,
        "loader_workers": opts.loader_workers, "fold_seconds": time.perf_counter() - start,
        "training_pass_seconds": [seconds for _, seconds in passes],
    }  # fmt: skip
    finite = all(math.isfinite(x) for x in losses)
    ratio = losses[-1] / losses[0] if finite and losses[0] > 0 else math.inf
    print(f"fold: {steps} steps, loss {losses[0]:.4g} -> {losses[-1]:.4g}, {rate:.1f} images/s", flush=True)
    rate_met = device.type == "cuda" and cache.image_size == 1024 and rate >= FOLD_RATE_GOAL
    name = "gpu_check_fold_loss_ratio"
    return [
        common.figure(name, ratio, "x (last / first epoch)", GOALS[name], finite and ratio < 1 and steps == planned,
                      **details),
        common.figure("gpu_check_fold_train_images_per_s", rate, "images/s",
                      GOALS["gpu_check_fold_train_images_per_s"], rate_met, **details),
    ]  # fmt: skip


def package_ensemble(folder: Path, members: int, folds: int, image_size: int) -> Path:
    """``members`` x ``folds`` fresh U-Net/ResNet-34s (weights none), packaged as ``promote`` packages an ensemble.

    ``ensemble.json`` (equal weights) and ``checkpoints/<member>/fold<N>.pt`` in ``best.pt``'s format: what
    ``EnsemblePredictor`` reads. No training is needed to time the arithmetic.
    """
    import torch

    from geopose_mlops.config import ModelConfig, TrainConfig
    from geopose_mlops.constants import CHECKPOINT_DIR, ENSEMBLE_JSON
    from geopose_mlops.ensemble.fit import EnsembleSpec
    from geopose_mlops.models.factory import build_model
    from geopose_mlops.train.checkpoint import save_checkpoint

    names = [f"member{m}" for m in range(members)]
    config = TrainConfig(model=ModelConfig(encoder=ENCODER, encoder_weights="none"), image_size=image_size)
    for m, name in enumerate(names):
        for fold in range(folds):
            torch.manual_seed(100 * m + fold)
            model = build_model(config.model).eval()
            save_checkpoint(folder / CHECKPOINT_DIR / name / f"fold{fold}.pt", model, None, None, config, fold, 0, 0, 0)
    equal = [1 / members] * members
    EnsembleSpec(names, "equal", equal, equal, equal, image_size=image_size).save(folder / ENSEMBLE_JSON)
    return folder


def predict_rows(opts: argparse.Namespace, device, cache) -> list[dict]:
    """Part 2: a members x folds ensemble's prediction rate with TTA none and D4, and 1,025 images with D4."""
    import numpy as np

    from geopose_mlops.inference import EnsemblePredictor

    folder = package_ensemble(opts.workdir / "ensemble", opts.members, opts.folds, cache.image_size)
    predictor = EnsemblePredictor(folder, device=device, amp=True)
    n = opts.predict_batch
    batch = (np.asarray(cache.rgb[:n]), np.asarray(cache.gsd[:n]), list(cache.cities[:n]))
    checkpoints = opts.members * opts.folds
    details = {
        "device": _device_name(device), "precision": predictor.precision.name, "image_size": cache.image_size,
        "ensemble": f"{opts.members} members x {opts.folds} folds, U-Net {ENCODER}", "checkpoints": checkpoints,
        "batch": n, "batches_timed": opts.predict_repeats,
    }  # fmt: skip
    rates = {}
    for tta in ("none", "d4"):
        predictor.predict(*batch, tta=tta)  # warm-up: kernels, allocator
        start = time.perf_counter()
        for _ in range(opts.predict_repeats):
            predictor.predict(*batch, tta=tta)
        rates[tta] = n * opts.predict_repeats / (time.perf_counter() - start)
        print(f"predict {opts.members}x{opts.folds}, TTA {tta}: {rates[tta]:.3g} images/s", flush=True)
    minutes = TEST_IMAGES / rates["d4"] / 60 * (25 / checkpoints)
    scaled = {} if checkpoints == 25 else {"scaled_from": f"{checkpoints} checkpoints, x 25 / {checkpoints}"}
    on_gpu = device.type == "cuda"
    rows = [
        common.figure(f"gpu_check_predict_images_per_s_{tta}", rates[tta], "images/s",
                      GOALS[f"gpu_check_predict_images_per_s_{tta}"], on_gpu and rates[tta] >= RATE_GOAL,
                      tta=tta, **details)
        for tta in ("none", "d4")
    ]  # fmt: skip
    name = "gpu_check_predict_minutes_1025_d4"
    rows.append(common.figure(name, minutes, "min", GOALS[name], on_gpu and minutes <= GOAL_MINUTES,
                              tta="d4", images=TEST_IMAGES, **scaled, **details))  # fmt: skip
    return rows


def step_rows(opts: argparse.Namespace, device) -> list[dict]:
    """Part 3: ``bench_train_step`` on this device (its rows merged into ``--results`` by it)."""
    import bench_train_step

    args = ["--device", str(device), "--results", str(opts.results), "--repeats", str(opts.repeats)]
    if opts.quick:
        args += ["--size", str(opts.size), "--batch", "1", "--steps", "1"]
    return bench_train_step.run(args)


def cache_rows(opts: argparse.Namespace) -> list[dict]:
    """Part 4: ``bench_cache`` with one decoding process per usable core vs one process; the training set priced."""
    import bench_cache

    from geopose_mlops.data.pool import usable_cores

    workers = max(2, usable_cores())
    args = ["--workers", str(workers), "--images", str(opts.cache_images), "--repeats", "1"]
    args += ["--results", str(opts.workdir / "cache-results.json"), "--workdir", str(opts.workdir)]
    if opts.quick:
        args += ["--size", "256", "--image-size", "128"]
    (measured,) = bench_cache.run(args)
    details = {key: value for key, value in measured.items() if key not in ("figure", "value", "unit", "goal", "met")}
    details["device"] = f"cpu ({workers} decoding processes)"
    for side in ("ours", "reference"):  # the training set at the measured rates (issue 14: ~1.5 h in one process)
        details[f"{side}_hours_{TRAINING_IMAGES}"] = measured[f"{side}_s_per_image"]["median"] * TRAINING_IMAGES / 3600
    name = "gpu_check_cache_build_speedup_all_cores"
    met = measured["value"] >= CACHE_SPEEDUP_GOAL and measured["byte_identical"] and not opts.quick
    return [common.figure(name, measured["value"], "x", GOALS[name], met, **details)]


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the gpu_check markers replaced (appended under a heading if absent)."""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + section + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n## GPU rows (`bench/gpu_check.sh`)\n\n" + section + "\n"


def _details(row: dict) -> str:
    if row.get(f"ours_hours_{TRAINING_IMAGES}") is not None:  # the cache build
        return (f"{row['workers']} processes, {row['images']} images of {row['source_size']}² at {row['image_size']}²; "
                f"{TRAINING_IMAGES:,} images: {row[f'ours_hours_{TRAINING_IMAGES}']:.2f} h "
                f"(1 process: {row[f'reference_hours_{TRAINING_IMAGES}']:.2f} h)")
    keys = ("precision", "size", "image_size", "batch", "optimiser_steps", "ensemble", "tta", "scaled_from")
    text = ", ".join(f"{k} {row[k]}" for k in keys if row.get(k) is not None)
    if row.get("fraction_of_bf16_peak"):
        text += f"; {row['achieved_tflops']:.0f} TFLOP/s = {row['fraction_of_bf16_peak']:.1%} of the dense bf16 peak"
    return text


def readme_section(rows: list[dict]) -> str:
    """The marked README section: every row measured (with its device) and every GPU row still unmeasured."""
    lines = [START, "", "_Written by `bench/gpu_check.py` from `bench/gpu_check.json`; edit around the markers._", ""]
    lines += ["| figure | value | goal | met | device | measured with |", "|---|---|---|---|---|---|"]
    by_name = {row["figure"]: row for row in rows}
    for name in [*GOALS, *(n for n in by_name if n not in GOALS)]:
        row = by_name.get(name)
        if row is None:
            lines.append(f"| {name} | not measured | {GOALS[name]} | NOT RUN | | no GPU host has run the check yet |")
            continue
        state = "MET" if row["met"] else "**MISSED**"
        value = f"{row['value']:.4g} {row['unit']}"
        lines.append(f"| {name} | {value} | {row['goal']} | {state} | {row.get('device', '')} | {_details(row)} |")
    machines = {
        f"GPU {m.get('gpu')}, CPU {m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}, "
        f"Python {m.get('python')}"
        for m in (row.get("machine", {}) for row in rows)
    }
    lines += ["", *(f"Machine: {m}." for m in sorted(machines)), *([""] if machines else []), END]
    return "\n".join(lines)


def record(figures: list[dict], opts: argparse.Namespace) -> None:
    """Merge rows into results.json and the rows file, then rewrite the README section from the rows file."""
    common.write_results(figures, opts.results)
    common.write_results(figures, opts.rows)
    rows = json.loads(opts.rows.read_text())
    readme = opts.readme.read_text() if opts.readme.is_file() else "# Benchmarks\n"
    opts.readme.write_text(replace_section(readme, readme_section(rows)))
    common.print_figures(figures)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (the dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the dry run)")
    parser.add_argument("--results", type=Path, default=None, help="results.json to merge into")
    parser.add_argument("--rows", type=Path, default=None, help="the GPU rows file (default bench/gpu_check.json)")
    parser.add_argument("--readme", type=Path, default=None, help="README whose gpu_check section is rewritten")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers of the fold")
    for key, value in PRESETS["full"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"(default {value})")
    opts = parser.parse_args(argv)
    for key, value in PRESETS["quick" if opts.quick else "full"].items():
        setattr(opts, key, value if getattr(opts, key) is None else getattr(opts, key))
    return opts


def _default_paths(opts: argparse.Namespace, on_gpu: bool) -> None:
    out = common.BENCH_DIR if on_gpu else Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-"))
    opts.results = opts.results or (common.DEFAULT_RESULTS if on_gpu else out / "results.json")
    opts.rows = opts.rows or (out / "gpu_check.json" if on_gpu else opts.results.parent / "gpu_check.json")
    opts.readme = opts.readme or (out / "README.md" if on_gpu else opts.results.parent / "README.md")


def run_check(opts: argparse.Namespace) -> int:
    """The four parts on ``--device``; 2 where that device is not there."""
    import torch

    from geopose_mlops.data.pool import usable_cores

    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {opts.device}: no CUDA device here; `--device cpu --quick` is the dry run", file=sys.stderr)
        return 2
    _default_paths(opts, device.type == "cuda")
    if opts.loader_workers is None:
        opts.loader_workers = max(0, min(12, usable_cores() - 2)) if device.type == "cuda" else 0
    start = time.perf_counter()
    workdir = opts.workdir
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=workdir) as tmp:
        opts.workdir = Path(tmp)
        cache = synthetic_cache(opts.images, opts.size, opts.workdir / "cache", min(16, usable_cores()))
        print(f"{opts.images} synthetic images of {opts.size}² in {time.perf_counter() - start:.0f} s", flush=True)
        record(fold_rows(opts, device, cache), opts)
        record(predict_rows(opts, device, cache), opts)
    record(step_rows(opts, device), opts)
    with tempfile.TemporaryDirectory(prefix="gpu-check-cache-", dir=workdir) as tmp:
        opts.workdir = Path(tmp)
        record(cache_rows(opts), opts)
    print(f"gpu_check: {time.perf_counter() - start:.0f} s; rows in {opts.results}, {opts.rows}, {opts.readme}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_check(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
