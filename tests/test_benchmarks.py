"""The speed benchmarks stay runnable: a tiny case through the same code paths that benchmarks/RESULTS.md comes from."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from consingan.config import TrainConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
