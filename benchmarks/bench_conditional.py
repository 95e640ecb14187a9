"""The class-conditional GAN on a small real labelled set made from the project's own real images.

    python benchmarks/bench_conditional.py [--epochs 40] [--work out/conditional_demo]

The set (written to WORK/patches, one folder per class, 8-bit grey PNG patches of 32 x 32) follows one rule: each
source image is scaled to grey levels 0-255 by its own minimum and maximum (RGB averaged to grey first), shrunk by
an integer factor, and cut into 32-pixel tiles on a regular grid; every tile is one image of its source's class.

| class | source (see data/README.md, benchmarks/data/README.md) | shrink | tile stride |
|---|---|---|---|
| ihc | data/ihc.png, immunohistochemistry, 512 x 512 | 4 | 16 |
| cell | benchmarks/data/cell.png, phase microscopy, 660 x 550 | 4 | 16 |
| ct | benchmarks/data/ct_slice.npy, CT slice, 128 x 128 | 2 | 8 |
| mri | benchmarks/data/aniso_vox.nii.gz, T1 MRI, the 24 axial 58 x 58 slices | 1 | 26 |

It then trains `consingan conditional train` on it (2D, size 32, hinge loss, projection discriminator, the given
epochs, one process with the machine's threads), evaluates the run with `consingan evaluate` (32 samples per class)
and prints the class consistency (nearest-class-centroid on random features: the share of samples given their own
class, against chance and against the real tiles' own leave-one-out score) and the per-class measures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {  # class: (file, spatial dims, shrink factor, tile stride)
    "ihc": (ROOT / "data" / "ihc.png", 2, 4, 16),
    "cell": (ROOT / "benchmarks" / "data" / "cell.png", 2, 4, 16),
    "ct": (ROOT / "benchmarks" / "data" / "ct_slice.npy", 2, 2, 8),
    "mri": (ROOT / "benchmarks" / "data" / "aniso_vox.nii.gz", 3, 1, 26),
}
TILE = 32


def grey_planes(path: Path, dims: int) -> list[np.ndarray]:
    """The source as 2D grey planes in [0, 255] (its own min-max): the image itself, or a volume's axial slices."""
    from consingan.io import read_volume

    array = read_volume(path, dims).array.mean(axis=0)  # RGB -> grey; one channel stays as it is
    array = (array - array.min()) / (array.max() - array.min()) * 255
    return [array] if dims == 2 else list(array)


def make_set(folder: Path) -> dict[str, int]:
    """Write the tiles of every class; returns the tile count per class."""
    import SimpleITK as sitk

    from consingan.nn.resample import resize

    counts = {}
    for name, (path, dims, shrink, stride) in SOURCES.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        count = 0
        for plane in grey_planes(path, dims):
            shape = [s // shrink for s in plane.shape]
            small = resize(torch.from_numpy(plane.astype(np.float32))[None, None], shape)[0, 0].numpy()
            for top in range(0, shape[0] - TILE + 1, stride):
                for left in range(0, shape[1] - TILE + 1, stride):
                    tile = np.clip(np.round(small[top:top + TILE, left:left + TILE]), 0, 255).astype(np.uint8)
                    sitk.WriteImage(sitk.GetImageFromArray(tile), str(folder / name / f"{name}_{count:04d}.png"))
                    count += 1
        counts[name] = count
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "conditional_demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from consingan.conditional.trainer import train_conditional
    from consingan.config import ConditionalConfig
    from consingan.metrics.evaluate import EvaluateConfig, evaluate, write_report

    patches = args.work / "patches"
    counts = make_set(patches) if not patches.exists() else \
        {p.name: len(list(p.iterdir())) for p in sorted(patches.iterdir())}
    print("labelled set:", ", ".join(f"{k} {v}" for k, v in counts.items()), "tiles of 32 x 32")
    config = ConditionalConfig(data=str(patches), dimension=2, size=32, epochs=args.epochs, batch_size=16,
                               num_feature_channels=32, max_channels=128, attention=16, flip_axes="left-right,up-down", rotations=True,
                               preview_every=10, seed=args.seed, device="cpu", out_dir=str(args.work / "runs"))
    started = time.perf_counter()
    result = train_conditional(config, lambda epoch, losses: print(
        f"epoch {epoch}: d {losses['d']:.3f} g {losses['g']:.3f} ({losses['seconds']:.1f} s)", flush=True))
    seconds = time.perf_counter() - started
    measured = evaluate(result.run_dir, EvaluateConfig(num=32, seed=0, device="cpu"))
    report = dict(measured)
    write_report(report, result.run_dir / "evaluation_001")
    consistency = measured["class_consistency"]
    print(f"\nrun {result.run_dir}: {args.epochs} epochs in {seconds / 60:.1f} min")
    print(f"class consistency: {consistency['accuracy']:.1%} of 32 x {len(counts)} samples given their own class "
          f"(chance {consistency['chance']:.1%}; the real tiles, leave-one-out: "
          f"{consistency['real_accuracy_leave_one_out']:.1%})")
    print(f"{'class':6} {'tiles':>5} {'Frechet':>8} {'SWD':>7} {'divers.':>7}")
    for name, values in measured["per_class"].items():
        print(f"{name:6} {values['real_images']:5d} {values['random_feature_frechet']:8.3f} "
              f"{values['swd']['mean']:7.3f} {values['diversity']:7.3f}")
    print(f"all    {sum(counts.values()):5d} {measured['random_feature_frechet']:8.3f} {measured['swd']['mean']:7.3f} "
          f"{measured['diversity']:7.3f}")


if __name__ == "__main__":
    main()
