"""Ensembles in the model registry: package an ensemble run as a pyfunc, register it, move its alias, load it.

Every MLflow call of ``promote`` and ``predict --model`` lives here (the lineage a version describes is
read by ``tracking.lineage``). Fitting an ensemble on tracked runs is ``ensemble.members``.

Where ``promote``'s time went (cProfile, 4 resnet18 U-Net checkpoints, a fresh process on 2 busy cores):
82 s, of which 45 s MLflow inferring the pip requirements (it loads the model in a subprocess to see
what it imports), 26 s validating the input example (the model loaded and run once in this process),
and the rest downloading, loading and saving again each checkpoint. Now the requirements are named
(``pip_requirements``), each ``best.pt`` is hard-linked (or downloaded) into the package unread
(training writes it with the weights alone), and the one load is MLflow's input-example check, which
shows the packaged model predicts: 9 s in a fresh process, 4-7 s warm, about 1 s of it per checkpoint
(``bench/bench_promote.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from geopose_mlops.constants import (
    BEST_NAME,
    CHAMPION_ALIAS,
    CHECKPOINT_DIR,
    DEFAULT_EXPERIMENT,
    ENSEMBLE_JSON,
    KIND_CV,
    KIND_ENSEMBLE,
    KIND_FOLD,
    KIND_TAG,
    KIND_TRIAL,
    REGISTERED_MODEL,
)
from geopose_mlops.ensemble.fit import EnsembleSpec
from geopose_mlops.errors import ConfigError, GeoposeError
from geopose_mlops.inference import EnsemblePredictor
from geopose_mlops.tracking import artifacts
from geopose_mlops.tracking.experiments import experiment_id
from geopose_mlops.tracking.lineage import (
    ENSEMBLE_RUN_TAG,
    FINGERPRINT_TAG,
    MEMBER_NAMES_TAG,
    MEMBERS_TAG,
    ensemble_lineage,
    version_description,
)
from geopose_mlops.tracking.runs import fold_runs

CANDIDATE_TAG_PREFIX = "geopose.candidate."  # + alias: the version was promoted for that alias
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # the pyfunc, logged as a model from code
MODEL_ARTIFACT = "ensemble"  # pyfunc_model.ARTIFACT (not imported: that file registers the model when run)
# What loading the model needs, pinned to this environment: geopose-mlops brings the rest of its own.
REQUIREMENTS = ("geopose-mlops", "mlflow", "torch", "segmentation-models-pytorch", "timm", "numpy")
# MLflow 3.17 reads predict's type hints only as ``list[...]`` or pydantic models. For this model's dict of
# tensors (typed as such, and checked against the TensorSpec signature) it warns when the model's class
# is made (every load) and when it fails to infer a signature from the hint (every log), each under its
# own "show once" filter, which no caller's filterwarnings can override. ``hint_warnings_dropped`` drops
# exactly these two; every other warning is shown as usual.
HINT_WARNINGS = re.compile(
    r".*(Type hint used in the model's predict function is not supported|Failed to infer signature from type hint)",
    re.DOTALL,
)
_RUN_ID = re.compile(r"^(?:runs:/)?(?P<run_id>[0-9a-f]{32})/?$")
# What MLflow prints while a version is made, which ``promote`` says in its own words: the registration's
# progress lines (on stderr) and the input example's validation (an INFO log of ``mlflow.pyfunc``).
REGISTRY_CHATTER = re.compile(
    r"^(Successfully registered model |Registered model .* already exists|Created version '\d+' of model )"
)
CHATTY_LOGGERS = ("mlflow.pyfunc", "mlflow.models")


@contextlib.contextmanager
def hint_warnings_dropped() -> Iterator[None]:
    """Record the warnings of the block and show again all but MLflow's two about predict's type hint."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        if not HINT_WARNINGS.match(str(warning.message)):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


@contextlib.contextmanager
def registry_chatter_dropped() -> Iterator[None]:
    """Drop MLflow's registration messages (``REGISTRY_CHATTER``) and INFO logs of the block; keep the rest.

    Standard error is collected while the block runs and written back when it ends, but for those lines;
    warnings and errors of MLflow's loggers still show.
    """
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    collected = io.StringIO()
    try:
        for logger in loggers:
            logger.setLevel(max(logging.WARNING, logger.level))
        with contextlib.redirect_stderr(collected):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        kept = [line for line in collected.getvalue().splitlines(keepends=True) if not REGISTRY_CHATTER.match(line)]
        sys.stderr.write("".join(kept))


