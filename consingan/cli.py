"""The ``consingan`` command line: builds a configuration and calls the library; it never trains by itself."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consingan.config import TrainConfig, flag_name, option_names
from consingan.errors import ConsinganError

try:  # newer typer carries its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - typer before its own copy
    from click import exceptions as click_exceptions

class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a flag of the wrong type, an unknown option) in one line and exit 2, as every other error is
    reported, instead of click's usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except getattr(click_exceptions, "NoArgsIsHelpError", ()) as error:  # a bare command: its help (click 8.2+)
            error.show()
            sys.exit(error.exit_code)
        except click_exceptions.ClickException as error:
            console.print(f"[bold red]error:[/] {escape(error.format_message())}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code)
        except getattr(click_exceptions, "Abort", typer.Abort):  # newer typer keeps Abort outside its click copy
            console.print("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    help="Learn from one 2D image or 3D volume, then generate new, varied ones (ConSinGAN in N-D).",
)
console = Console(stderr=True)
if not console.is_terminal:  # a log file or a pipe: rich would cut tables to 80 columns
    console.width = 200
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N."


def _print_version(asked: bool) -> None:
    if asked:
        from consingan import __version__

        print(f"consingan {__version__} (torch {torch_version()})")
        raise typer.Exit()


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version of consingan and of torch, and exit.")] = False,
) -> None:
    """consingan: single-image GANs for 2D images and 3D medical volumes."""


def fail(message: str) -> None:
    """Print a one-line error and exit with code 2 (no traceback)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


# --- train: one flag per TrainConfig field, generated so names, help and defaults have one source -------------------


ALIAS_MARK = "__alias"  # parameters named <field>__alias<i> are hidden spellings of <field>'s flag


def _flag_names(field: dataclasses.Field) -> list[str]:
    """The flag a help shows first (the ``flag`` metadata when set, e.g. ``--dim`` for ``dimension``), then the hidden
    spellings that still work: the field's own name and older names (``--beta1``, ``--base-channels``)."""
    shown = field.metadata.get("flag") or flag_name(field.name)
    names = [shown, flag_name(field.name)] + [flag_name(alias) for alias in field.metadata.get("aliases", ())]
    return list(dict.fromkeys(names))


def _command_parameters(config_class: type, dry_run: bool) -> list[inspect.Parameter]:
    """--config, --resume (and --dry-run), then one flag per field of ``config_class``, so names, help and defaults
    have one source: the dataclass."""
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
    ]
    if dry_run:
        parameters.append(inspect.Parameter(
            "dry_run", inspect.Parameter.KEYWORD_ONLY, default=False,
            annotation=Annotated[bool, typer.Option(
                "--dry-run", help="Check the input, print the configuration and pyramid, write nothing.")],
        ))
    for name, field in option_names(config_class).items():
        kind = {bool: bool, int: int, float: float}.get(type(field.default), str)
        if name == "seed":
            kind = int
        shown, *hidden = _flag_names(field)
        if kind is bool:
            shown, hidden = f"{shown}/--no-{shown[2:]}", []
        # Escaped: rich would read "[default: 2000]" as a markup tag and drop it from the help.
        help_text = f"{field.metadata['help']} {escape(f'[default: {field.default}]')}"
        annotation = Annotated[Optional[kind], typer.Option(shown, help=help_text, show_default=False)]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
        parameters += [inspect.Parameter(f"{name}{ALIAS_MARK}{i}", inspect.Parameter.KEYWORD_ONLY, default=None,
                                         annotation=Annotated[Optional[kind], typer.Option(alias, hidden=True)])
                       for i, alias in enumerate(hidden)]
    return parameters


def _register(command: Any, parameters: list[inspect.Parameter]) -> Any:
    """``command`` with ``parameters`` as its options; a hidden spelling's value is handed on under its field's
    name (both spellings at once is a usage error)."""
    def with_aliases(**values: Any) -> Any:
        for key in [k for k in values if ALIAS_MARK in k]:
            value, name = values.pop(key), key.split(ALIAS_MARK)[0]
            if value is not None:
                if values.get(name) is not None:
                    raise click_exceptions.UsageError(f"--{name.replace('_', '-')} is given twice, under two "
                                                      f"spellings; give it once")
                values[name] = value
        return command(**values)

    with_aliases.__name__, with_aliases.__doc__ = command.__name__, command.__doc__
    with_aliases.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    with_aliases.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_aliases


