"""``consingan evaluate``: every measure of a trained pyramid in one JSON file, a table and a PNG report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from consingan.checkpoint import save_json
from consingan.errors import ConsinganError
from consingan.io import IntensityRange, list_images, read_volume
from consingan.io.preview import contact_sheet, write_png
from consingan.metrics import measures
from consingan.outputs import OutputFolder, human_bytes
from consingan.nn.resample import resize
from consingan.runs import RunFolder
from consingan.devices import available_bytes
from consingan.singan.sampler import TrainedPyramid


@dataclass
class EvaluateConfig:
    """Options of ``consingan evaluate``."""

    num: int = 16  # samples drawn
    seed: int = 0  # seed of the samples, patch choices and projections
    patch_size: int = 7  # patch width for SWD and the memorisation check
    swd_levels: int = 4  # Laplacian levels
    memorisation_threshold: float = 0.5  # flag copying below this ratio of sample-to-real over real-to-real distance
    collapse_diversity: float = 0.05  # samples less diverse than this are a collapse (or a copy, see verdict)
    low_diversity: float = measures.LOW_DIVERSITY  # like the image but less diverse than this: 'low diversity'
    # A local Inception-v3 state dict for SinGAN's 2D SIFID (its layer before the second pooling, image at its own
    # size): torchvision's ImageNet weights give numbers comparable with published SIFID for 8-bit RGB images spanning
    # 0..255 (the measurement space then maps values as SinGAN does); pytorch-fid's file loads too, with other values.
    inception_weights: str = ""
    device: str = "auto"
    tile: int | str = "auto"  # samples and reconstruction in tiles: 'auto', 'off' or a side (TrainedPyramid.sample)


def measurement_space(source: np.ndarray) -> IntensityRange:
    """Every measure is taken with the source image's min-max map onto [-1, 1], whatever map a run trained with, so
    runs with different intensity mappings, and other programs' samples, are measured alike."""
    return IntensityRange.of(source, "minmax")


def training_image(pyramid: TrainedPyramid) -> tuple[torch.Tensor, IntensityRange]:
    """The training image at the finest trained scale in the measurement space, image channels only:
    [1, C, *spatial], and that space's map."""
    volume = pyramid.run.read_source("image")  # the run's copy (an older run: the file config.json names)
    space = measurement_space(volume.array)
    return resize(torch.from_numpy(space.normalise(volume.array))[None], pyramid.shapes[-1]), space


SAMPLING_BYTES = 2**28  # generator activations allowed at once while drawing the samples to evaluate


