"""Figure 5, tracking overhead: per-epoch time of training with full MLflow logging vs logging off.

Both sides train the folds of a 2-fold cross-validation as ``geopose-ml train`` does (``train_fold``
for each fold in turn) on the same cached synthetic data with the same config:

- **tracked**: a real ``tracking.CvTracker`` on a throw-away SQLite store with its artifact folder
  beside it (the default layout): the fold run, the epoch metrics (at most every
  ``metrics_interval_s``), ``checkpoints/best.pt``, ``oof/`` and ``checkpoints/last.pt`` stored every
  ``checkpoint_interval_s`` and after the last epoch, the summary and the closed run, exactly as
  ``geopose-ml train`` runs it (no ``on_epoch_end`` callback: that wait for the store is tuning's).
- **off**: a tracker whose methods do nothing. Checkpoints are still written locally (training always
  does), so the difference is exactly the cost of MLflow.

A tiny model (``--encoder``, default a U-Net over MobileNetV3-small-050, 2.3 M parameters, at
``--size`` px) makes the overhead as visible as it gets: an epoch takes about 0.3 s, so the store's
fixed costs per fold (creating the run, closing it) weigh as much as they ever will. (A resnet18 U-Net
doubles the epoch and writes 230 MB of checkpoints per epoch on each side, whose disk noise then
swamps the figure: ``--encoder resnet18``.)

**Taking turns.** This machine's speed drifts by 5-10% over seconds (other tenants, disk write-back),
more than the overhead to be measured, so two folds run one after the other differ by that much
whatever they log. Here the tracked and the untracked cross-validation run *together*, in two threads
that take turns one epoch at a time (only one trains at any moment; the other waits for its turn), so
each tracked epoch is timed next to an untracked one under the same load. A turn runs from the start
of one ``train_one_epoch`` to the start of the next: the first turn also holds building the model and
creating the run; the turn across folds one fold's final upload, summary and closing and the next
fold's start; the last one the final upload, the summary and closing the run. Which side goes first
alternates between pairs: in A/A runs (both sides untracked) the side going second was 2-4% slower,
so the pairs come in even numbers, which cancels it. One pair runs first as a warm-up.

The figure is the ratio of the summed turn times (the mean epoch time, every cost counted) minus one;
the 90% interval comes from resampling the pairs (two at a time, one of each order). Two things the
turns shift, both small: the tracked side's background writes (epoch metrics every
``metrics_interval_s``) may overlap the untracked side's turn, and since both sides share the wall
clock that interval comes up about twice as often per fold as it would alone.

Goal: overhead <= 2% of the epoch time.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import common

OVERHEAD_GOAL = 0.02  # fraction of the untracked epoch time
TRACKED, OFF = "tracked", "off"


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


class Turns:
    """Two sides take turns: one runs while the other waits, and each turn's seconds are recorded."""

    def __init__(self, first: str, second: str) -> None:
        self._order = (first, second)
        self._turn = 0
        self._running = {first, second}
        self._cond = threading.Condition()
        self._started: dict[str, float] = {}
        self.seconds: dict[str, list[float]] = {first: [], second: []}

    def take(self, side: str) -> None:
        """Wait until it is ``side``'s turn (or the other side has finished), then start its clock."""
        with self._cond:
            self._cond.wait_for(lambda: self._order[self._turn] == side or self._running == {side})
        self._started[side] = time.perf_counter()

    def give(self, side: str, finished: bool = False) -> None:
        """Stop ``side``'s clock and hand the turn to the other side."""
        self.seconds[side].append(time.perf_counter() - self._started[side])
        with self._cond:
            if finished:
                self._running.discard(side)
            self._turn = 1 - self._turn
            self._cond.notify_all()


