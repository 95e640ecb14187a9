"""What keeps samples real: the intensity window, training health, collapse vs copying, previews one can judge."""

import json

import numpy as np
import pytest
import torch

from consingan.io import IntensityRange
from consingan.io.intensity import WINDOW_EDGE
from consingan.io.preview import MIN_PANEL, central_slices, contact_sheet, label_image, preview_grid
from consingan.metrics import measures
from consingan.singan.health import check_scale, frozen_threshold, longest_frozen_run
from tests.conftest import TINY, assert_clean_failure, blobs


def heavy_tailed_scan(seed=0):
    """An MRI-like channel: half background at 0, tissue around 300-900, a few bright voxels up to 2149."""
    rng = np.random.default_rng(seed)
    tissue = rng.uniform(300, 900, 5000)
    tissue[:20] = rng.uniform(1000, 2149, 20)
    tissue[0] = 2149
    return np.concatenate([np.zeros(5000), tissue]).reshape(1, 100, 100).astype(np.float32)


def test_window_puts_the_bulk_on_most_of_the_range_and_loses_nothing():
    scan = heavy_tailed_scan()
    minmax = IntensityRange.of(scan, "minmax").normalise(scan)
    window = IntensityRange.of(scan, "window")
    mapped = window.normalise(scan)
    tissue = (scan >= 300) & (scan <= 900)
    # Min-max squeezes the tissue into a narrow band; the window gives it most of [-0.8, 0.8].
    assert np.ptp(mapped[tissue]) > 1.5 * np.ptp(minmax[tissue])
    assert mapped[scan == 0].max() == pytest.approx(-WINDOW_EDGE)  # background off tanh's flat end
    p_low, p_high = np.percentile(scan, [0.5, 99.5])
    bulk = (scan >= p_low) & (scan <= p_high)
    assert mapped[bulk].min() >= -WINDOW_EDGE - 1e-6 and mapped[bulk].max() <= WINDOW_EDGE + 1e-6
    # The bright tail is compressed into (0.8, 1], not clipped: the maximum still maps to 1, order is kept.
    assert mapped.max() == pytest.approx(1.0) and (mapped[scan > p_high] > WINDOW_EDGE).all()
    order = np.argsort(scan.ravel(), kind="stable")
    assert (np.diff(mapped.ravel()[order]) >= -1e-6).all()
    # Every intensity comes back.
    assert np.allclose(window.denormalise(mapped), scan, atol=1e-3 * scan.max())
    assert IntensityRange.from_dict(json.loads(json.dumps(window.to_dict()))) == window


def test_window_outputs_stay_in_the_source_range_and_old_runs_read_as_minmax():
    scan = heavy_tailed_scan()
    window = IntensityRange.of(scan, "window")
    # The background is the minimum and the lower percentile: its margin [-1, -0.8) is unused and maps to 0.
    back = window.denormalise(np.array([[-1.0, -0.9, -WINDOW_EDGE, 1.0, 1.5]]))
    assert back[0, :3] == pytest.approx([0, 0, 0], abs=1e-4) and back[0, 3:] == pytest.approx([2149, 2149])
    old = IntensityRange.from_dict({"minimum": [0.0], "maximum": [10.0]})
    assert old.mapping == "minmax" and old.normalise(np.array([[0.0, 5.0, 10.0]]))[0] == pytest.approx([-1, 0, 1])


def test_frozen_losses_and_saturated_constant_samples_are_reported():
    assert longest_frozen_run([1.0, 0.5, 0.5, 0.5, 0.4]) == 2
    assert frozen_threshold(2000) == 20 and frozen_threshold(8) == 5
    history = [{"critic": 0.0, "gradient_penalty": 0.0, "adversarial": 0.123456, "reconstruction": 0.9}] * 30
    real = torch.from_numpy(blobs((16, 16)) * 2 - 1).float()[None, None]
    black = -torch.ones(4, 1, 16, 16)
    health = check_scale(history, real, black)
    text = " ".join(health.warnings)
    assert health.frozen_epochs == 29 and health.saturated_fraction == 1.0 and health.diversity == 0.0
    assert "did not change" in text and "ends of the [-1, 1] range" in text and "do not vary" in text
    assert "critic" in text


