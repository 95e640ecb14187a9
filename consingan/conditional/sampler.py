"""Samples of a trained class-conditional GAN (its EMA generator): per class, seeded, written in the data's type."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from consingan.conditional.models import ConditionalGenerator, build_models
from consingan.errors import ConsinganError
from consingan.io import Volume, output_suffix, write_volume
from consingan.io.preview import contact_sheet, write_png
from consingan.outputs import OutputFolder, Progress, out_refusal
from consingan.runs import RunFolder, load_module_state

MODEL_NAMES = ("generator", "discriminator")
EMA_NAME = "generator_ema"
PREVIEW_PER_CLASS = 6
PREVIEW_SEED = 12345  # the preview's fixed noise, so previews of successive epochs compare
NOISE_CHUNK = 1024  # samples whose noise is drawn at once (the draw of up to this many is one torch.randn)


def class_noise_chunks(seed: int, class_index: int, count: int, noise_dim: int) -> Iterator[torch.Tensor]:
    """Noise for ``count`` samples of one class, ``NOISE_CHUNK`` rows [n, noise_dim] at a time (so a draw of
    millions holds one chunk): a stream of its own per (seed, class), so a class's samples do not depend on which
    other classes are drawn, and the same seed gives the same files."""
    state = np.random.SeedSequence([seed, class_index]).generate_state(2, np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] & np.uint64(2**63 - 1)))
    for start in range(0, count, NOISE_CHUNK):
        yield torch.randn(min(NOISE_CHUNK, count - start), noise_dim, generator=generator)


def class_noise(seed: int, class_index: int, count: int, noise_dim: int) -> torch.Tensor:
    """The noise of ``class_noise_chunks`` in one tensor [count, noise_dim]."""
    chunks = list(class_noise_chunks(seed, class_index, count, noise_dim))
    return torch.cat(chunks) if chunks else torch.empty(0, noise_dim)


@torch.no_grad()
def generate_batches(generator: ConditionalGenerator, class_index: int, count: int, seed: int,
                     device: torch.device, batch_size: int = 16) -> Iterator[torch.Tensor]:
    """``count`` images of one class in [-1, 1], ``batch_size`` [n, C, *size] at a time."""
    generator.eval()
    for noise in class_noise_chunks(seed, class_index, count, generator.noise_dim):
        for start in range(0, len(noise), batch_size):
            chunk = noise[start:start + batch_size].to(device)
            labels = torch.full((len(chunk),), class_index, dtype=torch.int64, device=device)
            yield generator(chunk, labels).float().cpu()


def generate(generator: ConditionalGenerator, class_index: int, count: int, seed: int, device: torch.device,
             batch_size: int = 16) -> torch.Tensor:
    """``count`` images [count, C, *size] in [-1, 1] of one class."""
    parts = list(generate_batches(generator, class_index, count, seed, device, batch_size))
    return torch.cat(parts) if parts else torch.empty(0)


def preview_grid_png(path: Path, generator: ConditionalGenerator, classes: list[str], noise_dim: int,
                     device: torch.device, real: tuple[torch.Tensor, torch.Tensor] | None = None,
                     per_class: int = PREVIEW_PER_CLASS) -> Path:
    """One row per class: a real image of the class first (when given), then ``per_class`` samples."""
    was_training = generator.training
    items = []
    for index, _ in enumerate(classes):
        if real is not None:
            members = (real[1] == index).nonzero()
            if len(members):
                items.append(real[0][int(members[0])].numpy())
        items += [image.numpy() for image in generate(generator, index, per_class, PREVIEW_SEED, device)]
    columns = per_class + (1 if real is not None else 0)
    generator.train(was_training)
    return write_png(path, contact_sheet(items, columns=columns, gap=4, min_panel=96))


@dataclass
class TrainedConditional:
    """A conditional run's EMA generator with what writing its samples needs."""

    run: RunFolder
    generator: ConditionalGenerator
    device: torch.device

    @classmethod
    def load(cls, run_dir: Path | str, device: str | None = None) -> "TrainedConditional":
        run = RunFolder.open(run_dir, "conditional")
        where = run.path / RunFolder.WEIGHTS
        if not where.is_file():
            raise ConsinganError(f"{run.path} has no {RunFolder.WEIGHTS} yet (training has not finished; "
                                 f"--resume it)")
        resolved = run.device(device)
        generator, _ = build_models(run.config, run.info.channels, len(run.info.classes))
        load_module_state(generator, run.read_state(where, resolved), where)
        return cls(run, generator.to(resolved).eval(), resolved)

    @property
    def classes(self) -> list[str]:
        return self.run.info.classes

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise ConsinganError(f"unknown class {name!r}; this run has {', '.join(self.classes)}")
        return self.classes.index(name)

    def sample(self, name: str, count: int, seed: int) -> torch.Tensor:
        return generate(self.generator, self.class_index(name), count, seed, self.device)

    def write(self, out: Path, names: list[str], count: int, seed: int, progress: Progress | None = None
              ) -> list[Path]:
        """``count`` samples of each class in ``names`` under ``out/<class>/``, in the training data's file type,
        data type and intensity range. ``out`` must not exist (nothing is overwritten).

        Batch by batch (``progress(done, total)`` after each): when the first batch shows the whole draw would not
        fit the free disk, or a write fails (a full disk), ``out`` is removed and a one-line error says why."""
        if out_refusal(out):
            raise ConsinganError(f"--out {out_refusal(out)}")
        indices = [self.class_index(name) for name in names]
        info = self.run.info
        dims = info.spatial_dims
        suffix = output_suffix(info.output_suffix)
        written, total = [], count * len(names)
        with OutputFolder(out) as made:
            for name, index in zip(names, indices):
                folder = out / name
                folder.mkdir()
                # The class's reference grid: its first training image's position, orientation and extent.
                grid = np.asarray(info.class_grids[index]) if info.class_grids else np.eye(dims + 1)
                plane = info.class_planes[index] if info.class_planes else None  # a DICOM slice's place
                plane = None if plane is None else np.asarray(plane, dtype=np.float64)
                number = 0
                for images in generate_batches(self.generator, index, count, seed, self.device):
                    for image in images:
                        array = info.intensity.denormalise(image.numpy())
                        volume = Volume(array, grid, info.output_suffix, np.dtype(info.output_dtype), plane=plane)
                        path = folder / f"{name}_{number:04d}{suffix}"
                        number += 1
                        made.add(path)
                        written.append(write_volume(path, volume, source_dtype=True))
                    if len(written) == len(images):  # the first batch tells what the whole draw needs on the disk
                        made.check_room(len(written), total)
                    if progress is not None:
                        progress(len(written), total)
        return written
