"""Evaluation measures with known answers, in 2D and 3D."""

import json

import pytest
import torch

from consingan.metrics import measures
from consingan.metrics.evaluate import EvaluateConfig, compute_measures
from consingan.nn.resample import gaussian_blur
from tests.conftest import blobs

DIMS = [2, 3]


def image(dims, seed=0):
    size = 32 if dims == 2 else 16
    return torch.from_numpy(blobs((size,) * dims, seed) * 2 - 1).float()[None, None]


@pytest.mark.parametrize("dims", DIMS)
def test_identical_inputs_give_zero_distance(dims):
    real = image(dims)
    fake = real.repeat(3, 1, *([1] * dims))
    assert measures.multiscale_swd(real, fake, levels=2)["mean"] == pytest.approx(0, abs=1e-5)
    features = measures.RandomFeatures(dims, 1)
    assert measures.single_image_frechet(real, fake, features) == pytest.approx(0, abs=1e-6)
    assert measures.histogram_distance(real, fake) == [pytest.approx(0, abs=1e-9)]
    assert measures.diversity(real, fake) == pytest.approx(0, abs=1e-9)
    assert measures.psnr(real, real) == float("inf") and measures.ssim(real, real) == pytest.approx(1.0)


def test_reconstruction_pearson_ignores_brightness_and_contrast_but_not_structure():
    real = image(3)
    assert measures.pearson(0.5 * real - 0.2, real) == pytest.approx(1.0)
    assert measures.pearson(-real, real) == pytest.approx(-1.0)
    noisy = real + torch.randn(real.shape, generator=torch.Generator().manual_seed(0)) * real.std()
    assert 0.5 < measures.pearson(noisy, real) < 0.8  # equal signal and noise variance: r = 1 / sqrt(2)


@pytest.mark.parametrize("dims", DIMS)
def test_distances_grow_with_noise_and_blur(dims):
    real = image(dims)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 1, *real.shape[2:], generator=generator)
    features = measures.RandomFeatures(dims, 1)
    swd, frechet, hist, psnr, ssim = [], [], [], [], []
    for level in (0.05, 0.2, 0.6):
        fake = real + level * noise
        swd.append(measures.multiscale_swd(real, fake, levels=2)["mean"])
        frechet.append(measures.single_image_frechet(real, fake, features))
        hist.append(measures.histogram_distance(real, fake)[0])
        psnr.append(measures.psnr(fake[:1], real))
        ssim.append(measures.ssim(fake[:1], real))
    assert swd == sorted(swd) and frechet == sorted(frechet) and hist == sorted(hist)
    assert psnr == sorted(psnr, reverse=True) and ssim == sorted(ssim, reverse=True)
    blurred = [measures.multiscale_swd(real, gaussian_blur(real, [s] * dims), levels=2)["mean"] for s in (0.5, 1.5, 3)]
    assert blurred == sorted(blurred) and blurred[0] > 0


@pytest.mark.parametrize("dims", DIMS)
def test_memorisation_flags_a_model_that_returns_its_training_image(dims):
    real = image(dims)
    copies = real.repeat(4, 1, *([1] * dims))
    assert measures.memorisation(real, copies)["copying"] is True
    assert measures.memorisation(real, copies)["ratio"] == pytest.approx(0, abs=1e-5)
    # Different images made by the same process are not copies.
    others = torch.cat([image(dims, seed) for seed in range(1, 5)])
    result = measures.memorisation(real, others)
    assert result["copying"] is False and result["ratio"] > 0.5


@pytest.mark.parametrize("dims", DIMS)
def test_memorisation_ratio_stays_meaningful_on_a_mostly_constant_frame(dims):
    """A small textured object in a large constant field of view (a brain centred in 256^3): the image's own
    nearest-patch distances are zero for most patches, so a ratio over every patch blew up (9.7e11 on a real run).
    Over textured patches it stays what it is without the frame: copies near 0, other images of the same kind
    near 1, and a flat collapse is not measurable rather than a copy."""
    def framed(x):
        frame = torch.full((len(x), 1, *[3 * s for s in x.shape[2:]]), -1.0)
        frame[(slice(None), slice(None), *[slice(s, 2 * s) for s in x.shape[2:]])] = x
        return frame

    real = framed(image(dims))
    copies = framed(image(dims).repeat(3, 1, *([1] * dims)))
    others = framed(torch.cat([image(dims, seed) for seed in range(1, 4)]))
    assert measures.memorisation(real, copies)["ratio"] == pytest.approx(0, abs=1e-5)
    other = measures.memorisation(real, others)
    assert other["textured_share"]["image"] < 0.6 and 0.5 < other["ratio"] < 5 and other["copying"] is False
    flat = measures.memorisation(real, torch.full_like(copies, -1.0))
    assert flat["ratio"] is None and flat["copying"] is False and flat["textured_share"]["samples"] == 0