def sampling_batch(pyramid: TrainedPyramid) -> int:
    """Samples generated at once: 8 for small images, fewer (down to 1) for large volumes, so that the generator's
    feature maps (about eight alive at a time) stay near ``SAMPLING_BYTES``. Samples do not depend on it."""
    noise = pyramid.generator.noise_shape(pyramid.num_stages - 1, pyramid.shapes[-1])
    per_sample = 8 * 4 * pyramid.generator.num_feature_channels * int(np.prod(noise[2:]))
    return int(max(1, min(8, SAMPLING_BYTES // per_sample)))


def _to_space(images: torch.Tensor, trained: IntensityRange, space: IntensityRange) -> torch.Tensor:
    """Generator outputs [N, C, ...] (the run's map) -> the measurement space."""
    return torch.stack([torch.from_numpy(space.normalise(trained.denormalise(image.numpy()))) for image in images])


def evaluate(run_dir: Path | str, options: EvaluateConfig | None = None) -> dict:
    """Compute every measure for ``run_dir`` (its furthest completed scale); returns a JSON-ready dict."""
    options = options or EvaluateConfig()
    if options.num < 2:
        raise ConsinganError("--num must be at least 2 (diversity needs several samples)")
    family = RunFolder.open(run_dir).family
    if family == "conditional":
        return evaluate_conditional(run_dir, options)
    if family != "singan":
        raise ConsinganError(f"{run_dir} is a {family} run; evaluate judges single-image runs (consingan train) and "
                             f"conditional runs")
    pyramid = TrainedPyramid.load(run_dir, device=options.device)
    check_samples_fit(options.num, pyramid.channels, pyramid.shapes[-1])
    real, space = training_image(pyramid)
    channels = pyramid.image_channels
    trained = pyramid.intensity.channels(channels)
    batch = sampling_batch(pyramid)
    # Batch by batch into the measurement space, so the generator's raw outputs of the whole set are never held too.
    fake = torch.empty((options.num, channels, *pyramid.shapes[-1]))
    for first in range(0, options.num, batch):
        count = min(batch, options.num - first)
        images = pyramid.sample(count, seed=options.seed, batch_size=batch, first_index=first, tile=options.tile)
        fake[first:first + count] = _to_space(images[:, :channels].float(), trained, space)
    reconstruction = _to_space(pyramid.reconstruct(tile=options.tile)[:, :channels], trained, space)
    return {
        "run": str(Path(run_dir).resolve()),
        "scale": pyramid.num_stages - 1,
        "notes": list(pyramid.notes),  # an unfinished run says so (in evaluation.json too)
        "shape": list(pyramid.shapes[-1]),
        "settings": asdict(options),
        **compute_measures(real, fake, reconstruction, options),
        "_loss_logs": pyramid.run.loss_logs(),
    }


EVALUATION_COPIES = 8  # copies of the samples alive at once while measuring (samples, measurement space, patches)


def check_samples_fit(num: int, channels: int, shape: Sequence[int]) -> None:
    """Evaluation holds every sample in memory (diversity and coverage compare them all): a ``--num`` whose samples
    would not fit the free memory is refused, with what would, before any is drawn."""
    per_sample = EVALUATION_COPIES * channels * math.prod(shape) * 4
    free = available_bytes(torch.device("cpu"))
    if num * per_sample > 0.9 * free:
        raise ConsinganError(f"--num {num} would hold about {human_bytes(num * per_sample)} of samples in memory but "
                             f"{human_bytes(free)} are free; evaluate fewer (--num "
                             f"{max(2, int(0.9 * free // per_sample))} would fit)")


def image_features(images: torch.Tensor, features: measures.RandomFeatures) -> np.ndarray:
    """One vector per image [N, width]: its random features averaged over positions."""
    return np.stack([features(image[None]).mean(0).double().numpy() for image in images])


def class_consistency(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray,
                      num_classes: int) -> dict:
    """Nearest-class-centroid classification on image features standardised by the real set: the share of samples
    given their own class (chance: 1 / classes), beside the same classifier on the real images (leave-one-out),
    the ceiling this measure can show on this set."""
    mean, std = real.mean(0), real.std(0) + 1e-8
    real, fake = (real - mean) / std, (fake - mean) / std
    centroids = np.stack([real[real_labels == k].mean(0) for k in range(num_classes)])

    def predict(x: np.ndarray) -> np.ndarray:
        return np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)

    loo = []
    for index in range(len(real)):
        own = real_labels[index]
        members = (real_labels == own)
        members[index] = False
        if not members.any():
            continue
        held_out = centroids.copy()
        held_out[own] = real[members].mean(0)
        loo.append(np.argmin(((real[index] - held_out) ** 2).sum(-1)) == own)
    return {"accuracy": float((predict(fake) == fake_labels).mean()), "chance": 1.0 / num_classes,
            "real_accuracy_leave_one_out": float(np.mean(loo)) if loo else None}


def evaluate_conditional(run_dir: Path | str, options: EvaluateConfig) -> dict:
    """A conditional run: per class and overall, the random-feature Frechet distance (positions of every image),
    multi-scale SWD and diversity of ``options.num`` EMA samples against the class's training images, and class
    consistency. Measured in the set's min-max space."""
    from consingan.conditional.data import kept_labelled, load_labelled
    from consingan.conditional.sampler import TrainedConditional

    model = TrainedConditional.load(run_dir, options.device)
    config, info = model.run.config, model.run.info
    check_samples_fit(options.num * len(info.classes), info.channels, [config.size] * config.dimension)
    data = kept_labelled(model.run) or load_labelled(config.data, config.dimension, config.size, config.fit,
                                                     config.intensity_mapping, int(config.seed))
    space = IntensityRange(info.intensity.minimum, info.intensity.maximum)
    real = _to_space(data.images, info.intensity, space)
    fakes = [_to_space(model.sample(name, options.num, options.seed), info.intensity, space) for name in info.classes]
    features = measures.RandomFeatures(config.dimension, info.channels, seed=options.seed)
    inception = None
    if options.inception_weights:
        if config.dimension != 2 or info.channels not in (1, 3):
            raise ConsinganError("Frechet distances on Inception features need 2D grey or RGB images")
        inception = measures.InceptionStem.from_file(options.inception_weights)
    per_class = {}
    for index, (name, fake) in enumerate(zip(info.classes, fakes)):
        members = real[data.labels == index]
        per_class[name] = {
            "real_images": len(members),
            "random_feature_frechet": measures.frechet_distance(features(members).double().numpy(),
                                                                features(fake).double().numpy()),
            "swd": measures.multiscale_swd(members, fake, options.patch_size, options.swd_levels, seed=options.seed),
            "diversity": measures.diversity(members, fake),
        }
        if inception is not None:
            per_class[name]["inception_frechet"] = measures.frechet_distance(
                inception(members).double().numpy(), inception(fake).double().numpy())
    fake_all = torch.cat(fakes)
    fake_labels = np.repeat(np.arange(len(info.classes)), options.num)
    consistency = class_consistency(image_features(real, features), data.labels.numpy(),
                                    image_features(fake_all, features), fake_labels, len(info.classes))
    firsts = torch.stack([real[data.labels == k][0] for k in range(len(info.classes))])
    return {
        "run": str(Path(run_dir).resolve()), "family": "conditional", "scale": None,
        "shape": [config.size] * config.dimension, "classes": info.classes, "settings": asdict(options),
        "random_feature_frechet": measures.frechet_distance(features(real).double().numpy(),
                                                            features(fake_all).double().numpy()),
        "swd": measures.multiscale_swd(real, fake_all, options.patch_size, options.swd_levels, seed=options.seed),
        "diversity": float(np.mean([c["diversity"] for c in per_class.values()])),
        "histogram_w1": measures.histogram_distance(real, fake_all),
        "class_consistency": consistency,
        "per_class": per_class,
        "_arrays": {"real": firsts, "fake": torch.stack([f[i] for i in range(min(3, options.num)) for f in fakes])},
        "_loss_logs": {},
    }


def evaluate_samples(image: Path | str, samples: Path | str, spatial_dims: int,
                     options: EvaluateConfig | None = None) -> dict:
    """The same measures for samples written by any program (for example the official ConSinGAN) against ``image``:
    every readable file in the folder ``samples`` is one sample; the image is resized to the samples' shape."""
    options = options or EvaluateConfig()
    folder = Path(samples)
    if not folder.is_dir():
        raise ConsinganError(f"samples folder not found: {folder}")
    paths = list_images(folder, spatial_dims, series_folders=False)
    if len(paths) < 2:
        raise ConsinganError(f"{folder} holds {len(paths)} readable images; at least 2 are needed")
    volume = read_volume(image, spatial_dims)
    space = measurement_space(volume.array)
    arrays = []
    for path in paths:  # a constant sample is not an error here: it is the collapse the verdict exists to report
        array = read_volume(path, spatial_dims, check_values=False).array
        if not np.isfinite(array).all():
            raise ConsinganError(f"{path.name} contains NaN or infinite values")
        arrays.append(array)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].shape[0] != volume.channels:
        raise ConsinganError(f"samples in {folder} must share one shape with {volume.channels} channel(s); "
                             f"found {sorted(shapes)}")
    fake = torch.stack([torch.from_numpy(space.normalise(a)) for a in arrays])
    real = resize(torch.from_numpy(space.normalise(volume.array))[None], fake.shape[2:])
    measured = compute_measures(real, fake, None, options)
    return {"run": None, "samples": str(folder.resolve()), "image": str(Path(image).resolve()),
            "scale": None, "shape": list(fake.shape[2:]), "settings": asdict(options), **measured}


def compute_measures(real: torch.Tensor, fake: torch.Tensor, reconstruction: torch.Tensor | None,
                     options: EvaluateConfig) -> dict:
    """All measures for a real image [1, C, ...], samples [N, C, ...] and a reconstruction [1, C, ...] (or None) in
    [-1, 1]."""
    features = measures.RandomFeatures(real.dim() - 2, real.shape[1], seed=options.seed)
    extra = {}
    if options.inception_weights:
        if real.dim() != 4 or real.shape[1] not in (1, 3):
            raise ConsinganError("SIFID with Inception features needs a 2D grey or RGB image")
        inception = measures.InceptionStem.from_file(options.inception_weights)
        extra["sifid_inception"] = measures.single_image_frechet(real, fake, inception)
    diversity = measures.diversity(real, fake)
    memo = measures.memorisation(real, fake, options.patch_size, seed=options.seed,
                                 threshold=options.memorisation_threshold)
    ends = measures.extremes(real, fake)
    intensities = measures.intensity_match(real, fake)
    swd = measures.multiscale_swd(real, fake, options.patch_size, options.swd_levels, seed=options.seed)
    structure = {"swd": swd["mean"], "blurred_swd": measures.blurred_baseline_swd(
        real, options.patch_size, options.swd_levels, seed=options.seed)}
    label, reason = measures.verdict(diversity, memo, options.collapse_diversity, ends["stuck"],
                                     intensities=intensities, structure=structure,
                                     low_diversity=options.low_diversity)
    return {
        **extra,
        "swd": swd,
        "structure": structure,
        "random_feature_frechet": measures.single_image_frechet(real, fake, features),
        "diversity": diversity,
        "histogram_w1": measures.histogram_distance(real, fake),
        "memorisation": memo,
        "extremes": ends,
        "intensities": intensities,
        "verdict": {"label": label, "reason": reason},
        "reconstruction": None if reconstruction is None else {
            "psnr": measures.psnr(reconstruction, real), "ssim": measures.ssim(reconstruction, real),
            "pearson_r": measures.pearson(reconstruction, real)},
        "_arrays": {"real": real, "fake": fake},
    }


def write_report(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """evaluation.json (every number and the settings) and report.png (samples, histograms, loss curves) in the new
    folder ``out_dir``; a failed write (a full disk) leaves no partial folder."""
    with OutputFolder(out_dir):
        return _write_report_files(result, out_dir)


def _write_report_files(result: dict, out_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = result.pop("_arrays")
    save_json(out_dir / "evaluation.json", result)
    real, fake = arrays["real"], arrays["fake"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    sheet = contact_sheet([real[0].numpy(), *[f.numpy() for f in fake[:15]]], columns=4)
    write_png(out_dir / "samples.png", sheet)  # full resolution, beside the report's reduced copy
    axes[0].imshow(sheet)
    axes[0].set_title("real (first) and samples")
    axes[0].axis("off")
    for channel in range(real.shape[1]):
        axes[1].hist(real[:, channel].flatten().numpy(), bins=64, range=(-1, 1), density=True, alpha=0.5,
                     label=f"real c{channel}")
        axes[1].hist(fake[:, channel].flatten().numpy(), bins=64, range=(-1, 1), density=True, alpha=0.5,
                     histtype="step", linewidth=1.5, label=f"generated c{channel}")
    axes[1].set_title("intensities (normalised)")
    axes[1].legend(fontsize=7)
    logs = result.pop("_loss_logs", {})
    for label, rows in logs.items():
        axes[2].plot([r["reconstruction"] for r in rows], label=label)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("epoch")
    axes[2].set_title("reconstruction loss per scale")
    if logs:
        axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "report.png", dpi=80)
    plt.close(figure)
    return out_dir / "evaluation.json", out_dir / "report.png"


def summary_rows(result: dict) -> list[tuple[str, str]]:
    if result.get("family") == "conditional":
        return conditional_rows(result)
    memo = result["memorisation"]
    rows = [(f"SWD level {i}", f"{v:.4f}") for i, v in enumerate(result["swd"]["per_level"])]
    rows += [
        ("SWD mean", f"{result['swd']['mean']:.4f}"),
        *([("SWD of the image blurred by 1 voxel (OK needs less)", f"{result['structure']['blurred_swd']:.4f}")]
          if "structure" in result else []),
        ("Frechet (random features)", f"{result['random_feature_frechet']:.4f}"),
        ("diversity", f"{result['diversity']:.4f}"),
        ("histogram W1 per channel", ", ".join(f"{v:.4f}" for v in result["histogram_w1"])),
        ("memorisation ratio (samples -> image, textured patches)",
         "not measurable: too few textured patches" if memo["ratio"] is None else f"{memo['ratio']:.3f}"),
        ("coverage ratio (image -> samples)", f"{memo['coverage_ratio']:.3f}"),
        ("histogram overlap per channel", ", ".join(f"{v:.0%}" for v in result["intensities"]["histogram_overlap"])),
        ("background voxels (image / samples)", ", ".join(
            f"{a:.0%} / {b:.0%}" for a, b in zip(result["intensities"]["background_image"],
                                                 result["intensities"]["background_samples"]))),
        ("voxels at the range's ends (image / samples)",
         f"{result['extremes']['real']:.0%} / {result['extremes']['samples']:.0%}"),
        ("verdict", f"{result['verdict']['label'].upper()}: {result['verdict']['reason']}"),
    ]
    if result["reconstruction"] is not None:
        rows += [("reconstruction PSNR", f"{result['reconstruction']['psnr']:.2f} dB"),
                 ("reconstruction SSIM", f"{result['reconstruction']['ssim']:.4f}"),
                 ("reconstruction Pearson r", f"{result['reconstruction']['pearson_r']:.3f}")]
    if "sifid_inception" in result:
        rows.append(("SIFID (SinGAN's Inception layer)", f"{result['sifid_inception']:.4f}"))
    return rows


def conditional_rows(result: dict) -> list[tuple[str, str]]:
    consistency = result["class_consistency"]
    ceiling = consistency["real_accuracy_leave_one_out"]
    rows = [("Frechet (random features), all classes", f"{result['random_feature_frechet']:.4f}"),
            ("SWD mean, all classes", f"{result['swd']['mean']:.4f}"),
            ("diversity (mean over classes)", f"{result['diversity']:.4f}"),
            ("class consistency (samples given their class)",
             f"{consistency['accuracy']:.0%} (chance {consistency['chance']:.0%}"
             + (f", real images {ceiling:.0%})" if ceiling is not None else ")"))]
    for name, values in result["per_class"].items():
        rows.append((f"class {name}: Frechet / SWD / diversity",
                     f"{values['random_feature_frechet']:.4f} / {values['swd']['mean']:.4f} / "
                     f"{values['diversity']:.4f}"))
    return rows
