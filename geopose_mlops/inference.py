"""Prediction with a fitted ensemble, test-time augmentation, and the submission folder (SPEC §2).

``EnsemblePredictor`` holds every member's fold models: each member predicts the mean of its folds
(as the write-up did; its largest gain), members are combined with the weights of ``ensemble.json``,
heights are multiplied by the city factors, scale goes through the XGBoost model where one was kept,
and the angle is a weighted circular mean. TTA predicts each D4 view of the image, maps the height map
back and inverts the angle, then averages (heights: mean; angles: circular mean; scale: mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from geopose_mlops.constants import AGL, CHECKPOINT_DIR, CITIES, ENSEMBLE_JSON, SCALE, XYDIR
from geopose_mlops.data import io
from geopose_mlops.data.augment import invert_geometric, transform_array
from geopose_mlops.data.layout import Sample, find_samples, read_metadata, split_name
from geopose_mlops.ensemble.fit import EnsembleSpec, apply_scale_model
from geopose_mlops.errors import ConfigError, DataError

TTA_VIEWS = {
    "none": ("identity",),
    "flip": ("identity", "hflip"),
    "d4": ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse"),
}


class EnsemblePredictor:
    """A fitted ensemble, loaded from a folder with ``ensemble.json`` and ``checkpoints/<member>/<fold>.pt``.

    Args:
        folder: The packaged ensemble (what ``promote`` logs as the pyfunc model's artifact).
        device: Where to run the models.
    """

    def __init__(self, folder: str | Path, device: str = "cpu") -> None:
        from geopose_mlops.train.checkpoint import model_from_checkpoint

        folder = Path(folder)
        self.spec = EnsembleSpec.load(folder / ENSEMBLE_JSON)
        self.device = torch.device(device)
        self.members: list[list[torch.nn.Module]] = []
        for member in self.spec.members:
            paths = sorted((folder / CHECKPOINT_DIR / member).glob("*.pt"))
            if not paths:
                raise DataError(folder / CHECKPOINT_DIR / member, "no fold checkpoints for this member")
            self.members.append([model_from_checkpoint(p, self.device)[0] for p in paths])
        self.scale_model = None
        if self.spec.scale_model:
            from xgboost import XGBRegressor

            self.scale_model = XGBRegressor()
            self.scale_model.load_model(str(folder / self.spec.scale_model))

    @torch.no_grad()
    def _members_predict(self, image: torch.Tensor, gsd: torch.Tensor, city: torch.Tensor) -> tuple:
        """Per member, the mean over its folds: heights (K, B, H, W), scales (K, B), angles (K, B)."""
        heights, scales, angles = [], [], []
        for folds in self.members:
            outputs = [model(image, gsd, city) for model in folds]
            heights.append(torch.stack([o[AGL] for o in outputs]).mean(0))
            scales.append(torch.stack([o[SCALE] for o in outputs]).mean(0))
            direction = torch.stack([o[XYDIR] for o in outputs]).mean(0)
            angles.append(torch.atan2(direction[:, 0], direction[:, 1]))
        return torch.stack(heights), torch.stack(scales), torch.stack(angles)

    def _combine(self, heights, scales, angles, gsd: np.ndarray, cities: list[str]) -> tuple:
        w = torch.tensor(self.spec.height_weights, dtype=heights.dtype)
        v = torch.tensor(self.spec.scale_weights, dtype=scales.dtype)
        u = torch.tensor(self.spec.angle_weights, dtype=angles.dtype)
        height = torch.einsum("k,kbhw->bhw", w, heights).clamp_min(0).numpy()
        factors = np.array([self.spec.city_height_factors.get(c, 1.0) for c in cities], dtype=np.float32)
        height = height * factors[:, None, None]
        # A member's scale is a least-squares slope (models/heads.py) and can come out negative: a scale
        # is >= 0 px/m, and the fit clips it the same way (``ensemble.fit.ensemble_scale``).
        scale = np.clip((v @ scales).numpy().astype(np.float64), 0, None)
        if self.scale_model is not None:
            scale = apply_scale_model(self.scale_model, gsd, scale, cities)
        angle = torch.atan2(u @ torch.sin(angles), u @ torch.cos(angles)).numpy()
        return height, scale, angle

    def predict(self, rgb: np.ndarray, gsd: np.ndarray, cities: list[str], tta: str = "none") -> dict:
        """Predict a batch at the ensemble's training resolution.

        Args:
            rgb: uint8 (B, S, S, 3) images, S a multiple of 32 (usually ``spec.image_size``).
            gsd: (B,) m/px at that resolution (NaN where unknown).
            cities: City per image.
            tta: ``none``, ``flip`` or ``d4``.

        Returns:
            ``{"agl": (B, S, S) m, "scale": (B,) px/m at this resolution, "angle": (B,) rad}``.
        """
        if tta not in TTA_VIEWS:
            raise ConfigError(f"--tta must be one of {sorted(TTA_VIEWS)}, got {tta!r}")
        unknown = sorted(set(cities) - set(CITIES))
        if unknown:
            raise ConfigError(f"unknown city {unknown}; expected one of {CITIES}")
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float().div(255).to(self.device)
        gsd_t = torch.as_tensor(np.asarray(gsd, dtype=np.float32), device=self.device)
        city_t = torch.tensor([CITIES.index(c) for c in cities], device=self.device)
        heights, scales, sines, cosines = [], [], 0.0, 0.0
        for kind in TTA_VIEWS[tta]:
            view = transform_array(kind, image, axes=(-2, -1)).contiguous()
            height, scale, angle = self._combine(*self._members_predict(view, gsd_t, city_t), np.asarray(gsd), cities)
            height, angle = invert_geometric(kind, height, angle)
            heights.append(np.ascontiguousarray(height))
            scales.append(scale)
            sines, cosines = sines + np.sin(angle), cosines + np.cos(angle)
        return {"agl": np.mean(heights, axis=0), "scale": np.mean(scales, axis=0), "angle": np.arctan2(sines, cosines)}


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


def predict_folder(
    predictor,
    images_dir: str | Path,
    out_dir: str | Path,
    tta: str = "none",
    progress: bool = True,
    image_size: int | None = None,
    say: Callable[[str], None] | None = None,
) -> list[str]:
    """Write the submission folder: ``{id}_AGL.tif`` (uint16 cm) and ``{id}_VFLOW.json`` per image.

    ``predictor`` has ``spec.image_size`` and ``predict(rgb, gsd, cities, tta)`` (an EnsemblePredictor,
    or the pyfunc model's wrapper). Each file is written to a temporary name and renamed, so a killed
    run leaves no file that looks complete; images whose two files exist are skipped on a re-run.
    Each image is predicted at ``image_size`` (default: the members' training side), then its height
    map is upsampled to the source size and its scale converted to source pixels per metre. ``say``
    (e.g. ``click.echo``) is told how many images were skipped.

    Returns:
        The ids predicted in this call.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = image_size or predictor.spec.image_size
    if size <= 0 or size % 32:
        raise ConfigError(f"--image-size must be a positive multiple of 32, got {size}")
    done, skipped = [], []
    for sample in tqdm(find_images(images_dir), desc="predict", disable=not progress, unit="image"):
        agl_path, vflow_path = out_dir / f"{sample.sample_id}_AGL.tif", out_dir / f"{sample.sample_id}_VFLOW.json"
        if agl_path.is_file() and vflow_path.is_file():
            skipped.append(sample.sample_id)
            continue
        height, width, _, _ = io.raster_info(sample.rgb_path)
        if height != width:
            raise DataError(sample.rgb_path, f"expected a square image, got {height}x{width}")
        rgb = io.read_rgb(sample.rgb_path, size=size)
        factor = height / size  # source px per training px
        gsd = sample.gsd * factor if math.isfinite(sample.gsd) else math.nan
        out = predictor.predict(rgb[None], np.array([gsd]), [sample.city], tta)
        agl = torch.from_numpy(np.asarray(out["agl"], dtype=np.float32))[None]
        agl = F.interpolate(agl, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
        io.write_agl(agl_path, np.clip(agl, 0, None))
        # scale is px/m at the training resolution: a source pixel is 1/factor of a training pixel
        io.write_vflow(vflow_path, float(out["scale"][0]) * factor, float(out["angle"][0]))
        done.append(sample.sample_id)
    if skipped and say is not None:
        say(f"skipped {len(skipped)} image(s) whose _AGL.tif and _VFLOW.json already exist in {out_dir}")
    return done
