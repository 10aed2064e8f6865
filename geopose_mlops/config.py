"""Typed, frozen configurations.

They are saved before a run starts, flattened into MLflow params, stored in every checkpoint, and are
enough on their own to rebuild what they describe.

``from_dict`` rejects unknown keys (naming them and the allowed ones) and checks ranges, so a typo in
a study file or a bad command-line value fails before anything is trained or logged.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from geopose_mlops.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a dict, recursing into nested dataclass fields.

    Raises:
        ConfigError: A key is unknown (the allowed keys are listed) or a value has the wrong type.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names), key=repr)  # YAML keys may be numbers or null, not only text
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{key}")
        elif isinstance(value, list) and _is_tuple(hint):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def _is_tuple(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(arg) for arg in typing.get_args(hint))
    return origin is tuple


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-dict form of a config (tuples become lists), json-serialisable."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Flat ``{"model.encoder": "resnet34", ...}`` form for ``mlflow.log_params``."""
    flat: dict[str, str] = {}
    for key, value in to_dict(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_dict(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def flatten_dict(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested dict with dotted keys."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def require(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds (range checks of every config)."""
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """What to build: an smp decoder over an encoder, with the geopose heads.

    Attributes:
        encoder: smp encoder name (``resnet34``, ``tu-regnetx_064``, ...).
        decoder: smp architecture name (``Unet``, ``FPN``, ...), case-insensitive.
        encoder_weights: ``none``, ``imagenet``, ``swsl``/``ssl``, or a path to a local weights file.
        use_metadata: Feed gsd and the city one-hot to the direction head.
    """

    encoder: str = "resnet34"
    decoder: str = "Unet"
    encoder_weights: str = "none"
    use_metadata: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """One cross-validation: data, model and optimisation settings (SPEC §3 ``train``).

    Attributes:
        data_dir: The competition-layout data set.
        model: What to build.
        epochs: Training epochs per fold.
        lr: Peak learning rate of AdamW.
        batch_size: Micro-batch that goes through the model at once.
        effective_batch_size: Images per optimiser step; reached by gradient accumulation. Must be a
            multiple of ``batch_size`` (None: equal to it).
        image_size: Side in pixels that images are decoded to in the cache (and trained at).
        crop_size: Random-crop side during training (None: no crop).
        amp: Mixed precision: on CUDA bf16 where supported, else fp16 with a GradScaler; on a CPU with
            bf16 instructions (AVX512-BF16, AMX) bf16; fp32 elsewhere. Fold runs log what ran as ``precision``.
        k: Number of folds.
        folds: Folds to run (None: all).
        seed: Seed for folds, weights and augmentation.
        loss: ``mse`` (baseline), ``r2`` (per-city R², 1st place) or ``huber_cos`` (2nd place).
        num_workers: DataLoader workers.
        augment: Apply the training augmentations.
        checkpoint_interval_s: Upload ``last.pt`` (and a new ``best.pt`` with its ``oof/``) at most this
            often, seconds, and always after the last epoch or when training stops. A SIGKILL loses at
            most this much training: resume retrains it and does not log those epochs again. 0: upload
            every epoch.
        metrics_interval_s: Write epoch metrics (each at its own step) at most this often, seconds,
            and always before an upload and when training stops: an epoch longer than this writes its
            own, a tiny model's sub-second epochs share one request. 0: every epoch.
        skip_bad: Train on the good samples when some files are bad (the skipped files are logged as
            ``skipped_files.csv`` on the cv run); off: bad files stop the run before it starts.
    """

    data_dir: str = "data"
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 4
    effective_batch_size: int | None = None
    image_size: int = 1024
    crop_size: int | None = None
    amp: bool = True
    k: int = 5
    folds: tuple[int, ...] | None = None
    seed: int = 0
    loss: str = "mse"
    weight_decay: float = 1e-4
    num_workers: int = 0
    augment: bool = True
    skip_bad: bool = False
    checkpoint_interval_s: float = 120.0
    metrics_interval_s: float = 5.0

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(1 <= self.batch_size <= 128, f"batch_size must be in [1, 128], got {self.batch_size}")
        eff = self.effective_batch_size
        if eff is not None:
            require(
                1 <= eff <= 128 and eff >= self.batch_size and eff % self.batch_size == 0,
                f"effective_batch_size must be in [1, 128] and a multiple of batch_size={self.batch_size}, "
                f"got {eff}",
            )
        require(self.image_size >= 16, f"image_size must be >= 16 px, got {self.image_size}")
        require(self.k >= 2, f"k must be >= 2 folds, got {self.k}")
        for name in ("checkpoint_interval_s", "metrics_interval_s"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if self.folds is not None:
            bad = [f for f in self.folds if not 0 <= f < self.k]
            require(not bad, f"folds {bad} out of range: with k={self.k} folds are 0..{self.k - 1}")

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimiser step."""
        return (self.effective_batch_size or self.batch_size) // self.batch_size

    def fold_list(self) -> list[int]:
        """The folds to run, in order."""
        return list(self.folds) if self.folds is not None else list(range(self.k))


def load_json_config(cls: type[T], path: str | Path) -> T:
    """Read a config saved by ``save_json_config``."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config ({err})") from err
    return from_dict(cls, values, str(path))


def save_json_config(config: Any, path: str | Path) -> None:
    """Write a config as json (the ``config.json`` artifact)."""
    Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True))
