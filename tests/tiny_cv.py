"""A real, tiny cross-validation for the tests that need tracked runs: 64 px synthetic data, 2 folds, 2 epochs."""

from __future__ import annotations

from pathlib import Path

import torch

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.train.cv import CvResult, run_cross_validation


def run_tiny_cv(root: Path, decoder: str = "Unet", experiment: str = "geopose") -> CvResult:
    """Train and track a 2-fold, 2-epoch cross-validation of ``decoder`` over resnet18 (weights off) on CPU.

    The data set (2 cities x 2 images of 64 px) and the cache live under ``root`` and are reused by
    later calls with the same ``root``; tracking goes wherever the MLflow tracking URI points.
    """
    torch.set_num_threads(1)
    data_dir = root / "data"
    if not data_dir.exists():
        make_synthetic_dataset(data_dir, images_per_city=2, size=64, seed=0, cities=("ARG", "JAX"))
    config = TrainConfig(
        data_dir=str(data_dir), model=ModelConfig(encoder="resnet18", decoder=decoder, encoder_weights="none"),
        epochs=2, lr=1e-3, batch_size=2, image_size=64, amp=False, k=2, augment=False,
    )
    return run_cross_validation(config, experiment=experiment, cache_root=root / "cache", device="cpu",
                                progress=False)


STUDY_ENCODER = "tu-mobilenetv3_small_050"  # timm MobileNetV3, 2.3 M parameters: small checkpoints


def write_study_file(
    folder: Path,
    data_dir: Path,
    name: str,
    experiment: str,
    epochs: int = 1,
    batch_space: str = "{low: 1, high: 128, scale: log, max_micro_batch: 4}",
    extra: str = "",
) -> Path:
    """``folder/<name>.yaml``: a tiny fold-0 study over lr x effective batch (TPE seed 0, no pruner).

    MobileNetV3 U-Net with weights off at 64 px, ``epochs`` per trial; ``extra`` adds top-level keys
    (a later key replaces an earlier one, e.g. a ``pruner``).
    """
    path = folder / f"{name}.yaml"
    path.write_text(
        f"""\
study_name: {name}
experiment: {experiment}
sampler: {{name: tpe, seed: 0, n_startup_trials: 2}}
pruner: {{name: none}}
objective: fold0
train:
  data_dir: {data_dir}
  model: {{encoder: {STUDY_ENCODER}, decoder: Unet}}
  epochs: {epochs}
  image_size: 64
  k: 2
  amp: false
  augment: false
search_space:
  lr: {{low: 1e-5, high: 1e-3}}
  effective_batch_size: {batch_space}
{extra}"""
    )
    return path
