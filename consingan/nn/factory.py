"""Dimension-generic layer factory.

Every function takes ``spatial_dims`` (2 or 3) first and returns a real 2D or 3D layer: 2D is never faked as a
depth-1 volume. Names are matched case-insensitively; an unknown name raises a ``ValueError`` that lists the valid
ones and suggests the closest. Defaults that other libraries inherit silently (InstanceNorm ``affine``, padding mode)
are explicit arguments here.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from torch import nn

from consingan.nn import fast_conv

SUPPORTED_DIMS = (2, 3)


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in SUPPORTED_DIMS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def _lookup(kind: str, name: str, table: dict[str, Any]) -> Any:
    key = str(name).lower().replace("-", "_")
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}.{hint}")


_CONV = {2: nn.Conv2d, 3: fast_conv.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_PAD = {
    "zeros": {2: nn.ZeroPad2d, 3: nn.ZeroPad3d},
    "reflect": {2: nn.ReflectionPad2d, 3: nn.ReflectionPad3d},
    "replicate": {2: nn.ReplicationPad2d, 3: nn.ReplicationPad3d},
}
_PAD_ALIASES = {"zero": "zeros", "zeros": "zeros", "reflect": "reflect", "reflection": "reflect", "replicate": "replicate"}
_POOL = {
    "avg": {2: nn.AvgPool2d, 3: nn.AvgPool3d},
    "max": {2: nn.MaxPool2d, 3: nn.MaxPool3d},
    "adaptive_avg": {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d},
    "adaptive_max": {2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d},
}
_INTERPOLATION = {
    "nearest": {2: "nearest", 3: "nearest"},
    "nearest_exact": {2: "nearest-exact", 3: "nearest-exact"},
    "linear": {2: "bilinear", 3: "trilinear"},
    "bilinear": {2: "bilinear", 3: "trilinear"},
    "trilinear": {2: "bilinear", 3: "trilinear"},
    "area": {2: "area", 3: "area"},
    "cubic": {2: "bicubic", 3: None},  # PyTorch has no tricubic mode
}


def conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int = 0,
    padding_mode: str = "zeros",
    bias: bool = True,
) -> nn.Module:
    """A convolution for ``spatial_dims``; ``padding_mode`` is 'zeros', 'reflect' or 'replicate'.

    In 3D this is a subclass of ``nn.Conv3d`` that runs stride-1 convolutions on the CPU through oneDNN
    (``consingan.nn.fast_conv``); parameters, state-dict keys and results are those of the plain layer.
    """
    mode = _lookup("padding mode", padding_mode, _PAD_ALIASES)
    return _CONV[_check_dims(spatial_dims)](
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, padding_mode=mode, bias=bias
    )


def conv_transpose(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 4,
    stride: int = 2,
    padding: int = 1,
    output_padding: int = 0,
    bias: bool = True,
) -> nn.Module:
    """A transposed convolution; the defaults (4, 2, 1) exactly double each spatial size, as in pix2pix."""
    return _CONV_T[_check_dims(spatial_dims)](
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, output_padding=output_padding, bias=bias
    )


def norm(spatial_dims: int, name: str, num_channels: int, affine: bool = True, **kwargs: Any) -> nn.Module:
    """A normalisation layer: 'batch', 'instance', 'group' (``num_groups`` kwarg) or 'none' (identity).

    ``affine`` is always explicit: PyTorch's InstanceNorm defaults to ``affine=False`` while BatchNorm defaults to
    ``True``, a difference that has surprised users of other toolkits.
    """
    d = _check_dims(spatial_dims)
    builders: dict[str, Callable[[], nn.Module]] = {
        "batch": lambda: (nn.BatchNorm2d if d == 2 else nn.BatchNorm3d)(num_channels, affine=affine, **kwargs),
        "instance": lambda: (nn.InstanceNorm2d if d == 2 else nn.InstanceNorm3d)(num_channels, affine=affine, **kwargs),
        "group": lambda: nn.GroupNorm(kwargs.pop("num_groups", 8), num_channels, affine=affine, **kwargs),
        "none": nn.Identity,
    }
    return _lookup("normalisation", name, builders)()


def activation(name: str, negative_slope: float = 0.2, inplace: bool = False) -> nn.Module:
    """An activation: 'relu', 'leaky_relu' (with ``negative_slope``), 'tanh', 'sigmoid', 'elu', 'gelu', 'silu',
    'none'."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "relu": lambda: nn.ReLU(inplace=inplace),
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope, inplace=inplace),
        "lrelu": lambda: nn.LeakyReLU(negative_slope, inplace=inplace),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "elu": lambda: nn.ELU(inplace=inplace),
        "gelu": nn.GELU,
        "silu": lambda: nn.SiLU(inplace=inplace),
        "none": nn.Identity,
    }
    return _lookup("activation", name, builders)()


def pool(spatial_dims: int, name: str, **kwargs: Any) -> nn.Module:
    """A pooling layer: 'avg', 'max' (``kernel_size``, ``stride``), 'adaptive_avg', 'adaptive_max' (``output_size``)."""
    return _lookup("pooling", name, _POOL)[_check_dims(spatial_dims)](**kwargs)


def pad(spatial_dims: int, name: str, padding: int | tuple[int, ...]) -> nn.Module:
    """An explicit padding layer: 'zeros', 'reflect' or 'replicate' (pix2pixHD needs reflection padding)."""
    mode = _lookup("padding mode", name, _PAD_ALIASES)
    return _PAD[mode][_check_dims(spatial_dims)](padding)


def interpolation_mode(spatial_dims: int, name: str = "linear") -> str:
    """The ``F.interpolate`` mode name for ``spatial_dims``: 'linear' becomes 'bilinear' in 2D, 'trilinear' in 3D."""
    mode = _lookup("interpolation", name, _INTERPOLATION)[_check_dims(spatial_dims)]
    if mode is None:
        raise ValueError(f"interpolation {name!r} has no {spatial_dims}D form in PyTorch")
    return mode


def spectral_norm(module: nn.Module, n_power_iterations: int = 1) -> nn.Module:
    """Wrap a conv or linear layer with spectral normalisation (Miyato et al. 2018) via torch's parametrization."""
    if not hasattr(module, "weight"):
        raise ValueError(f"spectral_norm needs a layer with a weight, got {type(module).__name__}")
    return nn.utils.parametrizations.spectral_norm(module, n_power_iterations=n_power_iterations)
