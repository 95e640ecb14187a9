"""Memory format of 2D convolutions: contiguous (NCHW) against channels-last (NHWC), forward and forward + backward.

    python benchmarks/bench_memory_format.py [--repeats 10] [--channels 64]

Prints GFLOP/s of one ``channels`` -> ``channels`` 3x3 convolution (batch 1, float32) at the reference pyramid's
sizes, for the forward alone and for forward + backward (input and weight gradients, as training needs), in both
memory formats. This is the measurement behind keeping NCHW in training (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SIZES = [(25, 38), (41, 61), (60, 89), (115, 171), (167, 250)]


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up: oneDNN picks and caches its kernel on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(size: tuple[int, int], channels: int, channels_last: bool, repeats: int) -> tuple[float, float]:
    """(forward GFLOP/s, forward + backward GFLOP/s)."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(1, channels, *size)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    forward_flops = 2 * channels * channels * 9 * size[0] * size[1]

    def forward() -> None:
        with torch.no_grad():
            conv(x)

    def forward_backward() -> None:
        conv(x).sum().backward()

    return (forward_flops / median_seconds(forward, repeats) / 1e9,
            3 * forward_flops / median_seconds(forward_backward, repeats) / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.channels} channels, GFLOP/s")
    print(f"{'size':>9} {'fwd NCHW':>9} {'fwd NHWC':>9} {'f+b NCHW':>9} {'f+b NHWC':>9}")
    for size in SIZES:
        nchw = measure(size, args.channels, False, args.repeats)
        nhwc = measure(size, args.channels, True, args.repeats)
        print(f"{'x'.join(map(str, size)):>9} {nchw[0]:>9.1f} {nhwc[0]:>9.1f} {nchw[1]:>9.1f} {nhwc[1]:>9.1f}")


if __name__ == "__main__":
    main()
