"""Prediction with test-time augmentation: each view undone on the height map and the angle (SPEC §1)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import AGL, CHECKPOINT_DIR, CITIES, ENSEMBLE_JSON, SCALE, XYDIR
from geopose_mlops.data import io
from geopose_mlops.data.augment import invert_geometric, transform_array
from geopose_mlops.ensemble.fit import EnsembleSpec
from geopose_mlops.inference import TTA_VIEWS, EnsemblePredictor, predict_folder
from geopose_mlops.models.factory import build_model
from geopose_mlops.train.checkpoint import model_from_checkpoint, save_checkpoint
from geopose_mlops.train.loop import cpu_has_bf16, make_precision


class _Equivariant(torch.nn.Module):
    """Height = 10 x red channel; direction = from the image centre to the brightest red pixel."""

    def forward(self, image, gsd, city):
        red = image[:, 0]
        b, h, w = red.shape
        flat = red.reshape(b, -1).argmax(1)
        rows, cols = (flat // w).float(), (flat % w).float()
        dx, dy = cols - (w - 1) / 2, rows - (h - 1) / 2
        norm = torch.sqrt(dx**2 + dy**2)
        return {AGL: 10 * red, XYDIR: torch.stack([dx / norm, dy / norm], 1), SCALE: torch.full((b,), 2.0)}


def _fake_predictor() -> EnsemblePredictor:
    predictor = EnsemblePredictor.__new__(EnsemblePredictor)
    predictor.spec = EnsembleSpec(["m"], "equal", [1.0], [1.0], [1.0], image_size=8)
    predictor.device = torch.device("cpu")
    predictor.precision = make_precision("cpu", amp=False)
    predictor.members = [[_Equivariant()]]
    predictor.scale_model = None
    return predictor


def test_tta_undoes_each_view_on_heights_and_angles() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 200, (1, 8, 8, 3), dtype=np.uint8)
    rgb[0, 1, 6, 0] = 255  # the brightest red pixel: up and to the right of the centre
    predictor = _fake_predictor()
    plain = predictor.predict(rgb, np.array([0.5]), ["JAX"], "none")
    for tta in ("flip", "d4"):
        out = predictor.predict(rgb, np.array([0.5]), ["JAX"], tta)
        np.testing.assert_allclose(out["agl"], plain["agl"], atol=1e-5)
        assert out["angle"][0] == pytest.approx(plain["angle"][0], abs=1e-6)
    # A horizontally flipped image gives the flipped height map and the angle -a (SPEC §1).
    flipped = predictor.predict(np.ascontiguousarray(rgb[:, :, ::-1]), np.array([0.5]), ["JAX"], "flip")
    np.testing.assert_allclose(flipped["agl"][0], plain["agl"][0][:, ::-1], atol=1e-5)
    assert flipped["angle"][0] == pytest.approx(-plain["angle"][0], abs=1e-6)


def test_flipped_image_file_gives_the_flipped_submission_with_tta_flip(tmp_path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
    rgb[5, 25, 0] = 255  # up and to the right of the centre
    images = tmp_path / "images"
    images.mkdir()
    io.write_rgb(images / "JAX_a_RGB.tif", rgb)
    io.write_rgb(images / "JAX_b_RGB.tif", np.ascontiguousarray(rgb[:, ::-1]))  # b = a flipped left-right
    predictor = _fake_predictor()
    out = tmp_path / "submission"
    assert sorted(predict_folder(predictor, images, out, "flip", progress=False, image_size=32)) == ["JAX_a", "JAX_b"]
    agl_a, agl_b = io.read_agl(out / "JAX_a_AGL.tif"), io.read_agl(out / "JAX_b_AGL.tif")
    np.testing.assert_allclose(agl_b, agl_a[:, ::-1], atol=0.006)  # 1 cm files: rounding only
    (scale_a, angle_a), (scale_b, angle_b) = (
        io.read_vflow(out / "JAX_a_VFLOW.json"),
        io.read_vflow(out / "JAX_b_VFLOW.json"),
    )
    assert angle_a == pytest.approx(math.atan2(25 - 15.5, 5 - 15.5), abs=1e-6)  # (sin, cos) = (dx, dy) / norm
    assert angle_b == pytest.approx(-angle_a, abs=1e-6)
    assert scale_a == scale_b == pytest.approx(2.0)  # px/m; 32 px predicted at 32 px: no rescaling
    assert json.loads((out / "JAX_a_VFLOW.json").read_text())["scale"] == pytest.approx(0.02)  # px/cm on disk
    # A re-run finds both images complete, writes nothing, and says so.
    said = []
    assert predict_folder(predictor, images, out, "flip", progress=False, image_size=32, say=said.append) == []
    assert said == [f"skipped 2 image(s) whose _AGL.tif and _VFLOW.json already exist in {out}"]
    # An image with only one of its two files is predicted again.
    (out / "JAX_b_VFLOW.json").unlink()
    assert predict_folder(predictor, images, out, "flip", progress=False, image_size=32) == ["JAX_b"]


class _NegativeScale(_Equivariant):
    """An undertrained member: its least-squares scale slope comes out negative."""

    def forward(self, image, gsd, city):
        out = super().forward(image, gsd, city)
        return out | {SCALE: torch.full_like(out[SCALE], -0.3)}


def test_negative_member_scale_is_written_as_zero_and_reads_back(tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    io.write_rgb(images / "OMA_a_RGB.tif", np.full((32, 32, 3), 90, np.uint8))
    predictor = _fake_predictor()
    predictor.members = [[_NegativeScale()]]
    predict_folder(predictor, images, tmp_path / "out", "none", progress=False, image_size=32)
    scale, _ = io.read_vflow(tmp_path / "out" / "OMA_a_VFLOW.json")  # io rejects a negative scale
    assert scale == 0.0


# --- the batched, mixed-precision path against the per-image fp32 path it replaced (issue 14) ----------

ENCODER = "tu-mobilenetv3_small_050"


def _trained_norm_statistics(model: torch.nn.Module, seed: int) -> None:
    """Give every batch norm running statistics and affine weights away from the identity (in place)."""
    generator = torch.Generator().manual_seed(seed)
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            n = norm.num_features
            norm.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
            norm.running_var.copy_(0.7 + 0.6 * torch.rand(n, generator=generator))
            norm.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=generator))
            norm.bias.copy_(0.1 * torch.randn(n, generator=generator))


def _package_fresh_ensemble(folder: Path, members: int = 2, folds: int = 2) -> Path:
    """An ensemble folder (ensemble.json + checkpoints/<member>/fold<N>.pt) of freshly built, untrained models.

    Each model's height and magnitude biases are raised so that most heights are above 0 m and the
    scales positive (an untrained head predicts around 0, where clipping would hide differences), and its
    batch norms get the running statistics and affine weights of a trained model (a fresh norm is the
    identity, which would hide an error in folding the norms into the convolutions for inference).
    """
    names = [f"m{k}" for k in range(members)]
    for k, name in enumerate(names):
        for fold in range(folds):
            torch.manual_seed(10 * k + fold)
            model = build_model(ModelConfig(encoder=ENCODER, encoder_weights="none")).eval()
            with torch.no_grad():
                model.pixel_head.head[0].bias += torch.tensor([1.0, 2.0])
                _trained_norm_statistics(model, seed=10 * k + fold)
            config = TrainConfig(model=ModelConfig(encoder=ENCODER), image_size=64, amp=False)
            save_checkpoint(
                folder / CHECKPOINT_DIR / name / f"fold{fold}.pt", model, None, None, config, fold, 0, 0.0, 0
            )
    weights = np.linspace(1, 2, members) / np.linspace(1, 2, members).sum()
    EnsembleSpec(
        names, "simplex", list(weights), list(weights[::-1]), [1 / members] * members,
        city_height_factors={"JAX": 1.1}, image_size=64,
    ).save(folder / ENSEMBLE_JSON)  # fmt: skip
    return folder


def _per_image_fp32_reference(folder: Path, rgb: np.ndarray, gsd: np.ndarray, cities: list[str], tta: str) -> dict:
    """The path before issue 14, kept as written: one image at a time, fp32, ``torch.no_grad``, on the CPU.

    Also returns each image's ``resultant``, the length of the mean of its views' unit angle vectors (1
    without TTA). The mean angle's error is at most a view's angle error over it: the untrained members'
    views disagree, and a short resultant magnifies rounding.
    """
    spec = EnsembleSpec.load(folder / ENSEMBLE_JSON)
    members = [
        [model_from_checkpoint(p, "cpu")[0] for p in sorted((folder / CHECKPOINT_DIR / m).glob("*.pt"))]
        for m in spec.members
    ]
    w, v, u = (
        torch.tensor(x, dtype=torch.float32) for x in (spec.height_weights, spec.scale_weights, spec.angle_weights)
    )
    results = []
    for i in range(len(rgb)):
        image = torch.from_numpy(np.ascontiguousarray(rgb[i : i + 1])).permute(0, 3, 1, 2).float().div(255)
        gsd_t, city_t = torch.tensor(gsd[i : i + 1], dtype=torch.float32), torch.tensor([CITIES.index(cities[i])])
        heights, scales, sines, cosines = [], [], 0.0, 0.0
        for kind in TTA_VIEWS[tta]:
            view = transform_array(kind, image, axes=(-2, -1)).contiguous()
            hs, ss, angles = [], [], []
            with torch.no_grad():
                for folds in members:
                    outputs = [model(view, gsd_t, city_t) for model in folds]
                    hs.append(torch.stack([o[AGL] for o in outputs]).mean(0))
                    ss.append(torch.stack([o[SCALE] for o in outputs]).mean(0))
                    direction = torch.stack([o[XYDIR] for o in outputs]).mean(0)
                    angles.append(torch.atan2(direction[:, 0], direction[:, 1]))
            hs, ss, angles = torch.stack(hs), torch.stack(ss), torch.stack(angles)
            height = torch.einsum("k,kbhw->bhw", w, hs).clamp_min(0).numpy() * spec.city_height_factors.get(
                cities[i], 1.0
            )
            scale = np.clip((v @ ss).numpy().astype(np.float64), 0, None)
            angle = torch.atan2(u @ torch.sin(angles), u @ torch.cos(angles)).numpy()
            height, angle = invert_geometric(kind, height, angle)
            heights.append(np.ascontiguousarray(height))
            scales.append(scale)
            sines, cosines = sines + np.sin(angle), cosines + np.cos(angle)
        resultant = np.hypot(sines, cosines)[0] / len(TTA_VIEWS[tta])
        results.append(
            (np.mean(heights, axis=0)[0], np.mean(scales, axis=0)[0], np.arctan2(sines, cosines)[0], resultant)
        )
    agl, scale, angle, resultant = zip(*results, strict=True)
    return {"agl": np.stack(agl), "scale": np.array(scale), "angle": np.array(angle), "resultant": np.array(resultant)}


def _batch(n: int = 4, size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(3)
    return (
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        np.array([0.5, np.nan, 0.3, 0.7])[:n],
        list(CITIES)[:n],
    )


def _angle_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.angle(np.exp(1j * (np.asarray(a) - np.asarray(b)))))


@pytest.fixture(scope="module")
def fresh_ensemble(module_tmp: Path) -> Iterator[Path]:
    """A 2 x 2 fold ensemble of fresh models, run on one thread (a shared 2-core machine slows
    OpenMP's multi-threaded small convolutions by 10x or more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _package_fresh_ensemble(module_tmp)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("tta", ["none", "d4"])
def test_batched_fp32_equals_the_per_image_path_within_1e4_m(fresh_ensemble, tta) -> None:
    rgb, gsd, cities = _batch()
    reference = _per_image_fp32_reference(fresh_ensemble, rgb, gsd, cities, tta)
    assert (reference["agl"] > 0).mean() > 0.5 and (reference["scale"] > 0).all()  # nothing hidden by clipping
    predictor = EnsemblePredictor(fresh_ensemble, device="cpu", amp=False)
    assert predictor.precision.name == "fp32"
    # Every norm is folded into its convolution: what is compared here is the folded models' arithmetic.
    models = [model for folds in predictor.members for model in folds]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for model in models for m in model.modules())
    out = predictor.predict(rgb, gsd, cities, tta)
    assert out["agl"].shape == (4, 64, 64) and out["agl"].dtype == np.float32
    np.testing.assert_allclose(out["agl"], reference["agl"], rtol=0, atol=1e-4)  # metres
    np.testing.assert_allclose(out["scale"], reference["scale"], rtol=1e-5, atol=1e-6)  # px/m
    assert (_angle_gap(out["angle"], reference["angle"]) < 1e-5 / reference["resultant"]).all()  # rad


