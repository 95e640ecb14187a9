import os
import pickle

import pytest
import torch

from consingan.checkpoint import load_state, save_state
from consingan.errors import ConsinganError
from consingan.singan.models import GrowingGenerator


class _Payload:
    """Unpickling this runs os.system: what a tampered checkpoint could do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_round_trip_of_a_generator_state(tmp_path):
    generator = GrowingGenerator(2, 3, num_feature_channels=8, num_layers=2)
    generator.add_stage()
    save_state(tmp_path / "g.pt", generator.state_dict())
    state = load_state(tmp_path / "g.pt")
    assert state.keys() == generator.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in generator.state_dict().items())
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "generator.pt"
    with open(path, "wb") as stream:
        pickle.dump({"weights": _Payload(marker)}, stream)
    with pytest.raises(ConsinganError, match="refusing to load"):
        load_state(path)
    assert not marker.exists()
    torch.save({"weights": _Payload(marker)}, path)  # the same inside torch's zip format
    with pytest.raises(ConsinganError, match="refusing to load"):
        load_state(path)
    assert not marker.exists()


def test_truncated_and_missing_checkpoints(tmp_path):
    save_state(tmp_path / "c.pt", {"w": torch.ones(100)})
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConsinganError, match="cannot read checkpoint"):
        load_state(tmp_path / "c.pt")
    with pytest.raises(ConsinganError, match="not found"):
        load_state(tmp_path / "nothing.pt")


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "state.pt"
    save_state(path, {"version": torch.tensor(1)})

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):  # a programming error passes through unchanged
        save_state(path, {"version": Unsaveable()})
    assert load_state(path)["version"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
