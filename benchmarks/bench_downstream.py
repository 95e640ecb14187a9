"""Downstream value of consingan's labelled samples: does a segmenter trained on one real labelled image get better
on held-out real data when consingan's (image, label) samples are added to classical augmentation?

    python benchmarks/bench_downstream.py --case nuclei2d --out out/downstream/nuclei2d          # 2D, shipped data
    python benchmarks/bench_downstream.py --case icbm3d --out out/downstream/icbm3d              # 3D, shipped data
    python benchmarks/bench_downstream.py --case nuclei2d --quick --out /tmp/downstream          # smoke run
    python benchmarks/bench_downstream.py --dim 3 --train-image ct.nii.gz --train-label seg.nii.gz \\
        --test-image ct2.nii.gz ct3.nii.gz --test-label seg2.nii.gz seg3.nii.gz --out out/downstream/mine
    python benchmarks/bench_downstream.py --dim 2 --train-image big.png --train-label big_mask.png \\
        --train-region 0:128,0:128 --test-region 256:512,0:256 256:512,256:512 --out out/downstream/crops

For every seed: consingan trains on the training pair with ``--label`` (image and label map generated jointly) and
draws ``--samples`` (image, label) samples; then the same small segmentation network (MONAI's ``UNet`` with a
Dice + cross-entropy loss) trains from the same initial weights for the same number of steps in three arms:

- ``classical``: random patches of the real pair with augmentation in the spirit of nnU-Net's defaults (MONAI
  transforms: rotation p 0.2, scaling p 0.2, mirroring of every axis p 0.5, Gaussian noise p 0.1, blur p 0.2,
  brightness p 0.15, contrast p 0.15, low-resolution simulation p 0.25, gamma p 0.3 and inverted gamma p 0.1);
- ``classical+consingan``: the same, each patch drawn from a consingan sample with probability ``--ratio``;
- ``consingan``: patches of consingan samples only (same augmentation).

Each network is scored by Dice per foreground class (the smallest label value is the background) on the held-out
pairs. **Label consistency**: the ``classical`` network applied to the consingan samples of its seed, scored
against their generated labels; beside it the same network on its own training pair (the ceiling such a score can
reach) and diagnostics of the decoding of the label channels (ties, agreement with the argmax of the generator's
raw output). Held-out pairs come from ``--test-image``/``--test-label`` files, or from ``--test-region`` boxes cut
out of them (by default out of the training image, away from ``--train-region``).

Prints a table (arm, mean Dice +- standard error over seeds, per class, per seed, the seconds of every stage) and
writes ``OUT/downstream.json`` and ``OUT/downstream.png``; consingan's runs and the training crops go to
``OUT/work``. Needs MONAI (``pip install "monai>=1.3"``); nothing is downloaded at run time. Method, data and
results: benchmarks/DOWNSTREAM.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
sys.path.insert(0, str(ROOT))

from consingan.config import TrainConfig, apply_overrides, load_config_file  # noqa: E402
from consingan.errors import ConsinganError  # noqa: E402
from consingan.io import Volume, read_volume, write_volume  # noqa: E402

ARMS = ("classical", "classical+consingan", "consingan")
DIVISOR = 8  # the UNet halves a patch three times: its sides must be multiples of this


@dataclass(frozen=True)
class Case:
    """A shipped labelled image and the rule that cuts its training and held-out regions."""

    dim: int
    image: Path
    label: Path
    train_region: str
    test_regions: tuple[str, ...]
    class_names: dict[int, str]
    note: str


CASES = {
    "nuclei2d": Case(2, DATA / "nuclei2d.png", DATA / "nuclei2d_mask.png", "0:128,0:128",
                     ("256:512,0:256", "256:512,256:512"), {0: "background", 1: "nucleus"},
                     "fluorescent nuclei (2018 Data Science Bowl, from StarDist's wheel): train on the top-left "
                     "128 x 128 crop, test on the two bottom 256 x 256 quadrants"),
    "icbm3d": Case(3, DATA / "icbm_t1_4mm.nii.gz", DATA / "icbm_tissue_4mm.nii.gz", "20:40,:,:", ("0:20,:,:",),
                   {0: "other", 1: "grey matter", 2: "white matter"},
                   "ICBM 2009a T1 template at 4 mm (an average of 152 brains) with grey/white-matter labels: train "
                   "on the superior half (axial slices 20-39), test on the inferior half (0-19)"),
}


@dataclass
class Budget:
    """What every stage may spend; ``--quick`` and the per-dimension defaults fill it, flags override it."""

    seeds: tuple[int, ...]
    gan: dict[str, Any]  # TrainConfig options of consingan's runs
    samples: int  # consingan samples drawn per seed
    steps: int  # optimiser steps of every arm
    batch_size: int
    patch: tuple[int, ...]
    unet_channels: tuple[int, ...]
    lr: float = 1e-3
    ratio: float = 0.5  # share of consingan patches in the mixed arm
    start_scale: int = 0  # consingan's sampling starts here (below it, the training image's coarse scales: its layout)


GAN_OPTIONS = {
    # The 2D microscopy preset's layers and generator step (presets/microscopy-2d.yaml) with the default percentile
    # window, which that preset recommends for fluorescence with a bright tail.
    2: dict(num_scales=4, min_size=24, max_size=128, epochs=150, num_feature_channels=32, batch_norm=False,
            cbam=False, padding=0, upsampling="cubic", generator_update="repeat"),
    # The default configuration table (better than the preset's layers for MRI in the quality study) on a CPU budget.
    3: dict(num_scales=3, min_size=12, max_size=48, epochs=150, num_feature_channels=16, generator_update="repeat",
            gradient_penalty_every=3),
}
QUICK_GAN = {2: dict(num_scales=2, min_size=16, max_size=32, epochs=8, num_feature_channels=8, padding=1),
             3: dict(num_scales=2, min_size=8, max_size=16, epochs=4, num_feature_channels=8)}


def default_budget(dim: int, quick: bool) -> Budget:
    gan = {**GAN_OPTIONS[dim], **(QUICK_GAN[dim] if quick else {})}
    if quick:
        patch = (16,) * dim
        return Budget((0, 1), gan, samples=3, steps=6, batch_size=2, patch=patch, unet_channels=(8, 16, 32, 64))
    if dim == 2:
        return Budget((0, 1, 2), gan, samples=32, steps=1000, batch_size=8, patch=(64, 64),
                      unet_channels=(16, 32, 64, 128))
    return Budget((0, 1, 2), gan, samples=16, steps=600, batch_size=4, patch=(16, 32, 32),
                  unet_channels=(16, 32, 64, 128))


# --- data ----------------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """An image [C, *spatial] (float32, z-scored per channel) and its label map [1, *spatial] as class indices."""

    image: np.ndarray
    label: np.ndarray
    name: str


def parse_region(text: str, shape: Sequence[int]) -> tuple[slice, ...]:
    """'a:b,c:d[,e:f]' (array axes, slowest first; an empty bound means the edge) -> slices inside ``shape``."""
    parts = text.split(",")
    if len(parts) != len(shape):
        raise ConsinganError(f"region {text!r} needs {len(shape)} comma-separated ranges (start:stop per axis)")
    slices = []
    for part, size in zip(parts, shape):
        bounds = part.split(":")
        try:
            start, stop = (int(bounds[0]) if bounds[0].strip() else 0,
                           int(bounds[1]) if len(bounds) > 1 and bounds[1].strip() else size)
        except (ValueError, IndexError):
            raise ConsinganError(f"region {text!r}: {part!r} is not start:stop") from None
        if len(bounds) != 2 or not 0 <= start < stop <= size:
            raise ConsinganError(f"region {text!r}: {part!r} must be start:stop with 0 <= start < stop <= {size}")
        slices.append(slice(start, stop))
    return tuple(slices)


def regions_overlap(a: Sequence[slice], b: Sequence[slice]) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))


def crop(volume: Volume, region: Sequence[slice]) -> Volume:
    """The part of ``volume`` inside ``region``, its affine moved to the crop's first voxel."""
    affine = np.array(volume.affine, dtype=np.float64)
    affine[:-1, -1] += affine[:-1, :-1] @ np.array([s.start for s in region], dtype=np.float64)
    array = np.ascontiguousarray(volume.array[(slice(None), *region)])
    return dataclasses.replace(volume, array=array, affine=affine)


