"""The speed benchmarks stay runnable: a tiny case through the same code paths that benchmarks/RESULTS.md comes from."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from consingan.config import TrainConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_training_benchmark_counts_flops_and_convolution_share(capsys):
    bench = load("bench_training")
    config = TrainConfig(dimension=2, num_scales=2, min_size=16, max_size=24, num_feature_channels=8, Gsteps=1,
                         device="cpu", seed=0)
    image = np.random.default_rng(0).random((3, 24, 24), dtype=np.float32)
    result = bench.bench_case("2d", image, config, repeats=1)
    rows = result["stages"]
    assert [r["stage"] for r in rows] == [0, 1]
    assert rows[0]["shape"] == [16, 16] and rows[1]["shape"] == [24, 24]
    # The finer stage trains two stages on more pixels: more arithmetic per epoch.
    assert 0 < rows[0]["gflop_per_epoch"] < rows[1]["gflop_per_epoch"]
    for row in rows:
        assert row["seconds_per_epoch"] > 0 and 0 < row["convolution_share"] <= 1
        assert row["floor_seconds"] == pytest.approx(row["gflop_per_epoch"] / result["forward_gflops"])
        assert row["reference_seconds"] is None  # the reference was timed on its own pyramid only
    assert result["roofline_size"] in ([16, 16], [24, 24])
    result.update(architecture="seed", device="cpu", machine="test", timed_stages=2, matmul_gflops_before=1.0,
                  matmul_gflops_after=bench.matmul_gflops(torch.device("cpu"), repeats=1))
    assert result["matmul_gflops_after"] > 0
    bench.print_table(result)
    table = capsys.readouterr().out
    assert "24x24" in table and "projected full run" in table
    json.dumps(result)  # what main() writes must be JSON


def test_counted_flops_of_one_convolution_match_the_formula():
    bench = load("bench_training")
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 10, 12, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    forward = 2 * 8 * 8 * 9 * 10 * 12
    assert counter.get_total_flops() == 3 * forward  # forward, input gradient, weight gradient
    assert min(bench.conv_throughput(2, 8, (10, 12), torch.device("cpu"), repeats=1)) > 0


def test_memory_format_benchmark_measures_both_formats():
    bench = load("bench_memory_format")
    for channels_last in (False, True):
        forward, forward_backward = bench.measure((12, 14), 8, channels_last, repeats=1)
        assert forward > 0 and forward_backward > 0


def test_quality_benchmark_trains_measures_and_tabulates(tmp_path, capsys):
    bench = load("bench_quality")
    image = bench.StudyImage(bench.DATA / "cell.png", 2, 24, 12, 2, 8, 2, rgb=True)
    (tmp_path / "sheets").mkdir()
    path = bench.prepare_image("cell", image, tmp_path)
    assert path.suffix == ".png"
    from consingan.io import read_volume

    assert read_volume(path, 2).array.shape == (3, 24, 20)  # 660 x 550 resized to a longest side of 24, as RGB
    outcome = bench.train_engine("cell", image, path, "no-bn", tmp_path, seed=3)
    config = json.loads((outcome["run_dir"] / "config.json").read_text())
    assert outcome["run_dir"].name == "cell_no-bn_s3" and config["batch_norm"] is False and config["seed"] == 3
    outcome["label"] = "cell_no-bn_s3"
    row = bench.measure(outcome, image, path, tmp_path, 6)
    assert row["samples"] == 6 and row["swd_x1e3"] > 0 and row["verdict"] in {"ok", "low diversity", "collapse", "copying"}
    assert (tmp_path / "sheets" / "cell_no-bn_s3.png").is_file()
    bench.print_table([("cell", "no-bn", 3, row), ("cell", "minmax", 0, {"error": "boom"})])
    table = capsys.readouterr().out
    assert "cell     no-bn" in table and "failed: boom" in table
    assert not bench.applies("cubic", bench.IMAGES["mri"]) and not bench.applies("gsteps1", bench.IMAGES["ct"])


_FAKE_REFERENCE = """
import torch


class Options:
    device = "cpu"


