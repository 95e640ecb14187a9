"""Synthetic training sets for segmentation tools: `consingan sample --format nnunet` (an nnU-Net v2 raw dataset,
checked by nnU-Net's own integrity check when nnunetv2 is installed) and AugmentationDataset's MONAI-style items."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from consingan.cli import app
from consingan.errors import ConsinganError
from consingan.io import read_volume
from tests.conftest import blobs

# Two epochs on two small scales: enough for a run whose samples carry label maps, as fast as training gets.
TINY = ["--epochs", "2", "--num-scales", "2", "--num-feature-channels", "8", "--num-layers", "2", "--min-size", "10",
        "--seed", "0", "--dsteps", "1", "--gsteps", "1"]
RUNNER = CliRunner()


def invoke(*args: str, expect: int = 0) -> str:
    result = RUNNER.invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == expect, result.output
    return result.output


def train(folder: Path, name: str, image: Path, label: Path | None, dim: int) -> Path:
    invoke("train", "--image", image, *(["--label", label] if label else []), "--dim", dim, "--out-dir",
           folder / "runs", "--run-name", name, *TINY)
    return folder / "runs" / name


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory) -> dict:
    """A two-channel 3D NIfTI (a vector image, anisotropic, off-origin) with labels 0, 3, 6 (not consecutive)."""
    folder = tmp_path_factory.mktemp("export3d")
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    first, second = blobs((16, 16, 16), 1), blobs((16, 16, 16), 2)
    image = nib.Nifti1Image(np.stack([first * 1000 - 200, second * 500], -1)[:, :, :, None, :].astype(np.float32),
                            affine)
    image.header.set_intent("vector")
    nib.save(image, str(folder / "mri.nii.gz"))
    nib.save(nib.Nifti1Image((np.digitize(first, [0.3, 0.6]) * 3).astype(np.int16), affine), str(folder / "seg.nii.gz"))
    return dict(run=train(folder, "r3", folder / "mri.nii.gz", folder / "seg.nii.gz", 3), source=folder / "mri.nii.gz",
                folder=folder)


@pytest.fixture(scope="module")
def run_png(tmp_path_factory) -> dict:
    """An RGB PNG with a label PNG of values 0, 2, 5."""
    folder = tmp_path_factory.mktemp("export_png")
    rgb = np.stack([blobs((32, 32), s) for s in range(3)], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray((rgb * 255).round().astype(np.uint8), isVector=True), str(folder / "a.png"))
    label = np.choose(np.digitize(rgb[..., 0], [0.3, 0.6]), [0, 2, 5]).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(label), str(folder / "a_seg.png"))
    return dict(run=train(folder, "rpng", folder / "a.png", folder / "a_seg.png", 2), folder=folder)


@pytest.fixture(scope="module")
def run_slice(tmp_path_factory) -> dict:
    """A 2D NIfTI (one slice of anisotropic in-plane spacing, off-origin) with a binary label."""
    folder = tmp_path_factory.mktemp("export_slice")
    affine = np.diag([0.5, 0.7, 3.0, 1.0])
    affine[:3, 3] = [4.0, -6.0, 12.0]
    values = blobs((32, 32), 5)
    nib.save(nib.Nifti1Image((values * 100).astype(np.float32)[:, :, None], affine), str(folder / "slice.nii.gz"))
    nib.save(nib.Nifti1Image((values > 0.5).astype(np.uint8)[:, :, None], affine), str(folder / "slice_seg.nii.gz"))
    return dict(run=train(folder, "rslice", folder / "slice.nii.gz", folder / "slice_seg.nii.gz", 2),
                source=folder / "slice.nii.gz", folder=folder)


@pytest.fixture(scope="module")
def dataset_3d(run_3d) -> dict:
    out = run_3d["folder"] / "Dataset501_Synthetic"
    invoke("sample", run_3d["run"], "--num", "2", "--format", "nnunet", "--out", out, "--channel-names", "T1,T2",
           "--label-names", "tissue,bright")
    return dict(run_3d, out=out)


def test_nnunet_3d_layout_labels_and_geometry(dataset_3d):
    out, source = dataset_3d["out"], nib.load(str(dataset_3d["source"]))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "dataset.json", "imagesTr/consingan_0000_0000.nii.gz", "imagesTr/consingan_0000_0001.nii.gz",
        "imagesTr/consingan_0001_0000.nii.gz", "imagesTr/consingan_0001_0001.nii.gz",
        "labelsTr/consingan_0000.nii.gz", "labelsTr/consingan_0001.nii.gz"]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "T1", "1": "T2"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["numTraining"] == 2
    assert dataset["labels"] == {"background": 0, "tissue": 1, "bright": 2}
    assert dataset["consingan_label_values"] == {"0": 0, "1": 3, "2": 6}
    for path in out.rglob("*.nii.gz"):  # every file on the source's grid, as one-channel 3D images
        written = nib.load(str(path))
        assert written.shape == source.shape[:3] and np.allclose(written.affine, source.affine), path
    # The same seed gives the native samples: the channel files are their channels, the labels their values.
    native = dataset_3d["folder"] / "native"
    invoke("sample", dataset_3d["run"], "--num", "2", "--out", native)
    values = np.array([0, 3, 6])
    for case in range(2):
        image = np.asarray(nib.load(str(native / f"sample_{case:04d}.nii.gz")).dataobj)[:, :, :, 0, :]
        for channel in range(2):
            written = np.asarray(nib.load(str(out / "imagesTr" / f"consingan_{case:04d}_{channel:04d}.nii.gz")).dataobj)
            assert np.array_equal(written, image[..., channel])
        label = nib.load(str(out / "labelsTr" / f"consingan_{case:04d}.nii.gz"))
        assert label.get_data_dtype() == np.uint8 and set(np.unique(label.dataobj)) <= {0, 1, 2}
        native_label = np.asarray(nib.load(str(native / f"sample_{case:04d}_label.nii.gz")).dataobj)
        assert np.array_equal(values[np.asarray(label.dataobj)], native_label)


def test_nnunet_png_keeps_rgb_in_one_file_and_remaps_labels(run_png):
    out, native = run_png["folder"] / "nn", run_png["folder"] / "native"
    invoke("sample", run_png["run"], "--num", "2", "--format", "nnunet", "--out", out)
    invoke("sample", run_png["run"], "--num", "2", "--out", native)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["file_ending"] == ".png" and dataset["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert dataset["labels"] == {"background": 0, "label_2": 1, "label_5": 2}
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"consingan_000{i}_0000.png" for i in range(2)]
    for case in range(2):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / f"consingan_{case:04d}_0000.png")))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert np.array_equal(image, sitk.GetArrayFromImage(sitk.ReadImage(str(native / f"sample_{case:04d}.png"))))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"consingan_{case:04d}.png")))
        native_label = sitk.GetArrayFromImage(sitk.ReadImage(str(native / f"sample_{case:04d}_label.png")))
        assert np.array_equal(np.array([0, 2, 5])[label], native_label)


def test_nnunet_2d_nifti_is_a_genuine_2d_image_with_the_source_geometry(run_slice):
    out = run_slice["folder"] / "nn"
    invoke("sample", run_slice["run"], "--num", "1", "--format", "nnunet", "--out", out)
    source = read_volume(run_slice["source"], 2)
    for path in (out / "imagesTr" / "consingan_0000_0000.nii.gz", out / "labelsTr" / "consingan_0000.nii.gz"):
        assert nib.load(str(path)).shape == (32, 32)  # two axes, not a one-slice volume nnU-Net would plan in 3D
        written = read_volume(path, 2, check_values=False)
        assert written.spatial_shape == source.spatial_shape and np.allclose(written.affine, source.affine)


@pytest.mark.parametrize("which", ["dataset_3d", "run_png", "run_slice"])
def test_nnunet_accepts_the_dataset(which, request, capfd):
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    if which == "dataset_3d":
        out = request.getfixturevalue(which)["out"]
    else:
        out = request.getfixturevalue(which)["folder"] / "checked"
        invoke("sample", request.getfixturevalue(which)["run"], "--num", "2", "--format", "nnunet", "--out", out)
    capfd.readouterr()
    verify_dataset_integrity(str(out), num_processes=1)  # raises on a missing file, a bad label, a shape mismatch
    printed = capfd.readouterr().out
    assert "Done" in printed and "Warning" not in printed and "Error" not in printed, printed  # geometry warnings
    dataset = json.loads((out / "dataset.json").read_text())
    first = next((out / "imagesTr").iterdir())
    reader = determine_reader_writer_from_dataset_json(dataset, str(first), verbose=False)()
    images, properties = reader.read_images([str(first)])
    assert images.shape[0] == (3 if which == "run_png" else 1)
    if which == "run_slice":  # nnU-Net reads it as 2D: the out-of-plane spacing it gives 2D images, planned as 2D
        assert images.shape[1] == 1 and properties["spacing"][0] > 100 * max(properties["spacing"][1:])


@pytest.fixture(scope="module")
def run_unlabelled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export_plain")
    sitk.WriteImage(sitk.GetImageFromArray((blobs((32, 32), 3) * 255).astype(np.uint8)), str(folder / "g.png"))
    return train(folder, "plain", folder / "g.png", None, 2)


def test_nnunet_refusals(run_unlabelled, dataset_3d, tmp_path):
    output = invoke("sample", run_unlabelled, "--format", "nnunet", "--out", tmp_path / "a", expect=2)
    assert "--label" in output and not (tmp_path / "a").exists()
    before = {p: p.read_bytes() for p in dataset_3d["out"].rglob("*") if p.is_file()}
    output = invoke("sample", dataset_3d["run"], "--format", "nnunet", "--out", dataset_3d["out"], expect=2)
    assert "already holds a dataset" in output
    assert {p: p.read_bytes() for p in dataset_3d["out"].rglob("*") if p.is_file()} == before
    for options, message in [(["--channel-names", "T1"], "2 channel"), (["--label-names", "a,ignore"], "reserves"),
                             (["--label-names", "a"], "2 foreground"), (["--format", "nifti"], "--format must be")]:
        output = invoke("sample", dataset_3d["run"], "--format", "nnunet", "--out", tmp_path / "b", *options, expect=2)
        assert message in output and not (tmp_path / "b").exists() and len(output.strip().splitlines()) == 1
    output = invoke("sample", dataset_3d["run"], "--out", tmp_path / "c", "--label-names", "a,b", expect=2)
    assert "--format nnunet only" in output and not (tmp_path / "c").exists()


def test_nnunet_failed_write_leaves_an_existing_out_as_it_was(run_3d, tmp_path, monkeypatch):
    from consingan.io import export
    from consingan.singan.sampler import TrainedPyramid

    out = tmp_path / "existing"  # an empty folder the user made for it
    out.mkdir()
    calls = []

    def failing_write(path, volume, source_dtype=False):
        calls.append(path)
        if len(calls) == 4:  # in the second case: a full disk
            raise OSError(28, "No space left on device")
        return real_write(path, volume, source_dtype=source_dtype)

    real_write = export.write_volume
    monkeypatch.setattr(export, "write_volume", failing_write)
    pyramid = TrainedPyramid.load(run_3d["run"])
    with pytest.raises(ConsinganError, match="No space left"):
        export.write_nnunet_dataset(pyramid, out, 2)
    assert out.is_dir() and not any(out.iterdir())  # kept, and empty: a rerun is not refused
    monkeypatch.setattr(export, "write_volume", real_write)
    assert len(export.write_nnunet_dataset(pyramid, out, 2)) == 7


def test_dataset_dicts_in_a_monai_pipeline(dataset_3d):
    pytest.importorskip("monai")
    from monai.data import DataLoader, MetaTensor
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from consingan.singan.sampler import AugmentationDataset

    dataset = AugmentationDataset(dataset_3d["run"], length=2, seed=0, as_dict=True)
    batch = next(iter(DataLoader(dataset, batch_size=2, num_workers=0)))
    assert isinstance(batch["image"], MetaTensor) and batch["image"].shape == (2, 2, 16, 16, 16)
    assert batch["label"].shape == (2, 1, 16, 16, 16) and batch["label"].dtype == torch.int64
    source_affine = nib.load(str(dataset_3d["source"])).affine
    assert np.allclose(batch["image"].affine.numpy(), source_affine[None]) and batch["image"].affine.shape == (2, 4, 4)
    # Item 1 is what MONAI's own loader reads from case 1 of the same seed: axes, values and affine.
    out = dataset_3d["out"]
    load = Compose([LoadImaged(["t1", "t2", "label"]), EnsureChannelFirstd(["t1", "t2", "label"])])
    loaded = load({"t1": str(out / "imagesTr" / "consingan_0001_0000.nii.gz"),
                   "t2": str(out / "imagesTr" / "consingan_0001_0001.nii.gz"),
                   "label": str(out / "labelsTr" / "consingan_0001.nii.gz")})
    item = dataset[1]
    # Drawn alone here and in a batch of two by `consingan sample`: the same draw to float32 rounding (oneDNN picks its
    # kernels by batch size, and on some CPUs, AVX2-only ones among them, those round differently).
    expected = torch.cat([loaded["t1"], loaded["t2"]]).as_tensor()
    assert torch.allclose(item["image"].as_tensor(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(dataset[0]["image"].as_tensor(), expected, rtol=1e-3, atol=1e-3)  # another draw
    assert np.array_equal(item["label"].numpy(), np.array([0, 3, 6])[loaded["label"].numpy().astype(int)])
    assert torch.allclose(item["image"].affine, loaded["t1"].affine) and item["image"].meta["space"] == "RAS"


def test_dataset_dicts_without_monai_in_a_torch_loader(run_3d, run_unlabelled, monkeypatch):
    from consingan.singan.sampler import AugmentationDataset

    monkeypatch.setitem(sys.modules, "monai", None)  # as if MONAI were not installed
    monkeypatch.setitem(sys.modules, "monai.data", None)
    dataset = AugmentationDataset(run_3d["run"], length=2, seed=0, as_dict=True)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=0)))
    assert set(batch) == {"image", "label", "affine"} and type(batch["image"]) is torch.Tensor
    assert np.allclose(batch["affine"].numpy(), nib.load(str(run_3d["source"])).affine[None])
    # The tuple items of the same seed hold the same values, with the spatial axes slowest first.
    image, label = AugmentationDataset(run_3d["run"], length=2, seed=0)[1]
    assert torch.equal(batch["image"][1], image.permute(0, 3, 2, 1)) and torch.equal(batch["label"][1],
                                                                                       label.permute(0, 3, 2, 1))
    plain = AugmentationDataset(run_unlabelled, length=1, seed=0, as_dict=True)[0]
    assert set(plain) == {"image", "affine"} and plain["image"].shape == (1, 32, 32)