def zscore(image: np.ndarray) -> np.ndarray:
    """Each channel to zero mean and unit variance (nnU-Net's normalisation of non-CT images, per image)."""
    flat = image.reshape(image.shape[0], -1)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    shape = (-1,) + (1,) * (image.ndim - 1)
    return ((image - mean.reshape(shape)) / np.maximum(std, 1e-6).reshape(shape)).astype(np.float32)


def to_indices(label: np.ndarray, classes: Sequence[int], name: str) -> np.ndarray:
    """Label values -> indices into ``classes``; a value the training label lacks is refused."""
    values = np.rint(label).astype(np.int64)
    unknown = sorted(set(np.unique(values).tolist()) - set(classes))
    if unknown:
        raise ConsinganError(f"{name} holds label values {unknown[:5]} that the training label map lacks")
    return np.searchsorted(np.asarray(classes, dtype=np.int64), values)  # classes are sorted


@dataclass
class Data:
    train: Pair
    test: list[Pair]
    classes: tuple[int, ...]
    train_files: tuple[Path, Path]  # the training crop as files consingan reads


def load_data(args: argparse.Namespace, work: Path) -> Data:
    """The training pair (cropped to ``--train-region``) and every held-out pair, checked against each other."""
    dim = args.dim
    image = read_volume(args.train_image, dim)
    label = read_volume(args.train_label, dim, check_values=False)
    if label.spatial_shape != image.spatial_shape:
        raise ConsinganError(f"{args.train_label} has shape {label.spatial_shape}, the image {image.spatial_shape}")
    train_region = parse_region(args.train_region, image.spatial_shape) if args.train_region else tuple(
        slice(0, n) for n in image.spatial_shape)
    image, label = crop(image, train_region), crop(label, train_region)
    classes = tuple(int(v) for v in np.unique(np.rint(label.array)))
    if len(classes) < 2:
        raise ConsinganError("the training label map holds a single class; nothing to segment")
    work.mkdir(parents=True, exist_ok=True)
    # Written as MHA (float image, integer label, the crop's geometry) so that any reader's input trains alike.
    image_file = write_volume(work / "train_image.mha", dataclasses.replace(image, suffix=".mha"))
    label_file = write_volume(work / "train_label.mha", dataclasses.replace(
        label, suffix=".mha", source_dtype=np.dtype(np.int32), header=None), source_dtype=True)
    train = Pair(zscore(image.array), to_indices(label.array, classes, "the training label"), "train")

    test_images = args.test_image or [args.train_image]
    test_labels = args.test_label or [args.train_label]
    if len(test_images) != len(test_labels):
        raise ConsinganError(f"{len(test_images)} --test-image but {len(test_labels)} --test-label")
    test = []
    for test_image, test_label in zip(test_images, test_labels):
        volume = read_volume(test_image, dim)
        truth = read_volume(test_label, dim, check_values=False)
        if truth.spatial_shape != volume.spatial_shape:
            raise ConsinganError(f"{test_label} has shape {truth.spatial_shape}, {test_image} {volume.spatial_shape}")
        regions = [parse_region(r, volume.spatial_shape) for r in args.test_region] if args.test_region else [
            tuple(slice(0, n) for n in volume.spatial_shape)]
        for index, region in enumerate(regions):
            if Path(test_image).resolve() == Path(args.train_image).resolve() and regions_overlap(region, train_region):
                raise ConsinganError(f"held-out region {index} of {test_image} overlaps the training region; give "
                                     f"--test-region boxes away from --train-region, or other --test-image files")
            name = f"{Path(test_image).name}[{','.join(f'{s.start}:{s.stop}' for s in region)}]"
            test.append(Pair(zscore(crop(volume, region).array), to_indices(
                crop(truth, region).array, classes, f"{test_label}"), name))
    return Data(train, test, classes, (image_file, label_file))


