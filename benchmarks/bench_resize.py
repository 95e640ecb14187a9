"""Cubic upsampling between generator stages: PyTorch's bicubic kernel against one matrix product per axis.

    python benchmarks/bench_resize.py                 # one thread, as the time-to-quality runs
    python benchmarks/bench_resize.py --threads 2

For each resize the generator makes in a 2D run (2 x 32 feature channels, the quality study's cell pyramid, and the
default 250 px pyramid, one larger), times forward + backward of ``F.interpolate(mode='bicubic', align_corners=False)`` and of
``consingan.nn.interpolation.cubic_resize`` (median of ``--repeats`` after a warm-up), and the largest difference
between their outputs. Prints one table.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_memory_format import median_seconds  # this folder is on the path when run as a script
from consingan.nn.interpolation import cubic_resize

# (input, output) sizes: the cell pyramid of the time-to-quality runs (31x25 .. 64x53; with padding 0 the next
# stage's noise is 6 larger per side), the two largest steps of the default 250 px pyramid, and one beyond it.
CASES = [((31, 25), (43, 37)), ((37, 31), (56, 48)), ((50, 42), (70, 59)), ((60, 89), (115, 171)),
         ((115, 171), (167, 250)), ((167, 250), (250, 330))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 2 x {args.channels} channels, forward + backward")
    print(f"{'input':>10} {'output':>10} {'bicubic ms':>11} {'matrix ms':>10} {'speed-up':>9} {'max |diff|':>11}")
    for size_in, size_out in CASES:
        x = torch.randn(2, args.channels, *size_in, requires_grad=True)
        weights = torch.randn(2, args.channels, *size_out)

        def pytorch() -> None:
            (F.interpolate(x, size=size_out, mode="bicubic", align_corners=False) * weights).sum().backward()

        def matrix() -> None:
            (cubic_resize(x, size_out) * weights).sum().backward()

        with torch.no_grad():
            difference = (F.interpolate(x, size=size_out, mode="bicubic", align_corners=False)
                          - cubic_resize(x, size_out)).abs().max().item()
        slow, fast = median_seconds(pytorch, args.repeats), median_seconds(matrix, args.repeats)
        print(f"{'x'.join(map(str, size_in)):>10} {'x'.join(map(str, size_out)):>10} {slow * 1e3:11.2f} "
              f"{fast * 1e3:10.2f} {slow / fast:8.2f}x {difference:11.1e}")


if __name__ == "__main__":
    main()
