"""Labelled image sets for the class-conditional GAN: a folder of class folders or a CSV of path,class rows."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from consingan.config import is_single_folder_name
from consingan.errors import ConsinganError
from consingan.io import IntensityRange, Volume, list_images, read_volume
from consingan.io.volume import reorient_canonical, resized_affine
from consingan.nn.resample import resize

if TYPE_CHECKING:
    from consingan.runs import RunFolder

UPSCALE_WARNING = 4.0  # an image enlarged more than this to --size is mostly interpolation
SQUASH_WARNING = 2.0  # an image whose aspect ratio --fit resize changes more than this is visibly distorted


@dataclass
class LabelledSet:
    """Every image resized to ``size``^dims and mapped onto [-1, 1], with its class index."""

    images: torch.Tensor  # [N, C, *size]
    labels: torch.Tensor  # [N] int64
    classes: list[str]
    intensity: IntensityRange
    suffix: str  # file type of the first image, for writing samples
    dtype: str  # the data type of every image (a set of mixed types is refused)
    warnings: list[str] = field(default_factory=list)  # suspicious but legitimate: images upscaled or squashed
    # Each class's reference grid (the affine of its first image, reoriented and fitted): where samples are written.
    grids: list[list[list[float]]] = field(default_factory=list)
    # 2D sets: each class's slice plane (the 3D affine of its first image's one-slice file, a DICOM slice), fitted as
    # its grid; None for a class whose first image is a plain picture.
    planes: list[list[list[float]] | None] = field(default_factory=list)

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


def resolve_data(data: Path | str) -> Path:
    """``data`` as an absolute path; a symbolic-link loop is refused in one line."""
    try:
        return Path(data).resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError on a loop, later versions OSError
        raise ConsinganError(f"--data {data} is a symbolic-link loop (or cannot be resolved)") from None


def check_class_name(name: str, where: str) -> str:
    """A class name is one folder name (samples are written to ``<out>/<class>/``), refused naming ``where``."""
    if not is_single_folder_name(name):
        raise ConsinganError(f"{where}: class name {name!r} must be a single folder name (not empty, '.' or '..'; "
                             f"no '/', '\\' or NUL), as samples are written to <out>/<class>/")
    return name


def _csv_rows(data: Path) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV with the line each ends on. Read as UTF-8 with an optional byte-order mark (as
    spreadsheets write it; it would otherwise glue itself to the header's first cell)."""
    try:
        raw = data.read_bytes()
    except OSError as error:
        raise ConsinganError(f"cannot read {data}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ConsinganError(f"{data} is not UTF-8 text (byte {raw[error.start]:#04x} on line {line}); save it as "
                             f"UTF-8 ('CSV UTF-8' in a spreadsheet)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return [(reader.line_num, row) for row in reader if row and any(cell.strip() for cell in row)]
    except csv.Error as error:
        raise ConsinganError(f"{data} row {reader.line_num}: not valid CSV ({error})") from None


def _real_path(path: Path) -> Path:
    """The file ``path`` names, links and '..' resolved where possible (to find one image listed twice)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return path.absolute()


def list_labelled(data: Path, spatial_dims: int = 3) -> list[tuple[Path, str]]:
    """(path, class) pairs from a folder of class folders (``consingan.io.list_images``: in 3D DICOM series folders too;
    other files are skipped) or from a CSV file of path,class rows (paths relative to the CSV's folder; a header row
    'path,class' is allowed; rows are numbered by line, the header being row 1, as a spreadsheet does).

    Refused, naming the row or folder: a class name that is not a single folder name, one image listed twice (under
    one class or two), and a set of fewer than two classes."""
    if not data.exists():
        raise ConsinganError(f"data not found: {data}")
    entries: list[tuple[Path, str, str]] = []  # (path, class, where it was listed)
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise ConsinganError(f"--data must be a folder of class folders or a .csv file, got {data}")
        rows = _csv_rows(data)
        if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["path", "class"]:
            rows = rows[1:]
        for line, row in rows:
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise ConsinganError(f"{data} row {line}: expected 'path,class', got {','.join(row)!r}")
            path, name = Path(row[0].strip()), check_class_name(row[1].strip(), f"{data} row {line}")
            entries.append((path if path.is_absolute() else data.parent / path, name, f"row {line}"))
        if not entries:
            raise ConsinganError(f"{data} lists no images")
    else:
        folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ConsinganError(f"{data} holds no class folders (one sub-folder of images per class)")
        for folder in folders:
            check_class_name(folder.name, f"class folder {folder}")
            items = list_images(folder, spatial_dims)
            if not items:
                raise ConsinganError(f"class {folder.name!r} has no images in {folder}")
            entries += [(item, folder.name, str(item.relative_to(data))) for item in items]
    seen: dict[Path, tuple[str, str]] = {}
    for path, name, where in entries:
        first = seen.setdefault(_real_path(path), (where, name))
        if first != (where, name):
            classes = f"under both {first[1]!r} and {name!r}; an image belongs to one class" if first[1] != name \
                else f"twice under {name!r}; list each image once"
            raise ConsinganError(f"{data}: {first[0]} and {where} are the same image {path.name} ({classes})")
    classes = sorted({name for _, name, _ in entries})
    if len(classes) < 2:
        raise ConsinganError(f"{data} has one class only ({classes[0]!r}): a class-conditional model needs at least "
                             f"two classes")
    return [(path, name) for path, name, _ in entries]


def fit_to_size(volume: Volume, size: int, fit: str) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` on a grid of ``size`` voxels a side, and that grid's affine (each voxel's physical position):

    - 'extent': the physical extent kept, its longest side across ``size`` isotropic voxels, the shorter sides
      centred and padded with the channel's minimum (a 200 x 200 x 100 mm head fills the grid across and half of it
      down, not stretched);
    - 'resize': every axis stretched to ``size`` (the aspect ratio of the voxels changes);
    - 'crop': the shortest side scaled to ``size``, the centre kept.
    Resizing is antialiased (``nn.resample.resize``)."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None]
    spatial = list(tensor.shape[2:])
    if fit == "resize":
        shape = [size] * len(spatial)
        return resize(tensor, shape)[0].numpy(), resized_affine(volume.affine, spatial, shape)
    if fit == "crop":
        scale = size / min(spatial)
        shape = [max(size, round(s * scale)) for s in spatial]
        starts = [(s - size) // 2 for s in shape]
        crop = tuple(slice(start, start + size) for start in starts)
        affine = shift_origin(resized_affine(volume.affine, spatial, shape), starts)
        return resize(tensor, shape)[(0, slice(None), *crop)].numpy(), affine
    shape = extent_shape(volume, size)
    resized = resize(tensor, shape)[0].numpy()
    before = [(size - s) // 2 for s in shape]
    padding = [(0, 0)] + [(b, size - s - b) for b, s in zip(before, shape)]
    minimum = resized.reshape(resized.shape[0], -1).min(axis=1)
    padded = np.stack([np.pad(channel, padding[1:], constant_values=low) for channel, low in zip(resized, minimum)])
    affine = shift_origin(resized_affine(volume.affine, spatial, shape), [-b for b in before])
    return padded, affine


def extent_shape(volume: Volume, size: int) -> list[int]:
    """The voxels a volume covers on the 'extent' grid: its physical extent in isotropic voxels, the longest side
    ``size`` (a file without a usable spacing counts as isotropic)."""
    spacing = volume.spacing
    spacing = spacing if np.isfinite(spacing).all() and (spacing > 0).all() else np.ones(len(spacing))
    extent = np.asarray(volume.spatial_shape, dtype=np.float64) * spacing
    return [min(size, max(1, round(size * e / extent.max()))) for e in extent]


def shift_origin(affine: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """The affine of the same grid with index ``starts`` as its new origin (a crop; negative: padding)."""
    result = np.array(affine, dtype=np.float64, copy=True)
    result[:-1, -1] = affine[:-1, -1] + affine[:-1, :-1] @ np.asarray(starts, dtype=np.float64)
    return result


def load_labelled(data: Path | str, spatial_dims: int, size: int, fit: str = "resize",
                  mapping: str = "window", seed: int = 0) -> LabelledSet:
    """Read, check, fit and normalise every image of ``data``; errors name the file (unreadable, wrong
    dimensionality, one voxel thick in 3D, a channel count or data type unlike the first image's). Images enlarged
    or squashed a lot to ``size`` are allowed, with a warning naming the worst one."""
    pairs = list_labelled(Path(data), spatial_dims)
    classes = sorted({name for _, name in pairs})
    arrays, labels, first, first_path = [], [], None, None
    grids: dict[str, np.ndarray] = {}
    planes: dict[str, np.ndarray | None] = {}
    upscaled, squashed = [], []  # (factor, path, shape)
    for path, name in pairs:
        try:
            volume = read_volume(path, spatial_dims)
        except ConsinganError as error:
            raise ConsinganError(f"class {name!r}: {error}") from None
        if spatial_dims == 3 and 1 in volume.spatial_shape:  # as the single-image engine: not stretched to a volume
            raise ConsinganError(f"class {name!r}: {path} has shape {volume.spatial_shape}, one voxel thick: it is a "
                                 f"2D image, not a volume; a 3D set needs volumes (2D images train with --dim 2)")
        if first is None:
            first, first_path = volume, path
        elif volume.channels != first.channels:
            raise ConsinganError(f"{path} has {volume.channels} channel(s); the set's first image has "
                                 f"{first.channels} (every image needs the same channels)")
        elif np.dtype(volume.source_dtype).name != np.dtype(first.source_dtype).name:  # byte order aside
            # One intensity map and one output type serve the whole set: 16-bit values would squeeze 8-bit images
            # into the bottom of the range, or be clipped when samples are written in the first image's 8 bits.
            raise ConsinganError(f"mixed data types: {first_path} is {np.dtype(first.source_dtype).name} but {path} "
                                 f"is {np.dtype(volume.source_dtype).name}; convert the set to one data type and range")
        upscale, squash = fit_factors(volume, size, fit)
        upscaled += [(upscale, path, volume.spatial_shape)] if upscale > UPSCALE_WARNING else []
        squashed += [(squash, path, volume.spatial_shape)] if squash > SQUASH_WARNING else []
        array, affine = fit_to_size(reorient_canonical(volume), size, fit)
        arrays.append(array)
        labels.append(classes.index(name))
        if name not in grids:  # each class's reference grid: its first image's
            grids[name], planes[name] = affine, fitted_plane(volume, affine)
    images = np.stack(arrays)  # [N, C, *size]
    intensity = IntensityRange.of_set(list(images), mapping, seed=seed)
    normalised = np.stack([intensity.normalise(image) for image in images]).astype(np.float32)
    target = "x".join([str(size)] * spatial_dims)
    warnings = [fit_warning(upscaled, f"enlarged more than {UPSCALE_WARNING:g}x to {target}", "they look blurred"),
                fit_warning(squashed, f"squashed out of their aspect ratio (more than {SQUASH_WARNING:g}x) to "
                                      f"{target}", "--fit extent (the default) or crop keeps it")]
    return LabelledSet(torch.from_numpy(normalised), torch.tensor(labels, dtype=torch.int64), classes, intensity,
                       first.suffix, str(np.dtype(first.source_dtype)), [w for w in warnings if w],
                       [grids[name].tolist() for name in classes],
                       [None if planes[name] is None else planes[name].tolist() for name in classes])


def fitted_plane(volume: Volume, grid: np.ndarray) -> np.ndarray | None:
    """A 2D image's slice plane (``Volume.plane``) carried onto the fitted ``grid``: the grid's pixel -> old pixel
    map (resize, crop or padding, all in the slice) applied to the plane's in-slice axes; None without a plane."""
    if volume.plane is None:
        return None
    to_old = np.linalg.solve(np.asarray(volume.affine, dtype=np.float64), np.asarray(grid, dtype=np.float64))
    embedded = np.eye(4)
    embedded[1:, 1:] = to_old  # the slice axis (0) stays the one slice
    return np.asarray(volume.plane, dtype=np.float64) @ embedded


def fit_factors(volume: Volume, size: int, fit: str) -> tuple[float, float]:
    """How much fitting ``volume`` to ``size`` enlarges it (the largest factor along an axis) and how much it
    changes its physical aspect ratio (longest over shortest extent; 1 when cropping, which keeps it)."""
    shape = np.asarray(volume.spatial_shape, dtype=np.float64)
    if fit == "crop":
        return float(size / shape.min()), 1.0
    if fit == "extent":  # the physical aspect ratio is kept: nothing is squashed
        return float((np.asarray(extent_shape(volume, size)) / shape).max()), 1.0
    spacing = volume.spacing
    extent = shape * (spacing if np.isfinite(spacing).all() and (spacing > 0).all() else 1.0)
    return float((size / shape).max()), float(extent.max() / extent.min())


def fit_warning(found: list[tuple[float, Path, tuple[int, ...]]], what: str, advice: str) -> str:
    """One line for every image ``found`` (factor, path, shape), naming the worst; empty when none."""
    if not found:
        return ""
    factor, path, shape = max(found, key=lambda item: item[0])
    return (f"{len(found)} image(s) {what}, the most {path} ({'x'.join(map(str, shape))}, {factor:.1f}x); "
            f"{advice}")


def class_balanced_sampler(labels: torch.Tensor, num_classes: int, generator: torch.Generator
                           ) -> torch.utils.data.WeightedRandomSampler:
    """Draws ``len(labels)`` indices per epoch, each class equally likely (weight 1 / its image count)."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = (1.0 / counts)[labels]
    return torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)


def augment(batch: torch.Tensor, flip_dims: Sequence[int], rotations: bool, jitter: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Medical-image augmentations per image of ``batch`` [N, C, *spatial] (all sides equal): a flip along each
    spatial axis of ``flip_dims`` (``ConditionalConfig.flip_dims``: left-right by default, never superior-inferior
    unless asked) with probability 1/2, a 90-degree rotation in a random plane, intensity scale and shift by up to
    ``jitter`` (clamped to [-1, 1])."""
    dims = batch.dim() - 2
    out = []
    for image in batch:
        if flip_dims:
            axes = [1 + a for a in flip_dims if torch.rand((), generator=generator) < 0.5]
            image = image.flip(axes) if axes else image
        if rotations:
            plane = torch.randperm(dims, generator=generator)[:2].add(1).tolist()
            turns = int(torch.randint(0, 4, (), generator=generator))
            image = torch.rot90(image, turns, plane)
        if jitter > 0:
            scale, shift = (torch.rand(2, generator=generator) * 2 - 1) * jitter
            image = (image * (1 + scale) + shift).clamp(-1, 1)
        out.append(image)
    return torch.stack(out)


def kept_labelled(run: "RunFolder") -> LabelledSet | None:
    """The set the run keeps in source/dataset.pt (None for a run from before sets were kept)."""
    kept = run.kept_dataset(("images", "labels", "classes"))
    if kept is None:
        return None
    info = run.info
    if list(kept["classes"]) != info.classes or len(kept["labels"]) != len(kept["images"]):
        raise ConsinganError(f"damaged {run.path / run.SOURCE / run.DATASET}: its classes or counts are "
                             f"not those of run.json")
    return LabelledSet(kept["images"], kept["labels"], list(kept["classes"]), info.intensity, info.output_suffix,
                       info.output_dtype)
