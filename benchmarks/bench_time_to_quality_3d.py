"""3D time to quality: wall time against sample quality for 3D settings, through the command line a user runs.

    python benchmarks/bench_time_to_quality_3d.py                     # the README's first command (mri-3d-quick), 3 seeds
    python benchmarks/bench_time_to_quality_3d.py --image benchmarks/data/aniso_vox.nii.gz --flags "--max-size 48"
    python benchmarks/bench_time_to_quality_3d.py --settings quick --epochs 40 60 100 --seeds 0   # a curve
    python benchmarks/bench_time_to_quality_3d.py --image scan.nii.gz --settings mri-3d-cpu --seeds 0 1 2 3 4   # retired preset
    python benchmarks/bench_time_to_quality_3d.py --settings seed-table --seeds 0 1 2 3 4 --jobs 5   # a GPU machine

Every run is ``consingan train --image IMAGE --dim 3`` with a setting (a preset file of ``presets/`` and/or flags)
and, where given, ``--epochs E``, one run at a time with ``--threads`` threads (default 2, the whole 2-core machine:
time nothing else beside it), then ``consingan evaluate RUN --num N``. A row holds the training's wall time (the
command's own, so outputs, previews and health checks count), the multi-scale SWD, diversity, coverage ratio,
histogram overlap, verdict and the reconstruction's Pearson r and PSNR. With several epoch budgets a setting draws a
curve (SWD, diversity and coverage against wall time, one PNG); with several seeds the table gives each seed's SWD and
the means. Rows are stored in ``--results`` (JSON) under a key naming the image, settings and seeds.

The targets of issue 22 for the README's first 3D command are printed beside the means: at most 300 s, SWD at most
0.15, diversity at least 0.39 and coverage ratio at most 0.56 (the retired 54-minute ``mri-3d-cpu`` preset's measures of 2026-11-23),
verdict ok and reconstruction Pearson r at least 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PRESETS = ROOT / "presets"

SETTINGS: dict[str, list[str]] = {
    # The README's first command: presets/mri-3d-quick.yaml (issue 22).
    "mri-3d-quick": ["--config", str(PRESETS / "mri-3d-quick.yaml")],
    # The same with stage 0 drawing its layout from noise alone (the preset before its anchor, 2026-12-02).
    "mri-3d-quick-free": ["--config", str(PRESETS / "mri-3d-quick.yaml"), "--anchor-layout", "0"],
    # The README's quick command before issue 22.
    "quick": ["--num-scales", "4", "--min-size", "14", "--epochs", "40", "--num-feature-channels", "16",
              "--preview-every", "20"],
    # The retired hour-long preset (presets/mri-3d-cpu.yaml until 2026-12-04): the seed's table with a CPU budget.
    "mri-3d-cpu": ["--num-scales", "5", "--min-size", "12", "--epochs", "300", "--num-feature-channels", "24",
                   "--preview-every", "100"],
    # ConSinGAN's configuration table itself, `consingan train`'s defaults (8 scales x 2000 epochs, 64 channels):
    # about 110 h a run on a 2-core CPU, so a sweep for a GPU machine (issue 22's seed sweep at the seed's table).
    "seed-table": [],
    # Candidates for a five-minute first command (issue 22): the reference's generator step, lazy penalty.
    "fast5": ["--num-scales", "5", "--min-size", "12", "--epochs", "120", "--num-feature-channels", "16",
              "--generator-update", "repeat", "--gradient-penalty-every", "3", "--preview-every", "0"],
    # The same with stage 0's coordinate channels, and with the generator's moving average besides.
    "fast5-coordinates": ["--num-scales", "5", "--min-size", "12", "--epochs", "120", "--num-feature-channels", "16",
                          "--generator-update", "repeat", "--gradient-penalty-every", "3", "--preview-every", "0",
                          "--coordinates"],
    "fast5-coordinates-ema": ["--num-scales", "5", "--min-size", "12", "--epochs", "120", "--num-feature-channels",
                              "16", "--generator-update", "repeat", "--gradient-penalty-every", "3", "--preview-every",
                              "0", "--coordinates", "--ema-decay", "0.95"],
}
TARGETS = {"seconds": 300.0, "swd": 0.15, "diversity": 0.39, "coverage": 0.56, "pearson_r": 0.9}


def consingan(*args: str, threads: int) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.run([sys.executable, "-m", "consingan.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=ROOT)


def train_and_measure(image: Path, setting: str, epochs: int | None, seed: int, work: Path, threads: int,
                      samples: int, extra: tuple[str, ...] = ()) -> dict:
    name = f"{setting}_e{epochs or 'preset'}_s{seed}"
    run = work / name
    if run.exists():
        raise SystemExit(f"{run} exists: choose another --work or delete it")
    flags = [*SETTINGS[setting], *(["--epochs", str(epochs)] if epochs else []), *extra]
    started = time.perf_counter()
    trained = consingan("train", "--image", str(image), "--dim", "3", "--seed", str(seed), "--out-dir", str(work),
                        "--run-name", name, *flags, threads=threads)
    seconds = time.perf_counter() - started
    if trained.returncode:
        raise RuntimeError(f"training {name} failed: {trained.stderr.strip().splitlines()[-1:]}")
    evaluated = consingan("evaluate", str(run), "--num", str(samples), "--device", "cpu", "--out",
                          str(run / "evaluation"), threads=threads)
    if evaluated.returncode:
        raise RuntimeError(f"evaluating {name} failed: {evaluated.stderr.strip().splitlines()[-1:]}")
    result = json.loads((run / "evaluation" / "evaluation.json").read_text())
    reconstruction = result["reconstruction"] or {}
    return {
        "setting": setting, "epochs": epochs, "seed": seed, "seconds": seconds, "run": str(run),
        "swd": result["swd"]["mean"], "diversity": result["diversity"],
        "coverage": result["memorisation"]["coverage_ratio"], "memorisation": result["memorisation"]["ratio"],
        "histogram_overlap": min(result["intensities"]["histogram_overlap"]),
        "verdict": result["verdict"]["label"], "pearson_r": reconstruction.get("pearson_r"),
        "psnr": reconstruction.get("psnr"),
    }


def mean_rows(runs: list[dict]) -> list[dict]:
    groups: dict = {}
    for row in runs:
        groups.setdefault((row["setting"], row["epochs"]), []).append(row)
    keys = ("seconds", "swd", "diversity", "coverage", "pearson_r")
    return [{"setting": setting, "epochs": epochs, "seeds": len(group),
             **{key: sum(r[key] for r in group) / len(group) for key in keys},
             "worst": {"seconds": max(r["seconds"] for r in group), "swd": max(r["swd"] for r in group),
                       "diversity": min(r["diversity"] for r in group),
                       "coverage": max(r["coverage"] for r in group),
                       "pearson_r": min(r["pearson_r"] for r in group)},
             "swd_per_seed": [round(r["swd"], 3) for r in group],
             "verdicts": sorted({r["verdict"] for r in group})}
            for (setting, epochs), group in groups.items()]


def meets_targets(row: dict) -> bool:
    """Every seed (the worst of them) within every target, and every verdict ok."""
    worst = row["worst"]
    return (worst["seconds"] <= TARGETS["seconds"] and worst["swd"] <= TARGETS["swd"]
            and worst["diversity"] >= TARGETS["diversity"] and worst["coverage"] <= TARGETS["coverage"]
            and worst["pearson_r"] >= TARGETS["pearson_r"] and row["verdicts"] == ["ok"])


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    # A line joins one seed's epoch budgets (a curve); seeds of one budget are separate points of one colour.
    for colour, setting in enumerate(dict.fromkeys(r["setting"] for r in runs)):
        for index, seed in enumerate(dict.fromkeys(r["seed"] for r in runs if r["setting"] == setting)):
            rows = sorted((r for r in runs if r["setting"] == setting and r["seed"] == seed), key=lambda r: r["seconds"])
            for axis, key in zip(axes, ("swd", "diversity", "coverage")):
                axis.plot([r["seconds"] for r in rows], [r[key] for r in rows], "o-", color=f"C{colour}",
                          label=setting if index == 0 else None, alpha=0.8)
    for axis, key, label in zip(axes, ("swd", "diversity", "coverage"),
                                ("multi-scale SWD (lower is closer)", "diversity", "coverage ratio (lower is closer)")):
        axis.axhline(TARGETS[key], color="grey", linestyle="--", linewidth=1)
        axis.axvline(TARGETS["seconds"], color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("training wall time (s)")
        axis.set_ylabel(label)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=ROOT / "data" / "vol.nii.gz")
    parser.add_argument("--settings", nargs="+", default=["mri-3d-quick"], choices=list(SETTINGS))
    parser.add_argument("--epochs", type=int, nargs="+", default=[0],
                        help="epoch budgets per scale (0: the setting's own); several draw a curve")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=16, help="samples measured per run (consingan evaluate --num)")
    parser.add_argument("--threads", type=int, default=2, help="threads of each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (their times are then shared)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "time_to_quality_3d")
    parser.add_argument("--results", type=Path, default=HERE / "time_to_quality_3d.json")
    parser.add_argument("--plot", type=Path, default=HERE / "quality" / "time_to_quality_3d.png")
    parser.add_argument("--flags", default="", help="more consingan train flags for every run, one string "
                                                    "(for example '--max-size 48'); flags win over a preset file")
    args = parser.parse_args()
    extra = tuple(args.flags.split())
    image = args.image.resolve()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(setting, epochs, seed) for seed in args.seeds for setting in args.settings for epochs in args.epochs]

    def one(job: tuple[str, int, int]) -> dict | None:
        setting, epochs, seed = job
        try:
            row = train_and_measure(image, setting, epochs or None, seed, args.work, args.threads, args.samples,
                                    extra)
        except RuntimeError as error:  # one failed run must not stop the others
            print(f"failed: {error}", flush=True)
            return None
        print(f"{setting} epochs {epochs or 'preset'} seed {seed}: {row['seconds']:.0f} s, SWD "
              f"{row['swd']:.3f}, diversity {row['diversity']:.2f}, coverage {row['coverage']:.2f}, "
              f"r {row['pearson_r']:.3f}, {row['verdict']}", flush=True)
        return row

    # Several runs at once (--jobs) share the machine, so their seconds are not those of a run alone; on a GPU
    # machine it is what fits a seed sweep of the seed's table into a session.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = [row for row in pool.map(one, jobs) if row is not None]
    rows = mean_rows(runs)
    header = (f"{'setting':14} {'epochs':>6} {'seeds':>5} {'seconds':>8} {'SWD':>6} {'SWD per seed':>22} "
              f"{'divers.':>7} {'cover.':>6} {'rec. r':>6} {'verdicts':>9} {'targets':>7}")
    print(f"\n{image.name}\n{header}\n{'-' * len(header)}")
    for row in rows:
        per_seed = " ".join(f"{v:.3f}" for v in row["swd_per_seed"])
        print(f"{row['setting']:14} {str(row['epochs'] or 'preset'):>6} {row['seeds']:5d} {row['seconds']:8.1f} "
              f"{row['swd']:6.3f} {per_seed:>22} {row['diversity']:7.2f} {row['coverage']:6.2f} "
              f"{row['pearson_r']:6.3f} {','.join(row['verdicts']):>9} {'met' if meets_targets(row) else 'no':>7}")
    print(f"targets (every seed): <= {TARGETS['seconds']:.0f} s, SWD <= {TARGETS['swd']}, diversity >= "
          f"{TARGETS['diversity']}, coverage <= {TARGETS['coverage']}, reconstruction r >= {TARGETS['pearson_r']}, ok")
    if runs:
        plot(runs, args.plot, f"{image.name}: {', '.join(args.settings)}; {len(args.seeds)} seed(s), "
                              f"{args.threads} thread(s)")
        print(f"curves: {args.plot}")
    stored = json.loads(args.results.read_text()) if args.results.is_file() else {}
    key = f"{image.name}_{'_'.join(args.settings)}{'_' + '_'.join(extra) if extra else ''}_e" \
          f"{'_'.join(map(str, args.epochs))}_seeds" \
          f"{'_'.join(map(str, args.seeds))}_t{args.threads}{f'_j{args.jobs}' if args.jobs > 1 else ''}"
    stored[key] = {"rows": rows, "runs": runs}
    args.results.write_text(json.dumps(stored, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
