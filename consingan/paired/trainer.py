"""Training and prediction of paired image-to-image GANs (pix2pix / pix2pixHD style), 2D and 3D."""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from consingan.config import PairedConfig
from consingan.distributed import Distributed, shared_run, train_to_end, unwrap
from consingan.errors import ConsinganError
from consingan.losses import adversarial_loss, feature_matching_loss
from consingan.paired.build import MODEL_NAMES, build_discriminator, build_generator
from consingan.paired.data import PairedData, TileDataset, load_pairs, resolve_folder
from consingan.paired.perceptual import VGGPerceptualLoss
from consingan.runs import InputInfo, RunFolder, RunInfo, TrainingState, load_weights, resolve_device

def _scales(output: Any) -> list[list[torch.Tensor]]:
    """Discriminator output as a list of scales, each a list of features with the logits last."""
    return output if isinstance(output[0], list) else [output]


@dataclass
class PairedResult:
    run_dir: Path
    config: PairedConfig
    losses: list[dict] = field(default_factory=list)


class PairedTrainer:
    """pix2pix training: critic on (source, image) pairs, generator with GAN + lambda_l1 x L1 (+ feature matching with
    the multi-scale discriminator); Adam, constant then linearly decaying learning rate; a resumable training state
    and the loss log written every epoch."""

    def __init__(self, config: PairedConfig, data: PairedData, run: RunFolder,
                 progress: Callable[[int, dict], None] | None = None, device: torch.device | None = None,
                 distributed: Distributed | None = None) -> None:
        self.config, self.data, self.run = config, data, run
        self.progress = progress or (lambda epoch, losses: None)
        self.distributed = distributed or Distributed()
        self.device = device or resolve_device(config.device)
        in_channels, out_channels = data.sources[0].shape[0], data.targets[0].shape[0]
        self.generator = self.distributed.wrap(build_generator(config, in_channels, out_channels).to(self.device),
                                               self.device)
        self.discriminator = self.distributed.wrap(build_discriminator(config, in_channels + out_channels)
                                                   .to(self.device), self.device)
        betas = (config.beta1, 0.999)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas)
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr, betas=betas)
        decay_start = config.epochs // 2 if config.decay_start < 0 else config.decay_start
        span = max(1, config.epochs - decay_start)

        def factor(epoch: int) -> float:
            return 1.0 - max(0, epoch - decay_start) / span

        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (self.optimizer_g, self.optimizer_d)]
        self.start_epoch, self.seconds = 0, 0.0
        self.history: list[dict] = []
        self.perceptual = None
        if config.perceptual_weights:
            self.perceptual = load_perceptual(config).to(self.device)

    def _parts(self) -> tuple:
        return (self.generator, self.discriminator), (self.optimizer_g, self.optimizer_d), self.schedulers

    def state(self, epoch: int) -> TrainingState:
        models, optimizers, schedulers = self._parts()
        return TrainingState(
            epoch=epoch, seconds=self.seconds,
            models={n: unwrap(m).state_dict() for n, m in zip(MODEL_NAMES, models)},
            optimizers={n: o.state_dict() for n, o in zip(MODEL_NAMES, optimizers)},
            schedulers={n: s.state_dict() for n, s in zip(MODEL_NAMES, schedulers)},
            history=self.history, rng_torch=torch.get_rng_state(),
        )

    def restore(self, state: TrainingState, where: Path) -> None:
        models, optimizers, schedulers = self._parts()
        for name, model, optimizer, scheduler in zip(MODEL_NAMES, models, optimizers, schedulers):
            load_weights(unwrap(model), state.models[name], where)
            try:
                optimizer.load_state_dict(state.optimizers[name])
                scheduler.load_state_dict(state.schedulers[name])
            except (KeyError, ValueError, RuntimeError) as error:
                raise ConsinganError(f"{where} does not fit this run's optimizers: {error}") from None
        torch.set_rng_state(state.rng_torch.cpu())
        self.start_epoch, self.seconds, self.history = state.epoch, state.seconds, list(state.history)

    def step(self, source: torch.Tensor, target: torch.Tensor) -> dict:
        config, generator, discriminator = self.config, self.generator, self.discriminator
        fake = generator(source)
        outputs = fake if isinstance(fake, list) else [fake]  # U-Net++ deep supervision
        fake = outputs[-1]
        discriminator.requires_grad_(True)
        self.optimizer_d.zero_grad(set_to_none=True)
        # Real and fake pairs in one forward (the discriminators normalise per image, so this is the same as two),
        # which under DDP also keeps to one forward per backward.
        count = len(source)
        both = _scales(discriminator(torch.cat([torch.cat([source, target], 1), torch.cat([source, fake.detach()], 1)])))
        real_scales = [[f[:count] for f in scale] for scale in both]
        fake_scales = [[f[count:] for f in scale] for scale in both]
        loss_d = 0.5 * sum(adversarial_loss(r[-1], True, config.gan_mode) + adversarial_loss(f[-1], False,
                           config.gan_mode) for r, f in zip(real_scales, fake_scales)) / len(real_scales)
        loss_d.backward()
        self.optimizer_d.step()
        discriminator.requires_grad_(False)
        self.optimizer_g.zero_grad(set_to_none=True)
        # The frozen discriminator outside its DDP wrapper: no gradient of its own to synchronise.
        fake_scales = _scales(unwrap(discriminator)(torch.cat([source, fake], 1)))
        loss_gan = sum(adversarial_loss(f[-1], True, config.gan_mode, for_discriminator=False)
                       for f in fake_scales) / len(fake_scales)
        loss_l1 = sum(F.l1_loss(o, target) for o in outputs) / len(outputs)
        total = loss_gan + config.lambda_l1 * loss_l1
        loss_fm = torch.zeros(())
        if config.discriminator == "multiscale" and config.lambda_feature_matching > 0:
            real_scales = [[t.detach() for t in scale] for scale in real_scales]
            loss_fm = feature_matching_loss(fake_scales, real_scales)
            total = total + config.lambda_feature_matching * loss_fm
        if self.perceptual is not None:
            total = total + config.lambda_perceptual * self.perceptual(fake, target)
        total.backward()
        self.optimizer_g.step()
        return {"d": loss_d.item(), "g_gan": loss_gan.item(), "l1": loss_l1.item(), "fm": loss_fm.item()}

    def train(self) -> list[dict]:
        config, distributed = self.config, self.distributed
        dataset = TileDataset(self.data, config.tile, config.resolved_stride())
        order = torch.Generator()
        self.generator.train()
        self.discriminator.train()
        for epoch in range(self.start_epoch + 1, config.epochs + 1):
            # The epoch's tile order, the same on every rank and independent of resuming; each rank takes its share.
            order.manual_seed(int(config.seed) + epoch)
            indices = distributed.shard(torch.randperm(len(dataset), generator=order).tolist())
            if distributed.active:  # each rank its own dropout masks, reproducible per epoch
                torch.manual_seed(int(config.seed) + 1_000_003 * epoch + distributed.rank)
            loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=indices,
                                                 num_workers=config.num_workers)
            started, totals = time.perf_counter(), []
            for source, target in loader:
                totals.append(self.step(source.to(self.device), target.to(self.device)))
            for scheduler in self.schedulers:
                scheduler.step()
            losses = distributed.mean({k: float(np.mean([t[k] for t in totals])) for k in totals[0]})
            if not all(math.isfinite(v) for v in losses.values()):
                raise ConsinganError(f"training diverged at epoch {epoch} (losses {losses}); try a lower --lr; "
                                     f"the last finite state is kept in {self.run.path}")
            seconds = time.perf_counter() - started
            self.seconds += seconds
            self.history.append(losses)
            if distributed.is_main:  # one writer; the others wait so that no rank runs ahead of a checkpoint
                self.run.save_training_state(self.run.path, self.state(epoch))
                self.run.write_losses(self.run.path, self.history)
                self.progress(epoch, {**losses, "epoch": epoch, "seconds": seconds})
            distributed.barrier()
        if distributed.is_main:
            self.run.save_weights(self.run.path, RunFolder.WEIGHTS, unwrap(self.generator).state_dict())
        return self.history


