"""Labelled image sets for the class-conditional GAN: a folder of class folders or a CSV of path,class rows."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from consingan.errors import ConsinganError
from consingan.io import SUPPORTED_SUFFIXES, IntensityRange, file_suffix, read_volume
from consingan.singan.pyramid import resize

MAX_MAPPING_VALUES = 2**22  # values per channel the intensity window's percentiles are computed from


@dataclass
class LabelledSet:
    """Every image resized to ``size``^dims and mapped onto [-1, 1], with its class index."""

    images: torch.Tensor  # [N, C, *size]
    labels: torch.Tensor  # [N] int64
    classes: list[str]
    intensity: IntensityRange
    suffix: str  # file type of the first image, for writing samples
    dtype: str  # its data type

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


def list_labelled(data: Path) -> list[tuple[Path, str]]:
    """(path, class) pairs from a folder of class folders (files with a supported suffix, and DICOM series folders;
    other files are skipped) or from a CSV file of path,class rows (paths relative to the CSV's folder; a header row
    'path,class' is allowed)."""
    if not data.exists():
        raise ConsinganError(f"data not found: {data}")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise ConsinganError(f"--data must be a folder of class folders or a .csv file, got {data}")
        with data.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "class"]:
            rows = rows[1:]
        pairs = []
        for number, row in enumerate(rows, 1):
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise ConsinganError(f"{data} row {number}: expected 'path,class', got {','.join(row)!r}")
            path = Path(row[0].strip())
            pairs.append((path if path.is_absolute() else data.parent / path, row[1].strip()))
        if not pairs:
            raise ConsinganError(f"{data} lists no images")
        return pairs
    folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConsinganError(f"{data} holds no class folders (one sub-folder of images per class)")
    pairs = []
    for folder in folders:
        items = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (
            (p.is_file() and file_suffix(p) in SUPPORTED_SUFFIXES) or p.is_dir()))
        if not items:
            raise ConsinganError(f"class {folder.name!r} has no images in {folder}")
        pairs += [(item, folder.name) for item in items]
    return pairs


def fit_to_size(array: np.ndarray, size: int, fit: str) -> np.ndarray:
    """[C, *spatial] -> [C, size, ...]: 'resize' every axis (antialiased), or 'crop': scale the shortest side to
    ``size`` and keep the centre."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    spatial = tensor.shape[2:]
    if fit == "resize":
        return resize(tensor, [size] * len(spatial))[0].numpy()
    scale = size / min(spatial)
    tensor = resize(tensor, [max(size, round(s * scale)) for s in spatial])
    starts = [(s - size) // 2 for s in tensor.shape[2:]]
    crop = tuple(slice(start, start + size) for start in starts)
    return tensor[(0, slice(None), *crop)].numpy()


def load_labelled(data: Path | str, spatial_dims: int, size: int, fit: str = "resize",
                  mapping: str = "window", seed: int = 0) -> LabelledSet:
    """Read, check, fit and normalise every image of ``data``; errors name the file (unreadable, wrong
    dimensionality, a channel count unlike the first image's)."""
    pairs = list_labelled(Path(data))
    classes = sorted({name for _, name in pairs})
    arrays, labels, first = [], [], None
    for path, name in pairs:
        try:
            volume = read_volume(path, spatial_dims)
        except ConsinganError as error:
            raise ConsinganError(f"class {name!r}: {error}") from None
        if first is None:
            first = volume
        elif volume.channels != first.channels:
            raise ConsinganError(f"{path} has {volume.channels} channel(s); the set's first image has "
                                 f"{first.channels} (every image needs the same channels)")
        arrays.append(fit_to_size(volume.array, size, fit))
        labels.append(classes.index(name))
    images = np.stack(arrays)  # [N, C, *size]
    intensity = mapping_of(images, mapping, seed)
    normalised = np.stack([intensity.normalise(image) for image in images]).astype(np.float32)
    return LabelledSet(torch.from_numpy(normalised), torch.tensor(labels, dtype=torch.int64), classes, intensity,
                       first.suffix, str(np.dtype(first.source_dtype)))


def mapping_of(images: np.ndarray, mapping: str, seed: int = 0) -> IntensityRange:
    """The intensity map of a whole set [N, C, ...], per channel: percentiles from at most ``MAX_MAPPING_VALUES``
    values drawn at random, minimum and maximum exact (so nothing is clipped)."""
    per_channel = np.moveaxis(images, 1, 0).reshape(images.shape[1], -1)
    if per_channel.shape[1] > MAX_MAPPING_VALUES:
        rng = np.random.default_rng(seed)
        chosen = rng.choice(per_channel.shape[1], MAX_MAPPING_VALUES, replace=False)
        extremes = np.stack([per_channel.min(1), per_channel.max(1)], 1)
        per_channel = np.concatenate([per_channel[:, chosen], extremes], 1)
    return IntensityRange.of(per_channel, mapping)


def class_balanced_sampler(labels: torch.Tensor, num_classes: int, generator: torch.Generator
                           ) -> torch.utils.data.WeightedRandomSampler:
    """Draws ``len(labels)`` indices per epoch, each class equally likely (weight 1 / its image count)."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = (1.0 / counts)[labels]
    return torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)


def augment(batch: torch.Tensor, flips: bool, rotations: bool, jitter: float, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """Medical-image augmentations per image of ``batch`` [N, C, *spatial] (all sides equal): a flip along each
    axis with probability 1/2, a 90-degree rotation in a random plane, intensity scale and shift by up to
    ``jitter`` (clamped to [-1, 1])."""
    dims = batch.dim() - 2
    out = []
    for image in batch:
        if flips:
            axes = [1 + a for a in range(dims) if torch.rand((), generator=generator) < 0.5]
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
