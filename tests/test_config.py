import json
from pathlib import Path

import pytest

from consingan.config import ConditionalConfig, PairedConfig, TrainConfig, option_names, resolve_config
from consingan.errors import ConsinganError
from consingan.cli import app

SEED_TABLE = {
    "data_dir": "data", "out_dir": "out", "dimension": 3, "epochs": 2000, "num_scales": 8, "active_scales": 3,
    "num_layers": 3, "num_feature_channels": 64, "kernel_size": 3, "padding": 1, "batch_norm": True, "cbam": True,
    "lrelu_alpha": 0.05, "beta1_adam": 0.5, "lr": 0.0005, "lr_factor": 0.1, "gamma_scheduler": 0.1, "noise_amp": 0.1,
    "alpha_rec_loss": 10, "lambda_grad_penalty": 0.1, "Dsteps": 3, "Gsteps": 3, "max_size": 250, "min_size": 25,
}


def test_defaults_are_the_seed_table():
    config = TrainConfig().to_dict()
    for name, value in SEED_TABLE.items():
        assert config[name] == value, name


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "num_scales: 5\nDsteps: 4\ncbam: false\nlr: 0.001\nepochs: 100\n"),
    (".toml", "num_scales = 5\nDsteps = 4\ncbam = false\nlr = 0.001\nepochs = 100\n"),
])
def test_file_then_flags_win(tmp_path, suffix, text):
    path = tmp_path / f"options{suffix}"
    path.write_text(text)
    config = resolve_config(path, {"num_scales": 6, "epochs": None})
    assert config.num_scales == 6  # flag wins
    assert config.epochs == 100  # flag not given: the file's value stays
    assert config.Dsteps == 4 and config.cbam is False and config.lr == 0.001
    assert config.Gsteps == 3  # neither: default


@pytest.mark.parametrize("text, match", [
    ("num_scale: 5\n", "unknown option 'num_scale'.*num_scales"),
    ("epochs: ten\n", "epochs must be an integer"),
    ("cbam: 3\n", "cbam must be true or false"),
    ("- a\n- b\n", "mapping"),
    ("epochs: [\n", "cannot parse"),
])
def test_bad_config_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConsinganError, match=match):
        resolve_config(path, {})


@pytest.mark.parametrize("flags, match", [
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"num_scales": -2}, "num_scales must be a positive integer"),
    ({"lr": -0.1}, "lr must be positive"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"noise_amp": 0.0}, "noise_amp must be positive"),
    ({"lambda_grad_penalty": -1.0}, "lambda_grad_penalty must be zero or positive"),
    ({"kernel_size": 4}, "kernel_size must be odd"),
    ({"padding": 2}, "padding must be between 0 and 1"),
    ({"min_size": 300}, "min_size"),
    ({"dimension": 4}, "dimension must be 2 or 3"),
    ({"device": "tpu"}, "device"),
])
def test_invalid_values(flags, match):
    with pytest.raises(ConsinganError, match=match):
        resolve_config(None, flags)


def test_cli_flags_in_lower_case_with_dashes_and_precedence(tmp_path, runner, nifti_3d):
    path = tmp_path / "options.toml"
    path.write_text('num_scales = 3\nGsteps = 5\nbatch_norm = false\nmin_size = 10\n')
    result = runner.invoke(app, [
        "train", "--image", str(nifti_3d), "--config", str(path), "--dry-run", "--gsteps", "2", "--dsteps", "4",
        "--no-cbam", "--num-feature-channels", "16", "--lrelu-alpha", "0.2", "--out-dir", str(tmp_path / "o"),
    ], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
            if line.count("│") == 3}
    assert rows["Gsteps"] == "2" and rows["Dsteps"] == "4" and rows["num_scales"] == "3"
    assert rows["cbam"] == "False" and rows["batch_norm"] == "False" and rows["lrelu_alpha"] == "0.2"
    assert rows["num_feature_channels"] == "16"
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_saved_config_json_round_trips(tmp_path):
    config = resolve_config(None, {"epochs": 7, "seed": 3})
    config.save_json(tmp_path / "config.json")
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config


def test_memory_check_says_what_would_fit(runner, nifti_3d, tmp_path, monkeypatch):
    from consingan.singan import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 400 * 2**20)
    result = runner.invoke(app, ["train", "--image", str(nifti_3d), "--dim", "3", "--min-size", "10",
                                 "--out-dir", str(tmp_path / "o")], terminal_width=300)
    assert result.exit_code == 2, result.output
    assert "needs about" in result.output and "--num-feature-channels" in result.output
    assert not (tmp_path / "o").exists()
    channels = int(result.output.split("--num-feature-channels ")[1].split()[0])
    from consingan.config import TrainConfig

    fits = memory.estimate_peak_bytes(TrainConfig(num_feature_channels=channels), (16, 16, 16))
    assert fits <= 0.9 * 400 * 2**20 < memory.estimate_peak_bytes(TrainConfig(num_feature_channels=channels + 1),
                                                                   (16, 16, 16))