# --- consingan -----------------------------------------------------------------------------------------------------


class WarningReporter:
    """Quiet, but keeps the health warnings of the run and says when each scale ends."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def start_scale(self, stage, shape, epochs) -> None:
        pass

    def update(self, stage, epoch, losses) -> None:
        pass

    def end_scale(self, summary) -> None:
        print(f"    consingan scale {summary.stage} {tuple(summary.shape)} done in {summary.seconds:.0f} s", flush=True)

    def warn(self, stage: int, message: str) -> None:
        self.warnings.append(f"scale {stage}: {message}")


def train_gan(data: Data, options: dict[str, Any], dim: int, seed: int, work: Path, reuse: bool
              ) -> tuple[Path, list[str], bool]:
    """consingan trained on the training pair with its label map: (run folder, its health warnings, whether it was
    reused); an existing finished run is reused on request."""
    from consingan.runs import RunFolder
    from consingan.singan.trainer import train

    run_dir = work / "gan" / f"seed{seed}"
    if run_dir.exists():
        if reuse:
            run = RunFolder.open(run_dir, "singan")
            if len(run.completed_scales()) == run.config.num_scales:
                warnings = [f"scale {k}: {message}" for k in run.completed_scales()
                            for message in run.scale_meta(k).get("health", {}).get("warnings", [])]
                return run_dir, warnings, True
        raise ConsinganError(f"{run_dir} exists; pass --reuse-gan to use a finished run, or another --out")
    config = apply_overrides(TrainConfig(), {
        **options, "image": str(data.train_files[0]), "label": str(data.train_files[1]), "dimension": dim,
        "seed": seed, "out_dir": str(work / "gan"), "run_name": f"seed{seed}", "device": "cpu", "preview_every": 0,
        "checkpoint_every": 0}, "benchmark")
    reporter = WarningReporter()
    train(config, reporter)
    return run_dir, reporter.warnings, False


def decoding_checks(channels: np.ndarray, raw: np.ndarray, decoded: np.ndarray) -> tuple[float, float]:
    """(share of voxels whose largest label channel ``channels`` [K, *spatial] is tied with another, share on which
    the decoded class indices agree with the argmax of the ``raw`` channels)."""
    ordered = np.sort(channels, axis=0)
    return float(np.mean(ordered[-1] == ordered[-2])), float(np.mean(np.argmax(raw, axis=0) == decoded))


def draw_samples(run_dir: Path, count: int, seed: int, classes: Sequence[int], start_scale: int = 0
                 ) -> tuple[list[Pair], Pair, dict]:
    """``count`` samples of the run as Pairs, decoded as ``consingan sample`` writes them (on the source grid), the
    reconstruction of the training pair (the generator on its fixed reconstruction input) decoded alike, and
    diagnostics of that decoding: the share of voxels whose largest label channel is tied with another (after the
    map back to source units, which clips each channel to [0, 1]), and the share on which it agrees with the argmax
    of the generator's raw label channels."""
    from consingan.nn.resample import resize
    from consingan.singan.sampler import TrainedPyramid

    pyramid = TrainedPyramid.load(run_dir)
    raw = pyramid.sample(count, seed=seed, batch_size=min(8, count), start_scale=start_scale)
    volumes = pyramid.to_volumes(raw)
    image, label = pyramid.labels.split(pyramid.to_volumes(pyramid.reconstruct())[0].array)
    reconstruction = Pair(zscore(image), to_indices(label, classes, "the reconstruction"), "reconstruction")
    source_shape = tuple(pyramid.run.info.source_shape)
    if tuple(raw.shape[2:]) != source_shape:  # to_volumes resamples onto the source grid: the raw channels too
        raw = resize(raw, source_shape)
    encoding = pyramid.labels
    pairs, ties, agreement = [], [], []
    for index, volume in enumerate(volumes):
        image, label = encoding.split(volume.array)
        decoded = np.searchsorted(np.asarray(encoding.classes), label[0])
        tie, agree = decoding_checks(volume.array[encoding.image_channels:],
                                     raw[index, encoding.image_channels:].numpy(), decoded)
        ties.append(tie)
        agreement.append(agree)
        pairs.append(Pair(zscore(image), to_indices(label, classes, f"sample {index}"), f"sample_{index:04d}"))
    return pairs, reconstruction, {
        "tie_share": float(np.mean(ties)), "raw_argmax_agreement": float(np.mean(agreement)),
        "class_shares": [float(np.mean([np.mean(p.label == k) for p in pairs])) for k in range(len(classes))]}


