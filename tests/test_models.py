"""Model factory: every decoder builds over small encoders, the heads mean what they say, weights load."""

from __future__ import annotations

import pytest
import torch

from geopose_mlops.config import ModelConfig
from geopose_mlops.constants import AGL, CITIES, MAG, SCALE, XYDIR
from geopose_mlops.errors import ConfigError
from geopose_mlops.models import DECODERS, build_model
from geopose_mlops.models.heads import fit_scale

torch.set_num_threads(1)

# (decoder, encoder, side px): DPT only takes timm ViTs; PAN needs at least 128 px.
CASES = [
    (name, enc, 128 if name == "pan" else 64)
    for name in DECODERS
    if name != "dpt"
    for enc in ("resnet18", "tu-test_resnet")
] + [("dpt", "tu-test_vit", 64)]

WRITEUP_ENCODERS = [
    "resnet34",
    "inceptionv4",
    "se_resnext50_32x4d",
    "tu-regnetx_064",
    "resnext50_32x4d",
    "efficientnet-b0",
]


def _inputs(side: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, side, side, generator=gen)
    gsd = torch.tensor([0.5, float("nan")] * batch)[:batch]
    city = torch.arange(batch) % len(CITIES)
    return image, gsd, city


@pytest.mark.parametrize(("decoder", "encoder", "side"), CASES)
def test_every_decoder_returns_geopose_outputs(decoder: str, encoder: str, side: int) -> None:
    model = build_model(ModelConfig(encoder=encoder, decoder=decoder.upper())).eval()
    with torch.no_grad():
        out = model(*_inputs(side))
    assert out[AGL].shape == (2, side, side)
    assert out[MAG].shape == (2, side, side)
    assert out[XYDIR].shape == (2, 2)
    assert out[SCALE].shape == (2,)
    assert all(torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(out[XYDIR].norm(dim=1), torch.ones(2))


def test_decoder_table_covers_the_smp_architectures() -> None:
    expected = {"unet", "unetplusplus", "fpn", "deeplabv3", "deeplabv3plus", "linknet", "pspnet", "pan"}
    assert expected | {"manet", "upernet"} <= set(DECODERS)


def test_writeup_encoders_build_without_weights() -> None:
    for encoder in WRITEUP_ENCODERS:
        model = build_model(ModelConfig(encoder=encoder, decoder="Unet", encoder_weights="none"))
        assert model.direction_head.mlp[0].in_features == model.encoder.out_channels[-1] + 2 + len(CITIES)


def test_training_step_backpropagates_through_every_head() -> None:
    model = build_model(ModelConfig(encoder="resnet18", decoder="FPN")).train()
    out = model(*_inputs(64))
    loss = out[AGL].mean() + out[MAG].mean() + out[XYDIR][:, 0].sum() + out[SCALE].sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_channels_last_gives_the_same_outputs() -> None:
    model = build_model(ModelConfig(encoder="resnet18", decoder="Unet")).eval()
    image, gsd, city = _inputs(64)
    with torch.no_grad():
        plain = model(image, gsd, city)
        model = model.to(memory_format=torch.channels_last)
        last = model(image.contiguous(memory_format=torch.channels_last), gsd, city)
    for key in plain:
        torch.testing.assert_close(last[key], plain[key], rtol=1e-4, atol=1e-4)


def test_input_size_not_a_multiple_of_the_stride_is_refused() -> None:
    model = build_model(ModelConfig(encoder="resnet18", decoder="Unet")).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(*_inputs(48))


def test_scale_head_recovers_a_planted_scale() -> None:
    height = torch.rand(3, 16, 16) * 30.0
    planted = torch.tensor([0.5, 2.25, 7.0])
    mag = height * planted[:, None, None]
    torch.testing.assert_close(fit_scale(mag, height), planted, rtol=1e-6, atol=1e-6)


def test_scale_head_is_zero_and_differentiable_on_flat_images() -> None:
    height = torch.zeros(2, 8, 8, requires_grad=True)
    mag = torch.rand(2, 8, 8, requires_grad=True)
    scale = fit_scale(mag, height)
    scale.sum().backward()
    assert torch.equal(scale, torch.zeros(2))
    assert torch.isfinite(height.grad).all() and torch.isfinite(mag.grad).all()


def test_metadata_changes_the_direction() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", decoder="Unet", use_metadata=True)).eval()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = model(image, torch.tensor([0.3]), torch.tensor([0]))[XYDIR]
        b = model(image, torch.tensor([0.3]), torch.tensor([2]))[XYDIR]
        c = model(image, torch.tensor([float("nan")]), torch.tensor([0]))[XYDIR]
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(c).all()

    blind = build_model(ModelConfig(encoder="resnet18", decoder="Unet", use_metadata=False)).eval()
    with torch.no_grad():
        d = blind(image, torch.tensor([0.3]), torch.tensor([0]))[XYDIR]
        e = blind(image, torch.tensor([0.9]), torch.tensor([2]))[XYDIR]
    torch.testing.assert_close(d, e)


def test_unknown_decoder_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown decoder 'Unet3'.*Unet, UnetPlusPlus, FPN"):
        build_model(ModelConfig(decoder="Unet3"))


def test_unknown_encoder_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown encoder 'resnet35'.*resnet34.*tu-<timm model name>"):
        build_model(ModelConfig(encoder="resnet35"))
    with pytest.raises(ConfigError, match="close timm names: .*tu-regnetx_064"):
        build_model(ModelConfig(encoder="tu-regnetx_065"))


def test_unavailable_weights_list_the_encoders_own() -> None:
    with pytest.raises(ConfigError, match=r"no weights 'swsl'; available: \['none', 'imagenet'\]"):
        build_model(ModelConfig(encoder="resnet34", encoder_weights="swsl"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights="/nowhere/encoder.pt"))


@pytest.mark.parametrize("wrap", ["encoder", "checkpoint"])
def test_local_weights_file_loads_into_the_encoder(tmp_path, wrap: str) -> None:
    torch.manual_seed(1)
    source = build_model(ModelConfig(encoder="resnet18", decoder="Unet"))
    if wrap == "encoder":
        saved = source.encoder.state_dict()
    else:  # a whole training checkpoint: the model's keys carry "encoder."
        saved = {"model": source.state_dict(), "epoch": 3}
    path = tmp_path / "weights.pt"
    torch.save(saved, path)

    torch.manual_seed(2)
    model = build_model(ModelConfig(encoder="resnet18", decoder="FPN", encoder_weights=str(path)))
    loaded = model.encoder.state_dict()
    for key, tensor in source.encoder.state_dict().items():
        assert torch.equal(loaded[key], tensor), key


def test_weights_file_of_another_encoder_is_refused(tmp_path) -> None:
    path = tmp_path / "resnet34.pt"
    torch.save(build_model(ModelConfig(encoder="resnet34")).encoder.state_dict(), path)
    with pytest.raises(ConfigError, match="resnet34.pt: .*tensors missing"):
        build_model(ModelConfig(encoder="tu-test_resnet", encoder_weights=str(path)))


def test_named_weights_that_cannot_be_fetched_fail_with_config_error(monkeypatch) -> None:
    import segmentation_models_pytorch.encoders as smp_encoders

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(smp_encoders, "hf_hub_download", offline)
    with pytest.raises(ConfigError, match="encoder 'resnet18' with weights 'imagenet': no network"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights="imagenet"))


