"""Training speed: a convolution roofline, then seconds, FLOPs and memory per epoch for every stage.

    python benchmarks/bench_training.py                       # 2D (3 x 167 x 250) and 3D (1 x 64^3), CPU or GPU
    python benchmarks/bench_training.py --case 2d --gsteps 1 --architecture reference   # equal work to the reference

Prints a table per case and merges it into benchmarks/results.json (one entry per case, architecture, Gsteps and
device). Epochs are timed after one warm-up epoch (median of --repeats); FLOPs are counted with
torch.utils.flop_counter over one epoch; the share of time in convolutions comes from one torch.profiler epoch; peak
memory is the process's resident high-water mark over the timed epochs on the CPU (Linux), torch's peak allocation
on CUDA. The roofline is the best forward + backward throughput of the engine's convolution layer over the stage
sizes, and "floor" is the least time an epoch's counted FLOPs can take at the fastest rate any convolution reaches
(the forward's).
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
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, flop_registry, register_flop_formula

from consingan.config import TrainConfig
from consingan.io import Volume
from consingan.nn import factory
from consingan.singan.trainer import SinGANTrainer, resolve_device

# consingan.nn.fast_conv calls oneDNN's convolution directly (3D on the CPU); teach the FLOP counter about it.
def _mkldnn_convolution_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


if torch.ops.aten.mkldnn_convolution not in flop_registry:  # registering twice is an error (module reloaded)
    register_flop_formula(torch.ops.aten.mkldnn_convolution)(_mkldnn_convolution_flops)


# The reference ConSinGAN (tohinz/ConSinGAN, defaults) per epoch on a 2-core CPU, from issue 5.
REFERENCE_2D = {(25, 38): 0.196, (31, 47): 0.174, (41, 61): 0.306, (60, 89): 0.658, (115, 171): 2.19, (167, 250): 4.70}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step, device: torch.device, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        step()  # oneDNN and cuDNN pick and cache their kernels on the first call
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(device: torch.device, repeats: int = 5) -> float:
    """GFLOP/s of a 2048^2 float32 matrix product: a quick reading of how fast the machine is right now (a shared
    host can run far slower at times; a run whose start and end readings differ was disturbed)."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    return 2 * 2048**3 / median_seconds(lambda: a @ b, device, repeats) / 1e9


def conv_throughput(spatial_dims: int, channels: int, size: tuple[int, ...], device: torch.device,
                    repeats: int) -> tuple[float, float]:
    """(forward + backward, forward alone) FLOP/s of one ``channels`` -> ``channels`` 3-wide convolution at ``size``:
    the engine's own layer (``factory.conv``), dtype and memory format, batch 1. The backward computes the input and
    the weight gradients, as training does."""
    conv = factory.conv(spatial_dims, channels, channels, 3, padding=1).to(device)
    x = torch.randn(1, channels, *size, device=device, requires_grad=True)

    def forward_backward() -> None:
        conv(x).sum().backward()

    def forward() -> None:
        with torch.no_grad():
            conv(x)

    with FlopCounterMode(display=False) as counter:
        forward_backward()
    flops = counter.get_total_flops()
    return (flops / median_seconds(forward_backward, device, repeats),
            flops / 3 / median_seconds(forward, device, repeats))


def roofline(spatial_dims: int, channels: int, sizes: list[tuple[int, ...]], device: torch.device,
             repeats: int) -> dict:
    """The best convolution throughput over the pyramid's stage sizes: the ceiling for work made of such layers.

    One fixed large size is not a ceiling in 3D: at 64^3 the 64-channel maps (64 MiB) overflow the caches and the
    layer runs slower than at the smaller stages, so the best over the sizes actually trained is used. The forward
    alone runs faster than forward + backward (the weight-gradient kernels are slower), so the fastest forward rate
    bounds any mix of the two from above.
    """
    measured = {size: conv_throughput(spatial_dims, channels, size, device, repeats) for size in sizes}
    best = max(measured, key=lambda size: measured[size][0])
    return {"flops_per_second": measured[best][0], "size": best,
            "forward_flops_per_second": max(rates[1] for rates in measured.values())}


