"""Model factory: any segmentation-models-pytorch decoder over any smp encoder, with the geopose heads.

``build_model(ModelConfig)`` returns a ``GeoposeModel``: ImageNet normalisation, the smp encoder and
decoder, a two-channel per-pixel head (height m, magnitude px), a direction head on the deepest encoder
feature and the least-squares scale fit (``heads.py``).

Encoder weights are ``none``, a name smp knows for that encoder (``imagenet``, ``ssl``, ``swsl``, ...;
``imagenet`` for ``tu-`` encoders means timm's pretrained tag) or a path to a local file holding either
the encoder's state dict or a checkpoint dict with a ``state_dict``/``model`` entry.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from geopose_mlops.config import ModelConfig
from geopose_mlops.constants import AGL, MAG, SCALE, XYDIR
from geopose_mlops.errors import ConfigError
from geopose_mlops.models.heads import DirectionHead, PixelHead, fit_scale

# Every smp 0.6 architecture that takes an encoder, by lower-case name.
DECODERS: dict[str, type[nn.Module]] = {
    cls.__name__.lower(): cls
    for cls in (
        smp.Unet,
        smp.UnetPlusPlus,
        smp.FPN,
        smp.DeepLabV3,
        smp.DeepLabV3Plus,
        smp.Linknet,
        smp.PSPNet,
        smp.PAN,
        smp.MAnet,
        smp.UPerNet,
        smp.Segformer,
        smp.DPT,
    )
}

# Decoder-specific construction arguments. DPT only takes timm ViT encoders ("tu-vit_...") and would
# otherwise be fixed to the ViT's pretraining image size.
DECODER_KWARGS: dict[str, dict[str, Any]] = {"dpt": {"dynamic_img_size": True}}
# Smallest input side (px) a decoder takes: PAN's feature pyramid attention halves the stride-16 map
# three times, so it needs at least 8 px there.
DECODER_MIN_SIZE: dict[str, int] = {"pan": 128}

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# Key prefixes a saved encoder state dict may carry: DDP's "module.", a whole model's "encoder.".
ENCODER_KEY_PREFIXES = ("", "module.", "encoder.", "module.encoder.", "model.encoder.", "net.encoder.")


class GeoposeModel(nn.Module):
    """Encoder, decoder and the geopose heads.

    ``forward(image, gsd, city)`` takes image float32 (B, 3, H, W) in [0, 1] (H, W multiples of the
    encoder's output stride, 32 for most; PAN needs at least 128 px), gsd (B,) m/px (NaN = unknown) and
    city (B,) int64 index into CITIES; it returns ``{AGL: (B, H, W) m, MAG: (B, H, W) px, XYDIR: (B, 2) unit (sin, cos),
    SCALE: (B,) px/m}``.

    Args:
        config: What was built (kept so checkpoints can rebuild the model).
        encoder: smp encoder returning a list of feature maps.
        decoder: smp decoder over those features.
        segmentation_head: smp segmentation head with 2 channels.
        encoder_returns_prefix: The encoder returns ``(features, prefix_tokens)`` (DPT's ViT encoders).
    """

    def __init__(
        self,
        config: ModelConfig,
        encoder: nn.Module,
        decoder: nn.Module,
        segmentation_head: nn.Module,
        encoder_returns_prefix: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.pixel_head = PixelHead(segmentation_head)
        self.direction_head = DirectionHead(encoder.out_channels[-1], use_metadata=config.use_metadata)
        self.encoder_returns_prefix = encoder_returns_prefix
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def output_stride(self) -> int:
        """Input height and width must be multiples of this (px)."""
        return int(getattr(self.encoder, "output_stride", 32))

    @property
    def min_input_size(self) -> int:
        """Input height and width must be at least this (px; 0: any multiple of ``output_stride``)."""
        return DECODER_MIN_SIZE.get(self.config.decoder.lower(), 0)

    def forward(self, image: torch.Tensor, gsd: torch.Tensor, city: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict height, magnitude, direction and scale; see the class docstring for shapes and units."""
        size = (int(image.shape[-2]), int(image.shape[-1]))
        stride = self.output_stride
        if size[0] % stride or size[1] % stride:
            raise ValueError(f"image size {size} px: height and width must be multiples of {stride}")
        min_size = self.min_input_size
        if min(size) < min_size:
            raise ValueError(f"image size {size} px: decoder {self.config.decoder} needs at least {min_size} px")
        x = (image - self.mean) / self.std
        if self.encoder_returns_prefix:
            features, prefix_tokens = self.encoder(x)
            decoded = self.decoder(features, prefix_tokens)
        else:
            features = self.encoder(x)
            decoded = self.decoder(features)
        height, mag = self.pixel_head(decoded, size)
        xydir = self.direction_head(features[-1], gsd, city)
        return {AGL: height, MAG: mag, XYDIR: xydir, SCALE: fit_scale(mag, height)}


def validate_model_config(config: ModelConfig) -> None:
    """Check the decoder, encoder and weights names without building anything (milliseconds).

    Commands call this before they create a tracked run, so a typo fails with nothing written.

    Raises:
        ConfigError: As ``build_model`` for an unknown decoder or encoder or unavailable weights.
    """
    _decoder_class(config.decoder)
    _check_encoder_name(config.encoder)
    _resolve_weights(config.encoder, config.encoder_weights)


def build_model(config: ModelConfig) -> GeoposeModel:
    """Build the model a ``ModelConfig`` describes.

    Raises:
        ConfigError: Unknown decoder or encoder (the valid names are listed), encoder weights the encoder
            does not have (its available ones are listed), an unreadable or mismatched weights file, or a
            decoder that cannot use this encoder (e.g. dilation for DeepLabV3/PAN).
    """
    decoder_cls = _decoder_class(config.decoder)
    _check_encoder_name(config.encoder)
    weights_name, weights_path = _resolve_weights(config.encoder, config.encoder_weights)
    kwargs = dict(DECODER_KWARGS.get(decoder_cls.__name__.lower(), {}))
    try:
        net = decoder_cls(
            encoder_name=config.encoder,
            encoder_weights=weights_name,
            in_channels=3,
            classes=2,
            activation=None,
            **kwargs,
        )
    except ConfigError:
        raise
    except (ValueError, KeyError, AttributeError, RuntimeError, OSError) as err:
        # Download failures (no network) and encoder/decoder incompatibilities both land here; smp's
        # message says which.
        raise ConfigError(
            f"cannot build decoder {decoder_cls.__name__} over encoder {config.encoder!r} "
            f"with weights {config.encoder_weights!r}: {err}"
        ) from err
    if weights_path is not None:
        load_encoder_weights(net.encoder, weights_path)
    return GeoposeModel(
        config,
        net.encoder,
        net.decoder,
        net.segmentation_head,
        encoder_returns_prefix=isinstance(net, smp.DPT),
    )


def _decoder_class(name: str) -> type[nn.Module]:
    try:
        return DECODERS[name.lower()]
    except KeyError:
        valid = ", ".join(cls.__name__ for cls in DECODERS.values())
        raise ConfigError(f"unknown decoder {name!r}; valid (case-insensitive): {valid}") from None


def _check_encoder_name(name: str) -> None:
    if name.startswith("tu-"):
        timm_name = name[3:]
        if timm.is_model(timm_name):
            return
        close = difflib.get_close_matches(timm_name.split(".")[0], timm.list_models(), n=5)
        hint = f"; close timm names: {', '.join('tu-' + c for c in close)}" if close else ""
        raise ConfigError(f"unknown timm encoder {name!r}: timm has no model {timm_name!r}{hint}")
    if name in smp.encoders.encoders:
        return
    if name.startswith("timm-") and smp.encoders.is_equivalent_to_timm_universal(name):
        return
    valid = ", ".join(smp.encoders.get_encoder_names())
    raise ConfigError(f"unknown encoder {name!r}; valid: {valid}, or 'tu-<timm model name>' (e.g. tu-regnetx_064)")


def available_weights(encoder: str) -> list[str]:
    """Named weights ``encoder`` can use besides ``none`` and a local file."""
    if encoder.startswith("tu-"):
        return ["imagenet"]
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {})
    return sorted(settings)


def _resolve_weights(encoder: str, weights: str) -> tuple[str | None, Path | None]:
    """Split ``encoder_weights`` into (smp weights name or None, local file or None)."""
    if weights is None or weights.strip().lower() in ("", "none", "null"):
        return None, None
    path = Path(weights).expanduser()
    looks_like_path = path.suffix in WEIGHT_FILE_SUFFIXES or "/" in weights or "\\" in weights
    if path.is_file():
        return None, path
    if looks_like_path:
        raise ConfigError(f"encoder weights file {path} does not exist")
    names = available_weights(encoder)
    if weights not in names:
        raise ConfigError(
            f"encoder {encoder!r} has no weights {weights!r}; available: {['none', *names]} or a path to a "
            f"local weights file"
        )
    # timm universal encoders take a boolean: the pretrained tag is part of the encoder name.
    return (True if encoder.startswith("tu-") else weights), None


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``encoder``.

    The file holds the encoder's state dict, or a checkpoint dict whose ``state_dict`` or ``model`` entry
    does; prefixes such as ``module.`` and ``encoder.`` are stripped (whichever matches most keys).
    Keys the encoder does not have (a classifier's ``fc.*``, a decoder's) are ignored.

    Raises:
        ConfigError: The file cannot be read, or it lacks encoder keys or has tensors of the wrong shape.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (pickle, zip, runtime) for a bad file
        raise ConfigError(f"encoder weights file {path}: cannot read ({err})") from err
    state = _unwrap_state_dict(loaded, path)
    wanted = encoder.state_dict()
    best: dict[str, torch.Tensor] = {}
    for prefix in ENCODER_KEY_PREFIXES:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        stripped = {k: v for k, v in stripped.items() if k in wanted}
        if len(stripped) > len(best):
            best = stripped
    missing = sorted(set(wanted) - set(best))
    if missing:
        raise ConfigError(
            f"encoder weights file {path}: {len(missing)} of {len(wanted)} encoder tensors missing "
            f"(e.g. {missing[:3]}); expected the encoder's state dict or a checkpoint holding it"
        )
    wrong = [k for k, v in best.items() if tuple(v.shape) != tuple(wanted[k].shape)]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"encoder weights file {path}: {len(wrong)} tensors have the wrong shape, e.g. {k} "
            f"{tuple(best[k].shape)} (file) vs {tuple(wanted[k].shape)} (encoder)"
        )
    encoder.load_state_dict(best, strict=True)


def _unwrap_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(
            f"encoder weights file {path}: expected a state dict (name -> tensor) or a dict with a "
            f"'state_dict' or 'model' entry"
        )
    return loaded
