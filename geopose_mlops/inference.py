"""Prediction with a fitted ensemble, test-time augmentation, and the submission folder (SPEC §2).

``EnsemblePredictor`` holds every member's fold models: each member predicts the mean of its folds
(as the write-up did; its largest gain), members are combined with the weights of ``ensemble.json``,
heights are multiplied by the city factors, scale goes through the XGBoost model where one was kept,
and the angle is a weighted circular mean. TTA predicts each D4 view of the image, maps the height map
back and inverts the angle, then averages (heights: mean; angles: circular mean; scale: mean).

Speed: a batch is moved to the device once and every view, member and fold runs on it there, in
``torch.inference_mode`` under training's precision rules (``train.loop.make_precision``: bf16 autocast
on CUDA and on CPUs with bf16 instructions, fp16 on GPUs without bf16, else fp32) in channels_last
(``MEMORY_FORMAT``), with each batch norm folded into the convolution before it when the checkpoints
are loaded (``models.fold_norms``: 5-12% of a CPU forward pass at 512², the outputs equal within fp32
rounding). Only the per-image scale and angle numbers leave the device per view.
``predict_folder`` decodes the images in DataLoader worker processes ahead of the models and writes the
files from a small thread pool.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from geopose_mlops.constants import AGL, CHECKPOINT_DIR, CITIES, ENSEMBLE_JSON, SCALE, XYDIR
from geopose_mlops.data import io
from geopose_mlops.data.augment import invert_geometric, transform_array
from geopose_mlops.data.layout import Sample, find_samples, read_metadata, split_name
from geopose_mlops.data.pool import decode_threads, limit_decode_threads, usable_cores
from geopose_mlops.ensemble.fit import EnsembleSpec, apply_scale_model
from geopose_mlops.errors import ConfigError, DataError
from geopose_mlops.train.loop import make_precision

# Inference runs channels_last on every device. On CUDA that is training's rule (``loop.memory_format``);
# on the CPU training keeps NCHW for its backward pass, but the forward pass alone ran 1.4-2x faster in
# NHWC here (oneDNN; 1024² U-Nets over MobileNetV3-small-050 and ResNet18, in fp32 and in bf16).
MEMORY_FORMAT = torch.channels_last

# Images per forward pass by device type. On the CPU one: larger batches ran slower per image here (1024²,
# bf16, channels_last: 0.9 s an image alone, 1.06 in pairs, 1.4 in fours), as the activations outgrow the
# caches; a GPU needs several images to fill.
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 8}

TTA_VIEWS = {
    "none": ("identity",),
    "flip": ("identity", "hflip"),
    "d4": ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse"),
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``--device``: ``auto`` (CUDA where available, else the CPU), ``cpu``, ``cuda[:N]``.

    Raises:
        ConfigError: An unknown device, or CUDA asked for where there is none (or not that many GPUs).
    """
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise ConfigError(f"--device {device!r}: this machine has {count} CUDA device(s); use cpu or auto")
    return resolved