def test_a_healthy_scale_raises_no_warning():
    rng = np.random.default_rng(0)
    history = [{"critic": -0.5 + 0.01 * rng.standard_normal(), "gradient_penalty": 0.1,
                "adversarial": 0.2 * rng.standard_normal(), "reconstruction": 0.1 / (e + 1)} for e in range(40)]
    real = torch.from_numpy(blobs((16, 16)) * 1.6 - 0.8).float()[None, None]
    samples = torch.from_numpy(np.stack([blobs((16, 16), s) * 1.6 - 0.8 for s in range(1, 5)])).float()[:, None]
    assert check_scale(history, real, samples).warnings == []


@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_tells_collapse_from_copying(dims):
    size = 32 if dims == 2 else 16
    real = torch.from_numpy(blobs((size,) * dims) * 2 - 1).float()
    real = torch.where(real < -0.3, torch.tensor(-1.0), real)[None, None]  # a flat background over part of it
    copies = real.repeat(4, 1, *([1] * dims))
    collapsed = torch.full_like(copies, -1.0)  # all "black", like the MRI that trained to the background
    for fake, expected in ((copies, "copying"), (collapsed, "collapse")):
        memo = measures.memorisation(real, fake)
        label, _ = measures.verdict(measures.diversity(real, fake), memo)
        assert label == expected, (label, memo)
    # The black samples have no textured patch to compare (the ratio is not measurable), and they cover nothing.
    memo = measures.memorisation(real, collapsed)
    assert memo["ratio"] is None and memo["coverage_ratio"] > 0.5 and memo["copying"] is False


