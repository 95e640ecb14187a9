"""Output paths shared by every command: names the image libraries can open, output folders that leave nothing
partial behind, and room on the disk checked before a long write.

SimpleITK and GDCM take file names as UTF-8 C++ strings: a name that is not valid UTF-8 (a Latin-1 'café.png' on a
UTF-8 system, which Python holds with surrogate escapes) aborts the whole process in C++ (exit 134) instead of
raising. ``check_encodable`` refuses such a name in one line first; every reader, writer and output folder calls it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from consingan.errors import ConsinganError

Progress = Callable[[int, int], None]  # (outputs written so far, outputs asked for)
ROOM_MARGIN = 0.95  # the share of the free disk a command may fill


class OutputError(ConsinganError):
    """Writing outputs failed (a full disk, a folder that cannot be written, no room for what was asked): a command
    that writes several output folders (``sample-many``) stops at the first, since the next would fail alike."""


def shown(path: Path | str | bytes) -> str:
    """``path`` as printable text: bytes that are not UTF-8 as ``\\xNN`` escapes."""
    text = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeError:  # a lone surrogate that the file system encoding cannot take back
        return text.encode("utf-8", "backslashreplace").decode("ascii")


def check_encodable(path: Path | str, what: str = "file") -> Path:
    """``path`` as a Path, or a one-line ``ConsinganError`` when its name is not valid UTF-8 (see the module
    docstring)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeError:
        raise ConsinganError(f"the {what} name {shown(path)} is not valid UTF-8, which the image libraries cannot "
                             f"open; rename it") from None
    return Path(path)


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"  # pragma: no cover - the loop always returns


OUT_RULE = "a new folder, or an empty one; nothing is overwritten"


def out_refusal(path: Path) -> str:
    """Why ``path`` cannot be an output folder by ``OUT_RULE`` ('' when it can)."""
    if path.is_file() or (path.exists() and not path.is_dir()):
        return f"{path} is a file; choose a new or empty folder"
    if path.is_dir() and any(path.iterdir()):
        return f"{path} already holds files; choose a new or empty folder"
    return ""


class OutputFolder:
    """A folder a command fills file by file. On any failure inside ``with`` (a full disk, Ctrl-C, no room for what
    was asked) the files it wrote are removed, and the folders it made, so no partial output is left; an ``OSError``
    becomes one line (``OutputError``).

    One rule for every command's ``--out`` (``OUT_RULE``): a new folder, or an existing empty one; a file, or a
    folder that holds anything, is refused, so nothing is overwritten and no output is mixed with other files.
    Record each file with ``add`` before writing it, so a file cut short by the failure is removed too.
    """

    def __init__(self, path: Path | str, option: str = "--out") -> None:
        self.path, self.option = Path(path), option
        self.created: Path | None = None  # the outermost folder made here
        self.files: list[Path] = []

    def __enter__(self) -> "OutputFolder":
        check_encodable(self.path, "output folder")
        refusal = out_refusal(self.path)
        if refusal:
            raise ConsinganError(f"{self.option} {refusal}")
        missing = None  # the outermost folder of the path that does not exist yet: made here, removed on failure
        for folder in (self.path, *self.path.parents):
            if folder.exists():
                break
            missing = folder
        self.created = missing  # before mkdir: parents it makes before failing are removed too
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".consingan_write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            self.remove()
            raise OutputError(f"output folder {shown(self.path)} cannot be written: {error.strerror or error}"
                              ) from None
        return self

    def add(self, *paths: Path) -> None:
        self.files.extend(Path(p) for p in paths)

    def bytes_written(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.is_file())

    def check_room(self, done: int, total: int, what: str = "samples") -> None:
        """After the first ``done`` of ``total`` outputs: refuse (``OutputError``) when the rest, at the size of
        those, would not fit the free disk, naming the estimate."""
        if done <= 0 or done >= total:
            return
        rest = self.bytes_written() / done * (total - done)
        free = shutil.disk_usage(self.path).free
        if rest > ROOM_MARGIN * free:
            total_bytes = self.bytes_written() / done * total
            raise OutputError(f"{total} {what} would take about {human_bytes(total_bytes)} but "
                              f"{human_bytes(free)} are free on the disk of {shown(self.path)}; ask for fewer")

    def remove(self) -> None:
        """Remove what was written: the folder made here, or the recorded files of an existing folder."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for path in self.files:
            path.unlink(missing_ok=True)

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> bool:
        if kind is None:
            return False
        self.remove()
        if isinstance(error, OSError):
            raise OutputError(f"cannot write to {shown(self.path)}: {error.strerror or error}; nothing was kept"
                              ) from None
        if isinstance(error, RuntimeError) and "itk::" in str(error).lower():  # SimpleITK's failed write
            reason = next((line.strip() for line in str(error).splitlines() if "could not" in line.lower()),
                          "the image writer failed")
            raise OutputError(f"cannot write to {shown(self.path)}: {reason}; nothing was kept") from None
        return False
