"""Ill cases of the cohort commands (issue 21 rows 7, 11, 13, 14, 15), as tables: one line, nothing written.

Ray is replaced by ``FakeRay``, which runs each task in this process (starting a real Ray costs seconds; the real one
is exercised in tests/test_cohort.py), so every case also shows whether ``ray.init`` was reached at all.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from consingan import cohort
from tests.conftest import TINY, assert_clean_failure, blobs
from tests.test_ill_cases import assert_clean_error, run_cli, snapshot


class FakeTask:
    def __init__(self, function, args) -> None:
        self.function, self.args, self.polled, self.result = function, args, False, None


class FakeRay:
    """Ray's API as ``train_many`` uses it, in this process. A task's first poll finds it still running (as a real
    one would be), its second runs it; before running it, what cohort.json holds is recorded."""

    def __init__(self) -> None:
        self.inits: list[dict] = []
        self.started = False
        self.init_error: Exception | None = None
        self.summaries: list[dict | None] = []  # cohort.json as each task starts (None: not written yet)

    def is_initialized(self) -> bool:
        return self.started

    def init(self, **options) -> None:
        self.inits.append(options)
        if self.init_error is not None:
            raise self.init_error
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def cluster_resources(self) -> dict:
        return {"CPU": 2.0}

    def remote(self, **resources):
        return lambda function: SimpleNamespace(remote=lambda *args: FakeTask(function, args))

    def wait(self, tasks, num_returns=1, timeout=None):
        task = tasks[0]
        if not task.polled:
            task.polled = True
            return [], tasks
        summary = Path(task.args[0]["out_dir"]) / cohort.SUMMARY
        self.summaries.append(json.loads(summary.read_text()) if summary.is_file() else None)
        task.result = task.function(*task.args)
        return [task], tasks[1:]

    def get(self, task):
        return task.result


def _install(monkeypatch) -> FakeRay:
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    return fake


@pytest.fixture
def fake_ray(monkeypatch):
    yield _install(monkeypatch)
    torch.set_num_threads(2)  # train_one set a worker's thread count, here in the test process


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray((blobs((32, 32), seed) * 255).round().astype(np.uint8)), str(path))
    return path


def _command(images, out, *extra) -> list:
    return ["train-many", "--images", images, "--dim", "2", *TINY, "--device", "cpu", "--out-dir", out, *extra]


@pytest.fixture(scope="module")
def trained_cohort(tmp_path_factory):
    """A 2D cohort trained once (one run at a time): two images, a broken one, and a sub-folder that is no image."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("cohort")
    images = root / "images"
    for index in range(2):
        _png(images / f"case{index}.png", index)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    _png(images / "extra" / "inside.png")  # 2D images are files: this folder is skipped, not a failed image
    with pytest.MonkeyPatch.context() as patch:
        fake = _install(patch)
        result = run_cli(CliRunner(), _command(images, root / "out", "--max-parallel", "1"))
    torch.set_num_threads(2)
    return SimpleNamespace(images=images, out=root / "out", result=result, fake=fake)


# --- rows 14 and 15: what a cohort run prints and writes without a terminal -------------------------------------------


def test_a_cohort_logs_each_run_skips_sub_folders_and_keeps_cohort_json_current(trained_cohort):
    result, fake = trained_cohort.result, trained_cohort.fake
    assert result.exit_code == 1, result.output  # broken.png failed; the others finished
    summary = json.loads((trained_cohort.out / cohort.SUMMARY).read_text())
    assert {r["name"]: r["state"] for r in summary["runs"]} == {"broken": "failed", "case0": "done", "case1": "done"}
    lines = result.output.splitlines()
    for name in ("case0", "case1"):  # a line as each run starts and one as it finishes
        started = lines.index(f"{name}: starting")
        assert any(line.startswith(f"{name}: done (") for line in lines[started + 1:]), result.output
    assert any(line.startswith("broken: failed: ") and "broken.png" in line for line in lines), result.output
    # cohort.json is rewritten as each run finishes, not only at the end: each task found its predecessors in it.
    assert fake.summaries[0] is None
    assert [sum(s["counts"].values()) for s in fake.summaries[1:]] == [1, 2]
    assert not list(trained_cohort.out.glob("*.tmp"))


