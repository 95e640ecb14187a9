"""Prediction with a trained paired model: whole images through overlapping tiles (no training code imported)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from consingan.errors import ConsinganError
from consingan.io import Volume, output_suffix, read_volume, write_volume
from consingan.io.volume import DimensionError
from consingan.outputs import OutputFolder
from consingan.paired.build import MODEL_NAMES, build_generator
from consingan.paired.data import encode_source, file_stem, image_files
from consingan.paired.tiling import predict_tiled
from consingan.runs import RunFolder, load_module_state


def prediction_inputs(source_dir: Path, spatial_dims: int, file_channels: int, one_channel: bool = False
                      ) -> list[tuple[Path, Volume]]:
    """Every image of ``source_dir`` (the rule training uses: files with an image suffix; others are skipped), read
    and checked before anything is written. ``one_channel``: masks for one-hot encoding, where a grey mask saved
    with equal RGB channels counts as one channel (as in training)."""
    inputs = []
    for path in image_files(source_dir, "--source").values():
        try:
            volume = read_volume(path, spatial_dims, check_values=False)
        except DimensionError as error:  # prediction has no --dim to check: the run fixes the dimensionality
            raise ConsinganError(f"{error.name} has shape {error.shape}, which is not a {spatial_dims}D image: the "
                                 f"run is {spatial_dims}D and this file is {len(error.shape)}D") from None
        if one_channel and volume.channels > 1 and all(np.array_equal(volume.array[0], c) for c in volume.array[1:]):
            volume = Volume(volume.array[:1], volume.affine, volume.suffix, volume.source_dtype, volume.header)
        if volume.channels != file_channels:
            raise ConsinganError(f"{path.name} has {volume.channels} channels, the model takes {file_channels}")
        if not np.isfinite(volume.array).all():
            raise ConsinganError(f"{path.name} contains NaN or infinite values")
        inputs.append((path, volume))
    return inputs


def predict_paired(run_dir: Path, source_dir: Path, out_dir: Path, device: str = "auto",
                   warn: Callable[[str], None] | None = None) -> list[Path]:
    """Translate every image in ``source_dir`` (any size) through overlapping tiles. Outputs keep each input's grid
    and geometry, in the training targets' file type, data type and intensity range; every input is checked and
    every output name is free before the first file is written. ``warn`` hears, in one line, that the run is
    unfinished and which weights are used instead of its final ones."""
    run = RunFolder.open(run_dir, "paired")
    config, info = run.config, run.info
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConsinganError(f"--out {out_dir} is a file; give a folder")
    torch_device = run.device(device)
    inputs = prediction_inputs(source_dir, config.dimension, info.inputs.file_channels,
                               "labels" in info.inputs.encoding)
    suffix = output_suffix(info.output_suffix)
    names = [out_dir / (file_stem(path) + suffix) for path, _ in inputs]  # distinct: image_files refuses twins
    taken = [n.name for n in names if n.exists()]
    if taken:
        raise ConsinganError(f"{out_dir} already holds {taken[0]}; choose another --out")
    state, weights, training = run.generator_state(MODEL_NAMES, torch_device)
    if training is not None:
        if warn is not None:  # training writes generator.pt after its last epoch: without it the run stopped early
            warn(f"{run.path} is unfinished (epoch {training.epoch} of {config.epochs}, no {RunFolder.WEIGHTS}): "
                 f"predicting with the generator of epoch {training.epoch} from {RunFolder.STATE}")
    generator = build_generator(config, info.inputs.channels, info.channels).to(torch_device)
    load_module_state(generator, state, weights)
    generator.eval()
    encoded = [torch.from_numpy(encode_source(volume.array, info.inputs.encoding))[None] for _, volume in inputs]

    def run_tile(tile: torch.Tensor) -> torch.Tensor:
        output = generator(tile.to(torch_device))
        return (output[-1] if isinstance(output, list) else output).cpu()

    written = []
    stride = config.resolved_stride()
    dtype = np.dtype(info.output_dtype)
    with OutputFolder(out_dir) as made:  # a failed write (a full disk) removes what this call wrote
        for (path, volume), source, name in zip(inputs, encoded, names):
            with torch.no_grad():
                result = predict_tiled(run_tile, source, [config.tile] * config.dimension,
                                       [stride] * config.dimension, multiple=config.size_multiple())
            array = info.intensity.denormalise(result[0].numpy())
            header = volume.header if info.output_suffix in (".nii", ".nii.gz") else None
            made.add(name)
            output = Volume(array, volume.affine, info.output_suffix, dtype, header, plane=volume.plane)
            written.append(write_volume(name, output, source_dtype=True))
    return written
