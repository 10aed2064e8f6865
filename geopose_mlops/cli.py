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


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images-per-city", type=click.IntRange(min=0), required=True, help="Training images per city.")
@click.option("--size", type=click.IntRange(min=8), required=True, help="Image side, pixels.")
@click.option("--seed", type=int, required=True, help="Same seed, same bytes.")
@click.option("--cities", default="ARG,ATL,JAX,OMA", show_default=True, help="Comma-separated cities.")
@click.option("--test-images-per-city", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--rgb-format", type=click.Choice(["j2k", "tif"]), default="j2k", show_default=True)
def synth(
    out: Path, images_per_city: int, size: int, seed: int, cities: str, test_images_per_city: int, rgb_format: str
) -> None:
    """Write a synthetic data set in the competition's layout (test truth goes to OUT/test_truth)."""
    from geopose_mlops.constants import CITIES
    from geopose_mlops.data.synth import make_synthetic_dataset

    chosen = [c.strip() for c in cities.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CITIES]
    if unknown or not chosen:
        raise ConfigError(f"--cities {cities!r}: expected a comma-separated subset of {','.join(CITIES)}")
    ids = make_synthetic_dataset(
        out, images_per_city, size, seed, chosen, test_images_per_city, rgb_format, progress=True
    )
    click.echo(f"wrote {len(ids)} images to {out}")


@main.group()
def data() -> None:
    """Inspect a data set."""


@data.command("check")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--headers-only", is_flag=True, help="Read raster headers only (fast; misses truncated pixels).")
def data_check(data_dir: Path, headers_only: bool) -> None:
    """Validate DATA: counts per city and every bad file with its reason; exit 1 if any."""
    from geopose_mlops.data.check import check_dataset

    report = check_dataset(data_dir, decode=not headers_only, progress=True)
    for split, counts in report.counts.items():
        listed = "  ".join(f"{city} {n}" for city, n in counts.items())
        click.echo(f"{split}: {sum(counts.values())} images  ({listed})")
    for path, reason in report.problems:
        click.echo(f"BAD {path}: {reason}")
    if not report.ok:
        click.echo(f"{len(report.problems)} problem(s) in {data_dir}", err=True)
        sys.exit(1)
    click.echo("ok")


@main.command()
@click.argument("data_dir", metavar="DATA", type=click.Path(file_okay=False, path_type=Path))
@click.option("--k", type=click.IntRange(min=2), default=5, show_default=True, help="Number of folds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Default: DATA/folds.csv.")
def folds(data_dir: Path, k: int, seed: int, out: Path | None) -> None:
    """Write folds.csv (id,city,fold): k folds stratified by city."""
    from geopose_mlops.constants import FOLDS_CSV
    from geopose_mlops.data.folds import make_folds, write_folds
    from geopose_mlops.data.layout import find_samples

    rows = make_folds(find_samples(data_dir, "train"), k, seed)
    target = out or data_dir / FOLDS_CSV
    write_folds(target, rows)
    click.echo(f"wrote {len(rows)} rows in {k} folds to {target}")


@main.command()
@click.argument("study_file", metavar="STUDY.yaml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--n-trials", type=click.IntRange(min=1), help="Trials this run adds (default: the study file's).")
@click.option("--timeout", type=click.FloatRange(min=0), help="Start no new trial after S seconds.")
@click.option(
    "--storage",
    help="Optuna storage URL; default from the study file (SQLite beside it). Parallel workers: "
    "postgresql://user:password@host:5432/db",
)
def tune(study_file: Path, n_trials: int | None, timeout: float | None, storage: str | None) -> None:
    """Run or resume an Optuna study over lr and effective batch size; every trial a tracked run."""
    from geopose_mlops.tuning import describe_study, load_study_config, run_study

    study = run_study(load_study_config(study_file), n_trials=n_trials, timeout=timeout, storage=storage)
    click.echo(describe_study(study))


if __name__ == "__main__":
    main()
