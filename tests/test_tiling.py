import itertools

import pytest
import torch
from torch import nn

from consingan.config import PairedConfig
from consingan.paired.build import build_generator
from consingan.paired.tiling import predict_tiled, tile_grid, tile_starts


def test_tile_starts_cover_and_end_at_the_border():
    assert tile_starts(1024, 512, 256) == [0, 256, 512]
    assert tile_starts(1000, 512, 256) == [0, 256, 488]
    assert tile_starts(300, 512, 256) == [0]
    assert len(tile_grid((1000, 600), (512, 512), (256, 256))) == 3 * 2


@pytest.mark.parametrize("dims, shape, tile, stride", [
    (2, (70, 53), (32, 32), (16, 16)), (2, (64, 64), (32, 32), (24, 24)), (3, (20, 27, 18), (12, 12, 12), (6, 6, 6)),
])
def test_tiled_prediction_equals_whole_image_within_the_receptive_field(dims, shape, tile, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    # Receptive radius 3 (three 3-wide convs); the margins (tile - stride) / 2 are at least 3.
    model = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3, padding=1), nn.ReLU(),
                          conv(4, 1, 3, padding=1)).eval()
    image = torch.randn(1, 2, *shape)
    with torch.no_grad():
        whole = model(image)
        tiled = predict_tiled(model, image, tile, stride)
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5)


def _shipped_generator(dims: int, model: str, tile: int) -> tuple[nn.Module, PairedConfig]:
    """A small generator of a shipped paired architecture, built as ``paired train`` and ``paired predict`` build it."""
    config = PairedConfig(dimension=dims, model=model, tile=tile, num_feature_channels=4).validate()
    torch.manual_seed(0)
    return build_generator(config, 1, 1).eval(), config


# Every voxel comes from the tile in which it lies farthest from a cut edge, written out by hand per axis:
# (image size, tile, stride) -> [(tile start, kept rows inside the tile)]; the margin is (tile - stride) / 2.
KEPT = {
    (64, 32, 16): [(0, slice(0, 24)), (16, slice(8, 24)), (32, slice(8, 32))],
    (32, 16, 8): [(0, slice(0, 12)), (8, slice(4, 12)), (16, slice(4, 16))],
}


@pytest.mark.parametrize("dims, model, size, tile, stride", [
    (2, "unet", 64, 32, 16), (2, "resnet", 64, 32, 16), (3, "unet", 32, 16, 8),
])
def test_a_shipped_generator_is_stitched_from_each_tiles_centre(dims, model, size, tile, stride):
    """The shipped generators normalise by instance statistics and (the U-Nets) see farther than the margin, so their
    tiled prediction is not the whole-image one; what holds is that each output voxel is the generator's output on
    the tile in which that voxel lies farthest from a cut edge."""
    generator, config = _shipped_generator(dims, model, tile)
    image = torch.randn(1, 1, *(size,) * dims, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tiled = predict_tiled(generator, image, [tile] * dims, [stride] * dims, multiple=config.size_multiple())
        assert tiled.shape == (1, 1, *(size,) * dims)
        for corner in itertools.product(KEPT[(size, tile, stride)], repeat=dims):
            window = tuple(slice(start, start + tile) for start, _ in corner)
            kept = tuple(part for _, part in corner)
            placed = tuple(slice(start + part.start, start + part.stop) for start, part in corner)
            expected = generator(image[(..., *window)])[(..., *kept)]
            torch.testing.assert_close(tiled[(..., *placed)], expected, rtol=1e-5, atol=1e-5)


def test_a_shipped_generator_on_an_image_within_one_tile_is_run_once_on_its_reflection_padding():
    generator, config = _shipped_generator(2, "unet", 64)
    assert config.size_multiple() == 64  # a U-Net of depth 6 for 64-pixel tiles
    image = torch.randn(1, 1, 40, 52, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tiled = predict_tiled(generator, image, (64, 64), (32, 32), multiple=config.size_multiple())
        # 40 x 52 is padded to one tile, 64 x 64 (reflected: 24 rows below, 12 columns right), and cropped back.
        whole = generator(torch.nn.functional.pad(image, (0, 12, 0, 24), mode="reflect"))[..., :40, :52]
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_small_images_are_padded_to_the_model_multiple():
    calls = []

    def model(x):
        calls.append(tuple(x.shape[2:]))
        return x[:, :1] * 2

    image = torch.randn(1, 3, 10, 13)
    out = predict_tiled(model, image, (32, 32), (16, 16), multiple=8)
    assert calls == [(16, 16)] and out.shape == (1, 1, 10, 13)
    assert torch.allclose(out, image[:, :1] * 2)
