"""Data-parallel training with torchrun on the CPU (gloo): two processes give one run folder and the weights of one
process with the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from consingan.config import PairedConfig
from consingan.distributed import Distributed
from tests.test_ill_cases import make_pairs

ROOT = Path(__file__).resolve().parents[1]

PAIRED = ["paired", "train", "--dim", "2", "--model", "resnet", "--epochs", "2", "--tile", "16", "--stride", "16",
          "--base-channels", "4", "--seed", "3", "--device", "cpu", "--lr", "1e-3"]


def consingan(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    script = shutil.which("consingan")
    assert script, "the consingan console script is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun finds a free port itself (no race with other processes for a port picked here).
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    return subprocess.run([*launcher, script, *args], capture_output=True, text=True, env=env, timeout=600)


def test_shards_cover_the_draw_and_every_rank_makes_the_same_number_of_steps():
    draw = list(range(7))
    shards = [Distributed(rank, 2, rank).shard(draw) for rank in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5, 0]]
    assert Distributed().shard(draw) == draw


def test_two_gloo_processes_compute_the_gradients_of_one_process_with_the_same_global_batch(tmp_path):
    """The all-reduced gradients of one step on 2 x 2 tiles equal one process's on the 4 tiles."""
    source, target = make_pairs(tmp_path, count=2)
    helper = [str(ROOT / "tests" / "helpers" / "ddp_step.py"), str(source), str(target)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, *helper, str(tmp_path / "one.pt")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *helper, str(tmp_path / "two.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    single, parallel = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert single["grads"].keys() == parallel["grads"].keys() and any(k.startswith("d.") for k in single["grads"])
    for key, gradient in single["grads"].items():
        # Up to float rounding; conv biases before instance norm have (numerically) zero gradients.
        torch.testing.assert_close(parallel["grads"][key], gradient, rtol=0,
                                   atol=1e-4 * gradient.abs().max().item() + 1e-6, msg=key)
        # The weights after the step are one process's wherever the gradient is more than rounding noise: Adam's
        # first step moves each weight by lr x sign(gradient), so only noise-level gradients can move differently.
        if gradient.abs().max() < 1e-6:  # a bias before instance norm: its whole gradient is rounding noise
            continue
        clear = gradient.abs() > 1e-3 * gradient.abs().max()
        assert clear.float().mean() > 0.5, key
        torch.testing.assert_close(parallel["weights"][key][clear], single["weights"][key][clear], rtol=0, atol=1e-6,
                                   msg=key)


@pytest.mark.slow
def test_torchrun_paired_training_writes_one_run_and_resumes(tmp_path):
    source, target = make_pairs(tmp_path, count=2)  # 2 images x 4 tiles: an even draw, no padding
    single = consingan(*PAIRED, "--source", str(source), "--target", str(target), "--batch-size", "2",
                       "--out-dir", str(tmp_path / "one"), "--run-name", "run")
    assert single.returncode == 0, single.stderr
    parallel = consingan(*PAIRED, "--source", str(source), "--target", str(target), "--batch-size", "1",
                         "--out-dir", str(tmp_path / "two"), "--run-name", "run", processes=2)
    assert parallel.returncode == 0, parallel.stderr
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["run"]  # rank 0 alone made the folder
    assert parallel.stderr.count("run folder:") == 1  # and reported
    # With Adam, weights cannot match a single process's to the last digit: elements whose gradient is rounding
    # noise (conv biases before instance norm) still move by about lr each step. The gradients are checked above.
    first = torch.load(tmp_path / "one" / "run" / "generator.pt", weights_only=True)
    second = torch.load(tmp_path / "two" / "run" / "generator.pt", weights_only=True)
    assert first.keys() == second.keys()
    # Resuming under torchrun: every rank reads the same checkpoint and the run ends where it was.
    resumed = consingan("paired", "train", "--resume", str(tmp_path / "two" / "run"), processes=2)
    assert resumed.returncode == 0, resumed.stderr


def test_torchrun_conditional_training_writes_one_run_that_samples(tmp_path):
    from tests.test_conditional import write_set

    data = write_set(tmp_path / "data", 2)
    result = consingan("conditional", "train", "--data", str(data), "--dim", "2", "--size", "16", "--epochs", "2",
                       "--batch-size", "2", "--base-channels", "8", "--max-channels", "16", "--noise-dim", "8",
                       "--embedding-dim", "4", "--seed", "0", "--device", "cpu", "--out-dir", str(tmp_path / "out"),
                       "--run-name", "run", processes=2)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["run"] and result.stderr.count("run folder:") == 1
    sampled = consingan("conditional", "sample", str(tmp_path / "out" / "run"), "--num", "2", "--out",
                        str(tmp_path / "samples"))
    assert sampled.returncode == 0, sampled.stderr
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["bright", "dark"]


def test_torchrun_without_a_seed_shares_rank_0s_seed(tmp_path):
    """Each process draws a seed of its own; rank 0's reaches every rank, and the run records it."""
    code = ("import json, os, torch; from consingan.config import PairedConfig; "
            "from consingan.distributed import Distributed; d = Distributed.from_environment(); "
            "c = d.shared_seed(PairedConfig(device='cpu'), torch.device('cpu')); "
            "print(json.dumps({'rank': d.rank, 'seed': c.seed})); d.finish()")
    script = tmp_path / "seed.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                "2", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    import json

    seen = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in seen) == [0, 1]
    assert len({r["seed"] for r in seen}) == 1 and isinstance(seen[0]["seed"], int)
    assert Distributed().shared_seed(PairedConfig(seed=7), torch.device("cpu")).seed == 7