@pytest.mark.parametrize("shape", [(1, 20, 30), (1, 12, 10, 8)])
def test_preview_panels_are_large_enough_to_judge(shape):
    image = np.zeros(shape, dtype=np.float32)
    grid = preview_grid([image, image])
    assert max(grid.shape[:2]) >= MIN_PANEL and grid.shape[0] >= MIN_PANEL * (1 if len(shape) == 3 else 3) - 300
    panel_rows = 1 if len(shape) == 3 else 3
    assert grid.shape[0] >= panel_rows * (MIN_PANEL * min(shape[1:]) // max(shape[1:])) // 2
    sheet = contact_sheet([image] * 5, columns=4)
    assert sheet.shape[1] >= 4 * MIN_PANEL // 2


def test_volume_panels_show_superior_at_the_top():
    """z-y-x volumes (z growing towards the head): the axial panel keeps its rows, coronal and sagittal are flipped."""
    volume = np.zeros((1, 6, 5, 4), dtype=np.float32)
    volume[0, :, 0] = -0.5  # the most anterior row
    volume[0, -1] = 1  # the most superior plane
    axial, coronal, sagittal = central_slices(volume)
    assert np.allclose(axial[0, 0], -0.5) and np.allclose(axial[0, 1:], 0) and axial.shape == (1, 5, 4)
    assert np.allclose(coronal[0, 0], 1) and np.allclose(sagittal[0, 0], 1)  # top row = superior
    assert np.allclose(coronal[0, -1], 0) and sagittal.shape == (1, 6, 5)


def test_label_maps_are_coloured_by_class():
    channels = np.zeros((3, 4, 4), dtype=np.float32)
    channels[1, :2] = 1  # class 1 wins in the top half
    channels[2, 2:] = 1
    channels[0, 2:, :2] = 2  # background wins in the bottom-left quarter
    picture = label_image(channels)
    assert picture.shape == (3, 4, 4) and picture.min() >= -1 and picture.max() <= 1
    assert np.allclose(picture[:, 3, 0], -1)  # background black
    assert not np.allclose(picture[:, 0, 0], picture[:, 3, 3])  # two classes, two colours


def test_training_records_its_mapping_and_health_and_evaluates_other_samples(runner, png_rgb, out_dir, tmp_path):
    from consingan.cli import app

    result = runner.invoke(app, ["train", "--image", str(png_rgb), "--dim", "2", "--out-dir", str(out_dir), *TINY],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    run_dir = out_dir / "tiny_001"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["intensity"]["mapping"] == "window" and len(info["intensity"]["low"]) == 3
    config = json.loads((run_dir / "config.json").read_text())
    assert config["gradient_penalty"] == "pixel" and config["intensity_mapping"] == "window"
    health = json.loads((run_dir / "scale_01" / "scale.json").read_text())["health"]
    assert {"frozen_epochs", "saturated_fraction", "diversity", "warnings"} <= health.keys()
    sampled = runner.invoke(app, ["sample", str(run_dir), "--num", "3", "--out", str(tmp_path / "s"), "--seed", "0"])
    assert sampled.exit_code == 0, sampled.output
    (tmp_path / "s" / "contact_sheet.png").rename(tmp_path / "contact_sheet.png")  # not a sample
    evaluated = runner.invoke(app, ["evaluate", "--dim", "2", "--samples", str(tmp_path / "s"), "--image", str(png_rgb),
                                    "--out", str(tmp_path / "ev")], terminal_width=200)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["verdict"]["label"] in {"ok", "low diversity", "collapse", "copying", "failed"}
    assert report["shape"] == [32, 32] and report["reconstruction"] is None
    refused = runner.invoke(app, ["evaluate", "--dim", "2", "--samples", str(tmp_path / "s"), "--out", str(tmp_path / "e2")])
    assert refused.exit_code == 2 and "--image" in refused.output


def test_samples_stuck_at_the_background_are_a_collapse_even_when_a_few_voxels_vary():
    # The MRI case: the image is half background at its minimum; samples put nearly all voxels there, and a few
    # bright edge voxels that move from sample to sample keep the diversity above any small threshold.
    real = torch.from_numpy(blobs((32, 32)) * 2 - 1).float()
    real = torch.where(real < 0, torch.tensor(-1.0), real)[None, None]
    fake = torch.full((4, 1, 32, 32), -1.0)
    for index in range(4):
        fake[index, 0, index * 8:index * 8 + 8, :3] = 1.0
    ends = measures.extremes(real, fake)
    assert ends["samples"] > 0.9 and ends["stuck"] > 0.4
    label, reason = measures.verdict(measures.diversity(real, fake), measures.memorisation(real, fake),
                                     stuck=ends["stuck"])
    assert label == "collapse" and "ends of its range" in reason
    assert measures.extremes(real, real.repeat(3, 1, 1, 1))["stuck"] == 0


def test_a_run_folder_from_before_the_new_options_reads_as_it_was_trained(tmp_path):
    from consingan.config import TrainConfig
    from consingan.runs import RunFolder

    values = TrainConfig(image="x.nii.gz").to_dict()
    for key in ("gradient_penalty", "intensity_mapping", "window_low_percentile", "window_high_percentile",
                "upsampling"):
        values.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(values))
    # run.json as the first versions wrote it (no family, source_suffix / source_dtype)
    (tmp_path / "run.json").write_text(json.dumps({
        "image": "x.nii.gz", "spatial_dims": 3, "channels": 1, "source_shape": [8, 8, 8], "source_suffix": ".nii.gz",
        "source_dtype": "int16", "source_affine": np.eye(4).tolist(), "shapes": [[8, 8, 8]],
        "intensity": {"minimum": [0.0], "maximum": [1.0]}, "nifti_header": None, "labels": None}))
    run = RunFolder.open(tmp_path)
    config = run.config
    assert run.family == "singan" and run.info.output_suffix == ".nii.gz" and run.info.output_dtype == "int16"
    assert (config.gradient_penalty, config.intensity_mapping, config.upsampling) == ("image", "minmax", "linear")
    assert TrainConfig().gradient_penalty == "pixel" and TrainConfig().intensity_mapping == "window"


@pytest.mark.parametrize("flags, message", [
    (["--upsampling", "cubic"], "only in 2D"),
    (["--intensity-mapping", "zscore"], "intensity_mapping must be one of"),
    (["--gradient-penalty", "global"], "gradient_penalty must be one of"),
    (["--window-low-percentile", "99", "--window-high-percentile", "1"], "window percentiles"),
])
def test_bad_quality_options_stop_with_one_line(runner, nifti_3d, out_dir, flags, message):
    from consingan.cli import app

    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 "--dry-run", *flags], terminal_width=200)
    assert_clean_failure(result, message)
    assert not out_dir.exists()


