"""The ``consingan`` command line: builds a configuration and calls the library; it never trains by itself."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from consingan.config import TrainConfig, option_names
from consingan.errors import ConsinganError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Learn from one 2D image or 3D volume, then generate new, varied ones (ConSinGAN in N-D).",
)
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """consingan: single-image GANs for 2D images and 3D medical volumes."""


def fail(message: str) -> None:
    """Print a one-line error and exit with code 2 (no traceback)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


# --- train: one flag per TrainConfig field, generated so names, help and defaults have one source -------------------


def _flag_names(field: dataclasses.Field) -> list[str]:
    primary = "--" + field.name.lower().replace("_", "-")
    extra = field.metadata.get("flag")
    return [primary] + ([extra] if extra and extra != primary else [])


def _train_parameters() -> list[inspect.Parameter]:
    parameters = [
        inspect.Parameter(
            "config_file", inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[Path], typer.Option(
                "--config", help="YAML or TOML file of options; flags given on the command line win over it.")],
        ),
        inspect.Parameter(
            "resume", inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[Path], typer.Option(
                "--resume", help="Continue RUN_DIR from its last checkpoint; its config.json fixes every option "
                                 "except --device.")],
        ),
        inspect.Parameter(
            "dry_run", inspect.Parameter.KEYWORD_ONLY, default=False,
            annotation=Annotated[bool, typer.Option(
                "--dry-run", help="Check the input, print the configuration and pyramid, write nothing.")],
        ),
    ]
    for name, field in option_names().items():
        kind = {bool: bool, int: int, float: float}.get(type(field.default), str)
        if name == "seed":
            kind = int
        names = _flag_names(field)
        if kind is bool:
            names = [f"{names[0]}/--no-{names[0][2:]}"]
        help_text = f"{field.metadata['help']} [default: {field.default}]"
        annotation = Annotated[Optional[kind], typer.Option(*names, help=help_text, show_default=False)]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return parameters


def _print_config(config: TrainConfig) -> None:
    table = Table(title="configuration", show_header=True, header_style="bold")
    table.add_column("option")
    table.add_column("value")
    defaults = TrainConfig()
    for key, value in config.to_dict().items():
        changed = value != getattr(defaults, key)
        table.add_row(key, f"[bold]{value}[/]" if changed else str(value))
    console.print(table)


def _train(config_file: Path | None = None, resume: Path | None = None, dry_run: bool = False, **flags: Any) -> None:
    from consingan.config import resolve_config

    try:
        if resume is not None:
            _resume(resume, config_file, flags)
            return
        config = resolve_config(config_file, flags)
        from consingan.singan.trainer import prepare, train_prepared, volume_pyramid_shapes
        from consingan.ui import RichReporter, summary_table

        config, volume = prepare(config)
        _print_config(config)
        shapes = volume_pyramid_shapes(volume, config)
        if len(shapes) > 1 and shapes[0] == shapes[-1]:
            console.print(f"[yellow]note:[/] the image's shortest side is min_size ({config.min_size}), so every "
                          f"scale has the same size; lower --min-size for a coarse-to-fine pyramid")
        if dry_run:
            console.print("pyramid: " + "  ".join("x".join(map(str, s)) for s in shapes))
            return
        with RichReporter(console) as reporter:
            result = train_prepared(config, volume, reporter)
        console.print(summary_table(result.scales))
        console.print(f"run folder: [bold]{result.run_dir}[/]")
    except ConsinganError as error:
        fail(str(error))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the scales completed so far are saved in the run folder")
        raise typer.Exit(code=130)


def _resume(run_dir: Path, config_file: Path | None, flags: dict[str, Any]) -> None:
    from consingan.singan.trainer import resume
    from consingan.ui import RichReporter, summary_table

    given = sorted(name for name, value in flags.items() if value is not None and name != "device")
    if config_file is not None or given:
        names = ", ".join(["--config"] * (config_file is not None) + [_flag_names(option_names()[n])[0] for n in given])
        raise ConsinganError(f"--resume takes every option from {run_dir}/config.json; drop {names}")
    with RichReporter(console) as reporter:
        result = resume(run_dir, reporter, device=flags.get("device"))
    console.print(summary_table(result.scales))
    console.print(f"run folder: [bold]{result.run_dir}[/]")


_train.__signature__ = inspect.Signature(_train_parameters())  # type: ignore[attr-defined]
_train.__annotations__ = {p.name: p.annotation for p in _train_parameters()}
app.command(
    "train",
    help="Train a ConSinGAN pyramid on one image (--dim 2) or volume (--dim 3); writes a new run folder under out/.",
)(_train)