# Tolerance of mixed precision (bf16 autocast where this CPU has bf16 instructions): bf16 keeps 8
# significant bits, so each layer's outputs carry ~0.4% relative error. Written down here: heights
# within 0.05 m + 3% of the height, scales within 3%, each view's angle within 0.05 rad (2.9 degrees).
AMP_AGL_ATOL, AMP_RTOL, AMP_ANGLE_RAD = 0.05, 0.03, 0.05


@pytest.mark.parametrize("tta", ["none", "d4"])
def test_mixed_precision_stays_within_the_stated_tolerance_of_fp32(fresh_ensemble, tta) -> None:
    rgb, gsd, cities = _batch()
    reference = _per_image_fp32_reference(fresh_ensemble, rgb, gsd, cities, tta)
    predictor = EnsemblePredictor(fresh_ensemble, device="cpu")  # amp: training's rule on this CPU
    assert predictor.precision.name == ("bf16" if cpu_has_bf16() else "fp32")
    out = predictor.predict(rgb, gsd, cities, tta)
    np.testing.assert_allclose(out["agl"], reference["agl"], rtol=AMP_RTOL, atol=AMP_AGL_ATOL)
    np.testing.assert_allclose(out["scale"], reference["scale"], rtol=AMP_RTOL)
    assert (_angle_gap(out["angle"], reference["angle"]) < AMP_ANGLE_RAD / reference["resultant"]).all()


