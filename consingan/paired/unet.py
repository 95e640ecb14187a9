"""The pix2pix U-Net generator (Isola et al. 2017), for 2D and 3D, with a configurable depth."""

from __future__ import annotations

import torch
from torch import nn

from consingan.nn import CBAM, SPADE, factory


def _down(spatial_dims: int, in_channels: int, out_channels: int, norm: bool) -> nn.Sequential:
    block = nn.Sequential()
    block.add_module("conv", factory.conv(spatial_dims, in_channels, out_channels, 4, stride=2, padding=1, bias=not norm))
    if norm:
        block.add_module("norm", factory.norm(spatial_dims, "instance", out_channels, affine=True))
    block.add_module("act", factory.activation("leaky_relu", negative_slope=0.2))
    return block


def _up(spatial_dims: int, in_channels: int, out_channels: int, dropout: float, norm: bool = True) -> nn.Sequential:
    block = nn.Sequential()
    block.add_module("conv", factory.conv_transpose(spatial_dims, in_channels, out_channels, bias=False))
    if norm:  # without it, SPADE normalises between the conv and the activation (see UNetGenerator.forward)
        block.add_module("norm", factory.norm(spatial_dims, "instance", out_channels, affine=True))
    block.add_module("act", factory.activation("relu"))
    if dropout > 0:
        block.add_module("dropout", nn.Dropout(dropout))
    return block


class UNetGenerator(nn.Module):
    """Encoder of ``depth`` strided 4-wide convolutions, decoder of ``depth - 1`` transposed ones with skip
    concatenations, and a final transposed convolution with tanh.

    With depth 8 at 256 px this is pix2pix's U-Net-256: 64, 128, 256, 512, 512, 512, 512, 512 channels down to 1 x 1
    (first and last encoder blocks without normalisation), back up to 64 x 128 x 128, then ``out_channels`` x 256.
    Each spatial side must be divisible by 2**depth.

    Args:
        spatial_dims: 2 or 3.
        in_channels / out_channels: e.g. 1 (mask) -> 3 (RGB).
        depth: number of encoder blocks (8 for 256 px, fewer for small volumes).
        base_channels: channels of the first block; doubled per level up to ``max_channels``.
        dropout: in the three innermost decoder blocks (pix2pix uses 0.5).
        skip_attention: pass each of the ``depth - 1`` decoder concatenations (2F channels) through CBAM before the
            next upsampling (a CBAM U-Net).
        spade_channels: if > 0, the decoder's instance norms become SPADE conditioned on the input (a segmentation
            map with this many channels, normally ``in_channels``), so the layout reaches every decoder level.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, out_channels: int = 3, depth: int = 8,
                 base_channels: int = 64, max_channels: int = 512, dropout: float = 0.5, skip_attention: bool = False,
                 spade_channels: int = 0) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth}")
        self.depth = depth
        widths = [min(base_channels * 2**level, max_channels) for level in range(depth)]
        self.down = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(widths):
            self.down.append(_down(spatial_dims, previous, width, norm=0 < level < depth - 1))
            previous = width
        self.up = nn.ModuleList()
        for index, level in enumerate(range(depth - 2, -1, -1)):
            in_width = widths[level + 1] if index == 0 else widths[level + 1] * 2
            self.up.append(_up(spatial_dims, in_width, widths[level], dropout if index < 3 else 0.0,
                               norm=not spade_channels))
        self.skip_attention = nn.ModuleList(
            CBAM(spatial_dims, widths[level] * 2) for level in range(depth - 2, -1, -1)
        ) if skip_attention else None
        self.spade = nn.ModuleList(
            SPADE(spatial_dims, widths[level], spade_channels) for level in range(depth - 2, -1, -1)
        ) if spade_channels else None
        self.out = nn.Sequential(
            factory.conv_transpose(spatial_dims, widths[0] * 2, out_channels), factory.activation("tanh")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2**self.depth
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"spatial sizes {tuple(x.shape[2:])} must be divisible by 2**depth = {factor}")
        x_input = x
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        segmentation = x_input
        x = skips.pop()
        for index, block in enumerate(self.up):
            if self.spade is not None:
                upsampled = self.spade[index](block.conv(x), segmentation)
                for name, layer in block.named_children():
                    if name != "conv":
                        upsampled = layer(upsampled)
            else:
                upsampled = block(x)
            x = torch.cat([upsampled, skips.pop()], dim=1)
            if self.skip_attention is not None:
                x = self.skip_attention[index](x)
        return self.out(x)
