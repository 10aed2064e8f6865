"""``tune``, ``report``, ``server`` and ``demo``: studies, the leaderboard, the shared store, the whole pipeline."""

from __future__ import annotations

from pathlib import Path

import click

from geopose_mlops.cli.app import main, sigterm_as_interrupt
from geopose_mlops.constants import DEFAULT_EXPERIMENT
from geopose_mlops.errors import ConfigError


@main.command()
@click.argument("study_file", metavar="STUDY.yaml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--n-trials", type=click.IntRange(min=0), help="Trials this run adds (unset or 0: the study file's).")
@click.option("--timeout", type=click.FloatRange(min=0), help="Start no new trial after S seconds (0: no limit).")
@click.option(
    "--storage",
    help="Optuna storage URL; default from the study file (SQLite beside it). Parallel workers: "
    "postgresql://user:password@host:5432/db",
)
def tune(study_file: Path, n_trials: int | None, timeout: float | None, storage: str | None) -> None:
    """Run or resume an Optuna study over lr and effective batch size; every trial a tracked run."""
    from geopose_mlops.tune.study import describe_study, load_study_config, run_study

    config = load_study_config(study_file)
    with sigterm_as_interrupt():
        study = run_study(config, n_trials=n_trials or None, timeout=timeout or None, storage=storage or None)
    click.echo(describe_study(study))


@main.command()
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment to report on.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for tables and plots.")
@click.option("--epochs", default=None, help="1-based epochs for the score@eN columns, e.g. 1,5,10 (default: up to 4).")
def report(experiment: str, out_dir: Path, epochs: str | None) -> None:
    """Leaderboard (Markdown, CSV) and validation-curve plots from the tracked runs of an experiment."""
    from geopose_mlops.report import make_report

    try:
        chosen = [int(e) for e in epochs.split(",")] if epochs else None
    except ValueError as err:
        raise ConfigError(f"--epochs: expected comma-separated integers such as 1,5,10, got {epochs!r}") from err
    result = make_report(experiment, out_dir, chosen)
    click.echo(f"{len(result.rows)} architecture(s); report run {result.run_id}")
    for path in result.paths:
        click.echo(f"  {path}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; 0.0.0.0 serves the network.")
@click.option("--port", default=5000, show_default=True, type=int, help="TCP port.")
@click.option("--backend-store-uri", help="SQLAlchemy URL of the backend store, e.g. postgresql+psycopg2://u@h/db.")
@click.option(
    "--artifacts-destination",
    default="mlartifacts",
    show_default=True,
    help="Directory (or s3://..., gs://...) where the server stores the artifacts clients send it.",
)
@click.option(
    "--init-postgres",
    type=click.Path(file_okay=False, path_type=Path),
    help="Instead of --backend-store-uri: keep a PostgreSQL cluster in this directory (initdb on first use).",
)
@click.option("--workers", default=2, show_default=True, type=int, help="Server worker processes.")
def server(
    host: str, port: int, backend_store_uri: str | None, artifacts_destination: str, init_postgres: Path | None,
    workers: int,
) -> None:  # fmt: skip
    """Run a shared MLflow tracking server on PostgreSQL with served artifacts (docs/SCALING.md)."""
    from geopose_mlops.tracking.server import serve

    serve(backend_store_uri, artifacts_destination, host, port, workers, init_postgres, echo=click.echo)


@main.command()
@click.option("--workdir", default="demo_work", show_default=True, type=click.Path(path_type=Path))
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs per fold (default 30).")
@click.option("--images-per-city", type=click.IntRange(2), default=None, help="Synthetic training images per city.")
def demo(workdir: Path, epochs: int | None, images_per_city: int | None) -> None:
    """The whole pipeline on synthetic data: data, folds, CV of 3 architectures, study, ensemble, predict."""
    from dataclasses import replace

    from geopose_mlops.demo import DemoSettings, run_demo

    settings = DemoSettings()
    if epochs:
        settings = replace(settings, epochs=epochs, study_epochs=min(settings.study_epochs, epochs))
    if images_per_city:
        settings = replace(settings, images_per_city=images_per_city)
    summary = run_demo(workdir, settings, say=click.echo)
    click.echo(f"\n== summary ({summary.seconds / 60:.1f} min)\n")
    click.echo(summary.table())
    click.echo(f"\nOpen the runs in the MLflow UI:\n  mlflow ui --backend-store-uri {summary.tracking_uri} --port 5000")
