"""Perceptual (VGG-19 feature) loss, only from a local weights file the user gives; nothing is downloaded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from consingan.checkpoint import load_state
from consingan.errors import ConsinganError

# VGG-19's convolutional part ("features"), as in torchvision's state dicts: channels, or "M" for max pooling.
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
# Outputs after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (pix2pixHD's choice), weights 1/32 ... 1.
_TAPS = {1: 1 / 32, 6: 1 / 16, 11: 1 / 8, 20: 1 / 4, 29: 1.0}
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class VGGPerceptualLoss(nn.Module):
    """Weighted L1 between VGG-19 features of fake and real 2D RGB (or grey) images in [-1, 1].

    Load with ``from_file`` on a torchvision-format VGG-19 state dict (keys ``features.N.weight``); off by default.
    """

    def __init__(self) -> None:
        super().__init__()
        layers, channels = [], 3
        for item in _VGG19:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers[: max(_TAPS) + 1])
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str) -> "VGGPerceptualLoss":
        state = load_state(path)
        module = cls()
        wanted = [k for k in module.state_dict() if k.startswith("features.")]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ConsinganError(f"{path} is not a VGG-19 state dict (missing {missing[0]})")
        module.load_state_dict({k: state[k] for k in wanted}, strict=False)
        return module.eval()

    def tapped(self, x: torch.Tensor) -> list[torch.Tensor]:
        """VGG features of 2D images [N, 1 or 3, H, W] in [-1, 1] after relu1_1 ... relu5_1."""
        if x.dim() != 4:
            raise ConsinganError("the perceptual loss works on 2D images")
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        x = ((x + 1) / 2 - self.mean) / self.std
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAPS:
                taps.append(x)
        return taps

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return sum(weight * F.l1_loss(f, r.detach())
                   for weight, f, r in zip(_TAPS.values(), self.tapped(fake), self.tapped(real)))

    def batch_mean_loss(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """For unpaired batches (the conditional GAN): weighted L1 between the batch-mean features of fake and
        real images, which compares what the two sets look like on average rather than image to image."""
        return sum(weight * F.l1_loss(f.mean(0), r.detach().mean(0))
                   for weight, f, r in zip(_TAPS.values(), self.tapped(fake), self.tapped(real)))