def _place_checkpoint(client: MlflowClient, fold_run_id: str, target: Path) -> None:
    """``checkpoints/best.pt`` of a fold run as ``target``: hard-linked from a local store, else downloaded.

    The file is not read: training writes ``best.pt`` with the model's weights alone (no optimiser), so
    it is what serving needs as it is. A link is safe as training never rewrites a stored file in place.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    local = artifacts.local_artifact_dir(client.get_run(fold_run_id).info.artifact_uri)
    source = local / CHECKPOINT_DIR / BEST_NAME if local is not None else None
    if source is not None and source.is_file():
        try:
            os.link(source, target)
        except OSError:  # another file system, or none with hard links
            shutil.copyfile(source, target)
        return
    path = artifacts.download_checkpoint(client, fold_run_id, BEST_NAME, target.parent / f".{target.stem}")
    if path is None:
        raise ConfigError(f"fold run {fold_run_id} has no {CHECKPOINT_DIR}/{BEST_NAME} to package")
    os.replace(path, target)
    shutil.rmtree(target.parent / f".{target.stem}", ignore_errors=True)


def _package(run_id: str, folder: Path) -> EnsembleSpec:
    """The ensemble run's files plus each member fold's ``best.pt`` as ``checkpoints/<member>/fold<N>.pt``."""
    client = MlflowClient()
    local = artifacts.local_artifact_dir(client.get_run(run_id).info.artifact_uri)
    if local is not None and (local / ENSEMBLE_JSON).is_file():
        shutil.copytree(local, folder)  # ensemble.json and the scale model, a few kB
    else:
        client.download_artifacts(run_id, "", str(folder))
    spec = EnsembleSpec.load(folder / ENSEMBLE_JSON)
    for member, folds in spec.member_folds.items():
        for fold, fold_run_id in folds.items():
            _place_checkpoint(client, fold_run_id, folder / CHECKPOINT_DIR / member / f"fold{fold}.pt")
    return spec


def _resolve_ensemble(client: MlflowClient, ensemble: str, experiment: str) -> mlflow.entities.Run:
    if ensemble == "best":
        runs = client.search_runs(
            [experiment_id(experiment)],
            f"tags.`{KIND_TAG}` = '{KIND_ENSEMBLE}' and attributes.status = 'FINISHED'",
            order_by=["metrics.oof_score DESC"],
            max_results=1,
        )
        if not runs:
            raise ConfigError(f"--ensemble best: no finished ensemble run in experiment {experiment!r}")
        return runs[0]
    try:
        run = client.get_run(ensemble)
    except MlflowException as err:
        raise ConfigError(f"--ensemble {ensemble!r}: no such run ({err.message})") from err
    if run.data.tags.get(KIND_TAG) != KIND_ENSEMBLE:
        raise ConfigError(f"--ensemble {ensemble}: not an ensemble run (tag {KIND_TAG}={run.data.tags.get(KIND_TAG)})")
    return run


def promote(
    ensemble: str = "best",
    name: str = REGISTERED_MODEL,
    alias: str = CHAMPION_ALIAS,
    force: bool = False,
    experiment: str = DEFAULT_EXPERIMENT,
) -> tuple[str, bool]:
    """Register the ensemble as a model version and move ``alias`` to it.

    Promoting the same ensemble run again reuses its version. The alias moves only to a version at
    least as good (``oof_score``) as the current holder, unless ``force``; concurrent calls leave it on
    the best version promoted (``_settle_alias``). A version gets the alias only once registered, so
    the alias never points at a version whose artifacts failed to upload.

    Returns:
        (version now holding the alias, whether a new version was created).

    Raises:
        GeoposeError: The ensemble scores below the alias's current holder (both scores named).
    """
    client = MlflowClient()
    run = _resolve_ensemble(client, ensemble, experiment)
    score = run.data.metrics["oof_score"]
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None and not force and holder.tags.get(ENSEMBLE_RUN_TAG) != run.info.run_id:
        held = float(holder.tags.get("oof_score", "-inf"))
        if score < held:
            raise GeoposeError(
                f"refusing to move {name}@{alias} from version {holder.version} (oof_score {held:.6f}) to ensemble "
                f"run {run.info.run_id} (oof_score {score:.6f}); use --force to override"
            )
    existing = []
    try:
        existing = client.search_model_versions(f"name = '{name}' and tag.`{ENSEMBLE_RUN_TAG}` = '{run.info.run_id}'")
    except MlflowException:
        existing = []
    created = not existing
    if existing:
        version = existing[0].version
    else:
        version = _register(client, run, name, score)
    candidate = f"{CANDIDATE_TAG_PREFIX}{alias}"
    if force:  # a forced promotion starts the alias's history anew: earlier candidates no longer count
        for other in _versions(client, name):
            if other.tags.get(candidate) == "true" and other.version != version:
                client.delete_model_version_tag(name, other.version, candidate)
    client.set_model_version_tag(name, version, candidate, "true")
    client.set_registered_model_alias(name, alias, version)
    return _settle_alias(client, name, alias) if not force else version, created


def _versions(client: MlflowClient, name: str) -> list:
    return client.search_model_versions(f"name = '{name}'")


def _settle_alias(client: MlflowClient, name: str, alias: str) -> str:
    """Point ``alias`` at the best READY candidate version; return that version.

    Two ``promote`` calls at once can both pass the gate on a stale read of the holder; whichever sets
    the alias last would win. Each call therefore re-reads every version promoted for this alias (tag
    ``geopose.candidate.<alias>``, set before the alias moves, only on fully registered versions) and
    moves the alias to the highest ``oof_score``: the last call to finish leaves it on the best.
    """
    candidate = f"{CANDIDATE_TAG_PREFIX}{alias}"
    ready = [
        v for v in _versions(client, name) if v.tags.get(candidate) == "true" and str(v.status) == "READY"
    ]
    best = max(ready, key=lambda v: (float(v.tags.get("oof_score", "-inf")), int(v.version)))
    client.set_registered_model_alias(name, alias, best.version)
    return str(best.version)


def _signature(size: int) -> tuple[ModelSignature, tuple[dict, dict]]:
    """The pyfunc's tensor signature at training side ``size`` px and a one-image input example."""
    example = {
        "image": np.zeros((1, size, size, 3), np.uint8),
        "gsd": np.full(1, 0.5, np.float32),
        "city": np.zeros(1, np.int64),
    }
    signature = ModelSignature(
        inputs=Schema([
            TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "image"),
            TensorSpec(np.dtype(np.float32), (-1,), "gsd"),
            TensorSpec(np.dtype(np.int64), (-1,), "city"),
        ]),
        outputs=Schema([
            TensorSpec(np.dtype(np.float32), (-1, size, size), "agl"),
            TensorSpec(np.dtype(np.float64), (-1,), "scale"),
            TensorSpec(np.dtype(np.float64), (-1,), "angle"),
        ]),
        params=ParamSchema([ParamSpec("tta", "string", "none")]),
    )  # fmt: skip
    return signature, (example, {"tta": "none"})


