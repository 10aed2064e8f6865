"""Figure 7, training recipes: fold 0's val_score of each loss and option against mse alone, and against the baseline.

Every variant goes through the project's real path, ``run_cross_validation`` with a tracked fold 0 (an
SQLite store in a scratch folder), on one synthetic data set (``--images-per-city`` per city, 4 cities,
``--size`` px, written once with its ``folds.csv``, so every seed trains and validates on the same
images) and one budget: the same epochs, batch, model (U-Net over ``--encoder``, weights off) and seed
(``--seeds`` of them: the seed moves the initial weights, the training order and the augmentation).
The reference, ``mse``, is the platform's default recipe (``TrainConfig`` defaults: mse, augmentation,
AdamW with warm-up and cosine decay, mixed precision where the CPU has bf16) at the bench's learning rate
(``--lr``, 1e-3: the default 1e-4 is meant for thousands of steps and barely moves the weights in the
few dozen here); each other variant changes one thing:

- ``r2``: the 1st place's per-city R² loss against the training rows' city means;
- ``huber_cos``: the 2nd place's Huber + cosine loss;
- ``mse + height warp``: ``height_warp_p`` 0.3 (the public baseline's ``augment_vflow`` probability);
- ``mse + ema``: ``ema`` (``--ema``, per optimiser step; this budget has a few hundred steps);
- ``mse + keep-top 3``: the top-3 epochs averaged at the end, ``best.pt`` the better;
- ``mse, no metadata``: the direction head without gsd and the city one-hot (``use_metadata`` off; the
  default feeds them, and the seed reported no gain from them);
- ``staged``: mse for 2/3 of the epochs on crops of half the side, then ``--init-from`` that run at the
  full side for the rest, at 0.3x the learning rate (the 1st place's 896 then 1792 px crops at 3e-5).

Each figure is the mean over the seeds of fold 0's ``best_val_score`` (its ``best.pt``), the spread
their standard deviation. Goal: at least mse's mean less mse's spread (the reference's seed-to-seed
noise) and, for ``r2``, at least mse's mean. A variant that misses says MISSED.

The same script trains the public baseline's loop (``baseline_vflow.py``: UNet-VFLOW heads and loss,
fp32 Adam at a constant 1e-4, no augmentation) on the same images, epochs, batch and seeds, validated
every epoch by the same code, and the default recipe with every default, its 1e-4 included; the figure
is the default recipe's mean less the baseline's (goal >= 0), both at their best epoch as the platform's
``best.pt`` is.

Cost at the defaults (16 images per city at 64 px, 2 folds, 12 epochs of 8 steps, batch 4, 3 seeds,
resnet18): 33 trainings of about 25 s, ~20 minutes on 2 cores; 8 images per city and 10 epochs left MSE
itself barely trained (a val_score of 0.004), too little to compare anything with. ``--epochs``,
``--seeds`` and ``--images-per-city`` trade it down, ``run_all --quick`` runs one seed of 2 epochs on 8
images (~1 min).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

DEFAULT_ENCODER = "resnet18"
BENCH_LR = 1e-3  # the variants' peak learning rate at this budget
EMA_DECAY = 0.9  # per optimiser step: the average spans the last ~10 steps (2-3 epochs of 4 steps here)
STAGE1_FRACTION = 2 / 3  # of the epochs, on crops of half the side
STAGE2_LR_FACTOR = 0.3  # the 1st place: 1e-4 then 3e-5
EXPERIMENT = "bench-recipes"

# name -> TrainConfig changes from the default recipe (``staged`` is two runs, see ``train_staged``).
VARIANTS: dict[str, dict] = {
    "mse": {},
    "r2": {"loss": "r2"},
    "huber_cos": {"loss": "huber_cos"},
    "mse + height warp": {"height_warp_p": 0.3},
    "mse + ema": {"ema": EMA_DECAY},
    "mse + keep-top 3": {"keep_top": 3},
    "mse, no metadata": {"use_metadata": False},  # a ModelConfig field: see ``variant_config``
    "staged": {},
}
MODEL_FIELDS = ("use_metadata",)  # VARIANTS keys that change the model, not the TrainConfig


def variant_config(config, name: str):
    """``config`` with variant ``name``'s changes (model fields into ``config.model``)."""
    changes = dict(VARIANTS[name])
    model = {key: changes.pop(key) for key in MODEL_FIELDS if key in changes}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **model), **changes)


