"""``train`` (and the MLproject's ``fold``) and ``cv start`` / ``cv finalize``: one tracked cross-validation."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click
from click.core import ParameterSource

from geopose_mlops.cli.app import main, sigterm_as_interrupt
from geopose_mlops.config import ModelConfig, TrainConfig, default_of
from geopose_mlops.constants import DEFAULT_EXPERIMENT
from geopose_mlops.errors import ConfigError


def _field_option(flag: str, field_name: str, help_text: str, **kwargs):
    """A train option whose default is the ``TrainConfig`` (or ``ModelConfig``) field's: one source."""
    config = ModelConfig if field_name in {f.name for f in dataclasses.fields(ModelConfig)} else TrainConfig
    default = default_of(config, field_name)
    dest = (field_name,) if flag.split("/")[0].lstrip("-").replace("-", "_") != field_name else ()
    return click.option(flag, *dest, default=default, show_default=default is not None, help=help_text, **kwargs)


def _train_options(command):
    """The options shared by ``train`` and ``fold`` (SPEC §3; MLproject parameters underscored).

    Their defaults are the ``TrainConfig``/``ModelConfig`` field defaults (``tests/test_defaults.py``
    checks that MLproject's agree).
    """
    options = [
        click.option("--data-dir", required=True, type=click.Path(path_type=Path), help="Data set (SPEC §2)."),
        _field_option("--encoder", "encoder", "smp encoder, e.g. tu-regnetx_064."),
        _field_option("--decoder", "decoder", "smp architecture, e.g. FPN."),
        _field_option("--encoder-weights", "encoder_weights", "none, imagenet, swsl/ssl or a file."),
        _field_option("--epochs", "epochs", "Epochs per fold.", type=int),
        _field_option("--lr", "lr", "Peak learning rate (AdamW).", type=float),
        _field_option("--batch-size", "batch_size", "Micro-batch, images.", type=int),
        _field_option(
            "--effective-batch-size",
            "effective_batch_size",
            "Images per optimiser step, reached by accumulation (default or 0: the batch size).",
            type=int,
        ),
        _field_option(
            "--image-size", "image_size", "Training side, px (the 2048 px source images are decoded to it).", type=int
        ),
        _field_option(
            "--crop-size", "crop_size", "Random-crop side in training, px (default or 0: no crop).", type=int
        ),
        _field_option(
            "--amp/--no-amp",
            "amp",
            "Mixed precision: bf16 (fp16 on GPUs without it) on CUDA, bf16 on CPUs with bf16 instructions.",
        ),
        _field_option("--k", "k", "Number of folds (default: DATA/folds.csv's, where there is one).", type=int),
        _field_option("--seed", "seed", "Seed of folds, weights, augmentation.", type=int),
        _field_option("--loss", "loss", "Loss.", type=click.Choice(["mse", "r2", "huber_cos"])),
        _field_option("--augment/--no-augment", "augment", "Training augmentation."),
        _field_option(
            "--height-warp-p",
            "height_warp_p",
            "Probability of the height warp per training image (heights x a factor, roofs moved); needs --augment.",
            type=click.FloatRange(0, 1),
        ),
        _field_option(
            "--init-from",
            "init_from",
            "Staged training: start each fold from this cv run's fold best.pt (same folds and model).",
        ),
        _field_option(
            "--ema",
            "ema",
            "Decay of a moving average of the weights per optimiser step, validated and stored (0: off).",
            type=click.FloatRange(0, 1, max_open=True),
        ),
        _field_option(
            "--keep-top",
            "keep_top",
            "Average the K best epochs' weights at the end of each fold; best.pt is the better (0: off).",
            type=click.IntRange(0),
        ),
        _field_option(
            "--num-workers",
            "num_workers",
            "DataLoader workers (0: load in the training process). On a GPU raise it: augmenting a 1024 px "
            "image takes ~40 ms of one CPU core.",
            type=int,
        ),
        _field_option(
            "--checkpoint-interval",
            "checkpoint_interval_s",
            "Upload checkpoints at most every N seconds (and after the last epoch); 0: every epoch.",
            type=click.FloatRange(0),
        ),
        _field_option(
            "--metrics-interval",
            "metrics_interval_s",
            "Write epoch metrics at most every N seconds (and with every upload); 0: every epoch.",
            type=click.FloatRange(0),
        ),
        click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment."),
        click.option("--resume", "resume", help="Continue a cv or fold run by id (its own config is used)."),
        click.option("--cache-dir", type=click.Path(path_type=Path), help="Cache root (default DATA/.geopose_cache)."),
        _field_option(
            "--skip-bad/--no-skip-bad",
            "skip_bad",
            "Train on the good samples when some files are bad (logged as skipped_files.csv).",
        ),
        click.option(
            "--work-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Keep local checkpoints, metrics and OOF files here (default: under ~/.cache/geopose-mlops/runs "
            "or $XDG_CACHE_HOME, removed once the tracking store holds them; kept for --resume after a store "
            "failure).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# train options that are not TrainConfig fields: where and how the run is tracked and stored.
RUN_OPTIONS = ("experiment", "resume", "cache_dir", "parent_run_id", "work_dir")


def _train_config(folds: str, options: dict):
    """The TrainConfig of the train options; pops its options, leaving experiment, resume, cache_dir, ...

    Raises:
        ConfigError: ``--data-dir`` is not a folder (before anything else is read or created), or an
            option is out of range.
    """
    from geopose_mlops.train.data import check_data_dir

    check_data_dir(options["data_dir"])
    try:
        fold_list = None if folds.strip() == "all" else tuple(int(f) for f in folds.split(","))
    except ValueError as err:
        raise ConfigError(f"--folds {folds!r}: expected 'all' or comma-separated fold numbers like 0,2") from err
    model = ModelConfig(
        encoder=options.pop("encoder"), decoder=options.pop("decoder"), encoder_weights=options.pop("encoder_weights")
    )
    # 0 and "" stand for "not given", as MLproject parameters cannot be left out.
    options["effective_batch_size"] = options["effective_batch_size"] or None
    options["crop_size"] = options["crop_size"] or None
    for name in ("init_from", "ema", "keep_top"):
        options[name] = options[name] or None
    rest = {key: options.pop(key) for key in RUN_OPTIONS if key in options}
    config = TrainConfig(data_dir=str(options.pop("data_dir")), model=model, folds=fold_list, **options)
    options.update(rest)
    return config


def _with_folds_file_k(config: TrainConfig) -> TrainConfig:
    """``config`` with ``k`` taken from ``DATA/folds.csv`` when ``--k`` was left at its default."""
    from geopose_mlops.train.data import folds_file_k

    if click.get_current_context().get_parameter_source("k") is not ParameterSource.DEFAULT:
        return config  # given: the folds file must agree (train.data.folds_table_for)
    file_k = folds_file_k(config.data_dir)
    return config if file_k is None else dataclasses.replace(config, k=file_k)


def _run_training(folds: str, options: dict) -> None:
    from geopose_mlops.train.cv import run_cross_validation

    config = _train_config(folds, options)
    experiment, resume, cache_dir = options.pop("experiment"), options.pop("resume"), options.pop("cache_dir")
    if not resume:
        config = _with_folds_file_k(config)
    with sigterm_as_interrupt():
        result = run_cross_validation(
            config, experiment, resume or None, cache_root=cache_dir, work_dir=options["work_dir"]
        )
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    click.echo(f"cv run {result.run_id}: cv_score {result.cv_score:.4f}")
    for fold, fold_result in result.folds.items():
        click.echo(f"  fold {fold}: best val_score {fold_result.best_score:.4f} at epoch {fold_result.best_epoch}")


@main.command()
@_train_options
@click.option("--folds", default="all", show_default=True, help="Folds to run: all, or e.g. 0,2.")
@click.option(
    "--parent-run-id",
    help="Join this shared cv run (`geopose-ml cv start`): train --folds in it with its configuration.",
)
def train(folds: str, parent_run_id: str | None, **options) -> None:
    """Train one cross-validation: a parent MLflow run and a nested run per fold."""
    if parent_run_id:
        _run_fold_worker(parent_run_id, folds, options)
        return
    _run_training(folds, options)


@main.command(hidden=True)
@_train_options
@click.option("--fold", required=True, type=int, help="The one fold to train and validate.")
def fold(fold: int, **options) -> None:
    """Train a single fold (``train --folds N``), as the MLproject's ``fold`` entry point."""
    _run_training(str(fold), options)


def _run_fold_worker(parent_run_id: str, folds: str, options: dict) -> None:
    from geopose_mlops.train.shared_cv import option_value, run_fold_worker

    if folds.strip() == "all":
        raise ConfigError("--parent-run-id needs --folds: the folds this worker trains, e.g. --folds 1")
    context = click.get_current_context()
    given = [
        name
        for name in options
        if name not in (*RUN_OPTIONS, "data_dir")  # the data set's path is this machine's own
        and context.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    ]
    config = _train_config(folds, options)
    values = {name: option_value(config, name) for name in given}
    click.echo(f"joining cv run {parent_run_id}: its configuration is used; data from {config.data_dir}")
    folds_to_train = list(config.fold_list())
    result = run_fold_worker(
        parent_run_id, folds_to_train, config.data_dir, options["cache_dir"], options["work_dir"], options=values
    )
    for fold, fold_result in result.folds.items():
        click.echo(f"  fold {fold}: run {fold_result.run_id} best val_score {fold_result.best_score:.4f}")
    if result.cv is not None:
        click.echo(f"cv run {result.cv_run_id}: all folds in, cv_score {result.cv.cv_score:.4f}")
    else:
        click.echo(f"cv run {result.cv_run_id}: waiting for other folds; the last worker logs cv_score")


@main.group()
def cv() -> None:
    """A cross-validation shared by several machines (docs/SCALING.md)."""


@cv.command("start")
@_train_options
@click.option("--folds", default="all", show_default=True, help="Folds that make the cv complete.")
def cv_start(folds: str, **options) -> None:
    """Create a shared cv run and print its id; workers then run `train --parent-run-id ID --folds F`."""
    from geopose_mlops.train.shared_cv import start_shared_cv

    config = _with_folds_file_k(_train_config(folds, options))
    run_id = start_shared_cv(config, options["experiment"], options["cache_dir"])
    click.echo(run_id)


@cv.command("finalize")
@click.argument("run_id")
def cv_finalize(run_id: str) -> None:
    """Log cv_score of shared cv run RUN_ID from all folds' OOF files (exit 1 naming missing folds)."""
    from geopose_mlops.train.shared_cv import finalize_cv

    result = finalize_cv(run_id)
    click.echo(f"cv run {run_id}: cv_score {result.cv_score:.4f}")
