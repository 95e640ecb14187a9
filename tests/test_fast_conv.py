"""The oneDNN convolution path must give the plain path's numbers, through double backward (gradient penalty)."""

import pytest
import torch

from consingan.nn import factory, fast_conv


@pytest.mark.parametrize("in_channels, out_channels, kernel_size, padding, shape", [
    (8, 8, 3, 1, (9, 10, 7)), (1, 8, 3, 1, (16, 16, 16)), (8, 1, 3, 0, (9, 8, 7)), (2, 1, 7, 3, (8, 9, 10)),
    (16, 4, 1, 0, (1, 1, 1)), (24, 8, 3, 1, (30, 30, 6)),
])
@pytest.mark.parametrize("batch", [1, 2])  # batch 1 below N*C*D*H 20480 takes the swapped-axes kernel gradient
@pytest.mark.parametrize("route", ["auto", "native", "swapped"])  # the kernel gradient's two routes, and the timed pick
def test_matches_plain_convolution_to_second_order(in_channels, out_channels, kernel_size, padding, shape, batch, route,
                                                   monkeypatch):
    monkeypatch.setattr(fast_conv, "weight_gradient_route", route)
    torch.manual_seed(0)
    conv = factory.conv(3, in_channels, out_channels, kernel_size, padding=padding)
    assert isinstance(conv, fast_conv.Conv3d)
    x = torch.randn(batch, in_channels, *shape, requires_grad=True)

    def gradients(forward):
        out = forward(conv, x)
        first = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias], create_graph=True)
        second = torch.autograd.grad(first[0].square().sum() + first[1].sum(), [x, conv.weight])
        return [out, *first, *second]

    fast = gradients(fast_conv.conv_forward)
    plain = gradients(fast_conv.reference_forward)
    for a, b in zip(fast, plain):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_falls_back_where_it_does_not_apply():
    conv = factory.conv(3, 4, 4, 3, stride=2, padding=1)
    x = torch.randn(1, 4, 8, 8, 8)
    assert not fast_conv._usable(conv, x)
    assert torch.allclose(conv(x), fast_conv.reference_forward(conv, x))
    reflect = factory.conv(3, 4, 4, 3, padding=1, padding_mode="reflect")
    assert not fast_conv._usable(reflect, x)
    assert not fast_conv._usable(factory.conv(3, 4, 4, 3).double(), x.double())


def test_kernel_gradient_route_is_timed_once_per_kind_of_map_and_fixed_in_deterministic_mode(monkeypatch):
    monkeypatch.setattr(fast_conv, "_routes", {})
    x, grad = torch.randn(2, 8, 16, 16, 16), torch.randn(2, 8, 16, 16, 16)
    shape, padding = (8, 8, 3, 3, 3), (1, 1, 1)
    route = fast_conv._route(x, grad, padding, shape)
    assert route in ("native", "swapped") and len(fast_conv._routes) == 1
    # A box one voxel narrower (patch training at a border) is the same kind of map: no second timing.
    assert fast_conv._route(x[..., 1:], grad[..., 1:], padding, shape) == route and len(fast_conv._routes) == 1
    assert fast_conv._route(torch.randn(2, 8, 30, 30, 30), torch.randn(2, 8, 30, 30, 30), padding, shape)
    assert len(fast_conv._routes) == 2
    # Batch 1 on a small map: PyTorch's own kernel is its slow reference one, never timed.
    assert fast_conv._route(x[:1], grad[:1], padding, shape) == "swapped" and len(fast_conv._routes) == 2
    monkeypatch.setattr(fast_conv, "_routes", {})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert fast_conv._route(x, grad, padding, shape) == "native" and not fast_conv._routes
    finally:
        torch.use_deterministic_algorithms(previous)
