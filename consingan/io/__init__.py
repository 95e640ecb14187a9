"""Reading and writing images with their geometry, and intensity normalisation."""

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

__all__ = ["IntensityRange", "LabelEncoding", "write_outputs", "SUPPORTED_SUFFIXES", "Volume", "decode_header", "encode_header", "file_suffix", "list_images", "output_suffix", "read_volume", "resized_affine",
           "write_volume"]
