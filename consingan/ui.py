"""Rich progress and summary for training in a terminal."""

from __future__ import annotations

import time
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from consingan.singan.trainer import ScaleSummary

LOG_SECONDS = 30.0  # without a terminal (a log file), a plain progress line at most this often

def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


class RichReporter:
    """One progress bar per scale: epoch, epochs per second, time left and the latest losses.

    Without a terminal (a log file, a pipe), where the bars show only at the end, a plain line instead: the first
    epoch of each scale, then every ``LOG_SECONDS``, and the scale's last epoch."""

    def __init__(self, console: Console, refresh_every: int = 1) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            console=console,
            transient=False,
        )
        self.refresh_every = refresh_every
        self.task = None
        self.epochs, self.started, self.logged = 0, 0.0, None

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def start_scale(self, stage: int, shape: Sequence[int], epochs: int) -> None:
        self.task = self.progress.add_task(f"scale {stage} {_shape(shape)}", total=epochs, losses="", speed="")
        self.epochs, self.started, self.logged = epochs, time.monotonic(), None

    def update(self, stage: int, epoch: int, losses: dict[str, float]) -> None:
        text = (f"D {losses['critic']:+.3f} GP {losses['gradient_penalty']:.3f} "
                f"G {losses['adversarial']:+.3f} rec {losses['reconstruction']:.4f}")
        task = self.progress.tasks[-1]
        speed = f"{task.speed:.2f} ep/s" if task.speed else ""
        self.progress.update(self.task, completed=epoch, losses=text, speed=speed)
        now = time.monotonic()
        if not self.progress.console.is_terminal and (self.logged is None or epoch == self.epochs
                                                      or now - self.logged >= LOG_SECONDS):
            self.logged = now
            self.progress.console.print(f"scale {stage} epoch {epoch}/{self.epochs}: {text} "
                                        f"({now - self.started:.1f} s)", highlight=False)

    def end_scale(self, summary: ScaleSummary) -> None:
        self.progress.update(self.task, completed=summary.epochs)

    def warn(self, stage: int, message: str) -> None:
        self.progress.console.print(f"[yellow]warning[/] (scale {stage}): {message}")


class count_progress:
    """``progress(done, total)`` for long writes (thousands of samples): a plain line at most every
    ``LOG_SECONDS`` and, once any was printed, at the end, so a long draw shows it is alive and how far it is."""

    def __init__(self, console: Console, what: str = "samples", prefix: str = "") -> None:
        self.console, self.what, self.prefix = console, what, prefix
        self.started = self.last = time.monotonic()
        self.printed = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= LOG_SECONDS or (done >= total and self.printed):
            self.last, self.printed = now, True
            self.console.print(f"{self.prefix}wrote {done} of {total} {self.what} ({now - self.started:.0f} s)",
                               highlight=False)


def summary_table(scales: Sequence[ScaleSummary]) -> Table:
    table = Table(title="training summary", header_style="bold")
    for column in ("scale", "shape", "epochs", "seconds", "s/epoch", "noise amp", "critic", "adversarial", "rec",
                   "final lr"):
        table.add_column(column, justify="right")
    for s in scales:
        table.add_row(
            str(s.stage), _shape(s.shape), str(s.epochs), f"{s.seconds:.1f}", f"{s.seconds / s.epochs:.3f}",
            f"{s.noise_amp:.4f}", f"{s.losses['critic']:+.4f}", f"{s.losses['adversarial']:+.4f}",
            f"{s.losses['reconstruction']:.5f}", f"{s.lr_end:.2e}",
        )
    total = sum(s.seconds for s in scales)
    table.caption = f"total {total / 60:.1f} min"
    return table


class epoch_progress:
    """A rich progress bar over epochs for the dataset families; the object is the trainers' ``progress(epoch,
    losses)`` callback (losses shown by name)."""

    def __init__(self, console: Console, total: int | None = None) -> None:
        self.progress = Progress(TextColumn("[bold]epochs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[losses]}"), console=console)
        self.task = self.progress.add_task("epochs", total=total, losses="")

    def __enter__(self) -> "epoch_progress":
        return self  # the bar appears with the first finished epoch, after every check has passed

    def __exit__(self, *exc_info: object) -> None:
        if self.progress.live.is_started:  # stopping a bar never shown would print an empty line
            self.progress.stop()

    def __call__(self, epoch: int, losses: dict[str, float]) -> None:
        if not self.progress.live.is_started:
            self.progress.start()
        text = " ".join(f"{name} {value:.4f}" for name, value in losses.items() if name not in ("epoch", "seconds"))
        self.progress.update(self.task, completed=epoch, losses=text)
        if not self.progress.console.is_terminal:  # a log: one line per epoch instead of a redrawn bar
            self.progress.console.print(f"epoch {epoch}: {text} ({losses.get('seconds', 0):.1f} s)", highlight=False)
