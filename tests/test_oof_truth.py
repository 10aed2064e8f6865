"""One copy of the truth (issue 14, part 3): fold runs store predictions only, the truth set once per data.

Properties: the truth set holds bit for bit the float16 heights a fold validated on (what earlier versions
stored as ``oof/agl_true.npy``), so a folder read with it scores exactly as an old self-contained folder;
old folders still load; one ``data`` run per fingerprint even when two cv runs store it at once; readers
take it from the cache, the store's folder in place, or a download, all the same values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from torch import nn

from geopose_mlops.config import TrainConfig
from geopose_mlops.constants import AGL, FINGERPRINT_PARAM, KIND_TAG, SCALE, XYDIR
from geopose_mlops.data.cache import SampleCache
from geopose_mlops.data.dataset import GeoposeDataset
from geopose_mlops.errors import DataError, GeoposeError
from geopose_mlops.tracking import truth as tracked
from geopose_mlops.train import loop
from geopose_mlops.train.data import prepare_data
from geopose_mlops.train.oof import AGL_PRED_NPY, AGL_TRUE_NPY, INDEX_CSV, OofPredictions, score_oof_folders
from geopose_mlops.train.truth import TRUTH_DIR, TRUTH_INDEX_CSV, TRUTH_NPY, TruthSet


class HeightsFromRed(nn.Module):
    """A stand-in model: heights 10 m x the red channel, a fixed scale and direction."""

    def forward(self, image: torch.Tensor, gsd: torch.Tensor, city: torch.Tensor) -> dict[str, torch.Tensor]:
        n = image.shape[0]
        return {AGL: image[:, 0] * 10, SCALE: torch.full((n,), 3.0), XYDIR: torch.tensor([[0.6, 0.8]]).repeat(n, 1)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> SampleCache:
    """The cache of the session's synthetic data (64 px, with no-data pixels), in this module's folder."""
    from geopose_mlops.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("truth")
    make_synthetic_dataset(root / "data", images_per_city=2, size=64, seed=0)
    config = TrainConfig(data_dir=str(root / "data"), image_size=64, k=2)
    return prepare_data(config, root / "cache").cache


def _validation(cache: SampleCache) -> OofPredictions:
    """The validation predictions of every cache row, as a fold computes them (``loop.predict_validation``)."""
    loader = loop.make_loader(GeoposeDataset(cache, range(len(cache))), batch_size=3, num_workers=0)
    return loop.predict_validation(HeightsFromRed(), loader, loop.make_precision("cpu", False))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype == np.float16 and a.shape == b.shape and np.array_equal(a.view(np.uint16), b.view(np.uint16))
    )


def test_the_truth_set_holds_the_float16_heights_a_fold_validates_on(cache, tmp_path) -> None:
    oof = _validation(cache)
    assert np.isnan(oof.agl_true).any()  # no-data pixels are part of what must match
    truth = TruthSet.from_cache(cache)
    assert _same_bits(truth.stack(oof.sample_ids), oof.agl_true)
    assert all(_same_bits(truth.heights(s), oof.agl_true[i]) for i, s in enumerate(oof.sample_ids))
    stored = TruthSet.open(truth.save(tmp_path / TRUTH_DIR))
    assert sorted(p.name for p in (tmp_path / TRUTH_DIR).iterdir()) == sorted([TRUTH_INDEX_CSV, TRUTH_NPY])
    assert stored.ids == cache.ids and stored.image_size == 64 and isinstance(stored.agl, np.memmap)
    assert _same_bits(np.asarray(stored.agl), truth.stack(cache.ids))


def test_a_fold_folder_holds_predictions_only_and_scores_as_an_old_self_contained_one(cache, tmp_path) -> None:
    oof = _validation(cache)
    truth = TruthSet.from_cache(cache)
    new = oof.save(tmp_path / "new")
    assert sorted(p.name for p in new.iterdir()) == sorted([INDEX_CSV, AGL_PRED_NPY])
    old = oof.save(tmp_path / "old", with_truth=True)  # the format of earlier versions
    assert sorted(p.name for p in old.iterdir()) == sorted([INDEX_CSV, AGL_PRED_NPY, AGL_TRUE_NPY])
    loaded = OofPredictions.load(new, truth)
    assert _same_bits(loaded.agl_true, oof.agl_true) and _same_bits(loaded.agl_pred, oof.agl_pred)
    assert _same_bits(OofPredictions.load(old).agl_true, oof.agl_true)  # old folders need no truth set
    assert score_oof_folders([new], truth) == score_oof_folders([old]) == oof.score()
    # An old folder prefers its own file: a truth set of other data is never read for it.
    other = TruthSet(tmp_path, ["ARG_elsewhere"], np.zeros((1, 64, 64), np.float16))
    assert score_oof_folders([old], other) == oof.score()
    with pytest.raises(DataError, match="agl_true.npy"):
        OofPredictions.load(new)
    with pytest.raises(DataError, match="no true heights of 8 image"):
        OofPredictions.load(new, other)
    # Saving predictions only over an old folder leaves no stale truth behind.
    assert sorted(p.name for p in oof.save(old).iterdir()) == sorted([INDEX_CSV, AGL_PRED_NPY])


def _data_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`{KIND_TAG}` = '{tracked.KIND_DATA}'")


def test_the_truth_is_stored_once_per_data_even_when_two_cv_runs_store_it_at_once(cache, tmp_path, monkeypatch):
    client = MlflowClient()
    experiment = client.create_experiment("truth", artifact_location=(tmp_path / "artifacts").as_uri())
    cv_a, cv_b = (client.create_run(experiment).info.run_id for _ in range(2))
    first = tracked.store_truth(cv_a, cache)
    assert tracked.store_truth(cv_b, cache) == first  # found, not made again
    # Two at once: the second looked before the first had finished, so it makes its own ...
    real, searches = tracked.data_runs, []

    def racing(client: MlflowClient, fingerprint: str) -> list:
        searches.append(fingerprint)
        return [] if len(searches) == 1 else real(client, fingerprint)

    monkeypatch.setattr(tracked, "data_runs", racing)
    assert tracked.store_truth(cv_b, cache) == first  # ... and keeps the oldest, deleting its own
    monkeypatch.undo()
    assert len(searches) == 2
    (duplicate,) = client.search_runs([experiment], run_view_type=ViewType.DELETED_ONLY)
    assert duplicate.data.tags[KIND_TAG] == tracked.KIND_DATA and duplicate.info.run_id != first
    (run,) = _data_runs(client)
    assert run.info.run_id == first and run.info.status == "FINISHED"
    assert run.data.params[FINGERPRINT_PARAM] == cache.fingerprint and run.data.params["n_images"] == str(len(cache))
    assert run.data.tags[tracked.CACHE_ENTRY_TAG] == str(cache.path.resolve())
    artifacts = {a.path: a.file_size for a in client.list_artifacts(first, TRUTH_DIR)}
    assert artifacts.keys() == {f"{TRUTH_DIR}/{TRUTH_INDEX_CSV}", f"{TRUTH_DIR}/{TRUTH_NPY}"}
    assert artifacts[f"{TRUTH_DIR}/{TRUTH_NPY}"] == 128 + len(cache) * 64 * 64 * 2  # float16, one copy


def test_readers_take_the_cache_the_folder_in_place_or_a_download_with_the_same_values(cache, tmp_path, monkeypatch):
    client = MlflowClient()
    experiment = client.create_experiment("truth", artifact_location=(tmp_path / "artifacts").as_uri())
    with pytest.raises(GeoposeError, match=f"data fingerprint {cache.fingerprint}"):
        tracked.stored_truth(cache.fingerprint, tmp_path / "none")
    monkeypatch.setattr(tracked.artifacts, "local_artifact_dir", lambda uri: None)  # as a remote store: uploaded
    tracked.store_truth(client.create_run(experiment).info.run_id, cache)
    expected = TruthSet.from_cache(cache).stack(cache.ids)
    in_place = tracked.stored_truth(cache.fingerprint, tmp_path / "unused")
    assert in_place.source == cache.path  # the cache is on this machine: read there, nothing copied
    monkeypatch.setattr(tracked, "_local_cache", lambda entry, fingerprint: None)  # the cache is not here
    downloaded = tracked.stored_truth(cache.fingerprint, tmp_path / "download")
    assert downloaded.source == tmp_path / "download" / TRUTH_DIR
    monkeypatch.undo()
    monkeypatch.setattr(tracked, "_local_cache", lambda entry, fingerprint: None)
    in_store = tracked.stored_truth(cache.fingerprint, tmp_path / "unused")  # a local store: read in place
    assert tmp_path / "artifacts" in in_store.source.parents and not (tmp_path / "unused").exists()
    for found in (downloaded, in_place, in_store):
        assert _same_bits(found.stack(cache.ids), expected)
