"""A smooth random deformation drawn from noise, in 2D and 3D: the anchored coarsest scale's source of shape
variation (``GrowingGenerator.set_anchor``'s ``warp``)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from consingan.nn.resample import gaussian_blur


@functools.lru_cache(maxsize=64)  # a few grids per run; computed once each instead of in every stage-0 forward
def _row_variances(grid_side: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of one axis of ``grid_side`` voxels, the variance of the Gaussian-smoothed and of the
    smoothed-then-differenced standard white noise along that axis: the squared norms of the rows of the two linear
    maps, found by applying them to every unit vector (edges replicated, as ``gaussian_blur`` does, so the borders
    differ from the interior)."""
    units = torch.eye(grid_side, dtype=torch.float64).view(grid_side, 1, grid_side, 1)  # 2D: the blur's smallest
    smoothed = gaussian_blur(units, [sigma, 0.0])
    differenced = torch.gradient(smoothed, dim=2)[0]
    return smoothed.pow(2).sum(0).flatten(), differenced.pow(2).sum(0).flatten()


def displacement_from_noise(noise: torch.Tensor, spread: float, rms_voxels: float, sigma: float) -> torch.Tensor:
    """A smooth displacement field [N, D, *grid] in voxels, from ``noise`` [N, C, *grid] of spread ``spread``.

    The field is the gradient of the noise's channel mean smoothed by a Gaussian of ``sigma`` voxels (a potential
    flow: regions swell and shrink smoothly, with no tearing), divided voxel by voxel by its spread for such noise,
    so that each component has an RMS of ``rms_voxels`` everywhere: on a grid a few sigmas wide the borders,
    where the smoothing repeats the edge, would otherwise move several times more than the middle. Zero noise gives
    zero displacement, so the reconstruction input (zero noise) is not deformed; the field is a fixed function of
    the noise, so a sample stays reproducible from its noise alone.
    """
    spatial_dims = noise.dim() - 2
    grid = noise.shape[2:]
    potential = gaussian_blur(noise.mean(1, keepdim=True), [sigma] * spatial_dims)
    gradient = torch.cat(torch.gradient(potential, dim=list(range(2, 2 + spatial_dims))), 1)
    rows = [_row_variances(n, sigma) for n in grid]
    variances = []
    for axis in range(spatial_dims):  # separable: the product over axes of each axis's row variance
        variance = torch.ones((), dtype=torch.float64)
        for other, (smoothed, differenced) in enumerate(rows):
            line = (differenced if other == axis else smoothed).view(*[-1 if a == other else 1
                                                                         for a in range(spatial_dims)])
            variance = variance * line
        variances.append(variance)
    spread_map = torch.stack(variances).sqrt() * (spread / math.sqrt(noise.shape[1]))
    return gradient * (rms_voxels / spread_map.to(gradient.device, gradient.dtype))


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
