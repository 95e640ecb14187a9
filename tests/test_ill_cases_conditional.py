"""The ill cases of the conditional family (issue 21), as tables per command: one line, exit 2, nothing written
outside the output, nothing existing overwritten, no run folder left behind; or, where the input is legitimate but
suspicious, one ``warning:`` line and a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from consingan.conditional.memory import check_memory
from consingan.config import ConditionalConfig
from tests.conftest import blobs
from tests.test_conditional import TINY_FLAGS, write_set
from tests.test_ill_cases import assert_clean_error, run_cli, snapshot

FLAGS_2D = [*TINY_FLAGS, "--epochs", "1", "--size", "16", "--attention", "8", "--preview-every", "0"]
FLAGS_3D = [*TINY_FLAGS, "--epochs", "1", "--dim", "3", "--size", "8", "--attention", "4", "--preview-every", "0"]


def _csv(tmp_path: Path, rows: list[str], encoding: str = "utf-8") -> Path:
    """set.csv beside a 2D set (data/bright, data/dark), with a header and ``rows`` of path,class."""
    write_set(tmp_path / "data", 2)
    path = tmp_path / "set.csv"
    path.write_bytes(("path,class\n" + "".join(row + "\n" for row in rows)).encode(encoding))
    return path


def _class_named(name: str):
    def make(tmp_path: Path) -> tuple[Path, list]:
        return _csv(tmp_path, ["data/bright/0.png,bright", f"data/dark/0.png,{name}"]), FLAGS_2D
    return make


def _folder_with_backslash(tmp_path: Path) -> tuple[Path, list]:
    data = write_set(tmp_path / "data", 2)
    (data / "dark").rename(data / "da\\rk")
    return data, FLAGS_2D


def _repeated_row(tmp_path: Path) -> tuple[Path, list]:
    return _csv(tmp_path, ["data/bright/0.png,bright", "data/dark/0.png,dark", "data/bright/0.png,bright"]), FLAGS_2D


def _two_labels(tmp_path: Path) -> tuple[Path, list]:
    return _csv(tmp_path, ["data/bright/0.png,bright", "data/dark/0.png,dark", "data/dark/../bright/0.png,dark"]), \
        FLAGS_2D


def _one_class(tmp_path: Path) -> tuple[Path, list]:
    data = write_set(tmp_path / "data", 2, per_class=(3,))
    return data, FLAGS_2D


def _png(path: Path, pixels: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(path))
    return path


def _mixed_bits_2d(tmp_path: Path) -> tuple[Path, list]:
    data = write_set(tmp_path / "data", 2)
    _png(data / "dark" / "deep.png", (blobs((20, 24), 5) * 60000).astype(np.uint16))
    return data, FLAGS_2D


def _volumes(tmp_path: Path) -> Path:
    """A 3D set: class 'a' of uint8 NIfTI volumes; class 'b' made by each case."""
    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
    for index in range(2):
        nib.save(nib.Nifti1Image((blobs((10, 10, 10), index) * 200).astype(np.uint8), np.eye(4)),
                 str(data / "a" / f"{index}.nii.gz"))
    return data


def _mixed_types_3d(tmp_path: Path) -> tuple[Path, list]:
    data = _volumes(tmp_path)
    for index in range(2):
        sitk.WriteImage(sitk.GetImageFromArray((blobs((10, 10, 10), 9 + index) * 60000).astype(np.uint16)),
                        str(data / "b" / f"{index}.tif"))
    return data, FLAGS_3D


def _single_slice_dicom(tmp_path: Path) -> tuple[Path, list]:
    data = _volumes(tmp_path)
    for index in range(2):
        nib.save(nib.Nifti1Image((blobs((10, 10, 10), 5 + index) * 90).astype(np.uint8), np.eye(4)),
                 str(data / "b" / f"{index}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray((blobs((10, 10), 3) * 200).astype(np.uint8)), str(data / "b" / "slice.dcm"))
    return data, FLAGS_3D


def _picture_in_3d(tmp_path: Path) -> tuple[Path, list]:
    data = _volumes(tmp_path)
    _png(data / "b" / "flat.png", (blobs((10, 10), 3) * 200).astype(np.uint8))
    return data, FLAGS_3D


def _latin1(tmp_path: Path) -> tuple[Path, list]:
    return _csv(tmp_path, ["data/bright/0.png,caf\xe9", "data/dark/0.png,dark"], encoding="latin-1"), FLAGS_2D


def _loop(tmp_path: Path) -> tuple[Path, list]:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path / "loop", FLAGS_2D


def _huge_channels(tmp_path: Path) -> tuple[Path, list]:
    return write_set(tmp_path / "data", 2), [*FLAGS_2D, "--base-channels", "100000", "--max-channels", "100000"]


def _huge_noise(tmp_path: Path) -> tuple[Path, list]:
    config = tmp_path / "options.toml"
    config.write_text("noise_dim = 1e9\n")  # a float in TOML: read as the integer 1000000000
    at = FLAGS_2D.index("--noise-dim")  # a flag would win over the file
    return write_set(tmp_path / "data", 2), ["--config", config, *FLAGS_2D[:at], *FLAGS_2D[at + 2:]]


def _huge_3d(tmp_path: Path) -> tuple[Path, list]:
    return write_set(tmp_path / "data", 3), [*TINY_FLAGS, "--dim", "3", "--size", "256"]


TRAIN_CASES = {
    # row 1: class names are single folder names, refused naming the CSV row or the folder
    "absolute class name": (_class_named("{tmp}/victim"), "set.csv row 3: class name"),
    "class name ../../escape": (_class_named("../../escape"), "set.csv row 3: class name '../../escape'"),
    "class name .": (_class_named("."), "set.csv row 3: class name '.'"),
    "class name ..": (_class_named(".."), "set.csv row 3: class name '..'"),
    "class name with NUL": (_class_named("da\0rk"), "set.csv row 3: class name 'da\\x00rk'"),
    "class name with /": (_class_named("da/rk"), "set.csv row 3: class name 'da/rk'"),
    "class name with backslash": (_class_named("da\\rk"), "must be a single folder name"),
    "empty class name": (_class_named(""), "set.csv row 3: expected 'path,class'"),
    "class folder with backslash": (_folder_with_backslash, "class folder"),
    # row 9: one image listed twice, one class
    "row repeated": (_repeated_row, "row 2 and row 4 are the same image 0.png (twice under 'bright'"),
    "one file under two labels": (_two_labels, "row 2 and row 4 are the same image 0.png (under both 'bright' and"),
    "one class": (_one_class, "has one class only ('bright')"),
    # row 6: mixed data types
    "8-bit and 16-bit PNGs": (_mixed_bits_2d, "is uint8 but"),
    "uint8 NIfTI and uint16 TIFF in 3D": (_mixed_types_3d, "mixed data types"),
    # row 10: a 2D image in a 3D set
    "single-slice DICOM in a 3D set": (_single_slice_dicom, "slice.dcm has shape (1, 10, 10), one voxel thick"),
    "PNG in a 3D set": (_picture_in_3d, "flat.png"),
    # row 12: tracebacks
    "Latin-1 CSV": (_latin1, "set.csv is not UTF-8 text (byte 0xe9 on line 2)"),
    "symlink loop as --data": (_loop, "symbolic-link loop"),
    "base channels 100000": (_huge_channels, "lower --noise-dim, --num-feature-channels or --max-channels"),
    "noise dim 1e9": (_huge_noise, "for 368000.0 M parameters"),
    "3D size 256": (_huge_3d, "at 256^3"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_conditional_train_ill_data(runner, tmp_path, case):
    make, phrase = TRAIN_CASES[case]
    data, flags = make(tmp_path)
    if data.suffix == ".csv":
        data.write_bytes(data.read_bytes().replace(b"{tmp}", str(tmp_path).encode()))
    before = snapshot(tmp_path)
    result = run_cli(runner, ["conditional", "train", "--data", data, "--out-dir", tmp_path / "out", *flags])
    assert_clean_error(result, phrase)
    assert not (tmp_path / "out").exists() and snapshot(tmp_path) == before  # nothing written anywhere
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path.parent.parent / "escape").exists()
    if case == "8-bit and 16-bit PNGs":  # a file of each kind is named
        assert "deep.png is uint16" in result.output and "0.png" in result.output


def _bom_csv(tmp_path: Path) -> tuple[Path, str]:
    path = _csv(tmp_path, ["data/bright/0.png,bright", "data/dark/0.png,dark"], encoding="utf-8-sig")
    return path, ""


def _upscaled(tmp_path: Path) -> tuple[Path, str]:
    data = write_set(tmp_path / "data", 2, per_class=(1, 1))
    _png(data / "dark" / "tiny.png", (np.arange(9).reshape(3, 3) * 20).astype(np.uint8))
    return data, "1 image(s) enlarged more than 4x to 16x16, the most {data}/dark/tiny.png (3x3, 5.3x); they look " \
                 "blurred"


def _squashed(tmp_path: Path) -> tuple[Path, str]:
    data = write_set(tmp_path / "data", 2, per_class=(1, 1))
    _png(data / "bright" / "wide.png", (blobs((30, 100), 4) * 200).astype(np.uint8))
    return data, "1 image(s) squashed out of their aspect ratio (more than 2x) to 16x16, the most " \
                 "{data}/bright/wide.png (30x100, 3.3x); --fit extent (the default) or crop keeps it"


def _wide(tmp_path: Path) -> tuple[Path, str]:
    """The same wide image under the default --fit extent: kept in its aspect ratio, padded, so no warning."""
    data, _ = _squashed(tmp_path)
    return data, ""


ACCEPTED_CASES = {
    "UTF-8 CSV with a byte-order mark": (_bom_csv, "2 images in 2 classes: bright 1, dark 1"),  # row 13
    "image upscaled 5x": (_upscaled, "3 images in 2 classes: bright 1, dark 2"),  # row 9
    "image squashed 100 x 30 to a square": (_squashed, "3 images in 2 classes: bright 2, dark 1", "resize"),  # row 9
    "a wide image, its aspect kept": (_wide, "3 images in 2 classes: bright 2, dark 1"),
}


@pytest.mark.parametrize("case", list(ACCEPTED_CASES))
def test_conditional_train_legitimate_but_suspicious_data(runner, tmp_path, case):
    make, counts, *fit = ACCEPTED_CASES[case]
    data, warning = make(tmp_path)
    result = run_cli(runner, ["conditional", "train", "--data", data, "--out-dir", tmp_path / "out", *FLAGS_2D,
                              "--fit", *(fit or ["extent"])])
    assert result.exit_code == 0, result.output
    assert counts in result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == ([f"warning: {warning.format(data=data)}"] if warning else []), result.output


# --- conditional sample and train --resume on a trained run -------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny finished 2D conditional run (classes 'bright' and 'dark', 3 images each), trained once for the module;
    tests copy it before changing anything."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("conditional")
    data = write_set(root / "data", 2)
    result = run_cli(CliRunner(), ["conditional", "train", "--data", data, "--out-dir", root / "out",
                                   "--run-name", "run", *FLAGS_2D])
    assert result.exit_code == 0, result.output
    return root / "out" / "run"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


SAMPLE_CASES = {
    # row 1: a tampered run.json, or a --class that is not one of the run's classes, writes nothing anywhere
    "class ../../escape in run.json": ({"classes": ["../../escape", "dark"]}, [], "is not a single folder name"),
    "absolute class in run.json": ({"classes": ["{tmp}/victim", "dark"]}, [], "is not a single folder name"),
    "class . in run.json": ({"classes": [".", "dark"]}, [], "is not a single folder name"),
    "class .. in run.json": ({"classes": ["..", "dark"]}, [], "is not a single folder name"),
    "class with NUL in run.json": ({"classes": ["da\0rk", "bright"]}, [], "is not a single folder name"),
    "class with / in run.json": ({"classes": ["a/b", "dark"]}, [], "is not a single folder name"),
    "--class ../x": ({}, ["--class", "../x"], "unknown class '../x'"),
    "--class of an absolute path": ({}, ["--class", "{tmp}/victim"], "unknown class"),
    "--class empty": ({}, ["--class", ""], "unknown class ''"),
    "--out holds files": ({}, ["--out", "{tmp}/existing"], "already holds files; choose a new or empty folder"),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_conditional_sample_ill_runs(runner, run_copy, tmp_path, case):
    info, flags, phrase = SAMPLE_CASES[case]
    tmp = str(tmp_path)
    if info:
        _edit_json(run_copy / "run.json", classes=[c.replace("{tmp}", tmp) for c in info["classes"]])
    (tmp_path / "victim_0000.png").write_bytes(b"precious")  # what the absolute class name would have overwritten
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("keep")
    before = snapshot(tmp_path)
    flags = [flag.replace("{tmp}", tmp) for flag in flags]
    out = [] if "--out" in flags else ["--out", tmp_path / "samples"]
    result = run_cli(runner, ["conditional", "sample", run_copy, "--num", "2", *out, *flags])
    assert_clean_error(result, phrase)
    assert snapshot(tmp_path) == before and not (tmp_path / "samples").exists()
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path.parent.parent / "escape").exists()
    assert not (tmp_path / "victim").exists()


def _moved_data(run: Path, tmp_path: Path) -> Path:
    """A copy of the run's data, which the run (config.json) now reads; the run's own copy of its set removed, as
    in a run from before runs kept one (those read the original images, checked against run.json)."""
    (run / "source" / "dataset.pt").unlink()
    data = tmp_path / "data"
    shutil.copytree(json.loads((run / "config.json").read_text())["data"], data)
    _edit_json(run / "config.json", data=str(data))
    return data


def _image_removed(run: Path, tmp_path: Path) -> None:
    (_moved_data(run, tmp_path) / "dark" / "0.png").unlink()


def _image_added(run: Path, tmp_path: Path) -> None:
    data = _moved_data(run, tmp_path)
    shutil.copy(data / "bright" / "0.png", data / "bright" / "extra.png")


def _image_replaced(run: Path, tmp_path: Path) -> None:
    """The same counts, but a dark image overwritten by a bright one: the set's intensity range is not the run's."""
    data = _moved_data(run, tmp_path)
    shutil.copy(data / "bright" / "0.png", data / "dark" / "0.png")


def _absurd_noise(run: Path, tmp_path: Path) -> None:
    _edit_json(run / "config.json", noise_dim=10**9)


RESUME_CASES = {
    # row 9: the data changed since the run started (run.json keeps class_counts)
    "image removed from a class": (_image_removed, "'dark' has 2 (the run was trained on 3)"),
    "image added to a class": (_image_added, "'bright' has 4 (the run was trained on 3)"),
    "image replaced, same counts": (_image_replaced, "have changed since the run started"),
    # row 12: a run whose options cannot fit is refused before anything is loaded or written
    "noise dim 1e9": (_absurd_noise, "training needs about"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_conditional_resume_ill_runs(runner, run_copy, tmp_path, case):
    change, phrase = RESUME_CASES[case]
    (run_copy / "generator.pt").unlink()  # an interrupted run (its last training state kept)
    change(run_copy, tmp_path)
    before = snapshot(run_copy)
    result = run_cli(runner, ["conditional", "train", "--resume", run_copy])
    assert_clean_error(result, phrase)
    assert snapshot(run_copy) == before


def test_conditional_resume_of_a_finished_run_says_so_and_writes_nothing(runner, run_copy):  # row 14
    before = snapshot(run_copy)
    result = run_cli(runner, ["conditional", "train", "--resume", run_copy])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{run_copy} is already finished (epoch 1 of 1); nothing to do"
    assert snapshot(run_copy) == before


# --- the memory preflight refuses only what cannot fit ---------------------------------------------------------------

ORDINARY = {  # (options, free memory): trained on such machines, so never refused
    "2D defaults on 4 GiB": ({"dimension": 2}, 4),
    "2D size 256 on 16 GiB": ({"dimension": 2, "size": 256}, 16),
    "3D size 32 on 8 GiB": ({"dimension": 3, "size": 32}, 8),
    "3D size 64 batch 4 on 16 GiB": ({"dimension": 3, "size": 64, "batch_size": 4}, 16),
}


@pytest.mark.parametrize("case", list(ORDINARY))
def test_memory_preflight_lets_ordinary_runs_through(case):
    options, gib = ORDINARY[case]
    check_memory(ConditionalConfig(**options), 1, 4, 1000, torch.device("cpu"), available=gib * 2**30)
