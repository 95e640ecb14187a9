"""Dimension-generic building blocks shared by every model in consingan."""

from consingan.nn import factory
from consingan.nn.attention import CBAM, ChannelAttention, SpatialAttention
from consingan.nn.blocks import ConvBlock

__all__ = ["factory", "CBAM", "ChannelAttention", "SpatialAttention", "ConvBlock"]