class EnsemblePredictor:
    """A fitted ensemble, loaded from a folder with ``ensemble.json`` and ``checkpoints/<member>/<fold>.pt``.

    Args:
        folder: The packaged ensemble (what ``promote`` logs as the pyfunc model's artifact).
        device: Where to run the models: ``auto`` (CUDA where available), ``cpu``, ``cuda[:N]``.
        amp: Mixed precision as in training (``train.loop.make_precision``); False runs fp32.
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "auto", amp: bool = True) -> None:
        from geopose_mlops.train.checkpoint import model_from_checkpoint

        folder = Path(folder)
        self.spec = EnsembleSpec.load(folder / ENSEMBLE_JSON)
        self.device = resolve_device(device)
        self.members: list[list[torch.nn.Module]] = []
        for member in self.spec.members:
            paths = sorted((folder / CHECKPOINT_DIR / member).glob("*.pt"))
            if not paths:
                raise DataError(folder / CHECKPOINT_DIR / member, "no fold checkpoints for this member")
            self.members.append([_folded(model_from_checkpoint(p, self.device)[0]) for p in paths])
        self.to(self.device, amp)
        self.scale_model = None
        if self.spec.scale_model:
            from xgboost import XGBRegressor

            self.scale_model = XGBRegressor()
            self.scale_model.load_model(str(folder / self.spec.scale_model))

    def to(self, device: str | torch.device = "auto", amp: bool = True) -> EnsemblePredictor:
        """Move every fold model to ``device`` (its memory format) and set the precision; returns self."""
        self.device = resolve_device(device)
        self.precision = make_precision(self.device, amp)
        for folds in self.members:
            for model in folds:
                model.to(self.device, memory_format=MEMORY_FORMAT)
        return self

    def _members_predict(self, view: torch.Tensor, gsd: torch.Tensor, city: torch.Tensor) -> tuple:
        """Weighted member heights (B, H, W) on the device; per member scales and angles (K, B) float64 here.

        Each member is the mean of its folds: heights and scales averaged, the angle from the mean direction.
        """
        height = torch.zeros(view.shape[0], *view.shape[-2:], device=self.device)
        scales, angles = [], []
        for weight, folds in zip(self.spec.height_weights, self.members, strict=True):
            heights, scale, direction = 0.0, 0.0, 0.0
            for model in folds:
                with self.precision.autocast():
                    out = model(view, gsd, city)
                heights = heights + out[AGL].float()
                scale = scale + out[SCALE].float()
                direction = direction + out[XYDIR].float()
            height += (weight / len(folds)) * heights
            scales.append(scale / len(folds))
            angles.append(torch.atan2(direction[:, 0], direction[:, 1]))
        return height, torch.stack(scales).double().cpu().numpy(), torch.stack(angles).double().cpu().numpy()

    def _combine(self, height: torch.Tensor, scales: np.ndarray, angles: np.ndarray, gsd: np.ndarray, cities):
        """One view's ensemble: heights clipped at 0 m times the city factors, scale (px/m) and angle (rad)."""
        factors = [self.spec.city_height_factors.get(c, 1.0) for c in cities]
        height = height.clamp_min(0) * torch.tensor(factors, device=self.device)[:, None, None]
        # A member's scale is a least-squares slope (models/heads.py) and can come out negative: a scale
        # is >= 0 px/m, and the fit clips it the same way (``ensemble.fit.ensemble_scale``).
        scale = np.clip(np.asarray(self.spec.scale_weights) @ scales, 0, None)
        if self.scale_model is not None:
            scale = apply_scale_model(self.scale_model, gsd, scale, cities)
        u = np.asarray(self.spec.angle_weights)
        return height, scale, np.arctan2(u @ np.sin(angles), u @ np.cos(angles))

    def predict(self, rgb: np.ndarray, gsd: np.ndarray, cities: list[str], tta: str = "none") -> dict:
        """Predict a batch at the ensemble's training resolution.

        Args:
            rgb: uint8 (B, S, S, 3) images, S a multiple of 32 (usually ``spec.image_size``).
            gsd: (B,) m/px at that resolution (NaN where unknown).
            cities: City per image.
            tta: ``none``, ``flip`` or ``d4``.

        Returns:
            ``{"agl": (B, S, S) float32 m, "scale": (B,) px/m at this resolution, "angle": (B,) rad}``.
        """
        if tta not in TTA_VIEWS:
            raise ConfigError(f"--tta must be one of {sorted(TTA_VIEWS)}, got {tta!r}")
        unknown = sorted(set(cities) - set(CITIES))
        if unknown:
            raise ConfigError(f"unknown city {unknown}; expected one of {CITIES}")
        gsd = np.asarray(gsd, dtype=np.float64).reshape(-1)
        with torch.inference_mode():
            # uint8 crosses to the device (a quarter of the float bytes); NHWC is already channels_last.
            image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(0, 3, 1, 2)
            image = image.float().div_(255)
            gsd_t = torch.as_tensor(gsd, dtype=torch.float32, device=self.device)
            city_t = torch.tensor([CITIES.index(c) for c in cities], device=self.device)
            height_sum = torch.zeros(image.shape[0], *image.shape[-2:], device=self.device)
            scale_sum, sines, cosines = 0.0, 0.0, 0.0
            for kind in TTA_VIEWS[tta]:
                view = transform_array(kind, image, axes=(-2, -1)).contiguous(memory_format=MEMORY_FORMAT)
                height, scale, angle = self._combine(*self._members_predict(view, gsd_t, city_t), gsd, cities)
                height, angle = invert_geometric(kind, height, angle)
                height_sum += height
                scale_sum, sines, cosines = scale_sum + scale, sines + np.sin(angle), cosines + np.cos(angle)
            views = len(TTA_VIEWS[tta])
            agl = (height_sum / views).cpu().numpy()
        return {"agl": agl, "scale": scale_sum / views, "angle": np.arctan2(sines, cosines)}