# --- segmentation --------------------------------------------------------------------------------------------------


def augmentation(dim: int, seed: int):
    """Classical augmentation in the spirit of nnU-Net's defaults, as MONAI dictionary transforms."""
    from monai import transforms as T

    keys, spatial = ["image", "label"], "bilinear" if dim == 2 else "trilinear"
    angle = math.pi if dim == 2 else math.pi / 6  # nnU-Net: any angle in 2D, +-30 degrees about each axis in 3D
    rotate = dict(range_x=angle) if dim == 2 else dict(range_x=angle, range_y=angle, range_z=angle)
    sigma = {f"sigma_{axis}": (0.5, 1.0) for axis in "xyz"[:dim]}
    pipeline = T.Compose([
        T.RandRotated(keys, prob=0.2, mode=("bilinear", "nearest"), padding_mode="reflection", **rotate),
        T.RandZoomd(keys, prob=0.2, min_zoom=0.7, max_zoom=1.4, mode=(spatial, "nearest"), keep_size=True),
        T.RandGaussianNoised("image", prob=0.1, std=0.3),
        T.RandGaussianSmoothd("image", prob=0.2, **sigma),
        T.RandScaleIntensityd("image", prob=0.15, factors=0.25),
        T.RandScaleIntensityFixedMeand("image", prob=0.15, factors=0.25, preserve_range=True),
        T.RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0), upsample_mode=spatial),
        T.RandAdjustContrastd("image", prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        T.RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        *[T.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(dim)],
    ])
    pipeline.set_random_state(seed=seed)
    return pipeline


