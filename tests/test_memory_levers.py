"""The memory levers beyond patches (issue 23): --checkpoint-stages (activation checkpointing of the trained generator
stages) gives the same gradients and weights as without; --precision bf16 trains on the CPU with float32 losses,
penalty and outputs; fp16 is refused off CUDA in one line; run folders from before the options read as fp32 / off."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

import consingan.singan.models as models
import consingan.singan.trainer as trainer_module
from consingan.cli import app
from consingan.config import TrainConfig, resolve_config
from consingan.errors import ConsinganError
from consingan.io import Volume
from consingan.losses import gradient_penalty
from consingan.singan import regions as R
from consingan.singan.models import Critic, GrowingGenerator
from consingan.singan.trainer import SinGANTrainer, train
from tests.conftest import TINY, assert_clean_failure, blobs

SHAPES = {2: [(10, 12), (14, 17), (20, 24)], 3: [(7, 8, 6), (10, 11, 8), (13, 15, 11)]}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts the stages that go through torch's checkpoint, so that a test of equal gradients cannot pass by never
    checkpointing anything."""
    calls = []
    real = models.checkpoint

    def counting(function, *inputs, **options):
        calls.append(options)
        return real(function, *inputs, **options)

    monkeypatch.setattr(models, "checkpoint", counting)
    return calls


def grown(dims, device="cpu"):
    """Three stages of O(1) signals (the DCGAN init would make them vanish), stage 0 and the head frozen as in
    concurrent training of the newest two."""
    torch.manual_seed(0)
    generator = GrowingGenerator(dims, 1, num_feature_channels=4, num_layers=2, cbam=True)
    for _ in range(2):
        generator.add_stage()
    with torch.no_grad():
        for p in generator.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1)
        generator.noise_amps.copy_(torch.tensor([1.0, 0.6, 0.8]))
    generator.param_groups(active_scales=2, lr=1.0, lr_factor=0.1)
    return generator.to(device)


def gradients(generator, forward):
    """The output of ``forward()`` and every trained parameter's gradient of a fixed random weighting of it."""
    generator.zero_grad(set_to_none=True)
    output = forward()
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(3)).to(output.device)
    (output * weights).sum().backward()
    return output.detach(), {name: p.grad.clone() for name, p in generator.named_parameters() if p.requires_grad}


