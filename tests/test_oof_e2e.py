"""Two architectures on the same data: one truth set, predictions-only ``oof/``, the scores of before.

Issue 14, part 3: a fold run's ``oof/`` holds float16 predictions and the per-image index only (about
S x S x 2 bytes per image: 2.10 MB at 1024², no more than 2.2 MB), the truth is stored once per data
fingerprint, and ``cv_score`` and ``ensemble fit`` give the scores they gave when every fold run stored
the truth too (recomputed here from folders given back their ``agl_true.npy`` as fold runs wrote it).
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from tiny_cv import run_tiny_cv

from geopose_mlops.constants import AGL, FINGERPRINT_PARAM, KIND_TAG
from geopose_mlops.data.cache import SampleCache
from geopose_mlops.data.dataset import GeoposeDataset
from geopose_mlops.ensemble.fit import fit_ensemble
from geopose_mlops.ensemble.members import fit_tracked_ensemble
from geopose_mlops.ensemble.stats import MemberOof, read_image_table
from geopose_mlops.tracking import truth as tracked
from geopose_mlops.tracking.ensembles import download_oof, member_fold_runs
from geopose_mlops.train.oof import AGL_PRED_NPY, AGL_TRUE_NPY, INDEX_CSV, score_oof_folders

SIZE = 64  # pixels, run_tiny_cv's image size
MB = 1e6  # bytes


def _sample_ids(folder: Path) -> list[str]:
    with (folder / INDEX_CSV).open(newline="") as handle:
        return [row["sample_id"] for row in csv.DictReader(handle)]


def _with_old_truth(folder: Path, cache: SampleCache) -> Path:
    """Give a downloaded ``oof/`` the ``agl_true.npy`` a fold run of earlier versions wrote beside it.

    As ``loop.predict_validation`` made it: the validation dataset's float32 heights, then float16.
    """
    dataset = GeoposeDataset(cache, cache.rows(_sample_ids(folder)))
    heights = [dataset[i][AGL].numpy().astype(np.float16) for i in range(len(dataset))]
    np.save(folder / AGL_TRUE_NPY, np.stack(heights))
    return folder


def _oof_bytes_per_image(client: MlflowClient, fold_run_ids: list[str]) -> tuple[float, float]:
    """``(bytes per image at SIZE, the same scaled to 1024²)`` of the fold runs' ``oof/`` artifacts.

    The predictions scale with the pixels; the index row and the ``.npy`` header do not.
    """
    images = total = fixed = 0
    for run_id in fold_run_ids:
        files = {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, "oof")}
        assert files.keys() == {INDEX_CSV, AGL_PRED_NPY}, files  # no agl_true.npy: the truth is not stored again
        with tempfile.TemporaryDirectory() as tmp:
            n = len(_sample_ids(Path(client.download_artifacts(run_id, f"oof/{INDEX_CSV}", tmp)).parent))
        assert files[AGL_PRED_NPY] == 128 + n * SIZE * SIZE * 2  # float16 predictions and the .npy header
        images, total = images + n, total + sum(files.values())
        fixed += sum(files.values()) - n * SIZE * SIZE * 2
    return total / images, 1024 * 1024 * 2 + fixed / images


@pytest.mark.slow
def test_two_architectures_store_one_truth_and_score_as_when_each_stored_it(tmp_path, monkeypatch) -> None:
    client = MlflowClient()
    experiment = client.create_experiment("oof", artifact_location=(tmp_path / "artifacts").as_uri())
    cvs = [run_tiny_cv(tmp_path, decoder, experiment="oof") for decoder in ("Unet", "FPN")]
    (entry,) = (p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    cache = SampleCache.open(entry)

    # One data run holds the truth of both architectures' data.
    runs = {cv.run_id: client.get_run(cv.run_id) for cv in cvs}
    assert {r.data.params[FINGERPRINT_PARAM] for r in runs.values()} == {cache.fingerprint}
    (data_run,) = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{tracked.KIND_DATA}'")
    assert data_run.data.params[FINGERPRINT_PARAM] == cache.fingerprint

    folds = {run_id: member_fold_runs(run) for run_id, run in runs.items()}
    at_size, at_1024 = _oof_bytes_per_image(client, [r for f in folds.values() for r in f.values()])
    print(f"oof/ per image: {at_size:.0f} B at {SIZE} px, {at_1024 / MB:.3f} MB at 1024 px")
    assert at_size <= SIZE * SIZE * 2 + 400 and at_1024 <= 2.2 * MB

    # The folders as earlier versions stored them: each with its truth.
    old = {
        run_id: {f: _with_old_truth(download_oof(r, tmp_path / "old" / run_id / str(f)), cache) for f, r in by.items()}
        for run_id, by in folds.items()
    }
    for cv in cvs:  # cv_score as logged = the score of the self-contained folders
        recomputed = score_oof_folders(old[cv.run_id].values())
        assert cv.cv_score == pytest.approx(recomputed["final_score"], abs=1e-12)

    _, spec = fit_tracked_ensemble("oof")
    members = [MemberOof(run_id, old[run_id]) for run_id in spec.members]
    before, _ = fit_ensemble(read_image_table(members), "simplex", scale_model_dir=tmp_path / "before")
    assert spec.oof_score == pytest.approx(before.oof_score, abs=1e-12)
    assert spec.member_oof_scores == pytest.approx(before.member_oof_scores, abs=1e-12)
    assert spec.equal_weights_oof_score == pytest.approx(before.equal_weights_oof_score, abs=1e-12)
    assert spec.height_weights == pytest.approx(before.height_weights, abs=1e-9)

    # Without the cache on this machine the truth comes from the data run: read in place from a local
    # store, downloaded (into the fit's temporary folder, removed after) from any other.
    shutil.move(entry, tmp_path / "cache-moved")
    assert fit_tracked_ensemble("oof")[1].oof_score == pytest.approx(spec.oof_score, abs=1e-12)
    monkeypatch.setattr(tracked.artifacts, "local_artifact_dir", lambda uri: None)
    before_fit = set(Path(tempfile.gettempdir()).glob("geopose-ensemble-*"))
    assert fit_tracked_ensemble("oof")[1].oof_score == pytest.approx(spec.oof_score, abs=1e-12)
    assert set(Path(tempfile.gettempdir()).glob("geopose-ensemble-*")) == before_fit
    cv = cvs[0]
    new = [download_oof(r, tmp_path / "new" / str(f)) for f, r in folds[cv.run_id].items()]
    truth = tracked.scoring_truth(cv.run_id, new, tmp_path / "truth-download")
    assert truth is not None and truth.source == tmp_path / "truth-download" / "truth"
    assert score_oof_folders(new, truth)["final_score"] == pytest.approx(cv.cv_score, abs=1e-12)
