"""Figure 5, tracking overhead: per-epoch time of a fold with full MLflow logging vs logging off.

Both sides run ``train.cv.train_fold`` on the same cached synthetic data with the same seed:

- **tracked**: a real ``tracking.CvTracker`` on a throw-away SQLite store with its artifact folder
  beside it (the default layout): the fold run, one ``log_batch`` of the metrics per epoch, and
  ``checkpoints/best.pt``, ``oof/`` and ``checkpoints/last.pt`` stored every ``checkpoint_interval_s``
  and after the last epoch, exactly as ``geopose-ml train`` runs it.
- **off**: a tracker whose methods do nothing. Checkpoints are still written locally (training always
  does), so the difference is exactly the cost of MLflow.

A tiny model (``--encoder``, default resnet18 U-Net, at ``--size`` px) makes the overhead as visible as
it gets: training work per epoch is small and the logged files are a model's checkpoints (174 MB for
``last.pt``). An epoch is timed from the start of one ``train_one_epoch`` to the start of the next,
the last one to the end of ``train_fold`` (so the final upload, the summary and closing the run are
in it); the first epoch of each fold (warm-up, run creation) is left out. No ``on_epoch_end``
callback is passed: as in ``train`` (a tuning callback makes the epoch wait for its metrics to be
written, ~11 ms, so that one writer at a time touches the store). Tracked and untracked folds
alternate in ABBA order.

Goal: overhead <= 2% of the epoch time.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

OVERHEAD_GOAL = 0.02  # fraction of the untracked epoch time


class TimedTracker:
    """Wraps a tracker and adds up the seconds spent in each of its methods (where the overhead goes)."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.seconds: dict[str, float] = {}

    def __getattr__(self, name: str):
        method = getattr(self.tracker, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


class TrackingOff:
    """The ``CvTracker`` interface with every call a no-op (logging off)."""

    def start_fold_run(self, *args, **kwargs) -> str:
        return "untracked"

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet18", help="encoder of the tiny U-Net")
    parser.add_argument("--size", type=int, default=64, help="image side, pixels")
    parser.add_argument("--images-per-city", type=int, default=4, help="synthetic images per city (2 folds)")
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs per fold, as train's default (the first is not timed)"
    )
    parser.set_defaults(repeats=4)
    opts = parser.parse_args(args)
    common.limit_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-tracking-", dir=opts.workdir) as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        import mlflow

        from geopose_mlops.config import ModelConfig, TrainConfig
        from geopose_mlops.data.synth import make_synthetic_dataset
        from geopose_mlops.tracking import CvTracker
        from geopose_mlops.train import loop
        from geopose_mlops.train.cv import prepare_data, train_fold

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.MlflowClient().create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
        make_synthetic_dataset(root / "data", opts.images_per_city, opts.size, seed=0)
        config = TrainConfig(
            data_dir=str(root / "data"),
            model=ModelConfig(encoder=opts.encoder, decoder="Unet", encoder_weights="none"),
            epochs=opts.epochs,
            batch_size=4,
            image_size=opts.size,
            k=2,
            amp=False,
        )
        data = prepare_data(config, root / "cache")
        tracker = TimedTracker(CvTracker("bench"))
        cv_run_id = tracker.start_cv_run(config, data.cache.fingerprint)

        stamps: list[float] = []
        train_one_epoch = loop.train_one_epoch

        def stamped_epoch(*args, **kwargs):
            stamps.append(time.perf_counter())
            return train_one_epoch(*args, **kwargs)

        loop.train_one_epoch = stamped_epoch  # train_fold calls it through the module

        def fold_epochs(tracked: bool, index: int) -> list[float]:
            stamps.clear()
            train_fold(
                config,
                data,
                0,
                tracker if tracked else TrackingOff(),
                cv_run_id,
                root / "work" / f"{'on' if tracked else 'off'}-{index}",
                progress=False,
            )
            edges = [*stamps, time.perf_counter()]
            return [b - a for a, b in zip(edges, edges[1:], strict=False)][1:]

        fold_epochs(True, -1)  # warm-up: imports, first run, allocator
        tracker.seconds.clear()
        tracked, off = [], []
        # ABBA order (tracked, off, off, tracked, ...): the kernel writes back each fold's checkpoints
        # seconds later, in the next fold's epochs; alternating which side comes first spreads that
        # over both sides instead of always charging it to the same one.
        for index in range(opts.repeats):
            for side in (True, False) if index % 2 == 0 else (False, True):
                (tracked if side else off).extend(fold_epochs(side, index))
        tracker.end_run(cv_run_id)
        checkpoint_mb = (root / "work" / "on-0" / "last.pt").stat().st_size / 1e6
    on_s, off_s = statistics.median(tracked), statistics.median(off)
    overhead = on_s / off_s - 1.0
    figures = [
        common.figure(
            "tracking_overhead",
            overhead * 100,
            "%",
            f"<= {OVERHEAD_GOAL:.0%} of the epoch time",
            overhead <= OVERHEAD_GOAL,
            tracked_epoch_s=common.Timing(tracked).summary(),
            untracked_epoch_s=common.Timing(off).summary(),
            encoder=opts.encoder,
            size=opts.size,
            train_images=len(data.folds_table) - int((data.folds_table["fold"] == 0).sum()),
            checkpoint_mb=checkpoint_mb,
            epochs_timed_per_side=len(tracked),
            tracker_s_per_epoch={k: v / (opts.epochs * opts.repeats) for k, v in sorted(tracker.seconds.items())},
        )
    ]
    common.write_results(figures, opts.results)
    common.print_figures(figures)
    print(f"epoch {off_s:.3f} s untracked, {on_s:.3f} s tracked (last.pt {checkpoint_mb:.0f} MB)", flush=True)
    spent = ", ".join(f"{k} {v:.3f}" for k, v in figures[0]["tracker_s_per_epoch"].items())
    print(f"seconds per epoch in tracker calls: {spent}", flush=True)
    return figures


if __name__ == "__main__":
    run(sys.argv[1:])
