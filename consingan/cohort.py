"""Cohorts: one single-image model per image of a folder or glob, each `consingan train` run a Ray task.

Ray is an optional extra (``pip install -e '.[distributed]'``). Without ``--address`` a local Ray is started in this
process (the embedded default); with ``--address auto`` or ``ray://host:port`` the tasks go to that cluster. Each
image's run folder is ``out_dir/<image name>``, so a rerun finds its runs: finished ones are skipped, interrupted
ones resume from their checkpoints, missing ones start. One image's failure (unreadable, too small ...) is recorded
with its error line and does not stop the others.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import re
import socket
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from consingan.checkpoint import save_json
from consingan.config import TrainConfig, flag_name
from consingan.errors import ConsinganError
from consingan.io import file_suffix, list_images
from consingan.outputs import OutputError, OutputFolder, check_encodable, out_refusal
from consingan.runs import RunFolder

INSTALL_HINT = "Ray is not installed; install the optional extra: pip install -e '.[distributed]'"
CLIENT_HINT = ("--address ray://... needs Ray's client (grpcio), which is not installed: pip install 'ray[client]' "
               "(or pip install -e '.[distributed]')")
SUMMARY = "cohort.json"
ADDRESS_FORMS = "'auto', 'host:port' or 'ray://host:port'"
PROBE_SECONDS = 5.0  # an address that does not answer a TCP connect within this is not a cluster; Ray would retry for minutes
# Options a rerun may change: the per-run ones (set for each image), and the device, which --resume also lets change.
RERUN_FREE = ("image", "label", "run_name", "out_dir", "data_dir", "device")


def image_name(path: Path) -> str:
    """The run name of an image: its file name without the image suffix ('case.01.nii.gz' -> 'case.01')."""
    suffix = file_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def find_images(spec: str, dimension: int = 3) -> list[Path]:
    """The images of a folder (its files with a supported suffix, and in 3D its DICOM series folders), or of a glob.

    In 2D a sub-folder is never an image (DICOM series folders are 3D), so it is skipped as other non-images are."""
    folder = Path(spec)
    if folder.is_dir():
        found = list_images(folder, dimension)
    else:
        found = [Path(p) for p in sorted(glob.glob(spec)) if dimension == 3 or not Path(p).is_dir()]
        for path in found:  # glob lists links by name: a loop or a dangling link has nothing to read
            if not path.exists():
                raise ConsinganError(f"--images: {path} is a symbolic link loop or a link to nothing; remove it or "
                                     f"give the file it should point to")
    if not found:
        raise ConsinganError(f"no images found for --images {spec!r}")
    names: dict[str, Path] = {}
    for path in found:
        name = image_name(path)
        if name in names:
            # Full paths: with a glob over several folders the file names alone may be the same.
            raise ConsinganError(f"{names[name]} and {path} would share the run folder {name!r}; rename one")
        names[name] = path
    return found


def match_labels(images: list[Path], spec: str, dimension: int = 3) -> dict[str, Path]:
    """Each image's label map from the folder or glob ``spec``, matched by run name (the file name without its
    suffix: 'case01.nii.gz' takes 'case01.nii.gz' or 'case01.nrrd'); an image without one, or a label map of no
    image, is refused, naming them."""
    labels = {image_name(path): path for path in find_images(spec, dimension)}
    names = [image_name(path) for path in images]
    missing = [name for name in names if name not in labels]
    extra = sorted(set(labels) - set(names))
    if missing or extra:
        parts = ([f"no label map for {', '.join(missing[:5])}{' ...' * (len(missing) > 5)}"] if missing else []) + \
                ([f"no image for {', '.join(extra[:5])}{' ...' * (len(extra) > 5)}"] if extra else [])
        raise ConsinganError(f"--labels {spec}: {'; '.join(parts)} (label maps are matched to images by file name)")
    return {name: labels[name] for name in names}


@dataclass
class CohortRun:
    """One image's place in the cohort, as the live table and the summary show it."""

    name: str
    image: str
    label: str = ""  # its label map, with --labels
    state: str = "queued"  # queued, training scale k/n, done, skipped (done before), failed
    run_dir: str = ""
    seconds: float = 0.0
    error: str = ""
    resumed: bool = False


