"""Patch training (--patch-size): scales larger than the patch train on random regions, resume bit for bit, and never
run a whole-volume forward; 'off' and patches larger than the volume train as before; 'auto' and the preflight."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from consingan.checkpoint import load_state
from consingan.cli import app
from consingan.config import TrainConfig, resolve_config
from consingan.errors import ConsinganError
from consingan.io import Volume
from consingan.singan import memory
from consingan.singan.models import GrowingGenerator
from consingan.singan.pyramid import pyramid_shapes
from consingan.singan.trainer import SinGANTrainer, resume, train
from tests.conftest import StopAt, blobs


pytestmark = pytest.mark.usefixtures("one_thread")



def tiny(image, out_dir, name, **overrides):
    """3D 16^3 -> scales 10^3 (whole) and 16^3 (patches of 12 with the default patch here)."""
    values = dict(image=str(image), dimension=3, epochs=4, num_scales=2, num_feature_channels=4, num_layers=2,
                  min_size=10, Dsteps=2, Gsteps=2, preview_every=2, checkpoint_every=2, seed=5, device="cpu",
                  out_dir=str(out_dir), run_name=name, patch_size="12")
    return TrainConfig(**{**values, **overrides})


def states(run_dir, stage):
    state = load_state(run_dir / f"scale_{stage:02d}" / "training_state.pt")
    return {**state["models"], "history": state["history"], "optimizer_g": state["optimizers"]["generator"]}


def assert_same_states(a, b):
    for part in ("generator", "critic"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert torch.equal(a["history"], b["history"])


def test_patch_training_resumes_bit_identically(nifti_3d, out_dir):
    reference = train(tiny(nifti_3d, out_dir, "whole"))
    assert json.loads((reference.run_dir / "config.json").read_text())["patch_size"] == "12"
    generator = states(reference.run_dir, 1)["generator"]
    # The patched scale's reconstruction input is a field (seed, chunk, grid), not a 16^3 x channels tensor.
    assert "rec_field_1" in generator and "rec_noise_1" not in generator and "rec_noise_0" in generator
    with pytest.raises(KeyboardInterrupt):
        train(tiny(nifti_3d, out_dir, "cut"), reporter=StopAt(1, 3))
    resumed = resume(out_dir / "cut")
    assert [s.stage for s in resumed.scales] == [0, 1]
    assert_same_states(states(reference.run_dir, 1), states(resumed.run_dir, 1))
    # Patches train something else than whole volumes from the same seed.
    whole = train(tiny(nifti_3d, out_dir, "off", patch_size="off"))
    assert not torch.equal(states(whole.run_dir, 1)["generator"]["tail.1.weight"], generator["tail.1.weight"])


def make_trainer(tmp_path, patch, dims=2, size=32, num_scales=3, **overrides):
    array = blobs((size,) * dims)[None].astype(np.float32)
    config = TrainConfig(dimension=dims, epochs=2, num_scales=num_scales, num_feature_channels=4, num_layers=2,
                         min_size=10, max_size=size, Dsteps=2, Gsteps=2, preview_every=1, device="cpu", seed=0,
                         patch_size=patch, **overrides).validate()
    torch.manual_seed(0)
    return SinGANTrainer(config, Volume(array, np.eye(dims + 1), ".npy"), tmp_path / patch)


def final_weights(trainer):
    return {**trainer.generator.state_dict(), **{f"critic.{k}": v for k, v in trainer.critic.state_dict().items()}}


def test_off_auto_and_a_patch_larger_than_the_volume_train_the_same_whole_volumes(tmp_path):
    """(Checked once against the code before patch training, in 2D and 3D: the same weights bit for bit.)"""
    results = {}
    for patch in ("off", "auto", "32", "40"):
        trainer = make_trainer(tmp_path, patch, num_scales=2)
        assert not any(trainer.patched(k) for k in range(2))
        trainer.train()
        results[patch] = final_weights(trainer)
    for patch in ("auto", "32", "40"):
        assert results[patch].keys() == results["off"].keys()
        assert all(torch.equal(results[patch][k], results["off"][k]) for k in results["off"]), patch


def test_a_patched_run_never_runs_the_whole_generator(tmp_path, monkeypatch):
    """Training, the new stage's amplitude, the outputs and the health check all go through region forwards."""
    trainer = make_trainer(tmp_path, "8", num_scales=2, cbam=True)  # 10x10 and 32x32: both scales on patches
    assert all(trainer.patched(k) for k in range(2))

    def refuse(self, *args, **kwargs):
        raise AssertionError("whole-volume forward in patch mode")

    monkeypatch.setattr(GrowingGenerator, "forward", refuse)
    summaries = trainer.train()
    assert all(np.isfinite(list(s.losses.values())).all() for s in summaries)
    assert (tmp_path / "8" / "scale_01" / "samples" / "epoch00002_preview.png").is_file()


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 18)])
def test_tiled_reconstruction_and_the_amplitude_equal_the_whole_forward(tmp_path, dims, size):
    trainer = make_trainer(tmp_path, "9", dims=dims, size=size)
    for stage in range(3):
        trainer.grow(stage)
    generator = trainer.generator
    assert trainer.patched(2) and "rec_field_2" in generator.state_dict()
    amplitude = generator.noise_amps[2].item()
    with torch.no_grad():
        whole = generator(generator.reconstruction_inputs())  # the field drawn whole: the values of its boxes
        assert torch.allclose(trainer.reconstruct(2), whole, rtol=0, atol=1e-5)
        generator.set_noise_amp(2, 0.0)
        rmse = torch.sqrt(torch.mean((generator(generator.reconstruction_inputs()) - trainer.reals[2]) ** 2))
    assert amplitude == pytest.approx(trainer.config.noise_amp * rmse.item(), rel=1e-4) and amplitude > 0