def run_pair(
    train_side: Callable[[str], None], first: str, second: str, local: threading.local
) -> dict[str, list[float]]:
    """Run both sides' folds in two threads that take turns epoch by epoch; return each side's turns."""
    turns = Turns(first, second)
    errors: list[BaseException] = []

    def side_thread(side: str) -> None:
        local.turns, local.side, local.epochs = turns, side, 0
        turns.take(side)
        try:
            train_side(side)
        except BaseException as err:  # re-raised in the main thread
            errors.append(err)
        finally:
            turns.give(side, finished=True)

    threads = [threading.Thread(target=side_thread, args=(side,), name=f"fold-{side}") for side in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return turns.seconds


def interval(pairs: list[tuple[float, float]], level: float = 0.90, resamples: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(tracked) / sum(off) - 1 over (tracked, off) pairs.

    Pairs are resampled in blocks of two consecutive ones (one with each side first), since which side
    goes first shifts a pair's ratio by a few percent either way (it cancels within a block).
    """
    blocks = [pairs[i : i + 2] for i in range(0, len(pairs), 2)]
    rng = random.Random(0)
    estimates = []
    for _ in range(resamples):
        sample = [pair for _ in blocks for pair in blocks[rng.randrange(len(blocks))]]
        estimates.append(sum(t for t, _ in sample) / sum(o for _, o in sample) - 1.0)
    estimates.sort()
    low = estimates[int((1 - level) / 2 * resamples)]
    high = estimates[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return low, high


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="tu-mobilenetv3_small_050", help="encoder of the tiny U-Net")
    parser.add_argument("--size", type=int, default=64, help="image side, pixels")
    parser.add_argument("--images-per-city", type=int, default=4, help="synthetic images per city")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per fold, as train's default")
    parser.set_defaults(repeats=16)  # pairs of 2-fold cross-validations (tracked + off) timed
    opts = parser.parse_args(args)
    opts.repeats += opts.repeats % 2  # as many pairs with each side first
    common.limit_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-tracking-", dir=opts.workdir) as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        import mlflow

        from geopose_mlops.config import ModelConfig, TrainConfig
        from geopose_mlops.data.synth import make_synthetic_dataset
        from geopose_mlops.tracking.runs import CvTracker
        from geopose_mlops.train import loop
        from geopose_mlops.train.data import prepare_data
        from geopose_mlops.train.fold import FoldRequest, train_fold

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

        local = threading.local()  # each fold thread's turns, side and epochs started
        train_one_epoch = loop.train_one_epoch

        def epoch_in_turn(*args, **kwargs):
            if local.epochs:  # the previous epoch (validation, checkpoints, logging) ends here
                local.turns.give(local.side)
                local.turns.take(local.side)
            local.epochs += 1
            return train_one_epoch(*args, **kwargs)

        loop.train_one_epoch = epoch_in_turn  # train_fold calls it through the module

        def train_side(label: str) -> Callable[[str], None]:
            def train(side: str) -> None:  # the fold loop of train (cv.run_folds)
                for fold in config.fold_list():
                    work_dir = root / "work" / f"{side}-{label}" / f"fold_{fold}"
                    request = FoldRequest(
                        config=config, data=data, fold=fold, cv_run_id=cv_run_id, work_dir=work_dir, progress=False
                    )
                    train_fold(request, tracker if side == TRACKED else TrackingOff())

            return train

        run_pair(train_side("warmup"), TRACKED, OFF, local)  # imports, first run, allocator
        tracker.seconds.clear()
        tracked: list[list[float]] = []
        off: list[list[float]] = []
        for index in range(opts.repeats):
            first, second = (TRACKED, OFF) if index % 2 == 0 else (OFF, TRACKED)
            seconds = run_pair(train_side(str(index)), first, second, local)
            tracked.append(seconds[TRACKED])
            off.append(seconds[OFF])
        loop.train_one_epoch = train_one_epoch
        tracker.end_run(cv_run_id)
        checkpoint_mb = (root / "work" / f"{TRACKED}-0" / "fold_0" / "last.pt").stat().st_size / 1e6
    pairs = [(sum(t), sum(o)) for t, o in zip(tracked, off, strict=True)]
    overhead = sum(t for t, _ in pairs) / sum(o for _, o in pairs) - 1.0
    low, high = interval(pairs)
    tracked_turns = [s for fold in tracked for s in fold]
    off_turns = [s for fold in off for s in fold]
    # Epochs in the middle of a fold (no run to create or close): what logging costs a typical epoch.
    inner = [e for e in range(len(tracked[0])) if e % opts.epochs not in (0, opts.epochs - 1)] or [0]
    middle = statistics.median(fold[e] for fold in tracked for e in inner) / statistics.median(
        fold[e] for fold in off for e in inner
    )
    epochs = len(tracked_turns)
    figures = [
        common.figure(
            "tracking_overhead",
            overhead * 100,
            "%",
            f"<= {OVERHEAD_GOAL:.0%} of the epoch time",
            overhead <= OVERHEAD_GOAL,
            interval_90_percent=[low * 100, high * 100],
            middle_epoch_overhead_percent=(middle - 1.0) * 100,
            tracked_epoch_s=common.Timing(tracked_turns).summary(),
            untracked_epoch_s=common.Timing(off_turns).summary(),
            pairs=opts.repeats,
            folds_per_side=len(config.fold_list()),
            encoder=opts.encoder,
            size=opts.size,
            train_images=len(data.folds_table) - int((data.folds_table["fold"] == 0).sum()),
            checkpoint_mb=checkpoint_mb,
            tracker_s_per_epoch={k: v / epochs for k, v in sorted(tracker.seconds.items())},
        )
    ]
    common.write_results(figures, opts.results)
    common.print_figures(figures)
    print(
        f"mean epoch {statistics.mean(off_turns):.3f} s untracked, {statistics.mean(tracked_turns):.3f} s tracked "
        f"(last.pt {checkpoint_mb:.0f} MB); overhead {overhead:.2%}, 90% interval {low:.2%} to {high:.2%}; "
        f"mid-fold epochs (median) {middle - 1.0:+.2%}",
        flush=True,
    )
    spent = ", ".join(f"{k} {v:.4f}" for k, v in figures[0]["tracker_s_per_epoch"].items())
    print(f"seconds per epoch in tracker calls: {spent}", flush=True)
    return figures


if __name__ == "__main__":
    run(sys.argv[1:])
