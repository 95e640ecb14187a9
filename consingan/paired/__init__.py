"""Paired image-to-image GANs (mask -> image, phase contrast -> fluorescence) on the shared N-D blocks."""

from consingan.paired.discriminators import MultiScaleDiscriminator, PatchDiscriminator
from consingan.paired.resnet import ResidualBlock, ResNetGenerator
from consingan.paired.unet import UNetGenerator

__all__ = ["MultiScaleDiscriminator", "PatchDiscriminator", "ResidualBlock", "ResNetGenerator", "UNetGenerator"]
