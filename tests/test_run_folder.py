"""Self-contained run folders: a single-image run keeps its training files and writes run.json with the folder, so a
moved run resumes and is evaluated, a run stopped at any moment resumes, and run.json says its format and versions."""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import platform
import shutil
import stat
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

import consingan
import consingan.runs as runs
import consingan.singan.trainer as trainer_module
from consingan.checkpoint import load_state
from consingan.cli import app
from consingan.cohort import run_state
from consingan.config import TrainConfig
from consingan.errors import ConsinganError
from consingan.io import read_volume
from consingan.metrics.evaluate import EvaluateConfig, evaluate
from consingan.runs import RunFolder
from consingan.singan.trainer import resume, train
from tests.conftest import StopAt, blobs


def write_picture(path: Path, seed: int = 0) -> Path:
    import SimpleITK as sitk

    rgb = np.stack([blobs((32, 32), seed + s) for s in range(3)], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray((rgb * 255).round().astype(np.uint8), isVector=True), str(path))
    return path


def write_label(path: Path) -> Path:
    """Two classes on the picture's 32 x 32 grid (a .npy has the geometry a PNG gets)."""
    np.save(path, (blobs((32, 32), 7) > 0.5).astype(np.uint8))
    return path


def tiny_2d(image: Path, out_dir: Path, name: str, **changes) -> TrainConfig:
    return TrainConfig(image=str(image), dimension=2, epochs=2, num_scales=2, num_feature_channels=8, num_layers=2,
                       min_size=10, preview_every=0, checkpoint_every=1, Dsteps=2, Gsteps=2, seed=3, device="cpu",
                       out_dir=str(out_dir), run_name=name, **changes)


def final_weights(run_dir: Path) -> dict:
    return load_state(run_dir / "scale_01" / "generator.pt")


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


UMASK = 0o027


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, training image) of one finished tiny run, trained under a umask that is not the default."""
    root = tmp_path_factory.mktemp("finished")
    image = write_picture(root / "tiny.png")
    previous = os.umask(UMASK)
    try:
        result = train(tiny_2d(image, root / "out", "run"))
    finally:
        os.umask(previous)
    return result.run_dir, image


def copy_of(run_dir: Path, where: Path) -> Path:
    return Path(shutil.copytree(run_dir, where / run_dir.name))


def test_a_moved_run_resumes_and_evaluates_without_its_original_files(tmp_path, runner):
    image, label = write_picture(tmp_path / "tiny.png"), write_label(tmp_path / "tiny_label.npy")
    reference = train(tiny_2d(image, tmp_path / "out", "whole", label=str(label)))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_2d(image, tmp_path / "out", "cut", label=str(label)), reporter=StopAt(1, 1))
    moved = tmp_path / "elsewhere" / "cut"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "out" / "cut"), str(moved))
    image.rename(tmp_path / "renamed.png")
    label.unlink()

    result = resume(moved)
    assert result.run_dir == moved and [s.stage for s in result.scales] == [0, 1]
    assert_same_weights(final_weights(reference.run_dir), final_weights(moved))  # trained on the same image

    out = tmp_path / "evaluation"
    evaluated = runner.invoke(app, ["evaluate", str(moved), "--out", str(out), "--num", "2", "--device", "cpu"],
                              terminal_width=200)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["run"] == str(moved.resolve()) and report["shape"] == [32, 32]


@contextlib.contextmanager
def moved_aside(image: Path) -> Iterator[None]:
    """The training image moved away for the duration (the module's finished run shares it)."""
    aside = image.with_name(image.name + ".aside")
    image.rename(aside)
    try:
        yield
    finally:
        aside.rename(image)


def test_a_run_whose_files_are_all_gone_says_where_it_looked(finished, tmp_path):
    run_dir = copy_of(finished[0], tmp_path)
    shutil.rmtree(run_dir / "source")
    with moved_aside(finished[1]):
        with pytest.raises(ConsinganError) as error:
            evaluate(run_dir, EvaluateConfig(num=2, device="cpu"))
    message = str(error.value)
    assert "\n" not in message and str(run_dir / "source" / "image") in message and str(finished[1]) in message


def test_a_run_stopped_right_after_its_folder_was_made_resumes(tmp_path, monkeypatch):
    image = write_picture(tmp_path / "tiny.png")
    reference = train(tiny_2d(image, tmp_path / "out", "whole"))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the trainer is built: before any scale, before any checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.SinGANTrainer, "__init__", stopped)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_2d(image, tmp_path / "out", "cut"))
    cut = tmp_path / "out" / "cut"
    assert (cut / "run.json").is_file() and not (cut / "scale_00").exists() and not (cut / ".lock").exists()
    assert run_state(cut, 2) == "resume"  # a cohort rerun resumes it instead of failing the image again
    resume(cut)
    assert_same_weights(final_weights(reference.run_dir), final_weights(cut))


