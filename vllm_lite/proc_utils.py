"""Process plumbing shared by the processes that talk over sockets: IPC addresses and dying with the parent."""
from __future__ import annotations

import ctypes
import os
import signal


def ipc_address(directory: str, name: str) -> str:
    return f"ipc://{os.path.join(directory, name)}.sock"


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so a killed server leaves no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
