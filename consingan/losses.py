"""Adversarial, reconstruction, texture and perceptual losses, on raw critic outputs (no hidden activations); the
perceptual (VGG-19 feature) loss only from a local weights file the user gives: nothing is downloaded."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from consingan.checkpoint import load_state
from consingan.errors import ConsinganError


def wasserstein_critic_loss(real_score: torch.Tensor, fake_score: torch.Tensor) -> torch.Tensor:
    """The critic minimises E[D(fake)] - E[D(real)]."""
    return fake_score.mean() - real_score.mean()


def wasserstein_generator_loss(fake_score: torch.Tensor) -> torch.Tensor:
    """The generator minimises -E[D(fake)]."""
    return -fake_score.mean()


def joint_scores(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's score maps of ``real`` and ``fake`` from one batch: (real scores, fake scores).

    A critic with batch norm fed one image at a time normalises each map by its own statistics, and every block
    then ignores the map's mean and contrast (with padding 0 the score of ``a * x + b`` is exactly that of ``x``): it
    cannot tell a haze of the wrong brightness from the image. In one batch, real and fake share their statistics
    and the difference stays visible. Without batch norm the scores are those of two separate calls."""
    scores = critic(torch.cat([real, fake]))
    return scores[: len(real)], scores[len(real):]


GRADIENT_PENALTY_FORMS = ("pixel", "image")


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, form: str = "pixel",
                     reference: torch.Tensor | None = None, precision: torch.dtype | None = None,
                     scale: float = 1.0) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): mean of (||grad D(x_hat)||_2 - 1)^2 at random points between real and fake.

    ``form`` says over what the norm is taken:

    - ``"pixel"`` (default, SinGAN's and ConSinGAN's form): the norm over channels at each pixel or voxel, and the
      penalty averaged over pixels. A patch critic's score map has one score per position, so this holds each local
      score to slope 1 whatever the image size; ConSinGAN's ``lambda_grad_penalty = 0.1`` belongs to this form.
    - ``"image"`` (Gulrajani's original form for one score per image): one norm over the whole image. For a patch
      critic it grows with the square root of the number of positions, so at fine scales and in 3D it holds the
      critic nearly flat.

    ``reference`` (for a critic with batch norm): a batch scored beside the mixed points, so the penalty holds the
    function the critic is trained as (its statistics taken over the real and the generated image together).

    ``precision`` (bf16 or fp16): the critic's forward runs under autocast in that type; the mixing, the gradient and
    its norm stay in float32 whatever it is. ``scale`` (fp16's gradient scaler, ``GradScaler.get_scale()``): the
    gradient is taken of the scores times ``scale`` and divided by it, so that small gradients do not vanish in
    float16 on the way back through the critic; the caller scales the total loss, penalty included, as usual.

    Returned unweighted, in float32 (or float64 for float64 inputs); the caller multiplies by its lambda. One mixing
    weight per batch element.
    """
    if form not in GRADIENT_PENALTY_FORMS:
        raise ValueError(f"unknown gradient penalty form {form!r}; choose one of {GRADIENT_PENALTY_FORMS}")
    real, fake = _at_least_float32(real.detach()), _at_least_float32(fake.detach())
    weight = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    # A non-leaf input (the clone) keeps autograd.grad compatible with torch.utils.flop_counter (benchmarks/).
    mixed = (weight * real + (1.0 - weight) * fake).requires_grad_(True).clone()
    autocast = (torch.autocast(mixed.device.type, dtype=precision) if precision is not None
                else contextlib.nullcontext())
    with autocast:
        score = critic(mixed) if reference is None else \
            critic(torch.cat([_at_least_float32(reference.detach()), mixed]))[len(reference):]
    total = score.to(mixed.dtype).sum()
    # Outside autocast (backward passes under it are not recommended); the gradient comes back in mixed's dtype.
    (gradient,) = torch.autograd.grad(total if scale == 1.0 else total * scale, mixed, create_graph=True)
    if scale != 1.0:
        gradient = gradient / scale
    norm = gradient.norm(2, dim=1) if form == "pixel" else gradient.flatten(1).norm(2, dim=1)
    return ((norm - 1.0) ** 2).mean()


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is of a lower precision (bf16, fp16), else as it is."""
    return x.float() if x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x


def diversity_shortfall(first: torch.Tensor, second: torch.Tensor, spread: torch.Tensor | float,
                        target: float) -> torch.Tensor:
    """How far two samples drawn from different noise differ by less than ``target``: their mean absolute difference
    over ``spread`` (the image's mean absolute deviation), subtracted from ``target``, and 0 once it is reached.

    A clipped form of the diversity-sensitive regulariser of Yang et al. (ICLR 2019): minimised, it pushes a
    generator that maps every noise to one output to make its outputs differ, and stops pushing at ``target``, so
    a generator that varies enough trains as without it."""
    return (target - (first - second).abs().mean() / spread).clamp_min(0)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, as in SinGAN/ConSinGAN's reconstruction term."""
    return F.mse_loss(output, target)


def adversarial_loss(logits: torch.Tensor, target_is_real: bool, mode: str, for_discriminator: bool = True,
                     real_label: float = 1.0) -> torch.Tensor:
    """One GAN criterion on raw logits: 'lsgan' (squared error to 1/0), 'bce' (binary cross-entropy with logits),
    'hinge' (discriminator: relu(1 -/+ logits); generator: -logits), 'wgan' (-/+ mean logits). ``real_label`` below 1
    is one-sided label smoothing of the discriminator's real targets ('bce', 'lsgan')."""
    target = (real_label if for_discriminator else 1.0) if target_is_real else 0.0
    if mode == "lsgan":
        return F.mse_loss(logits, torch.full_like(logits, target))
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
    if mode == "hinge":
        if not for_discriminator:
            return -logits.mean()
        return F.relu(1.0 - logits).mean() if target_is_real else F.relu(1.0 + logits).mean()
    if mode == "wgan":
        return -logits.mean() if target_is_real else logits.mean()
    raise ValueError(f"unknown GAN criterion {mode!r}; choose 'lsgan', 'bce', 'hinge' or 'wgan'")


def feature_matching_loss(fake_features: list, real_features: list) -> torch.Tensor:
    """pix2pixHD's feature matching: L1 between discriminator features of fake and real, every layer but the logits,
    averaged over layers and scales. Accepts one discriminator's feature list or a list of them (multi-scale)."""
    if fake_features and isinstance(fake_features[0], torch.Tensor):
        fake_features, real_features = [fake_features], [real_features]
    terms = [F.l1_loss(f, r.detach()) for fs, rs in zip(fake_features, real_features) for f, r in zip(fs[:-1], rs[:-1])]
    return torch.stack(terms).mean()


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Channel-by-channel correlations [N, C, C] of feature maps [N, C, *spatial], divided by C x positions."""
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[1] / flat.shape[2]


def texture_loss(fake_features: list[torch.Tensor], real_features: list[torch.Tensor]) -> torch.Tensor:
    """Gram-matrix (style) loss: squared distance between the batch-mean Gram matrices of fake and real features,
    averaged over layers (real features are targets, not trained through)."""
    terms = [F.mse_loss(gram_matrix(f).mean(0), gram_matrix(r.detach()).mean(0))
             for f, r in zip(fake_features, real_features)]
    return torch.stack(terms).mean()


# VGG-19's convolutional part ("features"), as in torchvision's state dicts: channels, or "M" for max pooling.
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
# Outputs after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (pix2pixHD's choice), weights 1/32 ... 1.
_TAPS = {1: 1 / 32, 6: 1 / 16, 11: 1 / 8, 20: 1 / 4, 29: 1.0}
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class VGGPerceptualLoss(nn.Module):
    """Weighted L1 between VGG-19 features of fake and real 2D RGB (or grey) images in [-1, 1].

    Load with ``from_file`` on a torchvision-format VGG-19 state dict (keys ``features.N.weight``); off by default.
    """

    def __init__(self) -> None:
        super().__init__()
        layers, channels = [], 3
        for item in _VGG19:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers[: max(_TAPS) + 1])
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str) -> "VGGPerceptualLoss":
        state = load_state(path)
        module = cls()
        wanted = [k for k in module.state_dict() if k.startswith("features.")]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ConsinganError(f"{path} is not a VGG-19 state dict (missing {missing[0]})")
        module.load_state_dict({k: state[k] for k in wanted}, strict=False)
        return module.eval()

    def tapped(self, x: torch.Tensor) -> list[torch.Tensor]:
        """VGG features of 2D images [N, 1 or 3, H, W] in [-1, 1] after relu1_1 ... relu5_1."""
        if x.dim() != 4:
            raise ConsinganError("the perceptual loss works on 2D images")
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        x = ((x + 1) / 2 - self.mean) / self.std
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAPS:
                taps.append(x)
        return taps

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return sum(weight * F.l1_loss(f, r.detach())
                   for weight, f, r in zip(_TAPS.values(), self.tapped(fake), self.tapped(real)))

    def batch_mean_loss(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """For unpaired batches (the conditional GAN): weighted L1 between the batch-mean features of fake and
        real images, which compares what the two sets look like on average rather than image to image."""
        return sum(weight * F.l1_loss(f.mean(0), r.detach().mean(0))
                   for weight, f, r in zip(_TAPS.values(), self.tapped(fake), self.tapped(real)))
