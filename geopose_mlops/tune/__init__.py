"""Optuna studies: the study file and the study that runs its trials."""
