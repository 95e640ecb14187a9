"""Training and prediction of paired image-to-image GANs (pix2pix / pix2pixHD style), 2D and 3D."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from consingan.config import PairedConfig
from consingan.distributed import Distributed, shared_run, train_to_end, unwrap
from consingan.epochs import DatasetResult, EpochTrainer, resumed_config
from consingan.errors import ConsinganError
from consingan.io.preview import contact_sheet, label_image, write_png
from consingan.losses import adversarial_loss, feature_matching_loss
from consingan.paired.build import MODEL_NAMES, build_discriminator, build_generator
from consingan.paired.data import PairedData, TileDataset, load_pairs, resolve_folder
from consingan.losses import VGGPerceptualLoss
from consingan.runs import InputInfo, RunFolder, RunInfo, resolve_device

def _scales(output: Any) -> list[list[torch.Tensor]]:
    """Discriminator output as a list of scales, each a list of features with the logits last."""
    return output if isinstance(output[0], list) else [output]


PREVIEW_TILES = 3  # tiles of the preview, spread over the data set


class PairedTrainer(EpochTrainer):
    """pix2pix training: critic on (source, image) pairs, generator with GAN + lambda_l1 x L1 (+ feature matching with
    the multi-scale discriminator); Adam, constant then linearly decaying learning rate; the shared epoch loop
    (``consingan.epochs``) writes the resumable state, the logs, snapshots and a preview of (source, prediction,
    target) tiles."""

    def __init__(self, config: PairedConfig, data: PairedData, run: RunFolder,
                 progress: Callable[[int, dict], None] | None = None, device: torch.device | None = None,
                 distributed: Distributed | None = None) -> None:
        super().__init__(config, run, progress, device, distributed)
        self.data = data
        self.dataset = TileDataset(data, config.tile, config.resolved_stride())
        in_channels, out_channels = data.sources[0].shape[0], data.targets[0].shape[0]
        self.generator = self.distributed.wrap(build_generator(config, in_channels, out_channels).to(self.device),
                                               self.device)
        self.discriminator = self.distributed.wrap(build_discriminator(config, in_channels + out_channels)
                                                   .to(self.device), self.device)
        betas = (config.beta1_adam, 0.999)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas)
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr, betas=betas)
        decay_start = config.epochs // 2 if config.decay_start < 0 else config.decay_start
        span = max(1, config.epochs - decay_start)

        def factor(epoch: int) -> float:
            return 1.0 - max(0, epoch - decay_start) / span

        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (self.optimizer_g, self.optimizer_d)]
        self.perceptual = None
        if config.perceptual_weights:
            self.perceptual = load_perceptual(config).to(self.device)

    def named_models(self) -> dict[str, torch.nn.Module]:
        return dict(zip(MODEL_NAMES, (self.generator, self.discriminator)))

    def named_optimizers(self) -> dict[str, tuple]:
        return dict(zip(MODEL_NAMES, zip((self.optimizer_g, self.optimizer_d), self.schedulers)))

    def sampling_weights(self) -> dict:
        return unwrap(self.generator).state_dict()

    def epoch_losses(self, epoch: int) -> Iterator[dict]:
        # The epoch's tile order, the same on every rank and independent of resuming; each rank takes its share.
        order = torch.Generator().manual_seed(int(self.config.seed) + epoch)
        indices = self.distributed.shard(torch.randperm(len(self.dataset), generator=order).tolist())
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.config.batch_size, sampler=indices,
                                             num_workers=self.config.num_workers)
        for source, target in loader:
            yield self.step(source.to(self.device), target.to(self.device))

    @torch.no_grad()
    def write_preview(self, epoch: int) -> None:
        """Rows of (source, prediction, target) tiles, spread over the data set, with the generator in eval mode."""
        generator = unwrap(self.generator)
        picks = np.linspace(0, len(self.dataset) - 1, min(PREVIEW_TILES, len(self.dataset))).round().astype(int)
        items = []
        generator.eval()
        try:
            for index in dict.fromkeys(picks.tolist()):
                source, target = self.dataset[index]
                prediction = generator(source[None].to(self.device))
                prediction = (prediction[-1] if isinstance(prediction, list) else prediction)[0].float().cpu()
                shown = label_image(source.numpy()) if "labels" in self.data.source_encoding else source.numpy()
                items.append((shown, prediction.clamp(-1, 1).numpy(), target.numpy()))
        finally:
            generator.train()
        write_png(self.run.previews_dir() / f"epoch{epoch:05d}.png", contact_sheet(items, columns=1, min_panel=96))

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
        loss_d = 0.5 * sum(adversarial_loss(r[-1], True, config.loss) + adversarial_loss(f[-1], False,
                           config.loss) for r, f in zip(real_scales, fake_scales)) / len(real_scales)
        loss_d.backward()
        self.optimizer_d.step()
        discriminator.requires_grad_(False)
        self.optimizer_g.zero_grad(set_to_none=True)
        # The frozen discriminator outside its DDP wrapper: no gradient of its own to synchronise.
        fake_scales = _scales(unwrap(discriminator)(torch.cat([source, fake], 1)))
        loss_gan = sum(adversarial_loss(f[-1], True, config.loss, for_discriminator=False)
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


def kept_pairs(run: RunFolder) -> PairedData | None:
    """The pairs the run keeps in source/dataset.pt (None for a run from before they were kept)."""
    kept = run.kept_dataset(("names", "sources", "targets"))
    if kept is None:
        return None
    info = run.info
    return PairedData(list(kept["names"]), list(kept["sources"]), list(kept["targets"]), [], info.inputs.encoding,
                      info.intensity, info.output_suffix, np.dtype(info.output_dtype))


def prepare_paired(config: PairedConfig) -> tuple[PairedConfig, PairedData]:
    """Check options, seed, folders, weights and data (``--dry-run`` stops here); nothing is written."""
    config = config.validate().refuse_ignored_options()
    if not config.source_dir or not config.target_dir:
        raise ConsinganError("--source and --target are required")
    config = Distributed.from_environment().shared_seed(config, resolve_device(config.device))
    config = dataclasses.replace(config, source_dir=str(resolve_folder(config.source_dir, "--source")),
                                 target_dir=str(resolve_folder(config.target_dir, "--target")))
    resolve_device(config.device)
    if config.perceptual_weights:
        load_perceptual(config)
    data = load_pairs(Path(config.source_dir), Path(config.target_dir), config.dimension, config.one_hot,
                      config.intensity_mapping)
    check_model_fits(config, data)
    return config, data


def train_paired(config: PairedConfig, progress: Callable[[int, dict], None] | None = None) -> DatasetResult:
    """Check options, device, weights and data (``prepare_paired``), then make a run folder and train: nothing is
    written before every check has passed."""
    config, data = prepare_paired(config)
    distributed = Distributed.from_environment()
    device = distributed.start(resolve_device(config.device))
    run = shared_run(distributed, config, "paired", paired_run_info(config, data))
    if distributed.is_main:
        run.keep_dataset({"names": list(data.names), "sources": list(data.sources), "targets": list(data.targets)})
    distributed.barrier()
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    trainer = PairedTrainer(config, data, run, progress, device, distributed)
    return DatasetResult(run.path, config, train_to_end(trainer, distributed))


def resume_paired(run_dir: Path, progress: Callable[[int, dict], None] | None = None,
                  device: str | None = None) -> DatasetResult:
    """Continue a paired run from its last epoch's training state; every option comes from the run (the device
    may change)."""
    run = RunFolder.open(run_dir, "paired")
    Distributed.from_environment().check_resume(run)  # before the data is read or a process group joined
    config = resumed_config(run, device)
    data = kept_pairs(run) or load_pairs(Path(config.source_dir), Path(config.target_dir), config.dimension,
                                         config.one_hot, config.intensity_mapping)
    distributed = Distributed.from_environment()
    device = distributed.start(resolve_device(config.device))
    torch.manual_seed(config.seed)
    trainer = PairedTrainer(config, data, run, progress, device, distributed)
    return DatasetResult(run.path, config, train_to_end(trainer, distributed, run, MODEL_NAMES))