def test_memory_estimate_is_above_measured_peaks():
    from consingan.singan.memory import estimate_peak_bytes

    # Peak resident memory of training epochs (3 stages, 3 blocks, whole pyramid grown), benchmarks/RESULTS.md.
    measured = [(64, (167, 250), 2610), (64, (115, 171), 1234), (64, (42, 42, 42), 3497), (64, (56, 56, 56), 6614),
                (64, (64, 64, 64), 6695), (64, (33, 41, 25), 1147), (32, (48, 48, 48), 1649)]
    ratios = []
    for channels, shape, measured_mib in measured:
        estimate = estimate_peak_bytes(TrainConfig(num_feature_channels=channels), shape) / 2**20
        assert measured_mib <= estimate <= 2.5 * measured_mib
        ratios.append(estimate / measured_mib)
    assert min(ratios) < 1.2  # tight where memory is tightest (2D at the largest measured size), not blanket slack


PRESETS = sorted((Path(__file__).parents[1] / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_shipped_presets_load_and_validate(path):
    dimension = 2 if "2d" in path.name else 3
    config = resolve_config(path, {"dimension": dimension})
    assert config.dimension == dimension
    assert config.to_dict() != TrainConfig(dimension=dimension).to_dict()  # a preset changes something


# Concepts every family has, with the configuration table's name first and the spellings it replaces after it.
SHARED_CONCEPTS = {"num_feature_channels": ("base_channels",), "beta1_adam": ("beta1",), "dimension": (),
                   "preview_every": ("save_every",)}


@pytest.mark.parametrize("config_class", [TrainConfig, PairedConfig, ConditionalConfig])
def test_one_name_per_concept_with_old_spellings_as_aliases(config_class):
    names = option_names(config_class)
    for canonical, old in SHARED_CONCEPTS.items():
        assert canonical in names and not set(old) & set(names), (config_class.__name__, canonical)
    if config_class is not TrainConfig:
        # A run folder written before the rename still opens, and a config file in the old spelling still applies.
        config = config_class.from_dict({"base_channels": 12, "beta1": 0.25})
        assert (config.num_feature_channels, config.beta1_adam) == (12, 0.25)


@pytest.mark.parametrize("command", [["paired", "train"], ["conditional", "train"]])
def test_old_flag_spellings_still_work(runner, command):
    from consingan.cli import app

    result = runner.invoke(app, [*command, "--base-channels", "0"])
    assert result.exit_code != 0 and "num_feature_channels must be" in result.output


# The flag every command shows for a concept, and the spellings no --help may show (they work, hidden).
FLAG_CONCEPTS = {"--num-feature-channels": ("--base-channels",), "--beta1-adam": ("--beta1",),
                 "--dim": ("--dimension",), "--preview-every": ("--save-every",), "--loss": ("--gan-mode",),
                 "--source": ("--source-dir",), "--target": ("--target-dir",)}


def _every_command(group, path=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer may carry its own copy of click: no isinstance)
            yield from _every_command(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_one_flag_per_concept_in_every_commands_help():
    import typer

    from consingan.cli import app

    shown_anywhere = set()
    for name, command in _every_command(typer.main.get_command(app)):
        shown = {flag for option in command.params if not getattr(option, "hidden", False)
                 for flag in (*option.opts, *option.secondary_opts)}
        shown_anywhere |= shown
        for flag, old in FLAG_CONCEPTS.items():
            assert not set(old) & shown, (name, old)
    assert set(FLAG_CONCEPTS) <= shown_anywhere


@pytest.mark.parametrize("command", [["train"], ["train-many"], ["paired", "train"], ["conditional", "train"]])
def test_train_helps_show_every_default(runner, command):
    from consingan.cli import app

    result = runner.invoke(app, [*command, "--help"], terminal_width=250)
    assert result.exit_code == 0
    flat = " ".join(result.output.replace("│", " ").split())
    assert flat.count("[default:") >= 10
    assert "--dim <int> Spatial dimensions" in flat and "[default: 3]" in flat
    if command == ["train"]:
        assert "Epochs per scale. [default: 2000]" in flat


def test_a_hidden_spelling_sets_its_option_and_both_at_once_are_refused(runner, tmp_path):
    from consingan.cli import _command_parameters, _register

    seen = {}

    def record(config_file=None, resume=None, dry_run=False, **flags):
        seen.update({k: v for k, v in flags.items() if v is not None})

    command = _register(record, _command_parameters(PairedConfig, dry_run=True))
    import typer

    app = typer.Typer()
    app.command()(command)
    result = runner.invoke(app, ["--gan-mode", "hinge", "--beta1", "0.25"])
    assert result.exit_code == 0, result.output
    assert seen == {"loss": "hinge", "beta1_adam": 0.25}
    result = runner.invoke(app, ["--gan-mode", "hinge", "--loss", "bce"])
    assert result.exit_code == 2 and "given twice" in result.output
