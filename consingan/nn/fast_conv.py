"""Stride-1 3D convolutions on the CPU through oneDNN (mkldnn) in forward, backward and double backward.

PyTorch sends a batch-1 convolution to its slow reference kernel (``slow_conv3d``) whenever N*C*D*H <= 20480, which
is every small 3D scale of a single-image GAN, and its backward follows the same rule. Here the forward calls
``torch.mkldnn_convolution`` directly, and the backward is written as two more such convolutions (the input gradient
is a convolution with the flipped, transposed kernel; the weight gradient a convolution of the input by the output
gradient), so the gradient penalty's double backward stays on the fast path too. Measured on a 2-core CPU, 32
channels at 16x20x12: forward+backward 41 ms -> 9 ms; numerics equal the plain path to float32 rounding (tested).
A whole 3D training epoch (32 channels, 19x23x14) went from 3.07 s to 0.98 s. 2D is left to PyTorch's dispatch: the
same trick measured slower there (0.19 s vs 0.09 s per epoch at 16x16, 8 channels).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

enabled = True  # set False to compare with PyTorch's own dispatch


def _mkldnn_conv(x: torch.Tensor, weight: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    dims = x.dim() - 2
    return torch.mkldnn_convolution(x, weight, None, list(padding), [1] * dims, [1] * dims, 1)


class _MkldnnConv(torch.autograd.Function):
    """conv(x, weight) with zero padding, stride 1, no bias; differentiable to any order through itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return _mkldnn_conv(x, weight, padding)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        padding = ctx.padding
        spatial = list(range(2, x.dim()))
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            flipped = weight.transpose(0, 1).flip(spatial)
            full = tuple(k - 1 - p for k, p in zip(weight.shape[2:], padding))
            grad_x = _MkldnnConv.apply(grad, flipped, full)
        if ctx.needs_input_grad[1]:
            grad_weight = _WeightGradient.apply(x, grad, padding, tuple(weight.shape))
        return grad_x, grad_weight, None


def _native_takes_onednn(x: torch.Tensor, kernel: Sequence[int]) -> bool:
    """Whether PyTorch's own dispatch sends this convolution to oneDNN (its rule in ``use_mkldnn``, Convolution.cpp):
    a batch above 1, N*C*D*H above 20480, or a kernel wider than 3 in its last two axes."""
    return x.shape[0] > 1 or x.shape[:4].numel() > 20480 or (kernel[-1] > 3 and kernel[-2] > 3)


def _backward_weights(x: torch.Tensor, grad: torch.Tensor, padding: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The kernel gradient by PyTorch's own backward of the convolution (oneDNN's backward-weights primitive where its
    dispatch takes oneDNN, else its slow reference kernel)."""
    dims = x.dim() - 2
    weight = x.new_empty(shape)  # only its shape is read
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [1] * dims, list(padding), [1] * dims,
                                               False, [0] * dims, 1, [False, True, False])[1]


def _swapped_correlation(x: torch.Tensor, grad: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """The kernel gradient as one oneDNN convolution with batch and channels swapped: each input channel is
    correlated with each output-gradient channel, the batch summed as the convolution's input channels."""
    return _mkldnn_conv(x.transpose(0, 1), grad.transpose(0, 1), padding).transpose(0, 1)


# Which of the two kernel-gradient routes is faster depends on the CPU, not only on the shape: oneDNN's
# backward-weights primitive won at batch 2 (9 ms against 33 ms, 16 channels at 25x41x33, one thread) on the machine
# that first measured it, and lost on an AVX2-only EPYC (21 ms against 12 ms at two threads; 40 against 21 at one).
# So, like cuDNN's benchmark mode, each shape is timed once per process and the faster route kept. The swapped route
# must win clearly (SWAP_MARGIN) to be taken, so that a near tie always resolves the same way and repeated runs on one
# machine compute the same rounding. ``weight_gradient_route`` fixes the route instead ('native' or 'swapped'), and
# deterministic mode (torch.use_deterministic_algorithms) never times anything: it takes 'native'.
weight_gradient_route = "auto"
SWAP_MARGIN = 1.25
_routes: dict[tuple, str] = {}


