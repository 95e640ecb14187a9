"""End-to-end training through the CLI, and every kind of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from consingan.checkpoint import load_state
from consingan.cli import app
from tests.conftest import TINY, assert_clean_failure


def invoke(runner, args):
    return runner.invoke(app, ["train", *args], terminal_width=200)


def check_run_folder(run_dir: Path, scales: int, suffix: str) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_scales"] == scales and config["seed"] == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert len(info["shapes"]) == scales
    for stage in range(scales):
        folder = run_dir / f"scale_{stage:02d}"
        generator = load_state(folder / "generator.pt")
        assert any(key.startswith(f"body.{stage}.") for key in generator)
        assert f"rec_noise_{stage}" in generator and generator["noise_amps"].numel() == stage + 1
        assert load_state(folder / "critic.pt")
        meta = json.loads((folder / "scale.json").read_text())
        assert meta["shape"] == info["shapes"][stage]
        samples = sorted(p.name for p in (folder / "samples").iterdir())
        # preview_every=2 with 3 epochs: a periodic write at epoch 2 and the final one at epoch 3.
        for epoch in (2, 3):
            assert f"epoch{epoch:05d}_sample{suffix}" in samples
            assert f"epoch{epoch:05d}_reconstruction{suffix}" in samples
            assert f"epoch{epoch:05d}_preview.png" in samples


def test_train_2d_png_end_to_end(runner, png_rgb, out_dir):
    result = invoke(runner, ["--image", str(png_rgb), "--dim", "2", "--out-dir", str(out_dir), *TINY])
    assert result.exit_code == 0, result.output
    assert "training summary" in result.output
    run_dir = out_dir / "tiny_001"
    check_run_folder(run_dir, 2, ".png")
    import SimpleITK as sitk

    sample = sitk.ReadImage(str(run_dir / "scale_01" / "samples" / "epoch00003_sample.png"))
    assert sample.GetNumberOfComponentsPerPixel() == 3 and sample.GetSize() == (32, 32)


def test_train_3d_nifti_end_to_end_keeps_geometry_and_units(runner, nifti_3d, out_dir):
    result = invoke(runner, ["--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir), *TINY])
    assert result.exit_code == 0, result.output
    run_dir = out_dir / "tiny_001"
    check_run_folder(run_dir, 2, ".nii.gz")
    source = nib.load(str(nifti_3d))
    info = json.loads((run_dir / "run.json").read_text())
    coarse_shape = tuple(info["shapes"][0])[::-1]  # run.json is z-y-x (one convention), NIfTI files x-y-z
    coarse = nib.load(str(run_dir / "scale_00" / "samples" / "epoch00003_sample.nii.gz"))
    assert coarse.shape == coarse_shape and coarse.get_data_dtype() == np.float32
    # Same physical extent: voxel size grows by the shrink factor, the field of view's corner stays put.
    ratio = np.array(source.shape) / np.array(coarse_shape)
    assert np.allclose(coarse.header.get_zooms(), np.array(source.header.get_zooms()) * ratio)
    corner = lambda img: img.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    assert np.allclose(corner(coarse), corner(source))
    fine = nib.load(str(run_dir / "scale_01" / "samples" / "epoch00003_reconstruction.nii.gz"))
    assert np.allclose(fine.affine, source.affine)
    values = np.asarray(fine.dataobj)
    source_values = np.asarray(source.dataobj)
    assert source_values.min() - 1 <= values.min() and values.max() <= source_values.max() + 1  # source units


def test_new_run_never_reuses_a_folder(runner, png_rgb, out_dir):
    args = ["--image", str(png_rgb), "--dim", "2", "--out-dir", str(out_dir), *TINY, "--num-scales", "1"]
    assert invoke(runner, args).exit_code == 0
    before = (out_dir / "tiny_001" / "scale_00" / "generator.pt").read_bytes()
    assert invoke(runner, args).exit_code == 0
    assert (out_dir / "tiny_002").is_dir()
    assert (out_dir / "tiny_001" / "scale_00" / "generator.pt").read_bytes() == before
    result = invoke(runner, [*args, "--run-name", "tiny_001"])
    assert result.exit_code == 2 and "already exists" in result.output
    assert (out_dir / "tiny_001" / "scale_00" / "generator.pt").read_bytes() == before


def write_nifti(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))
    return path


@pytest.fixture
def bad_inputs(tmp_path):
    """Every kind of bad image, by name: (path, --dim, expected phrase)."""
    rng = np.random.default_rng(0)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file at all" * 10)
    nan = rng.random((16, 16, 16)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    inf = rng.random((32, 32)).astype(np.float32)
    inf[0, 0] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    return {
        "missing": (tmp_path / "nope.nii.gz", 3, "not found"),
        "corrupt": (corrupt, 3, "cannot read"),
        "series_4d": (write_nifti(tmp_path / "series.nii.gz", rng.random((16, 16, 16, 5))), 3, "4D series"),
        "volume_as_2d": (write_nifti(tmp_path / "vol.nii.gz", rng.random((16, 16, 16))), 2, "not a 2D image"),
        "too_small": (write_nifti(tmp_path / "small.nii.gz", rng.random((16, 16, 6))), 3, "smaller than min_size"),
        "nan": (write_nifti(tmp_path / "nan.nii.gz", nan), 3, "NaN or infinite"),
        "inf": (tmp_path / "inf.npy", 2, "NaN or infinite"),
        "constant": (write_nifti(tmp_path / "const.nii.gz", np.full((16, 16, 16), 7.0)), 3, "constant"),
        "folder": (tmp_path, 3, "folder"),
        "unsupported": (corrupt.with_suffix(".xyz"), 3, "unsupported image type"),
    }


@pytest.mark.parametrize("case", ["missing", "corrupt", "series_4d", "volume_as_2d", "too_small", "nan", "inf",
                                  "constant", "folder", "unsupported"])
def test_bad_images_give_one_line_error_and_exit_2(runner, bad_inputs, out_dir, case):
    path, dims, phrase = bad_inputs[case]
    if case == "unsupported":
        path.write_bytes(b"x")
    result = invoke(runner, ["--image", str(path), "--dim", str(dims), "--out-dir", str(out_dir), *TINY])
    assert_clean_failure(result, phrase)
    assert not out_dir.exists()  # nothing written


@pytest.mark.parametrize("flag, value, phrase", [
    ("--epochs", "0", "epochs must be a positive integer"),
    ("--num-scales", "-1", "num_scales must be a positive integer"),
    ("--lr", "-0.01", "lr must be positive"),
    ("--num-feature-channels", "0", "num_feature_channels"),
])
def test_bad_parameters(runner, png_rgb, out_dir, flag, value, phrase):
    result = invoke(runner, ["--image", str(png_rgb), "--dim", "2", "--out-dir", str(out_dir), *TINY, flag, value])
    assert_clean_failure(result, phrase)
    assert not out_dir.exists()


def test_unwritable_output_folder(runner, png_rgb, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    result = invoke(runner, ["--image", str(png_rgb), "--dim", "2", "--out-dir", str(blocker / "sub"), *TINY])
    # The configuration table is printed first; the refusal is the last line.
    assert_clean_failure(result, f"{blocker / 'sub'} is not a folder", one_line=False)
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "tiny.png"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_output_folder(runner, png_rgb, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = invoke(runner, ["--image", str(png_rgb), "--dim", "2", "--out-dir", str(locked / "out"), *TINY])
    assert_clean_failure(result, "cannot be written", one_line=False)


def test_console_script_prints_no_traceback(tmp_path):
    """The real entry point, in a subprocess: stderr holds one line and the exit code is 2."""
    command = [sys.executable, "-m", "consingan.cli", "train", "--image", str(tmp_path / "missing.nii.gz")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr and "not found" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1


USAGE_ERRORS = {
    "conditional --noise-dim 1e9": (["conditional", "train", "--data", "d", "--noise-dim", "1e9"], "'--noise-dim'"),
    "train --epochs ten": (["train", "--image", "x.png", "--epochs", "ten"], "'--epochs'"),
    "sample with an unknown option": (["sample", "run", "--out", "o", "--bogus"], "No such option: --bogus"),
    "paired train --tile abc": (["paired", "train", "--dim", "2", "--tile", "abc"], "'--tile'"),
    "sample without --out": (["sample", "run"], "--out"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line(runner, tmp_path, monkeypatch, case):
    from tests.test_ill_cases import assert_clean_error

    monkeypatch.chdir(tmp_path)
    args, phrase = USAGE_ERRORS[case]
    result = runner.invoke(app, args, terminal_width=200)
    assert_clean_error(result, phrase)
    assert list(tmp_path.iterdir()) == []


def test_a_bare_command_still_shows_its_help(runner):
    result = runner.invoke(app, ["paired"], terminal_width=200)
    assert "train" in result.output and "predict" in result.output


def test_version_prints_the_package_and_torch_versions(runner):
    from importlib.metadata import version

    import consingan

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.exception is None
    assert result.stdout.strip() == f"consingan {consingan.__version__} (torch {version('torch')})"
