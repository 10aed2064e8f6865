"""Inference only: each batch norm folded into the convolution that feeds it.

In eval mode a ``BatchNorm2d`` is a per-channel affine map, ``y = (x - mean) / sqrt(var + eps) * gamma +
beta``, so after a convolution it can be folded into that convolution's weights and bias (torch's
``fuse_conv_bn_weights`` computes them). On a 1024² U-Net over MobileNetV3 the batch norms took 11% of a
CPU forward pass, each one a full pass over its activations.

Which norm follows which convolution is found by running the model once with hooks, not by reading
its module tree: a norm is folded when its input is the very tensor a convolution (called once)
returned. A convolution whose output is also used elsewhere cannot be folded that way; such a model is
caught by comparing the folded copy's outputs with the original's on the same input, and is then left
as it was.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

# Relative difference of the folded model's outputs allowed against the original's (fp32 rounding only).
FOLD_RTOL = 1e-4


def _norm_replacement(norm: nn.BatchNorm2d) -> nn.Module | None:
    """What stays of ``norm`` once folded: nothing, or the activation of a norm + activation layer (timm)."""
    if not norm.track_running_stats or norm.running_mean is None:
        return None  # normalises with each batch's own statistics: not an affine map
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    children = dict(norm.named_children())
    if set(children) == {"drop", "act"}:  # timm's BatchNormAct2d: norm, then dropout, then activation
        return nn.Sequential(children["drop"], children["act"])
    return None


def _find_pairs(model: nn.Module, run: Callable[[nn.Module], object]) -> list[tuple[str, str]]:
    """(conv name, norm name) for each norm whose input is the output of a convolution called once."""
    outputs: dict[int, str] = {}  # id of a convolution's output -> the convolution's name
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    kept: list[torch.Tensor] = []  # holds every output, so that no id is reused during the pass

    def after_conv(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            outputs[id(output)] = name
            kept.append(output)

        return hook

    def before_norm(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            source = outputs.get(id(args[0])) if args else None
            if source is not None:
                pairs.append((source, name))

        return hook

    handles = []
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(after_conv(name)))
        elif isinstance(module, nn.BatchNorm2d) and _norm_replacement(module) is not None:
            handles.append(module.register_forward_pre_hook(before_norm(name)))
    try:
        with torch.inference_mode():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    sources = [conv for conv, _ in pairs]
    return [(c, n) for c, n in pairs if calls[c] == 1 and calls[n] == 1 and sources.count(c) == 1]


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Fold ``norm``'s eval-mode affine map into ``conv``'s weights and bias (in place)."""
    conv.weight, conv.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    )


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _max_relative_difference(a: object, b: object) -> float:
    """Largest |a - b| over max |a| of each tensor in two equal structures of outputs (dicts, tuples)."""
    if isinstance(a, torch.Tensor):
        if not a.numel():
            return 0.0
        return float((a.float() - b.float()).abs().max()) / max(float(a.abs().max()), 1e-12)
    if isinstance(a, dict):
        return max((_max_relative_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        return max((_max_relative_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return 0.0


def fold_batch_norms(model: nn.Module, run: Callable[[nn.Module], object]) -> tuple[nn.Module, int]:
    """A copy of the eval-mode ``model`` with its batch norms folded into their convolutions.

    Args:
        model: In eval mode (a training model normalises with batch statistics: refused).
        run: Calls the model on an example input, the same on every call, and returns its outputs,
            e.g. ``lambda m: m(image, gsd, city)``; used to find the pairs and to check the folded copy.

    Returns:
        (the folded copy and how many norms it folded), or (``model`` itself, 0) when nothing could be
        folded or the copy's outputs differed from the original's by more than ``FOLD_RTOL`` (a warning
        says so).
    """
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode (model.eval())")
    pairs = _find_pairs(model, run)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    for conv_name, norm_name in pairs:
        norm = folded.get_submodule(norm_name)
        replacement = _norm_replacement(norm)
        _fold_pair(folded.get_submodule(conv_name), norm)
        _set_module(folded, norm_name, replacement)
    with torch.inference_mode():
        difference = _max_relative_difference(run(model), run(folded))
    if not difference <= FOLD_RTOL:
        warnings.warn(
            f"batch norms not folded: the folded model's outputs differed by {difference:.2g} (relative) "
            "from the original's, so a convolution's output is used beyond its norm",
            RuntimeWarning,
            stacklevel=2,
        )
        return model, 0
    return folded, len(pairs)