def _fastest_time(compute, repeats: int = 3) -> float:
    compute()  # warm-up: oneDNN builds its primitive on first use
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        compute()
        best = min(best, time.perf_counter() - start)
    return best


def _route(x: torch.Tensor, grad: torch.Tensor, padding: Sequence[int], shape: Sequence[int]) -> str:
    if weight_gradient_route != "auto":
        return weight_gradient_route
    if not _native_takes_onednn(x, shape[2:]):
        return "swapped"  # PyTorch's own kernel there is the slow reference one (61 ms against 9.5 ms)
    if torch.are_deterministic_algorithms_enabled():
        return "native"
    # Patch training meets a new box shape at every border; maps of the same channels within half an octave of
    # voxels share one timing, so a run times a few dozen keys rather than hundreds.
    size = round(2 * math.log2(x.shape[2:].numel()))
    key = (x.shape[0], x.shape[1], grad.shape[1], size, tuple(shape[2:]), x.dtype, torch.get_num_threads())
    if key not in _routes:
        native = _fastest_time(lambda: _backward_weights(x, grad, padding, shape))
        swapped = _fastest_time(lambda: _swapped_correlation(x, grad, padding))
        _routes[key] = "swapped" if swapped * SWAP_MARGIN < native else "native"
    return _routes[key]


def _weight_gradient(x: torch.Tensor, grad: torch.Tensor, padding: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The kernel gradient of conv(x, weight) for the output gradient ``grad``, by the route faster on this CPU."""
    if _route(x, grad, padding, shape) == "native":
        return _backward_weights(x, grad, padding, shape)
    return _swapped_correlation(x, grad, padding)


class _WeightGradient(torch.autograd.Function):
    """The kernel gradient of ``_MkldnnConv`` as a function of its input and output gradient, differentiable again
    (the gradient penalty differentiates the critic's gradient), its own gradients being convolutions again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grad: torch.Tensor, padding: tuple[int, ...], shape: tuple[int, ...]):
        ctx.save_for_backward(x, grad)
        ctx.padding = padding
        return _weight_gradient(x, grad, padding, shape)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        # The kernel gradient is sum over batch and positions of grad[n, o, v] * x[n, i, v + k]: linear in each of
        # x and grad, so the gradient for grad is conv(x, upstream) and for x the input gradient of that convolution.
        x, grad = ctx.saved_tensors
        padding = ctx.padding
        grad_x = grad_grad = None
        if ctx.needs_input_grad[0]:
            spatial = list(range(2, x.dim()))
            full = tuple(k - 1 - p for k, p in zip(upstream.shape[2:], padding))
            grad_x = _MkldnnConv.apply(grad, upstream.transpose(0, 1).flip(spatial), full)
        if ctx.needs_input_grad[1]:
            grad_grad = _MkldnnConv.apply(x, upstream, padding)
        return grad_x, grad_grad, None, None


def _usable(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> bool:
    return (
        enabled
        and x.dim() == 5
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")  # under bf16 autocast PyTorch's own convolution casts; this would not
        and torch.backends.mkldnn.is_available()
        and all(s == 1 for s in conv.stride)
        and all(d == 1 for d in conv.dilation)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def conv_forward(
    conv: nn.modules.conv._ConvNd, x: torch.Tensor, padding: Sequence[int] | None = None
) -> torch.Tensor:
    """``conv(x)``, on the oneDNN path when it applies, else PyTorch's own.

    ``padding`` replaces the layer's own zero padding (the region forward pads its boxes itself and convolves with 0).
    """
    if not _usable(conv, x):
        if padding is None:
            return conv._conv_forward(x, conv.weight, conv.bias)
        functional = F.conv2d if x.dim() == 4 else F.conv3d
        return functional(x, conv.weight, conv.bias, conv.stride, tuple(padding), conv.dilation, conv.groups)
    out = _MkldnnConv.apply(x, conv.weight, tuple(conv.padding) if padding is None else tuple(padding))
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, *([1] * (x.dim() - 2)))
    return out


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that takes the oneDNN path on the CPU (see module docstring); same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x)


def reference_forward(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's plain convolution with the same parameters, for tests and comparisons."""
    functional = F.conv2d if x.dim() == 4 else F.conv3d
    return functional(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
