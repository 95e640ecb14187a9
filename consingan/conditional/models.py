"""Class-conditional generator and discriminators on the shared N-D factory (a DCGAN design, with its fixes).

What a common class-conditional DCGAN for medical images does and what is built here instead:

- its label went through a 65,536-wide dense map reshaped to an image; here a small learned embedding (``embedding_dim``)
  joins the noise and, through conditional batch norm, sets every generator stage's scale and shift;
- its transposed convolutions leave checkerboard artefacts; here each stage is nearest-neighbour upsampling then
  convolutions (a BigGAN-style residual block);
- its discriminator stacked batch norm on spectral norm; here every discriminator layer is spectral-normalised and
  there is no batch norm in it at all, and the class enters by projection (Miyato & Koyama 2018) or through an
  auxiliary classifier head (AC-GAN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from consingan.nn import factory


def stage_channels(base: int, maximum: int, stages: int) -> list[int]:
    """Channels at each side 4, 8, ... 4 x 2^stages: base x 2^(stages - k), capped at ``maximum``."""
    return [min(maximum, base * 2 ** (stages - k)) for k in range(stages + 1)]


class SelfAttention(nn.Module):
    """SAGAN's self-attention (Zhang et al. 2019) over every position of a 2D or 3D feature map.

    ``x + gate * attention(x)`` with the gate a learned scalar starting at 0, so a new block is the identity and the
    network learns how much non-local context to mix in. The attention map has (positions)^2 entries per image: its
    memory grows with the square of the voxel count (see ``attention_bytes``).
    """

    def __init__(self, spatial_dims: int, channels: int, spectral: bool = True) -> None:
        super().__init__()
        wrap = factory.spectral_norm if spectral else (lambda layer: layer)
        inner = max(1, channels // 8)
        self.query = wrap(factory.conv(spatial_dims, channels, inner, 1, bias=False))
        self.key = wrap(factory.conv(spatial_dims, channels, inner, 1, bias=False))
        self.value = wrap(factory.conv(spatial_dims, channels, max(1, channels // 2), 1, bias=False))
        self.out = wrap(factory.conv(spatial_dims, max(1, channels // 2), channels, 1, bias=False))
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = (layer(x).flatten(2) for layer in (self.query, self.key, self.value))
        weights = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # [N, P, P]: position i attends to j
        mixed = (value @ weights.transpose(1, 2)).view(x.shape[0], -1, *x.shape[2:])
        return x + self.gate * self.out(mixed)


def attention_bytes(side: int, spatial_dims: int, batch: int) -> int:
    """Memory of one self-attention block at ``side`` for a batch, training included: the float32 map
    [batch, P, P] is kept for the backward pass with its softmax output and gradient (about 3 copies)."""
    positions = side**spatial_dims
    return 3 * 4 * batch * positions**2


class ConditionalBatchNorm(nn.Module):
    """Batch norm without its own affine; a class embedding sets the scale (1 + gamma) and shift (beta) instead."""

    def __init__(self, spatial_dims: int, channels: int, condition_dim: int) -> None:
        super().__init__()
        self.norm = factory.norm(spatial_dims, "batch", channels, affine=False)
        self.scale = nn.Linear(condition_dim, channels)
        self.shift = nn.Linear(condition_dim, channels)
        for layer in (self.scale, self.shift):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        return self.norm(x) * (1 + self.scale(condition).view(view)) + self.shift(condition).view(view)


class GeneratorBlock(nn.Module):
    """Residual up-block: CBN, ReLU, nearest x2, conv; CBN, ReLU, conv; plus a nearest x2 + 1-wide conv shortcut."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, condition_dim: int) -> None:
        super().__init__()
        self.norm1 = ConditionalBatchNorm(spatial_dims, in_channels, condition_dim)
        self.conv1 = factory.conv(spatial_dims, in_channels, out_channels, 3, padding=1)
        self.norm2 = ConditionalBatchNorm(spatial_dims, out_channels, condition_dim)
        self.conv2 = factory.conv(spatial_dims, out_channels, out_channels, 3, padding=1)
        self.shortcut = factory.conv(spatial_dims, in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm1(x, condition)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h), condition)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class ConditionalGenerator(nn.Module):
    """Noise + class embedding -> a 4^dims map -> ``stages`` up-blocks (each doubling every side) -> tanh image."""

    def __init__(self, spatial_dims: int, out_channels: int, num_classes: int, size: int, noise_dim: int = 128,
                 embedding_dim: int = 32, base_channels: int = 32, max_channels: int = 256,
                 attention: int = 0) -> None:
        super().__init__()
        self.spatial_dims, self.noise_dim, self.size = spatial_dims, noise_dim, size
        stages = int(round(math.log2(size / 4)))
        widths = stage_channels(base_channels, max_channels, stages)
        self.embedding = nn.Embedding(num_classes, embedding_dim)
        condition_dim = noise_dim + embedding_dim
        self.start = nn.Linear(condition_dim, widths[0] * 4**spatial_dims)
        self.blocks = nn.ModuleList(GeneratorBlock(spatial_dims, widths[k], widths[k + 1], condition_dim)
                                    for k in range(stages))
        sides = [4 * 2**k for k in range(stages + 1)]
        self.attention_at = attention if attention in sides else 0
        self.attention = SelfAttention(spatial_dims, widths[sides.index(attention)], spectral=False) \
            if self.attention_at else None
        self.head = nn.Sequential(factory.norm(spatial_dims, "batch", widths[-1]), nn.ReLU(),
                                  factory.conv(spatial_dims, widths[-1], out_channels, 3, padding=1), nn.Tanh())

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        condition = torch.cat([noise, self.embedding(labels)], dim=1)
        x = self.start(condition).view(noise.shape[0], -1, *([4] * self.spatial_dims))
        side = 4
        for block in [None, *self.blocks]:
            if block is not None:
                x, side = block(x, condition), side * 2
            if side == self.attention_at:
                x = self.attention(x)
        return self.head(x)


