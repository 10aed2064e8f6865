"""Ensembles in MLflow: fit on tracked OOF predictions, log, package as pyfunc, register, alias.

Every MLflow call of ``ensemble fit``, ``promote`` and ``predict`` lives here.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from geopose_mlops.constants import (
    BEST_NAME,
    CHAMPION_ALIAS,
    CHECKPOINT_DIR,
    CODE_VERSION_TAG,
    DEFAULT_EXPERIMENT,
    ENSEMBLE_JSON,
    KIND_CV,
    KIND_ENSEMBLE,
    KIND_TAG,
    REGISTERED_MODEL,
)
from geopose_mlops.ensemble.fit import EnsembleSpec, fit_ensemble
from geopose_mlops.ensemble.stats import MemberOof, read_image_table
from geopose_mlops.errors import ConfigError, GeoposeError
from geopose_mlops.inference import EnsemblePredictor
from geopose_mlops.tracking.runs import FINGERPRINT_PARAM, CvTracker, code_version

ENSEMBLE_RUN_TAG = "geopose.ensemble_run_id"
CANDIDATE_TAG_PREFIX = "geopose.candidate."  # + alias: the version was promoted for that alias


def _experiment_ids(client: MlflowClient, experiment: str) -> list[str]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"--experiment {experiment!r} does not exist in {mlflow.get_tracking_uri()}")
    return [found.experiment_id]


def select_cv_runs(
    experiment: str = DEFAULT_EXPERIMENT,
    filter_string: str = "",
    run_ids: list[str] | None = None,
    max_members: int | None = None,
) -> list[mlflow.entities.Run]:
    """Finished top-level cv runs on the same data (best ``cv_score`` first), the candidates.

    A search keeps the runs with the best run's ``data_fingerprint`` and warns of those it leaves out;
    named runs must all share it (the sample ids are checked again when their OOF folders are aligned).

    Raises:
        ConfigError: A named run is not a finished cv run or was trained on other data, or no candidate
            remains.
    """
    client = MlflowClient()
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
        bad = [r.info.run_id for r in runs if r.data.tags.get(KIND_TAG) != KIND_CV or r.info.status != "FINISHED"]
        if bad:
            raise ConfigError(f"--run-ids {bad}: not finished cross-validation runs (tag {KIND_TAG}={KIND_CV})")
    else:
        query = f"tags.`{KIND_TAG}` = '{KIND_CV}' and attributes.status = 'FINISHED'"
        runs = client.search_runs(
            _experiment_ids(client, experiment),
            f"{query} and {filter_string}" if filter_string else query,
            order_by=["metrics.cv_score DESC"],
        )
    runs = [r for r in runs if "cv_score" in r.data.metrics and math.isfinite(r.data.metrics["cv_score"])]
    if not runs:
        raise ConfigError(f"no finished cv run with a cv_score in experiment {experiment!r} to ensemble")
    runs.sort(key=lambda r: -r.data.metrics["cv_score"])
    data = runs[0].data.params.get(FINGERPRINT_PARAM)
    other = [r.info.run_id for r in runs if r.data.params.get(FINGERPRINT_PARAM) != data]
    if run_ids and other:
        raise ConfigError(
            f"--run-ids {other}: trained on other data ({FINGERPRINT_PARAM} differs from {runs[0].info.run_id}'s "
            f"{data!r}); an ensemble needs members whose folds cover the same images"
        )
    if other:
        warnings.warn(
            f"{len(other)} finished cv run(s) left out, trained on other data than the best run "
            f"{runs[0].info.run_id} ({FINGERPRINT_PARAM} {data!r}): {other[:10]}"
            + (f" and {len(other) - 10} more" if len(other) > 10 else "")
            + "; name the runs (--run-ids) or narrow the search (--filter) to choose",
            stacklevel=2,
        )
    runs = [r for r in runs if r.data.params.get(FINGERPRINT_PARAM) == data]
    return runs[:max_members] if max_members else runs


def fit_tracked_ensemble(
    experiment: str = DEFAULT_EXPERIMENT,
    filter_string: str = "",
    run_ids: list[str] | None = None,
    max_members: int | None = None,
    method: str = "simplex",
) -> tuple[str, EnsembleSpec]:
    """Fit an ensemble on the candidates' OOF predictions and log it as an ``ensemble`` run.

    Returns:
        (ensemble run id, the fitted spec).
    """
    runs = select_cv_runs(experiment, filter_string, run_ids, max_members)
    tracker = CvTracker(experiment)
    with tempfile.TemporaryDirectory(prefix="geopose-ensemble-") as tmp:
        tmp = Path(tmp)
        members, member_folds = [], {}
        for run in runs:
            folds = tracker.fold_runs(run.info.run_id)
            member_folds[run.info.run_id] = {str(f): r.info.run_id for f, r in sorted(folds.items())}
            folders = {f: tracker.download_oof(r.info.run_id, tmp / run.info.run_id / str(f)) for f, r in folds.items()}
            members.append(MemberOof(run.info.run_id, folders))
        table = read_image_table(members)
        out = tmp / "ensemble"
        out.mkdir()
        spec, _ = fit_ensemble(table, method, scale_model_dir=out)
        spec.member_folds = member_folds
        spec.image_size = int(runs[0].data.params["image_size"])
        spec.save(out / ENSEMBLE_JSON)
        client = MlflowClient()
        run_id = client.create_run(
            runs[0].info.experiment_id,
            run_name=f"ensemble-{method}-{len(members)}",
            tags={KIND_TAG: KIND_ENSEMBLE, CODE_VERSION_TAG: code_version()},
        ).info.run_id
        metrics = {
            "oof_score": spec.oof_score,
            "best_member_oof_score": spec.best_member_oof_score,
            "equal_weights_oof_score": spec.equal_weights_oof_score,
            **{f"{m}_weights_oof_score": v for m, v in spec.method_oof_scores.items()},
            **{f"oof_score_{c}": v for c, v in spec.oof_city_scores.items()},
        }
        params = {
            "members": json.dumps(spec.members),
            "method": method,
            "n_members": str(len(spec.members)),
            "city_height_factors": json.dumps(spec.city_height_factors),
            "scale_model": str(spec.scale_model is not None),
            "scale_angle_weights_from": spec.scale_angle_weights_from,
        }
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
        )
        client.log_artifacts(run_id, str(out))
        client.set_terminated(run_id)
    return run_id, spec


class GeoposeEnsembleModel(mlflow.pyfunc.PythonModel):
    """The registered model: input ``{"image": uint8 (B, S, S, 3), "gsd": (B,), "city": (B,) index}``.

    Output: ``{"agl": (B, S, S) m, "scale": (B,) px/m, "angle": (B,) rad}`` at the training side S
    (``predict --model`` resizes source images to S and back). Param ``tta``: none, flip or d4.
    """

    def load_context(self, context) -> None:  # noqa: D102
        self.predictor = EnsemblePredictor(context.artifacts["ensemble"])
        self.spec = self.predictor.spec

    def predict(self, context, model_input, params=None):  # noqa: D102
        from geopose_mlops.constants import CITIES

        cities = [CITIES[int(c)] for c in np.asarray(model_input["city"]).reshape(-1)]
        tta = (params or {}).get("tta", "none")
        return self.predictor.predict(model_input["image"], np.asarray(model_input["gsd"]), cities, tta)


def _package(run_id: str, folder: Path) -> EnsembleSpec:
    """Download the ensemble run's files and every member fold's best checkpoint (model weights only)."""
    client = MlflowClient()
    client.download_artifacts(run_id, "", str(folder))
    spec = EnsembleSpec.load(folder / ENSEMBLE_JSON)
    for member, folds in spec.member_folds.items():
        for fold, fold_run_id in folds.items():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(client.download_artifacts(fold_run_id, f"{CHECKPOINT_DIR}/{BEST_NAME}", tmp))
                state = torch.load(path, map_location="cpu", weights_only=True)
                state["optimizer"], state["scaler"] = None, {}  # serving needs the weights alone
                target = folder / CHECKPOINT_DIR / member / f"fold{fold}.pt"
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.save(state, target)
    return spec


def _resolve_ensemble(client: MlflowClient, ensemble: str, experiment: str) -> mlflow.entities.Run:
    if ensemble == "best":
        runs = client.search_runs(
            _experiment_ids(client, experiment),
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


def _register(client: MlflowClient, run: mlflow.entities.Run, name: str, score: float) -> str:
    with tempfile.TemporaryDirectory(prefix="geopose-promote-") as tmp:
        folder = Path(tmp) / "ensemble"
        spec = _package(run.info.run_id, folder)
        s = spec.image_size
        example = {
            "image": np.zeros((1, s, s, 3), np.uint8),
            "gsd": np.full(1, 0.5, np.float32),
            "city": np.zeros(1, np.int64),
        }
        signature = ModelSignature(
            inputs=Schema(
                [
                    TensorSpec(np.dtype(np.uint8), (-1, s, s, 3), "image"),
                    TensorSpec(np.dtype(np.float32), (-1,), "gsd"),
                    TensorSpec(np.dtype(np.int64), (-1,), "city"),
                ]
            ),
            outputs=Schema(
                [
                    TensorSpec(np.dtype(np.float32), (-1, s, s), "agl"),
                    TensorSpec(np.dtype(np.float64), (-1,), "scale"),
                    TensorSpec(np.dtype(np.float64), (-1,), "angle"),
                ]
            ),
            params=ParamSchema([ParamSpec("tta", "string", "none")]),
        )
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=GeoposeEnsembleModel(),
                artifacts={"ensemble": str(folder)},
                signature=signature,
                input_example=(example, {"tta": "none"}),
                code_paths=None,
            )
    version = mlflow.register_model(info.model_uri, name).version
    client.set_model_version_tag(name, version, ENSEMBLE_RUN_TAG, run.info.run_id)
    client.set_model_version_tag(name, version, "oof_score", repr(score))
    client.set_model_version_tag(name, version, "members", json.dumps(spec.members))
    return version


def load_predictor(model_uri: str):
    """The ensemble behind a model URI (``models:/geopose-ensemble@champion``, ``runs:/...``) or folder."""
    path = Path(model_uri)
    if path.is_dir() and (path / ENSEMBLE_JSON).is_file():
        return EnsemblePredictor(path)
    try:
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor
    except (MlflowException, OSError) as err:
        raise ConfigError(f"--model {model_uri!r}: cannot load ({err})") from err
