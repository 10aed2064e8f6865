"""The leaderboard a researcher keeps by hand, built from the tracked runs of one experiment.

MLflow's UI lists runs one by one; it cannot average a metric over the fold runs of a cross-validation.
This module does: one row per architecture (decoder, encoder and key hyper-parameters), with seconds
per epoch, the fold-mean validation score at chosen epochs, the out-of-fold ``cv_score`` and its
per-city parts, as Markdown and CSV; PNG plots of the per-epoch validation curves (mean and min-max
spread over folds) and of each ensemble's gain over its members. Everything is written to an output
folder and logged as the artifacts of a ``report`` run (SPEC §4 names throughout).

The MLflow reading and logging calls are kept together in the last section of this module
(``read_tracked_runs``, ``log_report_run``); everything above it works on plain dataclasses.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from geopose_mlops.constants import CITIES, DEFAULT_EXPERIMENT, KIND_CV, KIND_ENSEMBLE, KIND_FOLD, KIND_REPORT, KIND_TAG
from geopose_mlops.errors import ConfigError, DataError

LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_CSV = "leaderboard.csv"
CURVES_PNG = "val_score_curves.png"
ENSEMBLE_PNG = "ensemble_gain.png"
MAX_DEFAULT_EPOCH_COLUMNS = 4

# Hyper-parameters that make two cv runs "the same architecture" (SPEC §4 parent params).
KEY_PARAMS: tuple[str, ...] = (
    "decoder", "encoder", "encoder_weights", "lr", "effective_batch_size", "image_size", "amp",
)


@dataclass(frozen=True)
class FoldRun:
    """One fold (child) run.

    Attributes:
        run_id: MLflow run id.
        name: Run name as shown in the UI.
        history: Metric name -> ``[(step, value), ...]`` sorted by step (step = epoch).
    """

    run_id: str
    name: str
    history: dict[str, list[tuple[int, float]]]

    def values(self, key: str) -> list[float]:
        """Every logged value of metric ``key``, in step order (empty if never logged)."""
        return [value for _, value in self.history.get(key, [])]


@dataclass(frozen=True)
class CvRun:
    """One cross-validation (parent) run and its finished fold runs.

    Attributes:
        run_id: MLflow run id.
        name: Run name.
        params: The run's params (SPEC §4: encoder, decoder, lr, ...).
        metrics: Latest value of each metric (``cv_score``, ``cv_score_{CITY}``).
        folds: The finished fold runs, ordered by name.
    """

    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    folds: list[FoldRun] = field(default_factory=list)

    def param(self, key: str) -> str:
        """Param ``key``, also found as ``model.key`` or ``*.key`` (flattened configs); ``""`` if absent."""
        if key in self.params:
            return self.params[key]
        for name, value in sorted(self.params.items()):
            if name.endswith(f".{key}"):
                return value
        return ""


@dataclass(frozen=True)
class EnsembleRun:
    """One ensemble run: its out-of-fold score and the scores of its members.

    Attributes:
        run_id: MLflow run id.
        name: Run name.
        oof_score: The ensemble's out-of-fold score.
        members: ``(label, score)`` of every member, score = the member's ``cv_score`` (NaN if unknown).
    """

    run_id: str
    name: str
    oof_score: float
    members: list[tuple[str, float]]


@dataclass(frozen=True)
class ReportFiles:
    """What ``make_report`` wrote.

    Attributes:
        run_id: The ``report`` run that holds the files as artifacts.
        rows: The leaderboard rows, best first.
        paths: Every file written under the output folder.
    """

    run_id: str
    rows: list[dict[str, object]]
    paths: list[Path]


def architecture_label(run: CvRun) -> str:
    """Short name of an architecture for tables and legends, e.g. ``Unet/resnet18 lr=0.001``."""
    return f"{run.param('decoder')}/{run.param('encoder')} lr={run.param('lr')} ebs={_effective_batch_size(run)}"


def _effective_batch_size(run: CvRun) -> str:
    value = run.param("effective_batch_size")
    return value if value not in ("", "None") else run.param("batch_size")


def _precision(run: CvRun) -> str:
    return "amp" if run.param("amp").lower() in ("true", "1") else "fp32"


def _score_or_low(run: CvRun) -> float:
    score = run.metrics.get("cv_score", math.nan)
    return -math.inf if math.isnan(score) else score


def _mean_if_complete(values: Sequence[float]) -> float:
    """Mean of ``values``; NaN if there are none or any is NaN (a fold that never reached the epoch)."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return sum(values) / len(values)