def load_perceptual(config: PairedConfig) -> VGGPerceptualLoss:
    if config.dimension != 2:
        raise ConsinganError("the perceptual loss is 2D only")
    return VGGPerceptualLoss.from_file(config.perceptual_weights)


def check_model_fits(config: PairedConfig, data: PairedData) -> None:
    """The images against the model (the tile and depth are checked with the options, in ``PairedConfig``)."""
    multiple = config.size_multiple()
    smallest = min(min(s.shape[1:]) for s in data.sources)
    if smallest < multiple:
        raise ConsinganError(f"the smallest image side ({smallest}) is below the model's minimum {multiple}")


def paired_run_info(config: PairedConfig, data: PairedData) -> RunInfo:
    return RunInfo(
        family="paired", spatial_dims=config.dimension, channels=int(data.targets[0].shape[0]),
        output_suffix=data.target_suffix, output_dtype=str(data.target_dtype), intensity=data.target_intensity,
        image=str(Path(config.target_dir).resolve()),
        inputs=InputInfo(encoding=data.source_encoding, channels=int(data.sources[0].shape[0]),
                         file_channels=data.source_volumes[0].channels, names=list(data.names)),
    )


def prepare_paired(config: PairedConfig) -> tuple[PairedConfig, PairedData]:
    """Check options, seed, folders, weights and data (``--dry-run`` stops here); nothing is written."""
    config = config.validate().refuse_ignored_options()
    if not config.source_dir or not config.target_dir:
        raise ConsinganError("--source and --target are required")
    distributed = Distributed.from_environment()
    distributed.check_seed(config.seed)
    if config.seed is None:
        config = dataclasses.replace(config, seed=secrets.randbelow(2**31))
    config = dataclasses.replace(config, source_dir=str(resolve_folder(config.source_dir, "--source")),
                                 target_dir=str(resolve_folder(config.target_dir, "--target")))
    resolve_device(config.device)
    if config.perceptual_weights:
        load_perceptual(config)
    data = load_pairs(Path(config.source_dir), Path(config.target_dir), config.dimension, config.one_hot)
    check_model_fits(config, data)
    return config, data


