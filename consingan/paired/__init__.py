"""Paired image-to-image GANs (mask -> image, phase contrast -> fluorescence) on the shared N-D blocks."""

from consingan.paired.discriminators import MultiScaleDiscriminator, PatchDiscriminator
from consingan.paired.perceptual import VGGPerceptualLoss
from consingan.paired.resnet import LocalEnhancer, ResidualBlock, ResNetGenerator
from consingan.paired.refiner import ResNetRefiner
from consingan.paired.unet import UNetGenerator
from consingan.paired.unetpp import UNetPlusPlusGenerator

__all__ = ["LocalEnhancer", "VGGPerceptualLoss", "MultiScaleDiscriminator", "PatchDiscriminator", "ResidualBlock", "ResNetGenerator", "ResNetRefiner", "UNetGenerator",
           "UNetPlusPlusGenerator"]
