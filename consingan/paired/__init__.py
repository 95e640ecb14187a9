"""Paired image-to-image GANs (mask -> image, phase contrast -> fluorescence) on the shared N-D blocks."""

from consingan.paired.discriminators import MultiScaleDiscriminator, PatchDiscriminator
from consingan.paired.resnet import ResidualBlock, ResNetGenerator
from consingan.paired.refiner import ResNetRefiner
from consingan.paired.unet import UNetGenerator
from consingan.paired.unetpp import UNetPlusPlusGenerator

__all__ = ["MultiScaleDiscriminator", "PatchDiscriminator", "ResidualBlock", "ResNetGenerator", "ResNetRefiner", "UNetGenerator",
           "UNetPlusPlusGenerator"]
