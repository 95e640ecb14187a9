"""Issue 26: no false colour. A grey image given as RGB trains to grey samples; a colour image keeps its colour.

The cause was the start of training: the generator's last convolution drew each image channel's weights on its own
and the critic's first convolution each channel's view, so the channels of a sample began as unrelated images, and
where the image is grey nothing trained that colour away (it stayed as rims at edges). Both now start with equal
channels (``models.same_output_channels_``, ``same_input_channels_``), which channels that are equal in the image
keep for good.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from consingan.config import TrainConfig
from consingan.io import IntensityRange
from consingan.nn.interpolation import Resampler
from consingan.singan.models import Critic, GrowingGenerator, same_input_channels_, same_output_channels_
from consingan.nn.resample import resize
from consingan.singan.sampler import TrainedPyramid, write_samples
from consingan.singan.trainer import train

IHC = Path(__file__).resolve().parent.parent / "data" / "ihc.png"
# The microscopy preset's layers and mapping (presets/microscopy-2d.yaml), next to the default configuration.
PRESET = dict(batch_norm=False, cbam=False, padding=0, upsampling="cubic", intensity_mapping="minmax",
              generator_update="repeat")


def ihc_crop(size: int) -> np.ndarray:
    """A real image with edges: a 160 px crop of the IHC stain (nuclei and glands) shrunk to ``size``, [H, W, 3]."""
    return np.asarray(Image.open(IHC).convert("RGB").crop((96, 96, 256, 256)).resize((size, size), Image.LANCZOS))


def grey_as_rgb(size: int) -> np.ndarray:
    """The IHC crop made grey (its channels' mean) and written three times: an RGB image with no colour at all."""
    grey = ihc_crop(size).astype(np.float64).mean(axis=-1).round().astype(np.uint8)
    return np.stack([grey] * 3, axis=-1)


def chroma(images: np.ndarray) -> np.ndarray:
    """[..., C, H, W] -> per pixel, the largest difference between its channels."""
    return images.max(axis=-3) - images.min(axis=-3)


def tiny_run(tmp_path: Path, pixels: np.ndarray, **options) -> Path:
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    config = TrainConfig(image=str(path), dimension=2, epochs=12, num_scales=2, num_feature_channels=8, num_layers=2,
                         min_size=12, max_size=32, preview_every=0, checkpoint_every=0, seed=3, device="cpu",
                         out_dir=str(tmp_path / "out"), **options)
    return train(config).run_dir


# --- training end to end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, PRESET, {**PRESET, "colour_axes": "principal"}],
                         ids=["seed-defaults", "microscopy-preset", "principal-colour-axes"])
def test_a_grey_image_given_as_rgb_gives_grey_samples(tmp_path, options):
    # 40 px trained at 32: the written samples are also resampled back onto the source grid.
    run_dir = tiny_run(tmp_path, grey_as_rgb(40), **options)
    pyramid = TrainedPyramid.load(run_dir)
    samples = np.stack(pyramid.to_source_units(pyramid.sample(8, seed=0)))
    reconstruction = np.stack(pyramid.to_source_units(pyramid.reconstruct()))
    assert samples.std() > 1  # they are images, not a flat grey
    # Before the fix: channels apart by 1.5 to 2 levels on average here, up to 5 to 8.5 (8-bit levels).
    assert chroma(samples).max() < 1e-3
    assert chroma(reconstruction).max() < 1e-3
    write_samples(pyramid, tmp_path / "samples", 4, source_dtype=True)
    written = np.stack([np.asarray(Image.open(tmp_path / "samples" / f"sample_{i:04d}.png")) for i in range(4)])
    assert written.shape == (4, 40, 40, 3)
    assert np.array_equal(written[..., 0], written[..., 1]) and np.array_equal(written[..., 0], written[..., 2])


