"""Safe, atomic checkpoints: tensors and plain containers only, never pickled code."""

from __future__ import annotations

import json
import os
import pickle
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from consingan.config import check_run_name
from consingan.errors import ConsinganError
from consingan.outputs import check_encodable


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temporary file in the same folder, then ``os.replace``: a kill never leaves half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp makes the file 0600 whatever the umask; a run's files get the mode any other file would
        os.fchmod(handle, 0o666 & ~current_umask())
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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it, even to put it back at once,
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    check_encodable(root / run_name if run_name else root, "output folder")
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


LOCK_NAME = ".lock"


def _process_facts(pid: int) -> tuple[bool, str]:
    """(alive, start time) of process ``pid`` on this host. The start time (clock ticks since boot, from /proc;
    '' where unknown) tells a PID reused by a later process from the one that took a lock; a zombie (killed, not yet
    reaped) is not alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return fields[0] != "Z", fields[19]
    except FileNotFoundError:
        return False, ""
    except (OSError, ValueError, IndexError):  # no /proc: ask the kernel whether the PID exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, ""
        except (PermissionError, OverflowError):
            return True, ""
        return True, ""


class RunLock:
    """One writer per run folder: the file ``.lock`` in it names the process (PID, host) that trains it.

    The file is created with ``O_CREAT | O_EXCL``, so of two processes starting at once exactly one gets it. A lock
    is stale when its process has ended without releasing it (kill -9, a power cut): on this host, its PID is not
    running or runs a process started later; or the lock was copied with the folder. A stale lock is taken over with
    a note; a living one, or one of another host (whose processes cannot be checked from here), is refused.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def _mine(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_facts(os.getpid())[1],
                "folder": str(self.folder.resolve())}

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ConsinganError(f"cannot read the lock {self.path}: {error.strerror or error}") from None

    def acquire(self) -> str | None:
        """Take the lock (kept if this process holds it already); returns a note when a stale one was taken over,
        raises ``ConsinganError`` when another process holds it."""
        mine, note = self._mine(), None
        for _ in range(10):
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                seen = self._read()
                if seen is None:
                    continue  # released meanwhile
                holder = _parse_lock(seen)
                if holder is not None and all(holder.get(key) == mine[key] for key in ("pid", "host", "folder")):
                    self.held = True  # taken by this process already (when its run folder was made)
                    return note
                reason = self._stale(holder, mine)
                if reason is None:
                    raise ConsinganError(self._refusal(holder))
                if self._take_over(seen):
                    note = f"took over the stale lock of {self.folder}: {reason}"
                continue
            except OSError as error:
                raise ConsinganError(f"cannot lock {self.folder}: {error.strerror or error}") from None
            with os.fdopen(descriptor, "w") as stream:
                stream.write(json.dumps(mine) + "\n")
            self.held = True
            return note
        raise ConsinganError(f"cannot lock {self.folder}: its {LOCK_NAME} keeps changing (several processes "
                             f"starting at once?)")

    def release(self) -> None:
        """Remove the lock if this process holds it (never another process's)."""
        if not self.held:
            return
        self.held = False
        holder = _parse_lock(self._read() or b"")
        if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
            self.path.unlink(missing_ok=True)

    @staticmethod
    def _stale(holder: dict | None, mine: dict) -> str | None:
        """Why the lock of ``holder`` is stale, or None when its process may still be writing."""
        if holder is None:
            return None  # unreadable: perhaps being written this instant; the refusal says how to clear it
        if holder["host"] != mine["host"]:
            return None
        if isinstance(holder.get("folder"), str) and not _same_folder(holder["folder"], mine["folder"]):
            return f"it was copied with the folder from {holder['folder']}"
        alive, started = _process_facts(holder["pid"])
        if not alive:
            return f"PID {holder['pid']} on {holder['host']} is not running (killed?)"
        if started and holder.get("started") and started != holder["started"]:
            return f"PID {holder['pid']} on {holder['host']} is now another process"
        return None

    def _refusal(self, holder: dict | None) -> str:
        if holder is None:
            return (f"{self.folder} is locked by {self.path}, which cannot be read; if no process is training this "
                    f"run, delete it")
        where = "this host" if holder["host"] == socket.gethostname() else f"host {holder['host']}"
        check = "" if holder["host"] == socket.gethostname() else \
            f" (a process of another host cannot be checked from here; if it has ended, delete {self.path})"
        return (f"{self.folder} is being trained by PID {holder['pid']} on {where}{check}; one process writes a run "
                f"at a time: wait for it to end or stop it, then --resume")

    def _take_over(self, seen: bytes) -> bool:
        """Move the stale lock aside, atomically: of several processes taking it over, one succeeds."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another process moved it first
        except OSError as error:
            raise ConsinganError(f"cannot replace the stale lock {self.path}: {error.strerror or error}") from None
        if aside.read_bytes() != seen:  # a live lock slipped in between reading and moving: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True


def _same_folder(first: str, second: str) -> bool:
    try:
        return first == second or os.path.samefile(first, second)
    except OSError:
        return False


def _parse_lock(data: bytes) -> dict | None:
    """A lock file's {pid, host, started, folder}, or None when it is not one."""
    try:
        holder = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str):
        return holder
    return None
