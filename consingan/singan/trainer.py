"""Concurrent multi-scale training of ConSinGAN (Hinz et al. 2020) on one 2D image or 3D volume."""

from __future__ import annotations

import csv
import dataclasses
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from consingan import __version__
from consingan.checkpoint import save_json, save_state
from consingan.config import TrainConfig
from consingan.errors import ConsinganError
from consingan.io import IntensityRange, Volume, read_volume, write_volume
from consingan.io.preview import preview_grid, write_png
from consingan.losses import (
    gradient_penalty,
    reconstruction_loss,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)
from consingan.singan.models import Critic, GrowingGenerator
from consingan.singan.pyramid import Shape, build_pyramid, pyramid_shapes

LOSS_NAMES = ("critic", "gradient_penalty", "adversarial", "reconstruction")


@dataclass
class ScaleSummary:
    """What one scale's training ended with."""

    stage: int
    shape: Shape
    epochs: int
    seconds: float
    noise_amp: float
    losses: dict[str, float]
    lr_end: float


@dataclass
class TrainResult:
    run_dir: Path
    config: TrainConfig
    scales: list[ScaleSummary] = field(default_factory=list)


class Reporter(Protocol):
    """Receives progress; the CLI implements it with rich, the library default stays silent."""

    def start_scale(self, stage: int, shape: Shape, epochs: int) -> None: ...
    def update(self, stage: int, epoch: int, losses: dict[str, float]) -> None: ...
    def end_scale(self, summary: ScaleSummary) -> None: ...


class SilentReporter:
    def start_scale(self, stage: int, shape: Shape, epochs: int) -> None:
        pass

    def update(self, stage: int, epoch: int, losses: dict[str, float]) -> None:
        pass

    def end_scale(self, summary: ScaleSummary) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConsinganError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def scale_dir(run_dir: Path, stage: int) -> Path:
    return run_dir / f"scale_{stage:02d}"


