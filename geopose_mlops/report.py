"""The leaderboard a researcher keeps by hand, built from the tracked runs of one experiment.

MLflow's UI lists runs one by one; it cannot average a metric over the fold runs of a cross-validation.
This module does: one row per architecture (decoder, encoder and key hyper-parameters), with seconds
per epoch, the fold-mean validation score at chosen epochs, the out-of-fold ``cv_score`` and its
per-city parts, as Markdown and CSV; PNG plots of the per-epoch validation curves (mean and min-max
spread over folds) and of each ensemble's gain over its members. Everything is written to an output
folder and logged as the artifacts of a ``report`` run (SPEC §4 names throughout).

The MLflow calls (``read_tracked_runs``, ``log_report_run``) live in ``tracking/reads.py``;
this module works on the plain views they return (``CvRun`` with its ``FoldRun``s, ``EnsembleRun``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from geopose_mlops.constants import CITIES, DEFAULT_EXPERIMENT, KIND_CV, KIND_TAG
from geopose_mlops.errors import ConfigError, DataError
from geopose_mlops.tracking.reads import CvRun, EnsembleRun, FoldRun, log_report_run, read_tracked_runs

LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_CSV = "leaderboard.csv"
CURVES_PNG = "val_score_curves.png"
ENSEMBLE_PNG = "ensemble_gain.png"
MAX_DEFAULT_EPOCH_COLUMNS = 4

# Hyper-parameters that make two cv runs "the same architecture" (SPEC §4 parent params).
KEY_PARAMS: tuple[str, ...] = (
    "decoder", "encoder", "encoder_weights", "lr", "effective_batch_size", "image_size", "amp", "init_from",
)


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


def _parent(run: CvRun) -> str:
    """The cv run this one started from (``--init-from``), or ``""``."""
    value = run.param("init_from")
    return "" if value in ("", "None") else value


def stage_chain(run: CvRun, runs: Sequence[CvRun]) -> str:
    """The stages before ``run`` (``--init-from``), oldest first, as short ids: ``1a2b3c4d > 5e6f7a8b``.

    ``""`` for a run trained from scratch; a parent not among ``runs`` ends the chain (its id still shown).
    """
    parents = {r.run_id: _parent(r) for r in runs}
    chain, parent = [], _parent(run)
    while parent and parent not in chain:
        chain.append(parent)
        parent = parents.get(parent, "")
    return " > ".join(p[:8] for p in reversed(chain))


def _precision(run: CvRun) -> str:
    """What the folds trained in (their ``precision`` param); runs from before it was logged: the amp flag."""
    found = sorted({fold.params["precision"] for fold in run.folds if fold.params.get("precision")})
    if found:
        return "/".join(found)
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
    special = {"effective_batch_size": _effective_batch_size, "init_from": _parent}
    for run in runs:
        key = tuple(special[k](run) if k in special else run.param(k) for k in KEY_PARAMS)
        held = best.get(key)
        if held is None or _score_or_low(run) > _score_or_low(held):
            best[key] = run
    return list(best.values())


def build_leaderboard(
    runs: Sequence[CvRun], epochs: Sequence[int], all_runs: Sequence[CvRun] | None = None
) -> list[dict[str, object]]:
    """Leaderboard rows, best ``cv_score`` first (runs without one last).

    Args:
        runs: Finished cv runs with their fold runs (one per architecture; see ``group_architectures``).
        epochs: 1-based epochs at which to report the fold-mean ``val_score`` (columns ``score@e{N}``).
        all_runs: Every cv run, to follow the ``init_from`` chains through (None: ``runs``).

    Returns:
        One dict per architecture with the keys ``decoder, encoder, encoder_weights, lr,
        effective_batch_size, image_size, precision, sec_per_epoch`` (s, mean ``epoch_seconds`` over
        every epoch of every fold), ``stages`` (the ``--init-from`` chain before it, ``stage_chain``),
        ``score@e{N}`` (mean over folds of ``val_score`` at that epoch, NaN unless every fold reached it),
        ``cv_score`` (out-of-fold, best epochs), ``cv_score_{CITY}`` for every city any run has, ``folds``
        and ``run_id``.
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
            "stages": stage_chain(run, all_runs if all_runs is not None else runs),
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
    lowest = 0.0
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
        lowest = min(lowest, min(means))
    # R² is unbounded below: one diverging early epoch (-1e4) would flatten every other curve, so the
    # axis stops at -1 (values below it are drawn off the chart) and says so.
    if lowest < -1.0:
        ax.set_ylim(bottom=-1.0, top=1.0)
        ax.set_ylabel("val_score (axis clipped at -1)")
    else:
        ax.set_ylabel("val_score")
    ax.set_xlabel("epoch")
    ax.set_title("Validation score per epoch: mean over folds (line), min-max over folds (band)", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ensemble_members(ensemble: EnsembleRun, runs: Sequence[CvRun]) -> list[tuple[str, float]]:
    """``(label, cv_score)`` of each member of ``ensemble``.

    A member that is not among ``runs`` (deleted, failed, or in another experiment) is labelled by its
    short run id, with score NaN.
    """
    by_id = {run.run_id: run for run in runs}
    members = []
    for member_id in ensemble.member_ids:
        run = by_id.get(member_id)
        if run is None:
            members.append((member_id[:8], math.nan))
        else:
            label = f"{run.param('decoder')}/{run.param('encoder')}\nlr={run.param('lr')}"
            members.append((label, run.metrics.get("cv_score", math.nan)))
    return members


def plot_ensemble_gain(ensembles: Sequence[EnsembleRun], runs: Sequence[CvRun], path: Path) -> Path:
    """One bar group per ensemble run: each member's ``cv_score`` beside the ensemble's ``oof_score``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ensembles), figsize=(4 + 3 * len(ensembles), 5), squeeze=False)
    for ax, ens in zip(axes[0], ensembles, strict=True):
        members = ensemble_members(ens, runs)
        labels = [label for label, _ in members] + ["ensemble"]
        scores = [score for _, score in members] + [ens.oof_score]
        colors = ["tab:gray"] * len(members) + ["tab:green"]
        ax.bar(range(len(scores)), [_or_zero(s) for s in scores], color=colors)
        ax.set_xticks(range(len(scores)), labels, rotation=30, ha="right", fontsize=8)
        member_scores = [s for _, s in members if not math.isnan(s)]
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
        raise DataError(f"experiment {experiment}", f"no finished cross-validation run (tag {KIND_TAG}={KIND_CV})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    architectures = group_architectures(cv_runs)
    chosen = list(epochs) if epochs is not None else default_epochs(architectures)
    rows = build_leaderboard(architectures, chosen, cv_runs)
    paths = list(write_leaderboard(rows, out, experiment))
    paths.append(plot_validation_curves(architectures, out / CURVES_PNG))
    if ensembles:
        paths.append(plot_ensemble_gain(ensembles, cv_runs, out / ENSEMBLE_PNG))
    run_id = log_report_run(experiment, paths, {"epochs": ",".join(map(str, chosen)), "architectures": len(rows),
                                                "ensembles": len(ensembles)})
    return ReportFiles(run_id=run_id, rows=rows, paths=paths)
