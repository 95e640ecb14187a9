"""PNG previews: 2D images as they are, 3D volumes as their three central slices, arranged in a labelled-free grid."""

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


def preview_grid(rows: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """One row of panels per image; every panel padded to the largest panel's size. Returns [H, W, 3] uint8."""
    panels = [[_to_display(panel) for panel in central_slices(np.asarray(row))] for row in rows]
    height = max(p.shape[0] for row in panels for p in row)
    width = max(p.shape[1] for row in panels for p in row)
    columns = max(len(row) for row in panels)
    grid = np.zeros((len(panels) * (height + gap) - gap, columns * (width + gap) - gap, 3), dtype=np.uint8)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            top, left = r * (height + gap), c * (width + gap)
            grid[top:top + panel.shape[0], left:left + panel.shape[1]] = panel
    return grid


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write an [H, W, 3] uint8 array as PNG."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path))
    return path
