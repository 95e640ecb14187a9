"""A real 1 mm brain MRI on a 256^3 grid of 1 mm voxels (FreeSurfer's "conformed" field of view) for issue 23's
full-size run:

    pip download nilearn --no-deps -d /tmp/nilearn && unzip -o -q /tmp/nilearn/nilearn-*.whl \
        'nilearn/datasets/data/mni_icbm152_t1_*' -d /tmp/nilearn
    python benchmarks/conform_volume.py \
        /tmp/nilearn/nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz /tmp/t1_256.nii.gz

The ICBM 2009a T1 template (197 x 233 x 189 at 1 mm, the size of the scan in issue 23) is centred in a zero
background of ``--side`` voxels a side; no resampling, so every voxel is a voxel of the source. The affine is shifted
so that every voxel keeps its world position: the padded volume overlays the source exactly in a viewer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np


def conform(source: nib.Nifti1Image, side: int) -> nib.Nifti1Image:
    """``source`` centred in a ``side``^3 grid of its own voxels (cropped where longer), world positions kept."""
    array = np.asanyarray(source.dataobj)
    shape = array.shape[:3]
    out = np.zeros((side,) * 3 + array.shape[3:], dtype=array.dtype)
    starts = [(side - n) // 2 for n in shape]  # where the source's first voxel lands (negative: cropped)
    dst = tuple(slice(max(0, s), max(0, s) + min(n, side)) for s, n in zip(starts, shape))
    src = tuple(slice(max(0, -s), max(0, -s) + min(n, side)) for s, n in zip(starts, shape))
    out[dst] = array[src]
    affine = source.affine.copy()
    affine[:3, 3] = source.affine[:3, :3] @ (-np.asarray(starts, dtype=float)) + source.affine[:3, 3]
    header = source.header.copy()
    header.set_data_shape(out.shape)
    return nib.Nifti1Image(out, affine, header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--side", type=int, default=256)
    args = parser.parse_args()
    image = conform(nib.load(str(args.source)), args.side)
    nib.save(image, str(args.out))
    print(f"{args.out}: {image.shape} voxels of {image.header.get_zooms()[:3]} mm")


if __name__ == "__main__":
    main()