def _folded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its batch norms folded into their convolutions (``models.fold_norms``), on its device.

    The pairs are found, and the folded copy checked against the original, on one small random image.
    """
    from geopose_mlops.models.fold_norms import fold_batch_norms

    stride = model.output_stride
    side = -(-max(64, model.min_input_size) // stride) * stride
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, side, side, generator=generator).to(device)
    gsd, city = torch.tensor([0.5], device=device), torch.tensor([0], device=device)
    return fold_batch_norms(model, lambda m: m(image, gsd, city))[0]


def find_images(images_dir: str | Path) -> list[Sample]:
    """The RGB images of a folder: ``DATA/test`` (with DATA's CSVs and metadata) or any flat folder."""
    images_dir = Path(images_dir)
    if images_dir.name in ("test", "train") and images_dir.parent.is_dir():
        try:
            return find_samples(images_dir.parent, images_dir.name)
        except DataError:
            pass
    metadata = read_metadata(images_dir.parent)
    samples = []
    for path in sorted(images_dir.glob("*_RGB.*")):
        try:
            sample_id, city, _ = split_name(path.name)
        except ValueError:
            continue
        samples.append(Sample(sample_id, city, path, gsd=metadata.get(sample_id, (city, math.nan))[1]))
    if not samples:
        raise DataError(images_dir, "no {CITY}_{id}_RGB.j2k/.tif images found")
    return samples


class _DecodedImages(Dataset):
    """Each image decoded straight to ``size``² (in a DataLoader worker); a bad file comes back as its error."""

    def __init__(self, samples: list[Sample], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> dict:
        path = self.samples[position].rgb_path
        try:
            height, width, _, _ = io.raster_info(path)
            if height != width:
                raise DataError(path, f"expected a square image, got {height}x{width}")
            return {"position": position, "rgb": io.read_rgb(path, size=self.size), "side": height}
        except DataError as err:  # raised by the caller: a worker's exception would lose its type
            return {"position": position, "error": (err.path, err.reason)}


def _as_list(items: list[dict]) -> list[dict]:
    return items


def _start_decoder(threads: int, worker_id: int) -> None:
    limit_decode_threads(threads)  # each DataLoader worker its share of the cores (``data.pool``)


class _SubmissionWriter:
    """Writes each image's two files from a small thread pool, at most ``2 x threads`` images queued.

    Each file goes to a temporary name and is renamed (``io``). After the first failed write no
    queued image starts; ``abort`` (on any error or Ctrl-C in the caller) drops the queue and waits for
    the writes under way, so every file left under its final name is complete.
    """

    def __init__(self, out_dir: Path, threads: int) -> None:
        self.out_dir, self.limit = out_dir, 2 * threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="geopose-write")
        self.queued: deque[tuple[str, Future]] = deque()
        self.failed = threading.Event()
        self.done: list[str] = []

    def submit(self, sample_id: str, agl: np.ndarray, side: int, scale: float, angle: float) -> None:
        """Queue an image: ``agl`` (S, S) m at the predicted side, upsampled to ``side`` px when written."""
        while len(self.queued) >= self.limit:
            self._collect_oldest()
        self.queued.append((sample_id, self.pool.submit(self._write, sample_id, agl, side, scale, angle)))

    def _collect_oldest(self) -> None:
        sample_id, future = self.queued.popleft()
        if future.result():  # re-raises the write's error here, in the caller's thread
            self.done.append(sample_id)

    def finish(self) -> list[str]:
        """Wait for every queued image; returns the ids written, in order."""
        while self.queued:
            self._collect_oldest()
        self.pool.shutdown()
        return self.done

    def abort(self) -> None:
        """Start nothing more and wait for the writes under way."""
        self.failed.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _write(self, sample_id: str, agl: np.ndarray, side: int, scale: float, angle: float) -> bool:
        if self.failed.is_set():
            return False
        try:
            if agl.shape[-1] != side:
                upsampled = F.interpolate(torch.from_numpy(agl)[None, None], (side, side), mode="bilinear")
                agl = upsampled[0, 0].numpy()  # align_corners=False: pixel centres, as cv2.resize
            io.write_agl(self.out_dir / f"{sample_id}_AGL.tif", np.clip(agl, 0, None))
            io.write_vflow(self.out_dir / f"{sample_id}_VFLOW.json", scale, angle)
        except BaseException:
            self.failed.set()
            raise
        return True


def predict_folder(
    predictor,
    images_dir: str | Path,
    out_dir: str | Path,
    tta: str = "none",
    progress: bool = True,
    image_size: int | None = None,
    say: Callable[[str], None] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    writers: int = 2,
) -> list[str]:
    """Write the submission folder: ``{id}_AGL.tif`` (uint16 cm) and ``{id}_VFLOW.json`` per image.

    Images are decoded by DataLoader processes ahead of the models, predicted a batch at a time, and
    written by a few threads. Each file is written to a temporary name and renamed, so a killed run
    leaves no file that looks complete; images whose two files exist are skipped on a re-run. Each
    image is predicted at ``image_size``, then its height map is upsampled to the source size and its
    scale converted to source pixels per metre.

    Args:
        predictor: Has ``spec.image_size`` and ``predict(rgb, gsd, cities, tta)`` (an EnsemblePredictor,
            or the pyfunc model's wrapper).
        images_dir: The RGB images (``find_images``).
        out_dir: The submission folder (created).
        tta: ``none``, ``flip`` or ``d4``.
        progress: Show a progress bar.
        image_size: Side to predict at, px, a multiple of 32 (None: the members' training side).
        say: Told how many images were skipped (e.g. ``click.echo``).
        batch_size: Images per call of ``predictor.predict`` (None: ``DEFAULT_BATCH_SIZE`` of its device).
        workers: Decoding processes (None: the usable cores; 0: decode in this process).
        writers: Threads that upsample and write the files.

    Returns:
        The ids predicted in this call, in order.

    Raises:
        DataError: An image is unreadable or not square (the images before it are written).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = image_size or predictor.spec.image_size
    if size <= 0 or size % 32:
        raise ConfigError(f"--image-size must be a positive multiple of 32, got {size}")
    batch_size = batch_size or DEFAULT_BATCH_SIZE[getattr(predictor, "device", torch.device("cpu")).type]
    if batch_size < 1 or writers < 1:
        raise ConfigError(f"--batch-size and writers must be >= 1, got {batch_size} and {writers}")
    todo = _images_to_predict(images_dir, out_dir, say)
    if not todo:
        return []
    workers = min(usable_cores() if workers is None else workers, len(todo))
    loader = DataLoader(
        _DecodedImages(todo, size), batch_size=batch_size, num_workers=workers, collate_fn=_as_list,
        worker_init_fn=functools.partial(_start_decoder, decode_threads(workers)),
    )  # fmt: skip
    batches = iter(loader)  # forks the decoders now, before this call starts any thread of its own
    writer = _SubmissionWriter(out_dir, writers)
    # io silences rasterio's "no geotransform" warning inside warnings.catch_warnings, which is not
    # thread-safe: one writer's exit can restore the filters under another. Set for the whole call, this
    # filter is in every list any of them restores.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Dataset has no geotransform")
        try:
            with tqdm(total=len(todo), desc="predict", disable=not progress, unit="image") as bar:
                for items in batches:
                    _predict_batch(predictor, [todo[item["position"]] for item in items], items, size, tta, writer)
                    bar.update(len(items))
            return writer.finish()
        except BaseException:
            writer.abort()
            raise


def _images_to_predict(images_dir: str | Path, out_dir: Path, say: Callable[[str], None] | None) -> list[Sample]:
    """The images of ``images_dir`` that lack either file in ``out_dir``; ``say`` is told how many were skipped."""
    todo, skipped = [], 0
    for sample in find_images(images_dir):
        if all((out_dir / f"{sample.sample_id}_{tag}").is_file() for tag in ("AGL.tif", "VFLOW.json")):
            skipped += 1
        else:
            todo.append(sample)
    if skipped and say is not None:
        say(f"skipped {skipped} image(s) whose _AGL.tif and _VFLOW.json already exist in {out_dir}")
    return todo


def _predict_batch(predictor, samples: list[Sample], items: list[dict], size: int, tta: str, writer) -> None:
    for item in items:
        if "error" in item:
            raise DataError(*item["error"])
    factors = [item["side"] / size for item in items]  # source px per predicted px
    gsd = np.array([s.gsd * f if math.isfinite(s.gsd) else math.nan for s, f in zip(samples, factors, strict=True)])
    out = predictor.predict(np.stack([item["rgb"] for item in items]), gsd, [s.city for s in samples], tta)
    for j, (sample, item) in enumerate(zip(samples, items, strict=True)):
        agl = np.asarray(out["agl"][j], dtype=np.float32)
        # scale is px/m at the predicted side: a source pixel is 1/factor of a predicted pixel
        writer.submit(sample.sample_id, agl, item["side"], float(out["scale"][j]) * factors[j], float(out["angle"][j]))