def random_patch(pair: Pair, patch: Sequence[int], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """A random box of ``patch`` voxels (an image smaller than it padded by reflection, its label by edge values)."""
    pad = [(0, 0)] + [(0, max(0, p - n)) for p, n in zip(patch, pair.label.shape[1:])]
    image = np.pad(pair.image, pad, mode="reflect" if all(n > 1 for n in pair.label.shape[1:]) else "edge")
    label = np.pad(pair.label, pad, mode="edge")
    starts = [int(rng.integers(0, n - p + 1)) for p, n in zip(patch, label.shape[1:])]
    box = (slice(None), *(slice(s, s + p) for s, p in zip(starts, patch)))
    return {"image": torch.from_numpy(np.ascontiguousarray(image[box])),
            "label": torch.from_numpy(np.ascontiguousarray(label[box]).astype(np.float32))}


def make_network(dim: int, in_channels: int, num_classes: int, channels: Sequence[int]) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=dim, in_channels=in_channels, out_channels=num_classes, channels=tuple(channels),
                strides=(2,) * (len(channels) - 1), num_res_units=2, norm="instance")


def train_segmenter(arm: str, real: Pair, synthetic: list[Pair], budget: Budget, num_classes: int, dim: int,
                    seed: int) -> torch.nn.Module:
    """One arm: the same initial weights, patch stream seed and number of steps; only where patches come from
    differs."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    network = make_network(dim, real.image.shape[0], num_classes, budget.unet_channels)
    optimiser = torch.optim.Adam(network.parameters(), lr=budget.lr, weight_decay=3e-5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: (1 - step / budget.steps) ** 0.9)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(seed)
    transform = augmentation(dim, seed)
    share = {"classical": 0.0, "classical+consingan": budget.ratio, "consingan": 1.0}[arm]
    network.train()
    for _ in range(budget.steps):
        items = []
        for _ in range(budget.batch_size):
            use_synthetic = rng.random() < share
            source = synthetic[int(rng.integers(len(synthetic)))] if use_synthetic else real
            items.append(transform(random_patch(source, budget.patch, rng)))
        images = torch.stack([torch.as_tensor(item["image"]).float() for item in items])
        labels = torch.stack([torch.as_tensor(item["label"]).round() for item in items])
        optimiser.zero_grad(set_to_none=True)
        loss = loss_function(network(images), labels)
        loss.backward()
        optimiser.step()
        schedule.step()
    return network.eval()


@torch.no_grad()
def dice_per_class(network: torch.nn.Module, pairs: Sequence[Pair], patch: Sequence[int], num_classes: int,
                   ignore_empty: bool = True) -> np.ndarray:
    """Dice of every foreground class, averaged over ``pairs``. A class absent from a pair's truth is left out of
    that pair's average (NaN when it is absent from all), or with ``ignore_empty=False`` scores 1 when the network
    predicts none of it too and 0 otherwise (for samples, whose labels may lack a class)."""
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=ignore_empty)
    for pair in pairs:
        logits = sliding_window_inference(torch.from_numpy(pair.image)[None], tuple(patch), 8, network,
                                          overlap=0.5, mode="gaussian")
        prediction = torch.nn.functional.one_hot(logits.argmax(1), num_classes).movedim(-1, 1)
        truth = torch.nn.functional.one_hot(torch.from_numpy(pair.label[0])[None], num_classes).movedim(-1, 1)
        metric(prediction, truth)
    scores = metric.get_buffer().numpy()
    with np.errstate(invalid="ignore"):
        return np.array([np.nanmean(scores[:, k]) if np.isfinite(scores[:, k]).any() else np.nan
                         for k in range(scores.shape[1])])


# --- one seed, and the summary over seeds -----------------------------------------------------------------------------


def run_seed(data: Data, budget: Budget, dim: int, seed: int, work: Path, reuse_gan: bool) -> dict:
    num_classes = len(data.classes)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    run_dir, warnings, reused = train_gan(data, budget.gan, dim, seed, work, reuse_gan)
    seconds["consingan_train"] = time.perf_counter() - started
    started = time.perf_counter()
    samples, reconstruction, decoding = draw_samples(run_dir, budget.samples, seed, data.classes, budget.start_scale)
    seconds["consingan_sample"] = time.perf_counter() - started
    result: dict[str, Any] = {"seed": seed, "run_dir": str(run_dir), "consingan_reused": reused,
                              "consingan_warnings": warnings,
                              "decoding": decoding, "arms": {}}
    for arm in ARMS:
        print(f"  seed {seed}: training arm {arm} ({budget.steps} steps)", flush=True)
        started = time.perf_counter()
        network = train_segmenter(arm, data.train, samples, budget, num_classes, dim, seed)
        seconds[f"train {arm}"] = time.perf_counter() - started
        started = time.perf_counter()
        per_class = dice_per_class(network, data.test, budget.patch, num_classes)
        result["arms"][arm] = {"dice": float(np.nanmean(per_class)), "per_class": per_class.tolist()}
        if arm == "classical":
            consistency = dice_per_class(network, samples, budget.patch, num_classes, ignore_empty=False)
            own = dice_per_class(network, [data.train], budget.patch, num_classes)
            result["label_consistency"] = {"dice": float(np.nanmean(consistency)), "per_class": consistency.tolist()}
            result["classical_on_training_pair"] = {"dice": float(np.nanmean(own)), "per_class": own.tolist()}
            # Where a gap between the two comes from: the reconstruction is the generator's closest image to the
            # training pair, so a label-to-image mismatch made by the encoding, the pyramid or the decoding shows
            # there too, while poor random samples alone do not.
            on_reconstruction = dice_per_class(network, [reconstruction], budget.patch, num_classes, False)
            result["classical_on_reconstruction"] = {"dice": float(np.nanmean(on_reconstruction)),
                                                     "per_class": on_reconstruction.tolist()}
            fidelity = label_dice(reconstruction.label, data.train.label, num_classes)
            result["reconstruction_label_vs_training_label"] = {"dice": float(np.nanmean(fidelity)),
                                                                "per_class": fidelity.tolist()}
        seconds[f"evaluate {arm}"] = time.perf_counter() - started
        print(f"  seed {seed}: {arm} held-out Dice {result['arms'][arm]['dice']:.3f}", flush=True)
    result["seconds"] = seconds
    return result


def label_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of every foreground class between two label maps of class indices (1 where both lack the class)."""
    scores = []
    for k in range(1, num_classes):
        in_a, in_b = a == k, b == k
        total = int(in_a.sum() + in_b.sum())
        scores.append(2.0 * np.logical_and(in_a, in_b).sum() / total if total else 1.0)
    return np.array(scores)


