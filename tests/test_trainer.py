import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from consingan.checkpoint import load_state
from consingan.config import TrainConfig
from consingan.errors import ConsinganError
from consingan.io import Volume
from consingan.losses import gradient_penalty, wasserstein_critic_loss
from consingan.singan.trainer import SinGANTrainer, scale_dir
from tests.conftest import blobs


def make_trainer(tmp_path, dims=2, **overrides):
    torch.manual_seed(0)
    size = 32 if dims == 2 else 16
    array = blobs((size,) * dims)[None].astype(np.float32)
    config = TrainConfig(
        dimension=dims, epochs=4, num_scales=3, num_feature_channels=8, num_layers=2, min_size=10, max_size=size,
        preview_every=0, device="cpu", seed=0,
    )
    config = dataclasses.replace(config, **overrides).validate()
    volume = Volume(array, np.eye(dims + 1), ".npy")
    return SinGANTrainer(config, volume, tmp_path)


@pytest.mark.parametrize("dims", [2, 3])
def test_noise_amp_is_factor_times_rmse_of_new_stage_reconstruction(tmp_path, dims):
    trainer = make_trainer(tmp_path, dims, noise_amp=0.25)
    trainer.grow(0)
    assert trainer.generator.noise_amps.tolist() == [1.0]
    assert torch.equal(trainer.generator.reconstruction_noise(0), trainer.reals[0])
    trainer.grow(1)
    generator = copy.deepcopy(trainer.generator)
    generator.set_noise_amp(1, 0.0)
    with torch.no_grad():
        rec = generator(generator.reconstruction_inputs())
    expected = 0.25 * torch.sqrt(torch.mean((rec - trainer.reals[1]) ** 2)).item()
    assert trainer.generator.noise_amps[1].item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_scheduler_really_decays_late_in_each_scale(tmp_path):
    trainer = make_trainer(tmp_path, epochs=5, lr=1e-3, gamma_scheduler=0.5, lr_decay_at=0.6, active_scales=2)
    trainer.grow(0)
    trainer.grow(1)
    optimizer_g, optimizer_d, schedulers = trainer.make_optimizers()
    start = [group["lr"] for group in optimizer_g.param_groups]
    seen = []
    for _ in range(5):
        trainer.train_epoch(1, optimizer_g, optimizer_d)
        for scheduler in schedulers:
            scheduler.step()
        seen.append(optimizer_d.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 5e-4])  # milestone at 0.6 * 5 = epoch 3
    assert [g["lr"] for g in optimizer_g.param_groups] == pytest.approx([lr * 0.5 for lr in start])


def test_each_generator_and_critic_step_is_a_real_update_with_its_own_gradient(tmp_path):
    trainer = make_trainer(tmp_path, Dsteps=3, Gsteps=3)
    trainer.grow(0)
    optimizer_g, optimizer_d, _ = trainer.make_optimizers()
    tail_grads, critic_grads = [], []
    tail_weight = trainer.generator.tail[1].weight
    critic_weight = trainer.critic.tail.weight
    optimizer_g.register_step_pre_hook(lambda *_: tail_grads.append(tail_weight.grad.clone()))
    optimizer_d.register_step_pre_hook(lambda *_: critic_grads.append(critic_weight.grad.clone()))
    trainer.train_epoch(0, optimizer_g, optimizer_d)
    assert len(tail_grads) == 3 and len(critic_grads) == 3
    for grads in (tail_grads, critic_grads):
        assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[1], grads[2])
    assert optimizer_g.state[tail_weight]["step"].item() == 3