def test_output_units_scale_the_pixel_outputs_and_travel_with_the_weights() -> None:
    image, gsd, city = _inputs(64)
    config = ModelConfig(encoder="resnet18", decoder="Unet", encoder_weights="none")
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        plain = model(image, gsd, city)
        model.pixel_head.set_units(8.0, 0.5)
        scaled = model(image, gsd, city)
    torch.testing.assert_close(scaled[AGL], plain[AGL] * 8.0)
    torch.testing.assert_close(scaled[MAG], plain[MAG] * 0.5)
    torch.testing.assert_close(scaled[SCALE], plain[SCALE] * 0.5 / 8.0)  # slope of magnitude on height
    # stored with the weights: a fresh model loading them predicts the same
    reloaded = build_model(config).eval()
    reloaded.load_state_dict(model.state_dict())
    assert reloaded.pixel_head.unit.tolist() == [8.0, 0.5]
    # a checkpoint written before units existed has no such key: its weights were trained with units of 1
    old = {k: v for k, v in model.state_dict().items() if k != "pixel_head.unit"}
    reloaded.load_state_dict(old)
    assert reloaded.pixel_head.unit.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="height unit 0.0: expected a finite number > 0"):
        model.pixel_head.set_units(0.0, 1.0)


def test_output_units_are_the_rms_of_the_valid_training_heights_and_magnitudes() -> None:
    import numpy as np

    from geopose_mlops.models.losses import output_units_from

    agl = np.array([[[3.0, 4.0], [np.nan, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[100.0, 100.0], [100.0, 100.0]]])
    scales = np.array([2.0, np.nan, 1.0])
    # rows 0 and 1: heights 3, 4, 0 and four 0 -> sqrt(25 / 7); magnitudes only where the scale is known:
    # row 0's 6, 8, 0 -> sqrt(100 / 3); row 2 is not a training row
    height, magnitude = output_units_from(agl, scales, rows=[0, 1])
    assert height == pytest.approx((25 / 7) ** 0.5)
    assert magnitude == pytest.approx((100 / 3) ** 0.5)
    assert output_units_from(agl, scales, rows=[1]) == (1.0, 1.0)  # all ground, no scale: units of 1
