"""Peak memory of ``consingan evaluate`` on 3D runs of growing size (the measures gather patches at random positions
instead of building every patch, and compare them in chunks).

    python benchmarks/bench_evaluate_memory.py [--sizes 64 128] [--num 16]

For each size S it writes an S^3 NIfTI volume (smooth blobs, int16), trains a one-scale run on it for one epoch
(8 channels: the weights do not matter, the shapes do), then evaluates that run with ``--num`` samples in a fresh
process and prints that process's peak resident memory next to a process that only imports the engine. Everything
runs in subprocesses, so one measurement does not inherit another's memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import sys, numpy as np, nibabel as nib
from consingan.config import TrainConfig
from consingan.singan.trainer import train
size, folder = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
grid = np.stack(np.meshgrid(*[np.linspace(0, 1, size, dtype=np.float32)] * 3, indexing="ij"))
volume = np.zeros((size,) * 3, np.float32)
for _ in range(8):
    centre, width = rng.random((3, 1, 1, 1), dtype=np.float32), rng.uniform(0.05, 0.3)
    volume += np.exp(-((grid - centre) ** 2).sum(0) / (2 * width**2))
path = f"{folder}/vol{size}.nii.gz"
nib.save(nib.Nifti1Image((volume / volume.max() * 1000).astype(np.int16), np.eye(4)), path)
config = TrainConfig(image=path, dimension=3, epochs=1, num_scales=1, num_feature_channels=8, num_layers=2,
                     min_size=size, max_size=size, preview_every=0, checkpoint_every=0, seed=0, device="cpu",
                     out_dir=folder, run_name=f"run{size}")
train(config)
"""

MEASURE = """
import json, resource, sys, time
import consingan.metrics.evaluate as evaluation
started = time.perf_counter()
result = None
if sys.argv[1] != "-":
    result = evaluation.evaluate(sys.argv[1], evaluation.EvaluateConfig(num=int(sys.argv[2]), device="cpu"))
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - started,
                  "swd": None if result is None else result["swd"]["mean"],
                  "verdict": None if result is None else result["verdict"]["label"]}))
"""


def child(code: str, *args: str) -> str:
    completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if completed.returncode:
        raise SystemExit(completed.stderr)
    return completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--num", type=int, default=16, help="samples drawn by the evaluation")
    args = parser.parse_args()
    baseline = json.loads(child(MEASURE, "-", "0"))
    rows = [("imports only", "-", f"{baseline['peak_mb']:.0f}", "-", "-", "-")]
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            child(TRAIN, str(size), folder)
            measured = json.loads(child(MEASURE, f"{folder}/run{size}", str(args.num)))
            rows.append((f"{size}^3", f"{size**3:,}", f"{measured['peak_mb']:.0f}", f"{measured['seconds']:.1f}",
                         f"{measured['swd']:.3f}", measured["verdict"]))
    header = ("volume", "voxels", "peak RSS (MB)", "seconds", "SWD", "verdict")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    print(f"\n{args.num} samples per evaluation, one process each; peak RSS includes the engine's imports.")


if __name__ == "__main__":
    main()
