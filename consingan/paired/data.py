"""Paired data: source/target files matched by name, checked pair by pair, normalised, cut into tiles."""

from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from consingan.errors import ConsinganError
from consingan.io import (SUPPORTED_SUFFIXES, IntensityRange, LabelEncoding, Volume, file_suffix, list_images,
                          read_volume)
from consingan.paired.tiling import tile_grid


def file_stem(path: Path) -> str:
    """The name without its format suffix only: 'cell.v1.png' -> 'cell.v1'."""
    suffix = file_suffix(path)
    return path.name[: len(path.name) - len(suffix)]


def resolve_folder(folder: Path | str, option: str) -> Path:
    """``folder`` made absolute; one line when it is missing, a file, or a symbolic link loop."""
    folder = Path(folder)
    try:
        resolved = folder.resolve(strict=True)
    except FileNotFoundError:
        raise ConsinganError(f"{option} folder not found: {folder}") from None
    except (RuntimeError, OSError) as error:  # a link loop: RuntimeError before Python 3.13, OSError ELOOP after
        if isinstance(error, RuntimeError) or error.errno == errno.ELOOP:
            raise ConsinganError(f"{option} {folder} is a symbolic link loop (it leads back to itself); give the "
                                 f"folder itself") from None
        raise ConsinganError(f"{option} {folder} cannot be opened: {error.strerror or error}") from None
    if not resolved.is_dir():
        raise ConsinganError(f"{option} {folder} is a file, not a folder; give the folder that holds the images")
    return resolved


def image_files(folder: Path | str, option: str) -> dict[str, Path]:
    """The images of ``folder`` by name without suffix, in name order (files with an image suffix; others, such as
    notes.txt, are skipped). Two files of one name ('a.png' and 'a.tif') are refused, naming both: one would be
    dropped silently."""
    resolve_folder(folder, option)
    files: dict[str, Path] = {}
    for path in list_images(Path(folder), series_folders=False):
        twin = files.setdefault(file_stem(path), path)
        if twin != path:
            raise ConsinganError(f"{option} {folder} holds {twin.name} and {path.name}, one name with two suffixes; "
                                 f"keep one of them")
    if not files:
        raise ConsinganError(f"no images in {folder} ({', '.join(SUPPORTED_SUFFIXES)})")
    return files


def match_pairs(source_dir: Path, target_dir: Path) -> list[tuple[str, Path, Path]]:
    """(name, source, target) for files with the same name (suffixes aside); unmatched names are an error, and so
    is one folder given as both (every image would be its own target: the model would learn to copy)."""
    if os.path.samefile(resolve_folder(source_dir, "--source"), resolve_folder(target_dir, "--target")):
        raise ConsinganError(f"--source and --target are the same folder ({Path(source_dir).resolve()}): every "
                             f"image would be its own target; put the targets in a folder of their own")
    sources, targets = image_files(source_dir, "--source"), image_files(target_dir, "--target")
    only_source = sorted(set(sources) - set(targets))
    only_target = sorted(set(targets) - set(sources))
    if only_source or only_target:
        parts = []
        if only_source:
            parts.append(f"no target for {', '.join(only_source[:5])}{' ...' if len(only_source) > 5 else ''}")
        if only_target:
            parts.append(f"no source for {', '.join(only_target[:5])}{' ...' if len(only_target) > 5 else ''}")
        raise ConsinganError("unmatched pairs: " + "; ".join(parts))
    return [(name, sources[name], targets[name]) for name in sorted(sources)]


@dataclass
class PairedData:
    """Every pair loaded, normalised into [-1, 1], with the mappings needed to go back."""

    names: list[str]
    sources: list[torch.Tensor]  # [C_source, *spatial] each
    targets: list[torch.Tensor]  # [C_target, *spatial] each
    source_volumes: list[Volume]
    source_encoding: dict  # {"labels": LabelEncoding dict} or {"intensity": IntensityRange dict}
    target_intensity: IntensityRange
    target_suffix: str = ".nii.gz"  # the targets' file type and data type: predictions are written in them
    target_dtype: np.dtype = np.dtype(np.float32)


def encode_source(array: np.ndarray, encoding: dict) -> np.ndarray:
    """Masks as one-hot label channels (``labels``) or intensities mapped with a fixed range (``intensity``)."""
    if "labels" in encoding:
        labels = LabelEncoding.from_dict(encoding["labels"])
        unknown = set(np.unique(array).astype(int).tolist()) - set(labels.classes)
        if unknown:
            raise ConsinganError(f"mask holds classes {sorted(unknown)} that training did not see {labels.classes}")
        return labels.encode(array) * 2 - 1
    return IntensityRange.from_dict(encoding["intensity"]).normalise(array)


