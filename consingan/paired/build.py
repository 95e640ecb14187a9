"""Building the paired family's networks from a ``PairedConfig`` (shared by training and prediction)."""

from __future__ import annotations

import math

import torch

from consingan.config import PAIRED_MODELS, UNET_MODELS, PairedConfig
from consingan.paired.discriminators import MultiScaleDiscriminator, PatchDiscriminator
from consingan.paired.resnet import LocalEnhancer, ResNetGenerator
from consingan.paired.unet import UNetGenerator
from consingan.paired.unetpp import UNetPlusPlusGenerator

MODELS = PAIRED_MODELS
MODEL_NAMES = ("generator", "discriminator")  # the names of the models in a paired training state


def build_generator(config: PairedConfig, in_channels: int, out_channels: int) -> torch.nn.Module:
    dims, base = config.dimension, config.num_feature_channels
    if config.model in UNET_MODELS:
        return UNetGenerator(dims, in_channels, out_channels, depth=config.resolved_depth(), base_channels=base,
                             skip_attention=config.model == "cbam_unet",
                             spade_channels=in_channels if config.model == "spade_unet" else 0)
    if config.model == "resnet":
        return ResNetGenerator(dims, in_channels, out_channels, base_channels=base)
    if config.model == "local_enhancer":
        return LocalEnhancer(dims, in_channels, out_channels, base_channels=base)
    return UNetPlusPlusGenerator(dims, in_channels, out_channels, base_channels=base,
                                 deep_supervision=config.deep_supervision)


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
                                       base_channels=config.num_feature_channels, num_layers=layers)
    return PatchDiscriminator(config.dimension, channels, base_channels=config.num_feature_channels, num_layers=layers)


