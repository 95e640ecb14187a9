import pytest
import torch

from consingan.nn import CBAM, ChannelAttention, SpatialAttention

DIMS = [2, 3]


@pytest.mark.parametrize("dims", DIMS)
def test_shapes(dims):
    x = torch.randn(2, 16, *(8,) * dims)
    assert ChannelAttention(dims, 16)(x).shape == (2, 16, *(1,) * dims)
    assert SpatialAttention(dims)(x).shape == (2, 1, *(8,) * dims)
    assert CBAM(dims, 16)(x).shape == x.shape


@pytest.mark.parametrize("dims", DIMS)
def test_channel_attention_uses_average_and_max_through_one_shared_mlp(dims):
    torch.manual_seed(0)
    module = ChannelAttention(dims, 8, reduction=2)
    x = torch.randn(1, 8, *(6,) * dims)
    avg = x.mean(dim=tuple(range(2, 2 + dims)), keepdim=True)
    mx = x.amax(dim=tuple(range(2, 2 + dims)), keepdim=True)
    expected = torch.sigmoid(module.mlp(avg) + module.mlp(mx))
    assert torch.allclose(module(x), expected, atol=1e-6)
    # Max pooling really takes part: raising one voxel (which barely moves the mean) changes the weights.
    y = x.clone()
    y[(0, 3) + (0,) * dims] = 50.0
    assert not torch.allclose(module(x)[0, 3], module(y)[0, 3], atol=1e-4)


@pytest.mark.parametrize("dims", DIMS)
def test_spatial_attention_uses_channel_mean_and_max_through_a_seven_wide_conv(dims):
    module = SpatialAttention(dims)
    assert tuple(module.conv.kernel_size) == (7,) * dims and module.conv.in_channels == 2
    x = torch.randn(1, 5, *(9,) * dims)
    descriptor = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    assert torch.allclose(module(x), torch.sigmoid(module.conv(descriptor)), atol=1e-6)


@pytest.mark.parametrize("dims", DIMS)
def test_cbam_applies_channel_then_spatial(dims):
    torch.manual_seed(1)
    module = CBAM(dims, 8, reduction=2)
    x = torch.randn(2, 8, *(6,) * dims)
    after_channel = x * module.channel_attention(x)
    expected = after_channel * module.spatial_attention(after_channel)
    assert torch.allclose(module(x), expected, atol=1e-6)
    wrong_order = x * module.spatial_attention(x)
    wrong_order = wrong_order * module.channel_attention(wrong_order)
    assert not torch.allclose(module(x), wrong_order, atol=1e-6)


def test_even_spatial_kernel_rejected():
    with pytest.raises(ValueError, match="odd"):
        SpatialAttention(2, kernel_size=6)
