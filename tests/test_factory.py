import pytest
import torch
from torch import nn

from consingan.nn import ConvBlock, factory

DIMS = [2, 3]


def spatial(dims: int, size: int = 16) -> tuple[int, ...]:
    return (size,) * dims


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize(
    "kwargs, in_size, out_size",
    [
        (dict(kernel_size=3, padding=1), 16, 16),
        (dict(kernel_size=3, padding=0), 16, 14),
        (dict(kernel_size=4, stride=2, padding=1), 16, 8),
        (dict(kernel_size=3, padding=1, padding_mode="reflect"), 16, 16),
    ],
)
def test_conv_shapes(dims, kwargs, in_size, out_size):
    layer = factory.conv(dims, 2, 5, **kwargs)
    assert isinstance(layer, nn.Conv2d if dims == 2 else nn.Conv3d)
    assert layer(torch.randn(1, 2, *spatial(dims, in_size))).shape == (1, 5, *spatial(dims, out_size))


@pytest.mark.parametrize("dims", DIMS)
def test_conv_transpose_doubles(dims):
    layer = factory.conv_transpose(dims, 4, 3)
    assert layer(torch.randn(2, 4, *spatial(dims, 8))).shape == (2, 3, *spatial(dims, 16))


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("name, cls2, cls3", [
    ("batch", nn.BatchNorm2d, nn.BatchNorm3d), ("instance", nn.InstanceNorm2d, nn.InstanceNorm3d),
])
def test_norm_types_and_explicit_affine(dims, name, cls2, cls3):
    for affine in (True, False):
        layer = factory.norm(dims, name, 6, affine=affine)
        assert isinstance(layer, cls2 if dims == 2 else cls3)
        assert layer.affine is affine
    assert isinstance(factory.norm(dims, "none", 6), nn.Identity)
    assert isinstance(factory.norm(dims, "group", 8, num_groups=4), nn.GroupNorm)


def test_activations():
    lrelu = factory.activation("leaky_relu", negative_slope=0.05)
    assert isinstance(lrelu, nn.LeakyReLU) and lrelu.negative_slope == 0.05
    assert isinstance(factory.activation("ReLU"), nn.ReLU)
    assert isinstance(factory.activation("tanh"), nn.Tanh)
    assert isinstance(factory.activation("none"), nn.Identity)


@pytest.mark.parametrize("dims", DIMS)
def test_pooling_and_padding(dims):
    x = torch.randn(1, 3, *spatial(dims, 8))
    assert factory.pool(dims, "avg", kernel_size=2)(x).shape == (1, 3, *spatial(dims, 4))
    assert factory.pool(dims, "max", kernel_size=2)(x).shape == (1, 3, *spatial(dims, 4))
    assert factory.pool(dims, "adaptive_avg", output_size=1)(x).shape == (1, 3, *spatial(dims, 1))
    assert factory.pool(dims, "adaptive_max", output_size=1)(x).shape == (1, 3, *spatial(dims, 1))
    for mode in ("zeros", "reflect", "replicate"):
        assert factory.pad(dims, mode, 2)(x).shape == (1, 3, *spatial(dims, 12))
    reflected = factory.pad(dims, "reflect", 1)(x)
    interior = (slice(None), slice(None), 0) + (slice(1, -1),) * (dims - 1)
    assert torch.equal(reflected[interior], x[:, :, 1])  # reflection mirrors about the edge voxel


def test_interpolation_mode_names():
    assert factory.interpolation_mode(2, "linear") == "bilinear"
    assert factory.interpolation_mode(3, "linear") == "trilinear"
    assert factory.interpolation_mode(3, "nearest") == "nearest"


@pytest.mark.parametrize("dims", DIMS)
def test_spectral_norm_bounds_largest_singular_value(dims):
    layer = factory.spectral_norm(factory.conv(dims, 4, 4, 3, padding=1))
    for _ in range(30):  # power iterations run in training-mode forwards
        layer(torch.randn(1, 4, *spatial(dims, 8)))
    weight = layer.weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(weight, ord=2) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="weight"):
        factory.spectral_norm(nn.ReLU())


@pytest.mark.parametrize("call, match", [
    (lambda: factory.norm(2, "btach", 4), "Did you mean 'batch'"),
    (lambda: factory.activation("leaky"), "unknown activation"),
    (lambda: factory.pool(2, "mean", kernel_size=2), "unknown pooling"),
    (lambda: factory.pad(2, "circular", 1), "unknown padding mode"),
    (lambda: factory.interpolation_mode(2, "cubicle"), "unknown interpolation"),
    (lambda: factory.conv(4, 1, 1), "spatial_dims must be 2 or 3"),
    (lambda: factory.conv(1, 1, 1), "spatial_dims must be 2 or 3"),
])
def test_bad_names_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("dims", DIMS)
def test_conv_block_children_and_shape(dims):
    block = ConvBlock(dims, 3, 8, norm_name="batch", act_name="leaky_relu", negative_slope=0.1)
    assert [name for name, _ in block.named_children()] == ["conv", "norm", "act"]
    assert block(torch.randn(2, 3, *spatial(dims))).shape == (2, 8, *spatial(dims))
    plain = ConvBlock(dims, 3, 8)
    assert [name for name, _ in plain.named_children()] == ["conv", "act"]
