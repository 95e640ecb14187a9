"""Volume: an image array [C, *spatial] with the geometry and format it came from; readers and writers by file type.

One geometry convention for every reader: the spatial axes are in NumPy / ITK order, slowest first ((z, y, x) for a
volume, (row, column) for a picture), and one homogeneous affine maps those array indices to physical coordinates
in ITK's LPS frame (DICOM's patient frame, millimetres for medical data). ITK files (MHA, NRRD, DICOM, PNG, TIFF)
arrive in it directly; NIfTI, stored x-y-z in RAS, is transposed and its affine flipped on reading and turned back on
writing. So an image and its label map, or a paired source and target, may come in different formats (a NIfTI image
with an MHA label) and still compare voxel for voxel. Resizing a volume to another grid is one rule on that affine
(``resized_affine``), shared by every format.
"""

from __future__ import annotations

import base64
import dataclasses
import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from consingan.errors import ConsinganError
from consingan.io.labels import LabelEncoding
from consingan.outputs import OutputError, check_encodable

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_VOLUME_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
PICTURE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
NUMPY_SUFFIXES = (".npy",)
DICOM_SUFFIXES = (".dcm",)
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_VOLUME_SUFFIXES + PICTURE_SUFFIXES + NUMPY_SUFFIXES + DICOM_SUFFIXES
MAX_DECLARED_VOXELS = 2**31  # more than any single scan; a header declaring more is damaged or hostile


def file_suffix(path: Path | str) -> str:
    """The format-defining suffix, lower case ('.nii.gz' counts as one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@dataclass
class Volume:
    """An image with its geometry.

    Attributes:
        array: float32 [C, *spatial].
        affine: (spatial_dims + 1) square matrix mapping array indices to physical coordinates (mm for medical data).
        suffix: the file type it was read from ('.nii.gz', '.png', ...); outputs are written in the same type.
        source_dtype: numpy dtype of the stored intensities, for writing integer formats back.
        header: the NIfTI header (a copy), when the source was NIfTI.
        labels: when the last channels are one-hot label channels (trained with ``--label``), their encoding.
        notes: what reading changed and the user should know (a constant alpha channel dropped, ...).
        plane: for a 2D image read from a one-slice 3D file (a DICOM slice, a one-slice MHA), the 4 x 4 affine of
            that slice as a 3D grid (axis 0 the slice normal, one voxel thick): its position along the normal, its
            thickness and an oblique orientation, which the 2D affine cannot hold. Outputs in a volume format are
            written as one-slice volumes with it.
    """

    array: np.ndarray
    affine: np.ndarray
    suffix: str
    source_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    header: Any = None
    labels: LabelEncoding | None = None
    notes: tuple[str, ...] = ()
    plane: np.ndarray | None = None

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1

    @property
    def channels(self) -> int:
        return self.array.shape[0]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def spacing(self) -> np.ndarray:
        """Physical size of a voxel along each array axis."""
        return np.linalg.norm(self.affine[:-1, :-1], axis=0)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume holding ``array`` on a grid of the same extent; the affine is rescaled if the shape changed."""
        affine = resized_affine(self.affine, self.spatial_shape, array.shape[1:])
        return Volume(np.asarray(array, dtype=np.float32), affine, self.suffix, self.source_dtype, self.header,
                      self.labels, self.notes, resized_plane(self.plane, self.spatial_shape, array.shape[1:]))


