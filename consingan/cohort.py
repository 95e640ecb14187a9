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
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from consingan.config import TrainConfig
from consingan.errors import ConsinganError
from consingan.io import SUPPORTED_SUFFIXES, file_suffix
from consingan.runs import RunFolder

INSTALL_HINT = "Ray is not installed; install the optional extra: pip install -e '.[distributed]'"
SUMMARY = "cohort.json"


def image_name(path: Path) -> str:
    """The run name of an image: its file name without the image suffix ('case.01.nii.gz' -> 'case.01')."""
    suffix = file_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def find_images(spec: str) -> list[Path]:
    """The images of a folder (its files with a supported suffix, and DICOM series folders), or of a glob."""
    folder = Path(spec)
    if folder.is_dir():
        found = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and (
            (p.is_file() and file_suffix(p) in SUPPORTED_SUFFIXES) or p.is_dir())]
    else:
        found = [Path(p) for p in sorted(glob.glob(spec))]
    if not found:
        raise ConsinganError(f"no images found for --images {spec!r}")
    names: dict[str, Path] = {}
    for path in found:
        name = image_name(path)
        if name in names:
            raise ConsinganError(f"{names[name].name} and {path.name} would share the run folder {name!r}; rename one")
        names[name] = path
    return found


@dataclass
class CohortRun:
    """One image's place in the cohort, as the live table and the summary show it."""

    name: str
    image: str
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


def train_one(config: dict, image: str, name: str, threads: int) -> dict:
    """Train (or resume) one image's model; runs inside a Ray worker. Never raises: errors come back as text."""
    import torch

    from consingan.singan.trainer import resume, train

    torch.set_num_threads(max(1, threads))
    started = time.perf_counter()
    options = TrainConfig(**{**config, "image": image, "run_name": name})
    run_dir = Path(options.out_dir) / name
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
    """A running task's scale, read from its run folder."""
    run_dir = out_dir / run.name
    try:
        done = len(RunFolder.open(run_dir, "singan").completed_scales()) if (run_dir / RunFolder.INFO).is_file() else 0
    except ConsinganError:
        return
    run.state = f"training scale {min(done, num_scales - 1)}/{num_scales}"


def train_many(config: TrainConfig, images: list[Path], address: str = "", cpus_per_task: int = 1,
               max_parallel: int = 0, on_update: Callable[[list[CohortRun]], None] | None = None) -> list[CohortRun]:
    """Train one model per image as Ray tasks; returns every run's outcome and writes ``out_dir/cohort.json``.

    ``max_parallel`` caps the tasks running at once (0: as many as the cluster's resources allow)."""
    try:
        import ray
    except ImportError:
        raise ConsinganError(INSTALL_HINT) from None
    config = config.validate()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [CohortRun(image_name(p), str(p.resolve())) for p in images]
    options = {**config.to_dict(), "out_dir": str(out_dir.resolve())}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 **({} if address else {"num_cpus": max(cpus_per_task, (max_parallel or 1) * cpus_per_task)}))
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=0)(train_one)
        update = on_update or (lambda _: None)
        waiting, pending = list(runs), {}
        limit = max_parallel or len(runs)
        while waiting or pending:
            while waiting and len(pending) < limit:
                run = waiting.pop(0)
                pending[task.remote(options, run.image, run.name, cpus_per_task)] = run
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
            update(runs)
    finally:
        if started_here:
            ray.shutdown()
    write_summary(out_dir / SUMMARY, config, runs)
    return runs


def write_summary(path: Path, config: TrainConfig, runs: list[CohortRun]) -> None:
    counts = {state: sum(r.state == state for r in runs) for state in ("done", "skipped", "failed")}
    path.write_text(json.dumps({"counts": counts, "config": config.to_dict(),
                                "runs": [dataclasses.asdict(r) for r in runs]}, indent=2) + "\n")


@dataclass
class SampledRun:
    name: str
    files: int = 0
    error: str = ""


def sample_many(runs_dir: Path, out: Path, num: int, seed: int, device: str = "auto") -> list[SampledRun]:
    """``num`` samples (seed ``seed``, the same rule as ``consingan sample``) from every single-image run folder
    under ``runs_dir``, into ``out/<run>/``; a run that cannot sample is reported and skipped."""
    from consingan.singan.sampler import TrainedPyramid, write_samples

    if not runs_dir.is_dir():
        raise ConsinganError(f"runs folder not found: {runs_dir}")
    if out.exists():
        raise ConsinganError(f"{out} already exists; choose a new --out folder")
    folders = [p for p in sorted(runs_dir.iterdir()) if (p / RunFolder.INFO).is_file()]
    if not folders:
        raise ConsinganError(f"{runs_dir} holds no run folders")
    results = []
    for folder in folders:
        outcome = SampledRun(folder.name)
        try:
            pyramid = TrainedPyramid.load(folder, device=device)
            outcome.files = len(write_samples(pyramid, out / folder.name, num, seed=seed))
        except ConsinganError as error:
            outcome.error = str(error)
        results.append(outcome)
    return results
