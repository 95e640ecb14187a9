import json

import nibabel as nib
import numpy as np
import pytest

from consingan.errors import ConsinganError
from consingan.io import IntensityRange, Volume, read_volume, resized_affine, write_volume


def test_intensity_range_maps_to_tanh_range_and_back():
    rng = np.random.default_rng(0)
    array = np.stack([rng.uniform(-1000, 3000, (8, 8)), rng.uniform(0, 65535, (8, 8))]).astype(np.float32)
    intensity = IntensityRange.of(array)
    normalised = intensity.normalise(array)
    assert normalised.min() == pytest.approx(-1) and normalised.max() == pytest.approx(1)
    for channel in range(2):
        assert normalised[channel].min() == pytest.approx(-1) and normalised[channel].max() == pytest.approx(1)
    assert np.allclose(intensity.denormalise(normalised), array, rtol=1e-5, atol=1e-2)
    assert IntensityRange.from_dict(intensity.to_dict()) == intensity


def test_resized_affine_keeps_field_of_view():
    affine = np.array([[0.0, 0, 2, 10], [0, -1.5, 0, 4], [1, 0, 0, -3], [0, 0, 0, 1]])
    new = resized_affine(affine, (30, 40, 50), (15, 20, 10))
    for corner_old, corner_new in [((-0.5,) * 3, (-0.5,) * 3), ((29.5, 39.5, 49.5), (14.5, 19.5, 9.5))]:
        assert np.allclose(affine @ [*corner_old, 1], new @ [*corner_new, 1])


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd", ".npy", ".tif"])
def test_3d_write_read_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    array = rng.normal(size=(1, 6, 7, 8)).astype(np.float32)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [1.0, -2.0, 3.0]
    if suffix == ".npy":
        from consingan.io.volume import default_affine

        affine = default_affine(3)  # .npy stores no geometry: read as ITK's default, like a TIFF without one
    header = nib.Nifti1Header() if suffix == ".nii.gz" else None
    written = write_volume(tmp_path / "vol", Volume(array, affine, suffix, np.dtype(np.float32), header))
    back = read_volume(written, 3)
    assert back.array.shape == array.shape and np.allclose(back.array, array, atol=1e-6)
    if suffix != ".tif":  # SimpleITK's TIFF keeps spacing only
        assert np.allclose(back.affine, affine, atol=1e-5)


@pytest.mark.parametrize("suffix", [".png", ".nii.gz", ".npy"])
def test_2d_rgb_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, size=(3, 9, 11)).astype(np.float32)
    header = nib.Nifti1Header() if suffix == ".nii.gz" else None
    dtype = np.dtype(np.uint8) if suffix == ".png" else np.dtype(np.float32)
    written = write_volume(tmp_path / "img", Volume(array, np.eye(3), suffix, dtype, header))
    back = read_volume(written, 2)
    assert back.array.shape == (3, 9, 11) and np.allclose(back.array, array)


def test_png_16_bit_is_not_squashed(tmp_path):
    array = np.linspace(0, 60000, 64, dtype=np.float32).reshape(1, 8, 8)
    written = write_volume(tmp_path / "deep", Volume(array, np.eye(3), ".png", np.dtype(np.uint16)))
    back = read_volume(written, 2)
    assert back.source_dtype == np.uint16 and np.allclose(back.array, np.rint(array))


def test_npy_with_objects_is_refused(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConsinganError, match="cannot read"):
        read_volume(tmp_path / "objects.npy", 2)


def test_shipped_examples_read():
    volume = read_volume("data/vol.nii.gz", 3)
    assert volume.spatial_shape == (25, 41, 33) and np.allclose(volume.spacing, 2.0)  # z-y-x
    picture = read_volume("data/ihc.png", 2)
    assert picture.channels == 3 and picture.spatial_shape == (512, 512)


