"""Ill cases of the paired commands and of torchrun (issue 21, rows 8-10 and 12-14): one line, exit 2, nothing written
or overwritten; a case whose command is meant to work says so (exit 0, with its one ``warning:`` line)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.conftest import blobs
from tests.test_ill_cases import PAIRED_TRAIN, assert_clean_error, make_pairs, paired_run, run_cli, snapshot

assert paired_run  # the module-scoped trained paired run, used as a fixture below


# --- paired train: options against the model, and the folders and files of the pairs ---------------------------------


def _same_folder(tmp_path: Path, source: Path, target: Path) -> tuple[Path, Path]:
    return source, source


def _same_folder_through_a_link(tmp_path: Path, source: Path, target: Path) -> tuple[Path, Path]:
    (tmp_path / "alias").symlink_to(source)
    return source, tmp_path / "alias"


def _link_loop(tmp_path: Path, source: Path, target: Path) -> tuple[Path, Path]:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path / "loop", target


def _a_file(tmp_path: Path, source: Path, target: Path) -> tuple[Path, Path]:
    return source / "cell.v0.png", target


def _volume_npy_target(tmp_path: Path, source: Path, target: Path) -> tuple[Path, Path]:
    """A 3D array (4 slices of the pair's grid) among 2D targets."""
    (target / "cell.v1.png").unlink()
    np.save(target / "cell.v1.npy", np.stack([blobs((32, 32), s) for s in range(4)]).astype(np.float32))
    return source, target


def _nan_npy_target(tmp_path: Path, source: Path, target: Path) -> tuple[Path, Path]:
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(target / "cell.v1.png"))).astype(np.float32)
    image[3, 4] = np.nan
    (target / "cell.v1.png").unlink()
    np.save(target / "cell.v1.npy", image)
    return source, target


def _twin_sources(tmp_path: Path, source: Path, target: Path) -> tuple[Path, Path]:
    shutil.copy(source / "cell.v0.png", source / "cell.v0.tif")
    return source, target


PAIRED_TRAIN_CASES = {
    "tile 10 (a U-Net of depth 1)": (None, ["--tile", "10"], "allows a U-Net of depth 1 only"),
    "depth 1": (None, ["--depth", "1"], "needs --depth 2 or more"),
    "depth 20": (None, ["--depth", "20"], "allows a depth of at most 4"),
    "deep supervision with unet": (None, ["--deep-supervision"], "applies to model unetpp (U-Net++) only, not unet"),
    "source folder is the target folder": (_same_folder, [], "--source and --target are the same folder"),
    "same folder through a link": (_same_folder_through_a_link, [], "--source and --target are the same folder"),
    "symlink loop as --source": (_link_loop, [], "--source " + "{tmp}/loop is a symbolic link loop"),
    "--source a file": (_a_file, [], "cell.v0.png is a file, not a folder"),
    "3D .npy in a 2D set": (_volume_npy_target, [], "cell.v1.npy holds a 3D array of shape (4, 32, 32), which a 2D"),
    "NaN in an .npy target": (_nan_npy_target, [], "cell.v1.npy (the target of cell.v1) contains 1 NaN"),
    "two sources of one name": (_twin_sources, [], "holds cell.v0.png and cell.v0.tif"),
}


@pytest.mark.parametrize("case", list(PAIRED_TRAIN_CASES))
def test_paired_train_ill_cases(runner, tmp_path, out_dir, case):
    prepare, flags, phrase = PAIRED_TRAIN_CASES[case]
    source, target = make_pairs(tmp_path)
    if prepare is not None:
        source, target = prepare(tmp_path, source, target)
    before = snapshot(tmp_path / "masks"), snapshot(tmp_path / "images")
    result = run_cli(runner, ["paired", "train", "--dim", "2", "--source", source, "--target", target, "--out-dir", out_dir,
                              *PAIRED_TRAIN, *flags])
    assert_clean_error(result, phrase.format(tmp=tmp_path))
    assert not out_dir.exists()
    assert (snapshot(tmp_path / "masks"), snapshot(tmp_path / "images")) == before


def test_a_tiff_and_an_npy_on_one_grid_pair(tmp_path):
    """A TIFF without geometry and an .npy read to the same affine (ITK's default), so they pair, and a .npy's NaN
    is then reported as such rather than as a geometry mismatch."""
    from consingan.io import read_volume
    from consingan.paired.data import load_pairs

    source, target = tmp_path / "s", tmp_path / "t"
    source.mkdir()
    target.mkdir()
    for index in range(2):
        mask = (blobs((32, 24), index) > 0.5).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(source / f"x{index}.tif"))
        np.save(target / f"x{index}.npy", blobs((32, 24), index + 5).astype(np.float32))
    tiff, npy = read_volume(source / "x0.tif", 2, check_values=False), read_volume(target / "x0.npy", 2)
    assert tiff.spatial_shape == npy.spatial_shape == (32, 24) and np.allclose(tiff.affine, npy.affine, atol=1e-6)
    data = load_pairs(source, target, 2, one_hot=True)
    assert data.names == ["x0", "x1"] and data.target_suffix == ".npy"


