"""Synthetic training sets in the layouts segmentation tools read: an nnU-Net v2 raw dataset, MONAI-style items.

nnU-Net v2 (``write_nnunet_dataset``): a folder with ``imagesTr/<case>_0000<ending>`` (one file per channel, or one
RGB(A) file for a PNG), ``labelsTr/<case><ending>`` and ``dataset.json``. nnU-Net needs the label values 0..K-1 with
0 the background, so the run's classes c_1 < ... < c_K are written as 0..K-1 (c_1, the smallest, is the
background) and ``dataset.json`` records which original value each one stands for under ``consingan_label_values``.
Every file keeps the geometry the native sample files have. 3D samples and 2D samples of non-picture sources are
written as NIfTI, read by nnU-Net's SimpleITKIO; a 2D one as a genuine 2D NIfTI, so that nnU-Net gives it its
out-of-plane spacing of 999 and plans it as 2D. 2D samples of PNG or JPEG sources are written as PNG, read by
NaturalImage2DIO (which has no geometry).

MONAI (``monai_item``): a dictionary ``{"image": ..., "label": ...}`` laid out as MONAI's ``LoadImaged`` gives the
same sample file: channel first, the spatial axes x first (this package holds them slowest first) and a RAS affine.
With MONAI installed the values are ``MetaTensor``s carrying the affine; without it plain tensors, with the affine
under ``"affine"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from consingan.errors import ConsinganError
from consingan.io.labels import LabelEncoding
from consingan.io.volume import Volume, _ras_to_lps_reversed, cast_to, output_suffix, write_volume
from consingan.outputs import OutputFolder, Progress, check_encodable

if TYPE_CHECKING:  # the sampler imports this package; only its type is needed here
    from consingan.singan.sampler import TrainedPyramid

SAMPLE_FORMATS = ("native", "nnunet")
NNUNET_IMAGES, NNUNET_LABELS, NNUNET_JSON = "imagesTr", "labelsTr", "dataset.json"
CASE_PREFIX = "consingan"
RESERVED_LABEL_NAMES = ("background", "ignore")  # nnU-Net gives these two names a meaning of their own
RGB_NAMES = "RGBA"


def parse_format(value: str) -> str:
    """``--format``: 'native' (the source's file type, ``sample_0000`` ...) or 'nnunet' (an nnU-Net v2 dataset)."""
    text = str(value).strip().lower()
    if text not in SAMPLE_FORMATS:
        raise ConsinganError(f"--format must be one of {', '.join(SAMPLE_FORMATS)}, got {value!r}")
    return text


def parse_names(text: str | None, option: str) -> list[str] | None:
    """A comma-separated list of names (``--channel-names``, ``--label-names``); None when not given."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise ConsinganError(f"{option} must be comma-separated, non-empty names, got {text!r}")
    if len(set(names)) != len(names):
        raise ConsinganError(f"{option} names must differ, got {text!r}")
    return names


# --- nnU-Net v2 --------------------------------------------------------------------------------------------------


def nnunet_file_ending(source_suffix: str, spatial_dims: int) -> str:
    """PNG for 2D samples of a PNG or JPEG source (kept lossless and in its integer type), else NIfTI."""
    return ".png" if spatial_dims == 2 and output_suffix(source_suffix) == ".png" else ".nii.gz"


def channel_files(channels: int, file_ending: str) -> list[list[int]]:
    """Which image channels go into each case file ``_0000``, ``_0001`` ...: one file per channel, except an RGB or
    RGBA PNG, which NaturalImage2DIO reads as its 3 or 4 channels from one file."""
    if file_ending == ".png" and channels in (3, 4):
        return [list(range(channels))]
    return [[channel] for channel in range(channels)]


def nnunet_channel_names(channels: int, file_ending: str, names: Sequence[str] | None = None) -> dict[str, str]:
    """dataset.json's ``channel_names``. nnU-Net chooses each channel's normalisation by its name ('CT' gets its CT
    scheme, 'noNorm' none, any other name z-scoring), so the user may give them; by default 'image' for one channel,
    R, G, B(, A) for an RGB(A) PNG and channel_0 ... otherwise."""
    if names is not None:
        if len(names) != channels:
            raise ConsinganError(f"--channel-names gives {len(names)} names but the run's images have {channels} "
                                 f"channel(s)")
        return {str(i): name for i, name in enumerate(names)}
    if channels == 1:
        return {"0": "image"}
    if channel_files(channels, file_ending) == [list(range(channels))]:
        return {str(i): RGB_NAMES[i] for i in range(channels)}
    return {str(i): f"channel_{i}" for i in range(channels)}


def nnunet_labels(encoding: LabelEncoding, names: Sequence[str] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """(dataset.json's ``labels``, ``consingan_label_values``): class k of the run (its k-th smallest value) becomes
    nnU-Net label k; the first is 'background' and the others are named by ``names`` (the foreground classes in
    increasing value) or 'label_<original value>'."""
    foreground = encoding.classes[1:]
    if names is None:
        names = [f"label_{value}" for value in foreground]
    elif len(names) != len(foreground):
        raise ConsinganError(f"--label-names gives {len(names)} names but the run has {len(foreground)} foreground "
                             f"classes ({', '.join(map(str, foreground))}; {encoding.classes[0]} is the background)")
    reserved = [name for name in names if name.lower() in RESERVED_LABEL_NAMES]
    if reserved:
        raise ConsinganError(f"--label-names cannot use {reserved[0]!r}: nnU-Net reserves 'background' for label 0 "
                             f"and 'ignore' for unlabelled voxels")
    labels = {"background": 0, **{name: k for k, name in enumerate(names, 1)}}
    return labels, {str(k): value for k, value in enumerate(encoding.classes)}


def nnunet_case(index: int) -> str:
    return f"{CASE_PREFIX}_{index:04d}"


def check_nnunet_target(out_dir: Path) -> None:
    """Refuse an ``--out`` that is a file or already holds a dataset (nothing is overwritten or mixed in)."""
    out_dir = check_encodable(out_dir, "output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConsinganError(f"--out {out_dir} is a file; choose a new folder")
    taken = [name for name in (NNUNET_JSON, NNUNET_IMAGES, NNUNET_LABELS) if (out_dir / name).exists()]
    if taken:
        raise ConsinganError(f"{out_dir} already holds a dataset ({taken[0]}); choose another --out")


def write_nnunet_dataset(
    pyramid: "TrainedPyramid",
    out_dir: Path | str,
    num: int,
    seed: int = 0,
    source_dtype: bool = False,
    batch_size: int = 8,
    channel_names: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> list[Path]:
    """Write ``num`` samples of a run trained with labels as an nnU-Net v2 raw dataset (see the module docstring);
    case ``consingan_0000`` is sample 0 of ``consingan sample --seed SEED``. ``options`` are those of
    ``TrainedPyramid.sample``. As ``write_samples``: batch by batch, nothing overwritten, nothing partial left
    behind. Returns the files written, dataset.json last."""
    if pyramid.labels is None:
        raise ConsinganError(f"--format nnunet needs a run trained with --label (image and label map pairs); "
                             f"{pyramid.run.path} has no labels")
    pyramid.check_options(num, batch_size, options.get("scale_factors"), options.get("shape"),
                          options.get("start_scale", 0))
    out_dir = Path(out_dir)
    check_nnunet_target(out_dir)
    encoding = pyramid.labels
    ending = nnunet_file_ending(pyramid.run.info.output_suffix, pyramid.spatial_dims)
    groups = channel_files(encoding.image_channels, ending)
    dataset = {
        "name": out_dir.resolve().name,
        "description": f"{num} synthetic cases drawn by consingan from {pyramid.run.path} with seed {seed}",
        "channel_names": nnunet_channel_names(encoding.image_channels, ending, channel_names),
        "file_ending": ending,
        "numTraining": num,
    }
    dataset["labels"], dataset["consingan_label_values"] = nnunet_labels(encoding, label_names)
    images_dir, labels_dir = out_dir / NNUNET_IMAGES, out_dir / NNUNET_LABELS
    written: list[Path] = []
    try:
        with OutputFolder(out_dir) as folder:
            images_dir.mkdir()
            labels_dir.mkdir()
            for first in range(0, num, batch_size):
                count = min(batch_size, num - first)
                images = pyramid.sample(count, seed=seed, batch_size=batch_size, first_index=first, **options)
                for index, volume in enumerate(pyramid.to_volumes(images), first):
                    written.extend(_write_case(folder, images_dir, labels_dir, nnunet_case(index), volume, ending,
                                               groups, source_dtype))
                if first == 0:  # the first batch's files tell what the whole dataset needs on the disk
                    folder.check_room(count, num, "cases")
                if progress is not None:
                    progress(first + count, num)
            folder.add(out_dir / NNUNET_JSON)
            (out_dir / NNUNET_JSON).write_text(json.dumps(dataset, indent=2) + "\n")
    except BaseException:
        # OutputFolder removed the files; the two folders made in an --out that existed before go too, so that a
        # rerun is not refused as a dataset.
        for folder_path in (images_dir, labels_dir):
            if folder_path.is_dir() and not any(folder_path.iterdir()):
                folder_path.rmdir()
        raise
    return [*written, out_dir / NNUNET_JSON]


def _write_case(folder: OutputFolder, images_dir: Path, labels_dir: Path, case: str, volume: Volume, ending: str,
                groups: list[list[int]], source_dtype: bool) -> list[Path]:
    """One case: its image file(s) and its label map as nnU-Net labels 0..K-1, all on the sample's grid."""
    image, label = volume.labels.split(volume.array)
    nnunet_label = np.searchsorted(np.asarray(volume.labels.classes), label).astype(np.float32)
    header = _single_channel_header(volume.header)
    paths = [images_dir / f"{case}_{k:04d}{ending}" for k in range(len(groups))] + [labels_dir / f"{case}{ending}"]
    folder.add(*paths)
    parts = [Volume(image[group], volume.affine, ending, volume.source_dtype, header) for group in groups]
    parts.append(Volume(nnunet_label, volume.affine, ending, np.dtype(np.uint8), header))
    for path, part, exact in zip(paths, parts, [source_dtype] * len(groups) + [True]):
        if ending == ".nii.gz" and part.spatial_dims == 2:
            _write_nifti_2d(path, part, exact)
        else:
            write_volume(path, part, source_dtype=exact)
    return paths


def _single_channel_header(header: Any) -> Any:
    """A copy of a NIfTI source's header for one-channel files: a multi-channel source's 'vector' intent dropped."""
    if header is None:
        return None
    header = header.copy()
    header.set_intent("none")
    return header


def _write_nifti_2d(path: Path, volume: Volume, exact: bool) -> None:
    """A genuine 2D NIfTI (two axes, not a one-slice volume) with the 2D geometry: the native writer keeps a 2D
    NIfTI source's slice as a third axis of one voxel, which nnU-Net would plan as a 3D image."""
    import SimpleITK as sitk

    array = volume.array[0]
    array = cast_to(array, volume.source_dtype) if exact else array.astype(np.float32)
    image = sitk.GetImageFromArray(array)
    linear = volume.affine[:-1, :-1][:, ::-1]  # this package's (row, column) columns -> ITK's (x, y)
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (linear / spacing[None, :]).ravel()])
    image.SetOrigin([float(v) for v in volume.affine[:-1, -1]])
    sitk.WriteImage(image, str(path), useCompression=True)


