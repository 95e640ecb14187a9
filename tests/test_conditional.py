"""The class-conditional GAN family: building blocks with known answers, and train / sample / resume / evaluate
end to end in 2D and 3D on tiny shapes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from consingan.conditional.data import augment, class_balanced_sampler, list_labelled
from consingan.conditional.models import (ConditionalDiscriminator, ConditionalGenerator, SelfAttention,
                                          attention_bytes)
from consingan.conditional.trainer import ConditionalTrainer, check_attention_fits, prepare_conditional
from consingan.nn.ema import ema_update
from consingan.config import ConditionalConfig
from consingan.errors import ConsinganError
from consingan.runs import RunFolder
from tests.conftest import blobs
from tests.test_ill_cases import assert_clean_error, run_cli


def write_set(root: Path, dims: int, per_class: tuple[int, ...] = (3, 3)) -> Path:
    """Classes that differ in brightness: 'bright' and 'dark' blobs (PNG in 2D, NIfTI in 3D)."""
    import SimpleITK as sitk

    shape = (20, 24) if dims == 2 else (10, 12, 9)
    for label, (name, count) in enumerate(zip(("bright", "dark", "mid"), per_class)):
        (root / name).mkdir(parents=True)
        for index in range(count):
            image = blobs(shape, 10 * label + index) * (220 if name == "bright" else 60 if name == "dark" else 140)
            if dims == 2:
                sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.uint8)), str(root / name / f"{index}.png"))
            else:
                nib.save(nib.Nifti1Image(image.astype(np.int16), np.eye(4)), str(root / name / f"{index}.nii.gz"))
    return root


def tiny(dims: int, data: Path, out: Path, **overrides) -> ConditionalConfig:
    options = dict(data=str(data), dimension=dims, size=16 if dims == 2 else 8, epochs=2, batch_size=2,
                   num_feature_channels=8, max_channels=16, noise_dim=8, embedding_dim=4, attention=8 if dims == 2 else 4,
                   preview_every=1, seed=0, device="cpu", out_dir=str(out))
    return ConditionalConfig(**{**options, **overrides})


TINY_FLAGS = ["--dim", "2", "--epochs", "2", "--batch-size", "2", "--base-channels", "8", "--max-channels", "16", "--noise-dim", "8",
              "--embedding-dim", "4", "--seed", "0", "--device", "cpu"]


# --- building blocks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_projection_discriminator_adds_the_class_embedding_times_the_features(dims):
    torch.manual_seed(0)
    critic = ConditionalDiscriminator(dims, 1, 3, 8, base_channels=4, max_channels=8).eval()
    x = torch.randn(2, 1, *([8] * dims))
    labels = torch.tensor([0, 2])
    logits, features, class_logits = critic(x, labels)
    h = torch.relu(features[-1]).flatten(2).sum(-1)
    expected = critic.linear(h).squeeze(1) + (critic.embedding(labels) * h).sum(1)
    torch.testing.assert_close(logits, expected)
    assert class_logits is None
    other, _, _ = critic(x, torch.tensor([1, 1]))
    assert not torch.allclose(logits, other)  # the class changes the score


def test_discriminator_has_spectral_norm_on_every_layer_and_no_batch_norm():
    for conditioning in ("projection", "acgan"):
        critic = ConditionalDiscriminator(2, 3, 4, 32, base_channels=4, attention=16, conditioning=conditioning)
        weighted = [m for m in critic.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear,
                                                                   torch.nn.Embedding))]
        assert weighted and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in weighted)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())
        _, _, class_logits = critic(torch.randn(2, 3, 32, 32), torch.tensor([0, 3]))
        assert (class_logits is None) == (conditioning == "projection")


@pytest.mark.parametrize("dims", [2, 3])
def test_self_attention_with_its_gate_at_zero_is_the_identity(dims):
    block = SelfAttention(dims, 16)
    x = torch.randn(2, 16, *([6] * dims))
    assert block.gate.item() == 0.0
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.gate.fill_(0.5)
    assert not torch.allclose(block(x), x)


def test_attention_that_would_not_fit_is_refused_with_a_side_that_would(tmp_path):
    config = tiny(3, tmp_path, tmp_path, size=64, attention=64, batch_size=4).validate()
    needed = attention_bytes(64, 3, 8)
    assert needed > 2**40  # (64^3)^2 entries: far beyond any machine
    with pytest.raises(ConsinganError, match=r"--attention (16|32)"):
        check_attention_fits(config, free_bytes=16 * 2**30)
    check_attention_fits(tiny(3, tmp_path, tmp_path, size=64, attention=16).validate(), free_bytes=16 * 2**30)


def test_ema_update_moves_each_parameter_by_one_minus_decay_and_copies_buffers():
    model, average = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        average.weight.fill_(1.0)
        model.running_mean.fill_(5.0)
    ema_update(average, model, decay=0.9)
    torch.testing.assert_close(average.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    torch.testing.assert_close(average.running_mean, torch.full((3,), 5.0))


def test_ema_decay_warms_up_then_holds():
    from consingan.nn.ema import ema_decay_at

    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay_at(0.999, 100_000) == 0.999


def test_ttur_gives_generator_and_discriminator_their_own_rates_and_betas(tmp_path):
    config, data = prepare_conditional(tiny(2, write_set(tmp_path / "data", 2), tmp_path / "out"))
    trainer = ConditionalTrainer(config, data, RunFolder.create(config, "conditional"))
    assert [g["lr"] for g in trainer.optimizer_g.param_groups] == [1e-4]
    assert [g["lr"] for g in trainer.optimizer_d.param_groups] == [4e-4]
    assert trainer.optimizer_g.param_groups[0]["betas"] == (0.0, 0.9)
    generator_ids = {id(p) for p in trainer.generator.parameters()}
    assert generator_ids == {id(p) for g in trainer.optimizer_g.param_groups for p in g["params"]}
    assert not generator_ids & {id(p) for p in trainer.discriminator.parameters()}


def test_accumulated_batches_give_the_discriminator_the_gradient_of_one_large_batch(tmp_path):
    """Two accumulated batches of 2 = one batch of 4 for the discriminator (it has no batch statistics). The networks
    are in eval mode so that batch norm in the generator and spectral norm's power iteration do not depend on how
    the batch is split."""
    config, data = prepare_conditional(tiny(2, write_set(tmp_path / "data", 2), tmp_path / "out"))
    trainer = ConditionalTrainer(config, data, RunFolder.create(config, "conditional"))
    trainer.generator.eval()
    trainer.discriminator.eval()
    images, labels = data.images[:4], data.labels[:4]
    noise = torch.randn(4, config.noise_dim, generator=torch.Generator().manual_seed(5))

    class Feed:  # the same noise rows, however the batch is split
        def __init__(self) -> None:
            self.used = 0

        def __call__(self, count: int) -> torch.Tensor:
            self.used += count
            return noise[self.used - count:self.used]

    start = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    gradients = []
    for batches in ([(images, labels)], [(images[:2], labels[:2]), (images[2:], labels[2:])]):
        trainer.discriminator.load_state_dict(start)  # the step moved the weights: start both from the same
        trainer.noise = Feed()
        trainer.discriminator_step(batches)
        gradients.append([p.grad.clone() for p in trainer.discriminator.parameters()])
    for whole, accumulated in zip(*gradients):
        torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)


def test_class_balanced_sampler_draws_classes_equally_often():
    labels = torch.tensor([0] * 90 + [1] * 10)
    sampler = class_balanced_sampler(labels, 2, torch.Generator().manual_seed(0))
    drawn = labels[list(sampler)]
    assert len(drawn) == 100
    counts = torch.bincount(torch.cat([labels[list(sampler)] for _ in range(50)]), minlength=2)
    assert abs(counts[0].item() / counts.sum().item() - 0.5) < 0.03  # 90 % of the images, half of the draws


@pytest.mark.parametrize("dims", [2, 3])
def test_augmentations_keep_shape_range_and_content(dims):
    batch = torch.rand(3, 1, *([6] * dims)) * 2 - 1
    out = augment(batch, flip_dims=tuple(range(dims)), rotations=True, jitter=0.0,
                  generator=torch.Generator().manual_seed(1))
    assert out.shape == batch.shape
    for original, moved in zip(batch, out):  # flips and rotations only move voxels
        assert torch.equal(original.flatten().sort().values, moved.flatten().sort().values)
    jittered = augment(batch, flip_dims=(), rotations=False, jitter=0.2, generator=torch.Generator().manual_seed(1))
    assert jittered.min() >= -1 and jittered.max() <= 1 and not torch.equal(jittered, batch)


# --- data errors ---------------------------------------------------------------------------------------------------


def test_data_errors_are_one_line_and_name_the_problem(runner, tmp_path):
    data = write_set(tmp_path / "data", 2)
    (tmp_path / "data" / "empty").mkdir()
    result = run_cli(runner, ["conditional", "train", "--data", data, "--size", "16", "--out-dir", tmp_path / "out",
                              *TINY_FLAGS])
    assert_clean_error(result, "class 'empty' has no images")
    (tmp_path / "data" / "empty").rmdir()
    (data / "dark" / "broken.png").write_bytes(b"\x89PNG not really")
    result = run_cli(runner, ["conditional", "train", "--data", data, "--size", "16", "--out-dir", tmp_path / "out",
                              *TINY_FLAGS])
    assert_clean_error(result, "broken.png")
    (data / "dark" / "broken.png").unlink()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(data / "dark" / "volume.nii.gz"))
    result = run_cli(runner, ["conditional", "train", "--data", data, "--dim", "2", "--size", "16",
                              "--out-dir", tmp_path / "out", *TINY_FLAGS])
    assert_clean_error(result, "volume.nii.gz")
    assert not (tmp_path / "out").exists()


def test_csv_lists_paths_and_classes(tmp_path):
    data = write_set(tmp_path / "data", 2)
    csv = tmp_path / "set.csv"
    csv.write_text("path,class\ndata/bright/0.png,light\ndata/dark/1.png,shadow\n")
    assert list_labelled(csv) == [(tmp_path / "data/bright/0.png", "light"), (tmp_path / "data/dark/1.png", "shadow")]
    csv.write_text("data/bright/0.png\n")
    with pytest.raises(ConsinganError, match="row 1"):
        list_labelled(csv)
    assert data.exists()


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_train_sample_evaluate_end_to_end(runner, tmp_path, dims):
    data = write_set(tmp_path / "data", dims, per_class=(4, 2))
    size = "16" if dims == 2 else "8"
    result = run_cli(runner, ["conditional", "train", "--data", data, *TINY_FLAGS, "--dim", dims, "--size", size,
                              "--attention", "8" if dims == 2 else "4", "--out-dir", tmp_path / "out",
                              "--run-name", "run"])
    assert result.exit_code == 0, result.output
    assert "bright 4, dark 2" in result.output and "class-balanced" in result.output
    run = tmp_path / "out" / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["family"] == "conditional" and info["classes"] == ["bright", "dark"]
    assert (run / "previews" / "epoch00002.png").is_file() and (run / "losses.csv").is_file()
    state = torch.load(run / "training_state.pt", weights_only=True)
    assert {"generator", "discriminator", "generator_ema"} <= set(state["models"])
    # Every class, one sub-folder each; the same seed gives the same files, one class alone the same as with all.
    outputs = {}
    for name, extra in (("all", []), ("again", []), ("dark_only", ["--class", "dark"])):
        result = run_cli(runner, ["conditional", "sample", run, "--num", "3", "--seed", "7", "--out",
                                  tmp_path / name, *extra])
        assert result.exit_code == 0, result.output
        outputs[name] = {str(p.relative_to(tmp_path / name)): p.read_bytes()
                         for p in sorted((tmp_path / name).rglob("*")) if p.is_file()}
    assert len(outputs["all"]) == 6 and outputs["all"] == outputs["again"]
    assert outputs["dark_only"] == {k: v for k, v in outputs["all"].items() if k.startswith("dark")}
    suffix = ".png" if dims == 2 else ".nii.gz"
    assert all(k.endswith(suffix) for k in outputs["all"])
    result = run_cli(runner, ["conditional", "sample", run, "--class", "nope", "--out", tmp_path / "x"])
    assert_clean_error(result, "unknown class 'nope'")
    result = run_cli(runner, ["evaluate", run, "--num", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((run / "evaluation_001" / "evaluation.json").read_text())
    assert set(evaluation["per_class"]) == {"bright", "dark"}
    assert 0 <= evaluation["class_consistency"]["accuracy"] <= 1 and evaluation["class_consistency"]["chance"] == 0.5
    assert np.isfinite(evaluation["random_feature_frechet"]) and "class consistency" in result.output


@pytest.mark.parametrize("dims", [2, 3])
def test_resume_after_an_interruption_gives_the_same_weights(tmp_path, dims):
    from consingan.conditional.trainer import resume_conditional, train_conditional

    data = write_set(tmp_path / "data", dims)
    whole = train_conditional(tiny(dims, data, tmp_path / "a", epochs=3, flip_axes="left-right", rotations=True))

    def stop_after_first(epoch: int, losses: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_conditional(tiny(dims, data, tmp_path / "b", epochs=3, flip_axes="left-right", rotations=True), stop_after_first)
    (cut,) = (tmp_path / "b").iterdir()
    assert not (cut / "generator.pt").exists()
    resumed = resume_conditional(cut)
    first = torch.load(whole.run_dir / "generator.pt", weights_only=True)
    second = torch.load(resumed.run_dir / "generator.pt", weights_only=True)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    assert [round(r["d"], 6) for r in whole.losses] == [round(r["d"], 6) for r in resumed.losses]


def test_resume_refuses_flags_and_a_changed_class_list(runner, tmp_path):
    data = write_set(tmp_path / "data", 2)
    result = run_cli(runner, ["conditional", "train", "--data", data, "--size", "16", "--attention", "8",
                              "--out-dir", tmp_path / "out", "--run-name", "run", *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    result = run_cli(runner, ["conditional", "train", "--resume", tmp_path / "out" / "run", "--epochs", "5"])
    assert_clean_error(result, "drop --epochs")
    (data / "dark").rename(data / "night")
    # The run keeps its own copy of the set: what happens to the original folder does not matter to it.
    result = run_cli(runner, ["conditional", "train", "--resume", tmp_path / "out" / "run"])
    assert result.exit_code == 0 and "already finished" in result.output, result.output
    # A run from before runs kept their set reads the original folder, which must still hold the run's classes.
    (tmp_path / "out" / "run" / "source" / "dataset.pt").unlink()
    result = run_cli(runner, ["conditional", "train", "--resume", tmp_path / "out" / "run"])
    assert_clean_error(result, "are not the run's")


def test_generator_outputs_every_requested_shape_and_channel_count():
    for dims, size, channels in ((2, 32, 3), (3, 16, 2)):
        generator = ConditionalGenerator(dims, channels, 4, size, noise_dim=8, embedding_dim=4, base_channels=4,
                                         attention=8)
        out = generator(torch.randn(2, 8), torch.tensor([0, 3]))
        assert out.shape == (2, channels, *([size] * dims)) and out.abs().max() <= 1
