"""Adversarial and reconstruction losses, on raw critic outputs (no hidden activations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def wasserstein_critic_loss(real_score: torch.Tensor, fake_score: torch.Tensor) -> torch.Tensor:
    """The critic minimises E[D(fake)] - E[D(real)]."""
    return fake_score.mean() - real_score.mean()


def wasserstein_generator_loss(fake_score: torch.Tensor) -> torch.Tensor:
    """The generator minimises -E[D(fake)]."""
    return -fake_score.mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): mean of (||grad D(x_hat)||_2 - 1)^2 at random points between real and fake.

    Returned unweighted; the caller multiplies by its lambda. One mixing weight per batch element.
    """
    weight = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    # A non-leaf input (the clone) keeps autograd.grad compatible with torch.utils.flop_counter (benchmarks/).
    mixed = (weight * real.detach() + (1.0 - weight) * fake.detach()).requires_grad_(True).clone()
    score = critic(mixed)
    (gradient,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return ((gradient.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, as in SinGAN/ConSinGAN's reconstruction term."""
    return F.mse_loss(output, target)
