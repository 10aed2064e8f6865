"""Figure 6, pruning: epochs spent by a 20-trial study with the median pruner vs without.

Both studies go through the project's real path, ``tuning.run_study`` on ``studies/lr_batch.yaml``
(TPE sampler seed 0 with 8 random start-up trials; median pruner with 3 start-up trials and 1 warm-up
epochs; 10 epochs per trial; objective ``fold0``): an Optuna RDB storage, an MLflow study run with a
trial run per trial, and every epoch ``tracker.log_trial_epoch`` + ``trial.report`` +
``trial.should_prune`` in ``make_objective``'s callback. The reference study differs only in
``pruner: none``.

What is *not* real is the training: ``run_cross_validation`` is replaced by a cheap synthetic learning
curve, so 2 x 20 trials x 10 epochs take seconds. Its validation score after epoch e is
``final(lr, batch) * (1 - exp(-(e + 1) / 2.5)) + noise``, where ``final`` peaks at lr = 3e-4 and an
effective batch of 16 (a log-scale bump) and the noise is N(0, 0.005), seeded by the trial's
parameters and the epoch, so a configuration gives the same curve in both studies.

Goals: >= 40% fewer epochs with pruning, at an equal best value within noise (|difference| <= 3
noise standard deviations = 0.015).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import zlib
from pathlib import Path

import common
import numpy as np

REDUCTION_GOAL = 0.40
NOISE_STD = 0.005  # of the synthetic validation score, per epoch
EQUAL_TOLERANCE = 3 * NOISE_STD
STUDY_FILE = common.BENCH_DIR.parent / "studies" / "lr_batch.yaml"


def learning_curve(lr: float, effective_batch_size: int, epoch: int) -> float:
    """Synthetic validation score of a configuration after ``epoch`` (0-based)."""
    quality = math.exp(-(((math.log10(lr) - math.log10(3e-4)) / 0.6) ** 2))
    quality *= math.exp(-(((math.log2(effective_batch_size) - 4) / 3) ** 2))
    final = 0.2 + 0.6 * quality
    seed = zlib.crc32(f"{lr:.12g}/{effective_batch_size}/{epoch}".encode())
    noise = np.random.default_rng(seed).normal(0, NOISE_STD)
    return final * (1 - math.exp(-(epoch + 1) / 2.5)) + noise


class SyntheticTraining:
    """Stands in for ``run_cross_validation``: reports the learning curve epoch by epoch; counts epochs."""

    def __init__(self) -> None:
        self.epochs = 0

    def __call__(self, train, on_epoch_end=None, run_id=None, **kwargs):
        from geopose_mlops.train.cv import CvResult, FoldResult

        folds = {}
        for fold in train.fold_list():
            best, best_epoch = -math.inf, -1
            for epoch in range(train.epochs):
                self.epochs += 1
                score = learning_curve(train.lr, train.effective_batch_size or train.batch_size, epoch)
                if score > best:
                    best, best_epoch = score, epoch
                if on_epoch_end is not None:
                    on_epoch_end(fold, epoch, {"val_score": score})
            folds[fold] = FoldResult(run_id or "synthetic", best, best_epoch)
        mean = sum(f.best_score for f in folds.values()) / len(folds)
        return CvResult(run_id or "synthetic", mean, {}, folds)


def run_one(config, root: Path, pruner: str, n_trials: int) -> tuple[int, float, int]:
    """Run one study; return (epochs trained, best value, pruned trials)."""
    import optuna

    from geopose_mlops.train import cv
    from geopose_mlops.tune.study import run_study

    study_config = dataclasses.replace(
        config,
        study_name=f"bench-{pruner}",
        storage=f"sqlite:///{root / f'{pruner}.db'}",
        experiment="bench",
        pruner=dataclasses.replace(config.pruner, name=pruner),
    )
    training = SyntheticTraining()
    original = cv.run_cross_validation
    cv.run_cross_validation = training
    try:
        study = run_study(study_config, n_trials=n_trials)
    finally:
        cv.run_cross_validation = original
    pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
    return training.epochs, study.best_value, pruned


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per study")
    parser.add_argument("--study", type=Path, default=STUDY_FILE, help="study YAML (sampler and pruner settings)")
    opts = parser.parse_args(args)
    with tempfile.TemporaryDirectory(prefix="bench-pruning-", dir=opts.workdir) as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        import mlflow
        import optuna

        from geopose_mlops.tune.study import load_study_config

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.MlflowClient().create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
        config = load_study_config(opts.study)
        full_epochs, full_best, _ = run_one(config, root, "none", opts.trials)
        pruned_epochs, pruned_best, pruned_trials = run_one(config, root, config.pruner.name, opts.trials)
    reduction = 1 - pruned_epochs / full_epochs
    difference = abs(full_best - pruned_best)
    details = {
        "trials": opts.trials,
        "epochs_per_trial": config.train.epochs,
        "pruner": config.pruner.name,
        "reference_epochs": full_epochs,
        "ours_epochs": pruned_epochs,
        "pruned_trials": pruned_trials,
        "reference_best": full_best,
        "ours_best": pruned_best,
        "objective": "synthetic learning curve through tuning.run_study (training replaced)",
    }
    figures = [
        common.figure(
            "pruning_epoch_reduction", reduction * 100, "%", f">= {REDUCTION_GOAL:.0%} fewer epochs",
            reduction >= REDUCTION_GOAL, **details,
        ),
        common.figure(
            "pruning_best_value_difference", difference, "abs",
            f"<= {EQUAL_TOLERANCE:g} (3 noise std)", difference <= EQUAL_TOLERANCE, **details,
        ),
    ]  # fmt: skip
    common.write_results(figures, opts.results)
    common.print_figures(figures)
    print(
        f"{full_epochs} epochs without pruning (best {full_best:.4f}), {pruned_epochs} with the "
        f"{config.pruner.name} pruner ({pruned_trials} trials pruned, best {pruned_best:.4f})",
        flush=True,
    )
    return figures


if __name__ == "__main__":
    run(sys.argv[1:])
