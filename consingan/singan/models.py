"""The growing generator and the patch critic of ConSinGAN, for 2D and 3D."""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from consingan.nn import CBAM, ConvBlock, factory
from consingan.nn.interpolation import Resampler
from consingan.nn.resample import resize
from consingan.nn.warp import displacement_from_noise, warp as warp_image
from consingan.singan.regions import Box, box_slices, noise_box, whole_box


def architecture(config) -> dict:
    """The keyword arguments that the generator and the critic share, from a ``TrainConfig``."""
    return dict(
        num_feature_channels=config.num_feature_channels, num_layers=config.num_layers,
        kernel_size=config.kernel_size, padding=config.padding, negative_slope=config.lrelu_alpha, cbam=config.cbam,
    )


def generator_arguments(config) -> dict:
    """The generator's keyword arguments from a ``TrainConfig``: ``architecture`` and what only the generator has."""
    return dict(architecture(config), upsampling=config.upsampling, coordinates=config.coordinates)


def smallest_side(config) -> int:
    """The shortest side (voxels) a scale needs for the critic: ``num_layers + 2`` convolutions each shrink a side by
    ``kernel_size - 1 - 2 * padding``, the last must leave at least one voxel, and batch norm needs two per side
    before it (one value per channel cannot be normalised)."""
    shrink = config.kernel_size - 1 - 2 * config.padding
    before_tail = (config.num_layers + 1) * shrink + (2 if config.batch_norm else 1)
    return max(before_tail, (config.num_layers + 2) * shrink + 1)


def check_network_fits(config, shape, what: str = "the coarsest scale") -> None:
    """Refuse a scale too small for the network, naming the options that would make it fit."""
    from consingan.errors import ConsinganError

    needed = smallest_side(config)
    if min(shape) < needed:
        raise ConsinganError(
            f"{what} {tuple(shape)} is too small for the network: kernel {config.kernel_size} with padding "
            f"{config.padding} over {config.num_layers + 2} critic layers needs at least {needed} voxels per side; "
            f"raise --min-size to {needed} or more, or raise --padding")


def init_weights(module: nn.Module) -> None:
    """DCGAN-style initialisation used by SinGAN and ConSinGAN: conv N(0, 0.02), norm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def same_output_channels_(conv: nn.Module) -> None:
    """Give every output channel of ``conv`` the weights and bias of its first: the generator's last convolution
    then starts colour-neutral, all image channels equal (grey for RGB).

    Why (issue 26): with independently drawn rows the three channels of an RGB output start as three unrelated
    images. Where the image is grey the critic's real data has no colour at all, a point mass that WGAN-GP training
    never settles on (it circles it), so the random colour of the start was never trained away and stayed as
    magenta / green rims at edges. Started equal, and with a critic that starts colour-blind
    (``same_input_channels_``), channels that are equal in the image get equal gradients at every step (the whole
    computation is symmetric in them) and stay equal for good; channels that differ in the image (a colour stain,
    label channels) get different gradients at once and learn their colour from the image, not from the draw."""
    conv.weight.copy_(conv.weight[:1].expand_as(conv.weight))
    if conv.bias is not None:
        conv.bias.fill_(float(conv.bias[0]))


@torch.no_grad()
def same_input_channels_(conv: nn.Module) -> None:
    """Give every input channel of ``conv`` the weights of its first, divided by the square root of their number
    (which keeps the spread of its responses to an image whose channels are equal): the critic's first convolution
    then starts blind to colour, seeing only the channels' sum (see ``same_output_channels_``)."""
    conv.weight.copy_(conv.weight[:, :1].expand_as(conv.weight) / conv.weight.shape[1] ** 0.5)


