"""What a fold run stores, and when: epoch metrics and checkpoints uploaded in the background, and the run's end.

In a background thread while the next epoch trains, the epochs' metrics are logged (at most every
``metrics_interval_s``) and then the files uploaded (when ``checkpoint_interval_s`` has passed); both
always when the fold ends or stops. The store never holds a ``last.pt`` newer than its metrics, so a run
killed at any point resumes from the stored ``last.pt`` with no epoch missing from the log or logged
twice (``train/fold.py``).

Each epoch's metrics are also appended to ``unsent_epochs.jsonl`` in the fold's local folder (beside its
``last.pt``) before they are handed over, and that log is removed once the store holds everything the
recorder was handed: a folder with the log may hold records the store lacks, and a resume stores them
(``train/local_copy.py``).
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from geopose_mlops.config import TrainConfig
from geopose_mlops.train.tracker import Tracker

UNSENT_EPOCHS = "unsent_epochs.jsonl"  # one {"epoch", "metrics"} line per epoch handed to the store


def append_epoch(folder: Path, epoch: int, metrics: dict[str, float]) -> None:
    """Add one epoch's metrics to the folder's ``unsent_epochs.jsonl`` (created with the folder if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"epoch": int(epoch), "metrics": {k: float(v) for k, v in metrics.items()}})
    with (folder / UNSENT_EPOCHS).open("a") as handle:
        handle.write(line + "\n")


