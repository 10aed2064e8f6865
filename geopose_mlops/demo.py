"""``geopose-ml demo``: the whole pipeline on synthetic data, end to end, as a user meets it.

synthetic data -> ``data check`` -> folds -> cross-validation of three architectures -> a short Optuna
study -> ``ensemble fit`` -> ``promote --ensemble best`` -> ``predict`` on the test images ->
``evaluate`` against their truth, then a summary table and the command that opens the MLflow UI.

Everything lands in one work folder (data, SQLite tracking store, artifacts, study storage,
submission). Re-running reuses what is finished: the data set is kept, a cross-validation whose
params, data fingerprint and code version match a finished run is not trained again, the study only
tops up to its trial count, and the ensemble is refitted (cheap) but promoted without a new version.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import FOLDS_CSV, TRAIN_CSV
from geopose_mlops.data import io
from geopose_mlops.data.layout import find_samples
from geopose_mlops.errors import GeoposeError

DEMO_EXPERIMENT = "geopose-demo"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo, chosen to finish in about ten minutes on two CPU cores.

    Attributes:
        images_per_city: Synthetic training images per city.
        test_images_per_city: Synthetic test images per city (their truth goes to ``test_truth/``).
        source_size: Side of the synthetic images, px.
        image_size: Training side, px.
        epochs: Epochs per fold of each architecture.
        k: Folds.
        lr: Learning rate of the architectures (the study searches its own).
        batch_size: Micro-batch.
        architectures: (decoder, encoder) pairs cross-validated.
        study_trials: Trials of the Optuna study (one fold each).
        study_epochs: Epochs per trial.
        seed: Seed of the data, folds and weights.
    """

    images_per_city: int = 24
    test_images_per_city: int = 2
    source_size: int = 64
    image_size: int = 64
    epochs: int = 30
    k: int = 2
    lr: float = 3e-3
    batch_size: int = 8
    architectures: tuple[tuple[str, str], ...] = (
        ("Unet", "tu-mobilenetv3_small_050"),
        ("FPN", "tu-mobilenetv3_small_050"),
        ("Unet", "resnet18"),
    )
    study_trials: int = 3
    study_epochs: int = 6
    seed: int = 0


@dataclass
class DemoSummary:
    """What the demo prints at the end."""

    workdir: Path
    tracking_uri: str
    cv_scores: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    study_best: float = math.nan
    ensemble_oof_score: float = math.nan
    best_member_oof_score: float = math.nan
    model_uri: str = ""
    test_score: float = math.nan
    baseline_test_score: float = math.nan
    seconds: float = 0.0

    def table(self) -> str:
        """The summary as a Markdown table."""
        rows = [("what", "score", "note"), ("---", "---", "---")]
        for name, score in self.cv_scores.items():
            rows.append((f"cv {name}", f"{score:.4f}", "reused" if self.reused.get(name) else "trained"))
        rows.append(("study best (fold 0)", f"{self.study_best:.4f}", "Optuna lr x effective batch"))
        best_member = f"best member {self.best_member_oof_score:.4f}"
        rows.append(("ensemble (out-of-fold)", f"{self.ensemble_oof_score:.4f}", best_member))
        rows.append(("ensemble on test images", f"{self.test_score:.4f}", self.model_uri))
        rows.append(("mean-height baseline on test", f"{self.baseline_test_score:.4f}", "train mean AGL, scale, angle"))
        return "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)


