"""Run folders: the one place that knows how a training run is laid out on disk, for every model family.

A run folder, whatever the model family::

    out/<run_name>/
        .lock                while a process trains the run: its PID and host (one writer per run folder)
        config.json          every option, resolved (seed included); written first
        run.json             RunInfo: family, shapes, channels, intensity mapping, geometry, the output file type, its
                             format version and the library versions; written with the folder
        source/              what training needs, so a moved run resumes and is evaluated:
            image/<name>         single-image: the image as given (a byte copy; a DICOM series whole; .mhd as .mha)
            label/<name>         single-image: the label map, when trained with --label
            dataset.pt           paired and conditional: the mapped training set with its names and geometry
        losses.csv           paired, conditional: one row per epoch (single-image: one per scale, in scale_NN/)
        stats.jsonl          one line per epoch: losses, seconds, learning rates (single-image: in scale_NN/)
        training_state.pt    paired, conditional: the resumable state of the last epoch
        generator.pt         paired, conditional: the final (sampling) weights
        snapshots/           paired, conditional: epoch_NNNNN.pt, the sampling weights every --checkpoint-every epochs
        previews/            paired, conditional: preview grids every --preview-every epochs
        scale_NN/            single-image only, one per scale:
            generator.pt, critic.pt, training_state.pt, losses.csv, stats.jsonl, samples/, scale.json (written last)
        evaluation_NNN/      what ``consingan evaluate`` wrote (evaluation.json, report.png, samples.png)

Every file is written atomically (temporary file, then rename). Weights and training states are tensors and plain
values only, read with torch's weights-only unpickler; a training state is one format for every family
(``TrainingState``). Trainers, the sampler, evaluation and prediction go through ``RunFolder``; nothing else parses
run files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from consingan import __version__
from consingan.checkpoint import RunLock, current_umask, load_state, make_run_dir, save_json, save_state, save_text
from consingan.config import ConditionalConfig, PairedConfig, TrainConfig, is_single_folder_name
from consingan.devices import resolve_device  # noqa: F401  (re-exported for the families)
from consingan.errors import ConsinganError
from consingan.io import IntensityRange, LabelEncoding
from consingan.outputs import check_encodable

if TYPE_CHECKING:
    from consingan.io import Volume

FAMILIES = {"singan": TrainConfig, "paired": PairedConfig, "conditional": ConditionalConfig}
# Options added after the first runs were written, with the behaviour those runs were trained with: a run folder of
# an older format (run.json's format_version below RUN_FORMAT_VERSION) without them is read as it was trained, not with
# today's defaults.
# patch_size: runs from before patch training trained on whole volumes ('off'), not with today's default 'auto'.
LEGACY_OPTIONS = {"singan": {"gradient_penalty": "image", "intensity_mapping": "minmax", "upsampling": "linear",
                             "patch_size": "off"},
                  # paired runs mapped min-max before --intensity-mapping; their previews and snapshots did not exist
                  "paired": {"intensity_mapping": "minmax"}}
MAX_SIDE = 2**16  # no axis of a real image is longer; a larger number in run.json means the file was damaged
MAX_VOXELS = 2**32
TRAINING_STATE_FORMAT = "consingan-training-state"
TRAINING_STATE_VERSION = 1
# run.json's format: 1, every run.json without a format_version (written when training began; a single-image run read
# its image where config.json says); 2 adds format_version and the library versions, and a single-image run writes it
# with the folder and keeps its training files in source/ (a run stopped while copying them has none); 3: every
# option of today is in config.json (paired runs record --intensity-mapping), so LEGACY_OPTIONS apply to formats 1-2
# only and an option missing from a format-3 run takes today's default.
RUN_FORMAT_VERSION = 3
# Headers whose voxels lie in other files they name (relative, listed or as patterns): kept as one .mha instead.
DETACHED_SUFFIXES = (".mhd", ".nhdr")


def library_versions() -> dict[str, str]:
    """The versions a run was made with, for run.json: what to install to reproduce it, and what to suspect when a
    later install reads it differently."""
    return {"consingan": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "python": platform.python_version()}


def _check_shape(shape: Any, spatial_dims: int, what: str) -> list[int]:
    if (not isinstance(shape, list) or len(shape) != spatial_dims
            or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SIDE for s in shape)
            or math.prod(shape) > MAX_VOXELS):
        raise ValueError(f"{what} {shape!r} is not a {spatial_dims}D shape of 1 to {MAX_SIDE} voxels per side")
    return shape


@dataclass
class InputInfo:
    """What a paired model's input is: how files are encoded into its channels, and their names at training."""

    encoding: dict  # {"labels": LabelEncoding dict} or {"intensity": IntensityRange dict}
    channels: int  # channels after encoding (one-hot classes, or the file's channels)
    file_channels: int  # channels of an input file
    names: list[str] = field(default_factory=list)