def resized_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Affine of the grid that covers the same physical extent as ``old_shape`` with ``new_shape`` voxels.

    Voxel centres follow the half-voxel convention of ``align_corners=False`` resizing: new index i sits at old index
    (i + 0.5) * ratio - 0.5, with ratio = old / new per axis.
    """
    ratio = np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    result = np.array(affine, dtype=np.float64, copy=True)
    linear = affine[:-1, :-1]
    result[:-1, :-1] = linear * ratio[None, :]
    result[:-1, -1] = affine[:-1, -1] + linear @ (0.5 * ratio - 0.5)
    return result


def resized_plane(plane: np.ndarray | None, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray | None:
    """A 2D image's slice plane (``Volume.plane``) for the same extent on ``new_shape`` pixels (the slice stays one
    voxel of the same thickness)."""
    if plane is None:
        return None
    return resized_affine(np.asarray(plane, dtype=np.float64), (1, *old_shape), (1, *new_shape))


def reorient_canonical(volume: "Volume") -> "Volume":
    """A volume's voxels and affine with its array axes permuted and flipped so that axis 0 runs inferior -> superior,
    axis 1 anterior -> posterior and axis 2 right -> left (the LPS frame's z, y, x), whatever order the file stored
    them in: every voxel keeps its physical position. Sets of scans stored in different orientations then stack
    voxel for voxel, and an anatomical axis is one array axis. 2D pictures are returned as they are."""
    if volume.array.ndim != 4:
        return volume
    linear = volume.affine[:3, :3]
    weight = np.abs(linear)  # weight[row, column]: how much array axis ``column`` moves along world axis ``row``
    order, free = [0, 0, 0], [0, 1, 2]
    for axis in sorted(range(3), key=lambda j: -weight[2 - j].max()):  # the most clear-cut world axis first
        column = max(free, key=lambda c: weight[2 - axis, c])
        order[axis] = column
        free.remove(column)
    array = volume.array.transpose(0, *(1 + c for c in order))
    affine = np.array(volume.affine, dtype=np.float64, copy=True)
    affine[:3, :3] = linear[:, order]
    for axis in range(3):
        if affine[2 - axis, axis] < 0:  # the axis runs the other way: flip it, the far end becomes the origin
            array = np.flip(array, axis=1 + axis)
            affine[:3, 3] += affine[:3, axis] * (array.shape[1 + axis] - 1)
            affine[:3, axis] = -affine[:3, axis]
    if order == [0, 1, 2] and np.array_equal(affine, volume.affine):
        return volume
    return dataclasses.replace(volume, array=np.ascontiguousarray(array), affine=affine)


def encode_header(header: Any) -> str | None:
    """A NIfTI header as base64 text (for run.json), or None."""
    if header is None:
        return None
    return base64.b64encode(header.binaryblock).decode("ascii")


def decode_header(text: str | None) -> Any:
    """Inverse of ``encode_header``."""
    if not text:
        return None
    import nibabel as nib

    block = base64.b64decode(text)
    header_class = nib.Nifti2Header if len(block) == 540 else nib.Nifti1Header
    return header_class.from_fileobj(io.BytesIO(block))


# --- reading -------------------------------------------------------------------------------------------------------


def list_images(folder: Path, spatial_dims: int = 3, series_folders: bool = True) -> list[Path]:
    """The images of a folder, sorted: its files with a supported suffix and, in 3D with ``series_folders``, its
    sub-folders (DICOM series); hidden entries are skipped, and so are other sub-folders, as any other non-image.
    The one listing rule of every command that takes a folder of images."""
    return [p for p in sorted(Path(folder).iterdir()) if not p.name.startswith(".") and (
        (p.is_file() and file_suffix(p) in SUPPORTED_SUFFIXES)
        or (p.is_dir() and spatial_dims == 3 and series_folders))]

def read_volume(path: Path | str, spatial_dims: int, check_values: bool = True) -> Volume:
    """Read an image as a ``Volume`` with ``spatial_dims`` spatial axes; every problem becomes a ``ConsinganError``.

    ``check_values`` refuses NaN/Inf and constant channels (what training needs); turn it off to read outputs.
    """
    path = check_encodable(path, "image")
    if not path.exists():
        raise ConsinganError(f"image not found: {path}")
    if path.is_dir():
        if spatial_dims != 3:
            raise ConsinganError(f"image path is a folder, not a file: {path} (DICOM series folders are 3D)")
        volume = _read_dicom_series(path)
        if check_values:
            _check_values(volume.array, path)
        return volume
    suffix = file_suffix(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise ConsinganError(f"unsupported image type {suffix or path.name!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    try:
        if suffix in NIFTI_SUFFIXES:
            volume = _read_nifti(path, spatial_dims)
        elif suffix in NUMPY_SUFFIXES:
            volume = _read_numpy(path, spatial_dims)
        else:
            volume = _read_itk(path, spatial_dims, suffix)
    except ConsinganError:
        raise
    except MemoryError:
        raise ConsinganError(f"cannot read {path}: it does not fit in memory") from None
    except Exception as error:  # corrupt files raise many different exception types in nibabel / SimpleITK / numpy
        raise ConsinganError(f"cannot read {path.name}: {reader_reason(error)}") from None
    if check_values:
        _check_values(volume.array, path)
    return volume


def reader_reason(error: Exception) -> str:
    """The reason in a reader's exception, without SimpleITK's C++ source locations and prefixes."""
    import re

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [re.sub(r"^(sitk::ERROR|itk::ERROR|ERROR)[^:]*:\s*", "", line) for line in lines
             if not re.search(r"\.(cxx|cpp|hxx|h|txx)[:(]\d+", line) and not line.startswith("Exception thrown in")]
    return (lines or [type(error).__name__])[0]


def _check_declared_size(path: Path, shape: Sequence[int], itemsize: int, offset: int = 0) -> None:
    """Refuse a header that declares more voxels than any scan, or more bytes than an uncompressed file holds,
    before anything is allocated."""
    voxels = int(np.prod([int(s) for s in shape], dtype=object))
    if voxels > MAX_DECLARED_VOXELS:
        raise ConsinganError(f"{path.name} declares shape {tuple(shape)} ({voxels} voxels), more than any image "
                             f"this reads; the header is damaged")
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz") and offset + voxels * itemsize > size:
        raise ConsinganError(f"{path.name} declares shape {tuple(shape)} ({offset + voxels * itemsize} bytes) but "
                             f"holds {size} bytes; the file is truncated or its header damaged")


class DimensionError(ConsinganError):
    """A file whose axes do not make an image of the dimensionality asked for; commands without --dim (prediction
    with a trained run) catch it to say what the run takes instead of pointing at a flag they do not have."""

    def __init__(self, path: Path, shape: Sequence[int], spatial_dims: int, detail: str = "") -> None:
        self.name, self.shape, self.spatial_dims = path.name, tuple(int(s) for s in shape), spatial_dims
        super().__init__(f"{path.name} has shape {self.shape}, which is not a {spatial_dims}D image{detail}; "
                         f"check --dim")


def _dimension_error(path: Path, shape: Sequence[int], spatial_dims: int, detail: str = "") -> ConsinganError:
    return DimensionError(path, shape, spatial_dims, detail)


def _read_nifti(path: Path, spatial_dims: int) -> Volume:
    import nibabel as nib

    image = nib.load(str(path))
    _check_declared_size(path, image.header.get_data_shape(), image.header.get_data_dtype().itemsize,
                         int(image.header.get("vox_offset", 0)) if path.suffix == ".nii" else 0)
    data = np.asanyarray(image.dataobj)
    shape = data.shape
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector image: X, Y, Z, 1, C
        data = data[:, :, :, 0, :]
        if spatial_dims == 2 and data.shape[2] == 1:
            data = data[:, :, 0, :]
        if data.ndim != spatial_dims + 1:
            raise _dimension_error(path, shape, spatial_dims)
        array = np.moveaxis(data, -1, 0)
    else:
        # Trailing singleton axes carry no information (a 2D NIfTI is stored as X, Y, 1).
        while data.ndim > spatial_dims and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim == 4 and spatial_dims == 3:
            raise _dimension_error(
                path, shape, 3, " (a 4D series; give one volume, or channels as a 5D X,Y,Z,1,C vector image)"
            )
        if data.ndim != spatial_dims:
            raise _dimension_error(path, shape, spatial_dims)
        array = data[None]
    affine = np.asarray(image.affine, dtype=np.float64)
    if spatial_dims == 2:
        # Keep the in-plane part of the 3D affine; the slice position is restored from the header when writing.
        affine = np.delete(np.delete(affine, 2, axis=0), 2, axis=1)
    array = np.transpose(array, (0, *range(spatial_dims, 0, -1)))  # x-y-z -> z-y-x
    return Volume(
        np.ascontiguousarray(array, dtype=np.float32), _ras_to_lps_reversed(affine), file_suffix(path),
        np.dtype(image.get_data_dtype()), copy.deepcopy(image.header),
    )


def _ras_to_lps_reversed(affine: np.ndarray) -> np.ndarray:
    """An affine from x-y-z indices to RAS -> one from z-y-x indices to LPS (its own inverse)."""
    flip = np.diag([-1.0, -1.0] + [1.0] * (affine.shape[0] - 2))
    result = flip @ affine
    result[:-1, :-1] = result[:-1, :-1][:, ::-1]
    return result


def _read_numpy(path: Path, spatial_dims: int) -> Volume:
    # allow_pickle=False: a .npy holding Python objects is refused instead of executed.
    data = np.load(path, allow_pickle=False)
    if data.ndim == spatial_dims:
        data = data[None]
    elif data.ndim != spatial_dims + 1:
        raise _dimension_error(path, data.shape, spatial_dims, " (expected [*spatial] or [C, *spatial])")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ConsinganError(f"{path.name} holds {data.dtype} values, not real numbers")
    return Volume(np.ascontiguousarray(data, dtype=np.float32), default_affine(spatial_dims), ".npy", data.dtype)


def default_affine(spatial_dims: int) -> np.ndarray:
    """The geometry of a file that stores none (.npy): what ITK gives a picture without geometry (origin 0, spacing
    1, identity direction) in this module's convention, whose columns follow the reversed (z, y, x) array axes. So a
    .npy and a PNG or TIFF of the same grid have the same affine and pair or label each other."""
    affine = np.eye(spatial_dims + 1)
    affine[:-1, :-1] = affine[:-1, :-1][:, ::-1]
    return affine


def _read_dicom_series(folder: Path) -> Volume:
    """A DICOM series folder (one series), through SimpleITK/GDCM; outputs are written as .mha with its geometry."""
    import SimpleITK as sitk

    for entry in folder.iterdir():  # GDCM opens every file of the folder
        check_encodable(entry, "image")
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series = ()
    if not series:
        raise ConsinganError(f"image path is a folder without a DICOM series: {folder}")
    if len(series) > 1:
        raise ConsinganError(f"{folder} holds {len(series)} DICOM series; put the one to train on in its own folder")
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
        image = reader.Execute()
    except RuntimeError as error:
        raise ConsinganError(f"cannot read DICOM series in {folder}: {str(error).strip().splitlines()[-1]}") from None
    return _volume_from_itk(image, 3, ".dcm", folder)


def _read_itk(path: Path, spatial_dims: int, suffix: str) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    voxels = int(np.prod(reader.GetSize(), dtype=object)) * reader.GetNumberOfComponents()
    if voxels > MAX_DECLARED_VOXELS:
        raise ConsinganError(f"{path.name} declares shape {tuple(reversed(reader.GetSize()))} ({voxels} values), more "
                             f"than any image this reads; the header is damaged")
    image = reader.Execute()
    if suffix in DICOM_SUFFIXES and image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image.SetSpacing((*image.GetSpacing()[:2], _slice_thickness(reader, image.GetSpacing()[2])))
    volume = _volume_from_itk(image, spatial_dims, suffix, path)
    if suffix in PICTURE_SUFFIXES and volume.channels == 4 and volume.array[3].min() == volume.array[3].max():
        note = f"{path.name}: dropped its constant alpha channel ({volume.array[3].min():g}); trained on RGB"
        volume = Volume(np.ascontiguousarray(volume.array[:3]), volume.affine, volume.suffix, volume.source_dtype,
                        volume.header, notes=(note,))
    return volume


def _slice_thickness(reader: Any, default: float) -> float:
    """A single DICOM slice's thickness (SliceThickness, 0018|0050), which ITK does not read as its third spacing
    (it has no neighbour to measure the spacing to); ``default`` when the tag is missing or unreadable."""
    try:
        thickness = float(reader.GetMetaData("0018|0050").strip())
    except (RuntimeError, ValueError):
        return default
    return thickness if np.isfinite(thickness) and thickness > 0 else default


def _volume_from_itk(image: Any, spatial_dims: int, suffix: str, path: Path) -> Volume:
    import SimpleITK as sitk

    plane = None
    if image.GetDimension() != spatial_dims:
        size = tuple(reversed(image.GetSize()))
        # A 2D picture saved as a single-slice stack is still 2D; its 3D geometry is kept as its plane.
        if not (spatial_dims == 2 and image.GetDimension() == 3 and image.GetSize()[2] == 1):
            raise _dimension_error(path, size, spatial_dims)
        plane = _itk_affine(image, 3) if suffix not in PICTURE_SUFFIXES else None
        image = image[:, :, 0]
    data = sitk.GetArrayFromImage(image)  # [*reversed spatial] or [*reversed spatial, C] for vector pixels
    components = image.GetNumberOfComponentsPerPixel()
    array = np.moveaxis(data, -1, 0) if components > 1 else data[None]
    affine = _itk_affine(image, spatial_dims) if plane is None else _in_plane_affine(plane)
    return Volume(np.ascontiguousarray(array, dtype=np.float32), affine, suffix, data.dtype, plane=plane)


def _in_plane_affine(plane: np.ndarray) -> np.ndarray:
    """The 2D affine of a one-slice image from its 3D ``plane``: the x and y world rows of its two in-slice axes, each
    rescaled to that axis's true spacing. Cutting the third world row off an oblique slice's axes would shorten
    them (a 0.7 mm pixel of a slice tilted 30 degrees read as 0.61 mm, and the physical aspect with it); an axis
    that lies along the dropped world axis (a sagittal slice's superior-inferior one) keeps its spacing alone."""
    affine = np.eye(3)
    affine[:2, 2] = plane[:2, 3]  # world rows x, y (ITK's order, as every affine here); z is the dropped one
    for column in (1, 2):  # the plane's columns: slice, row, column (array order)
        spacing, part = np.linalg.norm(plane[:3, column]), plane[:2, column]
        length = np.linalg.norm(part)
        affine[:2, column - 1] = part / length * spacing if length > 1e-6 * spacing else \
            np.eye(2)[column - 1] * spacing
    return affine


def _itk_affine(image: Any, spatial_dims: int) -> np.ndarray:
    """The affine of an ITK image, for z-y-x (array-order) indices."""
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(spatial_dims, spatial_dims)
    affine = np.eye(spatial_dims + 1)
    # ITK orders (x, y, z) while the array is (z, y, x): reverse the columns.
    affine[:-1, :-1] = (direction * spacing[None, :])[:, ::-1]
    affine[:-1, -1] = image.GetOrigin()
    return affine


def _check_values(array: np.ndarray, path: Path) -> None:
    if array.size == 0:
        raise ConsinganError(f"{path.name} holds no voxels")
    if not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise ConsinganError(f"{path.name} contains {count} NaN or infinite values; clean the image first")
    for channel, values in enumerate(array):
        if values.min() == values.max():
            raise ConsinganError(
                f"{path.name} is constant ({values.min():g}) in channel {channel}: there is nothing to learn"
            )


# --- writing -------------------------------------------------------------------------------------------------------


def output_suffix(source_suffix: str) -> str:
    """The file type outputs of a ``source_suffix`` image are written in."""
    if source_suffix in (".jpg", ".jpeg"):
        return ".png"  # lossless: JPEG would add compression artefacts
    if source_suffix in (".mhd", ".nhdr", ".dcm"):
        return ".mha"  # one file (DICOM series are written as MHA, which keeps their geometry)
    return source_suffix


def write_volume(path: Path | str, volume: Volume, source_dtype: bool = False) -> Path:
    """Write ``volume`` in the format of its ``suffix`` (``path``'s own suffix is replaced); returns the path written.

    Float formats (NIfTI, ITK volumes, TIFF, NPY) store float32, or with ``source_dtype`` the source's type: values
    are rounded (integer types) and clipped to that type's range. PNG/JPEG sources are always written as PNG in the
    source's integer type, since PNG has no float pixels (and JPEG would add compression artefacts).
    """
    suffix = output_suffix(volume.suffix)
    path = check_encodable(with_suffix(Path(path), suffix), "output file")
    array = np.asarray(volume.array, dtype=np.float32)
    if source_dtype or suffix == ".png":
        array = cast_to(array, volume.source_dtype if suffix != ".png" or np.issubdtype(
            volume.source_dtype, np.integer) else np.dtype(np.uint8))
    if suffix in NIFTI_SUFFIXES:
        _write_nifti(path, volume, array)
    elif suffix == ".npy":
        np.save(path, array if array.shape[0] > 1 else array[0])
    else:
        try:
            _write_itk(path, volume, array, suffix)
        except RuntimeError as error:  # SimpleITK's way of saying a write failed (a full disk, a folder gone)
            raise OutputError(f"cannot write {path.name}: {reader_reason(error)}") from None
    return path


def with_suffix(path: Path, suffix: str) -> Path:
    """``path`` with its image suffix (if any) replaced by ``suffix``; other dots stay: 'cell.v1' -> 'cell.v1.png'."""
    name = path.name
    if file_suffix(name) in SUPPORTED_SUFFIXES:
        name = name[: len(name) - len(file_suffix(name))]
    return path.with_name(name + suffix)


def cast_to(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round (for integer types) and clip ``array`` into ``dtype``."""
    dtype = np.dtype(dtype).newbyteorder("=")  # native order: SimpleITK rejects swapped bytes
    if np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        return np.clip(np.rint(array), limits.min, limits.max).astype(dtype)
    return array.astype(dtype)


def write_outputs(path: Path | str, volume: Volume, source_dtype: bool = False) -> list[Path]:
    """Write ``volume``; if it carries label channels, the image and a ``<name>_label`` integer file beside it."""
    if volume.labels is None:
        return [write_volume(path, volume, source_dtype)]
    image, label = volume.labels.split(volume.array)
    path = Path(path)
    image_volume = Volume(image, volume.affine, volume.suffix, volume.source_dtype, volume.header, plane=volume.plane)
    label_volume = Volume(label.astype(np.float32), volume.affine, volume.suffix, volume.labels.dtype, volume.header,
                          plane=volume.plane)
    stem = with_suffix(path, "").name
    return [write_volume(path, image_volume, source_dtype),
            write_volume(path.with_name(f"{stem}_label"), label_volume, source_dtype=True)]


def _write_nifti(path: Path, volume: Volume, array: np.ndarray) -> None:
    import nibabel as nib

    header = volume.header.copy() if volume.header is not None else None
    affine = _ras_to_lps_reversed(volume.affine)  # back to NIfTI's x-y-z indices and RAS
    array = np.transpose(array, (0, *range(volume.spatial_dims, 0, -1)))
    if volume.spatial_dims == 2:
        base = header.get_best_affine() if header is not None else np.eye(4)
        affine = np.array(base, dtype=np.float64)
        keep = [0, 1, 3]
        affine[np.ix_(keep, keep)] = _ras_to_lps_reversed(volume.affine)
    data = np.moveaxis(array, 0, -1)  # [*spatial, C]
    if volume.spatial_dims == 2:
        data = data[:, :, None, :]
    data = data[..., 0] if array.shape[0] == 1 else data[:, :, :, None, :]
    image = nib.Nifti1Image(data, affine, header=header)
    image.set_data_dtype(data.dtype)
    # scl_slope/inter of an integer source would rescale our float data a second time.
    image.header.set_slope_inter(1.0, 0.0)
    if array.shape[0] > 1:
        image.header.set_intent("vector")
    nib.save(image, str(path))


def _write_itk(path: Path, volume: Volume, array: np.ndarray, suffix: str) -> None:
    import SimpleITK as sitk

    channels = array.shape[0]
    affine = volume.affine
    if volume.plane is not None and array.ndim == 3 and suffix in ITK_VOLUME_SUFFIXES:
        array, affine = array[:, None], np.asarray(volume.plane, dtype=np.float64)  # the slice, where it was
    data = np.moveaxis(array, 0, -1) if channels > 1 else array[0]
    image = sitk.GetImageFromArray(data, isVector=channels > 1)
    linear = affine[:-1, :-1][:, ::-1]  # back to ITK's (x, y, z) column order
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (linear / spacing[None, :]).ravel()])
    image.SetOrigin([float(v) for v in affine[:-1, -1]])
    sitk.WriteImage(image, str(path), useCompression=suffix in (".mha", ".nrrd"))
