"""Scale: each stage's time, peak memory and bytes per image, priced for the full data set; writes scale.md.

Measured at a small N through the platform's own functions, on synthetic 2048² lossless JPEG 2000
(``make_synthetic_dataset``: ``--images-per-city`` training and ``--test-images-per-city`` test images
in each of ``--cities``), cached and trained at ``--image-size`` 1024², U-Net/ResNet-34 (weights none):

- **data check**: ``check_dataset(decode=True, workers)``, every file decoded.
- **cache build**: ``build_cache(workers)``.
- **training epoch**: ``loop.train_one_epoch`` over fold 0's training images of a 2-fold split, with the
  training augmentation, ``make_precision(amp=True)``, ``build_optimizer``: a real epoch at this N, after
  one untimed step (oneDNN builds its kernels on the first).
- **validation pass**: ``loop.predict_validation`` over every training image (each fold's OOF).
- **checkpoints**: ``save_checkpoint`` of ``last.pt`` (with AdamW's state) and ``best.pt`` (weights), as
  every epoch of a fold writes them.
- **OOF write**: ``OofPredictions.save`` (predictions only: the truth is the data's truth set, written
  once: ``TruthSet.save``, its own row).
- **ensemble fit**: ``read_image_table`` + ``fit_ensemble`` (simplex, city factors, scale model) on two
  members' OOF folders (the second the first's predictions with noise): linear in images x members, an
  upper bound (the weight search runs on per-(city, fold) statistics).
- **promote**: a copy (``shutil.copyfile``) of a ``best.pt`` per checkpoint, twice: the registry packages
  each fold's ``best.pt`` (a hard link where the store is on this disk, else a copy) and then logs the
  package to the artifact store. MLflow's own model logging is not timed (promote is being reworked).
- **predict 5 x 5 with D4**: ``predict_folder(EnsemblePredictor(1 x 1 ensemble), tta="d4")`` over the
  test images (decode, 8 views, upsampling, writes), plus 24 x 8 more forwards per image, each timed
  with ``EnsemblePredictor.predict`` (TTA none): the 24 checkpoints a 5 x 5 ensemble has more.

Peak memory: the resident set of this process and its worker processes, summed (shared pages count in
each), sampled every 10 ms from ``/proc`` (psutil is not installed here), above its value when the
stage starts, and its peak. The study priced: ``--train-images`` 5,923 and ``--test-images`` 1,025,
``--k`` 5 folds x ``--architectures`` 5 (ResNet-34 U-Nets) x ``--epochs`` 10, a 25-checkpoint ensemble
with D4. The GPU column takes the rates of ``bench/gpu_check.json`` (``gpu_check.py``) where a GPU host
measured them; stages that run on the CPU or the disk keep this machine's time there.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from gpu_check import package_ensemble

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import CITIES
from geopose_mlops.data import io
from geopose_mlops.data.augment import build_train_augmentation
from geopose_mlops.data.cache import build_cache
from geopose_mlops.data.check import check_dataset
from geopose_mlops.data.dataset import EpochSampler, GeoposeDataset
from geopose_mlops.data.folds import make_folds
from geopose_mlops.data.layout import find_samples
from geopose_mlops.data.pool import decode_pool, usable_cores
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.ensemble.fit import fit_ensemble
from geopose_mlops.ensemble.stats import MemberOof, read_image_table
from geopose_mlops.inference import EnsemblePredictor, predict_folder
from geopose_mlops.models.factory import build_model
from geopose_mlops.models.losses import build_loss
from geopose_mlops.train import loop
from geopose_mlops.train.checkpoint import save_checkpoint
from geopose_mlops.train.oof import OofPredictions
from geopose_mlops.train.truth import TruthSet

OOF_GOAL_MB = 2.2  # per image per architecture at 1024²
NOT_MEASURED = "not measured (no GPU lent)"
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss() -> int:
    """Resident bytes of this process and its descendants (``/proc``; shared pages counted in each)."""
    total, stack = 0, [os.getpid()]
    while stack:
        pid = stack.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            for task in Path(f"/proc/{pid}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Stage:
    """One stage measured at small N and its count in the study (``units`` of ``unit``)."""

    name: str
    seconds: float
    units: int
    unit: str
    study_units: int
    peak_mb: float
    above_mb: float
    bytes_per_unit: float = 0.0
    study_bytes_units: int = 0
    on_gpu: bool = False  # runs on the GPU there (else a CPU or disk stage, priced as here)
    gpu_s_per_unit: float | None = None
    gpu_note: str = ""
    note: str = ""

    @property
    def s_per_unit(self) -> float:
        return self.seconds / self.units


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """``(result, seconds, peak MB, MB above the start)`` of one call, the resident set sampled every 10 ms."""
    start_rss, peak, done = tree_rss(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], tree_rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
    top = max(peak[0], tree_rss(), start_rss)
    return result, seconds, top / 1e6, (top - start_rss) / 1e6


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file)."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def data_stages(opts, data: Path, tmp: Path, study: dict) -> tuple[list[Stage], Any]:
    """Data check and cache build; the cache."""
    n_train, n_test = len(find_samples(data, "train")), len(find_samples(data, "test"))
    if opts.workers > 1:  # start the forkserver once, untimed: a long run pays that second once, not per image
        with decode_pool(opts.workers) as pool:
            pool.submit(int).result()
    _, s, peak, above = measured(lambda: check_dataset(data, decode=True, workers=opts.workers))
    check = Stage("data check", s, n_train + n_test, "image", study["train"] + study["test"], peak, above)
    samples = find_samples(data, "train")
    cache, s, peak, above = measured(lambda: build_cache(samples, tmp / "cache", opts.image_size, False, opts.workers))
    per_image = folder_bytes(cache.path) / n_train
    build = Stage("cache build", s, n_train, "image", study["train"], peak, above, per_image, study["train"])
    return [check, build], cache


def train_stages(opts, cache, tmp: Path, study: dict, gpu: dict) -> tuple[list[Stage], list[Path], Path]:
    """Training epoch, validation pass, checkpoints, OOF write and truth set; the OOF folders and best.pt."""
    folds = {
        sample_id: fold for sample_id, _, fold in make_folds(list(zip(cache.ids, cache.cities, strict=True)), 2, 0)
    }
    train_rows = cache.rows([i for i in cache.ids if folds[i] != 0])
    torch.manual_seed(0)
    config = TrainConfig(model=ModelConfig(encoder="resnet34", encoder_weights="none"), image_size=cache.image_size)
    model = build_model(config.model)
    precision = loop.make_precision("cpu", amp=True)
    optimizer = loop.build_optimizer(model, config.lr, config.weight_decay)
    dataset = GeoposeDataset(cache, train_rows, build_train_augmentation())
    loader = loop.make_loader(dataset, opts.batch, 0, EpochSampler(len(dataset), 0))
    warm = loop.make_loader(GeoposeDataset(cache, train_rows[:1], build_train_augmentation()), 1, 0)
    loop.train_one_epoch(model, warm, optimizer, build_loss("mse"), precision, 1, lambda step: config.lr)  # kernels
    _, s, peak, above = measured(
        lambda: loop.train_one_epoch(model, loader, optimizer, build_loss("mse"), precision, 1, lambda step: config.lr)
    )
    k, e, a, n = study["k"], study["epochs"], study["architectures"], study["train"]
    stages = [Stage("training epoch", s, len(train_rows), "image-step", (k - 1) * n * e * a, peak, above,
                    on_gpu=True, gpu_s_per_unit=gpu.get("train"), gpu_note=gpu.get("train_note", ""),
                    note=f"{precision.name}, batch {opts.batch}, augmentation on")]  # fmt: skip
    every = loop.make_loader(GeoposeDataset(cache, np.arange(len(cache))), opts.batch, 0)
    oof, s, peak, above = measured(lambda: loop.predict_validation(model, every, precision))
    forward, note = gpu.get("forward"), gpu.get("forward_note", "")
    stages.append(Stage("validation pass", s, len(cache), "image", n * e * a, peak, above, on_gpu=True,
                        gpu_s_per_unit=forward, gpu_note=note))  # fmt: skip
    paths = (tmp / "fold" / "last.pt", tmp / "fold" / "best.pt")
    state = (config, 0, 0, 0.0, 0)

    def write_checkpoints() -> None:
        save_checkpoint(paths[0], model, optimizer, precision.scaler, *state, {"val_score": 0.0})
        save_checkpoint(paths[1], model, None, None, *state)

    _, s, peak, above = measured(write_checkpoints)
    size = sum(p.stat().st_size for p in paths)
    stages.append(Stage("checkpoints (last.pt + best.pt)", s, 1, "fold-epoch", k * e * a, peak, above, size, k * a,
                        note="the store keeps each fold run's latest"))  # fmt: skip
    folders, s, peak, above = measured(lambda: _write_oof(oof, folds, tmp / "oof"))
    per_image = sum(folder_bytes(f) for f in folders) / len(cache) / 2  # two members
    stages.append(Stage("OOF write", s / 2, len(cache), "image", n * e * a, peak, above, per_image, n * a,
                        note="priced every epoch (written when the score improves)"))  # fmt: skip
    _, s, peak, above = measured(lambda: TruthSet.from_cache(cache).save(tmp / "truth"))
    stages.append(Stage("truth set (once per data)", s, len(cache), "image", n, peak, above,
                        folder_bytes(tmp / "truth") / len(cache), n))  # fmt: skip
    return stages, folders, paths[1]


def _write_oof(oof: OofPredictions, folds: dict, root: Path) -> list[Path]:
    """Each fold's OOF folder of two members (the second: the first's heights with noise)."""
    rng = np.random.default_rng(0)
    folders = []
    for member in range(2):
        for fold in (0, 1):
            rows = [i for i, sample_id in enumerate(oof.sample_ids) if folds[sample_id] == fold]
            part = {key: getattr(oof, key) for key in OofPredictions.__dataclass_fields__}
            part = {key: [v[i] for i in rows] if isinstance(v, list) else v[rows] for key, v in part.items()}
            if member:
                part["agl_pred"] = (part["agl_pred"] * rng.uniform(0.8, 1.2)).astype(np.float16)
            folders.append(OofPredictions(**part).save(root / f"member{member}" / f"fold{fold}"))
    return folders


def fit_and_promote_stages(opts, cache, folders: list[Path], best: Path, tmp: Path, study: dict) -> list[Stage]:
    """Ensemble fit on the OOF folders and the promote copies of ``best.pt``."""
    members = [MemberOof(f"member{m}", {f: folders[2 * m + f] for f in (0, 1)}) for m in range(2)]
    truth = TruthSet.from_cache(cache)
    (tmp / "fit").mkdir()
    _, s, peak, above = measured(lambda: fit_ensemble(read_image_table(members, truth), "simplex", tmp / "fit"))
    n, a, k = study["train"], study["architectures"], study["k"]
    fit = Stage("ensemble fit", s, 2 * len(cache), "image x member", n * a, peak, above,
                note="linear upper bound")  # fmt: skip
    copies = [tmp / "promote" / f"fold{i}.pt" for i in range(opts.promote_copies)]
    copies[0].parent.mkdir()
    _, s, peak, above = measured(lambda: [shutil.copyfile(best, path) for path in copies])
    promote = Stage("promote (copy per checkpoint)", s, len(copies), "checkpoint copy", 2 * k * a, peak, above,
                    best.stat().st_size, k * a, note="2 copies per checkpoint: package, artifact store")  # fmt: skip
    return [fit, promote]


def predict_stage(opts, data: Path, tmp: Path, study: dict, gpu: dict) -> Stage:
    """Predict with D4: a 1 x 1 ensemble through predict_folder, plus the forwards of 24 more checkpoints."""
    folder = package_ensemble(tmp / "ensemble", 1, 1, opts.image_size)
    predictor = EnsemblePredictor(folder, device="cpu")
    images = data / "test"
    _, s, peak, above = measured(lambda: predict_folder(predictor, images, tmp / "out", "d4", False, batch_size=2))
    n = len(list(images.glob("*_RGB.*")))
    samples = find_samples(data, "test")
    rgb = np.stack([io.read_rgb(sample.rgb_path, size=opts.image_size) for sample in samples])
    gsd, cities = np.array([sample.gsd for sample in samples]), [sample.city for sample in samples]
    forward_s = min(common.time_call(lambda: predictor.predict(rgb, gsd, cities, "none")) for _ in range(3)) / n
    model_bytes = (folder / "checkpoints" / "member0" / "fold0.pt").stat().st_size
    return Stage("predict 5 x 5, D4", s + 24 * 8 * forward_s * n, n, "test image", study["test"], peak, above,
                 folder_bytes(tmp / "out") / n, study["test"], True, gpu.get("d4"), gpu.get("d4_note", ""),
                 note=f"1 x 1 measured + 192 forwards of {forward_s:.2f} s; 5 x 5 holds {24 * model_bytes / 1e9:.1f}"
                      " GB more weights")  # fmt: skip


def gpu_rates(path: Path) -> dict:
    """Seconds per unit on one GPU from gpu_check's rows (those measured on a CUDA device), with notes."""
    rows = json.loads(path.read_text()) if path.is_file() else []
    by = {r["figure"]: r for r in rows if not str(r.get("device", "cpu")).startswith("cpu")}
    out: dict[str, Any] = {}
    train = by.get("gpu_check_fold_train_images_per_s") or by.get("train_step_images_per_s_gpu")
    if train:
        out.update(train=1 / train["value"], train_note=f"{train['value']:.1f} images/s ({train['figure']}, "
                                                          f"{train['device']})")  # fmt: skip
    none, d4 = by.get("gpu_check_predict_images_per_s_none"), by.get("gpu_check_predict_images_per_s_d4")
    if none:
        forwards = none["value"] * none.get("checkpoints", 25)
        out.update(forward=1 / forwards, forward_note=f"{forwards:.1f} forwards/s (5 x 5 predict, TTA none)")
    if d4:
        rate = d4["value"] * d4.get("checkpoints", 25) / 25
        out.update(d4=1 / rate, d4_note=f"{rate:.2f} images/s (gpu_check, models only, {d4['device']})")
    return out


