"""Files of runs: hard links into a local artifact store, and downloads of checkpoints, OOF folders and files.

Writing goes through ``CvTracker`` (``tracking.runs``); the downloads are plain functions of a client, so
that fitting an ensemble (``tracking.ensembles``) reads OOF folders the way training does.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from geopose_mlops.constants import CHECKPOINT_DIR, OOF_DIR
from geopose_mlops.errors import ConfigError


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The local folder of an artifact URI (``file:`` URI or plain path); None for remote stores."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path (or a drive letter)
        return Path(artifact_uri)
    return None


def link_into(folder: Path, files: Sequence[Path]) -> bool:
    """Hard-link each file into ``folder`` under its own name, replacing what is there.

    A checkpoint is ~170 MB; in a local artifact store on the same file system a link costs no copy and
    no disk bandwidth that the next epochs' training would compete for. It is safe because training
    never changes a written file in place: every checkpoint and OOF file is written to a temporary file
    and renamed onto its name (``io.atomic_path``), which leaves the stored link on the old content.
    Each link is made beside the source, then renamed into ``folder``: a reader never sees a part file.

    Returns:
        False where a link cannot be made (another file system, one without hard links); the caller
        then copies every file, over any linked before the failure.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for source in files:
        staged = source.with_name(f".{source.name}.{os.getpid()}.link")
        try:
            staged.unlink(missing_ok=True)
            os.link(source, staged)
            os.replace(staged, folder / source.name)
        except OSError:
            staged.unlink(missing_ok=True)
            return False
    return True


def download_artifact(client: MlflowClient, run_id: str, name: str, dest: Path) -> Path:
    """Download one artifact of a run (e.g. ``config.json``, ``folds.csv``) into folder ``dest``; the local file.

    Raises:
        ConfigError: The run has no such artifact.
    """
    try:
        dest.mkdir(parents=True, exist_ok=True)
        return Path(client.download_artifacts(run_id, name, str(dest)))
    except (MlflowException, OSError) as err:
        raise ConfigError(f"run {run_id} has no artifact {name!r} ({err})") from err


def download_checkpoint(client: MlflowClient, run_id: str, name: str, dest: Path) -> Path | None:
    """Download ``checkpoints/<name>`` of a run into folder ``dest``; None if the run has none."""
    names = {Path(f.path).name for f in client.list_artifacts(run_id, CHECKPOINT_DIR)}
    if name not in names:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{name}", str(dest)))


def download_oof(client: MlflowClient, run_id: str, dest: Path) -> Path:
    """Download a fold run's ``oof/`` folder into folder ``dest``; returns the local ``oof`` folder."""
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, OOF_DIR, str(dest)))
