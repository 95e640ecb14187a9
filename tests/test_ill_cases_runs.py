"""Ill cases of the run-folder infrastructure every command shares (issue 21): one writer per run folder, file
modes, huge --num, non-UTF-8 names, unfinished runs, full disks, logs without a terminal, constant samples.

Each case runs one command through the CLI and checks its answer: one line and exit 2 for bad input, nothing
written outside the output, nothing existing overwritten, no partial folder left behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from consingan.checkpoint import LOCK_NAME, _process_facts
from consingan.errors import ConsinganError
from consingan.runs import RunFolder
from tests.conftest import TINY, blobs
from tests.test_conditional import TINY_FLAGS as CONDITIONAL_FLAGS
from tests.test_conditional import write_set
from tests.test_ill_cases import (ONE_SCALE, PAIRED_TRAIN, _write_png, assert_clean_error, make_pairs, run_cli,
                                  snapshot)

NOT_UTF8 = os.fsdecode(b"caf\xe9")  # a Latin-1 name on a UTF-8 system, as Python holds it (surrogate escapes)


def _train_2d(root: Path, name: str, flags: list[str]) -> Path:
    from typer.testing import CliRunner

    image = root / "tiny.png"
    rgb = np.stack([blobs((32, 32), s) for s in range(3)], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray((rgb * 255).round().astype(np.uint8), isVector=True), str(image))
    result = run_cli(CliRunner(), ["train", "--image", image, "--dim", "2", "--out-dir", root / "out",
                                   "--run-name", name, *flags])
    assert result.exit_code == 0, result.output
    return root / "out" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny finished run of each family, trained once for the module; tests copy one before changing it."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("runs")
    singan = _train_2d(root, "singan", [*TINY, "--epochs", "2", "--preview-every", "0"])
    source, target = make_pairs(root)
    result = run_cli(CliRunner(), ["paired", "train", "--dim", "2", "--source", source, "--target", target, "--out-dir",
                                   root / "out", "--run-name", "paired", *PAIRED_TRAIN])
    assert result.exit_code == 0, result.output
    data = write_set(root / "classes", 2, (2, 2))
    result = run_cli(CliRunner(), ["conditional", "train", "--data", data, "--dim", "2", "--size", "16",
                                   "--out-dir", root / "out", "--run-name", "conditional", *CONDITIONAL_FLAGS])
    assert result.exit_code == 0, result.output
    return {"singan": singan, "paired": root / "out" / "paired", "conditional": root / "out" / "conditional",
            "masks": source, "classes": data}


def copy_run(runs: dict[str, Path], family: str, tmp_path: Path) -> Path:
    copy = tmp_path / family
    shutil.copytree(runs[family], copy)
    return copy


def _unfinish(run: Path, family: str) -> None:
    """Make a finished run look killed in training, so --resume has work to do."""
    if family == "singan":
        (run / "scale_01" / "scale.json").unlink()
    else:
        (run / "generator.pt").unlink()


def _resume_args(family: str, run: Path) -> list:
    return ["train", "--resume", run] if family == "singan" else [family, "train", "--resume", run]


# --- row 2: one writer per run folder ---------------------------------------------------------------------------------


def _write_lock(run: Path, pid: int, host: str | None = None) -> None:
    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                             "started": _process_facts(pid)[1], "folder": str(run.resolve())}))


@pytest.fixture
def living_process():
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


FAMILIES = ["singan", "paired", "conditional"]

LOCK_CASES = {
    "held by a living process on this host": ("living", "is being trained by PID"),
    "held by a process of another host": ("other host", "on host elsewhere.invalid"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(LOCK_CASES))
def test_resume_of_a_locked_run_is_refused(runner, runs, tmp_path, living_process, family, case):
    kind, phrase = LOCK_CASES[case]
    run = copy_run(runs, family, tmp_path)
    _unfinish(run, family)
    _write_lock(run, living_process.pid, "elsewhere.invalid" if kind == "other host" else None)
    before = snapshot(run)
    result = run_cli(runner, _resume_args(family, run))
    assert_clean_error(result, phrase)
    assert str(living_process.pid) in result.output
    assert snapshot(run) == before  # nothing trained, the lock kept


def _copied_lock(run: Path, living: int) -> None:
    _write_lock(run, living)
    holder = json.loads((run / LOCK_NAME).read_text())
    (run / LOCK_NAME).write_text(json.dumps({**holder, "folder": "/elsewhere/run"}))


STALE_CASES = {
    "its PID is not running (kill -9)": lambda run, living: _write_lock(run, _dead_pid()),
    "its PID is now another process": lambda run, living: (run / LOCK_NAME).write_text(json.dumps(
        {"pid": living, "host": socket.gethostname(), "started": "1", "folder": str(run.resolve())})),
    "copied with the folder from a run being trained": _copied_lock,
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(STALE_CASES))
def test_a_stale_lock_is_taken_over_with_a_note(runner, runs, tmp_path, living_process, family, case):
    run = copy_run(runs, family, tmp_path)
    _unfinish(run, family)
    STALE_CASES[case](run, living_process.pid)
    result = run_cli(runner, _resume_args(family, run))
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: took over the stale lock")]
    assert len(notes) == 1, result.output
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_the_lock_is_held_while_training_and_released_on_ctrl_c(runner, png_rgb, out_dir, monkeypatch):
    from consingan.singan import trainer

    seen = []
    original = trainer.SinGANTrainer.train_epoch

    def interrupted(self, stage, *args, **kwargs):
        seen.append(json.loads((self.run.path / LOCK_NAME).read_text()))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(self, stage, *args, **kwargs)

    monkeypatch.setattr(trainer.SinGANTrainer, "train_epoch", interrupted)
    result = run_cli(runner, ["train", "--image", png_rgb, "--dim", "2", "--out-dir", out_dir, *ONE_SCALE])
    assert result.exit_code == 130, result.output
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not list(out_dir.rglob(LOCK_NAME))


def test_the_lock_is_released_when_training_fails(runner, png_rgb, out_dir, monkeypatch):
    import consingan.checkpoint as checkpoint

    locked = []

    def full(state, stream):
        locked.append(bool(list(out_dir.rglob(LOCK_NAME))))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    result = run_cli(runner, ["train", "--image", png_rgb, "--dim", "2", "--out-dir", out_dir, *ONE_SCALE,
                              "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert locked == [True]  # held while writing, released after the failure
    assert not list(out_dir.rglob(LOCK_NAME))


def test_torchrun_ranks_stop_when_their_launcher_is_killed(runner, tmp_path):
    """kill -9 of the torchrun launcher: a --resume meanwhile is refused (rank 0 holds the lock), and every rank
    stops at the end of its epoch, releasing the lock."""
    source, target = make_pairs(tmp_path)
    run = tmp_path / "out" / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "log.txt").open("w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         shutil.which("consingan"), "paired", "train", "--dim", "2", "--source", str(source), "--target", str(target),
         "--out-dir", str(tmp_path / "out"), "--run-name", "ddp", "--model", "resnet", "--epochs", "100000",
         "--tile", "16", "--stride", "16", "--base-channels", "4", "--seed", "3", "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "losses.csv").is_file():
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()
            time.sleep(0.2)
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] != launcher.pid  # rank 0, not the launcher, holds the lock
        with pytest.raises(ConsinganError, match=f"is being trained by PID {holder['pid']} on this host"):
            RunFolder.open(run, "paired").acquire()  # what any --resume meets, whatever its world size
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 60
        while _process_facts(holder["pid"])[0]:
            assert time.monotonic() < deadline, "rank 0 kept training after its launcher was killed"
            time.sleep(0.2)
        assert not (run / LOCK_NAME).exists()
        assert "torchrun launcher" in (tmp_path / "log.txt").read_text()
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and the ranks it started (its session)
        except ProcessLookupError:
            pass
        launcher.wait()
        log.close()


# --- row 3: file modes follow the umask -------------------------------------------------------------------------------


UMASK = 0o027  # group may read, others nothing: neither mkstemp's 0600 nor the usual 0644


@pytest.fixture(scope="module")
def umask_runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """A single-image and a paired run trained under ``UMASK`` (and without a terminal): their folders and logs."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("umask")
    source, target = make_pairs(root)
    previous = os.umask(UMASK)
    try:
        image = _png(root / "image.png")
        singan = run_cli(CliRunner(), ["train", "--image", image, "--dim", "2", "--out-dir", root / "singan",
                                       *ONE_SCALE])
        paired = run_cli(CliRunner(), ["paired", "train", "--dim", "2", "--source", source, "--target", target, "--out-dir",
                                       root / "paired", *PAIRED_TRAIN])
    finally:
        os.umask(previous)
    assert singan.exit_code == 0 and paired.exit_code == 0, singan.output + paired.output
    return {"singan": (root / "singan", singan.output), "paired": (root / "paired", paired.output)}


