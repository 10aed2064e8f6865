"""Every MLflow call of training: cross-validation and fold runs, params, metrics, checkpoints, OOF files.

SPEC §4: a parent run tagged ``geopose.kind=cv`` (or the caller's kind, e.g. ``trial``) holds the
configuration, the data set input, ``folds.csv``, ``config.json`` and the out-of-fold scores; one nested
run per fold (``geopose.kind=fold``) holds per-epoch metrics (``step`` = epoch), the best and last
checkpoints and the best epoch's ``oof/`` files. Runs are addressed by id through ``MlflowClient``, so
training never depends on (or disturbs) the fluent API's active-run stack; a run started by
``mlflow run`` (``MLFLOW_RUN_ID``) is adopted as the parent.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
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
    FOLD_TAG,
    KIND_CV,
    KIND_FOLD,
    KIND_TAG,
    OOF_DIR,
)
from geopose_mlops.errors import ConfigError

FINGERPRINT_PARAM = "data_fingerprint"
SKIPPED_FILES = "skipped_files.csv"  # artifact of a cv run trained with skip_bad
MAX_BATCH = 500  # below the tracking server's per-request limit of 1000 metrics


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
        FINGERPRINT_PARAM: data_fingerprint,
    }


def default_artifact_location(name: str) -> str | None:
    """Where a new experiment's artifacts go: beside a local SQLite store, else the server's choice.

    MLflow's own default for a SQLite store is ``./mlruns`` relative to whatever folder a command runs
    in, which scatters checkpoints over working directories; ``sqlite:///.../mlflow.db`` keeps them in
    ``.../mlartifacts/<experiment>`` instead.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if not database.is_absolute():
        database = Path.cwd() / database
    return (database.parent / "mlartifacts" / name).as_uri()


