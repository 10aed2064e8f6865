"""`geopose-ml data check`: every bad file is listed with its reason; exit 1 if any, 0 on clean data."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
from click.testing import CliRunner

from geopose_mlops.cli import main
from geopose_mlops.data import io, layout
from geopose_mlops.data.check import check_dataset


def _copy(synthetic_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    return data, layout.find_samples(data, "train")


def test_clean_synthetic_data_passes_with_counts_per_city(synthetic_data) -> None:
    result = CliRunner().invoke(main, ["data", "check", str(synthetic_data)])
    assert result.exit_code == 0, result.output
    assert "train: 8 images  (ARG 2  ATL 2  JAX 2  OMA 2)" in result.output
    assert "test: 4 images" in result.output


def test_truncated_j2k_wrong_size_agl_and_json_without_angle_are_all_listed(synthetic_data, tmp_path) -> None:
    data, samples = _copy(synthetic_data, tmp_path)
    truncated, small_agl, no_angle = samples[0].rgb_path, samples[3].agl_path, samples[5].vflow_path
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    io.write_agl(small_agl, np.zeros((32, 32), np.float32))
    no_angle.write_text(json.dumps({"scale": 0.01}))

    result = CliRunner().invoke(main, ["data", "check", str(data)])
    assert result.exit_code == 1
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 3, result.output
    assert any(str(truncated) in line and "cannot be decoded" in line for line in bad)
    assert any(str(small_agl) in line and "32x32" in line and "64x64" in line for line in bad)
    assert any(str(no_angle) in line and "'angle'" in line for line in bad)


def test_csv_rows_without_files_files_without_rows_and_metadata_gaps(synthetic_data, tmp_path) -> None:
    data, samples = _copy(synthetic_data, tmp_path)
    samples[1].rgb_path.unlink()  # listed in geopose_train.csv, no file
    stray = data / "train" / "JAX_stray_AGL.tif"
    io.write_agl(stray, np.zeros((64, 64), np.float32))  # file, no CSV row
    meta_path = data / "metadata.csv"
    with meta_path.open() as handle:
        rows = list(csv.DictReader(handle))
    dropped = samples[2]
    with meta_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["id", "city", "gsd"])
        writer.writeheader()
        writer.writerows(r for r in rows if f"{r['city']}_{r['id']}" != dropped.sample_id)
    (data / "train" / f"{samples[4].sample_id}_VFLOW.json").write_text('{"scale": NaN, "angle": 1.0}')

    report = check_dataset(data)
    reasons = {(path.name, reason) for path, reason in report.problems}
    assert (
        samples[1].rgb_path.name,
        "listed in geopose_train.csv but file not found (RGB of " + samples[1].sample_id + ")",
    ) in reasons
    assert (stray.name, "file has no row in geopose_train.csv") in reasons
    assert ("metadata.csv", f"no row for {dropped.sample_id} (train)") in reasons
    assert any(name == f"{samples[4].sample_id}_VFLOW.json" and "finite" in reason for name, reason in reasons)
    assert len(report.problems) == 4
    assert report.counts["train"]["ARG"] == 2


def test_missing_metadata_and_discovery_without_csv(synthetic_data, tmp_path) -> None:
    data, samples = _copy(synthetic_data, tmp_path)
    (data / "metadata.csv").unlink()
    (data / "geopose_train.csv").unlink()
    samples[6].agl_path.unlink()
    report = check_dataset(data, decode=False)
    reasons = sorted(reason for _, reason in report.problems)
    assert reasons == [
        "metadata.csv (id,city,gsd) is missing or empty",
        f"sample {samples[6].sample_id} has no AGL file",
    ]


def test_decode_check_in_worker_processes_gives_the_same_report_in_the_same_order(synthetic_data, tmp_path) -> None:
    data, samples = _copy(synthetic_data, tmp_path)
    for sample in (samples[6], samples[1]):  # two truncated images, listed in id order whoever decodes them
        sample.rgb_path.write_bytes(sample.rgb_path.read_bytes()[: sample.rgb_path.stat().st_size // 2])
    samples[3].agl_path.write_bytes(b"")
    (data / "train" / f"{samples[4].sample_id}_VFLOW.json").write_text('{"scale": 0.01}')
    one = check_dataset(data, workers=1)
    two = check_dataset(data, workers=2)
    assert two.problems == one.problems and two.counts == one.counts and two.bad_samples == one.bad_samples
    assert [path for path, _ in one.problems] == [
        samples[1].rgb_path, samples[3].agl_path, samples[4].vflow_path, samples[6].rgb_path
    ]  # fmt: skip
    result = CliRunner().invoke(main, ["data", "check", str(data), "--workers", "2"])
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("BAD ")] == [
        f"BAD {path}: {reason}" for path, reason in one.problems
    ]