@pytest.mark.parametrize("family, names", [
    ("singan", {"config.json", "run.json", "generator.pt", "critic.pt", "training_state.pt", "losses.csv",
                "scale.json"}),
    ("paired", {"config.json", "run.json", "generator.pt", "training_state.pt", "losses.csv"}),
])
def test_run_files_follow_the_umask(umask_runs, family, names):
    folder, _ = umask_runs[family]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.name in names}
    assert set(modes) == names
    assert set(modes.values()) == {0o666 & ~UMASK}, {name: oct(mode) for name, mode in modes.items()}


# --- row 4: huge or malformed --num -----------------------------------------------------------------------------------


def _little_disk(monkeypatch, free: int = 10 * 2**20) -> None:
    import consingan.outputs as outputs

    usage = shutil.disk_usage("/")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage._replace(free=free))


def _little_memory(monkeypatch) -> None:
    import consingan.metrics.evaluate as evaluate

    monkeypatch.setattr(evaluate, "available_bytes", lambda device: 50 * 2**20)


NUM_CASES = {
    "sample --num 1e11": ("sample {singan} --out {out} --num 1e11", None, "--num must be a whole number"),
    "sample --num 2.5": ("sample {singan} --out {out} --num 2.5", None, "--num must be a whole number"),
    "evaluate --num 1e11": ("evaluate {singan} --out {out} --num 1e11", None, "--num must be a whole number"),
    "sample-many --num 1e11": ("sample-many {runs} --out {out} --num 1e11", None, "--num must be a whole number"),
    "conditional sample --num 1e11": ("conditional sample {conditional} --out {out} --num 1e11", None,
                                      "--num must be a whole number"),
    "sample --num 1000000000, 10 MiB free": ("sample {singan} --out {out} --num 1000000000", _little_disk,
                                             "would take about"),
    "sample-many --num 1000000000, 10 MiB free": ("sample-many {runs} --out {out} --num 1000000000", _little_disk,
                                                  "would take about"),
    "conditional sample --num 10000000, 10 MiB free": ("conditional sample {conditional} --out {out} --num 10000000",
                                                       _little_disk, "would take about"),
    "evaluate --num 100000, 50 MiB free memory": ("evaluate {singan} --out {out} --num 100000", _little_memory,
                                                  "in memory"),
    "evaluate a conditional run --num 100000, 50 MiB free memory": (
        "evaluate {conditional} --out {out} --num 100000", _little_memory, "in memory"),
}