# --- paired predict --------------------------------------------------------------------------------------------------


def _predict_3d_file(tmp_path: Path, masks: Path) -> Path:
    folder = tmp_path / "new"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(folder / "b.nii.gz"))
    return folder


def _predict_twins(tmp_path: Path, masks: Path) -> Path:
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(masks / "cell.v0.png", folder / "a.png")
    sitk.WriteImage(sitk.ReadImage(str(masks / "cell.v0.png")), str(folder / "a.tif"))
    return folder


def _predict_file(tmp_path: Path, masks: Path) -> Path:
    return masks / "cell.v0.png"


def _predict_loop(tmp_path: Path, masks: Path) -> Path:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path / "loop"


PAIRED_PREDICT_CASES = {
    "a 3D file into a 2D run": (_predict_3d_file,
                                "(8, 8, 8), which is not a 2D image: the run is 2D and this file is 3D"),
    "a.png and a.tif in --source": (_predict_twins, "holds a.png and a.tif, one name with two suffixes"),
    "--source a file": (_predict_file, "cell.v0.png is a file, not a folder"),
    "symlink loop as --source": (_predict_loop, "loop is a symbolic link loop"),
}


@pytest.mark.parametrize("case", list(PAIRED_PREDICT_CASES))
def test_paired_predict_ill_cases(runner, paired_run, tmp_path, case):
    make, phrase = PAIRED_PREDICT_CASES[case]
    inputs = make(tmp_path, paired_run.parent.parent / "masks")
    before = snapshot(paired_run)
    result = run_cli(runner, ["paired", "predict", paired_run, "--source", inputs, "--out", tmp_path / "pred"])
    assert_clean_error(result, phrase)
    assert "--dim" not in result.output  # predict has no --dim to point at
    assert not (tmp_path / "pred").exists() and snapshot(paired_run) == before


def _unfinished_copy(paired_run: Path, tmp_path: Path) -> Path:
    """The run as if stopped after epoch 1 of 4: training writes generator.pt only after its last epoch."""
    run = tmp_path / "run"
    shutil.copytree(paired_run, run)
    (run / "generator.pt").unlink()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epochs": 4}))
    return run


def test_paired_predict_on_an_unfinished_run_says_so_and_predicts(runner, paired_run, tmp_path):
    run = _unfinished_copy(paired_run, tmp_path)
    inputs = tmp_path / "new"
    inputs.mkdir()
    shutil.copy(paired_run.parent.parent / "masks" / "cell.v0.png", inputs)
    result = run_cli(runner, ["paired", "predict", run, "--source", inputs, "--out", tmp_path / "pred"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "unfinished (epoch 1 of 4" in warning[0], result.output
    assert "training_state.pt" in warning[0]
    assert [p.name for p in (tmp_path / "pred").iterdir()] == ["cell.v0.png"]
    # A finished run predicts without a warning.
    result = run_cli(runner, ["paired", "predict", paired_run, "--source", inputs, "--out", tmp_path / "pred2"])
    assert result.exit_code == 0 and "warning" not in result.output, result.output


@pytest.mark.parametrize("out", [None, "report"], ids=["default --out", "--out given"])
def test_evaluate_on_a_paired_run_names_what_it_takes(runner, paired_run, tmp_path, out):  # row 13
    """Not 'not a singan run': evaluate also takes conditional runs, so the message names both; nothing written."""
    run = tmp_path / "run"
    shutil.copytree(paired_run, run)
    before = snapshot(run)
    result = run_cli(runner, ["evaluate", run, "--num", "2", *(["--out", tmp_path / out] if out else [])])
    assert_clean_error(result, "is a paired run; evaluate judges single-image runs (consingan train) and conditional")
    assert "not a singan run" not in result.output
    assert snapshot(run) == before and not (tmp_path / "report").exists()


def test_paired_resume_of_a_finished_run_says_so_and_writes_nothing(runner, paired_run, tmp_path):  # row 14
    """As conditional train --resume does: not a bare 'run folder:' line after reading every pair again."""
    run = tmp_path / "run"
    shutil.copytree(paired_run, run)
    before = snapshot(run)
    result = run_cli(runner, ["paired", "train", "--resume", run])
    assert result.exit_code == 0, result.output
    epochs = json.loads((run / "config.json").read_text())["epochs"]
    assert result.output.strip() == f"{run} is already finished (epoch {epochs} of {epochs}); nothing to do"
    assert snapshot(run) == before


def test_paired_predict_on_a_run_without_weights(runner, paired_run, tmp_path):
    run = _unfinished_copy(paired_run, tmp_path)
    (run / "training_state.pt").unlink()
    result = run_cli(runner, ["paired", "predict", run, "--source", paired_run.parent.parent / "masks", "--out",
                              tmp_path / "pred"])
    assert_clean_error(result, "has no weights yet")
    assert not (tmp_path / "pred").exists()


# --- torchrun: world sizes, the single-image engine, DDP's wrapping --------------------------------------------------


def _conditional_run(tmp_path: Path) -> Path:
    """A conditional run folder as training makes it before its first epoch (a resume is refused before reading
    anything else)."""
    from consingan.config import ConditionalConfig
    from consingan.io import IntensityRange
    from consingan.runs import RunFolder, RunInfo

    config = ConditionalConfig(data=str(tmp_path / "data"), size=16, seed=0, device="cpu", batch_size=2,
                               accumulate=2, out_dir=str(tmp_path / "runs"), run_name="run").validate()
    run = RunFolder.create(config, "conditional")
    run.write_info(RunInfo(family="conditional", spatial_dims=2, channels=1, output_suffix=".png",
                           output_dtype="uint8", intensity=IntensityRange((0.0,), (255.0,)), classes=["a", "b"],
                           class_counts=[2, 2]))
    return run.path


def _paired_copy(paired_run: Path, tmp_path: Path, world_size: int | None = None) -> Path:
    run = _unfinished_copy(paired_run, tmp_path)
    if world_size is not None:
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "world_size": world_size}))
    return run


