"""Training: the AMP loop with gradient accumulation, checkpoints, out-of-fold files, cross-validation."""
