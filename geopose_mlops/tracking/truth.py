"""Every MLflow call of the truth set: one ``data`` run per data fingerprint holds the true heights.

Beside the runs of SPEC §4: a run tagged ``geopose.kind=data`` with the params ``data_fingerprint`` (the
cache fingerprint, which includes the image size), ``image_size`` and ``n_images``, the tag
``geopose.cache_entry`` (the cache folder it was written from) and the artifact ``truth/``
(``train/truth.py``): the true heights of every training image of that data, stored once for all the
architectures trained on it, whose fold runs store their predictions only. The first cv run on the data
makes it before its folds start (:func:`store_truth`, from the cache: nothing is decoded again), in its
own experiment; it is found again from any active experiment. Two cv runs making it at once both finish
theirs; then the oldest is kept and the younger deleted, as study runs are (``tracking.studies``). A data
run is FINISHED only once its artifact is complete, and only FINISHED ones are read.

Readers (:func:`stored_truth`; :func:`scoring_truth` for a cv run's ``cv_score``) take the truth, in this
order, from the cache entry named by the tag where it is on this machine with that fingerprint
(memory-mapped, no copy), from the artifact folder in place where the store keeps artifacts in a local
folder, else from a download into the folder the caller gives (and removes).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from geopose_mlops.constants import CODE_VERSION_TAG, FINGERPRINT_PARAM, KIND_TAG
from geopose_mlops.data.cache import SampleCache
from geopose_mlops.errors import DataError, GeoposeError
from geopose_mlops.tracking import artifacts, batches
from geopose_mlops.tracking.runs import code_version
from geopose_mlops.train.oof import has_truth_file
from geopose_mlops.train.truth import TRUTH_DIR, TRUTH_NPY, TruthSet

KIND_DATA = "data"  # geopose.kind of the run holding a data fingerprint's truth set
CACHE_ENTRY_TAG = "geopose.cache_entry"  # data run: the cache folder its truth was written from


def _experiment_ids(client: MlflowClient) -> list[str]:
    """Ids of every active experiment (all pages)."""
    ids, token = [], None
    while True:
        page = client.search_experiments(page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def data_runs(client: MlflowClient, fingerprint: str) -> list[Run]:
    """The FINISHED data runs of ``fingerprint`` in any active experiment, oldest first."""
    query = (
        f"tags.`{KIND_TAG}` = '{KIND_DATA}' and params.{FINGERPRINT_PARAM} = '{fingerprint}'"
        " and attributes.status = 'FINISHED'"
    )
    runs = client.search_runs(_experiment_ids(client), query)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def store_truth(cv_run_id: str, cache: SampleCache) -> str:
    """The data run holding the truth set of ``cache``'s data: the one stored before, else one made now.

    Args:
        cv_run_id: The cv run training on the cache (a new data run goes into its experiment).
        cache: The training data at the training size; its ``agl`` is written as float16.

    Returns:
        The data run's id (of two made at once, the oldest: the other is deleted).
    """
    client = MlflowClient()
    found = data_runs(client, cache.fingerprint)
    if found:
        return found[0].info.run_id
    mine = _create_data_run(client, client.get_run(cv_run_id).info.experiment_id, cache)
    oldest = data_runs(client, cache.fingerprint)[0].info.run_id
    if oldest != mine:  # another cv run stored the same truth first: keep only that one
        client.delete_run(mine)
    return oldest


def _create_data_run(client: MlflowClient, experiment_id: str, cache: SampleCache) -> str:
    """A FINISHED data run holding ``truth/`` of ``cache`` (FAILED if writing it fails)."""
    tags = {KIND_TAG: KIND_DATA, CACHE_ENTRY_TAG: str(Path(cache.path).resolve()), CODE_VERSION_TAG: code_version()}
    run = client.create_run(experiment_id, tags=tags, run_name=f"data-{cache.fingerprint[:12]}")
    run_id = run.info.run_id
    try:
        params = {
            FINGERPRINT_PARAM: cache.fingerprint,
            "image_size": str(cache.image_size),
            "n_images": str(len(cache)),
        }
        batches.log_values(client, run_id, params=params)
        truth = TruthSet.from_cache(cache)
        local = artifacts.local_artifact_dir(run.info.artifact_uri)
        if local is not None:  # written straight into the store: no copy of the largest artifact there is
            truth.save(local / TRUTH_DIR)
        else:
            with tempfile.TemporaryDirectory(prefix="geopose-truth-") as tmp:
                client.log_artifacts(run_id, str(truth.save(Path(tmp) / TRUTH_DIR)), TRUTH_DIR)
    except BaseException:
        with contextlib.suppress(MlflowException, OSError):  # the first error is the one to report
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def _local_cache(entry: str | None, fingerprint: str) -> SampleCache | None:
    """The cache entry at ``entry`` if it is on this machine and holds ``fingerprint``'s data."""
    if not entry or not Path(entry).is_dir():
        return None
    try:
        cache = SampleCache.open(entry)
    except DataError:
        return None
    return cache if cache.fingerprint == fingerprint else None


def stored_truth(fingerprint: str, dest: Path) -> TruthSet:
    """The truth set of a data fingerprint: the local cache, the store's folder in place, or a download.

    Args:
        fingerprint: The ``data_fingerprint`` of the cv runs.
        dest: Folder a download goes into (the caller removes it once done with the truth set).

    Raises:
        GeoposeError: No data run holds that fingerprint's truth.
    """
    client = MlflowClient()
    runs = data_runs(client, fingerprint)
    if not runs:
        raise GeoposeError(
            f"no finished data run (tag {KIND_TAG}={KIND_DATA}) holds the true heights of data fingerprint "
            f"{fingerprint} in {mlflow.get_tracking_uri()}; a cv run on that data stores it before training "
            "(or restore a deleted data run)"
        )
    run = runs[0]
    cache = _local_cache(run.data.tags.get(CACHE_ENTRY_TAG), fingerprint)
    if cache is not None:
        return TruthSet.from_cache(cache)
    local = artifacts.local_artifact_dir(run.info.artifact_uri)
    if local is not None and (local / TRUTH_DIR / TRUTH_NPY).is_file():
        return TruthSet.open(local / TRUTH_DIR)
    return TruthSet.open(artifacts.download_artifact(client, run.info.run_id, TRUTH_DIR, dest))


def scoring_truth(
    cv_run_id: str, oof_dirs: Sequence[Path], dest: Path, cache: SampleCache | None = None
) -> TruthSet | None:
    """The truth set a cv run's ``oof/`` folders are scored against.

    Args:
        cv_run_id: The cv run.
        oof_dirs: Its folds' downloaded ``oof/`` folders.
        dest: Folder a download of the truth goes into (removed by the caller).
        cache: The cache trained on here, used when it holds the run's data (its ``data_fingerprint``).

    Returns:
        None where every folder holds its own ``agl_true.npy`` (runs of earlier versions), else the
        cache's truth set or :func:`stored_truth`.
    """
    if all(has_truth_file(folder) for folder in oof_dirs):
        return None
    fingerprint = MlflowClient().get_run(cv_run_id).data.params.get(FINGERPRINT_PARAM, "")
    if cache is not None and cache.fingerprint == fingerprint:
        return TruthSet.from_cache(cache)
    return stored_truth(fingerprint, dest)
