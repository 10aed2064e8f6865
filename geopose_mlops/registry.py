"""Ensembles in the model registry: package an ensemble run as pyfunc, register it, move its alias, load it.

Every MLflow call of ``promote`` and ``predict --model`` lives here. Fitting an ensemble on tracked runs
is ``ensemble.members`` (its MLflow calls in ``tracking.ensembles``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from geopose_mlops.constants import (
    BEST_NAME,
    CHAMPION_ALIAS,
    CHECKPOINT_DIR,
    DEFAULT_EXPERIMENT,
    ENSEMBLE_JSON,
    KIND_ENSEMBLE,
    KIND_TAG,
    REGISTERED_MODEL,
)
from geopose_mlops.ensemble.fit import EnsembleSpec
from geopose_mlops.errors import ConfigError, GeoposeError
from geopose_mlops.inference import EnsemblePredictor
from geopose_mlops.tracking.experiments import experiment_id

ENSEMBLE_RUN_TAG = "geopose.ensemble_run_id"
CANDIDATE_TAG_PREFIX = "geopose.candidate."  # + alias: the version was promoted for that alias


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
