"""Per-channel intensity mapping into the generator's tanh range [-1, 1], and back.

Two mappings, both monotone, piecewise linear and invertible, so every output comes back in the source's units:

- ``minmax``: each channel's [min, max] linearly onto [-1, 1]. On a scan with a heavy bright tail (MRI: median 17,
  99th percentile 900, maximum 2149) this puts almost every voxel next to -1, where tanh's gradient vanishes and the
  generator can sit at -1 for good.
- ``window`` (default): each channel's percentile window [p_low, p_high] onto [-w, w] (w = ``WINDOW_EDGE`` = 0.8), and
  the tails [min, p_low] and [p_high, max] compressed into the margins [-1, -w] and [w, 1]. The bulk of the image
  gets most of the range and stays off tanh's flat ends; nothing is clipped, the tails only get fewer levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

INTENSITY_MAPPINGS = ("window", "minmax")
WINDOW_EDGE = 0.8

MAX_MAPPING_VALUES = 2**22  # values per channel a set's percentiles are computed from


@dataclass(frozen=True)
class IntensityRange:
    """Knots of a per-channel piecewise-linear map from source intensities onto [-1, 1].

    ``minimum``/``maximum`` are the source extremes (mapped to -1 and 1); ``low``/``high`` the window (mapped to
    -``edge`` and ``edge``). With ``low == minimum`` and ``high == maximum`` and ``edge == 1`` it is the min-max map.
    A tail that holds no values (for example ``low == minimum``, a background at the minimum) simply leaves its margin
    unused; generated values that fall in an unused margin map back to the extreme.
    """

    minimum: tuple[float, ...]
    maximum: tuple[float, ...]
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    edge: float = 1.0
    mapping: str = "minmax"
    percentiles: tuple[float, float] | None = None

    @classmethod
    def of(cls, array: np.ndarray, mapping: str = "minmax", percentiles: tuple[float, float] = (0.5, 99.5)
           ) -> "IntensityRange":
        """The map of ``array`` [C, *spatial], per channel, with ``mapping`` 'window' or 'minmax'."""
        if mapping not in INTENSITY_MAPPINGS:
            raise ValueError(f"unknown intensity mapping {mapping!r}; choose one of {INTENSITY_MAPPINGS}")
        flat = array.reshape(array.shape[0], -1).astype(np.float64)
        minimum, maximum = flat.min(axis=1), flat.max(axis=1)
        if mapping == "minmax":
            return cls(tuple(map(float, minimum)), tuple(map(float, maximum)))
        low, high = np.percentile(flat, percentiles, axis=1)
        # A channel whose window is empty (more than p_high of its voxels share one value) falls back to min-max.
        empty = high <= low
        low, high = np.where(empty, minimum, low), np.where(empty, maximum, high)
        return cls(tuple(map(float, minimum)), tuple(map(float, maximum)), tuple(map(float, low)),
                   tuple(map(float, high)), WINDOW_EDGE, "window", (float(percentiles[0]), float(percentiles[1])))

    @classmethod
    def of_set(cls, arrays: Sequence[np.ndarray], mapping: str = "minmax", percentiles: tuple[float, float] = (0.5, 99.5),
               seed: int = 0) -> "IntensityRange":
        """One map over a whole set of images ([C, *spatial] each, any sizes), per channel, so that one intensity maps
        to one value in every image: percentiles from at most ``MAX_MAPPING_VALUES`` values drawn at random, the
        minimum and maximum exact (nothing is clipped)."""
        per_channel = np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)
        if per_channel.shape[1] > MAX_MAPPING_VALUES:
            chosen = np.random.default_rng(seed).choice(per_channel.shape[1], MAX_MAPPING_VALUES, replace=False)
            extremes = np.stack([per_channel.min(1), per_channel.max(1)], 1)
            per_channel = np.concatenate([per_channel[:, chosen], extremes], 1)
        return cls.of(per_channel, mapping, percentiles)

    def _knots(self, channel: int) -> tuple[list[float], list[float]]:
        """(source knots, normalised knots) of one channel, strictly increasing, empty tails dropped."""
        lo, hi = self.minimum[channel], self.maximum[channel]
        if self.low is None or self.high is None:
            return [lo, hi], [-1.0, 1.0]
        source, target = [self.low[channel], self.high[channel]], [-self.edge, self.edge]
        if lo < source[0]:
            source, target = [lo, *source], [-1.0, *target]
        if hi > source[-1]:
            source, target = [*source, hi], [*target, 1.0]
        return source, target

    def normalise(self, array: np.ndarray) -> np.ndarray:
        """Source units -> [-1, 1] (values outside the source range extend the outer segments linearly)."""
        out = np.empty(array.shape, dtype=np.float32)
        for channel in range(array.shape[0]):
            source, target = self._knots(channel)
            out[channel] = _piecewise(np.asarray(array[channel], dtype=np.float64), source, target)
        return out

    def denormalise(self, array: np.ndarray, extrapolate_from: int | None = None) -> np.ndarray:
        """[-1, 1] -> source units; an output in an unused margin, or beyond [-1, 1], maps to the channel's extreme.

        Channels from ``extrapolate_from`` on (a run's one-hot label channels) extend their end segments linearly
        instead: they are decoded by their argmax, and two label channels both above the window's edge would
        otherwise both become 1 and tie, handing the voxel to the lower class."""
        array = np.asarray(array, dtype=np.float64)
        out = np.empty(array.shape, dtype=np.float32)
        for channel in range(array.shape[0]):
            source, target = self._knots(channel)
            values = array[channel]
            if len(target) < 2:
                out[channel] = source[0]
                continue
            # np.interp holds values beyond the end knots at the extremes: samples stay in the source range.
            mapped = np.interp(values, target, source)
            if extrapolate_from is not None and channel >= extrapolate_from:
                for end, inner in ((0, 1), (-1, -2)):
                    slope = (source[end] - source[inner]) / (target[end] - target[inner])
                    beyond = values < target[0] if end == 0 else values > target[-1]
                    mapped = np.where(beyond, source[end] + (values - target[end]) * slope, mapped)
            out[channel] = mapped
        return out

    def channels(self, count: int) -> "IntensityRange":
        """The map of the first ``count`` channels (the image channels of a run trained with labels)."""
        cut = lambda values: None if values is None else values[:count]  # noqa: E731
        return IntensityRange(self.minimum[:count], self.maximum[:count], cut(self.low), cut(self.high), self.edge,
                              self.mapping, self.percentiles)

    def to_dict(self) -> dict:
        values = {"mapping": self.mapping, "minimum": list(self.minimum), "maximum": list(self.maximum)}
        if self.low is not None and self.high is not None:
            values.update(low=list(self.low), high=list(self.high), edge=self.edge,
                          percentiles=list(self.percentiles or ()))
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "IntensityRange":
        """From ``to_dict``'s output; a run written before windows existed holds only minimum and maximum."""
        if values.get("low") is None:
            return cls(tuple(values["minimum"]), tuple(values["maximum"]))
        percentiles = values.get("percentiles")
        return cls(tuple(values["minimum"]), tuple(values["maximum"]), tuple(values["low"]), tuple(values["high"]),
                   float(values["edge"]), str(values.get("mapping", "window")),
                   tuple(percentiles) if percentiles else None)


def _piecewise(values: np.ndarray, xs: list[float], ys: list[float]) -> np.ndarray:
    """Piecewise-linear map through (xs, ys), xs strictly increasing, outer segments extended linearly."""
    if len(xs) < 2 or xs[-1] <= xs[0]:  # a constant channel (only with labels): everything to the middle knot
        return np.full(values.shape, ys[0] if len(ys) == 1 else 0.5 * (ys[0] + ys[-1]), dtype=np.float64)
    out = np.interp(values, xs, ys)
    below, above = values < xs[0], values > xs[-1]
    if below.any():
        out[below] = ys[0] + (values[below] - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    if above.any():
        out[above] = ys[-1] + (values[above] - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return out
