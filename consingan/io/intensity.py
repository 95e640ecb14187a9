"""Per-channel intensity mapping into the generator's tanh range [-1, 1], and back.

Two mappings, both monotone, piecewise linear and invertible, so every output comes back in the source's units:

- ``minmax``: each channel's [min, max] linearly onto [-1, 1]. On a scan with a heavy bright tail (MRI: median 17,
  99th percentile 900, maximum 2149) this puts almost every voxel next to -1, where tanh's gradient vanishes and the
  generator can sit at -1 for good.
- ``window`` (default): each channel's percentile window [p_low, p_high] onto [-w, w] (w = ``WINDOW_EDGE`` = 0.8), and
  the tails [min, p_low] and [p_high, max] compressed into the margins [-1, -w] and [w, 1]. The bulk of the image
  gets most of the range and stays off tanh's flat ends; nothing is clipped, the tails only get fewer levels.

Either mapping can first turn a colour image's channels onto their principal axes (``principal=k``: the image's
own colour covariance, largest first; a rotation, so it is exactly undone). A photograph's channels are strongly
correlated: mapped channel by channel, an error the generator makes in one channel only is a colour the image never
has; on the principal axes the same error falls mostly on brightness, and the minor (chroma) axes, each stretched to
its own range, are scaled back down by that range on the way out. A grey image given as three equal channels has one
axis; the others are constant and come back as exactly grey.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    # Principal colour axes of the first len(axes) channels (rows, orthonormal), the mean they are taken about, and
    # those channels' source extremes, which outputs are clipped to after the rotation back. None: channels as given.
    axes: tuple[tuple[float, ...], ...] | None = None
    centre: tuple[float, ...] | None = None
    bounds: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @classmethod
    def of(cls, array: np.ndarray, mapping: str = "minmax", percentiles: tuple[float, float] = (0.5, 99.5),
           principal: int = 0) -> "IntensityRange":
        """The map of ``array`` [C, *spatial], per channel, with ``mapping`` 'window' or 'minmax'; with ``principal``
        = k >= 2, the first k channels (a colour image's, not label channels after them) on their principal axes."""
        if mapping not in INTENSITY_MAPPINGS:
            raise ValueError(f"unknown intensity mapping {mapping!r}; choose one of {INTENSITY_MAPPINGS}")
        flat = array.reshape(array.shape[0], -1).astype(np.float64)
        if principal >= 2:
            axes, centre = principal_axes(flat[:principal])
            bounds = (tuple(map(float, flat[:principal].min(1))), tuple(map(float, flat[:principal].max(1))))
            rotated = _onto_axes(flat, axes, centre)
            per_channel = cls.of(rotated, mapping, percentiles)
            return replace(per_channel, axes=axes, centre=centre, bounds=bounds)
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

    def _unrotate(self, array: np.ndarray) -> np.ndarray:
        """Principal components -> source channels, clipped to the source's extremes (samples stay in range)."""
        if self.axes is None:
            return array
        k, out = len(self.axes), np.array(array, dtype=np.float64)
        colour = np.asarray(self.axes).T @ out[:k].reshape(k, -1) + np.asarray(self.centre)[:, None]
        low, high = (np.asarray(bound)[:, None] for bound in self.bounds)
        out[:k] = np.clip(colour, low, high).reshape(out[:k].shape)
        return out

    def normalise(self, array: np.ndarray) -> np.ndarray:
        """Source units -> [-1, 1] (values outside the source range extend the outer segments linearly)."""
        if self.axes is not None:
            array = _onto_axes(array, self.axes, self.centre)
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
        return self._unrotate(out).astype(np.float32, copy=False)

    def channels(self, count: int) -> "IntensityRange":
        """The map of the first ``count`` channels (the image channels of a run trained with labels)."""
        if self.axes is not None and count < len(self.axes):
            raise ValueError(f"the principal colour axes span {len(self.axes)} channels; cannot keep only {count}")
        cut = lambda values: None if values is None else values[:count]  # noqa: E731
        return replace(self, minimum=self.minimum[:count], maximum=self.maximum[:count], low=cut(self.low),
                       high=cut(self.high))

    def to_dict(self) -> dict:
        values = {"mapping": self.mapping, "minimum": list(self.minimum), "maximum": list(self.maximum)}
        if self.low is not None and self.high is not None:
            values.update(low=list(self.low), high=list(self.high), edge=self.edge,
                          percentiles=list(self.percentiles or ()))
        if self.axes is not None:
            values.update(axes=[list(row) for row in self.axes], centre=list(self.centre),
                          bounds=[list(bound) for bound in self.bounds])
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "IntensityRange":
        """From ``to_dict``'s output; a run written before windows existed holds only minimum and maximum."""
        colour = {}
        if values.get("axes") is not None:
            colour = {"axes": tuple(tuple(map(float, row)) for row in values["axes"]),
                      "centre": tuple(map(float, values["centre"])),
                      "bounds": tuple(tuple(map(float, bound)) for bound in values["bounds"])}
            k = len(colour["axes"])
            numbers = [v for row in (*colour["axes"], colour["centre"], *colour["bounds"]) for v in row]
            if (k < 2 or k > len(values["minimum"]) or any(len(row) != k for row in colour["axes"])
                    or len(colour["centre"]) != k or len(colour["bounds"]) != 2
                    or any(len(bound) != k for bound in colour["bounds"]) or not np.all(np.isfinite(numbers))):
                raise ValueError("the principal colour axes are not a finite square matrix over the image channels")
        if values.get("low") is None:
            return cls(tuple(values["minimum"]), tuple(values["maximum"]), **colour)
        percentiles = values.get("percentiles")
        return cls(tuple(values["minimum"]), tuple(values["maximum"]), tuple(values["low"]), tuple(values["high"]),
                   float(values["edge"]), str(values.get("mapping", "window")),
                   tuple(percentiles) if percentiles else None, **colour)


def _onto_axes(array: np.ndarray, axes: Sequence[Sequence[float]], centre: Sequence[float]) -> np.ndarray:
    """Source channels -> principal components (the first len(axes) channels; the others unchanged)."""
    k, out = len(axes), np.array(array, dtype=np.float64)
    colour = out[:k].reshape(k, -1) - np.asarray(centre)[:, None]
    out[:k] = (np.asarray(axes) @ colour).reshape(out[:k].shape)
    return out


def principal_axes(colour: np.ndarray) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
    """Orthonormal principal axes (rows, largest variance first) of the channels of ``colour`` [k, N], and their mean.

    Each axis's sign makes its largest entry positive, so the same image always gives the same map. An axis whose
    variance is below a millionth of the largest's becomes a zero row: rounding noise along it (a grey image given as
    RGB) is dropped, its component a constant, rather than stretched to a channel's whole range; what the image holds
    along it (at most a thousandth of its spread) is lost."""
    centre = colour.mean(axis=1)
    variances, vectors = np.linalg.eigh(np.cov(colour))
    order = np.argsort(variances)[::-1]
    variances, vectors = variances[order], vectors[:, order].T
    for variance, row in zip(variances, vectors):
        if variance < 1e-6 * max(variances[0], 1e-300):
            row[:] = 0.0
        elif row[np.argmax(np.abs(row))] < 0:
            row *= -1
    return tuple(tuple(map(float, row)) for row in vectors), tuple(map(float, centre))


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