def ensure_experiment(name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created with ``artifact_location`` if it does not exist yet.

    With no ``artifact_location``, ``default_artifact_location`` decides. Workers starting at once (tune
    or fold workers on one server) may all find it missing: those whose creation loses the race take the
    winner's.
    """
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location or default_artifact_location(name))
    except MlflowException as err:
        found = client.get_experiment_by_name(name) if err.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if found is None:
            raise
        return found.experiment_id


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
            self._experiment_id = ensure_experiment(self.experiment_name)
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

        Logs the tags (``geopose.kind`` = ``cv`` unless ``tags`` says otherwise, the code version) and
        params; a run adopted with params already logged keeps them.
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

    def fold_runs(self, cv_run_id: str) -> dict[int, mlflow.entities.Run]:
        """The existing fold runs under a cv run, by fold."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{cv_run_id}' and tags.`{KIND_TAG}` = '{KIND_FOLD}'",
        )
        return {int(r.data.tags[FOLD_TAG]): r for r in runs}

    def find_finished_cv_run(self, config: TrainConfig, data_fingerprint: str) -> str | None:
        """A FINISHED top-level cv run of this experiment with the same params, data and code version.

        Used to reuse work instead of training again (``geopose-ml demo``); None when there is none.
        """
        if self.client.get_experiment_by_name(self.experiment_name) is None:
            return None
        wanted = run_params(config, data_fingerprint)
        runs = self.client.search_runs(
            [self.experiment_id],
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

    def start_fold_run(
        self, cv_run_id: str, fold: int, config: TrainConfig, data_fingerprint: str, precision: str | None = None
    ) -> str:
        """Create the nested run of one fold with the parent's params plus ``fold`` and ``precision``.

        ``precision`` is what the fold really trains in (``bf16``, ``fp16``, ``fp32``): the ``amp``
        param is only the request, and its effect depends on the device.
        """
        tags = {
            KIND_TAG: KIND_FOLD,
            FOLD_TAG: str(fold),
            MLFLOW_PARENT_RUN_ID: cv_run_id,
            CODE_VERSION_TAG: code_version(),
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"fold-{fold}")
        # Known now: the first checkpoint stored needs no lookup of the run.
        self._artifact_dirs[run.info.run_id] = local_artifact_dir(run.info.artifact_uri)
        params = {**run_params(config, data_fingerprint), "fold": str(fold)}
        if precision is not None:
            params["precision"] = precision
        self._log(run.info.run_id, params=params)
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
        step: int = 0,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Everything in as few requests as possible (one ``log_batch`` per 500 values)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
        items += [Param(k, str(v)) for k, v in (params or {}).items()]
        items += [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        self._send(run_id, items)

    def _send(self, run_id: str, items: Sequence[Metric | Param | RunTag]) -> None:
        """``log_batch`` the items in chunks of ``MAX_BATCH``."""
        for start in range(0, len(items), MAX_BATCH):
            chunk = items[start : start + MAX_BATCH]
            self.client.log_batch(
                run_id,
                metrics=[i for i in chunk if isinstance(i, Metric)],
                params=[i for i in chunk if isinstance(i, Param)],
                tags=[i for i in chunk if isinstance(i, RunTag)],
            )

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """Log one epoch's metrics at ``step = epoch`` in one request."""
        self.log_epochs(run_id, [(epoch, metrics)])

    def log_epochs(self, run_id: str, epochs: Sequence[tuple[int, dict[str, float]]]) -> None:
        """Log several epochs' metrics (``step = epoch``) in as few requests as possible."""
        now = int(time.time() * 1000)
        self._send(run_id, [Metric(k, float(v), now, epoch) for epoch, metrics in epochs for k, v in metrics.items()])

    def logged_epochs(self, run_id: str, key: str = "val_score") -> list[int]:
        """The steps at which ``key`` was logged (epochs already recorded), sorted."""
        return sorted(m.step for m in self.client.get_metric_history(run_id, key))

    def log_fold_summary(self, run_id: str, best_score: float, best_epoch: int) -> None:
        """``best_val_score`` and ``best_epoch`` of a finished fold."""
        self._log(run_id, metrics={"best_val_score": best_score, "best_epoch": best_epoch})

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
            path = Path(tmp) / "folds.csv"
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

    def download_artifact(self, run_id: str, name: str) -> Path:
        """Download one artifact of a run (e.g. ``config.json``, ``folds.csv``) to a temporary folder.

        Raises:
            ConfigError: The run has no such artifact.
        """
        try:
            return Path(self.client.download_artifacts(run_id, name, tempfile.mkdtemp(prefix="geopose-")))
        except (MlflowException, OSError) as err:
            raise ConfigError(f"run {run_id} has no artifact {name!r} ({err})") from err

    # --- artifacts ----------------------------------------------------------------------------------

    def log_checkpoint(self, run_id: str, path: Path) -> None:
        """Store a checkpoint file under ``checkpoints/`` (same name; replaces the previous one).

        Into a local artifact folder on the same file system the file is hard-linked, not copied
        (see ``_link_into``); elsewhere MLflow uploads it.
        """
        local = self._local_artifact_dir(run_id)
        if local is None or not _link_into(local / CHECKPOINT_DIR, [Path(path)]):
            self.client.log_artifact(run_id, str(path), CHECKPOINT_DIR)

    def log_oof(self, run_id: str, folder: Path) -> None:
        """Store the files of an ``oof/`` folder under ``oof/`` (hard links where possible, as above)."""
        local = self._local_artifact_dir(run_id)
        files = sorted(p for p in Path(folder).iterdir() if p.is_file())
        if local is None or not _link_into(local / OOF_DIR, files):
            self.client.log_artifacts(run_id, str(folder), OOF_DIR)

    def _local_artifact_dir(self, run_id: str) -> Path | None:
        """The run's artifact folder if its artifact store is a local folder, else None (cached per run)."""
        if run_id not in self._artifact_dirs:
            self._artifact_dirs[run_id] = local_artifact_dir(self.client.get_run(run_id).info.artifact_uri)
        return self._artifact_dirs[run_id]

    def download_checkpoint(self, run_id: str, name: str, dest: Path) -> Path | None:
        """Download ``checkpoints/<name>`` of a run into ``dest``; None if the run has none."""
        names = {Path(f.path).name for f in self.client.list_artifacts(run_id, CHECKPOINT_DIR)}
        if name not in names:
            return None
        dest.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{name}", str(dest)))

    def download_oof(self, run_id: str, dest: Path) -> Path:
        """Download a fold run's ``oof/`` folder into ``dest``; returns the local ``oof`` folder."""
        dest.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, OOF_DIR, str(dest)))


def _is_duplicate_dataset(err: MlflowException) -> bool:
    """True for a store's unique-key failure on a data set row (PostgreSQL, MySQL or SQLite wording)."""
    text = str(err).lower()
    return "dataset" in text and ("unique" in text or "duplicate" in text)


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The local folder of an artifact URI (``file:`` URI or plain path); None for remote stores."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path (or a drive letter)
        return Path(artifact_uri)
    return None


def _link_into(folder: Path, files: Sequence[Path]) -> bool:
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
