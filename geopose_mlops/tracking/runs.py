"""Runs written by training: ``CvTracker`` creates, finds and fills the runs of one cross-validation.

Also here: the code version and params every cv run carries, and the plain reads of those runs that
other stages need without a tracker (``fold_runs``, ``find_finished_cv_run``, ``cv_score``). Batched
logging is in ``tracking.batches``, artifact links and downloads in ``tracking.artifacts``, the
experiment look-up in ``tracking.experiments``.

SPEC §4: a parent run tagged ``geopose.kind=cv`` (or the caller's kind, e.g. ``trial``) holds the
configuration, the data set input, ``folds.csv``, ``config.json`` and the out-of-fold scores; one nested
run per fold (``geopose.kind=fold``) holds per-epoch metrics (``step`` = epoch), the best and last
checkpoints and the best epoch's ``oof/`` files. Fold runs (and trial runs) carry ``geopose.cv_group``
(``cv_group``): one readable value per cross-validation, so that the MLflow UI's *Group by* that tag
charts each cross-validation's mean curve with its min/max band. Runs are addressed by id through
``MlflowClient``, so training never depends on (or disturbs) the fluent API's active-run stack; a run
started by ``mlflow run`` (``MLFLOW_RUN_ID``) is adopted as the parent.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

import geopose_mlops
from geopose_mlops.config import TrainConfig, save_json_config
from geopose_mlops.constants import (
    CHECKPOINT_DIR,
    CODE_VERSION_TAG,
    CONFIG_JSON,
    DEFAULT_EXPERIMENT,
    FINGERPRINT_PARAM,
    FOLD_TAG,
    FOLDS_CSV,
    KIND_CV,
    KIND_FOLD,
    KIND_TAG,
    KIND_TRIAL,
    OOF_DIR,
)
from geopose_mlops.errors import ConfigError
from geopose_mlops.tracking import artifacts, batches
from geopose_mlops.tracking.experiments import experiment_id
from geopose_mlops.train.recorder import summary_metrics

SKIPPED_FILES = "skipped_files.csv"  # artifact of a cv run trained with skip_bad
CV_GROUP_TAG = "geopose.cv_group"  # fold and trial runs: the cross-validation they belong to, readable (SPEC §4)


@functools.cache
def code_version() -> str:
    """Package version plus a digest of the package's Python sources: ``0.1.0+src.1a2b3c4d5e6f``.

    Runs are reused (``geopose-ml demo``) only under the same code version; hashing the sources rather
    than naming the git commit means a change to docs or tests does not invalidate trained runs, while
    any change to what trains does. Works the same in a checkout, a wheel or a CI clone.
    """
    package_dir = Path(geopose_mlops.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(path.relative_to(package_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return f"{geopose_mlops.__version__}+src.{digest.hexdigest()[:12]}"


def run_params(config: TrainConfig, data_fingerprint: str) -> dict[str, str]:
    """The params of a cv run (SPEC §4), plus the settings that change what is trained."""
    return {
        "encoder": config.model.encoder,
        "decoder": config.model.decoder,
        "encoder_weights": config.model.encoder_weights,
        "use_metadata": str(config.model.use_metadata),
        "lr": repr(config.lr),
        "batch_size": str(config.batch_size),
        "effective_batch_size": str(config.effective_batch_size or config.batch_size),
        "epochs": str(config.epochs),
        "amp": str(config.amp),
        "image_size": str(config.image_size),
        "crop_size": str(config.crop_size),
        "k": str(config.k),
        "folds": "all" if config.folds is None else ",".join(map(str, config.folds)),
        "seed": str(config.seed),
        "loss": config.loss,
        "weight_decay": repr(config.weight_decay),
        "augment": str(config.augment),
        "height_warp_p": repr(config.height_warp_p),
        "ema": str(config.ema),
        "keep_top": str(config.keep_top),
        "init_from": str(config.init_from),
        FINGERPRINT_PARAM: data_fingerprint,
    }


def cv_group(config: TrainConfig, cv_run_id: str) -> str:
    """The ``geopose.cv_group`` value of a cross-validation's runs: ``Unet/resnet34 lr=0.0001 #ab12``.

    The architecture and learning rate, then the options that change what is trained where they are set
    (effective batch, loss, EMA, top-K averaging, height warp, staged start), then the first characters
    of the cv run id, so two cross-validations of the same settings still form two groups.
    """
    defaults = TrainConfig()
    parts = [f"{config.model.decoder}/{config.model.encoder}", f"lr={config.lr:g}"]
    if config.effective_batch_size and config.effective_batch_size != config.batch_size:
        parts.append(f"batch={config.effective_batch_size}")
    if config.loss != defaults.loss:
        parts.append(f"loss={config.loss}")
    if config.ema is not None:
        parts.append(f"ema={config.ema:g}")
    if config.keep_top is not None:
        parts.append(f"top={config.keep_top}")
    if config.height_warp_p:
        parts.append(f"warp={config.height_warp_p:g}")
    if config.init_from:
        parts.append(f"from=#{config.init_from[:4]}")
    return " ".join([*parts, f"#{cv_run_id[:4]}"])


class CvTracker:
    """Creates, finds and fills the runs of one cross-validation.

    Args:
        experiment: Experiment name (created if missing); ignored for a run adopted from ``mlflow run``
            or resumed, which keeps its own experiment.
    """

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT) -> None:
        self.experiment_name = experiment
        self._experiment_id: str | None = None
        self._client: MlflowClient | None = None
        self._artifact_dirs: dict[str, Path | None] = {}

    @property
    def client(self) -> MlflowClient:
        """The MLflow client, made on first use.

        A tracker made before the arguments are validated so creates nothing (the client is what
        creates a SQLite store's file).
        """
        if self._client is None:
            self._client = MlflowClient()
        return self._client

    @property
    def experiment_id(self) -> str:
        """The experiment's id (it is created on first use)."""
        if self._experiment_id is None:
            self._experiment_id = experiment_id(self.experiment_name, create=True)
        return self._experiment_id

    # --- runs ---------------------------------------------------------------------------------------

    def start_cv_run(
        self,
        config: TrainConfig,
        data_fingerprint: str,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Open the parent run: an existing ``run_id``, the ``mlflow run`` one, or a new run.

        Logs the tags (``geopose.kind`` = ``cv`` unless ``tags`` says otherwise, the code version, and for
        a trial run ``geopose.cv_group``) and params; a run adopted with params already logged keeps them.
        """
        run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
        all_tags = {KIND_TAG: KIND_CV, CODE_VERSION_TAG: code_version(), **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if run_id:
            run = self.client.get_run(run_id)
            self._experiment_id = run.info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = f"cv-{config.model.decoder}-{config.model.encoder}".lower()
            run_id = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id
            run = self.client.get_run(run_id)
        if all_tags[KIND_TAG] == KIND_TRIAL:  # a trial's own curve joins its folds' group
            all_tags[CV_GROUP_TAG] = cv_group(config, run_id)
        params = {k: v for k, v in run_params(config, data_fingerprint).items() if k not in run.data.params}
        self._log(run_id, params=params, tags=all_tags)
        return run_id

    def resume_target(self, run_id: str) -> tuple[str, int | None]:
        """``(cv run id, fold or None)`` for the id of a cv run or of one of its fold runs.

        Raises:
            ConfigError: No such run, or a run that is neither.
        """
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            raise ConfigError(f"--resume {run_id}: no such run in {mlflow.get_tracking_uri()} ({err})") from err
        self._experiment_id = run.info.experiment_id
        if run.data.tags.get(KIND_TAG) == KIND_FOLD:
            return run.data.tags[MLFLOW_PARENT_RUN_ID], int(run.data.tags[FOLD_TAG])
        if FINGERPRINT_PARAM in run.data.params:
            return run_id, None
        raise ConfigError(f"--resume {run_id}: not a cross-validation or fold run (tag {KIND_TAG} missing)")

    def fold_runs(self, cv_run_id: str) -> dict[int, Run]:
        """The existing fold runs under a cv run of this experiment, by fold."""
        return fold_runs(self.client, self.experiment_id, cv_run_id)

    def find_finished_cv_run(self, config: TrainConfig, data_fingerprint: str) -> str | None:
        """A FINISHED top-level cv run of this experiment like ``config`` (see ``find_finished_cv_run``)."""
        return find_finished_cv_run(self.experiment_name, config, data_fingerprint)

    def start_fold_run(
        self,
        cv_run_id: str,
        fold: int,
        config: TrainConfig,
        data_fingerprint: str,
        precision: str | None = None,
        params: dict[str, object] | None = None,
    ) -> str:
        """Create the nested run of one fold with the parent's params plus ``fold``, ``precision`` and ``params``.

        ``precision`` is what the fold really trains in (``bf16``, ``fp16``, ``fp32``): the ``amp``
        param is only the request, and its effect depends on the device. ``params``: the fold's own (its
        output units, the ``r2`` city means), in the same request. Tagged ``geopose.cv_group``.
        """
        tags = {
            KIND_TAG: KIND_FOLD,
            FOLD_TAG: str(fold),
            MLFLOW_PARENT_RUN_ID: cv_run_id,
            CODE_VERSION_TAG: code_version(),
            CV_GROUP_TAG: cv_group(config, cv_run_id),
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"fold-{fold}")
        # Known now: the first checkpoint stored needs no lookup of the run.
        self._artifact_dirs[run.info.run_id] = artifacts.local_artifact_dir(run.info.artifact_uri)
        all_params = {**run_params(config, data_fingerprint), "fold": str(fold)}
        if precision is not None:
            all_params["precision"] = precision
        all_params.update({key: str(value) for key, value in (params or {}).items()})
        self._log(run.info.run_id, params=all_params)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark a resumed run as running again."""
        self.client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self.client.set_terminated(run_id, status=status)

    # --- values -------------------------------------------------------------------------------------

    def _log(
        self,
        run_id: str,
        metrics: dict[str, float] | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Everything in as few requests as possible (one ``log_batch`` per 500 values)."""
        batches.log_values(self.client, run_id, metrics=metrics, params=params, tags=tags)

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """Log one epoch's metrics at ``step = epoch`` in one request."""
        self.log_epochs(run_id, [(epoch, metrics)])

    def log_epochs(self, run_id: str, epochs: Sequence[tuple[int, dict[str, float]]]) -> None:
        """Log several epochs' metrics (``step = epoch``) in as few requests as possible."""
        batches.log_epochs(self.client, run_id, epochs)

    def logged_epochs(self, run_id: str, key: str = "val_score") -> list[int]:
        """The steps at which ``key`` was logged (epochs already recorded), sorted."""
        return sorted(m.step for m in self.client.get_metric_history(run_id, key))

    def log_fold_summary(self, run_id: str, best_score: float, best_epoch: int) -> None:
        """``best_val_score`` and ``best_epoch`` of a finished fold."""
        self._log(run_id, metrics=summary_metrics(best_score, best_epoch))

    def log_params(self, run_id: str, params: dict[str, object]) -> None:
        """More params of a run (a fold's ``r2`` city means, the parent fold run it started from)."""
        self._log(run_id, params={key: str(value) for key, value in params.items()})

    def log_cv_scores(self, cv_run_id: str, scores: dict) -> None:
        """``cv_score`` and ``cv_score_{CITY}`` from a ``GeoposeMetric.compute()`` over all OOF files."""
        metrics = {"cv_score": scores["final_score"]}
        metrics.update({f"cv_score_{city}": values["score"] for city, values in scores["cities"].items()})
        self._log(cv_run_id, metrics=metrics)

    def log_data(self, cv_run_id: str, folds_table: pd.DataFrame, data_dir: str, data_fingerprint: str) -> None:
        """``folds.csv`` as an artifact and the data set as the run's input (digest = data fingerprint)."""
        source = Path(data_dir).resolve().as_uri()
        with warnings.catch_warnings():
            # MLflow warns that a file:// source fits two equivalent local source types, and that integer
            # columns cannot hold missing values (fold never does).
            warnings.simplefilter("ignore", UserWarning)
            # The tracking store keeps at most 36 characters of a digest; the full one is a param.
            dataset = mlflow.data.from_pandas(
                folds_table, source=source, name="geopose-train", digest=data_fingerprint[:36]
            )
            entity = dataset._to_mlflow_entity()  # the schema is inferred (and warned about) here
        context = InputTag(key=MLFLOW_DATASET_CONTEXT, value="training")
        inputs = [DatasetInput(dataset=entity, tags=[context])]
        # The client form of mlflow.log_input: the run is addressed by id, not by the active-run stack.
        try:
            self.client.log_inputs(cv_run_id, inputs)
        except MlflowException as err:
            # The store looks the data set up and inserts it if missing, so two runs logging the same data
            # set at once (tune workers on one server) can both insert it; the second then fails on the
            # data set's unique key, its transaction rolled back. The data set exists now: a second try
            # only links it to this run.
            if not _is_duplicate_dataset(err):
                raise
            self.client.log_inputs(cv_run_id, inputs)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / FOLDS_CSV
            folds_table.to_csv(path, index=False)
            self.client.log_artifact(cv_run_id, str(path))

    def log_skipped_files(self, run_id: str, problems: Sequence[tuple[Path, str]]) -> None:
        """``skipped_files.csv`` (path,reason) on a run: the bad files left out of training."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / SKIPPED_FILES
            rows = [(str(p), r) for p, r in problems]
            pd.DataFrame(rows, columns=["path", "reason"]).to_csv(path, index=False)
            self.client.log_artifact(run_id, str(path))

    def log_config(self, cv_run_id: str, config: TrainConfig) -> None:
        """``config.json``: the TrainConfig that rebuilds this cross-validation."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CONFIG_JSON
            save_json_config(config, path)
            self.client.log_artifact(cv_run_id, str(path))

    def download_artifact(self, run_id: str, name: str, dest: Path) -> Path:
        """Download one artifact of a run (e.g. ``config.json``, ``folds.csv``) into folder ``dest``.

        Raises:
            ConfigError: The run has no such artifact.
        """
        return artifacts.download_artifact(self.client, run_id, name, dest)

    # --- artifacts ----------------------------------------------------------------------------------

    def log_checkpoint(self, run_id: str, path: Path) -> None:
        """Store a checkpoint file under ``checkpoints/`` (same name; replaces the previous one).

        Into a local artifact folder on the same file system the file is hard-linked, not copied
        (see ``artifacts.link_into``); elsewhere MLflow uploads it.
        """
        local = self._local_artifact_dir(run_id)
        if local is None or not artifacts.link_into(local / CHECKPOINT_DIR, [Path(path)]):
            self.client.log_artifact(run_id, str(path), CHECKPOINT_DIR)

    def log_oof(self, run_id: str, folder: Path) -> None:
        """Store the files of an ``oof/`` folder under ``oof/`` (hard links where possible, as above)."""
        local = self._local_artifact_dir(run_id)
        files = sorted(p for p in Path(folder).iterdir() if p.is_file())
        if local is None or not artifacts.link_into(local / OOF_DIR, files):
            self.client.log_artifacts(run_id, str(folder), OOF_DIR)

    def _local_artifact_dir(self, run_id: str) -> Path | None:
        """The run's artifact folder if its artifact store is a local folder, else None (cached per run)."""
        if run_id not in self._artifact_dirs:
            self._artifact_dirs[run_id] = artifacts.local_artifact_dir(self.client.get_run(run_id).info.artifact_uri)
        return self._artifact_dirs[run_id]

    def download_checkpoint(self, run_id: str, name: str, dest: Path) -> Path | None:
        """Download ``checkpoints/<name>`` of a run into ``dest``; None if the run has none."""
        return artifacts.download_checkpoint(self.client, run_id, name, dest)

    def download_oof(self, run_id: str, dest: Path) -> Path:
        """Download a fold run's ``oof/`` folder into ``dest``; returns the local ``oof`` folder."""
        return artifacts.download_oof(self.client, run_id, dest)


def _is_duplicate_dataset(err: MlflowException) -> bool:
    """True for a store's unique-key failure on a data set row (PostgreSQL, MySQL or SQLite wording)."""
    text = str(err).lower()
    return "dataset" in text and ("unique" in text or "duplicate" in text)


def fold_runs(client: MlflowClient, experiment_id: str, cv_run_id: str) -> dict[int, Run]:
    """The existing fold runs under cv run ``cv_run_id`` of experiment ``experiment_id``, by fold."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{cv_run_id}' and tags.`{KIND_TAG}` = '{KIND_FOLD}'",
    )
    return {int(r.data.tags[FOLD_TAG]): r for r in runs}


def find_finished_cv_run(experiment: str, config: TrainConfig, data_fingerprint: str) -> str | None:
    """A FINISHED top-level cv run of ``experiment`` with the same params, data and code version.

    Used to reuse work instead of training again (``geopose-ml demo``); None when there is none (or no
    such experiment).
    """
    try:
        found_in = experiment_id(experiment)
    except ConfigError:
        return None
    wanted = run_params(config, data_fingerprint)
    runs = MlflowClient().search_runs(
        [found_in],
        filter_string=(
            f"tags.`{KIND_TAG}` = '{KIND_CV}' and attributes.status = 'FINISHED'"
            f" and tags.`{CODE_VERSION_TAG}` = '{code_version()}'"
            f" and params.{FINGERPRINT_PARAM} = '{data_fingerprint}'"
        ),
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if MLFLOW_PARENT_RUN_ID in run.data.tags or "cv_score" not in run.data.metrics:
            continue
        if all(run.data.params.get(k) == v for k, v in wanted.items()):
            return run.info.run_id
    return None


def cv_score(run_id: str) -> float:
    """The out-of-fold score (``cv_score``) logged on cv run ``run_id``.

    Raises:
        KeyError: The run has no ``cv_score`` (not finished).
    """
    return MlflowClient().get_run(run_id).data.metrics["cv_score"]