def pip_requirements(scale_model: bool) -> list[str]:
    """What loading the model needs, at this environment's versions (``xgboost`` with a scale model)."""
    names = (*REQUIREMENTS, "xgboost") if scale_model else REQUIREMENTS
    return [f"{n}=={metadata.version(n)}" for n in names]


def _register(client: MlflowClient, run: mlflow.entities.Run, name: str, score: float) -> str:
    """Log the packaged ensemble as a model from code in its run, register it, describe and tag the version.

    The tag ``geopose.ensemble_run_id`` is written last: a version carries it only once complete, and
    ``promote`` reuses (or makes a candidate of) only such a version.
    """
    with tempfile.TemporaryDirectory(prefix="geopose-promote-") as tmp:
        folder = Path(tmp) / MODEL_ARTIFACT
        spec = _package(run.info.run_id, folder)
        signature, example = _signature(spec.image_size)
        # In its run, so the logged model links the ensemble run and carries its metrics (oof_score,
        # oof_score_{CITY}, the best member's) and params: MLflow 3 copies those onto the model.
        try:
            with mlflow.start_run(run_id=run.info.run_id), hint_warnings_dropped(), registry_chatter_dropped():
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(MODEL_CODE),
                    artifacts={MODEL_ARTIFACT: str(folder)},
                    signature=signature,
                    input_example=example,
                    pip_requirements=pip_requirements(spec.scale_model is not None),
                )
        finally:  # a stopped or failed promote leaves the fitted ensemble run FINISHED, as it was
            client.set_terminated(run.info.run_id, "FINISHED", end_time=run.info.end_time)
    lineage = ensemble_lineage(run.info.run_id, spec)
    tags = {
        "oof_score": repr(score),
        MEMBERS_TAG: json.dumps(spec.members),
        MEMBER_NAMES_TAG: json.dumps(lineage.member_names),
        FINGERPRINT_TAG: lineage.data.fingerprint,
    }
    with registry_chatter_dropped():
        version = mlflow.register_model(info.model_uri, name, tags=tags).version
    client.update_model_version(name, version, description=version_description(lineage))
    client.set_model_version_tag(name, version, ENSEMBLE_RUN_TAG, run.info.run_id)
    return version


