"""The conditional family on medical data: physical extents, the classes' own grids, anatomical flips."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch

from consingan.conditional.data import augment, fit_to_size
from consingan.config import ConditionalConfig
from consingan.errors import ConsinganError
from consingan.io.volume import Volume, reorient_canonical
from tests.conftest import blobs
from tests.test_conditional import tiny


def test_reorientation_keeps_every_voxel_at_its_position_and_makes_the_axes_canonical():
    array = np.random.default_rng(0).random((1, 4, 5, 6)).astype(np.float32)
    affine = np.zeros((4, 4))
    affine[0, 0], affine[2, 1], affine[1, 2], affine[3, 3] = -2.0, 3.0, -1.5, 1.0  # axes: R, S, A (not z-y-x LPS)
    affine[:3, 3] = [10, 20, 30]
    volume = Volume(array, affine, ".mha")
    turned = reorient_canonical(volume)
    linear = turned.affine[:3, :3]
    assert np.allclose(linear * (1 - np.fliplr(np.eye(3))), 0)  # array axis k along world axis 2 - k only
    assert all(linear[2 - k, k] > 0 for k in range(3))  # running I->S, A->P, R->L
    inverse = np.linalg.inv(turned.affine)
    for index in itertools.product(range(4), range(5), range(6)):
        world = affine[:3, :3] @ np.array(index, float) + affine[:3, 3]
        moved = np.round(inverse[:3, :3] @ world + inverse[:3, 3]).astype(int)
        assert turned.array[(0, *moved)] == array[(0, *index)]
    assert reorient_canonical(turned) is turned  # canonical already: unchanged


def test_extent_fit_keeps_the_physical_aspect_and_the_grid_is_where_the_image_was():
    # 40 x 20 voxels of 1 x 4 mm: 40 x 80 mm, so the long side is the second axis.
    array = blobs((40, 20), 3)[None].astype(np.float32)
    affine = np.diag([1.0, 4.0, 1.0])
    affine[:2, 2] = [5.0, -7.0]
    fitted, grid = fit_to_size(Volume(array, affine, ".mha"), 16, "extent")
    assert fitted.shape == (1, 16, 16)
    spacing = np.linalg.norm(grid[:2, :2], axis=0)
    assert np.allclose(spacing, 80 / 16)  # isotropic: the 80 mm side across 16 voxels
    filled = fitted[0] > fitted.min()
    rows = np.flatnonzero(filled.any(axis=1))
    assert rows.min() >= 3 and rows.max() <= 12  # 40 mm of 80: the middle 8 rows hold the image
    centre_before = affine[:2, :2] @ (np.array([40, 20]) / 2 - 0.5) + affine[:2, 2]
    centre_after = grid[:2, :2] @ (np.array([16, 16]) / 2 - 0.5) + grid[:2, 2]
    assert np.allclose(centre_before, centre_after)
    stretched, stretched_grid = fit_to_size(Volume(array, affine, ".mha"), 16, "resize")
    assert stretched.shape == (1, 16, 16)  # every axis stretched: anisotropic voxels
    assert np.allclose(np.linalg.norm(stretched_grid[:2, :2], axis=0), [40 / 16, 80 / 16])


def test_flips_follow_the_named_anatomical_axes():
    config = ConditionalConfig(dimension=3)
    assert config.flip_dims() == (2,)  # left-right only by default
    assert ConditionalConfig(dimension=3, flip_axes="superior-inferior, left-right").flip_dims() == (0, 2)
    assert ConditionalConfig(dimension=2, flip_axes="up-down").flip_dims() == (0,)
    assert ConditionalConfig(dimension=3, flip_axes="none").flip_dims() == ()
    with pytest.raises(ConsinganError, match="'up-down' is not an axis of a 3D image"):
        ConditionalConfig(dimension=3, flip_axes="up-down").validate()
    ramp = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(8, 1, 4, 4, 4).clone()  # rises inferior -> superior
    flipped = augment(ramp, config.flip_dims(), False, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, ramp)  # a left-right flip never turns the head upside down
    upside = augment(ramp, (0,), False, 0.0, torch.Generator().manual_seed(0))
    assert not torch.equal(upside, ramp)


def test_runs_written_with_flips_read_as_the_axes_they_flipped():
    assert ConditionalConfig.from_dict({"dimension": 3, "flips": True}).flip_axes == \
        "superior-inferior,anterior-posterior,left-right"
    assert ConditionalConfig.from_dict({"dimension": 2, "flips": False}).flip_axes == "none"


def test_samples_are_written_on_their_class_grid(tmp_path):
    from consingan.conditional.sampler import TrainedConditional
    from consingan.conditional.trainer import train_conditional

    data = tmp_path / "data"
    affines = {"bright": np.diag([2.0, 1.0, 1.0, 1.0]), "dark": np.diag([1.0, 1.0, 3.0, 1.0])}
    for label, name in enumerate(affines):
        (data / name).mkdir(parents=True)
        for index in range(2):
            image = blobs((8, 12, 10), 10 * label + index) * (200 if name == "bright" else 60)
            affine = affines[name].copy()
            affine[:3, 3] = [-30.0 * label, 10.0, 5.0]
            nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(data / name / f"{index}.nii.gz"))
    result = train_conditional(tiny(3, data, tmp_path / "out", epochs=1, size=8, attention=4))
    model = TrainedConditional.load(result.run_dir, "cpu")
    model.write(tmp_path / "samples", ["bright", "dark"], 1, 0)
    for name in affines:
        written = nib.load(str(tmp_path / "samples" / name / f"{name}_0000.nii.gz"))
        first = nib.load(str(data / name / "0.nii.gz"))
        # The class's first image's extent, centre and orientation, on isotropic voxels.
        extent = np.array(first.shape) * np.abs(np.diag(first.affine)[:3])
        spacing = np.abs(np.diag(written.affine)[:3])
        covered = np.maximum(1, np.round(8 * extent / extent.max()))  # voxels the image spans on the grid
        assert np.allclose(spacing, extent / covered)  # its extent exactly, in (near-)isotropic voxels
        assert spacing[np.argmax(extent)] == pytest.approx(extent.max() / 8)
        centre = lambda image: image.affine[:3, :3] @ (np.array(image.shape[:3]) / 2 - 0.5) + image.affine[:3, 3]
        # Centred to within half an output voxel (an odd padding puts the extra voxel on one side).
        assert (np.abs(centre(written) - centre(first)) <= spacing / 2 + 1e-4).all()
