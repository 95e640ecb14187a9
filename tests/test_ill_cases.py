"""Every ill case from the hostile-user review, as tables: one line, exit 2, nothing written or overwritten.

Each case builds what it needs (a trained tiny run, a paired data set, a damaged file), runs one command through the
CLI and checks the answer; a case whose command is meant to work says so (``exit 0``).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from consingan.checkpoint import load_state, save_state
from consingan.cli import app
from tests.conftest import TINY, assert_clean_failure, blobs

ONE_SCALE = [*TINY, "--num-scales", "1"]


def run_cli(runner, args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show nothing was written or overwritten)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


def assert_clean_error(result, phrase: str) -> None:
    """Exit 2 through the CLI's error path, with ``phrase`` in its one line (see ``assert_clean_failure``)."""
    assert_clean_failure(result, phrase)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny finished 2D run, trained once for the module; tests copy it before damaging anything."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("trained")
    image = root / "tiny.png"
    rgb = np.stack([blobs((32, 32), s) for s in range(3)], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray((rgb * 255).round().astype(np.uint8), isVector=True), str(image))
    result = run_cli(CliRunner(), ["train", "--image", image, "--dim", "2", "--out-dir", root / "out",
                                   "--run-name", "run", *TINY])
    assert result.exit_code == 0, result.output
    return root / "out" / "run"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# --- train: options and images -------------------------------------------------------------------------------------

TRAIN_CASES = {
    "run name with ..": (["--run-name", "../../x"], "single folder name"),
    "absolute run name": (["--run-name", "/tmp/elsewhere/x"], "single folder name"),
    "run name with /": (["--run-name", "a/b"], "single folder name"),
    "kernel 7 padding 0 on a small pyramid": (["--kernel-size", "7", "--padding", "0"], "too small for"),
    "kernel 7 padding 0, dry run": (["--kernel-size", "7", "--padding", "0", "--dry-run"], "too small for"),
    "max size 1": (["--max-size", "1", "--min-size", "1"], "too small for"),
    "seed above 2^64": (["--seed", str(2**64 + 5)], "seed must be"),
    "100 scales": (["--num-scales", "100"], "scales of the same size"),
    "lr nan": (["--lr", "nan"], "lr must be a finite number"),
    "device gpu": (["--device", "gpu"], "device must be"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_ill_options(runner, png_rgb, out_dir, tmp_path, case):
    flags, phrase = TRAIN_CASES[case]
    result = run_cli(runner, ["train", "--image", png_rgb, "--dim", "2", "--out-dir", out_dir, *TINY, *flags])
    assert_clean_error(result, phrase)
    assert not out_dir.exists() and not (tmp_path.parent / "x").exists() and not Path("/tmp/elsewhere/x").exists()


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3), str(path))
    return path


def _truncated_png(tmp_path: Path) -> Path:
    path = _write_png(tmp_path / "whole.png", (blobs((32, 32)) * 255).astype(np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:60])
    return cut


def _huge_header(tmp_path: Path) -> Path:
    """A NIfTI header that declares 2000^3 voxels of float32 with almost no data behind it."""
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    header = image.header.copy()
    header.set_data_shape((2000, 2000, 2000))
    path = tmp_path / "huge.nii"
    with open(path, "wb") as stream:
        stream.write(header.binaryblock + b"\0" * 4 + np.zeros(8, np.float32).tobytes())
    return path


def _thin_volume(tmp_path: Path) -> Path:
    path = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(blobs((40, 40, 1)).astype(np.float32), np.eye(4)), str(path))
    return path


