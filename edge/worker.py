"""``python -m edge.worker``: one of several edge processes sharing a port.

``edge.workers`` starts these; each dies with it (``PR_SET_PDEATHSIG``), since
a worker orphaned by a killed supervisor would go on serving the shared port
beside the workers of the supervisor that replaces it.
"""

from __future__ import annotations

import ctypes
import os
import signal

from edge.server import worker_main

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        raise SystemExit("edge worker: its supervisor is gone")


if __name__ == "__main__":
    die_with_parent()
    worker_main()
