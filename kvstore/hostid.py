"""A host's identity, so a client can tell that a node runs on its own machine."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path


def host_id() -> str:
    """Equal for two processes exactly when they run on the same booted machine (so shared
    memory between them can work; whether it does, the client checks by mapping it)."""
    parts = [socket.gethostname()]
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        with contextlib.suppress(OSError):
            parts.append(Path(path).read_text().strip())
    return "/".join(parts)