@pytest.mark.parametrize("case", list(NUM_CASES))
def test_huge_or_malformed_num(runner, runs, tmp_path, monkeypatch, case):
    command, setup, phrase = NUM_CASES[case]
    if setup is not None:
        setup(monkeypatch)
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copytree(runs["singan"], cohort / "singan")
    before = {name: snapshot(runs[name]) for name in FAMILIES}
    out = tmp_path / "samples"
    args = command.format(out=out, runs=cohort, **{k: str(v) for k, v in runs.items()}).split()
    started = time.monotonic()
    result = run_cli(runner, args)
    assert_clean_error(result, phrase)
    assert time.monotonic() - started < 30  # refused before the work, not after it
    assert not out.exists()
    assert {name: snapshot(runs[name]) for name in FAMILIES} == before


def test_samples_are_written_batch_by_batch_with_progress(runner, runs, tmp_path, monkeypatch):
    import consingan.singan.sampler as sampler
    import consingan.ui as ui

    monkeypatch.setattr(ui, "LOG_SECONDS", 0.0)
    counts = []
    original = sampler.write_outputs

    def counting(path, volume, **kwargs):
        counts.append(len(list(path.parent.glob("sample_*"))))  # files already on disk when each is written
        return original(path, volume, **kwargs)

    monkeypatch.setattr(sampler, "write_outputs", counting)
    result = run_cli(runner, ["sample", runs["singan"], "--out", tmp_path / "s", "--num", "20", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert counts == list(range(20))
    assert "wrote 8 of 20 samples" in result.output and "wrote 20 of 20 samples" in result.output


# --- row 5: file and folder names that are not UTF-8 ------------------------------------------------------------------


def _png(path: Path) -> Path:
    return _write_png(path, (blobs((32, 32), 3) * 255).astype(np.uint8))


def _bad_image(tmp: Path) -> Path:
    good = _png(tmp / "good.png")
    return Path(shutil.copy(good, tmp / f"{NOT_UTF8}.png"))


def _bad_pairs(tmp: Path) -> tuple[Path, Path]:
    source, target = make_pairs(tmp)
    for folder in (source, target):
        shutil.copy(folder / "cell.v0.png", folder / f"{NOT_UTF8}.png")
    return source, target


def _bad_classes(tmp: Path) -> Path:
    data = write_set(tmp / "classes", 2, (2, 2))
    (data / "dark").rename(data / NOT_UTF8)
    return data


def _bad_masks(runs: dict, tmp: Path) -> Path:
    folder = tmp / "masks"
    shutil.copytree(runs["masks"], folder)
    shutil.copy(folder / "cell.v0.png", folder / f"{NOT_UTF8}.png")
    return folder


UTF8_CASES = {
    "train --image": lambda runs, tmp: ["train", "--image", _bad_image(tmp), "--dim", "2", "--out-dir",
                                        tmp / "out", *ONE_SCALE],
    "train --out-dir": lambda runs, tmp: ["train", "--image", _png(tmp / "a.png"), "--dim", "2", "--out-dir",
                                          tmp / "out" / NOT_UTF8, *ONE_SCALE],
    "train --run-name": lambda runs, tmp: ["train", "--image", _png(tmp / "a.png"), "--dim", "2", "--out-dir",
                                           tmp / "out", "--run-name", NOT_UTF8, *ONE_SCALE],
    "train-many --out-dir": lambda runs, tmp: ["train-many", "--images", _png(tmp / "a.png").parent, "--dim", "2",
                                               "--out-dir", tmp / "out" / NOT_UTF8, *ONE_SCALE],
    "paired train --source": lambda runs, tmp: ["paired", "train", "--dim", "2", "--source", _bad_pairs(tmp)[0], "--target",
                                                tmp / "images", "--out-dir", tmp / "out", *PAIRED_TRAIN],
    "conditional train --data": lambda runs, tmp: ["conditional", "train", "--data", _bad_classes(tmp), "--dim", "2",
                                                   "--size", "16", "--out-dir", tmp / "out", *CONDITIONAL_FLAGS],
    "sample --out": lambda runs, tmp: ["sample", runs["singan"], "--out", tmp / "out" / NOT_UTF8, "--num", "2"],
    "sample --inject": lambda runs, tmp: ["sample", runs["singan"], "--out", tmp / "out", "--num", "2", "--inject",
                                          _bad_image(tmp)],
    "evaluate --out": lambda runs, tmp: ["evaluate", runs["singan"], "--out", tmp / "out" / NOT_UTF8, "--num", "2"],
    "evaluate --samples": lambda runs, tmp: ["evaluate", "--dim", "2", "--samples", _bad_image(tmp).parent, "--image",
                                             tmp / "good.png", "--out", tmp / "out"],
    "evaluate --image": lambda runs, tmp: ["evaluate", "--dim", "2", "--samples", runs["masks"], "--image", _bad_image(tmp),
                                           "--out", tmp / "out"],
    "paired predict --source": lambda runs, tmp: ["paired", "predict", runs["paired"], "--source",
                                                  _bad_masks(runs, tmp), "--out", tmp / "out"],
    "paired predict --out": lambda runs, tmp: ["paired", "predict", runs["paired"], "--source", runs["masks"],
                                               "--out", tmp / "out" / NOT_UTF8],
    "conditional sample --out": lambda runs, tmp: ["conditional", "sample", runs["conditional"], "--out",
                                                   tmp / "out" / NOT_UTF8, "--num", "2"],
    "sample-many --out": lambda runs, tmp: ["sample-many", runs["singan"].parent, "--out", tmp / "out" / NOT_UTF8,
                                            "--num", "2"],
}


@pytest.mark.parametrize("case", list(UTF8_CASES))
def test_names_that_are_not_utf8_are_refused_in_one_line(runner, runs, tmp_path, case):
    before = {name: snapshot(runs[name]) for name in FAMILIES}
    result = run_cli(runner, UTF8_CASES[case](runs, tmp_path))
    assert_clean_error(result, "is not valid UTF-8")
    assert "caf\\xe9" in result.output  # the name shown, its bad byte escaped
    assert not (tmp_path / "out").exists()
    assert {name: snapshot(runs[name]) for name in FAMILIES} == before


# --- row 8 (single-image): sampling an unfinished run -----------------------------------------------------------------


def _scale_1_cut_off(run: Path) -> None:
    """Killed at an epoch of scale 1: its training state is there, its scale.json (and final weights) not."""
    for name in ("scale.json", "generator.pt", "critic.pt", "losses.csv"):
        (run / "scale_01" / name).unlink()


def _scale_1_not_started(run: Path) -> None:
    shutil.rmtree(run / "scale_01")


UNFINISHED_CASES = {
    "sample, scale 1 cut off": ("sample", _scale_1_cut_off),
    "sample, scale 1 not started": ("sample", _scale_1_not_started),
    "sample-many, scale 1 cut off": ("sample-many", _scale_1_cut_off),
}


@pytest.mark.parametrize("case", list(UNFINISHED_CASES))
def test_sampling_an_unfinished_run_says_so_and_keeps_the_source_grid(runner, runs, tmp_path, case):
    command, damage = UNFINISHED_CASES[case]
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    run = cohort / "singan"
    shutil.copytree(runs["singan"], run)
    damage(run)
    out = tmp_path / "samples"
    result = run_cli(runner, [command, run if command == "sample" else cohort, "--out", out, "--num", "2"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "unfinished: 1 of 2 scales trained" in notes[0] and "scale 0" in notes[0], notes
    sample = out / ("sample_0000.png" if command == "sample" else "singan/sample_0000.png")
    assert sitk.ReadImage(str(sample)).GetSize() == (32, 32)  # on the source grid, not the coarse scale's


@pytest.mark.parametrize("damage", [_scale_1_cut_off, _scale_1_not_started], ids=["cut off", "not started"])
def test_evaluating_an_unfinished_run_says_so(runner, runs, tmp_path, damage):
    """evaluate judges the last completed scale of an unfinished run: a note says so, and evaluation.json keeps it."""
    run = tmp_path / "singan"
    shutil.copytree(runs["singan"], run)
    damage(run)
    out = tmp_path / "report"
    result = run_cli(runner, ["evaluate", run, "--out", out, "--num", "2"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "unfinished: 1 of 2 scales trained" in notes[0], result.output
    assert "unfinished" in json.loads((out / "evaluation.json").read_text())["notes"][0]


def test_a_finished_run_samples_without_a_note(runner, runs, tmp_path):
    result = run_cli(runner, ["sample", runs["singan"], "--out", tmp_path / "s", "--num", "2"])
    assert result.exit_code == 0 and "note:" not in result.output, result.output


# --- row 12 (infrastructure): full disks, and --out checked first -----------------------------------------------------


def _full_itk(monkeypatch) -> None:
    """Every image write fills the disk after a few bytes (a partial file is left, as a real full disk does)."""
    import consingan.io.volume as volume

    def full(path, *args):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(volume, "_write_itk", full)


def _full_fsync(monkeypatch) -> None:
    """Every run-file write (evaluation.json) fails as on a full disk."""
    import consingan.checkpoint as checkpoint

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)


FULL_DISK_CASES = {
    "sample": ("sample {singan} --out {out} --num 3", _full_itk),
    "sample into an existing folder": ("sample {singan} --out {existing} --num 3", _full_itk),
    "sample-many": ("sample-many {cohort} --out {out} --num 3", _full_itk),
    "evaluate": ("evaluate {singan} --out {out} --num 2", _full_fsync),
    "evaluate (default --out inside the run)": ("evaluate {singan} --num 2", _full_fsync),
    "paired predict": ("paired predict {paired} --source {masks} --out {out}", _full_itk),
    "paired predict into an existing folder": ("paired predict {paired} --source {masks} --out {existing}",
                                               _full_itk),
    "conditional sample": ("conditional sample {conditional} --out {out} --num 3", _full_itk),
}


@pytest.mark.parametrize("case", list(FULL_DISK_CASES))
def test_a_full_disk_ends_in_one_line_and_leaves_no_partial_output(runner, runs, tmp_path, monkeypatch, case):
    command, fill = FULL_DISK_CASES[case]
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copytree(runs["singan"], cohort / "singan")
    singan = tmp_path / "singan"
    shutil.copytree(runs["singan"], singan)
    existing = tmp_path / "existing"  # an empty folder given as --out: kept, and empty again after the failure
    existing.mkdir()
    before = {"singan": snapshot(singan), "existing": snapshot(existing)}
    out = tmp_path / "out"
    fill(monkeypatch)
    values = {**{k: str(v) for k, v in runs.items()}, "singan": singan, "cohort": cohort, "out": out,
              "existing": existing}
    result = run_cli(runner, command.format(**values).split())
    assert_clean_error(result, "No space left on device")
    assert not out.exists()
    assert {"singan": snapshot(singan), "existing": snapshot(existing)} == before


def test_evaluate_samples_checks_out_before_measuring(runner, runs, tmp_path, monkeypatch):
    import consingan.metrics.evaluate as evaluate

    def never(*args, **kwargs):
        raise AssertionError("measured before checking --out")

    monkeypatch.setattr(evaluate, "compute_measures", never)
    existing = tmp_path / "report"
    existing.mkdir()
    (existing / "evaluation.json").write_text("{}")  # an earlier report
    result = run_cli(runner, ["evaluate", "--dim", "2", "--samples", runs["masks"], "--image",
                              runs["masks"] / "cell.v0.png", "--out", existing])
    assert_clean_error(result, "already holds files")
    assert (existing / "evaluation.json").read_text() == "{}"


# --- row 15 (single-image): progress lines without a terminal ---------------------------------------------------------


def test_train_without_a_terminal_prints_progress_lines(umask_runs, monkeypatch):
    _, output = umask_runs["singan"]
    lines = [line for line in output.splitlines() if line.startswith("scale 0 epoch")]
    # The first and the last epoch of the scale (and one every LOG_SECONDS between), each with losses and seconds.
    assert [line.split(":")[0] for line in lines] in (["scale 0 epoch 1/3", "scale 0 epoch 3/3"],
                                                      ["scale 0 epoch 1/3", "scale 0 epoch 2/3",
                                                       "scale 0 epoch 3/3"]), output
    assert all("rec" in line and line.endswith(" s)") for line in lines)


# --- row 16: constant samples are evaluated, as a collapse ------------------------------------------------------------


def test_evaluate_samples_reports_constant_samples_as_collapse(runner, tmp_path):
    image = _png(tmp_path / "image.png")
    samples = tmp_path / "samples"
    samples.mkdir()
    for index in range(4):
        _write_png(samples / f"s{index}.png", np.full((32, 32), 128, np.uint8))
    result = run_cli(runner, ["evaluate", "--dim", "2", "--samples", samples, "--image", image, "--out", tmp_path / "report"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert evaluation["verdict"]["label"] == "collapse", evaluation["verdict"]


def test_evaluate_samples_still_refuses_a_constant_training_image(runner, runs, tmp_path):
    image = _write_png(tmp_path / "flat.png", np.full((32, 32), 7, np.uint8))
    result = run_cli(runner, ["evaluate", "--dim", "2", "--samples", runs["masks"], "--image", image, "--out", tmp_path / "r"])
    assert_clean_error(result, "nothing to learn")
    assert not (tmp_path / "r").exists()


def test_an_unexpected_error_keeps_its_own_traceback(runner, tmp_path, monkeypatch):
    """The last guard of the CLI must not mask a bug: typer's own click copy has no Abort, so naming it in an except
    clause turned every unexpected exception into "no attribute 'Abort'" (seen with a symlink loop in train-many)."""
    import consingan.cohort as cohort

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cohort, "find_images", boom)
    result = run_cli(runner, ["train-many", "--images", tmp_path, "--out-dir", tmp_path / "out"])
    assert isinstance(result.exception, RuntimeError) and "boom" in str(result.exception), repr(result.exception)


OUT_COMMANDS = {
    "sample": "sample {singan} --num 1 --out {out}",
    "sample-many": "sample-many {cohort} --num 1 --out {out}",
    "evaluate": "evaluate {singan} --num 2 --out {out}",
    "paired predict": "paired predict {paired} --source {masks} --out {out}",
    "conditional sample": "conditional sample {conditional} --num 1 --out {out}",
}


@pytest.mark.parametrize("command", list(OUT_COMMANDS))
@pytest.mark.parametrize("state", ["empty", "holds a file", "is a file"])
def test_every_out_follows_one_rule(runner, runs, tmp_path, command, state):
    """--out is a new folder or an empty one, in every command: one that holds anything, or a file, is refused
    before anything is written, and left as it was."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copytree(runs["singan"], cohort / "singan")
    out = tmp_path / "out"
    if state == "is a file":
        out.write_text("mine")
    else:
        out.mkdir()
        if state == "holds a file":
            (out / "mine.txt").write_text("mine")
    before = snapshot(tmp_path / "out") if out.is_dir() else out.read_text()
    values = {**{k: str(v) for k, v in runs.items()}, "cohort": cohort, "out": out}
    result = run_cli(runner, OUT_COMMANDS[command].format(**values).split())
    if state == "empty":
        assert result.exit_code == 0, result.output
        assert any(out.iterdir())
        return
    assert_clean_error(result, "already holds files" if state == "holds a file" else "is a file")
    assert (snapshot(out) if out.is_dir() else out.read_text()) == before
