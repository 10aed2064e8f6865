"""Data: the competition's file layout, decoding, synthetic data, checks, folds, cache, augmentation."""
