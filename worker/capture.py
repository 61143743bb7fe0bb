"""Per-request capture of what model code logs or prints.

While a model handles a request (or a batch), a `Capture` is the current one
in that thread's (or task's) context. A handler on the root logger and a tee
on sys.stdout / sys.stderr copy what the model writes into it; the worker
then appends the lines to the request's event log (Queue.append_logs). The
output still reaches the process's own stdout/stderr and log handlers.

Bounded: at most `limit` bytes per capture, then one truncation marker.
Records of asyncinfer's own loggers are never captured.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, TextIO

current: ContextVar[Capture | None] = ContextVar("asyncinfer_capture", default=None)

TRUNCATED = "[asyncinfer: log capture truncated]"


class Capture:
    __slots__ = ("lines", "size", "limit", "truncated", "_partial")

    def __init__(self, limit: int) -> None:
        self.lines: list[str] = []
        self.size = 0
        self.limit = limit
        self.truncated = False
        self._partial: dict[str, str] = {}

    def add(self, line: str) -> None:
        if self.truncated:
            return
        if self.size + len(line) > self.limit:
            room = self.limit - self.size
            if room > 80:  # keep a useful head of the line that overflows
                self.lines.append(line[:room])
            self.lines.append(TRUNCATED)
            self.truncated = True
            return
        self.lines.append(line)
        self.size += len(line)

    def write(self, stream: str, text: str) -> None:
        """Text printed to a stream: whole lines are kept, a partial one waits."""
        if self.truncated or not text:
            return
        pending = self._partial.get(stream, "") + text
        *complete, rest = pending.split("\n")
        for line in complete:
            self.add(f"{stream}: {line}")
        if len(rest) > self.limit:
            self.add(f"{stream}: {rest}")
            rest = ""
        self._partial[stream] = rest

    def close(self) -> list[str]:
        for stream, rest in self._partial.items():
            if rest:
                self.add(f"{stream}: {rest}")
        self._partial.clear()
        return self.lines


class CaptureHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        capture = current.get()
        if capture is None or record.name.startswith("asyncinfer"):
            return
        try:
            capture.add(self.format(record))
        except Exception:  # never let capture break the model
            pass


class TeeStream:
    """sys.stdout / sys.stderr stand-in: writes go to the real stream and,
    while a capture is current, into it."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self._stream = stream
        self._name = name

    def write(self, text: str) -> int:
        capture = current.get()
        if capture is not None:
            try:
                capture.write(self._name, text)
            except Exception:
                pass
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_installed: tuple[CaptureHandler, TextIO, TextIO] | None = None


def install() -> None:
    """Start capturing (idempotent). Call after logging is configured."""
    global _installed
    if _installed is not None:
        return
    handler = CaptureHandler()
    logging.getLogger().addHandler(handler)
    out, err = sys.stdout, sys.stderr
    sys.stdout = TeeStream(out, "stdout")  # type: ignore[assignment]
    sys.stderr = TeeStream(err, "stderr")  # type: ignore[assignment]
    _installed = (handler, out, err)


def uninstall() -> None:
    global _installed
    if _installed is None:
        return
    handler, out, err = _installed
    logging.getLogger().removeHandler(handler)
    sys.stdout, sys.stderr = out, err
    _installed = None