# --- the option, the preflight and 'auto' ----------------------------------------------------------------------------

def test_patch_size_values_flags_and_config_files(tmp_path):
    assert TrainConfig().patch_size == "auto"
    for value in ("auto", "off", "64"):
        assert resolve_config(None, {"patch_size": value}).patch_size == value
    config_file = tmp_path / "options.yaml"
    config_file.write_text("patch_size: 48\n")  # a number in YAML
    assert resolve_config(config_file, {}).patch_size == "48"
    assert resolve_config(config_file, {}).patch_side() == 48 and TrainConfig(patch_size="off").patch_side() is None
    for bad in ("0", "-3", "big", "12.5", ""):
        with pytest.raises(ConsinganError, match="patch_size must be"):
            resolve_config(None, {"patch_size": bad})


@pytest.mark.parametrize("value, message", [("0", "patch_size must be"), ("huge", "patch_size must be"),
                                            ("1", "the patch (1, 1, 1) is too small")])
def test_bad_patch_sizes_stop_with_one_line(runner, nifti_3d, out_dir, value, message):
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 "--min-size", "10", "--patch-size", value, "--dry-run"], terminal_width=300)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_run_folder_from_before_patch_training_resumes_on_whole_volumes(tmp_path):
    from consingan.runs import RunFolder

    values = TrainConfig(image="x.nii.gz").to_dict()
    values.pop("patch_size")
    (tmp_path / "config.json").write_text(json.dumps(values))
    (tmp_path / "run.json").write_text(json.dumps({
        "family": "singan", "image": "x.nii.gz", "spatial_dims": 3, "channels": 1, "source_shape": [8, 8, 8],
        "output_suffix": ".nii.gz", "output_dtype": "int16", "source_affine": np.eye(4).tolist(),
        "shapes": [[8, 8, 8]], "intensity": {"minimum": [0.0], "maximum": [1.0]}, "nifti_header": None,
        "labels": None}))
    assert RunFolder.open(tmp_path).config.patch_size == "off"


SHAPES = pyramid_shapes((128, 128, 128), 8, 250, 25, (1.0, 1.0, 1.0))  # 25^3 ... 128^3


