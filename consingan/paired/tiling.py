"""Tiles: grid positions with overlap, and whole-image prediction stitched from tile centres without seams."""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of ``tile`` every ``stride``; the last tile ends at the border."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def tile_grid(shape: Sequence[int], tile: Sequence[int], stride: Sequence[int]) -> list[tuple[int, ...]]:
    """Every tile's start corner for an image of ``shape``."""
    return list(itertools.product(*[tile_starts(s, t, d) for s, t, d in zip(shape, tile, stride)]))


def predict_tiled(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: Sequence[int],
    stride: Sequence[int],
    multiple: int = 1,
) -> torch.Tensor:
    """Run ``predict`` over overlapping tiles of ``image`` [1, C, *spatial] and stitch the result.

    Each output voxel comes from the one tile in which it lies farthest from a cut edge: tiles keep their centre and
    give up a margin of (tile - stride) / 2 on every side that faces another tile. Where the model's receptive field
    is no wider than that margin (and it has no image-wide statistics), the result equals predicting the whole image
    at once; there are no seams to blend. Images smaller than a tile, or not a multiple of ``multiple``, are padded
    by reflection and cropped back.
    """
    spatial = tuple(image.shape[2:])
    tile = [min(t, _round_up(s, multiple)) for t, s in zip(tile, spatial)]
    padded_shape = [max(s, t) for s, t in zip(spatial, tile)]
    padded_shape = [_round_up(s, multiple) for s in padded_shape]
    padding = []
    for s, p in reversed(list(zip(spatial, padded_shape))):
        padding += [0, p - s]
    if any(padding):
        mode = "reflect" if all(p < s for s, p in zip(spatial, reversed(padding[1::2]))) else "replicate"
        image = F.pad(image, padding, mode=mode)
    output = None
    for start in tile_grid(padded_shape, tile, stride):
        window = tuple(slice(a, a + t) for a, t in zip(start, tile))
        result = predict(image[(slice(None), slice(None), *window)])
        if output is None:
            output = result.new_zeros((result.shape[0], result.shape[1], *padded_shape))
        keep_out, keep_in = [], []
        for a, t, d, size in zip(start, tile, stride, padded_shape):
            margin = (t - d) // 2
            low = 0 if a == 0 else margin
            high = t if a + t >= size else t - margin
            # The next tile takes over at its own low margin; clip so that neighbours never leave a gap.
            keep_in.append(slice(low, high))
            keep_out.append(slice(a + low, a + high))
        output[(slice(None), slice(None), *keep_out)] = result[(slice(None), slice(None), *keep_in)]
    return output[(slice(None), slice(None), *[slice(0, s) for s in spatial])]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