# --- MONAI ---------------------------------------------------------------------------------------------------------


def monai_layout(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[C, *spatial] with its affine in this package's convention (spatial axes slowest first, LPS) -> MONAI's
    (spatial axes x first, RAS), as MONAI's readers return the file."""
    spatial_dims = array.ndim - 1
    return (np.ascontiguousarray(np.transpose(array, (0, *range(spatial_dims, 0, -1)))),
            _ras_to_lps_reversed(np.asarray(affine, dtype=np.float64)))


def monai_item(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, name: str) -> dict[str, Any]:
    """A MONAI dictionary item: ``image`` (float32 [C, *spatial]) and ``label`` (int64 [1, *spatial], when given)
    in MONAI's layout (``monai_layout``). With MONAI installed they are ``MetaTensor``s whose ``affine`` is the RAS
    affine and whose ``filename_or_obj`` is ``name``; without it, plain tensors and ``"affine"``."""
    arrays = {"image": image, **({"label": label} if label is not None else {})}
    laid_out = {key: monai_layout(value, affine) for key, value in arrays.items()}
    ras = next(iter(laid_out.values()))[1]
    try:
        from monai.data import MetaTensor
    except ImportError:
        item: dict[str, Any] = {key: torch.from_numpy(array) for key, (array, _) in laid_out.items()}
        item["affine"] = torch.from_numpy(ras)
        return item
    meta = {"original_affine": ras.copy(), "space": "RAS", "original_channel_dim": 0, "filename_or_obj": name}
    return {key: MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(ras.copy()),
                            meta={**meta, "spatial_shape": np.asarray(array.shape[1:])})
            for key, (array, _) in laid_out.items()}