def score_at_epoch(fold: FoldRun, epoch: int) -> float:
    """The fold's ``val_score`` at its ``epoch``-th logged epoch (1-based; NaN if it has fewer)."""
    values = fold.values("val_score")
    return values[epoch - 1] if 1 <= epoch <= len(values) else math.nan


def default_epochs(runs: Sequence[CvRun]) -> list[int]:
    """Up to four evenly spaced epochs (1-based) from 1 to the longest run's last epoch."""
    longest = max((len(f.values("val_score")) for r in runs for f in r.folds), default=0)
    if longest == 0:
        return []
    count = min(MAX_DEFAULT_EPOCH_COLUMNS, longest)
    if count == 1:
        return [1]
    return sorted({round(1 + i * (longest - 1) / (count - 1)) for i in range(count)})


def group_architectures(runs: Sequence[CvRun]) -> list[CvRun]:
    """One cv run per architecture: among runs with equal key params, the one with the best ``cv_score``."""
    best: dict[tuple[str, ...], CvRun] = {}
    for run in runs:
        key = tuple(_effective_batch_size(run) if k == "effective_batch_size" else run.param(k) for k in KEY_PARAMS)
        held = best.get(key)
        if held is None or _score_or_low(run) > _score_or_low(held):
            best[key] = run
    return list(best.values())


def build_leaderboard(runs: Sequence[CvRun], epochs: Sequence[int]) -> list[dict[str, object]]:
    """Leaderboard rows, best ``cv_score`` first (runs without one last).

    Args:
        runs: Finished cv runs with their fold runs (one per architecture; see ``group_architectures``).
        epochs: 1-based epochs at which to report the fold-mean ``val_score`` (columns ``score@e{N}``).

    Returns:
        One dict per architecture with the keys ``decoder, encoder, encoder_weights, lr,
        effective_batch_size, image_size, precision, sec_per_epoch`` (s, mean ``epoch_seconds`` over
        every epoch of every fold), ``score@e{N}`` (mean over folds of ``val_score`` at that epoch,
        NaN unless every fold reached it), ``cv_score`` (out-of-fold, best epochs), ``cv_score_{CITY}``
        for every city any run has, ``folds`` and ``run_id``.
    """
    cities = [c for c in CITIES if any(f"cv_score_{c}" in r.metrics for r in runs)]
    rows = []
    for run in runs:
        seconds = [s for fold in run.folds for s in fold.values("epoch_seconds")]
        row: dict[str, object] = {
            "decoder": run.param("decoder"),
            "encoder": run.param("encoder"),
            "encoder_weights": run.param("encoder_weights"),
            "lr": run.param("lr"),
            "effective_batch_size": _effective_batch_size(run),
            "image_size": run.param("image_size"),
            "precision": _precision(run),
            "sec_per_epoch": sum(seconds) / len(seconds) if seconds else math.nan,
        }
        for epoch in epochs:
            row[f"score@e{epoch}"] = _mean_if_complete([score_at_epoch(f, epoch) for f in run.folds])
        row["cv_score"] = run.metrics.get("cv_score", math.nan)
        for city in cities:
            row[f"cv_score_{city}"] = run.metrics.get(f"cv_score_{city}", math.nan)
        row["folds"] = len(run.folds)
        row["run_id"] = run.run_id
        rows.append(row)
    return sorted(rows, key=lambda r: (math.isnan(r["cv_score"]), -_or_zero(r["cv_score"])))


def _or_zero(value: object) -> float:
    return 0.0 if isinstance(value, float) and math.isnan(value) else float(value)


