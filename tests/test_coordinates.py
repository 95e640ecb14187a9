"""``--coordinates``: stage 0's coordinate channels through training, saving, sampling (tiled and retargeted)."""

import json

import numpy as np
import pytest

from consingan.cli import app
from consingan.io import read_volume
from consingan.singan.sampler import TrainedPyramid
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_run_with_coordinates_trains_samples_in_tiles_and_retargets(runner, nifti_3d, out_dir):
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--out-dir", str(out_dir),
                                 "--run-name", "c", *TINY, "--coordinates"], terminal_width=200)
    assert result.exit_code == 0, result.output
    run = out_dir / "c"
    assert json.loads((run / "config.json").read_text())["coordinates"] is True
    pyramid = TrainedPyramid.load(run)
    assert pyramid.generator.head[1].conv.in_channels == 1 + 3  # the image channel and one per axis
    whole, tiled = pyramid.sample(2, seed=3, tile="off"), pyramid.sample(2, seed=3, tile=7)
    assert np.allclose(whole, tiled, atol=2e-5, rtol=0)
    for name, args in (("whole", ["--tile", "off"]), ("retargeted", ["--shape", "12,20,16"])):
        folder = out_dir / name
        result = runner.invoke(app, ["sample", str(run), "--out", str(folder), "--num", "1", *args],
                               terminal_width=200)
        assert result.exit_code == 0, result.output
    written = read_volume(out_dir / "retargeted" / "sample_0000.nii.gz", 3, check_values=False)
    assert written.spatial_shape == (12, 20, 16)  # --shape is in the engine's axis order, as read_volume gives it
