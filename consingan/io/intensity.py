"""Per-channel intensity normalisation into the generator's tanh range [-1, 1], and back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IntensityRange:
    """The source minimum and maximum of each channel; maps them linearly onto [-1, 1] and back.

    Min-max (not percentiles) keeps every source intensity reachable, so a Hounsfield-unit or 16-bit image comes back
    in its own units; it is stored in the run folder so outputs can always be mapped back.
    """

    minimum: tuple[float, ...]
    maximum: tuple[float, ...]

    @classmethod
    def of(cls, array: np.ndarray) -> "IntensityRange":
        """Range of ``array`` [C, *spatial], per channel."""
        flat = array.reshape(array.shape[0], -1)
        return cls(tuple(float(v) for v in flat.min(axis=1)), tuple(float(v) for v in flat.max(axis=1)))

    def _broadcast(self, values: tuple[float, ...], ndim: int) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).reshape(-1, *([1] * (ndim - 1)))

    def normalise(self, array: np.ndarray) -> np.ndarray:
        low, high = self._broadcast(self.minimum, array.ndim), self._broadcast(self.maximum, array.ndim)
        return ((array - low) / (high - low) * 2.0 - 1.0).astype(np.float32)

    def denormalise(self, array: np.ndarray) -> np.ndarray:
        low, high = self._broadcast(self.minimum, array.ndim), self._broadcast(self.maximum, array.ndim)
        return ((np.asarray(array, dtype=np.float64) + 1.0) / 2.0 * (high - low) + low).astype(np.float32)

    def to_dict(self) -> dict:
        return {"minimum": list(self.minimum), "maximum": list(self.maximum)}

    @classmethod
    def from_dict(cls, values: dict) -> "IntensityRange":
        return cls(tuple(values["minimum"]), tuple(values["maximum"]))
