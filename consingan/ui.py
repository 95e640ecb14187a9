"""Rich progress and summary for training in a terminal."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from consingan.singan.trainer import ScaleSummary


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


class RichReporter:
    """One progress bar per scale: epoch, epochs per second, time left and the latest losses."""

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

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def start_scale(self, stage: int, shape: Sequence[int], epochs: int) -> None:
        self.task = self.progress.add_task(f"scale {stage} {_shape(shape)}", total=epochs, losses="", speed="")

    def update(self, stage: int, epoch: int, losses: dict[str, float]) -> None:
        text = (f"D {losses['critic']:+.3f} GP {losses['gradient_penalty']:.3f} "
                f"G {losses['adversarial']:+.3f} rec {losses['reconstruction']:.4f}")
        task = self.progress.tasks[-1]
        speed = f"{task.speed:.2f} ep/s" if task.speed else ""
        self.progress.update(self.task, completed=epoch, losses=text, speed=speed)

    def end_scale(self, summary: ScaleSummary) -> None:
        self.progress.update(self.task, completed=summary.epochs)

    def warn(self, stage: int, message: str) -> None:
        self.progress.console.print(f"[yellow]warning[/] (scale {stage}): {message}")


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
        self.progress.stop()

    def __call__(self, epoch: int, losses: dict[str, float]) -> None:
        if not self.progress.live.is_started:
            self.progress.start()
        text = " ".join(f"{name} {value:.4f}" for name, value in losses.items() if name not in ("epoch", "seconds"))
        self.progress.update(self.task, completed=epoch, losses=text)
        if not self.progress.console.is_terminal:  # a log: one line per epoch instead of a redrawn bar
            self.progress.console.print(f"epoch {epoch}: {text} ({losses.get('seconds', 0):.1f} s)", highlight=False)
