"""Peak-memory estimate for training, checked before anything starts.

Measured on the CPU as the resident high-water mark of training epochs (3 concurrent stages, 3 conv blocks per stage,
64 channels, the whole pyramid grown; benchmarks/RESULTS.md), the training step holds, in feature maps of the finest
scale: 45 per block of a stage at 167x250 (2D, seed layers), 39 at 115x171, 35 at 42^3, 29 at 56^3, 20 at 64^3. The
estimate takes 50 maps per block (num_layers + 2, head and tail included), above every measurement, plus 300 MiB for
the process. It errs on the safe side in 3D, where large maps are freed sooner relative to their size.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from consingan.config import TrainConfig
from consingan.errors import ConsinganError

BASE_BYTES = 300 * 2**20
MAPS_PER_BLOCK = 50


def estimate_peak_bytes(config: TrainConfig, top_shape: Sequence[int], channels: int | None = None) -> int:
    """Estimated peak memory of a training epoch at the finest scale ``top_shape``."""
    channels = channels or config.num_feature_channels
    maps = MAPS_PER_BLOCK * (config.num_layers + 2)
    return int(maps * channels * math.prod(top_shape) * 4 + BASE_BYTES)


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the system's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(config: TrainConfig, shapes: Sequence[Sequence[int]], device: torch.device,
                 available: int | None = None) -> None:
    """Stop with a message naming settings that would fit if the estimate exceeds 90 % of the free memory."""
    budget = 0.9 * (available_bytes(device) if available is None else available)
    top = shapes[-1]
    needed = estimate_peak_bytes(config, top)
    if needed <= budget:
        return
    per_channel = (needed - BASE_BYTES) / config.num_feature_channels
    channels_fit = int((budget - BASE_BYTES) // per_channel) if budget > BASE_BYTES else 0
    voxels_fit = max(0.0, (budget - BASE_BYTES) / (needed - BASE_BYTES)) * math.prod(top)
    size_fit = int(max(top) * (voxels_fit / math.prod(top)) ** (1 / len(top)))
    suggestions = []
    if channels_fit >= 8:
        suggestions.append(f"--num-feature-channels {channels_fit}")
    if size_fit >= config.min_size:
        suggestions.append(f"--max-size {size_fit}")
    hint = " or ".join(suggestions) if suggestions else "a smaller image"
    raise ConsinganError(
        f"training at {'x'.join(map(str, top))} with {config.num_feature_channels} channels needs about "
        f"{needed / 2**30:.1f} GiB but {budget / 0.9 / 2**30:.1f} GiB are free on {device.type}; {hint} would fit"
    )
