"""Drawing new images from a trained pyramid: random samples, retargeted sizes, coarse-fixed variations, injection."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from consingan.errors import ConsinganError
from consingan.io import Volume, decode_header, output_suffix, resized_affine, write_outputs
from consingan.io.volume import resized_plane
from consingan.io.preview import contact_sheet, label_image, write_png
from consingan.nn import factory
from consingan.outputs import OutputFolder, Progress
from consingan.runs import RunFolder, first_reason
from consingan.singan import regions
from consingan.singan.memory import available_bytes
from consingan.singan.models import GrowingGenerator, generator_arguments
from consingan.singan.pyramid import Shape, resize


MIN_STAGE_SIDE = 4  # voxels per side of the smallest stage a retargeted sample may have
CONTACT_SHEET_SAMPLES = 32  # the contact sheet shows the first samples of a draw, large enough to judge texture
CONTACT_SHEET = "contact_sheet.png"

# A draw may take this share of the device's free memory: a batch is generated in one piece when its whole forward
# (about regions.WHOLE_STAGE_MAPS feature maps of the finest grid per sample) fits it, else sample by sample, and a
# sample whose forward alone does not fit it is generated in tiles, with the coarse stages kept whole within it.
SAMPLING_SHARE = 0.5
TILE_BYTES = 2**30  # a tile chosen by 'auto' keeps its forward (tile and margins) within this
MIN_TILE = 8  # voxels a side of the smallest tile 'auto' chooses
# Chunks of the samples' noise fields: about 4096 voxels each, few enough that drawing them costs little beyond the
# values themselves (50 us a chunk), small enough that a tile's box draws little outside itself.
NOISE_CHUNK = {2: 64, 3: 16}
NOISE_CACHE_BYTES = 2**28  # chunks kept per draw while tiles overlap


def parse_tile(value: str | int) -> int | str:
    """``--tile``: 'auto' (tiles when a sample would not fit the free memory), 'off' (never) or a side in voxels."""
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text
    try:
        side = int(text)
    except ValueError:
        side = 0
    if side < 1:
        raise ConsinganError(f"--tile must be auto, off or a positive number of voxels, got {value!r}")
    return side


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a draw seeded with ``seed``: independent of batch size and of the other samples."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def unfinished_note(run: RunFolder, completed: Sequence[int], scale: int) -> str:
    """What sampling an unfinished run (killed, or still training) uses: which scales are finished of how many, and
    the scale whose generator draws the samples."""
    total = run.config.num_scales
    grid = "x".join(map(str, run.info.source_shape))
    return (f"{run.path} is unfinished: {len(completed)} of {total} scales trained "
            f"({', '.join(map(str, completed))}); sampling with scale {scale} (its samples resampled onto the "
            f"source grid {grid}); --resume the run to train the rest")


class TrainedPyramid:
    """A trained generator with what it needs to produce images in the source's units and geometry.

    Load with ``TrainedPyramid.load(run_dir)``; by default the furthest completed scale is used.
    """

    def __init__(self, run: RunFolder, generator: GrowingGenerator, device: torch.device) -> None:
        self.run = run
        self.generator = generator.eval()
        self.device = device
        self.num_stages = generator.num_stages
        self.shapes: list[Shape] = [tuple(s) for s in run.info.shapes[: self.num_stages]]
        self.intensity = run.info.intensity
        self.spatial_dims = run.info.spatial_dims
        self.channels = run.info.channels
        self.labels = run.info.labels
        self.image_channels = self.labels.image_channels if self.labels else self.channels
        self.notes: list[str] = []  # what the user should know about the model used (an unfinished run)

    @classmethod
    def load(cls, run_dir: Path | str, device: str = "cpu", scale: int | None = None) -> "TrainedPyramid":
        run = RunFolder.open(run_dir, "singan")
        completed = run.completed_scales()
        if not completed:
            raise ConsinganError(f"{run.path} has no completed scale yet; train (or --resume) first")
        scale = completed[-1] if scale is None else scale
        if scale not in completed:
            raise ConsinganError(f"scale {scale} of {run.path} is not trained; completed: {completed}")
        config = run.config
        torch_device = run.device(device)
        generator = GrowingGenerator(config.dimension, run.info.channels,
                                     **generator_arguments(config)).to(torch_device)
        weights = run.scale_dir(scale) / RunFolder.WEIGHTS
        try:
            generator.load_grown_state(run.read_state(weights, torch_device))
        except (KeyError, ValueError, RuntimeError) as error:
            raise ConsinganError(f"{weights} does not fit the model of {run.path / run.CONFIG}: "
                                 f"{first_reason(error)}") from None
        if len(generator.noise_amps) != scale + 1:
            raise ConsinganError(f"{weights} holds {len(generator.noise_amps)} stages, scale {scale} needs {scale + 1}")
        generator.requires_grad_(False)
        pyramid = cls(run, generator, torch_device)
        if len(completed) < config.num_scales:
            pyramid.notes.append(unfinished_note(run, completed, scale))
        return pyramid

    # --- shapes ----------------------------------------------------------------------------------------------------

    def output_shapes(self, scale_factors: Sequence[float] | None = None, shape: Sequence[int] | None = None
                      ) -> list[Shape]:
        """Per-stage shapes for an output retargeted by per-axis ``scale_factors`` or to the final ``shape``."""
        top = self.shapes[-1]
        if shape is not None and scale_factors is not None:
            raise ConsinganError("give either scale factors or an output shape, not both")
        if shape is not None:
            if len(shape) != self.spatial_dims or min(shape) < 1:
                raise ConsinganError(f"output shape {tuple(shape)} must have {self.spatial_dims} positive sizes")
            scale_factors = [s / t for s, t in zip(shape, top)]
        if scale_factors is None:
            return list(self.shapes)
        factors = list(scale_factors)
        if len(factors) == 1:
            factors = factors * self.spatial_dims
        if len(factors) != self.spatial_dims or not all(math.isfinite(f) and f > 0 for f in factors):
            raise ConsinganError(f"scale factors {tuple(scale_factors)} must be {self.spatial_dims} positive, finite "
                                 f"numbers")
        shapes = [tuple(max(1, round(s * f)) for s, f in zip(stage_shape, factors)) for stage_shape in self.shapes]
        if shape is not None:
            shapes[-1] = tuple(shape)
        # A stage under MIN_STAGE_SIDE voxels a side holds no structure: the output would be a flat image (a 1 x 1
        # "sample"), so it is refused rather than written.
        for stage_shape in shapes:
            if min(stage_shape) < MIN_STAGE_SIDE:
                raise ConsinganError(
                    f"the output would be too small: its coarsest scale would be {stage_shape}, below the "
                    f"{self.shapes[0]} the model was trained at; ask for a larger --shape or --scale")
        return shapes

    def check_options(self, num: int, batch_size: int, scale_factors: Sequence[float] | None,
                      shape: Sequence[int] | None, start_scale: int) -> list[Shape]:
        """Validate sampling options (``ConsinganError`` on a bad one); returns the output shapes."""
        if num < 1 or batch_size < 1:
            raise ConsinganError("--num and --batch-size must be positive")
        if not 0 <= start_scale < self.num_stages:
            raise ConsinganError(f"start scale must be between 0 and {self.num_stages - 1}, got {start_scale}")
        return self.output_shapes(scale_factors, shape)

    # --- generation ------------------------------------------------------------------------------------------------

    def noise_source(self, shapes: Sequence[Shape], seeds: Sequence[int], start_scale: int = 0,
                     injected: torch.Tensor | None = None) -> "SampleNoise":
        """The noise of one sample per seed at the stage ``shapes``: each stage from the sample's noise field, the
        stages below ``start_scale`` on their fixed reconstruction input (resized to a retargeted grid) and stage 0
        on ``injected`` ([1, C, *spatial], normalised) when given."""
        generator = self.generator
        fixed: dict[int, Callable[[regions.Box], torch.Tensor]] = {}
        reconstruction = generator.reconstruction_source()
        for stage in range(min(start_scale, len(shapes))):
            grid = generator.noise_shape(stage, shapes[stage])[2:]
            if tuple(shapes[stage]) == tuple(self.shapes[stage]):
                fixed[stage] = functools.partial(reconstruction, stage)  # boxes drawn as asked for
                continue
            whole = generator.reconstruction_noise(stage)
            whole = (resize(whole, grid) if stage == 0 else
                     F.interpolate(whole, size=grid, mode=factory.interpolation_mode(self.spatial_dims)))
            fixed[stage] = functools.partial(_crop, whole)
        if injected is not None:
            fixed[0] = functools.partial(_crop, generator.noise_for_input(resize(injected, shapes[0])))
        return SampleNoise(generator, shapes, seeds, fixed, NOISE_CHUNK[self.spatial_dims], NOISE_CACHE_BYTES)

    def _noise(self, shapes: Sequence[Shape], seed: int, start_scale: int, injected: torch.Tensor | None
               ) -> list[torch.Tensor]:
        """The whole noise of one sample seeded ``seed`` (see ``noise_source``)."""
        return self.noise_source(shapes, [seed], start_scale, injected).whole_noise()

    def whole_forward_bytes(self, shapes: Sequence[Shape], batch_size: int = 1) -> int:
        """About the peak memory of generating ``batch_size`` samples at ``shapes`` in one piece."""
        generator = self.generator
        grid = generator.noise_shape(len(shapes) - 1, shapes[-1])[2:]
        item = torch.finfo(next(generator.parameters()).dtype).bits // 8
        return regions.WHOLE_STAGE_MAPS * batch_size * generator.num_feature_channels * math.prod(grid) * item

    def draw_plan(self, shapes: Sequence[Shape], batch_size: int, tile: int | str = "auto",
                  memory_bytes: int | None = None) -> tuple[int, tuple[int, ...] | None]:
        """How a batch is generated: (samples per forward, tile or None for whole forwards).

        ``tile`` 'auto': whole forwards of the batch, or one sample at a time, while they fit ``memory_bytes``
        (default: ``SAMPLING_SHARE`` of the device's free memory), else tiles as large as ``TILE_BYTES`` allows;
        'off': whole forwards; a number: tiles of that side, one sample at a time. Samples do not depend on it.
        """
        tile = parse_tile(tile)
        if tile == "off":
            return batch_size, None
        if isinstance(tile, int):
            return 1, tuple(min(tile, n) for n in shapes[-1])
        budget = self._budget(memory_bytes)
        if self.whole_forward_bytes(shapes, batch_size) <= budget:
            return batch_size, None
        if self.whole_forward_bytes(shapes, 1) <= budget:
            return 1, None
        return 1, self.auto_tile(shapes)

    def auto_tile(self, shapes: Sequence[Shape]) -> tuple[int, ...]:
        """The largest cube tile whose forward, with the finest stage's receptive margins, fits ``TILE_BYTES``."""
        side = regions.largest_tile(self.generator, len(shapes), TILE_BYTES, smallest=MIN_TILE)
        return tuple(min(side, n) for n in shapes[-1])

    def _budget(self, memory_bytes: int | None) -> int:
        return int(SAMPLING_SHARE * available_bytes(self.device)) if memory_bytes is None else int(memory_bytes)

    def _tiled(self, noise: regions.NoiseFn, shapes: Sequence[Shape], tile: tuple[int, ...], batch_size: int,
               memory_bytes: int | None) -> torch.Tensor:
        """``generate_tiled`` onto the CPU, keeping coarse stages whole in the budget that the tiles leave."""
        working = self.whole_forward_bytes([tile] * len(shapes), batch_size)
        return regions.generate_tiled(self.generator, noise, tile, shapes=shapes, device="cpu",
                                      cache_bytes=max(0, self._budget(memory_bytes) - working))

    @torch.no_grad()
    def reconstruct(self, tile: int | str = "auto", memory_bytes: int | None = None) -> torch.Tensor:
        """The reconstruction of the training image [1, C, *spatial] on the CPU, from the fixed reconstruction
        inputs; in tiles under the rules of ``draw_plan`` (the same image)."""
        _, tile_shape = self.draw_plan(self.shapes, 1, tile, memory_bytes)
        if tile_shape is None:
            return self.generator(self.generator.reconstruction_inputs()).cpu()
        return self._tiled(self.generator.reconstruction_source(), self.shapes, tile_shape, 1, memory_bytes)

    @torch.no_grad()
    def sample(
        self,
        num: int = 1,
        seed: int = 0,
        batch_size: int = 8,
        scale_factors: Sequence[float] | None = None,
        shape: Sequence[int] | None = None,
        start_scale: int = 0,
        inject: np.ndarray | None = None,
        first_index: int = 0,
        tile: int | str = "auto",
        memory_bytes: int | None = None,
    ) -> torch.Tensor:
        """``num`` images [N, C, *spatial] in the generator's [-1, 1] range.

        Sample i (counted from ``first_index``) depends only on (seed, i), so a draw can be split or repeated. ``start_scale`` K keeps the stages
        below K on their fixed reconstruction input (the training image's coarse layout) and randomises only from K
        up: the larger K, the finer the variations. ``inject`` ([C, *spatial] in source units, any size) replaces
        the coarsest input, so its layout is kept and the trained stages add the texture, as in ConSinGAN's editing
        and harmonisation; combine it with ``start_scale`` to choose from where new detail is drawn. ``tile`` and
        ``memory_bytes``: whether samples are generated in one piece or in tiles (``draw_plan``); a sample is the
        same either way, to float rounding, since its noise is a field whose values depend only on (seed, i, stage,
        position).
        """
        shapes = self.check_options(num, batch_size, scale_factors, shape, start_scale)
        injected = None
        if inject is not None and self.labels is not None:
            raise ConsinganError("injection is not supported for runs trained with --label")
        if inject is not None:
            if inject.ndim != self.spatial_dims + 1 or inject.shape[0] != self.channels:
                raise ConsinganError(f"injected image has shape {inject.shape}, expected [{self.channels}, "
                                     f"{self.spatial_dims} spatial axes]")
            injected = torch.from_numpy(self.intensity.normalise(inject)).clamp(-1, 1)[None].to(self.device)
        per_forward, tile_shape = self.draw_plan(shapes, min(batch_size, num), tile, memory_bytes)
        outputs = []
        # An injected image is stage 0's input as it is: a warped anchor (--anchor-warp) would deform it.
        exact_input = self.generator.undeformed_anchor() if injected is not None else contextlib.nullcontext()
        with exact_input:
            for first in range(first_index, first_index + num, per_forward):
                seeds = [sample_seed(seed, i) for i in range(first, min(first_index + num, first + per_forward))]
                noise = self.noise_source(shapes, seeds, start_scale, injected)
                if tile_shape is None:
                    outputs.append(self.generator(noise.whole_noise()).cpu())
                else:
                    outputs.append(self._tiled(noise, shapes, tile_shape, len(seeds), memory_bytes))
        return torch.cat(outputs)

    def to_source_units(self, images: torch.Tensor) -> list[np.ndarray]:
        label_channels = self.image_channels if self.labels else None  # decoded by argmax: not clipped
        return [self.intensity.denormalise(image.numpy(), label_channels) for image in images]

    def to_volumes(self, images: torch.Tensor, source_grid: bool = True) -> list[Volume]:
        """Images as Volumes in the source's units, file type and geometry.

        An image of the scale used (the finest, or an earlier one of an unfinished run or ``--use-scale``) is
        resampled onto the source grid when that grid is different (``max_size``, anisotropy or a coarse scale),
        with ``source_grid``, so every sample of a run lands on the source's grid. A retargeted size keeps its own
        grid: the stage's voxel size, the source's origin and orientation.
        """
        info = self.run.info
        source_affine = np.asarray(info.source_affine, dtype=np.float64)
        source_shape = tuple(info.source_shape)
        voxel_shape = self.shapes[-1]
        affine = resized_affine(source_affine, source_shape, voxel_shape)
        plane = resized_plane(info.source_plane, source_shape, voxel_shape)
        on_source = source_grid and tuple(images.shape[2:]) == voxel_shape and voxel_shape != source_shape
        if on_source:
            images = resize(images, source_shape)
            affine, plane = source_affine, info.source_plane
        header = decode_header(info.nifti_header)
        dtype = np.dtype(info.output_dtype)
        return [Volume(array, affine, info.output_suffix, dtype, header, info.labels, plane=plane)
                for array in self.to_source_units(images)]


def _crop(whole: torch.Tensor, box: regions.Box) -> torch.Tensor:
    return whole[regions.box_slices(box)]


class SampleNoise:
    """The noise of a batch of samples as ``noise(stage, box)`` for region forwards, and whole for one-piece ones.

    Sample j's stage noise comes from a ``regions.NoiseField`` seeded with ``seeds[j]``, so its values depend on
    the seed, the stage and the position only, not on the batch, the tiles or whether it is tiled at all; a stage in
    ``fixed`` (a source of [1, C, *box] boxes: the reconstruction input, an injected image) is the same for every
    sample.
    """

    def __init__(self, generator: GrowingGenerator, shapes: Sequence[Shape], seeds: Sequence[int],
                 fixed: dict[int, Callable[[regions.Box], torch.Tensor]], chunk: int, cache_bytes: int) -> None:
        self.shapes = [tuple(s) for s in shapes]
        self.batch_size = len(seeds)
        self.fixed = dict(fixed)
        self.fields = [regions.NoiseField.for_generator(generator, self.shapes, seed, chunk=chunk,
                                                        cache_bytes=cache_bytes // max(1, len(seeds)))
                       for seed in seeds]
        self.grids = [generator.noise_shape(k, s)[2:] for k, s in enumerate(self.shapes)]
        self.device = generator.noise_amps.device

    def __call__(self, stage: int, box: regions.Box) -> torch.Tensor:
        if stage in self.fixed:
            part = self.fixed[stage](box).to(self.device)
            return part.expand(self.batch_size, *part.shape[1:])
        return torch.cat([field(stage, box) for field in self.fields])

    def whole_noise(self) -> list[torch.Tensor]:
        """Every stage's whole noise, for ``generator(noise)``."""
        return [self(stage, regions.whole_box(grid)) for stage, grid in enumerate(self.grids)]


class AugmentationDataset(torch.utils.data.Dataset):
    """Fresh samples from a trained pyramid as a torch Dataset, for a ``DataLoader`` (workers included).

    Item i is a float32 tensor [C, *spatial] in the source's units (for a run trained with labels, a pair of it and
    its int64 label map [1, *spatial]). With a ``seed``, item i is the same on every epoch
    and in every worker; with ``seed=None``, every access draws a new sample. The generator is loaded lazily in each
    worker process, so the dataset pickles cheaply.

    ``as_dict``: items are MONAI-style dictionaries instead, ``{"image": ..., "label": ...}`` (no label without
    one), laid out as MONAI's ``LoadImaged`` reads the sample file ``consingan sample`` writes (on the source's
    grid, spatial axes x first, a RAS affine): ``MetaTensor``s carrying the affine when MONAI is installed, else
    plain tensors and an ``"affine"`` entry (see ``consingan.io.export.monai_item``).
    """

    def __init__(self, run_dir: Path | str, length: int, seed: int | None = None, start_scale: int = 0,
                 scale_factors: Sequence[float] | None = None, device: str = "cpu", as_dict: bool = False) -> None:
        RunFolder.open(run_dir, "singan")  # fail now, not in a worker
        self.run_dir, self.length, self.seed = Path(run_dir), length, seed
        self.options = dict(start_scale=start_scale, scale_factors=scale_factors)
        self.device = device
        self.as_dict = as_dict
        self._pyramid: TrainedPyramid | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self._pyramid is None:
            self._pyramid = TrainedPyramid.load(self.run_dir, device=self.device)
        # A DataLoader seeds each worker's torch RNG differently, so unseeded draws differ across workers.
        if self.seed is not None:  # item i equals sample i of `consingan sample --seed SEED`
            image = self._pyramid.sample(1, seed=self.seed, first_index=index, **self.options)
        else:
            image = self._pyramid.sample(1, seed=int(torch.randint(0, 2**62, (1,)).item()), **self.options)
        if self.as_dict:
            return self._dict_item(image, index)
        array = self._pyramid.to_source_units(image)[0]
        if self._pyramid.labels is None:
            return torch.from_numpy(array)
        image_part, label = self._pyramid.labels.split(array)
        return torch.from_numpy(image_part), torch.from_numpy(label)

    def _dict_item(self, image: torch.Tensor, index: int) -> dict:
        """The MONAI-style item of one generated image [1, C, *spatial], on the grid of the sample files."""
        from consingan.io.export import monai_item

        volume = self._pyramid.to_volumes(image)[0]
        image_part, label = (volume.array, None) if volume.labels is None else volume.labels.split(volume.array)
        name = f"{self.run_dir}#sample_{index:04d}" if self.seed is not None else f"{self.run_dir}#unseeded"
        return monai_item(image_part.astype(np.float32), label, volume.affine, name)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pyramid"] = None
        return state


def write_samples(
    pyramid: TrainedPyramid,
    out_dir: Path | str,
    num: int,
    seed: int = 0,
    source_dtype: bool = False,
    batch_size: int = 8,
    progress: Progress | None = None,
    **options,
) -> list[Path]:
    """Write ``num`` samples (``sample_0000`` ...) in the source's file type and geometry, plus ``contact_sheet.png``;
    a run trained with labels also writes ``sample_0000_label`` ... integer label maps on the same grid.

    Batch by batch: memory stays that of one batch, files appear as they are made and ``progress(done, num)`` is
    called after each batch. Nothing is overwritten: if any target file exists the call fails before generating
    anything; when the first batch shows the whole draw would not fit the free disk, or writing fails (a full disk),
    what was written is removed and a one-line ``ConsinganError`` says why.
    """
    pyramid.check_options(num, batch_size, options.get("scale_factors"), options.get("shape"),
                          options.get("start_scale", 0))
    out_dir = Path(out_dir)
    suffix = output_suffix(pyramid.run.info.output_suffix)
    taken = taken_names(out_dir, num, suffix, pyramid.labels is not None)
    if taken:
        raise ConsinganError(f"{out_dir} already holds {taken[0]}{' and more' if len(taken) > 1 else ''}; "
                             f"choose another --out")
    written, previews = [], []
    with OutputFolder(out_dir) as folder:
        for first in range(0, num, batch_size):
            count = min(batch_size, num - first)
            images = pyramid.sample(count, seed=seed, batch_size=batch_size, first_index=first, **options)
            for index, volume in enumerate(pyramid.to_volumes(images), first):
                path = out_dir / f"sample_{index:04d}{suffix}"
                folder.add(path, *([out_dir / f"sample_{index:04d}_label{suffix}"] if pyramid.labels else []))
                written.extend(write_outputs(path, volume, source_dtype=source_dtype))
            for image in images[: max(0, CONTACT_SHEET_SAMPLES - len(previews))]:
                channels = image.numpy()
                shown = channels[: pyramid.image_channels]
                previews.append((shown, label_image(channels[pyramid.image_channels:])) if pyramid.labels else shown)
            if first == 0:  # the first batch's files tell what the whole draw needs on the disk
                folder.check_room(count, num)
            if progress is not None:
                progress(first + count, num)
        folder.add(out_dir / CONTACT_SHEET)
        write_png(out_dir / CONTACT_SHEET, contact_sheet(previews))
    return written


def taken_names(out_dir: Path, num: int, suffix: str, labels: bool = False) -> list[str]:
    """The files of ``out_dir`` that a draw of ``num`` samples would write, found by reading the folder once (not by
    testing ``num`` names: ``--num`` may be a billion)."""
    if not out_dir.is_dir():
        return []
    pattern = re.compile(rf"sample_(\d{{4,}})({'(_label)?' if labels else ''}){re.escape(suffix)}")
    taken = []
    for entry in os.scandir(out_dir):
        match = pattern.fullmatch(entry.name)
        if entry.name == CONTACT_SHEET or match and int(match[1]) < num and match[1] == f"{int(match[1]):04d}":
            taken.append(entry.name)
    return sorted(taken)