def mean_sem(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    sem = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else None
    return float(array.mean()), sem


def summarise(seeds: list[dict], class_names: list[str]) -> dict:
    """The per-seed results as means and standard errors over seeds, arms side by side."""

    def block(get) -> dict:
        per_seed = [get(s)["dice"] for s in seeds]
        mean, sem = mean_sem(per_seed)
        classes = {}
        for k, name in enumerate(class_names):
            values = [get(s)["per_class"][k] for s in seeds]
            class_mean, class_sem = mean_sem(values)
            classes[name] = {"mean": class_mean, "sem": class_sem, "per_seed": values}
        return {"dice_mean": mean, "dice_sem": sem, "dice_per_seed": per_seed, "per_class": classes}

    arms = {arm: block(lambda s, a=arm: s["arms"][a]) for arm in ARMS}
    consistency = block(lambda s: s["label_consistency"])
    classical = arms["classical"]["dice_mean"]
    consistency.update(
        ratio_to_classical_heldout=consistency["dice_mean"] / classical if classical > 0 else None,
        goal_ratio=0.8,
        classical_on_training_pair=block(lambda s: s["classical_on_training_pair"]),
        classical_on_reconstruction=block(lambda s: s["classical_on_reconstruction"]),
        reconstruction_label_vs_training_label=block(lambda s: s["reconstruction_label_vs_training_label"]),
        decoding={key: float(np.mean([s["decoding"][key] for s in seeds]))
                  for key in ("tie_share", "raw_argmax_agreement")})
    consistency["goal_met"] = bool(consistency["ratio_to_classical_heldout"] is not None and
                                   consistency["ratio_to_classical_heldout"] >= 0.8)
    gains = [s["arms"]["classical+consingan"]["dice"] - s["arms"]["classical"]["dice"] for s in seeds]
    gain, gain_sem = mean_sem(gains)
    # "By more than the seeds' standard error": larger than the paired difference's error and either arm's.
    errors = [e for e in (gain_sem, arms["classical"]["dice_sem"], arms["classical+consingan"]["dice_sem"])
              if e is not None]
    comparison = {"gain_mean": gain, "gain_sem": gain_sem, "gain_per_seed": gains,
                  "beats_classical_by_more_than_sem": bool(errors and gain > max(errors))}
    stages = list(seeds[0]["seconds"])
    seconds = {stage: float(np.mean([s["seconds"][stage] for s in seeds])) for stage in stages}
    return {"arms": arms, "label_consistency": consistency, "comparison": comparison, "seconds_mean": seconds}


def print_table(summary: dict, class_names: list[str]) -> None:
    def cell(mean: float, sem: float | None) -> str:
        return f"{mean:.3f} +- {sem:.3f}" if sem is not None else f"{mean:.3f}"

    header = f"{'':28} {'mean Dice':>15}  " + "  ".join(f"{n[:14]:>14}" for n in class_names) + "  per seed"
    print(header)
    rows = [(arm, summary["arms"][arm]) for arm in ARMS]
    consistency = summary["label_consistency"]
    rows += [("label consistency", consistency),
             ("classical on its training", consistency["classical_on_training_pair"]),
             ("classical on reconstruction", consistency["classical_on_reconstruction"]),
             ("reconstruction vs real label", consistency["reconstruction_label_vs_training_label"])]
    for name, row in rows:
        classes = "  ".join(f"{row['per_class'][n]['mean']:>14.3f}" for n in class_names)
        seeds = " ".join(f"{v:.3f}" for v in row["dice_per_seed"])
        print(f"{name:28} {cell(row['dice_mean'], row['dice_sem']):>15}  {classes}  {seeds}")
    comparison = summary["comparison"]
    ratio = consistency["ratio_to_classical_heldout"]
    print(f"gain of classical+consingan over classical: {cell(comparison['gain_mean'], comparison['gain_sem'])} "
          f"(beats it by more than the standard error: {comparison['beats_classical_by_more_than_sem']})")
    print(f"label consistency / classical held-out Dice: {ratio:.2f} (goal 0.8: {consistency['goal_met']}); "
          f"decoding: {consistency['decoding']['tie_share']:.4f} of voxels tied, "
          f"{consistency['decoding']['raw_argmax_agreement']:.4f} agree with the raw argmax")
    print("seconds per seed (mean): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds_mean"].items()))


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(arm, summary["arms"][arm]) for arm in ARMS] + [("label consistency\n(classical on samples)",
                                                             summary["label_consistency"])]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for x, (name, row) in enumerate(rows):
        axis.bar(x, row["dice_mean"], yerr=row["dice_sem"] or 0, capsize=6, alpha=0.75,
                 color="tab:grey" if x == len(ARMS) else f"C{x}")
        axis.scatter([x] * len(row["dice_per_seed"]), row["dice_per_seed"], color="black", s=12, zorder=5)
    axis.axhline(0.8 * summary["arms"]["classical"]["dice_mean"], color="grey", linestyle=":",
                 label="0.8 x classical (label-consistency goal)")
    axis.set_xticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    axis.set_ylabel("mean Dice (held-out real data; samples for the last bar)")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- command line --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=list(CASES), help="a shipped labelled image with its train/test regions")
    parser.add_argument("--dim", type=int, choices=(2, 3))
    parser.add_argument("--train-image", type=Path)
    parser.add_argument("--train-label", type=Path)
    parser.add_argument("--train-region", help="box of the training image used, 'a:b,c:d[,e:f]' in array order "
                        "(slowest axis first; an empty bound is the edge); default: all of it")
    parser.add_argument("--test-image", type=Path, nargs="+", help="held-out images (default: the training image)")
    parser.add_argument("--test-label", type=Path, nargs="+", help="their label maps, in the same order")
    parser.add_argument("--test-region", nargs="+", help="held-out boxes cut from every test image (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", help="one consingan run and three segmenters per seed")
    parser.add_argument("--samples", type=int, help="consingan samples drawn per seed")
    parser.add_argument("--ratio", type=float, help="share of consingan patches in the mixed arm (default 0.5)")
    parser.add_argument("--start-scale", type=int, help="consingan scale sampling starts at (0: new layouts; higher "
                        "keeps the training image's coarse layout, as consingan sample --start-scale)")
    parser.add_argument("--steps", type=int, help="optimiser steps of every arm")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--patch", help="training patch and inference window, one side or one per axis (a,b[,c]); "
                        f"multiples of {DIVISOR}")
    parser.add_argument("--unet-channels", help="channels of the UNet's levels, comma-separated (e.g. 16,32,64,128)")
    parser.add_argument("--lr", type=float, help="Adam's learning rate (polynomial decay to 0; default 1e-3)")
    parser.add_argument("--gan-epochs", type=int, help="consingan's epochs per scale")
    parser.add_argument("--gan-config", type=Path, help="YAML/TOML/JSON file of further consingan train options")
    parser.add_argument("--reuse-gan", action="store_true", help="reuse finished consingan runs under OUT/work")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets everywhere, two seeds")
    parser.add_argument("--out", type=Path, required=True, help="folder for downstream.json, the plot and work/")
    args = parser.parse_args(argv)
    if args.case:
        case = CASES[args.case]
        if args.dim not in (None, case.dim):
            parser.error(f"--case {args.case} is {case.dim}D")
        args.dim = case.dim
        if args.train_image is None:
            args.train_image, args.train_label = case.image, case.label
            args.train_region = args.train_region or case.train_region
            if not args.test_image and not args.test_region:
                args.test_region = list(case.test_regions)
    if args.dim is None or args.train_image is None or args.train_label is None:
        parser.error("give --case, or --dim with --train-image and --train-label")
    if not args.test_image and not args.test_region:
        parser.error("give held-out data: --test-image/--test-label files or --test-region boxes")
    return args


