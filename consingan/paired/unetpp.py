"""U-Net++ (Zhou et al. 2018) generator with nested dense skips, 2D and 3D."""

from __future__ import annotations

import torch
from torch import nn

from consingan.nn import factory


class _DoubleConv(nn.Sequential):
    """Two 3-wide convs, each with instance norm and ReLU, then dropout."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        for index, (cin, cout) in enumerate(((in_channels, out_channels), (out_channels, out_channels))):
            self.add_module(f"conv{index}", factory.conv(spatial_dims, cin, cout, 3, padding=1, bias=False))
            self.add_module(f"norm{index}", factory.norm(spatial_dims, "instance", cout, affine=True))
            self.add_module(f"act{index}", factory.activation("relu"))
        if dropout > 0:
            self.add_module("dropout", nn.Dropout(dropout))


class UNetPlusPlusGenerator(nn.Module):
    """Encoder of ``depth`` double-conv blocks with max pooling (64 ... 1024 channels at 256 px, down to 16 px), nested
    nodes X[i][j] = block(cat(X[i][0..j-1], up(X[i+1][j-1]))), and a 1x1 conv + tanh on X[0][depth-1].

    With ``deep_supervision`` the forward returns the outputs of every top node X[0][1..depth-1] (the last is the
    full-depth prediction), for a loss on each.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, out_channels: int = 3, base_channels: int = 64,
                 depth: int = 5, dropout: float = 0.3, deep_supervision: bool = False) -> None:
        super().__init__()
        self.depth, self.deep_supervision = depth, deep_supervision
        widths = [base_channels * 2**level for level in range(depth)]
        self.pool = factory.pool(spatial_dims, "max", kernel_size=2)
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for level in range(depth):
            self.nodes[f"{level}_0"] = _DoubleConv(spatial_dims, in_channels if level == 0 else widths[level - 1],
                                                   widths[level], dropout)
        for j in range(1, depth):
            for level in range(depth - j):
                self.ups[f"{level}_{j}"] = factory.conv_transpose(spatial_dims, widths[level + 1], widths[level])
                self.nodes[f"{level}_{j}"] = _DoubleConv(spatial_dims, widths[level] * (j + 1), widths[level], dropout)
        heads = depth - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(
            nn.Sequential(factory.conv(spatial_dims, widths[0], out_channels, 1), factory.activation("tanh"))
            for _ in range(heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        factor = 2 ** (self.depth - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"spatial sizes {tuple(x.shape[2:])} must be divisible by {factor}")
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for level in range(self.depth):
            grid[level, 0] = self.nodes[f"{level}_0"](x if level == 0 else self.pool(grid[level - 1, 0]))
        for j in range(1, self.depth):
            for level in range(self.depth - j):
                inputs = [grid[level, k] for k in range(j)] + [self.ups[f"{level}_{j}"](grid[level + 1, j - 1])]
                grid[level, j] = self.nodes[f"{level}_{j}"](torch.cat(inputs, dim=1))
        if self.deep_supervision:
            return [head(grid[0, j]) for head, j in zip(self.heads, range(1, self.depth))]
        return self.heads[0](grid[0, self.depth - 1])
