"""False colour at edges (issue 26): samples' colour against the image's, with the colour-neutral start and without.

    OMP_NUM_THREADS=1 python benchmarks/bench_false_colour.py                    # both images, both starts
    OMP_NUM_THREADS=1 python benchmarks/bench_false_colour.py --images grey-rgb --epochs 100

Two real images: ``grey-rgb``, the grey cell image of the quality study (``benchmarks/data/cell.png``) shrunk to
80 x 96 and written as RGB with three equal channels (its chroma is exactly 0), and ``ihc``, the RGB
immunohistochemistry image (``data/ihc.png``) shrunk to 96 x 96. Each is trained with the 2D microscopy preset at
a small budget (4 scales, 64 px, 32 feature channels, ``--epochs`` per scale), once with the engine as it is (the
generator's image channels start equal, the critic starts colour-blind: ``models.same_output_channels_`` and
``same_input_channels_``) and once with those two calls turned off (every channel drawn independently, as before
issue 26). The same seed draws the same random numbers in both: the two calls only copy values already drawn.

Printed per run, in the image's 8-bit units, for the reconstruction and for ``--num`` samples, against the input:
chroma (the standard deviation of a pixel's channels) averaged over all pixels and over edge pixels (the 10 % of
largest gradient of the channels' mean, each image its own), and false colour: the distance from each pixel's
colour (rounded to 8 bits) to the nearest colour that occurs in the input (0 for colours the image has; a rim of a
colour the image lacks shows here even on a colour image), its mean over all pixels and over edge pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Iterator
from unittest import mock

import numpy as np
import torch
from PIL import Image

from consingan.config import TrainConfig, load_config_file
from consingan.singan import models
from consingan.singan.sampler import TrainedPyramid
from consingan.singan.trainer import train

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "presets" / "microscopy-2d.yaml"
EDGE_SHARE = 0.1  # the share of pixels with the largest gradient that count as edges


def grey_as_rgb(folder: Path) -> Path:
    """The grey cell image at 80 x 96, its one channel written three times."""
    grey = np.asarray(Image.open(ROOT / "benchmarks" / "data" / "cell.png").convert("L").resize((80, 96),
                                                                                             Image.LANCZOS))
    path = folder / "grey_rgb.png"
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(path)
    return path


def ihc(folder: Path) -> Path:
    path = folder / "ihc96.png"
    Image.open(ROOT / "data" / "ihc.png").convert("RGB").resize((96, 96), Image.LANCZOS).save(path)
    return path


IMAGES = {"grey-rgb": grey_as_rgb, "ihc": ihc}


def edge_mask(image: np.ndarray) -> np.ndarray:
    """[C, H, W] -> the pixels whose gradient of the channels' mean is in the top ``EDGE_SHARE``."""
    gy, gx = np.gradient(image.mean(axis=0))
    magnitude = np.hypot(gx, gy)
    return magnitude >= np.quantile(magnitude, 1.0 - EDGE_SHARE)


def chroma(image: np.ndarray) -> np.ndarray:
    """[C, H, W] -> per pixel, the standard deviation of its channels."""
    return image.std(axis=0)


def false_colour(image: np.ndarray, palette: torch.Tensor) -> np.ndarray:
    """[C, H, W] -> per pixel, the distance of its colour, rounded to the 8-bit levels a PNG sample holds (float
    levels between the palette's would read as a false colour of up to 0.87), to the nearest colour of ``palette``
    [K, C]."""
    rounded = np.clip(np.round(image), 0, 255)
    colours = torch.from_numpy(rounded.reshape(image.shape[0], -1).T.astype(np.float64))
    nearest = torch.cat([torch.cdist(part, palette).min(dim=1).values for part in colours.split(1024)])
    return nearest.numpy().reshape(image.shape[1:])


def measures(images: list[np.ndarray], palette: torch.Tensor) -> dict[str, float]:
    """Chroma and false colour of ``images`` (each [C, H, W]), over all pixels and over edges, averaged."""
    rows = []
    for image in images:
        edges, c, f = edge_mask(image), chroma(image), false_colour(image, palette)
        rows.append((c.mean(), c[edges].mean(), f.mean(), f[edges].mean()))
    return dict(zip(("chroma", "edge chroma", "false colour", "edge false colour"), np.mean(rows, axis=0)))


@contextlib.contextmanager
def independent_start(enabled: bool) -> Iterator[None]:
    """With ``enabled``, every channel of the generator's last convolution and of the critic's first one keeps its
    own random draw (the engine before issue 26's fix)."""
    if not enabled:
        yield
        return
    with mock.patch.object(models, "same_output_channels_", lambda conv: None), \
            mock.patch.object(models, "same_input_channels_", lambda conv: None):
        yield


def run_case(image: Path, independent: bool, args: argparse.Namespace, out_dir: Path) -> dict[str, dict]:
    values = {**load_config_file(PRESET), "image": str(image), "dimension": 2, "epochs": args.epochs,
              "num_scales": 4, "max_size": 64, "num_feature_channels": 32, "seed": args.seed, "preview_every": 0,
              "checkpoint_every": 0, "device": "cpu", "out_dir": str(out_dir),
              "run_name": f"{image.stem}-{'independent' if independent else 'neutral'}"}
    with independent_start(independent):
        result = train(TrainConfig.from_dict(values))
    pyramid = TrainedPyramid.load(result.run_dir)
    source = np.moveaxis(np.asarray(Image.open(image).convert("RGB"), dtype=np.float64), -1, 0)
    palette = torch.from_numpy(np.unique(source.reshape(3, -1).T, axis=0))
    return {
        "input": measures([source], palette),
        "reconstruction": measures(pyramid.to_source_units(pyramid.reconstruct()), palette),
        "samples": measures(pyramid.to_source_units(pyramid.sample(args.num, seed=0)), palette),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=",".join(IMAGES), help=f"comma-separated, of {', '.join(IMAGES)}")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'image':>9} {'start':>12} {'what':>15} {'chroma':>7} {'edge':>7} {'false colour':>13} {'edge':>7}")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in args.images.split(","):
            image = IMAGES[name](work)
            for independent in (True, False):
                table = run_case(image, independent, args, work / "runs")
                for what, row in table.items():
                    print(f"{name:>9} {'independent' if independent else 'neutral':>12} {what:>15} "
                          f"{row['chroma']:7.3f} {row['edge chroma']:7.3f} {row['false colour']:13.3f} "
                          f"{row['edge false colour']:7.3f}", flush=True)


if __name__ == "__main__":
    main()
