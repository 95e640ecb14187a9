"""Stage 0's layout options: ``--coordinates`` (coordinate channels) and ``--anchor-layout`` (an anchor on the coarsest
real image) through training, saving, sampling (tiled, retargeted, injected) and resuming."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from consingan.checkpoint import load_state
from consingan.cli import app
from consingan.config import TrainConfig
from consingan.io import read_volume
from consingan.singan.sampler import TrainedPyramid
from consingan.singan.trainer import SinGANTrainer, resume, train
from tests.conftest import TINY, StopAt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_run_with_coordinates_trains_samples_in_tiles_and_retargets(runner, nifti_3d, out_dir):
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 "--run-name", "c", *TINY, "--coordinates"], terminal_width=200)
    assert result.exit_code == 0, result.output
    run = out_dir / "c"
    assert json.loads((run / "config.json").read_text())["coordinates"] is True
    pyramid = TrainedPyramid.load(run)
    assert pyramid.generator.head[1].conv.in_channels == 1 + 3  # the image channel and one per axis
    whole, tiled = pyramid.sample(2, seed=3, tile="off"), pyramid.sample(2, seed=3, tile=7)
    assert np.allclose(whole, tiled, atol=2e-5, rtol=0)
    for name, args in (("whole", ["--tile", "off"]), ("retargeted", ["--shape", "12,20,16"])):
        folder = out_dir / name
        result = runner.invoke(app, ["sample", str(run), "--out", str(folder), "--num", "1", *args],
                               terminal_width=200)
        assert result.exit_code == 0, result.output
    written = read_volume(out_dir / "retargeted" / "sample_0000.nii.gz", 3, check_values=False)
    assert written.spatial_shape == (12, 20, 16)  # --shape is in the engine's axis order, as read_volume gives it


def test_an_anchored_run_trains_samples_in_tiles_retargets_injects_and_resumes(runner, nifti_3d, out_dir):
    """``--anchor-layout``: stage 0 draws about the coarsest real image; the anchor is saved with the generator, so
    loading, tiling, retargeting, injecting and resuming all see it."""
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 "--run-name", "a", *TINY, "--anchor-layout", "0.3"], terminal_width=200)
    assert result.exit_code == 0, result.output
    run = out_dir / "a"
    assert json.loads((run / "config.json").read_text())["anchor_layout"] == 0.3
    pyramid = TrainedPyramid.load(run)
    generator = pyramid.generator
    assert generator.noise_amps[0].item() == pytest.approx(0.3)
    assert tuple(generator.anchor.shape[2:]) == tuple(pyramid.shapes[0])
    whole, tiled = pyramid.sample(2, seed=3, tile="off"), pyramid.sample(2, seed=3, tile=7)
    assert np.allclose(whole, tiled, atol=2e-5, rtol=0)
    assert not torch.equal(whole[0], whole[1])  # the noise still varies the samples
    # Injecting the training image at stage 0 reproduces the anchored reconstruction input (zero noise).
    image = read_volume(pyramid.run.config.image, 3).array
    plain = pyramid.sample(1, seed=5, start_scale=1)
    injected = pyramid.sample(1, seed=5, start_scale=1, inject=image)
    edited = pyramid.sample(1, seed=5, start_scale=1, inject=np.flip(image, axis=1).copy())
    same, changed = (plain - injected).abs().max().item(), (plain - edited).abs().max().item()
    assert changed > 100 * max(same, 1e-7)
    result = runner.invoke(app, ["sample", str(run), "--out", str(out_dir / "r"), "--num", "1", "--shape",
                                 "12,20,16"], terminal_width=200)
    assert result.exit_code == 0, result.output
    written = read_volume(out_dir / "r" / "sample_0000.nii.gz", 3, check_values=False)
    assert written.spatial_shape == (12, 20, 16)


def test_an_anchored_run_interrupted_and_resumed_equals_the_uninterrupted_one(nifti_3d, out_dir):
    config = TrainConfig(image=str(nifti_3d), dimension=3, epochs=4, num_scales=2, num_feature_channels=8,
                         num_layers=2, min_size=10, preview_every=0, checkpoint_every=2, seed=5, device="cpu",
                         out_dir=str(out_dir), anchor_layout=0.2, anchor_warp=0.8, anchor_warp_target=2.0)
    reference = train(dataclasses.replace(config, run_name="whole"))
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(config, run_name="cut"), reporter=StopAt(0, 3))
    resumed = resume(out_dir / "cut")
    whole, cut = (load_state(r.run_dir / "scale_01" / "training_state.pt")["models"]["generator"]
                  for r in (reference, resumed))
    assert "anchor" in whole and "anchor_warp" in whole and whole.keys() == cut.keys()
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key


def test_a_warped_anchor_run_deforms_its_samples_samples_in_tiles_and_injects_undeformed(runner, nifti_3d, out_dir):
    """``--anchor-warp``: random samples come from a deformed anchor (they differ from the unwarped model's with the
    same noise), tiles equal whole samples, and an injected image reaches stage 0 as it is."""
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 "--run-name", "w", *TINY, "--anchor-layout", "0.3", "--anchor-warp", "1.0"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    run = out_dir / "w"
    assert json.loads((run / "config.json").read_text())["anchor_warp"] == 1.0
    warped = TrainedPyramid.load(run)
    unwarped = TrainedPyramid.load(run)
    unwarped.generator.anchor_warp.zero_()
    assert warped.generator.anchor_warp.item() == 1.0
    whole, tiled = warped.sample(2, seed=3, tile="off"), warped.sample(2, seed=3, tile=7)
    assert np.allclose(whole, tiled, atol=2e-5, rtol=0)
    # A 3-epoch model's outputs are small; the deformation still moves them by a good part of their size.
    assert (whole - unwarped.sample(2, seed=3, tile="off")).abs().max() > 0.05 * whole.abs().max()
    # A retargeted sample deforms its resized anchor over its own grid.
    retargeted = warped.sample(1, seed=3, shape=(12, 20, 16), tile="off")
    assert retargeted.shape[2:] == (12, 20, 16)
    assert (retargeted - unwarped.sample(1, seed=3, shape=(12, 20, 16), tile="off")).abs().max() > 0.05 * \
        retargeted.abs().max()
    # Variations above stage 0 start from the reconstruction input (zero noise): no deformation.
    assert torch.allclose(warped.sample(1, seed=4, start_scale=1), unwarped.sample(1, seed=4, start_scale=1),
                          atol=1e-7)
    image = np.flip(read_volume(warped.run.config.image, 3).array, axis=1).copy()
    assert torch.allclose(warped.sample(1, seed=5, start_scale=1, inject=image),
                          unwarped.sample(1, seed=5, start_scale=1, inject=image), atol=1e-7)


@pytest.mark.parametrize("target", [5.0, 1e-6])
def test_an_adapted_warp_grows_while_samples_differ_less_than_the_target_and_stays_off_above_it(nifti_3d, out_dir,
                                                                                                 target):
    """``--anchor-warp-target``: the warp starts at 0, stays there for the first ``WARP_START`` of the coarsest
    scale's epochs, then moves each epoch by the gain times the shortfall of the two samples' difference, within
    [0, --anchor-warp]; it is logged per epoch and kept in the generator."""
    config = TrainConfig(image=str(nifti_3d), dimension=3, epochs=5, num_scales=2, num_feature_channels=8,
                         num_layers=2, min_size=10, preview_every=0, seed=1, device="cpu", out_dir=str(out_dir),
                         run_name=f"t{target:g}", anchor_layout=0.3, anchor_warp=0.3, anchor_warp_target=target)
    result = train(config)
    rows = list(csv.DictReader((result.run_dir / "scale_00" / "losses.csv").open()))
    warps = [float(row["anchor_warp"]) for row in rows]
    differences = [float(row["sample_difference"]) for row in rows]
    start = int(SinGANTrainer.WARP_START * 5)  # epochs 1..start leave it at 0
    assert warps[:start] == [0.0] * start
    if target > 1:  # unreachable: the warp climbs by about the gain times the target each epoch, up to its ceiling
        assert warps[start] == pytest.approx(SinGANTrainer.WARP_GAIN * (target - differences[start]), rel=1e-5)
        assert warps == sorted(warps) and warps[-1] == pytest.approx(0.3)
    else:  # every pair already differs by more: the anchor stays undeformed
        assert warps == [0.0] * len(rows) and min(differences) > target
    assert "anchor_warp" not in (result.run_dir / "scale_01" / "losses.csv").read_text().splitlines()[0]
    generator = TrainedPyramid.load(result.run_dir).generator
    assert generator.anchor_warp.item() == pytest.approx(warps[-1])


def test_an_anchor_warp_without_an_anchor_is_refused(runner, nifti_3d, out_dir):
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 *TINY, "--anchor-warp", "1"], terminal_width=200)
    assert result.exit_code != 0 and "anchor_warp" in result.output and "Traceback" not in result.output


def test_a_negative_anchor_spread_is_refused(runner, nifti_3d, out_dir):
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 *TINY, "--anchor-layout", "-0.1"], terminal_width=200)
    assert result.exit_code != 0 and "anchor_layout" in result.output and "Traceback" not in result.output
    assert not any(out_dir.iterdir()) if out_dir.exists() else True
