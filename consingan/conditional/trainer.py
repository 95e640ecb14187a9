"""Training of the class-conditional GAN: TTUR, EMA generator, gradient accumulation, resumable per epoch."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from consingan.conditional.data import (LabelledSet, augment, class_balanced_sampler, kept_labelled, list_labelled,
                                        load_labelled, resolve_data)
from consingan.conditional.memory import check_memory
from consingan.conditional.models import attention_bytes, build_models
from consingan.conditional.sampler import EMA_NAME, MODEL_NAMES, preview_grid_png
from consingan.config import ConditionalConfig
from consingan.distributed import Distributed, shared_run, train_to_end, unwrap
from consingan.epochs import DatasetResult, EpochTrainer, resumed_config
from consingan.errors import ConsinganError
from consingan.losses import VGGPerceptualLoss, adversarial_loss, gradient_penalty, texture_loss
from consingan.nn.ema import ema_decay_at, ema_update
from consingan.outputs import check_encodable
from consingan.runs import RunFolder, RunInfo, resolve_device
from consingan.devices import available_bytes

ATTENTION_SHARE = 0.5  # self-attention maps may take at most this share of the free memory


def check_attention_fits(config: ConditionalConfig, free_bytes: int) -> None:
    """Refuse a self-attention placement whose (positions)^2 maps would not fit, naming the sides that would."""
    side = config.resolved_attention()
    if not side:
        return
    batch = 2 * config.batch_size  # the discriminator sees real and fake batches
    needed = attention_bytes(side, config.dimension, batch)
    limit = ATTENTION_SHARE * free_bytes
    if needed > limit:
        sides = [4 * 2**k for k in range(config.num_stages() + 1)]
        fitting = [s for s in sides if attention_bytes(s, config.dimension, batch) <= limit]
        hint = f"--attention {max(fitting)} (or 0: none)" if fitting else "--attention 0"
        raise ConsinganError(
            f"self-attention at side {side} in {config.dimension}D needs about {needed / 2**30:.1f} GiB "
            f"for a batch of {config.batch_size} (it grows with the square of the voxel count); "
            f"{limit / 2**30:.1f} GiB is available for it: use {hint} or a smaller --batch-size")


def discriminator_terms(outputs: list[tuple], real: bool, config: ConditionalConfig, labels: torch.Tensor,
                        for_discriminator: bool = True) -> torch.Tensor:
    """The adversarial (and AC-GAN class) loss over every discriminator scale, averaged."""
    mode = "wgan" if config.loss == "wgan-gp" else config.loss
    smoothing = 1.0 - config.label_smoothing if config.loss == "bce" else 1.0
    total = 0.0
    for logits, _, class_logits in outputs:
        total = total + adversarial_loss(logits, real, mode, for_discriminator, real_label=smoothing)
        if class_logits is not None:
            total = total + config.lambda_classifier * F.cross_entropy(class_logits, labels)
    return total / len(outputs)


def split_outputs(outputs: list[tuple], part: slice) -> list[tuple]:
    """The ``part`` of a batch in every discriminator scale's (logits, features, class logits)."""
    return [(logits[part], [f[part] for f in features], None if classes is None else classes[part])
            for logits, features, classes in outputs]


