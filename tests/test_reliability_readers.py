"""Every reader fed random bytes and random shapes raises only the package's own errors, never crashes or hangs.

Readers: ``io.raster_info``, ``io.read_rgb``, ``io.read_agl``, ``io.read_vflow``, the layout's CSV readers
(``read_csv_rows``, ``read_metadata``, ``list_files``, ``find_samples``), ``folds.read_folds``, the study
file loader and the config readers (a cv run's ``config.json``, a checkpoint's config: ``config.from_dict``).
A reader either returns what it promises (checked) or raises a ``GeoposeError``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.errors import NotGeoreferencedWarning

from geopose_mlops.config import TrainConfig, from_dict, load_json_config, save_json_config, to_dict
from geopose_mlops.data import io, layout
from geopose_mlops.data.folds import read_folds
from geopose_mlops.errors import ConfigError, GeoposeError
from geopose_mlops.train.checkpoint import config_from_checkpoint
from geopose_mlops.tune.study_file import load_study_config

PROPERTY = settings(
    max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

# Random bytes, plus truncations of real files of each format (the faults real data sets have).
RAW = st.one_of(
    st.binary(max_size=2048),
    st.sampled_from(
        [b"", b"\x00" * 64, b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"]
    ),
)


def _write(tmp: Path, name: str, raw: bytes) -> Path:
    path = tmp / name
    path.write_bytes(raw)
    return path


def _truncated(kind: str, keep: float) -> bytes:
    """A valid 16 px file of ``kind`` cut to the fraction ``keep`` of its bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x_{kind}"
        rng = np.random.default_rng(0)
        if kind == "rgb.j2k" or kind == "rgb.tif":
            io.write_rgb(path.with_suffix("." + kind.split(".")[1]), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            raw = path.with_suffix("." + kind.split(".")[1]).read_bytes()
        else:
            io.write_agl(path.with_suffix(".tif"), rng.random((16, 16), dtype=np.float32) * 30)
            raw = path.with_suffix(".tif").read_bytes()
    return raw[: int(len(raw) * keep)]


@PROPERTY
@given(raw=RAW, suffix=st.sampled_from([".j2k", ".tif"]))
def test_raster_readers_on_random_bytes_raise_only_geopose_errors(raw: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), f"ARG_x_RGB{suffix}", raw)
        for reader in (io.raster_info, io.read_rgb, io.read_agl, lambda p: io.read_rgb(p, size=8)):
            try:
                reader(path)
            except GeoposeError:
                pass


@PROPERTY
@given(kind=st.sampled_from(["rgb.j2k", "rgb.tif", "agl.tif"]), keep=st.floats(0.0, 0.99))
def test_truncated_rasters_raise_data_errors(kind: str, keep: float) -> None:
    raw = _truncated(kind, keep)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), f"ARG_x.{kind.split('.')[1]}", raw)
        reader = io.read_agl if kind.startswith("agl") else io.read_rgb
        with pytest.raises(GeoposeError):
            reader(path)


@PROPERTY
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    count=st.integers(1, 4),
    dtype=st.sampled_from(["uint8", "uint16", "int16", "float32"]),
    size=st.one_of(st.none(), st.integers(1, 48)),
)
def test_rasters_of_random_shape_and_type_are_read_or_refused(
    height: int, width: int, count: int, dtype: str, size: int | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ARG_x_AGL.tif"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=count, dtype=dtype) as dst:
                dst.write(np.ones((count, height, width), dtype=dtype))
        assert io.raster_info(path) == (height, width, count, dtype)
        side = (size, size) if size else (height, width)
        try:
            rgb = io.read_rgb(path, size=size)
            assert rgb.shape == (*side, 3) and rgb.dtype == np.uint8
        except GeoposeError:
            assert (count, dtype) != (3, "uint8")
        try:
            agl = io.read_agl(path, size=size)
            assert agl.shape == side and agl.dtype == np.float32
        except GeoposeError:
            assert (count, dtype) != (1, "uint16")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@PROPERTY
@given(
    content=st.one_of(
        st.binary(max_size=256).map(lambda b: b),
        st.dictionaries(st.sampled_from(["scale", "angle", "x"]), JSON_VALUES, max_size=3).map(
            lambda d: json.dumps(d).encode()
        ),
        st.tuples(st.integers() | st.integers(min_value=10**300), st.integers()).map(
            lambda t: f'{{"scale": {t[0]}, "angle": {t[1]}}}'.encode()
        ),
    )
)
def test_vflow_reader_on_random_content(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "ARG_x_VFLOW.json", content)
        try:
            scale, angle = io.read_vflow(path)
        except GeoposeError:
            return
        assert np.isfinite(scale) and scale >= 0 and np.isfinite(angle)


CSV_TEXT = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.lists(st.text(alphabet='abcARGJX_.,0123456789-"\n', max_size=12), min_size=1, max_size=5), max_size=6
    ).map(lambda rows: "\n".join(",".join(r) for r in rows)),
    st.lists(st.text(alphabet="ARG_xyz.tifj2k", max_size=14), min_size=4, max_size=4).map(
        lambda cells: "id,agl,json,rgb\n" + ",".join(cells) + "\n"
    ),
)