def budget_from(args: argparse.Namespace) -> Budget:
    budget = default_budget(args.dim, args.quick)
    if args.gan_config:
        budget.gan.update(load_config_file(args.gan_config))
    if args.gan_epochs:
        budget.gan["epochs"] = args.gan_epochs
    for name in ("samples", "steps", "batch_size", "lr", "ratio", "start_scale"):
        if getattr(args, name) is not None:
            setattr(budget, name, getattr(args, name))
    if args.seeds:
        budget.seeds = tuple(args.seeds)
    if args.patch:
        sides = tuple(int(v) for v in args.patch.split(","))
        budget.patch = sides * args.dim if len(sides) == 1 else sides
    if args.unet_channels:
        budget.unet_channels = tuple(int(v) for v in args.unet_channels.split(","))
    if len(budget.patch) != args.dim or any(p < DIVISOR or p % DIVISOR for p in budget.patch):
        raise ConsinganError(f"--patch needs {args.dim} sides, each a multiple of {DIVISOR}, got {budget.patch}")
    if len(budget.unet_channels) < 2 or 2 ** (len(budget.unet_channels) - 1) > DIVISOR:
        raise ConsinganError(f"--unet-channels needs 2 to {int(math.log2(DIVISOR)) + 1} levels")
    if not 0 <= budget.ratio <= 1 or min(budget.samples, budget.steps, budget.batch_size) < 1 or budget.start_scale < 0:
        raise ConsinganError("--ratio must be in [0, 1]; --samples, --steps and --batch-size positive; --start-scale "
                             "zero or more")
    return budget


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    budget = budget_from(args)
    out = args.out
    work = out / "work"
    data = load_data(args, work)  # every check of the data before the long import
    try:
        import monai
    except ImportError:
        raise SystemExit('bench_downstream needs MONAI: pip install "monai>=1.3"') from None
    tracking = monai.data.get_track_meta()
    monai.data.set_track_meta(False)  # plain tensors out of the transforms (a process-wide switch: restored below)
    try:
        return run_benchmark(args, argv, budget, data, work, out, monai)
    finally:
        monai.data.set_track_meta(tracking)


