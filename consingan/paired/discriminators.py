"""PatchGAN and the pix2pixHD multi-scale discriminator; both return raw logits and their intermediate features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from consingan.nn import factory


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): 4-wide convs, ``num_layers`` strided, then two stride-1 layers to a 1-channel
    logit map. ``forward`` returns the list of every block's output, the logits last (for feature matching)."""

    def __init__(self, spatial_dims: int, in_channels: int, base_channels: int = 64, num_layers: int = 3,
                 norm_name: str = "instance", spectral: bool = False) -> None:
        super().__init__()
        wrap = factory.spectral_norm if spectral else (lambda layer: layer)
        self.blocks = nn.ModuleList()
        width, previous = base_channels, in_channels
        for index in range(num_layers + 1):
            stride = 2 if index < num_layers else 1
            block = nn.Sequential(wrap(factory.conv(spatial_dims, previous, width, 4, stride=stride, padding=1)))
            if index > 0 and not spectral:  # spectral norm replaces batch statistics rather than stacking on them
                block.append(factory.norm(spatial_dims, norm_name, width, affine=True))
            block.append(factory.activation("leaky_relu", negative_slope=0.2))
            self.blocks.append(block)
            previous, width = width, min(width * 2, 512)
        self.blocks.append(nn.Sequential(wrap(factory.conv(spatial_dims, previous, 1, 4, padding=1))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class MultiScaleDiscriminator(nn.Module):
    """``num_scales`` PatchGANs on the input downsampled by 2 between scales (3-wide average pooling, stride 2)."""

    def __init__(self, spatial_dims: int, in_channels: int, num_scales: int = 3, **patch_args) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.discriminators = nn.ModuleList(
            PatchDiscriminator(spatial_dims, in_channels, **patch_args) for _ in range(num_scales)
        )

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        outputs = []
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        for index, discriminator in enumerate(self.discriminators):
            if index:
                x = pool(x, 3, stride=2, padding=1, count_include_pad=False)
            outputs.append(discriminator(x))
        return outputs
