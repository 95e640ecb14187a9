"""Reading and writing images with their geometry, and intensity normalisation."""

from consingan.io.intensity import IntensityRange
from consingan.io.volume import (
    SUPPORTED_SUFFIXES,
    Volume,
    decode_header,
    encode_header,
    file_suffix,
    output_suffix,
    read_volume,
    resized_affine,
    write_volume,
)

__all__ = ["IntensityRange", "SUPPORTED_SUFFIXES", "Volume", "decode_header", "encode_header", "file_suffix", "output_suffix", "read_volume", "resized_affine",
           "write_volume"]
