"""Batch norms folded into their convolutions for inference: same outputs, no norm left, unsafe models left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geopose_mlops.config import ModelConfig
from geopose_mlops.models.factory import build_model
from geopose_mlops.models.fold_norms import fold_batch_norms


def _trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with the running statistics and affine weights of a trained model (a fresh one is ~identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.BatchNorm2d):
                n = norm.num_features
                norm.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
                norm.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                norm.weight.copy_(0.5 + torch.rand(n, generator=generator))
                norm.bias.copy_(0.2 * torch.randn(n, generator=generator))
    return model.eval()


def _inputs(side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(seed))
    return image, torch.tensor([0.4, 0.6]), torch.tensor([0, 3])


@pytest.mark.parametrize(
    ("encoder", "decoder"),
    [("resnet18", "Unet"), ("tu-mobilenetv3_small_050", "Unet"), ("resnet18", "FPN")],
    ids=["resnet-unet", "timm-norm-act-unet", "resnet-fpn"],
)
def test_every_norm_is_folded_and_the_outputs_stay_within_fp32_rounding(encoder: str, decoder: str) -> None:
    torch.manual_seed(0)
    model = _trained_statistics(build_model(ModelConfig(encoder=encoder, decoder=decoder, encoder_weights="none")))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    example = _inputs(64, seed=1)
    folded, count = fold_batch_norms(model, lambda m: m(*example))
    assert count == norms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left as it was
    # Checked on another input and size than the one the pairs were found on.
    image, gsd, city = _inputs(96, seed=2)
    with torch.inference_mode():
        expected, got = model(image, gsd, city), folded(image, gsd, city)
    for key, value in expected.items():
        scale = float(value.abs().max())
        assert scale > 0
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-4 * scale, msg=key)


def test_the_folded_weights_are_the_norms_affine_map_applied_to_the_convolution() -> None:
    conv, norm = nn.Conv2d(2, 2, 1, bias=True), nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]).view(2, 2, 1, 1))
        conv.bias.copy_(torch.tensor([0.5, -0.5]))
        norm.running_mean.copy_(torch.tensor([1.0, -2.0]))
        norm.running_var.copy_(torch.tensor([4.0 - 1e-5, 0.25 - 1e-5]))  # sqrt(var + eps) = 2, 0.5
        norm.weight.copy_(torch.tensor([3.0, 1.0]))
        norm.bias.copy_(torch.tensor([0.0, 1.0]))
    model = nn.Sequential(conv, norm).eval()
    image = torch.rand(1, 2, 4, 4)
    folded, count = fold_batch_norms(model, lambda m: m(image))
    assert count == 1 and isinstance(folded[1], nn.Identity)
    # weight x gamma / sd; bias (b - mean) x gamma / sd + beta
    torch.testing.assert_close(folded[0].weight.view(2, 2), torch.tensor([[1.5, 3.0], [6.0, -2.0]]))
    torch.testing.assert_close(folded[0].bias, torch.tensor([(0.5 - 1.0) * 1.5, (-0.5 + 2.0) * 2.0 + 1.0]))


class _ConvUsedTwice(nn.Module):
    """A convolution whose output feeds its norm and also the sum after it: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


def test_a_convolution_used_beyond_its_norm_leaves_the_model_as_it_was() -> None:
    model = _trained_statistics(_ConvUsedTwice())
    image = torch.rand(1, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="not folded"):
        folded, count = fold_batch_norms(model, lambda m: m(image))
    assert folded is model and count == 0 and isinstance(model.norm, nn.BatchNorm2d)


def test_a_model_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))  # training mode: batch statistics
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(model, lambda m: m(torch.rand(2, 3, 4, 4)))