def write_dicom_series(folder, array, spacing, origin):
    """Write a [Z, Y, X] int16 array as a DICOM series with SimpleITK (one file per slice)."""
    import SimpleITK as sitk

    folder.mkdir()
    volume = sitk.GetImageFromArray(array.astype(np.int16))
    volume.SetSpacing(spacing)
    volume.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(array.shape[0]):
        image = volume[:, :, z]
        position = volume.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, value in {
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.1", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.2",
            "0008|0060": "CT", "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": "\\".join(map(str, position)),
            "0020|0013": str(z + 1), "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.3.{z + 1}",
            "0018|0050": str(spacing[2]),
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(image)


def test_dicom_series_folder(tmp_path):
    rng = np.random.default_rng(3)
    array = rng.integers(-1000, 2000, size=(6, 10, 12))
    write_dicom_series(tmp_path / "series", array, (0.7, 0.8, 2.5), (10.0, -5.0, 30.0))
    volume = read_volume(tmp_path / "series", 3)
    assert volume.spatial_shape == (6, 10, 12)
    assert np.array_equal(volume.array[0], array)
    assert np.allclose(volume.spacing, [2.5, 0.8, 0.7], atol=1e-4)  # array order (z, y, x)
    assert np.allclose(volume.affine[:3, 3], [10.0, -5.0, 30.0])
    written = write_volume(tmp_path / "out", volume)
    assert written.suffix == ".mha"
    back = read_volume(written, 3)
    assert np.allclose(back.affine, volume.affine, atol=1e-4) and np.array_equal(back.array, volume.array)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConsinganError, match="without a DICOM series"):
        read_volume(tmp_path / "empty", 3)


def test_one_geometry_convention_for_nifti_and_itk_files(tmp_path):
    """The same scan as NIfTI and as MHA (SimpleITK's own conversion) reads to the same array and affine."""
    import nibabel as nib
    import SimpleITK as sitk

    affine = np.array([[0.0, -1.2, 0, 30], [0.9, 0, 0, -12], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "scan.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "scan.nii.gz")), str(tmp_path / "scan.mha"))
    nifti, itk = read_volume(tmp_path / "scan.nii.gz", 3), read_volume(tmp_path / "scan.mha", 3)
    assert nifti.spatial_shape == itk.spatial_shape == (7, 6, 5)  # z, y, x: slowest axis first
    assert np.array_equal(nifti.array, itk.array)
    assert np.allclose(nifti.affine, itk.affine, atol=1e-5)
    # Written back as NIfTI, the file equals the original voxel for voxel and in geometry.
    back = nib.load(str(write_volume(tmp_path / "out", nifti)))
    assert np.array_equal(np.asarray(back.dataobj), data) and np.allclose(back.affine, affine, atol=1e-5)


def test_nifti_image_with_an_mha_label_trains(tmp_path, nifti_3d, runner):
    import SimpleITK as sitk

    from consingan.cli import app
    from tests.conftest import TINY

    image = sitk.ReadImage(str(nifti_3d))
    label = sitk.Cast(sitk.BinaryThreshold(image, 300, 10000, 1, 0), sitk.sitkUInt8)
    sitk.WriteImage(label, str(tmp_path / "label.mha"))
    # Read through the two conventions, the label lies on the image voxel for voxel (an axis order or flip apart, an
    # asymmetric texture would not match its threshold) and on the same grid.
    volume, mask = read_volume(nifti_3d, 3), read_volume(tmp_path / "label.mha", 3, check_values=False)
    assert np.array_equal(mask.array, ((volume.array >= 300) & (volume.array <= 10000)).astype(mask.array.dtype))
    assert 0 < mask.array.mean() < 1 and np.allclose(mask.affine, volume.affine, atol=1e-5)
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--label", str(tmp_path / "label.mha"), "--dim",
                                 "3", "--out-dir", str(tmp_path / "out"), *TINY, "--num-scales", "1"],
                           terminal_width=200)
    assert result.exit_code == 0 and result.exception is None, result.output
    run_dir = tmp_path / "out" / "tiny_001"
    assert json.loads((run_dir / "run.json").read_text())["labels"]["classes"] == [0, 1]
    # The label samples are written as NIfTI on the image's own grid, with the two classes only.
    source = nib.load(str(nifti_3d))
    written = nib.load(str(run_dir / "scale_00" / "samples" / "epoch00003_reconstruction_label.nii.gz"))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1}