class GrowingGenerator(nn.Module):
    """A generator that grows one stage per scale (Hinz et al. 2020), N-dimensional.

    ``head`` maps image-space noise to features, ``body[k]`` is the stage of scale k (``num_layers`` conv blocks, then
    CBAM when enabled), ``tail`` maps features back to the image with tanh. Each stage refines the upsampled output of
    the one before it, to which feature-space noise scaled by that stage's amplitude is added. The amplitudes and the
    fixed reconstruction noise are buffers, so they travel with the state dict.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_feature_channels: channels of every conv block.
        num_layers: conv blocks per stage.
        kernel_size, padding: of every conv; each conv shrinks a side by ``kernel_size - 1 - 2 * padding``.
        negative_slope: of the leaky ReLUs.
        cbam: put a CBAM module at the end of each stage.
        upsampling: resampling between stages, 'linear' (bi/trilinear) or 'cubic' (2D only, the reference's).
        coordinates: stage 0's head also takes one coordinate channel per axis (``head_input``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_feature_channels: int = 64,
        num_layers: int = 3,
        kernel_size: int = 3,
        padding: int = 1,
        negative_slope: float = 0.05,
        cbam: bool = True,
        upsampling: str = "linear",
        coordinates: bool = False,
    ) -> None:
        super().__init__()
        shrink = kernel_size - 1 - 2 * padding
        if shrink < 0 or shrink % 2:
            raise ValueError(f"kernel_size={kernel_size} with padding={padding} must keep or shrink sizes evenly")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_feature_channels = num_feature_channels
        self.conv_shrink = shrink
        self.body_shrink = shrink * num_layers
        self._block_args = dict(kernel_size=kernel_size, padding=padding, negative_slope=negative_slope)
        self._num_layers = num_layers
        self._cbam = cbam
        self._resize = Resampler(spatial_dims, upsampling)
        self.coordinates = coordinates
        self.head = nn.Sequential(
            factory.pad(spatial_dims, "zeros", shrink // 2),
            ConvBlock(spatial_dims, in_channels + spatial_dims * coordinates, num_feature_channels,
                      **self._block_args),
        )
        self.body = nn.ModuleList([self._new_stage()])
        self.tail = nn.Sequential(
            factory.pad(spatial_dims, "zeros", shrink // 2),
            factory.conv(spatial_dims, num_feature_channels, in_channels, kernel_size, padding=padding),
            factory.activation("tanh"),
        )
        self.apply(init_weights)
        same_output_channels_(self.tail[1])  # the image channels start equal (issue 26: no colour from the draw)
        self.register_buffer("noise_amps", torch.ones(1))
        # Activation checkpointing of the trained stages (``run_stage``): set by the trainer, not saved with the state.
        self.checkpoint_stages = False

    def _new_stage(self) -> nn.Sequential:
        stage = nn.Sequential()
        for index in range(self._num_layers):
            stage.add_module(
                f"block{index}",
                ConvBlock(self.spatial_dims, self.num_feature_channels, self.num_feature_channels, **self._block_args),
            )
        if self._cbam:
            stage.add_module("cbam", CBAM(self.spatial_dims, self.num_feature_channels))
        return stage

    @property
    def num_stages(self) -> int:
        return len(self.body)

    def add_stage(self) -> None:
        """Append a stage that starts as an exact copy of the newest one (its amplitude set later, 0 until then)."""
        self.body.append(copy.deepcopy(self.body[-1]))
        self.noise_amps = torch.cat([self.noise_amps, self.noise_amps.new_zeros(1)])

    def set_noise_amp(self, stage: int, value: float) -> None:
        self.noise_amps[stage] = float(value)

    def reconstruction_noise(self, stage: int) -> torch.Tensor:
        """Stage ``stage``'s fixed reconstruction input, whole (a stage with a noise field draws all of it: for large
        grids use ``reconstruction_source``, which draws only the boxes asked for)."""
        field = self._reconstruction_field(stage)
        if field is None:
            return getattr(self, f"rec_noise_{stage}")
        return field(stage, whole_box(field.noise_shape))

    def set_reconstruction_noise(self, stage: int, noise: torch.Tensor) -> None:
        """Store the fixed input of stage ``stage`` for the reconstruction loss (a buffer, saved with the state)."""
        self.register_buffer(f"rec_noise_{stage}", noise.detach().clone())

    def set_reconstruction_field(self, stage: int, seed: int, spatial_shape: Sequence[int], chunk: int = 16) -> None:
        """Fix stage ``stage``'s reconstruction input (k > 0) as a deterministic noise field over its noise grid for
        the output ``spatial_shape`` (``regions.noise_box``): the buffer holds its seed, chunk and grid, not its
        values, so patch training draws only the boxes it needs and checkpoints stay small at any size."""
        if stage == 0:
            raise ValueError("stage 0 reconstructs from the coarsest real image, not from noise")
        grid = self.noise_shape(stage, spatial_shape)[2:]
        self.register_buffer(f"rec_field_{stage}", torch.tensor([seed, chunk, *grid], dtype=torch.int64,
                                                                device=self.noise_amps.device))

    def _reconstruction_field(self, stage: int) -> _Field | None:
        buffer = getattr(self, f"rec_field_{stage}", None)
        if buffer is None:
            return None
        seed, chunk, *grid = (int(v) for v in buffer.tolist())
        return _Field(seed, chunk, tuple(grid), self.num_feature_channels, next(self.parameters()).dtype,
                      self.noise_amps.device)

    def reconstruction_source(self) -> ReconstructionNoise:
        """The reconstruction inputs of every stage as a noise source of region forwards (``regions.region_forward``,
        ``generate_tiled``): boxes cropped from stored tensors, or drawn from a stage's noise field."""
        return ReconstructionNoise(self)

    def noise_shape(self, stage: int, spatial_shape: Sequence[int], batch_size: int = 1) -> tuple[int, ...]:
        """Shape of the noise stage ``stage`` takes to produce ``spatial_shape``."""
        if stage == 0:
            return (batch_size, self.in_channels, *spatial_shape)
        return (batch_size, self.num_feature_channels, *(s + self.body_shrink for s in spatial_shape))

    def output_shape(self, stage: int, noise: torch.Tensor) -> tuple[int, ...]:
        """Spatial shape produced by stage ``stage`` from its noise (the inverse of ``noise_shape``)."""
        offset = 0 if stage == 0 else self.body_shrink
        return tuple(s - offset for s in noise.shape[2:])

    def sample_noise(
        self, shapes: Sequence[Sequence[int]], batch_size: int = 1, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Fresh standard normal noise for every stage, for the given spatial output shapes."""
        device = self.noise_amps.device
        return [
            torch.randn(self.noise_shape(k, shape, batch_size), device=device, generator=generator)
            for k, shape in enumerate(shapes)
        ]

    def reconstruction_inputs(self) -> list[torch.Tensor]:
        return [self.reconstruction_noise(k) for k in range(self.num_stages)]

    def forward(self, noise: Sequence[torch.Tensor], num_stages: int | None = None) -> torch.Tensor:
        """Generate from per-stage noise (see ``noise_shape``); the output size is that of the last stage used.

        Stage 0's noise is multiplied by its amplitude (1 by default) and passed through the head; each later stage
        adds its scaled noise to the upsampled features of the stage before.
        """
        num_stages = self.num_stages if num_stages is None else num_stages
        if len(noise) < num_stages:
            raise ValueError(f"need noise for {num_stages} stages, got {len(noise)}")
        body_input = [s + self.body_shrink for s in self.output_shape(0, noise[0])]

        def first_stage(z: torch.Tensor) -> torch.Tensor:  # the head belongs to stage 0: it trains with it
            return self.body[0](self._resize(self.head(self.head_input(z)), body_input))

        features = self.run_stage(0, first_stage, noise[0] * self.noise_amps[0])
        for k in range(1, num_stages):
            shape = self.output_shape(k, noise[k])
            upsampled = self._resize(features, shape)
            stage_input = self._resize(features, noise[k].shape[2:]) + noise[k] * self.noise_amps[k]
            features = self.run_stage(k, self.body[k], stage_input) + upsampled
        return self.tail(features)

    def set_anchor(self, image: torch.Tensor, spread: float, warp: float = 0.0) -> None:
        """Anchor stage 0 on ``image`` (the coarsest real image, [1, C, *spatial]): its input becomes ``image`` plus
        its noise times ``spread`` (stage 0's amplitude), so random samples keep the image's coarse layout and vary
        about it, and its reconstruction input becomes zero (the image itself). With ``warp`` > 0 the anchor is
        also deformed by a smooth displacement drawn from the same noise (RMS ``warp`` voxels of stage 0's grid,
        ``nn.warp.displacement_from_noise``), so random samples vary in shape, not only in what the generator
        makes of the noise; zero noise leaves it undeformed. Without an anchor stage 0 draws its layout from noise
        alone, as ConSinGAN does."""
        self.register_buffer("anchor", image.detach().clone())
        self.register_buffer("anchor_warp", torch.tensor(float(warp), device=self.noise_amps.device))
        self.set_reconstruction_noise(0, torch.zeros_like(image))
        self.set_noise_amp(0, spread)

    @property
    def head_needs_whole_noise(self) -> bool:
        """Whether ``head_input`` needs stage 0's noise over the whole grid even for a box (the anchor's warp is a
        smooth function of all of it)."""
        return float(getattr(self, "anchor_warp", 0.0)) > 0 and not getattr(self, "_warp_held", False)

    @contextlib.contextmanager
    def undeformed_anchor(self):
        """Within it the anchor is not warped: stage 0 sees exactly the anchor plus its scaled noise, as an injected
        image needs (``noise_for_input``; the warp has no inverse)."""
        held, self._warp_held = getattr(self, "_warp_held", False), True
        try:
            yield self
        finally:
            self._warp_held = held

    def anchor_on(self, grid: Sequence[int]) -> torch.Tensor | None:
        """The anchor resized to stage 0's ``grid`` (a retargeted sample's), or None without one."""
        anchor = getattr(self, "anchor", None)
        if anchor is None or tuple(anchor.shape[2:]) == tuple(grid):
            return anchor
        return resize(anchor, grid)  # image-space, as retargeting resizes stage 0's reconstruction input

    def noise_for_input(self, image: torch.Tensor) -> torch.Tensor:
        """The stage-0 noise that makes the head see ``image`` (an injected coarse image): the image itself without
        an anchor (stage 0's amplitude is 1 then), else its difference from the anchor over the amplitude (with a
        warped anchor, generate from it inside ``undeformed_anchor``)."""
        anchor = self.anchor_on(image.shape[2:])
        return image if anchor is None else (image - anchor) / self.noise_amps[0]

    def head_input(self, z: torch.Tensor, box: Box | None = None, grid: Sequence[int] | None = None
                   ) -> torch.Tensor:
        """The head's input from stage 0's scaled noise ``z`` over ``box`` of stage 0's grid ``grid`` (``z``'s own
        when None; the whole grid when ``box`` is None): the anchor's box added (``set_anchor``), then with
        ``coordinates`` one channel per axis running from -1 to 1 across the grid. A region sees the anchor and the
        position it has in the whole; the coordinates span the grid whatever its size, so a retargeted sample keeps
        the layout's proportions."""
        grid = tuple(z.shape[2:]) if grid is None else tuple(grid)
        box = whole_box(grid) if box is None else box
        anchor = self.anchor_on(grid)
        if anchor is not None and self.head_needs_whole_noise:
            if tuple(z.shape[2:]) != grid:
                raise ValueError("a warped anchor needs stage 0's noise over the whole grid (head_needs_whole_noise)")
            # The deformation's smoothness follows the grid (a quarter of its shortest side), so that a retargeted
            # sample deforms in the same proportions.
            displacement = displacement_from_noise(z, float(self.noise_amps[0]), float(self.anchor_warp),
                                                   min(grid) / 4.0)
            z = (z + warp_image(anchor.to(z.dtype), displacement))[box_slices(box)]
        elif anchor is not None:
            z = z + anchor[box_slices(box)].to(z.dtype)
        if not self.coordinates:
            return z
        axes = [torch.linspace(-1.0, 1.0, n, device=z.device, dtype=z.dtype)[a:b] for n, (a, b) in zip(grid, box)]
        position = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        return torch.cat([z, position.expand(z.shape[0], *position.shape)], 1)

    def run_stage(self, stage: int, function: Callable[..., torch.Tensor], *inputs: torch.Tensor | None
                  ) -> torch.Tensor:
        """``function(*inputs)``, the computation of stage ``stage`` (whole or on a region, ``regions.region_forward``).

        With ``checkpoint_stages`` on, while gradients are recorded and the stage trains (its parameters require
        gradients), only its inputs and output are kept and its activations are recomputed in the backward pass: the
        same gradients for one more forward of the stage. Frozen stages record no graph anyway, and ``function`` must
        draw no random numbers (noise is drawn outside it), so that the recomputation is the same computation.
        """
        if self.checkpoint_stages and torch.is_grad_enabled() and self.stage_trains(stage):
            return checkpoint(function, *inputs, use_reentrant=False)
        return function(*inputs)

    def stage_trains(self, stage: int) -> bool:
        """Whether any parameter of stage ``stage`` requires gradients (see ``param_groups``)."""
        return any(parameter.requires_grad for parameter in self.body[stage].parameters())

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        """Grow to the number of stages in ``state`` and load it (noise amplitudes and reconstruction noise included)."""
        stages = {int(m.group(1)) for key in state if (m := re.match(r"body\.(\d+)\.", key))}
        if not stages or stages != set(range(max(stages) + 1)):
            raise ValueError("state dict holds no consistent generator stages")
        while self.num_stages < len(stages):
            self.add_stage()
        device = self.noise_amps.device
        self.noise_amps = torch.zeros_like(state["noise_amps"], device=device)
        for key, value in state.items():
            if key.startswith(("rec_noise_", "rec_field_")) or key in ("anchor", "anchor_warp"):
                self.register_buffer(key, torch.zeros_like(value, device=device))
        self.load_state_dict(state, strict=True)

    def param_groups(self, active_scales: int, lr: float, lr_factor: float) -> list[dict]:
        """Optimizer groups for concurrent training; freezes everything else (requires_grad False).

        The newest ``active_scales`` stages train, a stage k levels below the newest at ``lr * lr_factor**k``; the head
        trains at stage 0's rate only while stage 0 is still active; the tail always trains at ``lr`` because every
        stage's output passes through it.
        """
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        groups = []
        newest = self.num_stages - 1
        for stage in range(max(0, self.num_stages - active_scales), self.num_stages):
            groups.append({"params": list(self.body[stage].parameters()), "lr": lr * lr_factor ** (newest - stage)})
        if self.num_stages <= active_scales:
            groups.append({"params": list(self.head.parameters()), "lr": lr * lr_factor**newest})
        groups.append({"params": list(self.tail.parameters()), "lr": lr})
        for group in groups:
            for parameter in group["params"]:
                parameter.requires_grad_(True)
        return groups