def run_state(run_dir: Path, num_scales: int) -> str:
    """'new' (no folder), 'done' (every scale completed) or 'resume'."""
    if not run_dir.exists():
        return "new"
    run = RunFolder.open(run_dir, "singan")
    return "done" if len(run.completed_scales()) >= num_scales else "resume"


def check_rerun_options(config: TrainConfig, out_dir: Path, names: list[str]) -> None:
    """Refuse options that differ from those of the runs already in ``out_dir``: a rerun skips or resumes each run
    with the options in its config.json, so the new ones would be ignored (and only recorded in cohort.json)."""
    differing: list[tuple[Path, list[str]]] = []
    for name in names:
        run_dir = RunFolder.member_path(out_dir, name)
        if not (run_dir / RunFolder.CONFIG).is_file():
            continue
        try:
            trained = RunFolder.open(run_dir, "singan").config
        except ConsinganError:
            continue  # a damaged run folder fails as its own task, with its own message
        changes = [f"{flag_name(field.name)} {getattr(trained, field.name)} (now {getattr(config, field.name)})"
                   for field in dataclasses.fields(TrainConfig) if field.name not in RERUN_FREE
                   and getattr(config, field.name) != getattr(trained, field.name)
                   and not (field.name == "seed" and config.seed is None)  # no --seed: each run keeps its own
                   and not (field.name == "patch_size" and config.patch_size == "auto")]  # recorded as it resolved
        if changes:
            differing.append((run_dir, changes))
    if differing:
        run_dir, changes = differing[0]
        others = f" (and {len(differing) - 1} more runs)" if len(differing) > 1 else ""
        raise ConsinganError(f"{run_dir}{others} was trained with other options: {', '.join(changes)}; a rerun "
                             f"continues every run with its own options: give the same options, or another --out-dir")


def local_cpus(cpus_per_task: int, max_parallel: int) -> int:
    """The cores a local Ray gets: ``max_parallel`` tasks' worth, or (0) the machine's, so that as many runs train at
    once as the cores allow; never fewer than one task needs."""
    wanted = max_parallel * cpus_per_task if max_parallel else (os.cpu_count() or 1)
    return max(cpus_per_task, wanted)


def plan_cohort(config: TrainConfig, images: list[Path], labels: dict[str, Path] | None = None
                ) -> list[tuple[str, str, str]]:
    """What ``train_many`` would do, checked as it checks (options, earlier runs' options), without Ray and without
    writing: (run name, 'new' / 'resume' / 'skip', the image [and its label map]) per image."""
    config = config.validate()
    out_dir = check_encodable(config.out_dir, "output folder")
    names = [image_name(path) for path in images]
    check_rerun_options(config, out_dir, names)
    plan = []
    for name, path in zip(names, images):
        try:
            state = run_state(RunFolder.member_path(out_dir, name), config.num_scales)
        except ConsinganError as error:  # a damaged run fails as its own task when training
            state = f"fails: {error}"
        shown = str(path) + (f" + {labels[name]}" if labels and name in labels else "")
        plan.append((name, {"done": "skip (finished)", "resume": "resume"}.get(state, state), shown))
    return plan


def check_address(address: str) -> tuple[str, int] | None:
    """The host and port of ``--address`` ('host:port' or 'ray://host:port'), or None for a local Ray ('') and
    'auto'; a malformed address, or ray:// without Ray's client installed, is a one-line error."""
    if address in ("", "auto"):
        return None
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    try:
        parts = urllib.parse.urlsplit("//" + rest)
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number, or out of range
        host = port = None
    if not host or not port or "@" in rest or parts.path or parts.query or parts.fragment \
            or not re.fullmatch(r"[A-Za-z0-9._:-]+", host):
        raise ConsinganError(f"--address must be {ADDRESS_FORMS}, got {address!r}")
    if client and not ray_client_installed():
        raise ConsinganError(CLIENT_HINT)
    return host, port


def ray_client_installed() -> bool:
    """Whether Ray's client (ray[client]: grpcio) is importable, which ray:// addresses need."""
    return importlib.util.find_spec("grpc") is not None


def probe_address(address: str) -> None:
    """Fail in seconds when nothing listens at ``address`` (Ray itself retries for minutes)."""
    target = check_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=PROBE_SECONDS):
            pass
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise ConsinganError(f"no Ray cluster answers at --address {address}: {reason}") from None


