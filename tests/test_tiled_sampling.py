"""Sampling and evaluation in tiles: a tiled draw equals the one-piece draw (samples, variations, retargeted sizes,
injection, the reconstruction, ``consingan sample`` and ``consingan evaluate``), and the outputs keep the geometry."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from consingan.checkpoint import save_state
from consingan.cli import app
from consingan.config import TrainConfig
from consingan.errors import ConsinganError
from consingan.io import read_volume
from consingan.metrics.evaluate import EvaluateConfig, evaluate
from consingan.singan import regions
from consingan.singan.sampler import TrainedPyramid, parse_tile
from consingan.singan.trainer import train
from tests.conftest import blobs

# float32 forwards of a region and of the whole grid sum the same terms in other orders: they agree to about 1e-6
# (the outputs are tanh values in [-1, 1]); a tile computed without its margins, or with another tile's noise or
# CBAM statistics, is off by 1e-2 or more (checked below).
ATOL = 2e-5


def make_loud(run_dir) -> None:
    """Replace the finest scale's generator weights by ones whose signals are O(1) at every stage. A few epochs leave
    the DCGAN initialisation's small weights and noise amplitudes, under which the output hardly depends on the noise
    or on CBAM's statistics: a wrong tiling would then hide in float rounding (checked by
    ``test_a_tile_without_its_margins_or_with_its_own_statistics_would_be_caught``)."""
    pyramid = TrainedPyramid.load(run_dir)
    generator = pyramid.generator
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in generator.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter[0].numel()))
            else:
                parameter.normal_(0.0, 0.1)
        generator.noise_amps.copy_(torch.tensor([1.0, 0.6, 0.8]))
        for stage in generator.body:  # 8 channels leave CBAM's bottleneck one unit: keep its ReLU open
            stage.cbam.channel_attention.mlp[0].bias.fill_(1.0)
    save_state(pyramid.run.scale_dir(generator.num_stages - 1) / "generator.pt", generator.state_dict())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained 3-scale runs with CBAM: 2D (PNG, cubic resampling between stages) and 3D (NIfTI with an oblique
    affine, trilinear); their weights then made loud (``make_loud``)."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("tiled_runs")
    grey = (blobs((32, 28), 3) * 255).round().astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(folder / "grey.png"))
    affine = np.array([[0, 0, 1.5, -20], [-1.0, 0, 0, 10], [0, 2.0, 0, 4], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image((blobs((18, 16, 20), 4) * 900).astype(np.int16), affine), str(folder / "head.nii.gz"))
    result = {}
    for name, dims, upsampling in (("grey.png", 2, "cubic"), ("head.nii.gz", 3, "linear")):
        config = TrainConfig(image=str(folder / name), dimension=dims, epochs=1, num_scales=3,
                             num_feature_channels=8, num_layers=2, min_size=10, preview_every=0, seed=0, device="cpu",
                             upsampling=upsampling, out_dir=str(folder / "out"))
        result[dims] = train(config).run_dir
        make_loud(result[dims])
    return result


@pytest.fixture(scope="module")
def pyramids(runs):
    return {dims: TrainedPyramid.load(run) for dims, run in runs.items()}


@pytest.fixture
def tiled_calls(monkeypatch):
    """Counts the draws that went through ``generate_tiled``, so a test knows the tiled path really ran."""
    calls = []
    original = regions.generate_tiled

    def counting(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(regions, "generate_tiled", counting)
    return calls


def differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- the library ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,tile,memory", [
    (2, 9, 0), (2, 13, 0), (2, 9, None), (2, 13, None), (3, 7, 0), (3, 5, None), (3, 7, None),
])  # memory 0: every stage recomputed per tile; None: the coarse stages kept whole (the default)
def test_a_tiled_sample_equals_the_untiled_one(pyramids, tiled_calls, dims, tile, memory):
    pyramid = pyramids[dims]
    whole = pyramid.sample(3, seed=5, tile="off")
    tiled = pyramid.sample(3, seed=5, tile=tile, memory_bytes=memory)
    assert tiled_calls == [(tile,) * dims] * 3  # one sample at a time, in tiles of the side asked for
    assert tiled.shape == whole.shape == (3, 1, *pyramid.shapes[-1])
    assert differ(tiled, whole) < ATOL
    # The samples have structure and differ from each other far beyond the tolerance.
    assert whole.std().item() > 100 * ATOL and differ(whole[0], whole[1]) > 100 * ATOL


@pytest.mark.parametrize("dims", [2, 3])
def test_a_tile_without_its_margins_or_with_its_own_statistics_would_be_caught(pyramids, dims):
    """The tolerance above is far below what a wrong tiling shows: a tile's output depends on the noise just outside
    it (a tile cut without the receptive margins cannot reproduce it), and on CBAM's statistics of the whole grid (a
    tile pooling its own features gets other attention weights)."""
    pyramid = pyramids[dims]
    generator, shapes = pyramid.generator, pyramid.shapes
    noise = pyramid.noise_source(shapes, [7]).whole_noise()
    box = tuple((0, n // 2) for n in shapes[-1])
    with torch.no_grad():
        whole = generator(noise)
        outside = [n.clone() for n in noise]
        ring = (slice(None), slice(None), *(slice(n // 2, n // 2 + 2) for n in outside[-1].shape[2:]))
        outside[-1][ring] += 1.0  # the last stage's noise, two voxels beyond the tile's far corner
        moved = generator(outside)
        own = regions.region_forward(generator, regions.TensorNoise(generator, noise), box, descriptors="region")
    assert differ(moved[regions.box_slices(box)], whole[regions.box_slices(box)]) > 100 * ATOL
    assert differ(own, whole[regions.box_slices(box)]) > 100 * ATOL


@pytest.mark.parametrize("dims", [2, 3])
def test_variations_retargeting_and_injection_tiled_equal_untiled(pyramids, dims):
    pyramid = pyramids[dims]
    image = read_volume(pyramid.run.config.image, dims).array
    retarget = (40, 24) if dims == 2 else (16, 24, 20)
    for memory, options in ((0, dict(start_scale=1)), (None, dict(start_scale=2)), (None, dict(shape=retarget)),
                            (None, dict(shape=retarget, start_scale=1)),
                            (None, dict(inject=np.flip(image, axis=1).copy(), start_scale=1))):
        whole = pyramid.sample(2, seed=3, tile="off", **options)
        tiled = pyramid.sample(2, seed=3, tile=7, memory_bytes=memory, **options)
        assert tiled.shape == whole.shape
        assert differ(tiled, whole) < ATOL, options
    # A variation keeps the coarse layout: it differs from a free sample of the same seed.
    assert differ(pyramid.sample(1, seed=3, start_scale=2), pyramid.sample(1, seed=3)) > 0.01


@pytest.mark.parametrize("dims", [2, 3])
def test_the_reconstruction_tiled_equals_untiled(pyramids, dims):
    pyramid = pyramids[dims]
    whole = pyramid.reconstruct(tile="off")
    with torch.no_grad():
        expected = pyramid.generator(pyramid.generator.reconstruction_inputs())
    assert differ(whole, expected) < 1e-6
    for tile, memory in ((5, 0), (7, None)):
        assert differ(pyramid.reconstruct(tile=tile, memory_bytes=memory), whole) < ATOL


def test_auto_tiles_only_what_does_not_fit(pyramids, tiled_calls):
    pyramid = pyramids[3]
    shapes = pyramid.shapes
    one = pyramid.whole_forward_bytes(shapes, 1)
    assert pyramid.draw_plan(shapes, 4, "auto", memory_bytes=4 * one) == (4, None)  # the batch in one piece
    assert pyramid.draw_plan(shapes, 4, "auto", memory_bytes=2 * one) == (1, None)  # one sample at a time
    per_forward, tile = pyramid.draw_plan(shapes, 4, "auto", memory_bytes=one // 2)  # tiles
    assert per_forward == 1 and tile == pyramid.auto_tile(shapes) and len(tile) == 3
    assert pyramid.draw_plan(shapes, 4, "off", memory_bytes=0) == (4, None)
    assert pyramid.draw_plan(shapes, 4, 100) == (1, tuple(shapes[-1]))  # a tile larger than the volume: clipped
    # 'auto' with too little memory for one sample draws it in tiles, and it is the same sample.
    whole = pyramid.sample(2, seed=1, tile="auto")
    assert tiled_calls == []
    tiled = pyramid.sample(2, seed=1, tile="auto", memory_bytes=one // 2)
    assert len(tiled_calls) == 2 and differ(tiled, whole) < ATOL


def test_the_auto_tile_grows_with_the_memory_it_may_use(pyramids, monkeypatch):
    from consingan.singan import sampler

    pyramid = pyramids[3]
    big = [tuple(4 * n for n in s) for s in pyramid.shapes]
    monkeypatch.setattr(sampler, "TILE_BYTES", 2**22)
    small_tile = pyramid.auto_tile(big)
    monkeypatch.setattr(sampler, "TILE_BYTES", 2**26)
    large_tile = pyramid.auto_tile(big)
    assert sampler.MIN_TILE <= min(small_tile) and all(a < b for a, b in zip(small_tile, large_tile))
    margin = regions.receptive_margins(pyramid.generator)[-1]
    assert pyramid.whole_forward_bytes([tuple(t + 2 * margin for t in large_tile)] * len(big)) <= 2**26


def test_parse_tile():
    assert parse_tile("auto") == "auto" and parse_tile(" OFF ") == "off" and parse_tile("48") == 48
    assert parse_tile(16) == 16
    for bad in ("0", "-3", "big", "1.5"):
        with pytest.raises(ConsinganError, match="--tile must be"):
            parse_tile(bad)


# --- the command line -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
def test_cli_tiled_samples_equal_untiled_and_keep_the_geometry(runs, runner, tmp_path, tiled_calls, dims):
    suffix = ".png" if dims == 2 else ".nii.gz"
    arrays = {}
    for name, tile in (("whole", "off"), ("tiled", "6")):
        result = runner.invoke(app, ["sample", str(runs[dims]), "--num", "2", "--seed", "4", "--tile", tile,
                                     "--start-scale", "1", "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        arrays[name] = [read_volume(tmp_path / name / f"sample_{i:04d}{suffix}", dims, False) for i in range(2)]
    assert len(tiled_calls) == 2
    for whole, tiled in zip(arrays["whole"], arrays["tiled"]):
        assert whole.array.shape == tiled.array.shape and np.allclose(whole.affine, tiled.affine)
        # PNG holds 8-bit levels (a rounding may land one level apart); NIfTI float32 the values themselves.
        limit = 1.0 if dims == 2 else ATOL * 900
        assert np.abs(whole.array.astype(np.float64) - tiled.array).max() <= limit
    if dims == 3:  # on the source's grid, with its affine
        source = nib.load(str(runs[3].parent.parent / "head.nii.gz"))
        written = nib.load(str(tmp_path / "tiled" / "sample_0000.nii.gz"))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)


def test_cli_refuses_a_bad_tile(runs, runner, tmp_path):
    result = runner.invoke(app, ["sample", str(runs[3]), "--tile", "zero", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--tile must be" in result.output
    assert not (tmp_path / "o").exists()


# --- evaluation -------------------------------------------------------------------------------------------------------

def numbers(value, prefix=""):
    """Every number of an evaluation result, by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{prefix}{key}.").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{prefix}{i}.").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_forced_to_tile_gives_the_same_numbers(runs, tiled_calls, dims):
    results = {}
    for tile in ("off", 6):
        result = evaluate(runs[dims], EvaluateConfig(num=3, seed=2, device="cpu", tile=tile))
        result.pop("_loss_logs")
        arrays = result.pop("_arrays")
        settings = result.pop("settings")
        assert settings["tile"] == tile
        results[tile] = (numbers(result), result["verdict"]["label"], arrays["fake"])
    assert len(tiled_calls) == 4  # three samples and the reconstruction
    (whole, label, fake), (tiled, tiled_label, tiled_fake) = results["off"], results[6]
    assert label == tiled_label and whole.keys() == tiled.keys() and len(whole) > 20
    assert differ(fake, tiled_fake) < 1e-4
    for key, value in whole.items():
        assert tiled[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


def test_cli_evaluate_with_tiles(runs, runner, tmp_path, tiled_calls):
    result = runner.invoke(app, ["evaluate", str(runs[3]), "--num", "2", "--tile", "5", "--device", "cpu",
                                 "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert report["settings"]["tile"] == 5 and report["shape"] == list(TrainedPyramid.load(runs[3]).shapes[-1])
    assert len(tiled_calls) == 3
