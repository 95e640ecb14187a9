"""Offline measures of sample quality, diversity and memorisation, for 2D and 3D images [N, C, *spatial].

Nothing here downloads anything: the feature network for the Frechet distance is built from a fixed seed, and the
Inception layers of SinGAN's SIFID take their weights from a file the user gives.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg, stats

from consingan.nn.resample import gaussian_blur, resize


# Sample sets above this are measured one sample at a time (a Laplacian pyramid of a whole set takes several times
# the set's size: 1.7 GB for sixteen 128^3 samples).
LARGE_SET_BYTES = 2**25
MAX_HISTOGRAM_VALUES = 2**22
FEATURE_SLAB_BYTES = 2**26  # the random features' first layer is computed in slabs above this


def stuck_share(saturated: float, real_saturated: float) -> float:
    """Of the voxels the image keeps off the ends of its range, the share that the samples put at the ends."""
    return max(0.0, saturated - real_saturated) / max(1e-6, 1.0 - real_saturated)


def _spatial(x: torch.Tensor) -> int:
    return x.dim() - 2


def extract_patches(x: torch.Tensor, size: int, stride: int = 1) -> torch.Tensor:
    """All ``size``-wide patches of ``x`` [N, C, *spatial] (step ``stride``) as rows [P, C * size**dims]."""
    dims = _spatial(x)
    for axis in range(2, 2 + dims):
        x = x.unfold(axis, min(size, x.shape[axis]), stride)
    # After unfolding: [N, C, *positions, *window]; put the channels beside the window, then flatten.
    x = x.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    count = x.shape[0] * math.prod(x.shape[1:1 + dims])
    return x.reshape(count, -1)


def gather_patches(x: torch.Tensor, size: int, count: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` patches of ``x`` [N, C, *spatial] at random positions (with replacement), without building the
    others: rows [count, C * size**dims] in ``extract_patches``' order, and their corners [count, dims]."""
    dims = _spatial(x)
    size = min(size, *x.shape[2:])
    samples = torch.randint(0, x.shape[0], (count,), generator=generator)
    corners = torch.stack([torch.randint(0, s - size + 1, (count,), generator=generator) for s in x.shape[2:]], 1)
    offsets = torch.stack(torch.meshgrid(*[torch.arange(size)] * dims, indexing="ij"), -1).reshape(-1, dims)
    index = corners[:, None, :] + offsets[None]  # [count, window, dims]
    channels_last = x.movedim(1, -1)
    patches = channels_last[(samples[:, None], *index.unbind(-1))]  # [count, window, C]
    return patches.transpose(1, 2).reshape(count, -1), corners


def random_patches(x: torch.Tensor, size: int, wanted: int, generator: torch.Generator,
                   max_bytes: int = 2**28) -> torch.Tensor:
    """Up to ``wanted`` patches of ``x`` drawn at random: from all of them (a random subset, without replacement)
    when they fit in ``max_bytes``, else gathered at random positions, so memory does not grow with the volume."""
    window = x.shape[1] * min(size, *x.shape[2:]) ** _spatial(x)
    total = len(x) * math.prod(max(1, s - size + 1) for s in x.shape[2:])
    if total * window * 8 <= max_bytes:
        patches = extract_patches(x, size)
        return patches[torch.randperm(len(patches), generator=generator)[:wanted]]
    return gather_patches(x, size, wanted, generator)[0]


