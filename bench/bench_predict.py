"""Figure: ``predict`` of a 3-member x 3-fold ensemble vs one pass per checkpoint and an averaging pass.

Inputs: ``--images`` synthetic 2048² lossless JPEG 2000 test images (``make_synthetic_dataset``; 2
without TTA, the first ``--d4-images`` (1) of them with D4, as its reference takes over a minute each),
predicted at ``--image-size`` 1024² by an ensemble of ``--members`` x ``--folds`` freshly built U-Nets
with the ``--encoder`` (MobileNetV3-small-050, weights off: no training is needed to time arithmetic),
packaged as ``EnsemblePredictor`` reads it (``ensemble.json`` + ``checkpoints/<member>/fold<N>.pt``).
Their height and magnitude biases are raised so that heights are above 0 m, where clipping does not
differ between the two orders of averaging below.

- **reference** (the public baseline's and this project's seed's way): one pass per checkpoint, which
  loads it, decodes every image (``io.read_rgb`` at 1024², as the seed did), predicts each view one
  image at a time in fp32 (contiguous NCHW, ``torch.no_grad``) and writes the
  raw float32 predictions (the height map averaged over the views, each view's scale and direction)
  to ``.npz``; then an averaging pass reads them back, combines members and views as the ensemble does,
  upsamples and writes the submission.
- **ours**: ``predict_folder(EnsemblePredictor(folder, device="cpu"), ...)`` as ``geopose-ml predict``
  runs it: decoded once, every checkpoint and view on the same batch, training's AMP rule (bf16
  where this CPU has bf16 instructions), channels_last, ``torch.inference_mode``, the writer pool.

Both sides run on one core: the process is pinned to it, torch runs one thread (``--threads 1``), and
ours decodes in its own process (``--workers 0``; ``predict``'s default is a decoding process per
core) and writes from threads that share that core. A per-core figure, and a stable one: on this
shared 2-core machine two OpenMP threads slowed either side 10-30x whenever other processes were busy.
Ours predicts one image at a time, ``predict``'s default on the CPU. The outputs must agree within the mixed
precision tolerance of tests/test_inference.py (heights 0.05 m + 3%, scales 3%, angles 0.05 rad per
view, divided by the length of the views' mean angle vector). Without TTA that compares the angles
themselves; with D4 the untrained members' 8 views point every way (a mean vector about 0.003 long
here), so the mean angle is noise and, in effect, only its vector is compared. Goals on CPU: >= 3x without TTA and
>= 1.7x with D4 (where the models' arithmetic dominates both sides).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import common
import numpy as np
import torch
import torch.nn.functional as F

from geopose_mlops.config import ModelConfig, TrainConfig
from geopose_mlops.constants import AGL, CHECKPOINT_DIR, CITIES, ENSEMBLE_JSON, METADATA_CSV, SCALE, XYDIR
from geopose_mlops.data import io
from geopose_mlops.data.augment import inverse_geometric, invert_geometric, transform_angle, transform_array
from geopose_mlops.data.synth import make_synthetic_dataset
from geopose_mlops.ensemble.fit import EnsembleSpec
from geopose_mlops.inference import DEFAULT_BATCH_SIZE, TTA_VIEWS, EnsemblePredictor, find_images, predict_folder
from geopose_mlops.models.factory import build_model
from geopose_mlops.train.checkpoint import model_from_checkpoint, save_checkpoint

GOALS = {"none": 3.0, "d4": 1.7}
AGL_ATOL, RTOL, ANGLE_RAD = 0.05, 0.03, 0.05  # tests/test_inference.py's mixed-precision tolerance


def make_ensemble(folder: Path, members: int, folds: int, encoder: str, image_size: int) -> Path:
    """Package ``members`` x ``folds`` fresh models with unequal weights and one city factor."""
    names = [f"member{k}" for k in range(members)]
    for k, name in enumerate(names):
        for fold in range(folds):
            torch.manual_seed(100 * k + fold)
            model = build_model(ModelConfig(encoder=encoder, encoder_weights="none")).eval()
            with torch.no_grad():
                model.pixel_head.head[0].bias += torch.tensor([2.0, 4.0])  # heights > 0 m, scales > 0
            config = TrainConfig(model=ModelConfig(encoder=encoder), image_size=image_size)
            save_checkpoint(folder / CHECKPOINT_DIR / name / f"fold{fold}.pt", model, None, None, config, fold, 0, 0, 0)
    weights = np.arange(1, members + 1, dtype=float) / sum(range(1, members + 1))
    EnsembleSpec(
        names, "simplex", list(weights), list(weights[::-1]), [1 / members] * members,
        city_height_factors={"JAX": 1.1}, image_size=image_size,
    ).save(folder / ENSEMBLE_JSON)  # fmt: skip
    return folder


@torch.no_grad()
def reference_checkpoint_pass(path: Path, samples, size: int, tta: str, raw_dir: Path) -> None:
    """One checkpoint: decode every image, predict each view in fp32 one image at a time, save raw float32."""
    model = model_from_checkpoint(path, "cpu")[0]
    for sample in samples:
        image = torch.from_numpy(io.read_rgb(sample.rgb_path, size=size)).permute(2, 0, 1)[None].float().div(255)
        gsd = torch.tensor([sample.gsd * io.raster_info(sample.rgb_path)[0] / size], dtype=torch.float32)
        city = torch.tensor([CITIES.index(sample.city)])
        heights, scales, directions = 0.0, [], []
        for kind in TTA_VIEWS[tta]:
            out = model(transform_array(kind, image, axes=(-2, -1)).contiguous(), gsd, city)
            heights = heights + invert_geometric(kind, out[AGL][0].numpy(), 0.0)[0]
            scales.append(float(out[SCALE][0]))
            directions.append(out[XYDIR][0].numpy())
        height = np.float32(heights / len(TTA_VIEWS[tta]))
        raw = raw_dir / f"{path.parent.name}-{path.stem}-{sample.sample_id}.npz"
        np.savez(raw, height=height, scale=np.float32(scales), direction=np.float32(directions))


def reference_average_pass(spec: EnsembleSpec, samples, tta: str, raw_dir: Path, out_dir: Path) -> dict:
    """Read every checkpoint's raw predictions back; combine folds, members and views; write the files.

    Returns:
        Per image id, the length of the mean of its views' unit angle vectors (1 without TTA).
    """
    resultants = {}
    for sample in samples:
        height, scales, angles = 0.0, [], []
        for weight, member in zip(spec.height_weights, spec.members, strict=True):
            raw = [np.load(p) for p in sorted(raw_dir.glob(f"{member}-*-{sample.sample_id}.npz"))]
            height = height + weight * np.mean([r["height"] for r in raw], axis=0)
            scales.append(np.mean([r["scale"] for r in raw], axis=0))
            direction = np.mean([r["direction"] for r in raw], axis=0)  # (views, 2)
            angles.append(np.arctan2(direction[:, 0], direction[:, 1]))
        height = np.clip(height, 0, None) * spec.city_height_factors.get(sample.city, 1.0)
        scale = np.clip(np.asarray(spec.scale_weights) @ np.array(scales), 0, None).mean()
        u, angles = np.asarray(spec.angle_weights), np.array(angles)
        per_view = np.arctan2(u @ np.sin(angles), u @ np.cos(angles))
        per_view = [transform_angle(inverse_geometric(k), a) for k, a in zip(TTA_VIEWS[tta], per_view, strict=True)]
        side = io.raster_info(sample.rgb_path)[0]
        agl = F.interpolate(torch.from_numpy(np.float32(height))[None, None], (side, side), mode="bilinear")[0, 0]
        io.write_agl(out_dir / f"{sample.sample_id}_AGL.tif", agl.numpy())
        angle = math.atan2(np.sin(per_view).sum(), np.cos(per_view).sum())
        io.write_vflow(out_dir / f"{sample.sample_id}_VFLOW.json", scale * side / height.shape[0], angle)
        resultants[sample.sample_id] = math.hypot(np.sin(per_view).sum(), np.cos(per_view).sum()) / len(per_view)
    return resultants


def reference(folder: Path, images: Path, out_dir: Path, tta: str, size: int) -> dict:
    """The whole reference; returns each image's resultant length (``reference_average_pass``)."""
    spec, samples = EnsembleSpec.load(folder / ENSEMBLE_JSON), find_images(images)
    raw_dir = out_dir.parent / f"{out_dir.name}-raw"
    for path in (raw_dir, out_dir):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    for member in spec.members:
        for path in sorted((folder / CHECKPOINT_DIR / member).glob("*.pt")):
            reference_checkpoint_pass(path, samples, size, tta, raw_dir)
    return reference_average_pass(spec, samples, tta, raw_dir, out_dir)


