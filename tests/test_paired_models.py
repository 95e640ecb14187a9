"""Paired generators and discriminators: the seed's shape tables at 256 px in 2D, small volumes in 3D; loss values."""

import pytest
import torch

from consingan.losses import adversarial_loss, feature_matching_loss
from consingan.paired import MultiScaleDiscriminator, PatchDiscriminator, ResNetGenerator, UNetGenerator


def test_unet_matches_the_seed_table_at_256():
    torch.manual_seed(0)
    model = UNetGenerator(2, in_channels=1, out_channels=3, depth=8).eval()
    x = torch.randn(1, 1, 256, 256)
    downs, ups = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: downs.append(tuple(o.shape[1:]))) for b in model.down]
    hooks += [b.register_forward_hook(lambda m, i, o: ups.append(tuple(o.shape[1:]))) for b in model.up]
    with torch.no_grad():
        out = model(x)
    assert downs == [(64, 128, 128), (128, 64, 64), (256, 32, 32), (512, 16, 16), (512, 8, 8), (512, 4, 4),
                     (512, 2, 2), (512, 1, 1)]
    assert ups == [(512, 2, 2), (512, 4, 4), (512, 8, 8), (512, 16, 16), (256, 32, 32), (128, 64, 64), (64, 128, 128)]
    assert out.shape == (1, 3, 256, 256) and out.abs().max() <= 1
    assert not hasattr(model.down[0], "norm") and not hasattr(model.down[7], "norm")


def test_unet_3d_and_bad_sizes():
    model = UNetGenerator(3, in_channels=2, out_channels=1, depth=3, base_channels=4)
    assert model(torch.randn(2, 2, 16, 16, 8)).shape == (2, 1, 16, 16, 8)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 2, 12, 16, 8))


def test_resnet_generator_matches_the_seed_table_at_256():
    model = ResNetGenerator(2, in_channels=1, out_channels=3).eval()
    shapes = []
    for layer in model.model:
        layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    with torch.no_grad():
        out = model(torch.randn(1, 1, 256, 256))
    stages = [s for i, s in enumerate(shapes) if s[1] != 262 and (i == 0 or s != shapes[i - 1])]  # drop paddings
    assert stages == [(64, 256, 256), (128, 128, 128), (256, 64, 64), (512, 32, 32), (256, 64, 64), (128, 128, 128),
                      (64, 256, 256), (3, 256, 256)]
    assert out.shape == (1, 3, 256, 256)


def test_resnet_generator_3d():
    model = ResNetGenerator(3, in_channels=1, out_channels=2, base_channels=4, num_downsampling=2, num_blocks=2)
    assert model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize("dims, size, layers", [(2, 128, 3), (3, 64, 2)])
def test_discriminators_return_features_and_logits(dims, size, layers):
    x = torch.randn(1, 3, *(size,) * dims)
    patch = PatchDiscriminator(dims, 3, base_channels=8, num_layers=layers)
    features = patch(x)
    assert len(features) == layers + 2 and features[-1].shape[1] == 1
    assert features[0].shape[2:] == (size // 2,) * dims
    multi = MultiScaleDiscriminator(dims, 3, num_scales=3, base_channels=8, num_layers=layers)
    outputs = multi(x)
    assert len(outputs) == 3
    assert outputs[1][0].shape[2:] == (size // 4,) * dims  # the second scale sees the input downsampled by 2
    spectral = PatchDiscriminator(dims, 3, base_channels=8, num_layers=layers, spectral=True)
    assert not any("norm" in type(m).__name__.lower() and "Instance" in type(m).__name__ for m in spectral.modules())


def test_adversarial_losses_known_values():
    logits = torch.tensor([0.0, 2.0])
    assert adversarial_loss(logits, True, "lsgan").item() == pytest.approx((1 + 1) / 2)
    assert adversarial_loss(logits, False, "lsgan").item() == pytest.approx((0 + 4) / 2)
    assert adversarial_loss(torch.zeros(3), True, "bce").item() == pytest.approx(0.6931, abs=1e-4)
    assert adversarial_loss(logits, True, "hinge").item() == pytest.approx((1 + 0) / 2)
    assert adversarial_loss(logits, False, "hinge").item() == pytest.approx((1 + 3) / 2)
    assert adversarial_loss(logits, True, "hinge", for_discriminator=False).item() == pytest.approx(-1.0)
    assert adversarial_loss(logits, True, "wgan").item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="unknown GAN criterion"):
        adversarial_loss(logits, True, "gan")


def test_feature_matching_known_value():
    real = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 1, 1)]
    fake = [torch.ones(1, 2, 4, 4), torch.full((1, 2, 2, 2), 3.0), torch.full((1, 1, 1, 1), 100.0)]
    assert feature_matching_loss(fake, real).item() == pytest.approx((1 + 3) / 2)  # logits (last) excluded
    assert feature_matching_loss([fake, fake], [real, real]).item() == pytest.approx(2.0)
