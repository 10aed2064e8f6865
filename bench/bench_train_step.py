"""Figure 2, training step: images/s of our step vs the public baseline's fp32 step, same model and batch.

Both sides train the same U-Net/ResNet34 (``build_model``, weights off, identical initial weights) with
the same loss (``mse``, the baseline's) on the same batches from the same DataLoader:

- **reference** (pubgeo/monocular-geocentric-pose's PyTorch training): the model in fp32 with
  contiguous NCHW tensors, ``torch.optim.Adam``, per step zero_grad, forward, loss, backward, step,
  and ``loss.item()`` for the running log (smp's ``TrainEpoch`` reads the loss every batch).
- **ours**: ``train.loop.train_one_epoch`` as training runs it: ``loop.memory_format`` (channels_last on CUDA),
  ``make_precision(amp=True)`` (bf16 autocast on CUDA where supported, fp16 + GradScaler otherwise;
  on CPU bf16 autocast where the CPU has bf16 instructions, fp32 otherwise), ``build_optimizer``
  (fused AdamW), gradient clipping, the learning-rate schedule and the non-finite-loss check.

On a CPU without bf16 instructions ours runs fp32 like the reference, and only the fused optimiser
(~30 ms a step faster here) is left against the clipping and checks (~10 ms).

Goals: on CPU ours >= 1.0x (no slower). On CUDA: >= 2.5x, and >= 60 images/s at 1024² on an
H100-class card; the achieved fraction of the card's dense bf16 peak is printed (FLOPs of one step
counted with ``torch.utils.flop_counter``).
"""

from __future__ import annotations

import math
import sys
import time

import common
import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from geopose_mlops.config import ModelConfig
from geopose_mlops.constants import AGL, ANGLE, CITY, GSD, IMAGE, SAMPLE_ID, SCALE
from geopose_mlops.data.dataset import to_tensors
from geopose_mlops.models.factory import build_model
from geopose_mlops.models.losses import build_loss
from geopose_mlops.train import loop

CPU_GOAL = 1.0
GPU_GOAL = 2.5
GPU_RATE_GOAL = 60.0  # images/s at 1024² on an H100-class card (10x the write-up's T4 fp32 ~6 images/s)
LR = 1e-4

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name (first match wins).
BF16_PEAK = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("T4", 65e12),  # fp16 (no bf16)
]


def bf16_peak(device_name: str) -> float | None:
    """The card's dense bf16 (T4: fp16) peak in FLOP/s, None if unknown."""
    return next((peak for key, peak in BF16_PEAK if key in device_name), None)


def synthetic_samples(count: int, size: int, seed: int = 0) -> list[dict]:
    """``count`` batch items (tensors as the dataset yields them) with random images and heights."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        agl = rng.uniform(0, 30, (size, size)).astype(np.float32)
        agl[rng.random((size, size)) < 0.02] = np.nan
        raw = {
            IMAGE: rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            AGL: agl,
            SCALE: float(rng.uniform(1, 5)),
            ANGLE: float(rng.uniform(-math.pi, math.pi)),
            GSD: 0.5,
            CITY: i % 4,
            SAMPLE_ID: f"JAX_{i}",
        }
        samples.append(to_tensors(raw))
    return samples


def reference_epoch(model, loader, optimizer, loss_fn, device) -> None:
    """The baseline's loop: fp32, NCHW, Adam; reads the loss every batch."""
    model.train()
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        optimizer.zero_grad()
        outputs = model(batch[IMAGE], batch[GSD], batch[CITY])
        loss, _ = loss_fn(outputs, batch)
        loss.backward()
        optimizer.step()
        loss.item()


