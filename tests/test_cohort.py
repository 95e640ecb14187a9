"""Cohorts on a local Ray: one model per image, a bad image isolated, reruns skip and resume, sample-many."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import TINY, blobs
from tests.test_ill_cases import assert_clean_error, run_cli

ray = pytest.importorskip("ray", reason="the optional 'distributed' extra (Ray) is not installed")


def write_cohort(folder):
    import SimpleITK as sitk

    folder.mkdir()
    for index in range(2):
        pixels = (blobs((32, 32), index) * 255).round().astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(pixels), str(folder / f"case{index}.png"))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return folder


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting one takes seconds); train_many uses it as it finds it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_a_cohort_trains_each_image_isolates_failures_and_reruns_idempotently(local_ray, runner, tmp_path):
    images, out = write_cohort(tmp_path / "images"), tmp_path / "out"
    command = ["train-many", "--images", images, "--dim", "2", *TINY, "--device", "cpu", "--out-dir", out,
               "--max-parallel", "2"]
    result = run_cli(runner, command)
    assert result.exit_code == 1, result.output  # one image failed; the others finished
    summary = json.loads((out / "cohort.json").read_text())
    states = {r["name"]: r["state"] for r in summary["runs"]}
    assert states == {"broken": "failed", "case0": "done", "case1": "done"}
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    assert "broken.png" in next(r["error"] for r in summary["runs"] if r["name"] == "broken")
    for name in ("case0", "case1"):
        assert (out / name / "scale_01" / "scale.json").is_file()
    # A rerun skips the finished runs and resumes one whose last scale was cut short.
    shutil.rmtree(out / "case1" / "scale_01")
    result = run_cli(runner, command)
    summary = json.loads((out / "cohort.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert runs["case0"]["state"] == "skipped"
    assert runs["case1"]["state"] == "done" and runs["case1"]["resumed"] is True
    assert (out / "case1" / "scale_01" / "scale.json").is_file()
    # Augmentations from every run of the cohort; the failed image has no run folder to sample.
    result = run_cli(runner, ["sample-many", out, "--num", "2", "--seed", "5", "--out", tmp_path / "samples"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["case0", "case1"]
    assert len(list((tmp_path / "samples" / "case0").glob("*.png"))) >= 2


def test_cohort_input_errors_are_one_line(runner, tmp_path):
    result = run_cli(runner, ["train-many", "--images", tmp_path / "nothing*.png", "--dim", "2"])
    assert_clean_error(result, "no images found")
    images = tmp_path / "twins"
    images.mkdir()
    for suffix in (".png", ".npy"):
        (images / f"same{suffix}").write_bytes(b"")
    result = run_cli(runner, ["train-many", "--images", images, "--dim", "2"])
    assert_clean_error(result, "would share the run folder")


def test_without_ray_the_command_says_how_to_install_it(runner, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = run_cli(runner, ["train-many", "--images", write_cohort(tmp_path / "images"), "--dim", "2",
                              "--out-dir", tmp_path / "out"])
    assert_clean_error(result, "pip install -e '.[distributed]'")