def demo_tracking_uri(workdir: Path) -> str:
    """The demo's own SQLite store, unless ``MLFLOW_TRACKING_URI`` names another."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def write_mean_baseline(data_dir: Path, out_dir: Path) -> None:
    """A submission that predicts the training set's mean height, mean scale and circular-mean angle.

    The reference a learned model must beat: it knows the data's averages and nothing of each image.
    """
    samples = find_samples(data_dir, "train")
    height_sum, height_n, scales, sines, cosines = 0.0, 0, [], 0.0, 0.0
    for sample in samples:
        agl = io.read_agl(sample.agl_path)
        height_sum += float(np.nansum(agl))
        height_n += int(np.isfinite(agl).sum())
        scale, angle = io.read_vflow(sample.vflow_path)
        scales.append(scale)
        sines, cosines = sines + math.sin(angle), cosines + math.cos(angle)
    mean_height, mean_scale = height_sum / max(height_n, 1), float(np.mean(scales))
    mean_angle = math.atan2(sines, cosines)
    for sample in find_samples(data_dir, "test"):
        height, width, _, _ = io.raster_info(sample.rgb_path)
        io.write_agl(out_dir / f"{sample.sample_id}_AGL.tif", np.full((height, width), mean_height, np.float32))
        io.write_vflow(out_dir / f"{sample.sample_id}_VFLOW.json", mean_scale, mean_angle)


def _step(say: Callable[[str], None], title: str) -> None:
    say(f"\n== {title}")


def run_demo(
    workdir: str | Path, settings: DemoSettings | None = None, say: Callable[[str], None] = print
) -> DemoSummary:
    """Run the pipeline; return (and let the caller print) the summary.

    Raises:
        GeoposeError: A step failed; the message names the step's file or value.
    """
    from geopose_mlops.tracking.experiments import experiment_id

    settings = settings or DemoSettings()
    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    os.environ["MLFLOW_TRACKING_URI"] = uri = demo_tracking_uri(workdir)
    # One progress bar per fold and the summary: MLflow's bar per artifact download would bury them.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    experiment_id(DEMO_EXPERIMENT, create=True, artifact_location=(workdir / "artifacts").as_uri())
    summary = DemoSummary(workdir=workdir, tracking_uri=uri)

    fingerprint = _prepare_data(data_dir, settings, say)
    base = _base_config(data_dir, settings)
    _step(say, f"4/8 cross-validation of {len(settings.architectures)} architectures")
    cv_run_ids = [_cross_validate(base, arch, fingerprint, summary, say) for arch in settings.architectures]

    _step(say, f"5/8 Optuna study: {settings.study_trials} trials over lr and effective batch size")
    summary.study_best = _run_demo_study(workdir, base, settings, say)

    _step(say, "6/8 ensemble fit on the out-of-fold predictions, 7/8 promote")
    ensemble = _fit_and_promote(cv_run_ids, say)
    summary.ensemble_oof_score = ensemble["oof_score"]
    summary.best_member_oof_score = ensemble["best_member_oof_score"]
    summary.model_uri = ensemble["model_uri"]

    _step(say, "8/8 predict the test images and evaluate against their truth")
    summary.test_score, summary.baseline_test_score = _predict_and_evaluate(summary.model_uri, workdir, data_dir)
    summary.seconds = time.perf_counter() - started
    return summary


def _prepare_data(data_dir: Path, settings: DemoSettings, say: Callable[[str], None]) -> str:
    """Steps 1-3: the synthetic data set (kept when written), its check, its folds; the cache fingerprint."""
    from geopose_mlops.data.cache import cache_fingerprint
    from geopose_mlops.data.check import check_dataset
    from geopose_mlops.data.folds import make_folds, write_folds
    from geopose_mlops.data.synth import make_synthetic_dataset

    _step(say, f"1/8 synthetic data -> {data_dir}")
    if (data_dir / TRAIN_CSV).is_file():
        say("   kept (already written; the generator is deterministic for its seed)")
    else:
        make_synthetic_dataset(
            data_dir,
            settings.images_per_city,
            settings.source_size,
            settings.seed,
            test_images_per_city=settings.test_images_per_city,
            progress=True,
        )

    _step(say, "2/8 data check")
    report = check_dataset(data_dir)
    if not report.ok:
        path, reason = report.problems[0]
        raise GeoposeError(f"data check found {len(report.problems)} problem(s), first: {path}: {reason}")
    for split, counts in report.counts.items():
        say(f"   {split}: " + ", ".join(f"{city} {n}" for city, n in sorted(counts.items())))

    _step(say, f"3/8 folds (k={settings.k}, stratified by city)")
    samples = find_samples(data_dir, "train")
    write_folds(data_dir / FOLDS_CSV, make_folds(samples, settings.k, settings.seed))
    return cache_fingerprint(samples, settings.image_size)


def _base_config(data_dir: Path, settings: DemoSettings) -> TrainConfig:
    """What every architecture of the demo shares."""
    return TrainConfig(
        data_dir=str(data_dir),
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        image_size=settings.image_size,
        k=settings.k,
        seed=settings.seed,
        amp=True,
        augment=False,  # 48 tiny images: flips and rotations hide the per-city angle prior the demo can learn
    )


def _cross_validate(
    base: TrainConfig, architecture: tuple[str, str], fingerprint: str, summary: DemoSummary, say: Callable[[str], None]
) -> str:
    """Step 4 for one (decoder, encoder): reuse a finished cv run of the same params, data and code, else train."""
    from geopose_mlops.tracking.runs import cv_score, find_finished_cv_run
    from geopose_mlops.train.cv import run_cross_validation

    decoder, encoder = architecture
    name = f"{decoder}/{encoder}"
    config = replace(base, model=ModelConfig(encoder=encoder, decoder=decoder))
    run_id = find_finished_cv_run(DEMO_EXPERIMENT, config, fingerprint)
    summary.reused[name] = run_id is not None
    if run_id is None:
        run_id = run_cross_validation(config, experiment=DEMO_EXPERIMENT).run_id
    summary.cv_scores[name] = cv_score(run_id)
    say(f"   {name}: cv_score {summary.cv_scores[name]:.4f} ({'reused' if summary.reused[name] else 'trained'})")
    return run_id


def _predict_and_evaluate(model_uri: str, workdir: Path, data_dir: Path) -> tuple[float, float]:
    """Step 8: (the registered model's test score, the mean-height baseline's)."""
    from geopose_mlops.metrics import evaluate_folder

    submission = workdir / "submission"
    _predict(model_uri, data_dir / "test", submission)
    test_score = evaluate_folder(submission, data_dir / "test_truth", progress=False)["final_score"]
    baseline_dir = workdir / "baseline_submission"
    write_mean_baseline(data_dir, baseline_dir)
    baseline_score = evaluate_folder(baseline_dir, data_dir / "test_truth", progress=False)["final_score"]
    return test_score, baseline_score


def _run_demo_study(workdir: Path, base: TrainConfig, settings: DemoSettings, say: Callable[[str], None]) -> float:
    """A short study on fold 0; re-running tops it up to ``study_trials`` finished trials."""
    import optuna

    from geopose_mlops.config import from_dict, to_dict
    from geopose_mlops.tune.study import describe_study, run_study
    from geopose_mlops.tune.study_file import StudyConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the step prints the study's summary itself
    train = to_dict(replace(base, epochs=settings.study_epochs, model=ModelConfig(*settings.architectures[0][::-1])))
    config = from_dict(
        StudyConfig,
        {
            "study_name": "demo_lr_batch",
            "storage": f"sqlite:///{workdir / 'studies.db'}",
            "experiment": DEMO_EXPERIMENT,
            "objective": "fold0",
            "train": train,
            "sampler": {"name": "tpe", "seed": settings.seed, "n_startup_trials": 2},
            "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 2},
            "search_space": {
                "lr": {"low": 1e-5, "high": 1e-3, "log": True},
                "effective_batch_size": {"low": 4, "high": 16, "scale": "pow2", "max_micro_batch": 8},
            },
        },
        "demo study",
    )
    done = 0
    try:
        existing = optuna.load_study(study_name=config.study_name, storage=config.storage)
        done = sum(t.state.is_finished() for t in existing.get_trials(deepcopy=False))
    except KeyError:
        pass
    if done < settings.study_trials:
        run_study(config, n_trials=settings.study_trials - done, progress=False)
    study = optuna.load_study(study_name=config.study_name, storage=config.storage)
    say("   " + describe_study(study).replace("\n", "\n   "))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return study.best_value if complete else math.nan


def _fit_and_promote(cv_run_ids: list[str], say: Callable[[str], None]) -> dict:
    """Fit on the architectures' OOF predictions, promote the best ensemble, return its numbers."""
    from geopose_mlops.constants import CHAMPION_ALIAS, REGISTERED_MODEL
    from geopose_mlops.ensemble.members import fit_tracked_ensemble
    from geopose_mlops.registry import promote

    run_id, spec = fit_tracked_ensemble(DEMO_EXPERIMENT, run_ids=cv_run_ids, method="simplex")
    say(
        f"   ensemble run {run_id}: oof_score {spec.oof_score:.4f}, best member {spec.best_member_oof_score:.4f}, "
        f"equal weights {spec.equal_weights_oof_score:.4f}"
    )
    say(f"   height weights {[round(w, 3) for w in spec.height_weights]}; city factors {spec.city_height_factors}")
    version, created = promote("best", REGISTERED_MODEL, CHAMPION_ALIAS, force=False, experiment=DEMO_EXPERIMENT)
    uri = f"models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}"
    say(f"   {REGISTERED_MODEL} version {version} ({'new' if created else 'already registered'}) -> {uri}")
    return {"oof_score": spec.oof_score, "best_member_oof_score": spec.best_member_oof_score, "model_uri": uri}


def _predict(model_uri: str, images_dir: Path, out_dir: Path) -> None:
    """Predict the test images through the registered model (the folder is rewritten each time).

    No TTA: the demo's models train without flips and rotations, so they read the angle from the city
    rather than the picture, and a flipped view's inverted angle would only add noise.
    """
    import shutil

    from geopose_mlops.inference import predict_folder
    from geopose_mlops.registry import load_predictor

    shutil.rmtree(out_dir, ignore_errors=True)
    predict_folder(load_predictor(model_uri), images_dir, out_dir, tta="none", progress=False)
