"""``--dry-run`` on every train command: the checks and the configuration, nothing written; with ``--resume``, how far
the run got."""

import pytest

from consingan.cli import app
from tests.conftest import assert_clean_failure
from tests.test_conditional import TINY_FLAGS, write_set
from tests.test_ill_cases import run_cli, snapshot
from tests.test_paired_cli import make_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paired_dry_run_checks_the_pairs_and_writes_nothing(runner, tmp_path):
    source, target = make_pairs(tmp_path, 2)
    flags = ["paired", "train", "--source", source, "--target", target, "--dim", "2", "--epochs", "1",
             "--out-dir", tmp_path / "out", "--tile", "16", "--base-channels", "4", "--seed", "0", "--run-name", "p"]
    result = run_cli(runner, [*flags, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "2 pairs" in result.output and "num_feature_channels" in result.output and not (tmp_path / "out").exists()
    (target / "cell1.png").unlink()  # a source without its target is found by the dry run too
    assert_clean_failure(run_cli(runner, [*flags, "--dry-run"]), "cell1")
    (tmp_path / "again").mkdir()
    make_pairs(tmp_path / "again", 2)
    result = run_cli(runner, [*flags[:2], "--source", tmp_path / "again" / "masks", "--target",
                              tmp_path / "again" / "images", *flags[6:]])
    assert result.exit_code == 0, result.output
    before = snapshot(tmp_path / "out" / "p")
    result = run_cli(runner, ["paired", "train", "--resume", tmp_path / "out" / "p", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "resume: epochs done 1 of 1; nothing left to train" in result.output
    assert snapshot(tmp_path / "out" / "p") == before


def test_conditional_dry_run_lists_the_classes_and_writes_nothing(runner, tmp_path):
    data = write_set(tmp_path / "data", 2)
    flags = ["conditional", "train", "--data", data, "--size", "16", "--out-dir", tmp_path / "out", "--run-name", "c",
             *TINY_FLAGS]
    result = run_cli(runner, [*flags, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "6 images in 2 classes" in result.output and "nothing written" in result.output
    assert not (tmp_path / "out").exists()
    assert run_cli(runner, flags).exit_code == 0
    before = snapshot(tmp_path / "out" / "c")
    result = run_cli(runner, ["conditional", "train", "--resume", tmp_path / "out" / "c", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "resume: epochs done 2 of 2" in result.output and snapshot(tmp_path / "out" / "c") == before
    assert_clean_failure(run_cli(runner, ["conditional", "train", "--resume", tmp_path / "out" / "c", "--dry-run",
                                          "--epochs", "3"]), "drop --epochs")


IGNORED_CASES = {
    "label smoothing outside BCE": (["conditional", "train"], ["--label-smoothing", "0.1"],
                                    "--label-smoothing 0.1 is ignored: it applies only with --loss bce"),
    "classifier weight with projection": (["conditional", "train"], ["--lambda-classifier", "2"],
                                          "--lambda-classifier 2.0 is ignored: it applies only with --conditioning "
                                          "acgan"),
    "feature matching with a patch critic": (["paired", "train"], ["--lambda-feature-matching", "5"],
                                             "--lambda-feature-matching 5.0 is ignored"),
    "window percentiles under min-max": (["train"], ["--intensity-mapping", "minmax", "--window-low-percentile", "2"],
                                         "--window-low-percentile 2.0 is ignored: it applies only with "
                                         "--intensity-mapping window"),
    "depth for a model that is not a U-Net": (["paired", "train"], ["--model", "resnet", "--depth", "3"],
                                              "--depth 3 is ignored: it applies only with the U-Nets"),
}


@pytest.mark.parametrize("case", list(IGNORED_CASES))
def test_an_option_the_mode_ignores_warns_once(runner, tmp_path, nifti_3d, case):
    from consingan.config import ConditionalConfig, PairedConfig, TrainConfig, ignored_options

    command, extra, phrase = IGNORED_CASES[case]
    config_class = {"conditional": ConditionalConfig, "paired": PairedConfig, "train": TrainConfig}[command[0]]
    names = {extra[i].lstrip("-").replace("-", "_"): extra[i + 1] for i in range(0, len(extra), 2)}
    kinds = {"intensity_mapping": str, "model": str, "depth": int}
    names = {k: kinds.get(k, float)(v) for k, v in names.items()}
    config = config_class.from_dict(names)
    assert [line for line in ignored_options(config) if phrase in line]
    assert ignored_options(config_class()) == []  # defaults warn about nothing
    if command == ["train"]:
        result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--dry-run", "--num-scales",
                                     "2", "--min-size", "8", "--max-size", "16", *extra], terminal_width=300)
        assert result.exit_code == 0, result.output
        assert result.output.count("is ignored") == 1 and phrase in result.output


def test_a_dry_run_names_each_scales_epochs_and_a_wrong_count_is_one_line(runner, tmp_path, nifti_3d):
    flags = ["train", "--image", str(nifti_3d), "--dim", "3", "--dry-run", "--num-scales", "2", "--min-size", "8",
             "--max-size", "16", "--out-dir", str(tmp_path / "out")]
    result = runner.invoke(app, [*flags, "--scale-epochs", "30,10"], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "pyramid: 11x8x8 (30 epochs)  16x12x12 (10 epochs)" in result.output
    assert_clean_failure(runner.invoke(app, [*flags, "--scale-epochs", "30,10,5"]),
                         "scale_epochs must be 2 positive integers")
    assert not (tmp_path / "out").exists()