def laplacian_pyramid(x: torch.Tensor, levels: int, min_size: int = 8) -> list[torch.Tensor]:
    """Band-pass levels (finest first) and the coarsest low-pass, as in Karras et al. 2018; N-dimensional."""
    bands = []
    current = x
    for _ in range(levels - 1):
        if min(current.shape[2:]) // 2 < min_size:
            break
        smaller = resize(current, [max(1, s // 2) for s in current.shape[2:]])
        bands.append(current - resize(smaller, current.shape[2:]))
        current = smaller
    bands.append(current)
    return bands


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two sets of vectors [P, D] (equal-quantile matching on projections)."""
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(a.shape[1], directions, generator=generator, dtype=a.dtype)
    projection /= projection.norm(dim=0, keepdim=True)
    count = min(len(a), len(b))
    quantiles = torch.linspace(0, 1, count, dtype=a.dtype)
    # Matching equal quantiles of the projections is the 1D optimal transport; it also handles unequal set sizes.
    pa = torch.quantile(a @ projection, quantiles, dim=0)
    pb = torch.quantile(b @ projection, quantiles, dim=0)
    return float((pa - pb).abs().mean())


def multiscale_swd(real: torch.Tensor, fake: torch.Tensor, patch_size: int = 7, levels: int = 4,
                   max_patches: int = 4096, seed: int = 0) -> dict:
    """Sliced Wasserstein distance between patches of ``real`` [1, C, ...] and ``fake`` [N, C, ...] per Laplacian
    level (Karras et al. 2018): patches normalised per channel with the real image's statistics at each level."""
    generator = torch.Generator().manual_seed(seed)
    real_levels = laplacian_pyramid(real, levels)
    level_stats = [(r.mean(dim=[0, *range(2, r.dim())], keepdim=True),
              r.std(dim=[0, *range(2, r.dim())], keepdim=True).clamp_min(1e-6)) for r in real_levels]
    if fake.numel() * fake.element_size() <= LARGE_SET_BYTES:
        fake_patches = [random_patches((f - m) / s, patch_size, max_patches, generator)
                        for f, (m, s) in zip(laplacian_pyramid(fake, levels), level_stats)]
    else:  # large 3D sample sets: one sample's pyramid at a time, an equal share of the patches from each
        share = -(-max_patches // len(fake))
        parts = [[] for _ in real_levels]
        for index in range(len(fake)):
            for level, (f, (m, s)) in enumerate(zip(laplacian_pyramid(fake[index:index + 1], levels), level_stats)):
                parts[level].append(random_patches((f - m) / s, patch_size, share, generator))
        fake_patches = [torch.cat(part)[:max_patches] for part in parts]
    per_level = []
    for r, (m, s), fp in zip(real_levels, level_stats, fake_patches):
        rp = random_patches((r - m) / s, patch_size, max_patches, generator)
        per_level.append(sliced_wasserstein(rp.double(), fp.double(), seed=seed))
    # Small images have fewer Laplacian levels than asked for (each level needs 8 voxels a side): say how many.
    return {"per_level": per_level, "mean": float(np.mean(per_level)), "levels": len(per_level)}


class RandomFeatures(torch.nn.Module):
    """A fixed random convolutional feature extractor (seeded He-initialised convs + ReLU + average pooling).

    Its Frechet distances compare runs of this project with each other; they are not the published SIFID numbers,
    which use Inception features.
    """

    def __init__(self, spatial_dims: int, in_channels: int, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        conv = F.conv2d if spatial_dims == 2 else F.conv3d
        self.conv = conv
        self.pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
        shapes = [(width, in_channels), (width, width), (width, width)]
        self.weights = [torch.randn(o, i, *([3] * spatial_dims), generator=generator) * math.sqrt(2.0 / (i * 3**spatial_dims))
                        for o, i in shapes]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature vectors [P, width], one per position of the final map."""
        x = self._first_layer(x)
        for weight in self.weights[1:]:
            x = F.relu(self.conv(x, weight, padding=1))
        return x.movedim(1, -1).reshape(-1, x.shape[1])

    def _first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution, ReLU and (when the map is large enough) pooling of the first layer, computed in slabs along
        the first spatial axis when its full-resolution, full-width output would exceed ``FEATURE_SLAB_BYTES`` (a
        128^3 volume's would take 512 MB): each slab reads one voxel of the zero-padded input either side, so the
        result is the same as in one piece."""
        weight, pool = self.weights[0], min(x.shape[2:]) >= 8
        full_bytes = x.shape[0] * weight.shape[0] * math.prod(x.shape[2:]) * x.element_size()
        if full_bytes <= FEATURE_SLAB_BYTES:
            x = F.relu(self.conv(x, weight, padding=1))
            return self.pool(x, 2) if pool else x
        padded = F.pad(x, [1, 1] * (x.dim() - 2))
        # Pooling drops an odd last plane; an even slab depth keeps the 2-wide pooling windows inside single slabs.
        depth = x.shape[2] - x.shape[2] % 2 if pool else x.shape[2]
        step = max(2, 2 * int(depth * FEATURE_SLAB_BYTES / full_bytes / 2))
        slabs = []
        for start in range(0, depth, step):
            stop = min(depth, start + step)
            slab = F.relu(self.conv(padded[:, :, start:stop + 2], weight))
            slabs.append(self.pool(slab, 2) if pool else slab)
        return torch.cat(slabs, dim=2)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [P, D] and b [Q, D]."""
    return frechet_from_statistics(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


FEATURE_ROWS = 2**18  # feature vectors converted to float64 at once by ``feature_statistics``


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (as ``np.cov`` of the rows) of feature vectors [P, D], in float64, gathered over chunks
    of ``FEATURE_ROWS`` rows: a 256^3 sample has 2 million 64-wide vectors, whose float64 copy and centred copy would
    take 2 GB. Fewer than two vectors: ``np.cov``'s own answer."""
    if len(features) < 2:
        array = features.double().numpy()
        return array.mean(0), np.cov(array, rowvar=False)
    mean = sum(part.double().sum(0) for part in features.split(FEATURE_ROWS)) / len(features)
    scatter = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for part in features.split(FEATURE_ROWS):
        centred = part.double() - mean
        scatter += centred.T @ centred
    return mean.numpy(), (scatter / (len(features) - 1)).numpy()


def frechet_from_statistics(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians N(mu_a, cov_a) and N(mu_b, cov_b)."""
    # A small ridge keeps the square root defined when few feature vectors make the covariances singular.
    ridge = np.eye(len(cov_a)) * 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = np.real(linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge)))
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)))


def single_image_frechet(real: torch.Tensor, fake: torch.Tensor, features: torch.nn.Module) -> float:
    """SIFID-style: Frechet distance between the real image's feature positions and those of every sample, averaged."""
    real_statistics = feature_statistics(features(real))
    return float(np.mean([frechet_from_statistics(*real_statistics, *feature_statistics(features(f[None])))
                          for f in fake]))


def diversity(real: torch.Tensor, fake: torch.Tensor) -> float:
    """SinGAN's diversity: per-voxel std across samples, averaged over voxels and channels, over the image's std."""
    return float(fake.std(dim=0).mean() / real.std().clamp_min(1e-12))


def channel_values(x: torch.Tensor, channel: int, generator: torch.Generator) -> torch.Tensor:
    """The values of one channel of ``x`` [N, C, ...], flat; of a large 3D set, a fixed random subset of
    ``MAX_HISTOGRAM_VALUES`` of them (drawn with ``generator``), which estimates the distribution as well, picked
    without copying the whole channel."""
    part = x[:, channel]
    if part.numel() <= MAX_HISTOGRAM_VALUES:
        return part.flatten()
    index = torch.randint(0, part.numel(), (MAX_HISTOGRAM_VALUES,), generator=generator)
    if part.is_contiguous():
        return part.flatten()[index]
    return part[tuple(torch.from_numpy(i) for i in np.unravel_index(index.numpy(), part.shape))]


def histogram_distance(real: torch.Tensor, fake: torch.Tensor) -> list[float]:
    """Wasserstein-1 distance between the intensity distributions of real and generated voxels, per channel."""
    generator = torch.Generator().manual_seed(0)
    return [float(stats.wasserstein_distance(channel_values(real, c, generator).numpy(),
                                             channel_values(fake, c, generator).numpy()))
            for c in range(real.shape[1])]


def sample_patches(fake: torch.Tensor, patch_size: int, wanted: int, generator: torch.Generator,
                   max_bytes: int = 2**28) -> torch.Tensor:
    """All patches of ``fake`` [N, C, ...] as double rows, or, when they would take more than ``max_bytes``
    (large 3D samples), ``wanted`` of them gathered at random positions without building the rest."""
    window = fake.shape[1] * patch_size ** _spatial(fake)
    count = len(fake) * math.prod(max(1, s - patch_size + 1) for s in fake.shape[2:])
    if count * window * 8 <= max_bytes:
        return extract_patches(fake, patch_size).double()
    return gather_patches(fake, patch_size, wanted, generator)[0].double()


def _image_patches(real: torch.Tensor, patch_size: int, wanted: int, generator: torch.Generator,
                   max_bytes: int = 2**28) -> tuple[torch.Tensor, torch.Tensor]:
    """The training image's patches with their corners: all of them when they fit in ``max_bytes``, else a random
    ``wanted`` (a large 3D image has millions)."""
    dims = _spatial(real)
    window = real.shape[1] * patch_size**dims
    count = math.prod(max(1, s - patch_size + 1) for s in real.shape[2:])
    if count * window * 8 <= max_bytes:
        positions = torch.stack(torch.meshgrid(*[torch.arange(max(1, s - patch_size + 1)) for s in real.shape[2:]],
                                               indexing="ij"), -1).reshape(-1, dims)
        return extract_patches(real, patch_size).double(), positions
    patches, corners = gather_patches(real, patch_size, wanted, generator)
    return patches.double(), corners


FLAT_PATCH = 0.01  # a patch whose standard deviation is below this share of the image's range is flat
MIN_TEXTURED = 16  # fewer textured patches than this on either side: the memorisation ratio is not measurable


def memorisation(real: torch.Tensor, fake: torch.Tensor, patch_size: int = 7, max_patches: int = 2048,
                 seed: int = 0, threshold: float = 0.5) -> dict:
    """How close sample patches come to training patches, against the image's own patch-to-patch distances.

    For each sample patch, the distance to its nearest training patch; for each training patch, the distance to its
    nearest training patch that does not overlap it. A model that copies its input gives sample distances far below
    the image's own (``ratio`` near 0). That alone does not prove copying: samples collapsed onto one flat value also
    sit next to the image's flat background patches. So the other direction is measured too, each training patch's
    distance to its nearest sample patch, over their distance to the image's mean patch (``coverage_ratio``): a copy
    reproduces every part of the image (near 0), a collapse misses most of it (near 1 or above). ``copying`` is
    flagged when both ratios are below ``threshold``.

    The sample -> image ratio is taken over textured patches only (standard deviation above ``FLAT_PATCH`` of the
    image's range), on both sides: where most of an image is a constant frame (a brain centred in a large field of
    view), the median of the image's own nearest distances is zero and a ratio over every patch means nothing
    (a 256^3 run printed 9.7e11). Flat patches next to flat patches say nothing about copying. With fewer than
    ``MIN_TEXTURED`` textured patches on either side the ratio is ``None`` (not measurable) and nothing is flagged.
    """
    generator = torch.Generator().manual_seed(seed)
    fake_patches = sample_patches(fake, patch_size, 16 * max_patches, generator)
    real_patches, positions = _image_patches(real, patch_size, 32 * max_patches, generator)
    chosen = torch.randperm(len(real_patches), generator=generator)[:max_patches]
    flat_below = FLAT_PATCH * float(real.max() - real.min())
    real_textured = torch.nonzero(real_patches.std(1) > flat_below).flatten()
    fake_textured = torch.nonzero(fake_patches.std(1) > flat_below).flatten()
    textured = real_textured[torch.randperm(len(real_textured), generator=generator)[:max_patches]]
    fake_chosen = fake_patches[fake_textured[torch.randperm(len(fake_textured), generator=generator)[:max_patches]]]
    ratio = own_median = nearest_median = None
    if min(len(textured), len(fake_chosen)) >= MIN_TEXTURED:
        own_median = float(_nearest_apart(real_patches, positions, textured, patch_size, max_patches).median())
        nearest_median = float(_nearest(fake_chosen, real_patches, 4 * max_patches).median())
        ratio = nearest_median / max(own_median, 1e-12)
    # Coverage searches many sample patches (all of them up to ``16 * max_patches``), in chunks so memory stays small.
    pool = fake_patches[torch.randperm(len(fake_patches), generator=generator)[:16 * max_patches]]
    covered = _nearest(real_patches[chosen], pool, 4 * max_patches)
    # Coverage is scaled by the distance of the image's patches to their mean patch: 1 means the samples reproduce
    # the image no better than one flat average patch would, 0 that every image patch is reproduced exactly. Means,
    # not medians: when most of an image is flat background, the median patch is background, and samples collapsed
    # onto that value would seem to cover the image.
    spread = (real_patches[chosen] - real_patches.mean(0)).norm(dim=1).mean().clamp_min(1e-12)
    coverage_ratio = float(covered.mean() / spread)
    return {"sample_to_real_median": nearest_median, "real_to_real_median": own_median,
            "real_to_sample_mean": float(covered.mean()), "ratio": ratio, "coverage_ratio": coverage_ratio,
            "textured_share": {"image": len(real_textured) / len(real_patches),
                               "samples": len(fake_textured) / len(fake_patches)},
            "copying": ratio is not None and ratio < threshold and coverage_ratio < threshold}


def _nearest(queries: torch.Tensor, pool: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each query row, the distance to its nearest row of ``pool``, searched ``chunk`` rows at a time."""
    return torch.stack([torch.cdist(queries, part).min(1).values for part in pool.split(chunk)]).min(0).values


def _nearest_apart(patches: torch.Tensor, positions: torch.Tensor, chosen: torch.Tensor, patch_size: int,
                   chunk: int) -> torch.Tensor:
    """For each chosen patch, the distance to its nearest patch that does not overlap it; in chunks, so a large 3D
    image does not build gigabytes of distances and overlap masks (the overlap test is int64 [chosen, part, dims])."""
    own = torch.full((len(chosen),), float("inf"), dtype=patches.dtype)
    for start in range(0, len(patches), chunk):
        part = slice(start, start + chunk)
        distances = torch.cdist(patches[chosen], patches[part])
        overlap = (positions[chosen][:, None, :] - positions[None, part, :]).abs().max(-1).values < patch_size
        distances[overlap] = float("inf")
        own = torch.minimum(own, distances.min(1).values)
    return own


def extremes(real: torch.Tensor, fake: torch.Tensor, margin: float = 0.02) -> dict:
    """Share of voxels within ``margin`` (of the [-1, 1] range) of the image's minimum or maximum, in the image and in
    the samples, and ``stuck``: of the voxels the image keeps off those ends, the share the samples put there."""

    low, high = float(real.min()), float(real.max())
    band = margin * (high - low)

    def at_end(x: torch.Tensor) -> float:  # counted sample by sample: a large set's masks would take gigabytes
        return sum(int(((s <= low + band) | (s >= high - band)).sum()) for s in x) / x.numel()

    real_share, fake_share = at_end(real), at_end(fake)
    return {"real": real_share, "samples": fake_share, "stuck": stuck_share(fake_share, real_share)}


# A verdict of OK needs samples whose patches reproduce the image clearly better than its flat mean patch does
# (coverage ratio below this; healthy runs of the quality study measure 0.18 to 0.47, failed ones 0.79 to 1.42).
MAX_COVERAGE = 0.7
# ... and intensities like the image's: histograms overlapping at least this much, per channel,
MIN_OVERLAP = 0.5
# ... with background (the image's darkest band) where the image has it: when at least BACKGROUND_SHARE of the
# image's voxels lie in the band, samples must put at least half as many there.
BACKGROUND_BAND = 0.05
BACKGROUND_SHARE = 0.1


def intensity_match(real: torch.Tensor, fake: torch.Tensor, bins: int = 64) -> dict:
    """Per channel: the overlap of the image's and the samples' intensity histograms (1: the same distribution,
    0: disjoint), over the image's range, and the share of voxels in the image's darkest band (its lowest
    ``BACKGROUND_BAND`` of the range: the background of a scan) in the image and in the samples."""
    generator = torch.Generator().manual_seed(0)
    overlap, background_real, background_fake = [], [], []
    for channel in range(real.shape[1]):
        values = [channel_values(x, channel, generator).double() for x in (real, fake)]
        low, high = float(values[0].min()), float(values[0].max())
        span = max(high - low, 1e-12)
        # Samples beyond the image's range count in the end bins: intensities the image never has are still unlike.
        counts = [torch.histc(v.clamp(low, high), bins=bins, min=low, max=low + span) / v.numel() for v in values]
        overlap.append(float(torch.minimum(*counts).sum()))
        band = low + BACKGROUND_BAND * span
        background_real.append(float((values[0] <= band).double().mean()))
        background_fake.append(float((values[1] <= band).double().mean()))
    return {"histogram_overlap": overlap, "background_image": background_real, "background_samples": background_fake}


def intensity_failure(match: dict) -> str | None:
    """Why the samples' intensities are unlike the image's (see ``intensity_match``), or None when they are alike."""
    for channel, (overlap, image, samples) in enumerate(zip(
            match["histogram_overlap"], match["background_image"], match["background_samples"])):
        where = f" in channel {channel}" if len(match["histogram_overlap"]) > 1 else ""
        if image >= BACKGROUND_SHARE and samples < 0.5 * image:
            return (f"the samples have no background{where}: {samples:.0%} of their voxels lie in the image's "
                    f"darkest band against the image's {image:.0%}")
        if overlap < MIN_OVERLAP:
            return f"the samples' intensity histogram{where} overlaps the image's by only {overlap:.0%}"
    return None


BLUR_BASELINE_SIGMA = 1.0  # voxels: the baseline that samples must beat in SWD (see ``structure_failure``)


def blurred_baseline_swd(real: torch.Tensor, patch_size: int = 7, levels: int = 4, seed: int = 0) -> float:
    """The multi-scale SWD of the image against a copy of itself blurred by ``BLUR_BASELINE_SIGMA`` voxels: what a
    model that only learnt the image's blurred shape would score. Measured: 0.33 on the example MRI, 0.26 on the
    5 mm ICBM template, 0.28 on the anisotropic T1 (failed runs of them: 0.32 - 0.68; the 54-minute 3D preset 0.12)."""
    from consingan.nn.resample import gaussian_blur  # the pyramid's own blur, as the images were made

    blurred = gaussian_blur(real, [BLUR_BASELINE_SIGMA] * (real.dim() - 2))
    return multiscale_swd(real, blurred, patch_size, levels, seed=seed)["mean"]


def structure_failure(structure: dict) -> str | None:
    """Why the samples have less of the image's structure than a blurred copy of it (None when they have more)."""
    if structure["swd"] <= structure["blurred_swd"]:
        return None
    return (f"the samples' patches are farther from the image's (SWD {structure['swd']:.3f}) than those of a copy of "
            f"it blurred by {BLUR_BASELINE_SIGMA:g} voxel ({structure['blurred_swd']:.3f}): blobs without the "
            f"image's structure")


# Samples that pass every other check but vary by less than this share of the image's spread (SinGAN's diversity)
# stay near one image: as augmentations they add little. Measured (issue 22): anchored runs on the smooth 5 mm ICBM
# template 0.07 - 0.14 (samples the template's blurred silhouette, nearly one another); runs of the quality studies
# that pass the other checks 0.26 and more (benchmarks/QUALITY.md, "near-copies of a smooth template").
LOW_DIVERSITY = 0.15


def verdict(diversity_value: float, memo: dict, collapse_diversity: float = 0.05, stuck: float = 0.0,
            max_stuck: float = 0.4, intensities: dict | None = None, structure: dict | None = None,
            low_diversity: float = LOW_DIVERSITY) -> tuple[str, str]:
    """(label, explanation): 'copying' (samples close to the image both ways: they return it), 'collapse' (samples
    do not vary and miss the image, or sit at the ends of its range where the image has structure), 'failed' (they
    are no closer to the image than a flat average, their intensities are unlike the image's: no background where it
    has one, or, given ``structure`` (``swd`` and ``blurred_swd``), their patches are farther from the image's than a
    blurred copy's), 'low diversity' (they are like the image but vary by less than ``low_diversity``: near copies of
    one image, or below ``collapse_diversity`` while covering it) or 'ok'."""
    if stuck > max_stuck:
        return "collapse", (f"{stuck:.0%} of the voxels the image keeps off its minimum and maximum sit there in the "
                            f"samples: the generator is stuck at the ends of its range")
    if memo["copying"]:
        return "copying", (f"sample patches match training patches ({memo['ratio']:.2f}) and cover the image "
                           f"({memo['coverage_ratio']:.2f}): the model returns its training image")
    if diversity_value < collapse_diversity and memo["coverage_ratio"] >= 0.5:
        return "collapse", (f"samples do not vary (diversity {diversity_value:.3f}) and miss most of the image "
                            f"(coverage ratio {memo['coverage_ratio']:.2f}): mode collapse")
    if memo["coverage_ratio"] >= MAX_COVERAGE:
        return "failed", (f"the samples reproduce the image's patches no better than a flat average would "
                          f"(coverage ratio {memo['coverage_ratio']:.2f}, OK needs below {MAX_COVERAGE}): the model "
                          f"has not learnt the image")
    reason = intensity_failure(intensities) if intensities is not None else None
    if reason is None and structure is not None:
        reason = structure_failure(structure)
    if reason is not None:
        return "failed", reason
    if diversity_value < low_diversity:
        return "low diversity", (f"samples barely vary (diversity {diversity_value:.3f}, OK needs {low_diversity:g} "
                                 f"or more): they stay near one image and add little as augmentations")
    return "ok", (f"samples vary (diversity {diversity_value:.2f}), are not copies and cover the image (coverage "
                  f"ratio {memo['coverage_ratio']:.2f}) with its intensities")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of all values of ``a`` and ``b`` (1: equal up to brightness and contrast)."""
    x, y = a.double().flatten(), b.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()).clamp_min(1e-12))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    mse = F.mse_loss(a, b).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, in 2D or 3D, averaged over channels."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    sigmas = [sigma] * _spatial(a)
    mu_a, mu_b = gaussian_blur(a, sigmas), gaussian_blur(b, sigmas)
    var_a = gaussian_blur(a * a, sigmas) - mu_a**2
    var_b = gaussian_blur(b * b, sigmas) - mu_b**2
    cov = gaussian_blur(a * b, sigmas) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


class InceptionStem(torch.nn.Module):
    """The layers of Inception-v3 that SinGAN's SIFID reads: three 3x3 convs, max pooling, a 1x1 and a 3x3 conv (each
    conv with batch norm and ReLU), giving the 192-channel map just before the second pooling, on the image at its own
    size (no resizing to 299). Weights come only from a local file the user gives: an Inception-v3 state dict whose keys
    ``Conv2d_1a_3x3.conv.weight`` ... this module matches (torchvision's ImageNet weights, the ones SinGAN's published
    SIFID used, or pytorch-fid's ``pt_inception-...pth``, whose values differ); nothing is downloaded."""

    # name, input channels, output channels, kernel, stride, padding; max pooling after Conv2d_2b_3x3
    _LAYERS = (("Conv2d_1a_3x3", 3, 32, 3, 2, 0), ("Conv2d_2a_3x3", 32, 32, 3, 1, 0), ("Conv2d_2b_3x3", 32, 64, 3, 1, 1),
               ("Conv2d_3b_1x1", 64, 80, 1, 1, 0), ("Conv2d_4a_3x3", 80, 192, 3, 1, 0))
    _POOL_AFTER = "Conv2d_2b_3x3"
    MIN_SIZE = 19  # the smallest side that still leaves a 1 x 1 map after the last conv

    def __init__(self) -> None:
        super().__init__()
        for name, cin, cout, kernel, stride, padding in self._LAYERS:
            block = torch.nn.Module()
            block.conv = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
            block.bn = torch.nn.BatchNorm2d(cout, eps=0.001)
            self.add_module(name, block)

    @classmethod
    def from_file(cls, path: str) -> "InceptionStem":
        from consingan.checkpoint import load_state
        from consingan.errors import ConsinganError

        state = load_state(path)
        module = cls()
        # Batch-norm step counters are not weights; files saved without them are fine.
        wanted = [key for key in module.state_dict() if not key.endswith("num_batches_tracked")]
        missing = [key for key in wanted if key not in state]
        if missing:
            raise ConsinganError(f"{path} is not an Inception-v3 state dict (missing {missing[0]})")
        module.load_state_dict({key: state[key] for key in wanted}, strict=False)
        return module.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] (grey is repeated to RGB) -> feature vectors [P, 192], one per position of
        the map before the second pooling (SinGAN's SIFID feeds its images in [-1, 1] at their own size too)."""
        from consingan.errors import ConsinganError

        if min(x.shape[2:]) < self.MIN_SIZE:
            raise ConsinganError(f"SIFID's Inception features need images of at least {self.MIN_SIZE} pixels a side, "
                                 f"got {tuple(x.shape[2:])}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        for name, *_ in self._LAYERS:
            block = getattr(self, name)
            x = F.relu(block.bn(block.conv(x)))
            if name == self._POOL_AFTER:
                x = F.max_pool2d(x, 3, stride=2)
        return x.movedim(1, -1).reshape(-1, x.shape[1])