def test_a_run_stopped_while_copying_its_image_resumes_from_the_original_and_keeps_a_copy(tmp_path, monkeypatch):
    image = write_picture(tmp_path / "tiny.png")

    def stopped(source, target):
        target.write_bytes(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(runs, "_copy_file", stopped)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_2d(image, tmp_path / "out", "cut"))
    cut = tmp_path / "out" / "cut"
    assert (cut / "run.json").is_file() and os.listdir(cut / "source") == []  # no half copy left
    resume(cut)
    assert filecmp.cmp(cut / "source" / "image" / "tiny.png", image, shallow=False)
    assert (cut / "scale_01" / "scale.json").is_file()


def test_run_json_has_its_format_and_versions_and_the_copy_is_exact(finished):
    run_dir, image = finished
    info = json.loads((run_dir / "run.json").read_text())
    assert info["format_version"] == runs.RUN_FORMAT_VERSION == 3
    assert info["versions"] == {"consingan": consingan.__version__, "torch": str(torch.__version__),
                                "numpy": np.__version__, "python": platform.python_version()}
    copy = run_dir / "source" / "image" / "tiny.png"
    assert os.listdir(run_dir / "source") == ["image"] and filecmp.cmp(copy, image, shallow=False)
    # the copy follows the umask, as every other file of a run
    assert stat.S_IMODE(copy.stat().st_mode) == 0o666 & ~UMASK
    for folder in (run_dir / "source", copy.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~UMASK


def test_an_old_run_json_reads_as_format_1_and_its_run_evaluates_from_config_json(finished, tmp_path):
    run_dir = copy_of(finished[0], tmp_path)
    shutil.rmtree(run_dir / "source")
    info = json.loads((run_dir / "run.json").read_text())
    for key in ("format_version", "versions"):
        del info[key]
    (run_dir / "run.json").write_text(json.dumps(info))
    run = RunFolder.open(run_dir)
    assert run.info.format_version == 1 and run.info.versions == {}
    assert run.source_path("image") == finished[1]
    assert evaluate(run_dir, EvaluateConfig(num=2, device="cpu"))["shape"] == [32, 32]
    resume(run_dir)  # finished already: resuming only makes it keep a copy
    assert filecmp.cmp(run_dir / "source" / "image" / "tiny.png", finished[1], shallow=False)
    assert json.loads((run_dir / "run.json").read_text()) == info  # still format 1: run.json is not rewritten


def test_a_run_json_of_a_newer_format_is_refused(finished, tmp_path):
    run_dir = copy_of(finished[0], tmp_path)
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "format_version": runs.RUN_FORMAT_VERSION + 1}))
    with pytest.raises(ConsinganError, match="newer than consingan .* upgrade consingan"):
        RunFolder.open(run_dir)
    (run_dir / "run.json").write_text(json.dumps({**info, "versions": ["torch"]}))
    with pytest.raises(ConsinganError, match="damaged .*versions"):
        RunFolder.open(run_dir)


def kept_and_read(image: Path, dimension: int, out_dir: Path):
    run = RunFolder.create(TrainConfig(image=str(image), dimension=dimension, out_dir=str(out_dir), run_name="r"),
                           "r", sources={"image": image})
    run.release()
    return run


def assert_same_volume(kept, original) -> None:
    assert np.array_equal(kept.array, original.array) and np.allclose(kept.affine, original.affine)
    assert (kept.suffix, kept.source_dtype) == (original.suffix, original.source_dtype)


def test_a_header_with_detached_data_is_kept_as_one_file(tmp_path):
    import SimpleITK as sitk

    picture = sitk.GetImageFromArray((blobs((12, 10), 2) * 1000).astype(np.int16))
    picture.SetSpacing((0.5, 2.0))
    picture.SetOrigin((3.0, -4.0))
    sitk.WriteImage(picture, str(tmp_path / "scan.mhd"))
    original = read_volume(tmp_path / "scan.mhd", 2)
    run = kept_and_read(tmp_path / "scan.mhd", 2, tmp_path / "out")
    for data in tmp_path.glob("scan.*raw"):
        data.unlink()  # the copy needs nothing of the original
    assert [p.name for p in (run.path / "source" / "image").iterdir()] == ["scan.mha"]
    assert_same_volume(run.read_source("image"), original)


def test_a_dicom_series_folder_is_kept_whole(tmp_path):
    from tests.test_io import write_dicom_series

    write_dicom_series(tmp_path / "series", np.arange(4 * 6 * 5).reshape(4, 6, 5) * 7, (0.7, 0.8, 2.5),
                       (10.0, -5.0, 30.0))
    original = read_volume(tmp_path / "series", 3)
    run = kept_and_read(tmp_path / "series", 3, tmp_path / "out")
    shutil.rmtree(tmp_path / "series")
    kept = run.source_path("image")
    assert kept == run.path / "source" / "image" / "series" and len(list(kept.iterdir())) == 4
    assert_same_volume(run.read_source("image"), original)