IMAGE_CASES = {
    "truncated png": (_truncated_png, 2, "cannot read cut.png"),
    "huge declared shape": (_huge_header, 3, "declares"),
    "1-voxel-thick volume as 3D": (_thin_volume, 3, "--dim 2"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_train_ill_images(runner, out_dir, tmp_path, case):
    make, dims, phrase = IMAGE_CASES[case]
    result = run_cli(runner, ["train", "--image", make(tmp_path), "--dim", dims, "--out-dir", out_dir, *TINY])
    assert_clean_error(result, phrase)
    assert ".cxx" not in result.output and ".cpp" not in result.output
    assert not out_dir.exists()


def test_rgba_with_constant_alpha_trains_on_rgb(runner, out_dir, tmp_path):
    rgba = np.stack([blobs((32, 32), s) * 255 for s in range(3)] + [np.full((32, 32), 255.0)], -1).astype(np.uint8)
    path = _write_png(tmp_path / "rgba.png", rgba)
    result = run_cli(runner, ["train", "--image", path, "--dim", "2", "--out-dir", out_dir, *ONE_SCALE])
    assert result.exit_code == 0, result.output
    assert "alpha" in result.output
    info = json.loads((out_dir / "rgba_001" / "run.json").read_text())
    assert info["channels"] == 3


def test_a_single_dicom_file_is_read(tmp_path):
    from consingan.io import read_volume

    image = sitk.GetImageFromArray((blobs((4, 24, 24)) * 1000).astype(np.int16))
    image.SetSpacing((0.7, 0.7, 2.0))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    path = folder / "slice0.dcm"
    writer.SetFileName(str(path))
    writer.Execute(image[:, :, 0])
    volume = read_volume(path, 2)
    assert volume.spatial_shape == (24, 24) and np.allclose(volume.spacing, 0.7)


def test_disk_full_while_training(runner, png_rgb, out_dir, monkeypatch):
    import consingan.checkpoint as checkpoint

    def full(state, stream):
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    result = run_cli(runner, ["train", "--image", png_rgb, "--dim", "2", "--out-dir", out_dir, *ONE_SCALE])
    # Training had started (its table and progress are above): the error is the last line, with no traceback.
    assert_clean_failure(result, "No space left on device", one_line=False)
    assert not list(out_dir.rglob("*.pt")) and not list(out_dir.rglob("*.tmp"))


# --- resume and damaged run folders ----------------------------------------------------------------------------------


def _edit_config(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    config["num_feature_channels"] = 16
    (run / "config.json").write_text(json.dumps(config))
    (run / "scale_01" / "scale.json").unlink()  # the last scale unfinished, so resume has work to do


def _wrong_shape(run: Path) -> None:
    path = run / "scale_01" / "generator.pt"
    state = load_state(path)
    state["tail.1.weight"] = torch.zeros(3, 5, 3, 3)
    save_state(path, state)


def _missing_tensor(run: Path) -> None:
    path = run / "scale_01" / "generator.pt"
    state = load_state(path)
    del state["head.1.conv.weight"]
    save_state(path, state)


def _absurd_shape(run: Path) -> None:
    info = json.loads((run / "run.json").read_text())
    info["source_shape"] = [10**12, 32]
    (run / "run.json").write_text(json.dumps(info))


def _broken_json(run: Path) -> None:
    (run / "run.json").write_text('{"family": "singan", ')


RUN_CASES = {
    "config.json edited, then --resume": (_edit_config, ["train", "--resume", "{run}"], "does not fit"),
    "generator.pt with a wrong-shaped tensor": (_wrong_shape, ["sample", "{run}", "--out", "{out}"], "size mismatch"),
    "generator.pt with a missing tensor": (_missing_tensor, ["sample", "{run}", "--out", "{out}"], "Missing"),
    "run.json with an absurd source_shape": (_absurd_shape, ["sample", "{run}", "--out", "{out}"], "source_shape"),
    "run.json cut short": (_broken_json, ["evaluate", "{run}", "--out", "{out}"], "damaged"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_damaged_runs(runner, run_copy, tmp_path, case):
    damage, args, phrase = RUN_CASES[case]
    damage(run_copy)
    before = snapshot(run_copy)
    out = tmp_path / "samples"
    result = run_cli(runner, [a.format(run=run_copy, out=out) for a in args])
    assert_clean_error(result, phrase)
    assert snapshot(run_copy) == before and not out.exists()


# --- sample -----------------------------------------------------------------------------------------------------------

SAMPLE_CASES = {
    "seed -1": (["--seed", "-1"], "seed must be"),
    "scale nan": (["--scale", "nan"], "finite"),
    "scale inf": (["--scale", "inf"], "finite"),
    "shape 1,1": (["--shape", "1,1"], "too small"),
    "scale 0.01": (["--scale", "0.01"], "too small"),
    "device gpu": (["--device", "gpu"], "device must be"),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_ill_options(runner, trained, tmp_path, case):
    flags, phrase = SAMPLE_CASES[case]
    before = snapshot(trained)
    result = run_cli(runner, ["sample", trained, "--out", tmp_path / "samples", "--num", "2", *flags])
    assert_clean_error(result, phrase)
    assert not (tmp_path / "samples").exists() and snapshot(trained) == before


def test_sample_with_labels_counts_samples_not_files(runner, tmp_path, out_dir):
    image = _write_png(tmp_path / "img.png", (blobs((32, 32)) * 255).astype(np.uint8))
    label = _write_png(tmp_path / "lab.png", (blobs((32, 32)) > 0.5).astype(np.uint8))
    result = run_cli(runner, ["train", "--image", image, "--label", label, "--dim", "2", "--out-dir", out_dir,
                              *ONE_SCALE])
    assert result.exit_code == 0, result.output
    result = run_cli(runner, ["sample", out_dir / "img_001", "--out", tmp_path / "s", "--num", "3"])
    assert result.exit_code == 0 and "wrote 3 samples" in result.output, result.output


# --- paired -----------------------------------------------------------------------------------------------------------


def make_pairs(root: Path, count: int = 2, target_dtype=np.uint8, suffix: str = ".png") -> tuple[Path, Path]:
    source, target = root / "masks", root / "images"
    source.mkdir()
    target.mkdir()
    for index in range(count):
        texture = blobs((32, 32), index)
        mask = np.digitize(texture, [0.3, 0.6]).astype(np.uint8)
        image = mask * 80 + texture * 40
        if target_dtype == np.uint16:
            image = image * 16  # 12-bit
        elif target_dtype == np.float32:
            image = image / 255.0
        _write_png(source / f"cell.v{index}.png", mask)
        if suffix == ".png":
            _write_png(target / f"cell.v{index}.png", image.astype(target_dtype))
        else:
            sitk.WriteImage(sitk.GetImageFromArray(image.astype(target_dtype)), str(target / f"cell.v{index}{suffix}"))
    return source, target


PAIRED_TRAIN = ["--dim", "2", "--epochs", "1", "--tile", "16", "--base-channels", "4", "--seed", "0"]

PAIRED_TRAIN_CASES = {
    "device gpu": (["--device", "gpu"], "device must be"),
    "lr nan": (["--lr", "nan"], "lr must be a finite number"),
    "lr inf": (["--lr", "inf"], "lr must be a finite number"),
    "lambda-l1 nan": (["--lambda-l1", "nan"], "lambda_l1 must be a finite number"),
    "missing perceptual weights": (["--perceptual-weights", "nowhere.pth"], "nowhere.pth"),
    "cuda without a GPU": (["--device", "cuda"], "CUDA"),
}


@pytest.mark.parametrize("case", list(PAIRED_TRAIN_CASES))
def test_paired_train_ill_options(runner, tmp_path, out_dir, case):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    flags, phrase = PAIRED_TRAIN_CASES[case]
    source, target = make_pairs(tmp_path)
    result = run_cli(runner, ["paired", "train", "--dim", "2", "--source", source, "--target", target, "--out-dir", out_dir,
                              *PAIRED_TRAIN, *flags])
    assert_clean_error(result, phrase)
    assert not out_dir.exists()


def test_paired_one_hot_refuses_multichannel_masks(runner, tmp_path, out_dir):
    source, target = make_pairs(tmp_path)
    mask = np.stack([blobs((32, 32), s) > 0.5 for s in range(3)], -1).astype(np.uint8)
    _write_png(source / "cell.v0.png", mask)
    result = run_cli(runner, ["paired", "train", "--dim", "2", "--source", source, "--target", target, "--out-dir", out_dir,
                              "--one-hot", *PAIRED_TRAIN])
    assert_clean_error(result, "must have one channel")
    assert not out_dir.exists()


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("paired")
    source, target = make_pairs(root)
    result = run_cli(CliRunner(), ["paired", "train", "--dim", "2", "--source", source, "--target", target, "--out-dir",
                                   root / "out", "--run-name", "run", *PAIRED_TRAIN])
    assert result.exit_code == 0, result.output
    return root / "out" / "run"


def _inputs_with_a_3d_file(tmp_path: Path) -> Path:
    folder = tmp_path / "new"
    folder.mkdir()
    _write_png(folder / "a.png", np.digitize(blobs((32, 32), 5), [0.3, 0.6]).astype(np.uint8))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(folder / "b.nii.gz"))
    return folder


PREDICT_CASES = {
    "--out an existing file": ("file", "is a file"),
    "a 3D file among 2D inputs": ("3d", "not a 2D image"),
    "device gpu": ("gpu", "device must be"),
}


@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_paired_predict_ill_cases(runner, paired_run, tmp_path, case):
    kind, phrase = PREDICT_CASES[case]
    inputs = _inputs_with_a_3d_file(tmp_path) if kind == "3d" else paired_run.parent.parent / "masks"
    out = tmp_path / "pred"
    if kind == "file":
        out.write_text("keep me")
    result = run_cli(runner, ["paired", "predict", paired_run, "--source", inputs, "--out", out,
                              *(["--device", "gpu"] if kind == "gpu" else [])])
    assert_clean_error(result, phrase)
    assert (out.read_text() == "keep me") if kind == "file" else not out.exists()


def test_paired_predict_skips_stray_files_and_keeps_dotted_names(runner, paired_run, tmp_path):
    folder = tmp_path / "new"
    shutil.copytree(paired_run.parent.parent / "masks", folder)
    (folder / "notes.txt").write_text("not an image")
    result = run_cli(runner, ["paired", "predict", paired_run, "--source", folder, "--out", tmp_path / "pred"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["cell.v0.png", "cell.v1.png"]


@pytest.mark.parametrize("dtype, suffix", [(np.uint16, ".png"), (np.float32, ".tif")])
def test_paired_predictions_in_the_targets_type_and_range(runner, tmp_path, dtype, suffix):
    source, target = make_pairs(tmp_path, target_dtype=dtype, suffix=suffix)
    result = run_cli(runner, ["paired", "train", "--dim", "2", "--source", source, "--target", target, "--out-dir",
                              tmp_path / "out", *PAIRED_TRAIN])
    assert result.exit_code == 0, result.output
    result = run_cli(runner, ["paired", "predict", tmp_path / "out" / "paired_001", "--source", source, "--out",
                              tmp_path / "pred"])
    assert result.exit_code == 0, result.output
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / f"cell.v0{suffix}")))
    targets = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(target.iterdir())]
    low, high = min(t.min() for t in targets), max(t.max() for t in targets)
    assert written.dtype == dtype
    assert low <= written.min() and written.max() <= high
    assert (written == written.max()).mean() < 0.5  # not saturated
    if dtype == np.float32:
        assert len(np.unique(written)) > 2  # not cast to {0, 1}


def test_logs_keep_the_whole_summary_table(png_rgb, out_dir):
    """Without a terminal (a log file), tables are not cut to 80 columns."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "consingan.cli", "train", "--image", str(png_rgb), "--dim", "2", "--out-dir",
               str(out_dir), *ONE_SCALE]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "…" not in completed.stderr and "training summary" in completed.stderr
    assert str(out_dir / "tiny_001") in completed.stderr


def test_swd_says_how_many_levels_it_measured():
    from consingan.metrics import measures

    real = torch.rand(1, 1, 20, 20)
    swd = measures.multiscale_swd(real, torch.rand(3, 1, 20, 20), levels=4)
    assert swd["levels"] == len(swd["per_level"]) == 2  # 20 px holds two levels of at least 8 px
