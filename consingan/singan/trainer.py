"""Concurrent multi-scale training of ConSinGAN (Hinz et al. 2020) on one 2D image or 3D volume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from consingan.config import TrainConfig, with_seed
from consingan.epochs import load_optimizer_states, random_states, restore_random_states, resumed_config
from consingan.errors import ConsinganError
from consingan.io import IntensityRange, LabelEncoding, Volume, encode_header, read_volume, write_outputs
from consingan.io.preview import label_image, preview_grid, write_png
from consingan.nn.ema import ParameterAverage
from consingan.losses import (
    diversity_shortfall,
    gradient_penalty,
    joint_scores,
    reconstruction_loss,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)
from consingan.outputs import check_encodable
from consingan.singan.health import ScaleHealth, check_scale
from consingan.singan.memory import MemoryPlan, available_bytes, check_memory, patch_shape, patched
from consingan.runs import RunFolder, RunInfo, TrainingState, first_reason, load_module_state, resolve_device
from consingan.singan.models import Critic, GrowingGenerator, architecture, check_network_fits, generator_arguments
from consingan.singan.pyramid import Shape, build_pyramid, pyramid_shapes
from consingan.singan.regions import (
    Box,
    FreshNoise,
    NoiseField,
    box_shape,
    box_slices,
    generate_tiled,
    largest_tile,
    region_forward,
)

LOSS_NAMES = ("critic", "gradient_penalty", "adversarial", "reconstruction")
# Memory for the whole outputs of a scale trained on patches: each tile's forward, and the coarse stages kept whole
# between tiles, within this much each (or a fifth of the free memory, if less), so that the outputs stay within the
# bound that the training itself keeps.
OUTPUT_BYTES = 4 * 2**30
# The generator's moving average (``TrainConfig.ema_decay``) in a training state, beside 'generator' and 'critic'.
EMA_STATE = "generator_average"


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
    health: dict = field(default_factory=dict)  # ScaleHealth.to_dict(): measures and warnings

    @classmethod
    def from_meta(cls, meta: dict) -> "ScaleSummary":
        """From a scale.json (which holds more keys than these; older ones lack ``health``)."""
        values = {f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta}
        return cls(**{**values, "shape": tuple(values["shape"])})


@dataclass
class TrainResult:
    run_dir: Path
    config: TrainConfig
    scales: list[ScaleSummary] = field(default_factory=list)


@dataclass(frozen=True)
class _Steps:
    """What one epoch trains on (whole images or patches): ``fake()`` the critic's fake (called without gradient),
    ``real()`` a real image to score beside a fake, ``generate(with_rec)`` a fake, the reconstruction loss and, when
    the diversity loss is on, a second fake from other noise (of the same region), else None."""

    fake: Callable[[], torch.Tensor]
    real: Callable[[], torch.Tensor]
    generate: Callable[[bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


class Reporter(Protocol):
    """Receives progress; the CLI implements it with rich, the library default stays silent."""

    def start_scale(self, stage: int, shape: Shape, epochs: int) -> None: ...
    def update(self, stage: int, epoch: int, losses: dict[str, float]) -> None: ...
    def end_scale(self, summary: ScaleSummary) -> None: ...
    def warn(self, stage: int, message: str) -> None: ...


class SilentReporter:
    def start_scale(self, stage: int, shape: Shape, epochs: int) -> None:
        pass

    def update(self, stage: int, epoch: int, losses: dict[str, float]) -> None:
        pass

    def end_scale(self, summary: ScaleSummary) -> None:
        pass

    def warn(self, stage: int, message: str) -> None:
        pass


def intensity_map(volume: Volume, config: TrainConfig) -> IntensityRange:
    """The per-channel map of ``volume`` onto [-1, 1] that ``config`` asks for (stored in run.json)."""
    percentiles = (config.window_low_percentile, config.window_high_percentile)
    # Principal axes span the image's own channels only: one-hot label channels after them keep their own map.
    image_channels = volume.labels.image_channels if volume.labels else volume.channels
    principal = image_channels if config.colour_axes == "principal" else 0
    return IntensityRange.of(volume.array, config.intensity_mapping, percentiles, principal=principal)


def volume_pyramid_shapes(volume: Volume, config: TrainConfig) -> list[Shape]:
    """The pyramid of ``volume``, on its physical extents (its voxel spacing)."""
    return pyramid_shapes(volume.spatial_shape, config.num_scales, config.max_size, config.min_size, volume.spacing)


def scale_dir(run_dir: Path, stage: int) -> Path:
    return RunFolder(run_dir, "singan", None).scale_dir(stage)


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
        run: RunFolder | Path,
        reporter: Reporter | None = None,
    ) -> None:
        self.config = config
        self.volume = volume
        self.run = run if isinstance(run, RunFolder) else RunFolder(Path(run), "singan", config)
        self.run_dir = self.run.path
        self.reporter = reporter or SilentReporter()
        self.device = resolve_device(config.device)
        self.autocast_dtype = check_precision(config.precision, self.device)  # a resumed run may change the device
        self.intensity = intensity_map(volume, config)
        self.shapes = volume_pyramid_shapes(volume, config)
        image = torch.from_numpy(self.intensity.normalise(volume.array))[None].to(self.device)
        self.reals = build_pyramid(image, self.shapes)
        # Each scale's mean absolute deviation: the diversity loss measures two samples' difference against it.
        self.spreads = [(real - real.mean()).abs().mean().clamp_min(1e-8) for real in self.reals]
        block = architecture(config)
        self.generator = GrowingGenerator(config.dimension, volume.channels,
                                          **generator_arguments(config)).to(self.device)
        self.critic = Critic(config.dimension, volume.channels, batch_norm=config.batch_norm, **block).to(self.device)
        self.generator.checkpoint_stages = config.checkpoint_stages
        # fp16's gradient scalers, one per optimiser (their losses differ in size); disabled, they pass all through.
        self.scalers = {name: torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
                        for name in ("generator", "critic")}
        self.last_penalty = float("nan")  # the latest gradient penalty (lazy: not computed on every update)
        self.average: ParameterAverage | None = None  # the generator's moving average within the scale (ema_decay)
        # ``prepare`` records the patch 'auto' chose in config.json; a trainer made directly chooses it here.
        self.patch = (check_memory(config, self.shapes, self.device).patch if config.patch_size == "auto"
                      else config.patch_side())
        if self.patch is not None:
            check_network_fits(config, (self.patch,) * config.dimension, "the patch")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training forwards' arithmetic (``TrainConfig.precision``): autocast to bf16 or fp16, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def patched(self, stage: int) -> bool:
        """Whether scale ``stage`` trains on patches: it is larger than the patch on some side."""
        return patched(self.shapes[stage], self.patch)

    def random_box(self, stage: int) -> Box:
        """A box of the patch's shape at a uniformly random place of scale ``stage`` (the training's random state)."""
        return tuple((start, start + size) for start, size in (
            (int(torch.randint(0, n - size + 1, (1,))), size)
            for n, size in zip(self.shapes[stage], patch_shape(self.shapes[stage], self.patch))))

    @torch.no_grad()
    def reconstruct(self, stage: int) -> torch.Tensor:
        """The reconstruction of scale ``stage`` (stages 0..``stage`` on their fixed inputs), whole; in tiles of the
        patch (``generate_tiled``: exact, CBAM with the whole scale's statistics) when the scale trains on patches."""
        generator = self.generator
        if not self.patched(stage):
            return generator(generator.reconstruction_inputs())
        return generate_tiled(generator, generator.reconstruction_source(), self.output_tile(stage), stage + 1,
                              cache_bytes=self.output_bytes())

    @torch.no_grad()
    def sample_tiled(self, stage: int, seed: int, batch_size: int = 1, coarsest_fixed: bool = False) -> torch.Tensor:
        """``batch_size`` random samples of a scale that trains on patches, in tiles of the patch, from a noise field of
        their own seed (so the training's random state is untouched); ``coarsest_fixed`` keeps stage 0 on its
        reconstruction input (a variation, see ``write_outputs``)."""
        generator, shapes = self.generator, self.shapes[: stage + 1]
        field = NoiseField.for_generator(generator, shapes, seed, batch_size=batch_size)
        fixed = generator.reconstruction_source()

        def noise(k: int, box: Box) -> torch.Tensor:
            if k == 0 and coarsest_fixed:
                return fixed(k, box).expand(batch_size, -1, *box_shape(box))
            return field(k, box)

        return generate_tiled(generator, noise, self.output_tile(stage, batch_size), stage + 1, shapes=shapes,
                              cache_bytes=self.output_bytes())

    def output_tile(self, stage: int, batch_size: int = 1) -> int:
        """The tile side of whole outputs (samples, reconstructions) at a scale trained on patches: the largest whose
        forward fits ``OUTPUT_BYTES``, and never below the patch. Without gradients a tile costs a small fraction of a
        training patch of its size, and a larger tile recomputes less of its receptive margins (at the patch's side,
        46 voxels at 250^3, the margins would about triple the work of every output)."""
        return max(self.patch, largest_tile(self.generator, stage + 1, self.output_bytes(), batch_size))

    def output_bytes(self) -> int:
        """The memory a whole output's tile (and, apart, its kept coarse stages) may take: see ``OUTPUT_BYTES``."""
        return int(min(OUTPUT_BYTES, 0.2 * available_bytes(self.device)))

    # --- one scale -----------------------------------------------------------------------------------------------

    def grow(self, stage: int) -> None:
        """Add stage ``stage`` (a copy of the previous one), fix its reconstruction noise and set its amplitude.

        Stage 0 reconstructs from the coarsest real image itself (as ConSinGAN does for generation; with
        ``anchor_layout`` the image is its anchor instead, ``GrowingGenerator.set_anchor``); later stages
        from fixed random noise. A new stage's amplitude is ``noise_amp`` x RMSE between the real image at its scale
        and the reconstruction made just after it was added with amplitude 0.
        """
        generator = self.generator
        if stage > 0:
            generator.add_stage()
        if stage > 0 and self.patched(stage):
            # A field (seed and grid) rather than a tensor: at 256^3 with 64 channels the tensor is 4 GiB, in every
            # checkpoint; the seed is drawn from the training's random state, so a run stays reproducible.
            generator.set_reconstruction_field(stage, int(torch.randint(0, 2**62, (1,))), self.shapes[stage])
        elif stage == 0 and self.config.anchor_layout > 0:
            # An adapted warp starts undeformed and grows only while the samples vary less than asked for.
            warp = 0.0 if self.config.anchor_warp_target > 0 else self.config.anchor_warp
            generator.set_anchor(self.reals[0], self.config.anchor_layout, warp)
        else:
            noise = (torch.randn(generator.noise_shape(stage, self.shapes[stage]), device=self.device) if stage > 0
                     else self.reals[0].clone())
            generator.set_reconstruction_noise(stage, noise)
        if stage > 0:
            with torch.no_grad():
                generator.set_noise_amp(stage, 0.0)
                rmse = reconstruction_loss(self.reconstruct(stage), self.reals[stage]).sqrt().item()
            generator.set_noise_amp(stage, self.config.noise_amp * rmse)

    def make_optimizers(self, stage: int | None = None) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, list]:
        """Adam for the trained stages and the critic, each decayed at ``lr_decay_at`` of scale ``stage``'s epochs
        (the newest stage's when None)."""
        config = self.config
        stage = self.generator.num_stages - 1 if stage is None else stage
        betas = (config.beta1_adam, 0.999)
        groups = self.generator.param_groups(config.active_scales, config.lr, config.lr_factor)
        optimizer_g = torch.optim.Adam(groups, lr=config.lr, betas=betas)
        optimizer_d = torch.optim.Adam(self.critic.parameters(), lr=config.lr, betas=betas)
        milestone = max(1, round(config.lr_decay_at * config.epochs_of(stage)))
        schedulers = [
            torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=config.gamma_scheduler)
            for optimizer in (optimizer_g, optimizer_d)
        ]
        return optimizer_g, optimizer_d, schedulers

    def train_epoch(
        self, stage: int, optimizer_g: torch.optim.Optimizer, optimizer_d: torch.optim.Optimizer, epoch: int = 1
    ) -> dict[str, float]:
        config, critic = self.config, self.critic
        steps = self.patch_steps(stage) if self.patched(stage) else self.whole_steps(stage)

        # Forwards under ``autocast`` (bf16/fp16), losses and the penalty's gradient norm in float32 (the steps give
        # float32 images, scores are cast before the loss), backward passes outside it.
        scaler_d, scaler_g = self.scalers["critic"], self.scalers["generator"]
        # The fake does not change while only the critic learns: generate it once for all critic steps.
        with torch.no_grad(), self.autocast():
            fake = steps.fake()
        critic.requires_grad_(True)
        every = config.gradient_penalty_every
        for step in range((epoch - 1) * config.Dsteps, epoch * config.Dsteps):
            optimizer_d.zero_grad(set_to_none=True)
            real = steps.real()
            # Real and fake in one batch (see joint_scores): with batch norm, the only way the critic sees the
            # fake's intensity at all; without it the same scores, and a batch of two takes the faster CPU path.
            with self.autocast():
                scores = joint_scores(critic, real, fake)
            critic_loss = wasserstein_critic_loss(*(score.float() for score in scores))
            loss = critic_loss
            if step % every == 0:  # lazy regularisation: every k-th update, weighted by k
                # fp16: the penalty's inner gradient is taken of scaled scores and unscaled (see gradient_penalty).
                penalty = gradient_penalty(critic, real, fake, config.gradient_penalty,
                                           reference=real if config.batch_norm else None,
                                           precision=self.autocast_dtype,
                                           scale=scaler_d.get_scale() if scaler_d.is_enabled() else 1.0)
                # An fp16 overflow at the scaler's current scale is not a divergence: the scaler skips that step and
                # lowers its scale, and the latest finite penalty stays the one reported.
                if not scaler_d.is_enabled() or torch.isfinite(penalty):
                    self.last_penalty = penalty.item()
                loss = loss + config.lambda_grad_penalty * every * penalty
            scaler_d.scale(loss).backward()
            apply_gradient(scaler_d, optimizer_d)

        critic.requires_grad_(False)  # no critic gradients are needed for generator updates
        use_rec = config.alpha_rec_loss > 0
        # 'repeat' (the reference's scheme): one backward, its gradient applied Gsteps times by Adam.
        backward_passes = config.Gsteps if config.generator_update == "fresh" else 1
        optimizer_steps = 1 if config.generator_update == "fresh" else config.Gsteps
        for _ in range(backward_passes):
            optimizer_g.zero_grad(set_to_none=True)
            with self.autocast():
                fake, rec, second = steps.generate(use_rec)
                # With batch norm the fake is scored beside the real, with the statistics the critic learnt on.
                scores = joint_scores(critic, steps.real(), fake)[1] if config.batch_norm else critic(fake)
            adversarial = wasserstein_generator_loss(scores.float())
            loss = adversarial + config.alpha_rec_loss * rec
            if second is not None and config.diversity_weight > 0:
                shortfall = diversity_shortfall(fake, second, self.spreads[stage], config.diversity_target)
                loss = loss + config.diversity_weight * shortfall
            scaler_g.scale(loss).backward()
            apply_gradient(scaler_g, optimizer_g, optimizer_steps)
            if self.average is not None:
                self.average.update(self.generator)
        critic.requires_grad_(True)
        losses = {
            "critic": critic_loss.item(), "gradient_penalty": self.last_penalty,
            "adversarial": adversarial.item(), "reconstruction": rec.item(),
        }
        if second is not None and config.diversity_weight > 0:
            losses["diversity_shortfall"] = shortfall.item()
        if self.adapts_warp(stage):
            losses["sample_difference"], losses["anchor_warp"] = self.adapt_warp(fake, second, epoch)
        return losses

    # Change of the warp's RMS (voxels) per epoch and unit of the samples' difference below its target: the warp's
    # difference grows about 0.5 per voxel of RMS, so a shortfall of 0.3 takes some 40 epochs to close, while the
    # epoch-to-epoch spread of one pair's difference (about 0.05) moves the warp by a few thousandths.
    WARP_GAIN = 0.05
    # The share of the coarsest scale's epochs before the warp may grow: every young generator ignores its noise
    # (the example volume's samples differ by 0.05 for some 90 epochs, then learn to vary), so only one that still
    # does after this share is deformed; a warp from the first epoch left the example volume's diversity lower.
    WARP_START = 0.6

    def adapts_warp(self, stage: int) -> bool:
        return stage == 0 and self.config.anchor_warp_target > 0  # validate: a target needs a warp and an anchor

    def adapt_warp(self, fake: torch.Tensor, second: torch.Tensor, epoch: int) -> tuple[float, float]:
        """One step of the integral controller of ``anchor_warp_target``: after ``WARP_START`` of the coarsest
        scale's epochs, the warp grows while this epoch's two random samples differ less than the target and shrinks
        while they differ more, within [0, ``anchor_warp``]. Its only state is the generator's ``anchor_warp``
        buffer, so a resumed run follows the same path."""
        config = self.config
        difference = float((fake.detach() - second.detach()).abs().mean() / self.spreads[0])
        buffer = self.generator.anchor_warp
        if epoch > self.WARP_START * config.epochs_of(0):
            value = float(buffer) + self.WARP_GAIN * (config.anchor_warp_target - difference)
            buffer.fill_(min(max(value, 0.0), config.anchor_warp))
        return difference, float(buffer)

    def draws_pairs(self, stage: int) -> bool:
        """Whether each generator step of scale ``stage`` draws two random samples (for the diversity loss, or at the
        coarsest scale for an adapted anchor warp) instead of one."""
        return self.config.diversity_weight > 0 or self.adapts_warp(stage)

    def whole_steps(self, stage: int) -> "_Steps":
        """What an epoch of scale ``stage`` trains on: whole images."""
        generator, real = self.generator, self.reals[stage]
        shapes = self.shapes[: stage + 1]
        rec_inputs = generator.reconstruction_inputs()

        pairs = self.draws_pairs(stage)

        def generate(with_rec: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            noise = generator.sample_noise(shapes, batch_size=2 if pairs else 1)
            # One batch (random, [second random,] fixed) instead of several passes: the generator has no batch
            # statistics, so this is the same computation, and a batch of 2 takes PyTorch's fast CPU convolution path.
            output = generator([torch.cat([n, r]) for n, r in zip(noise, rec_inputs)] if with_rec
                               else noise).float()  # float32 under autocast too
            rec = reconstruction_loss(output[-1:], real) if with_rec else torch.zeros((), device=real.device)
            return output[:1], rec, output[1:2] if pairs else None

        return _Steps(fake=lambda: generator(generator.sample_noise(shapes)).float(), real=lambda: real,
                      generate=generate)

    def patch_steps(self, stage: int) -> "_Steps":
        """What an epoch of a scale larger than the patch trains on: random boxes of the patch's shape.

        The generator computes a box exactly as its whole forward would there (``region_forward``), but for CBAM's
        channel attention, which pools over the box (a patch is attended as an image of its size would be). Stages
        below the concurrently trained ones run without gradient. Every score takes a real box of its own, drawn
        independently of the fake's; the reconstruction loss takes the same box of the reconstruction as the step's
        fake, so that fake and reconstruction are one batch of two, as in whole training.
        """
        generator, real = self.generator, self.reals[stage]
        shapes = self.shapes[: stage + 1]
        fresh, fixed = FreshNoise(generator, shapes), generator.reconstruction_source()
        frozen_below = max(0, stage + 1 - self.config.active_scales)

        def region(noise, box: Box) -> torch.Tensor:  # float32, under autocast too
            return region_forward(generator, noise, box, shapes=shapes, descriptors="region",
                                  frozen_below=frozen_below).float()

        pairs = self.draws_pairs(stage)
        drawn = FreshNoise(generator, shapes, batch_size=2) if pairs else fresh

        def generate(with_rec: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            box = self.random_box(stage)
            output = region(lambda k, part: torch.cat([drawn(k, part), fixed(k, part)]) if with_rec
                            else drawn(k, part), box)
            rec = (reconstruction_loss(output[-1:], real[box_slices(box)]) if with_rec
                   else torch.zeros((), device=real.device))
            return output[:1], rec, output[1:2] if pairs else None

        return _Steps(fake=lambda: region(fresh, self.random_box(stage)),
                      real=lambda: real[box_slices(self.random_box(stage))], generate=generate)

    def train_scale(self, stage: int, resume_state: TrainingState | None = None) -> ScaleSummary:
        """Train scale ``stage`` from its start, or from ``resume_state`` (a training state saved inside it)."""
        config, epochs = self.config, self.config.epochs_of(stage)
        if resume_state is None:
            self.grow(stage)
        optimizer_g, optimizer_d, schedulers = self.make_optimizers(stage)
        self.average = ParameterAverage(self.generator, config.ema_decay) if config.ema_decay else None
        history: list[dict[str, float]] = []
        start_epoch, seconds_before = 0, 0.0
        if resume_state is not None:
            where = self.run.scale_dir(stage) / RunFolder.STATE
            load_optimizer_states(dict(zip(("generator", "critic"), zip((optimizer_g, optimizer_d), schedulers))),
                                  resume_state, where)
            if self.average is not None:
                try:
                    self.average.load_state_dict(resume_state.models[EMA_STATE])
                except (KeyError, ValueError, TypeError) as error:
                    raise ConsinganError(f"{where} has no usable moving average of the generator: "
                                         f"{first_reason(error)}") from None
            start_epoch, seconds_before = resume_state.epoch, resume_state.seconds
            history = resume_state.history
            restore_random_states(resume_state, self.device)
        self.reporter.start_scale(stage, self.shapes[stage], epochs)
        started = time.perf_counter() - seconds_before
        optimizers = (optimizer_g, optimizer_d, schedulers)
        self.run.truncate_stats(self.run.scale_dir(stage), start_epoch)  # later epochs are trained again
        for epoch in range(start_epoch + 1, epochs + 1):
            epoch_started = time.perf_counter()
            losses = self.train_epoch(stage, optimizer_g, optimizer_d, epoch)
            for scheduler in schedulers:
                scheduler.step()
            if not all(math.isfinite(v) for v in losses.values()):
                raise ConsinganError(f"training diverged at scale {stage}, epoch {epoch} (losses {losses}); "
                                     f"try a lower --lr")
            history.append(losses)
            self.run.append_stats(self.run.scale_dir(stage), {
                "scale": stage, "epoch": epoch, "seconds": round(time.perf_counter() - epoch_started, 4), **losses,
                "lr_generator": optimizer_g.param_groups[-1]["lr"], "lr_critic": optimizer_d.param_groups[0]["lr"]})
            self.reporter.update(stage, epoch, losses)
            if epoch < epochs:
                if config.preview_every and epoch % config.preview_every == 0:
                    self.write_outputs(stage, epoch)
                if config.checkpoint_every and epoch % config.checkpoint_every == 0:
                    self.save_training_state(stage, epoch, history, time.perf_counter() - started, optimizers)
        seconds = time.perf_counter() - started
        finished_before = start_epoch >= epochs  # killed between the final state and scale.json
        if self.average is not None:  # the average takes over (again, when resumed after its final state)
            self.average.copy_to(self.generator)
        # One reconstruction for the outputs and the health check: at a scale trained on patches each whole output
        # is a tiled pass over the full volume, minutes at 250^3.
        with self.evaluating():
            reconstruction = self.reconstruct(stage)
        if not finished_before:
            self.write_outputs(stage, epochs, reconstruction)
        health = self.check_health(stage, history, reconstruction=reconstruction)
        for message in health.warnings:
            self.reporter.warn(stage, message)
        summary = ScaleSummary(
            stage=stage, shape=self.shapes[stage], epochs=epochs, seconds=seconds,
            noise_amp=float(self.generator.noise_amps[stage]), losses=history[-1],
            lr_end=optimizer_g.param_groups[-1]["lr"], health=health.to_dict(),
        )
        if not finished_before:
            self.save_training_state(stage, epochs, history, seconds, optimizers)
        self.save_scale(stage, summary, history)
        self.reporter.end_scale(summary)
        return summary

    def load_scalers(self, state: TrainingState, where: Path) -> None:
        """Continue fp16's loss scales where they stood: a fresh scaler would start at 65536 and skip steps while
        it backs off again, so the resumed run would differ from one that never stopped."""
        for name, scaler in self.scalers.items():
            if scaler.is_enabled() and name in state.scalers:
                try:
                    scaler.load_state_dict(state.scalers[name])
                except (KeyError, TypeError, RuntimeError) as error:
                    raise ConsinganError(f"{where}: damaged gradient-scaler state: {error}") from None

    def save_training_state(
        self, stage: int, epoch: int, history: Sequence[dict[str, float]], seconds: float, optimizers: tuple
    ) -> None:
        """Everything needed to continue bit-for-bit: weights, optimizer and scheduler states, losses, RNG state."""
        optimizer_g, optimizer_d, (scheduler_g, scheduler_d) = optimizers
        state = TrainingState(
            stage=stage, epoch=epoch, seconds=seconds,
            models={"generator": self.generator.state_dict(), "critic": self.critic.state_dict(),
                    **({EMA_STATE: self.average.state_dict()} if self.average is not None else {})},
            optimizers={"generator": optimizer_g.state_dict(), "critic": optimizer_d.state_dict()},
            schedulers={"generator": scheduler_g.state_dict(), "critic": scheduler_d.state_dict()},
            history=list(history), **random_states(self.device),
            scalers={name: scaler.state_dict() for name, scaler in self.scalers.items() if scaler.is_enabled()},
        )
        self.run.save_training_state(self.run.scale_dir(stage), state)

    @torch.no_grad()
    def check_health(self, stage: int, history: Sequence[dict[str, float]], num_samples: int | None = None,
                     reconstruction: torch.Tensor | None = None) -> ScaleHealth:
        """Frozen losses, saturated outputs and samples that do not vary (see ``consingan.singan.health``).

        The samples are drawn from a generator of their own, so the check leaves the training's random state alone.
        ``num_samples`` default: 4, or 2 at a scale trained on patches (each a tiled pass over the whole volume; two
        are the least that show whether samples vary). ``reconstruction``: the scale's, when already computed.
        """
        if num_samples is None:
            num_samples = 2 if self.patched(stage) else 4
        with self.evaluating() as generator:
            if self.patched(stage):  # in tiles, from a noise field of the same seed
                samples = self.sample_tiled(stage, stage, num_samples)
            else:
                rng = torch.Generator(device=self.device).manual_seed(stage)
                samples = generator(generator.sample_noise(self.shapes[: stage + 1], num_samples, generator=rng))
            if reconstruction is None:
                reconstruction = self.reconstruct(stage)
        shown = self.image_channels
        trained = self.intensity.channels(shown)
        space = IntensityRange(trained.minimum, trained.maximum)  # evaluate's measurement space: source min-max

        def measured(images: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.from_numpy(space.normalise(trained.denormalise(image.cpu().numpy())))
                                for image in images])

        return check_scale(history, self.reals[stage][:, :shown], samples[:, :shown], reconstruction[:, :shown],
                           measured, last=stage == self.config.num_scales - 1)

    @property
    def image_channels(self) -> int:
        """Channels that are image, not one-hot labels."""
        return self.volume.labels.image_channels if self.volume.labels else self.volume.channels

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[GrowingGenerator]:
        """The generator in eval mode for the duration, back in its previous mode afterwards."""
        generator = self.generator
        was_training = generator.training
        generator.eval()
        try:
            yield generator
        finally:
            generator.train(was_training)

    # --- outputs -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def write_outputs(self, stage: int, epoch: int, reconstruction: torch.Tensor | None = None) -> None:
        """One random sample and one reconstruction in the input's file type and geometry, plus a PNG preview.

        The preview shows real | sample | variation | reconstruction. The variation keeps the coarsest stage on its
        reconstruction input (the image's layout) and draws every finer stage's noise, as ``consingan sample
        --start-scale 1`` does: with a small budget the coarsest stage has not yet learnt a whole new layout, while
        the finer ones already vary the anatomy's details. Its noise comes from a generator of its own, so the
        training's random state is the same as without it.
        """
        with self.evaluating() as generator:
            # Its own random generator: how often outputs are written must not change what is trained.
            seed = epoch * 1000 + stage
            if self.patched(stage):  # in tiles, from noise fields of their own seeds (2 seed, 2 seed + 1)
                sample = self.sample_tiled(stage, 2 * seed)[0].cpu().numpy()
                variation = self.sample_tiled(stage, 2 * seed + 1, coarsest_fixed=True)[0].cpu().numpy()
            else:
                rng = torch.Generator(device=self.device).manual_seed(seed)
                sample = generator(generator.sample_noise(self.shapes[: stage + 1], generator=rng))[0].cpu().numpy()
                varied = generator.sample_noise(self.shapes[: stage + 1], generator=rng)
                varied[0] = generator.reconstruction_noise(0)
                variation = generator(varied)[0].cpu().numpy()
            reconstruction = (self.reconstruct(stage) if reconstruction is None else reconstruction)[0].cpu().numpy()
        folder = self.run.scale_dir(stage) / RunFolder.SAMPLES
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (("sample", sample), ("reconstruction", reconstruction)):
            label_channels = self.image_channels if self.volume.labels else None  # decoded by argmax: not clipped
            write_outputs(folder / f"epoch{epoch:05d}_{name}",
                          self.volume.with_array(self.intensity.denormalise(array, label_channels)))
        shown = self.image_channels
        real = self.reals[stage][0].cpu().numpy()
        images, titles = [], []
        previewed = {"real": real, "sample": sample, "variation": variation, "reconstruction": reconstruction}
        if stage == 0:  # at the coarsest scale a variation is the reconstruction
            del previewed["variation"]
        for title, array in previewed.items():  # each image, then its label map when trained with one
            images += [array[:shown]] + ([label_image(array[shown:])] if self.volume.labels else [])
            titles += [title] + ([f"{title} labels"] if self.volume.labels else [])
        write_png(folder / f"epoch{epoch:05d}_preview.png", preview_grid(images, titles=titles))

    def save_scale(self, stage: int, summary: ScaleSummary, history: Sequence[dict[str, float]]) -> None:
        run, folder = self.run, self.run.scale_dir(stage)
        run.save_weights(folder, RunFolder.WEIGHTS, self.generator.state_dict())
        run.save_weights(folder, RunFolder.CRITIC, self.critic.state_dict())
        run.write_losses(folder, history)
        meta = dataclasses.asdict(summary)
        meta["shapes"] = [list(s) for s in self.shapes[: stage + 1]]
        meta["noise_amps"] = self.generator.noise_amps.tolist()
        run.write_scale_meta(stage, meta)  # written last: its presence marks the scale as complete

    def run_info(self) -> RunInfo:
        """This run's run.json (``describe_run``)."""
        return describe_run(self.config, self.volume)

    def train(self) -> list[ScaleSummary]:
        if not self.run.has_info:  # a trainer made on a bare folder; train_prepared writes it with the folder
            self.run.write_info(self.run_info())
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


def attach_labels(volume: Volume, label: Volume, name: str) -> Volume:
    """The image with its label map appended as one-hot channels (see ``consingan.io.labels``)."""
    if label.spatial_shape != volume.spatial_shape:
        raise ConsinganError(f"{name} has shape {label.spatial_shape} but the image has {volume.spatial_shape}")
    if not np.allclose(label.affine, volume.affine, atol=1e-3):
        raise ConsinganError(f"{name} is not on the image's grid (different origin, spacing or orientation)")
    encoding = LabelEncoding.of(label.array, volume.channels, name)
    array = np.concatenate([volume.array, encoding.encode(label.array)])
    return dataclasses.replace(volume, array=array, labels=encoding)


def prepare(config: TrainConfig) -> tuple[TrainConfig, Volume]:
    """Validate the configuration and read the image, before anything is written."""
    config = config.validate()
    check_precision(config.precision, resolve_device(config.device))
    check_encodable(Path(config.out_dir) / config.run_name, "output folder")  # before any table is printed
    config = with_seed(config)
    image = find_image(config)
    config = dataclasses.replace(config, image=str(image.resolve()))  # absolute, so --resume works from anywhere
    volume = read_volume(image, config.dimension)
    if config.label:
        label_path = Path(config.label)
        config = dataclasses.replace(config, label=str(label_path.resolve()))
        volume = attach_labels(volume, read_volume(label_path, config.dimension, check_values=False), label_path.name)
    check_pyramid(config, volume)
    plan = memory_plan(config, volume)
    if plan.patch is not None:
        check_network_fits(config, (plan.patch,) * config.dimension, "the patch")
    # 'auto' is recorded as what it chose, so that a resumed run trains with the same patch.
    return dataclasses.replace(config, patch_size=plan.patch_size), volume


def memory_plan(config: TrainConfig, volume: Volume) -> MemoryPlan:
    """The memory preflight of training ``volume`` under ``config``: the patch it trains with ('auto' resolved) and
    the estimates, or ``ConsinganError`` naming settings that would fit."""
    return check_memory(config, volume_pyramid_shapes(volume, config), resolve_device(config.device))


def check_pyramid(config: TrainConfig, volume: Volume) -> None:
    """The pyramid of ``volume`` under ``config`` is one to train: a real 3D volume, distinct scales, each large
    enough for the network."""
    if config.dimension == 3 and 1 in volume.spatial_shape:
        raise ConsinganError(f"the volume {volume.spatial_shape} is one voxel thick: it is a 2D image; train it with "
                             f"--dim 2")
    shapes = volume_pyramid_shapes(volume, config)
    check_network_fits(config, shapes[0])
    distinct = len(set(shapes))
    # Every scale the same size (the image's shortest side is min_size, as with the default settings on the shipped
    # volume) is what the options say and gets a note; a pyramid with some repeated sizes is a mistake.
    if 1 < distinct < len(shapes):
        raise ConsinganError(
            f"num_scales {config.num_scales} gives only {distinct} different sizes between {shapes[0]} and "
            f"{shapes[-1]} (scales of the same size learn nothing new); use --num-scales {distinct}")


def pyramid_notes(config: TrainConfig, volume: Volume) -> list[str]:
    """What the user should know about a pyramid that is allowed but unusual."""
    shapes = volume_pyramid_shapes(volume, config)
    if len(shapes) > 1 and len(set(shapes)) == 1:
        return [f"the image's shortest side is min_size ({config.min_size}), so all {len(shapes)} scales have the "
                f"same size {shapes[0]}; lower --min-size for a coarse-to-fine pyramid"]
    return []


def train(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Train a pyramid on ``config.image``; returns the run folder and per-scale summaries.

    Every check (options, image, pyramid, device, output folder) happens before the first file is written.
    """
    return train_prepared(*prepare(config), reporter)


def describe_run(config: TrainConfig, volume: Volume) -> RunInfo:
    """What sampling needs besides the weights: shapes, channels, intensity range, geometry and source type; all of
    it known before training, so that run.json is written with the run folder."""
    return RunInfo(
        family="singan", spatial_dims=config.dimension, channels=volume.channels, output_suffix=volume.suffix,
        output_dtype=str(volume.source_dtype), intensity=intensity_map(volume, config),
        image=str(Path(config.image).resolve()), source_shape=list(volume.spatial_shape),
        source_affine=volume.affine.tolist(),
        source_plane=None if volume.plane is None else np.asarray(volume.plane).tolist(), shapes=[list(s) for s in volume_pyramid_shapes(volume, config)],
        nifti_header=encode_header(volume.header), labels=volume.labels,
    )


def train_prepared(config: TrainConfig, volume: Volume, reporter: Reporter | None = None) -> TrainResult:
    """``train`` for a configuration and volume that ``prepare`` returned.

    run.json and a copy of the training files are written with the folder, before anything else can stop the run:
    a run stopped at any later moment resumes, wherever its folder has been moved."""
    sources = {role: path for role, path in (("image", config.image), ("label", config.label)) if path}
    run = RunFolder.create(config, Path(config.image).name.split(".")[0] or "run", describe_run(config, volume),
                           sources)
    with run.writing():  # created locked; released however training ends
        seed_everything(config.seed)
        trainer = SinGANTrainer(config, volume, run, reporter)
        return TrainResult(run.path, config, trainer.train())


AUTOCAST_TYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of ``TrainConfig.precision`` on ``device`` (None: float32 throughout); fp16 off CUDA is
    refused (CPU autocast has no gradient scaling, without which float16 gradients underflow)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConsinganError("fp16 needs CUDA; use bf16 or fp32 on the CPU")
    # CUDA autocast refuses bf16 on such a GPU itself, but only once training has started.
    if precision == "bf16" and device.type == "cuda":
        with torch.cuda.device(device):
            if not torch.cuda.is_bf16_supported():
                raise ConsinganError("bf16 is not supported by this GPU; use fp16 or fp32")
    return AUTOCAST_TYPES[precision]


def apply_gradient(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, times: int = 1) -> None:
    """``times`` optimiser steps with the gradient just computed (``generator_update`` 'repeat': Gsteps of one).

    With fp16 the scaler unscales the gradient in place at its first step and skips the update when it overflowed;
    the repeats use the unscaled gradient, and are skipped with it. A disabled scaler steps as plain Adam does."""
    scaler.step(optimizer)
    if times > 1 and (not scaler.is_enabled() or all(
            bool(torch.isfinite(p.grad).all()) for group in optimizer.param_groups for p in group["params"]
            if p.grad is not None)):
        for _ in range(times - 1):
            optimizer.step()
    scaler.update()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def resume(run_dir: Path | str, reporter: Reporter | None = None, device: str | None = None) -> TrainResult:
    """Continue a run from its last completed scale, or from the last training state saved inside a scale.

    The configuration (architecture included) comes from the run's config.json; only the device may change. With the
    same device, the result equals a run that never stopped: weights, optimizer and scheduler states, losses and the
    random-number state are all restored. A run another process is training is refused (``RunFolder.acquire``).
    """
    run = RunFolder.open(run_dir, "singan")
    with run.writing():
        return _resume_locked(run, reporter, device)


def _resumable(run: RunFolder, device: str | None) -> tuple[TrainConfig, Volume]:
    """The run's configuration (``device`` overriding its own) and its training volume, checked against run.json;
    reads only."""
    config = resumed_config(run, device)
    # The run's own copy of its training files (an older run, or one stopped while copying: the originals).
    volume = run.read_source("image")
    if config.label:
        volume = attach_labels(volume, run.read_source("label", check_values=False), Path(config.label).name)
    if intensity_map(volume, config).to_dict() != run.info.intensity.to_dict() or list(volume.spatial_shape) != run.info.source_shape:
        raise ConsinganError(f"{run.source_path('image')} differs from the image this run was trained on; cannot "
                             f"resume")
    return config, volume


def resume_plan(run_dir: Path | str, device: str | None = None) -> tuple[TrainConfig, Volume, str]:
    """What ``resume`` would do, found without writing anything (no lock, no copy): the configuration, the volume
    and one line naming the scales done and where training would go on."""
    run = RunFolder.open(run_dir, "singan")
    config, volume = _resumable(run, device)
    done = run.completed_scales()
    state_path = run.latest_training_state()
    if state_path is None:
        where = "no checkpoint yet: it would start over from scale 0"
    else:
        state = run.load_training_state(state_path, ("generator", "critic"), "cpu")
        if state.stage in done:
            where = (f"scales 0-{state.stage} done; it would go on with scale {state.stage + 1} of {config.num_scales}"
                     if state.stage + 1 < config.num_scales else "every scale is done: nothing left to train")
        else:
            where = (f"scales done: {len(done)}; it would go on with scale {state.stage} after epoch "
                     f"{state.epoch} of {config.epochs_of(state.stage)}")
    return config, volume, where


def _resume_locked(run: RunFolder, reporter: Reporter | None, device: str | None) -> TrainResult:
    config, volume = _resumable(run, device)
    for role in ("image", "label") if config.label else ("image",):
        if run.kept_source(role) is None:  # read from the original: the run keeps a copy from now on
            run.keep_source(role, run.source_path(role))
    state_path = run.latest_training_state()
    if state_path is None:  # stopped before its first checkpoint: start over in the same folder, as a new run would
        seed_everything(config.seed)
        return TrainResult(run.path, config, SinGANTrainer(config, volume, run, reporter).train())
    trainer = SinGANTrainer(config, volume, run, reporter)
    state = run.load_training_state(state_path, ("generator", "critic"), trainer.device)
    stage = state.stage
    try:
        trainer.generator.load_grown_state(state.models["generator"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise ConsinganError(f"{state_path} does not fit the model of {run.path / run.CONFIG}: "
                             f"{first_reason(error)}") from None
    load_module_state(trainer.critic, state.models["critic"], state_path)
    trainer.load_scalers(state, state_path)
    done = [k for k in run.completed_scales() if k <= stage]
    summaries = [ScaleSummary.from_meta(run.scale_meta(k)) for k in done]
    if stage in done:
        restore_random_states(state, trainer.device)
        first, resume_state = stage + 1, None
    else:
        first, resume_state = stage, state
    trainer.generator.train()
    trainer.critic.train()
    for k in range(first, config.num_scales):
        summaries.append(trainer.train_scale(k, resume_state if k == first else None))
    return TrainResult(run.path, config, summaries)
