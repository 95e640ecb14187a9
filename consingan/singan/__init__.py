"""The single-image engine: pyramid, growing generator, critic and trainer."""

from consingan.singan.models import Critic, GrowingGenerator
from consingan.singan.pyramid import build_pyramid, pyramid_shapes, resize
from consingan.singan.trainer import SinGANTrainer, TrainResult, train

__all__ = ["Critic", "GrowingGenerator", "build_pyramid", "pyramid_shapes", "resize", "SinGANTrainer", "TrainResult",
           "train"]