class Generator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.opt = Options()

    def forward(self, noise, shapes, noise_amp):
        return torch.tanh(noise[-1] * noise_amp[-1])


def sample_random_noise(depth, shapes, opt):
    return [torch.randn(shape) for shape in shapes[: depth + 1]]
"""


def test_reference_samples_are_drawn_losslessly_from_its_generator(tmp_path, monkeypatch):
    """The driver loads a trained reference's pickled generator and draws PNG samples with its own noise sampler
    (here a stand-in package with the reference's names and signatures)."""
    import subprocess
    import sys

    import torch

    from consingan.io import read_volume

    bench = load("bench_quality")
    package = tmp_path / "fake_reference" / "ConSinGAN"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "functions.py").write_text(_FAKE_REFERENCE)
    model = tmp_path / "TrainedModels" / "cell" / "run"
    (model / "gen_samples_stage_1").mkdir(parents=True)
    script = "import sys, torch; sys.path.insert(0, sys.argv[1]); from ConSinGAN.functions import Generator; " \
             "torch.save(Generator(), sys.argv[2] + '/G.pth')"
    subprocess.run([sys.executable, "-c", script, str(package.parent), str(model)], check=True)
    torch.save([1.0, 0.5], model / "noise_amp.pth")
    torch.save([torch.zeros(1, 3, 8, 10), torch.zeros(1, 3, 16, 20)], model / "reals.pth")
    (tmp_path / "reference_stubs").mkdir()
    monkeypatch.setenv("PYTHONPATH", "")
    job = {"samples": str(model / "gen_samples_stage_1")}
    folder = bench.reference_samples(job, tmp_path, package.parent, 4)
    files = sorted(folder.glob("sample_*.png"))
    assert len(files) == 4
    arrays = [read_volume(f, 2).array for f in files]
    assert arrays[0].shape == (3, 16, 20) and arrays[0].std() > 0  # the finest stage's size, from the noise
    assert not np.array_equal(arrays[0], arrays[1])  # new noise for every sample
    assert bench.reference_samples(job, tmp_path, package.parent, 4) == folder  # drawn once, then reused


def test_time_to_quality_averages_over_seeds():
    bench = load("bench_time_to_quality")
    row = dict(seconds=10.0, swd_x1e3=200.0, swd_coarse_x1e3=300.0, diversity=0.8, memorisation_ratio=1.0,
               verdict="ok")
    rows = bench.mean_rows([{"setting": "repeat", "epochs": 75, **row},
                            {"setting": "repeat", "epochs": 75, **row, "swd_x1e3": 220.0, "seconds": 12.0},
                            {"setting": "reference", "epochs": 150, **row}])
    repeat = next(r for r in rows if r["setting"] == "repeat")
    assert repeat["seeds"] == 2 and repeat["swd_x1e3"] == 210.0 and repeat["seconds"] == 11.0
    assert repeat["swd_per_seed"] == [200.0, 220.0]
    assert bench.reaches(repeat, {"swd_x1e3": 210.0, "diversity": 0.85}) and \
        not bench.reaches(repeat, {"swd_x1e3": 209.0, "diversity": 0.85})


def test_3d_time_to_quality_judges_every_seed_against_the_targets():
    bench = load("bench_time_to_quality_3d")
    good = {"setting": "s", "epochs": None, "seconds": 200.0, "swd": 0.12, "diversity": 0.5, "coverage": 0.4,
            "pearson_r": 0.95, "verdict": "ok"}
    rows = bench.mean_rows([good, {**good, "seed": 1, "swd": 0.14}])
    assert rows[0]["seeds"] == 2 and rows[0]["swd"] == pytest.approx(0.13) and bench.meets_targets(rows[0])
    # One seed over a target fails the setting, though the mean is within it.
    rows = bench.mean_rows([good, {**good, "swd": 0.17}])
    assert rows[0]["swd"] == pytest.approx(0.145) and not bench.meets_targets(rows[0])
    assert not bench.meets_targets(bench.mean_rows([good, {**good, "verdict": "failed"}])[0])
    assert not bench.meets_targets(bench.mean_rows([{**good, "seconds": 301.0}])[0])
