"""The downstream benchmark stays runnable: its --quick mode on tiny crops of the shipped labelled images."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from consingan.errors import ConsinganError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load():
    spec = importlib.util.spec_from_file_location("bench_downstream", BENCHMARKS / "bench_downstream.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_downstream"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_result(out: Path, classes: list[int], foreground: list[str]) -> dict:
    result = json.loads((out / "downstream.json").read_text())
    assert result["classes"] == classes and result["foreground_classes"] == foreground
    assert set(result["arms"]) == {"classical", "classical+consingan", "consingan"}
    for arm in result["arms"].values():
        assert {"dice_mean", "dice_sem", "dice_per_seed"} <= set(arm)
        assert len(arm["dice_per_seed"]) == 2  # --quick: two seeds
        assert all(0 <= d <= 1 for d in arm["dice_per_seed"])
        assert arm["dice_mean"] == pytest.approx(np.mean(arm["dice_per_seed"]))
        assert arm["dice_sem"] == pytest.approx(np.std(arm["dice_per_seed"], ddof=1) / math.sqrt(2))
        assert set(arm["per_class"]) == set(foreground)
    consistency = result["label_consistency"]
    assert all(0 <= d <= 1 for d in consistency["dice_per_seed"])
    for name in ("classical_on_training_pair", "classical_on_reconstruction", "reconstruction_label_vs_training_label"):
        assert all(0 <= d <= 1 for d in consistency[name]["dice_per_seed"])
    assert 0 <= consistency["decoding"]["tie_share"] <= 1
    assert 0 <= consistency["decoding"]["raw_argmax_agreement"] <= 1
    gains = result["comparison"]["gain_per_seed"]
    assert gains == pytest.approx([b - a for a, b in zip(result["arms"]["classical"]["dice_per_seed"],
                                                         result["arms"]["classical+consingan"]["dice_per_seed"])])
    for seed in result["per_seed"]:
        assert set(seed["seconds"]) >= {"consingan_train", "consingan_sample", "train classical", "train consingan"}
        assert all(v >= 0 for v in seed["seconds"].values())
    assert (out / "downstream.png").stat().st_size > 0
    assert (out / "work" / "gan" / "seed1" / "config.json").is_file()
    return result


def test_regions_are_parsed_and_labels_indexed():
    bench = load()
    assert bench.parse_region("2:5,:", (10, 8)) == (slice(2, 5), slice(0, 8))
    for bad in ("2:5", "5:2,:", "0:11,:", "a:b,:"):
        with pytest.raises(ConsinganError):
            bench.parse_region(bad, (10, 8))
    assert bench.regions_overlap((slice(0, 4), slice(0, 4)), (slice(3, 6), slice(3, 6)))
    assert not bench.regions_overlap((slice(0, 4), slice(0, 4)), (slice(4, 6), slice(0, 4)))
    with pytest.raises(ConsinganError, match=r"values \[7\]"):
        bench.to_indices(np.array([[0, 2, 7]]), (0, 2), "a test label")
    assert bench.to_indices(np.array([[0.0, 5.0, 2.0]]), (0, 2, 5), "a test label").tolist() == [[0, 2, 1]]


def test_crop_keeps_the_geometry_of_its_voxels():
    bench = load()
    from consingan.io import Volume

    affine = np.array([[0.0, 2.0, 10.0], [3.0, 0.0, -5.0], [0.0, 0.0, 1.0]])
    volume = Volume(np.arange(48, dtype=np.float32).reshape(1, 6, 8), affine, ".mha")
    part = bench.crop(volume, bench.parse_region("2:5,3:8", volume.spatial_shape))
    assert part.array.shape == (1, 3, 5) and part.array[0, 0, 0] == volume.array[0, 2, 3]
    # Voxel (0, 0) of the crop sits where voxel (2, 3) of the whole image sat.
    assert np.allclose(part.affine @ [0, 0, 1], affine @ [2, 3, 1]) and np.allclose(part.affine[:2, :2], affine[:2, :2])


def test_decoding_checks_count_ties_and_disagreements():
    bench = load()
    # Three voxels, two classes: the second voxel's channels are tied (both clipped to 1), the third disagrees with
    # the raw channels' argmax.
    channels = np.array([[1.0, 1.0, 0.2], [0.0, 1.0, 0.6]])
    raw = np.array([[0.9, 0.95, 0.7], [-0.9, 0.85, 0.1]])
    decoded = np.argmax(channels, axis=0)  # [0, 0, 1]
    tie, agree = bench.decoding_checks(channels, raw, decoded)
    assert tie == pytest.approx(1 / 3) and agree == pytest.approx(2 / 3)


def test_held_out_regions_must_not_overlap_the_training_region(tmp_path):
    bench = load()
    args = ["--case", "nuclei2d", "--quick", "--train-region", "32:64,32:64", "--test-region", "48:80,48:80",
            "--out", str(tmp_path / "overlap")]
    with pytest.raises(ConsinganError, match="overlaps the training region"):
        bench.main(args)


@pytest.mark.slow
def test_quick_2d_run_writes_dice_of_every_arm(tmp_path, capsys):
    pytest.importorskip("monai")
    bench = load()
    out = tmp_path / "nuclei"
    bench.main(["--case", "nuclei2d", "--quick", "--train-region", "32:64,32:64", "--test-region", "256:288,96:128",
                "288:320,0:32", "--out", str(out)])
    result = check_result(out, [0, 1], ["nucleus"])
    assert result["data"]["train_shape"] == [32, 32] and len(result["data"]["test"]) == 2
    assert result["data"]["test"][0] == "nuclei2d.png[256:288,96:128]"
    table = capsys.readouterr().out
    assert "classical+consingan" in table and "label consistency" in table
    # A second run into the same folder reuses the finished consingan runs only when asked to.
    again = ["--case", "nuclei2d", "--quick", "--train-region", "32:64,32:64", "--test-region", "256:288,96:128",
             "--out", str(out)]
    with pytest.raises(ConsinganError, match="reuse-gan"):
        bench.main(again)
    first = result["per_seed"][1]
    summary = bench.main(again + ["--reuse-gan", "--seeds", "1", "--start-scale", "1"])
    reused = summary["per_seed"][0]
    assert reused["consingan_reused"] and not first["consingan_reused"]
    # Sampling from a later start scale keeps the training image's coarse layout: other samples than from scale 0.
    assert summary["budget"]["start_scale"] == 1
    from_start = {k: bench.draw_samples(Path(first["run_dir"]), 2, 1, [0, 1], k)[0] for k in (0, 1)}
    assert not np.allclose(from_start[0][0].image, from_start[1][0].image)
    assert reused["consingan_warnings"] == first["consingan_warnings"]  # read back from the run's scale.json files
    assert reused["seconds"]["consingan_train"] < first["seconds"]["consingan_train"]


@pytest.mark.slow
def test_quick_3d_run_writes_dice_of_every_arm(tmp_path):
    pytest.importorskip("monai")
    bench = load()
    out = tmp_path / "icbm"
    bench.main(["--case", "icbm3d", "--quick", "--train-region", "20:36,16:32,12:28", "--test-region",
                "4:20,16:32,12:28", "--out", str(out)])
    result = check_result(out, [0, 1, 2], ["grey matter", "white matter"])
    assert result["data"]["train_shape"] == [16, 16, 16]