def train_paired(config: PairedConfig, progress: Callable[[int, dict], None] | None = None) -> PairedResult:
    """Check options, device, weights and data (``prepare_paired``), then make a run folder and train: nothing is
    written before every check has passed."""
    config, data = prepare_paired(config)
    distributed = Distributed.from_environment()
    device = distributed.start(resolve_device(config.device))
    run = shared_run(distributed, config, "paired", paired_run_info(config, data))
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    trainer = PairedTrainer(config, data, run, progress, device, distributed)
    return PairedResult(run.path, config, train_to_end(trainer, distributed))


def resume_paired(run_dir: Path, progress: Callable[[int, dict], None] | None = None,
                  device: str | None = None) -> PairedResult:
    """Continue a paired run from its last epoch's training state; every option comes from the run (the device
    may change)."""
    run = RunFolder.open(run_dir, "paired")
    Distributed.from_environment().check_resume(run)  # before the data is read or a process group joined
    config = run.config if device is None else dataclasses.replace(run.config, device=device).validate()
    run.config = config
    data = load_pairs(Path(config.source_dir), Path(config.target_dir), config.dimension, config.one_hot)
    distributed = Distributed.from_environment()
    device = distributed.start(resolve_device(config.device))
    torch.manual_seed(config.seed)
    trainer = PairedTrainer(config, data, run, progress, device, distributed)
    return PairedResult(run.path, config, train_to_end(trainer, distributed, run, MODEL_NAMES))
