"""The anchor's smooth random deformation (``--anchor-warp``, issue 22: a smooth template's near-copies)."""

import math

import pytest
import torch

from consingan.nn.warp import displacement_from_noise, warp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dims", [2, 3])
def test_zero_displacement_keeps_the_image_and_a_whole_voxel_shift_moves_it(dims):
    grid = (7, 9, 5)[:dims]
    image = torch.randn(1, 2, *grid, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(warp(image, torch.zeros(3, dims, *grid)), image.expand(3, 2, *grid), atol=1e-6)
    for axis in range(dims):
        shift = torch.zeros(1, dims, *grid)
        shift[:, axis] = 1.0  # every voxel reads its neighbour one voxel further along the axis
        moved = warp(image, shift)
        inside = [slice(None)] * dims
        inside[axis] = slice(0, -1)
        ahead = [slice(None)] * dims
        ahead[axis] = slice(1, None)
        assert torch.allclose(moved[(..., *inside)], image[(..., *ahead)], atol=1e-5)


@pytest.mark.parametrize("dims,channels,spread,rms,sigma", [(2, 3, 0.5, 2.0, 3.0), (3, 1, 0.25, 1.0, 3.0),
                                                           (3, 1, 0.25, 0.5, 10.0)])
def test_the_displacement_has_the_asked_rms_is_smooth_and_vanishes_with_the_noise(dims, channels, spread, rms, sigma):
    grid = (96, 96) if dims == 2 else (40, 40, 40)
    noise = spread * torch.randn(4, channels, *grid, generator=torch.Generator().manual_seed(1))
    displacement = displacement_from_noise(noise, spread, rms, sigma)
    assert displacement.shape == (4, dims, *grid)
    inner = displacement[(..., *[slice(10, n - 10) for n in grid])]
    assert inner.pow(2).mean().sqrt().item() == pytest.approx(rms, rel=0.1)
    # The borders move as much as the middle (the smoothing repeats the edge there, which the scaling undoes).
    for axis in range(dims):
        edge = displacement.select(2 + axis, 0)
        assert edge.pow(2).mean().sqrt().item() == pytest.approx(rms, rel=0.15)
    # Smooth: neighbouring voxels move nearly together (white noise would differ by sqrt(2) x the RMS).
    step = (inner[..., 1:] - inner[..., :-1]).pow(2).mean().sqrt().item()
    assert step < 0.5 * rms
    assert torch.equal(displacement_from_noise(torch.zeros_like(noise), spread, rms, sigma),
                       torch.zeros_like(displacement))
    # It scales with the noise, so a smaller draw deforms less.
    half = displacement_from_noise(noise / 2, spread, rms, sigma)
    assert torch.allclose(half, displacement / 2, atol=1e-6)
    assert math.isfinite(displacement.abs().max().item())
