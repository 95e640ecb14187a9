"""The scale pyramid: sizes by ConSinGAN's rule over every spatial axis, and float antialiased resizing."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from consingan.errors import ConsinganError
from consingan.nn.resample import resize

Shape = tuple[int, ...]


def pyramid_shapes(
    image_shape: Sequence[int],
    num_scales: int,
    max_size: int,
    min_size: int,
    spacing: Sequence[float] | None = None,
) -> list[Shape]:
    """Spatial shapes of every scale, coarsest first, by ConSinGAN's rule generalised to all axes and to anisotropy.

    The finest scale is the image shrunk so that its longest axis is at most ``max_size``; the coarsest has its shortest
    axis at ``min_size``. In between, scale i (of N = num_scales - 1 steps) uses the factor
    ``r ** ((N - 1) / ln N * ln(N - i) + 1)`` with ``r = (min_size / shortest side) ** (1 / N)``: a logarithmic schedule
    that keeps several coarse scales close together (Hinz et al. 2020), where global structure is learned.

    With ``spacing`` (voxel size per axis), the rule runs on physical extents: every scale has one voxel size for all
    axes, and an axis whose voxels are already coarser keeps its voxel count until the others catch up, so a
    1 x 1 x 5 mm volume is not squashed along its thick axis. Isotropic spacing gives exactly the voxel rule.
    """
    image_shape = tuple(int(s) for s in image_shape)
    if min(image_shape) < min_size:
        raise ConsinganError(
            f"image of shape {image_shape} is smaller than min_size={min_size} along its shortest axis; "
            f"lower --min-size to at most {min(image_shape)}"
        )
    spacing = [1.0] * len(image_shape) if spacing is None else [float(s) for s in spacing]
    extents = [n * s for n, s in zip(image_shape, spacing)]
    # The finest voxel size: the finest source spacing, or coarser if the longest extent needs more than max_size.
    voxel = max(min(spacing), max(extents) / max_size)
    virtual = [e / voxel for e in extents]  # the finest scale's size if every axis had that voxel size

    def shape_at(factor: float) -> Shape:
        # A tiny epsilon keeps ceil from rounding 25.000000001 up to 26.
        return tuple(min(n, max(1, math.ceil(v * factor - 1e-9))) for n, v in zip(image_shape, virtual))

    top = shape_at(1.0)
    if min(top) < min_size:
        raise ConsinganError(
            f"with max_size={max_size}, the finest scale {top} is shorter than min_size={min_size}; "
            f"raise --max-size or lower --min-size"
        )
    steps = num_scales - 1
    if steps == 0:
        return [top]
    ratio = (min_size / min(virtual)) ** (1.0 / steps)
    shapes = []
    for i in range(steps):
        exponent = steps if steps == 1 else (steps - 1) / math.log(steps) * math.log(steps - i) + 1
        shapes.append(shape_at(ratio**exponent))
    shapes.append(top)
    return shapes


def build_pyramid(image: torch.Tensor, shapes: Sequence[Shape]) -> list[torch.Tensor]:
    """Resize ``image`` [1, C, *spatial] to every shape, each directly from the full image (no compounding blur)."""
    return [resize(image, shape) for shape in shapes]