@pytest.mark.parametrize("name", ["../escape", "/tmp/elsewhere", "a/b", "..", "."])
def test_a_run_name_is_one_folder_inside_the_output_root(runner, nifti_3d, tmp_path, name):
    from consingan.cli import app

    out_dir = tmp_path / "deep" / "out"
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 "--run-name", name, *TINY], terminal_width=200)
    assert_clean_failure(result, "single folder name")
    assert not (tmp_path / "deep").exists() and not (tmp_path / "escape").exists()


def test_a_thin_volume_preview_has_titled_columns_named_rows_and_no_empty_band():
    volume = np.random.default_rng(0).uniform(-1, 1, (1, 6, 30, 30)).astype(np.float32)  # 6 slices of 30 x 30
    plain = preview_grid([volume, volume])
    titled = preview_grid([volume, volume], titles=["real", "sample"])
    factor = -(-MIN_PANEL // 30)
    # Rows as high as their own panels (30, 6 and 6 voxels enlarged), not three rows of the tallest.
    assert plain.shape[0] == (30 + 6 + 6) * factor + 2 * 2
    title_rows, label_columns = titled.shape[0] - plain.shape[0], titled.shape[1] - plain.shape[1]
    assert title_rows > 10 and label_columns > 10
    assert titled[:title_rows - 2, label_columns:].max() > 100  # the titles are drawn
    assert titled[title_rows:, :label_columns - 2].max() > 100  # and the row names
    assert np.array_equal(titled[title_rows:, label_columns:], plain)  # around the same panels
    with pytest.raises(ValueError):
        preview_grid([volume], titles=["real", "sample"])


def test_a_critic_with_batch_norm_sees_the_fakes_intensity_only_when_scored_beside_the_real():
    from consingan.losses import joint_scores
    from consingan.singan.models import Critic

    torch.manual_seed(0)
    critic = Critic(3, 1, 8, 2, kernel_size=3, padding=0, batch_norm=True, cbam=False)
    real = torch.from_numpy(blobs((16, 16, 16)) * 2 - 1).float()[None, None]
    haze = 0.3 * real + 0.4  # low contrast, too bright: the grey fog of the failed MRI runs
    # One image at a time, each normalised by its own statistics, the haze scores almost as the image (only batch
    # norm's epsilon tells them apart: the blind spot); scored beside the image, ten times as differently.
    apart = (critic(real) - critic(haze)).abs().max()
    real_scores, haze_scores = joint_scores(critic, real, haze)
    assert (real_scores - haze_scores).abs().max() > 10 * apart
    alone = Critic(3, 1, 8, 2, kernel_size=3, padding=0, batch_norm=False, cbam=False)
    assert torch.allclose(joint_scores(alone, real, haze)[1], alone(haze), atol=1e-6)


def test_the_grey_fog_of_a_failed_mri_run_is_not_called_ok():
    # The measures of the failed run in issue 22 (aniso_vox, seed 2): diversity 0.10, memorisation ratio 1.41,
    # coverage ratio 1.42 -- samples farther from the image than a flat average. It used to read "OK".
    memo = {"ratio": 1.41, "coverage_ratio": 1.42, "copying": False}
    label, reason = measures.verdict(0.10, memo)
    assert label == "failed" and "1.42" in reason
    # A healthy run of the quality study (ihc, preset): coverage 0.32, diversity 0.89.
    assert measures.verdict(0.89, {"ratio": 1.2, "coverage_ratio": 0.32, "copying": False})[0] == "ok"


def test_samples_without_the_images_background_are_not_ok():
    rng = np.random.default_rng(0)
    head = torch.from_numpy(blobs((24, 24, 12)) * 2 - 1).float()
    real = torch.where(head < -0.2, torch.tensor(-1.0), head)[None, None]  # a scan: part background at its minimum
    # The failed run's samples: a haze between the scan's median and its 99th percentile, no background anywhere.
    haze = (-0.6 + 0.1 * torch.from_numpy(rng.standard_normal((4, 1, 24, 24, 12)))).float()
    match = measures.intensity_match(real, haze)
    assert match["background_image"][0] > 0.2 and match["background_samples"][0] < 0.01
    assert "no background" in measures.intensity_failure(match)
    memo = {"ratio": 1.0, "coverage_ratio": 0.5, "copying": False}  # even where the patches look close enough
    assert measures.verdict(0.3, memo, intensities=match)[0] == "failed"
    same = measures.intensity_match(real, real.repeat(3, 1, 1, 1, 1))
    assert same["histogram_overlap"][0] == pytest.approx(1.0) and measures.intensity_failure(same) is None


def steady_history(epochs: int = 40) -> list[dict[str, float]]:
    """Losses of a scale that trained normally: a critic that learns, a falling reconstruction loss."""
    return [{"critic": -0.5 + 0.01 * e, "gradient_penalty": 0.1, "adversarial": 0.1 * (-1) ** e,
             "reconstruction": 0.1 / (e + 1)} for e in range(epochs)]


def test_health_warns_when_samples_ignore_their_noise_and_miss_the_background():
    history = steady_history()
    head = torch.from_numpy(blobs((24, 24, 12)) * 2 - 1).float()
    real = torch.where(head < -0.2, torch.tensor(-1.0), head)[None, None]
    rng = np.random.default_rng(1)
    haze = (-0.6 + 0.05 * torch.from_numpy(rng.standard_normal((4, 1, 24, 24, 12)))).float()
    health = check_scale(history, real, haze, reconstruction=real + 0.01)
    text = " ".join(health.warnings)
    assert "ignores its noise" in text and "no background" in text, health
    assert health.sample_coverage >= 0.7 and health.reconstruction_coverage < 0.5
    samples = torch.from_numpy(np.stack([blobs((24, 24, 12), s) * 2 - 1 for s in range(1, 5)])).float()[:, None]
    samples = torch.where(samples < -0.2, torch.tensor(-1.0), samples)
    assert check_scale(history, real, samples, reconstruction=real + 0.01).warnings == []


def test_near_copies_of_the_image_are_low_diversity_not_ok():
    # The anchored run on the 5 mm ICBM template (issue 22, seed 0): coverage 0.185, memorisation ratio 0.55 (just
    # above the copying threshold), diversity 0.07: every sample the template's blurred silhouette. It read "OK".
    memo = {"ratio": 0.55, "coverage_ratio": 0.185, "copying": False}
    label, reason = measures.verdict(0.07, memo)
    assert label == "low diversity" and "0.070" in reason
    # The same measures at the lowest diversity of a run that passes (the template without the anchor, 0.26) are OK ...
    assert measures.verdict(0.26, memo)[0] == "ok"
    # ... and a run that fails for another reason says that reason first.
    assert measures.verdict(0.07, {"ratio": 1.4, "coverage_ratio": 1.42, "copying": False})[0] == "failed"


def test_health_warns_at_the_final_scale_when_samples_are_near_copies_of_the_image():
    """The anchored preset on the ICBM template ended its last scale at diversity 0.07 (evaluate: 'low diversity');
    the health check says so when it ends, not at a coarse scale, whose low diversity the finer scales can raise
    (the fog study's scan: 0.07 at scale 0, 0.18 at the last)."""
    history = steady_history()
    real = torch.from_numpy(blobs((24, 24, 12)) * 1.6 - 0.8).float()[None, None]
    rng = np.random.default_rng(2)
    wobble = torch.from_numpy(rng.standard_normal((4, 1, 24, 24, 12))).float()
    near_copies = real + 0.07 * real.std() * wobble
    final = check_scale(history, real, near_copies, reconstruction=real, last=True)
    assert 0.05 < final.diversity < 0.1 and any("barely vary" in w for w in final.warnings), final.warnings
    assert not any("barely vary" in w for w in check_scale(history, real, near_copies, reconstruction=real).warnings)
    varied = real + 0.4 * real.std() * wobble
    assert not any("barely vary" in w
                   for w in check_scale(history, real, varied, reconstruction=real, last=True).warnings)
