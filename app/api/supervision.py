"""An API worker process dies with the `asyncinfer serve` process that started it.

granian's worker processes outlive a SIGKILLed main process (an OOM kill, a
supervisor's last resort): they keep serving the port, unsupervised, with
the old code and settings, beside any new server bound there (SO_REUSEPORT).
Each worker watches its parent instead: once it is no longer the `serve`
process that started it (the worker was re-parented), the worker stops:
SIGTERM to itself (a graceful stop), and a hard exit if that has not ended it
within the grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("asyncinfer.api")

SERVE_PID_VARIABLE = "ASYNCINFER_SERVE_PID"  # set by `asyncinfer serve` for its workers
POLL_SECONDS = 0.25
GRACE_SECONDS = 2.0


def watch_parent() -> threading.Thread | None:
    """Start the watch in this worker, when it runs under `asyncinfer serve`."""
    expected = os.environ.get(SERVE_PID_VARIABLE)
    if not expected or not expected.isdigit() or os.getpid() == int(expected):
        return None
    serve_pid = int(expected)
    thread = threading.Thread(target=_watch, args=(serve_pid,), name="parent-watch", daemon=True)
    thread.start()
    return thread


def _watch(serve_pid: int) -> None:
    while os.getppid() == serve_pid:
        time.sleep(POLL_SECONDS)
    log.error("the asyncinfer serve process (pid %d) is gone; this API worker stops", serve_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os._exit(70)  # EX_SOFTWARE: still here after the graceful stop's grace
