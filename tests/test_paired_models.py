"""Paired generators and discriminators: the paired architectures' shape tables at 256 px in 2D, small volumes in 3D; loss values."""

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


from consingan.nn import CBAM, SPADE, CoordinateAttention  # noqa: E402
from consingan.paired import ResNetRefiner, UNetPlusPlusGenerator  # noqa: E402


@pytest.mark.parametrize("dims", [2, 3])
def test_coordinate_attention_pools_along_each_axis(dims):
    torch.manual_seed(0)
    module = CoordinateAttention(dims, 16).eval()
    x = torch.randn(2, 16, *([6, 7, 5][:dims]))
    assert module(x).shape == x.shape
    assert len(module.per_axis) == dims  # one attention per spatial axis: three in 3D
    # Each axis attention varies only along its own axis: with a constant input the output is separable.
    out = module(torch.ones(1, 16, *([6, 7, 5][:dims])))
    if dims == 2:
        assert torch.allclose(out[0, 0], out[0, 0, :, :1] * out[0, 0, :1, :] / out[0, 0, :1, :1], atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_spade_is_parameter_free_norm_modulated_by_the_map(dims):
    torch.manual_seed(0)
    spade = SPADE(dims, 8, label_channels=2, hidden=16)
    x = torch.randn(2, 8, *(8,) * dims) * 5 + 3
    segmentation = (torch.rand(2, 2, *(16,) * dims) > 0.5).float()  # resized (nearest) to x's size
    out = spade(x, segmentation)
    assert out.shape == x.shape
    assert not any(p.requires_grad for p in spade.norm.parameters())
    with torch.no_grad():  # gamma = beta = 0 gives the plain instance norm
        for conv in (spade.gamma, spade.beta):
            conv.weight.zero_()
            conv.bias.zero_()
    normalised = spade(x, segmentation)
    assert torch.allclose(normalised.mean(dim=tuple(range(2, 2 + dims))), torch.zeros(2, 8), atol=1e-5)


def test_refiner_matches_the_seed_table_and_works_in_3d():
    refiner = ResNetRefiner(2)
    image, mask = torch.randn(1, 3, 64, 64), torch.randn(1, 1, 64, 64)
    assert refiner.head(torch.cat([image, mask], 1)).shape == (1, 64, 64, 64)
    assert refiner(image, mask).shape == (1, 3, 64, 64)
    assert sum(isinstance(m, CoordinateAttention) for m in refiner.modules()) == 6
    small = ResNetRefiner(3, in_channels=2, out_channels=1, channels=8, num_blocks=2)
    assert small(torch.randn(1, 1, 8, 8, 8), torch.randn(1, 1, 8, 8, 8)).shape == (1, 1, 8, 8, 8)


def test_cbam_unet_has_seven_attention_skips_with_2f_channels():
    model = UNetGenerator(2, skip_attention=True).eval()
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    assert len(cbams) == 7
    assert [m.channel_attention.mlp[0].in_channels for m in cbams] == [1024, 1024, 1024, 1024, 512, 256, 128]
    with torch.no_grad():
        assert model(torch.randn(1, 1, 256, 256)).shape == (1, 3, 256, 256)


@pytest.mark.parametrize("dims, size", [(2, 32), (3, 16)])
def test_spade_unet(dims, size):
    model = UNetGenerator(dims, in_channels=2, out_channels=1, depth=3, base_channels=4, spade_channels=2)
    assert sum(isinstance(m, SPADE) for m in model.modules()) == 2
    assert model(torch.randn(1, 2, *(size,) * dims)).shape == (1, 1, *(size,) * dims)


def test_unetpp_matches_the_seed_table_at_256():
    model = UNetPlusPlusGenerator(2).eval()
    encoder = []
    for level in range(5):
        model.nodes[f"{level}_0"].register_forward_hook(lambda m, i, o: encoder.append(tuple(o.shape[1:])))
    with torch.no_grad():
        out = model(torch.randn(1, 1, 256, 256))
    assert encoder == [(64, 256, 256), (128, 128, 128), (256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    assert out.shape == (1, 3, 256, 256)


def test_unetpp_3d_deep_supervision():
    model = UNetPlusPlusGenerator(3, in_channels=1, out_channels=2, base_channels=4, depth=3, dropout=0.0,
                                  deep_supervision=True)
    outputs = model(torch.randn(1, 1, 8, 8, 8))
    assert len(outputs) == 2 and all(o.shape == (1, 2, 8, 8, 8) for o in outputs)


from consingan.losses import VGGPerceptualLoss  # noqa: E402
from consingan.paired import LocalEnhancer  # noqa: E402


@pytest.mark.parametrize("dims, size", [(2, 32), (3, 16)])
def test_local_enhancer_coarse_to_fine(dims, size):
    model = LocalEnhancer(dims, in_channels=1, out_channels=2, base_channels=4, num_blocks=1, global_blocks=1,
                          global_downsampling=2)
    assert model(torch.randn(1, 1, *(size,) * dims)).shape == (1, 2, *(size,) * dims)
    # The global part works on the input at half resolution and ends with 2x the local channels.
    assert model.global_features(torch.randn(1, 1, *(size // 2,) * dims)).shape[1] == 8


def test_perceptual_loss_from_a_local_file(tmp_path):
    from consingan.checkpoint import save_state
    from consingan.errors import ConsinganError

    torch.manual_seed(0)
    reference = VGGPerceptualLoss()
    for module in reference.features:
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, 0, 0.05)
    save_state(tmp_path / "vgg19.pth", {**{k: v for k, v in reference.state_dict().items() if k.startswith("features")},
                                        "classifier.0.weight": torch.ones(1)})
    loss = VGGPerceptualLoss.from_file(str(tmp_path / "vgg19.pth"))
    real = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(real, real).item() == 0
    assert loss(real + 0.1 * torch.randn_like(real), real).item() > 0
    save_state(tmp_path / "bad.pth", {"w": torch.ones(1)})
    with pytest.raises(ConsinganError, match="not a VGG-19"):
        VGGPerceptualLoss.from_file(str(tmp_path / "bad.pth"))


def test_cbam_unet_3d():
    model = UNetGenerator(3, in_channels=1, out_channels=1, depth=3, base_channels=4, skip_attention=True)
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 2
    assert model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)