@pytest.fixture
def cohort_copy(trained_cohort, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(trained_cohort.out, copy)
    return copy


# --- train-many: refusals (one line, exit 2, within seconds, nothing written, Ray never started) ---------------------


def _one_image(ctx) -> Path:
    return _png(ctx.tmp_path / "images" / "case0.png").parent


def _address(address: str, client: bool = True):
    def make(ctx):
        ctx.monkeypatch.setattr(cohort, "ray_client_installed", lambda: client)
        return _command(_one_image(ctx), ctx.tmp_path / "out", "--address", address)
    return make


def _auto_without_cluster(ctx):
    # What ray.init raises (in milliseconds) for 'auto' when no cluster runs on this machine.
    ctx.fake.init_error = ConnectionError("Could not find any running Ray instance. Please specify the one to "
                                          "connect to by setting `--address` flag or `RAY_ADDRESS` environment "
                                          "variable.\nsecond line")
    return _command(_one_image(ctx), ctx.tmp_path / "out", "--address", "auto")


def _same_stem_in_one_folder(ctx):
    folder = ctx.tmp_path / "scans"
    folder.mkdir()
    for name in ("a.nii.gz", "a.mha"):
        (folder / name).write_bytes(b"")
    ctx.phrases = [str(folder / "a.nii.gz"), str(folder / "a.mha"), "'a'"]
    return _command(folder, ctx.tmp_path / "out")


def _same_name_in_two_folders(ctx):
    first, second = _png(ctx.tmp_path / "site1" / "a.png"), _png(ctx.tmp_path / "site2" / "a.png")
    ctx.phrases = [str(first), str(second)]
    return _command(f"{ctx.tmp_path}/site*/a.png", ctx.tmp_path / "out")


def _link_in_images(target: str | None, glob: bool):
    """--images a link loop itself, or a glob that matches a looping or dangling link beside a real image."""
    def make(ctx):
        folder = _one_image(ctx)
        link = folder / "bad.png"
        link.symlink_to(target or link.name)  # None: a link to itself (a loop)
        ctx.phrases = [str(link)]
        return _command(f"{folder}/*.png" if glob else link, ctx.tmp_path / "out")
    return make


def _rerun_with(*flags: str):
    def make(ctx):
        return _command(ctx.trained.images, ctx.cohort_copy, *flags)
    return make


TRAIN_MANY_CASES = {
    "address nobody listens at": (_address("127.0.0.1:1"), ["no Ray cluster answers at --address 127.0.0.1:1"]),
    "ray:// nobody listens at": (_address("ray://127.0.0.1:1"),
                                 ["no Ray cluster answers at --address ray://127.0.0.1:1"]),
    "ray:// without ray[client]": (_address("ray://127.0.0.1:1", client=False), ["pip install 'ray[client]'"]),
    "auto with no cluster": (_auto_without_cluster,
                             ["cannot connect to Ray at --address auto: Could not find any running Ray instance"]),
    "address foo:bar:baz": (_address("foo:bar:baz"), ["--address must be 'auto', 'host:port' or 'ray://host:port'"]),
    "address :99999": (_address(":99999"), ["--address must be", "':99999'"]),
    "address http://x": (_address("http://x"), ["--address must be", "'http://x'"]),
    "same stem, two suffixes": (_same_stem_in_one_folder, ["would share the run folder"]),
    "same name in two folders of a glob": (_same_name_in_two_folders, ["would share the run folder"]),
    "--images a symbolic link loop": (_link_in_images(None, glob=False), ["is a symbolic link loop or a link to"]),
    "glob matching a link loop": (_link_in_images(None, glob=True), ["is a symbolic link loop or a link to"]),
    "glob matching a dangling link": (_link_in_images("nowhere.png", glob=True), ["a link to nothing"]),
    "rerun with other epochs": (_rerun_with("--epochs", "4"), ["case0", "--epochs 3 (now 4)"]),
    "rerun with other epochs and seed": (_rerun_with("--epochs", "4", "--seed", "1"),
                                         ["--epochs 3 (now 4)", "--seed 0 (now 1)", "(and 1 more runs)"]),
}


@pytest.mark.parametrize("case", list(TRAIN_MANY_CASES))
def test_train_many_ill_cases(runner, fake_ray, monkeypatch, trained_cohort, tmp_path, case):
    make, phrases = TRAIN_MANY_CASES[case]
    ctx = SimpleNamespace(tmp_path=tmp_path, monkeypatch=monkeypatch, fake=fake_ray, trained=trained_cohort,
                          cohort_copy=tmp_path / "out", phrases=[])
    if case.startswith("rerun"):
        shutil.copytree(trained_cohort.out, ctx.cohort_copy)
    command = make(ctx)
    before = snapshot(tmp_path)
    started = time.monotonic()
    result = run_cli(runner, command)
    assert time.monotonic() - started < 10  # Ray's own retries on a dead address take minutes
    for phrase in [*phrases, *ctx.phrases]:
        assert_clean_error(result, phrase)
    assert snapshot(tmp_path) == before  # cohort.json included: a refused rerun records nothing
    assert [init["address"] for init in fake_ray.inits] == (["auto"] if case == "auto with no cluster" else [])


def test_a_rerun_with_the_same_options_and_another_device_skips_the_finished_runs(runner, fake_ray, trained_cohort,
                                                                                   cohort_copy):
    command = _command(trained_cohort.images, cohort_copy)
    command[command.index("cpu")] = "auto"  # --device may change, as with --resume
    result = run_cli(runner, command)
    summary = json.loads((cohort_copy / cohort.SUMMARY).read_text())
    assert {r["name"]: r["state"] for r in summary["runs"]} == {"broken": "failed", "case0": "skipped",
                                                                 "case1": "skipped"}, result.output


# --- train-many: warnings (one line naming what, and the cohort goes on) ---------------------------------------------

CORES = cohort.local_cores()
WARNING_CASES = {
    "cpus per task above the cores": (["--cpus-per-task", str(CORES + 98)],
                                      f"--cpus-per-task {CORES + 98} asks for {CORES + 98} CPU cores but this "
                                      f"machine has {CORES}", CORES + 98),
    "max parallel x cpus per task above the cores": (["--max-parallel", str(CORES + 1), "--cpus-per-task", "2"],
                                                     f"--max-parallel {CORES + 1} x --cpus-per-task 2 asks for "
                                                     f"{2 * CORES + 2} CPU cores but this machine has {CORES}",
                                                     2 * CORES + 2),
}


@pytest.mark.parametrize("case", list(WARNING_CASES))
def test_train_many_warnings(runner, fake_ray, trained_cohort, cohort_copy, case):
    flags, phrase, cores = WARNING_CASES[case]
    result = run_cli(runner, _command(trained_cohort.images, cohort_copy, *flags))
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and phrase in warnings[0], result.output
    assert fake_ray.inits[0]["num_cpus"] == cores  # the local Ray still gets what was asked for
    assert_clean_failure(result, exit_code=1, one_line=False)  # broken.png fails again; the others skip


def test_no_warning_within_the_cores(runner, fake_ray, trained_cohort, cohort_copy):
    result = run_cli(runner, _command(trained_cohort.images, cohort_copy, "--cpus-per-task", "1"))
    assert "warning:" not in result.output, result.output


# --- sample-many: exit codes and notices -----------------------------------------------------------------------------


def _damage_case1(out: Path) -> None:
    (out / "case1" / "scale_01" / "generator.pt").write_bytes(b"not a checkpoint")


SAMPLE_MANY_CASES = {
    # A run failed in training (cohort.json says so): named, though the others sampled.
    "a run failed in training": (None, 0, ["case0", "case1"], "warning: 1 run(s) failed in training"),
    "a run cannot sample": (_damage_case1, 1, ["case0"], "1 could not sample"),
}


@pytest.mark.parametrize("case", list(SAMPLE_MANY_CASES))
def test_sample_many_reports_every_run(runner, cohort_copy, tmp_path, case):
    damage, code, sampled, phrase = SAMPLE_MANY_CASES[case]
    if damage:
        damage(cohort_copy)
    out = tmp_path / "samples"
    result = run_cli(runner, ["sample-many", cohort_copy, "--num", "1", "--seed", "3", "--out", out,
                              "--device", "cpu"])
    if code == 0:
        assert result.exit_code == 0 and result.exception is None, result.output
    else:
        assert_clean_failure(result, exit_code=code, one_line=False)
    assert phrase in result.output, result.output
    assert any(line.startswith("warning:") and line.endswith(": broken") for line in result.output.splitlines())
    assert sorted(p.name for p in out.iterdir()) == sampled
    if damage:
        assert any(line.startswith("case1: ") for line in result.output.splitlines()), result.output


def test_sample_many_takes_the_options_of_sample(runner, cohort_copy, tmp_path):
    """Retargeting, the source's data type, the batch size and the pyramid's scale apply to every run, as in sample."""
    import SimpleITK as sitk

    out = tmp_path / "samples"
    result = run_cli(runner, ["sample-many", cohort_copy, "--num", "2", "--seed", "3", "--out", out, "--device", "cpu",
                              "--shape", "40,24", "--source-dtype", "--batch-size", "1", "--use-scale", "0"])
    assert result.exit_code == 0 and result.exception is None, result.output
    for run in ("case0", "case1"):
        files = sorted((out / run).glob("sample_*.png"))
        assert len(files) == 2
        image = sitk.ReadImage(str(files[0]))
        assert image.GetSize()[::-1] == (40, 24) and image.GetPixelIDTypeAsString() == "8-bit unsigned integer"
    result = run_cli(runner, ["sample-many", cohort_copy, "--num", "1", "--out", tmp_path / "bad", "--scale", "0"])
    assert_clean_failure(result)
    assert not (tmp_path / "bad").exists()


def _label_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray((blobs((32, 32), seed) > 0.5).astype(np.uint8)), str(path))
    return path