def _numbers(text: str | None, kind: type, name: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise ConsinganError(f"{name} must be comma-separated numbers, got {text!r}") from None


@app.command("sample")
def sample(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by consingan train.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the samples (created; nothing is overwritten).")],
    num: Annotated[int, typer.Option("--num", help="Number of samples.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed; the same seed gives the same files.")] = 0,
    scale: Annotated[Optional[str], typer.Option(
        "--scale", help="Retarget by per-axis factors, e.g. 1.5,1 (2D) or 1,1,2 (3D); one number scales all axes.")] = None,
    shape: Annotated[Optional[str], typer.Option("--shape", help="Retarget to this output shape, e.g. 64,96.")] = None,
    start_scale: Annotated[int, typer.Option(
        "--start-scale", help="Keep scales below this on the training image's layout; vary from here up.")] = 0,
    inject: Annotated[Optional[Path], typer.Option(
        "--inject", help="Image whose layout is kept (editing, harmonisation); same channels as the training image.")
    ] = None,
    use_scale: Annotated[Optional[int], typer.Option(
        "--use-scale", help="Generate with the pyramid up to this scale (default: the last completed).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples generated at once.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "cpu",
    source_dtype: Annotated[bool, typer.Option(
        "--source-dtype", help="Write the source's data type (rounded and clipped) instead of float32.")] = False,
) -> None:
    """Draw new images from a trained pyramid, in the input's file type and geometry, plus a PNG contact sheet."""
    try:
        from consingan.io import read_volume
        from consingan.singan.sampler import TrainedPyramid, write_samples

        pyramid = TrainedPyramid.load(run_dir, device=device, scale=use_scale)
        injected = read_volume(inject, pyramid.spatial_dims).array if inject is not None else None
        written = write_samples(
            pyramid, out, num, seed=seed, source_dtype=source_dtype, batch_size=batch_size,
            scale_factors=_numbers(scale, float, "--scale"), shape=_numbers(shape, int, "--shape"),
            start_scale=start_scale, inject=injected,
        )
        console.print(f"wrote {len(written)} samples and contact_sheet.png to [bold]{out}[/]")
    except ConsinganError as error:
        fail(str(error))


@app.command("evaluate")
def evaluate_command(
    run_dir: Annotated[Optional[Path], typer.Argument(help="Run folder written by consingan train.")] = None,
    num: Annotated[int, typer.Option("--num", help="Samples drawn for the measures.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of samples, patches and projections.")] = 0,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder for evaluation.json and report.png (default: RUN_DIR/evaluation_NNN).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "cpu",
    inception_weights: Annotated[Optional[Path], typer.Option(
        "--inception-weights", help="Local Inception-v3 weights (pytorch-fid state dict) for the standard 2D SIFID.")
    ] = None,
    samples: Annotated[Optional[Path], typer.Option(
        "--samples", help="Instead of a run: a folder of samples from any program, judged against --image.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="The training image, with --samples.")] = None,
    dim: Annotated[int, typer.Option("--dim", help="2 or 3, with --samples.")] = 2,
) -> None:
    """Judge a trained pyramid (or, with --samples and --image, any folder of samples) offline: SWD, random-feature
    Frechet distance, diversity, intensity histograms, memorisation and coverage, a verdict (ok, low diversity,
    collapse, copying), reconstruction PSNR/SSIM."""
    try:
        from consingan.metrics.evaluate import EvaluateConfig, evaluate, evaluate_samples, summary_rows, write_report

        if (run_dir is None) == (samples is None):
            raise ConsinganError("give either a run folder or --samples DIR with --image IMAGE")
        if samples is not None and image is None:
            raise ConsinganError("--samples needs --image (the training image)")
        if run_dir is None:
            if out is None:
                raise ConsinganError("--samples needs --out (a new folder for the report)")
        elif out is None:
            out = next(run_dir / f"evaluation_{n:03d}" for n in range(1, 1000)
                       if not (run_dir / f"evaluation_{n:03d}").exists())
        elif out.exists():
            raise ConsinganError(f"{out} already exists; choose another --out")
        options = EvaluateConfig(num=num, seed=seed, device=device,
                                 inception_weights=str(inception_weights) if inception_weights else "")
        if samples is not None:
            result = evaluate_samples(image, samples, dim, options)
            title = f"evaluation of {samples} against {image.name} ({len(result['_arrays']['fake'])} samples)"
        else:
            result = evaluate(run_dir, options)
            title = f"evaluation of {run_dir} (scale {result['scale']}, {num} samples)"
        json_path, png_path = write_report(result, out)
        table = Table(title=title, header_style="bold")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for name, value in summary_rows(result):
            table.add_row(name, value)
        console.print(table)
        console.print(f"wrote {json_path} and {png_path}")
    except ConsinganError as error:
        fail(str(error))


paired_app = typer.Typer(help="Paired image-to-image GANs: mask -> image, phase contrast -> fluorescence (2D, 3D).",
                         no_args_is_help=True)
app.add_typer(paired_app, name="paired")


@paired_app.command("train")
def paired_train(
    source: Annotated[Optional[Path], typer.Option("--source", help="Folder of inputs (masks, phase contrast).")] = None,
    target: Annotated[Optional[Path], typer.Option("--target", help="Folder of targets, matched by file name.")] = None,
    model: Annotated[str, typer.Option(
        "--model", help="unet, cbam_unet, spade_unet, resnet, local_enhancer or unetpp.")] = "unet",
    dim: Annotated[int, typer.Option("--dim", help="2 or 3.")] = 2,
    epochs: Annotated[int, typer.Option("--epochs")] = 200,
    out: Annotated[Path, typer.Option("--out", help="Root of the run folders.")] = Path("out"),
    tile: Annotated[int, typer.Option("--tile", help="Tile size (the report: 512).")] = 256,
    stride: Annotated[int, typer.Option("--stride", help="Tile stride (-1: tile / 2).")] = -1,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 1,
    lr: Annotated[float, typer.Option("--lr")] = 2e-4,
    lambda_l1: Annotated[float, typer.Option("--lambda-l1")] = 100.0,
    gan_mode: Annotated[str, typer.Option("--gan-mode", help="lsgan, bce, hinge or wgan.")] = "lsgan",
    discriminator: Annotated[str, typer.Option("--discriminator", help="patch or multiscale.")] = "patch",
    base_channels: Annotated[int, typer.Option("--base-channels")] = 64,
    one_hot: Annotated[bool, typer.Option("--one-hot", help="Masks as one-hot class channels.")] = False,
    perceptual_weights: Annotated[Optional[Path], typer.Option(
        "--perceptual-weights", help="Local VGG-19 state dict for a perceptual loss (off without it).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this paired run folder.")] = None,
) -> None:
    """Train a paired generator on SOURCE/TARGET pairs matched by file name, tile by tile."""
    try:
        from consingan.paired.trainer import PairedConfig, resume_paired, train_paired

        def progress(epoch: int, losses: dict) -> None:
            console.print(f"epoch {epoch}: D {losses['d']:.4f} G {losses['g_gan']:.4f} L1 {losses['l1']:.4f} "
                          f"({losses['seconds']:.1f} s)", highlight=False)

        if resume is not None:
            result = resume_paired(resume, progress)
        else:
            if source is None or target is None:
                raise ConsinganError("--source and --target are required")
            config = PairedConfig(
                source_dir=str(source), target_dir=str(target), model=model, dimension=dim, epochs=epochs,
                out_dir=str(out), tile=tile, stride=stride, batch_size=batch_size, lr=lr, lambda_l1=lambda_l1,
                gan_mode=gan_mode, discriminator=discriminator, base_channels=base_channels, one_hot=one_hot,
                seed=seed, device=device, perceptual_weights=str(perceptual_weights) if perceptual_weights else "",
            )
            result = train_paired(config, progress)
        console.print(f"run folder: [bold]{result.run_dir}[/]")
    except ConsinganError as error:
        fail(str(error))


@paired_app.command("predict")
def paired_predict(
    run_dir: Annotated[Path, typer.Argument(help="Paired run folder.")],
    source: Annotated[Path, typer.Option("--source", help="Folder of inputs of any size.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (nothing is overwritten).")],
    device: Annotated[str, typer.Option("--device")] = "cpu",
) -> None:
    """Translate whole images or volumes through overlapping tiles; outputs keep the source geometry."""
    try:
        from consingan.paired.trainer import predict_paired

        written = predict_paired(run_dir, source, out, device)
        console.print(f"wrote {len(written)} images to [bold]{out}[/]")
    except ConsinganError as error:
        fail(str(error))


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except ConsinganError as error:  # pragma: no cover - commands catch their own; this is the last guard
        console.print(f"[bold red]error:[/] {error}")
        sys.exit(2)


if __name__ == "__main__":
    run()