def load_predictor(model_uri: str) -> EnsemblePredictor:
    """The predictor behind ``--model``: an ensemble folder, a run, or a registered model URI.

    ``runs:/CV_RUN_ID`` (or the id alone) of a finished cross-validation predicts with that architecture
    alone: the mean of its fold models (a one-member, equal-weight ensemble without city factors or
    scale model). The id of an ensemble run packages that run as ``promote`` would. Anything else
    (``models:/geopose-ensemble@champion``, ``runs:/ID/model``) is loaded as the registered pyfunc.

    Raises:
        ConfigError: Nothing loadable at ``model_uri`` (the reason named).
    """
    path = Path(model_uri)
    if path.is_dir() and (path / ENSEMBLE_JSON).is_file():
        return EnsemblePredictor(path)
    match = _RUN_ID.match(model_uri.strip())
    if match is not None:
        return _run_predictor(match["run_id"], model_uri)
    try:
        with hint_warnings_dropped():
            return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor
    except (MlflowException, OSError) as err:
        raise ConfigError(f"--model {model_uri!r}: cannot load ({err})") from err


def _run_predictor(run_id: str, model_uri: str) -> EnsemblePredictor:
    """The predictor of a cv (or trial) run, from its fold models, or of an ensemble run, packaged."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(f"--model {model_uri!r}: no such run ({err.message})") from err
    kind = run.data.tags.get(KIND_TAG)
    with tempfile.TemporaryDirectory(prefix="geopose-model-") as tmp:
        folder = Path(tmp) / MODEL_ARTIFACT
        if kind == KIND_ENSEMBLE:
            _package(run_id, folder)
        elif kind in (KIND_CV, KIND_TRIAL):
            _package_cv_run(client, run, folder, model_uri)
        elif kind == KIND_FOLD:
            parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID, "?")
            raise ConfigError(f"--model {model_uri!r}: a fold run; its architecture's folds: --model runs:/{parent}")
        else:
            raise ConfigError(f"--model {model_uri!r}: run {run_id} is neither a cv nor an ensemble run ({kind=})")
        return EnsemblePredictor(folder)  # every checkpoint is read now: the folder can go


def _package_cv_run(client: MlflowClient, run: mlflow.entities.Run, folder: Path, model_uri: str) -> None:
    """A one-member ensemble folder of a finished cv run: each fold's ``best.pt``, equal weights, nothing fitted."""
    run_id = run.info.run_id
    if run.info.status != "FINISHED":
        raise ConfigError(f"--model {model_uri!r}: cv run {run_id} is {run.info.status}; predict once it has finished")
    folds = {fold: r.info.run_id for fold, r in fold_runs(client, run.info.experiment_id, run_id).items()}
    if not folds:
        raise ConfigError(f"--model {model_uri!r}: cv run {run_id} has no fold runs")
    for fold, fold_run_id in sorted(folds.items()):
        _place_checkpoint(client, fold_run_id, folder / CHECKPOINT_DIR / run_id / f"fold{fold}.pt")
    spec = EnsembleSpec(
        members=[run_id], method="equal", height_weights=[1.0], scale_weights=[1.0], angle_weights=[1.0],
        member_folds={run_id: {str(f): r for f, r in sorted(folds.items())}},
        image_size=int(run.data.params["image_size"]),
    )  # fmt: skip
    spec.save(folder / ENSEMBLE_JSON)