def step_flops(model, batch, loss_fn, device) -> float:
    """FLOPs of one forward + backward pass of ``batch`` (counted, not timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = loop.to_device(batch, device)
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = model(batch[IMAGE], batch[GSD], batch[CITY])
        loss_fn(outputs, batch)[0].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _synchronized(fn, device):
    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return call


def run(args: list[str] | None = None) -> list[dict]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="input side in px (default: 1024 on CUDA, 256 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 8 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default: 10 CUDA, 2 CPU)")
    parser.add_argument("--encoder", default="resnet34", help="encoder of the U-Net")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: per-core figures; OpenMP threads spin badly on busy shared cores)",
    )
    opts = parser.parse_args(args)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    size = opts.size or (1024 if on_gpu else 256)
    batch_size = opts.batch or (8 if on_gpu else 2)
    steps = opts.steps or (10 if on_gpu else 2)
    threads = opts.threads
    torch.set_num_threads(threads)
    if on_gpu:
        torch.backends.cudnn.benchmark = True

    config = ModelConfig(encoder=opts.encoder, decoder="Unet", encoder_weights="none")
    torch.manual_seed(0)
    reference_model = build_model(config).to(device)
    our_model = build_model(config)
    our_model.load_state_dict(reference_model.state_dict())
    our_model = our_model.to(device, memory_format=loop.memory_format(device))
    loss_fn = build_loss("mse")
    loader = DataLoader(synthetic_samples(batch_size * steps, size), batch_size=batch_size, collate_fn=default_collate)
    reference_optimizer = torch.optim.Adam(reference_model.parameters(), lr=LR)
    our_optimizer = loop.build_optimizer(our_model, LR, weight_decay=1e-4)
    precision = loop.make_precision(device, amp=True)

    def ours() -> None:
        loop.train_one_epoch(our_model, loader, our_optimizer, loss_fn, precision, 1, lambda step: LR)

    start = time.perf_counter()
    ref, mine = common.time_interleaved(
        _synchronized(lambda: reference_epoch(reference_model, loader, reference_optimizer, loss_fn, device), device),
        _synchronized(ours, device),
        repeats=opts.repeats,
    )
    images = batch_size * steps
    speedup, low, high = common.ratio_spread(ref, mine)
    our_rate, ref_rate = images / mine.median, images / ref.median
    details = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({threads} threads)",
        "precision": precision.name,
        "fused_optimizer": bool(our_optimizer.defaults.get("fused")),
        "size": size,
        "batch": batch_size,
        "steps_per_repeat": steps,
        "encoder": opts.encoder,
        "reference_images_per_s": ref_rate,
        "ours_images_per_s": our_rate,
        "reference_s_per_image": ref.summary(per=images),
        "ours_s_per_image": mine.summary(per=images),
        "ratio_range": [low, high],
        "seconds": time.perf_counter() - start,
    }
    if not on_gpu:
        figures = [
            common.figure(
                "train_step_speedup_cpu", speedup, "x", f">= {CPU_GOAL}x (no slower on CPU)", speedup >= CPU_GOAL,
                **details,
            )  # fmt: skip
        ]
    else:
        flops = step_flops(our_model, next(iter(loader)), loss_fn, device) / batch_size  # per image
        peak = bf16_peak(details["device"])
        achieved = flops * our_rate
        details.update(flops_per_image=flops, achieved_tflops=achieved / 1e12)
        details["fraction_of_bf16_peak"] = achieved / peak if peak else None
        rate_goal_applies = size == 1024
        figures = [
            common.figure(
                "train_step_speedup_gpu", speedup, "x", f">= {GPU_GOAL}x with AMP", speedup >= GPU_GOAL, **details
            ),
            common.figure(
                "train_step_images_per_s_gpu",
                our_rate,
                "images/s",
                f">= {GPU_RATE_GOAL:g} images/s at 1024² (H100-class)",
                rate_goal_applies and our_rate >= GPU_RATE_GOAL,
                **details,
            ),
        ]
        fraction = details["fraction_of_bf16_peak"]
        print(
            f"{details['device']}: {achieved / 1e12:.1f} TFLOP/s achieved"
            + (f" = {fraction:.1%} of the dense bf16 peak" if fraction else " (peak of this card unknown)"),
            flush=True,
        )
    common.write_results(figures, opts.results)
    common.print_figures(figures)
    print(
        f"reference {ref_rate:.2f} images/s, ours {our_rate:.2f} images/s ({precision.name}, {size}², "
        f"batch {batch_size})"
    )
    return figures


if __name__ == "__main__":
    run(sys.argv[1:])
