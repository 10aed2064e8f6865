"""Figure 1, data feed: training samples/s from our cache vs decoding the sources every epoch.

Inputs: ``--images`` synthetic 2048² samples (``make_synthetic_dataset``: lossless JPEG 2000 RGB,
uint16 AGL GeoTIFF, VFLOW json), trained at ``--image-size`` (1024², the baseline's downsample of 2).

- **reference** (pubgeo/monocular-geocentric-pose): every sample of every epoch decodes the full
  2048² JPEG 2000 and AGL TIFF (GDAL, here through ``data.io``, which is GDAL too), reads the json,
  and downsamples with ``cv2.resize`` (bilinear RGB, nearest AGL), dividing the scale by the factor.
- **ours**: ``build_cache`` decodes once (its one-time cost is reported, not counted per epoch); the
  epoch is ``GeoposeDataset`` over the memory-mapped cache.

Both sides then apply *the same* training augmentation (``build_train_augmentation``: D4, rotation,
rescale, colour) and ``to_tensors``, so the ratio measures only where the pixels come from. Everything
runs on one thread, so the rates are per core.

Goals: ours >= 20x the reference's samples/s; and enough samples/s per core to feed a GPU step. The
assumption: an H100 trains ~60 images/s at 1024² (the training-step goal) and its host has 16 cores
(as this project's H100 machine does), so >= 60 / 16 = 3.75 samples/s per core keeps it fed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import common
import cv2

from geopose_mlops.constants import AGL, ANGLE, CITIES, CITY, GSD, IMAGE, SAMPLE_ID, SCALE
from geopose_mlops.data import io
from geopose_mlops.data.augment import build_train_augmentation
from geopose_mlops.data.cache import build_cache
from geopose_mlops.data.dataset import GeoposeDataset, to_tensors
from geopose_mlops.data.layout import find_samples
from geopose_mlops.data.synth import make_synthetic_dataset

SPEEDUP_GOAL = 20.0
GPU_IMAGES_PER_S = 60.0  # assumed consumption of one H100 training step at 1024², images/s
CORES_PER_GPU = 16  # assumed host cores per GPU (this project's H100 machine)


def reference_sample(sample, image_size: int, augmentation) -> dict:
    """Decode the full-size sources, downsample as the baseline does, augment, make tensors."""
    rgb = io.read_rgb(sample.rgb_path)
    agl = io.read_agl(sample.agl_path)
    scale, angle = io.read_vflow(sample.vflow_path)
    factor = image_size / rgb.shape[1]  # training pixels per source pixel
    rgb = cv2.resize(rgb, (image_size, image_size))
    agl = cv2.resize(agl, (image_size, image_size), interpolation=cv2.INTER_NEAREST)
    rgb, agl, angle, scale, gsd = augmentation(rgb, agl, angle, scale * factor, sample.gsd / factor)
    return to_tensors(
        {IMAGE: rgb, AGL: agl, SCALE: scale, ANGLE: angle, GSD: gsd, CITY: CITIES.index(sample.city),
         SAMPLE_ID: sample.sample_id}
    )  # fmt: skip


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="synthetic samples (a multiple of 4: one per city)")
    parser.add_argument("--size", type=int, default=2048, help="source image side, pixels")
    parser.add_argument("--image-size", type=int, default=1024, help="training side, pixels")
    opts = parser.parse_args(args)
    common.limit_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-feed-", dir=opts.workdir) as tmp:
        start = time.perf_counter()
        make_synthetic_dataset(Path(tmp) / "data", max(1, opts.images // len(CITIES)), opts.size, seed=0)
        synth_s = time.perf_counter() - start
        samples = find_samples(Path(tmp) / "data", "train")
        start = time.perf_counter()
        cache = build_cache(samples, Path(tmp) / "cache", opts.image_size, progress=False)
        cache_s = time.perf_counter() - start
        ours_augmentation = build_train_augmentation(seed=0)
        reference_augmentation = build_train_augmentation(seed=0)
        dataset = GeoposeDataset(cache, range(len(cache)), ours_augmentation)

        def ours() -> None:
            for position in range(len(dataset)):
                dataset[position]

        def reference() -> None:
            for sample in samples:
                reference_sample(sample, opts.image_size, reference_augmentation)

        ref, mine = common.time_interleaved(reference, ours, repeats=opts.repeats)
    n = len(samples)
    speedup, low, high = common.ratio_spread(ref, mine)
    our_rate, ref_rate = n / mine.median, n / ref.median
    per_core_goal = GPU_IMAGES_PER_S / CORES_PER_GPU
    cores_needed = GPU_IMAGES_PER_S / our_rate
    details = {
        "images": n,
        "source_size": opts.size,
        "image_size": opts.image_size,
        "threads": 1,
        "reference_samples_per_s": ref_rate,
        "ours_samples_per_s": our_rate,
        "reference_s_per_sample": ref.summary(per=n),
        "ours_s_per_sample": mine.summary(per=n),
        "ratio_range": [low, high],
        "cache_build_s": cache_s,
        "synth_s": synth_s,
        "epochs_to_repay_cache": cache_s / max(ref.median - mine.median, 1e-9),
    }
    figures = [
        common.figure(
            "data_feed_speedup", speedup, "x", f">= {SPEEDUP_GOAL:g}x samples/s vs decoding every epoch",
            speedup >= SPEEDUP_GOAL, **details,
        ),
        common.figure(
            "data_feed_samples_per_s_per_core", our_rate, "samples/s/core",
            f">= {per_core_goal:g} at 1024² (feeds {GPU_IMAGES_PER_S:g} images/s with {CORES_PER_GPU} cores per GPU)",
            opts.image_size >= 1024 and our_rate >= per_core_goal,
            cores_to_feed_60_images_per_s=cores_needed,
            reference_cores_to_feed_60_images_per_s=GPU_IMAGES_PER_S / ref_rate, **details,
        ),
    ]  # fmt: skip
    common.write_results(figures, opts.results)
    common.print_figures(figures)
    print(
        f"{our_rate:.2f} samples/s per core: {cores_needed:.1f} cores feed a {GPU_IMAGES_PER_S:g} images/s GPU step "
        f"(the reference needs {GPU_IMAGES_PER_S / ref_rate:.0f}); one-time cache build {cache_s:.1f} s "
        f"= {details['epochs_to_repay_cache']:.2f} reference epochs",
        flush=True,
    )
    return figures


if __name__ == "__main__":
    run(sys.argv[1:])