def local_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def oversubscription(address: str, cpus_per_task: int, max_parallel: int) -> str:
    """A warning when the local Ray started here would promise more cores than this machine has ('' otherwise)."""
    if address:
        return ""  # a cluster's resources are its own; Ray places the tasks by them
    wanted, cores = max(1, max_parallel) * cpus_per_task, local_cores()
    if wanted <= cores:
        return ""
    asked = f"--max-parallel {max_parallel} x --cpus-per-task {cpus_per_task}" if max_parallel > 1 \
        else f"--cpus-per-task {cpus_per_task}"
    return (f"{asked} asks for {wanted} CPU cores but this machine has {cores}; the runs' threads will compete for "
            f"them (slower, not faster)")


def train_one(config: dict, image: str, name: str, threads: int, label: str = "") -> dict:
    """Train (or resume) one image's model; runs inside a Ray worker. Never raises: errors come back as text."""
    import torch

    from consingan.singan.trainer import resume, train

    torch.set_num_threads(max(1, threads))
    started = time.perf_counter()
    options = TrainConfig(**{**config, "image": image, "label": label, "run_name": name})
    run_dir = RunFolder.member_path(options.out_dir, name)
    try:
        state = run_state(run_dir, options.num_scales)
        if state == "done":
            return {"state": "skipped", "run_dir": str(run_dir), "seconds": 0.0}
        result = resume(run_dir) if state == "resume" else train(options)
        return {"state": "done", "run_dir": str(result.run_dir), "seconds": time.perf_counter() - started,
                "resumed": state == "resume"}
    except ConsinganError as error:
        return {"state": "failed", "error": str(error), "run_dir": str(run_dir) if run_dir.exists() else ""}
    except Exception as error:  # one image must not stop the cohort; its line says what happened
        return {"state": "failed", "error": f"{type(error).__name__}: {error}".splitlines()[0],
                "run_dir": str(run_dir) if run_dir.exists() else ""}


def _progress(run: CohortRun, out_dir: Path, num_scales: int) -> None:
    """A running task's scale, read from its run folder (none yet: the task waits for a worker, still 'starting')."""
    run_dir = RunFolder.member_path(out_dir, run.name)
    if not (run_dir / RunFolder.INFO).is_file():
        return
    try:
        done = len(RunFolder.open(run_dir, "singan").completed_scales())
    except ConsinganError:
        return
    if done >= num_scales:
        return  # trained before: the task only finds it finished (skipped)
    run.state = f"training scale {done}/{num_scales}"


def train_many(config: TrainConfig, images: list[Path], address: str = "", cpus_per_task: int = 1,
               max_parallel: int = 0, on_update: Callable[[list[CohortRun]], None] | None = None,
               on_warning: Callable[[str], None] | None = None,
               labels: dict[str, Path] | None = None) -> list[CohortRun]:
    """Train one model per image as Ray tasks; returns every run's outcome and keeps ``out_dir/cohort.json``
    current (rewritten each time a run finishes, so a killed cohort still has one).

    ``max_parallel`` caps the tasks running at once (0: as many as the cluster's resources allow). Every check
    (options, address, earlier runs' options) happens before anything is written; ``on_warning`` gets what is
    allowed but suspicious (default: ``warnings.warn``)."""
    try:
        import ray
    except ImportError:
        raise ConsinganError(INSTALL_HINT) from None
    config = config.validate()
    out_dir = check_encodable(config.out_dir, "output folder")
    labels = labels or {}
    runs = [CohortRun(image_name(p), str(p.resolve()),
                      str(labels[image_name(p)].resolve()) if image_name(p) in labels else "") for p in images]
    check_address(address)
    check_rerun_options(config, out_dir, [run.name for run in runs])
    started_here = not ray.is_initialized()
    if started_here:
        probe_address(address)
    warning = oversubscription(address, cpus_per_task, max_parallel)
    if warning:
        (on_warning or warnings.warn)(warning)
    if started_here:
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **({} if address else {"num_cpus": local_cpus(cpus_per_task, max_parallel)}))
        except (ConnectionError, RuntimeError, ValueError) as error:  # 'auto' with no cluster, a refused handshake
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConsinganError(f"cannot connect to Ray at --address {address or '(local)'}: {reason}") from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        options = {**config.to_dict(), "out_dir": str(out_dir.resolve())}
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=0)(train_one)
        update = on_update or (lambda _: None)
        waiting, pending = list(runs), {}
        limit = max_parallel or len(runs)
        while waiting or pending:
            while waiting and len(pending) < limit:
                run = waiting.pop(0)
                pending[task.remote(options, run.image, run.name, cpus_per_task, run.label)] = run
                run.state = "starting"
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for reference in ready:
                run = pending.pop(reference)
                outcome = ray.get(reference)
                run.state, run.run_dir = outcome["state"], outcome.get("run_dir", "")
                run.seconds, run.error = outcome.get("seconds", 0.0), outcome.get("error", "")
                run.resumed = outcome.get("resumed", False)
            for run in pending.values():
                _progress(run, out_dir, config.num_scales)
            if ready:
                write_summary(out_dir / SUMMARY, config, runs)
            update(runs)
    finally:
        if started_here:
            ray.shutdown()
    return runs


