"""Rebuild ``epi_frame_4mm.nii.gz``, the third real volume of issue 22's seed sweep, from nibabel's wheel.

    pip download nibabel==5.4.2 --no-deps -d /tmp/wheels
    python benchmarks/data/make_epi_volume.py --wheels /tmp/wheels

The first frame of ``nibabel/tests/data/example4d.nii.gz`` (a real echo-planar BOLD MRI of a brain, 128 x 96 x 24
voxels of 2 x 2 x 2.2 mm, brain-extracted, 0 outside the brain), cropped in-plane to the brain's bounding box plus
about one voxel (x 28 - 97, y 0 - 89) and block-averaged 2 x 2 in-plane: 35 x 45 x 24 voxels of 4 x 4 x 2.2 mm,
int16. The affine follows the crop and the blocks (a block's centre is the mean of its voxels' centres), so the
scanner coordinates of the brain are unchanged. Nothing is installed: the file is read straight out of the wheel.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from make_downstream_data import block_mean, wheel_member  # this folder's other wheel-reading script

HERE = Path(__file__).resolve().parent
MEMBER = "nibabel/tests/data/example4d.nii.gz"
CROP = (slice(28, 98), slice(0, 90))  # in-plane bounding box of the brain (x 29 - 97, y 0 - 89) plus the block edge
BLOCK = 2


def main() -> None:
    import nibabel as nib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, required=True, help="folder holding the nibabel wheel")
    arguments = parser.parse_args()
    image = nib.Nifti1Image.from_bytes(gzip.decompress(wheel_member(arguments.wheels, "nibabel", MEMBER)))
    frame = np.asanyarray(image.dataobj)[..., 0]
    blocks = block_mean(frame[CROP[0], CROP[1], :], (BLOCK, BLOCK, 1))
    # Voxel (i, j, k) of the new grid is the block whose corner is (x0 + 2i, y0 + 2j, k) of the old one; its centre
    # lies half an old voxel further along each blocked axis.
    to_old = np.array([[BLOCK, 0, 0, CROP[0].start + (BLOCK - 1) / 2],
                       [0, BLOCK, 0, CROP[1].start + (BLOCK - 1) / 2],
                       [0, 0, 1, 0],
                       [0, 0, 0, 1]], dtype=np.float64)
    affine = image.affine @ to_old
    out = nib.Nifti1Image(np.rint(blocks).astype(np.int16), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    target = HERE / "epi_frame_4mm.nii.gz"
    nib.save(out, target)
    print(f"wrote {target}: {blocks.shape}, spacing {nib.affines.voxel_sizes(affine).round(2)}, "
          f"values {int(blocks.min())} - {int(blocks.max())}")


if __name__ == "__main__":
    main()
