"""Training an image together with its label map: every sample comes with a matching integer label file."""

import nibabel as nib
import numpy as np
import pytest

from consingan.cli import app
from consingan.errors import ConsinganError
from consingan.io import LabelEncoding
from tests.conftest import TINY


def test_encoding_round_trip_and_checks():
    label = np.array([[[0, 3, 3], [7, 0, 3]]], dtype=np.float32)
    encoding = LabelEncoding.of(label, image_channels=2)
    assert encoding.classes == (0, 3, 7) and encoding.dtype == np.uint8
    one_hot = encoding.encode(label)
    assert one_hot.shape == (3, 2, 3) and np.array_equal(one_hot.sum(0), np.ones((2, 3)))
    assert np.array_equal(encoding.decode(one_hot * 2 - 1), label)  # decoding works in the [-1, 1] range too
    image, decoded = encoding.split(np.concatenate([np.zeros((2, 2, 3)), one_hot]))
    assert image.shape == (2, 2, 3) and np.array_equal(decoded, label)
    with pytest.raises(ConsinganError, match="non-integer"):
        LabelEncoding.of(label + 0.5, 1)
    with pytest.raises(ConsinganError, match="single class"):
        LabelEncoding.of(np.zeros((1, 4, 4)), 1)


def test_train_and_sample_with_labels(runner, nifti_3d, tmp_path, out_dir):
    source = nib.load(str(nifti_3d))
    data = np.asarray(source.dataobj)
    label = np.digitize(data, [200, 500]).astype(np.int16)  # background / tissue / bright: 0, 1, 2
    label_path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(label, source.affine), str(label_path))
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--label", str(label_path), "--dim", "3",
                                 "--out-dir", str(out_dir), *TINY], terminal_width=200)
    assert result.exit_code == 0, result.output
    run_dir = out_dir / "tiny_001"
    assert (run_dir / "scale_01" / "samples" / "epoch00003_sample_label.nii.gz").is_file()
    result = runner.invoke(app, ["sample", str(run_dir), "--num", "2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    image = nib.load(str(tmp_path / "s" / "sample_0001.nii.gz"))
    seg = nib.load(str(tmp_path / "s" / "sample_0001_label.nii.gz"))
    assert image.shape == seg.shape == source.shape
    assert np.allclose(seg.affine, source.affine) and np.issubdtype(seg.get_data_dtype(), np.integer)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}


def test_label_on_another_grid_is_refused(runner, nifti_3d, tmp_path, out_dir):
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 15), np.int16), np.eye(4)), str(tmp_path / "bad.nii.gz"))
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--label", str(tmp_path / "bad.nii.gz"),
                                 "--dim", "3", "--out-dir", str(out_dir), *TINY], terminal_width=200)
    assert result.exit_code == 2 and "has shape" in result.output and not out_dir.exists()


def test_dataset_yields_image_and_label(runner, nifti_3d, tmp_path, out_dir):
    from consingan.singan.sampler import AugmentationDataset

    data = np.asarray(nib.load(str(nifti_3d)).dataobj)
    nib.save(nib.Nifti1Image((data > 300).astype(np.uint8), nib.load(str(nifti_3d)).affine), str(tmp_path / "m.nii.gz"))
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--label", str(tmp_path / "m.nii.gz"), "--dim",
                                 "3", "--out-dir", str(out_dir), *TINY, "--num-scales", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    image, label = AugmentationDataset(out_dir / "tiny_001", length=1, seed=0)[0]
    assert image.shape == (1, 16, 16, 16) and label.shape == (1, 16, 16, 16)
    assert set(label.unique().tolist()) <= {0, 1}


def test_label_channels_above_the_window_edge_keep_their_order_when_decoded():
    # Two one-hot channels mapped by the percentile window (0 -> -0.8, 1 -> +0.8): network outputs of 0.9 and 0.95
    # both lie beyond the edge. Held at the extreme they would both read 1 and argmax would take the first class.
    from consingan.io import IntensityRange
    from consingan.io.labels import LabelEncoding

    one_hot = np.zeros((2, 4, 4), dtype=np.float32)
    one_hot[0, :2], one_hot[1, 2:] = 1, 1
    mapping = IntensityRange.of(one_hot, "window", (0.5, 99.5))
    outputs = np.full((2, 1, 1), -0.9)
    outputs[:, 0, 0] = [0.9, 0.95]
    clipped = mapping.denormalise(outputs)
    assert clipped[0, 0, 0] == clipped[1, 0, 0] == 1.0  # the tie the label channels must not have
    kept = mapping.denormalise(outputs, extrapolate_from=0)
    assert kept[1, 0, 0] > kept[0, 0, 0] > 1.0
    assert LabelEncoding((3, 7), 0).decode(kept)[0, 0, 0] == 7
