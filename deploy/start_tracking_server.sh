#!/usr/bin/env bash
# Start the team's MLflow tracking server: PostgreSQL backend store, artifacts served by the server.
#
#   deploy/start_tracking_server.sh                      # throw-away-style cluster kept in ./pgdata
#   BACKEND_STORE_URI=postgresql+psycopg2://mlflow:PW@db.example.org:5432/mlflow \
#     HOST=0.0.0.0 ARTIFACTS=s3://team-bucket/mlflow deploy/start_tracking_server.sh
#
# Environment (all optional):
#   BACKEND_STORE_URI  an existing PostgreSQL database; unset: a cluster kept in $PGDATA_DIR
#   PGDATA_DIR         where that cluster lives (default ./pgdata; initdb on first start)
#   ARTIFACTS          artifact destination, a directory or object-store URI (default ./mlartifacts)
#   HOST, PORT         interface and port (default 127.0.0.1:5000; HOST=0.0.0.0 serves other machines)
#   WORKERS            server worker processes (default 2)
# Clients then set MLFLOW_TRACKING_URI=http://HOST:PORT; Optuna workers use the printed --storage URL.
set -euo pipefail
cd "$(dirname "$0")/.."

GEOPOSE_ML="${GEOPOSE_ML:-geopose-ml}"
command -v "$GEOPOSE_ML" >/dev/null 2>&1 || GEOPOSE_ML="$(pwd)/.venv/bin/geopose-ml"

args=(server --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers "${WORKERS:-2}"
      --artifacts-destination "${ARTIFACTS:-mlartifacts}")
if [[ -n "${BACKEND_STORE_URI:-}" ]]; then
  args+=(--backend-store-uri "$BACKEND_STORE_URI")
else
  args+=(--init-postgres "${PGDATA_DIR:-pgdata}")
fi
exec "$GEOPOSE_ML" "${args[@]}"