@dataclass(frozen=True)
class _Field:
    """One stage's reconstruction noise field (see ``GrowingGenerator.set_reconstruction_field``)."""

    seed: int
    chunk: int
    noise_shape: tuple[int, ...]
    channels: int
    dtype: torch.dtype
    device: torch.device

    def __call__(self, stage: int, box: Box) -> torch.Tensor:
        return noise_box(self.seed, stage, self.channels, self.noise_shape, box, chunk=self.chunk, dtype=self.dtype,
                         device=self.device)


class ReconstructionNoise:
    """Every stage's reconstruction input as ``noise(stage, box)``, with the output ``shapes`` of the stages."""

    def __init__(self, generator: GrowingGenerator) -> None:
        self.sources, self.shapes = [], []
        for k in range(generator.num_stages):
            field = generator._reconstruction_field(k)
            if field is None:
                tensor = generator.reconstruction_noise(k)
                self.sources.append(lambda box, tensor=tensor: tensor[box_slices(box)])
                self.shapes.append(generator.output_shape(k, tensor))
            else:
                self.sources.append(functools.partial(field, k))
                self.shapes.append(tuple(n - generator.body_shrink for n in field.noise_shape))

    def __call__(self, stage: int, box: Box) -> torch.Tensor:
        return self.sources[stage](box)


