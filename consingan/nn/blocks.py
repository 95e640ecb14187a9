"""Small reusable blocks built from the factory."""

from __future__ import annotations

from torch import nn

from consingan.nn import factory


class ConvBlock(nn.Sequential):
    """Convolution -> normalisation -> activation, with stable child names ``conv``, ``norm``, ``act``.

    Args:
        spatial_dims: 2 or 3.
        in_channels / out_channels: feature channels in and out.
        kernel_size, stride, padding, padding_mode: as for the convolution.
        norm_name: 'batch', 'instance', 'group' or 'none' (default 'none': no ``norm`` child is added).
        norm_affine: learnable scale and shift in the norm (default True).
        act_name: activation name (default 'leaky_relu'); ``negative_slope`` is its slope.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        padding_mode: str = "zeros",
        norm_name: str = "none",
        norm_affine: bool = True,
        act_name: str = "leaky_relu",
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        self.add_module(
            "conv",
            factory.conv(spatial_dims, in_channels, out_channels, kernel_size, stride, padding, padding_mode),
        )
        normalisation = factory.norm(spatial_dims, norm_name, out_channels, affine=norm_affine)
        if not isinstance(normalisation, nn.Identity):
            self.add_module("norm", normalisation)
        self.add_module("act", factory.activation(act_name, negative_slope=negative_slope))