def convolution_share(trainer: SinGANTrainer, stage: int, optimizers: tuple) -> float:
    """Fraction of one epoch's operator time spent inside convolution kernels (torch.profiler, self time).

    The profiler adds a little time to every operator, so small operators weigh slightly more than they do
    unprofiled: the share is a lower bound."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        trainer.train_epoch(stage, *optimizers)
    events = profiler.key_averages()
    attribute = "self_device_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attribute) for e in events)
    # aten::mkldnn_convolution, aten::convolution_backward, aten::_slow_conv2d_*, cuDNN kernels
    conv = sum(getattr(e, attribute) for e in events if "conv" in e.key.lower())
    return conv / total if total else float("nan")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's allocator on CUDA; on Linux the process's resident high-water mark (VmHWM), which
    writing 5 to /proc/self/clear_refs resets. Elsewhere the CPU peak stays the process's lifetime maximum."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_case(name: str, array: np.ndarray, config: TrainConfig, repeats: int, stages: int | None = None) -> dict:
    volume = Volume(array, np.eye(array.ndim), ".npy")
    torch.manual_seed(0)
    trainer = SinGANTrainer(config, volume, Path("/nonexistent"))
    device = trainer.device
    # The probe is cheap next to an epoch: more repeats than the epochs get, to steady it.
    ceiling = roofline(config.dimension, config.num_feature_channels, [tuple(s) for s in trainer.shapes], device,
                       max(repeats, 7))
    peak, peak_size, forward_peak = ceiling["flops_per_second"], ceiling["size"], ceiling["forward_flops_per_second"]
    print(f"  {name} roofline {peak / 1e9:.1f} GFLOP/s at {'x'.join(map(str, peak_size))}, "
          f"forward alone up to {forward_peak / 1e9:.1f}", flush=True)
    rows = []
    for stage in range(config.num_scales if stages is None else min(stages, config.num_scales)):
        trainer.grow(stage)
        optimizer_g, optimizer_d, _ = trainer.make_optimizers()
        trainer.train_epoch(stage, optimizer_g, optimizer_d)  # warm-up
        with FlopCounterMode(display=False) as counter:
            trainer.train_epoch(stage, optimizer_g, optimizer_d)
        flops = counter.get_total_flops()
        reset_peak_memory(device)  # the peak of the timed epochs alone, not of counting or profiling
        # Already warm: the warm-up and counted epochs ran above.
        seconds = median_seconds(lambda: trainer.train_epoch(stage, optimizer_g, optimizer_d), device, repeats,
                                 warm_up=False)
        peak_memory = peak_memory_mb(device)
        conv_share = convolution_share(trainer, stage, (optimizer_g, optimizer_d))  # after timing and memory
        shape = tuple(trainer.shapes[stage])
        rows.append({
            "stage": stage, "shape": list(shape), "seconds_per_epoch": seconds, "gflop_per_epoch": flops / 1e9,
            "gflops": flops / seconds / 1e9, "roofline_fraction": flops / seconds / peak,
            # The least time this epoch's counted arithmetic could take if every FLOP ran at the fastest rate any
            # convolution reached here (the forward's).
            "floor_seconds": flops / forward_peak, "convolution_share": conv_share,
            "peak_memory_mb": peak_memory, "reference_seconds": REFERENCE_2D.get(shape) if name == "2d" else None,
        })
        print(f"  {name} stage {stage} {'x'.join(map(str, shape))}: {seconds:.3f} s/epoch", flush=True)
    # Stages not timed (--stages) are counted at the last timed stage's speed.
    timed = [r["seconds_per_epoch"] for r in rows]
    projected = (sum(timed) + timed[-1] * (config.num_scales - len(timed))) * config.epochs
    return {"case": name, "config": dataclasses.asdict(config), "stages": rows, "projected_hours": projected / 3600,
            "roofline_gflops": peak / 1e9, "roofline_size": list(peak_size), "forward_gflops": forward_peak / 1e9}


def print_table(result: dict) -> None:
    peak = result["roofline_gflops"]
    print(f"\n{result['case']}: Dsteps={result['config']['Dsteps']} Gsteps={result['config']['Gsteps']} "
          f"channels={result['config']['num_feature_channels']}  roofline {peak:.1f} GFLOP/s "
          f"(best at {'x'.join(map(str, result['roofline_size']))}; forward alone {result['forward_gflops']:.1f})")
    print(f"{'stage':>5} {'shape':>12} {'s/epoch':>8} {'ref':>6} {'ref/2':>6} {'floor':>6} {'GFLOP/ep':>9} "
          f"{'GFLOP/s':>8} {'roofline':>8} {'conv':>5} {'peak MB':>8}")
    for r in result["stages"]:
        ref = r["reference_seconds"]
        print(f"{r['stage']:>5} {'x'.join(map(str, r['shape'])):>12} {r['seconds_per_epoch']:>8.3f} "
              f"{f'{ref:.3f}' if ref else '-':>6} {f'{ref / 2:.3f}' if ref else '-':>6} {r['floor_seconds']:>6.3f} "
              f"{r['gflop_per_epoch']:>9.2f} {r['gflops']:>8.1f} {r['roofline_fraction']:>8.0%} "
              f"{r['convolution_share']:>5.0%} {r['peak_memory_mb']:>8.0f}")
    print(f"machine check (2048^2 matmul): {result['matmul_gflops_before']:.0f} GFLOP/s before, "
          f"{result['matmul_gflops_after']:.0f} after")
    print(f"projected full run ({result['config']['epochs']} epochs per scale): {result['projected_hours']:.2f} h"
          "\n  floor: the counted FLOPs at the forward-alone rate, a lower bound; conv: share of operator time in "
          "convolutions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["2d", "3d", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gsteps", type=int, default=3, help="generator updates per epoch (1: the reference's work)")
    parser.add_argument("--architecture", choices=["seed", "reference"], default="seed",
                        help="seed: the configuration table's defaults (batch norm in the critic, CBAM); reference: "
                             "tohinz/ConSinGAN's layers (no critic normalisation, no attention), for equal-work "
                             "comparisons with the reference's timings")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stages", type=int, default=None, help="time only the first N stages")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    layers = {} if args.architecture == "seed" else {"batch_norm": False, "cbam": False}
    common = dict(Gsteps=args.gsteps, device=args.device, seed=0, **layers)
    cases = {
        # Six stages from 25x38 to 167x250: the reference's default pyramid (tested in tests/test_pyramid.py).
        "2d": (rng.random((3, 167, 250), dtype=np.float32), TrainConfig(dimension=2, num_scales=6, **common)),
        "3d": (rng.random((1, 64, 64, 64), dtype=np.float32),
               TrainConfig(dimension=3, num_scales=8, max_size=64, **common)),
    }
    # Results accumulate in one file, one entry per (case, architecture, Gsteps, device), newest wins.
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries = {(c["case"], c.get("architecture", "seed"), c["config"]["Gsteps"], c.get("device", "cpu")): c
               for c in results.get("cases", [])}
    for name in (["2d", "3d"] if args.case == "both" else [args.case]):
        array, config = cases[name]
        device = resolve_device(config.device)
        matmul_before = matmul_gflops(device)
        result = bench_case(name, array, config, args.repeats, args.stages)
        result.update(matmul_gflops_before=matmul_before, matmul_gflops_after=matmul_gflops(device))
        result.update(architecture=args.architecture, device=str(device),
                      machine=f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
                              f"torch {torch.__version__}", timed_stages=len(result["stages"]))
        entries[(name, args.architecture, config.Gsteps, result["device"])] = result
        print_table(result)
    args.out.write_text(json.dumps({"cases": list(entries.values())}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
