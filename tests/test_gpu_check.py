"""The GPU check without a GPU: its dry run on a simulated bare GPU host, the wheels it brings, its outputs."""

import importlib
import json
import math
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DRY_RUN_ROWS = {
    "gpu_check_fold_loss_ratio",
    "gpu_check_fold_train_images_per_s",
    "gpu_check_predict_images_per_s_none",
    "gpu_check_predict_images_per_s_d4",
    "gpu_check_predict_minutes_1025_d4",
    "train_step_speedup_cpu",  # bench_train_step's row on a CPU
    "gpu_check_cache_build_speedup_all_cores",
}


def bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.slow
def test_the_dry_run_on_a_bare_host_writes_the_rows_and_the_readme_section(tmp_path):
    """`gpu_check.py --device cpu --quick` with only a bare GPU host's packages and the wheels' (`python -S`
    over a folder of links to them): the fold, predict and step rows are written, say the device, and the
    README keeps its text around the rewritten section, which names the GPU rows still unmeasured. The
    cache part builds byte-identical entries in one process per core and prices the training set."""
    gpu_wheels, gpu_check = bench_module("gpu_wheels"), bench_module("gpu_check")
    site = gpu_wheels.bare_host_site(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    bare = [sys.executable, "-S"]
    for absent in ("mlflow", "optuna", "xgboost"):  # the simulated host lacks them, as a bare one does
        assert subprocess.run([*bare, "-c", f"import {absent}"], env=env, capture_output=True).returncode != 0
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nthe other scripts' rows\n")
    command = [*bare, str(BENCH / "gpu_check.py"), "--device", "cpu", "--quick"]
    command += ["--results", str(tmp_path / "results.json"), "--readme", str(readme)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = {row["figure"]: row for row in json.loads((tmp_path / "results.json").read_text())}
    assert set(rows) == DRY_RUN_ROWS
    kept = {row["figure"] for row in json.loads((tmp_path / "gpu_check.json").read_text())}
    assert kept == DRY_RUN_ROWS
    for row in rows.values():
        assert math.isfinite(row["value"]) and isinstance(row["met"], bool), row
        assert row["device"].startswith("cpu"), row
    fold = rows["gpu_check_fold_loss_ratio"]
    assert fold["optimiser_steps"] == fold["planned_steps"] == 4  # 2 epochs of 4 training images, batch 2
    assert len(fold["train_losses"]) == 2 and all(math.isfinite(x) for x in fold["train_losses"])
    assert fold["value"] == pytest.approx(fold["train_losses"][1] / fold["train_losses"][0])
    d4 = rows["gpu_check_predict_images_per_s_d4"]["value"]
    minutes = rows["gpu_check_predict_minutes_1025_d4"]
    assert minutes["value"] == pytest.approx(1025 / d4 / 60 * 25 / 4)  # a 2 x 2 ensemble scaled to 25
    assert minutes["scaled_from"] and not minutes["met"]
    cache = rows["gpu_check_cache_build_speedup_all_cores"]
    assert cache["byte_identical"] and cache["workers"] >= 2 and cache["images"] == 4 and not cache["met"]
    assert cache["ours_hours_5923"] == pytest.approx(cache["ours_s_per_image"]["median"] * 5923 / 3600)
    assert cache["value"] == pytest.approx(cache["reference_hours_5923"] / cache["ours_hours_5923"])

    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nthe other scripts' rows\n")
    section = text.split(gpu_check.START)[1].split(gpu_check.END)[0]
    for name in DRY_RUN_ROWS:
        line = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        assert "| cpu (" in line, line
    for name in ("train_step_speedup_gpu", "train_step_images_per_s_gpu"):
        assert f"| {name} | not measured |" in section


def test_prepare_dry_run_prints_the_download_of_the_computed_wheels():
    """`gpu_check.sh prepare --dry-run` downloads nothing and prints the pip command for CPython 3.12 wheels of
    what the check needs beyond a bare host's torch, timm, numpy, scipy and opencv, pinned at this venv's
    versions."""
    gpu_wheels = bench_module("gpu_wheels")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "prepare", "--dry-run"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip().splitlines()[-1].split()
    for part in ("download", "--no-deps", "--only-binary=:all:", "cp312", "manylinux2014_x86_64", ".whl"):
        assert part in command
    assert command[command.index("--python-version") + 1] == "3.12"
    pins = gpu_wheels.wheel_pins()
    assert pins and all(pin in command for pin in pins)
    names = {pin.split("==")[0] for pin in pins}
    assert {"segmentation-models-pytorch", "rasterio", "albumentations", "pandas", "pydantic", "affine"} <= names
    host_or_unneeded = {"torch", "timm", "numpy", "scipy", "opencv-python-headless", "mlflow", "optuna", "pyarrow"}
    assert not names & host_or_unneeded
    assert all(metadata.version(pin.split("==")[0]) == pin.split("==")[1] for pin in pins)


def _fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    lines = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"] + [f"Requires-Dist: {r}\n" for r in requires]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "".join(lines))
    return path


def test_the_host_installs_the_wheels_it_lacks_and_those_it_has_too_old(tmp_path, capsys):
    """A wheel of a distribution missing here is installed, and so is one whose distribution is here at a
    version another installed wheel does not accept; one satisfied here is not; a requirement this Python
    has too old with no wheel to replace it is named in a warning."""
    gpu_wheels = bench_module("gpu_wheels")
    lacking = _fake_wheel(tmp_path, "geopose_no_such_dist", "1.0", ("pytest>=999", "numpy>=999", "pluggy"))
    newer = _fake_wheel(tmp_path, "pytest", "999.0")
    _fake_wheel(tmp_path, "pluggy", "0.1")  # installed here, and any version is accepted: not installed
    assert gpu_wheels.missing_wheels(tmp_path) == [lacking, newer]
    assert "numpy" in capsys.readouterr().err


def test_the_readme_section_is_replaced_in_place_and_names_every_unmeasured_row():
    gpu_check = bench_module("gpu_check")
    start, end = gpu_check.START, gpu_check.END
    text = f"# B\n\nbefore\n\n{start}\nold\n{end}\n\nafter\n"
    assert gpu_check.replace_section(text, f"{start}\nnew\n{end}") == f"# B\n\nbefore\n\n{start}\nnew\n{end}\n\nafter\n"
    appended = gpu_check.replace_section("# B\n", f"{start}\nnew\n{end}")
    assert appended.startswith("# B\n") and "## GPU rows" in appended and appended.count(start) == 1
    section = gpu_check.readme_section([])
    for name, goal in gpu_check.GOALS.items():
        assert f"| {name} | not measured | {goal} | NOT RUN |" in section


def test_scale_md_prices_the_gpu_column_only_from_rows_measured_on_a_gpu(tmp_path):
    """bench_scale's GPU column: training at the fold's images/s, validation at the forwards/s of the 25
    checkpoints without TTA, prediction at the D4 rate; rows of a CPU dry run are not GPU rates."""
    bench_scale = bench_module("bench_scale")
    gpu = {"device": "NVIDIA H200", "checkpoints": 25}
    rows = [
        {"figure": "gpu_check_fold_train_images_per_s", "value": 100.0, **gpu},
        {"figure": "gpu_check_predict_images_per_s_none", "value": 4.0, **gpu},
        {"figure": "gpu_check_predict_images_per_s_d4", "value": 2.0, **gpu},
    ]
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(rows))
    rates = bench_scale.gpu_rates(path)
    assert rates["train"] == pytest.approx(0.01) and rates["forward"] == pytest.approx(0.01)
    assert rates["d4"] == pytest.approx(0.5)
    path.write_text(json.dumps([{**row, "device": "cpu (2 threads, dry run)"} for row in rows]))
    assert bench_scale.gpu_rates(path) == {}

    stage = bench_scale.Stage("training epoch", 10.0, 2, "image-step", 1000, 1.0, 0.0, on_gpu=True,
                              gpu_s_per_unit=0.01, gpu_note="100 images/s")  # fmt: skip
    disk = bench_scale.Stage("OOF write", 1.0, 2, "image", 10, 1.0, 0.0, bytes_per_unit=2e6, study_bytes_units=10)
    opts = type("Opts", (), {"images_per_city": 2, "test_images_per_city": 1, "cities": "ARG", "size": 64,
                             "image_size": 32})()  # fmt: skip
    study = {"train": 10, "test": 1, "k": 5, "architectures": 5, "epochs": 10}
    lines = bench_scale.table([stage, disk], study, opts, 60.0).splitlines()
    assert any(line.startswith("| training epoch |") and "| 83.3 min | 10 s (100 images/s) |" in line for line in lines)
    total = next(line for line in lines if line.startswith("| **total** |"))
    assert "**83.4 min**" in total and "**15 s**" in total  # OOF write: a disk stage, as here (5 s)
    unmeasured = bench_scale.Stage("training epoch", 10.0, 2, "image-step", 1000, 1.0, 0.0, on_gpu=True)
    total = bench_scale.table([unmeasured], study, opts, 60.0).splitlines()[-1]
    assert bench_scale.NOT_MEASURED in total
