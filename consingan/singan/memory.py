"""Peak-memory estimate for training, checked before anything starts.

Measured on the CPU as the resident high-water mark of training epochs (3 concurrent stages, 3 conv blocks per stage,
64 channels, the whole pyramid grown; benchmarks/RESULTS.md), the training step holds, in feature maps of the finest
scale: 45 per block of a stage at 167x250 (2D, default layers), 39 at 115x171, 35 at 42^3, 29 at 56^3, 20 at 64^3. The
estimate takes 50 maps per block (num_layers + 2, head and tail included), above every measurement, plus 300 MiB for
the process. It errs on the safe side in 3D, where large maps are freed sooner relative to their size.

Patch training (``TrainConfig.patch_size``) holds, at a scale larger than the patch, the maps of the boxes that
``regions.region_plan`` materialises for one patch at the concurrently trained stages (the patch grown by every stage's
receptive-field margin, clipped to the grids) instead of whole maps: the estimate counts
``PATCH_MAPS_PER_BLOCK`` maps per block over those voxels. Measured (``benchmarks/bench_scale3d.py``, the epochs' resident
high-water mark, 64 channels, the default table): 11 maps per block with patches of 32 at 128^3 (2.9 GiB, where 50 maps
had estimated 11.9 GiB) and 7 with patches of 45 at 250^3 (3.0 GiB against 19.4): the boxes of a patch hold far fewer
maps per voxel than a whole volume, whose every stage's maps are alive at once. 20 maps stay above both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from consingan.config import TrainConfig
from consingan.devices import BASE_BYTES, available_bytes
from consingan.errors import ConsinganError

MAPS_PER_BLOCK = 50
PATCH_MAPS_PER_BLOCK = 20


def estimate_peak_bytes(config: TrainConfig, top_shape: Sequence[int], channels: int | None = None) -> int:
    """Estimated peak memory of a training epoch at the finest scale ``top_shape``."""
    channels = channels or config.num_feature_channels
    maps = MAPS_PER_BLOCK * (config.num_layers + 2)
    return int(maps * channels * math.prod(top_shape) * 4 + BASE_BYTES)


def _skeleton(config: TrainConfig, num_stages: int):
    """A generator with the layers (not the channels) of ``config``: the boxes of region forwards depend on kernels,
    padding, CBAM and resampling only."""
    from consingan.singan.models import GrowingGenerator, generator_arguments

    with torch.random.fork_rng(devices=[]):  # its initial weights must not move the training's random state
        generator = GrowingGenerator(config.dimension, 1, **{**generator_arguments(config), "num_feature_channels": 1})
    for _ in range(num_stages - 1):
        generator.add_stage()
    return generator


def patched(shape: Sequence[int], patch: int | None) -> bool:
    """Whether a scale of ``shape`` trains on patches of ``patch`` voxels a side (larger on some side)."""
    return patch is not None and max(shape) > patch


def patch_shape(shape: Sequence[int], patch: int) -> tuple[int, ...]:
    """The box a training step of a scale of ``shape`` works on: ``patch`` a side, the scale's side where shorter."""
    return tuple(min(patch, int(n)) for n in shape)


