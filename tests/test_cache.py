"""The preprocessing cache: decode once, resample with scale/gsd adjusted, rebuild on change, atomic."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from geopose_mlops.constants import CITIES
from geopose_mlops.data import cache as cache_module
from geopose_mlops.data import io, layout
from geopose_mlops.data.cache import _ARRAYS, SampleCache, build_cache, cache_fingerprint, default_cache_root
from geopose_mlops.data.pool import decode_pool, usable_cores
from geopose_mlops.errors import BadFilesError

SIZE = 64  # the fixture's source side
CACHED = 32


@pytest.fixture
def data(synthetic_data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(synthetic_data, copy)
    return copy


@pytest.fixture
def decode_counter(monkeypatch):
    calls = {"rgb": 0}
    real = io.read_rgb

    def counting(path, size=None):
        calls["rgb"] += 1
        return real(path, size)

    monkeypatch.setattr(io, "read_rgb", counting)
    return calls


def test_cache_holds_the_resampled_arrays_with_scale_and_gsd_at_the_cached_size(data) -> None:
    samples = layout.find_samples(data, "train")
    cache = build_cache(samples, None, CACHED, progress=False)
    assert cache.path.parent == default_cache_root(data)
    assert cache.ids == [s.sample_id for s in samples] and len(cache) == 8
    assert cache.rgb.shape == (8, CACHED, CACHED, 3) and cache.rgb.dtype == np.uint8
    assert isinstance(cache.rgb, np.memmap) and not cache.rgb.flags.writeable
    row = int(cache.rows([samples[5].sample_id])[0])
    assert row == 5
    np.testing.assert_array_equal(cache.rgb[row], io.read_rgb(samples[5].rgb_path, size=CACHED))
    np.testing.assert_array_equal(cache.agl[row], io.read_agl(samples[5].agl_path, size=CACHED))
    scale, angle = io.read_vflow(samples[5].vflow_path)
    assert cache.scale[row] == pytest.approx(scale * CACHED / SIZE, rel=1e-6)  # px/m halves with the image
    assert cache.gsd[row] == pytest.approx(samples[5].gsd * SIZE / CACHED, rel=1e-6)  # m/px doubles
    assert cache.angle[row] == pytest.approx(angle, abs=1e-6)
    assert [CITIES[i] for i in cache.city_index] == cache.cities == [s.city for s in samples]
    with pytest.raises(KeyError, match="ARG_nothere"):
        cache.rows(["ARG_nothere"])


def test_second_build_decodes_nothing(data, decode_counter) -> None:
    samples = layout.find_samples(data, "train")
    first = build_cache(samples, data / "c", CACHED, progress=False, workers=1)  # decoded here: counted
    assert decode_counter["rgb"] == 8
    second = build_cache(samples, data / "c", CACHED, progress=False, workers=1)
    assert decode_counter["rgb"] == 8
    assert second.fingerprint == first.fingerprint and second.path == first.path
    other_size = build_cache(samples, data / "c", 16, progress=False, workers=1)
    assert other_size.fingerprint != first.fingerprint and decode_counter["rgb"] == 16


def test_a_changed_source_gives_a_new_entry_with_the_new_values(data) -> None:
    samples = layout.find_samples(data, "train")
    before = build_cache(samples, data / "c", CACHED, progress=False)
    io.write_agl(samples[0].agl_path, np.full((SIZE, SIZE), 7.0, np.float32))
    after = build_cache(layout.find_samples(data, "train"), data / "c", CACHED, progress=False)
    assert after.fingerprint != before.fingerprint
    assert np.all(after.agl[0] == 7.0) and not np.all(before.agl[0] == 7.0)
    stat = samples[1].rgb_path.stat()  # a touched file (same bytes, new mtime) also counts as changed
    os.utime(samples[1].rgb_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache_fingerprint(samples, CACHED) != after.fingerprint


def test_an_interrupted_build_leaves_no_entry_and_is_not_reused(data, monkeypatch) -> None:
    samples = layout.find_samples(data, "train")
    root = data / "c"
    real, calls = io.read_agl, {"n": 0}

    def failing(path, size=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(io, "read_agl", failing)
    with pytest.raises(KeyboardInterrupt):
        build_cache(samples, root, CACHED, progress=False, workers=1)
    assert list(root.iterdir()) == []
    monkeypatch.setattr(io, "read_agl", real)

    # A build killed outright leaves its temporary folder; a later build ignores and removes it.
    fingerprint = cache_fingerprint(samples, CACHED)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = root / f".tmp-{fingerprint}-{dead.pid}"
    stale.mkdir()
    (stale / "rgb.npy").write_bytes(b"half")
    cache = build_cache(samples, root, CACHED, progress=False)
    assert not stale.exists()
    np.testing.assert_array_equal(cache.rgb[2], io.read_rgb(samples[2].rgb_path, size=CACHED))
    assert SampleCache.open(cache.path).fingerprint == fingerprint


def test_images_of_different_source_sizes_share_one_cache(data) -> None:
    samples = layout.find_samples(data, "train")
    big = samples[0]
    io.write_rgb(big.rgb_path, np.kron(io.read_rgb(big.rgb_path), np.ones((2, 2, 1), np.uint8)))
    io.write_agl(big.agl_path, np.kron(io.read_agl(big.agl_path), np.ones((2, 2), np.float32)))
    cache = build_cache(samples, data / "c", CACHED, progress=False)
    scale, _ = io.read_vflow(big.vflow_path)
    assert cache.scale[0] == pytest.approx(scale * CACHED / (2 * SIZE), rel=1e-6)
    assert cache.gsd[0] == pytest.approx(big.gsd * 2 * SIZE / CACHED, rel=1e-6)


def test_test_split_without_truth_is_cached_with_nan_targets(synthetic_data, tmp_path) -> None:
    cache = build_cache(layout.find_samples(synthetic_data, "test"), tmp_path, CACHED, progress=False)
    assert len(cache) == 4 and np.isnan(cache.agl).all() and np.isnan(cache.scale).all()


def _entry_bytes(cache: SampleCache) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.path.iterdir())}


def test_a_build_in_two_processes_is_byte_identical_to_one_process(data) -> None:
    samples = layout.find_samples(data, "train") + layout.find_samples(data, "test")  # truth and no truth
    one = build_cache(samples, data / "one", CACHED, progress=False, workers=1)
    two = build_cache(samples, data / "two", CACHED, progress=False, workers=2)
    assert two.fingerprint == one.fingerprint
    assert _entry_bytes(two) == _entry_bytes(one)  # every .npy and index.json, byte for byte
    assert sorted(_entry_bytes(one)) == sorted([f"{name}.npy" for name in _ARRAYS] + ["index.json"])


def test_bad_files_found_by_worker_processes_are_all_named_in_row_order(data) -> None:
    samples = layout.find_samples(data, "train")
    truncated, empty = samples[5].rgb_path, samples[2].agl_path
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    empty.write_bytes(b"")
    with pytest.raises(BadFilesError) as caught:
        build_cache(samples, data / "c", CACHED, progress=False, workers=2)
    assert [path for path, _ in caught.value.problems] == [empty, truncated]
    assert "empty" in caught.value.problems[0][1] and "cannot be decoded" in caught.value.problems[1][1]
    assert list((data / "c").iterdir()) == []  # no entry, no temporary folder


def test_a_parallel_build_interrupted_half_way_leaves_nothing_and_rebuilds_the_same(data, monkeypatch) -> None:
    samples = layout.find_samples(data, "train")
    root = data / "c"
    real = cache_module.as_completed

    def interrupted(futures):  # Ctrl-C arrives after the first row is back
        yield next(real(futures))
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "as_completed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(samples, root, CACHED, progress=False, workers=2)
    assert list(root.iterdir()) == []
    monkeypatch.undo()
    rebuilt = build_cache(samples, root, CACHED, progress=False, workers=2)
    clean = build_cache(samples, data / "clean", CACHED, progress=False, workers=1)
    assert _entry_bytes(rebuilt) == _entry_bytes(clean)


def test_each_decoding_process_uses_its_share_of_the_cores_for_gdal() -> None:
    # GDAL decodes a JPEG 2000 on every core by default: a process per core must not each do so.
    with decode_pool(2) as pool:
        assert pool.submit(os.getenv, "GDAL_NUM_THREADS").result() == str(max(1, usable_cores() // 2))
