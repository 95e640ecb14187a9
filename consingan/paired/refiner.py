"""The ResNet background refiner: image + mask in, residual blocks with Coordinate Attention, refined image out."""

from __future__ import annotations

import torch
from torch import nn

from consingan.nn import CoordinateAttention, factory
from consingan.paired.resnet import ResidualBlock


class ResNetRefiner(nn.Module):
    """Head (7-wide conv, instance norm, ReLU), ``num_blocks`` residual blocks each followed by Coordinate Attention
    (optional), tail (3-wide conv, tanh); no resampling, so fine detail stays at full resolution.

    At 256 px with the defaults: 4 x 256 (3-channel GAN output + 1-channel mask) -> 64 x 256 -> 3 x 256.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 4, out_channels: int = 3, channels: int = 64,
                 num_blocks: int = 6, coordinate_attention: bool = True) -> None:
        super().__init__()
        self.head = nn.Sequential(
            factory.pad(spatial_dims, "reflect", 3), factory.conv(spatial_dims, in_channels, channels, 7, bias=False),
            factory.norm(spatial_dims, "instance", channels, affine=True), factory.activation("relu"),
        )
        blocks = []
        for _ in range(num_blocks):
            blocks.append(ResidualBlock(spatial_dims, channels))
            if coordinate_attention:
                blocks.append(CoordinateAttention(spatial_dims, channels))
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Sequential(factory.conv(spatial_dims, channels, out_channels, 3, padding=1),
                                  factory.activation("tanh"))

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(torch.cat([image, mask], dim=1))))
