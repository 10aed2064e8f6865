"""What a registered ensemble version is made of: its ensemble run, member cv runs, their fold runs, the data.

``geopose-ml lineage MODEL_URI`` prints the chain (``lineage_lines``); ``promote`` writes the same facts
into the version's description (``version_description``) and tags. Everything is read by id through
``MlflowClient``: the version's tag ``geopose.ensemble_run_id`` names the ensemble run, whose
``ensemble.json`` names each member cv run and, per fold, the fold run whose ``best.pt`` it packaged.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from geopose_mlops.constants import ENSEMBLE_JSON, FINGERPRINT_PARAM
from geopose_mlops.ensemble.fit import EnsembleSpec
from geopose_mlops.errors import ConfigError
from geopose_mlops.tracking import artifacts
from geopose_mlops.tracking.runs import CV_GROUP_TAG

ENSEMBLE_RUN_TAG = "geopose.ensemble_run_id"  # version tag: the ensemble run it packages (set last: complete)
MEMBERS_TAG = "members"  # version tag: JSON list of the member cv run ids
MEMBER_NAMES_TAG = "geopose.member_names"  # version tag: JSON list of the members' readable names
FINGERPRINT_TAG = "geopose.data_fingerprint"  # version tag: the data the members were trained on

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class FoldLink:
    """One fold run of a member: its id, fold, status and best validation score (NaN if not logged)."""

    run_id: str
    fold: int
    status: str
    best_val_score: float


@dataclass(frozen=True)
class MemberLink:
    """One member cv run: its readable name (the fold runs' ``geopose.cv_group``), score and fold runs."""

    run_id: str
    name: str
    cv_score: float
    folds: list[FoldLink]


@dataclass(frozen=True)
class DataLink:
    """The data set the members were trained on: fingerprint param and the cv run's data set input."""

    fingerprint: str
    name: str = ""
    digest: str = ""
    source: str = ""


@dataclass(frozen=True)
class EnsembleLineage:
    """An ensemble run and everything below it.

    Attributes:
        run_id: The ensemble run.
        experiment: Its experiment's name.
        spec: Its ``ensemble.json`` (weights, city factors, scale model, scores).
        members: The member cv runs, in the spec's order.
        data: The training data (from the best member; members share it).
    """

    run_id: str
    experiment: str
    spec: EnsembleSpec
    members: list[MemberLink]
    data: DataLink = field(default_factory=lambda: DataLink(""))

    @property
    def member_names(self) -> list[str]:
        """The members' readable names, in the spec's order."""
        return [m.name for m in self.members]

    def recreate_command(self) -> str:
        """The commands that fit this ensemble again from its members and promote it.

        An ensemble without city factors or scale model is fitted again with them switched off: the fit
        keeps either only where it helps, so leaving out what was not kept gives the same ensemble.
        """
        ids = ",".join(m.run_id for m in self.members)
        off = "".join([
            "" if self.spec.city_height_factors else " --no-city-factors",
            "" if self.spec.scale_model else " --no-scale-model",
        ])  # fmt: skip
        return (
            f"geopose-ml ensemble fit --experiment {self.experiment} --run-ids {ids} --method {self.spec.method}"
            f"{off} && geopose-ml promote --ensemble <the new ensemble run id>"
        )


def _member_name(cv_run: Run, fold_runs: list[Run]) -> str:
    """The fold runs' ``geopose.cv_group``, else (runs of earlier versions) architecture, lr and id."""
    for run in fold_runs:
        if CV_GROUP_TAG in run.data.tags:
            return run.data.tags[CV_GROUP_TAG]
    params = {key: cv_run.data.params.get(key, "?") for key in ("decoder", "encoder", "lr")}
    return f"{params['decoder']}/{params['encoder']} lr={params['lr']} #{cv_run.info.run_id[:4]}"


def _data_link(cv_run: Run) -> DataLink:
    fingerprint = cv_run.data.params.get(FINGERPRINT_PARAM, "")
    inputs = cv_run.inputs.dataset_inputs if cv_run.inputs is not None else []
    for entry in inputs:
        dataset = entry.dataset
        try:
            source = json.loads(dataset.source).get("uri", dataset.source)
        except (json.JSONDecodeError, AttributeError):
            source = dataset.source
        return DataLink(fingerprint, dataset.name, dataset.digest, source)
    return DataLink(fingerprint)


def _get_run(client: MlflowClient, run_id: str, what: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(f"{what} {run_id}: no such run in the tracking store ({err.message})") from err


def load_spec(client: MlflowClient, ensemble_run_id: str) -> EnsembleSpec:
    """The ``ensemble.json`` of an ensemble run.

    Raises:
        ConfigError: The run has no ``ensemble.json``.
    """
    local = artifacts.local_artifact_dir(client.get_run(ensemble_run_id).info.artifact_uri)
    if local is not None and (local / ENSEMBLE_JSON).is_file():  # read in place: no copy, no progress bar
        return EnsembleSpec.load(local / ENSEMBLE_JSON)
    with tempfile.TemporaryDirectory(prefix="geopose-lineage-") as tmp:
        return EnsembleSpec.load(artifacts.download_artifact(client, ensemble_run_id, ENSEMBLE_JSON, Path(tmp)))


def ensemble_lineage(ensemble_run_id: str, spec: EnsembleSpec | None = None) -> EnsembleLineage:
    """Read the chain below an ensemble run: member cv runs, the fold runs it packaged, the data set.

    Args:
        ensemble_run_id: The ensemble run.
        spec: Its ``ensemble.json`` if already read (else downloaded).

    Raises:
        ConfigError: A run of the chain is missing from the store.
    """
    client = MlflowClient()
    run = _get_run(client, ensemble_run_id, "ensemble run")
    spec = spec or load_spec(client, ensemble_run_id)
    members, data = [], DataLink("")
    for member_id in spec.members:
        cv_run = _get_run(client, member_id, "member cv run")
        fold_runs = {int(f): _get_run(client, r, "fold run") for f, r in spec.member_folds.get(member_id, {}).items()}
        folds = [
            FoldLink(r.info.run_id, fold, r.info.status, r.data.metrics.get("best_val_score", float("nan")))
            for fold, r in sorted(fold_runs.items())
        ]
        members.append(
            MemberLink(member_id, _member_name(cv_run, list(fold_runs.values())),
                       cv_run.data.metrics.get("cv_score", float("nan")), folds)
        )  # fmt: skip
        if not data.fingerprint:
            data = _data_link(cv_run)
    experiment = client.get_experiment(run.info.experiment_id).name
    return EnsembleLineage(ensemble_run_id, experiment, spec, members, data)


def resolve_version(model_uri: str) -> ModelVersion:
    """The registered version of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Raises:
        ConfigError: Not such a URI, or no such version or alias.
    """
    match = _MODEL_URI.match(model_uri.strip())
    if match is None:
        raise ConfigError(f"MODEL_URI {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = MlflowClient()
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(match["name"], match["alias"])
        return client.get_model_version(match["name"], match["version"])
    except MlflowException as err:
        raise ConfigError(f"MODEL_URI {model_uri!r}: no such registered version ({err.message})") from err


def version_lineage(model_uri: str) -> tuple[ModelVersion, EnsembleLineage]:
    """The version behind ``model_uri`` and the lineage of the ensemble run it packages.

    Raises:
        ConfigError: No such version, or one that does not name its ensemble run (tag ``geopose.ensemble_run_id``).
    """
    version = resolve_version(model_uri)
    run_id = version.tags.get(ENSEMBLE_RUN_TAG)
    if not run_id:
        raise ConfigError(
            f"{model_uri}: version {version.version} of {version.name} has no tag {ENSEMBLE_RUN_TAG}: not a geopose "
            "ensemble, or its promote was stopped before it finished"
        )
    return version, ensemble_lineage(run_id)


def _score(value: float) -> str:
    return f"{value:.4f}"


def lineage_lines(model_uri: str, version: ModelVersion, lineage: EnsembleLineage) -> list[str]:
    """The chain as indented lines: version, ensemble run, each member with its fold runs, the data set."""
    spec = lineage.spec
    lines = [
        f"{model_uri}: {version.name} version {version.version}",
        f"  ensemble run {lineage.run_id} (experiment {lineage.experiment}, {spec.method}, {len(spec.members)} "
        f"member(s), oof_score {_score(spec.oof_score)}, best member {_score(spec.best_member_oof_score)})",
    ]
    for i, member in enumerate(lineage.members):
        lines.append(
            f"    member {member.name}: cv run {member.run_id} (cv_score {_score(member.cv_score)}, height weight "
            f"{spec.height_weights[i]:.3f})"
        )
        for fold in member.folds:
            score = _score(fold.best_val_score)
            lines.append(f"      fold {fold.fold}: run {fold.run_id} ({fold.status}, best_val_score {score})")
    data = lineage.data
    source = data.source or "unknown source"
    lines.append(f"  data: {data.name or 'unnamed data set'} at {source}, fingerprint {data.fingerprint}")
    return lines


def version_description(lineage: EnsembleLineage) -> str:
    """The Markdown description of a registered version: what it is, how good, on what data, how to redo it."""
    spec = lineage.spec
    rows = [
        "| member | cv run | height / scale / angle weight | member oof_score |",
        "|---|---|---|---|",
    ]
    for i, member in enumerate(lineage.members):
        weights = f"{spec.height_weights[i]:.3f} / {spec.scale_weights[i]:.3f} / {spec.angle_weights[i]:.3f}"
        score = spec.member_oof_scores.get(member.run_id, float("nan"))
        rows.append(f"| {member.name} | `{member.run_id}` | {weights} | {_score(score)} |")
    best = max(lineage.members, key=lambda m: spec.member_oof_scores.get(m.run_id, float("-inf")))
    factors = ", ".join(f"{city} {f:.3f}" for city, f in sorted(spec.city_height_factors.items())) or "none kept"
    scale_default = "none (the members' weighted scale)"
    return "\n".join([
        f"Geopose ensemble of {len(spec.members)} cross-validation(s), `{spec.method}` weights; ensemble run "
        f"`{lineage.run_id}` (experiment `{lineage.experiment}`).",
        "",
        *rows,
        "",
        f"- oof_score: {_score(spec.oof_score)} (best member {_score(spec.best_member_oof_score)}: {best.name}; "
        f"equal weights {_score(spec.equal_weights_oof_score)})",
        f"- city height factors: {factors}",
        f"- scale model: {spec.scale_model or scale_default}",
        f"- data: fingerprint `{lineage.data.fingerprint}` ({lineage.data.name or 'data set'} at "
        f"{lineage.data.source or 'unknown source'})",
        f"- re-create: `{lineage.recreate_command()}`",
    ])  # fmt: skip