class Critic(nn.Module):
    """Fully convolutional patch critic: head, ``num_layers`` blocks, optional CBAM, one-channel tail (WGAN score map).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_feature_channels, num_layers, kernel_size, padding, negative_slope: as for the generator.
        batch_norm: batch normalisation in every block.
        cbam: CBAM on the body's features (the thesis code applied channel attention to the raw 1-channel input, where
            it can only rescale the image).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_feature_channels: int = 64,
        num_layers: int = 3,
        kernel_size: int = 3,
        padding: int = 1,
        negative_slope: float = 0.05,
        batch_norm: bool = True,
        cbam: bool = True,
    ) -> None:
        super().__init__()
        block_args = dict(
            kernel_size=kernel_size, padding=padding, negative_slope=negative_slope,
            norm_name="batch" if batch_norm else "none",
        )
        self.head = ConvBlock(spatial_dims, in_channels, num_feature_channels, **block_args)
        self.body = nn.Sequential()
        for index in range(num_layers):
            self.body.add_module(
                f"block{index}", ConvBlock(spatial_dims, num_feature_channels, num_feature_channels, **block_args)
            )
        if cbam:
            self.body.add_module("cbam", CBAM(spatial_dims, num_feature_channels))
        self.tail = factory.conv(spatial_dims, num_feature_channels, 1, kernel_size, padding=padding)
        self.apply(init_weights)
        same_input_channels_(self.head.conv)  # colour-blind at the start (issue 26)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(x)))