def duration(seconds: float | None) -> str:
    """Seconds in the largest unit that keeps the number readable."""
    if seconds is None:
        return NOT_MEASURED
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.3g} s"


def table(stages: list[Stage], study: dict, opts, seconds: float) -> str:
    """scale.md: the stages, their study totals here and on one GPU, and the bytes left."""
    lines = ["# Scale: the study priced (`bench/bench_scale.py`)", "", __doc__, "",
             f"Measured here: {opts.images_per_city} training and {opts.test_images_per_city} test image(s) per city "
             f"of {opts.cities} at {opts.size}², trained at {opts.image_size}²; {seconds / 60:.1f} min in all. "
             f"Study: {study['train']:,} training + {study['test']:,} test images, {study['k']} folds x "
             f"{study['architectures']} architectures x {study['epochs']} epochs.", "",
             "| stage | measured (N) | per unit here | peak memory (above start) | bytes / unit | study units | "
             "study time here | study time, one GPU | study bytes |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    total_here, total_gpu, gpu_known, total_bytes = 0.0, 0.0, True, 0.0
    for st in stages:
        here = st.s_per_unit * st.study_units
        gpu = st.gpu_s_per_unit * st.study_units if st.gpu_s_per_unit is not None else None
        total_here += here
        total_gpu += gpu if gpu is not None else here
        gpu_known &= not st.on_gpu or gpu is not None
        study_bytes = st.bytes_per_unit * st.study_bytes_units
        total_bytes += study_bytes
        if not st.on_gpu:
            gpu_cell = f"{duration(here)} (a CPU/disk stage: as here)"
        else:
            gpu_cell = NOT_MEASURED if gpu is None else f"{duration(gpu)} ({st.gpu_note})"
        lines.append(
            f"| {st.name} | {st.seconds:.3g} s / {st.units} {st.unit} | {st.s_per_unit:.3g} s / {st.unit}"
            f"{'; ' + st.note if st.note else ''} | {st.peak_mb:,.0f} MB ({st.above_mb:+,.0f}) | "
            f"{st.bytes_per_unit / 1e6:,.2f} MB | {st.study_units:,} | {duration(here)} | {gpu_cell} | "
            f"{study_bytes / 1e9:,.1f} GB |"
        )  # fmt: skip
    gpu_total = duration(total_gpu) if gpu_known else NOT_MEASURED
    lines.append(
        f"| **total** | | | | | | **{duration(total_here)}** | **{gpu_total}** | **{total_bytes / 1e9:,.0f} GB** |"
    )
    return "\n".join(lines) + "\n"


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    for flag, default in (("--size", 2048), ("--image-size", 1024), ("--images-per-city", 2),
                          ("--test-images-per-city", 1), ("--batch", 1), ("--promote-copies", 2),
                          ("--workers", usable_cores()), ("--train-images", 5923), ("--test-images", 1025),
                          ("--k", 5), ("--architectures", 5), ("--epochs", 10)):  # fmt: skip
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--cities", default="ARG,ATL", help="comma-separated cities of the synthetic data")
    parser.add_argument("--gpu-rows", type=Path, default=common.BENCH_DIR / "gpu_check.json")
    parser.add_argument("--out", type=Path, default=None, help="scale.md (default: beside --results)")
    opts = parser.parse_args(args)
    study = {"train": opts.train_images, "test": opts.test_images, "k": opts.k,
             "architectures": opts.architectures, "epochs": opts.epochs}  # fmt: skip
    gpu = gpu_rates(opts.gpu_rows)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=opts.workdir) as tmp:
        tmp, cities = Path(tmp), [c for c in opts.cities.split(",") if c in CITIES]
        make_synthetic_dataset(tmp / "data", opts.images_per_city, opts.size, 0, cities, opts.test_images_per_city)
        stages, cache = data_stages(opts, tmp / "data", tmp, study)
        trained, folders, best = train_stages(opts, cache, tmp, study, gpu)
        stages += trained + fit_and_promote_stages(opts, cache, folders, best, tmp, study)
        stages.append(predict_stage(opts, tmp / "data", tmp, study, gpu))
    oof = next(st for st in stages if st.name == "OOF write")
    mb = oof.bytes_per_unit * (1024 / opts.image_size) ** 2 / 1e6
    name = "oof_bytes_per_image_per_architecture_1024"
    figure = common.figure(name, mb, "MB", f"<= {OOF_GOAL_MB} MB (float16 predictions; the truth stored once)",
                           mb <= OOF_GOAL_MB, measured_at=opts.image_size, images=oof.units)  # fmt: skip
    text = table(stages, study, opts, time.perf_counter() - start)
    text += f"\n{name}: {mb:.3f} MB (goal <= {OOF_GOAL_MB} MB) {'MET' if figure['met'] else 'MISSED'}"
    text += f"{'' if opts.image_size == 1024 else f', scaled from {opts.image_size}²'}.\n"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text += _gpu_predict_line(opts.gpu_rows) + f"\n\nMachine: {common.cpu_model()}, {common.usable_cores()} cores, "
    text += f"load average at the end {load} (a shared machine: times here carry that load).\n"
    out = opts.out or opts.results.parent / "scale.md"
    out.write_text(text)
    print(text, flush=True)
    common.write_results([figure], opts.results)
    common.print_figures([figure])
    return [figure]


def _gpu_predict_line(path: Path) -> str:
    rows = json.loads(path.read_text()) if path.is_file() else []
    row = next((r for r in rows if r["figure"] == "gpu_check_predict_minutes_1025_d4"
                and not str(r.get("device", "cpu")).startswith("cpu")), None)  # fmt: skip
    if row is None:
        return ("On a GPU: the 25-checkpoint ResNet-34 ensemble with D4 over 1,025 images (goal <= 10 min; the "
                f"seed: 6 h on a T4): {NOT_MEASURED}; `bash bench/gpu_check.sh run` measures it.")  # fmt: skip
    state = "MET" if row["met"] else "MISSED"
    return (f"On a GPU ({row['device']}): the 25-checkpoint ResNet-34 ensemble with D4 over 1,025 images: "
            f"{row['value']:.1f} min (goal <= 10 min; the seed: 6 h on a T4) {state}.")  # fmt: skip


if __name__ == "__main__":
    run(sys.argv[1:])