def ours(folder: Path, images: Path, out_dir: Path, tta: str, opts) -> str:
    """``geopose-ml predict --device cpu``; returns the precision that ran."""
    shutil.rmtree(out_dir, ignore_errors=True)
    predictor = EnsemblePredictor(folder, device="cpu")
    predict_folder(predictor, images, out_dir, tta, progress=False, batch_size=opts.batch_size, workers=opts.workers)
    return predictor.precision.name


def largest_differences(reference_dir: Path, ours_dir: Path, resultants: dict) -> dict[str, float]:
    """The largest differences between the two folders, and the largest share of the tolerance used.

    The tolerance of the mean angle is a view's over the resultant length: the untrained members' views
    disagree, and a short mean vector magnifies each view's rounding.
    """
    worst = {"agl_m": 0.0, "scale_rel": 0.0, "angle_rad": 0.0, "tolerance_used": 0.0}
    worst["resultant_min"] = min(resultants.values())
    for path in sorted(reference_dir.glob("*_AGL.tif")):
        a, b = io.read_agl(path), io.read_agl(ours_dir / path.name)
        sample_id = path.name.removesuffix("_AGL.tif")
        (s1, a1), (s2, a2) = (io.read_vflow(d / f"{sample_id}_VFLOW.json") for d in (reference_dir, ours_dir))
        gaps = {
            "agl_m": float(np.abs(a - b).max()),
            "scale_rel": abs(s2 - s1) / max(abs(s1), 1e-12),
            "angle_rad": abs(math.remainder(a2 - a1, 2 * math.pi)),
        }
        used = [
            float((np.abs(a - b) / (AGL_ATOL + RTOL * np.abs(a) + 0.01)).max()),  # + one 1 cm rounding step
            gaps["scale_rel"] / RTOL,
            gaps["angle_rad"] / (ANGLE_RAD / resultants[sample_id]),
        ]
        worst = {key: max(worst[key], value) for key, value in (*gaps.items(), ("tolerance_used", max(used)))}
    return worst


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="synthetic test images (one per city, up to 4)")
    parser.add_argument("--size", type=int, default=2048, help="source image side, pixels")
    parser.add_argument("--image-size", type=int, default=1024, help="side predicted at, pixels")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--encoder", default="tu-mobilenetv3_small_050")
    parser.add_argument("--batch-size", type=int, default=None, help="our --batch-size (default: predict's)")
    parser.add_argument("--workers", type=int, default=0, help="our decoding processes (0: in its own process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--d4-images", type=int, default=1, help="of those, predicted with D4 (minutes each)")
    parser.add_argument("--d4-repeats", type=int, default=1, help="timed repeats with D4")
    opts = parser.parse_args(args)
    common.limit_threads(opts.threads)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if opts.threads == 1 and cores:
        os.sched_setaffinity(0, {min(cores)})  # one core: writer threads and all
    figures = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-", dir=opts.workdir) as tmp:
        tmp = Path(tmp)
        cities = CITIES[: min(opts.images, len(CITIES))]
        make_synthetic_dataset(tmp / "data", 0, opts.size, seed=0, cities=cities, test_images_per_city=1)
        folder = make_ensemble(tmp / "ensemble", opts.members, opts.folds, opts.encoder, opts.image_size)
        images = tmp / "data" / "test"
        print(f"{len(cities)} test images of {opts.size}² and {opts.members}x{opts.folds} checkpoints made", flush=True)
        # Warm-up of both sides on one image (oneDNN kernels, lazy imports), outside the timed calls.
        warm = _subset(images, 1, tmp / "warm")
        reference(folder, warm, tmp / "warm-ref", "none", opts.image_size)
        ours(folder, warm, tmp / "warm-ours", "none", opts)
        figures += measure(folder, images, tmp, "none", opts)
        figures += measure(folder, _subset(images, opts.d4_images, tmp / "d4"), tmp, "d4", opts)
    if cores:
        os.sched_setaffinity(0, cores)  # the machine facts written with the figures name every core
    common.write_results(figures, opts.results)
    common.print_figures(figures)
    return figures


