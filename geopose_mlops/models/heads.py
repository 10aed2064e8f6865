"""The geopose heads beside an smp decoder.

- ``PixelHead``: two channels per pixel from the decoder, height above ground (m) and flow magnitude
  (px). Linear outputs, as the public baseline has them: about half of all pixels are ground at exactly
  0 m, which ``softplus`` only reaches at minus infinity and which ``ReLU`` reaches by cutting the
  gradient of every pixel that undershoots. Negative heights are clipped when predictions are written.
  Each channel is multiplied by its *unit* (a buffer, stored with the weights): training sets them to
  the spread of the training heights and magnitudes (``output_units_from``), so the convolution predicts
  numbers of order 1. Without units a height of tens of metres needs head weights that Adam, moving each
  weight by about the learning rate per step, takes hundreds of steps to grow; with them the same
  U-Net reached a training R² of 0.67 instead of 0.23 in 120 steps at lr 1e-4 (synthetic data, issue 15).
- ``DirectionHead``: the flow direction (sin, cos) from the deepest encoder feature, shaped like smp's
  auxiliary classification head (pool -> flatten -> linear), with an MLP and optional image metadata
  (gsd and the city one-hot), normalised to a unit vector.
- ``fit_scale``: the image's scale (px/m) as the least-squares slope of magnitude on height, as the
  public baseline's ``ScaleHead`` computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geopose_mlops.constants import CITIES

# Below this sum of squared heights (m²) an image counts as flat and its fitted scale is 0 px/m.
FLAT_HEIGHT_SQ_SUM = 1e-6


class PixelHead(nn.Module):
    """Height (m) and magnitude (px) per pixel from the decoder output.

    Wraps smp's segmentation head built with two classes, which already upsamples each decoder's output
    to the input resolution.

    Args:
        segmentation_head: smp ``SegmentationHead`` with 2 output channels.
    """

    def __init__(self, segmentation_head: nn.Module) -> None:
        super().__init__()
        self.head = segmentation_head
        # (height m, magnitude px) per unit of the raw outputs; 1 until set_units (and in checkpoints
        # written before units existed, see _load_from_state_dict).
        self.register_buffer("unit", torch.ones(2))

    def set_units(self, height_m: float, magnitude_px: float) -> None:
        """Scale the outputs: height = raw x ``height_m``, magnitude = raw x ``magnitude_px`` (both > 0)."""
        for name, value in (("height", height_m), ("magnitude", magnitude_px)):
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"{name} unit {value!r}: expected a finite number > 0")
        self.unit.copy_(torch.tensor([height_m, magnitude_px], dtype=self.unit.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        # A checkpoint from before output units has none: its weights were trained with units of 1.
        state_dict.setdefault(prefix + "unit", torch.ones_like(self.unit))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, decoder_output: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return height (B, H, W) in m and magnitude (B, H, W) in px at ``size`` = (H, W)."""
        out = self.head(decoder_output)
        if out.shape[-2:] != size:
            # Decoders whose final upsampling does not land on the input size (odd strides, a custom
            # ``upsampling``) are brought back to the image grid.
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        unit = self.unit.to(out.dtype)
        return out[:, 0] * unit[0], out[:, 1] * unit[1]


class DirectionHead(nn.Module):
    """Unit flow direction (sin, cos) from the deepest encoder feature map.

    Args:
        in_channels: Channels of the deepest encoder feature.
        use_metadata: Concatenate gsd (m/px; NaN -> 0 plus a "missing" flag) and the city one-hot to the
            pooled feature before the MLP.
        hidden: Width of the hidden layer.
        dropout: Dropout probability on the pooled feature.
    """

    def __init__(self, in_channels: int, use_metadata: bool, hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        self.use_metadata = use_metadata
        self.n_meta = 2 + len(CITIES) if use_metadata else 0
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(p=dropout)
        self.mlp = nn.Sequential(
            nn.Linear(in_channels + self.n_meta, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 2),
        )

    def metadata(self, gsd: torch.Tensor, city: torch.Tensor) -> torch.Tensor:
        """Metadata features (B, 2 + len(CITIES)): gsd (m/px, 0 where unknown), missing flag, city one-hot."""
        gsd = gsd.float().reshape(-1)
        missing = torch.isnan(gsd)
        gsd_filled = torch.where(missing, torch.zeros_like(gsd), gsd)
        one_hot = F.one_hot(city.long().reshape(-1), num_classes=len(CITIES)).to(gsd.dtype)
        return torch.cat([gsd_filled[:, None], missing[:, None].to(gsd.dtype), one_hot], dim=1)

    def forward(self, feature: torch.Tensor, gsd: torch.Tensor, city: torch.Tensor) -> torch.Tensor:
        """Return the direction (B, 2) as unit (sin(angle), cos(angle))."""
        pooled = self.dropout(self.pool(feature).flatten(1))
        if self.use_metadata:
            pooled = torch.cat([pooled, self.metadata(gsd, city).to(pooled.dtype)], dim=1)
        return F.normalize(self.mlp(pooled).float(), dim=1, eps=1e-6)


def fit_scale(mag: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of magnitude on height per image: ``sum(h*m) / sum(h*h)``.

    Summed in float32 even under autocast (a 1024² sum in bf16 loses the slope). Differentiable; an image
    whose predicted heights are all (near) zero gets scale 0 with finite gradients instead of 0/0.

    Args:
        mag: Magnitude (B, H, W) in px.
        height: Height (B, H, W) in m.

    Returns:
        Scale (B,) in px/m.
    """
    h = height.float()
    m = mag.float()
    num = (h * m).sum(dim=(-2, -1))
    den = (h * h).sum(dim=(-2, -1))
    flat = den < FLAT_HEIGHT_SQ_SUM
    return torch.where(flat, torch.zeros_like(num), num / den.clamp_min(FLAT_HEIGHT_SQ_SUM))
