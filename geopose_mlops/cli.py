"""``geopose-ml``: a thin click layer over the package (SPEC §3).

Every command exits 0 on success; on failure it prints one line naming the file or value at fault and
exits 1 (bad data or run-time failure) or 2 (bad arguments or configuration, nothing written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from click.core import ParameterSource

from geopose_mlops.config import ModelConfig, TrainConfig, default_of
from geopose_mlops.constants import CHAMPION_ALIAS, DEFAULT_EXPERIMENT, REGISTERED_MODEL
from geopose_mlops.errors import ConfigError, GeoposeError

EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by a signal (128 + SIGINT)


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
        except KeyboardInterrupt:
            click.echo("Error: interrupted; open runs were marked KILLED (continue with --resume RUN_ID)", err=True)
            sys.exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill``, a batch scheduler's stop) stops the command as Ctrl-C does.

    The ``KeyboardInterrupt`` unwinds through training and tuning, which mark their runs KILLED and
    their trials failed instead of leaving them RUNNING. (SIGKILL cannot be caught: runs stay RUNNING,
    and ``--resume`` / the study's heartbeats take over.)
    """
    import signal
    import threading

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    with _sigterm_as_interrupt():
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
@click.option("--workers", type=click.IntRange(0), help="Decoding processes (default or 0: the usable cores).")
def data_check(data_dir: Path, headers_only: bool, workers: int | None) -> None:
    """Validate DATA: counts per city and every bad file with its reason; exit 1 if any."""
    from geopose_mlops.data.check import check_dataset

    report = check_dataset(data_dir, decode=not headers_only, progress=True, workers=workers or None)
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
@click.option(
    "--k", type=click.IntRange(min=2), default=default_of(TrainConfig, "k"), show_default=True, help="Number of folds."
)
@click.option("--seed", type=int, default=default_of(TrainConfig, "seed"), show_default=True, help="Fold seed.")
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


# --- shared cross-validation (issue 7): fold workers on several machines under one cv run -----------


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
    with _sigterm_as_interrupt():
        study = run_study(config, n_trials=n_trials or None, timeout=timeout or None, storage=storage or None)
    click.echo(describe_study(study))


# --- report (issue 6): leaderboard and curves from tracked runs ----------------------------------


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


# --- ensemble, promote, predict (issue 5) --------------------------------------------------------


@main.group()
def ensemble() -> None:
    """Ensembles fitted on tracked out-of-fold predictions."""


@ensemble.command("fit")
@click.option(
    "--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="Experiment of the candidate cv runs."
)
@click.option(
    "--filter", "filter_string", default="", help="Extra MLflow filter, e.g. \"params.encoder = 'resnet34'\"."
)
@click.option("--run-ids", default="", help="Comma-separated cv run ids instead of a search.")
@click.option("--max-members", type=click.IntRange(1), default=None, help="Keep the N best cv runs.")
@click.option(
    "--method",
    type=click.Choice(["simplex", "caruana", "equal"]),
    default="simplex",
    show_default=True,
    help="Weights of the members' height, scale and angle: simplex (SLSQP on the exact score), caruana (greedy "
    "selection with replacement) or equal. Every method also fits city factors and a scale model unless switched off.",
)
@click.option(
    "--city-factors/--no-city-factors",
    default=True,
    show_default=True,
    help="Fit a height factor per city; kept for a city only where a nested fold check says it helps and it lies "
    "in [0.5, 2] (a factor outside is refused with a warning naming the city).",
)
@click.option(
    "--scale-model/--no-scale-model",
    default=True,
    show_default=True,
    help="Fit an XGBoost model of scale from gsd, city and the ensemble's scale; kept only if its nested "
    "predictions raise the score.",
)
def ensemble_fit(
    experiment: str,
    filter_string: str,
    run_ids: str,
    max_members: int | None,
    method: str,
    city_factors: bool,
    scale_model: bool,
) -> None:
    """Fit weights (and, unless switched off, city height factors and a scale model) on OOF predictions.

    Logs an ``ensemble`` run holding ensemble.json with what was fitted and its out-of-fold score.
    """
    from geopose_mlops.ensemble.members import fit_tracked_ensemble

    ids = [r for r in run_ids.split(",") if r] or None
    run_id, spec = fit_tracked_ensemble(
        experiment, filter_string, ids, max_members, method, city_factors=city_factors, scale_model=scale_model
    )
    click.echo(
        f"ensemble run {run_id}: oof_score {spec.oof_score:.4f} (best member {spec.best_member_oof_score:.4f}, "
        f"equal weights {spec.equal_weights_oof_score:.4f})"
    )
    for member, weight in zip(spec.members, spec.height_weights, strict=True):
        click.echo(f"  {member}: height weight {weight:.3f}")
    click.echo(f"  city height factors {spec.city_height_factors}; scale model {spec.scale_model or 'not kept'}")


