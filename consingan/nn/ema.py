"""Exponential moving averages of weights, shared by every family's generator."""

from __future__ import annotations

import torch


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay after ``step`` generator updates: ``decay``, but at most (1 + step) / (10 + step) early on, so
    the average does not hold on to the random initial weights for thousands of steps (with 0.999 and no warm-up,
    64 % of the average would still be the initial weights after 450 steps)."""
    return min(decay, (1.0 + step) / (10.0 + step))


def ema_update(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """average <- decay x average + (1 - decay) x model for parameters; buffers (batch-norm statistics) copied."""
    with torch.no_grad():
        for mean, current in zip(average.parameters(), model.parameters()):
            mean.lerp_(current, 1.0 - decay)
        for mean, current in zip(average.buffers(), model.buffers()):
            mean.copy_(current)


class ParameterAverage:
    """A moving average of a module's parameters alone (no copy of the module: a growing generator's buffers, such
    as reconstruction noise, can be far larger than its weights), updated after each optimiser step and copied into
    the module when the average should take over."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay, self.steps = decay, 0
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        weight = 1.0 - ema_decay_at(self.decay, self.steps)
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach(), weight)
        self.steps += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name])

    def state_dict(self) -> dict:
        return {"steps": torch.tensor(self.steps), **{f"shadow.{k}": v for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved average; a missing, extra or wrong-shaped tensor raises ``KeyError``/``ValueError``."""
        shadow = {k[len("shadow."):]: v for k, v in state.items() if k.startswith("shadow.")}
        if shadow.keys() != self.shadow.keys():
            raise KeyError(sorted(shadow.keys() ^ self.shadow.keys())[0])
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
        self.steps = int(state["steps"])
