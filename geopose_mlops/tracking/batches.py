"""Writing values to a run in as few requests as possible: metrics, params and tags in chunked ``log_batch``.

Used by the runs of cross-validations (``tracking.runs``) and of studies and trials (``tracking.studies``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_BATCH = 500  # below the tracking server's per-request limit of 1000 metrics


def send(client: MlflowClient, run_id: str, items: Sequence[Metric | Param | RunTag]) -> None:
    """``log_batch`` the items on run ``run_id`` in chunks of ``MAX_BATCH``."""
    for start in range(0, len(items), MAX_BATCH):
        chunk = items[start : start + MAX_BATCH]
        client.log_batch(
            run_id,
            metrics=[i for i in chunk if isinstance(i, Metric)],
            params=[i for i in chunk if isinstance(i, Param)],
            tags=[i for i in chunk if isinstance(i, RunTag)],
        )


def log_values(
    client: MlflowClient,
    run_id: str,
    metrics: dict[str, float] | None = None,
    step: int = 0,
    params: dict[str, object] | None = None,
    tags: dict[str, object] | None = None,
) -> None:
    """Metrics (all at ``step``, timestamped now), params and tags of one run, in as few requests as possible."""
    now = int(time.time() * 1000)
    items: list[Metric | Param | RunTag] = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    items += [Param(k, str(v)) for k, v in (params or {}).items()]
    items += [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    send(client, run_id, items)


def log_epochs(client: MlflowClient, run_id: str, epochs: Sequence[tuple[int, dict[str, float]]]) -> None:
    """Several epochs' metrics (``step = epoch``) of one run in as few requests as possible.

    Args:
        client: The MLflow client.
        run_id: The run (a fold run, or a trial run whose step counts epochs across folds).
        epochs: ``(epoch, {metric: value})`` pairs.
    """
    now = int(time.time() * 1000)
    send(client, run_id, [Metric(k, float(v), now, epoch) for epoch, metrics in epochs for k, v in metrics.items()])