def write_summary(path: Path, config: TrainConfig, runs: list[CohortRun]) -> None:
    """The cohort's options and every run's state so far, written atomically (a kill leaves the last whole one)."""
    counts = {state: sum(r.state == state for r in runs) for state in ("done", "skipped", "failed")}
    save_json(path, {"counts": counts, "config": config.to_dict(), "runs": [dataclasses.asdict(r) for r in runs]})


@dataclass
class SampledRun:
    """One run's outcome in ``sample_many``: files written, why it could not sample, or why it never trained."""

    name: str
    files: int = 0
    error: str = ""
    training_error: str = ""  # cohort.json records the run as failed in training
    note: str = ""  # what sampling it used, when the run is unfinished


def training_failures(runs_dir: Path) -> dict[str, str]:
    """The runs that ``runs_dir/cohort.json`` records as failed in training, with their error lines ({} without a
    readable cohort.json: a folder of runs need not be a cohort)."""
    try:
        runs = json.loads((runs_dir / SUMMARY).read_text()).get("runs", [])
        return {str(r["name"]): str(r.get("error", "")) for r in runs if r.get("state") == "failed"}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return {}


def sample_many(runs_dir: Path, out: Path, num: int, seed: int = 0, device: str = "auto",
                progress: Callable[[str, int, int], None] | None = None, scale: int | None = None,
                **options: Any) -> list[SampledRun]:
    """``num`` samples (seed ``seed``, the same rule as ``consingan sample``; ``scale`` the pyramid's last scale to
    use and ``options`` those of ``write_samples``: retargeting, start scale, batch size, data type, tiles) from every
    single-image run folder
    under ``runs_dir``, into ``out/<run>/``; a run that cannot sample is reported and skipped, and so is one that
    cohort.json records as failed in training (with no run folder to sample). A failed write (a full disk, no room
    for ``num`` samples) stops the whole draw and leaves no ``out``; ``progress(run, done, num)`` follows each run."""
    from consingan.singan.sampler import TrainedPyramid, write_samples

    if not runs_dir.is_dir():
        raise ConsinganError(f"runs folder not found: {runs_dir}")
    if out_refusal(out):
        raise ConsinganError(f"--out {out_refusal(out)}")
    folders = [p for p in sorted(runs_dir.iterdir()) if (p / RunFolder.INFO).is_file()]
    if not folders:
        raise ConsinganError(f"{runs_dir} holds no run folders")
    failed = training_failures(runs_dir)
    results = [SampledRun(name, training_error=error) for name, error in failed.items()
               if name not in {folder.name for folder in folders}]
    with OutputFolder(out) as made:
        for folder in folders:
            outcome = SampledRun(folder.name, training_error=failed.get(folder.name, ""))
            report = None if progress is None else (lambda done, total, name=folder.name: progress(name, done, total))
            try:
                pyramid = TrainedPyramid.load(folder, device=device, scale=scale)
                outcome.note = " ".join(pyramid.notes)
                outcome.files = len(write_samples(pyramid, out / folder.name, num, seed=seed, progress=report,
                                                  **options))
            except OutputError:
                raise  # the next run would fail alike: stop, and keep nothing
            except ConsinganError as error:
                outcome.error = str(error)
            results.append(outcome)
        if not any(result.files for result in results):
            made.remove()  # nothing could be sampled: no empty --out either
    return sorted(results, key=lambda result: result.name)
