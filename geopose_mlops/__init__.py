"""geopose-mlops: tracked, tuned and ensembled geocentric-pose models (Overhead Geopose Challenge)."""

__version__ = "0.1.0"