@PROPERTY
@given(text=CSV_TEXT, raw=st.binary(max_size=64))
def test_layout_and_folds_readers_on_random_csv(text: str, raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "train").mkdir()
        for name in ("geopose_train.csv", "metadata.csv", "folds.csv"):
            (data / name).write_text(text)
        _write(data / "train", "ARG_xyz_RGB.j2k", raw)
        readers = (
            lambda: layout.read_csv_rows(data / "geopose_train.csv"),
            lambda: layout.read_metadata(data),
            lambda: layout.list_files(data, "train"),
            lambda: layout.find_samples(data, "train"),
            lambda: read_folds(data / "folds.csv"),
        )
        for reader in readers:
            try:
                reader()
            except GeoposeError:
                pass
        (data / "folds.csv").write_bytes(raw)
        try:
            read_folds(data / "folds.csv")
        except GeoposeError:
            pass


STUDY_KEYS = ["study_name", "train", "storage", "sampler", "pruner", "search_space", "n_trials", "heartbeat_interval"]
YAML_DOCS = st.one_of(
    st.text(max_size=200),
    st.dictionaries(
        st.one_of(st.sampled_from(STUDY_KEYS), st.text(max_size=5), st.integers(-3, 3)), JSON_VALUES, max_size=5
    ).map(yaml.safe_dump),  # structured documents with valid and invalid keys (int ones too) and values
    st.fixed_dictionaries(
        {
            "study_name": st.sampled_from(["s", "a b", ""]),
            "train": st.dictionaries(
                st.sampled_from(["lr", "epochs", "model", "folds", "k", "bogus"]), JSON_VALUES, max_size=3
            ),
        }
    ).map(json.dumps),
)


@PROPERTY
@given(document=YAML_DOCS)
def test_study_loader_on_random_documents(document: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_text(document)
        try:
            config = load_study_config(path)
        except GeoposeError:
            return
        assert config.study_name and config.storage


TRAIN_KEYS = [f for f in to_dict(TrainConfig()) if f != "model"]


@PROPERTY
@given(values=st.dictionaries(st.one_of(st.sampled_from([*TRAIN_KEYS, "model"]), st.text(max_size=5)), JSON_VALUES))
def test_config_json_reader_on_random_documents(values: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(values))
        try:
            config = load_json_config(TrainConfig, path)
        except GeoposeError as err:
            assert str(err).startswith(str(path)), err
            return
        assert isinstance(config, TrainConfig) and to_dict(config).keys() == to_dict(TrainConfig()).keys()


def test_config_json_with_a_wrong_type_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    save_json_config(TrainConfig(epochs=3), path)
    assert load_json_config(TrainConfig, path) == TrainConfig(epochs=3)
    values = json.loads(path.read_text())
    for key, bad, expected in [
        ("epochs", "ten", "epochs: expected int, got 'ten'"),
        ("amp", 1, "amp: expected bool, got 1"),
        ("batch_size", True, "batch_size: expected int, got True"),
        ("folds", [0, "1"], "folds: expected list of int or None, got [0, '1']"),
        ("model", {"encoder": 34}, "model.encoder: expected str, got 34"),
    ]:
        path.write_text(json.dumps({**values, key: bad}))
        with pytest.raises(ConfigError) as caught:
            load_json_config(TrainConfig, path)
        assert str(caught.value) == f"{path}: {expected}"


def test_checkpoint_config_with_a_wrong_type_is_refused_naming_file_and_key() -> None:
    config = TrainConfig(folds=(0, 2), effective_batch_size=8)
    stored = to_dict(config)
    assert config_from_checkpoint({"config": stored}, "fold0/best.pt") == config
    with pytest.raises(ConfigError, match=r"^fold0/best\.pt: config: epochs: expected int, got 'ten'$"):
        config_from_checkpoint({"config": {**stored, "epochs": "ten"}}, "fold0/best.pt")
    with pytest.raises(ConfigError, match=r"^fold0/best\.pt: config: unknown key\(s\) \['epoch'\]"):
        config_from_checkpoint({"config": {**stored, "epoch": 3}}, "fold0/best.pt")


def test_from_dict_type_rules() -> None:
    config = from_dict(TrainConfig, {"lr": 1, "crop_size": None, "folds": [1], "model": {"use_metadata": False}})
    assert (config.lr, config.crop_size, config.folds, config.model.use_metadata) == (1, None, (1,), False)
    for values, expected in [
        ({"lr": "1e-4"}, "lr: expected float, got '1e-4'"),
        ({"epochs": 2.0}, "epochs: expected int, got 2.0"),
        ({"image_size": None}, "image_size: expected int, got None"),
        ({"augment": "yes"}, "augment: expected bool, got 'yes'"),
        ({"model": "resnet34"}, "model: expected a mapping (ModelConfig), got 'resnet34'"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ]:
        with pytest.raises(ConfigError) as caught:
            from_dict(TrainConfig, values, "where")
        assert str(caught.value) == f"where: {expected}"