def read_unsent_epochs(folder: Path) -> dict[int, dict[str, float]]:
    """The metrics in the folder's ``unsent_epochs.jsonl`` by epoch (empty without the file).

    A process killed while it appended leaves at most its last line cut short: such a line is skipped
    (that epoch's metrics are also in its ``last.pt``, or it is trained again).
    """
    path = folder / UNSENT_EPOCHS
    if not path.is_file():
        return {}
    epochs = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            epochs[int(record["epoch"])] = {str(k): float(v) for k, v in record["metrics"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return epochs


def holds_unsent(folder: Path) -> bool:
    """True when the folder may hold records the store lacks (its ``unsent_epochs.jsonl`` exists)."""
    return (folder / UNSENT_EPOCHS).is_file()


def mark_stored(folder: Path) -> None:
    """Record that the store holds everything in the folder (its ``unsent_epochs.jsonl`` is removed)."""
    (folder / UNSENT_EPOCHS).unlink(missing_ok=True)


class RunOutcome(enum.Enum):
    """How a run ends; the value is the status it is closed with."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"  # stopped from outside: a signal, or the caller's callback (pruning)
    # The tracking store is down: closing the run would fail (after retries) too. The run stays RUNNING
    # until it is resumed.
    LEFT_OPEN = "RUNNING"


@dataclass
class UnsentFiles:
    """Checkpoint files written locally since the last upload (None: nothing new of that kind)."""

    best: Path | None = None
    oof: Path | None = None
    last: Path | None = None

    def take(self) -> UnsentFiles:
        """Return the pending files and forget them."""
        taken = UnsentFiles(self.best, self.oof, self.last)
        self.best = self.oof = self.last = None
        return taken


def summary_metrics(best_score: float, best_epoch: int) -> dict[str, float]:
    """A finished fold's ``best_val_score`` and ``best_epoch`` (SPEC §4), logged at step 0."""
    return {"best_val_score": float(best_score), "best_epoch": float(best_epoch)}


def store_records(tracker: Tracker, run_id: str, epochs: list[tuple[int, dict]], files: UnsentFiles) -> None:
    """Store epoch metrics, then ``best.pt`` and ``oof/``, then ``last.pt``.

    The store so never holds a ``last.pt`` newer than its logged metrics or its ``best.pt``: a resume
    from the stored ``last.pt`` finds every epoch up to it logged (and retrains the later ones it finds
    logged without logging them again).
    """
    if epochs:
        tracker.log_epochs(run_id, epochs)
    if files.best is not None:
        tracker.log_checkpoint(run_id, files.best)
    if files.oof is not None:
        tracker.log_oof(run_id, files.oof)
    if files.last is not None:
        tracker.log_checkpoint(run_id, files.last)


class EpochUploads:
    """Uploads one epoch's checkpoints and metrics in a background thread while the next epoch trains.

    Checkpoints of a ResNet U-Net with optimizer state are ~170 MB; copying two of them per epoch into
    the artifact store in the training thread cost more than half of a small model's epoch. One task
    runs at a time, in order; ``wait`` re-raises a failed upload so it is never silently lost, and
    after a failure nothing more is stored (a later checkpoint must not land past unlogged epochs).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geopose-upload")
        self._pending: Future | None = None
        self._failed = False

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Start ``fn(*args)`` after the previous upload has finished (nothing once one has failed)."""
        self.wait()
        if not self._failed:
            self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Block until the pending upload is done; raise its error, if any."""
        pending = self._pending
        if pending is None:
            return
        error = pending.exception()  # blocks; a signal arriving here leaves the task pending, not failed
        self._pending = None
        if error is not None:
            self._failed = True
            raise error

    def close(self) -> None:
        """Finish the pending upload (raising its error) and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _is_store_error(error: Exception) -> bool:
    """Whether a fold failed on the tracking store.

    MLflow is imported only here, once a fold has failed, so a fold with a store-less tracker (``NullTracker``)
    runs where MLflow is not installed (bench/gpu_check.py on a bare GPU host).
    """
    try:
        from geopose_mlops.tracking.store import is_store_error
    except ModuleNotFoundError:  # no MLflow here: not a tracking-store error
        return False
    return is_store_error(error)


class FoldRecorder:
    """The records of one fold run: its epochs' metrics and checkpoints, stored in order, and its outcome.

    Used as a context manager around the fold's epochs: leaving it stores what is pending (when the fold
    stopped early) and closes the run with its :class:`RunOutcome`. The outcome is FAILED until
    :meth:`finish`; a ``KeyboardInterrupt`` (Ctrl-C, SIGTERM) makes it KILLED, a tracking-store error
    LEFT_OPEN.

    Args:
        tracker: The fold run's tracker (a ``NullTracker`` on ranks other than 0).
        run_id: The fold run.
        config: The cross-validation's configuration (epochs, upload intervals in seconds).
        logged: Epochs the store already holds (a resume from an older ``last.pt``): they are trained
            again (same seeds) but not logged twice.
    """

    def __init__(self, tracker: Tracker, run_id: str, config: TrainConfig, logged: set[int]) -> None:
        self.outcome = RunOutcome.FAILED
        self._tracker, self._run_id = tracker, run_id
        self._last_epoch = config.epochs - 1
        self._checkpoint_interval_s = config.checkpoint_interval_s
        self._metrics_interval_s = config.metrics_interval_s
        self._logged = logged
        self._uploads = EpochUploads()
        self._unsent = UnsentFiles()
        self._unlogged: list[tuple[int, dict]] = []  # (epoch, metrics) not yet handed to the store
        self._local_dir: Path | None = None  # the fold's local folder, once an epoch was recorded
        self._summary_sent: tuple[float, int] | None = None  # handed over with the last epoch's metrics
        self._last_upload = self._last_metrics = time.monotonic()

    def __enter__(self) -> FoldRecorder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if isinstance(error, KeyboardInterrupt):
            self.outcome = RunOutcome.KILLED
        elif isinstance(error, Exception) and _is_store_error(error):
            self.outcome = RunOutcome.LEFT_OPEN
        self.close()

    def wait(self) -> None:
        """Block until the pending upload is done (raising its error).

        Before the local files are rewritten (the last epoch's upload must be done), and before a
        callback that logs too (one writer at a time).
        """
        self._uploads.wait()

    def record_epoch(
        self,
        epoch: int,
        metrics: dict[str, float],
        last: Path,
        best: Path | None = None,
        oof: Path | None = None,
        summary: tuple[float, int] | None = None,
    ) -> None:
        """Hand one epoch's metrics and its newly written files to the store, when they are due.

        The metrics are also appended to ``unsent_epochs.jsonl`` beside ``last`` (the fold's local folder).

        Args:
            epoch: The finished epoch, 0-based.
            metrics: Its metrics.
            last: Its ``last.pt``.
            best: Its ``best.pt``, when the score improved.
            oof: Its ``oof/`` folder, when the score improved.
            summary: ``(best score, best epoch)`` so far. After the last epoch it goes in the same request
                as that epoch's metrics, and ``finish`` sends it again only if it changed.
        """
        self._unsent.last = last
        if best is not None:
            self._unsent.best, self._unsent.oof = best, oof
        if epoch not in self._logged:
            self._unlogged.append((epoch, metrics))
        self._local_dir = last.parent
        append_epoch(self._local_dir, epoch, metrics)  # kept until the store holds it
        # Checkpoints are large (a ResNet U-Net with AdamW state: ~170 MB): upload them every
        # checkpoint_interval_s and after the last epoch, not after every short epoch. Metrics go at
        # most every metrics_interval_s, and always with the checkpoints.
        now = time.monotonic()
        files_due = epoch == self._last_epoch or now - self._last_upload >= self._checkpoint_interval_s
        if files_due or now - self._last_metrics >= self._metrics_interval_s:
            files = self._unsent.take() if files_due else UnsentFiles()
            if epoch == self._last_epoch and summary is not None:  # one request fewer per fold
                self._unlogged.append((0, summary_metrics(*summary)))
                self._summary_sent = summary
            self._uploads.submit(store_records, self._tracker, self._run_id, self._unlogged, files)
            self._unlogged, self._last_metrics = [], now
            if files_due:
                self._last_upload = now

    @contextlib.contextmanager
    def stopping_means_killed(self) -> Iterator[None]:
        """Inside, an exception is the caller's decision to stop (pruning): the run would end KILLED."""
        self.outcome = RunOutcome.KILLED
        yield
        self.outcome = RunOutcome.FAILED

    def finish(self, best_score: float, best_epoch: int) -> None:
        """Wait for the uploads, log the fold's summary and mark the run FINISHED."""
        self._uploads.wait()
        if self._summary_sent != (best_score, best_epoch):
            self._tracker.log_fold_summary(self._run_id, best_score, best_epoch)
        self.outcome = RunOutcome.FINISHED

    def close(self) -> None:
        """Store what is pending if the fold stopped early, stop the upload thread and end the run.

        Once everything handed over is stored, the local folder's ``unsent_epochs.jsonl`` is removed.
        A failed upload (or a signal while waiting for one) leaves it: the local folder is then kept.
        """
        try:
            stopped = self.outcome not in (RunOutcome.FINISHED, RunOutcome.LEFT_OPEN)
            if stopped and (self._unlogged or self._unsent.last is not None):
                # stopped early (error, signal, pruning): keep the epochs and the last good checkpoint
                self._uploads.submit(store_records, self._tracker, self._run_id, self._unlogged, self._unsent.take())
            self._uploads.close()
            if self.outcome is not RunOutcome.LEFT_OPEN and self._local_dir is not None:
                mark_stored(self._local_dir)
        finally:
            if self.outcome is not RunOutcome.LEFT_OPEN:
                self._tracker.end_run(self._run_id, self.outcome.value)
