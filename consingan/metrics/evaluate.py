"""``consingan evaluate``: every measure of a trained pyramid in one JSON file, a table and a PNG report."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from consingan.checkpoint import save_json
from consingan.errors import ConsinganError
from consingan.io import read_volume
from consingan.io.preview import contact_sheet
from consingan.metrics import measures
from consingan.singan.pyramid import resize
from consingan.singan.sampler import TrainedPyramid


@dataclass
class EvaluateConfig:
    """Options of ``consingan evaluate``."""

    num: int = 16  # samples drawn
    seed: int = 0  # seed of the samples, patch choices and projections
    patch_size: int = 7  # patch width for SWD and the memorisation check
    swd_levels: int = 4  # Laplacian levels
    memorisation_threshold: float = 0.5  # flag copying below this ratio of sample-to-real over real-to-real distance
    inception_weights: str = ""  # local Inception-v3 state dict (pytorch-fid's) for the standard 2D SIFID
    device: str = "cpu"


def training_image(pyramid: TrainedPyramid) -> torch.Tensor:
    """The training image at the finest trained scale, in [-1, 1], image channels only: [1, C, *spatial]."""
    config = pyramid.run.config
    volume = read_volume(config.image, config.dimension)
    channels = pyramid.image_channels
    low, high = pyramid.intensity.minimum[:channels], pyramid.intensity.maximum[:channels]
    array = type(pyramid.intensity)(low, high).normalise(volume.array)
    return resize(torch.from_numpy(array)[None], pyramid.shapes[-1])


def evaluate(run_dir: Path | str, options: EvaluateConfig | None = None) -> dict:
    """Compute every measure for ``run_dir`` (its furthest completed scale); returns a JSON-ready dict."""
    options = options or EvaluateConfig()
    if options.num < 2:
        raise ConsinganError("--num must be at least 2 (diversity needs several samples)")
    pyramid = TrainedPyramid.load(run_dir, device=options.device)
    real = training_image(pyramid)
    channels = pyramid.image_channels
    fake = pyramid.sample(options.num, seed=options.seed)[:, :channels].float()
    with torch.no_grad():
        reconstruction = pyramid.generator(pyramid.generator.reconstruction_inputs()).cpu()[:, :channels]
    return {
        "run": str(Path(run_dir).resolve()),
        "scale": pyramid.num_stages - 1,
        "shape": list(pyramid.shapes[-1]),
        "settings": asdict(options),
        **compute_measures(real, fake, reconstruction, options),
    }


def compute_measures(real: torch.Tensor, fake: torch.Tensor, reconstruction: torch.Tensor,
                     options: EvaluateConfig) -> dict:
    """All measures for a real image [1, C, ...], samples [N, C, ...] and a reconstruction [1, C, ...] in [-1, 1]."""
    features = measures.RandomFeatures(real.dim() - 2, real.shape[1], seed=options.seed)
    extra = {}
    if options.inception_weights:
        if real.dim() != 4 or real.shape[1] not in (1, 3):
            raise ConsinganError("SIFID with Inception features needs a 2D grey or RGB image")
        inception = measures.InceptionStem.from_file(options.inception_weights)
        extra["sifid_inception"] = measures.single_image_frechet(real, fake, inception)
    return {
        **extra,
        "swd": measures.multiscale_swd(real, fake, options.patch_size, options.swd_levels, seed=options.seed),
        "random_feature_frechet": measures.single_image_frechet(real, fake, features),
        "diversity": measures.diversity(real, fake),
        "histogram_w1": measures.histogram_distance(real, fake),
        "memorisation": measures.memorisation(real, fake, options.patch_size, seed=options.seed,
                                              threshold=options.memorisation_threshold),
        "reconstruction": {"psnr": measures.psnr(reconstruction, real), "ssim": measures.ssim(reconstruction, real)},
        "_arrays": {"real": real, "fake": fake},
    }


def write_report(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """evaluation.json (every number and the settings) and report.png (samples, histograms, loss curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = result.pop("_arrays")
    out_dir.mkdir(parents=True, exist_ok=False)
    save_json(out_dir / "evaluation.json", result)
    real, fake = arrays["real"], arrays["fake"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].imshow(contact_sheet([real[0].numpy(), *[f.numpy() for f in fake[:15]]], columns=4))
    axes[0].set_title("real (first) and samples")
    axes[0].axis("off")
    for channel in range(real.shape[1]):
        axes[1].hist(real[:, channel].flatten().numpy(), bins=64, range=(-1, 1), density=True, alpha=0.5,
                     label=f"real c{channel}")
        axes[1].hist(fake[:, channel].flatten().numpy(), bins=64, range=(-1, 1), density=True, alpha=0.5,
                     histtype="step", linewidth=1.5, label=f"generated c{channel}")
    axes[1].set_title("intensities (normalised)")
    axes[1].legend(fontsize=7)
    run = Path(result["run"])
    for scale_folder in sorted(run.glob("scale_*")):
        log = scale_folder / "losses.csv"
        if log.is_file():
            with open(log) as stream:
                rows = list(csv.DictReader(stream))
            axes[2].plot([float(r["reconstruction"]) for r in rows], label=scale_folder.name)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("epoch")
    axes[2].set_title("reconstruction loss per scale")
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "report.png", dpi=80)
    plt.close(figure)
    return out_dir / "evaluation.json", out_dir / "report.png"


def summary_rows(result: dict) -> list[tuple[str, str]]:
    memo = result["memorisation"]
    rows = [(f"SWD level {i}", f"{v:.4f}") for i, v in enumerate(result["swd"]["per_level"])]
    rows += [
        ("SWD mean", f"{result['swd']['mean']:.4f}"),
        ("Frechet (random features)", f"{result['random_feature_frechet']:.4f}"),
        ("diversity", f"{result['diversity']:.4f}"),
        ("histogram W1 per channel", ", ".join(f"{v:.4f}" for v in result["histogram_w1"])),
        ("memorisation ratio", f"{memo['ratio']:.3f}" + ("  COPYING" if memo["copying"] else "")),
        ("reconstruction PSNR", f"{result['reconstruction']['psnr']:.2f} dB"),
        ("reconstruction SSIM", f"{result['reconstruction']['ssim']:.4f}"),
    ]
    if "sifid_inception" in result:
        rows.append(("SIFID (Inception)", f"{result['sifid_inception']:.4f}"))
    return rows