def estimate_training_bytes(config: TrainConfig, shapes: Sequence[Sequence[int]], patch: int | None,
                            generator=None) -> int:
    """Estimated peak memory of training the pyramid ``shapes`` with patches of ``patch`` voxels a side (None: whole
    volumes): the largest over the scales. ``generator``: a skeleton to plan boxes with (made when not given)."""
    top = shapes[-1]
    if not patched(top, patch):
        return estimate_peak_bytes(config, top)
    generator = generator or _skeleton(config, len(shapes))
    from consingan.singan.regions import region_plan, whole_box

    peak = 0
    for stage, shape in enumerate(shapes):
        if not patched(shape, patch):
            peak = max(peak, estimate_peak_bytes(config, shape))
            continue
        size = patch_shape(shape, patch)
        centre = tuple(((n - p) // 2, (n - p) // 2 + p) for n, p in zip(shape, size))  # margins unclipped there
        active = range(max(0, stage + 1 - config.active_scales), stage + 1)
        voxels = [sum(math.prod(hi - lo for lo, hi in plan[k].input) for k in active)
                  for plan in (region_plan(generator, shapes, box, stage + 1) for box in (centre, whole_box(shape)))]
        maps = (estimate_peak_bytes(config, shape) - BASE_BYTES) * PATCH_MAPS_PER_BLOCK / MAPS_PER_BLOCK
        peak = max(peak, int(maps * voxels[0] / voxels[1]) + BASE_BYTES)
    return peak


@dataclass(frozen=True)
class MemoryPlan:
    """What the preflight decided: the patch side (None: whole volumes) and the estimates behind it."""

    patch: int | None
    needed: int  # bytes, with this patch
    whole: int  # bytes, whole volumes
    available: int  # free bytes on the device
    device: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def patch_size(self) -> str:
        """The value config.json records: 'off' for whole volumes, else the side."""
        return "off" if self.patch is None else str(self.patch)

    def describe(self, chosen: bool = False) -> str:
        """One line for the user: what trains on patches and what it needs; ``chosen``: by patch_size 'auto'."""
        free = f"{self.available / 2**30:.1f} GiB free on {self.device}"
        top = "x".join(map(str, self.shapes[-1]))
        stages = [k for k, shape in enumerate(self.shapes) if patched(shape, self.patch)]
        how = "patch_size auto chose " if chosen else ""
        if not stages:
            return f"memory: {how}whole volumes, about {_gib(self.needed)} of {free}"
        scales = f"scale {stages[0]}" if len(stages) == 1 else f"scales {stages[0]}-{stages[-1]}"
        return (f"memory: {how}patches of {self.patch} voxels a side at {scales} (whole {top} would need about "
                f"{_gib(self.whole)}); about {_gib(self.needed)} of {free}")


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def smallest_auto_patch(config: TrainConfig) -> int:
    """The smallest patch 'auto' chooses: ``min_size`` (what the coarsest scale is allowed to be, the least a scale is
    trusted to hold structure in), and at least what the critic's layers need."""
    from consingan.singan.models import smallest_side

    return max(config.min_size, smallest_side(config))


def largest_patch(config: TrainConfig, shapes: Sequence[Sequence[int]], budget: float, generator=None) -> int | None:
    """The largest patch (from ``smallest_auto_patch`` up to below the longest side) whose estimate is within
    ``budget`` bytes, or None; the estimate grows with the patch, so a bisection finds it."""
    low, high = smallest_auto_patch(config), max(shapes[-1]) - 1
    generator = generator or _skeleton(config, len(shapes))
    if low > high or estimate_training_bytes(config, shapes, low, generator) > budget:
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_training_bytes(config, shapes, middle, generator) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def check_memory(config: TrainConfig, shapes: Sequence[Sequence[int]], device: torch.device,
                 available: int | None = None) -> MemoryPlan:
    """The patch to train with: ``config.patch_size`` resolved ('auto': whole volumes when they fit within 90 % of the
    free memory, else the largest patch that does). Stops with a message naming settings that would fit when the
    estimate exceeds 90 % of the free memory."""
    free = available_bytes(device) if available is None else available
    budget = 0.9 * free
    shapes = tuple(tuple(int(n) for n in shape) for shape in shapes)
    whole = estimate_peak_bytes(config, shapes[-1])

    def plan(patch: int | None, needed: int) -> MemoryPlan:
        return MemoryPlan(patch, needed, whole, free, device.type, shapes)

    patch = None if config.patch_size == "auto" else config.patch_side()
    if not patched(shapes[-1], patch) and whole <= budget:  # whole volumes that fit ('auto' among them)
        return plan(patch, whole)
    generator = _skeleton(config, len(shapes))  # one for every box plan below
    if config.patch_size == "auto":
        patch = largest_patch(config, shapes, budget, generator)
        if patch is not None:
            return plan(patch, estimate_training_bytes(config, shapes, patch, generator))
        raise ConsinganError(_whole_refusal(config, shapes[-1], whole, budget, device) + f" (no patch of "
                             f"{smallest_auto_patch(config)} voxels a side or more fits either)")
    needed = estimate_training_bytes(config, shapes, patch, generator)
    if needed <= budget:
        return plan(patch, needed)
    fitting = largest_patch(config, shapes, budget, generator)
    hint = f"--patch-size {fitting}" if fitting is not None and (patch is None or fitting < patch) else None
    if patch is None:
        raise ConsinganError(_whole_refusal(config, shapes[-1], whole, budget, device, hint))
    raise ConsinganError(
        f"training on patches of {patch} voxels a side with {config.num_feature_channels} channels needs about "
        f"{_gib(needed)} but {_gib(free)} are free on {device.type}; {hint or 'a smaller --patch-size'} would fit")


def _whole_refusal(config: TrainConfig, top: Sequence[int], needed: int, budget: float, device: torch.device,
                   extra: str | None = None) -> str:
    per_channel = (needed - BASE_BYTES) / config.num_feature_channels
    channels_fit = int((budget - BASE_BYTES) // per_channel) if budget > BASE_BYTES else 0
    voxels_fit = max(0.0, (budget - BASE_BYTES) / (needed - BASE_BYTES)) * math.prod(top)
    size_fit = int(max(top) * (voxels_fit / math.prod(top)) ** (1 / len(top)))
    suggestions = [extra] if extra else []
    if channels_fit >= 8:
        suggestions.append(f"--num-feature-channels {channels_fit}")
    if size_fit >= config.min_size:
        suggestions.append(f"--max-size {size_fit}")
    hint = " or ".join(suggestions) if suggestions else "a smaller image"
    return (f"training at {'x'.join(map(str, top))} with {config.num_feature_channels} channels needs about "
            f"{needed / 2**30:.1f} GiB but {budget / 0.9 / 2**30:.1f} GiB are free on {device.type}; {hint} would fit")
