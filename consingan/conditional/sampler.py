"""Samples of a trained class-conditional GAN (its EMA generator): per class, seeded, written in the data's type."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from consingan.conditional.models import ConditionalGenerator, build_models
from consingan.errors import ConsinganError
from consingan.io import Volume, write_volume
from consingan.io.preview import contact_sheet, write_png
from consingan.runs import RunFolder, load_weights

MODEL_NAMES = ("generator", "discriminator")
EMA_NAME = "generator_ema"
PREVIEW_PER_CLASS = 6
PREVIEW_SEED = 12345  # the preview's fixed noise, so previews of successive epochs compare


def class_noise(seed: int, class_index: int, count: int, noise_dim: int) -> torch.Tensor:
    """Noise [count, noise_dim] for one class: a stream of its own per (seed, class), so a class's samples do not
    depend on which other classes are drawn, and the same seed gives the same files."""
    state = np.random.SeedSequence([seed, class_index]).generate_state(2, np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] & np.uint64(2**63 - 1)))
    return torch.randn(count, noise_dim, generator=generator)


@torch.no_grad()
def generate(generator: ConditionalGenerator, class_index: int, count: int, seed: int, device: torch.device,
             batch_size: int = 16) -> torch.Tensor:
    """``count`` images [count, C, *size] in [-1, 1] of one class."""
    noise = class_noise(seed, class_index, count, generator.noise_dim)
    generator.eval()
    parts = []
    for start in range(0, count, batch_size):
        chunk = noise[start:start + batch_size].to(device)
        labels = torch.full((len(chunk),), class_index, dtype=torch.int64, device=device)
        parts.append(generator(chunk, labels).float().cpu())
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
        load_weights(generator, run.load_weights(where, resolved), where)
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

    def write(self, out: Path, names: list[str], count: int, seed: int) -> list[Path]:
        """``count`` samples of each class in ``names`` under ``out/<class>/``, in the training data's file type,
        data type and intensity range. ``out`` must not exist (nothing is overwritten)."""
        if out.exists():
            raise ConsinganError(f"{out} already exists; choose a new --out folder")
        indices = [self.class_index(name) for name in names]
        info = self.run.info
        dims = info.spatial_dims
        written = []
        out.mkdir(parents=True)
        for name, index in zip(names, indices):
            folder = out / name
            folder.mkdir()
            images = generate(self.generator, index, count, seed, self.device)
            for number, image in enumerate(images):
                array = info.intensity.denormalise(image.numpy())
                volume = Volume(array, np.eye(dims + 1), info.output_suffix, np.dtype(info.output_dtype))
                written.append(write_volume(folder / f"{name}_{number:04d}", volume, source_dtype=True))
        return written