class ConditionalTrainer(EpochTrainer):
    """Hinge (or BCE / LSGAN / WGAN-GP) training with separate generator and discriminator learning rates, one
    discriminator step then one generator step per (accumulated) batch, the generator's EMA updated after each
    generator step; the shared epoch loop (``consingan.epochs``) writes the resumable state, the logs, snapshots of
    the EMA generator and (every ``preview_every`` epochs) a per-class preview."""

    diverged_hint = "try lower learning rates"

    def __init__(self, config: ConditionalConfig, data: LabelledSet, run: RunFolder,
                 progress: Callable[[int, dict], None] | None = None, device: torch.device | None = None,
                 distributed: Distributed | None = None) -> None:
        super().__init__(config, run, progress, device, distributed)
        self.data = data
        channels = data.images.shape[1]
        generator, discriminator = (m.to(self.device) for m in build_models(config, channels, len(data.classes)))
        self.generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
        self.generator = self.distributed.wrap(generator, self.device)
        self.discriminator = self.distributed.wrap(discriminator, self.device)
        betas = (config.beta1_adam, config.beta2)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr_g, betas=betas)
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_d, betas=betas)
        self.dataset = torch.utils.data.TensorDataset(data.images, data.labels)
        self.order = torch.Generator().manual_seed(int(config.seed))
        self.sampler = (class_balanced_sampler(data.labels, len(data.classes), self.order) if config.balance else
                        torch.utils.data.RandomSampler(self.dataset, generator=self.order))
        self.perceptual = None
        if config.perceptual_weights:
            self.perceptual = VGGPerceptualLoss.from_file(config.perceptual_weights).to(self.device)

    def named_models(self) -> dict[str, torch.nn.Module]:
        return dict(zip((*MODEL_NAMES, EMA_NAME), (self.generator, self.discriminator, self.generator_ema)))

    def named_optimizers(self) -> dict[str, tuple]:
        return {"generator": (self.optimizer_g, None), "discriminator": (self.optimizer_d, None)}

    def sampling_weights(self) -> dict:
        return self.generator_ema.state_dict()

    def noise(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.config.noise_dim, device=self.device)

    def discriminator_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        config, discriminator = self.config, self.discriminator
        discriminator.requires_grad_(True)
        self.optimizer_d.zero_grad(set_to_none=True)
        totals = {"d": 0.0, **({"gp": 0.0} if config.loss == "wgan-gp" else {})}
        for real, labels in batches:
            with torch.no_grad():
                fake = unwrap(self.generator)(self.noise(len(labels)), labels)
            # Real and fake in one forward (no batch statistics in the discriminator: the same scores as two), which
            # under DDP also keeps to one forward per backward.
            count = len(labels)
            outputs = discriminator(torch.cat([real, fake]), torch.cat([labels, labels]))
            loss = 0.5 * (discriminator_terms(split_outputs(outputs, slice(None, count)), True, config, labels)
                          + discriminator_terms(split_outputs(outputs, slice(count, None)), False, config, labels))
            if config.loss == "wgan-gp":
                def critic(x: torch.Tensor) -> torch.Tensor:
                    return sum(out[0] for out in unwrap(discriminator)(x, labels))

                penalty = gradient_penalty(critic, real, fake, "image")
                loss = loss + config.lambda_grad_penalty * penalty
                totals["gp"] += penalty.item() / len(batches)
            (loss / len(batches)).backward()
            totals["d"] += loss.item() / len(batches)
        self.optimizer_d.step()
        return totals

    def generator_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        config, discriminator = self.config, self.discriminator
        discriminator.requires_grad_(False)
        self.optimizer_g.zero_grad(set_to_none=True)
        totals = {"g": 0.0, **({"texture": 0.0} if config.lambda_texture > 0 else {}),
                  **({"perceptual": 0.0} if self.perceptual is not None else {})}
        for real, labels in batches:
            # Fakes of the real batch's classes, so batch-level feature losses compare like with like.
            fake = self.generator(self.noise(len(labels)), labels)
            fake_outputs = unwrap(discriminator)(fake, labels)  # frozen: outside DDP, nothing to synchronise
            loss = discriminator_terms(fake_outputs, True, config, labels, for_discriminator=False)
            totals["g"] += loss.item() / len(batches)
            if config.lambda_texture > 0:
                if self.perceptual is not None:
                    fake_features, real_features = self.perceptual.tapped(fake), self.perceptual.tapped(real)
                else:
                    fake_features = [f for out in fake_outputs for f in out[1]]
                    with torch.no_grad():
                        real_features = [f for out in unwrap(discriminator)(real, labels) for f in out[1]]
                term = texture_loss(fake_features, real_features)
                loss = loss + config.lambda_texture * term
                totals["texture"] += term.item() / len(batches)
            if self.perceptual is not None:
                term = self.perceptual.batch_mean_loss(fake, real)
                loss = loss + config.lambda_perceptual * term
                totals["perceptual"] += term.item() / len(batches)
            (loss / len(batches)).backward()
        self.optimizer_g.step()
        # Adam's step count is the number of generator updates so far (and comes back with the optimiser on resume).
        steps = max(int(state["step"]) for state in self.optimizer_g.state.values())
        ema_update(self.generator_ema, unwrap(self.generator), ema_decay_at(config.ema_decay, steps))
        return totals

    def epoch_losses(self, epoch: int) -> Iterator[dict]:
        config = self.config
        self.order.manual_seed(int(config.seed) + epoch)  # the epoch's draw, the same on every rank
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=config.batch_size,
                                             sampler=self.distributed.shard(list(self.sampler)),
                                             num_workers=config.num_workers)
        pending = []
        batches = list(loader)
        for index, (images, labels) in enumerate(batches):
            images = augment(images, config.flip_dims(), config.rotations, config.intensity_jitter)
            pending.append((images.to(self.device), labels.to(self.device)))
            if len(pending) == config.accumulate or index == len(batches) - 1:
                yield {**self.discriminator_step(pending), **self.generator_step(pending)}
                pending = []

    def write_preview(self, epoch: int) -> None:
        """A per-class grid of EMA samples from fixed noise (rows: classes), without touching the training RNG."""
        preview_grid_png(self.run.previews_dir() / f"epoch{epoch:05d}.png", self.generator_ema, self.data.classes,
                         self.config.noise_dim, self.device, real=(self.data.images, self.data.labels))