def test_predict_folder_in_batches_with_decoding_processes_writes_the_per_image_files(fresh_ensemble, tmp_path) -> None:
    images = tmp_path / "images"
    rgb, _, cities = _batch(n=3, size=128)  # predicted at 64 px, upsampled back to 128 px when written
    for image, city in zip(rgb, cities, strict=True):
        io.write_rgb(images / f"{city}_x{city.lower()}_RGB.tif", image)
    predictor = EnsemblePredictor(fresh_ensemble, device="cpu", amp=False)
    one = predict_folder(predictor, images, tmp_path / "one", "flip", progress=False, batch_size=1, workers=0)
    many = predict_folder(predictor, images, tmp_path / "many", "flip", progress=False, batch_size=2, workers=2)
    assert many == one == sorted(one) and len(one) == 3
    for sample_id in one:
        a, b = (
            io.read_agl(tmp_path / "one" / f"{sample_id}_AGL.tif"),
            io.read_agl(tmp_path / "many" / f"{sample_id}_AGL.tif"),
        )
        assert a.shape == (128, 128) and np.abs(a - b).max() <= 0.01 + 1e-6  # at most one 1 cm rounding step
        (s1, a1), (s2, a2) = (io.read_vflow(tmp_path / d / f"{sample_id}_VFLOW.json") for d in ("one", "many"))
        assert s2 == pytest.approx(s1, rel=1e-5) and _angle_gap(a1, a2) < 1e-5


def test_device_option_is_checked_and_auto_picks_what_is_here() -> None:
    from geopose_mlops.errors import ConfigError
    from geopose_mlops.inference import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="0 CUDA device"):
            resolve_device("cuda:1")


def test_predict_command_takes_device_batch_size_workers_and_precision(fresh_ensemble, tmp_path) -> None:
    from click.testing import CliRunner

    from geopose_mlops.cli import main

    images = tmp_path / "images"
    rgb, _, cities = _batch(n=2)
    for image, city in zip(rgb, cities, strict=True):
        io.write_rgb(images / f"{city}_c{city.lower()}_RGB.tif", image)
    command = ["predict", "--model", str(fresh_ensemble), "--images", str(images), "--out", str(tmp_path / "out")]
    done = CliRunner().invoke(main, [*command, "--device", "cpu", "--batch-size", "2", "--workers", "1", "--no-amp"])
    assert done.exit_code == 0, done.output
    assert "wrote 2 prediction(s)" in done.output and "(cpu, fp32)" in done.output
    assert len(list((tmp_path / "out").glob("*_AGL.tif"))) == 2
    bad_device = CliRunner().invoke(main, [*command, "--device", "tpu"])
    assert bad_device.exit_code == 2 and "'tpu'" in bad_device.output