class SinGANTrainer:
    """Trains the growing generator and critic scale by scale, writing one checkpoint folder per scale.

    Within a scale, the newest ``active_scales`` stages train together (older ones frozen); each epoch makes
    ``Dsteps`` critic updates (WGAN-GP) on one fixed fake, then ``Gsteps`` generator updates, each from its own noise
    with its own gradient (the reference applied one gradient ``Gsteps`` times), with the adversarial loss plus
    ``alpha_rec_loss`` x MSE of the fixed-noise reconstruction.
    """

    def __init__(
        self,
        config: TrainConfig,
        volume: Volume,
        run_dir: Path,
        reporter: Reporter | None = None,
    ) -> None:
        self.config = config
        self.volume = volume
        self.run_dir = run_dir
        self.reporter = reporter or SilentReporter()
        self.device = resolve_device(config.device)
        self.intensity = IntensityRange.of(volume.array)
        self.shapes = pyramid_shapes(volume.spatial_shape, config.num_scales, config.max_size, config.min_size)
        image = torch.from_numpy(self.intensity.normalise(volume.array))[None].to(self.device)
        self.reals = build_pyramid(image, self.shapes)
        block = dict(
            num_feature_channels=config.num_feature_channels, num_layers=config.num_layers,
            kernel_size=config.kernel_size, padding=config.padding, negative_slope=config.lrelu_alpha, cbam=config.cbam,
        )
        self.generator = GrowingGenerator(config.dimension, volume.channels, **block).to(self.device)
        self.critic = Critic(config.dimension, volume.channels, batch_norm=config.batch_norm, **block).to(self.device)

    # --- one scale -----------------------------------------------------------------------------------------------

    def grow(self, stage: int) -> None:
        """Add stage ``stage`` (a copy of the previous one), fix its reconstruction noise and set its amplitude.

        Stage 0 reconstructs from the coarsest real image itself (as ConSinGAN does for generation); later stages
        from fixed random noise. A new stage's amplitude is ``noise_amp`` x RMSE between the real image at its scale
        and the reconstruction made just after it was added with amplitude 0.
        """
        generator = self.generator
        if stage > 0:
            generator.add_stage()
            noise = torch.randn(generator.noise_shape(stage, self.shapes[stage]), device=self.device)
        else:
            noise = self.reals[0].clone()
        generator.set_reconstruction_noise(stage, noise)
        if stage > 0:
            with torch.no_grad():
                generator.set_noise_amp(stage, 0.0)
                reconstruction = generator(generator.reconstruction_inputs())
                rmse = reconstruction_loss(reconstruction, self.reals[stage]).sqrt().item()
            generator.set_noise_amp(stage, self.config.noise_amp * rmse)

    def make_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, list]:
        config = self.config
        betas = (config.beta1_adam, 0.999)
        groups = self.generator.param_groups(config.active_scales, config.lr, config.lr_factor)
        optimizer_g = torch.optim.Adam(groups, lr=config.lr, betas=betas)
        optimizer_d = torch.optim.Adam(self.critic.parameters(), lr=config.lr, betas=betas)
        milestone = max(1, round(config.lr_decay_at * config.epochs))
        schedulers = [
            torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=config.gamma_scheduler)
            for optimizer in (optimizer_g, optimizer_d)
        ]
        return optimizer_g, optimizer_d, schedulers

    def train_epoch(
        self, stage: int, optimizer_g: torch.optim.Optimizer, optimizer_d: torch.optim.Optimizer
    ) -> dict[str, float]:
        config, generator, critic = self.config, self.generator, self.critic
        real = self.reals[stage]
        shapes = self.shapes[: stage + 1]

        # The fake does not change while only the critic learns: generate it once for all critic steps.
        with torch.no_grad():
            fake = generator(generator.sample_noise(shapes))
        critic.requires_grad_(True)
        for _ in range(config.Dsteps):
            optimizer_d.zero_grad(set_to_none=True)
            critic_loss = wasserstein_critic_loss(critic(real), critic(fake))
            penalty = gradient_penalty(critic, real, fake)
            (critic_loss + config.lambda_grad_penalty * penalty).backward()
            optimizer_d.step()

        critic.requires_grad_(False)  # no critic gradients are needed for generator updates
        rec_inputs = generator.reconstruction_inputs()
        use_rec = config.alpha_rec_loss > 0
        for _ in range(config.Gsteps):
            optimizer_g.zero_grad(set_to_none=True)
            noise = generator.sample_noise(shapes)
            if use_rec:
                # One batch of two (random, fixed) instead of two passes: the generator has no batch statistics, so
                # this is the same computation, and a batch of 2 takes PyTorch's fast CPU convolution path.
                output = generator([torch.cat([n, r]) for n, r in zip(noise, rec_inputs)])
                fake, rec = output[:1], reconstruction_loss(output[1:], real)
            else:
                fake, rec = generator(noise), torch.zeros((), device=real.device)
            adversarial = wasserstein_generator_loss(critic(fake))
            (adversarial + config.alpha_rec_loss * rec).backward()
            optimizer_g.step()
        critic.requires_grad_(True)
        return {
            "critic": critic_loss.item(), "gradient_penalty": penalty.item(),
            "adversarial": adversarial.item(), "reconstruction": rec.item(),
        }

    def train_scale(self, stage: int) -> ScaleSummary:
        config = self.config
        self.grow(stage)
        optimizer_g, optimizer_d, schedulers = self.make_optimizers()
        self.reporter.start_scale(stage, self.shapes[stage], config.epochs)
        history: list[dict[str, float]] = []
        started = time.perf_counter()
        for epoch in range(config.epochs):
            losses = self.train_epoch(stage, optimizer_g, optimizer_d)
            for scheduler in schedulers:
                scheduler.step()
            if not all(math.isfinite(v) for v in losses.values()):
                raise ConsinganError(f"training diverged at scale {stage}, epoch {epoch + 1} (losses {losses}); "
                                     f"try a lower --lr")
            history.append(losses)
            self.reporter.update(stage, epoch + 1, losses)
            if config.save_every and (epoch + 1) % config.save_every == 0 and epoch + 1 < config.epochs:
                self.write_outputs(stage, epoch + 1)
        seconds = time.perf_counter() - started
        self.write_outputs(stage, config.epochs)
        summary = ScaleSummary(
            stage=stage, shape=self.shapes[stage], epochs=config.epochs, seconds=seconds,
            noise_amp=float(self.generator.noise_amps[stage]), losses=history[-1],
            lr_end=optimizer_g.param_groups[-1]["lr"],
        )
        self.save_scale(stage, summary, history)
        self.reporter.end_scale(summary)
        return summary

    # --- outputs -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def write_outputs(self, stage: int, epoch: int) -> None:
        """One random sample and one reconstruction in the input's file type and geometry, plus a PNG preview."""
        generator = self.generator
        was_training = generator.training
        generator.eval()
        sample = generator(generator.sample_noise(self.shapes[: stage + 1]))[0].cpu().numpy()
        reconstruction = generator(generator.reconstruction_inputs())[0].cpu().numpy()
        generator.train(was_training)
        folder = scale_dir(self.run_dir, stage) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (("sample", sample), ("reconstruction", reconstruction)):
            write_volume(folder / f"epoch{epoch:05d}_{name}", self.volume.with_array(self.intensity.denormalise(array)))
        real = self.reals[stage][0].cpu().numpy()
        write_png(folder / f"epoch{epoch:05d}_preview.png", preview_grid([real, sample, reconstruction]))

    def save_scale(self, stage: int, summary: ScaleSummary, history: Sequence[dict[str, float]]) -> None:
        folder = scale_dir(self.run_dir, stage)
        folder.mkdir(parents=True, exist_ok=True)
        save_state(folder / "generator.pt", self.generator.state_dict())
        save_state(folder / "critic.pt", self.critic.state_dict())
        with open(folder / "losses.csv", "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["epoch", *LOSS_NAMES])
            writer.writeheader()
            for epoch, losses in enumerate(history, 1):
                writer.writerow({"epoch": epoch, **{k: f"{v:.6g}" for k, v in losses.items()}})
        meta = dataclasses.asdict(summary)
        meta["shapes"] = [list(s) for s in self.shapes[: stage + 1]]
        meta["noise_amps"] = self.generator.noise_amps.tolist()
        save_json(folder / "scale.json", meta)

    def run_info(self) -> dict:
        """What sampling needs besides the weights: shapes, channels, intensity range, geometry and source type."""
        return {
            "consingan_version": __version__,
            "image": str(Path(self.config.image).resolve()),
            "spatial_dims": self.config.dimension,
            "channels": self.volume.channels,
            "source_shape": list(self.volume.spatial_shape),
            "source_suffix": self.volume.suffix,
            "source_dtype": str(self.volume.source_dtype),
            "source_affine": self.volume.affine.tolist(),
            "shapes": [list(s) for s in self.shapes],
            "intensity": self.intensity.to_dict(),
        }

    def train(self) -> list[ScaleSummary]:
        save_json(self.run_dir / "run.json", self.run_info())
        self.generator.train()
        self.critic.train()
        return [self.train_scale(stage) for stage in range(self.config.num_scales)]


# --- entry point used by the CLI and by Python users ------------------------------------------------------------------


def find_image(config: TrainConfig) -> Path:
    """The image path as given, or inside ``data_dir`` when the path alone does not exist."""
    if not config.image:
        raise ConsinganError("no image given; pass --image PATH")
    path = Path(config.image)
    if path.exists():
        return path
    candidate = Path(config.data_dir) / path
    if not path.is_absolute() and candidate.exists():
        return candidate
    raise ConsinganError(f"image not found: {path}")


def create_run_dir(config: TrainConfig, image: Path) -> Path:
    """Make a new run folder under ``out_dir``; an existing folder is never reused or overwritten."""
    root = Path(config.out_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if config.run_name:
            run_dir = root / config.run_name
            if run_dir.exists():
                raise ConsinganError(f"run folder {run_dir} already exists; choose another --run-name "
                                     f"(a run is only continued by --resume)")
            run_dir.mkdir()
            return run_dir
        stem = image.name.split(".")[0] or "run"
        for number in range(1, 100000):
            run_dir = root / f"{stem}_{number:03d}"
            try:
                run_dir.mkdir()  # atomic: two runs started together never share a folder
                return run_dir
            except FileExistsError:
                continue
    except PermissionError:
        raise ConsinganError(f"output folder {root} cannot be written (permission denied)") from None
    except NotADirectoryError:
        raise ConsinganError(f"output folder {root} is not a folder") from None
    except FileExistsError:
        raise ConsinganError(f"output folder {root} exists and is not a folder") from None
    except OSError as error:
        raise ConsinganError(f"output folder {root} cannot be written: {error.strerror}") from None
    raise ConsinganError(f"no free run folder name under {root}")


def prepare(config: TrainConfig) -> tuple[TrainConfig, Volume]:
    """Validate the configuration and read the image, before anything is written."""
    config = config.validate()
    if config.seed is None:
        config = dataclasses.replace(config, seed=secrets.randbelow(2**31))
    image = find_image(config)
    config = dataclasses.replace(config, image=str(image))
    volume = read_volume(image, config.dimension)
    pyramid_shapes(volume.spatial_shape, config.num_scales, config.max_size, config.min_size)  # fails early
    resolve_device(config.device)
    return config, volume


def train(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Train a pyramid on ``config.image``; returns the run folder and per-scale summaries.

    Every check (options, image, pyramid, device, output folder) happens before the first file is written.
    """
    return train_prepared(*prepare(config), reporter)


def train_prepared(config: TrainConfig, volume: Volume, reporter: Reporter | None = None) -> TrainResult:
    """``train`` for a configuration and volume that ``prepare`` returned."""
    run_dir = create_run_dir(config, Path(config.image))
    config.save_json(run_dir / "config.json")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    trainer = SinGANTrainer(config, volume, run_dir, reporter)
    return TrainResult(run_dir, config, trainer.train())
