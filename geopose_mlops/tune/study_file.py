"""The study file: a typed, frozen ``StudyConfig`` read from ``studies/*.yaml``.

A study file names the Optuna study, its storage, sampler, pruner, direction and objective, the fixed
training configuration (a nested ``TrainConfig``) and the search space. ``load_study_config`` rejects
unknown keys (naming them), values of the wrong type and out-of-range values, naming the file and key
(``config.from_dict``, as for every config read from a file), before anything is trained or stored.
See ``studies/lr_batch.yaml`` for a commented example.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from geopose_mlops.config import TrainConfig, from_dict, require
from geopose_mlops.constants import DEFAULT_EXPERIMENT
from geopose_mlops.errors import ConfigError

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = ("fold0", "cv")
BATCH_SCALES = ("log", "pow2")
LR_BOUNDS = (1e-8, 1.0)  # the widest learning-rate range a study may search


@dataclass(frozen=True)
class LearningRateRange:
    """Learning-rate search range (AdamW peak rate).

    Attributes:
        low: Smallest rate, > 0.
        high: Largest rate, > ``low``.
        log: Sample log-uniformly (the usual choice for rates spanning decades).
    """

    low: float = 1e-5
    high: float = 1e-3
    log: bool = True

    def __post_init__(self) -> None:
        lo, hi = LR_BOUNDS
        require(
            lo <= self.low < self.high <= hi,
            f"search_space.lr: need {lo:g} <= low < high <= {hi:g}, got low={self.low!r} high={self.high!r}",
        )


@dataclass(frozen=True)
class BatchSizeRange:
    """Effective-batch-size search range (images per optimiser step).

    Attributes:
        low: Smallest effective batch, >= 1.
        high: Largest effective batch, <= 128.
        scale: ``log`` (any integer, log-uniform) or ``pow2`` (powers of two only; low and high must be).
        max_micro_batch: Most images that go through the model at once (what fits in memory); the rest
            of an effective batch is reached by gradient accumulation.
    """

    low: int = 1
    high: int = 128
    scale: str = "pow2"
    max_micro_batch: int = 8

    def __post_init__(self) -> None:
        require(
            1 <= self.low <= self.high <= 128,
            f"search_space.effective_batch_size: need 1 <= low <= high <= 128, got low={self.low} high={self.high}",
        )
        require(self.scale in BATCH_SCALES, f"search_space.effective_batch_size.scale: one of {BATCH_SCALES}")
        if self.scale == "pow2":
            bad = [v for v in (self.low, self.high) if v & (v - 1)]
            require(not bad, f"search_space.effective_batch_size: with scale pow2, {bad} are not powers of two")
        require(
            1 <= self.max_micro_batch <= 128,
            f"search_space.effective_batch_size.max_micro_batch must be in [1, 128], got {self.max_micro_batch}",
        )


@dataclass(frozen=True)
class SearchSpace:
    """What a trial samples; everything else comes from ``StudyConfig.train``."""

    lr: LearningRateRange = field(default_factory=LearningRateRange)
    effective_batch_size: BatchSizeRange = field(default_factory=BatchSizeRange)


@dataclass(frozen=True)
class SamplerConfig:
    """Optuna sampler: ``tpe`` (default) or ``random``, seeded.

    Attributes:
        name: Sampler name.
        seed: Seed of the sampler's random stream.
        n_startup_trials: TPE only: random trials before the model takes over.
    """

    name: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 10

    def __post_init__(self) -> None:
        require(self.name in SAMPLERS, f"sampler.name: expected one of {SAMPLERS}, got {self.name!r}")
        require(self.n_startup_trials >= 0, f"sampler.n_startup_trials must be >= 0, got {self.n_startup_trials}")


@dataclass(frozen=True)
class PrunerConfig:
    """Optuna pruner: ``median``, ``hyperband`` or ``none``. A step is one epoch (of one fold).

    Attributes:
        name: Pruner name.
        n_startup_trials: Median: trials that run to the end before any is pruned.
        n_warmup_steps: Median: epochs of a trial that are never pruned.
        min_resource: Hyperband: epochs every trial gets before the first cut.
        reduction_factor: Hyperband: 1 / the fraction of trials promoted at each rung.
    """

    name: str = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    min_resource: int = 1
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        require(self.name in PRUNERS, f"pruner.name: expected one of {PRUNERS}, got {self.name!r}")
        require(self.n_startup_trials >= 0 and self.n_warmup_steps >= 0, "pruner: startup/warm-up counts must be >= 0")
        require(self.min_resource >= 1 and self.reduction_factor >= 2, "pruner: need min_resource >= 1, factor >= 2")


@dataclass(frozen=True)
class StudyConfig:
    """One Optuna study: what is fixed, what is searched, and where trials are stored.

    Attributes:
        study_name: Optuna study name; also tags the MLflow study run (``optuna.study_name``).
        train: The fixed training configuration; each trial replaces ``lr``, ``batch_size`` and
            ``effective_batch_size`` (and ``folds`` for the ``fold0`` objective).
        storage: Optuna storage URL (None: ``sqlite:///<folder of the YAML>/<study_name>.db``).
        direction: ``maximize`` (the score) or ``minimize``.
        objective: ``fold0`` (best validation score of fold 0) or ``cv`` (mean over ``train.folds``).
        sampler: The sampler.
        pruner: The pruner.
        search_space: The searched parameters.
        experiment: MLflow experiment of the study and trial runs.
        n_trials: Trials per ``tune`` invocation unless ``--n-trials`` says otherwise.
        heartbeat_interval: Seconds between a running trial's heartbeats.
        grace_period: Seconds without a heartbeat after which a running trial counts as dead.
        max_retry: Times a dead (failed) trial is queued again; 0 turns retries off.
        sqlite_timeout: Seconds a SQLite writer waits for a lock before failing.
    """

    study_name: str
    train: TrainConfig
    storage: str | None = None
    direction: str = "maximize"
    objective: str = "fold0"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    search_space: SearchSpace = field(default_factory=SearchSpace)
    experiment: str = DEFAULT_EXPERIMENT
    n_trials: int = 20
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 1
    sqlite_timeout: float = 60.0

    def __post_init__(self) -> None:
        require(
            bool(re.fullmatch(r"[\w.-]+", self.study_name)),
            f"study_name: letters, digits and _.- only, got {self.study_name!r}",
        )
        require(self.direction in ("maximize", "minimize"), f"direction: maximize or minimize, got {self.direction!r}")
        require(self.objective in OBJECTIVES, f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        require(self.n_trials >= 1, f"n_trials must be >= 1, got {self.n_trials}")
        require(self.heartbeat_interval >= 1, f"heartbeat_interval must be >= 1 s, got {self.heartbeat_interval}")
        require(
            self.grace_period > self.heartbeat_interval,
            f"grace_period ({self.grace_period} s) must exceed heartbeat_interval ({self.heartbeat_interval} s)",
        )
        require(self.max_retry >= 0 and self.sqlite_timeout > 0, "max_retry must be >= 0 and sqlite_timeout > 0")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a study file; a relative default storage goes beside the file.

    Raises:
        ConfigError: The file is unreadable, a key is unknown, or a value has the wrong type or range
            (the message names the file and the key).
    """
    path = Path(path)
    try:
        values = yaml.load(path.read_text(), Loader=_YamlLoader)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read study file ({err})") from err
    config = from_dict(StudyConfig, values, str(path))
    if config.storage is None:
        config = replace(config, storage=f"sqlite:///{path.resolve().parent / config.study_name}.db")
    return config