def _format(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def write_leaderboard(rows: Sequence[dict[str, object]], out_dir: Path, experiment: str) -> tuple[Path, Path]:
    """Write ``leaderboard.csv`` (full precision) and ``leaderboard.md`` (4 decimals) under ``out_dir``.

    Returns:
        The Markdown and CSV paths.
    """
    columns = list(rows[0]) if rows else ["decoder", "encoder", "cv_score", "run_id"]
    csv_path = out_dir / LEADERBOARD_CSV
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
    lines = [
        f"# Leaderboard: experiment `{experiment}`",
        "",
        "One row per architecture, best out-of-fold `cv_score` first. `score@eN`: mean over folds of "
        "`val_score` at epoch N; `sec_per_epoch`: mean `epoch_seconds` over every fold epoch.",
        "",
        "| rank | " + " | ".join(columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    lines += [f"| {i} | " + " | ".join(_format(row[c]) for c in columns) + " |" for i, row in enumerate(rows, 1)]
    md_path = out_dir / LEADERBOARD_MD
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def plot_validation_curves(runs: Sequence[CvRun], path: Path) -> Path:
    """Per-epoch ``val_score``: fold mean (line) and min-max over folds (band), one colour per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        by_step: dict[int, list[float]] = {}
        for fold in run.folds:
            for step, value in fold.history.get("val_score", []):
                by_step.setdefault(step, []).append(value)
        if not by_step:
            continue
        steps = sorted(by_step)
        epochs = [step - steps[0] + 1 for step in steps]  # 1-based, as in the score@eN columns
        means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        line = ax.plot(epochs, means, marker="o", label=f"{architecture_label(run)} ({len(run.folds)} folds)")[0]
        lows, highs = [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]
        ax.fill_between(epochs, lows, highs, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val_score")
    ax.set_title("Validation score per epoch: mean over folds (line), min-max over folds (band)", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ensemble_gain(ensembles: Sequence[EnsembleRun], path: Path) -> Path:
    """One bar group per ensemble run: each member's ``cv_score`` beside the ensemble's ``oof_score``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ensembles), figsize=(4 + 3 * len(ensembles), 5), squeeze=False)
    for ax, ens in zip(axes[0], ensembles, strict=True):
        labels = [label for label, _ in ens.members] + ["ensemble"]
        scores = [score for _, score in ens.members] + [ens.oof_score]
        colors = ["tab:gray"] * len(ens.members) + ["tab:green"]
        ax.bar(range(len(scores)), [_or_zero(s) for s in scores], color=colors)
        ax.set_xticks(range(len(scores)), labels, rotation=30, ha="right", fontsize=8)
        member_scores = [s for _, s in ens.members if not math.isnan(s)]
        gain = ens.oof_score - max(member_scores) if member_scores else math.nan
        ax.set_title(f"{ens.name}\ngain over best member: {_format(gain)}", fontsize=9)
        ax.set_ylabel("out-of-fold score")
        for x, score in enumerate(scores):
            ax.annotate(_format(score), (x, _or_zero(score)), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_report(experiment: str = DEFAULT_EXPERIMENT, out_dir: Path | str = "report",
                epochs: Sequence[int] | None = None) -> ReportFiles:
    """Build the leaderboard and plots of ``experiment``, write them to ``out_dir``, log a ``report`` run.

    Args:
        experiment: MLflow experiment name (tracking URI from ``MLFLOW_TRACKING_URI``).
        out_dir: Folder for ``leaderboard.md``, ``leaderboard.csv`` and the PNG plots (created).
        epochs: 1-based epochs for the ``score@eN`` columns (None: up to four evenly spaced ones).

    Raises:
        ConfigError: The experiment does not exist or an epoch is below 1.
        DataError: The experiment has no finished cross-validation run.
    """
    if epochs is not None and any(e < 1 for e in epochs):
        raise ConfigError(f"--epochs: epochs are counted from 1, got {list(epochs)}")
    cv_runs, ensembles = read_tracked_runs(experiment)
    if not cv_runs:
        raise DataError(f"experiment {experiment}", "no finished cross-validation run (tag geopose.kind=cv)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    architectures = group_architectures(cv_runs)
    chosen = list(epochs) if epochs is not None else default_epochs(architectures)
    rows = build_leaderboard(architectures, chosen)
    paths = list(write_leaderboard(rows, out, experiment))
    paths.append(plot_validation_curves(architectures, out / CURVES_PNG))
    if ensembles:
        paths.append(plot_ensemble_gain(ensembles, out / ENSEMBLE_PNG))
    run_id = log_report_run(experiment, paths, {"epochs": ",".join(map(str, chosen)), "architectures": len(rows),
                                                "ensembles": len(ensembles)})
    return ReportFiles(run_id=run_id, rows=rows, paths=paths)


# --------------------------------------------------------------------------------------------------
# MLflow: reading the tracked runs and logging the report run. Every MLflow call of this module is here.
# --------------------------------------------------------------------------------------------------


def _experiment_id(client, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        raise ConfigError(f"--experiment: no active MLflow experiment named {experiment!r}")
    return found.experiment_id


def _finished_runs(client, experiment_id: str, kind: str) -> list:
    from mlflow.entities import ViewType

    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{kind}' and attributes.status = 'FINISHED'",
        run_view_type=ViewType.ACTIVE_ONLY, max_results=10000,
    )


def _history(client, run) -> dict[str, list[tuple[int, float]]]:
    history = {}
    for key in run.data.metrics:
        points = client.get_metric_history(run.info.run_id, key)
        history[key] = sorted((p.step, p.value) for p in points)
    return history


def _member_ids(client, run) -> list[str]:
    raw = run.data.params.get("members", "")
    try:
        parsed = json.loads(raw)
        if isinstance(parsed, list):
            return [str(m) for m in parsed]
    except json.JSONDecodeError:
        pass
    if raw:
        return [m.strip() for m in raw.replace(";", ",").split(",") if m.strip()]
    # Params are capped in length: fall back to the ensemble.json artifact.
    import mlflow.artifacts

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/ensemble.json")
    except Exception:  # a missing or unreadable artifact only means "members unknown"
        return []
    members = json.loads(text).get("members", [])
    return [m["run_id"] if isinstance(m, dict) else str(m) for m in members]


def read_tracked_runs(experiment: str = DEFAULT_EXPERIMENT) -> tuple[list[CvRun], list[EnsembleRun]]:
    """Read the finished cv runs (with their finished fold runs) and ensemble runs of ``experiment``.

    Deleted runs and runs that failed, were killed or are still running are left out.

    Raises:
        ConfigError: No active experiment has that name.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = _experiment_id(client, experiment)
    folds_by_parent: dict[str, list[FoldRun]] = {}
    for run in _finished_runs(client, experiment_id, KIND_FOLD):
        parent = run.data.tags.get("mlflow.parentRunId", "")
        fold = FoldRun(run.info.run_id, run.info.run_name or run.info.run_id, _history(client, run))
        folds_by_parent.setdefault(parent, []).append(fold)
    cv_runs = [
        CvRun(run.info.run_id, run.info.run_name or run.info.run_id, dict(run.data.params), dict(run.data.metrics),
              sorted(folds_by_parent.get(run.info.run_id, []), key=lambda f: f.name))
        for run in _finished_runs(client, experiment_id, KIND_CV)
    ]
    by_id = {run.run_id: run for run in cv_runs}
    ensembles = []
    for run in _finished_runs(client, experiment_id, KIND_ENSEMBLE):
        members = []
        for member_id in _member_ids(client, run):
            member = by_id.get(member_id)
            if member is not None:
                members.append((f"{member.param('decoder')}/{member.param('encoder')}\nlr={member.param('lr')}",
                                member.metrics.get("cv_score", math.nan)))
            else:
                members.append((member_id[:8], math.nan))
        ensembles.append(EnsembleRun(run.info.run_id, run.info.run_name or run.info.run_id,
                                     run.data.metrics.get("oof_score", math.nan), members))
    return cv_runs, ensembles


def log_report_run(experiment: str, paths: Sequence[Path], params: dict[str, object]) -> str:
    """Log a run tagged ``geopose.kind=report`` in ``experiment`` holding ``paths`` as artifacts.

    Returns:
        The report run's id.
    """
    from mlflow.tracking import MlflowClient

    # A client, not the fluent API, so that a report made inside another active run stays separate.
    client = MlflowClient()
    run = client.create_run(_experiment_id(client, experiment), tags={KIND_TAG: KIND_REPORT}, run_name="report")
    try:
        for key, value in params.items():
            client.log_param(run.info.run_id, key, str(value))
        for path in paths:
            client.log_artifact(run.info.run_id, str(path))
    except Exception:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return run.info.run_id
