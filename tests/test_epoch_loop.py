"""The epoch loop the dataset families share (``consingan.epochs``): stats.jsonl, snapshots, previews, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from consingan.config import PairedConfig
from consingan.runs import RunFolder
from tests.test_conditional import tiny, write_set
from tests.test_paired_cli import make_pairs


def epochs_logged(folder) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / RunFolder.STATS).read_text().splitlines()]


def test_conditional_run_logs_every_epoch_and_keeps_snapshots(tmp_path):
    from consingan.conditional.trainer import train_conditional

    data = write_set(tmp_path / "data", 2)
    result = train_conditional(tiny(2, data, tmp_path / "out", epochs=5, checkpoint_every=2, preview_every=2))
    records = [json.loads(line) for line in (result.run_dir / RunFolder.STATS).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    for record, losses in zip(records, result.losses):
        assert record["seconds"] > 0 and record["lr_generator"] == 1e-4 and record["lr_discriminator"] == 4e-4
        assert record["d"] == pytest.approx(losses["d"]) and record["g"] == pytest.approx(losses["g"])
    # Snapshots at epochs 2 and 4 (the final weights are generator.pt), each the EMA generator of that epoch.
    snapshots = RunFolder.open(result.run_dir, "conditional").snapshots()
    assert [p.name for p in snapshots] == ["epoch_00002.pt", "epoch_00004.pt"]
    final = torch.load(result.run_dir / RunFolder.WEIGHTS, weights_only=True)
    for path in snapshots:
        weights = torch.load(path, weights_only=True)
        assert weights.keys() == final.keys()
        assert any(not torch.equal(weights[k], final[k]) for k in final)  # an earlier model, not a copy
    previews = sorted(p.name for p in (result.run_dir / RunFolder.PREVIEWS).iterdir())
    assert previews == ["epoch00002.png", "epoch00004.png", "epoch00005.png"]


def test_resume_drops_logged_epochs_after_the_state_it_continues_from(tmp_path):
    from consingan.conditional.trainer import resume_conditional, train_conditional

    data = write_set(tmp_path / "data", 2)

    def stop_after_second(epoch: int, losses: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_conditional(tiny(2, data, tmp_path / "out", epochs=4), stop_after_second)
    (run_dir,) = (tmp_path / "out").iterdir()
    # As if the process had been killed after logging epoch 3 but before its state was written, mid-line.
    with open(run_dir / RunFolder.STATS, "a") as stream:
        stream.write(json.dumps({"epoch": 3, "seconds": 1.0}) + "\n" + '{"epoch": 4, "secon')
    assert len((run_dir / RunFolder.STATS).read_text().splitlines()) == 4
    resume_conditional(run_dir)
    assert epochs_logged(run_dir) == [1, 2, 3, 4]
    assert all("d" in json.loads(line) for line in (run_dir / RunFolder.STATS).read_text().splitlines())


def test_paired_run_writes_previews_of_input_prediction_and_target(tmp_path):
    from consingan.paired.trainer import train_paired

    source, target = make_pairs(tmp_path, 2, count=3)
    config = PairedConfig(dimension=2, source_dir=str(source), target_dir=str(target), epochs=3, tile=16, num_feature_channels=4,
                          seed=0, device="cpu", out_dir=str(tmp_path / "out"), preview_every=2, checkpoint_every=1,
                          one_hot=True)
    result = train_paired(config)
    assert epochs_logged(result.run_dir) == [1, 2, 3]
    assert [p.name for p in RunFolder.open(result.run_dir, "paired").snapshots()] == ["epoch_00001.pt",
                                                                                       "epoch_00002.pt"]
    previews = sorted((result.run_dir / RunFolder.PREVIEWS).iterdir())
    assert [p.name for p in previews] == ["epoch00002.png", "epoch00003.png"]
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(previews[-1])))
    # Three tiles (rows), each three panels side by side: wider than one panel's square, and not blank.
    assert picture.ndim == 3 and picture.shape[1] > 2 * picture.shape[0] / 3 and picture.std() > 10
    assert np.unique(picture.reshape(-1, 3), axis=0).shape[0] > 8


def test_single_image_scales_log_every_epoch(tmp_path):
    from tests.test_trainer import make_trainer

    trainer = make_trainer(tmp_path, 2, epochs=3, num_scales=2)
    trainer.train()
    run = trainer.run
    assert run.completed_scales() == [0, 1]
    for stage in run.completed_scales():
        records = run.stats(run.scale_dir(stage))
        assert [r["epoch"] for r in records] == [1, 2, 3]
        assert all(r["scale"] == stage and r["seconds"] > 0 and "lr_generator" in r and "reconstruction" in r for r in records)


def test_a_moved_conditional_run_resumes_and_evaluates_without_its_data(runner, tmp_path):
    import shutil

    from consingan.cli import app
    from consingan.conditional.trainer import resume_conditional, train_conditional

    data = write_set(tmp_path / "data", 2)

    def stop_after_first(epoch: int, losses: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    whole = train_conditional(tiny(2, data, tmp_path / "whole", epochs=2))
    with pytest.raises(KeyboardInterrupt):
        train_conditional(tiny(2, data, tmp_path / "out", epochs=2), stop_after_first)
    (run_dir,) = (tmp_path / "out").iterdir()
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(run_dir), moved)
    shutil.rmtree(data)  # the original images are gone: the run has its own copy
    resumed = resume_conditional(moved)
    first = torch.load(whole.run_dir / RunFolder.WEIGHTS, weights_only=True)
    second = torch.load(resumed.run_dir / RunFolder.WEIGHTS, weights_only=True)
    for key in first:  # the same model as a run that never stopped or moved
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    result = runner.invoke(app, ["evaluate", str(moved), "--num", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (moved / "evaluation_001" / "evaluation.json").is_file()


def test_a_moved_paired_run_resumes_without_its_data(tmp_path):
    import shutil

    from consingan.paired.trainer import resume_paired, train_paired

    source, target = make_pairs(tmp_path, 2)
    options = dict(dimension=2, source_dir=str(source), target_dir=str(target), epochs=2, tile=16,
                   num_feature_channels=4, seed=0, device="cpu")
    whole = train_paired(PairedConfig(**options, out_dir=str(tmp_path / "whole")))

    def stop_after_first(epoch: int, losses: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_paired(PairedConfig(**options, out_dir=str(tmp_path / "out")), stop_after_first)
    (run_dir,) = (tmp_path / "out").iterdir()
    moved = tmp_path / "elsewhere"
    shutil.move(str(run_dir), moved)
    shutil.rmtree(source)
    shutil.rmtree(target)
    resumed = resume_paired(moved)
    first = torch.load(whole.run_dir / RunFolder.WEIGHTS, weights_only=True)
    second = torch.load(resumed.run_dir / RunFolder.WEIGHTS, weights_only=True)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
