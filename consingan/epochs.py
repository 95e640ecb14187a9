"""The epoch loop the dataset families (paired, conditional) share.

A family supplies its models, optimisers and schedulers by name, one epoch's steps and, if it has one, a preview; the
loop does the rest the same way for both: the per-epoch random state (the same on every rank, each rank its own
noise), the mean of the losses over ranks, the divergence check, the resumable training state, snapshots of the
sampling weights every ``checkpoint_every`` epochs, the loss log, ``stats.jsonl`` and the final weights. The phases
a family plugs in follow the same idea as stylegan3's training loop, which takes its losses and phases as objects.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from consingan.distributed import Distributed, unwrap
from consingan.errors import ConsinganError
from consingan.runs import RunFolder, TrainingState, load_module_state, resolve_device

Progress = Callable[[int, dict], None]


@dataclass
class DatasetResult:
    """What training a dataset family returns."""

    run_dir: Path
    config: Any
    losses: list[dict] = field(default_factory=list)
    already_finished: bool = False  # a --resume of a run that had finished: nothing was trained or written


def resumed_config(run: RunFolder, device: str | None) -> Any:
    """The run's own options, with only the device changed when one is given; set on ``run`` as well."""
    config = run.config if device is None else dataclasses.replace(run.config, device=device).validate()
    run.config = config
    return config


def load_optimizer_states(parts: dict[str, tuple[Any, Any]], state: TrainingState, where: Path) -> None:
    """Each named (optimiser, scheduler or None) pair from ``state``; a state that does not fit says so in one line."""
    for name, (optimizer, scheduler) in parts.items():
        try:
            optimizer.load_state_dict(state.optimizers[name])
            if scheduler is not None:
                scheduler.load_state_dict(state.schedulers[name])
        except (KeyError, ValueError, RuntimeError) as error:
            raise ConsinganError(f"{where} does not fit this run's optimizers: {error}") from None


def random_states(device: torch.device) -> dict[str, torch.Tensor | None]:
    """The random states a training state keeps (CUDA's only on CUDA)."""
    return {"rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_random_states(state: TrainingState, device: torch.device) -> None:
    torch.set_rng_state(state.rng_torch.cpu())
    if state.rng_cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state.rng_cuda.cpu(), device)


class EpochTrainer:
    """The shared loop. Subclasses set the models and optimisers in their ``__init__`` and implement
    ``named_models``, ``named_optimizers``, ``epoch_losses`` and ``sampling_weights``; ``write_preview`` is optional.

    The latest training state is written after every epoch (a kill loses at most one epoch); every
    ``checkpoint_every`` epochs the sampling weights are also kept as ``snapshots/epoch_NNNNN.pt``, so an earlier
    model can be sampled when a later one got worse.
    """

    diverged_hint = "try a lower --lr"
    trained_models = ("generator", "discriminator")  # put in training mode (the others, averages, stay in eval)

    def __init__(self, config: Any, run: RunFolder, progress: Progress | None = None,
                 device: torch.device | None = None, distributed: Distributed | None = None) -> None:
        self.config, self.run = config, run
        self.progress = progress or (lambda epoch, losses: None)
        self.distributed = distributed or Distributed()
        self.device = device or resolve_device(config.device)
        self.start_epoch, self.seconds = 0, 0.0
        self.history: list[dict] = []

    # --- what a family supplies -------------------------------------------------------------------------------------

    def named_models(self) -> dict[str, nn.Module]:
        """Every model whose weights the training state keeps (moving averages included), by name."""
        raise NotImplementedError

    def named_optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, Any]]:
        """(optimiser, learning-rate scheduler or None) by name."""
        raise NotImplementedError

    def epoch_losses(self, epoch: int) -> Iterable[dict[str, float]]:
        """Train one epoch, yielding each step's losses."""
        raise NotImplementedError

    def sampling_weights(self) -> dict:
        """The state dict a sampler loads (the run's ``generator.pt`` and each snapshot)."""
        raise NotImplementedError

    def write_preview(self, epoch: int) -> None:
        """A picture of the model after ``epoch`` (``preview_every``); nothing by default."""

    # --- the loop ---------------------------------------------------------------------------------------------------

    def state(self, epoch: int) -> TrainingState:
        optimizers = self.named_optimizers()
        return TrainingState(
            epoch=epoch, seconds=self.seconds,
            models={name: unwrap(model).state_dict() for name, model in self.named_models().items()},
            optimizers={name: optimizer.state_dict() for name, (optimizer, _) in optimizers.items()},
            schedulers={name: scheduler.state_dict() for name, (_, scheduler) in optimizers.items()
                        if scheduler is not None},
            history=self.history, **random_states(self.device),
        )

    def restore(self, state: TrainingState, where: Path) -> None:
        for name, model in self.named_models().items():
            if name not in state.models:
                raise ConsinganError(f"damaged training state {where}: no {name}")
            load_module_state(unwrap(model), state.models[name], where)
        load_optimizer_states(self.named_optimizers(), state, where)
        restore_random_states(state, self.device)
        self.start_epoch, self.seconds, self.history = state.epoch, state.seconds, list(state.history)

    def _seed_epoch(self, epoch: int) -> None:
        if self.distributed.active:  # each rank its own noise, dropout and augmentations, reproducible per epoch
            torch.manual_seed(int(self.config.seed) + 1_000_003 * epoch + self.distributed.rank)

    def train(self) -> list[dict]:
        config, distributed, run = self.config, self.distributed, self.run
        models = self.named_models()
        for name in self.trained_models:
            models[name].train()
        if distributed.is_main:
            run.truncate_stats(run.path, self.start_epoch)  # epochs after the state resumed from are trained again
        for epoch in range(self.start_epoch + 1, config.epochs + 1):
            self._seed_epoch(epoch)
            started = time.perf_counter()
            steps = list(self.epoch_losses(epoch))
            for _, scheduler in self.named_optimizers().values():
                if scheduler is not None:
                    scheduler.step()
            losses = distributed.mean({k: float(np.mean([s[k] for s in steps])) for k in steps[0]})
            if not all(math.isfinite(v) for v in losses.values()):
                raise ConsinganError(f"training diverged at epoch {epoch} (losses {losses}); {self.diverged_hint}; "
                                     f"the last finite state is kept in {run.path}")
            seconds = time.perf_counter() - started
            self.seconds += seconds
            self.history.append(losses)
            if distributed.is_main:  # one writer; the others wait so that no rank runs ahead of a checkpoint
                self._write_epoch(epoch, losses, seconds)
            distributed.barrier()
        if distributed.is_main:
            run.save_weights(run.path, RunFolder.WEIGHTS, self.sampling_weights())
        return self.history

    def _write_epoch(self, epoch: int, losses: dict[str, float], seconds: float) -> None:
        config, run = self.config, self.run
        run.save_training_state(run.path, self.state(epoch))
        run.write_losses(run.path, self.history)
        learning_rates = {f"lr_{name}": optimizer.param_groups[0]["lr"]
                          for name, (optimizer, _) in self.named_optimizers().items()}
        run.append_stats(run.path, {"epoch": epoch, "seconds": round(seconds, 4), **losses, **learning_rates})
        if config.checkpoint_every and epoch % config.checkpoint_every == 0 and epoch < config.epochs:
            run.save_snapshot(epoch, self.sampling_weights())
        preview_every = getattr(config, "preview_every", 0)
        if epoch == config.epochs or (preview_every and epoch % preview_every == 0):
            self.write_preview(epoch)
        self.progress(epoch, {**losses, "epoch": epoch, "seconds": seconds})
