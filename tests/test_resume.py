"""Resume: same result as an uninterrupted run, survives a real kill, refuses tampered checkpoints."""

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from consingan.checkpoint import load_state
from consingan.cli import app
from consingan.config import TrainConfig
from consingan.singan.trainer import resume, train
from tests.conftest import TINY, StopAt



def tiny_config(image, out_dir, name):
    return TrainConfig(image=str(image), dimension=3, epochs=4, num_scales=3, num_feature_channels=8, num_layers=2,
                       min_size=10, preview_every=2, checkpoint_every=2, seed=5, device="cpu", out_dir=str(out_dir),
                       run_name=name)


def final_states(run_dir, stage):
    state = load_state(run_dir / f"scale_{stage:02d}" / "training_state.pt")
    return {**state["models"], "history": state["history"], "optimizer_g": state["optimizers"]["generator"]}


# (0, 1): killed before the first checkpoint of scale 0 (checkpoint_every is 2), so resume starts over in place.
@pytest.mark.parametrize("stop", [(1, 3), (1, 1), (0, 4), (2, 2), (0, 1)])
def test_interrupted_and_resumed_equals_uninterrupted(nifti_3d, out_dir, stop):
    reference = train(tiny_config(nifti_3d, out_dir, "whole"))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(nifti_3d, out_dir, "cut"), reporter=StopAt(*stop))
    resumed = resume(out_dir / "cut")
    assert [s.stage for s in resumed.scales] == [0, 1, 2]
    whole, cut = final_states(reference.run_dir, 2), final_states(resumed.run_dir, 2)
    for part in ("generator", "critic"):
        assert whole[part].keys() == cut[part].keys()
        for key in whole[part]:
            assert torch.equal(whole[part][key], cut[part][key]), (part, key)
    assert torch.equal(whole["history"], cut["history"])
    assert whole["optimizer_g"]["state"][0]["step"] == cut["optimizer_g"]["state"][0]["step"]


def test_killed_process_resumes(nifti_3d, out_dir, runner):
    args = [sys.executable, "-m", "consingan.cli", "train", "--image", str(nifti_3d), "--dim", "3",
            "--out-dir", str(out_dir), "--run-name", "killed", *TINY, "--epochs", "60", "--checkpoint-every", "1",
            "--preview-every", "0"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out_dir / "killed" / "scale_00" / "training_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # kill at an arbitrary moment, very likely while a checkpoint is being written
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # it really died mid-run
    assert not (out_dir / "killed" / "scale_01" / "scale.json").exists()
    assert state.exists()
    load_state(state)  # whatever moment it died at, the checkpoint on disk is whole
    result = runner.invoke(app, ["train", "--resume", str(out_dir / "killed"), "--device", "cpu"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert (out_dir / "killed" / "scale_01" / "scale.json").is_file()


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_tampered_checkpoint_is_refused_on_resume(nifti_3d, out_dir, runner, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(nifti_3d, out_dir, "run"), reporter=StopAt(1, 3))
    marker = tmp_path / "pwned"
    with open(out_dir / "run" / "scale_01" / "training_state.pt", "wb") as stream:
        pickle.dump({"generator": _Payload(marker)}, stream)
    result = runner.invoke(app, ["train", "--resume", str(out_dir / "run")], terminal_width=200)
    assert result.exit_code == 2 and "refusing to load" in result.output
    assert not marker.exists()


def test_resume_takes_options_from_the_run(nifti_3d, out_dir, runner):
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(nifti_3d, out_dir, "run"), reporter=StopAt(0, 1))
    result = runner.invoke(app, ["train", "--resume", str(out_dir / "run"), "--num-scales", "5"], terminal_width=200)
    assert result.exit_code == 2 and "drop --num-scales" in result.output
    result = runner.invoke(app, ["train", "--resume", str(out_dir / "nothing")], terminal_width=200)
    assert result.exit_code == 2 and "run folder not found" in result.output


def test_how_often_outputs_are_written_does_not_change_training(nifti_3d, out_dir):
    often = train(dataclasses.replace(tiny_config(nifti_3d, out_dir, "often"), preview_every=1))
    never = train(dataclasses.replace(tiny_config(nifti_3d, out_dir, "never"), preview_every=0))
    a, b = final_states(often.run_dir, 2), final_states(never.run_dir, 2)
    for key in a["generator"]:
        assert torch.equal(a["generator"][key], b["generator"][key]), key


def snapshot(folder):
    """Every path under ``folder`` with its size and modification time: a dry run must leave it all as it was."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("stop,expected", [((1, 3), "scales done: 1; it would go on with scale 1 after epoch 2 of 4"),
                                           ((1, 1), "scales 0-0 done; it would go on with scale 1 of 3")])
def test_resume_dry_run_says_where_it_would_go_on_and_writes_nothing(nifti_3d, out_dir, runner, stop, expected):
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(nifti_3d, out_dir, "run"), reporter=StopAt(*stop))
    before = snapshot(out_dir / "run")
    result = runner.invoke(app, ["train", "--resume", str(out_dir / "run"), "--dry-run"], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert f"resume: {expected}" in result.output and "pyramid: " in result.output
    assert snapshot(out_dir / "run") == before  # no lock, no copy, no training
