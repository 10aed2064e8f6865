"""Where a study's trials live: an Optuna RDB storage with heartbeats and retries of dead trials.

SQLite (the default, a file beside the study YAML) is meant for one process at a time: it locks the
whole file on every write, so concurrent workers wait on each other (the busy timeout makes them wait
instead of failing). For real parallel use every worker points at one PostgreSQL database.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from geopose_mlops.errors import ConfigError, GeoposeError
from geopose_mlops.tune.study_file import StudyConfig

STORAGE_ATTEMPTS = 3  # tries at opening a storage whose tables another worker is creating

StaleTrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def build_storage(
    config: StudyConfig, url: str | None = None, on_stale: StaleTrialCallback | None = None
) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats and retries of dead trials.

    Args:
        config: The study (its storage URL, heartbeat, grace period, retries, SQLite timeout).
        url: Overrides ``config.storage`` (the ``--storage`` option).
        on_stale: Called with each trial this worker finds dead and marks FAILED, before any retry.
    """
    url = url or config.storage
    if not url:
        raise ConfigError(f"study {config.study_name}: no storage URL")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # SQLite locks the whole file per write; wait for the lock instead of "database is locked".
        engine_kwargs["connect_args"] = {"timeout": config.sqlite_timeout}
        db_path = url.split(":///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs["pool_pre_ping"] = True  # a server may drop idle connections during long trials
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat and retry
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(config.max_retry) if config.max_retry else None
        callbacks = [c for c in (on_stale, retry) if c is not None]

        def stale_trial_callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            for callback in callbacks:
                callback(study, trial)

        for attempt in range(1, STORAGE_ATTEMPTS + 1):
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=config.heartbeat_interval,
                    grace_period=config.grace_period,
                    heartbeat_stale_trial_callback=stale_trial_callback if callbacks else None,
                )
            except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
                # Workers starting together on a new database race to create its tables ("table
                # studies already exists"; on PostgreSQL a duplicate pg_type row, or "relation
                # version_info does not exist" that Optuna wraps); once one has, the others go on.
                if attempt == STORAGE_ATTEMPTS:
                    raise GeoposeError(f"storage {redact(url)}: cannot open ({err})") from err
                time.sleep(attempt)


def redact(url: str) -> str:
    """A storage URL with its password masked (for messages and tags)."""
    return make_url(url).render_as_string(hide_password=True)