def _refuse_ignored_flags(config_class: type, run_dir: Path, config_file: Path | None, flags: dict[str, Any]) -> None:
    """--resume takes every option from the run; a flag it would ignore (all but --device) is an error, not a
    silent no-op."""
    given = sorted(name for name, value in flags.items() if value is not None and name != "device")
    if config_file is not None or given:
        fields = option_names(config_class)
        names = ", ".join(["--config"] * (config_file is not None) + [_flag_names(fields[n])[0] for n in given])
        raise ConsinganError(f"--resume takes every option from {run_dir}/config.json; drop {names}")


def _print_config(config: Any) -> None:
    table = Table(title="configuration", show_header=True, header_style="bold")
    table.add_column("option")
    table.add_column("value")
    defaults = type(config)()
    for key, value in config.to_dict().items():
        changed = value != getattr(defaults, key)
        table.add_row(key, f"[bold]{value}[/]" if changed else str(value))
    console.print(table)


def _warn_ignored(config: Any) -> None:
    """One warning for each option of a new run that its mode ignores (``config.ignored_options``)."""
    from consingan.config import ignored_options

    for line in ignored_options(config):
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def _train(config_file: Path | None = None, resume: Path | None = None, dry_run: bool = False, **flags: Any) -> None:
    from consingan.config import resolve_config
    from consingan.distributed import Distributed

    try:
        # Before anything else, on every rank: N processes would be N independent runs in N run folders.
        Distributed.from_environment().refuse("consingan train (the single-image engine)",
                                              "; for many images, use consingan train-many")
        if resume is not None:
            _resume(resume, config_file, flags, dry_run)
            return
        config = resolve_config(config_file, flags)
        from consingan.singan.trainer import memory_plan, prepare, train_prepared, volume_pyramid_shapes
        from consingan.ui import RichReporter, summary_table

        asked_auto = config.patch_size == "auto"
        config, volume = prepare(config)
        _print_config(config)
        _warn_ignored(config)
        from consingan.singan.trainer import pyramid_notes

        for note in [*volume.notes, *pyramid_notes(config, volume)]:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        console.print(memory_plan(config, volume).describe(chosen=asked_auto), highlight=False)
        if dry_run:
            console.print(_pyramid_line(config, volume_pyramid_shapes(volume, config)), highlight=False)
            return
        with RichReporter(console) as reporter:
            result = train_prepared(config, volume, reporter)
        console.print(summary_table(result.scales))
        console.print(f"run folder: [bold]{result.run_dir}[/]")
    except ConsinganError as error:
        fail(str(error))
    except OSError as error:  # a write that failed outside the checkpoint writer (an image file, a preview)
        fail(f"cannot write: {error.strerror or error}")
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the scales completed so far are saved in the run folder")
        raise typer.Exit(code=130)


def _pyramid_line(config: TrainConfig, shapes: list) -> str:
    """The scales' sizes, coarsest first, each with its epochs when ``scale_epochs`` gives them."""
    sizes = ["x".join(map(str, shape)) for shape in shapes]
    if config.scale_epochs:
        sizes = [f"{size} ({config.epochs_of(k)} epochs)" for k, size in enumerate(sizes)]
    return "pyramid: " + "  ".join(sizes)


def _resume(run_dir: Path, config_file: Path | None, flags: dict[str, Any], dry_run: bool = False) -> None:
    from consingan.singan.trainer import memory_plan, resume, resume_plan, volume_pyramid_shapes
    from consingan.ui import RichReporter, summary_table

    _refuse_ignored_flags(TrainConfig, run_dir, config_file, flags)
    if dry_run:  # what resuming would do, read from the run folder; no lock taken, nothing copied or written
        config, volume, where = resume_plan(run_dir, device=flags.get("device"))
        _print_config(config)
        console.print(memory_plan(config, volume).describe(), highlight=False)
        console.print(_pyramid_line(config, volume_pyramid_shapes(volume, config)), highlight=False)
        console.print(f"resume: {where}", highlight=False)
        return
    with RichReporter(console) as reporter:
        result = resume(run_dir, reporter, device=flags.get("device"))
    console.print(summary_table(result.scales))
    console.print(f"run folder: [bold]{result.run_dir}[/]")