def test_train_many_trains_each_image_with_its_label_map(runner, fake_ray, tmp_path):
    from consingan.runs import RunFolder

    for index in range(2):
        _png(tmp_path / "images" / f"case{index}.png", index)
        _label_png(tmp_path / "labels" / f"case{index}.png", index)
    out = tmp_path / "out"
    result = run_cli(runner, _command(tmp_path / "images", out, "--labels", tmp_path / "labels"))
    assert result.exit_code == 0 and result.exception is None, result.output
    assert fake_ray.inits[0]["num_cpus"] == max(1, os.cpu_count() or 1)  # the machine's cores by default
    for index in range(2):
        run = RunFolder.open(out / f"case{index}", "singan")
        assert Path(run.config.label).name == f"case{index}.png" and run.info.labels is not None
    samples = tmp_path / "samples"
    assert run_cli(runner, ["sample-many", out, "--num", "1", "--out", samples, "--device", "cpu"]).exit_code == 0
    assert (samples / "case0" / "sample_0000_label.png").is_file()


def test_train_many_refuses_images_without_label_maps_before_starting(runner, fake_ray, tmp_path):
    for index in range(2):
        _png(tmp_path / "images" / f"case{index}.png", index)
    _label_png(tmp_path / "labels" / "case0.png")
    _label_png(tmp_path / "labels" / "other.png")
    result = run_cli(runner, _command(tmp_path / "images", tmp_path / "out", "--labels", tmp_path / "labels"))
    assert_clean_failure(result, "no label map for case1; no image for other")
    assert not fake_ray.inits and not (tmp_path / "out").exists()


def test_train_many_dry_run_plans_each_image_and_writes_nothing(runner, fake_ray, trained_cohort, cohort_copy,
                                                                 tmp_path):
    images = tmp_path / "images"
    shutil.copytree(trained_cohort.images, images)
    _png(images / "case9.png", 9)
    before = snapshot(cohort_copy)
    result = run_cli(runner, _command(images, cohort_copy, "--dry-run"))
    assert result.exit_code == 0 and result.exception is None, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ case")}
    assert "skip (finished)" in rows["case0"] and "new" in rows["case9"], result.output
    assert "4 images; nothing written" in result.output  # broken.png too: it fails when it trains
    assert not fake_ray.inits and snapshot(cohort_copy) == before
    refused = run_cli(runner, _command(images, cohort_copy, "--dry-run", "--epochs", "9"))
    assert_clean_failure(refused, "was trained with other options")
