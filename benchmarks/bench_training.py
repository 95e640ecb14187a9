"""Training speed: a convolution roofline, then seconds, FLOPs and memory per epoch for every stage.

    python benchmarks/bench_training.py                       # 2D (3 x 167 x 250) and 3D (1 x 64^3), CPU or GPU
    python benchmarks/bench_training.py --case 2d --repeats 5 --gsteps 1

Prints a table per case and writes benchmarks/results.json. Epochs are timed after one warm-up epoch (median of
--repeats); FLOPs are counted with torch.utils.flop_counter over one epoch; peak memory is the process's resident set
size on the CPU, torch's peak allocation on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

from consingan.config import TrainConfig
from consingan.io import Volume
from consingan.nn import factory
from consingan.singan.trainer import SinGANTrainer

# consingan.nn.fast_conv calls oneDNN's convolution directly (3D on the CPU); teach the FLOP counter about it.
@register_flop_formula(torch.ops.aten.mkldnn_convolution)
def _mkldnn_convolution_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


# The reference ConSinGAN (tohinz/ConSinGAN, defaults) per epoch on a 2-core CPU, from issue 5.
REFERENCE_2D = {(25, 38): 0.196, (31, 47): 0.174, (41, 61): 0.306, (60, 89): 0.658, (115, 171): 2.19, (167, 250): 4.70}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def roofline(spatial_dims: int, channels: int, size: tuple[int, ...], device: torch.device, repeats: int) -> float:
    """FLOP/s of forward + backward of one large convolution with the engine's channels, kernel and dtype."""
    conv = factory.conv(spatial_dims, channels, channels, 3, padding=1).to(device)
    x = torch.randn(1, channels, *size, device=device, requires_grad=True)

    def step() -> None:
        conv(x).sum().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times[1:])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_case(name: str, array: np.ndarray, config: TrainConfig, repeats: int, peak: float,
               stages: int | None = None) -> dict:
    volume = Volume(array, np.eye(array.ndim), ".npy")
    torch.manual_seed(0)
    trainer = SinGANTrainer(config, volume, Path("/nonexistent"))
    device = trainer.device
    rows = []
    for stage in range(config.num_scales if stages is None else min(stages, config.num_scales)):
        trainer.grow(stage)
        optimizer_g, optimizer_d, _ = trainer.make_optimizers()
        trainer.train_epoch(stage, optimizer_g, optimizer_d)  # warm-up
        with FlopCounterMode(display=False) as counter:
            trainer.train_epoch(stage, optimizer_g, optimizer_d)
        flops = counter.get_total_flops()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            trainer.train_epoch(stage, optimizer_g, optimizer_d)
            synchronize(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        shape = tuple(trainer.shapes[stage])
        rows.append({
            "stage": stage, "shape": list(shape), "seconds_per_epoch": seconds, "gflop_per_epoch": flops / 1e9,
            "gflops": flops / seconds / 1e9, "roofline_fraction": flops / seconds / peak,
            "peak_memory_mb": peak_memory_mb(device), "reference_seconds": REFERENCE_2D.get(shape) if name == "2d" else None,
        })
        print(f"  {name} stage {stage} {'x'.join(map(str, shape))}: {seconds:.3f} s/epoch", flush=True)
    # Stages not timed (--stages) are counted at the last timed stage's speed.
    timed = [r["seconds_per_epoch"] for r in rows]
    projected = (sum(timed) + timed[-1] * (config.num_scales - len(timed))) * config.epochs
    return {"case": name, "config": dataclasses.asdict(config), "stages": rows, "projected_hours": projected / 3600}


def print_table(result: dict, peak: float) -> None:
    print(f"\n{result['case']}: Dsteps={result['config']['Dsteps']} Gsteps={result['config']['Gsteps']} "
          f"channels={result['config']['num_feature_channels']}  roofline {peak / 1e9:.1f} GFLOP/s")
    print(f"{'stage':>5} {'shape':>12} {'s/epoch':>9} {'reference':>9} {'GFLOP/ep':>9} {'GFLOP/s':>8} "
          f"{'roofline':>8} {'peak MB':>8}")
    for r in result["stages"]:
        reference = f"{r['reference_seconds']:.3f}" if r["reference_seconds"] else "-"
        print(f"{r['stage']:>5} {'x'.join(map(str, r['shape'])):>12} {r['seconds_per_epoch']:>9.3f} {reference:>9} "
              f"{r['gflop_per_epoch']:>9.2f} {r['gflops']:>8.1f} {r['roofline_fraction']:>8.0%} "
              f"{r['peak_memory_mb']:>8.0f}")
    print(f"projected full run ({result['config']['epochs']} epochs per scale): {result['projected_hours']:.2f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["2d", "3d", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gsteps", type=int, default=3, help="generator updates per epoch (1: the reference's work)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stages", type=int, default=None, help="time only the first N stages")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = {
        # Six stages from 25x38 to 167x250: the reference's default pyramid (tested in tests/test_pyramid.py).
        "2d": (rng.random((3, 167, 250), dtype=np.float32),
               TrainConfig(dimension=2, num_scales=6, Gsteps=args.gsteps, device=args.device, seed=0)),
        "3d": (rng.random((1, 64, 64, 64), dtype=np.float32),
               TrainConfig(dimension=3, num_scales=8, max_size=64, Gsteps=args.gsteps, device=args.device, seed=0)),
    }
    results = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
               "cases": []}
    for name in (["2d", "3d"] if args.case == "both" else [args.case]):
        array, config = cases[name]
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        size = (167, 250) if name == "2d" else (64, 64, 64)
        peak = roofline(config.dimension, config.num_feature_channels, size, device, args.repeats)
        result = bench_case(name, array, config, args.repeats, peak, args.stages)
        result["roofline_gflops"] = peak / 1e9
        results["cases"].append(result)
        print_table(result, peak)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
