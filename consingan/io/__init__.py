"""Reading and writing images with their geometry, and intensity normalisation.

The public names are imported on first use (PEP 562): a module that needs the intensity mapping does not load the
image readers and their libraries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consingan.lazy import lazy_exports

if TYPE_CHECKING:
    from consingan.io.intensity import IntensityRange
    from consingan.io.labels import LabelEncoding
    from consingan.io.volume import (
        SUPPORTED_SUFFIXES,
        Volume,
        decode_header,
        encode_header,
        file_suffix,
        list_images,
        output_suffix,
        read_volume,
        resized_affine,
        write_outputs,
        write_volume,
    )

_HOMES = {
    "IntensityRange": "intensity",
    "LabelEncoding": "labels",
    **{name: "volume" for name in ("write_outputs", "SUPPORTED_SUFFIXES", "Volume", "decode_header", "encode_header",
                                   "file_suffix", "list_images", "output_suffix", "read_volume", "resized_affine",
                                   "write_volume")},
}
__all__ = list(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