def test_auto_trains_whole_volumes_that_fit_and_the_largest_patch_otherwise():
    config = TrainConfig()
    cpu = torch.device("cpu")
    whole = memory.estimate_peak_bytes(config, SHAPES[-1])
    plan = memory.check_memory(config, SHAPES, cpu, available=int(whole / 0.9) + 1)
    assert plan.patch is None and plan.patch_size == "off" and "whole volumes" in plan.describe(chosen=True)
    available = int(whole / 0.9 / 4)
    plan = memory.check_memory(config, SHAPES, cpu, available=available)
    patch = plan.patch
    assert memory.smallest_auto_patch(config) <= patch < 128 and plan.patch_size == str(patch)
    assert memory.estimate_training_bytes(config, SHAPES, patch) <= 0.9 * available
    assert memory.estimate_training_bytes(config, SHAPES, patch + 1) > 0.9 * available
    assert plan.needed == memory.estimate_training_bytes(config, SHAPES, patch) < whole
    assert f"patch_size auto chose patches of {patch} voxels a side" in plan.describe(chosen=True)
    # The estimate grows with the patch and is the whole one from the longest side up.
    estimates = [memory.estimate_training_bytes(config, SHAPES, p) for p in (25, 32, 48, 64, 128, 200)]
    assert estimates == sorted(estimates) and estimates[-2] == estimates[-1] == whole
    with pytest.raises(ConsinganError, match="no patch of 25 voxels a side or more fits either"):
        memory.check_memory(config, SHAPES, cpu, available=400 * 2**20)


def test_the_preflight_names_the_patch_that_would_fit():
    config = TrainConfig(patch_size="48")
    needed = memory.estimate_training_bytes(config, SHAPES, 48)
    plan = memory.check_memory(config, SHAPES, torch.device("cpu"), available=int(needed / 0.9) + 1)
    assert plan.patch == 48 and "patches of 48 voxels a side at scales" in plan.describe()
    with pytest.raises(ConsinganError, match=r"training on patches of 48 voxels a side .* --patch-size \d+ would fit"):
        memory.check_memory(config, SHAPES, torch.device("cpu"), available=int(needed / 0.9 / 2))
    # Whole volumes refused: the patch that would fit is named first, before the other settings.
    with pytest.raises(ConsinganError, match=r"needs about .* are free on cpu; --patch-size 4[0-9] or "):
        memory.check_memory(dataclasses.replace(config, patch_size="off"), SHAPES, torch.device("cpu"),
                            available=int(needed / 0.9))


def test_dry_run_prints_the_chosen_patch_and_train_records_it(runner, tmp_path, monkeypatch):
    import nibabel as nib

    image = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image((blobs((40, 40, 40), 2) * 1000).astype(np.int16), np.eye(4)), str(image))
    flags = ["train", "--image", str(image), "--dim", "3", "--out-dir", str(tmp_path / "o"), "--min-size", "10",
             "--num-scales", "2", "--num-feature-channels", "4", "--num-layers", "2", "--epochs", "1",
             "--dsteps", "1", "--gsteps", "1", "--preview-every", "0", "--seed", "0"]
    config = resolve_config(None, {"min_size": 10, "num_scales": 2, "num_feature_channels": 4, "num_layers": 2})
    shapes = pyramid_shapes((40, 40, 40), 2, 250, 10, (1.0, 1.0, 1.0))
    free = int(memory.estimate_training_bytes(config, shapes, 24) / 0.9) + 1  # whole 40^3 does not fit, 24 does
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    result = runner.invoke(app, [*flags, "--dry-run"], terminal_width=300)
    assert result.exit_code == 0, result.output
    chosen = memory.check_memory(config, shapes, torch.device("cpu"), available=free).patch
    assert chosen >= 24 and f"patch_size auto chose patches of {chosen} voxels a side at scale 1" in result.output
    row = next(line for line in result.output.splitlines() if " patch_size " in line)
    assert row.split()[-2] == str(chosen) and not (tmp_path / "o").exists()  # the configuration table's row
    result = runner.invoke(app, [*flags, "--patch-size", "20", "--dry-run"], terminal_width=300)
    assert result.exit_code == 0 and "memory: patches of 20 voxels a side at scale 1" in result.output
    result = runner.invoke(app, [*flags, "--run-name", "r"], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "r" / "config.json").read_text())["patch_size"] == str(chosen)
