"""Figure 8, promote: seconds to register an ensemble, and what each checkpoint adds.

Inputs: tracked runs made without training, in a temporary SQLite store with a local artifact folder:
``--members`` cv runs of ``--folds`` fold runs each, every fold run holding a ``best.pt`` as training
writes it (the weights of a U-Net over ``--encoder``, weights off, with its config), and one ensemble run
per member count (1 .. members) whose ``ensemble.json`` names them; so ensembles of ``folds``,
``2 x folds``, ... checkpoints.

- **ours**: ``geopose_mlops.registry.promote`` (model from code, named pip requirements, each ``best.pt``
  hard-linked into the package as it is, one load of the model by MLflow's input-example check).
  Timed per ensemble size after one untimed promote (imports); the per-checkpoint cost is the slope of
  a least-squares line through each size's median seconds, the fixed cost its intercept, and
  ``promote_seconds_4_checkpoints`` that line's value at 4 checkpoints (measured at 2, 4 and 6 by default).
- **reference** (the way promote worked before; ``--no-reference`` skips it): each ``best.pt`` downloaded, loaded and
  saved again, the pyfunc logged as a pickled object with no type hints and no requirements, so MLflow
  infers them by loading the model in a subprocess, then the same input-example check. Timed once, on the
  largest ensemble (it takes about a minute on two cores).

Goals: promote of 4 checkpoints in under 10 s; under 2 s per checkpoint. What a checkpoint costs is the
one validation load (model built, weights loaded and moved to channels_last, one forward pass of the
input example) and two copies of the file by MLflow (into the model folder, then into the store).
Measured on two cores shared with other work: 0.85 s per 58 MB checkpoint on a quiet machine, up to
1.5 s under load; the previous way took 30-50 s for 6 checkpoints where ours took 8-11 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import common
import mlflow
import numpy as np

SECONDS_GOAL = 10.0  # for 4 checkpoints
PER_CHECKPOINT_GOAL = 2.0  # seconds per 58 MB resnet18 U-Net checkpoint on two cores


def make_runs(experiment: str, members: int, folds: int, encoder: str, root: Path) -> list[str]:
    """The tracked cv and fold runs, and one ensemble run per member count; returns the ensemble run ids."""
    from mlflow.tracking import MlflowClient

    from geopose_mlops.config import ModelConfig, TrainConfig
    from geopose_mlops.ensemble.fit import EnsembleSpec
    from geopose_mlops.models.factory import build_model
    from geopose_mlops.tracking.runs import CvTracker
    from geopose_mlops.train.checkpoint import save_checkpoint

    tracker, client = CvTracker(experiment), MlflowClient()
    cv_runs: dict[str, dict[str, str]] = {}
    for member in range(members):
        config = TrainConfig(model=ModelConfig(encoder=encoder, decoder="Unet"), lr=1e-3 * (member + 1), image_size=64)
        cv_run_id = tracker.start_cv_run(config, "bench" * 8)
        cv_runs[cv_run_id] = {}
        for fold in range(folds):
            fold_run_id = tracker.start_fold_run(cv_run_id, fold, config, "bench" * 8, "fp32")
            path = save_checkpoint(root / f"{fold_run_id}.pt", build_model(config.model), None, None, config,
                                   fold, 0, 0.5, 0)  # fmt: skip
            tracker.log_checkpoint(fold_run_id, path.rename(path.with_name("best.pt")))
            tracker.end_run(fold_run_id)
            cv_runs[cv_run_id][str(fold)] = fold_run_id
        client.log_metric(cv_run_id, "cv_score", 0.5)
        tracker.end_run(cv_run_id)
    ensembles = []
    for count in range(1, members + 1):
        ids = list(cv_runs)[:count]
        spec = EnsembleSpec(
            members=ids, method="equal", height_weights=[1 / count] * count, scale_weights=[1 / count] * count,
            angle_weights=[1 / count] * count, oof_score=0.5, member_oof_scores=dict.fromkeys(ids, 0.5),
            equal_weights_oof_score=0.5, member_folds={i: cv_runs[i] for i in ids}, image_size=64,
        )  # fmt: skip
        run_id = client.create_run(tracker.experiment_id, tags={"geopose.kind": "ensemble"}).info.run_id
        folder = root / f"ensemble-{count}"
        folder.mkdir()
        spec.save(folder / "ensemble.json")
        client.log_artifacts(run_id, str(folder))
        client.log_metric(run_id, "oof_score", 0.5)
        client.set_terminated(run_id)
        ensembles.append(run_id)
    return ensembles


def reference_promote(ensemble_run_id: str, name: str) -> None:
    """Promote as before: checkpoints re-serialised, a pickled pyfunc, requirements inferred by MLflow."""
    import torch
    from mlflow.tracking import MlflowClient

    from geopose_mlops.ensemble.fit import EnsembleSpec
    from geopose_mlops.registry import _signature

    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ensemble"
        client.download_artifacts(ensemble_run_id, "", str(folder))
        spec = EnsembleSpec.load(folder / "ensemble.json")
        for member, folds in spec.member_folds.items():
            for fold, fold_run_id in folds.items():
                with tempfile.TemporaryDirectory() as one:
                    path = Path(client.download_artifacts(fold_run_id, "checkpoints/best.pt", one))
                    state = torch.load(path, map_location="cpu", weights_only=True)
                    state["optimizer"], state["scaler"] = None, {}
                    target = folder / "checkpoints" / member / f"fold{fold}.pt"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(state, target)
        signature, example = _signature(spec.image_size)
        with mlflow.start_run(run_id=ensemble_run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=pickled_ensemble(),
                                           artifacts={"ensemble": str(folder)}, signature=signature,
                                           input_example=example)  # fmt: skip
    mlflow.register_model(info.model_uri, name)


def pickled_ensemble():
    """The previous pyfunc: an object pickled with the model, ``predict`` without type hints (made on demand:
    MLflow warns about the missing hints when the class is made)."""

    class PickledEnsemble(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from geopose_mlops.inference import EnsemblePredictor

            self.predictor = EnsemblePredictor(context.artifacts["ensemble"])

        def predict(self, context, model_input, params=None):
            from geopose_mlops.constants import CITIES

            cities = [CITIES[int(c)] for c in np.asarray(model_input["city"]).reshape(-1)]
            return self.predictor.predict(model_input["image"], np.asarray(model_input["gsd"]), cities, "none")

    return PickledEnsemble()


def checkpoint_mb(root: Path) -> float:
    """Size of one stored ``best.pt``, MB."""
    return next(root.rglob("best.pt")).stat().st_size / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3, help="cv runs (ensembles of 1..members of them)")
    parser.add_argument("--folds", type=int, default=2, help="fold runs (checkpoints) per cv run")
    parser.add_argument("--encoder", default="resnet18", help="encoder of the U-Net checkpoints")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the previous promote (about a minute)")  # fmt: skip
    opts = parser.parse_args(argv)
    common.limit_threads(2)
    from geopose_mlops.registry import promote

    with tempfile.TemporaryDirectory(prefix="bench-promote-") as tmp:
        root = Path(opts.workdir or tmp)
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        mlflow.MlflowClient().create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
        ensembles = make_runs("bench", opts.members, opts.folds, opts.encoder, root)
        promote(ensembles[0], f"warmup-{uuid.uuid4().hex[:6]}", experiment="bench")  # imports, first load
        sizes, seconds = [], []
        for _ in range(opts.repeats):
            for count, run_id in enumerate(ensembles, start=1):
                start = time.perf_counter()
                promote(run_id, f"bench-{uuid.uuid4().hex[:6]}", experiment="bench")
                sizes.append(count * opts.folds)
                seconds.append(time.perf_counter() - start)
        # The median of each size's repeats, then a line through them: one slow repeat (a busy machine) moves
        # neither the per-checkpoint cost nor the fixed cost much.
        counts = sorted(set(sizes))
        medians = [float(np.median([s for n, s in zip(sizes, seconds, strict=True) if n == c])) for c in counts]
        slope, intercept = np.polyfit(counts, medians, 1) if len(counts) > 1 else (medians[0] / counts[0], 0.0)
        at_four = float(slope * 4 + intercept)
        reference_s, speedup = None, None
        if opts.reference:
            start = time.perf_counter()
            reference_promote(ensembles[-1], f"reference-{uuid.uuid4().hex[:6]}")
            reference_s = time.perf_counter() - start
            speedup = reference_s / medians[-1]
        size_mb = checkpoint_mb(root / "artifacts")
    measured = {"checkpoints": sizes, "seconds": [round(s, 3) for s in seconds], "checkpoint_mb": round(size_mb, 1),
                "median_s_by_checkpoints": dict(zip(counts, [round(m, 3) for m in medians], strict=True)),
                "encoder": opts.encoder, "fixed_s": round(float(intercept), 3)}  # fmt: skip
    figures = [
        common.figure("promote_seconds_4_checkpoints", at_four, "s", f"< {SECONDS_GOAL:g} s (was ~70 s)",
                      at_four < SECONDS_GOAL, reference_s_largest_ensemble=reference_s,
                      reference_checkpoints=counts[-1] if reference_s else None, speedup_vs_reference=speedup,
                      **measured),
        common.figure("promote_seconds_per_checkpoint", float(slope), "s", f"< {PER_CHECKPOINT_GOAL:g} s per "
                      f"{size_mb:.0f} MB checkpoint", float(slope) < PER_CHECKPOINT_GOAL, **measured),
    ]  # fmt: skip
    common.print_figures(figures)
    print(f"promote: {measured}; reference {reference_s if reference_s is None else round(reference_s, 1)} s")
    common.write_results(figures, opts.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
