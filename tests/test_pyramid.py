import numpy as np
import pytest
import torch

from consingan.errors import ConsinganError
from consingan.singan.pyramid import build_pyramid, pyramid_shapes, resize


def test_2d_sizes_match_reference_consingan():
    # The reference trains its default 6 stages at 25x38 ... 167x250 (benchmark figures in issue 5).
    shapes = pyramid_shapes((334, 500), num_scales=6, max_size=250, min_size=25)
    assert shapes == [(25, 38), (31, 47), (41, 61), (60, 89), (115, 171), (167, 250)]


def test_3d_every_axis_takes_part_including_depth():
    shapes = pyramid_shapes((120, 100, 60), num_scales=5, max_size=100, min_size=20)
    assert shapes[-1] == (100, 84, 50)
    assert min(shapes[0]) == 20 and shapes[0][2] == 20  # depth is the shortest axis and reaches min_size
    for coarse, fine in zip(shapes, shapes[1:]):
        assert all(c <= f for c, f in zip(coarse, fine))
        assert coarse[2] < fine[2]  # depth shrinks with the others


def test_odd_shapes_and_stretched_coarse_scales():
    shapes = pyramid_shapes((37, 53), num_scales=8, max_size=250, min_size=11)
    assert shapes[-1] == (37, 53) and shapes[0][0] == 11
    ratios = [shapes[i + 1][0] / shapes[i][0] for i in range(len(shapes) - 1)]
    # ConSinGAN's rule: coarse steps are smaller than fine steps.
    assert ratios[0] < ratios[-1]


def test_single_scale_and_too_small_images():
    assert pyramid_shapes((40, 30), 1, 250, 25) == [(40, 30)]
    with pytest.raises(ConsinganError, match="smaller than min_size"):
        pyramid_shapes((40, 20), 4, 250, 25)
    with pytest.raises(ConsinganError, match="max_size"):
        pyramid_shapes((400, 50), 4, 100, 25)  # 50 * 100/400 = 12.5 < 25


def test_resize_is_float_and_antialiased():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.uniform(0.3, 0.7, size=(1, 1, 64, 64))).float()
    small = resize(values, (16, 16))
    assert small.dtype == torch.float32
    assert len(torch.unique(small)) > 200  # no 8-bit quantisation
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2
    shrunk = resize(checker[None, None].float(), (16, 16))
    assert torch.allclose(shrunk, torch.full_like(shrunk, 0.5), atol=0.02)  # the pattern averages out, no aliasing


@pytest.mark.parametrize("dims", [2, 3])
def test_build_pyramid_shapes_and_range(dims):
    image = torch.rand(1, 2, *(24,) * dims) * 2 - 1
    shapes = pyramid_shapes(image.shape[2:], 3, 24, 10)
    pyramid = build_pyramid(image, shapes)
    assert [tuple(p.shape[2:]) for p in pyramid] == shapes
    assert torch.equal(pyramid[-1], image)
    assert all(p.min() >= -1 and p.max() <= 1 for p in pyramid)


def test_anisotropic_pyramid_works_on_physical_extents():
    # 200 x 200 x 40 voxels of 1 x 1 x 5 mm: a 200 mm cube.
    shapes = pyramid_shapes((200, 200, 40), num_scales=5, max_size=250, min_size=25, spacing=(1, 1, 5))
    assert shapes[-1] == (200, 200, 40) and shapes[0] == (25, 25, 25)
    for shape in shapes:
        # The thick axis is never squashed: its voxels stay at 5 mm until the scale's voxel size passes 5 mm.
        voxel_fine = 200 / shape[0]
        voxel_thick = 200 / shape[2]
        assert voxel_thick == pytest.approx(max(5.0, voxel_fine), rel=0.05)
    # Isotropic spacing gives exactly the voxel rule.
    assert pyramid_shapes((60, 80, 40), 6, 250, 20, spacing=(2, 2, 2)) == pyramid_shapes((60, 80, 40), 6, 250, 20)
