import pytest
import torch
from torch import nn

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


def test_small_images_are_padded_to_the_model_multiple():
    calls = []

    def model(x):
        calls.append(tuple(x.shape[2:]))
        return x[:, :1] * 2

    image = torch.randn(1, 3, 10, 13)
    out = predict_tiled(model, image, (32, 32), (16, 16), multiple=8)
    assert calls == [(16, 16)] and out.shape == (1, 1, 10, 13)
    assert torch.allclose(out, image[:, :1] * 2)
