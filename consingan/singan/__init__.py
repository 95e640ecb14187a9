"""The single-image engine: pyramid, growing generator, critic and trainer.

The public names are imported on first use (PEP 562), so that importing one submodule (the sampler, which every
``AugmentationDataset`` worker loads) does not load the others (the trainer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consingan.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