def _without_the_record(paired_run: Path, tmp_path: Path) -> Path:
    """A run from before the world size was recorded: it was trained with one process."""
    run = _unfinished_copy(paired_run, tmp_path)
    info = json.loads((run / "run.json").read_text())
    del info["world_size"]
    (run / "run.json").write_text(json.dumps(info))
    return run


TORCHRUN_CASES = {
    "paired resume of a 1-process run under 2": (
        lambda run, tmp: _paired_copy(run, tmp), ["paired", "train", "--resume", "{run}"], 2,
        "trained with world size 1 and this resume has world size 2, which would change the global batch from 1 to "
        "2; resume it without torchrun"),
    "paired resume of a 2-process run alone": (
        lambda run, tmp: _paired_copy(run, tmp, 2), ["paired", "train", "--resume", "{run}"], 1,
        "trained with world size 2 and this resume has world size 1"),
    "paired resume of a run without the record under 2": (
        _without_the_record, ["paired", "train", "--resume", "{run}"], 2, "trained with world size 1"),
    "conditional resume under another world size": (
        lambda run, tmp: _conditional_run(tmp), ["conditional", "train", "--resume", "{run}"], 3,
        "trained with world size 1 and this resume has world size 3, which would change the global batch from 4 to "
        "12"),
    "single-image train under torchrun": (
        None, ["train", "--image", "{image}", "--dim", "2", "--out-dir", "{out}", "--seed", "0"], 2,
        "consingan train (the single-image engine) does not train distributed"),
    "single-image train --resume under torchrun": (
        lambda run, tmp: _paired_copy(run, tmp), ["train", "--resume", "{run}"], 2, "use consingan train-many"),
    "single-image train --dry-run under torchrun": (
        None, ["train", "--image", "{image}", "--dim", "2", "--dry-run"], 2, "does not train distributed"),
}


@pytest.mark.parametrize("case", list(TORCHRUN_CASES))
def test_torchrun_ill_cases(runner, paired_run, png_rgb, tmp_path, monkeypatch, case):
    """The environment torchrun gives a rank (refused before any process group is joined)."""
    make, args, world, phrase = TORCHRUN_CASES[case]
    run = make(paired_run, tmp_path) if make else tmp_path / "none"
    before = snapshot(run)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = run_cli(runner, [a.format(run=run, image=png_rgb, out=tmp_path / "out") for a in args])
    assert_clean_error(result, phrase)
    assert snapshot(run) == before and not (tmp_path / "out").exists()


def test_a_new_run_records_its_world_size(paired_run):
    assert json.loads((paired_run / "run.json").read_text())["world_size"] == 1


def test_ddp_wrapping_raises_no_warning(tmp_path):
    """DDP's ``broadcast_buffers`` is deprecated (PyTorch 2.13): the wrapper must not print its FutureWarning on
    every rank. One gloo process is enough to build the wrapper."""
    import torch.distributed as dist

    from consingan.distributed import Distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrapped = Distributed(0, 2, 0).wrap(model, torch.device("cpu"))
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
        # Buffers are still not re-sent at each forward (the in-place error of pix2pix's DDP path).
        assert not getattr(wrapped, "forward_sync_buffers", wrapped.broadcast_buffers)
    finally:
        dist.destroy_process_group()


def test_single_image_train_under_real_torchrun_refuses_on_every_rank(png_rgb, tmp_path):
    """Each rank refuses in one line before any folder is made. (torchrun stops the other ranks as soon as one has
    exited, so a rank that is slower to start may be stopped before it says so.)"""
    import subprocess

    script = shutil.which("consingan")
    assert script, "the consingan console script is not installed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, "train",
               "--image", str(png_rgb), "--dim", "2", "--out-dir", str(tmp_path / "out"), "--seed", "0"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode != 0
    ours = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert 1 <= len(ours) <= 2 and all("does not train distributed" in line for line in ours), completed.stderr
    assert not (tmp_path / "out").exists()
