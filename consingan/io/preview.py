"""PNG previews: 2D images as they are, 3D volumes as their three central slices, side by side in a grid.

Coarse scales are a few dozen pixels wide; every panel is enlarged by an integer factor (nearest neighbour, so no
detail is invented) until its longer side reaches ``MIN_PANEL`` pixels, large enough to judge texture by eye. Label
maps are shown beside their images in a fixed colour per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

MIN_PANEL = 256
# Distinct colours for label classes (class k gets colour k modulo the table): background black.
_LABEL_COLOURS = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    [170, 110, 40], [255, 250, 200], [128, 0, 0],
], dtype=np.float32)


def label_image(channels: np.ndarray) -> np.ndarray:
    """One-hot-like label channels [K, *spatial] -> an RGB picture [3, *spatial] in [-1, 1] of the winning class."""
    winner = np.argmax(channels, axis=0)
    colours = _LABEL_COLOURS[winner % len(_LABEL_COLOURS)]  # [*spatial, 3]
    return np.moveaxis(colours / 127.5 - 1.0, -1, 0)


def enlarge(pixels: np.ndarray, factor: int) -> np.ndarray:
    """[H, W, 3] enlarged ``factor`` times along both axes (nearest neighbour)."""
    return pixels.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else pixels


def _to_display(array: np.ndarray) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> [H, W, 3] uint8 (RGB as is, one channel as grey, others: first channel)."""
    picked = array[:3] if array.shape[0] == 3 else array[:1]
    pixels = np.clip((picked + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    pixels = np.moveaxis(pixels, 0, -1)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def central_slices(array: np.ndarray) -> list[np.ndarray]:
    """The 2D panels of ``array`` [C, *spatial]: itself in 2D, the middle slice along each axis in 3D.

    Volumes are z-y-x with an LPS affine (the engine's convention), so the axial panel [y, x] already has anterior at
    the top; the coronal [z, x] and sagittal [z, y] panels are flipped upside down so that superior is at the top, as
    a viewer shows them."""
    if array.ndim == 3:
        return [array]
    axial, coronal, sagittal = (np.take(array, array.shape[axis] // 2, axis=axis) for axis in (1, 2, 3))
    return [axial, coronal[:, ::-1], sagittal[:, ::-1]]


AXIS_NAMES = ("axial", "coronal", "sagittal")  # the order of ``central_slices`` in 3D
TEXT_COLOUR = (230, 230, 230)


def _font(size: int):
    """Pillow's built-in scalable font (no font file needed), or its small bitmap font where FreeType is missing."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def text_strip(text: str, width: int, height: int, vertical: bool = False) -> np.ndarray:
    """A dark [height, width, 3] uint8 strip with ``text`` centred in it (turned to read bottom-up when
    ``vertical``), for panel titles and row names."""
    from PIL import Image, ImageDraw

    long, short = (height, width) if vertical else (width, height)
    canvas = Image.new("RGB", (long, short), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(8, int(short * 0.6)))
    box = draw.textbbox((0, 0), text, font=font)
    draw.text(((long - (box[2] - box[0])) / 2 - box[0], (short - (box[3] - box[1])) / 2 - box[1]), text,
              fill=TEXT_COLOUR, font=font)
    if vertical:
        canvas = canvas.transpose(Image.Transpose.ROTATE_90)
    return np.asarray(canvas, dtype=np.uint8)


def preview_grid(images: Sequence[np.ndarray], gap: int = 2, min_panel: int = MIN_PANEL,
                 titles: Sequence[str] | None = None) -> np.ndarray:
    """One column per image ([C, *spatial] in [-1, 1]), one row per slice axis (a single row in 2D); every panel is
    enlarged by one whole factor, the smallest that brings the largest panel's longer side to ``min_panel`` pixels
    (one factor for all, so the slices of a volume keep their relative sizes). Each row is as high as its tallest
    panel and each column as wide as its widest, so a thin volume's coronal and sagittal rows leave no empty band.
    With ``titles`` (one per image) every column is titled and, in 3D, every row is named (axial, coronal,
    sagittal). Returns [H, W, 3] uint8."""
    panels = [[_to_display(panel) for panel in central_slices(np.asarray(image))] for image in images]
    factor = max(1, -(-min_panel // max(max(p.shape[:2]) for column in panels for p in column)))
    columns = [[enlarge(panel, factor) for panel in column] for column in panels]
    rows = max(len(column) for column in columns)
    heights = [max(column[r].shape[0] for column in columns if r < len(column)) for r in range(rows)]
    widths = [max(p.shape[1] for p in column) for column in columns]
    title_height = max(14, min(28, min(widths) // 9)) if titles else 0
    label_width = title_height if titles and rows > 1 else 0
    tops = [title_height + gap * bool(titles) + sum(heights[:r]) + gap * r for r in range(rows)]
    lefts = [label_width + gap * bool(label_width) + sum(widths[:c]) + gap * c for c in range(len(columns))]
    grid = np.zeros((tops[-1] + heights[-1], lefts[-1] + widths[-1], 3), dtype=np.uint8)
    for c, column in enumerate(columns):
        for r, panel in enumerate(column):
            grid[tops[r]:tops[r] + panel.shape[0], lefts[c]:lefts[c] + panel.shape[1]] = panel
    if titles:
        if len(titles) != len(columns):
            raise ValueError(f"{len(titles)} titles for {len(columns)} images")
        for c, title in enumerate(titles):
            grid[:title_height, lefts[c]:lefts[c] + widths[c]] = text_strip(title, widths[c], title_height)
        if label_width:
            for r in range(rows):
                grid[tops[r]:tops[r] + heights[r], :label_width] = text_strip(
                    AXIS_NAMES[r], label_width, heights[r], vertical=True)
    return grid


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write an [H, W, 3] uint8 array as PNG."""
    import SimpleITK as sitk

    try:
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path))
    except RuntimeError as error:  # ITK's write errors (a full disk, a removed folder) as the OSError they are
        Path(path).unlink(missing_ok=True)
        reason = next((line for line in str(error).splitlines() if line.strip()), "write failed")
        raise OSError(f"cannot write {path}: {reason.strip()[:200]}") from None
    return path


def contact_sheet(images: Sequence[np.ndarray], columns: int = 4, gap: int = 4, min_panel: int = MIN_PANEL
                  ) -> np.ndarray:
    """Many images ([C, *spatial] in [-1, 1]) in a grid of tiles, each tile the image's ``preview_grid`` (its panels
    at least ``min_panel`` pixels). An item may be a tuple of arrays shown side by side (an image and its labels)."""
    tiles = [preview_grid(list(item) if isinstance(item, (list, tuple)) else [item], gap=1, min_panel=min_panel)
             for item in images]
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    sheet = np.zeros((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), dtype=np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        sheet[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    return sheet
