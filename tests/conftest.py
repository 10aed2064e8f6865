"""Shared fixtures: one tiny synthetic data set per test session (torchgeo style: SIZE small, seed 0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from geopose_mlops.data.synth import make_synthetic_dataset

SIZE = 64  # pixels
SEED = 0


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synth folder: 2 training + 1 test image per city, 64 px, seed 0 (test truth in test_truth/).

    Shared by the whole session: tests must not modify it (copy it first).
    """
    out = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic_dataset(out, images_per_city=2, size=SIZE, seed=SEED, test_images_per_city=1)
    return out
