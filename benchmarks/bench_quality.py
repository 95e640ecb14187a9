"""Sample quality at fixed small budgets on real images, setting against setting, optionally beside the official
ConSinGAN.

    python benchmarks/bench_quality.py                                  # every image, every setting that applies
    python benchmarks/bench_quality.py --images cell ihc --settings default gp-image --jobs 2
    python benchmarks/bench_quality.py --images cell ihc --reference /scratch/ConSinGAN   # add the official code

Each run is one `consingan train` process with one thread (``--jobs`` of them at a time), judged afterwards with the
measures of `consingan evaluate` on 25 samples: multi-scale SWD on 7-wide patches (x1e3, lower is closer to the
image), its coarsest level, diversity, the coverage ratio (image patches to their nearest sample patch, over the
image's own; large when samples miss parts of the image) and the verdict. All measures are taken in the source's
min-max space, so settings with different intensity mappings, and the reference's samples, compare directly.

``--reference DIR`` runs tohinz/ConSinGAN from a checkout you place in DIR (never copied into this repository) with
``--not_cuda`` on the 2D images, at the same stages, epochs, sizes and channels, on the identical PNG the engine
reads (grey images are given as RGB, as the reference expects). Its two imports used only for TensorBoard image grids
and for harmonisation augmentations (torchvision, albumentations) are replaced by empty stand-ins written into the
work folder; nothing else of it is changed. Its own sample folder holds JPEG files, and JPEG's 8 x 8 block
quantisation moves the finest Laplacian level's patch statistics (an engine sample set measured 223 at that level as
lossless PNG and 201 after a JPEG round trip); so a small driver, run with the reference's Python, loads its trained
generator and draws ``--samples`` new samples with its own noise sampler, written as lossless 8-bit PNG like the
engine's, and those are measured with `consingan evaluate --samples`.

Prints one table and writes benchmarks/quality.json (merged by image and setting) and a contact sheet per run
(real image first) under the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"


@dataclass(frozen=True)
class StudyImage:
    """A real image of the study and the budget it is trained at."""

    path: Path
    dim: int
    size: int  # longest side after resizing (2D: the PNG both programs read; 3D: max_size)
    min_size: int
    num_scales: int
    channels: int  # feature channels
    epochs: int
    rgb: bool = False  # written as an RGB PNG for both programs (the reference reads RGB only)
    note: str = ""
    only: tuple[str, ...] = ()  # the settings studied on this image (all when empty)


IMAGES = {
    "cell": StudyImage(DATA / "cell.png", 2, 64, 25, 4, 32, 150, rgb=True,
                       note="grey microscopy, one bright cell on a flat background"),
    "ihc": StudyImage(ROOT / "data" / "ihc.png", 2, 64, 25, 4, 32, 150, rgb=True,
                      note="RGB immunohistochemistry, glands and nuclei"),
    "coffee": StudyImage(DATA / "coffee.png", 2, 64, 25, 4, 32, 150, rgb=True,
                         note="natural photograph, a cup of coffee on a wooden table (issue 26's study set)"),
    "brick": StudyImage(DATA / "brick.png", 2, 64, 25, 4, 32, 150, rgb=True,
                        note="regular texture, a brick wall (issue 26's study set)"),
    "grass": StudyImage(DATA / "grass.png", 2, 64, 25, 4, 32, 150, rgb=True,
                        note="stochastic texture, grass (issue 26's study set)"),
    "ct": StudyImage(DATA / "ct_slice.npy", 2, 64, 25, 4, 32, 150, note="CT slice in scanner units, air to bone",
                     only=("default", "minmax", "preset")),
    "mri": StudyImage(DATA / "aniso_vox.nii.gz", 3, 48, 12, 3, 8, 60,
                      note="T1 MRI 58x58x24 at 4x4x5 mm, heavy bright tail"),
    "beads": StudyImage(DATA / "beads3d.npy", 3, 48, 12, 3, 8, 60,
                        note="3D fluorescence stack of beads 32x64x64, sparse with a heavy bright tail"),
}

# The official ConSinGAN's architecture (no critic batch norm, no CBAM, padding 0, bicubic) with this engine's training.
REFERENCE_LAYERS = {"batch_norm": False, "cbam": False, "padding": 0, "upsampling": "cubic"}

MICROSCOPY_PRESET = str(ROOT / "presets" / "microscopy-2d.yaml")

SETTINGS: dict[str, dict] = {
    "default": {},
    "gp-image": {"gradient_penalty": "image"},
    "minmax": {"intensity_mapping": "minmax"},
    "window-99.9": {"window_high_percentile": 99.9},
    "padding0": {"padding": 0},
    "cubic": {"upsampling": "cubic"},
    "gsteps1": {"Gsteps": 1},
    "no-bn": {"batch_norm": False},
    "no-bn-cbam": {"batch_norm": False, "cbam": False},
    "no-bn-pad0": {"batch_norm": False, "padding": 0},
    "no-bn-cubic": {"batch_norm": False, "upsampling": "cubic"},
    "no-bn-window-99.9": {"batch_norm": False, "window_high_percentile": 99.9},
    "no-bn-window-100": {"batch_norm": False, "window_high_percentile": 100.0},
    "no-bn-noise-0.2": {"batch_norm": False, "noise_amp": 0.2},
    "reference-layers": REFERENCE_LAYERS,
    "reference-layers-noise-0.15": {**REFERENCE_LAYERS, "noise_amp": 0.15},
    "reference-layers-gsteps2": {**REFERENCE_LAYERS, "Gsteps": 2},
    "reference-layers-minmax": {**REFERENCE_LAYERS, "intensity_mapping": "minmax"},
    "reference-layers-minmax-repeat": {**REFERENCE_LAYERS, "intensity_mapping": "minmax", "generator_update": "repeat"},
    "no-bn-repeat": {"batch_norm": False, "generator_update": "repeat"},
    "repeat": {"generator_update": "repeat"},
    "no-bn-repeat-noise-0.2": {"batch_norm": False, "generator_update": "repeat", "noise_amp": 0.2},
    "no-bn-repeat-pad0": {"batch_norm": False, "generator_update": "repeat", "padding": 0},
    "no-bn-cbam-repeat": {"batch_norm": False, "cbam": False, "generator_update": "repeat"},
    "no-bn-repeat-cubic": {"batch_norm": False, "generator_update": "repeat", "upsampling": "cubic"},
    "preset": {"config": MICROSCOPY_PRESET},
    "preset-principal": {"config": MICROSCOPY_PRESET, "colour_axes": "principal"},
    # A coarsest scale large enough to hold a regular texture's period (brick's 4.9 px at 64 px is 1.9 px at 25 px,
    # below the grid's Nyquist limit of 2 px).
    "preset-min-40": {"config": MICROSCOPY_PRESET, "min_size": 40},
    "preset-min-32": {"config": MICROSCOPY_PRESET, "min_size": 32},
    "preset-min-48": {"config": MICROSCOPY_PRESET, "min_size": 48},
    # Samples from a moving average of the generator's weights (issue 26's diversity levers).
    "preset-ema-0.95": {"config": MICROSCOPY_PRESET, "ema_decay": 0.95},
    "preset-ema-0.99": {"config": MICROSCOPY_PRESET, "ema_decay": 0.99},
    # The coarsest stage anchored on the coarsest real image (as the 3D first command): a layout to vary about.
    "preset-anchor": {"config": MICROSCOPY_PRESET, "anchor_layout": 0.25},
    "preset-anchor-1.0": {"config": MICROSCOPY_PRESET, "anchor_layout": 1.0},
    "preset-anchor-2.0": {"config": MICROSCOPY_PRESET, "anchor_layout": 2.0},
    "preset-anchor-3.0": {"config": MICROSCOPY_PRESET, "anchor_layout": 3.0},
    "preset-anchor-4.0": {"config": MICROSCOPY_PRESET, "anchor_layout": 4.0},
    "preset-anchor-3.0-warp": {"config": MICROSCOPY_PRESET, "anchor_layout": 3.0,
                               "anchor_warp": 3.0, "anchor_warp_target": 1.0},
    # ... with its anchor deformed as far as it takes two samples to differ by 1.0 (about the reference's diversity)
    "preset-anchor-warp": {"config": MICROSCOPY_PRESET, "anchor_layout": 0.5,
                           "anchor_warp": 3.0, "anchor_warp_target": 1.0},
}


def applies(setting: str, image: StudyImage) -> bool:
    return not ("cubic" in str(SETTINGS[setting]) and image.dim == 3) and (not image.only or setting in image.only)


def prepare_image(name: str, image: StudyImage, work: Path) -> Path:
    """2D: the image resized (antialiased, the engine's resize) to ``size`` and written as the PNG both programs read;
    3D: the file as it is (the engine's max_size does the resizing)."""
    if image.dim == 3:
        return image.path
    from consingan.io import read_volume
    from consingan.nn.resample import resize

    volume = read_volume(image.path, 2)
    scale = image.size / max(volume.spatial_shape)
    shape = [max(1, round(s * scale)) for s in volume.spatial_shape]
    array = resize(torch.from_numpy(volume.array)[None], shape)[0].numpy()
    if image.path.suffix == ".npy":
        out = work / f"{name}.npy"
        np.save(out, array[0].astype(np.float32))
        return out
    low, high = float(volume.array.min()), float(volume.array.max())
    pixels = np.clip(np.round((array - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    if image.rgb and pixels.shape[0] == 1:
        pixels = np.repeat(pixels, 3, axis=0)
    import SimpleITK as sitk

    out = work / f"{name}.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(pixels, 0, -1), isVector=True), str(out))
    return out


def one_thread_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def seed_suffix(seed: int) -> str:
    """Run names carry the seed, except seed 0 (the study's first seed)."""
    return "" if seed == 0 else f"_s{seed}"


def train_engine(name: str, image: StudyImage, path: Path, setting: str, work: Path, seed: int) -> dict:
    run_name = f"{name}_{setting}{seed_suffix(seed)}"
    run_dir = work / "runs" / run_name
    if (run_dir / f"scale_{image.num_scales - 1:02d}" / "scale.json").is_file():
        return {"run_dir": run_dir, "seconds": json.loads((run_dir / "bench_time.json").read_text())["seconds"]}
    if run_dir.exists():  # an interrupted study: start that run again
        shutil.rmtree(run_dir)
    options = dict(SETTINGS[setting])
    command = [sys.executable, "-c", "from consingan.cli import run; run()", "train", "--image", str(path), "--dim", str(image.dim),
               "--epochs", str(image.epochs), "--num-scales", str(image.num_scales), "--max-size", str(image.size),
               "--min-size", str(image.min_size), "--num-feature-channels", str(image.channels),
               "--preview-every", "0", "--checkpoint-every", "0", "--seed", str(seed), "--device", "cpu",
               "--out-dir", str(work / "runs"), "--run-name", run_name]
    if "config" in options:
        command += ["--config", options.pop("config")]
    for key, value in options.items():
        flag = "--" + key.lower().replace("_", "-")
        command += [flag if value is not False else "--no-" + flag[2:]] + ([] if isinstance(value, bool) else [str(value)])
    started = time.perf_counter()
    result = subprocess.run(command, env=one_thread_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{run_name} failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    (run_dir / "bench_time.json").write_text(json.dumps({"seconds": seconds}))
    return {"run_dir": run_dir, "seconds": seconds}


_STUBS = {
    "albumentations/__init__.py": (
        "# Stand-in: the reference imports these only for harmonisation augmentations, unused in generation.\n"
        "HueSaturationValue = IAAAdditiveGaussianNoise = GaussNoise = OneOf = Compose = MultiplicativeNoise = None\n"
        "ToSepia = ChannelDropout = ChannelShuffle = Cutout = InvertImg = None\n"),
    "torchvision/__init__.py": "",
    "torchvision/utils.py": (
        "# Stand-in: the reference uses make_grid only for a TensorBoard image.\n"
        "def make_grid(images, nrow=8, normalize=False):\n    return images[0]\n"),
}


def train_reference(name: str, image: StudyImage, path: Path, reference: Path, work: Path, seed: int) -> dict:
    stubs = work / "reference_stubs"
    for relative, text in _STUBS.items():
        (stubs / relative).parent.mkdir(parents=True, exist_ok=True)
        (stubs / relative).write_text(text)
    out = work / "reference" / f"{name}{seed_suffix(seed)}"
    done = out / "bench_time.json"
    if done.is_file():
        return json.loads(done.read_text()) | {"samples": Path(json.loads(done.read_text())["samples"])}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = one_thread_env()
    env["PYTHONPATH"] = os.pathsep.join([str(stubs), str(reference)])
    command = [os.environ.get("REFERENCE_PYTHON", sys.executable), str(reference / "main_train.py"),
               "--input_name", str(path.resolve()), "--not_cuda", "--train_mode", "generation",
               "--train_stages", str(image.num_scales), "--niter", str(image.epochs), "--max_size", str(image.size),
               "--min_size", str(image.min_size), "--nfc", str(image.channels), "--manualSeed", str(seed)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"reference on {name} failed: {(result.stderr or result.stdout).strip().splitlines()[-3:]}")
    folders = sorted(out.glob(f"TrainedModels/**/gen_samples_stage_{image.num_scales - 1}"))
    if not folders:
        raise RuntimeError(f"reference on {name} wrote no samples of stage {image.num_scales - 1}")
    done.write_text(json.dumps({"seconds": seconds, "samples": str(folders[-1])}))
    return {"seconds": seconds, "samples": folders[-1]}


_REFERENCE_SAMPLER = '''"""Draws samples from a trained official ConSinGAN with its own noise sampler; writes lossless 8-bit PNG files.

Run with the reference's Python and the reference on PYTHONPATH: python reference_sampler.py MODEL_DIR OUT NUM SEED
"""
import struct
import sys
import zlib
from pathlib import Path

import torch

import ConSinGAN.functions as functions


def write_png(path, pixels):
    """8-bit RGB PNG from a [H, W, 3] uint8 array, with the standard library only (the reference's Python and this
    engine's need no imaging package in common)."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\\x00" + pixels[row].tobytes() for row in range(height))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


model_dir, out_dir, num, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
load = lambda name: torch.load(model_dir / name, map_location="cpu", weights_only=False)  # its own pickles
generator, noise_amp, reals = load("G.pth"), load("noise_amp.pth"), load("reals.pth")
shapes = [real.shape for real in reals]
generator.opt.device = torch.device("cpu")
torch.manual_seed(seed)
out_dir.mkdir(parents=True, exist_ok=True)
with torch.no_grad():
    for index in range(num):
        sample = generator(functions.sample_random_noise(len(reals) - 1, shapes, generator.opt), shapes, noise_amp)
        pixels = ((sample[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        write_png(out_dir / f"sample_{index:04d}.png", pixels)
'''


def reference_samples(job: dict, work: Path, reference: Path, num: int) -> Path:
    """``num`` lossless samples of a finished reference run (drawn once, then reused)."""
    out = Path(job["samples"]).parent / f"lossless_samples_{num}"
    if len(list(out.glob("sample_*.png"))) == num:
        return out
    script = work / "reference_sampler.py"
    script.write_text(_REFERENCE_SAMPLER)
    env = one_thread_env()
    env["PYTHONPATH"] = os.pathsep.join([str(work / "reference_stubs"), str(reference)])
    command = [os.environ.get("REFERENCE_PYTHON", sys.executable), str(script), str(Path(job["samples"]).parent),
               str(out), str(num), "0"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sampling the reference failed: {(result.stderr or result.stdout).strip().splitlines()[-3:]}")
    return out


def measure(job: dict, image: StudyImage, path: Path, work: Path, num: int, reference: Path | None = None) -> dict:
    """``num`` samples of an engine run, or of a reference run (``reference``: its checkout), measured and sheeted."""
    from consingan.io.preview import contact_sheet, write_png
    from consingan.metrics.evaluate import EvaluateConfig, evaluate, evaluate_samples

    if "samples" in job:  # the reference: measure lossless samples drawn from its trained generator
        job = {**job, "samples": reference_samples(job, work, reference, num)}
    options = EvaluateConfig(num=num, seed=0)
    if "run_dir" in job:
        result = evaluate(job["run_dir"], options)
        health = [json.loads(p.read_text()).get("health", {}).get("warnings", [])
                  for p in sorted(Path(job["run_dir"]).glob("scale_*/scale.json"))]
    else:
        result = evaluate_samples(path, job["samples"], image.dim, options)
        health = []
    arrays = result.pop("_arrays")
    sheet = contact_sheet([arrays["real"][0].numpy(), *[f.numpy() for f in arrays["fake"][:11]]], columns=4,
                          min_panel=128)
    write_png(work / "sheets" / f"{job['label']}.png", sheet)
    return {
        "swd_x1e3": 1e3 * result["swd"]["mean"], "swd_coarse_x1e3": 1e3 * result["swd"]["per_level"][-1],
        "diversity": result["diversity"], "coverage_ratio": result["memorisation"]["coverage_ratio"],
        "memorisation_ratio": result["memorisation"]["ratio"], "verdict": result["verdict"]["label"],
        "at_range_ends": result["extremes"],
        "histogram_w1": result["histogram_w1"], "seconds": job["seconds"],
        "health_warnings": sum(len(w) for w in health), "samples": num,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="+", default=list(IMAGES), choices=list(IMAGES))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--reference", type=Path, help="checkout of tohinz/ConSinGAN (2D images only)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and setting")
    parser.add_argument("--epochs", type=int, help="override every image's epochs per scale")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "quality", help="runs, samples and sheets")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "quality.json")
    parser.add_argument("--samples", type=int, default=100, help="samples measured per run")
    args = parser.parse_args()
    args.work = args.work.resolve()  # the reference runs in its own folder: every path it gets must be absolute
    (args.work / "sheets").mkdir(parents=True, exist_ok=True)
    images = {n: IMAGES[n] for n in args.images}
    if args.epochs:
        from dataclasses import replace

        images = {n: replace(i, epochs=args.epochs) for n, i in images.items()}
    paths = {n: prepare_image(n, i, args.work) for n, i in images.items()}
    jobs = []
    for seed in args.seeds:
        for name, image in images.items():
            if args.reference and image.dim == 2 and image.rgb:
                jobs.append((name, "reference", seed, lambda n=name, i=image, r=seed: train_reference(
                    n, i, paths[n], args.reference.resolve(), args.work, r)))
            for setting in args.settings:
                if applies(setting, image):
                    jobs.append((name, setting, seed, lambda n=name, i=image, s=setting, r=seed: train_engine(
                        n, i, paths[n], s, args.work, r)))

    def run(job):
        name, setting, seed, start = job
        try:
            outcome = start()
            outcome["label"] = f"{name}_{setting}{seed_suffix(seed)}"
            row = measure(outcome, images[name], paths[name], args.work, args.samples,
                          args.reference.resolve() if args.reference else None)
        except Exception as error:  # one failed run must not stop the study
            row = {"error": str(error)}
        print(f"done {name} {setting} seed {seed}: {row}", flush=True)
        return name, setting, seed, row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run, jobs))

    stored = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for name, setting, seed, row in rows:
        stored.setdefault(name, {}).setdefault(setting, {})[str(seed)] = row
    budgets = {n: {"epochs": i.epochs, "num_scales": i.num_scales, "size": i.size, "min_size": i.min_size,
                   "channels": i.channels, "note": i.note} for n, i in images.items()}
    stored.setdefault("_budget", {}).update(budgets)
    args.results.write_text(json.dumps(stored, indent=1) + "\n")
    print_table(rows)


def print_table(rows: list) -> None:
    """One line per image and setting: means over seeds (and the range of SWD when there are several)."""
    header = f"{'image':8} {'setting':11} {'seeds':>5} {'SWD':>7} {'SWD range':>13} {'coarse':>7} {'divers.':>7} " \
             f"{'cover.':>7} {'verdicts':>18} {'warn':>4} {'minutes':>7}"
    print(header)
    print("-" * len(header))
    groups: dict = {}
    for name, setting, seed, row in rows:
        groups.setdefault((name, setting), []).append(row)
    for (name, setting), group in groups.items():
        good = [r for r in group if "error" not in r]
        for row in group:
            if "error" in row:
                print(f"{name:8} {setting:11} failed: {row['error']}")
        if not good:
            continue
        mean = {key: float(np.mean([r[key] for r in good])) for key in
                ("swd_x1e3", "swd_coarse_x1e3", "diversity", "coverage_ratio", "seconds")}
        swd = [r["swd_x1e3"] for r in good]
        verdicts = ",".join(sorted({r["verdict"] for r in good}))
        span = f"{min(swd):.0f}-{max(swd):.0f}" if len(good) > 1 else ""
        print(f"{name:8} {setting:11} {len(good):5d} {mean['swd_x1e3']:7.1f} {span:>13} {mean['swd_coarse_x1e3']:7.1f} "
              f"{mean['diversity']:7.3f} {mean['coverage_ratio']:7.2f} {verdicts:>18} "
              f"{sum(r['health_warnings'] for r in good):4d} {mean['seconds'] / 60:7.1f}")


if __name__ == "__main__":
    main()