class DiscriminatorBlock(nn.Module):
    """Spectral-normalised residual down-block (no batch norm): [ReLU], conv, ReLU, conv, average-pool x2; shortcut
    1-wide conv then pooling. The first block skips the leading ReLU (its input is the image)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, first: bool) -> None:
        super().__init__()
        sn = factory.spectral_norm
        self.first, self.spatial_dims = first, spatial_dims
        self.conv1 = sn(factory.conv(spatial_dims, in_channels, out_channels, 3, padding=1))
        self.conv2 = sn(factory.conv(spatial_dims, out_channels, out_channels, 3, padding=1))
        self.shortcut = sn(factory.conv(spatial_dims, in_channels, out_channels, 1))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d)(x, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self._pool(self.conv2(F.relu(self.conv1(h))))
        return h + (self.shortcut(self._pool(x)) if self.first else self._pool(self.shortcut(x)))


class ConditionalDiscriminator(nn.Module):
    """Down-blocks from ``size`` to 4, ReLU, sum over positions -> features h [N, C]; the logit is ``linear(h)`` plus
    the projection ``<embed(y), h>`` (``conditioning='projection'``), or ``linear(h)`` beside a class head
    (``'acgan'``). ``forward`` returns (logits [N], every block's features, class logits [N, K] or None)."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, size: int, base_channels: int = 32,
                 max_channels: int = 256, attention: int = 0, conditioning: str = "projection") -> None:
        super().__init__()
        if conditioning not in ("projection", "acgan"):
            raise ValueError(f"unknown conditioning {conditioning!r}")
        sn = factory.spectral_norm
        stages = int(round(math.log2(size / 4)))
        widths = list(reversed(stage_channels(base_channels, max_channels, stages)))  # at sides size ... 4
        sides = [size // 2**k for k in range(stages + 1)]
        self.attention_at = attention if attention in sides[1:] else 0
        self.blocks = nn.ModuleList()
        previous = in_channels
        for k in range(stages):
            self.blocks.append(DiscriminatorBlock(spatial_dims, previous, widths[k + 1], first=k == 0))
            previous = widths[k + 1]
        self.attention = SelfAttention(spatial_dims, widths[sides.index(self.attention_at)]) \
            if self.attention_at else None
        self.linear = sn(nn.Linear(previous, 1))
        self.conditioning = conditioning
        if conditioning == "projection":
            self.embedding = sn(nn.Embedding(num_classes, previous))
            self.classifier = None
        else:
            self.classifier = sn(nn.Linear(previous, num_classes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                       torch.Tensor | None]:
        features, side = [], x.shape[2]
        for block in self.blocks:
            x, side = block(x), side // 2
            if side == self.attention_at:
                x = self.attention(x)
            features.append(x)
        h = F.relu(x).flatten(2).sum(-1)
        logits = self.linear(h).squeeze(1)
        if self.conditioning == "projection":
            return logits + (self.embedding(labels) * h).sum(1), features, None
        return logits, features, self.classifier(h)


class MultiScaleConditionalDiscriminator(nn.Module):
    """``scales`` conditional discriminators, the k-th on the image average-pooled 2^k times (as pix2pixHD's)."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, size: int, scales: int = 1,
                 **options) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.discriminators = nn.ModuleList(
            ConditionalDiscriminator(spatial_dims, in_channels, num_classes, size // 2**k, **options)
            for k in range(scales))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> list[tuple]:
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        outputs = []
        for index, discriminator in enumerate(self.discriminators):
            if index:
                x = pool(x, 2)
            outputs.append(discriminator(x, labels))
        return outputs


def build_models(config, channels: int, num_classes: int) -> tuple[ConditionalGenerator,
                                                                    MultiScaleConditionalDiscriminator]:
    """The generator and discriminator of a ``ConditionalConfig``."""
    generator = ConditionalGenerator(config.dimension, channels, num_classes, config.size, config.noise_dim,
                                     config.embedding_dim, config.num_feature_channels, config.max_channels,
                                     config.resolved_attention())
    discriminator = MultiScaleConditionalDiscriminator(
        config.dimension, channels, num_classes, config.size, config.discriminator_scales,
        base_channels=config.num_feature_channels, max_channels=config.max_channels, attention=config.resolved_attention(),
        conditioning=config.conditioning)
    return generator, discriminator
