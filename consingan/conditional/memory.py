"""Memory preflight of a conditional run: what its models, optimiser state, activations and data set take, checked
before a run folder exists (and on --resume), so absurd sizes end in one line instead of an allocator traceback.

The idea of ``consingan.singan.memory``: count the feature maps a training step keeps and compare with the free
memory. Parameters are counted exactly, by building the models on PyTorch's ``meta`` device (shapes without storage).
Activations: each generator and discriminator block keeps about ``MAPS_PER_BLOCK`` maps of its input and output
widths at its larger side for the backward pass, the discriminator seeing real and fake batches together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from consingan.conditional.models import attention_bytes, build_models, stage_channels
from consingan.config import ConditionalConfig
from consingan.errors import ConsinganError
from consingan.devices import BASE_BYTES, available_bytes

FLOAT_BYTES = 4
# float32 copies of every parameter during training: weights, gradients and Adam's two moments (the generator's
# exponential moving average adds one more copy of its own).
TRAINING_COPIES = 4
# Peak resident memory of CPU training epochs (2D 64 and 128, 3D 32; batches 4 to 16; 16 to 32 base channels)
# came to a fixed ~300 MiB (BASE_BYTES, added to every estimate) and 2.2 to 3.5 maps per block of this count;
# 5 keeps every estimate at least 1.4 x above what was measured.
MAPS_PER_BLOCK = 5
DATA_COPIES = 3  # loading holds the fitted images, their stack and the normalised set at once


@dataclass
class MemoryEstimate:
    """Bytes of a training step by part; ``host`` is the data set (kept in main memory whatever the device)."""

    parameters: int  # parameter count of generator and discriminator
    models: int
    activations: int
    host: int

    @property
    def device_bytes(self) -> int:
        return self.models + self.activations


def _maps(widths: list[int], sides: list[int], dims: int, batch: int) -> int:
    """Bytes of ``MAPS_PER_BLOCK`` maps per block between consecutive (width, side) stages."""
    blocks = zip(widths, widths[1:], sides, sides[1:])
    return sum(MAPS_PER_BLOCK * batch * (a + b) * max(s, t) ** dims * FLOAT_BYTES for a, b, s, t in blocks)


def estimate_memory(config: ConditionalConfig, channels: int, num_classes: int, images: int) -> MemoryEstimate:
    """The memory a training step of ``config`` needs, for ``images`` images of ``channels`` channels."""
    with torch.device("meta"):  # parameter shapes only: nothing is allocated, however large
        generator, discriminator = build_models(config, channels, num_classes)
    g_params = sum(p.numel() for p in generator.parameters())
    d_params = sum(p.numel() for p in discriminator.parameters())
    models = ((TRAINING_COPIES + 1) * g_params + TRAINING_COPIES * d_params) * FLOAT_BYTES
    dims, batch, stages = config.dimension, config.batch_size, config.num_stages()
    widths = stage_channels(config.num_feature_channels, config.max_channels, stages)
    sides = [4 * 2**k for k in range(stages + 1)]
    # The generator up to its head (widths[-1] at the full size, then the image); every discriminator scale on a
    # batch of real and fake images.
    activations = _maps(widths + [channels], sides + [sides[-1]], dims, batch)
    for scale in range(config.discriminator_scales):
        size = config.size // 2**scale
        d_stages = int(round(math.log2(size / 4)))
        d_widths = [channels] + list(reversed(stage_channels(config.num_feature_channels, config.max_channels, d_stages)))[1:]
        activations += _maps(d_widths, [size // 2**k for k in range(d_stages + 1)], dims, 2 * batch)
    side = config.resolved_attention()
    if side:
        activations += attention_bytes(side, dims, batch) + attention_bytes(side, dims, 2 * batch)
    host = DATA_COPIES * images * channels * config.size**dims * FLOAT_BYTES
    return MemoryEstimate(g_params + d_params, models, activations, host)


def check_memory(config: ConditionalConfig, channels: int, num_classes: int, images: int, device: torch.device,
                 available: int | None = None, host_available: int | None = None) -> None:
    """Refuse, in one line naming what to lower, a run whose estimate exceeds 90 % of the free memory (on a GPU:
    models and activations against its memory, the data set against the machine's)."""
    estimate = estimate_memory(config, channels, num_classes, images)
    free = available_bytes(device) if available is None else available
    host_free = free if device.type == "cpu" else (available_bytes(torch.device("cpu")) if host_available is None
                                                   else host_available)
    needed = estimate.device_bytes + BASE_BYTES + (estimate.host if device.type == "cpu" else 0)
    host_short = device.type != "cpu" and estimate.host > 0.9 * host_free
    if needed <= 0.9 * free and not host_short:
        return
    gib = 2**30
    if host_short:
        raise ConsinganError(
            f"the {images} images at {config.size}^{config.dimension} need about {estimate.host / gib:.1f} GiB "
            f"while loading but {host_free / gib:.1f} GiB are free; lower --size")
    if estimate.models >= estimate.activations:
        hint = "lower --noise-dim, --num-feature-channels or --max-channels"
    else:
        hint = "lower --batch-size or --size (or --num-feature-channels / --max-channels)"
    raise ConsinganError(
        f"training needs about {needed / gib:.1f} GiB on {device.type} (models {estimate.models / gib:.1f} GiB for "
        f"{estimate.parameters / 1e6:.1f} M parameters, activations {estimate.activations / gib:.1f} GiB for a batch "
        f"of {config.batch_size} at {config.size}^{config.dimension}) but {free / gib:.1f} GiB are free; {hint}")
