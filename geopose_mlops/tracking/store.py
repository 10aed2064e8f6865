"""The tracking store's health: a fast probe at start-up and one-line errors when it fails mid-run.

MLflow's REST client retries a failed request with exponential backoff (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
default 7, and ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, default 2: minutes in all) before it raises. That
suits a brief blip mid-run, but a server that is down when a command starts should be reported at once,
before any data is decoded or anything trained: ``check_tracking_store`` asks ``/health`` once, with a
short timeout. Mid-run, training turns the store's failure into a ``TrackingStoreError`` naming the URI,
the run to resume and where the local checkpoints are (``train/cv.py``).
"""

from __future__ import annotations

import mlflow
import requests
from mlflow.exceptions import MlflowException

from geopose_mlops.errors import TrackingStoreError

STORE_PROBE_TIMEOUT_S = 10.0  # seconds the start-up probe of a tracking server waits for an answer


def check_tracking_store(timeout_s: float = STORE_PROBE_TIMEOUT_S) -> None:
    """Fail fast when the tracking server is down, before anything is trained or created.

    For an ``http(s)://`` tracking URI, one ``GET /health`` with a short timeout and no retries
    (MLflow's own client would retry with backoff for minutes before giving up). Local stores (SQLite,
    files) need no probe.

    Raises:
        TrackingStoreError: The server does not answer ``OK`` (the message names the URI).
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
        response.raise_for_status()
    except requests.RequestException as err:
        reason = type(err).__name__ if isinstance(err, requests.ConnectionError) else str(err)
        raise TrackingStoreError(
            f"tracking server {uri} is not reachable ({reason}); start it (geopose-ml server) or point "
            "MLFLOW_TRACKING_URI at a running one. Nothing was trained."
        ) from err


def is_store_error(err: BaseException) -> bool:
    """True for a failure to reach or write the tracking store (MLflow or HTTP errors)."""
    return isinstance(err, (MlflowException, requests.RequestException, TrackingStoreError))


def store_error(err: BaseException, what: str) -> TrackingStoreError:
    """A one-line ``TrackingStoreError`` for ``err``: the URI, what was lost, and how to go on."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return TrackingStoreError(f"tracking store {mlflow.get_tracking_uri()} failed ({first_line[:300]}); {what}")
