"""Float resampling shared by every family: a separable Gaussian blur and an antialiased linear resize, in 2D and
3D (the scale pyramid, the conditional family's image fitting and the metrics all use these)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from consingan.nn import factory


def _gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    positions = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` [N, C, *spatial] with one sigma per spatial axis (0 skips the axis).

    Edges are replicated so that the blur neither darkens borders nor needs the axis to be longer than the kernel.
    """
    spatial_dims = x.dim() - 2
    channels = x.shape[1]
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        kernel = _gaussian_kernel1d(sigma, x.dtype, x.device)
        radius = kernel.numel() // 2
        view = [1] * spatial_dims
        view[axis] = kernel.numel()
        weight = kernel.view(1, 1, *view).repeat(channels, 1, *([1] * spatial_dims))
        padding = [0, 0] * spatial_dims
        # F.pad lists the last axis first.
        padding[2 * (spatial_dims - 1 - axis)] = radius
        padding[2 * (spatial_dims - 1 - axis) + 1] = radius
        x = F.pad(x, padding, mode="replicate")
        conv = F.conv2d if spatial_dims == 2 else F.conv3d
        x = conv(x, weight, groups=channels)
    return x


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``x`` [N, C, *spatial] to ``size`` in floating point, with antialiasing on every shrinking axis.

    Before a linear interpolation, each axis that shrinks by a factor s is low-pass filtered with a Gaussian of
    sigma = (1/s - 1) / 2 (the rule scikit-image uses), so coarse scales do not alias; nothing is quantised.
    """
    spatial_dims = x.dim() - 2
    size = tuple(int(s) for s in size)
    if len(size) != spatial_dims:
        raise ValueError(f"size {size} does not match the {spatial_dims} spatial axes of the input")
    if tuple(x.shape[2:]) == size:
        return x
    sigmas = [max(0.0, (old / new - 1.0) / 2.0) for old, new in zip(x.shape[2:], size)]
    if any(sigma > 0 for sigma in sigmas):
        x = gaussian_blur(x, sigmas)
    return F.interpolate(x, size=size, mode=factory.interpolation_mode(spatial_dims, "linear"), align_corners=False)
