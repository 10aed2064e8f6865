"""An interrupted `predict` leaves no file that looks complete, and running it again completes the folder."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from geopose_mlops.data import io
from geopose_mlops.data.layout import split_name
from geopose_mlops.inference import predict_folder
from geopose_mlops.metrics import evaluate_folder


class ConstantPredictor:
    """Stands in for the ensemble: a flat 3 m height map, scale 2 px/m, angle 0.1 rad at 32 px."""

    spec = SimpleNamespace(image_size=32)

    def predict(self, rgb: np.ndarray, gsd: np.ndarray, cities: list[str], tta: str = "none") -> dict:
        n, size = rgb.shape[0], rgb.shape[1]
        return {"agl": np.full((n, size, size), 3.0, np.float32), "scale": np.full(n, 2.0), "angle": np.full(n, 0.1)}


def test_predict_stopped_between_write_and_rename_leaves_no_complete_looking_file(
    synthetic_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = synthetic_data / "test"
    out = tmp_path / "submission"
    real_replace, renames = os.replace, []

    def replace_then_stop(src, dst):  # the 5th rename: image 3's AGL, fully written under its temporary name
        renames.append(dst)
        if len(renames) == 5:
            raise KeyboardInterrupt("SIGTERM")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        predict_folder(ConstantPredictor(), images, out, progress=False, writers=1)  # one writer: in order
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(p).name for p in renames[:4])  # 2 whole images
    assert not Path(renames[4]).exists()  # neither under its final name nor as a left-over temporary file

    monkeypatch.setattr(io.os, "replace", real_replace)
    again = predict_folder(ConstantPredictor(), images, out, progress=False)
    assert len(again) == len(list(images.glob("*_RGB.*"))) - 2  # only the missing ones were predicted
    assert len(list(out.glob("*_AGL.tif"))) == len(list(out.glob("*_VFLOW.json"))) == len(again) + 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    scores = evaluate_folder(out, synthetic_data / "test_truth", progress=False)  # every file readable
    assert set(scores["cities"]) == {"ARG", "ATL", "JAX", "OMA"}


def test_predict_with_parallel_writers_stopped_mid_write_keeps_only_complete_files(
    synthetic_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = synthetic_data / "test"
    out = tmp_path / "submission"
    real_replace, renames = os.replace, []

    def replace_then_stop(src, dst):  # the 3rd rename, whichever writer thread makes it
        renames.append(Path(dst))
        if len(renames) == 3:
            raise KeyboardInterrupt("SIGTERM")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        predict_folder(ConstantPredictor(), images, out, progress=False, batch_size=2, workers=2, writers=2)
    # The writes under way when it stopped were finished (each renamed whole), none was started after.
    left = {p.name for p in out.iterdir()}
    assert left == {p.name for p in renames if p != renames[2]}
    assert not renames[2].exists() and not [name for name in left if name.startswith(".")]
    complete = {name.removesuffix("_AGL.tif") for name in left} & {name.removesuffix("_VFLOW.json") for name in left}

    monkeypatch.setattr(io.os, "replace", real_replace)
    again = predict_folder(ConstantPredictor(), images, out, progress=False, batch_size=2, workers=2, writers=2)
    assert sorted(again) == sorted({split_name(p.name)[0] for p in images.glob("*_RGB.*")} - complete)
    scores = evaluate_folder(out, synthetic_data / "test_truth", progress=False)  # every file readable
    assert set(scores["cities"]) == {"ARG", "ATL", "JAX", "OMA"}
