"""Paired image-to-image GANs (mask -> image, phase contrast -> fluorescence) on the shared N-D blocks.

The public names are imported on first use (PEP 562), so that ``paired predict`` loads the generators it builds and
not the training code or the perceptual loss's network.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consingan.paired.discriminators import MultiScaleDiscriminator, PatchDiscriminator
    from consingan.paired.perceptual import VGGPerceptualLoss
    from consingan.paired.refiner import ResNetRefiner
    from consingan.paired.resnet import LocalEnhancer, ResidualBlock, ResNetGenerator
    from consingan.paired.unet import UNetGenerator
    from consingan.paired.unetpp import UNetPlusPlusGenerator

_HOMES = {
    "LocalEnhancer": "resnet", "ResidualBlock": "resnet", "ResNetGenerator": "resnet",
    "VGGPerceptualLoss": "perceptual",
    "MultiScaleDiscriminator": "discriminators", "PatchDiscriminator": "discriminators",
    "ResNetRefiner": "refiner",
    "UNetGenerator": "unet",
    "UNetPlusPlusGenerator": "unetpp",
}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
