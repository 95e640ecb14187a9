"""Label maps trained together with their image: one-hot channels in, argmax out.

A label map with classes c_1 < ... < c_K (background included) becomes K extra channels, channel k being 1 where the
label is c_k and 0 elsewhere; like every channel they are then mapped onto [-1, 1] (0 -> -1, 1 -> +1) and resized
with the image through the pyramid. The generator learns image and labels jointly, so a sample's label channels
describe its own anatomy; they are decoded by taking, at each voxel, the class whose channel is largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consingan.errors import ConsinganError

MAX_CLASSES = 32


@dataclass(frozen=True)
class LabelEncoding:
    """Which label values exist, and how many image channels come before the label channels."""

    classes: tuple[int, ...]
    image_channels: int

    @classmethod
    def of(cls, label: np.ndarray, image_channels: int, name: str = "label map") -> "LabelEncoding":
        """From a label array [1, *spatial]; refuses non-integer values, a single class and too many classes."""
        if label.shape[0] != 1:
            raise ConsinganError(f"{name} must have one channel, got {label.shape[0]}")
        if not np.all(np.isfinite(label)) or not np.all(label == np.round(label)):
            raise ConsinganError(f"{name} holds non-integer values; give integer class labels")
        classes = tuple(int(v) for v in np.unique(label))
        if len(classes) < 2:
            raise ConsinganError(f"{name} holds a single class ({classes[0]}); nothing to learn")
        if len(classes) > MAX_CLASSES:
            raise ConsinganError(f"{name} holds {len(classes)} classes; at most {MAX_CLASSES} are supported")
        return cls(classes, image_channels)

    def encode(self, label: np.ndarray) -> np.ndarray:
        """[1, *spatial] label values -> [K, *spatial] float32 one-hot."""
        return np.stack([(label[0] == value) for value in self.classes]).astype(np.float32)

    def decode(self, channels: np.ndarray) -> np.ndarray:
        """[K, *spatial] label channels (any scale) -> [1, *spatial] label values."""
        return np.asarray(self.classes, dtype=np.int64)[np.argmax(channels, axis=0)][None]

    def split(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[C + K, *spatial] -> (image [C, *spatial], label values [1, *spatial])."""
        return array[: self.image_channels], self.decode(array[self.image_channels:])

    @property
    def dtype(self) -> np.dtype:
        """The smallest integer type that holds every class value (label files are written in it)."""
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= min(self.classes) and max(self.classes) <= info.max:
                return np.dtype(dtype)
        return np.dtype(np.int64)

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "image_channels": self.image_channels}

    @classmethod
    def from_dict(cls, values: dict | None) -> "LabelEncoding | None":
        return None if not values else cls(tuple(values["classes"]), int(values["image_channels"]))
