"""Where a training epoch's time goes, stage by stage, for a preset on a real volume (CPU or GPU).

    python benchmarks/profile_epoch_3d.py                                  # the first command's preset, data/vol.nii.gz
    python benchmarks/profile_epoch_3d.py --preset presets/mri-3d-quick.yaml --threads 1

Grows the preset's generator and critic stage by stage (untrained weights: an epoch costs the same work whatever the
weights), times epochs of every stage (median after one warm-up) and profiles the finest stage with torch.profiler,
grouping operators by kind. Run it alone: other jobs on the cores change every number.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from consingan.config import TrainConfig, apply_overrides, load_config_file
from consingan.singan.trainer import SinGANTrainer, prepare

# Operator name fragments -> the kind reported; the first match wins, so order matters.
KINDS = [
    ("convolution weight gradients", ("convolution_backward", "weightgradient")),
    ("convolution forwards", ("mkldnn_convolution", "conv3d", "conv2d", "_convolution", "cudnn_convolution")),
    ("resampling", ("upsample", "interpolate")),
    ("batch norm", ("batch_norm",)),
    ("element-wise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "leaky_relu", "sigmoid", "aten::pow",
                      "aten::sqrt", "aten::abs")),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def epoch_seconds(trainer: SinGANTrainer, stage: int, optimizers: tuple, epochs: int) -> float:
    trainer.train_epoch(stage, *optimizers, epoch=1)  # warm-up
    times = []
    for epoch in range(2, epochs + 2):
        start = time.perf_counter()
        trainer.train_epoch(stage, *optimizers, epoch=epoch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_shares(trainer: SinGANTrainer, stage: int, optimizers: tuple, epochs: int) -> dict[str, float]:
    """Self time per operator kind over ``epochs`` epochs, as fractions of the profiled total."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for epoch in range(1, epochs + 1):
            trainer.train_epoch(stage, *optimizers, epoch=epoch)
    attribute = "self_device_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        kind = kind_of(event.key)
        totals[kind] = totals.get(kind, 0.0) + getattr(event, attribute)
    overall = sum(totals.values()) or 1.0
    return {kind: value / overall for kind, value in sorted(totals.items(), key=lambda item: -item[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="presets/mri-3d-quick.yaml")
    parser.add_argument("--image", default="data/vol.nii.gz")
    parser.add_argument("--dim", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per stage (median)")
    parser.add_argument("--profile-epochs", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    options = load_config_file(Path(args.preset))
    # Through the option checks a config file gets on the command line ('patch_size: 20' is a number in YAML).
    base = TrainConfig(image=args.image, dimension=args.dim)
    config, volume = prepare(apply_overrides(base, options, args.preset))
    torch.manual_seed(0)
    trainer = SinGANTrainer(config, volume, Path("/nonexistent"))  # nothing is written: epochs only

    print(f"{args.preset} on {args.image}, {args.threads} threads, device {trainer.device}")
    print(f"{'stage':>5} {'shape':>14} {'s/epoch':>8} {'epochs':>7} {'seconds':>8}")
    optimizers, total = None, 0.0
    for stage in range(config.num_scales):
        trainer.grow(stage)
        optimizers = trainer.make_optimizers()[:2]
        seconds = epoch_seconds(trainer, stage, optimizers, args.epochs)
        epochs = config.epochs_of(stage)
        total += seconds * epochs
        print(f"{stage:>5} {'x'.join(map(str, trainer.shapes[stage])):>14} {seconds:>8.3f} {epochs:>7} "
              f"{seconds * epochs:>8.0f}", flush=True)
    # Epochs only: the projection leaves out what a run adds (health checks, previews, checkpoints, sampling).
    print(f"{'':>5} {'':>14} {'':>8} {'':>7} {total:>8.0f}  projected training seconds")
    finest = config.num_scales - 1
    shares = profile_shares(trainer, finest, optimizers, args.profile_epochs)
    print(f"\nfinest stage {finest}, self time by kind over {args.profile_epochs} profiled epochs:")
    for kind, share in shares.items():
        print(f"  {kind:<30} {100 * share:5.1f} %")


if __name__ == "__main__":
    main()
