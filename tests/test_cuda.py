"""CUDA smoke tests: every command end to end on the GPU, tiny shapes. Skipped on machines without CUDA."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY
from tests.test_ill_cases import PAIRED_TRAIN, make_pairs, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("image", ["png_rgb", "nifti_3d"])
def test_train_sample_evaluate_and_resume_on_cuda(request, runner, out_dir, tmp_path, image):
    path = request.getfixturevalue(image)
    dims = 2 if image == "png_rgb" else 3
    result = run_cli(runner, ["train", "--image", path, "--dim", dims, *TINY, "--device", "cuda",
                              "--out-dir", out_dir, "--run-name", "gpu"])
    assert result.exit_code == 0, result.output
    run = out_dir / "gpu"
    assert json.loads((run / "config.json").read_text())["device"] == "cuda"
    # Weights trained on the GPU sample alike on the GPU and the CPU (state dicts, mapped on loading).
    for device in ("cuda", "cpu"):
        result = run_cli(runner, ["sample", run, "--num", "2", "--seed", "1", "--device", device,
                                  "--out", tmp_path / device])
        assert result.exit_code == 0, result.output
    suffix = ".png" if dims == 2 else ".nii.gz"
    files = sorted(p.name for p in (tmp_path / "cuda").iterdir())  # the samples and their contact sheet
    assert files == sorted(["contact_sheet.png", f"sample_0000{suffix}", f"sample_0001{suffix}"])
    result = run_cli(runner, ["evaluate", run, "--num", "3", "--device", "cuda"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((run / "evaluation_001" / "evaluation.json").read_text())
    assert np.isfinite(evaluation["swd"]["mean"])
    # A run cut short resumes on the GPU from its saved state.
    (run / "scale_01" / "scale.json").unlink()
    result = run_cli(runner, ["train", "--resume", run, "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert (run / "scale_01" / "scale.json").is_file()


def test_paired_train_and_predict_on_cuda(runner, tmp_path, out_dir):
    source, target = make_pairs(tmp_path)
    result = run_cli(runner, ["paired", "train", "--dim", "2", "--source", source, "--target", target, "--out-dir", out_dir,
                              "--run-name", "gpu", *PAIRED_TRAIN, "--device", "cuda"])
    assert result.exit_code == 0, result.output
    result = run_cli(runner, ["paired", "predict", out_dir / "gpu", "--source", source, "--out", tmp_path / "pred",
                              "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "pred").iterdir())) == len(list(source.iterdir()))