app.command(
    "train",
    help="Train a ConSinGAN pyramid on one image (--dim 2) or volume (--dim 3); writes a new run folder under out/.",
)(_register(_train, _command_parameters(TrainConfig, dry_run=True)))


def _numbers(text: str | None, kind: type, name: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise ConsinganError(f"{name} must be comma-separated numbers, got {text!r}") from None


def _count(text: str, name: str = "--num") -> int:
    """A count option read here rather than by click, so that '1e11' or '2.5' gets one line, not a usage box."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ConsinganError(f"{name} must be a whole number, got {text!r}") from None
    if value < 1:
        raise ConsinganError(f"{name} must be at least 1, got {value}")
    return value


NUM_METAVAR = "N"
OUT_HELP = " (a new folder, or an empty one; nothing is overwritten)."  # outputs.OUT_RULE, every --out
TILE_HELP = ("Generate in tiles of this many voxels a side, each exact (a sample is the same tiled or not): auto "
             "(only a volume that would not fit half the free memory), off, or a number.")


# The sampling options ``sample`` and ``sample-many`` share: one definition, one help text.
SeedOption = Annotated[int, typer.Option("--seed", help="Seed; the same seed gives the same files.")]
ScaleOption = Annotated[Optional[str], typer.Option(
    "--scale", help="Retarget by per-axis factors, e.g. 1.5,1 (2D) or 1,1,2 (3D); one number scales all axes.")]
ShapeOption = Annotated[Optional[str], typer.Option("--shape", help="Retarget to this output shape, e.g. 64,96.")]
StartScaleOption = Annotated[int, typer.Option(
    "--start-scale", help="Keep scales below this on the training image's layout; vary from here up.")]
UseScaleOption = Annotated[Optional[int], typer.Option(
    "--use-scale", help="Generate with the pyramid up to this scale (default: the last completed).")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", help="Samples generated at once.")]
SourceDtypeOption = Annotated[bool, typer.Option(
    "--source-dtype", help="Write the source's data type (rounded and clipped) instead of float32.")]
TileOption = Annotated[str, typer.Option("--tile", help=TILE_HELP)]


def _sampling_options(seed: int, scale: str | None, shape: str | None, start_scale: int, batch_size: int,
                      source_dtype: bool, tile: str) -> dict[str, Any]:
    """The keyword arguments of ``write_samples`` from the shared sampling flags, checked."""
    from consingan.config import check_seed
    from consingan.singan.sampler import parse_tile

    check_seed(seed)
    factors, sides = _numbers(scale, float, "--scale"), _numbers(shape, int, "--shape")
    # What no run could use is refused before any run is opened (the run's own checks need its dimensions).
    if factors is not None and not all(math.isfinite(f) and f > 0 for f in factors):
        raise ConsinganError(f"--scale factors must be positive, finite numbers, got {scale}")
    if sides is not None and not all(side > 0 for side in sides):
        raise ConsinganError(f"--shape sides must be positive, got {shape}")
    if batch_size < 1 or start_scale < 0:
        raise ConsinganError("--batch-size must be at least 1 and --start-scale zero or positive")
    return dict(seed=seed, source_dtype=source_dtype, batch_size=batch_size, scale_factors=factors, shape=sides,
                start_scale=start_scale, tile=parse_tile(tile))


@app.command("sample")
def sample(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by consingan train.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the samples" + OUT_HELP)],
    num: Annotated[str, typer.Option("--num", metavar=NUM_METAVAR, help="Samples written, in all.")] = "16",
    seed: SeedOption = 0,
    scale: ScaleOption = None,
    shape: ShapeOption = None,
    start_scale: StartScaleOption = 0,
    inject: Annotated[Optional[Path], typer.Option(
        "--inject", help="Image whose layout is kept (editing, harmonisation); same channels as the training image.")
    ] = None,
    use_scale: UseScaleOption = None,
    batch_size: BatchSizeOption = 8,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    source_dtype: SourceDtypeOption = False,
    tile: TileOption = "auto",
    output_format: Annotated[str, typer.Option(
        "--format", help="native (sample_0000 ... in the input's file type) or nnunet (an nnU-Net v2 raw dataset: "
                         "imagesTr, labelsTr, dataset.json; a run trained with --label).")] = "native",
    channel_names: Annotated[Optional[str], typer.Option(
        "--channel-names", help="With --format nnunet: dataset.json's channel names, comma-separated (nnU-Net "
                                "normalises a channel named CT as CT; default: image, or one name per channel).")] = None,
    label_names: Annotated[Optional[str], typer.Option(
        "--label-names", help="With --format nnunet: names of the foreground classes in increasing label value, "
                              "comma-separated (default: label_<value>).")] = None,
) -> None:
    """Draw new images from a trained pyramid, in the input's file type and geometry, plus a PNG contact sheet; or,
    with --format nnunet, an nnU-Net v2 training set of images and label maps."""
    try:
        from consingan.io import read_volume
        from consingan.io.export import parse_format, parse_names, write_nnunet_dataset
        from consingan.singan.sampler import TrainedPyramid, write_samples
        from consingan.ui import count_progress

        num = _count(num)
        options = _sampling_options(seed, scale, shape, start_scale, batch_size, source_dtype, tile)
        output_format = parse_format(output_format)
        names = dict(channel_names=parse_names(channel_names, "--channel-names"),
                     label_names=parse_names(label_names, "--label-names"))
        if output_format == "native" and (channel_names is not None or label_names is not None):
            raise ConsinganError("--channel-names and --label-names apply to --format nnunet only")
        pyramid = TrainedPyramid.load(run_dir, device=device, scale=use_scale)
        for note in pyramid.notes:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
        injected = read_volume(inject, pyramid.spatial_dims).array if inject is not None else None
        options.update(progress=count_progress(console), inject=injected)
        if output_format == "nnunet":
            write_nnunet_dataset(pyramid, out, num, **names, **options)
            console.print(f"wrote an nnU-Net dataset of {num} cases (imagesTr, labelsTr, dataset.json) to "
                          f"[bold]{escape(str(out))}[/]")
            return
        write_samples(pyramid, out, num, **options)
        labels = " with their label maps" if pyramid.labels else ""
        console.print(f"wrote {num} samples{labels} and contact_sheet.png to [bold]{out}[/]")
    except ConsinganError as error:
        fail(str(error))


@app.command("evaluate")
def evaluate_command(
    run_dir: Annotated[Optional[Path], typer.Argument(help="Run folder written by consingan train.")] = None,
    num: Annotated[str, typer.Option("--num", metavar=NUM_METAVAR, help="Samples drawn for the measures, in all.")] = "16",
    seed: Annotated[int, typer.Option("--seed", help="Seed of samples, patches and projections.")] = 0,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder for evaluation.json and report.png, a new or empty one (default: "
                         "RUN_DIR/evaluation_NNN).")] = None,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    inception_weights: Annotated[Optional[Path], typer.Option(
        "--inception-weights", help="Local Inception-v3 weights (torchvision's, as SinGAN's SIFID used, or pytorch-fid's) for SinGAN's 2D "
                                      "SIFID.")
    ] = None,
    samples: Annotated[Optional[Path], typer.Option(
        "--samples", help="Instead of a run: a folder of samples from any program, judged against --image.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="The training image, with --samples.")] = None,
    dim: Annotated[int, typer.Option("--dim", help="2 or 3, with --samples (3 by default, as for every "
                                                   "command).")] = 3,
    tile: Annotated[str, typer.Option("--tile", help=TILE_HELP)] = "auto",
) -> None:
    """Judge a trained pyramid (or, with --samples and --image, any folder of samples) offline: SWD, random-feature
    Frechet distance, diversity, intensity histograms, memorisation and coverage, a verdict (ok, low diversity,
    collapse, copying, failed), reconstruction PSNR/SSIM."""
    try:
        from consingan.metrics.evaluate import EvaluateConfig, evaluate, evaluate_samples, summary_rows, write_report
        from consingan.outputs import check_encodable, out_refusal
        from consingan.singan.sampler import parse_tile

        if (run_dir is None) == (samples is None):
            raise ConsinganError("give either a run folder or --samples DIR with --image IMAGE")
        if samples is not None and image is None:
            raise ConsinganError("--samples needs --image (the training image)")
        if run_dir is None and out is None:
            raise ConsinganError("--samples needs --out (a new folder for the report)")
        if out is not None and out_refusal(out):  # before any measure is computed, with a run or with --samples
            raise ConsinganError(f"--out {out_refusal(out)}")
        if out is None:
            from consingan.runs import RunFolder

            out = RunFolder.open(run_dir).new_evaluation_dir()
        check_encodable(out, "output folder")
        num = _count(num)
        options = EvaluateConfig(num=num, seed=seed, device=device, tile=parse_tile(tile),
                                 inception_weights=str(inception_weights) if inception_weights else "")
        if samples is not None:
            result = evaluate_samples(image, samples, dim, options)
            title = f"evaluation of {samples} against {image.name} ({len(result['_arrays']['fake'])} samples)"
        else:
            result = evaluate(run_dir, options)
            for note in result.get("notes", []):
                console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
            where = f"{len(result['classes'])} classes, {num} samples each" if result.get("family") == \
                "conditional" else f"scale {result['scale']}, {num} samples"
            title = f"evaluation of {run_dir} ({where})"
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


def _train_dataset_model(train: Any) -> None:
    """The paired and conditional train commands around their work ``train(main_process) -> result``: one-line
    errors, Ctrl-C keeps the last finished epoch, and under torchrun one report (rank 0's)."""
    from consingan.distributed import Distributed

    main_process = Distributed.from_environment().is_main
    try:
        result = train(main_process)
        if main_process and result is not None:  # None: the command has said why there is nothing to do
            console.print(f"run folder: [bold]{result.run_dir}[/]")
    except ConsinganError as error:
        fail(str(error))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the last finished epoch is saved in the run folder (--resume)")
        raise typer.Exit(code=130)


def _dataset_dry_run(run_dir: Path, family: str) -> None:
    """``--resume RUN --dry-run`` of a dataset family: the run's options and how far it got; nothing is written."""
    from consingan.runs import RunFolder

    run = RunFolder.open(run_dir, family)
    _print_config(run.config)
    state_path = run.latest_training_state()
    done = 0 if state_path is None else run.load_training_state(state_path, ()).epoch
    console.print(f"resume: epochs done {done} of {run.config.epochs}"
                  + ("; nothing left to train" if done >= run.config.epochs else ""), highlight=False)


def _paired_train(config_file: Path | None = None, resume: Path | None = None, dry_run: bool = False,
                  **flags: Any) -> None:
    """Train a paired generator on SOURCE/TARGET pairs matched by file name, tile by tile."""

    def train(main_process: bool) -> Any:
        from consingan.config import PairedConfig, resolve_config
        from consingan.paired.trainer import prepare_paired, resume_paired, train_paired

        if dry_run and resume is None:
            config, data = prepare_paired(resolve_config(config_file, flags, PairedConfig))
            _print_config(config)
            _warn_ignored(config)
            console.print(f"{len(data.names)} pairs: sources {data.sources[0].shape[0]} channel(s), targets "
                          f"{data.targets[0].shape[0]} channel(s); nothing written", highlight=False)
            return None

        def progress(epoch: int, losses: dict) -> None:
            console.print(f"epoch {epoch}: D {losses['d']:.4f} G {losses['g_gan']:.4f} L1 {losses['l1']:.4f} "
                          f"({losses['seconds']:.1f} s)", highlight=False)

        if resume is not None:
            _refuse_ignored_flags(PairedConfig, resume, config_file, flags)
            if dry_run:
                return _dataset_dry_run(resume, "paired")
            from consingan.runs import RunFolder

            run = RunFolder.open(resume, "paired")
            if run.training_finished():  # nothing left to train
                if main_process:
                    console.print(f"{resume} is already finished (epoch {run.config.epochs} of {run.config.epochs}); "
                                  f"nothing to do", highlight=False)
                return None
            return resume_paired(resume, progress, device=flags.get("device"))
        config = resolve_config(config_file, flags, PairedConfig)
        if main_process:
            _warn_ignored(config)
        return train_paired(config, progress)

    _train_dataset_model(train)


def _paired_parameters() -> list[inspect.Parameter]:
    from consingan.config import PairedConfig

    return _command_parameters(PairedConfig, dry_run=True)


paired_app.command("train", help="Train a paired generator on SOURCE/TARGET pairs matched by file name, tile by "
                                 "tile; writes a new run folder under out/.")(_register(_paired_train,
                                                                                          _paired_parameters()))


@paired_app.command("predict")
def paired_predict(
    run_dir: Annotated[Path, typer.Argument(help="Paired run folder.")],
    source: Annotated[Path, typer.Option("--source", help="Folder of inputs of any size.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the predictions" + OUT_HELP)],
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
) -> None:
    """Translate whole images or volumes through overlapping tiles; outputs keep the source geometry."""
    try:
        from consingan.paired.predict import predict_paired

        written = predict_paired(run_dir, source, out, device,
                                 warn=lambda text: console.print(f"[yellow]warning:[/] {escape(text)}",
                                                                 highlight=False, soft_wrap=True))
        console.print(f"wrote {len(written)} images to [bold]{out}[/]")
    except ConsinganError as error:
        fail(str(error))


# --- cohorts: one single-image model per image, as Ray tasks ---------------------------------------------------------


def _cohort_table(runs: list) -> Table:
    table = Table(title="cohort", header_style="bold")
    for column in ("image", "state", "minutes", "run folder / error"):
        table.add_column(column)
    colours = {"done": "green", "skipped": "cyan", "failed": "red"}
    for run in runs:
        state = f"[{colours[run.state]}]{run.state}[/]" if run.state in colours else run.state
        if run.resumed:
            state += " (resumed)"
        table.add_row(run.name, state, f"{run.seconds / 60:.1f}" if run.seconds else "",
                      run.error or run.run_dir)
    return table


def _cohort_log() -> Any:
    """Progress without a terminal (a log file, a pipe), where a live table shows nothing until the end: one line
    each time a run's state changes (starting, training scale k/n, done, skipped, failed)."""
    seen: dict[str, str] = {}

    def log(runs: list) -> None:
        for run in runs:
            if run.state != "queued" and seen.get(run.name) != run.state:
                seen[run.name] = run.state
                minutes = f" ({run.seconds / 60:.1f} min)" if run.seconds else ""
                detail = run.error or (run.run_dir if run.state in ("done", "skipped") else "")
                console.print(escape(f"{run.name}: {run.state}{' (resumed)' * run.resumed}{minutes}"
                                     + (f": {detail}" if detail else "")), highlight=False, soft_wrap=True)
    return log


def _train_many(config_file: Path | None = None, images: str = "", labels: str = "", address: str = "",
                cpus_per_task: int = 1, max_parallel: int = 0, dry_run: bool = False, **flags: Any) -> None:
    """Train one model per image of a folder or glob, each as a Ray task."""
    try:
        from rich.live import Live

        from consingan.cohort import SUMMARY, find_images, match_labels, plan_cohort, train_many
        from consingan.config import resolve_config

        if not images:
            raise ConsinganError("--images is required (a folder of images or a glob such as 'scans/*.nii.gz')")
        if cpus_per_task < 1 or max_parallel < 0:
            raise ConsinganError("--cpus-per-task must be at least 1 and --max-parallel zero or positive")
        config = resolve_config(config_file, flags)
        found = find_images(images, config.dimension)
        label_maps = match_labels(found, labels, config.dimension) if labels else None
        if dry_run:  # the images and what would happen to each; no Ray, nothing written
            plan = plan_cohort(config, found, label_maps)  # refusals first, in one line
            _print_config(config)
            _warn_ignored(config)
            table = Table(title="cohort plan", header_style="bold")
            for column in ("run", "would", "image"):
                table.add_column(column)
            for row in plan:
                table.add_row(*(escape(cell) for cell in row))
            console.print(table)
            console.print(f"{len(found)} images; nothing written", highlight=False)
            return
        live = Live(console=console, auto_refresh=False) if console.is_terminal else contextlib.nullcontext()
        with live:
            update = (lambda state: live.update(_cohort_table(state), refresh=True)) if console.is_terminal \
                else _cohort_log()
            runs = train_many(config, found, address, cpus_per_task, max_parallel, on_update=update,
                              on_warning=lambda text: console.print(f"[yellow]warning:[/] {escape(text)}",
                                                                    highlight=False, soft_wrap=True),
                              labels=label_maps)
        if not console.is_terminal:
            console.print(_cohort_table(runs))
        failed = sum(r.state == "failed" for r in runs)
        console.print(f"summary: [bold]{Path(config.out_dir) / SUMMARY}[/] ({len(runs) - failed} of {len(runs)} "
                      f"runs finished)")
        if failed:
            raise typer.Exit(code=1)
    except ConsinganError as error:
        fail(str(error))
    except OSError as error:  # the output folder or cohort.json cannot be written
        fail(f"cannot write: {error.strerror or error}")


def _train_many_parameters() -> list[inspect.Parameter]:
    extra = [
        inspect.Parameter("images", inspect.Parameter.KEYWORD_ONLY, default="", annotation=Annotated[str, typer.Option(
            "--images", help="A folder of images (one model each) or a glob such as 'scans/*.nii.gz'.")]),
        inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default="", annotation=Annotated[str, typer.Option(
            "--labels", help="A folder or glob of label maps, one per image, matched by file name: each model "
                             "generates its image and label map jointly (as train --label).")]),
        inspect.Parameter("address", inspect.Parameter.KEYWORD_ONLY, default="", annotation=Annotated[
            str, typer.Option("--address", help="Ray cluster: 'auto', 'host:port' (on the cluster's network) or "
                                                "'ray://host:port' (Ray client) (default: a local Ray started "
                                                "here).")]),
        inspect.Parameter("cpus_per_task", inspect.Parameter.KEYWORD_ONLY, default=1, annotation=Annotated[
            int, typer.Option("--cpus-per-task", help="CPU cores (and torch threads) per run; a GPU per run is "
                                                      "taken when the cluster has GPUs.")]),
        inspect.Parameter("max_parallel", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=Annotated[
            int, typer.Option("--max-parallel", help="Runs at once (0: as many as the cores allow: a local Ray "
                                                     "gets this machine's cores, else max-parallel x "
                                                     "cpus-per-task).")]),
    ]
    parameters = [p for p in _command_parameters(TrainConfig, dry_run=True)
                  if p.name.split(ALIAS_MARK)[0] not in ("resume", "image", "run_name", "label")]
    return parameters[:1] + extra + parameters[1:]


app.command("train-many", help="Train one single-image model per image of a folder or glob, each a Ray task (pip "
                               "install -e '.\\[distributed]'); a rerun skips finished runs and resumes interrupted "
                               "ones.")(_register(_train_many, _train_many_parameters()))


@app.command("sample-many")
def sample_many_command(
    runs_dir: Annotated[Path, typer.Argument(help="Folder of run folders (a cohort's --out-dir).")],
    out: Annotated[Path, typer.Option("--out", help="Folder with one sub-folder of samples per run" + OUT_HELP)],
    num: Annotated[str, typer.Option("--num", metavar=NUM_METAVAR, help="Samples written per run.")] = "16",
    seed: SeedOption = 0,
    scale: ScaleOption = None,
    shape: ShapeOption = None,
    start_scale: StartScaleOption = 0,
    use_scale: UseScaleOption = None,
    batch_size: BatchSizeOption = 8,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    source_dtype: SourceDtypeOption = False,
    tile: TileOption = "auto",
) -> None:
    """Draw NUM augmentations from every run of a cohort, with the options and rules of consingan sample."""
    try:
        from consingan.cohort import sample_many
        from consingan.ui import count_progress

        options = _sampling_options(seed, scale, shape, start_scale, batch_size, source_dtype, tile)
        num = _count(num)
        printers: dict[str, Any] = {}

        def progress(name: str, done: int, total: int) -> None:
            printers.setdefault(name, count_progress(console, prefix=f"{name}: "))(done, total)

        results = sample_many(runs_dir, out, num, device=device, progress=progress, scale=use_scale, **options)
        for result in results:
            if result.note:
                console.print(f"[yellow]note:[/] {escape(result.note)}", highlight=False, soft_wrap=True)
        for result in results:
            if result.error:
                console.print(f"[red]{escape(result.name)}[/]: {escape(result.error)}", highlight=False)
        untrained = [r.name for r in results if r.training_error]
        if untrained:
            console.print(f"[yellow]warning:[/] {len(untrained)} run(s) failed in training (see "
                          f"{escape(str(runs_dir / 'cohort.json'))}): {escape(', '.join(untrained))}", highlight=False)
        done, failed = [r for r in results if r.files], [r for r in results if r.error]
        console.print(f"wrote {num} samples from each of {len(done)} runs to [bold]{escape(str(out))}[/]"
                      + (f"; {len(failed)} could not sample" if failed else ""), highlight=False)
        if failed:  # some runs have no samples: a script must not take the folder as complete
            raise typer.Exit(code=1)
    except ConsinganError as error:
        fail(str(error))


conditional_app = typer.Typer(help="Class-conditional GAN on a labelled set of images or volumes (2D, 3D).",
                               no_args_is_help=True)
app.add_typer(conditional_app, name="conditional")


def _conditional_train(config_file: Path | None = None, resume: Path | None = None, dry_run: bool = False,
                       **flags: Any) -> None:
    """Train a class-conditional GAN on a folder of class folders (or a CSV of path,class)."""

    def train(main_process: bool) -> Any:
        from consingan.conditional.trainer import prepare_conditional, resume_conditional, train_conditional
        from consingan.config import ConditionalConfig, resolve_config
        from consingan.runs import RunFolder
        from consingan.ui import epoch_progress

        if resume is not None:
            _refuse_ignored_flags(ConditionalConfig, resume, config_file, flags)
            if dry_run:
                return _dataset_dry_run(resume, "conditional")
            epochs = RunFolder.open(resume, "conditional").config.epochs
            with epoch_progress(console, epochs) as progress:
                result = resume_conditional(resume, progress, device=flags.get("device"))
            if result.already_finished:
                if main_process:
                    console.print(f"{resume} is already finished (epoch {epochs} of {epochs}); nothing to do",
                                  highlight=False)
                return None
            return result
        config, data = prepare_conditional(resolve_config(config_file, flags, ConditionalConfig))
        if main_process:
            counts = ", ".join(f"{name} {count}" for name, count in zip(data.classes, data.counts()))
            console.print(f"{len(data.labels)} images in {len(data.classes)} classes: {counts}"
                          + ("; drawn class-balanced" if config.balance else ""), highlight=False)
            for warning in data.warnings:
                console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
            _warn_ignored(config)
        if dry_run:
            _print_config(config)
            console.print("nothing written", highlight=False)
            return None
        with epoch_progress(console, config.epochs) as progress:
            return train_conditional(config, progress, prepared=(config, data))

    _train_dataset_model(train)


def _conditional_parameters() -> list[inspect.Parameter]:
    from consingan.config import ConditionalConfig

    return _command_parameters(ConditionalConfig, dry_run=True)


conditional_app.command("train", help="Train a class-conditional GAN on --data (one sub-folder per class, or a CSV "
                                      "of path,class); writes a new run folder under out/.")(
    _register(_conditional_train, _conditional_parameters()))


@conditional_app.command("sample")
def conditional_sample(
    run_dir: Annotated[Path, typer.Argument(help="Conditional run folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder with one sub-folder per class" + OUT_HELP)],
    class_name: Annotated[Optional[str], typer.Option("--class", help="Class to draw (all when omitted).")] = None,
    num: Annotated[str, typer.Option("--num", metavar=NUM_METAVAR, help="Samples written per class drawn.")] = "16",
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same files.")] = 0,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
) -> None:
    """Draw samples of one class or of every class from the run's EMA generator."""
    try:
        from consingan.config import check_seed
        from consingan.conditional.sampler import TrainedConditional
        from consingan.ui import count_progress

        check_seed(seed)
        num = _count(num)
        model = TrainedConditional.load(run_dir, device)
        names = [class_name] if class_name is not None else model.classes
        written = model.write(out, names, num, seed, progress=count_progress(console))
        console.print(f"wrote {len(written)} samples ({num} per class, {len(names)} classes) to [bold]{out}[/]")
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
