"""Memory and time of 3D training at the finest scale against the volume's side, whole volume against patches.

    python benchmarks/bench_scale3d.py                                   # sides 48 64 96 128, patch off and auto
    python benchmarks/bench_scale3d.py --sides 64 128 192 256 --patches off 64 --epochs 2
    python benchmarks/bench_scale3d.py --device cuda --sides 128 256     # on a GPU: torch.cuda.max_memory_allocated too

Each (side, patch) runs in its own process, so its peak resident memory (``ru_maxrss``) is its own: the volume given
by ``--image`` (default: the ICBM T1 template of ``benchmarks/data``, a real brain MRI) is resampled to side^3 (cubic
spline, isotropic voxels, written to a scratch NIfTI), the default configuration are kept (64 channels, 3 layers, 3 concurrent stages, CBAM,
batch norm) except ``--num-scales`` and ``--patch-size``, the generator is grown through every scale the way training
grows it (each new stage's noise amplitude from its reconstruction: in tiles when the scale trains on patches), and
then ``--epochs`` epochs of the finest scale are timed after one warm-up epoch. A whole-volume run the memory preflight
refuses is reported as refused, with the memory the preflight asked for.

Columns: side, patch (the side trained on; 'whole' when none), the preflight's estimate, the peak memory of the
finest scale's epochs (on the CPU the resident high-water mark, reset after growing; on CUDA the allocator's peak), the
process's peak resident memory (growing included), seconds to grow the pyramid, seconds per epoch at the finest
scale.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_IMAGE = HERE / "data" / "mni152_t1_5mm.nii.gz"


def child(args: argparse.Namespace) -> None:
    """One (side, patch) measurement, printed as one JSON line."""
    import nibabel as nib
    import numpy as np
    import torch
    from scipy import ndimage

    from consingan.config import TrainConfig
    from consingan.errors import ConsinganError
    from consingan.singan.memory import estimate_training_bytes
    from consingan.singan.trainer import SinGANTrainer, prepare

    from bench_training import peak_memory_mb, reset_peak_memory  # beside this script

    source = nib.load(str(args.image))
    array = np.asarray(source.dataobj, dtype=np.float32)
    zoom = [args.side / n for n in array.shape[:3]]
    resized = ndimage.zoom(array, zoom, order=3)
    # Isotropic voxels, so that the engine keeps the cube (it keeps a scan's physical aspect): a brain stretched to
    # side^3, which is what a memory and time benchmark needs.
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    scratch = Path(tempfile.mkdtemp(prefix="bench_scale3d_"))
    image = scratch / f"side{args.side}.nii.gz"
    nib.save(nib.Nifti1Image(resized, affine), str(image))
    config = TrainConfig(image=str(image), dimension=3, seed=0, device=args.device, num_scales=args.num_scales,
                         max_size=args.side, patch_size=args.patch, epochs=args.epochs + 1, out_dir=str(scratch),
                         run_name="run", preview_every=0, checkpoint_every=0)
    row = {"side": args.side, "patch": args.patch}
    try:
        config, volume = prepare(config)
    except ConsinganError as error:
        print(json.dumps({**row, "refused": str(error)}))
        return
    trainer = SinGANTrainer(config, volume, scratch / "run")
    patch = trainer.patch
    top = trainer.shapes[-1]
    row.update(patch_side=patch, shape=list(top),
               estimate_gib=estimate_training_bytes(config, trainer.shapes, patch) / 2**30)
    started = time.perf_counter()
    for stage in range(len(trainer.shapes)):
        trainer.grow(stage)
    row["grow_seconds"] = time.perf_counter() - started
    optimizer_g, optimizer_d, _ = trainer.make_optimizers()
    stage = len(trainer.shapes) - 1
    gc.collect()
    reset_peak_memory(trainer.device)  # the epochs' own peak, apart from growing the pyramid's
    trainer.train_epoch(stage, optimizer_g, optimizer_d, 1)  # warm-up
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for epoch in range(2, args.epochs + 2):
        trainer.train_epoch(stage, optimizer_g, optimizer_d, epoch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    row["seconds_per_epoch"] = (time.perf_counter() - started) / args.epochs
    row["epoch_peak_gib"] = peak_memory_mb(trainer.device) / 1024
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--sides", type=int, nargs="+", default=[48, 64, 96, 128])
    parser.add_argument("--patches", nargs="+", default=["off", "auto"], help="'off', 'auto' or a side each")
    parser.add_argument("--num-scales", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs at the finest scale (after a warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=HERE / "scale3d.json")
    parser.add_argument("--plot", type=Path, help="write memory and time against the side to this PNG")
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)  # the child's own arguments
    parser.add_argument("--patch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        child(args)
        return
    rows = []
    for side in args.sides:
        for patch in args.patches:
            command = [sys.executable, __file__, "--image", str(args.image.resolve()), "--side", str(side),
                       "--patch", patch, "--num-scales", str(args.num_scales), "--epochs", str(args.epochs),
                       "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"side": side, "patch": patch,
                                                       "refused": done.stderr.strip().splitlines()[-1:]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = f"{'side':>5} {'patch':>7} {'trained on':>10} {'estimate GiB':>12} {'epoch peak GiB':>14} " \
             f"{'process peak GiB':>16} {'grow s':>7} {'s/epoch':>8}"
    print(f"\n{header}\n{'-' * len(header)}")
    for row in rows:
        if "refused" in row:
            print(f"{row['side']:5d} {row['patch']:>7}  refused: {str(row['refused'])[:90]}")
            continue
        trained_on = "whole" if row["patch_side"] is None else f"{row['patch_side']}^3"
        print(f"{row['side']:5d} {row['patch']:>7} {trained_on:>10} {row['estimate_gib']:12.2f} "
              f"{row['epoch_peak_gib']:14.2f} {row['peak_rss_gib']:16.2f} {row['grow_seconds']:7.1f} "
              f"{row['seconds_per_epoch']:8.2f}")
    stored = json.loads(args.results.read_text()) if args.results.is_file() else {}
    stored[f"{args.device}_sides{'_'.join(map(str, args.sides))}_patches{'_'.join(args.patches)}"] = rows
    args.results.write_text(json.dumps(stored, indent=1) + "\n")
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


def plot(rows: list[dict], path: Path) -> None:
    """Peak memory and seconds per epoch against the side, one line per --patches setting (refused runs left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for patch in dict.fromkeys(row["patch"] for row in rows):
        done = [row for row in rows if row["patch"] == patch and "refused" not in row]
        label = "whole volume" if patch == "off" else f"patch {patch}"
        sides = [row["side"] for row in done]
        memory_axis.plot(sides, [row["peak_rss_gib"] for row in done], "o-", label=label)
        time_axis.plot(sides, [row["seconds_per_epoch"] for row in done], "o-", label=label)
    memory_axis.set(xlabel="volume side (voxels)", ylabel="process peak memory (GiB)", title="memory")
    time_axis.set(xlabel="volume side (voxels)", ylabel="seconds per epoch, finest scale", title="time")
    for axis in (memory_axis, time_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    main()
