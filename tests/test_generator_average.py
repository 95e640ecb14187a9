"""The single-image generator's moving average (``--ema-decay``): what it averages, that it takes over at each scale's
end, that a resumed run keeps it, and its checked values."""

import dataclasses

import numpy as np
import pytest
import torch

from consingan.config import TrainConfig
from consingan.errors import ConsinganError
from consingan.io import Volume
from consingan.nn.ema import ParameterAverage
from consingan.singan.trainer import SinGANTrainer, resume, train
from tests.conftest import StopAt, blobs

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    values = dict(dimension=2, epochs=4, num_scales=2, num_feature_channels=4, num_layers=2, min_size=10, max_size=32,
                  Dsteps=2, Gsteps=2, preview_every=0, checkpoint_every=2, device="cpu", seed=0, patch_size="off",
                  ema_decay=0.9)
    return TrainConfig(**{**values, **overrides}).validate()


def make_trainer(tmp_path, name, **overrides):
    torch.manual_seed(0)
    volume = Volume(blobs((32, 32))[None].astype(np.float32), np.eye(3), ".npy")
    return SinGANTrainer(config(**overrides), volume, tmp_path / name)


def test_the_average_follows_the_weights_with_its_warm_up():
    module = torch.nn.Linear(3, 2)
    average = ParameterAverage(module, 0.99)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    average.update(module)  # first step: decay min(0.99, 1/10), so the average moves 90 % of the way
    for name, p in module.named_parameters():
        assert torch.allclose(average.shadow[name], start[name] + 0.9, atol=1e-6)
    assert average.steps == 1
    copy = ParameterAverage(torch.nn.Linear(3, 2), 0.99)
    copy.load_state_dict(average.state_dict())
    assert copy.steps == 1 and all(torch.equal(copy.shadow[k], average.shadow[k]) for k in average.shadow)
    with pytest.raises(KeyError):
        ParameterAverage(torch.nn.Linear(3, 3, bias=False), 0.99).load_state_dict(average.state_dict())


def test_at_a_scales_end_the_generator_holds_the_average_of_its_updates(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "a")
    seen = []
    real_copy = ParameterAverage.copy_to

    def recording_copy(self, module):
        seen.append({k: v.clone() for k, v in self.shadow.items()})
        real_copy(self, module)

    monkeypatch.setattr(ParameterAverage, "copy_to", recording_copy)
    trainer.train()
    assert len(seen) == 2  # once per scale
    final = dict(trainer.generator.named_parameters())
    assert all(torch.equal(final[k], seen[-1][k]) for k in final)
    # 4 epochs x one average update per generator gradient (fresh: Gsteps of them)
    assert trainer.average.steps == 4 * 2
    plain = make_trainer(tmp_path, "b", ema_decay=0.0)
    plain.train()
    assert plain.average is None
    assert any(not torch.equal(final[k], p) for k, p in plain.generator.named_parameters())


@pytest.mark.parametrize("stop", [(1, 3), (0, 4)])
def test_a_resumed_run_with_an_average_equals_one_that_never_stopped(tmp_path, stop):
    import nibabel as nib

    image = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image((blobs((16, 16, 16)) * 1000).astype(np.int16), np.eye(4)), str(image))
    settings = config(dimension=3, image=str(image), out_dir=str(tmp_path / "o"), max_size=250)
    whole = train(dataclasses.replace(settings, run_name="whole"))
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(settings, run_name="cut"), reporter=StopAt(*stop))
    resumed = resume(tmp_path / "o" / "cut")
    a = torch.load(whole.run_dir / "scale_01" / "generator.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "scale_01" / "generator.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), True])
def test_ema_decay_out_of_range_is_refused(value):
    with pytest.raises(ConsinganError, match="ema_decay must be in"):
        config(ema_decay=value)
