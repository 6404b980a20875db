"""A decoder child (`IsolatedDecoder(module=...)`) that crashes once: while the file named by
$T2V_FLAKY_MARKER does not exist, it creates it and dies with SIGSEGV on its first request; from then on it is
`python -m pipeline.decode`. A transient crash, as memory pressure or a signal from outside would cause."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from pipeline import decode

if __name__ == "__main__":
    marker = Path(os.environ["T2V_FLAKY_MARKER"])
    if not marker.exists():
        sys.stdin.buffer.read(8)  # the request has arrived
        marker.touch()
        os.kill(os.getpid(), signal.SIGSEGV)
    decode._serve()