@pytest.mark.parametrize("colour_axes", ["channels", "principal"])
def test_a_colour_image_keeps_its_colour(tmp_path, colour_axes):
    pixels = ihc_crop(32)
    run_dir = tiny_run(tmp_path, pixels, **PRESET, colour_axes=colour_axes)
    pyramid = TrainedPyramid.load(run_dir)
    image = np.moveaxis(pixels.astype(np.float64), -1, 0)
    reconstruction = pyramid.to_source_units(pyramid.reconstruct())[0]
    samples = np.stack(pyramid.to_source_units(pyramid.sample(8, seed=0)))
    # The channels came apart where the image has colour: the reconstruction's colour follows the image's.
    colour = image - image.mean(axis=0)
    learnt = reconstruction - reconstruction.mean(axis=0)
    assert np.corrcoef(colour.ravel(), learnt.ravel())[0, 1] > 0.8
    assert chroma(reconstruction).mean() > 0.5 * chroma(image).mean()
    # Samples have colour too, with the image's balance between the channels (the stain's brown-blue, not grey).
    assert chroma(samples).mean() > 0.5 * chroma(image).mean()
    np.testing.assert_allclose(samples.mean(axis=(0, 2, 3)), image.mean(axis=(1, 2)), atol=20)


# --- the colour-neutral start -----------------------------------------------------------------------------------------


def test_same_output_channels_copies_the_first_channel():
    conv = torch.nn.Conv2d(5, 3, 3)
    first_weight, first_bias = conv.weight[0].detach().clone(), conv.bias[0].item()
    same_output_channels_(conv)
    for channel in range(3):
        assert torch.equal(conv.weight[channel], first_weight)
        assert conv.bias[channel].item() == first_bias


def test_same_input_channels_keeps_the_response_to_equal_channels():
    conv = torch.nn.Conv2d(3, 4, 3)
    first = conv.weight[:, :1].clone()
    same_input_channels_(conv)
    for channel in range(3):
        assert torch.allclose(conv.weight[:, channel:channel + 1], first / 3**0.5)
    single = torch.nn.Conv2d(1, 4, 3)
    before = single.weight.clone()
    same_input_channels_(single)  # one channel: nothing to make equal, nothing changes
    assert torch.equal(single.weight, before)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_new_generator_draws_equal_channels_from_any_noise(spatial_dims):
    torch.manual_seed(0)
    generator = GrowingGenerator(spatial_dims, 3, num_feature_channels=8, num_layers=2, cbam=True)
    generator.add_stage()
    generator.set_noise_amp(1, 0.5)
    shapes = [(12,) * spatial_dims, (16,) * spatial_dims]
    with torch.no_grad():
        output = generator(generator.sample_noise(shapes, batch_size=2))
    assert output.std() > 0
    assert torch.equal(output[:, 0], output[:, 1]) and torch.equal(output[:, 0], output[:, 2])


@pytest.mark.parametrize("batch_norm", [True, False])
def test_a_new_critic_is_blind_to_colour(batch_norm):
    torch.manual_seed(0)
    critic = Critic(2, 3, num_feature_channels=8, num_layers=2, batch_norm=batch_norm, cbam=True).eval()
    image = torch.rand(2, 3, 20, 20)
    colour = torch.randn(2, 3, 20, 20)
    colour = colour - colour.mean(dim=1, keepdim=True)  # changes every pixel's colour, not its channels' sum
    with torch.no_grad():
        assert torch.allclose(critic(image), critic(image + colour), atol=1e-5)
        assert not torch.allclose(critic(image), critic(image + 0.5), atol=1e-5)


def test_a_new_critic_sees_a_grey_image_as_strongly_as_before():
    # The same spread of first-layer responses to an image whose channels are equal as with independent channels.
    torch.manual_seed(0)
    neutral = [Critic(2, 3, num_feature_channels=16, num_layers=1).head.conv.weight.detach().sum(dim=1).std()
               for _ in range(20)]
    independent = [torch.nn.init.normal_(torch.empty(16, 3, 3, 3), 0.0, 0.02).sum(dim=1).std() for _ in range(20)]
    assert float(torch.stack(neutral).mean()) == pytest.approx(float(torch.stack(independent).mean()), rel=0.15)


# --- what keeps equal channels equal on the way in and out ------------------------------------------------------------


