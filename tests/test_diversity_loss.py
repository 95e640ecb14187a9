"""``--diversity-weight`` / ``--diversity-target``: a clipped diversity-sensitive loss that keeps a generator from
mapping every noise to one output (issue 22: an anchored coarsest scale on a smooth template learnt to remove its
noise), in whole and patch training."""

import csv
import json

import pytest
import torch

from consingan.cli import app
from consingan.config import TrainConfig
from consingan.checkpoint import load_state
from consingan.losses import diversity_shortfall
from consingan.singan.models import GrowingGenerator, generator_arguments
from consingan.singan.trainer import train
from tests.conftest import TINY, blobs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_shortfall_pushes_equal_samples_apart_and_stops_at_the_target():
    second = torch.zeros(1, 1, 8, 8)
    # Nearly equal samples (exactly equal ones are a saddle: no direction to push them apart is preferred).
    first = (1e-6 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))).requires_grad_()
    shortfall = diversity_shortfall(first, second, spread=0.5, target=0.4)
    assert shortfall.item() == pytest.approx(0.4, abs=1e-5)  # they fall short by the whole target
    shortfall.backward()
    step = first.detach() - 0.01 * first.grad  # a gradient step moves them apart
    assert (step - second).abs().mean() > (first.detach() - second).abs().mean() + 1e-4
    apart = diversity_shortfall(torch.full((1, 1, 8, 8), 0.1), second, spread=0.5, target=0.4)
    assert apart.item() == pytest.approx(0.2)  # 0.1 / 0.5 = 0.2 of the 0.4 reached
    far = torch.full((1, 1, 8, 8), 0.3, requires_grad=True)
    reached = diversity_shortfall(far, second, spread=0.5, target=0.4)
    reached.backward()
    assert reached.item() == 0 and far.grad.abs().sum() == 0  # past the target it neither counts nor pushes


def _pairwise(generator, shapes, seed: int) -> float:
    with torch.no_grad():
        noise = generator.sample_noise(shapes, batch_size=2, generator=torch.Generator().manual_seed(seed))
        output = generator(noise)
    return float((output[0] - output[1]).abs().mean())


def test_the_diversity_loss_pushes_an_anchored_stages_samples_apart():
    """On the engine's own stage-0 generator, anchored with a small spread: its samples start nearly equal (the
    anchor dominates its input); Adam steps on the loss alone make them differ by the target."""
    config = TrainConfig(dimension=3, num_feature_channels=8, num_layers=2)
    real = torch.from_numpy(blobs((12, 12, 12), 3) * 2 - 1).float()[None, None]
    spread = (real - real.mean()).abs().mean()
    torch.manual_seed(0)
    generator = GrowingGenerator(3, 1, **generator_arguments(config))
    generator.set_anchor(real, 0.1)
    shapes = [real.shape[2:]]
    before = _pairwise(generator, shapes, seed=1) / float(spread)
    optimizer = torch.optim.Adam(generator.parameters(), lr=2e-3)
    for _ in range(30):
        optimizer.zero_grad()
        output = generator(generator.sample_noise(shapes, batch_size=2))
        diversity_shortfall(output[:1], output[1:2], spread, target=0.5).backward()
        optimizer.step()
    after = _pairwise(generator, shapes, seed=1) / float(spread)
    assert before < 0.1 and after > 0.4, (before, after)


def test_the_trainer_adds_the_loss_to_the_generator_step(nifti_3d, out_dir):
    """Same seed, same noise draws: a target of 0 (the loss never pushes) and of 1 (it pushes) train the same run
    apart only through the loss's gradient; the shortfall is logged per epoch."""
    states = {}
    for target in (0.0, 1.0):
        config = TrainConfig(image=str(nifti_3d), dimension=3, epochs=3, num_scales=1, num_feature_channels=8,
                             num_layers=2, min_size=8, max_size=16, preview_every=0, seed=1, device="cpu",
                             out_dir=str(out_dir), run_name=f"t{target:g}", anchor_layout=0.1,
                             diversity_weight=5.0, diversity_target=target)
        result = train(config)
        with open(result.run_dir / "scale_00" / "losses.csv") as table:
            rows = list(csv.DictReader(table))
        assert all(0 <= float(row["diversity_shortfall"]) <= target for row in rows)
        states[target] = load_state(result.run_dir / "scale_00" / "generator.pt")
    assert any(not torch.equal(states[0.0][key], states[1.0][key]) for key in states[0.0])
    assert float(rows[0]["diversity_shortfall"]) > 0.5  # a fresh anchored stage varies little: the loss is active


def test_the_diversity_loss_trains_on_patches(nifti_3d, out_dir):
    config = TrainConfig(image=str(nifti_3d), dimension=3, epochs=3, num_scales=2, num_feature_channels=8,
                         num_layers=2, min_size=10, preview_every=0, seed=0, device="cpu", out_dir=str(out_dir),
                         run_name="p", patch_size="12", diversity_weight=1.0)
    result = train(config)
    with open(result.run_dir / "scale_01" / "losses.csv") as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == 3 and all(0 <= float(row["diversity_shortfall"]) <= config.diversity_target for row in rows)
    # Patch training at the finest scale (16 voxels > the 12-voxel patch): the same loss on random boxes.
    assert json.loads((result.run_dir / "config.json").read_text())["patch_size"] == "12"


@pytest.mark.parametrize("flag", ["--diversity-weight", "--diversity-target"])
def test_a_negative_diversity_option_is_refused_in_one_line(runner, nifti_3d, out_dir, flag):
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 *TINY, flag, "-0.5"], terminal_width=200)
    assert result.exit_code != 0 and flag[2:].replace("-", "_") in result.output
    assert "Traceback" not in result.output
