"""Dimension-generic building blocks shared by every model in consingan.

The public names are imported on first use (PEP 562): a module that needs ``factory`` does not load every block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consingan.lazy import lazy_exports

if TYPE_CHECKING:
    from consingan.nn import factory
    from consingan.nn.attention import CBAM, ChannelAttention, CoordinateAttention, SpatialAttention
    from consingan.nn.blocks import ConvBlock
    from consingan.nn.spade import SPADE

_HOMES = {
    "factory": "factory",  # the submodule itself
    "CBAM": "attention", "ChannelAttention": "attention", "CoordinateAttention": "attention",
    "SpatialAttention": "attention",
    "ConvBlock": "blocks",
    "SPADE": "spade",
}
__all__ = list(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
