"""``ensemble fit``, ``promote``, ``predict``, ``evaluate``, ``lineage``: from OOF files to a scored submission."""

from __future__ import annotations

from pathlib import Path

import click

from geopose_mlops.cli.app import main
from geopose_mlops.constants import CHAMPION_ALIAS, DEFAULT_EXPERIMENT, REGISTERED_MODEL


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
