"""PNG previews: 2D images as they are, 3D volumes as their three central slices, side by side in a grid."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _to_display(array: np.ndarray) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> [H, W, 3] uint8 (RGB as is, one channel as grey, others: first channel)."""
    picked = array[:3] if array.shape[0] == 3 else array[:1]
    pixels = np.clip((picked + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    pixels = np.moveaxis(pixels, 0, -1)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def central_slices(array: np.ndarray) -> list[np.ndarray]:
    """The 2D panels of ``array`` [C, *spatial]: itself in 2D, the middle slice along each axis in 3D."""
    if array.ndim == 3:
        return [array]
    return [np.take(array, array.shape[axis] // 2, axis=axis) for axis in (1, 2, 3)]


def preview_grid(images: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """One column per image ([C, *spatial] in [-1, 1]), one row per slice axis (a single row in 2D); every panel is
    padded to the largest panel's size. Returns [H, W, 3] uint8."""
    columns = [[_to_display(panel) for panel in central_slices(np.asarray(image))] for image in images]
    height = max(p.shape[0] for column in columns for p in column)
    width = max(p.shape[1] for column in columns for p in column)
    rows = max(len(column) for column in columns)
    grid = np.zeros((rows * (height + gap) - gap, len(columns) * (width + gap) - gap, 3), dtype=np.uint8)
    for c, column in enumerate(columns):
        for r, panel in enumerate(column):
            top, left = r * (height + gap), c * (width + gap)
            grid[top:top + panel.shape[0], left:left + panel.shape[1]] = panel
    return grid


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write an [H, W, 3] uint8 array as PNG."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path))
    return path


def contact_sheet(images: Sequence[np.ndarray], columns: int = 8, gap: int = 4) -> np.ndarray:
    """Many images ([C, *spatial] in [-1, 1]) in a grid of tiles, each tile the image's ``preview_grid``."""
    tiles = [preview_grid([image], gap=1) for image in images]
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    sheet = np.zeros((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), dtype=np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        sheet[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    return sheet
