"""Sampling from a trained pyramid: files, geometry, seeds, retargeting, coarse-fixed variation, injection, Dataset."""

import nibabel as nib
import numpy as np
import pytest
import torch

from consingan.cli import app
from consingan.config import TrainConfig
from consingan.io import read_volume
from consingan.singan.sampler import AugmentationDataset, TrainedPyramid
from consingan.singan.trainer import train
from tests.conftest import blobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny trained 2-scale run in 2D (PNG) and one in 3D (NIfTI with a non-trivial affine)."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("runs")
    grey = (blobs((32, 32), 7) * 255).round().astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(folder / "grey.png"))
    affine = np.array([[0, 0, 1.5, -20], [-1.0, 0, 0, 10], [0, 2.0, 0, 4], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image((blobs((16, 16, 16), 8) * 900).astype(np.int16), affine), str(folder / "head.nii.gz"))
    result = {}
    for name, dims in (("grey.png", 2), ("head.nii.gz", 3)):
        config = TrainConfig(image=str(folder / name), dimension=dims, epochs=15, num_scales=2, num_feature_channels=8,
                             num_layers=2, min_size=10, preview_every=0, seed=0, device="cpu", out_dir=str(folder / "out"))
        result[dims] = train(config).run_dir
    return result


@pytest.mark.parametrize("dims", [2, 3])
def test_same_seed_same_files_different_seed_different_files(runs, runner, tmp_path, dims):
    outputs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = runner.invoke(app, ["sample", str(runs[dims]), "--num", "3", "--out", str(tmp_path / name),
                                     "--seed", str(seed)])
        assert result.exit_code == 0, result.output
        outputs[name] = sorted((tmp_path / name).iterdir())
    suffix = ".png" if dims == 2 else ".nii.gz"
    assert [p.name for p in outputs["a"]] == ["contact_sheet.png"] + [f"sample_{i:04d}{suffix}" for i in range(3)]
    for a, b, c in zip(outputs["a"], outputs["b"], outputs["c"]):
        assert a.read_bytes() == b.read_bytes()
        if a.name != "contact_sheet.png":
            assert read_volume(a, dims, False).array.tolist() != read_volume(c, dims, False).array.tolist()


def test_3d_samples_keep_geometry_and_header(runs, runner, tmp_path):
    result = runner.invoke(app, ["sample", str(runs[3]), "--num", "2", "--out", str(tmp_path / "s"),
                                 "--source-dtype"])
    assert result.exit_code == 0, result.output
    source = nib.load(str(runs[3].parent.parent / "head.nii.gz"))
    sample = nib.load(str(tmp_path / "s" / "sample_0001.nii.gz"))
    assert sample.shape == source.shape and np.allclose(sample.affine, source.affine)
    assert sample.get_data_dtype() == np.int16  # --source-dtype
    assert np.asarray(sample.dataobj).min() >= 0 and np.asarray(sample.dataobj).max() <= 900


@pytest.mark.parametrize("dims, args, expected", [
    (2, ["--shape", "40,24"], (40, 24)), (2, ["--scale", "1.5"], (48, 48)),
    (3, ["--scale", "1,1,2"], (16, 16, 32)), (3, ["--shape", "16x20x12"], (16, 20, 12)),
])
def test_retargeting(runs, runner, tmp_path, dims, args, expected):
    result = runner.invoke(app, ["sample", str(runs[dims]), "--num", "1", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 0, result.output
    written = next(p for p in (tmp_path / "r").iterdir() if p.name.startswith("sample_"))
    assert read_volume(written, dims, check_values=False).spatial_shape == expected


@pytest.mark.parametrize("dims", [2, 3])
def test_start_scale_fixes_coarse_inputs_and_injecting_the_training_image_matches_it(runs, dims):
    pyramid = TrainedPyramid.load(runs[dims])
    fixed = pyramid._noise(pyramid.shapes, seed=1, start_scale=1, injected=None)
    assert torch.equal(fixed[0], pyramid.generator.reconstruction_noise(0))
    free = pyramid._noise(pyramid.shapes, seed=1, start_scale=0, injected=None)
    assert not torch.equal(free[0], fixed[0]) and torch.equal(free[1], fixed[1])
    # The stage-0 reconstruction input is the coarsest training image, so injecting that image changes nothing.
    image = read_volume(pyramid.run.config.image, dims).array
    plain = pyramid.sample(2, seed=5, start_scale=1)
    injected = pyramid.sample(2, seed=5, start_scale=1, inject=image)
    same = (plain - injected).abs().max().item()
    assert same < 1e-5
    edited = pyramid.sample(2, seed=5, start_scale=1, inject=np.flip(image, axis=1).copy())
    assert (plain - edited).abs().max().item() > 100 * max(same, 1e-7)


def test_batches_do_not_change_which_sample_is_which(runs):
    pyramid = TrainedPyramid.load(runs[2])
    together = pyramid.sample(5, seed=9, batch_size=5)
    apart = torch.cat([pyramid.sample(1, seed=9, first_index=i) for i in range(5)])
    assert torch.allclose(together, apart, atol=1e-5)


def test_dataset_in_a_dataloader_with_workers(runs, tmp_path, runner):
    dataset = AugmentationDataset(runs[3], length=4, seed=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batches = torch.cat(list(loader))
    assert batches.shape == (4, 1, 16, 16, 16) and batches.dtype == torch.float32
    runner.invoke(app, ["sample", str(runs[3]), "--num", "4", "--seed", "2", "--out", str(tmp_path / "f")])
    for i in range(4):
        on_disk = np.asarray(nib.load(str(tmp_path / "f" / f"sample_{i:04d}.nii.gz")).dataobj)
        assert np.allclose(batches[i, 0].numpy(), on_disk.T, atol=1e-2)  # arrays are z-y-x, NIfTI files x-y-z
    fresh = AugmentationDataset(runs[3], length=2)
    assert not torch.equal(fresh[0], fresh[0])  # unseeded: a new sample on every access


def test_sampling_errors(runs, runner, tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "run folder not found" in result.output
    result = runner.invoke(app, ["sample", str(runs[2]), "--out", str(tmp_path / "o"), "--start-scale", "7"])
    assert result.exit_code == 2 and "start scale" in result.output
    result = runner.invoke(app, ["sample", str(runs[2]), "--out", str(tmp_path / "o"), "--scale", "1,1,1"])
    assert result.exit_code == 2 and "scale factors" in result.output
    assert not (tmp_path / "o").exists()


def test_samples_come_back_on_the_source_grid(tmp_path, runner):
    # 1 x 1 x 2.5 mm voxels and max_size 20: the pyramid works on a coarser grid, the samples land on the source's.
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    nib.save(nib.Nifti1Image((blobs((24, 24, 12), 9) * 100).astype(np.float32), affine), str(tmp_path / "a.nii.gz"))
    config = TrainConfig(image=str(tmp_path / "a.nii.gz"), dimension=3, epochs=2, num_scales=2,
                         num_feature_channels=8, num_layers=2, min_size=8, max_size=20, preview_every=0, seed=0,
                         device="cpu", out_dir=str(tmp_path / "out"))
    run_dir = train(config).run_dir
    import json

    shapes = json.loads((run_dir / "run.json").read_text())["shapes"]
    # Longest extent 30 mm over max_size 20: 1.5 mm voxels in-plane (24 mm -> 16), the 2.5 mm axis kept at 12
    # (run.json lists axes z-y-x).
    assert shapes[-1] == [12, 16, 16]
    assert runner.invoke(app, ["sample", str(run_dir), "--num", "1", "--out", str(tmp_path / "s")]).exit_code == 0
    sample = nib.load(str(tmp_path / "s" / "sample_0000.nii.gz"))
    assert sample.shape == (24, 24, 12) and np.allclose(sample.affine, affine)
