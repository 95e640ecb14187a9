"""The pix2pixHD global generator (Wang et al. 2018): reflection-padded head, strided downs, residual blocks, ups."""

from __future__ import annotations

import torch
from torch import nn

from consingan.nn import factory


class ResidualBlock(nn.Module):
    """x + (reflect pad, 3-wide conv, instance norm, ReLU, reflect pad, 3-wide conv, instance norm)(x)."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        layers = []
        for index in range(2):
            layers += [
                factory.pad(spatial_dims, "reflect", 1),
                factory.conv(spatial_dims, channels, channels, 3, bias=False),
                factory.norm(spatial_dims, "instance", channels, affine=True),
            ]
            if index == 0:
                layers.append(factory.activation("relu"))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetGenerator(nn.Module):
    """7-wide reflection-padded head, ``num_downsampling`` strided convs (channels doubling), ``num_blocks`` residual
    blocks, as many transposed convs back, a 7-wide tail with tanh. Defaults give a pix2pixHD-style generator at
    256 px: 64 x 256 -> 512 x 32 -> 64 x 256 -> ``out_channels`` x 256."""

    def __init__(self, spatial_dims: int, in_channels: int = 1, out_channels: int = 3, base_channels: int = 64,
                 num_downsampling: int = 3, num_blocks: int = 9) -> None:
        super().__init__()
        layers = [
            factory.pad(spatial_dims, "reflect", 3),
            factory.conv(spatial_dims, in_channels, base_channels, 7, bias=False),
            factory.norm(spatial_dims, "instance", base_channels, affine=True),
            factory.activation("relu"),
        ]
        width = base_channels
        for _ in range(num_downsampling):
            layers += [
                factory.conv(spatial_dims, width, width * 2, 3, stride=2, padding=1, bias=False),
                factory.norm(spatial_dims, "instance", width * 2, affine=True),
                factory.activation("relu"),
            ]
            width *= 2
        layers += [ResidualBlock(spatial_dims, width) for _ in range(num_blocks)]
        for _ in range(num_downsampling):
            layers += [
                factory.conv_transpose(spatial_dims, width, width // 2, 3, stride=2, padding=1, output_padding=1,
                                       bias=False),
                factory.norm(spatial_dims, "instance", width // 2, affine=True),
                factory.activation("relu"),
            ]
            width //= 2
        layers += [
            factory.pad(spatial_dims, "reflect", 3),
            factory.conv(spatial_dims, width, out_channels, 7),
            factory.activation("tanh"),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LocalEnhancer(nn.Module):
    """pix2pixHD's coarse-to-fine generator: a global ResNet generator on the input downsampled by 2, whose last
    features (before its output layer) are added to a full-resolution front end, then residual blocks, an
    upsampling and a 7-wide tail with tanh. The global part has twice the local channels, as in pix2pixHD."""

    def __init__(self, spatial_dims: int, in_channels: int = 1, out_channels: int = 3, base_channels: int = 32,
                 num_blocks: int = 3, global_blocks: int = 9, global_downsampling: int = 3) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        global_generator = ResNetGenerator(spatial_dims, in_channels, out_channels, base_channels * 2,
                                           global_downsampling, global_blocks)
        self.global_features = nn.Sequential(*list(global_generator.model.children())[:-3])  # drop pad, conv, tanh
        self.front = nn.Sequential(
            factory.pad(spatial_dims, "reflect", 3),
            factory.conv(spatial_dims, in_channels, base_channels, 7, bias=False),
            factory.norm(spatial_dims, "instance", base_channels, affine=True), factory.activation("relu"),
            factory.conv(spatial_dims, base_channels, base_channels * 2, 3, stride=2, padding=1, bias=False),
            factory.norm(spatial_dims, "instance", base_channels * 2, affine=True), factory.activation("relu"),
        )
        self.back = nn.Sequential(
            *[ResidualBlock(spatial_dims, base_channels * 2) for _ in range(num_blocks)],
            factory.conv_transpose(spatial_dims, base_channels * 2, base_channels, 3, stride=2, padding=1,
                                   output_padding=1, bias=False),
            factory.norm(spatial_dims, "instance", base_channels, affine=True), factory.activation("relu"),
            factory.pad(spatial_dims, "reflect", 3), factory.conv(spatial_dims, base_channels, out_channels, 7),
            factory.activation("tanh"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = nn.functional.avg_pool2d if self.spatial_dims == 2 else nn.functional.avg_pool3d
        coarse = pool(x, 3, stride=2, padding=1, count_include_pad=False)
        return self.back(self.front(x) + self.global_features(coarse))
