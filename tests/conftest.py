"""Shared fixtures: tiny real-looking images written in the formats users bring, and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from consingan.singan.trainer import SilentReporter

torch.set_num_threads(2)

# The smallest settings that still build a 2-scale pyramid with every code path on (CBAM, batch norm, 2 layers).
TINY = ["--epochs", "3", "--num-scales", "2", "--num-feature-channels", "8", "--num-layers", "2", "--min-size", "10",
        "--preview-every", "2", "--seed", "0", "--dsteps", "2", "--gsteps", "2"]


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random texture in [0, 1] (sum of Gaussians), so resizing and training see structure, not noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    image = np.zeros(shape)
    for _ in range(6):
        centre = [rng.uniform(0, s) for s in shape]
        width = rng.uniform(2, max(shape) / 3)
        image += np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * width**2))
    return (image - image.min()) / (image.max() - image.min())


@pytest.fixture
def png_rgb(tmp_path: Path) -> Path:
    import SimpleITK as sitk

    rgb = np.stack([blobs((32, 32), s) for s in range(3)], axis=-1)
    path = tmp_path / "tiny.png"
    sitk.WriteImage(sitk.GetImageFromArray((rgb * 255).round().astype(np.uint8), isVector=True), str(path))
    return path


@pytest.fixture
def nifti_3d(tmp_path: Path) -> Path:
    import nibabel as nib

    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    data = (blobs((16, 16, 16), 1) * 1000 - 200).astype(np.int16)
    path = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


def assert_clean_failure(result, phrase: str | None = None, exit_code: int = 2, one_line: bool = True) -> None:
    """A CLI failure as the user sees it: exit ``exit_code`` (non-zero) through the CLI's own error path, the error in
    one line (the last line when ``one_line`` is False: a command that had started printing), with ``phrase`` in it.

    CliRunner stores an exception that escapes the CLI in ``result.exception`` (exit code 1) instead of printing its
    traceback, so "no traceback in the output" proves nothing: a clean failure is a ``SystemExit``."""
    assert exit_code != 0
    assert isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception!r} escaped the CLI\n{result.output}"
    assert result.exit_code == exit_code, result.output
    lines = result.output.strip().splitlines()
    assert lines, "the failure printed nothing"
    if one_line:
        assert len(lines) == 1, result.output
    if phrase is not None:
        assert phrase in lines[-1], result.output


class StopAt(SilentReporter):
    """Raises KeyboardInterrupt after a given epoch of a given scale, like a user pressing Ctrl-C."""

    def __init__(self, stage, epoch):
        self.stop = (stage, epoch)

    def update(self, stage, epoch, losses):
        if (stage, epoch) == self.stop:
            raise KeyboardInterrupt


@pytest.fixture
def one_thread():
    """Tiny tensors: on the shared 2-core machine a second thread spends longer synchronising than computing. A module
    uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
