"""SPADE: spatially-adaptive normalisation (Park et al., CVPR 2019), 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from consingan.nn import factory


class SPADE(nn.Module):
    """Parameter-free instance norm of x, then scale (1 + gamma) and shift beta predicted from the segmentation map.

    The map is resized (nearest) to x's size, passed through a shared 3-wide conv + ReLU (``hidden`` channels), then
    two 3-wide convs give gamma and beta per channel and position.
    """

    def __init__(self, spatial_dims: int, channels: int, label_channels: int, hidden: int = 128) -> None:
        super().__init__()
        self.norm = factory.norm(spatial_dims, "instance", channels, affine=False)
        self.shared = nn.Sequential(factory.conv(spatial_dims, label_channels, hidden, 3, padding=1),
                                    factory.activation("relu"))
        self.gamma = factory.conv(spatial_dims, hidden, channels, 3, padding=1)
        self.beta = factory.conv(spatial_dims, hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, segmentation: torch.Tensor) -> torch.Tensor:
        segmentation = F.interpolate(segmentation, size=x.shape[2:], mode="nearest")
        features = self.shared(segmentation)
        return self.norm(x) * (1 + self.gamma(features)) + self.beta(features)