def make_data(root: Path, images_per_city: int, size: int, k: int) -> Path:
    """The synthetic data set with its ``folds.csv`` (seed 0), written once under ``root``."""
    from geopose_mlops.data.folds import make_folds, write_folds
    from geopose_mlops.data.layout import find_samples
    from geopose_mlops.data.synth import make_synthetic_dataset

    data_dir = root / "data"
    make_synthetic_dataset(data_dir, images_per_city=images_per_city, size=size, seed=0)
    write_folds(data_dir / "folds.csv", make_folds(find_samples(data_dir), k, 0))
    return data_dir


def base_config(data_dir: Path, opts, seed: int):
    """The default recipe at this budget: TrainConfig defaults but data, model, size, epochs, lr, batch, folds, seed."""
    from geopose_mlops.config import ModelConfig, TrainConfig

    return TrainConfig(
        data_dir=str(data_dir), model=ModelConfig(encoder=opts.encoder, decoder="Unet", encoder_weights="none"),
        epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch, image_size=opts.size, k=opts.k, folds=(0,), seed=seed,
    )  # fmt: skip


def fold0_score(config, cache_root: Path) -> tuple[float, str]:
    """``(fold 0's best val_score, cv run id)`` of one tracked cross-validation."""
    from geopose_mlops.train.cv import run_cross_validation

    result = run_cross_validation(config, EXPERIMENT, cache_root=cache_root, device="cpu", progress=False)
    return result.folds[0].best_score, result.run_id


