"""Training and prediction of paired image-to-image GANs (pix2pix / pix2pixHD style), 2D and 3D."""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from consingan.checkpoint import load_state, make_run_dir, save_json, save_state
from consingan.errors import ConsinganError
from consingan.io import IntensityRange, Volume, file_suffix, output_suffix, read_volume, write_volume
from consingan.losses import adversarial_loss, feature_matching_loss
from consingan.paired.data import PairedData, TileDataset, encode_source, load_pairs
from consingan.paired.discriminators import MultiScaleDiscriminator, PatchDiscriminator
from consingan.paired.perceptual import VGGPerceptualLoss
from consingan.paired.resnet import LocalEnhancer, ResNetGenerator
from consingan.paired.tiling import predict_tiled
from consingan.paired.unet import UNetGenerator
from consingan.paired.unetpp import UNetPlusPlusGenerator
from consingan.singan.trainer import resolve_device

MODELS = ("unet", "cbam_unet", "spade_unet", "resnet", "local_enhancer", "unetpp")


@dataclass
class PairedConfig:
    """Every option of ``consingan paired train`` (defaults from the pix2pix report in the seeds)."""

    source_dir: str = ""
    target_dir: str = ""
    model: str = "unet"
    dimension: int = 2
    epochs: int = 200
    decay_start: int = -1  # epoch after which the learning rate falls linearly to 0 (-1: half of epochs)
    batch_size: int = 1
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_l1: float = 100.0
    gan_mode: str = "lsgan"
    discriminator: str = "patch"  # or "multiscale" (pix2pixHD, with feature matching)
    lambda_feature_matching: float = 10.0
    perceptual_weights: str = ""  # local VGG-19 state dict; empty: no perceptual loss (the default)
    lambda_perceptual: float = 10.0
    tile: int = 256  # the report uses 512 with stride 256
    stride: int = -1  # -1: tile // 2
    base_channels: int = 64
    depth: int = 0  # U-Net depth (0: as deep as the tile allows, at most 8)
    one_hot: bool = False  # masks as one-hot class channels (background / interior / boundary ...)
    out_dir: str = "out"
    run_name: str = ""
    seed: int | None = None
    device: str = "auto"
    num_workers: int = 0

    def validate(self) -> "PairedConfig":
        if self.model not in MODELS:
            raise ConsinganError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.dimension not in (2, 3):
            raise ConsinganError(f"dimension must be 2 or 3, got {self.dimension}")
        for name in ("epochs", "batch_size", "tile", "base_channels"):
            if getattr(self, name) <= 0:
                raise ConsinganError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.lambda_l1 < 0:
            raise ConsinganError("lr must be positive and lambda_l1 zero or positive")
        if self.gan_mode not in ("lsgan", "bce", "hinge", "wgan"):
            raise ConsinganError(f"unknown gan_mode {self.gan_mode!r}; choose lsgan, bce, hinge or wgan")
        if self.discriminator not in ("patch", "multiscale"):
            raise ConsinganError(f"discriminator must be 'patch' or 'multiscale', got {self.discriminator!r}")
        if self.tile < 8:
            raise ConsinganError(f"tile must be at least 8, got {self.tile}")
        if not 0 < self.resolved_stride() <= self.tile:
            raise ConsinganError(f"stride must be between 1 and the tile size {self.tile}")
        return self

    def resolved_stride(self) -> int:
        return self.tile // 2 if self.stride < 0 else self.stride

    def resolved_depth(self) -> int:
        if self.depth > 0:
            return self.depth
        depth = 1
        while depth < 8 and self.tile % 2 ** (depth + 1) == 0:
            depth += 1
        return depth

    def size_multiple(self) -> int:
        """Spatial sizes the generator accepts are multiples of this."""
        if self.model == "resnet":
            return 8
        if self.model == "local_enhancer":
            return 16
        if self.model == "unetpp":
            return 16
        return 2 ** self.resolved_depth()