def assert_same(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key


# --- checkpoint_stages --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("path", ["whole", "region"])
def test_checkpointed_stages_give_the_same_gradients(dims, path, checkpoint_calls):
    generator = grown(dims)
    shapes = SHAPES[dims]
    noise = generator.sample_noise(shapes, generator=torch.Generator().manual_seed(1))
    box = tuple((n // 2 - 3, n // 2 + 3) for n in shapes[-1])  # a patch inside the finest grid, margins clipped

    def forward():
        if path == "whole":
            return generator(noise)
        return R.region_forward(generator, R.TensorNoise(generator, noise), box, descriptors="region",
                                frozen_below=1)

    plain_output, plain = gradients(generator, forward)
    assert not checkpoint_calls
    generator.checkpoint_stages = True
    output, checkpointed = gradients(generator, forward)
    assert len(checkpoint_calls) == 2  # the two trained stages, not the frozen stage 0
    assert all(call.get("use_reentrant") is False for call in checkpoint_calls)
    assert torch.allclose(output, plain_output, rtol=1e-6, atol=1e-7)
    assert_same(checkpointed, plain)
    with torch.no_grad():  # sampling records no graph: nothing to recompute
        forward()
    assert len(checkpoint_calls) == 2


def make_trainer(tmp_path, name, dims=2, **overrides):
    size = 32 if dims == 2 else 16
    array = blobs((size,) * dims)[None].astype(np.float32)
    values = dict(dimension=dims, epochs=2, num_scales=2, num_feature_channels=4, num_layers=2, min_size=10,
                  max_size=size, Dsteps=2, Gsteps=2, preview_every=1, device="cpu", seed=0, patch_size="off")
    config = TrainConfig(**{**values, **overrides}).validate()
    torch.manual_seed(0)
    return SinGANTrainer(config, Volume(array, np.eye(dims + 1), ".npy"), tmp_path / name)


def final_weights(trainer):
    return {**trainer.generator.state_dict(), **{f"critic.{k}": v for k, v in trainer.critic.state_dict().items()}}


@pytest.mark.parametrize("dims,patch", [(2, "off"), (2, "12"), (3, "12")])
def test_training_with_checkpointed_stages_ends_with_the_same_weights(tmp_path, checkpoint_calls, dims, patch):
    weights = {}
    for checkpointed in (False, True):
        trainer = make_trainer(tmp_path, f"checkpoint_{checkpointed}", dims, patch_size=patch,
                               checkpoint_stages=checkpointed)
        assert trainer.generator.checkpoint_stages is checkpointed
        assert trainer.patched(1) is (patch != "off")
        trainer.train()
        weights[checkpointed] = final_weights(trainer)
        assert bool(checkpoint_calls) is checkpointed
    assert_same(weights[True], weights[False])


# --- precision ----------------------------------------------------------------------------------------------------

def test_precision_and_checkpoint_stages_are_options_with_checked_values(tmp_path):
    config = TrainConfig()
    assert (config.precision, config.checkpoint_stages) == ("fp32", False)
    flags = resolve_config(None, {"precision": "bf16", "checkpoint_stages": True})
    assert (flags.precision, flags.checkpoint_stages) == ("bf16", True)
    config_file = tmp_path / "options.yaml"
    config_file.write_text("precision: fp16\ncheckpoint_stages: true\n")
    assert resolve_config(config_file, {}).precision == "fp16"  # refused later, where the device is known
    for bad in ("fp8", "float32", "BF16"):
        with pytest.raises(ConsinganError, match="precision must be one of fp32, bf16, fp16"):
            resolve_config(None, {"precision": bad})
    with pytest.raises(ConsinganError, match="checkpoint_stages must be true or false"):
        resolve_config(None, {"checkpoint_stages": "yes"})


def test_the_gradient_penalty_is_float32_under_bf16():
    torch.manual_seed(0)
    critic = Critic(2, 1, num_feature_channels=4, num_layers=2)
    real, fake = torch.rand(1, 1, 16, 16) * 2 - 1, torch.rand(1, 1, 16, 16) * 2 - 1
    seen = set()
    critic.head.conv.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    penalties = {}
    for name, precision in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(1)  # the same mixing weight
        penalties[name] = gradient_penalty(critic, real, fake.to(torch.bfloat16) if precision else fake,
                                           reference=real, precision=precision)
        assert penalties[name].dtype == torch.float32 and penalties[name].requires_grad
    assert seen == {torch.float32, torch.bfloat16}  # the critic itself ran in bf16 under autocast
    # bf16 keeps 8 bits of mantissa: the same penalty to a few per cent, not the same bits.
    assert penalties["bf16"].item() == pytest.approx(penalties["fp32"].item(), rel=0.05)
    assert penalties["bf16"].item() != penalties["fp32"].item()


def test_the_penalty_of_scaled_scores_is_unscaled():
    """fp16's gradient scaler: the inner gradient of scores times the scale, divided by it, is the same penalty, and
    so are its gradients (checked in float32 here; the scale only matters where float16 would underflow)."""
    torch.manual_seed(0)
    # Without batch norm: with it, the bias before each norm has a gradient of exactly 0 and only rounding noise.
    critic = Critic(2, 1, num_feature_channels=4, num_layers=2, batch_norm=False)
    real, fake = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    results = []
    for scale in (1.0, 1000.0):
        torch.manual_seed(1)
        critic.zero_grad(set_to_none=True)
        penalty = gradient_penalty(critic, real, fake, scale=scale)
        penalty.backward()
        results.append((penalty.detach(), {n: p.grad.clone() for n, p in critic.named_parameters()
                                                 if p.grad is not None}))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    assert_same(results[0][1], results[1][1])


@pytest.mark.parametrize("patch", ["off", "12"])
def test_bf16_trains_on_the_cpu_with_float32_losses_and_outputs(tmp_path, monkeypatch, patch):
    trainer = make_trainer(tmp_path, "bf16", precision="bf16", patch_size=patch)
    assert trainer.autocast_dtype == torch.bfloat16
    assert not any(scaler.is_enabled() for scaler in trainer.scalers.values())  # no gradient scaling in bf16
    seen, penalties = set(), []
    trainer.critic.head.conv.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))

    def recorded_penalty(*args, **kwargs):
        penalty = gradient_penalty(*args, **kwargs)
        penalties.append((kwargs["precision"], penalty.dtype))
        return penalty

    monkeypatch.setattr(trainer_module, "gradient_penalty", recorded_penalty)
    summaries = trainer.train()
    assert torch.bfloat16 in seen
    assert penalties and set(penalties) == {(torch.bfloat16, torch.float32)}
    assert all(math.isfinite(v) for s in summaries for v in s.losses.values())
    assert all(p.dtype == torch.float32 for p in trainer.generator.parameters())
    assert trainer.reconstruct(1).dtype == torch.float32
    for name in ("sample", "reconstruction"):
        written = np.load(tmp_path / "bf16" / "scale_01" / "samples" / f"epoch00002_{name}.npy")
        assert written.dtype == np.float32 and np.isfinite(written).all()


def test_bf16_with_checkpointed_stages_through_train_records_both(nifti_3d, out_dir):
    config = TrainConfig(image=str(nifti_3d), dimension=3, epochs=2, num_scales=2, num_feature_channels=4,
                         num_layers=2, min_size=10, Dsteps=2, Gsteps=2, preview_every=0, seed=0, device="cpu",
                         out_dir=str(out_dir), run_name="bf16", precision="bf16", checkpoint_stages=True)
    result = train(config)
    recorded = json.loads((result.run_dir / "config.json").read_text())
    assert (recorded["precision"], recorded["checkpoint_stages"]) == ("bf16", True)
    assert all(math.isfinite(v) for s in result.scales for v in s.losses.values())
    sample = nib.load(str(result.run_dir / "scale_01" / "samples" / "epoch00002_sample.nii.gz"))
    assert sample.get_data_dtype() == np.float32


@pytest.mark.parametrize("device", ["cpu"] + ([] if torch.cuda.is_available() else ["auto"]))
def test_fp16_off_cuda_is_refused_in_one_line_before_anything_is_written(runner, png_rgb, out_dir, device):
    result = runner.invoke(app, ["train", "--image", str(png_rgb), "--dim", "2", "--out-dir", str(out_dir), *TINY,
                                 "--precision", "fp16", "--device", device], terminal_width=200)
    assert_clean_failure(result, "fp16 needs CUDA; use bf16 or fp32 on the CPU")
    assert not out_dir.exists()


def test_a_trainer_made_directly_refuses_fp16_on_the_cpu(tmp_path):
    with pytest.raises(ConsinganError, match="^fp16 needs CUDA; use bf16 or fp32 on the CPU$"):
        make_trainer(tmp_path, "fp16", precision="fp16")
    assert not (tmp_path / "fp16").exists()


def test_a_run_folder_from_before_the_options_reads_as_fp32_without_checkpointing(tmp_path):
    from consingan.runs import RunFolder

    values = TrainConfig(image="x.nii.gz", patch_size="off").to_dict()
    del values["precision"], values["checkpoint_stages"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    (tmp_path / "run.json").write_text(json.dumps({
        "family": "singan", "image": "x.nii.gz", "spatial_dims": 3, "channels": 1, "source_shape": [8, 8, 8],
        "output_suffix": ".nii.gz", "output_dtype": "int16", "source_affine": np.eye(4).tolist(),
        "shapes": [[8, 8, 8]], "intensity": {"minimum": [0.0], "maximum": [1.0]}, "nifti_header": None,
        "labels": None}))
    config = RunFolder.open(tmp_path).config
    assert (config.precision, config.checkpoint_stages) == ("fp32", False)


def test_fp16_loss_scales_are_saved_in_the_training_state_and_restored(tmp_path):
    # fp16 needs CUDA, so the scalers of a CPU trainer are swapped for enabled ones that stand where a run's would.
    from consingan.runs import RunFolder

    def with_scalers(name, scale):
        trainer = make_trainer(tmp_path, name)
        trainer.scalers = {n: torch.amp.GradScaler("cpu", init_scale=scale, enabled=True) for n in trainer.scalers}
        return trainer

    saved = with_scalers("a", 512.0)
    saved.save_training_state(0, 1, [], 1.0, saved.make_optimizers())
    state = saved.run.load_training_state(saved.run.scale_dir(0) / RunFolder.STATE, ("generator", "critic"))
    assert {n: s["scale"] for n, s in state.scalers.items()} == {"generator": 512.0, "critic": 512.0}
    fresh = with_scalers("b", 65536.0)
    fresh.load_scalers(state, tmp_path / "a")
    assert all(scaler.get_scale() == 512.0 for scaler in fresh.scalers.values())
    state.scalers["critic"] = {"scale": "not a number"}
    with pytest.raises(ConsinganError, match="damaged gradient-scaler state"):
        fresh.load_scalers(state, tmp_path / "a")


# --- CUDA only ----------------------------------------------------------------------------------------------------

@CUDA
@pytest.mark.parametrize("precision,patch", [("fp16", "off"), ("fp16", "12"), ("bf16", "off")])
def test_mixed_precision_trains_on_cuda(tmp_path, precision, patch):
    trainer = make_trainer(tmp_path, precision, device="cuda", precision=precision, patch_size=patch,
                           generator_update="repeat" if patch == "off" else "fresh")
    assert all(scaler.is_enabled() for scaler in trainer.scalers.values()) is (precision == "fp16")
    summaries = trainer.train()
    assert all(math.isfinite(v) for s in summaries for v in s.losses.values())
    assert trainer.reconstruct(1).dtype == torch.float32
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.generator.parameters())


@CUDA
@pytest.mark.parametrize("dims", [2, 3])
def test_checkpointed_stages_give_the_same_gradients_on_cuda(dims, checkpoint_calls):
    generator = grown(dims, "cuda")
    noise = generator.sample_noise(SHAPES[dims])
    _, plain = gradients(generator, lambda: generator(noise))
    generator.checkpoint_stages = True
    _, checkpointed = gradients(generator, lambda: generator(noise))
    assert len(checkpoint_calls) == 2
    for key in plain:
        assert torch.allclose(plain[key], checkpointed[key], rtol=1e-4, atol=1e-6), key


def test_3d_convolutions_compute_in_bf16_under_cpu_autocast():
    # The engine's 3D convolution (consingan.nn.fast_conv) calls oneDNN in float32 itself; under bf16 autocast it must
    # hand over to PyTorch's convolution, which autocast casts, or --precision bf16 changes nothing in 3D.
    from consingan.nn import factory

    conv = factory.conv(3, 4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    assert conv(x).dtype == torch.float32  # and float32 outside it
