"""The local copy of a fold's records: where it lives, whether it holds anything unsent, and its resume.

Every fold writes its checkpoints (``last.pt``, ``best.pt``, ``oof/``) into its local folder before they
are handed to the tracking store (``train/recorder.py``), and appends each epoch's metrics to
``unsent_epochs.jsonl`` there. The recorder removes that log once the store holds everything it was
handed: a folder with the log may hold records the store lacks; one without it holds none.

Without ``--work-dir`` the folder is ``<user cache>/geopose-mlops/runs/<cv run>/fold_<F>``, the user cache
being ``$XDG_CACHE_HOME`` (an absolute path), else ``~/.cache``. It outlives the process, so a run stopped
by a tracking-store outage (or killed) loses nothing that was trained and written; it is removed as soon
as nothing in it is unsent (a fold FINISHED, or FAILED/KILLED with its records stored). A ``--work-dir``
folder is the user's and is never removed. A resume reads the fold's folder (:func:`kept_records`): the
newer of the stored and the local ``last.pt`` is where training goes on, and the epochs and files the
store lacks are stored first (:func:`send_kept_records`), so the resumed run logs every epoch once and
recomputes none that was kept.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geopose_mlops.constants import BEST_NAME, LAST_NAME, OOF_DIR
from geopose_mlops.errors import DataError
from geopose_mlops.train.checkpoint import load_checkpoint
from geopose_mlops.train.recorder import (
    UNSENT_EPOCHS,
    UnsentFiles,
    holds_unsent,
    mark_stored,
    read_unsent_epochs,
    store_records,
)
from geopose_mlops.train.tracker import Tracker

DOWNLOAD_DIR = "download"  # where a resume downloads the stored last.pt, inside the fold's folder


def default_runs_root() -> Path:
    """``$XDG_CACHE_HOME/geopose-mlops/runs``, or ``~/.cache/geopose-mlops/runs`` (XDG ignores relative paths)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return cache / "geopose-mlops" / "runs"


@dataclass(frozen=True)
class LocalFolder:
    """Where the folds of cv runs keep their local records.

    Attributes:
        root: Fold ``F`` of cv run ``R`` uses ``root/R/fold_F``.
        removable: The folder is the package's own (no ``--work-dir``): a fold's folder is removed once
            it holds nothing unsent.
    """

    root: Path
    removable: bool

    def fold_dir(self, cv_run_id: str, fold: int) -> Path:
        """The local folder of one fold of a cv run."""
        return self.root / cv_run_id / f"fold_{fold}"

    def remove_if_stored(self, cv_run_id: str, fold: int) -> None:
        """Remove the fold's folder (then the cv run's, if empty) when it is removable and holds nothing unsent."""
        folder = self.fold_dir(cv_run_id, fold)
        if not self.removable or holds_unsent(folder) or not folder.is_dir():
            return
        shutil.rmtree(folder)
        try:
            folder.parent.rmdir()  # other folds (or workers on this machine) may still use it
        except OSError:
            pass

    def unsent_folds(self, cv_run_id: str) -> list[str]:
        """Names of the cv run's fold folders that hold records the store may lack (``fold_0``, ...)."""
        return sorted(p.parent.name for p in (self.root / cv_run_id).glob(f"fold_*/{UNSENT_EPOCHS}"))


def local_folder(work_dir: str | Path | None) -> LocalFolder:
    """``work_dir`` (kept), or the package's folder under the user cache (removed once stored)."""
    if work_dir is not None:
        return LocalFolder(Path(work_dir), removable=False)
    return LocalFolder(default_runs_root(), removable=True)


@dataclass
class KeptRecords:
    """Where a resumed fold goes on, and what the store lacks of what was kept locally.

    Attributes:
        state: The newer of the stored and the local ``last.pt`` (None: neither exists).
        epochs: ``(epoch, metrics)`` up to ``state``'s epoch that the store has not logged.
        files: The local ``best.pt``, ``oof/`` and ``last.pt`` when they are newer than the stored ones.
    """

    state: dict[str, Any] | None
    epochs: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    files: UnsentFiles = field(default_factory=UnsentFiles)


def kept_records(tracker: Tracker, run_id: str, local_dir: Path) -> KeptRecords:
    """The resume point of a fold run and the records its store lacks, from the store and ``local_dir``.

    The local ``last.pt`` is used when it is newer than the stored one (the store failed before it was
    uploaded): the epochs after the stored one are not trained again. At the same epoch the stored one is
    used (consistent with the stored ``best.pt``). A process killed while it copied ``last.pt`` into a
    local artifact store can leave that copy cut short; the local checkpoint (written atomically) is then
    used instead.

    Args:
        tracker: The fold run's tracker (rank 0's).
        run_id: The fold run.
        local_dir: The fold's local folder.

    Raises:
        DataError: Checkpoints exist but none can be read (each is named).
    """
    errors: list[str] = []
    stored = _read_checkpoint(tracker.download_checkpoint(run_id, LAST_NAME, local_dir / DOWNLOAD_DIR), errors)
    local = _read_checkpoint(local_dir / LAST_NAME, errors)
    if stored is None and local is None:
        if errors:
            raise DataError(local_dir, f"fold run {run_id}: no readable last checkpoint ({'; '.join(errors)})")
        return KeptRecords(None)
    local_is_newer = local is not None and (stored is None or local["epoch"] > stored["epoch"])
    state = local if local_is_newer else stored
    files = _newer_local_files(local_dir, state) if local_is_newer else UnsentFiles()
    history = read_unsent_epochs(local_dir)
    if state["metrics"]:  # checkpoints carry their own epoch's metrics (for logs of earlier versions)
        history.setdefault(state["epoch"], state["metrics"])
    logged = set(tracker.logged_epochs(run_id))
    epochs = [(e, m) for e, m in sorted(history.items()) if e <= state["epoch"] and e not in logged]
    return KeptRecords(state, epochs, files)


def send_kept_records(tracker: Tracker, run_id: str, kept: KeptRecords, local_dir: Path) -> None:
    """Store what the store lacks of the kept records (metrics, then ``best.pt`` and ``oof/``, then ``last.pt``).

    Then the folder holds nothing unsent: its ``unsent_epochs.jsonl`` is removed (epochs in it after the
    resume point are trained, and recorded, again).
    """
    store_records(tracker, run_id, kept.epochs, kept.files)
    mark_stored(local_dir)


def _read_checkpoint(path: Path | None, errors: list[str]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None: no such file, or unreadable: its error is added to ``errors``)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return load_checkpoint(path)
    except DataError as err:
        errors.append(str(err))
        return None


def _newer_local_files(local_dir: Path, state: dict[str, Any]) -> UnsentFiles:
    """The local ``last.pt``, with ``best.pt`` and ``oof/`` when they are ``state``'s best epoch's.

    A process killed after it wrote an improved epoch's ``best.pt`` but before its ``last.pt`` leaves a
    ``best.pt`` newer than ``state``: it is not sent (that epoch is trained again).
    """
    files = UnsentFiles(last=local_dir / LAST_NAME)
    best, oof = local_dir / BEST_NAME, local_dir / OOF_DIR
    if best.is_file() and oof.is_dir():
        errors: list[str] = []
        best_state = _read_checkpoint(best, errors)
        if best_state is not None and best_state["epoch"] == state["best_epoch"]:
            files.best, files.oof = best, oof
    return files
