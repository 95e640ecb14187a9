"""Wall time of a 3-image cohort (`consingan train-many`) with 1 and with 2 Ray tasks at a time, one thread each.

    python benchmarks/bench_cohort.py [--epochs 60] [--work out/cohort_bench]

The three images are real 2D images of the project, each cut to 64 x 64 (data/ihc.png, benchmarks/data/cell.png,
benchmarks/data/ct_slice.npy); every run trains 3 scales of --epochs epochs with 16 channels on one thread. Each
setting starts from empty run folders (and its own local Ray, started and stopped by train-many). On a machine with
two free cores the two-at-a-time cohort should take a little over half the time of the one-at-a-time cohort.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"ihc": (ROOT / "data" / "ihc.png"), "cell": (ROOT / "benchmarks" / "data" / "cell.png"),
           "ct": (ROOT / "benchmarks" / "data" / "ct_slice.npy")}


def write_images(folder: Path) -> None:
    from consingan.io import read_volume
    from consingan.nn.resample import resize

    folder.mkdir(parents=True, exist_ok=True)
    for name, path in SOURCES.items():
        array = read_volume(path, 2).array
        small = resize(torch.from_numpy(array)[None], [64, 64])[0].numpy()
        np.save(folder / f"{name}.npy", small.astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "cohort_bench")
    args = parser.parse_args()
    from consingan.cohort import find_images, train_many
    from consingan.config import TrainConfig

    images = args.work / "images"
    write_images(images)
    rows = []
    for parallel in (1, 2):
        out = args.work / f"runs_{parallel}"
        shutil.rmtree(out, ignore_errors=True)
        config = TrainConfig(dimension=2, epochs=args.epochs, num_scales=3, num_feature_channels=16, min_size=20,
                             preview_every=0, seed=0, device="cpu", out_dir=str(out))
        started = time.perf_counter()
        runs = train_many(config, find_images(str(images)), cpus_per_task=1, max_parallel=parallel)
        wall = time.perf_counter() - started
        assert all(r.state == "done" for r in runs), [(r.name, r.state, r.error) for r in runs]
        rows.append((parallel, wall, sum(r.seconds for r in runs)))
    print(f"{'tasks at a time':>15} {'cohort wall (s)':>16} {'sum of run times (s)':>21} {'speed-up':>9}")
    for parallel, wall, total in rows:
        print(f"{parallel:15d} {wall:16.1f} {total:21.1f} {rows[0][1] / wall:9.2f}")
    print(f"\n3 images of 64 x 64, 3 scales x {args.epochs} epochs, 16 channels, one thread per task; "
          f"{torch.get_num_threads()} threads available here.")


if __name__ == "__main__":
    main()
