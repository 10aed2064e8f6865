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
@click.option("--experiment", default="geopose", show_default=True, help="MLflow experiment to report on.")
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


if __name__ == "__main__":
    main()
