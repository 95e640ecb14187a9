"""A smooth random deformation drawn from noise, in 2D and 3D: the anchored coarsest scale's source of shape
variation (``GrowingGenerator.set_anchor``'s ``warp``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from consingan.nn.resample import _gaussian_kernel1d, gaussian_blur


def _unit_gradient_spread(sigma: float, spatial_dims: int) -> float:
    """The spread of one component of ``displacement_from_noise``'s raw gradient for standard white noise of one
    channel, away from the borders: the central difference of the Gaussian-smoothed noise along one axis is white
    noise filtered by (difference * Gaussian) along it and by the Gaussian along the others, so its variance is the
    product of those kernels' squared norms."""
    kernel = _gaussian_kernel1d(sigma, torch.float64, torch.device("cpu"))
    difference = F.conv1d(F.pad(kernel.view(1, 1, -1), (2, 2)), torch.tensor([[[0.5, 0.0, -0.5]]],
                                                                               dtype=torch.float64))
    along = float((difference ** 2).sum())
    across = float((kernel ** 2).sum())
    return math.sqrt(along * across ** (spatial_dims - 1))


def displacement_from_noise(noise: torch.Tensor, spread: float, rms_voxels: float, sigma: float) -> torch.Tensor:
    """A smooth displacement field [N, D, *grid] in voxels, from ``noise`` [N, C, *grid] of spread ``spread``.

    The field is the gradient of the noise's channel mean smoothed by a Gaussian of ``sigma`` voxels (a potential
    flow: regions swell and shrink smoothly, with no tearing), scaled so that for such noise each component has an
    RMS of ``rms_voxels`` away from the borders. Zero noise gives zero displacement, so the reconstruction input
    (zero noise) is not deformed; the field is a fixed function of the noise, so a sample stays reproducible from
    its noise alone.
    """
    spatial_dims = noise.dim() - 2
    potential = gaussian_blur(noise.mean(1, keepdim=True), [sigma] * spatial_dims)
    gradient = torch.cat(torch.gradient(potential, dim=list(range(2, 2 + spatial_dims))), 1)
    raw_spread = spread * _unit_gradient_spread(sigma, spatial_dims) / math.sqrt(noise.shape[1])
    return gradient * (rms_voxels / raw_spread)


def warp(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``image`` [1 or N, C, *grid] resampled (bi/trilinear, edges repeated) at every voxel plus ``displacement``
    [N, D, *grid] (voxels, axis order of the grid): the deformed images [N, C, *grid]."""
    spatial_dims = displacement.shape[1]
    grid = displacement.shape[2:]
    axes = [torch.arange(n, device=image.device, dtype=image.dtype) for n in grid]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    positions = identity + displacement.to(image.dtype)
    # grid_sample wants positions in [-1, 1] (align_corners: -1 and 1 are the first and last voxel's centres) with
    # the last spatial axis first in its final dimension.
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in grid], device=image.device, dtype=image.dtype)
    normalised = positions * scale.view(1, spatial_dims, *([1] * spatial_dims)) - 1.0
    sampling_grid = normalised.flip(1).movedim(1, -1)
    source = image.expand(displacement.shape[0], *image.shape[1:])
    return F.grid_sample(source, sampling_grid, mode="bilinear", padding_mode="border", align_corners=True)
