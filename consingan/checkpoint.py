"""Safe, atomic checkpoints: tensors and plain containers only, never pickled code."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from consingan.config import check_run_name
from consingan.errors import ConsinganError


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temporary file in the same folder, then ``os.replace``: a kill never leaves half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise ConsinganError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:  # disk full, quota, a folder removed under us: one line, and no half file left
        Path(temporary).unlink(missing_ok=True)
        raise ConsinganError(f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Save a dict of tensors, numbers, strings and nested containers of them (state dicts)."""
    _atomic_write(Path(path), lambda stream: torch.save(state, stream))


def load_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a state saved by ``save_state`` with torch's weights-only unpickler.

    Anything else (a pickled module, a file with code in it) is refused with ``ConsinganError``, not executed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConsinganError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it is refused: one message is enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ConsinganError(f"refusing to load {path}: it holds more than tensors and plain values (tampered?)") from None
    except Exception as error:
        raise ConsinganError(f"cannot read checkpoint {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if not isinstance(state, dict):
        raise ConsinganError(f"checkpoint {path} does not hold a state dict")
    return state


def save_text(path: Path, text: str) -> None:
    """Write text atomically."""
    data = text.encode()
    _atomic_write(Path(path), lambda stream: stream.write(data))


def save_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    save_text(path, json.dumps(data, indent=2) + "\n")


def make_run_dir(root: Path, run_name: str, stem: str) -> Path:
    """A new folder ``root/run_name``, or ``root/<stem>_NNN`` with the first free number; never an existing one.

    ``mkdir`` without ``exist_ok`` is atomic, so two runs started at once never share a folder. Problems with
    ``root`` become a one-line ``ConsinganError``.
    """
    check_run_name(run_name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if run_name:
            run_dir = root / run_name
            if run_dir.exists():
                raise ConsinganError(f"run folder {run_dir} already exists; choose another --run-name "
                                     f"(a run is only continued by --resume)")
            run_dir.mkdir()
            return run_dir
        for number in range(1, 100000):
            run_dir = root / f"{stem}_{number:03d}"
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
    except PermissionError:
        raise ConsinganError(f"output folder {root} cannot be written (permission denied)") from None
    except NotADirectoryError:
        raise ConsinganError(f"output folder {root} is not a folder") from None
    except FileExistsError:
        raise ConsinganError(f"output folder {root} exists and is not a folder") from None
    except OSError as error:
        raise ConsinganError(f"output folder {root} cannot be written: {error.strerror}") from None
    raise ConsinganError(f"no free run folder name under {root}")
