"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018), for 2D and 3D feature maps.

Channel attention first, spatial attention second, as in the paper. (The 2D/3D ConSinGAN thesis implementation
this engine re-creates pooled with an average where the max belonged in 3D, swapped the order and crashed with
``cbam=false``.)
"""

from __future__ import annotations

import torch
from torch import nn

from consingan.nn import factory


class ChannelAttention(nn.Module):
    """Per-channel weights in (0, 1) from average- and max-pooled descriptors through one shared bottleneck MLP."""

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.spatial_dims = spatial_dims
        self.avg_pool = factory.pool(spatial_dims, "adaptive_avg", output_size=1)
        self.max_pool = factory.pool(spatial_dims, "adaptive_max", output_size=1)
        # A 1x1 convolution on the pooled [N, C, 1, ...] descriptor is the paper's shared fully connected MLP.
        self.mlp = nn.Sequential(
            factory.conv(spatial_dims, channels, hidden, kernel_size=1),
            factory.activation("relu"),
            factory.conv(spatial_dims, hidden, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor, descriptor: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Return the attention map of shape [N, C, 1, ...] (not yet applied).

        ``descriptor``: the (average, max) pooled [N, C, 1, ...] to use instead of pooling ``x``, for a region of a
        larger map whose statistics were computed beforehand (``consingan.singan.regions``).
        """
        if descriptor is None:
            return torch.sigmoid(self.mlp(self.avg_pool(x)) + self.mlp(self.max_pool(x)))
        average, maximum = descriptor
        return torch.sigmoid(self.mlp(average) + self.mlp(maximum))


class SpatialAttention(nn.Module):
    """Per-position weights in (0, 1) from the channel-wise mean and max through a single wide convolution."""

    def __init__(self, spatial_dims: int, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SpatialAttention kernel_size must be odd, got {kernel_size}")
        self.conv = factory.conv(spatial_dims, 2, 1, kernel_size=kernel_size, padding=kernel_size // 2)

    @staticmethod
    def descriptor(x: torch.Tensor) -> torch.Tensor:
        """The [N, 2, *spatial] channel-wise mean and max that the convolution sees."""
        return torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the attention map of shape [N, 1, *spatial] (not yet applied)."""
        return torch.sigmoid(self.conv(self.descriptor(x)))


class CBAM(nn.Module):
    """Refine features by channel attention, then by spatial attention; output shape equals input shape."""

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16, spatial_kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_attention = ChannelAttention(spatial_dims, channels, reduction)
        self.spatial_attention = SpatialAttention(spatial_dims, spatial_kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_attention(x)
        return x * self.spatial_attention(x)


class CoordinateAttention(nn.Module):
    """Coordinate Attention (Hou et al., CVPR 2021), N-dimensional: one attention vector per spatial axis.

    For each axis the features are average-pooled over every other spatial axis (two poolings in 2D, three in 3D);
    the pooled strips go together through one shared 1x1 bottleneck (norm, hard-swish), are split again and each gets
    its own 1x1 conv and sigmoid; the input is multiplied by all axis attentions (broadcast).
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 32) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.spatial_dims = spatial_dims
        self.shared = nn.Sequential(
            nn.Conv1d(channels, hidden, 1), nn.BatchNorm1d(hidden), nn.Hardswish()
        )
        self.per_axis = nn.ModuleList(nn.Conv1d(hidden, channels, 1) for _ in range(spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = list(range(2, x.dim()))
        strips = [x.mean(dim=[a for a in axes if a != axis]) for axis in axes]  # [N, C, L_axis] each
        lengths = [s.shape[-1] for s in strips]
        mixed = self.shared(torch.cat(strips, dim=-1))
        out = x
        for index, (part, conv) in enumerate(zip(mixed.split(lengths, dim=-1), self.per_axis)):
            weight = torch.sigmoid(conv(part))
            shape = [x.shape[0], x.shape[1]] + [1] * self.spatial_dims
            shape[2 + index] = lengths[index]
            out = out * weight.view(shape)
        return out
