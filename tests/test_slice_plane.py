"""A 2D image read from a one-slice 3D file (a DICOM slice) keeps its place in the patient: position along the
slice normal, thickness and orientation go into its samples."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from consingan.io import read_volume, write_volume
from tests.conftest import blobs

ORIGIN, SPACING = (12.5, -40.0, -35.0), (0.7, 0.7, 3.0)
# An oblique slice: rotated 30 degrees about the patient's left-right axis.
ANGLE = np.deg2rad(30)
DIRECTION = (1.0, 0.0, 0.0, 0.0, np.cos(ANGLE), -np.sin(ANGLE), 0.0, np.sin(ANGLE), np.cos(ANGLE))


def one_slice(path, suffix=".dcm"):
    pixels = (blobs((32, 32), 5) * 1000).astype(np.int16)[None]  # [1, rows, columns]: one slice
    image = sitk.GetImageFromArray(pixels)
    image.SetOrigin(ORIGIN)
    image.SetSpacing(SPACING)
    image.SetDirection(DIRECTION)
    if suffix == ".dcm":  # the tags a scanner writes (with any tag set, ITK writes the dictionary as given)
        image.SetMetaData("0018|0050", str(SPACING[2]))  # SliceThickness: a single slice's only record of it
        image.SetMetaData("0020|0032", "\\".join(f"{v:g}" for v in ORIGIN))  # ImagePositionPatient
        rows, columns = DIRECTION[0::3], DIRECTION[1::3]  # the directions of the x and y axes (matrix columns)
        image.SetMetaData("0020|0037", "\\".join(f"{v:.6f}" for v in (*rows, *columns)))  # ImageOrientationPatient
        image.SetMetaData("0028|0030", f"{SPACING[1]:g}\\{SPACING[0]:g}")  # PixelSpacing
    target = path / f"slice{suffix}"
    sitk.WriteImage(image, str(target))
    return target


def physical(image: sitk.Image) -> tuple:
    return image.GetOrigin(), image.GetSpacing(), image.GetDirection()


def test_a_slice_read_as_2d_is_written_back_where_it_was(tmp_path):
    for suffix in (".dcm", ".mha"):
        source = one_slice(tmp_path, suffix)
        volume = read_volume(source, 2)
        assert volume.array.shape == (1, 32, 32) and volume.plane is not None
        written = write_volume(tmp_path / f"out{suffix.replace('.', '_')}", volume)
        assert written.suffix == ".mha"
        back = sitk.ReadImage(str(written))
        assert back.GetSize() == (32, 32, 1)
        for ours, theirs in zip(physical(back), (ORIGIN, SPACING, DIRECTION)):
            np.testing.assert_allclose(ours, theirs, atol=1e-4)
        # Resized (a sample of another size) it covers the same extent of the same plane.
        smaller = write_volume(tmp_path / f"small{suffix.replace('.', '_')}",
                               volume.with_array(volume.array[:, ::2, ::2]))
        half = sitk.ReadImage(str(smaller))
        np.testing.assert_allclose(half.GetSpacing(), (1.4, 1.4, 3.0), atol=1e-4)
        np.testing.assert_allclose(half.GetDirection(), DIRECTION, atol=1e-6)


def test_samples_of_a_dicom_slice_keep_its_position(tmp_path, runner):
    from consingan.cli import app

    source = one_slice(tmp_path)
    result = runner.invoke(app, ["train", "--image", str(source), "--dim", "2", "--epochs", "2", "--num-scales", "2",
                                 "--num-feature-channels", "8", "--min-size", "12", "--max-size", "32",
                                 "--out-dir", str(tmp_path / "out"), "--seed", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "out").iterdir()
    result = runner.invoke(app, ["sample", str(run), "--num", "1", "--out", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output
    sample = sitk.ReadImage(str(tmp_path / "samples" / "sample_0000.mha"))
    assert sample.GetSize() == (32, 32, 1)
    for ours, theirs in zip(physical(sample), (ORIGIN, SPACING, DIRECTION)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_conditional_samples_of_dicom_slices_keep_their_class_slice_plane(tmp_path):
    """A 2D conditional set of DICOM slices: each class's samples go back to its first slice's plane (position along
    the normal, thickness, oblique orientation), on the fitted grid's pixels."""
    from consingan.conditional.sampler import TrainedConditional
    from consingan.conditional.trainer import train_conditional
    from tests.test_conditional import tiny

    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        one_slice(data / name)
    result = train_conditional(tiny(2, data, tmp_path / "out", epochs=1, size=16))
    model = TrainedConditional.load(result.run_dir, "cpu")
    model.write(tmp_path / "samples", ["a", "b"], 1, 0)
    for name in ("a", "b"):
        sample = sitk.ReadImage(str(tmp_path / "samples" / name / f"{name}_0000.mha"))
        source = sitk.ReadImage(str(data / name / "slice.dcm"))
        assert sample.GetSize() == (16, 16, 1)
        np.testing.assert_allclose(sample.GetSpacing(), (1.4, 1.4, 3.0), atol=1e-4)  # 32 px -> 16 px, same extent
        np.testing.assert_allclose(sample.GetDirection(), DIRECTION, atol=1e-6)

        def centre(image):
            direction = np.reshape(image.GetDirection(), (3, 3))
            half = (np.array(image.GetSize()) - 1) / 2 * np.array(image.GetSpacing())
            return np.array(image.GetOrigin()) + direction @ half

        np.testing.assert_allclose(centre(sample), centre(source), atol=1e-3)
