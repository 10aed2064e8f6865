"""``geopose-ml``: a thin click layer over the package (SPEC §3).

Every command exits 0 on success; on failure it prints one line naming the file or value at fault and
exits 1 (bad data or run-time failure) or 2 (bad arguments or configuration, nothing written).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from geopose_mlops.errors import ConfigError, GeoposeError


class GeoposeGroup(click.Group):
    """A click group that turns the package's own errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):  # noqa: D102
        try:
            return super().invoke(ctx)
        except ConfigError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)
        except GeoposeError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(1)


@click.group(cls=GeoposeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="geopose-mlops")
def main() -> None:
    """Geocentric-pose models from overhead imagery: data, tracked training, tuning, ensembles."""


@main.command()
@click.option("--predictions-dir", required=True, type=click.Path(path_type=Path), help="Submission folder.")
@click.option("--truth-dir", required=True, type=click.Path(path_type=Path), help="Folder of true AGL/VFLOW.")
@click.option("--output-json", type=click.Path(path_type=Path), help="Write the scores here (SPEC §3).")
def evaluate(predictions_dir: Path, truth_dir: Path, output_json: Path | None) -> None:
    """Score a submission folder against the truth with the competition's metric."""
    from geopose_mlops.metrics import evaluate_folder, write_scores_json

    scores = evaluate_folder(predictions_dir, truth_dir)
    if output_json:
        write_scores_json(scores, output_json)
    click.echo(f"final_score {scores['final_score']:.6f}")
    for city, values in scores["cities"].items():
        click.echo(
            f"  {city}: score {values['score']:.4f}  agl_r2 {values['agl_r2']:.4f}  vflow_r2 {values['vflow_r2']:.4f}"
            f"  agl_rmse {values['agl_rmse']:.3f} m  angle_err {values['angle_error_deg']:.2f} deg"
        )


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
    from geopose_mlops.server import serve

    serve(backend_store_uri, artifacts_destination, host, port, workers, init_postgres, echo=click.echo)


if __name__ == "__main__":
    main()
