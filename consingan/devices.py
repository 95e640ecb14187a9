"""Devices and their free memory, for every family's preflight."""

from __future__ import annotations

import os

import torch

from consingan.config import check_device_name
from consingan.errors import ConsinganError

BASE_BYTES = 300 * 2**20  # what a process holds before its first tensor (the interpreter, torch's libraries)


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; CUDA asked for where there is none is refused."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConsinganError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise ConsinganError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the system's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