def conditional_run_info(config: ConditionalConfig, data: LabelledSet) -> RunInfo:
    return RunInfo(family="conditional", spatial_dims=config.dimension, channels=int(data.images.shape[1]),
                   output_suffix=data.suffix, output_dtype=data.dtype, intensity=data.intensity,
                   image=str(Path(config.data).resolve()), classes=list(data.classes),
                   class_counts=data.counts(), class_grids=data.grids,
                   class_planes=data.planes if any(plane is not None for plane in data.planes) else [])


def prepare_conditional(config: ConditionalConfig) -> tuple[ConditionalConfig, LabelledSet]:
    """Check options, device, weights, memory and data; nothing is written."""
    config = config.validate()
    if not config.data:
        raise ConsinganError("--data is required (a folder of class folders, or a CSV of path,class)")
    check_encodable(Path(config.out_dir) / config.run_name, "output folder")
    device = resolve_device(config.device)
    config = Distributed.from_environment().shared_seed(config, device)
    config = dataclasses.replace(config, data=str(resolve_data(config.data)))
    check_attention_fits(config, available_bytes(device))
    if config.perceptual_weights:
        VGGPerceptualLoss.from_file(config.perceptual_weights)
    return config, load_fitting(config, device)


def load_fitting(config: ConditionalConfig, device: torch.device, channels: int = 1) -> LabelledSet:
    """The data set of ``config``, after the memory preflight (before any image is read: the listing gives the
    image and class counts; ``channels`` per image, 1 when not known yet, which makes the estimate a lower bound)."""
    pairs = list_labelled(Path(config.data), config.dimension)
    check_memory(config, channels, len({name for _, name in pairs}), len(pairs), device)
    return load_labelled(config.data, config.dimension, config.size, config.fit, config.intensity_mapping,
                         int(config.seed))


def train_conditional(config: ConditionalConfig, progress: Callable[[int, dict], None] | None = None,
                      prepared: tuple[ConditionalConfig, LabelledSet] | None = None) -> DatasetResult:
    """Train a class-conditional GAN in a new run folder, made only after every check has passed."""
    config, data = prepared or prepare_conditional(config)
    distributed = Distributed.from_environment()
    device = distributed.start(resolve_device(config.device))
    run = shared_run(distributed, config, "conditional", conditional_run_info(config, data))
    if distributed.is_main:
        run.keep_dataset({"images": data.images, "labels": data.labels, "classes": list(data.classes)})
    distributed.barrier()
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    trainer = ConditionalTrainer(config, data, run, progress, device, distributed)
    return DatasetResult(run.path, config, train_to_end(trainer, distributed))


def run_dataset(run: RunFolder) -> LabelledSet:
    """The training set of a conditional run: its own copy, or (an older run) the original files, checked against
    run.json: the classes, their image counts and the intensity range must be those the run was trained on."""
    config = run.config
    if run.info.class_counts:  # the memory preflight first, from run.json's counts, before any image is read
        check_memory(config, run.info.channels, len(run.info.classes), sum(run.info.class_counts),
                     resolve_device(config.device))
    kept = kept_labelled(run)
    if kept is not None:
        return kept
    data = load_fitting(config, resolve_device(config.device), run.info.channels)
    if data.classes != run.info.classes:
        raise ConsinganError(f"the classes in {config.data} ({', '.join(data.classes)}) are not the run's "
                             f"({', '.join(run.info.classes)})")
    if run.info.class_counts and data.counts() != run.info.class_counts:
        changed = [f"{name!r} has {now} (the run was trained on {then})"
                   for name, now, then in zip(data.classes, data.counts(), run.info.class_counts) if now != then]
        raise ConsinganError(f"images were added to or removed from {config.data} since the run started: "
                             f"{'; '.join(changed)}; a resume needs the same images (start a new run)")
    if json.dumps(data.intensity.to_dict()) != json.dumps(run.info.intensity.to_dict()):  # same counts, new images
        raise ConsinganError(f"the images of {config.data} have changed since the run started (their intensity "
                             f"range differs from the run's in run.json); a resume needs the same images (start a "
                             f"new run)")
    return data


def resume_conditional(run_dir: Path, progress: Callable[[int, dict], None] | None = None,
                       device: str | None = None) -> DatasetResult:
    """Continue a conditional run from its last epoch's training state (options from the run; the device may
    change)."""
    run = RunFolder.open(run_dir, "conditional")
    Distributed.from_environment().check_resume(run)  # before the data is read or a process group joined
    config = resumed_config(run, device)
    data = run_dataset(run)
    if (run.path / RunFolder.WEIGHTS).is_file():  # written after the last epoch only: nothing left to train
        return DatasetResult(run.path, config, already_finished=True)
    distributed = Distributed.from_environment()
    device = distributed.start(resolve_device(config.device))
    torch.manual_seed(config.seed)
    trainer = ConditionalTrainer(config, data, run, progress, device, distributed)
    return DatasetResult(run.path, config, train_to_end(trainer, distributed, run, MODEL_NAMES))