@pytest.mark.parametrize("dims", DIMS)
def test_diversity_has_known_values(dims):
    """Per-voxel spread across samples over the image's spread, on samples whose spread is known by construction."""
    size = 32 if dims == 2 else 16
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * dims, indexing="ij")).sum(0)
    real = (grid % 2 * 2 - 1).float()[None, None] * 0.5  # a +-0.5 checkerboard: std 0.5 * sqrt(n / (n - 1))
    n = real.numel()
    real_std = 0.5 * (n / (n - 1)) ** 0.5
    base = image(dims)
    assert measures.diversity(real, torch.cat([base, base])) == 0  # two identical samples
    # Three samples base, base + d, base + 2d: every voxel's (sample) standard deviation is exactly d.
    d = 0.3
    steps = torch.cat([base, base + d, base + 2 * d])
    assert measures.diversity(real, steps) == pytest.approx(d / real_std, rel=1e-5)
    # Two samples a distance d apart: each voxel's standard deviation is d / sqrt(2).
    assert measures.diversity(real, torch.cat([base, base - d])) == pytest.approx(d / 2**0.5 / real_std, rel=1e-5)
    # Samples that differ in half of the voxels only: half the diversity.
    half = torch.zeros_like(real)
    half[:, :, : size // 2] = 1
    assert measures.diversity(real, torch.cat([base, base + d * half, base + 2 * d * half])) == \
        pytest.approx(d / 2 / real_std, rel=1e-5)
    # A brighter, higher-contrast training image halves the value whatever its mean.
    assert measures.diversity(2 * real + 5, steps) == pytest.approx(d / (2 * real_std), rel=1e-5)


def test_compute_measures_is_json_ready():
    real = image(2)
    fake = torch.cat([image(2, s) for s in range(1, 4)])
    result = compute_measures(real, fake, real, EvaluateConfig(num=3))
    result.pop("_arrays")
    assert json.loads(json.dumps(result))["reconstruction"]["ssim"] == pytest.approx(1.0)


@pytest.mark.parametrize("dims, name", [(2, "tiny.png"), (3, "tiny.nii.gz")])
def test_evaluate_cli_writes_json_table_and_report(runner, png_rgb, nifti_3d, out_dir, dims, name):
    from consingan.cli import app
    from tests.conftest import TINY

    image = png_rgb if dims == 2 else nifti_3d
    result = runner.invoke(app, ["train", "--image", str(image), "--dim", str(dims), "--out-dir", str(out_dir), *TINY],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    run_dir = out_dir / "tiny_001"
    result = runner.invoke(app, ["evaluate", str(run_dir), "--num", "3"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "memorisation ratio" in result.output and "SWD mean" in result.output
    report = json.loads((run_dir / "evaluation_001" / "evaluation.json").read_text())
    assert report["settings"]["num"] == 3 and len(report["histogram_w1"]) == (3 if dims == 2 else 1)
    assert {"swd", "random_feature_frechet", "diversity", "memorisation", "reconstruction"} <= report.keys()
    assert (run_dir / "evaluation_001" / "report.png").stat().st_size > 1000
    again = runner.invoke(app, ["evaluate", str(run_dir), "--num", "1"], terminal_width=200)
    assert again.exit_code == 2 and "at least 2" in again.output


def test_inception_stem_from_a_local_file(tmp_path):
    from consingan.checkpoint import save_state
    from consingan.errors import ConsinganError

    torch.manual_seed(0)
    stem = measures.InceptionStem()
    # pytorch-fid's file holds the whole network; extra keys are ignored, the stem's own must be there.
    weights = {k: v for k, v in stem.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_state(tmp_path / "inception.pth", {**weights, "Mixed_5b.branch1x1.conv.weight": torch.ones(1)})
    loaded = measures.InceptionStem.from_file(str(tmp_path / "inception.pth"))
    rgb = torch.rand(2, 3, 48, 48) * 2 - 1
    assert torch.equal(loaded(rgb), stem.eval()(rgb))
    # 192 channels at the image's own size: 48 -> 23 -> 21 -> 21 -> pooled 10 -> 10 -> 8, so 8 x 8 positions.
    assert loaded(rgb[:1]).shape == (64, 192) and loaded(rgb[:1, :1]).shape == (64, 192)  # grey works too
    assert loaded(torch.zeros(1, 3, 19, 40)).shape == (1 * 6, 192)  # the smallest height: one row of 6
    with pytest.raises(ConsinganError, match="at least 19 pixels"):
        loaded(torch.zeros(1, 3, 18, 40))
    real = image(2).repeat(1, 3, 1, 1)
    assert measures.single_image_frechet(real, real.repeat(2, 1, 1, 1), loaded) == pytest.approx(0, abs=1e-6)
    save_state(tmp_path / "other.pth", {"weight": torch.ones(1)})
    with pytest.raises(ConsinganError, match="not an Inception"):
        measures.InceptionStem.from_file(str(tmp_path / "other.pth"))


def test_inception_stem_is_singans_sifid_layer(tmp_path):
    """The features are those SinGAN's SIFID reads from Inception-v3: the output of Conv2d_4a_3x3 (80 -> 192 channels,
    before the second max pooling), the image not resized. Checked against the layers applied one by one, with
    Inception-v3's names and shapes, from a file that holds the rest of the network too."""
    from consingan.checkpoint import save_state

    generator = torch.Generator().manual_seed(0)
    # Inception-v3's first five convs (name: out, in, kernel, stride, padding), each conv, batch norm (eps 1e-3), ReLU.
    layers = {"Conv2d_1a_3x3": (32, 3, 3, 2, 0), "Conv2d_2a_3x3": (32, 32, 3, 1, 0), "Conv2d_2b_3x3": (64, 32, 3, 1, 1),
              "Conv2d_3b_1x1": (80, 64, 1, 1, 0), "Conv2d_4a_3x3": (192, 80, 3, 1, 0)}
    state = {"Mixed_5b.branch1x1.conv.weight": torch.ones(64, 192, 1, 1), "fc.weight": torch.ones(1000, 2048)}
    for name, (cout, cin, kernel, _, _) in layers.items():
        weight = torch.randn(cout, cin, kernel, kernel, generator=generator)
        state[f"{name}.conv.weight"] = weight / (cin * kernel**2) ** 0.5
        state[f"{name}.bn.weight"] = torch.rand(cout, generator=generator) + 0.5
        state[f"{name}.bn.bias"] = torch.randn(cout, generator=generator) * 0.1
        state[f"{name}.bn.running_mean"] = torch.randn(cout, generator=generator) * 0.1
        state[f"{name}.bn.running_var"] = torch.rand(cout, generator=generator) + 0.5
    save_state(tmp_path / "inception_v3.pth", state)
    stem = measures.InceptionStem.from_file(str(tmp_path / "inception_v3.pth"))
    x = torch.rand(1, 3, 64, 80, generator=generator) * 2 - 1
    reference = x
    for name, (_, _, _, stride, padding) in layers.items():
        reference = torch.nn.functional.conv2d(reference, state[f"{name}.conv.weight"], stride=stride, padding=padding)
        reference = torch.relu(torch.nn.functional.batch_norm(
            reference, state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"], state[f"{name}.bn.weight"],
            state[f"{name}.bn.bias"], eps=1e-3))
        if name == "Conv2d_2b_3x3":
            reference = torch.nn.functional.max_pool2d(reference, 3, stride=2)  # the first pooling; not the second
    assert reference.shape == (1, 192, 12, 16)  # 64 x 80 -> 31 x 39 -> 29 x 37 -> pooled 14 x 18 -> 12 x 16
    torch.testing.assert_close(stem(x), reference.movedim(1, -1).reshape(-1, 192), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 20, 18), (17, 16, 16), (32, 24)])
def test_random_features_in_slabs_equal_one_piece(shape, monkeypatch):
    """Large volumes compute the first feature layer slab by slab (bounded memory); the features are the same."""
    x = torch.randn(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    features = measures.RandomFeatures(len(shape), 1)
    whole = features(x)
    monkeypatch.setattr(measures, "FEATURE_SLAB_BYTES", 4 * 64 * 2 * 3 * 16)  # a few planes per slab
    torch.testing.assert_close(features(x), whole, rtol=1e-5, atol=1e-6)


def test_verdict_fails_samples_with_less_structure_than_a_blurred_copy():
    """Numbers of real 3D runs (benchmarks/QUALITY.md): the example MRI's blurred copy scores SWD 0.334; a five-scale
    run at 60 epochs drew blob soup at 0.408 that every other check passed (diversity 1.47, coverage 0.69,
    histogram overlap 85 %); the quick preset's 0.216 is no such failure."""
    memo = {"copying": False, "ratio": 1.04, "coverage_ratio": 0.69}
    intensities = {"histogram_overlap": [0.85], "background_image": [0.01], "background_samples": [0.02]}
    label, reason = measures.verdict(1.47, memo, intensities=intensities,
                                     structure={"swd": 0.408, "blurred_swd": 0.334})
    assert label == "failed" and "blurred" in reason
    assert measures.verdict(1.47, memo, intensities=intensities)[0] == "ok"  # what it said without the baseline
    assert measures.verdict(0.88, memo, intensities=intensities,
                            structure={"swd": 0.216, "blurred_swd": 0.334})[0] == "ok"


@pytest.mark.parametrize("dims", DIMS)
def test_blurred_baseline_is_far_from_zero_and_samples_of_the_image_beat_it(dims):
    real = image(dims)
    baseline = measures.blurred_baseline_swd(real, levels=2)
    assert baseline > 0.02
    assert measures.multiscale_swd(real, real.repeat(2, 1, *([1] * dims)), levels=2)["mean"] < baseline
