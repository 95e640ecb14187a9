"""Data-parallel training under ``torchrun``: the process group comes from torchrun's environment; no launcher or
scheduler of our own.

    torchrun --nproc_per_node 2 $(which consingan) paired train --source masks/ --target images/ ...

One process per GPU (NCCL), or per CPU process (gloo) when there is no GPU. Every process builds the same models from
the same seed (``--seed``, or one rank 0 draws and sends to the others) (DDP also broadcasts rank 0's weights when wrapping), sees its own shard of each epoch's draw, and the
gradients are averaged across processes, so the global batch is the per-process ``--batch-size`` x the world size.
Rank 0 alone writes the run folder, checkpoints, logs and previews; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from consingan.config import with_seed
from consingan.errors import ConsinganError
from consingan.runs import RunFolder, RunInfo

ConfigT = TypeVar("ConfigT")


@dataclass
class Distributed:
    """This process's place in a torchrun job (a world of one outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: int = 0  # the PID of the torchrun process that started this one (0: not checked)

    @classmethod
    def from_environment(cls) -> "Distributed":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a world of one when they are absent."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as error:
            raise ConsinganError(f"torchrun's environment is not readable: {error}") from None
        return cls(rank, world, local, os.getppid()) if world > 1 else cls()

    def shared_seed(self, config: ConfigT, device: torch.device) -> ConfigT:
        """``config`` with a seed every rank shares: the one given, or one rank 0 draws and sends to the others
        (joining the process group for it), so that every process draws the same data order and initial weights
        and config.json records the seed that was used."""
        if config.seed is not None:
            return config
        config = with_seed(config)
        if self.active:
            self.start(device)
            config = dataclasses.replace(config, seed=self.broadcast(config.seed))
        return config

    def refuse(self, command: str, instead: str = "") -> None:
        """Refuse, on every rank, a command that does not train data-parallel: under torchrun each process would run
        it on its own (N runs in N run folders)."""
        if self.active:
            raise ConsinganError(f"{command} does not train distributed: under torchrun (WORLD_SIZE="
                                 f"{self.world_size}) each process would train a copy of its own into a run folder "
                                 f"of its own; run it without torchrun{instead}")

    def check_resume(self, run: RunFolder) -> None:
        """A run resumes with the world size it was trained with: the global batch (--batch-size x processes), and
        so what the learning rates mean, would change silently otherwise. Call before joining the process group."""
        trained = run.info.world_size
        if trained != self.world_size:
            def processes(n: int) -> str:
                return f"under torchrun with {n} processes" if n > 1 else "without torchrun (1 process)"

            batch = run.config.batch_size * getattr(run.config, "accumulate", 1)  # per process and optimiser step
            raise ConsinganError(f"{run.path} was trained with world size {trained} and this resume has world size "
                                 f"{self.world_size}, which would change the global batch from {batch * trained} "
                                 f"to {batch * self.world_size}; resume it {processes(trained)}")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> torch.device:
        """Join the process group (NCCL on CUDA, gloo on the CPU); returns this process's device."""
        if not self.active:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP-wrap a trained model. Batch norm becomes SyncBatchNorm on GPUs (PyTorch has no CPU version: on gloo
        each process normalises by its own batch). Buffers are not re-sent at every forward, which with a
        discriminator run on real and fake before one backward modifies, in place, buffers autograd still needs
        (pix2pix's DDP error); they are sent once when wrapping, which changes nothing since every rank builds or
        loads the same ones."""
        if not self.active:
            return model
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **_NO_FORWARD_BUFFER_SYNC)

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (a run folder's path, say)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share of an epoch's draw (the same draw on every rank): every world_size-th index, the list
        first padded by repetition to a multiple of the world size so every rank makes the same number of steps."""
        if not self.active:
            return indices
        padded = indices + indices[: (-len(indices)) % self.world_size]
        return padded[self.rank::self.world_size]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Per-epoch losses averaged over the ranks (each rank saw its own share of the data).

        The same reduction counts the ranks whose torchrun launcher still runs: once it has been killed (kill -9
        leaves its ranks running, reparented), every rank stops at the same epoch, rank 0 releasing the run's lock,
        instead of training on beside a new ``--resume``."""
        if not self.active or not values:
            return values
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        alive = float(not self.launcher or os.getppid() == self.launcher)
        tensor = torch.tensor([*values.values(), alive], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        if tensor[-1].item() < self.world_size:
            raise ConsinganError("the torchrun launcher of this training has ended (killed?); every rank stops: "
                                 "the last finished epoch is saved, --resume the run to continue")
        return dict(zip(values, (tensor[:-1] / self.world_size).tolist()))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # How long a rank that finished waits for the others before it leaves the group anyway.
    FINISH_TIMEOUT = datetime.timedelta(seconds=120)

    def finish(self, completed: bool = False) -> None:
        """Leave the process group. After a run that ``completed`` on this rank, first meet the other ranks: a rank
        that tore its gloo connections down while a peer was still in its last collective made that peer abort
        ("terminate called without an active exception"). After a failure nobody is waited for."""
        if not (self.active and dist.is_initialized()):
            return
        if completed:
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=self.FINISH_TIMEOUT)
                else:
                    dist.barrier()
            except RuntimeError:  # a peer failed or left: its own error is the one to report
                pass
        dist.destroy_process_group()


# PyTorch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers and warns (FutureWarning) on the old name.
_DDP_PARAMETERS = inspect.signature(nn.parallel.DistributedDataParallel).parameters
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_PARAMETERS
                           else {"broadcast_buffers": False})


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (for state dicts: the same keys with or without DDP)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shared_run(distributed: Distributed, config: object, family: str, info: RunInfo) -> RunFolder:
    """A new run folder: rank 0 creates it and writes run.json (with the world size, which a resume must keep), then
    every rank opens the same folder."""
    run = RunFolder.create(config, family) if distributed.is_main else None
    if run is not None:
        try:
            run.write_info(dataclasses.replace(info, world_size=distributed.world_size))
        except BaseException:
            run.release()
            raise
    return RunFolder.open(distributed.broadcast(run.path if run else None), family)


def train_to_end(trainer: object, distributed: Distributed, resume_from: RunFolder | None = None,
                 models: tuple[str, ...] = ()) -> list[dict]:
    """Run ``trainer.train()`` (after restoring ``resume_from``'s latest training state on every rank, when given)
    and leave the process group however it ends. Rank 0, the one writer, holds the run's lock meanwhile: a run
    another process trains is refused before anything is written."""
    completed = False
    try:
        with trainer.run.writing() if distributed.is_main else contextlib.nullcontext():
            if resume_from is not None:
                state_path = resume_from.latest_training_state()
                if state_path is not None:
                    trainer.restore(resume_from.load_training_state(state_path, models, trainer.device), state_path)
            summaries = trainer.train()
        completed = True
        return summaries
    finally:
        distributed.finish(completed)
