"""One logging setup for every process (the API server, the engine core and the workers)."""
from __future__ import annotations

import logging
import os
import sys
import time

_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("vllm_lite")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """Wall-clock time this process was launched (Linux: from /proc, so interpreter start-up and imports count;
    elsewhere: when this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