def build_generator(config: PairedConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    dims, base = config.dimension, config.base_channels
    if config.model in ("unet", "cbam_unet", "spade_unet"):
        return UNetGenerator(dims, in_channels, out_channels, depth=config.resolved_depth(), base_channels=base,
                             skip_attention=config.model == "cbam_unet",
                             spade_channels=in_channels if config.model == "spade_unet" else 0)
    if config.model == "resnet":
        return ResNetGenerator(dims, in_channels, out_channels, base_channels=base)
    if config.model == "local_enhancer":
        return LocalEnhancer(dims, in_channels, out_channels, base_channels=base)
    return UNetPlusPlusGenerator(dims, in_channels, out_channels, base_channels=base)


def build_discriminator(config: PairedConfig, channels: int) -> torch.nn.Module:
    """PatchGAN (3 strided layers) or 3-scale discriminator, made shallower for small tiles so that every
    normalised feature map keeps more than one voxel."""
    scales = 1
    if config.discriminator == "multiscale":
        while scales < 3 and config.tile // 2**scales >= 16:
            scales += 1
    smallest = config.tile // 2 ** (scales - 1)
    layers = max(1, min(3, int(math.log2(smallest / 4))))
    if config.discriminator == "multiscale":
        return MultiScaleDiscriminator(config.dimension, channels, num_scales=scales,
                                       base_channels=config.base_channels, num_layers=layers)
    return PatchDiscriminator(config.dimension, channels, base_channels=config.base_channels, num_layers=layers)


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
    the multi-scale discriminator); Adam, constant then linearly decaying learning rate; a checkpoint every epoch."""

    def __init__(self, config: PairedConfig, data: PairedData, run_dir: Path,
                 progress: Callable[[int, dict], None] | None = None) -> None:
        self.config, self.data, self.run_dir = config, data, run_dir
        self.progress = progress or (lambda epoch, losses: None)
        self.device = resolve_device(config.device)
        in_channels, out_channels = data.sources[0].shape[0], data.targets[0].shape[0]
        self.generator = build_generator(config, in_channels, out_channels).to(self.device)
        self.discriminator = build_discriminator(config, in_channels + out_channels).to(self.device)
        betas = (config.beta1, 0.999)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas)
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr, betas=betas)
        decay_start = config.epochs // 2 if config.decay_start < 0 else config.decay_start
        span = max(1, config.epochs - decay_start)

        def factor(epoch: int) -> float:
            return 1.0 - max(0, epoch - decay_start) / span

        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (self.optimizer_g, self.optimizer_d)]
        self.start_epoch = 0
        self.history: list[dict] = []
        self.perceptual = None
        if config.perceptual_weights:
            if config.dimension != 2:
                raise ConsinganError("the perceptual loss is 2D only")
            self.perceptual = VGGPerceptualLoss.from_file(config.perceptual_weights).to(self.device)

    def state(self, epoch: int) -> dict:
        return {
            "epoch": epoch, "generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(), "optimizer_d": self.optimizer_d.state_dict(),
            "scheduler_g": self.schedulers[0].state_dict(), "scheduler_d": self.schedulers[1].state_dict(),
            "rng_torch": torch.get_rng_state(), "history": json.dumps(self.history),
        }

    def restore(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.schedulers[0].load_state_dict(state["scheduler_g"])
        self.schedulers[1].load_state_dict(state["scheduler_d"])
        torch.set_rng_state(state["rng_torch"].cpu())
        self.start_epoch = int(state["epoch"])
        self.history = json.loads(state["history"])

    def step(self, source: torch.Tensor, target: torch.Tensor) -> dict:
        config, generator, discriminator = self.config, self.generator, self.discriminator
        fake = generator(source)
        outputs = fake if isinstance(fake, list) else [fake]  # U-Net++ deep supervision
        fake = outputs[-1]
        discriminator.requires_grad_(True)
        self.optimizer_d.zero_grad(set_to_none=True)
        real_scales = _scales(discriminator(torch.cat([source, target], 1)))
        fake_scales = _scales(discriminator(torch.cat([source, fake.detach()], 1)))
        loss_d = 0.5 * sum(adversarial_loss(r[-1], True, config.gan_mode) + adversarial_loss(f[-1], False,
                           config.gan_mode) for r, f in zip(real_scales, fake_scales)) / len(real_scales)
        loss_d.backward()
        self.optimizer_d.step()
        discriminator.requires_grad_(False)
        self.optimizer_g.zero_grad(set_to_none=True)
        fake_scales = _scales(discriminator(torch.cat([source, fake], 1)))
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
        config = self.config
        dataset = TileDataset(self.data, config.tile, config.resolved_stride())
        generator = torch.Generator().manual_seed(int(config.seed))
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                             num_workers=config.num_workers, generator=generator)
        self.generator.train()
        self.discriminator.train()
        for epoch in range(self.start_epoch + 1, config.epochs + 1):
            generator.manual_seed(int(config.seed) + epoch)  # tile order per epoch, independent of resuming
            started, totals = time.perf_counter(), []
            for source, target in loader:
                totals.append(self.step(source.to(self.device), target.to(self.device)))
            for scheduler in self.schedulers:
                scheduler.step()
            losses = {k: float(np.mean([t[k] for t in totals])) for k in totals[0]}
            losses.update(epoch=epoch, seconds=time.perf_counter() - started)
            self.history.append(losses)
            save_state(self.run_dir / "checkpoint.pt", self.state(epoch))
            self.progress(epoch, losses)
        save_state(self.run_dir / "generator.pt", self.generator.state_dict())
        return self.history


def train_paired(config: PairedConfig, progress: Callable[[int, dict], None] | None = None) -> PairedResult:
    """Check the data, make a run folder, train; everything is checked before anything is written."""
    config = config.validate()
    if config.seed is None:
        config = dataclasses.replace(config, seed=secrets.randbelow(2**31))
    data = load_pairs(Path(config.source_dir), Path(config.target_dir), config.dimension, config.one_hot)
    multiple = config.size_multiple()
    if config.tile % multiple:
        raise ConsinganError(f"--tile {config.tile} must be a multiple of {multiple} for model {config.model}")
    # Models with a normalised bottleneck need it at least 2 voxels wide (U-Nets leave their innermost unnormalised).
    smallest_tile = multiple if config.model.endswith("unet") else 2 * multiple
    if config.tile < smallest_tile:
        raise ConsinganError(f"--tile must be at least {smallest_tile} for model {config.model}")
    smallest = min(min(s.shape[1:]) for s in data.sources)
    if smallest < multiple:
        raise ConsinganError(f"the smallest image side ({smallest}) is below the model's minimum {multiple}")
    run_dir = make_run_dir(Path(config.out_dir), config.run_name, "paired")
    save_json(run_dir / "config.json", dataclasses.asdict(config))
    save_json(run_dir / "data.json", {
        "names": data.names, "source_encoding": data.source_encoding, "target_intensity": data.target_intensity.to_dict(),
        "source_channels": int(data.sources[0].shape[0]), "target_channels": int(data.targets[0].shape[0]),
        "source_file_channels": data.source_volumes[0].channels,
    })
    torch.manual_seed(config.seed)
    trainer = PairedTrainer(config, data, run_dir, progress)
    return PairedResult(run_dir, config, trainer.train())


def _open_paired_run(run_dir: Path) -> tuple[PairedConfig, dict]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "data.json").is_file():
        raise ConsinganError(f"{run_dir} is not a paired run folder (no config.json / data.json)")
    config = PairedConfig(**json.loads((run_dir / "config.json").read_text()))
    return config, json.loads((run_dir / "data.json").read_text())


def resume_paired(run_dir: Path, progress: Callable[[int, dict], None] | None = None) -> PairedResult:
    """Continue a paired run from its last epoch checkpoint; options come from the run."""
    config, _ = _open_paired_run(run_dir)
    data = load_pairs(Path(config.source_dir), Path(config.target_dir), config.dimension, config.one_hot)
    trainer = PairedTrainer(config, data, Path(run_dir), progress)
    if (Path(run_dir) / "checkpoint.pt").is_file():
        trainer.restore(load_state(Path(run_dir) / "checkpoint.pt"))
    return PairedResult(Path(run_dir), config, trainer.train())


def predict_paired(run_dir: Path, source_dir: Path, out_dir: Path, device: str = "cpu") -> list[Path]:
    """Translate every image in ``source_dir`` (any size) through overlapping tiles; outputs keep the source's file
    type and geometry, intensities in the training targets' range."""
    config, info = _open_paired_run(run_dir)
    weights = Path(run_dir) / ("generator.pt" if (Path(run_dir) / "generator.pt").is_file() else "checkpoint.pt")
    state = load_state(weights)
    state = state.get("generator", state)
    torch_device = resolve_device(device)
    generator = build_generator(config, info["source_channels"], info["target_channels"]).to(torch_device)
    generator.load_state_dict(state)
    generator.eval()
    target_intensity = IntensityRange.from_dict(info["target_intensity"])
    sources = sorted(p for p in Path(source_dir).iterdir() if p.is_file()) if Path(source_dir).is_dir() else []
    if not sources:
        raise ConsinganError(f"no images in {source_dir}")
    names = [Path(out_dir) / (p.name.split(".")[0] + output_suffix(file_suffix(p))) for p in sources]
    taken = [n.name for n in names if n.exists()]
    if taken:
        raise ConsinganError(f"{out_dir} already holds {taken[0]}; choose another --out")
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    def run(tile: torch.Tensor) -> torch.Tensor:
        output = generator(tile.to(torch_device))
        return (output[-1] if isinstance(output, list) else output).cpu()

    written = []
    stride = config.resolved_stride()
    for path, name in zip(sources, names):
        volume = read_volume(path, config.dimension, check_values=False)
        if volume.channels != info["source_file_channels"]:
            raise ConsinganError(f"{path.name} has {volume.channels} channels, the model takes "
                                 f"{info['source_file_channels']}")
        encoded = torch.from_numpy(encode_source(volume.array, info["source_encoding"]))[None]
        with torch.no_grad():
            result = predict_tiled(run, encoded, [config.tile] * config.dimension, [stride] * config.dimension,
                                   multiple=config.size_multiple())
        array = target_intensity.denormalise(result[0].numpy())
        written.append(write_volume(name, Volume(array, volume.affine, volume.suffix, np.dtype(np.float32),
                                                 volume.header)))
    return written

