import pytest
import torch
import torch.nn.functional as F

from consingan.nn.interpolation import Resampler, cubic_matrix, cubic_resize


@pytest.mark.parametrize("size_in, size_out", [((9, 7), (13, 11)), ((16, 12), (21, 16)), ((12, 10), (7, 6))])
def test_cubic_resize_equals_pytorch_bicubic_values_and_gradients(size_in, size_out):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size_in, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, *size_out, dtype=torch.float64)
    expected = F.interpolate(x, size=size_out, mode="bicubic", align_corners=False)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    result = cubic_resize(x, size_out)
    (grad,) = torch.autograd.grad((result * weights).sum(), x)
    assert result.shape == expected.shape
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_cubic_matrix_rows_are_the_cubic_taps():
    matrix = cubic_matrix(4, 8, torch.device("cpu"), torch.float64)
    # Keys' kernel with a = -0.75 (PyTorch's): every row sums to one, an upsampled constant stays constant, and an
    # output pixel a quarter of the way between inputs 1 and 2 (output 3 at scale 1/2: source 1.25) has these taps.
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(8, dtype=torch.float64))
    a, t = -0.75, 0.25
    taps = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a, ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) ** 2 + 1, ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
    torch.testing.assert_close(matrix[3], torch.tensor(taps, dtype=torch.float64))


def test_cubic_resize_in_3d_is_separable_along_every_axis():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64)
    result = cubic_resize(x, (8, 6, 9))
    # Depth and height as a 2D image with width among the channels, then width with depth among the channels.
    step = F.interpolate(x.permute(0, 1, 4, 2, 3).reshape(1, 14, 5, 6), size=(8, 6), mode="bicubic",
                         align_corners=False).reshape(1, 2, 7, 8, 6).permute(0, 1, 3, 4, 2)
    expected = F.interpolate(step.reshape(1, 16, 6, 7), size=(6, 9), mode="bicubic", align_corners=False)
    torch.testing.assert_close(result, expected.reshape(1, 2, 8, 6, 9), rtol=0, atol=1e-12)


def test_resampler_keeps_linear_on_pytorch_and_passes_same_size_through():
    x = torch.randn(1, 4, 6, 5)
    assert Resampler(2, "cubic")(x, (6, 5)) is x
    torch.testing.assert_close(Resampler(2, "linear")(x, (9, 8)),
                               F.interpolate(x, size=(9, 8), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="no 3D form"):
        Resampler(3, "cubic")
