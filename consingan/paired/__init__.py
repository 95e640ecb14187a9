"""Paired image-to-image GANs (mask -> image, phase contrast -> fluorescence) on the shared N-D blocks.

The public names are imported on first use (PEP 562), so that ``paired predict`` loads the generators it builds and
not the training code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consingan.lazy import lazy_exports

if TYPE_CHECKING:
    from consingan.paired.discriminators import MultiScaleDiscriminator, PatchDiscriminator
    from consingan.paired.refiner import ResNetRefiner
    from consingan.paired.resnet import LocalEnhancer, ResidualBlock, ResNetGenerator
    from consingan.paired.unet import UNetGenerator
    from consingan.paired.unetpp import UNetPlusPlusGenerator

_HOMES = {
    "LocalEnhancer": "resnet", "ResidualBlock": "resnet", "ResNetGenerator": "resnet",
    "MultiScaleDiscriminator": "discriminators", "PatchDiscriminator": "discriminators",
    "ResNetRefiner": "refiner",
    "UNetGenerator": "unet",
    "UNetPlusPlusGenerator": "unetpp",
}
__all__ = list(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