@dataclass
class RunInfo:
    """What inference needs besides the weights, for every family (run.json).

    ``output_suffix``/``output_dtype``/``intensity`` describe the images the model produces: the training image's
    (single-image) or the targets' (paired), so outputs come back in that file type, data type and range.
    """

    family: str
    spatial_dims: int
    channels: int
    output_suffix: str
    output_dtype: str
    intensity: IntensityRange
    image: str = ""
    source_shape: list[int] = field(default_factory=list)
    source_affine: list[list[float]] | None = None
    # A 2D image read from a one-slice 3D file: that slice's 3D affine (``Volume.plane``), so outputs keep its place.
    source_plane: list[list[float]] | None = None
    shapes: list[list[int]] = field(default_factory=list)
    nifti_header: str | None = None
    labels: LabelEncoding | None = None
    inputs: InputInfo | None = None
    classes: list[str] = field(default_factory=list)  # class names of a conditional run, in label order
    class_counts: list[int] = field(default_factory=list)  # its training images per class
    # Each class's reference grid (a conditional run): the affine its samples are written with ([] before: identity).
    class_grids: list[list[list[float]]] = field(default_factory=list)
    # 2D conditional runs: each class's slice plane (a DICOM slice's 3D place), or None for a class of plain pictures.
    class_planes: list[list[list[float]] | None] = field(default_factory=list)
    # torchrun processes it was trained with (paired, conditional); a resume must keep it. Runs from before it was
    # recorded were trained with one.
    world_size: int = 1
    consingan_version: str = __version__
    format_version: int = RUN_FORMAT_VERSION  # a run.json without one is format 1
    versions: dict[str, str] = field(default_factory=library_versions)  # {} in format 1

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["intensity"] = self.intensity.to_dict()
        values["labels"] = self.labels.to_dict() if self.labels else None
        return values

    @classmethod
    def from_dict(cls, values: Any, where: str = "run.json") -> "RunInfo":
        """Read and check run.json's contents; anything missing, mistyped or absurd raises ``ConsinganError``."""
        try:
            if not isinstance(values, dict):
                raise ValueError("not a mapping")
            values = dict(values)
            values.setdefault("family", "singan")
            values.setdefault("format_version", 1)
            values.setdefault("versions", {})
            version = values["format_version"]
            if isinstance(version, int) and not isinstance(version, bool) and version > RUN_FORMAT_VERSION:
                raise ConsinganError(f"{where} is format {version}, newer than consingan {__version__} reads (up to "
                                     f"{RUN_FORMAT_VERSION}); upgrade consingan")
            # Older single-image runs named the output type after the source image.
            if "source_suffix" in values:
                values["output_suffix"] = values.pop("source_suffix")
            if "source_dtype" in values:
                values["output_dtype"] = values.pop("source_dtype")
            known = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in values.items() if k in known}
            values["intensity"] = IntensityRange.from_dict(values["intensity"])
            values["labels"] = LabelEncoding.from_dict(values.get("labels"))
            if values.get("inputs") is not None:
                values["inputs"] = InputInfo(**values["inputs"])
            info = cls(**values)
            info.check()
        except ConsinganError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            detail = f"no {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
            raise ConsinganError(f"damaged {where}: {detail}") from None
        return info

    def check(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims {self.spatial_dims!r} is not 2 or 3")
        if not isinstance(self.channels, int) or not 1 <= self.channels <= 4096:
            raise ValueError(f"channels {self.channels!r} is not a channel count")
        if len(self.intensity.minimum) != self.channels:
            raise ValueError("the intensity mapping does not match the channel count")
        np.dtype(self.output_dtype)
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size {self.world_size!r} is not a number of processes")
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(f"format_version {self.format_version!r} is not a format number")
        if not isinstance(self.versions, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in self.versions.items()):
            raise ValueError("versions is not a mapping of library names to versions")
        if self.family == "singan":
            _check_shape(self.source_shape, self.spatial_dims, "source_shape")
            if not self.shapes:
                raise ValueError("no pyramid shapes")
            for shape in self.shapes:
                _check_shape(shape, self.spatial_dims, "pyramid shape")
            affine = np.asarray(self.source_affine, dtype=np.float64)
            if affine.shape != (self.spatial_dims + 1,) * 2 or not np.isfinite(affine).all():
                raise ValueError("source_affine is not a finite homogeneous matrix")
            if self.source_plane is not None:
                plane = np.asarray(self.source_plane, dtype=np.float64)
                if self.spatial_dims != 2 or plane.shape != (4, 4) or not np.isfinite(plane).all():
                    raise ValueError("source_plane is not the finite 3D affine of a 2D image's slice")
        if self.family == "paired" and self.inputs is None:
            raise ValueError("a paired run needs its input description")
        if self.family == "conditional" and (not self.classes or not all(isinstance(c, str) and c for c in self.classes)
                                             or len(set(self.classes)) != len(self.classes)):
            raise ValueError("a conditional run needs its distinct class names")
        if self.class_grids:
            grids = np.asarray(self.class_grids, dtype=np.float64)
            if grids.shape != (len(self.classes), self.spatial_dims + 1, self.spatial_dims + 1) \
                    or not np.isfinite(grids).all():
                raise ValueError("class_grids is not one finite affine per class")
        if self.class_planes:
            planes = [np.asarray(plane, dtype=np.float64) for plane in self.class_planes if plane is not None]
            if len(self.class_planes) != len(self.classes) or self.spatial_dims != 2 or not all(
                    plane.shape == (4, 4) and np.isfinite(plane).all() for plane in planes):
                raise ValueError("class_planes is not one finite 3D affine (or null) per class of a 2D run")
        if self.family == "conditional":  # a tampered name would send samples outside --out (<out>/<class>/)
            unsafe = [c for c in self.classes if not is_single_folder_name(c)]
            if unsafe:
                raise ValueError(f"class name {unsafe[0]!r} is not a single folder name")


@dataclass
class TrainingState:
    """Everything a trainer needs to continue bit for bit, in one format for every family (training_state.pt).

    ``models``, ``optimizers`` and ``schedulers`` map names ('generator', 'critic', 'discriminator') to state dicts;
    ``history`` holds one dict of losses per epoch done.
    """

    epoch: int
    seconds: float
    models: dict[str, dict]
    optimizers: dict[str, dict]
    schedulers: dict[str, dict]
    history: list[dict[str, float]]
    rng_torch: torch.Tensor
    rng_cuda: torch.Tensor | None = None
    stage: int = 0
    # fp16 gradient scalers' states by optimiser name (their current scale and growth count); empty otherwise.
    scalers: dict[str, dict] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        names = list(self.history[0]) if self.history else []
        state = {
            "format": TRAINING_STATE_FORMAT, "version": TRAINING_STATE_VERSION, "stage": self.stage,
            "epoch": self.epoch, "seconds": self.seconds, "models": self.models, "optimizers": self.optimizers,
            "schedulers": self.schedulers, "loss_names": names,
            "history": torch.tensor([[row[n] for n in names] for row in self.history],
                                    dtype=torch.float64).reshape(len(self.history), len(names)),
            "rng_torch": self.rng_torch,
        }
        if self.rng_cuda is not None:
            state["rng_cuda"] = self.rng_cuda
        if self.scalers:
            state["scalers"] = self.scalers
        return state

    @classmethod
    def from_state(cls, state: dict, where: str, models: Sequence[str]) -> "TrainingState":
        """Check a loaded state (this format, or the single-image engine's first one) for the named models."""
        try:
            if state.get("format") != TRAINING_STATE_FORMAT:
                state = _legacy_training_state(state, models)
            history = state["history"]
            names = list(state["loss_names"])
            if history.dim() != 2 or history.shape[1] != len(names) and history.numel():
                raise ValueError("loss history does not match its column names")
            result = cls(
                epoch=int(state["epoch"]), seconds=float(state["seconds"]), models=dict(state["models"]),
                optimizers=dict(state["optimizers"]), schedulers=dict(state["schedulers"]),
                history=[dict(zip(names, row)) for row in history.tolist()], rng_torch=state["rng_torch"],
                rng_cuda=state.get("rng_cuda"), stage=int(state.get("stage", 0)),
                scalers=dict(state.get("scalers", {})),
            )
            missing = [name for name in models if name not in result.models or name not in result.optimizers]
            if missing:
                raise KeyError(missing[0])
            if result.epoch < 0 or not torch.is_tensor(result.rng_torch):
                raise ValueError("bad epoch or random state")
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            detail = f"no {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
            raise ConsinganError(f"damaged training state {where}: {detail}") from None
        return result


def _legacy_training_state(state: dict, models: Sequence[str]) -> dict:
    """The single-image engine's first training-state layout (flat keys) in today's."""
    critic = models[1] if len(models) > 1 else "critic"
    names = ["critic", "gradient_penalty", "adversarial", "reconstruction"]
    return {
        **state, "models": {"generator": state["generator"], critic: state[critic]},
        "optimizers": {"generator": state["optimizer_g"], critic: state["optimizer_d"]},
        "schedulers": {"generator": state["scheduler_g"], critic: state["scheduler_d"]},
        "loss_names": names if state["history"].numel() else [],
    }


def load_module_state(module: torch.nn.Module, state: dict, where: Path | str) -> None:
    """``module.load_state_dict(state)``, with a missing, extra or wrong-shaped tensor reported in one line."""
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise ConsinganError(f"{where} does not fit the model: {first_reason(error)}") from None


def first_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith(("Missing", "Unexpected", "size mismatch"))]
    text = (reasons or lines or [type(error).__name__])[0]
    return text if len(text) < 300 else text[:300] + " ..."