def _subset(images: Path, count: int, dest: Path) -> Path:
    """``dest/test`` holding the first ``count`` images of ``images`` and the data set's metadata.csv."""
    (dest / "test").mkdir(parents=True)
    shutil.copy(images.parent / METADATA_CSV, dest)
    for path in sorted(images.glob("*_RGB.*"))[:count]:
        shutil.copy(path, dest / "test")
    return dest / "test"


def measure(folder: Path, images: Path, tmp: Path, tta: str, opts) -> list[dict]:
    """Time both sides interleaved with this TTA, then compare their last outputs."""
    precision, resultants = [], {}
    ref, mine = common.time_interleaved(
        lambda: resultants.update(reference(folder, images, tmp / "ref", tta, opts.image_size)),
        lambda: precision.append(ours(folder, images, tmp / "ours", tta, opts)),
        repeats=opts.repeats if tta == "none" else opts.d4_repeats,
        warmup=0,
    )
    n = len(resultants)
    print(f"TTA {tta}: reference {ref.median / n:.1f} s, ours {mine.median / n:.1f} s an image", flush=True)
    return _figures(tta, n, ref, mine, largest_differences(tmp / "ref", tmp / "ours", resultants), precision[-1], opts)


def _figures(tta: str, n: int, ref, mine, worst: dict, precision: str, opts) -> list[dict]:
    speedup, low, high = common.ratio_spread(ref, mine)
    goal = GOALS[tta]
    equal = worst["tolerance_used"] <= 1
    details = {
        "images": n,
        "source_size": opts.size,
        "image_size": opts.image_size,
        "ensemble": f"{opts.members} members x {opts.folds} folds, U-Net {opts.encoder}",
        "tta": tta,
        "ours_precision": precision,
        "ours_batch_size": opts.batch_size or DEFAULT_BATCH_SIZE["cpu"],
        "ours_workers": opts.workers,
        "pinned_to_one_core": opts.threads == 1,
        "threads": torch.get_num_threads(),
        "reference_s_per_image": ref.summary(per=n),
        "ours_s_per_image": mine.summary(per=n),
        "ratio_range": [low, high],
        "largest_differences": worst,
    }
    name = f"predict_speedup_cpu_{tta}"
    return [
        common.figure(
            name, speedup, "x", f">= {goal:g}x vs one pass per checkpoint + averaging pass (TTA {tta}), outputs equal",
            speedup >= goal and equal, **details,
        ),
        common.figure(
            f"predict_output_difference_{tta}", worst["tolerance_used"], "x tolerance",
            f"<= 1 (heights {AGL_ATOL} m + {RTOL:.0%} + 1 cm; scales {RTOL:.0%}; angles {ANGLE_RAD} rad a view)", equal,
            **details,
        ),
    ]  # fmt: skip


if __name__ == "__main__":
    run(sys.argv[1:])
