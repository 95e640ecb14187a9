"""The single-image engine: pyramid, growing generator, critic and trainer.

The public names are imported on first use (PEP 562), so that importing one submodule (the sampler, which every
``AugmentationDataset`` worker loads) does not load the others (the trainer).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consingan.singan.models import Critic, GrowingGenerator
    from consingan.singan.pyramid import build_pyramid, pyramid_shapes, resize
    from consingan.singan.trainer import SinGANTrainer, TrainResult, train

_HOMES = {
    "Critic": "models", "GrowingGenerator": "models",
    "build_pyramid": "pyramid", "pyramid_shapes": "pyramid", "resize": "pyramid",
    "SinGANTrainer": "trainer", "TrainResult": "trainer", "train": "trainer",
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
