"""Options of the single-image engine: one dataclass, ConSinGAN's configuration table plus what users need around it.

The names and defaults of the configuration table of the 2D/3D ConSinGAN implementation this engine re-creates are
kept exactly (``Dsteps`` and ``Gsteps`` included). A config file (YAML or TOML) and CLI flags fill the same
dataclass; flags win over the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from consingan.errors import ConsinganError


def is_single_folder_name(name: str) -> bool:
    """One folder name inside another folder: not empty, '.' or '..', no '/', '\\' or NUL, not absolute (what a run
    name and a conditional class name may be, so that nothing is ever written outside the folder they go into)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") \
        and not Path(name).is_absolute()


def check_run_name(run_name: str) -> str:
    """A run name is one folder name inside the output root: no separator, no '.' or '..', not absolute."""
    if run_name and not is_single_folder_name(run_name):
        raise ConsinganError(f"run name {run_name!r} must be a single folder name (no '/', '..' or absolute path); "
                             f"use --out-dir to choose where run folders go")
    return run_name



def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


def _check_each(config: Any, names: tuple[str, ...], allowed: Any, requirement: str) -> None:
    """Raise ``ConsinganError`` for the first option in ``names`` whose value fails ``allowed`` (booleans always do)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not allowed(value):
            raise ConsinganError(f"{name} must be {requirement}, got {value!r}")


def _check_choices(config: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """Raise ``ConsinganError`` for the first option whose value is not one of its allowed names."""
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConsinganError(f"{name} must be one of {', '.join(allowed)}; got {getattr(config, name)!r}")


POSITIVE, NOT_NEGATIVE, FRACTION = (lambda v: v > 0), (lambda v: v >= 0), (lambda v: 0 <= v < 1)
PRECISIONS = ("fp32", "bf16", "fp16")  # TrainConfig.precision; fp16 is refused off CUDA when training starts


@dataclass
class TrainConfig:
    """Every option of ``consingan train`` with its default (ConSinGAN's configuration table first)."""

    # --- ConSinGAN's configuration table (names and defaults kept) ---------------------------------------------------
    data_dir: str = _opt("data", "Folder searched for --image when the path given does not exist as is.")
    out_dir: str = _opt("out", "Root folder under which a new run folder is created.")
    dimension: int = _opt(3, "Spatial dimensions of the input image: 2 or 3.", flag="--dim")
    epochs: int = _opt(2000, "Epochs per scale.")
    num_scales: int = _opt(8, "Number of scales in the pyramid (stages of the generator).")
    active_scales: int = _opt(3, "Number of newest stages trained concurrently.")
    num_layers: int = _opt(3, "Convolutional blocks per stage (generator body and critic).")
    num_feature_channels: int = _opt(64, "Feature channels in the convolutional blocks.")
    kernel_size: int = _opt(3, "Kernel size of the convolutions (odd).")
    padding: int = _opt(1, "Zero padding of the convolutions; at most (kernel_size - 1) / 2.")
    batch_norm: bool = _opt(True, "Batch normalisation in the critic's blocks.")
    cbam: bool = _opt(True, "CBAM attention at the end of every generator stage and after the critic's body.")
    lrelu_alpha: float = _opt(0.05, "Negative slope of the leaky ReLUs.")
    beta1_adam: float = _opt(0.5, "First beta of the Adam optimisers.")
    lr: float = _opt(0.0005, "Learning rate of the newest generator stage and of the critic.")
    lr_factor: float = _opt(0.1, "A stage k levels below the newest trains at lr * lr_factor**k.")
    gamma_scheduler: float = _opt(0.1, "Learning-rate decay factor applied at lr_decay_at of each scale's epochs.")
    noise_amp: float = _opt(0.1, "Noise amplitude of a new stage = noise_amp x RMSE of its reconstruction.")
    alpha_rec_loss: float = _opt(10.0, "Weight of the reconstruction loss.")
    lambda_grad_penalty: float = _opt(0.1, "Weight of the WGAN-GP gradient penalty.")
    Dsteps: int = _opt(3, "Critic updates per epoch.", flag="--dsteps")
    Gsteps: int = _opt(3, "Generator updates per epoch, each with its own gradient.", flag="--gsteps")
    max_size: int = _opt(250, "Longest side (in voxels) of the finest scale; larger images are downscaled.")
    min_size: int = _opt(25, "Shortest side (in voxels) of the coarsest scale.")
    # --- beyond the table -------------------------------------------------------------------------------------------
    image: str = _opt("", "Input image or volume (NIfTI, MHA/MHD/NRRD, PNG/TIFF/JPEG, NPY).")
    label: str = _opt("", "Label map (integer classes, same grid as --image) trained jointly: samples come with labels.")
    seed: int | None = _opt(None, "Random seed; drawn at random and recorded in config.json when not given.")
    device: str = _opt("auto", "Device: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    preview_every: int = _opt(500, "Write a sample, a reconstruction and a preview every N epochs (0: end of scale "
                                   "only).", aliases=("save_every",))
    checkpoint_every: int = _opt(100, "Save a resumable training state every N epochs within a scale (0: end of scale only).")
    lr_decay_at: float = _opt(0.8, "Fraction of each scale's epochs after which the learning rate is decayed.")
    run_name: str = _opt("", "Name of the run folder under out_dir (default: numbered from the image name).")
    # --- what ConSinGAN's table leaves open, chosen by the quality study (benchmarks/QUALITY.md) ----------------------
    gradient_penalty: str = _opt("pixel", "Gradient-penalty norm: 'pixel' (per voxel over channels, averaged: "
                                 "ConSinGAN's) or 'image' (one norm over the whole image).")
    intensity_mapping: str = _opt("window", "Intensities onto [-1, 1]: 'window' (percentile window onto [-0.8, 0.8], "
                                  "tails compressed into the margins) or 'minmax'.")
    window_low_percentile: float = _opt(0.5, "Lower percentile of the intensity window.")
    window_high_percentile: float = _opt(99.5, "Upper percentile of the intensity window.")
    colour_axes: str = _opt("channels", "Which axes of a colour image the intensity mapping works on: 'channels' "
                            "(as stored) or 'principal' (the image's own principal colour axes, so that an error in "
                            "one output channel is mostly a brightness error, not a false colour; no effect on one "
                            "channel).")
    upsampling: str = _opt("linear", "Resampling between generator stages: 'linear' or 'cubic' (2D only; the "
                           "reference's bicubic).")
    gradient_penalty_every: int = _opt(1, "Compute the gradient penalty on every k-th critic update only, weighted "
                                       "by k (lazy regularisation, as StyleGAN2 does for R1); 1: on every update.")
    generator_update: str = _opt("fresh", "Generator updates per epoch: 'fresh' (Gsteps updates, each from new noise "
                                 "and its own gradient) or 'repeat' (one gradient applied Gsteps times, as the "
                                 "official ConSinGAN does).")
    scale_epochs: str = _opt("", "Epochs of each scale, coarsest first, comma-separated, one per scale (for example "
                             "240,240,240,120,120: coarse scales are cheap); empty: --epochs for every scale.")
    coordinates: bool = _opt(False, "Give the coarsest generator stage one coordinate channel per axis (-1 to 1 "
                             "across the scale) beside its noise: an explicit position for the coarse layout "
                             "(ConSinGAN has only zero padding's implicit one).")
    anchor_layout: float = _opt(0.0, "Keep the coarsest scale on the image's layout: stage 0's random input is the "
                                "coarsest real image plus noise of this spread, so samples vary about the image's "
                                "anatomy instead of drawing a layout from noise; 0: pure noise, as in ConSinGAN.")
    anchor_warp: float = _opt(0.0, "With --anchor-layout, also deform the anchor of each random sample smoothly: a "
                              "displacement drawn from stage 0's noise with this RMS in voxels of the coarsest "
                              "scale, so samples vary in shape about the image's anatomy (a smooth template "
                              "otherwise gives near-copies); the reconstruction stays undeformed; 0: off.")
    anchor_warp_target: float = _opt(0.0, "With --anchor-warp, adapt the warp while the coarsest scale trains, from 0 "
                                     "up to --anchor-warp at most, so that two of its random samples differ by this "
                                     "much (mean absolute difference over the image's mean absolute deviation, as "
                                     "for --diversity-target): a generator whose samples already vary keeps the "
                                     "anchor nearly undeformed, one that turns every noise into the same image gets "
                                     "shape variation; 0: the warp is --anchor-warp throughout.")
    diversity_weight: float = _opt(0.0, "Weight of a diversity-sensitive loss (after Yang et al., ICLR 2019): each "
                                   "generator step draws two random samples and is penalised by how far their mean "
                                   "absolute difference, over the image's mean absolute deviation at that scale, "
                                   "falls short of --diversity-target; keeps a generator from learning to ignore its "
                                   "noise (an anchored coarsest scale on a smooth image); 0: off, as in ConSinGAN.")
    diversity_target: float = _opt(0.5, "The difference between two random samples (see --diversity-weight) above "
                                   "which the diversity loss stops pushing.")
    ema_decay: float = _opt(0.0, "Decay of an exponential moving average of the generator's weights within each "
                            "scale, which replaces the weights at the scale's end (samples, outputs and the next "
                            "scale start from the average); 0: off, as in ConSinGAN.")
    # --- large volumes (issue 23) -------------------------------------------------------------------------------------
    patch_size: str = _opt("auto", "Train every scale larger than this many voxels a side on random regions (patches) "
                           "of it, with memory bounded by the patch: 'auto' (the largest that fits the device's free "
                           "memory, the whole volume when it fits; recorded in config.json as the value chosen), an "
                           "integer, or 'off' (whole volumes always).", integer_text=True)
    precision: str = _opt("fp32", "Arithmetic of the training forwards: 'fp32', 'bf16' (autocast; any CPU or a recent "
                          "GPU) or 'fp16' (autocast with gradient scaling; CUDA only). Losses, the gradient penalty's "
                          "norm, the weights and every output stay float32.")
    checkpoint_stages: bool = _opt(False, "Recompute each trained stage's activations in the backward pass instead "
                                   "of storing them: less memory, about a third more time.")

    # ------------------------------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ``ConsinganError`` naming the first option whose value is not allowed; return self."""
        positive_ints = ["epochs", "num_scales", "active_scales", "num_layers", "num_feature_channels", "kernel_size",
                         "Dsteps", "Gsteps", "max_size", "min_size", "gradient_penalty_every"]
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConsinganError(f"{name} must be a positive integer, got {value!r}")
        positive_floats = ["lr", "lr_factor", "gamma_scheduler", "noise_amp"]
        non_negative_floats = ["lrelu_alpha", "alpha_rec_loss", "lambda_grad_penalty", "anchor_layout", "anchor_warp",
                               "anchor_warp_target",
                               "diversity_weight", "diversity_target"]
        for name in positive_floats + non_negative_floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConsinganError(f"{name} must be a finite number, got {value!r}")
            if value < 0 or (value == 0 and name in positive_floats):
                kind = "positive" if name in positive_floats else "zero or positive"
                raise ConsinganError(f"{name} must be {kind}, got {value!r}")
        if self.dimension not in (2, 3):
            raise ConsinganError(f"dimension must be 2 or 3, got {self.dimension!r}")
        if self.gradient_penalty_every > self.Dsteps:  # every epoch computes the penalty at least once
            raise ConsinganError(f"gradient_penalty_every ({self.gradient_penalty_every}) must not exceed Dsteps "
                                 f"({self.Dsteps})")
        if self.anchor_warp_target > 0 and self.anchor_warp == 0:
            raise ConsinganError("anchor_warp_target adapts the warp up to --anchor-warp; set --anchor-warp too, or "
                                 "--anchor-warp-target 0")
        if self.anchor_warp > 0 and self.anchor_layout == 0:
            raise ConsinganError("anchor_warp deforms the anchor of --anchor-layout; set --anchor-layout too, or "
                                 "--anchor-warp 0")
        if self.kernel_size % 2 != 1:
            raise ConsinganError(f"kernel_size must be odd, got {self.kernel_size}")
        if not isinstance(self.padding, int) or not 0 <= self.padding <= (self.kernel_size - 1) // 2:
            raise ConsinganError(f"padding must be between 0 and {(self.kernel_size - 1) // 2}, got {self.padding!r}")
        for name in ("beta1_adam", "ema_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConsinganError(f"{name} must be in [0, 1), got {value!r}")
        if self.gamma_scheduler > 1:
            raise ConsinganError(f"gamma_scheduler must be at most 1, got {self.gamma_scheduler}")
        if not 0 < self.lr_decay_at <= 1:
            raise ConsinganError(f"lr_decay_at must be in (0, 1], got {self.lr_decay_at}")
        if self.min_size > self.max_size:
            raise ConsinganError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        for name in ("preview_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConsinganError(f"{name} must be zero or a positive integer, got {value!r}")
        _check_choices(self, {"gradient_penalty": ("pixel", "image"), "intensity_mapping": ("window", "minmax"),
                              "colour_axes": ("channels", "principal"),
                              "upsampling": ("linear", "cubic"), "generator_update": ("fresh", "repeat"),
                              "precision": PRECISIONS})
        if self.upsampling == "cubic" and self.dimension != 2:
            raise ConsinganError("upsampling 'cubic' exists only in 2D (PyTorch has no tricubic); use 'linear' in 3D")
        patch = self.patch_size
        if not isinstance(patch, str) or not (patch in ("auto", "off") or (patch.isdigit() and int(patch) > 0)):
            raise ConsinganError(f"patch_size must be 'auto', 'off' or a positive integer, got {patch!r}")
        low, high = self.window_low_percentile, self.window_high_percentile
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
                or not 0 <= low < high <= 100:
            raise ConsinganError(f"window percentiles must satisfy 0 <= low < high <= 100, got {low!r} and {high!r}")
        self.epochs_of(0)  # scale_epochs is well formed
        check_common(self)
        return self

    def epochs_of(self, stage: int) -> int:
        """Epochs of scale ``stage``: its entry of ``scale_epochs``, or ``epochs`` when that is empty."""
        if not self.scale_epochs:
            return self.epochs
        parts = [part.strip() for part in str(self.scale_epochs).split(",")]  # str(): a YAML file may give an int
        if len(parts) != self.num_scales or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise ConsinganError(f"scale_epochs must be {self.num_scales} positive integers separated by commas "
                                 f"(one per scale, coarsest first), got {self.scale_epochs!r}")
        return int(parts[stage])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def patch_side(self) -> int | None:
        """The patch side of a resolved ``patch_size``: None for 'off' (whole volumes). 'auto' has no side of its own:
        the memory preflight (``consingan.singan.memory.check_memory``) chooses one."""
        if self.patch_size == "auto":
            raise ValueError("patch_size 'auto' is resolved by the memory preflight (check_memory) first")
        return None if self.patch_size == "off" else int(self.patch_size)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        return apply_overrides(cls(), values, source)


UNET_MODELS = ("unet", "cbam_unet", "spade_unet")  # pix2pix U-Nets: their depth is set by --depth or the tile
PAIRED_MODELS = (*UNET_MODELS, "resnet", "local_enhancer", "unetpp")
GAN_MODES = ("lsgan", "bce", "hinge", "wgan")


@dataclass
class PairedConfig:
    """Every option of ``consingan paired train`` with its default (pix2pix's: U-Net, L1 weight 100, Adam 2e-4)."""

    source_dir: str = _opt("", "Folder of inputs (masks, phase contrast); files matched to targets by name.",
                           flag="--source")
    target_dir: str = _opt("", "Folder of targets, matched to the inputs by file name.", flag="--target")
    model: str = _opt("unet", "Generator: " + ", ".join(PAIRED_MODELS) + ".")
    dimension: int = _opt(3, "Spatial dimensions: 2 or 3 (3 by default, as for every command).", flag="--dim")
    epochs: int = _opt(200, "Epochs (passes over every tile).")
    decay_start: int = _opt(-1, "Epoch after which the learning rate falls linearly to 0 (-1: half of the epochs).")
    batch_size: int = _opt(1, "Tiles per batch.")
    lr: float = _opt(2e-4, "Learning rate of generator and discriminator.")
    beta1_adam: float = _opt(0.5, "First beta of the Adam optimisers.", aliases=("beta1",))
    lambda_l1: float = _opt(100.0, "Weight of the L1 loss to the target.")
    loss: str = _opt("lsgan", "Adversarial loss: " + ", ".join(GAN_MODES) + " (as conditional train's --loss).",
                     aliases=("gan_mode",))
    discriminator: str = _opt("patch", "'patch' (PatchGAN) or 'multiscale' (pix2pixHD, with feature matching).")
    lambda_feature_matching: float = _opt(10.0, "Weight of the feature-matching loss (multiscale discriminator).")
    perceptual_weights: str = _opt("", "Local VGG-19 state dict for a perceptual loss (off when empty).")
    lambda_perceptual: float = _opt(10.0, "Weight of the perceptual loss.")
    tile: int = _opt(256, "Tile size (pix2pix on masks -> microscopy images has used 512 with stride 256).")
    stride: int = _opt(-1, "Tile stride (-1: tile / 2).")
    num_feature_channels: int = _opt(64, "Channels of the first generator and discriminator layer.",
                                     aliases=("base_channels",))
    depth: int = _opt(0, "U-Net depth (0: as deep as the tile allows, at most 8).")
    deep_supervision: bool = _opt(False, "U-Net++ only: an output head on every nested decoder, each trained with "
                                  "the L1 loss (prediction uses the last).")
    one_hot: bool = _opt(False, "Masks as one-hot class channels (background, interior, boundary ...).")
    intensity_mapping: str = _opt("window", "Intensities onto [-1, 1], per channel over the whole set (targets, and "
                                  "sources that are not --one-hot): 'window' (the 0.5-99.5 percentiles onto +-0.8, "
                                  "the tails beyond) or 'minmax', as consingan train.")
    preview_every: int = _opt(10, "Write a preview of (input, prediction, target) tiles every N epochs (0: at the "
                              "end only).")
    checkpoint_every: int = _opt(10, "Keep a snapshot of the sampling weights every N epochs in snapshots/ (0: none); "
                                 "the resumable training state is written after every epoch.")
    out_dir: str = _opt("out", "Root folder under which a new run folder is created.")
    run_name: str = _opt("", "Name of the run folder under out_dir (default: paired_NNN).")
    seed: int | None = _opt(None, "Random seed; drawn at random and recorded in config.json when not given.")
    device: str = _opt("auto", "Device: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    num_workers: int = _opt(0, "DataLoader worker processes.")

    def validate(self) -> "PairedConfig":
        """Raise ``ConsinganError`` naming the first option whose value is not allowed; return self."""
        if self.model not in PAIRED_MODELS:
            raise ConsinganError(f"unknown model {self.model!r}; choose one of {', '.join(PAIRED_MODELS)}")
        if self.dimension not in (2, 3):
            raise ConsinganError(f"dimension must be 2 or 3, got {self.dimension}")
        check_common(self)
        _check_each(self, ("epochs", "batch_size", "tile", "num_feature_channels", "lr"), POSITIVE, "positive")
        _check_each(self, ("depth", "num_workers", "preview_every", "checkpoint_every", "lambda_l1",
                           "lambda_feature_matching", "lambda_perceptual"), NOT_NEGATIVE, "zero or positive")
        _check_each(self, ("beta1_adam",), FRACTION, "in [0, 1)")
        if self.loss not in GAN_MODES:
            raise ConsinganError(f"unknown loss {self.loss!r}; choose one of {', '.join(GAN_MODES)}")
        _check_choices(self, {"intensity_mapping": ("window", "minmax")})
        if self.discriminator not in ("patch", "multiscale"):
            raise ConsinganError(f"discriminator must be 'patch' or 'multiscale', got {self.discriminator!r}")
        if self.tile < 8:
            raise ConsinganError(f"tile must be at least 8, got {self.tile}")
        if not 0 < self.resolved_stride() <= self.tile:
            raise ConsinganError(f"stride must be between 1 and the tile size {self.tile}")
        if self.decay_start >= self.epochs:
            raise ConsinganError(f"decay_start ({self.decay_start}) must be below epochs ({self.epochs})")
        self._check_model_fits_tile()
        return self

    def refuse_ignored_options(self) -> "PairedConfig":
        """For a new run: an option the chosen model would ignore is refused, naming the models it applies to. (Not
        part of ``validate``, so that runs written before this check still open.)"""
        if self.deep_supervision and self.model != "unetpp":
            raise ConsinganError(f"--deep-supervision applies to model unetpp (U-Net++) only, not {self.model}; "
                                 f"drop it or use --model unetpp")
        return self

    def _check_model_fits_tile(self) -> None:
        """Tile and depth against what the chosen model needs, so that a model that cannot be built is refused
        before any run folder is made."""
        if self.model not in UNET_MODELS:
            multiple = self.size_multiple()
            # A normalised bottleneck needs at least 2 voxels per side (U-Nets leave their innermost unnormalised).
            if self.tile % multiple or self.tile < 2 * multiple:
                raise ConsinganError(f"--tile {self.tile} does not fit model {self.model}: it must be a multiple of "
                                     f"{multiple} and at least {2 * multiple}")
            return
        levels = (self.tile & -self.tile).bit_length() - 1  # each U-Net level halves the tile: its factors of 2
        if self.depth > levels:
            raise ConsinganError(f"--depth {self.depth} is deeper than --tile {self.tile} allows: each level halves "
                                 f"the tile, so it allows a depth of at most {levels}")
        if self.depth == 1:
            raise ConsinganError(f"model {self.model} needs --depth 2 or more (0: as deep as the tile allows), got 1")
        if self.resolved_depth() < 2:
            raise ConsinganError(f"--tile {self.tile} allows a U-Net of depth 1 only and model {self.model} needs 2 "
                                 f"or more: use a tile that is a multiple of 4 (16, 32, 64 ...)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "PairedConfig":
        return apply_overrides(cls(), values, source)

    def resolved_stride(self) -> int:
        return self.tile // 2 if self.stride < 0 else self.stride

    def resolved_depth(self) -> int:
        if self.depth > 0:
            return self.depth
        depth = 1
        while depth < 8 and self.tile % 2 ** (depth + 1) == 0:
            depth += 1
        return depth

    def size_multiple(self) -> int:
        """Spatial sizes the generator accepts are multiples of this."""
        if self.model == "resnet":
            return 8
        if self.model in ("local_enhancer", "unetpp"):
            return 16
        return 2 ** self.resolved_depth()


CONDITIONAL_LOSSES = ("hinge", "bce", "lsgan", "wgan-gp")
# Anatomical names of the array axes, in array order (volumes are reoriented to LPS z-y-x on reading).
FLIP_AXES = {2: ("up-down", "left-right"), 3: ("superior-inferior", "anterior-posterior", "left-right")}
CONDITIONINGS = ("projection", "acgan")


@dataclass
class ConditionalConfig:
    """Every option of ``consingan conditional train`` with its default (a class-conditional DCGAN with the usual
    fixes: projection discriminator, spectral norm, TTUR, EMA)."""

    data: str = _opt("", "A folder with one sub-folder of images per class, or a CSV file of path,class rows.")
    dimension: int = _opt(3, "Spatial dimensions: 2 or 3 (3 by default, as for every command).", flag="--dim")
    size: int = _opt(64, "Side of the generated images (a power of two times 4: 16, 32, 64, 128, 256).")
    fit: str = _opt("extent", "How images reach size^dims: 'extent' (the physical extent kept, its longest side "
                    "across size isotropic voxels, the rest padded with the minimum), 'resize' (every axis stretched "
                    "to size) or 'crop' (shortest side to size, then a central crop).")
    epochs: int = _opt(100, "Epochs (passes over the data set, drawn class-balanced).")
    batch_size: int = _opt(16, "Images per batch (per step; see accumulate).")
    accumulate: int = _opt(1, "Batches whose gradients are summed before each optimiser step (a larger batch).")
    noise_dim: int = _opt(128, "Length of the noise vector.")
    embedding_dim: int = _opt(32, "Length of the learned class embedding fed to the generator with the noise.")
    num_feature_channels: int = _opt(32, "Channels of the generator's last stage and of the discriminator's first "
                                     "layer.", aliases=("base_channels",))
    max_channels: int = _opt(256, "Upper limit of channels at any stage.")
    attention: int = _opt(-1, "Side at which a self-attention block sits in generator and discriminator (0: none; "
                          "-1: 32 in 2D and 8 in 3D, or half the size for smaller images).")
    conditioning: str = _opt("projection", "Discriminator conditioning: 'projection' (Miyato & Koyama 2018) or "
                             "'acgan' (an auxiliary classifier head).")
    discriminator_scales: int = _opt(1, "Discriminators on the image downsampled 1, 2, 4 ... times (1: one).")
    loss: str = _opt("hinge", "Adversarial loss: " + ", ".join(CONDITIONAL_LOSSES) + ".")
    label_smoothing: float = _opt(0.0, "One-sided label smoothing for 'bce': real targets become 1 - this.")
    lambda_grad_penalty: float = _opt(10.0, "Weight of the gradient penalty ('wgan-gp').")
    lambda_classifier: float = _opt(1.0, "Weight of the auxiliary classification loss ('acgan').")
    perceptual_weights: str = _opt("", "Local VGG-19 state dict: adds a perceptual loss between the batch-mean VGG "
                                   "features of real and generated images of the same classes (2D; off when empty).")
    lambda_perceptual: float = _opt(1.0, "Weight of the perceptual loss.")
    lambda_texture: float = _opt(0.0, "Weight of a Gram-matrix texture loss on the discriminator's features "
                                 "(or VGG's, when given); 0: off.")
    lr_g: float = _opt(1e-4, "Generator learning rate (TTUR).")
    lr_d: float = _opt(4e-4, "Discriminator learning rate (TTUR).")
    beta1_adam: float = _opt(0.0, "First Adam beta.", aliases=("beta1",))
    beta2: float = _opt(0.9, "Second Adam beta.")
    ema_decay: float = _opt(0.999, "Decay of the generator's exponential moving average (used for every sample).")
    flip_axes: str = _opt("left-right", "Random flips (each with probability 1/2) along these axes, comma-separated: "
                          "left-right, anterior-posterior, superior-inferior in 3D (volumes are reoriented to "
                          "these axes on reading), left-right, up-down in 2D; 'none' for no flips.")
    rotations: bool = _opt(False, "Random 90-degree rotations (in 3D: in a random plane).")
    intensity_jitter: float = _opt(0.0, "Random intensity scale and shift of up to this fraction (0: off).")
    balance: bool = _opt(True, "Draw classes equally often (weighted sampling), whatever their image counts.")
    intensity_mapping: str = _opt("window", "Intensities onto [-1, 1], per channel over the whole set: 'window' or "
                                  "'minmax' (as consingan train).")
    preview_every: int = _opt(10, "Write the per-class preview grid every N epochs (0: at the end only).")
    checkpoint_every: int = _opt(10, "Keep a snapshot of the sampling weights every N epochs in snapshots/ (0: none); "
                                 "the resumable training state is written after every epoch.")
    out_dir: str = _opt("out", "Root folder under which a new run folder is created.")
    run_name: str = _opt("", "Name of the run folder under out_dir (default: conditional_NNN).")
    seed: int | None = _opt(None, "Random seed; drawn at random and recorded in config.json when not given.")
    device: str = _opt("auto", "Device: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    num_workers: int = _opt(0, "DataLoader worker processes.")

    def validate(self) -> "ConditionalConfig":
        """Raise ``ConsinganError`` naming the first option whose value is not allowed; return self."""
        check_common(self)
        if self.dimension not in (2, 3):
            raise ConsinganError(f"dimension must be 2 or 3, got {self.dimension}")
        _check_each(self, ("epochs", "batch_size", "accumulate", "noise_dim", "embedding_dim", "num_feature_channels",
                           "max_channels", "discriminator_scales"), POSITIVE, "a positive integer")
        if self.attention < -1:
            raise ConsinganError(f"attention must be -1 (automatic), 0 (none) or a side, got {self.attention}")
        _check_each(self, ("preview_every", "checkpoint_every", "num_workers"), NOT_NEGATIVE, "zero or positive")
        stages = self.num_stages()
        if stages < 1 or 4 * 2**stages != self.size:
            raise ConsinganError(f"size must be 4 x a power of two, at least 8 (8, 16, 32, 64 ...), got {self.size}")
        if self.attention > 0 and (self.attention not in [4 * 2**k for k in range(stages + 1)]):
            raise ConsinganError(f"attention must be 0 or a side the networks pass through (4, 8, ... {self.size}), "
                                 f"got {self.attention}")
        if 2 ** (self.discriminator_scales - 1) * 8 > self.size:
            raise ConsinganError(f"{self.discriminator_scales} discriminator scales need size of at least "
                                 f"{2 ** (self.discriminator_scales - 1) * 8}")
        self.flip_dims()
        _check_choices(self, {"loss": CONDITIONAL_LOSSES, "conditioning": CONDITIONINGS,
                              "fit": ("extent", "resize", "crop"),
                              "intensity_mapping": ("window", "minmax")})
        _check_each(self, ("lr_g", "lr_d"), POSITIVE, "positive")
        _check_each(self, ("lambda_grad_penalty", "lambda_classifier", "lambda_perceptual", "lambda_texture"),
                    NOT_NEGATIVE, "zero or positive")
        _check_each(self, ("beta1_adam", "beta2", "ema_decay", "label_smoothing", "intensity_jitter"), FRACTION,
                    "in [0, 1)")
        if self.perceptual_weights and self.dimension != 2:
            raise ConsinganError("the perceptual loss (VGG-19) is 2D only")
        return self

    def flip_dims(self) -> tuple[int, ...]:
        """The array axes of ``flip_axes`` (``ConsinganError`` naming the allowed names for an unknown one)."""
        names = FLIP_AXES[self.dimension] if self.dimension in FLIP_AXES else FLIP_AXES[3]
        if self.flip_axes.strip().lower() == "none":
            return ()
        axes = []
        for name in (part.strip().lower() for part in self.flip_axes.split(",")):
            if name not in names:
                raise ConsinganError(f"flip_axes: {name!r} is not an axis of a {self.dimension}D image; use "
                                     f"{', '.join(names)} (comma-separated) or 'none'")
            axes.append(names.index(name))
        return tuple(sorted(set(axes)))

    def resolved_attention(self) -> int:
        """The side of the self-attention block (0: none)."""
        # 3D: 8^3 = 512 positions, a 512 x 512 map; 32^3 would need a map of 32768^2 entries per image.
        automatic = 32 if self.dimension == 2 else 8
        return min(automatic, self.size // 2) if self.attention == -1 else self.attention

    def num_stages(self) -> int:
        """Upsampling stages from the 4-voxel start to ``size``."""
        return max(0, int(round(math.log2(max(self.size, 1) / 4))))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "ConditionalConfig":
        values = dict(values)
        if "flips" in values:  # before flip_axes: flips along every axis, or none
            flips = values.pop("flips")
            dims = values.get("dimension", values.get("dim", 3))
            if "flip_axes" not in values:
                values["flip_axes"] = ",".join(FLIP_AXES.get(dims, FLIP_AXES[3])) if flips else "none"
        return apply_overrides(cls(), values, source)


MAX_SEED = 2**63 - 1  # torch and numpy seeds are 64-bit; one bit kept for signed C APIs


def option_names(config_class: type = None) -> dict[str, dataclasses.Field]:
    """Fields by name of a config dataclass (default ``TrainConfig``), for the CLI and config-file parsing."""
    return {f.name: f for f in dataclasses.fields(config_class or TrainConfig)}


def flag_name(name: str) -> str:
    """The command-line flag of an option field: 'num_scales' -> '--num-scales', 'Dsteps' -> '--dsteps'."""
    return "--" + name.lower().replace("_", "-")


def _canonical_key(config_class: type, key: str) -> str | None:
    """Map 'num-scales', 'dsteps', 'Dsteps', 'dim' ... to the field name, or None when unknown."""
    normalised = key.strip().replace("-", "_").lower()
    names = option_names(config_class)
    for name, item in names.items():
        if name.lower() == normalised or normalised in item.metadata.get("aliases", ()):
            return name
    return "dimension" if normalised == "dim" and "dimension" in names else None


def _coerce(config_class: type, name: str, value: Any, source: str) -> Any:
    expected = type(getattr(config_class(), name))
    optional = name == "seed"
    if optional:
        expected = int
    if value is None:
        if optional:
            return None
        raise ConsinganError(f"{source}: {name} has no value")
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise ConsinganError(f"{source}: {name} must be true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConsinganError(f"{source}: {name} must be an integer, got {value!r}")
        return int(value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConsinganError(f"{source}: {name} must be a number, got {value!r}")
        return float(value)
    if option_names(config_class)[name].metadata.get("integer_text") and isinstance(value, int) \
            and not isinstance(value, bool):
        return str(value)  # 'patch_size: 64' in a YAML or TOML file is a number there, a word on the command line
    if not isinstance(value, str):
        raise ConsinganError(f"{source}: {name} must be a string, got {value!r}")
    return value


def apply_overrides(config: Any, values: dict[str, Any], source: str) -> Any:
    """Return a copy of the config dataclass ``config`` with ``values`` set; unknown keys and wrong types raise
    ``ConsinganError``."""
    config_class = type(config)
    updates: dict[str, Any] = {}
    for key, value in values.items():
        name = _canonical_key(config_class, str(key))
        if name is None:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(option_names(config_class)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConsinganError(f"{source}: unknown option {key!r}{hint}")
        updates[name] = _coerce(config_class, name, value, source)
    return dataclasses.replace(config, **updates)


def check_common(config: Any) -> None:
    """Checks every config class shares: finite numbers, a seed torch accepts, a device name, a run name."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConsinganError(f"{item.name} must be a finite number, got {value!r}")
    if getattr(config, "seed", None) is not None:
        check_seed(config.seed)
    check_device_name(getattr(config, "device", "auto"))
    check_run_name(getattr(config, "run_name", ""))


# Options that one mode of a family ignores: (option, does it apply to this config, the mode it needs).
_APPLIES_ONLY: dict[str, list[tuple[str, Callable[[Any], bool], str]]] = {
    "TrainConfig": [
        ("window_low_percentile", lambda c: c.intensity_mapping == "window", "--intensity-mapping window"),
        ("window_high_percentile", lambda c: c.intensity_mapping == "window", "--intensity-mapping window"),
    ],
    "PairedConfig": [
        ("lambda_feature_matching", lambda c: c.discriminator == "multiscale", "--discriminator multiscale"),
        ("lambda_perceptual", lambda c: bool(c.perceptual_weights), "--perceptual-weights"),
        ("depth", lambda c: c.model in UNET_MODELS, "the U-Nets (--model " + ", ".join(UNET_MODELS) + ")"),
    ],
    "ConditionalConfig": [
        ("label_smoothing", lambda c: c.loss == "bce", "--loss bce"),
        ("lambda_classifier", lambda c: c.conditioning == "acgan", "--conditioning acgan"),
        ("lambda_grad_penalty", lambda c: c.loss == "wgan-gp", "--loss wgan-gp"),
        ("lambda_perceptual", lambda c: bool(c.perceptual_weights), "--perceptual-weights"),
    ],
}


def ignored_options(config: Any) -> list[str]:
    """One line for each option set away from its default that the chosen mode ignores (a warning, not an error:
    a config file shared between modes is fine)."""
    defaults = type(config)()
    return [f"{flag_name(name)} {getattr(config, name)} is ignored: it applies only with {needs}"
            for name, applies, needs in _APPLIES_ONLY.get(type(config).__name__, [])
            if getattr(config, name) != getattr(defaults, name) and not applies(config)]


def with_seed(config: Any) -> Any:
    """``config`` with a seed drawn when it has none (recorded in config.json, so the run can be repeated)."""
    if getattr(config, "seed") is None:
        return dataclasses.replace(config, seed=secrets.randbelow(2**31))
    return config


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConsinganError(f"seed must be an integer from 0 to 2^63 - 1, got {seed!r}")
    return seed


def check_device_name(device: str) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N'; anything else (such as 'gpu') is refused by name."""
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ConsinganError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of options into a flat dict."""
    if not path.is_file():
        raise ConsinganError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConsinganError(f"config file must be .yaml, .yml, .toml or .json, got {path.name}")
    except ConsinganError:
        raise
    except Exception as error:  # parser errors differ by library; all mean the same to the user
        raise ConsinganError(f"cannot parse config file {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConsinganError(f"config file {path} must hold a mapping of option names to values")
    return data


def resolve_config(config_file: Path | None, flags: dict[str, Any], config_class: type = None) -> Any:
    """Defaults, then the config file, then the flags that were given (not None); validated."""
    config = (config_class or TrainConfig)()
    if config_file is not None:
        config = apply_overrides(config, load_config_file(config_file), f"config file {config_file.name}")
    given = {key: value for key, value in flags.items() if value is not None}
    return apply_overrides(config, given, "command line").validate()
