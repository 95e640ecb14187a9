"""Reading a run folder: its configuration, what it knows about the source image, and how far training got."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from consingan.config import TrainConfig
from consingan.errors import ConsinganError

# Options added after the first runs were written, with the behaviour those runs were trained with: a run folder
# without them is read as it was trained, not with today's defaults.
LEGACY_OPTIONS = {"gradient_penalty": "image", "intensity_mapping": "minmax", "upsampling": "linear"}


@dataclass
class RunFolder:
    path: Path
    config: TrainConfig
    info: dict

    def scale_dir(self, stage: int) -> Path:
        return self.path / f"scale_{stage:02d}"

    def completed_scales(self) -> list[int]:
        """Scales whose training finished (their scale.json is written last)."""
        return [k for k in range(self.config.num_scales) if (self.scale_dir(k) / "scale.json").is_file()]

    def latest_training_state(self) -> Path | None:
        """The training state of the furthest scale that has one."""
        for stage in reversed(range(self.config.num_scales)):
            path = self.scale_dir(stage) / "training_state.pt"
            if path.is_file():
                return path
        return None

    def scale_meta(self, stage: int) -> dict:
        return json.loads((self.scale_dir(stage) / "scale.json").read_text())


def open_run(path: Path | str) -> RunFolder:
    """Open a run folder written by ``consingan train``; a missing or damaged one raises ``ConsinganError``."""
    path = Path(path)
    if not path.is_dir():
        raise ConsinganError(f"run folder not found: {path}")
    for name in ("config.json", "run.json"):
        if not (path / name).is_file():
            raise ConsinganError(f"{path} is not a consingan run folder (no {name})")
    try:
        values = json.loads((path / "config.json").read_text())
        if isinstance(values, dict):
            values = {**LEGACY_OPTIONS, **values}
        config = TrainConfig.from_dict(values, "config.json").validate()
        info = json.loads((path / "run.json").read_text())
    except json.JSONDecodeError as error:
        raise ConsinganError(f"damaged run folder {path}: {error}") from None
    return RunFolder(path, config, info)