@pytest.mark.parametrize("every", [1, 2, 3])
def test_lazy_gradient_penalty_runs_every_kth_critic_update_weighted_by_k(tmp_path, monkeypatch, every):
    import consingan.singan.trainer as trainer_module

    trainer = make_trainer(tmp_path, Dsteps=3, gradient_penalty_every=every, batch_norm=False)
    trainer.grow(0)
    optimizer_g, optimizer_d, _ = trainer.make_optimizers()
    calls = []
    penalty = trainer_module.gradient_penalty
    monkeypatch.setattr(trainer_module, "gradient_penalty", lambda *a, **k: calls.append(1) or penalty(*a, **k))
    for epoch in range(1, 5):
        losses = trainer.train_epoch(0, optimizer_g, optimizer_d, epoch)
        assert np.isfinite(losses["gradient_penalty"])
    assert len(calls) == -(-4 * 3 // every)  # critic updates 0, k, 2k, ... over 4 epochs of 3


@pytest.mark.parametrize("every", [1, 3])
def test_lazy_gradient_penalty_gradient_is_weighted_by_lambda_times_k(tmp_path, monkeypatch, every):
    """On a penalty step the critic's gradient is that of the critic loss plus lambda * k times the penalty's; on the
    other steps that of the critic loss alone. Both parts are recomputed here from the tensors the step used."""
    import consingan.singan.trainer as trainer_module

    lam = 0.5
    trainer = make_trainer(tmp_path, Dsteps=3, gradient_penalty_every=every, batch_norm=False, lambda_grad_penalty=lam)
    trainer.grow(0)
    optimizer_g, optimizer_d, _ = trainer.make_optimizers()
    critic = trainer.critic
    params = list(critic.parameters())
    scored, penalty_grads, checked = [], [], []
    joint, penalty = trainer_module.joint_scores, trainer_module.gradient_penalty

    def recording_joint_scores(model, real, fake):
        if model is critic and torch.is_grad_enabled() and params[0].requires_grad:
            scored.append((real.detach().clone(), fake.detach().clone()))
        return joint(model, real, fake)

    def gradients(value, retain_graph=False):  # zeros for parameters the value does not depend on
        grads = torch.autograd.grad(value, params, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def recording_penalty(*args, **kwargs):
        value = penalty(*args, **kwargs)
        penalty_grads.append(gradients(value, retain_graph=True))
        return value

    def check_step(*_):
        step = len(checked)
        real, fake = scored[-1]
        loss_grads = gradients(wasserstein_critic_loss(*joint(critic, real, fake)))
        expected = list(loss_grads)
        if step % every == 0:
            expected = [g + lam * every * p for g, p in zip(loss_grads, penalty_grads[-1])]
            wrongly_weighted = [g + lam * p for g, p in zip(loss_grads, penalty_grads[-1])]
            assert every == 1 or any(not torch.allclose(w, e, rtol=1e-4, atol=1e-7)
                                     for w, e in zip(wrongly_weighted, expected))  # the check can tell k from 1
        for param, want in zip(params, expected):
            got = torch.zeros_like(param) if param.grad is None else param.grad
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        checked.append(step)

    monkeypatch.setattr(trainer_module, "joint_scores", recording_joint_scores)
    monkeypatch.setattr(trainer_module, "gradient_penalty", recording_penalty)
    optimizer_d.register_step_pre_hook(check_step)
    trainer.train_epoch(0, optimizer_g, optimizer_d, 1)
    assert len(checked) == 3 and len(penalty_grads) == -(-3 // every)
    assert all(any(g.abs().max() > 0 for g in grads) for grads in penalty_grads)


def test_a_critic_without_batch_norm_scores_real_and_fake_alike_in_one_batch(tmp_path):
    trainer = make_trainer(tmp_path, batch_norm=False)
    trainer.grow(0)
    real = trainer.reals[0]
    fake = torch.rand_like(real) * 2 - 1
    together = trainer.critic(torch.cat([real, fake]))
    torch.testing.assert_close(together[:1], trainer.critic(real), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[1:], trainer.critic(fake), rtol=1e-5, atol=1e-6)


def test_only_active_stages_train_and_critic_carries_over(tmp_path):
    trainer = make_trainer(tmp_path, active_scales=1, epochs=2)
    trainer.train_scale(0)
    saved_critic = load_state(scale_dir(tmp_path, 0) / "critic.pt")
    stage0 = copy.deepcopy(trainer.generator.body[0].state_dict())
    head = copy.deepcopy(trainer.generator.head.state_dict())
    tail = copy.deepcopy(trainer.generator.tail.state_dict())
    trainer.grow(1)
    for key, value in trainer.critic.state_dict().items():
        assert torch.equal(value, saved_critic[key]), key  # the new scale's critic starts from the last one
    optimizer_g, optimizer_d, _ = trainer.make_optimizers()
    for _ in range(2):
        trainer.train_epoch(1, optimizer_g, optimizer_d)
    for key, value in trainer.generator.body[0].state_dict().items():
        assert torch.equal(value, stage0[key]), key
    for key, value in trainer.generator.head.state_dict().items():
        assert torch.equal(value, head[key]), key
    assert any(not torch.equal(v, tail[k]) for k, v in trainer.generator.tail.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(trainer.generator.body[1].state_dict().values(), stage0.values()))


def test_scale_epochs_give_each_scale_its_own_epochs_and_learning_rate_milestone(tmp_path):
    trainer = make_trainer(tmp_path, num_scales=3, scale_epochs="5, 3,2", lr_decay_at=0.6, gamma_scheduler=0.5)
    summaries = trainer.train()
    assert [s.epochs for s in summaries] == [5, 3, 2]
    for stage, epochs in enumerate((5, 3, 2)):
        lines = (scale_dir(tmp_path, stage) / "stats.jsonl").read_text().splitlines()
        assert len(lines) == epochs
        decayed = [json.loads(line)["lr_critic"] < trainer.config.lr for line in lines]
        milestone = max(1, round(0.6 * epochs))
        assert decayed == [epoch >= milestone for epoch in range(1, epochs + 1)]


@pytest.mark.parametrize("value", ["5,3", "5,3,0", "5,x,2", "5,3,2,1"])
def test_scale_epochs_must_name_one_positive_count_per_scale(value):
    with pytest.raises(ConsinganError, match="scale_epochs must be 3 positive integers"):
        TrainConfig(num_scales=3, scale_epochs=value).validate()


def test_training_lowers_reconstruction_error(tmp_path):
    trainer = make_trainer(tmp_path, num_scales=1, epochs=60, alpha_rec_loss=10.0)
    summary = trainer.train_scale(0)
    import csv

    with open(scale_dir(tmp_path, 0) / "losses.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 60
    first = np.mean([float(r["reconstruction"]) for r in rows[:5]])
    last = np.mean([float(r["reconstruction"]) for r in rows[-5:]])
    assert last < 0.5 * first
    assert summary.losses["reconstruction"] == pytest.approx(float(rows[-1]["reconstruction"]), rel=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradient_penalty_of_a_linear_patch_critic_has_its_closed_form(dims):
    # A 1x1 convolution D(x)(p) = sum_c w_c x_c(p) is a linear patch critic: at every position the gradient of the
    # summed score map is w. ConSinGAN's per-pixel penalty is then (||w|| - 1)^2; the whole-image form takes one norm
    # over all P positions, ||w|| sqrt(P), so it grows with the image size.
    spatial = (6, 5) if dims == 2 else (4, 5, 3)
    conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(3, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.3, -0.4, 1.2]).reshape(1, 3, *([1] * dims)))
    norm = float(torch.tensor([0.3, -0.4, 1.2]).norm())  # 1.3
    real, fake = torch.rand(2, 3, *spatial), torch.rand(2, 3, *spatial)
    positions = int(np.prod(spatial))
    assert gradient_penalty(conv, real, fake).item() == pytest.approx((norm - 1) ** 2, rel=1e-5)
    assert gradient_penalty(conv, real, fake, "pixel").item() == pytest.approx((norm - 1) ** 2, rel=1e-5)
    assert gradient_penalty(conv, real, fake, "image").item() == pytest.approx(
        (norm * positions**0.5 - 1) ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="gradient penalty form"):
        gradient_penalty(conv, real, fake, "global")


def test_two_channel_3d_volume_trains_and_keeps_its_channels(tmp_path):
    torch.manual_seed(0)
    ct = blobs((16, 16, 16), 3) * 2000 - 1000  # Hounsfield-like range
    pet = blobs((16, 16, 16), 4) * 5.0  # SUV-like range
    volume = Volume(np.stack([ct, pet]).astype(np.float32), np.eye(4), ".npy")
    config = TrainConfig(dimension=3, epochs=2, num_scales=2, num_feature_channels=8, num_layers=2, min_size=10,
                         max_size=16, preview_every=0, device="cpu", seed=0).validate()
    trainer = SinGANTrainer(config, volume, tmp_path)
    trainer.train()
    sample = np.load(scale_dir(tmp_path, 1) / "samples" / "epoch00002_sample.npy")
    assert sample.shape == (2, 16, 16, 16)
    # Each channel comes back in its own units.
    assert -1000.5 <= sample[0].min() and sample[0].max() <= 1000.5
    assert 0 - 1e-3 <= sample[1].min() and sample[1].max() <= 5.0 + 1e-3


@pytest.mark.parametrize("dims", [2, 3])
def test_unpadded_convolutions_train_at_every_scale(tmp_path, dims):
    trainer = make_trainer(tmp_path, dims, kernel_size=3, padding=0, epochs=1, num_layers=2)
    trainer.train()
    for stage, shape in enumerate(trainer.shapes):
        sample = np.load(scale_dir(tmp_path, stage) / "samples" / "epoch00001_sample.npy")
        assert sample.shape == shape
