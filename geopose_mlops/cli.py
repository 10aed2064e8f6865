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


# --- train (issue 3): one cross-validation, tracked in MLflow --------------------------------------


def _train_options(command):
    """The options shared by ``train`` and ``fold`` (SPEC §3; MLproject parameters underscored)."""
    options = [
        click.option("--data-dir", required=True, type=click.Path(path_type=Path), help="Data set (SPEC §2)."),
        click.option("--encoder", default="resnet34", show_default=True, help="smp encoder, e.g. tu-regnetx_064."),
        click.option("--decoder", default="Unet", show_default=True, help="smp architecture, e.g. FPN."),
        click.option(
            "--encoder-weights", default="none", show_default=True, help="none, imagenet, swsl/ssl or a file."
        ),
        click.option("--epochs", default=10, show_default=True, type=int, help="Epochs per fold."),
        click.option("--lr", default=1e-4, show_default=True, type=float, help="Peak learning rate (AdamW)."),
        click.option("--batch-size", default=4, show_default=True, type=int, help="Micro-batch, images."),
        click.option(
            "--effective-batch-size",
            type=int,
            help="Images per optimiser step, reached by accumulation (default or 0: the batch size).",
        ),
        click.option("--image-size", default=512, show_default=True, type=int, help="Training side, pixels."),
        click.option("--crop-size", type=int, help="Random-crop side in training, px (default or 0: no crop)."),
        click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision on CUDA."),
        click.option("--k", default=5, show_default=True, type=int, help="Number of folds."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of folds, weights, augmentation."),
        click.option(
            "--loss", default="mse", show_default=True, type=click.Choice(["mse", "r2", "huber_cos"]), help="Loss."
        ),
        click.option("--augment/--no-augment", default=True, show_default=True, help="Training augmentation."),
        click.option("--num-workers", default=0, show_default=True, type=int, help="DataLoader workers."),
        click.option("--experiment", default="geopose", show_default=True, help="MLflow experiment."),
        click.option("--resume", "resume", help="Continue a cv or fold run by id (its own config is used)."),
        click.option("--cache-dir", type=click.Path(path_type=Path), help="Cache root (default DATA/.geopose_cache)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run_training(folds: str, options: dict) -> None:
    from geopose_mlops.config import ModelConfig, TrainConfig
    from geopose_mlops.errors import ConfigError as _ConfigError
    from geopose_mlops.train.cv import run_cross_validation

    try:
        fold_list = None if folds.strip() == "all" else tuple(int(f) for f in folds.split(","))
    except ValueError as err:
        raise _ConfigError(f"--folds {folds!r}: expected 'all' or comma-separated fold numbers like 0,2") from err
    model = ModelConfig(
        encoder=options.pop("encoder"), decoder=options.pop("decoder"), encoder_weights=options.pop("encoder_weights")
    )
    experiment, resume, cache_dir = options.pop("experiment"), options.pop("resume"), options.pop("cache_dir")
    # 0 and "" stand for "not given", as MLproject parameters cannot be left out.
    options["effective_batch_size"] = options["effective_batch_size"] or None
    options["crop_size"] = options["crop_size"] or None
    config = TrainConfig(data_dir=str(options.pop("data_dir")), model=model, folds=fold_list, **options)
    result = run_cross_validation(config, experiment=experiment, resume_run_id=resume or None, cache_root=cache_dir)
    click.echo(f"cv run {result.run_id}: cv_score {result.cv_score:.4f}")
    for fold, fold_result in result.folds.items():
        click.echo(f"  fold {fold}: best val_score {fold_result.best_score:.4f} at epoch {fold_result.best_epoch}")


@main.command()
@_train_options
@click.option("--folds", default="all", show_default=True, help="Folds to run: all, or e.g. 0,2.")
def train(folds: str, **options) -> None:
    """Train one cross-validation: a parent MLflow run and a nested run per fold."""
    _run_training(folds, options)


@main.command(hidden=True)
@_train_options
@click.option("--fold", required=True, type=int, help="The one fold to train and validate.")
def fold(fold: int, **options) -> None:
    """Train a single fold (``train --folds N``), as the MLproject's ``fold`` entry point."""
    _run_training(str(fold), options)


if __name__ == "__main__":
    main()
