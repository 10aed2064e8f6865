"""Every MLflow call for runs, one concern per module.

``experiments`` (look-up and creation of experiments), ``batches`` (chunked ``log_batch``), ``artifacts``
(hard links, downloads), ``runs`` (runs written by a cross-validation: ``CvTracker``), ``reads`` (runs read
for reports), ``ensembles`` (candidate cv runs and the ensemble run of ``ensemble fit``), ``studies``
(study and trial runs), ``store`` (store health), ``server`` (the shared tracking server).
"""
