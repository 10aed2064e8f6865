"""Typed, frozen configurations.

They are saved before a run starts, flattened into MLflow params, stored in every checkpoint, and are
enough on their own to rebuild what they describe.

``from_dict`` rejects unknown keys (naming them and the allowed ones) and values of the wrong type, and
the dataclasses check ranges, so a typo in a study file, a ``config.json`` or a checkpoint, or a bad
command-line value fails before anything is trained or logged. The field defaults are the only defaults:
the command line reads its own from them (``default_of``).
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
    """Build dataclass ``cls`` from a dict read from a file, checking its keys, types and ranges.

    Every config read from a file comes through here: study files, a cv run's ``config.json`` and the
    config stored in a checkpoint. ``bool`` is not accepted for ``int``, an ``int`` is for ``float``,
    ``None`` only where the field is optional, a list for a tuple; nested dataclass fields recurse.

    Args:
        cls: The dataclass to build.
        values: Its fields by name (nested dicts for nested dataclasses).
        where: What is read (a file name), the start of every message.

    Raises:
        ConfigError: A key is unknown (the allowed keys are listed), a value has the wrong type (the
            key is named with its path, e.g. ``train.epochs``) or is out of range.
    """
    try:
        return _build(cls, values, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err


def _located(key_path: str, message: str) -> ConfigError:
    return ConfigError(f"{key_path}: {message}" if key_path else message)


def _build(cls: type[T], values: Any, key_path: str) -> T:
    """``from_dict`` without the file name: messages start with the dotted key path (empty at the top)."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise _located(key_path, f"expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=repr)  # YAML keys may be numbers or null, not only text
    if unknown:
        raise _located(key_path, f"unknown key(s) {unknown}; allowed: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        key: _typed_value(hints[key], value, f"{key_path}.{key}" if key_path else key) for key, value in values.items()
    }
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise _located(key_path, str(err)) from err


def _typed_value(hint: Any, value: Any, key_path: str) -> Any:
    """``value`` as field type ``hint`` wants it (lists become tuples, dicts dataclasses), or a ConfigError."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict | option):
            return _build(option, value, key_path)
        if _matches(option, value):
            return tuple(value) if typing.get_origin(option) is tuple else value
    names = " or ".join(_type_name(option) for option in options)
    raise _located(key_path, f"expected {names}, got {value!r}")


def _matches(hint: Any, value: Any) -> bool:
    """Whether ``value`` (as read from json or YAML) is of field type ``hint``; ``bool`` is not a number."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float)
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(args[0], item) for item in value)
        return len(args) == len(value) and all(_matches(a, item) for a, item in zip(args, value, strict=True))
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return f"a mapping ({hint.__name__})"
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def default_of(cls: type, name: str) -> Any:
    """The default value of field ``name`` of dataclass ``cls`` (a ``default_factory`` is called).

    The command line reads its defaults from here, so ``TrainConfig``/``ModelConfig`` are their one source.

    Raises:
        LookupError: ``cls`` has no such field, or it has no default.
    """
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise LookupError(f"{cls.__name__}.{name} has no default")
    raise LookupError(f"{cls.__name__} has no field {name!r}")


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
        image_size: Side in pixels that images are decoded to in the cache (and trained at); 1024 is half
            the 2048 px source, as the public baseline trains.
        crop_size: Random-crop side during training (None: no crop).
        amp: Mixed precision: on CUDA bf16 where supported, else fp16 with a GradScaler; on a CPU with
            bf16 instructions (AVX512-BF16, AMX) bf16; fp32 elsewhere. Fold runs log what ran as ``precision``.
        k: Number of folds.
        folds: Folds to run (None: all).
        seed: Seed for folds, weights and augmentation.
        loss: ``mse`` (baseline), ``r2`` (per-city R², 1st place) or ``huber_cos`` (2nd place).
        num_workers: DataLoader workers (0: samples are read and augmented in the training process,
            which suits CPU runs and tests; a GPU needs several: augmenting one 1024 px image takes
            ~40 ms of a CPU core). The number changes no result: each sample's augmentation is seeded
            by the run's seed, the epoch and its position.
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
        height_warp_p: Probability of the height warp (``data/warp.py``) per training sample, the first
            step of the augmentation (needs ``augment``); 0: off.
        init_from: A finished cv run to start from (staged training): each fold starts from that run's
            fold ``best.pt`` (same folds and model required); None: from the encoder weights.
        ema: Decay per optimiser step of an exponential moving average of the weights; the average is
            what is validated and stored as ``best.pt`` (None: off). E.g. 0.999 over thousands of steps.
        keep_top: Average the weights of the ``keep_top`` best epochs (by ``val_score``) at the end of a
            fold; ``best.pt`` is the better of that average and the best epoch (None: off).
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
    height_warp_p: float = 0.0
    init_from: str | None = None
    ema: float | None = None
    keep_top: int | None = None

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
        require(0.0 <= self.height_warp_p <= 1.0, f"height_warp_p must be in [0, 1], got {self.height_warp_p}")
        require(
            self.augment or self.height_warp_p == 0.0,
            f"height_warp_p={self.height_warp_p} needs augment (the warp is the augmentation's first step)",
        )
        require(self.init_from is None or bool(self.init_from.strip()), "init_from must be a cv run id or None")
        require(self.ema is None or 0.0 < self.ema < 1.0, f"ema must be a decay in (0, 1), got {self.ema}")
        require(self.keep_top is None or self.keep_top >= 1, f"keep_top must be >= 1 epochs, got {self.keep_top}")
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
