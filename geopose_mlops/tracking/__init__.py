"""Every MLflow call for runs: runs written, runs read, store health, study runs, the tracking server."""
