"""A re-implementation of the public baseline's model and training loop, for bench_recipes.py to train beside ours.

From pubgeo/monocular-geocentric-pose (``utilities/unet_vflow.py``, ``utilities/ml_utils.py``,
``main.py``), written anew over this project's cache and metric:

- **Model** (``UnetVFLOW``): an smp U-Net encoder and decoder (decoder channels 256-128-64-32-16, batch
  norm); height and magnitude each from a 3x3 convolution over the decoder output; the direction from
  the deepest encoder feature (average pool, flatten, dropout 0.5, linear to 2, not normalised); the
  scale as the least-squares slope of magnitude on height (``ScaleHead``: ``h.m / (h.h + 0.01)``). No
  image metadata.
- **Loss**: NaN-masked MSE on height (m) and magnitude (px), MSE on the (sin, cos) direction and on the
  scale (px/m), weighted 1, 2, 10, 10 (``main.py`` defaults).
- **Training**: fp32, ``torch.optim.Adam`` at a constant 1e-4, no augmentation, a shuffled loader,
  ``zero_grad``/``backward``/``step`` per batch; no clipping, warm-up or schedule.

The baseline normalises images with smp's ImageNet preprocessing (``get_preprocessing_fn``), which the
wrapper here applies to this project's [0, 1] images. Validation goes through this project's
``predict_validation`` and metric, so both sides are scored by the same code on the same images.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base import initialization as init
from torch import nn
from torch.utils.data import DataLoader

from geopose_mlops.constants import AGL, IMAGE, MAG, SCALE, XYDIR
from geopose_mlops.models.factory import IMAGENET_MEAN, IMAGENET_STD

BASELINE_LR = 1e-4  # main.py --learning-rate
BASELINE_WEIGHTS = {"agl": 1.0, "mag": 2.0, "angle": 10.0, "scale": 10.0}  # main.py --agl-weight ...
SCALE_DENOMINATOR_EPS = 0.01  # unet_vflow.py ScaleHead


class UnetVflow(nn.Module):
    """``UnetVFLOW``: smp U-Net encoder/decoder with the baseline's four heads.

    ``forward(image, gsd, city)`` takes this project's batch (image float (B, 3, H, W) in [0, 1]; gsd and
    city are ignored, as the baseline has no metadata) and returns this project's output dict.

    Args:
        encoder: smp encoder name.
    """

    def __init__(self, encoder: str) -> None:
        super().__init__()
        unet = smp.Unet(encoder, encoder_weights=None, decoder_channels=(256, 128, 64, 32, 16), classes=1)
        self.encoder, self.decoder = unet.encoder, unet.decoder
        channels = self.encoder.out_channels[-1]
        self.xydir_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(p=0.5, inplace=True), nn.Linear(channels, 2)
        )
        self.height_head = nn.Conv2d(16, 1, 3, padding=1)
        self.mag_head = nn.Conv2d(16, 1, 3, padding=1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        init.initialize_decoder(self.decoder)
        for head in (self.xydir_head, self.height_head, self.mag_head):
            init.initialize_head(head)

    def forward(self, image: torch.Tensor, gsd: torch.Tensor, city: torch.Tensor) -> dict[str, torch.Tensor]:
        """Heights (B, H, W) m, magnitudes (B, H, W) px, direction (B, 2), scale (B,) px/m."""
        features = self.encoder((image - self.mean) / self.std)
        decoded = self.decoder(features)
        height = self.height_head(decoded)[:, 0]
        mag = self.mag_head(decoded)[:, 0]
        h, m = height.flatten(1), mag.flatten(1)
        scale = (h * m).sum(1) / ((h * h).sum(1) + SCALE_DENOMINATOR_EPS)
        return {AGL: height, MAG: mag, XYDIR: self.xydir_head(features[-1]), SCALE: scale}


def no_nan_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``NoNaNMSE``: the mean squared difference over the pixels whose difference is not NaN."""
    diff = pred - target
    return torch.mean(diff[~torch.isnan(diff)] ** 2)


def baseline_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The baseline's weighted sum of height, magnitude, direction and scale terms."""
    terms = {
        "agl": no_nan_mse(outputs[AGL], batch[AGL]),
        "mag": no_nan_mse(outputs[MAG], batch[MAG]),
        "angle": nn.functional.mse_loss(outputs[XYDIR], batch[XYDIR]),
        "scale": nn.functional.mse_loss(outputs[SCALE], batch[SCALE]),
    }
    return sum(BASELINE_WEIGHTS[key] * value for key, value in terms.items())


def train_baseline_epoch(model: UnetVflow, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    """One epoch of ``TrainEpoch.run``: per batch ``zero_grad``, forward in fp32, ``backward``, ``step``.

    Returns:
        The mean loss over the batches.
    """
    model.train()
    total, batches = 0.0, 0
    for batch in loader:
        optimizer.zero_grad()
        outputs = model(batch[IMAGE].float(), None, None)
        loss = baseline_loss(outputs, batch)
        loss.backward()
        optimizer.step()
        total, batches = total + float(loss), batches + 1
    return total / max(batches, 1)
