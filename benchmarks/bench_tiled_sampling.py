"""Time and peak memory of drawing one sample in tiles (``regions.generate_tiled``) against in one piece.

    OMP_NUM_THREADS=1 python benchmarks/bench_tiled_sampling.py [--sizes 48 80] [--channels 32] [--stages 3]
        [--tile 40] [--dims 3]

For each size S, a generator of ``--stages`` stages (3 conv blocks and CBAM each, weights drawn so that every stage's
signal is O(1), as a trained one's is) draws one sample from the same noise field at the pyramid of ConSinGAN's rule
from S/2 to S a side: in one piece, in tiles with the coarse stages kept whole (the default: half the free memory for
them), and in tiles with nothing kept (every tile recomputes every stage). Each in a fresh process,
so peak RSS (``ru_maxrss``, imports and weights included) is that draw's own; the last column is the largest
difference between the tiled and the one-piece sample.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRAW = """
import json, math, resource, sys, time, torch
from consingan.singan import regions
from consingan.singan.models import GrowingGenerator
from consingan.singan.pyramid import pyramid_shapes
dims, size, channels, stages, tile = (int(a) for a in sys.argv[1:6])
mode, out = sys.argv[6], sys.argv[7]
torch.manual_seed(0)
generator = GrowingGenerator(dims, 1, num_feature_channels=channels, num_layers=3, cbam=True)
for _ in range(stages - 1):
    generator.add_stage()
with torch.no_grad():
    for p in generator.parameters():
        p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1)
    generator.noise_amps.copy_(torch.linspace(1.0, 0.5, stages))
generator.eval().requires_grad_(False)
shapes = pyramid_shapes((size,) * dims, stages, size, max(8, size // 2))
field = regions.NoiseField.for_generator(generator, shapes, seed=1, chunk=16 if dims == 3 else 64)
started = time.perf_counter()
with torch.no_grad():
    if mode == "whole":
        sample = generator(field.whole_noise())
    else:
        sample = regions.generate_tiled(generator, field, tile, cache_bytes=0 if mode == "nothing-kept" else None)
seconds = time.perf_counter() - started
torch.save(sample, out)
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shapes": shapes}))
"""


def draw(*args: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", DRAW, *args], capture_output=True, text=True, cwd=ROOT)
    if completed.returncode:
        raise SystemExit(completed.stderr)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 80])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--tile", type=int, default=40)
    parser.add_argument("--dims", type=int, default=3, choices=(2, 3))
    args = parser.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            measured, samples = {}, {}
            for mode in ("whole", "tiled", "nothing-kept"):
                path = str(Path(folder) / f"{mode}.pt")
                measured[mode] = draw(str(args.dims), str(size), str(args.channels), str(args.stages),
                                      str(args.tile), mode, path)
                samples[mode] = torch.load(path)
            difference = max((samples[m] - samples["whole"]).abs().max().item() for m in ("tiled", "nothing-kept"))
            rows.append(("x".join(map(str, measured["whole"]["shapes"][-1])),
                         " ".join("x".join(map(str, s)) for s in measured["whole"]["shapes"][:-1]),
                         *(f"{measured[m]['seconds']:.1f}" for m in ("whole", "tiled", "nothing-kept")),
                         *(f"{measured[m]['peak_mb']:.0f}" for m in ("whole", "tiled", "nothing-kept")),
                         f"{difference:.1e}"))
    header = ("shape", "coarser stages", "whole s", "tiled s", "nothing kept s", "RSS whole MB", "RSS tiled MB",
              "RSS nothing kept MB", "max abs diff")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    print(f"\n{args.channels} channels, {args.stages} stages of 3 conv blocks with CBAM, tiles of {args.tile}; "
          f"torch threads: {torch.get_num_threads()}.")


if __name__ == "__main__":
    main()
