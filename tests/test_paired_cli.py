"""End-to-end paired training and prediction through the CLI, 2D and 3D; bad pairs are reported by name."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from consingan.cli import app
from tests.conftest import blobs


def make_pairs(root, dims, count=2, size=None):
    """Masks (3 classes) and target images that depend on them, as PNG (2D) or NIfTI (3D)."""
    source, target = root / "masks", root / "images"
    source.mkdir()
    target.mkdir()
    size = size or (32 if dims == 2 else 16)
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    for index in range(count):
        texture = blobs((size,) * dims, index)
        mask = np.digitize(texture, [0.3, 0.6]).astype(np.uint8)
        image = (mask * 80 + texture * 40).astype(np.uint8)
        if dims == 2:
            sitk.WriteImage(sitk.GetImageFromArray(mask), str(source / f"cell{index}.png"))
            sitk.WriteImage(sitk.GetImageFromArray(image), str(target / f"cell{index}.png"))
        else:
            nib.save(nib.Nifti1Image(mask, affine), str(source / f"vol{index}.nii.gz"))
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(target / f"vol{index}.nii.gz"))
    return source, target


@pytest.mark.parametrize("dims, model, extra", [
    (2, "unet", ["--one-hot"]), (3, "unet", []), (2, "cbam_unet", ["--discriminator", "multiscale", "--tile", "32"]),
    (2, "local_enhancer", ["--tile", "32"]), (2, "unetpp", ["--tile", "32"]), (3, "spade_unet", []), (2, "resnet", []),
])
def test_paired_train_and_predict(runner, tmp_path, dims, model, extra):
    source, target = make_pairs(tmp_path, dims)
    tile = "16" if dims == 2 else "8"
    args = ["paired", "train", "--source", str(source), "--target", str(target), "--model", model, "--dim", str(dims),
            "--epochs", "2", "--out-dir", str(tmp_path / "out"), "--tile", tile, "--base-channels", "4", "--seed", "0",
            *extra]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "out" / "paired_001"
    assert (run_dir / "generator.pt").is_file() and "epoch 2" in result.output
    # Predict on a new, larger image: tiles cover it, the output keeps its size and geometry.
    new = tmp_path / "new"
    new.mkdir()
    size = (40, 24) if dims == 2 else (20, 12, 16)
    mask = np.digitize(blobs(size, 9), [0.3, 0.6]).astype(np.uint8)
    if dims == 2:
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(new / "big.png"))
    else:
        affine = np.diag([0.5, 0.5, 1.0, 1.0])
        nib.save(nib.Nifti1Image(mask, affine), str(new / "big.nii.gz"))
    result = runner.invoke(app, ["paired", "predict", str(run_dir), "--source", str(new), "--out",
                                 str(tmp_path / "pred")], terminal_width=200)
    assert result.exit_code == 0, result.output
    if dims == 2:
        out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / "big.png")))
        assert out.shape == size
    else:
        out = nib.load(str(tmp_path / "pred" / "big.nii.gz"))
        assert out.shape == size and np.allclose(out.affine, affine)


def test_paired_resume_continues_to_the_end(runner, tmp_path):
    source, target = make_pairs(tmp_path, 2)
    args = ["paired", "train", "--dim", "2", "--source", str(source), "--target", str(target), "--epochs", "1", "--out-dir",
            str(tmp_path / "out"), "--tile", "16", "--base-channels", "4", "--seed", "0"]
    assert runner.invoke(app, args).exit_code == 0
    import json

    run_dir = tmp_path / "out" / "paired_001"
    config = json.loads((run_dir / "config.json").read_text())
    config["epochs"] = 3  # as if the first run had been cut off after one of three epochs
    (run_dir / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["paired", "train", "--resume", str(run_dir)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "epoch 2" in result.output and "epoch 3" in result.output and "epoch 1:" not in result.output


def test_unmatched_and_mismatched_pairs_are_named(runner, tmp_path):
    source, target = make_pairs(tmp_path, 2, count=3)
    (target / "cell2.png").unlink()
    result = runner.invoke(app, ["paired", "train", "--dim", "2", "--source", str(source), "--target", str(target), "--out-dir",
                                 str(tmp_path / "out")], terminal_width=200)
    assert result.exit_code == 2 and "no target for cell2" in result.output
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 32), np.uint8) + 3), str(target / "cell2.png"))
    result = runner.invoke(app, ["paired", "train", "--dim", "2", "--source", str(source), "--target", str(target), "--out-dir",
                                 str(tmp_path / "out")], terminal_width=200)
    assert result.exit_code == 2 and "cell2: source (32, 32) vs target (20, 32)" in result.output
    assert not (tmp_path / "out").exists()


def test_geometry_mismatch_is_named(runner, tmp_path):
    source, target = make_pairs(tmp_path, 3)
    image = nib.load(str(target / "vol1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), np.diag([0.5, 0.5, 2.0, 1.0])), str(target / "vol1.nii.gz"))
    result = runner.invoke(app, ["paired", "train", "--source", str(source), "--target", str(target), "--dim", "3",
                                 "--out-dir", str(tmp_path / "out")], terminal_width=200)
    assert result.exit_code == 2 and "vol1: source and target geometry" in result.output


@pytest.mark.parametrize("mapping", ["window", "minmax"])
def test_paired_targets_take_the_intensity_mapping_and_old_runs_keep_min_max(runner, tmp_path, mapping):
    import json

    from consingan.runs import RunFolder

    source, target = make_pairs(tmp_path, 2)
    args = ["paired", "train", "--dim", "2", "--source", str(source), "--target", str(target), "--epochs", "1", "--out-dir",
            str(tmp_path / "out"), "--tile", "16", "--base-channels", "4", "--seed", "0", "--one-hot"]
    if mapping != "window":
        args += ["--intensity-mapping", mapping]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "out" / "paired_001"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["intensity"]["mapping"] == mapping and ("low" in info["intensity"]) == (mapping == "window")
    assert RunFolder.open(run_dir, "paired").config.intensity_mapping == mapping
    # A run written before the option existed (run.json format 2) was mapped min-max: it opens (and resumes) as
    # min-max. The format, not the missing key, says so: a current-format run missing it takes today's default.
    config = json.loads((run_dir / "config.json").read_text())
    del config["intensity_mapping"]
    (run_dir / "config.json").write_text(json.dumps(config))
    assert RunFolder.open(run_dir, "paired").config.intensity_mapping == "window"
    (run_dir / "run.json").write_text(json.dumps({**info, "format_version": 2}))
    assert RunFolder.open(run_dir, "paired").config.intensity_mapping == "minmax"
