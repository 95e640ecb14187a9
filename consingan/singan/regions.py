"""Exact region forwards of the growing generator: training on patches and sampling in tiles of large volumes.

``region_forward`` computes, for a box of the finest used stage's output, what ``generator(noise, num_stages)``
computes there, while materialising at every stage only the box that the region needs. The boxes are found
backwards, layer by layer: each convolution needs its output box grown by its kernel, clipped to its input grid;
where the growth leaves the grid, the box is padded with zeros, which are the zeros the whole forward pads with, and
the convolution then runs without padding. No layer computes more than the next one reads, and the result equals
the whole forward to float rounding. Resampling between stages is linear in each axis, so restricted to a box it is
the block of the (out x in) interpolation matrix whose rows are the output box; its nonzero columns are the input
box.

CBAM's channel attention pools over the whole map of its stage, which no region sees. Two rules:

* exact (sampling): the pooled descriptors of every stage, computed beforehand by ``cbam_statistics`` in a tiled
  no-gradient pass, stage by stage (stage k's statistics need stage k's pre-CBAM features over its whole grid, which
  need the statistics of the stages below). A region forward with them equals the whole forward.
* 'region' (training): pool over the pre-CBAM features that the region materialises at that stage; gradients flow
  through the pooling. Over the whole grid this is the whole forward; over a patch the attention weights come from
  the patch's own statistics, as a whole forward on an image of the patch's size would compute them.

``generate_tiled`` (sampling a volume whose whole forward does not fit) computes each coarse stage once, in one piece
or tile by tile, and keeps its output whole while it fits a memory budget; only the stages above run per tile of the
output, from the last one kept, and CBAM's statistics come from the same pass. At 112^3 (32 channels, 3 stages) that
takes 1.1x the whole forward's time with 0.7x its peak memory (benchmarks/bench_tiled_sampling.py).

Boxes are tuples of per-axis ``(start, stop)`` pairs in a stage's own grid. Noise comes from a callable
``noise(stage, box)`` that returns stage ``stage``'s noise in a box of its noise grid; ``NoiseField`` draws it
deterministically chunk by chunk (tiles of one sample agree), ``TensorNoise`` crops whole tensors, ``FreshNoise``
draws new noise for the box only (training).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from consingan.nn import CBAM, fast_conv
from consingan.nn.interpolation import cubic_matrix

Box = tuple[tuple[int, int], ...]
NoiseFn = Callable[[int, Box], torch.Tensor]
Descriptors = list[Union[tuple[torch.Tensor, torch.Tensor], None]]

_POINTWISE = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.ELU, nn.GELU, nn.SiLU)


# --- boxes ------------------------------------------------------------------------------------------------------------

def whole_box(shape: Sequence[int]) -> Box:
    """The box covering a whole grid."""
    return tuple((0, int(s)) for s in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def box_slices(box: Box) -> tuple[slice, ...]:
    """Index of a box in a [N, C, *spatial] tensor."""
    return (slice(None), slice(None), *(slice(lo, hi) for lo, hi in box))


def check_box(box: Box, shape: Sequence[int], what: str = "box") -> Box:
    """``box`` as int pairs, or ValueError when it is empty or leaves the grid ``shape``."""
    box = tuple((int(lo), int(hi)) for lo, hi in box)
    if len(box) != len(shape) or any(not 0 <= lo < hi <= n for (lo, hi), n in zip(box, shape)):
        raise ValueError(f"{what} {box} is not a non-empty box inside the grid {tuple(shape)}")
    return box


def tiles(shape: Sequence[int], tile: int | Sequence[int]) -> Iterator[Box]:
    """Boxes of at most ``tile`` per axis that cover ``shape`` without overlap (the last of each axis shorter)."""
    sizes = _per_axis(tile, len(shape))
    starts = [range(0, n, t) for n, t in zip(shape, sizes)]
    for corner in itertools.product(*starts):
        yield tuple((lo, min(lo + t, n)) for lo, t, n in zip(corner, sizes, shape))


def _per_axis(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    sizes = (int(value),) * dims if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(sizes) != dims or min(sizes) < 1:
        raise ValueError(f"need a positive size or {dims} positive sizes, got {value!r}")
    return sizes


def _hull(a: Box, b: Box) -> Box:
    return tuple((min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b))


def _crop(x: torch.Tensor, box: Box, inner: Box) -> torch.Tensor:
    """The part of ``x`` (which holds ``box``) that lies in ``inner``."""
    for axis, ((lo, _), (a, b)) in enumerate(zip(box, inner)):
        x = x.narrow(2 + axis, a - lo, b - a)
    return x


def _pad_to(x: torch.Tensor, box: Box, wanted: Box) -> torch.Tensor:
    """Zero-pad ``x`` (holding ``box``, the part of ``wanted`` inside the grid) out to ``wanted``."""
    pads: list[int] = []
    for (lo, hi), (a, b) in reversed(list(zip(box, wanted))):
        pads += [lo - a, b - hi]
    return F.pad(x, pads) if any(pads) else x


def _convolve(conv: nn.Module, x: torch.Tensor, box: Box, wanted: Box) -> torch.Tensor:
    """``conv`` without its own padding over ``x`` (holding ``box``) zero-padded out to ``wanted``. Where the padding
    is the same on both sides of every axis (a whole grid, or a box inside it), the convolution pads by itself instead
    of copying the box into a padded one."""
    pads = [(lo - a, b - hi) for (lo, hi), (a, b) in zip(box, wanted)]
    if all(before == after for before, after in pads):
        return fast_conv.conv_forward(conv, x, padding=tuple(before for before, _ in pads))
    return fast_conv.conv_forward(conv, _pad_to(x, box, wanted), padding=(0,) * len(box))


# --- the generator's layers, as operations on boxes -------------------------------------------------------------------

class _Op:
    """One layer: its output grid, the input box an output box needs, and how to compute that box."""

    context = 0  # voxels per side (centred) that the layer reads around a position

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def in_box(self, box: Box, in_shape: tuple[int, ...]) -> Box:
        return box

    def apply(self, x: torch.Tensor, in_box: Box, out_box: Box, descriptor) -> torch.Tensor:
        raise NotImplementedError


def _window_in(box: Box, kernel: Sequence[int], before: Sequence[int]) -> Box:
    """The unclipped input range of a stride-1 window op: output [a, b) reads padded input [a - before, b - before +
    kernel - 1)."""
    return tuple((a - p, b - p + k - 1) for (a, b), k, p in zip(box, kernel, before))


def _clip(box: Box, shape: Sequence[int]) -> Box:
    return tuple((max(0, lo), min(n, hi)) for (lo, hi), n in zip(box, shape))


class _Window(_Op):
    """A stride-1 convolution with zero padding, or an explicit zero-padding layer (a window of 1)."""

    def __init__(self, kernel: Sequence[int], before: Sequence[int], after: Sequence[int],
                 conv: nn.Module | None) -> None:
        self.kernel, self.before, self.after, self.conv = tuple(kernel), tuple(before), tuple(after), conv
        self.context = max((k - 1) // 2 for k in self.kernel)

    def out_shape(self, shape):
        return tuple(n + p + q - k + 1 for n, k, p, q in zip(shape, self.kernel, self.before, self.after))

    def in_box(self, box, in_shape):
        return _clip(_window_in(box, self.kernel, self.before), in_shape)

    def apply(self, x, in_box, out_box, descriptor):
        wanted = _window_in(out_box, self.kernel, self.before)
        if self.conv is None:
            return _pad_to(x, in_box, wanted)
        return _convolve(self.conv, x, in_box, wanted)


class _Pointwise(_Op):
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def apply(self, x, in_box, out_box, descriptor):
        return self.module(x)


class _Cbam(_Op):
    """CBAM: channel attention from given (or the box's own) descriptors, then spatial attention, whose 7-wide
    convolution reads around the box."""

    def __init__(self, module: CBAM) -> None:
        self.module = module
        conv = module.spatial_attention.conv
        self.conv = conv
        self.kernel, self.before = tuple(conv.kernel_size), tuple(conv.padding)
        self.context = max((k - 1) // 2 for k in self.kernel)

    def in_box(self, box, in_shape):
        return _clip(_window_in(box, self.kernel, self.before), in_shape)

    def apply(self, x, in_box, out_box, descriptor):
        if isinstance(descriptor, _Pooled):  # pool over this box, as None does, and keep the result
            attention = self.module.channel_attention
            descriptor.value = descriptor = (attention.avg_pool(x), attention.max_pool(x))
        x = x * self.module.channel_attention(x, descriptor=descriptor)  # descriptor None: pool over this box
        spatial = self.module.spatial_attention.descriptor(x)
        weights = torch.sigmoid(_convolve(self.conv, spatial, in_box, _window_in(out_box, self.kernel, self.before)))
        return _crop(x, in_box, out_box) * weights


class _Pooled:
    """A stage's descriptor that pools over the box the stage materialises (over a whole grid: the exact statistics)
    and keeps what it pooled in ``value``."""

    value: tuple[torch.Tensor, torch.Tensor] | None = None


def _conv_op(conv: nn.modules.conv._ConvNd) -> _Window:
    if (isinstance(conv.padding, str) or conv.padding_mode != "zeros" or any(s != 1 for s in conv.stride)
            or any(d != 1 for d in conv.dilation)):
        raise NotImplementedError(f"region forward needs stride-1, undilated, zero-padded convolutions, got {conv}")
    return _Window(conv.kernel_size, conv.padding, conv.padding, conv)


def _ops(module: nn.Module, dims: int) -> list[_Op]:
    """The generator part ``module`` (head, a stage, tail) as a flat list of box operations."""
    if isinstance(module, CBAM):
        return [_Cbam(module)]
    if isinstance(module, nn.Sequential):
        return [op for child in module for op in _ops(child, dims)]
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return [_conv_op(module)]
    if isinstance(module, (nn.ZeroPad2d, nn.ZeroPad3d)):
        padding = module.padding  # (last before, last after, second-last before, ...)
        before = [padding[2 * (dims - 1 - axis)] for axis in range(dims)]
        after = [padding[2 * (dims - 1 - axis) + 1] for axis in range(dims)]
        if min(before + after) < 0:
            raise NotImplementedError("negative padding (cropping) is not supported in region forwards")
        return [_Window((1,) * dims, before, after, None)]
    if isinstance(module, _POINTWISE):
        return [_Pointwise(module)]
    raise NotImplementedError(f"region forward cannot evaluate {type(module).__name__} on a box")


class _Chain:
    """A sequence of ops with the grid shape before each and after the last."""

    def __init__(self, ops: list[_Op], in_shape: tuple[int, ...]) -> None:
        self.ops = ops
        self.shapes = [tuple(in_shape)]
        for op in ops:
            self.shapes.append(op.out_shape(self.shapes[-1]))
        if min(min(s) for s in self.shapes) < 1:
            raise ValueError(f"grid {tuple(in_shape)} is too small for these layers (sizes {self.shapes})")

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shapes[0]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shapes[-1]

    def boxes(self, out_box: Box) -> list[Box]:
        """The box materialised before each op and after the last, for ``out_box`` at the end."""
        boxes = [out_box]
        for op, shape in zip(reversed(self.ops), reversed(self.shapes[:-1])):
            boxes.insert(0, op.in_box(boxes[0], shape))
        return boxes

    def run(self, x: torch.Tensor, boxes: list[Box], descriptor) -> torch.Tensor:
        for op, in_box, out_box in zip(self.ops, boxes, boxes[1:]):
            x = op.apply(x, in_box, out_box, descriptor)
        return x


# --- resampling restricted to boxes -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def linear_matrix(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (size_out x size_in) matrix of 1D linear interpolation (align_corners False), from PyTorch's own kernel
    applied to the identity in the data's dtype, so it holds the weights that bi/trilinear ``F.interpolate`` uses."""
    basis = torch.eye(size_in, dtype=dtype, device=device).reshape(size_in, 1, size_in)
    return F.interpolate(basis, size=size_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


@functools.lru_cache(maxsize=256)
def _resampling(mode: str, size_in: int, size_out: int, device: torch.device, dtype: torch.dtype):
    """The matrix and, per output row, its first and last nonzero column (a contiguous range)."""
    matrix = (cubic_matrix if mode == "bicubic" else linear_matrix)(size_in, size_out, device, dtype)
    nonzero = (matrix != 0).cpu().numpy()
    first = nonzero.argmax(axis=1)
    last = size_in - 1 - nonzero[:, ::-1].argmax(axis=1)
    return matrix, first, last


def _along(x: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply ``matrix`` (rows out, columns in) to spatial axis ``axis`` of ``x``."""
    moved = x.movedim(2 + axis, -1)
    return (moved @ matrix.T).movedim(-1, 2 + axis)


# --- the generator's layout for one set of scale shapes ---------------------------------------------------------------

class _Layout:
    """Grids and layer chains of ``generator`` for the output shapes ``shapes`` of its first ``num_stages`` stages."""

    def __init__(self, generator: nn.Module, shapes: Sequence[Sequence[int]], num_stages: int | None) -> None:
        num_stages = generator.num_stages if num_stages is None else int(num_stages)
        if not 1 <= num_stages <= generator.num_stages:
            raise ValueError(f"num_stages must be in 1..{generator.num_stages}, got {num_stages}")
        if len(shapes) < num_stages:
            raise ValueError(f"need output shapes for {num_stages} stages, got {len(shapes)}")
        dims = generator.spatial_dims
        self.dims, self.num_stages = dims, num_stages
        self.out = [tuple(int(s) for s in shapes[k]) for k in range(num_stages)]
        if any(len(s) != dims for s in self.out):
            raise ValueError(f"shapes must have {dims} sides each, got {self.out}")
        noise_shapes = [generator.noise_shape(k, self.out[k]) for k in range(num_stages)]
        self.noise = [tuple(s[2:]) for s in noise_shapes]
        self.channels = [s[1] for s in noise_shapes]
        self.mode = generator._resize.mode
        reference = generator.noise_amps
        self.device, self.dtype = reference.device, next(generator.parameters()).dtype
        self.head = _Chain(_ops(generator.head, dims), self.noise[0])
        # Stage 0's noise with the anchor and coordinate channels of its box, where the generator has them.
        self.head_input = getattr(generator, "head_input", lambda z, box, grid: z)
        # A warped anchor deforms with all of stage 0's noise, so stage 0 draws its whole grid and crops after.
        self.whole_head_noise = bool(getattr(generator, "head_needs_whole_noise", False))
        self.tail = _Chain(_ops(generator.tail, dims), self.out[-1])
        self.bodies, self.pre_cbam = [], []
        for k in range(num_stages):
            body = _Chain(_ops(generator.body[k], dims), tuple(s + generator.body_shrink for s in self.out[k]))
            if body.out_shape != self.out[k]:
                raise ValueError(f"stage {k} makes {body.out_shape} from its input, expected {self.out[k]}")
            self.bodies.append(body)
            cbams = [i for i, op in enumerate(body.ops) if isinstance(op, _Cbam)]
            if cbams and cbams != [len(body.ops) - 1]:
                raise NotImplementedError("region forward supports one CBAM, at the end of a stage")
            self.pre_cbam.append(_Chain(body.ops[:-1], body.in_shape) if cbams else None)
        if any(isinstance(op, _Cbam) for op in self.head.ops + self.tail.ops):
            raise NotImplementedError("region forward supports CBAM only at the end of a stage")

    @property
    def has_cbam(self) -> bool:
        return any(p is not None for p in self.pre_cbam)

    def columns(self, src: tuple[int, ...], dst: tuple[int, ...], rows: Box) -> Box:
        """The input box of resampling ``src`` -> ``dst`` that output box ``rows`` reads."""
        box = []
        for m, n, (a, b) in zip(src, dst, rows):
            if m == n:
                box.append((a, b))  # the Resampler leaves equal sizes alone
            else:
                _, first, last = _resampling(self.mode, m, n, self.device, self.dtype)
                box.append((int(first[a:b].min()), int(last[a:b].max()) + 1))
        return tuple(box)

    def resample(self, x: torch.Tensor, box: Box, src: tuple[int, ...], dst: tuple[int, ...],
                 rows: Box) -> torch.Tensor:
        """Rows ``rows`` of resampling ``src`` -> ``dst``, from ``x`` holding ``box`` of the source."""
        for axis, (m, n, (lo, hi), (a, b)) in enumerate(zip(src, dst, box, rows)):
            if m == n:
                x = x.narrow(2 + axis, a - lo, b - a)
            else:
                matrix = _resampling(self.mode, m, n, x.device, x.dtype)[0]
                x = _along(x, matrix[a:b, lo:hi], axis)
        return x


@dataclass(frozen=True)
class StageBoxes:
    """What a region forward materialises at one stage, each box in its own grid.

    ``noise``: of the stage's noise (stage 0: the head's input); ``input``: of the body's input (the noise grid for
    k > 0); ``cbam_input``: of the pre-CBAM features (None without CBAM); ``features``: of the stage's output;
    ``source``: of the previous stage's output read by the resampling (None at stage 0).
    """

    noise: Box
    input: Box
    cbam_input: Box | None
    features: Box
    source: Box | None


@dataclass
class _StagePlan:
    boxes: StageBoxes
    chain: _Chain
    body: list[Box]
    head: list[Box] | None
    skip: bool


def _plan(layout: _Layout, box: Box, target: int, end: str = "tail") -> tuple[list[_StagePlan], list[Box] | None]:
    """Boxes of every stage up to ``target``, backwards from ``box``: a box of the tail's output (``end`` 'tail'), of
    stage ``target``'s output ('features') or of its pre-CBAM features ('pre_cbam')."""
    if end not in ("tail", "features", "pre_cbam"):
        raise ValueError(f"end must be 'tail', 'features' or 'pre_cbam', got {end!r}")
    pre_cbam = end == "pre_cbam"
    if end == "tail":
        tail_boxes = layout.tail.boxes(box)
        features = tail_boxes[0]
    else:
        tail_boxes, features = None, box
    plans: list[_StagePlan | None] = [None] * (target + 1)
    for k in range(target, -1, -1):
        last = pre_cbam and k == target
        chain = layout.pre_cbam[k] if last else layout.bodies[k]
        body = chain.boxes(features)
        cbam_input = body[-2] if (not last and layout.pre_cbam[k] is not None) else (features if last else None)
        head = None
        skip = k > 0 and not last  # the pre-CBAM features come before the skip connection's sum
        if k > 0:
            source = layout.columns(layout.out[k - 1], layout.noise[k], body[0])
            if skip:
                source = _hull(source, layout.columns(layout.out[k - 1], layout.out[k], features))
            noise = body[0]
        else:
            source = None
            head = layout.head.boxes(layout.columns(layout.head.out_shape, layout.bodies[0].in_shape, body[0]))
            noise = head[0]
        plans[k] = _StagePlan(StageBoxes(noise, body[0], cbam_input, features, source), chain, body, head, skip)
        features = source
    return plans, tail_boxes


def _draw(noise: NoiseFn, stage: int, box: Box, channels: int) -> torch.Tensor:
    z = noise(stage, box)
    if z.dim() != 2 + len(box) or z.shape[1] != channels or tuple(z.shape[2:]) != box_shape(box):
        raise ValueError(f"noise of stage {stage} for box {box} must be [N, {channels}, *{box_shape(box)}], "
                         f"got {tuple(z.shape)}")
    return z


def _run(generator: nn.Module, layout: _Layout, plans: list[_StagePlan], tail_boxes: list[Box] | None,
         noise: NoiseFn, descriptors: Descriptors | None, frozen_below: int, start: int = 0,
         base: torch.Tensor | None = None) -> torch.Tensor:
    """Compute the plans' boxes from stage ``start`` on; above 0, ``base`` holds the whole output of stage
    ``start - 1`` (computed before, kept whole), from which stage ``start`` reads its box."""
    amps = generator.noise_amps
    features = None if start == 0 else base[box_slices(plans[start].boxes.source)]
    # The generator's stage runner (activation checkpointing of trained stages, GrowingGenerator.run_stage).
    run_stage = getattr(generator, "run_stage", lambda k, function, *inputs: function(*inputs))
    for k, plan in enumerate(plans[start:], start):
        frozen = torch.no_grad() if k < frozen_below else contextlib.nullcontext()
        with frozen:
            noise_box = whole_box(layout.noise[0]) if k == 0 and layout.whole_head_noise else plan.boxes.noise
            z = _draw(noise, k, noise_box, layout.channels[k])  # drawn outside what a checkpoint recomputes
            descriptor = None if descriptors is None else descriptors[k]
            stage = functools.partial(_stage_region, layout, plan, k, amps[k], descriptor)
            features = run_stage(k, stage, features, z)
    return features if tail_boxes is None else layout.tail.run(features, tail_boxes, None)


def _stage_region(layout: _Layout, plan: _StagePlan, k: int, amp: torch.Tensor, descriptor,
                  features: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
    """Stage ``k``'s boxes from the box ``features`` of the stage below (None at stage 0) and its noise ``z``."""
    if k == 0:
        x = layout.head.run(layout.head_input(z * amp, plan.boxes.noise, layout.noise[0]), plan.head, None)
        x = layout.resample(x, plan.head[-1], layout.head.out_shape, layout.bodies[0].in_shape, plan.body[0])
    else:
        source = plan.boxes.source
        x = layout.resample(features, source, layout.out[k - 1], layout.noise[k], plan.body[0]) + z * amp
    y = plan.chain.run(x, plan.body, descriptor)
    if plan.skip:
        y = y + layout.resample(features, plan.boxes.source, layout.out[k - 1], layout.out[k], plan.boxes.features)
    return y


def _shapes_of(noise, shapes):
    if shapes is not None:
        return shapes
    if getattr(noise, "shapes", None) is None:
        raise ValueError("pass shapes= (the output shape of every stage) or a noise source that knows them")
    return noise.shapes


def _check_descriptors(layout: _Layout, descriptors) -> Descriptors | None:
    """None for region pooling, else the list of fixed descriptors (checked against the stages that need one)."""
    if isinstance(descriptors, str):
        if descriptors != "region":
            raise ValueError(f"descriptors must be 'region', a list from cbam_statistics, or None; got {descriptors!r}")
        return None
    if descriptors is None:
        if layout.has_cbam:
            raise ValueError("this generator has CBAM: pass descriptors=cbam_statistics(...) for the whole forward's "
                             "channel attention, or descriptors='region' to pool over each region")
        return None
    if len(descriptors) < layout.num_stages or any(
            descriptors[k] is None for k in range(layout.num_stages) if layout.pre_cbam[k] is not None):
        raise ValueError("descriptors must hold (average, max) for every stage with CBAM")
    return list(descriptors)


# --- public API -------------------------------------------------------------------------------------------------------

def region_forward(
    generator: nn.Module,
    noise: NoiseFn,
    box: Box,
    num_stages: int | None = None,
    *,
    shapes: Sequence[Sequence[int]] | None = None,
    descriptors: Descriptors | str | None = None,
    frozen_below: int = 0,
) -> torch.Tensor:
    """``generator(noise, num_stages)`` in ``box`` of the output, computing only the boxes each stage needs.

    Args:
        noise: ``noise(stage, box)`` gives stage ``stage``'s noise [N, C, *box] in a box of its noise grid.
        box: per-axis (start, stop) in the output grid of stage ``num_stages - 1`` (default: all stages).
        shapes: output shape of every stage (as for ``sample_noise``); default ``noise.shapes``.
        descriptors: CBAM's channel-attention rule: a list from ``cbam_statistics`` (exact, fixed, no gradient
            through them), 'region' (pool over the region's own features, with gradient), or None without CBAM.
        frozen_below: stages below this run under ``torch.no_grad()`` (the head with stage 0).
    """
    layout = _Layout(generator, _shapes_of(noise, shapes), num_stages)
    box = check_box(box, layout.out[-1])
    fixed = _check_descriptors(layout, descriptors)
    plans, tail_boxes = _plan(layout, box, layout.num_stages - 1)
    return _run(generator, layout, plans, tail_boxes, noise, fixed, frozen_below)


def region_plan(
    generator: nn.Module, shapes: Sequence[Sequence[int]], box: Box, num_stages: int | None = None
) -> list[StageBoxes]:
    """The boxes ``region_forward`` materialises at every stage for ``box`` (to size patches and memory)."""
    layout = _Layout(generator, shapes, num_stages)
    plans, _ = _plan(layout, check_box(box, layout.out[-1]), layout.num_stages - 1)
    return [plan.boxes for plan in plans]


def receptive_margins(generator: nn.Module, num_stages: int | None = None) -> list[int]:
    """Per stage, the voxels of its own grid by which it grows a region on each side (centred).

    Stage k counts its convolutions ((kernel - 1) / 2 each), CBAM's spatial attention (3), the head at stage 0, the
    tail at the last stage, and the taps of the resampling that reads its output (1 linear, 2 cubic) below the last;
    stage 0 also the taps from the head to its body when the convolutions shrink. ``region_plan`` gives exact boxes.
    """
    num_stages = generator.num_stages if num_stages is None else num_stages
    dims = generator.spatial_dims
    taps = 2 if generator._resize.mode == "bicubic" else 1
    margins = []
    for k in range(num_stages):
        margin = sum(op.context for op in _ops(generator.body[k], dims))
        if k == 0:
            margin += sum(op.context for op in _ops(generator.head, dims)) + (taps if generator.body_shrink else 0)
        if k == num_stages - 1:
            margin += sum(op.context for op in _ops(generator.tail, dims))
        else:
            margin += taps
        margins.append(margin)
    return margins


def largest_tile(generator: nn.Module, num_stages: int, budget_bytes: float, batch_size: int = 1,
                 smallest: int = 8) -> int:
    """The side of the largest cube tile whose forward without gradient (its ``WHOLE_STAGE_MAPS`` feature maps at the
    finest stage, grown by that stage's receptive margins) fits ``budget_bytes``; at least ``smallest``."""
    item = torch.finfo(next(generator.parameters()).dtype).bits // 8
    per_voxel = WHOLE_STAGE_MAPS * batch_size * generator.num_feature_channels * item
    margin = receptive_margins(generator, num_stages)[-1]
    side = int((budget_bytes / per_voxel) ** (1 / generator.spatial_dims)) - 2 * margin
    return max(side, smallest)


def cbam_statistics(
    generator: nn.Module,
    noise: NoiseFn,
    tile: int | Sequence[int],
    num_stages: int | None = None,
    *,
    shapes: Sequence[Sequence[int]] | None = None,
    cache_bytes: int | None = None,
) -> Descriptors:
    """CBAM's pooled descriptors (average, max) [N, C, 1, ...] of every stage over its whole grid, without gradient.

    Stage by stage: a stage whose output is kept whole (see ``generate_tiled``'s ``cache_bytes``) pools over its
    whole grid; the others in tiles of ``tile``, each tile's pre-CBAM features coming from a region forward (from the
    last stage kept whole) with the statistics already found below; sums (in float64) and maxima are gathered over
    the tiles. ``noise`` must give the same values for a position on every call (``NoiseField`` or
    ``TensorNoise``). None for stages without CBAM.
    """
    layout = _Layout(generator, _shapes_of(noise, shapes), num_stages)
    with torch.no_grad():
        start, base, descriptors = _keep_whole(generator, layout, noise, tile, tile, cache_bytes, None)
        _remaining_statistics(generator, layout, noise, tile, descriptors, start, base)
    return descriptors


def generate_tiled(
    generator: nn.Module,
    noise: NoiseFn,
    tile: int | Sequence[int],
    num_stages: int | None = None,
    *,
    shapes: Sequence[Sequence[int]] | None = None,
    descriptors: Descriptors | None = None,
    statistics_tile: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    cache_bytes: int | None = None,
) -> torch.Tensor:
    """The whole output of ``generator`` assembled tile by tile from region forwards, without gradient.

    Equals the untiled forward to float rounding. The coarse stages run once: each stage below the last whose output
    fits ``cache_bytes`` (with the stage below it) is kept whole, computed in one piece when its whole forward fits
    too, else tile by tile from the stage below; the stages above the last one kept run per tile of the output, from
    it. ``cache_bytes`` None: half the free memory of the generator's device; 0: keep none (every tile recomputes
    every stage: the most time, and the least memory only once tiles are small against the coarse grids, which a
    tile's boxes otherwise nearly cover). CBAM's exact statistics are those of the stages kept whole, and
    for the others found in tiles of ``statistics_tile`` (default ``tile``), unless ``descriptors`` are given.
    Memory: the stage outputs kept, a tile and its margins, and the output; ``device`` is where the output is
    assembled (default: where the generator computes).
    """
    layout = _Layout(generator, _shapes_of(noise, shapes), num_stages)
    if isinstance(descriptors, str):
        raise ValueError("generate_tiled needs exact CBAM statistics (descriptors=None computes them); pooling over "
                         "each tile would make every tile's attention differ")
    if descriptors is not None:
        _check_descriptors(layout, descriptors)
    with torch.no_grad():
        start, base, found = _keep_whole(generator, layout, noise, tile, statistics_tile or tile, cache_bytes,
                                         descriptors)
        _remaining_statistics(generator, layout, noise, statistics_tile or tile, found, start, base)
        output = None
        for box in tiles(layout.out[-1], tile):
            plans, tail_boxes = _plan(layout, box, layout.num_stages - 1)
            part = _run(generator, layout, plans, tail_boxes, noise, found, 0, start, base)
            if output is None:
                output = part.new_empty((*part.shape[:2], *layout.out[-1]), device=device or part.device)
            output[box_slices(box)] = part.to(output.device)
    return output


# --- coarse stages computed once and kept whole -----------------------------------------------------------------------

# Feature maps of a stage's grid alive at once while the stage is computed in one piece without gradient (its input
# and noise, a convolution's input and output, CBAM's product, the skip connection's resampling), rounded up.
WHOLE_STAGE_MAPS = 8


def _batch_of(noise: NoiseFn, layout: _Layout) -> int:
    """The number of samples ``noise`` draws: its ``batch_size``, or the batch of one voxel of stage 0's noise."""
    size = getattr(noise, "batch_size", None)
    if size is None:
        size = _draw(noise, 0, tuple((0, 1) for _ in range(layout.dims)), layout.channels[0]).shape[0]
    return int(size)


def _tiled_statistics(generator: nn.Module, layout: _Layout, noise: NoiseFn, stage: int, tile: int | Sequence[int],
                      descriptors: Descriptors, start: int, base: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Stage ``stage``'s exact CBAM descriptors, gathered over tiles of its pre-CBAM features (float64 sums)."""
    spatial = tuple(range(2, 2 + layout.dims))
    total = maximum = None
    for box in tiles(layout.out[stage], tile):
        plans, _ = _plan(layout, box, stage, "pre_cbam")
        features = _run(generator, layout, plans, None, noise, descriptors, 0, start, base)
        part_sum = features.sum(dim=spatial, keepdim=True, dtype=torch.float64)
        part_max = features.amax(dim=spatial, keepdim=True)
        total = part_sum if total is None else total + part_sum
        maximum = part_max if maximum is None else torch.maximum(maximum, part_max)
    return (total / math.prod(layout.out[stage])).to(maximum.dtype), maximum


def _cache_modes(generator: nn.Module, layout: _Layout, batch: int, tile: int | Sequence[int],
                 cache_bytes: int) -> list[str]:
    """How each stage is computed: 'whole' (in one piece, its output kept), 'tiles' (tile by tile into a whole output
    kept) or 'region' (per tile of the output, from the last stage kept; the last stage always). A stage is kept
    while the output of the stage below it and its own whole forward (else its output and one tile's forward) fit
    ``cache_bytes``."""
    modes = ["region"] * layout.num_stages
    if cache_bytes <= 0:
        return modes
    item = batch * generator.num_feature_channels * torch.finfo(layout.dtype).bits // 8
    margins = receptive_margins(generator, layout.num_stages)
    held = 0  # the output of the stage below
    for k in range(layout.num_stages - 1):
        grid = layout.bodies[k].in_shape
        one_tile = math.prod(min(t + 2 * margins[k] + 2, n) for t, n in zip(_per_axis(tile, layout.dims), grid))
        kept = item * math.prod(layout.out[k])
        if held + WHOLE_STAGE_MAPS * item * math.prod(grid) <= cache_bytes:
            modes[k] = "whole"
        elif held + kept + WHOLE_STAGE_MAPS * item * one_tile <= cache_bytes:
            modes[k] = "tiles"
        else:
            break
        held = kept
    return modes


def _keep_whole(generator: nn.Module, layout: _Layout, noise: NoiseFn, tile: int | Sequence[int],
                statistics_tile: int | Sequence[int], cache_bytes: int | None, descriptors: Descriptors | None
                ) -> tuple[int, torch.Tensor | None, Descriptors]:
    """Compute the stages that ``_cache_modes`` keeps, coarsest first.

    Returns the first stage not kept (the one that runs per tile), the whole output of the stage below it (None when
    it is 0) and the descriptors: the given ones, or those pooled by the stages kept (None above them). Only one
    stage's output is held at a time besides the one being made, as each stage reads only the one below it.
    """
    if cache_bytes is None:
        from consingan.singan.memory import available_bytes  # imported here: memory sizes training, which uses regions

        cache_bytes = available_bytes(torch.device(layout.device)) // 2
    found: Descriptors = list(descriptors) if descriptors is not None else [None] * layout.num_stages
    modes = _cache_modes(generator, layout, _batch_of(noise, layout), tile, cache_bytes)
    start, base = 0, None
    for k, mode in enumerate(modes):
        if mode == "whole":
            pooled = _Pooled() if found[k] is None and layout.pre_cbam[k] is not None else None
            plans, _ = _plan(layout, whole_box(layout.out[k]), k, "features")
            output = _run(generator, layout, plans, None, noise, found[:k] + [pooled or found[k]] + found[k + 1:], 0,
                          start, base)
            if pooled is not None:
                found[k] = pooled.value
        elif mode == "tiles":
            if found[k] is None and layout.pre_cbam[k] is not None:
                found[k] = _tiled_statistics(generator, layout, noise, k, statistics_tile, found, start, base)
            output = None
            for box in tiles(layout.out[k], tile):
                plans, _ = _plan(layout, box, k, "features")
                part = _run(generator, layout, plans, None, noise, found, 0, start, base)
                if output is None:
                    output = part.new_empty((*part.shape[:2], *layout.out[k]))
                output[box_slices(box)] = part
        else:
            break
        start, base = k + 1, output
    return start, base, found


def _remaining_statistics(generator: nn.Module, layout: _Layout, noise: NoiseFn, tile: int | Sequence[int],
                          descriptors: Descriptors, start: int, base: torch.Tensor | None) -> None:
    """Fill in the descriptors of the stages from ``start`` up, in order (each needs those below it)."""
    for k in range(start, layout.num_stages):
        if descriptors[k] is None and layout.pre_cbam[k] is not None:
            descriptors[k] = _tiled_statistics(generator, layout, noise, k, tile, descriptors, start, base)


# --- noise ------------------------------------------------------------------------------------------------------------

def _chunk_noise(seed: int, stage: int, sample: int, index: tuple[int, ...], channels: int,
                 chunk: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One chunk's noise [C, *chunk], from its own generator seeded by (seed, stage, sample, chunk index)."""
    sequence = np.random.SeedSequence(seed, spawn_key=(stage, sample, *index))
    rng = torch.Generator().manual_seed(int(sequence.generate_state(1, np.uint64)[0]))
    return torch.randn((channels, *chunk), generator=rng, dtype=dtype)


def noise_box(
    seed: int,
    stage: int,
    channels: int,
    shape: Sequence[int],
    box: Box,
    *,
    batch_size: int = 1,
    chunk: int | Sequence[int] = 32,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise [batch_size, channels, *box] of a deterministic field over the grid ``shape``.

    The grid is cut into chunks of ``chunk`` voxels per axis, each drawn whole (on the CPU, so every device gets the
    same values) from its own generator seeded by (seed, stage, sample, chunk index) through numpy's SeedSequence; a
    box draws only the chunks it touches. A voxel's value depends on its position, not on the box or the grid.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    sizes = _per_axis(chunk, len(shape))

    def draw(sample: int, index: tuple[int, ...]) -> torch.Tensor:
        return _chunk_noise(seed, stage, sample, index, channels, sizes, dtype)

    out = _assemble(check_box(box, shape), sizes, batch_size, channels, dtype, draw)
    return out if device is None else out.to(device)


def _assemble(box: Box, sizes: tuple[int, ...], batch_size: int, channels: int, dtype: torch.dtype,
              draw: Callable[[int, tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
    """The noise [batch_size, channels, *box] copied from the chunks ``draw(sample, chunk index)`` it touches."""
    out = torch.empty((batch_size, channels, *box_shape(box)), dtype=dtype)
    indices = [range(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(box, sizes)]
    for sample in range(batch_size):
        for index in itertools.product(*indices):
            values = draw(sample, index)
            src, dst = [slice(None)], [sample, slice(None)]
            for i, c, (lo, hi) in zip(index, sizes, box):
                start, stop = max(lo, i * c), min(hi, (i + 1) * c)
                src.append(slice(start - i * c, stop - i * c))
                dst.append(slice(start - lo, stop - lo))
            out[tuple(dst)] = values[tuple(src)]
    return out


class NoiseField:
    """Deterministic noise of every stage for region forwards; its boxes agree with its whole noise.

    Args:
        seed: the field's seed (non-negative).
        channels, noise_shapes: per stage, the noise channels and the full spatial noise shape.
        shapes: per stage, the output shape (what ``region_forward`` needs); see ``for_generator``.
        batch_size, chunk, dtype, device: as for ``noise_box``.
        cache_bytes: the chunks drawn for boxes are kept up to this many bytes (the least recently used dropped
            first), so that overlapping tiles, and the passes over the same tiles, do not draw them again.
    """

    def __init__(self, seed: int, channels: Sequence[int], noise_shapes: Sequence[Sequence[int]],
                 shapes: Sequence[Sequence[int]] | None = None, *, batch_size: int = 1,
                 chunk: int | Sequence[int] = 32, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, cache_bytes: int = 2**28) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.seed, self.channels = int(seed), list(channels)
        self.noise_shapes = [tuple(s) for s in noise_shapes]
        self.shapes = None if shapes is None else [tuple(s) for s in shapes]
        self.batch_size, self.chunk, self.dtype, self.device = batch_size, chunk, dtype, device
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cached = 0  # bytes held by the cache

    @classmethod
    def for_generator(cls, generator: nn.Module, shapes: Sequence[Sequence[int]], seed: int, *,
                      batch_size: int = 1, chunk: int | Sequence[int] = 32, cache_bytes: int = 2**28
                      ) -> "NoiseField":
        """The field for ``generator`` at the output ``shapes`` of its stages, in its dtype and on its device."""
        full = [generator.noise_shape(k, s) for k, s in enumerate(shapes)]
        reference = generator.noise_amps
        return cls(seed, [f[1] for f in full], [f[2:] for f in full], shapes, batch_size=batch_size, chunk=chunk,
                   dtype=next(generator.parameters()).dtype, device=reference.device, cache_bytes=cache_bytes)

    def __call__(self, stage: int, box: Box) -> torch.Tensor:
        shape = self.noise_shapes[stage]
        box = check_box(box, shape)
        if box == whole_box(shape):  # a stage computed in one piece: its chunks are not asked for again
            return self.whole(stage)
        sizes = _per_axis(self.chunk, len(shape))

        def draw(sample: int, index: tuple[int, ...]) -> torch.Tensor:
            key = (stage, sample, index)
            values = self._cache.get(key)
            if values is not None:
                self._cache.move_to_end(key)
                return values
            values = _chunk_noise(self.seed, stage, sample, index, self.channels[stage], sizes, self.dtype)
            size = values.numel() * values.element_size()
            if size <= self.cache_bytes:
                self._cache[key] = values
                self._cached += size
                while self._cached > self.cache_bytes:
                    dropped = self._cache.popitem(last=False)[1]
                    self._cached -= dropped.numel() * dropped.element_size()
            return values

        out = _assemble(box, sizes, self.batch_size, self.channels[stage], self.dtype, draw)
        return out if self.device is None else out.to(self.device)

    def whole(self, stage: int) -> torch.Tensor:
        """Stage ``stage``'s whole noise, drawn the same way (each chunk once, so without the cache)."""
        return noise_box(self.seed, stage, self.channels[stage], self.noise_shapes[stage],
                         whole_box(self.noise_shapes[stage]), batch_size=self.batch_size, chunk=self.chunk,
                         dtype=self.dtype, device=self.device)

    def whole_noise(self, num_stages: int | None = None) -> list[torch.Tensor]:
        """The whole noise of the first ``num_stages`` stages, for ``generator(noise)``."""
        return [self.whole(k) for k in range(len(self.noise_shapes) if num_stages is None else num_stages)]


class TensorNoise:
    """Noise cropped from whole per-stage tensors (the reconstruction inputs, or noise drawn beforehand)."""

    def __init__(self, generator: nn.Module, noise: Sequence[torch.Tensor]) -> None:
        self.noise = list(noise)
        self.shapes = [generator.output_shape(k, n) for k, n in enumerate(self.noise)]

    def __call__(self, stage: int, box: Box) -> torch.Tensor:
        return self.noise[stage][box_slices(box)]


class FreshNoise:
    """New standard normal noise for each box asked for (training on regions draws only what a region needs).

    Not for ``cbam_statistics`` or ``generate_tiled``: their tiles must agree on the noise.
    """

    def __init__(self, generator: nn.Module, shapes: Sequence[Sequence[int]], batch_size: int = 1,
                 rng: torch.Generator | None = None) -> None:
        self.shapes = [tuple(s) for s in shapes]
        self.channels = [generator.noise_shape(k, s)[1] for k, s in enumerate(self.shapes)]
        self.batch_size, self.rng = batch_size, rng
        self.device, self.dtype = generator.noise_amps.device, next(generator.parameters()).dtype

    def __call__(self, stage: int, box: Box) -> torch.Tensor:
        return torch.randn((self.batch_size, self.channels[stage], *box_shape(box)), generator=self.rng,
                           device=self.device, dtype=self.dtype)
