"""Dimension-generic building blocks shared by every model in consingan."""

from consingan.nn import factory
from consingan.nn.attention import CBAM, ChannelAttention, CoordinateAttention, SpatialAttention
from consingan.nn.blocks import ConvBlock
from consingan.nn.spade import SPADE

__all__ = ["factory", "CBAM", "ChannelAttention", "CoordinateAttention", "SpatialAttention", "ConvBlock", "SPADE"]
