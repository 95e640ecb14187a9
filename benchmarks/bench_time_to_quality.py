"""Time to quality: how long the engine's settings take to reach the official ConSinGAN's sample quality.

    python benchmarks/bench_time_to_quality.py --image cell --epochs 150                      # the engine alone
    python benchmarks/bench_time_to_quality.py --image cell --epochs 150 --reference /scratch/ConSinGAN \\
        --settings default preset fast --fractions 0.33 0.67 1

The official ConSinGAN (tohinz/ConSinGAN, from a checkout you place in a scratch folder and point ``--reference`` at;
never copied into this repository) trains once at ``--epochs`` per stage. Each engine setting trains at
``--epochs`` and, for the curves, at the given fractions of it (same images, stages, sizes and channels as the
quality study, `benchmarks/bench_quality.py`, whose runners this script uses). Every run is one process with one
thread, two at a time, so the reference always shares the machine with one engine run, as the engine runs share it
with each other. Each run's samples are measured with `consingan evaluate`'s measures (``--samples``, 100 by default,
evaluation seed 0, in the source's min-max space; the reference's drawn losslessly from its trained generator, see
`bench_quality.py`). With several ``--seeds`` every run is repeated per seed and the means are compared.

Prints one table (wall time, SWD x1e3 with its coarsest level, diversity, the copy ratio of the memorisation check,
the verdict, the time as a fraction of the reference's) and, per setting, the *time to reference quality*: the wall
time of its fastest run whose samples are at least as close to the image as the reference's (SWD) and at least
0.9 x as diverse. Writes the rows to ``--results`` (JSON) and a PNG of SWD against wall time, one curve per setting,
the reference as a point, with the target (half the reference's time) drawn as a line.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_quality as study  # noqa: E402  (the quality study's image table, runners and measures)

# The engine's settings for time to quality: the quality study's plus the speed levers.
SETTINGS: dict[str, dict] = {
    "default": {},
    "preset": {"config": str(study.ROOT / "presets" / "microscopy-2d.yaml")},
    "repeat": {"batch_norm": False, "generator_update": "repeat"},
    "lazy-gp": {"batch_norm": False, "gradient_penalty_every": 3},
    "gsteps1": {"batch_norm": False, "Gsteps": 1},
    "fast": {"batch_norm": False, "generator_update": "repeat", "gradient_penalty_every": 3},
    "reference-layers": study.REFERENCE_LAYERS,
    "reference-layers-repeat": {**study.REFERENCE_LAYERS, "generator_update": "repeat"},
    "reference-layers-gsteps2": study.SETTINGS["reference-layers-gsteps2"],
}
DIVERSITY_KEPT = 0.9  # a setting reaches the reference's quality only if it keeps this share of its diversity


def reaches(row: dict, reference: dict) -> bool:
    return row["swd_x1e3"] <= reference["swd_x1e3"] and row["diversity"] >= DIVERSITY_KEPT * reference["diversity"]


def plot(rows: list[dict], reference: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for setting in dict.fromkeys(r["setting"] for r in rows):
        points = sorted((r["seconds"] / 60, r["swd_x1e3"]) for r in rows if r["setting"] == setting)
        axis.plot(*zip(*points), marker="o", label=setting)
    if reference is not None:
        axis.scatter([reference["seconds"] / 60], [reference["swd_x1e3"]], marker="*", s=200, color="black",
                     label="official ConSinGAN", zorder=5)
        axis.axvline(reference["seconds"] / 120, color="grey", linestyle="--", label="half its time")
        axis.axhline(reference["swd_x1e3"], color="grey", linestyle=":")
    axis.set_xlabel("wall time (min, one thread, two runs at a time)")
    axis.set_ylabel("multi-scale SWD x1e3 (lower is closer)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per (setting, epochs): measures and seconds averaged over seeds, the seeds' SWD kept beside them."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["setting"], row["epochs"]), []).append(row)
    keys = ("seconds", "swd_x1e3", "swd_coarse_x1e3", "diversity", "memorisation_ratio")
    return [{"setting": setting, "epochs": epochs, "seeds": len(group),
             **{key: sum(r[key] for r in group) / len(group) for key in keys},
             "swd_per_seed": [round(r["swd_x1e3"], 1) for r in group],
             "verdict": ",".join(sorted({r["verdict"] for r in group}))}
            for (setting, epochs), group in groups.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="cell", choices=[n for n, i in study.IMAGES.items() if i.dim == 2])
    parser.add_argument("--epochs", type=int, default=150, help="epochs per stage for both programs")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0],
                        help="the engine also trains at these fractions of --epochs (the curves)")
    parser.add_argument("--reference", type=Path, help="checkout of tohinz/ConSinGAN")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="every run once per seed; means compared")
    parser.add_argument("--samples", type=int, default=100, help="samples measured per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--work", type=Path, default=study.ROOT / "out" / "time_to_quality")
    parser.add_argument("--results", type=Path, default=HERE / "time_to_quality.json")
    parser.add_argument("--plot", type=Path, default=HERE / "quality" / "time_to_quality.png")
    args = parser.parse_args()
    args.work = args.work.resolve()  # the reference runs in its own folder: every path it gets must be absolute
    study.SETTINGS.update(SETTINGS)
    (args.work / "sheets").mkdir(parents=True, exist_ok=True)
    image = replace(study.IMAGES[args.image], epochs=args.epochs)
    path = study.prepare_image(args.image, image, args.work)
    budgets = sorted({max(1, round(args.epochs * f)) for f in args.fractions if f > 0}, reverse=True)

    jobs = []
    for seed in args.seeds:
        if args.reference:
            jobs.append(("reference", args.epochs, seed, lambda r=seed: study.train_reference(
                f"{args.image}_e{args.epochs}", image, path, args.reference.resolve(), args.work, r)))
        for epochs in budgets:  # the longest runs first, so the reference's partner is an engine run of equal epochs
            for setting in args.settings:
                jobs.append((setting, epochs, seed, lambda s=setting, e=epochs, r=seed: study.train_engine(
                    f"{args.image}_e{e}", replace(image, epochs=e), path, s, args.work, r)))

    def run(job):
        setting, epochs, seed, start = job
        try:
            outcome = start()
            outcome["label"] = f"{args.image}_{setting}_e{epochs}{study.seed_suffix(seed)}"
            row = study.measure(outcome, image, path, args.work, args.samples,
                                args.reference.resolve() if args.reference else None)
        except Exception as error:  # one failed run must not stop the others
            print(f"failed {setting} {epochs} epochs seed {seed}: {error}", flush=True)
            return None
        print(f"done {setting} {epochs} epochs seed {seed}: SWD {row['swd_x1e3']:.1f} in {row['seconds']:.0f} s",
              flush=True)
        return {"setting": setting, "epochs": epochs, "seed": seed, **row}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = [row for row in pool.map(run, jobs) if row is not None]
    rows = mean_rows(runs)
    reference = next((r for r in rows if r["setting"] == "reference"), None)
    engine = [r for r in rows if r["setting"] != "reference"]

    header = f"{'program / setting':18} {'epochs':>6} {'seeds':>5} {'seconds':>8} {'x ref':>6} {'SWD':>7} " \
             f"{'SWD per seed':>20} {'coarse':>7} {'divers.':>7} {'copy':>6} {'verdict':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row['seconds'] / reference['seconds']:.2f}" if reference else "-"
        per_seed = " ".join(f"{v:.0f}" for v in row["swd_per_seed"])
        print(f"{row['setting']:18} {row['epochs']:6d} {row['seeds']:5d} {row['seconds']:8.1f} {ratio:>6} "
              f"{row['swd_x1e3']:7.1f} {per_seed:>20} {row['swd_coarse_x1e3']:7.1f} {row['diversity']:7.3f} "
              f"{row['memorisation_ratio']:6.2f} {row['verdict']:>8}")
    summary = {}
    if reference:
        print(f"\ntime to the reference's quality (mean SWD <= {reference['swd_x1e3']:.1f}, mean diversity >= "
              f"{DIVERSITY_KEPT} x {reference['diversity']:.3f}); target: <= {reference['seconds'] / 2:.0f} s")
        for setting in dict.fromkeys(r["setting"] for r in engine):
            good = [r for r in engine if r["setting"] == setting and reaches(r, reference)]
            best = min(good, key=lambda r: r["seconds"]) if good else None
            summary[setting] = None if best is None else {"seconds": best["seconds"], "epochs": best["epochs"],
                                                          "fraction_of_reference": best["seconds"] / reference["seconds"]}
            print(f"  {setting:16} " + ("not reached" if best is None else
                  f"{best['seconds']:.0f} s ({best['epochs']} epochs), {best['seconds'] / reference['seconds']:.2f} "
                  f"x the reference's time"))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(engine, reference, args.plot, f"{args.image}: {image.num_scales} stages, up to {args.epochs} epochs each, "
         f"{len(args.seeds)} seed(s)")
    stored = json.loads(args.results.read_text()) if args.results.is_file() else {}
    seeds = "_".join(map(str, args.seeds))
    stored[f"{args.image}_e{args.epochs}_seeds{seeds}_n{args.samples}_{'_'.join(args.settings)}"] = {
        "rows": rows, "runs": runs, "time_to_reference_quality": summary}
    args.results.write_text(json.dumps(stored, indent=1, default=str) + "\n")
    print(f"\ncurves: {args.plot}")


if __name__ == "__main__":
    main()