def load_pairs(source_dir: Path, target_dir: Path, spatial_dims: int, one_hot: bool,
               intensity_mapping: str = "window") -> PairedData:
    """Read and check every pair; shape or geometry mismatches are reported by name. Targets (and sources that are
    not one-hot masks) are mapped onto [-1, 1] by one ``intensity_mapping`` over the whole set, per channel."""
    pairs = match_pairs(source_dir, target_dir)
    names, sources, targets, volumes, problems = [], [], [], [], []
    files: dict[str, list[Path]] = {"source": [], "target": []}  # beside the arrays, to name a file that differs
    for name, source_path, target_path in pairs:
        source = read_volume(source_path, spatial_dims, check_values=False)
        target = read_volume(target_path, spatial_dims, check_values=False)  # an empty field is a valid target
        for kind, path, volume in (("source", source_path, source), ("target", target_path, target)):
            # Before the grid checks: a NaN is the file's own fault, whatever its partner is.
            if not np.isfinite(volume.array).all():
                count = int((~np.isfinite(volume.array)).sum())
                raise ConsinganError(f"{path.name} (the {kind} of {name}) contains {count} NaN or infinite values; "
                                     f"clean it first")
        if source.spatial_shape != target.spatial_shape:
            problems.append(f"{name}: source {source.spatial_shape} vs target {target.spatial_shape}")
            continue
        if not np.allclose(source.affine, target.affine, atol=1e-3):
            problems.append(f"{name}: source and target geometry (origin, spacing, orientation) differ")
            continue
        if one_hot and source.channels > 1:
            if not all(np.array_equal(source.array[0], channel) for channel in source.array[1:]):
                problems.append(f"{name}: a --one-hot mask must have one channel, this one has {source.channels} "
                                f"different ones")
                continue
            source = dataclasses.replace(source, array=source.array[:1])  # grey saved as RGB: one channel
        names.append(name)
        volumes.append(source)
        sources.append(source.array)
        targets.append(target.array)
        files["source"].append(source_path)
        files["target"].append(target_path)
        if len(targets) == 1:
            target_type = (target.suffix, target.source_dtype)
    if problems:
        raise ConsinganError("mismatched pairs: " + "; ".join(problems))
    for kind, arrays in (("source", sources), ("target", targets)):
        _check_channels(kind, arrays, files[kind], spatial_dims)
    if one_hot:
        classes = np.unique(np.concatenate([np.unique(a) for a in sources]))
        encoding = {"labels": LabelEncoding.of(classes.reshape(1, -1).astype(np.float32), 0, "masks").to_dict()}
    else:
        encoding = {"intensity": _joint_range(sources, intensity_mapping).to_dict()}
    target_intensity = _joint_range(targets, intensity_mapping)
    return PairedData(
        names, [torch.from_numpy(encode_source(a, encoding)) for a in sources],
        [torch.from_numpy(target_intensity.normalise(a)) for a in targets], volumes, encoding, target_intensity,
        *target_type,
    )


def _check_channels(kind: str, arrays: list[np.ndarray], paths: list[Path], spatial_dims: int) -> None:
    """One channel count for every source (or target); otherwise name the first file that differs from the most
    common count, with what it is: a .npy with one axis more than the set's is read as channels, which is how a 3D
    volume shows in a 2D set."""
    counts = [a.shape[0] for a in arrays]
    usual = max(sorted(set(counts)), key=counts.count)
    odd = next((i for i, count in enumerate(counts) if count != usual), None)
    if odd is None:
        return
    path, array = paths[odd], arrays[odd]
    if file_suffix(path) == ".npy" and array.shape[0] > 1:
        what = (f"{path.name} holds a {spatial_dims + 1}D array of shape {array.shape}, which a {spatial_dims}D set "
                f"(--dim {spatial_dims}) reads as {array.shape[0]} channels")
    else:
        what = f"{path.name} has {array.shape[0]} channels"
    other = paths[counts.index(usual)].name
    raise ConsinganError(f"{kind} images have different channel counts: {what}; {other} has {usual}")


def _joint_range(arrays: list[np.ndarray], mapping: str) -> IntensityRange:
    """One map over all images, per channel: the same intensity maps to the same value in every pair. A constant
    channel (an empty target) gets a range of one around its value."""
    if mapping == "window":
        return IntensityRange.of_set(arrays, "window")
    low = np.min([a.reshape(a.shape[0], -1).min(1) for a in arrays], axis=0)
    high = np.max([a.reshape(a.shape[0], -1).max(1) for a in arrays], axis=0)
    high = np.where(high > low, high, low + 1)
    return IntensityRange(tuple(float(v) for v in low), tuple(float(v) for v in high))


class TileDataset(torch.utils.data.Dataset):
    """Overlapping tiles of every pair (the grid of ``tiling.tile_grid``); images smaller than a tile are used whole
    after reflection padding to the tile size."""

    def __init__(self, data: PairedData, tile: int, stride: int) -> None:
        self.data = data
        self.items = []
        for index, source in enumerate(data.sources):
            spatial = source.shape[1:]
            size = [min(tile, s) for s in spatial]
            for start in tile_grid(spatial, size, [stride] * len(spatial)):
                self.items.append((index, start, size))
        self.tile = tile

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair, start, size = self.items[index]
        window = tuple(slice(a, a + s) for a, s in zip(start, size))
        source = self.data.sources[pair][(slice(None), *window)]
        target = self.data.targets[pair][(slice(None), *window)]
        return _pad_to(source, self.tile), _pad_to(target, self.tile)


def _pad_to(x: torch.Tensor, tile: int) -> torch.Tensor:
    padding = []
    for s in reversed(x.shape[1:]):
        padding += [0, max(0, tile - s)]
    if not any(padding):
        return x
    mode = "reflect" if all(tile - s < s for s in x.shape[1:]) else "replicate"
    return torch.nn.functional.pad(x[None], padding, mode=mode)[0]
