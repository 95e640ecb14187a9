"""Dimension-generic building blocks shared by every model in consingan.

The public names are imported on first use (PEP 562): a module that needs ``factory`` does not load every block.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_HOMES[name]}")
    value = module if _HOMES[name] == name else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