@pytest.mark.parametrize("mapping", ["window", "minmax"])
def test_the_intensity_map_of_equal_channels_is_one_map(mapping):
    grey = np.moveaxis(grey_as_rgb(40).astype(np.float64), -1, 0)
    intensity = IntensityRange.of(grey, mapping)
    assert len(set(intensity.minimum)) == len(set(intensity.maximum)) == 1
    if mapping == "window":
        assert len(set(intensity.low)) == len(set(intensity.high)) == 1
    normalised = intensity.normalise(grey)
    assert np.array_equal(normalised[0], normalised[1]) and np.array_equal(normalised[0], normalised[2])
    back = intensity.denormalise(np.clip(normalised + np.linspace(-0.3, 0.3, 40)[:, None], -1, 1))
    assert np.array_equal(back[0], back[1]) and np.array_equal(back[0], back[2])


@pytest.mark.parametrize("resample", [
    lambda x: Resampler(2, "cubic")(x, (23, 31)), lambda x: Resampler(2, "linear")(x, (23, 31)),
    lambda x: resize(x, (9, 11)), lambda x: resize(x, (40, 41)),
], ids=["cubic", "linear", "antialiased-down", "antialiased-up"])
def test_resampling_treats_every_channel_alike(resample):
    x = torch.rand(2, 1, 17, 19).expand(2, 3, 17, 19).contiguous()
    out = resample(x)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


# --- principal colour axes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mapping", ["window", "minmax"])
def test_principal_colour_axes_map_a_colour_image_there_and_back_exactly(mapping):
    image = np.moveaxis(ihc_crop(40).astype(np.float64), -1, 0)
    intensity = IntensityRange.of(image, mapping, principal=3)
    normalised = intensity.normalise(image)
    assert normalised.min() >= -1 - 1e-6 and normalised.max() <= 1 + 1e-6
    np.testing.assert_allclose(intensity.denormalise(normalised), image, atol=1e-3)
    # The first axis carries the most of the image's variation: the stain's brightness.
    spreads = np.asarray(intensity.maximum) - np.asarray(intensity.minimum)
    assert spreads[0] > spreads[1] > spreads[2] > 0
    assert IntensityRange.from_dict(intensity.to_dict()) == intensity
    # Generated values beyond [-1, 1] on any axis come back inside the source's range, channel by channel.
    wild = intensity.denormalise(np.clip(normalised * 3, -3, 3))
    assert wild.min() >= image.min() and wild.max() <= image.max()


def test_independent_errors_of_the_output_channels_are_less_false_colour_on_the_principal_axes():
    image = np.moveaxis(ihc_crop(40).astype(np.float64), -1, 0)
    rng = np.random.default_rng(0)
    # The generator's errors: as large on every output channel, independent between them.
    error = (0.2 * rng.standard_normal(image.shape)).astype(np.float32)
    colour_error = {}
    for principal in (0, 3):
        intensity = IntensityRange.of(image, "minmax", principal=principal)
        out = intensity.denormalise(intensity.normalise(image) + error)
        colour_error[principal] = np.abs(chroma(out) - chroma(image)).mean()
    # Measured: 17.4 levels of false chroma per pixel channel by channel, 10.5 on the principal axes.
    assert colour_error[3] < 0.75 * colour_error[0], colour_error


def test_principal_colour_axes_of_a_grey_image_keep_every_output_grey():
    grey = np.moveaxis(grey_as_rgb(40).astype(np.float64), -1, 0)
    intensity = IntensityRange.of(grey, "window", principal=3)
    normalised = intensity.normalise(grey)
    assert np.ptp(normalised[1:]) == 0  # one axis carries the image; the others are constant
    rng = np.random.default_rng(1)
    back = intensity.denormalise(normalised + rng.normal(0, 0.5, normalised.shape).astype(np.float32))
    assert chroma(back).max() < 1e-3


def test_damaged_principal_colour_axes_in_a_run_are_refused():
    image = np.moveaxis(ihc_crop(24).astype(np.float64), -1, 0)
    stored = IntensityRange.of(image, "minmax", principal=3).to_dict()
    for damage in ({"axes": [[1.0, 0.0], [0.0, 1.0]]}, {"centre": [0.0, float("nan"), 0.0]},
                   {"bounds": [[0.0, 0.0, 0.0]]}):
        with pytest.raises(ValueError, match="principal colour axes"):
            IntensityRange.from_dict({**stored, **damage})