def run_benchmark(args: argparse.Namespace, argv: Sequence[str] | None, budget: "Budget", data, work: Path,
                  out: Path, monai) -> dict:
    """Every seed's stages, the summary, downstream.json and the plot (``main`` after its checks)."""
    case = CASES.get(args.case) if args.case else None
    names = [(case.class_names if case else {}).get(v, f"class {v}") for v in data.classes[1:]]
    print(f"training pair {data.train.image.shape[1:]} with classes {list(data.classes)}; {len(data.test)} held-out "
          f"pair(s); seeds {list(budget.seeds)}", flush=True)
    seeds = []
    for seed in budget.seeds:
        seeds.append(run_seed(data, budget, args.dim, seed, work, args.reuse_gan))
    summary = summarise(seeds, names)
    result = {
        "case": args.case, "note": case.note if case else "", "dim": args.dim, "classes": list(data.classes),
        "foreground_classes": names, "quick": args.quick,
        "command": " ".join(["python", "benchmarks/bench_downstream.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "data": {"train_image": str(args.train_image), "train_label": str(args.train_label),
                 "train_region": args.train_region, "train_shape": list(data.train.image.shape[1:]),
                 "test": [p.name for p in data.test]},
        "budget": {**dataclasses.asdict(budget), "seeds": list(budget.seeds)},
        "monai": monai.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        **summary, "per_seed": seeds,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "downstream.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_table(summary, names)
    plot(summary, out / "downstream.png", f"{args.case or Path(args.train_image).name}: "
         f"{len(budget.seeds)} seed(s), {budget.steps} steps per arm")
    print(f"wrote {out / 'downstream.json'} and {out / 'downstream.png'}")
    return result


if __name__ == "__main__":
    try:
        main()
    except ConsinganError as error:
        raise SystemExit(f"error: {error}") from None