def train_staged(config, cache_root: Path) -> float:
    """mse on half-side crops for 2/3 of the epochs, then ``init_from`` it at full side, 0.3x lr, for the rest."""
    first = max(1, round(config.epochs * STAGE1_FRACTION))
    stage1 = dataclasses.replace(config, epochs=first, crop_size=config.image_size // 2)
    _, parent = fold0_score(stage1, cache_root)
    stage2 = dataclasses.replace(
        config, epochs=max(1, config.epochs - first), lr=config.lr * STAGE2_LR_FACTOR, init_from=parent
    )
    score, _ = fold0_score(stage2, cache_root)
    return score


def train_baseline(config, cache_root: Path) -> float:
    """The public baseline's loop on fold 0 at the same budget; its best epoch's val_score."""
    import torch
    from baseline_vflow import BASELINE_LR, UnetVflow, train_baseline_epoch

    from geopose_mlops.data.dataset import GeoposeDataset
    from geopose_mlops.train import loop
    from geopose_mlops.train.data import prepare_data
    from geopose_mlops.train.seeds import fold_seed

    data = prepare_data(config, cache_root)
    table, cache = data.folds_table, data.cache
    train_rows = cache.rows(table.loc[table["fold"] != 0, "id"].tolist())
    val_rows = cache.rows(table.loc[table["fold"] == 0, "id"].tolist())
    torch.manual_seed(fold_seed(config.seed, 0))  # as train_fold seeds fold 0
    model = UnetVflow(config.model.encoder)
    optimizer = torch.optim.Adam([dict(params=model.parameters(), lr=BASELINE_LR)])
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = torch.utils.data.DataLoader(
        GeoposeDataset(cache, train_rows), batch_size=config.batch_size, shuffle=True, generator=generator
    )
    val_loader = loop.make_loader(GeoposeDataset(cache, val_rows), config.batch_size, 0)
    fp32 = loop.make_precision("cpu", amp=False)
    best = -math.inf
    for _ in range(config.epochs):
        train_baseline_epoch(model, train_loader, optimizer)
        score = loop.predict_validation(model, val_loader, fp32).score()["final_score"]
        best = max(best, score) if math.isfinite(score) else best
    return best


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def recipe_figures(scores: dict[str, list[float]], details: dict) -> list[dict]:
    """One figure per variant against mse, and the default recipe against the baseline."""
    reference = scores["mse"]
    ref_mean, ref_std = statistics.mean(reference), spread(reference)
    figures = []
    for name, values in scores.items():
        if name in ("baseline", "default recipe"):
            continue
        mean, std = statistics.mean(values), spread(values)
        if name == "mse":
            goal, met = "the reference: the default recipe", all(math.isfinite(v) for v in values)
        elif name == "r2":
            goal, met = f">= mse's mean {ref_mean:.4f}", mean >= ref_mean
        else:
            goal, met = f">= mse's mean - its spread = {ref_mean - ref_std:.4f}", mean >= ref_mean - ref_std
        slug = name.replace(" + ", "_").replace(", ", "_").replace(" ", "_").replace("-", "_")
        figures.append(
            common.figure(
                f"recipe_{slug}_val_score", mean, "val_score", goal, met, variant=name, seeds_scores=values,
                spread=std, mse_mean=ref_mean, mse_spread=ref_std, **details,
            )
        )  # fmt: skip
    baseline, default = scores["baseline"], scores["default recipe"]
    difference = statistics.mean(default) - statistics.mean(baseline)
    figures.append(
        common.figure(
            "recipe_default_minus_baseline", difference, "val_score",
            ">= 0 (default recipe, lr 1e-4, vs the public baseline, Adam 1e-4)", difference >= 0,
            default_scores=default, default_spread=spread(default), baseline_scores=baseline,
            baseline_spread=spread(baseline), **details,
        )
    )  # fmt: skip
    return figures


def print_table(scores: dict[str, list[float]], figures: list[dict]) -> None:
    """Variant, mean, spread, the seeds' scores and MET/MISSED."""
    met = {f["variant"]: f["met"] for f in figures if "variant" in f}
    versus = "MET" if figures[-1]["met"] else "MISSED"
    met["default recipe"] = met["baseline"] = f"{versus} (default recipe vs baseline)"
    print(f"{'variant':<20} {'mean':>8} {'spread':>8}  {'seeds':<27} goal", flush=True)
    for name, values in scores.items():
        state = met[name] if isinstance(met[name], str) else ("MET" if met[name] else "MISSED")
        shown = " ".join(f"{v:.4f}" for v in values)
        print(f"{name:<20} {statistics.mean(values):>8.4f} {spread(values):>8.4f}  {shown:<27} {state}", flush=True)


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images-per-city", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side, px (staged stage 1 crops half of it)")
    parser.add_argument("--k", type=int, default=2, help="folds (fold 0 is trained)")
    parser.add_argument("--lr", type=float, default=BENCH_LR, help="the variants' peak learning rate")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args(args)
    common.limit_threads(opts.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-recipes-", dir=opts.workdir) as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["XDG_CACHE_HOME"] = str(root / "user-cache")  # the folds' local records stay in here
        import mlflow

        from geopose_mlops.config import TrainConfig

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
        data_dir, cache_root = make_data(root, opts.images_per_city, opts.size, opts.k), root / "cache"
        scores: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "default recipe", "baseline"]}
        for seed in range(opts.seeds):
            config = base_config(data_dir, opts, seed)
            for name in VARIANTS:
                if name == "staged":
                    scores[name].append(train_staged(config, cache_root))
                else:
                    scores[name].append(fold0_score(variant_config(config, name), cache_root)[0])
                print(f"seed {seed} {name}: {scores[name][-1]:.4f}", flush=True)
            default = dataclasses.replace(config, lr=TrainConfig().lr)
            scores["default recipe"].append(fold0_score(default, cache_root)[0])
            scores["baseline"].append(train_baseline(config, cache_root))
            print(f"seed {seed} default recipe / baseline: {scores['default recipe'][-1]:.4f} / "
                  f"{scores['baseline'][-1]:.4f}", flush=True)  # fmt: skip
    details = {
        "images": opts.images_per_city * 4, "size_px": opts.size, "k": opts.k, "epochs": opts.epochs,
        "batch": opts.batch, "lr": opts.lr, "seeds": opts.seeds, "encoder": opts.encoder, "ema_decay": EMA_DECAY,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    figures = recipe_figures(scores, details)
    common.write_results(figures, opts.results)
    common.print_figures(figures)
    print_table(scores, figures)
    return figures


if __name__ == "__main__":
    run(sys.argv[1:])
