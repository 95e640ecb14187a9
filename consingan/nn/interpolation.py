"""Resampling between generator stages, with a fast cubic path.

PyTorch's CPU bicubic kernel is slow, its backward most of all: on one thread it took a quarter of a 2D ConSinGAN
epoch at 64 px (forward 10 %, backward 15 % of the profile), more than any layer but the convolutions. Cubic
interpolation is linear and separable, so along each axis it is a product with a small (out x in) matrix, and a
matrix product and its gradient are among the fastest operations there are. The matrices are made by PyTorch's own
bicubic kernel applied to the identity, so the result is ``F.interpolate(mode='bicubic', align_corners=False)``
(same taps, same border clamping): equal to 1e-12 in float64; in float32 up to about 1e-4 apart at 250 px, because
PyTorch's kernel computes the source positions in float32 and these matrices are built in float64. Forward and
backward of 2 x 32 channels on one CPU thread run 3.6 to 5.3 x faster at the sizes of a 64 px pyramid, 1.45 x at
the largest step of the default 2D pyramid (115 x 171 -> 167 x 250), and break even beyond it
(``benchmarks/bench_resize.py``). For linear interpolation PyTorch's kernels are already fast (dense matrices lose
there), so it stays with them.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from consingan.nn import factory


@functools.lru_cache(maxsize=256)
def cubic_matrix(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (size_out x size_in) matrix of 1D cubic interpolation, as PyTorch's bicubic kernel computes it.

    Each basis vector goes through ``F.interpolate`` as a column image of width 1 (whose horizontal weights are
    exactly the identity), so the rows hold PyTorch's own taps with its border clamping.
    """
    basis = torch.eye(size_in, dtype=torch.float64).reshape(size_in, 1, size_in, 1)
    columns = F.interpolate(basis, size=(size_out, 1), mode="bicubic", align_corners=False)[:, 0, :, 0]
    return columns.T.contiguous().to(device=device, dtype=dtype)


def cubic_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Cubic interpolation of ``x`` [N, C, *spatial] to ``size``, one matrix product per axis that changes."""
    spatial = x.dim() - 2
    for axis, size_out in enumerate(size):
        size_in = x.shape[2 + axis]
        if size_in == size_out:
            continue
        matrix = cubic_matrix(size_in, int(size_out), x.device, x.dtype)
        if axis == spatial - 1:  # the last axis: a product from the right
            x = x @ matrix.T
        else:  # an inner axis: the axes before it act as a batch, those after it as columns
            shape = x.shape
            before = shape[:2 + axis].numel()
            after = shape[3 + axis:].numel()
            x = (matrix @ x.reshape(before, size_in, after)).reshape(*shape[:2 + axis], int(size_out), *shape[3 + axis:])
    return x


class Resampler:
    """Resizes feature maps between stages: 'linear' (bi/trilinear, PyTorch's kernel) or 'cubic' (``cubic_resize``)."""

    def __init__(self, spatial_dims: int, mode: str = "linear") -> None:
        self.mode = factory.interpolation_mode(spatial_dims, mode)  # also rejects modes that have no such form

    def __call__(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        if self.mode == "bicubic":
            return cubic_resize(x, size)
        return F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=False)
