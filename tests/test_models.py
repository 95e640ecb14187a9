import pytest
import torch

from consingan.singan.models import Critic, GrowingGenerator

DIMS = [2, 3]


def make_generator(dims, **kwargs):
    torch.manual_seed(0)
    args = dict(num_feature_channels=8, num_layers=2) | kwargs
    return GrowingGenerator(dims, 2, **args)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("padding", [1, 0])
def test_generator_output_follows_each_stage_shape(dims, padding):
    generator = make_generator(dims, padding=padding, cbam=padding == 1)
    generator.add_stage()
    generator.add_stage()
    shapes = [(9,) * dims, (13,) * (dims - 1) + (11,), (20,) * (dims - 1) + (15,)]
    noise = generator.sample_noise(shapes)
    assert noise[0].shape == (1, 2, *shapes[0])
    shrink = 0 if padding == 1 else 2 * 2  # two blocks, each losing 2 voxels without padding
    assert noise[1].shape == (1, 8, *(s + shrink for s in shapes[1]))
    for stages in (1, 2, 3):
        out = generator(noise, num_stages=stages)
        assert out.shape == (1, 2, *shapes[stages - 1])
        assert out.abs().max() <= 1.0  # tanh range


@pytest.mark.parametrize("dims", DIMS)
def test_new_stage_starts_as_copy_of_previous(dims):
    generator = make_generator(dims)
    with torch.no_grad():
        for p in generator.body[0].parameters():
            p.add_(torch.randn_like(p))  # make stage 0 differ from its initialisation
    generator.add_stage()
    old, new = generator.body[0].state_dict(), generator.body[1].state_dict()
    assert old.keys() == new.keys()
    for key in old:
        assert torch.equal(old[key], new[key])
    # A copy, not the same modules: training the new one leaves the old one alone.
    assert all(a is not b for a, b in zip(generator.body[0].parameters(), generator.body[1].parameters()))
    assert generator.noise_amps.tolist() == [1.0, 0.0]


def test_param_groups_learning_rates_and_freezing():
    generator = make_generator(2)
    for _ in range(4):
        generator.add_stage()  # 5 stages: 0..4
    groups = generator.param_groups(active_scales=3, lr=1e-3, lr_factor=0.1)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    for stage in range(5):
        for p in generator.body[stage].parameters():
            if stage >= 2:
                assert by_id[id(p)] == pytest.approx(1e-3 * 0.1 ** (4 - stage))
                assert p.requires_grad
            else:
                assert id(p) not in by_id and not p.requires_grad
    assert all(id(p) not in by_id and not p.requires_grad for p in generator.head.parameters())
    assert all(by_id[id(p)] == pytest.approx(1e-3) for p in generator.tail.parameters())


def test_head_trains_while_first_stage_is_active():
    generator = make_generator(2)
    generator.add_stage()  # 2 stages, 3 active: stage 0 (and the head below it) still trains
    groups = generator.param_groups(active_scales=3, lr=1e-3, lr_factor=0.1)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    for p in generator.head.parameters():
        assert by_id[id(p)] == pytest.approx(1e-4) and p.requires_grad
    for p in generator.body[0].parameters():
        assert by_id[id(p)] == pytest.approx(1e-4)


@pytest.mark.parametrize("dims", DIMS)
def test_state_round_trip_restores_stages_amplitudes_and_fixed_noise(dims):
    generator = make_generator(dims)
    shapes = [(6,) * dims, (9,) * dims]
    generator.set_reconstruction_noise(0, torch.randn(generator.noise_shape(0, shapes[0])))
    generator.add_stage()
    generator.set_reconstruction_noise(1, torch.randn(generator.noise_shape(1, shapes[1])))
    generator.set_noise_amp(1, 0.123)
    restored = GrowingGenerator(dims, 2, num_feature_channels=8, num_layers=2)
    restored.load_grown_state(generator.state_dict())
    assert restored.num_stages == 2
    assert restored.noise_amps.tolist() == pytest.approx([1.0, 0.123])
    with torch.no_grad():
        assert torch.equal(restored(restored.reconstruction_inputs()), generator(generator.reconstruction_inputs()))


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("batch_norm, cbam", [(True, True), (False, False), (True, False), (False, True)])
def test_critic_score_map_and_switches(dims, batch_norm, cbam):
    critic = Critic(dims, 3, num_feature_channels=8, num_layers=2, batch_norm=batch_norm, cbam=cbam)
    out = critic(torch.randn(1, 3, *(12,) * dims))
    assert out.shape == (1, 1, *(12,) * dims)
    names = [name for name, _ in critic.named_modules()]
    assert any(name.endswith("norm") for name in names) == batch_norm
    assert ("body.cbam" in names) == cbam


def test_generator_cbam_switch():
    assert "body.0.cbam" in dict(make_generator(2, cbam=True).named_modules())
    assert "body.0.cbam" not in dict(make_generator(2, cbam=False).named_modules())


def test_generator_rejects_padding_that_grows():
    with pytest.raises(ValueError, match="kernel_size"):
        GrowingGenerator(2, 1, kernel_size=3, padding=2)