@main.command()
@click.option("--ensemble", "ensemble_ref", required=True, help="best, or an ensemble run id.")
@click.option("--name", default=REGISTERED_MODEL, show_default=True, help="Registered model name.")
@click.option("--alias", default=CHAMPION_ALIAS, show_default=True, help="Alias moved to the new version.")
@click.option("--force", is_flag=True, help="Move the alias even to a worse ensemble.")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="Where --ensemble best looks.")
def promote(ensemble_ref: str, name: str, alias: str, force: bool, experiment: str) -> None:
    """Register the ensemble as a model version and move the alias to it."""
    from geopose_mlops.registry import promote as promote_ensemble

    version, created = promote_ensemble(ensemble_ref, name, alias, force, experiment)
    click.echo(f"{name} version {version} ({'new' if created else 'existing'}) is now @{alias}: models:/{name}@{alias}")


@main.command()
@click.option(
    "--model",
    "model_uri",
    default="models:/geopose-ensemble@champion",
    show_default=True,
    help="A registered ensemble, an ensemble folder, or runs:/CV_RUN_ID (that architecture: the mean of its folds).",
)
@click.option("--images", "images_dir", required=True, type=click.Path(path_type=Path), help="Folder of RGB images.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Submission folder.")
@click.option("--tta", type=click.Choice(["none", "flip", "d4"]), default="none", show_default=True)
@click.option(
    "--image-size", type=click.IntRange(32), default=None, help="Side to predict at, px (default: the training side)."
)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA where available), cpu, cuda or cuda:N.")
@click.option(
    "--batch-size", type=click.IntRange(0), help="Images per forward pass (default or 0: 1 on the CPU, 8 on CUDA)."
)
@click.option("--workers", type=click.IntRange(0), help="Decoding processes (default or 0: the usable cores).")
@click.option(
    "--amp/--no-amp", default=True, show_default=True, help="Mixed precision as in training (--no-amp: fp32)."
)
def predict(
    model_uri: str,
    images_dir: Path,
    out_dir: Path,
    tta: str,
    image_size: int | None,
    device: str,
    batch_size: int | None,
    workers: int | None,
    amp: bool,
) -> None:
    """Write a submission folder (SPEC §2) for every image, with optional test-time augmentation."""
    from geopose_mlops.inference import predict_folder, resolve_device
    from geopose_mlops.registry import load_predictor

    resolve_device(device)  # a bad --device fails before any model is loaded
    predictor = load_predictor(model_uri).to(device, amp)
    done = predict_folder(
        predictor, images_dir, out_dir, tta, image_size=image_size, say=click.echo, batch_size=batch_size or None,
        workers=workers or None,
    )  # fmt: skip
    click.echo(f"wrote {len(done)} prediction(s) to {out_dir} ({predictor.device}, {predictor.precision.name})")


@main.command()
@click.argument("model_uri", metavar="MODEL_URI", default=f"models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}")
def lineage(model_uri: str) -> None:
    """The chain behind a registered version: ensemble run, member cv runs, their fold runs, the data."""
    from geopose_mlops.tracking.lineage import lineage_lines, version_lineage

    version, chain = version_lineage(model_uri)
    for line in lineage_lines(model_uri, version, chain):
        click.echo(line)


# --- demo (issue 6) --------------------------------------------------------------------------------


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


if __name__ == "__main__":
    main()
