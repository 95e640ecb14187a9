"""consingan: learn from one 2D image or one 3D volume, then generate new, varied ones (ConSinGAN in N-D)."""

from consingan.errors import ConsinganError

__version__ = "0.1.0"
__all__ = ["ConsinganError", "__version__"]