class RunFolder:
    """A run folder of one model family: its config, its RunInfo, checkpoints, loss logs (see the module docstring).

    Create a new one with ``RunFolder.create``; open an existing one with ``RunFolder.open``.
    """

    CONFIG, INFO, LOSSES = "config.json", "run.json", "losses.csv"
    WEIGHTS, CRITIC, STATE, SCALE_META = "generator.pt", "critic.pt", "training_state.pt", "scale.json"
    SOURCE, STATS, SNAPSHOTS, PREVIEWS, SAMPLES = "source", "stats.jsonl", "snapshots", "previews", "samples"

    def __init__(self, path: Path, family: str, config: Any, info: RunInfo | None = None) -> None:
        self.path, self.family, self.config, self._info = Path(path), family, config, info
        self._lock = RunLock(self.path)

    # --- creating and opening --------------------------------------------------------------------------------------

    @classmethod
    def create(cls, config: Any, stem: str, info: RunInfo | None = None,
               sources: dict[str, Path | str] | None = None) -> "RunFolder":
        """A new folder ``out_dir/run_name`` (or ``out_dir/<stem>_NNN``), atomically, locked by this process (see
        ``acquire``), with config.json written, then run.json when ``info`` is given, then a copy of each training
        file of ``sources`` ({role: path}, see ``keep_source``).

        run.json comes before the copies, which may take a while: a run stopped at any moment after it resumes (from
        the original files while it has no copy)."""
        family = next(name for name, config_class in FAMILIES.items() if isinstance(config, config_class))
        path = make_run_dir(Path(config.out_dir), config.run_name, stem)
        run = cls(path, family, config)
        run.acquire()
        try:
            save_json(path / cls.CONFIG, config.to_dict())
            if info is not None:
                run.write_info(info)
            for role, source in (sources or {}).items():
                run.keep_source(role, source)
        except BaseException:  # a folder that could not be set up must not stay locked by a living process
            run.release()
            raise
        return run

    @classmethod
    def open(cls, path: Path | str, family: str | None = None) -> "RunFolder":
        """Open a run folder; a missing or damaged one, or one of another family than ``family``, raises
        ``ConsinganError``."""
        path = Path(path)
        if not path.is_dir():
            raise ConsinganError(f"run folder not found: {path}")
        for name in (cls.CONFIG, cls.INFO):
            if not (path / name).is_file():
                raise ConsinganError(f"{path} is not a consingan run folder (no {name})")
        info = RunInfo.from_dict(_read_json(path / cls.INFO), f"{path / cls.INFO}")
        if family is not None and info.family != family:
            raise ConsinganError(f"{path} is a {info.family} run, not a {family} run")
        values = _read_json(path / cls.CONFIG)
        if not isinstance(values, dict):
            raise ConsinganError(f"damaged {path / cls.CONFIG}: not a mapping of options")
        legacy = LEGACY_OPTIONS.get(info.family, {}) if info.format_version < RUN_FORMAT_VERSION else {}
        values = {**legacy, **values}
        config = FAMILIES[info.family].from_dict(values, f"{path / cls.CONFIG}").validate()
        return cls(path, info.family, config, info)

    # --- one writer per run folder ----------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the run's lock (``checkpoint.RunLock``) before writing to it: a folder another living process trains
        is refused in one line naming its PID and host; a stale lock left by a killed process is taken over with a
        ``note:`` line on stderr. Under torchrun rank 0 alone takes it (the other ranks write nothing)."""
        check_encodable(self.path, "run folder")
        note = self._lock.acquire()
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)

    def release(self) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def writing(self) -> Iterator["RunFolder"]:
        """The run locked for the duration, released however it ends (errors and Ctrl-C included)."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    @property
    def has_info(self) -> bool:
        return self._info is not None

    @property
    def info(self) -> RunInfo:
        if self._info is None:
            raise ConsinganError(f"{self.path} has no run.json yet")
        return self._info

    def write_info(self, info: RunInfo) -> None:
        info.check()
        self._info = info
        save_json(self.path / self.INFO, info.to_dict())

    def device(self, override: str | None = None) -> torch.device:
        """The device to run on: ``override`` when given, else the run's configured one."""
        return resolve_device(override or self.config.device)

    # --- the training set of a dataset family ----------------------------------------------------------------------

    DATASET = "dataset.pt"

    def keep_dataset(self, tensors: dict[str, Any]) -> None:
        """The prepared training set (mapped tensors, names) in source/dataset.pt, so that the run resumes and is
        evaluated wherever its folder is moved, whatever becomes of the original files."""
        folder = self.path / self.SOURCE
        folder.mkdir(exist_ok=True)
        save_state(folder / self.DATASET, tensors)

    def kept_dataset(self, keys: Sequence[str]) -> dict[str, Any] | None:
        """source/dataset.pt with ``keys`` checked, or None for a run written before datasets were kept."""
        path = self.path / self.SOURCE / self.DATASET
        if not path.is_file():
            return None
        kept = load_state(path)
        missing = [key for key in keys if key not in kept]
        if missing:
            raise ConsinganError(f"damaged {path}: no {missing[0]}")
        return kept

    # --- training files (single-image family) ----------------------------------------------------------------------

    def keep_source(self, role: str, source: Path | str) -> None:
        """Copy a training file (``role``: 'image' or 'label') into source/<role>/, so that the run resumes and is
        evaluated wherever its folder is moved, whatever becomes of the original.

        A byte copy keeps the file's geometry, data type and header exactly, and is read by the same reader; a DICOM
        series folder is copied whole (its files: GDCM reads the folder flat). Copying costs the disk space of one
        more copy of the image, no more than a scale's checkpoints of a large volume take; a mapped copy (an array
        and its affine) would drop the header and the data type outputs are written in. A header whose voxels lie
        in files it names (.mhd, .nhdr) is written as one .mha (same voxels, geometry and type). The copy is made in
        a temporary folder renamed into place, so source/<role>/ exists only whole.
        """
        from consingan.io import file_suffix

        source, folder = Path(source), self.path / self.SOURCE
        target = folder / role
        try:
            folder.mkdir(exist_ok=True)
            for leftover in folder.glob(f".{role}.*.tmp"):  # of a copy stopped midway
                shutil.rmtree(leftover, ignore_errors=True)
            temporary = Path(tempfile.mkdtemp(prefix=f".{role}.", suffix=".tmp", dir=folder))
            os.chmod(temporary, 0o777 & ~current_umask())  # mkdtemp makes it 0700 whatever the umask
            try:
                if source.is_dir():
                    (temporary / source.name).mkdir()
                    for entry in sorted(source.iterdir()):
                        if entry.is_file():
                            _copy_file(entry, temporary / source.name / entry.name)
                elif file_suffix(source) in DETACHED_SUFFIXES:
                    _write_single_file(source, temporary / (source.name[: -len(file_suffix(source))] + ".mha"))
                else:
                    _copy_file(source, temporary / source.name)
                os.rename(temporary, target)
            except BaseException:
                shutil.rmtree(temporary, ignore_errors=True)
                raise
        except OSError as error:
            raise ConsinganError(f"cannot copy {source} into {target}: {error.strerror or error}") from None

    def kept_source(self, role: str) -> Path | None:
        """The run's own copy of its training ``role`` ('image', 'label'), or None when it has none."""
        folder = self.path / self.SOURCE / role
        if not folder.is_dir():
            return None
        entries = list(folder.iterdir())
        if len(entries) != 1:
            raise ConsinganError(f"damaged {folder}: it should hold one file or series folder, not {len(entries)}")
        return entries[0]

    def source_path(self, role: str) -> Path:
        """Where the training ``role`` is read from: the run's copy, or in a run without one (format 1, or stopped
        while copying) the absolute path in config.json; neither found raises ``ConsinganError`` naming both."""
        kept = self.kept_source(role)
        if kept is not None:
            return kept
        recorded = getattr(self.config, role, "") or ""
        if recorded and Path(recorded).exists():
            return Path(recorded)
        why = "stopped before it was copied" if self.info.format_version >= 2 else "a run from before runs kept one"
        raise ConsinganError(f"the training {role} of {self.path} is gone: no copy in {self.path / self.SOURCE / role} "
                             f"({why}) and nothing at {recorded or '(no path)'} (config.json)")

    def read_source(self, role: str, check_values: bool = True) -> Volume:
        """The training ``role`` read as it was at training (``source_path``), its file type included."""
        from consingan.io import file_suffix, read_volume

        path = self.source_path(role)
        volume = read_volume(path, self.config.dimension, check_values)
        recorded = file_suffix(getattr(self.config, role))
        if recorded in DETACHED_SUFFIXES and file_suffix(path) != recorded:  # kept as .mha
            volume = dataclasses.replace(volume, suffix=recorded)
        return volume

    # --- scales (single-image family) ------------------------------------------------------------------------------

    def scale_dir(self, stage: int) -> Path:
        return self.path / f"scale_{stage:02d}"

    def completed_scales(self) -> list[int]:
        """Scales whose training finished (their scale.json is written last)."""
        return [k for k in range(self.config.num_scales) if (self.scale_dir(k) / self.SCALE_META).is_file()]

    def scale_meta(self, stage: int) -> dict:
        return _read_json(self.scale_dir(stage) / self.SCALE_META)

    def write_scale_meta(self, stage: int, meta: dict) -> None:
        save_json(self.scale_dir(stage) / self.SCALE_META, meta)

    def latest_training_state(self) -> Path | None:
        """The newest training state: the furthest scale's (single-image), or the run's own (paired)."""
        if self.family != "singan":
            path = self.path / self.STATE
            return path if path.is_file() else None
        for stage in reversed(range(self.config.num_scales)):
            path = self.scale_dir(stage) / self.STATE
            if path.is_file():
                return path
        return None

    # --- checkpoints -----------------------------------------------------------------------------------------------

    def save_weights(self, folder: Path, name: str, state: dict) -> None:
        save_state(folder / name, state)

    def read_state(self, path: Path, device: torch.device | str = "cpu") -> dict:
        """A state dict saved in the run (weights-only loading: nothing pickled is executed)."""
        return load_state(path, map_location=device)

    def generator_state(self, models: Sequence[str], device: torch.device | str = "cpu"
                        ) -> tuple[dict, Path, TrainingState | None]:
        """The weights to sample or predict with: generator.pt, written after the last epoch, or else the generator
        of the latest training state (returned too, so that the caller can say the run is unfinished)."""
        weights = self.path / self.WEIGHTS
        if weights.is_file():
            return self.read_state(weights, device), weights, None
        state_path = self.latest_training_state()
        if state_path is None:
            raise ConsinganError(f"{self.path} has no weights yet (no {self.WEIGHTS} or {self.STATE}): its first "
                                 f"epoch did not finish; resume it with train --resume")
        training = self.load_training_state(state_path, models, device)
        return training.models["generator"], state_path, training

    @staticmethod
    def member_path(out_dir: Path | str, name: str) -> Path:
        """The run folder of one image of a cohort (``train-many``), named after the image."""
        return Path(out_dir) / name

    def save_training_state(self, folder: Path, state: TrainingState) -> None:
        save_state(folder / self.STATE, state.to_state())

    def load_training_state(self, path: Path, models: Sequence[str], device: torch.device | str = "cpu"
                            ) -> TrainingState:
        return TrainingState.from_state(load_state(path, map_location=device), str(path), models)

    # --- loss logs -------------------------------------------------------------------------------------------------

    def write_losses(self, folder: Path, history: Sequence[dict[str, float]]) -> None:
        """losses.csv: a header 'epoch,<loss names>' and one row per epoch."""
        if not history:
            return
        names = [name for name in history[0] if name != "epoch"]
        lines = [",".join(["epoch", *names])]
        lines += [",".join([str(epoch), *(f"{row[k]:.6g}" for k in names)]) for epoch, row in enumerate(history, 1)]
        save_text(folder / self.LOSSES, "\n".join(lines) + "\n")

    def logged_epochs(self) -> int:
        """The last epoch losses.csv of a dataset run records (0: none yet, or a log cut short)."""
        try:  # one row per finished epoch, its number first
            return int((self.path / self.LOSSES).read_text().split()[-1].split(",")[0])
        except (OSError, ValueError, IndexError):
            return 0

    def training_finished(self) -> bool:
        """A dataset run whose final weights are written and whose every epoch is logged."""
        return (self.path / self.WEIGHTS).is_file() and self.logged_epochs() >= self.config.epochs

    def append_stats(self, folder: Path, record: dict[str, Any]) -> None:
        """One line of stats.jsonl (an epoch's losses, seconds and learning rates), appended: a log a running job
        can be followed by (``tail -f``), unlike losses.csv which is rewritten whole."""
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / self.STATS, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")

    def truncate_stats(self, folder: Path, last_epoch: int) -> None:
        """Drop the lines of stats.jsonl after ``last_epoch`` (a resume trains those epochs again); a line cut
        short by a kill is dropped too."""
        path = folder / self.STATS
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= last_epoch:
                kept.append(line)
        save_text(path, "".join(line + "\n" for line in kept))

    def stats(self, folder: Path | None = None) -> list[dict[str, Any]]:
        """The records of stats.jsonl in ``folder`` (the run's own by default)."""
        path = (folder or self.path) / self.STATS
        if not path.is_file():
            return []
        try:
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConsinganError(f"damaged stats log {path}") from None

    def save_snapshot(self, epoch: int, weights: dict) -> Path:
        """The sampling weights after ``epoch``, kept beside the latest state as snapshots/epoch_NNNNN.pt."""
        folder = self.path / self.SNAPSHOTS
        folder.mkdir(exist_ok=True)
        path = folder / f"epoch_{epoch:05d}.pt"
        save_state(path, weights)
        return path

    def snapshots(self) -> list[Path]:
        folder = self.path / self.SNAPSHOTS
        return sorted(folder.glob("epoch_*.pt")) if folder.is_dir() else []

    def previews_dir(self) -> Path:
        folder = self.path / self.PREVIEWS
        folder.mkdir(exist_ok=True)
        return folder

    def new_evaluation_dir(self) -> Path:
        """The first free evaluation_NNN of the run (where ``consingan evaluate`` writes by default)."""
        for number in range(1, 1000):
            folder = self.path / f"evaluation_{number:03d}"
            if not folder.exists():
                return folder
        raise ConsinganError(f"{self.path} has 999 evaluation folders; give --out")

    def loss_logs(self) -> dict[str, list[dict[str, float]]]:
        """Every loss log of the run by label ('scale_00' ... or 'run'), as rows of floats."""
        folders = ([(f"scale_{k:02d}", self.scale_dir(k)) for k in range(self.config.num_scales)]
                   if self.family == "singan" else [("run", self.path)])
        logs = {}
        for label, folder in folders:
            path = folder / self.LOSSES
            if path.is_file():
                try:
                    with open(path, newline="") as stream:
                        logs[label] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(stream)]
                except (ValueError, TypeError, csv.Error):
                    raise ConsinganError(f"damaged loss log {path}") from None
        return logs


def _copy_file(source: Path, target: Path) -> None:
    """Copy the bytes, flushed to disk; the new file gets the umask's mode, as every other file of a run."""
    with open(source, "rb") as reader, open(target, "xb") as writer:
        shutil.copyfileobj(reader, writer, 2**22)
        writer.flush()
        os.fsync(writer.fileno())


def _write_single_file(source: Path, target: Path) -> None:
    """A header with detached data (.mhd, .nhdr) as one .mha: the same voxels, pixel type and geometry."""
    import SimpleITK as sitk

    from consingan.io.volume import reader_reason

    try:
        sitk.WriteImage(sitk.ReadImage(str(source)), str(target))
    except RuntimeError as error:
        raise ConsinganError(f"cannot copy {source} into the run: {reader_reason(error)}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConsinganError(f"damaged {path}: {str(error).splitlines()[0]}") from None
    except OSError as error:
        raise ConsinganError(f"cannot read {path}: {error.strerror or error}") from None
