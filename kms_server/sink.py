# Writing lines to a descriptor someone else reads (journald, a log collector's FIFO) without
# ever blocking the daemon for long. Used by the audit trail and by the daemon's own log.
"""A sink that cannot freeze the event loop.

A regular file takes a write at once (or fails: a full disk). A pipe, socket or
terminal whose reader stopped reading would block a plain ``write`` for good, and
with it every connection, the watchdog and SIGTERM. :class:`PolledSink` writes to
those in ``PIPE_BUF`` pieces that ``poll`` says fit, waiting at most a given
patience, and raises ``BlockingIOError`` past it; the caller drops what could not
be written. A line cut short is ended before the next write, so the lines after
it are whole. :class:`StderrLogHandler` puts the daemon's log on stderr that way.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import threading
import time

STDERR_FD = 2
#: How long one write may wait for a sink that is not reading before its lines are dropped.
SINK_STALL_SECONDS = 0.05
_LF = ord("\n")


class PolledSink:
    """Writes to one descriptor, polled first when it is not a regular file.

    Thread-safe: a write is whole under a lock, so a log line from a worker thread never
    lands inside an audit batch. Stderr has one shared instance (:func:`stderr_sink`), so
    a line the audit trail left cut short is ended before the next log line too.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._stream = not stat.S_ISREG(os.fstat(fd).st_mode)
        self._poller = select.poll()
        self._poller.register(fd, select.POLLOUT)
        #: The last write stopped inside a line: the next one starts by ending it.
        self._torn = False

    def write(self, data: bytes, patience: float) -> None:
        """Write ``data`` whole, or raise ``OSError`` (``BlockingIOError`` when a stream
        took nothing for ``patience`` seconds)."""
        with self._lock:
            if self._torn:
                data = b"\n" + data
            written = 0
            try:
                if self._stream:
                    deadline = time.monotonic() + patience
                    with memoryview(data) as view:
                        while written < len(data):
                            if not self._poller.poll(0):
                                remaining = deadline - time.monotonic()
                                if remaining <= 0 or not self._poller.poll(remaining * 1000):
                                    raise BlockingIOError(
                                        errno.EAGAIN, "the reader stopped reading"
                                    )
                            piece = view[written : written + select.PIPE_BUF]
                            written += os.write(self.fd, piece)
                else:
                    written = os.write(self.fd, data)
                    while written < len(data):  # a signal or a full disk cut it short
                        written += os.write(self.fd, memoryview(data)[written:])
            except OSError:
                if written:  # did it stop inside a line?
                    self._torn = data[written - 1] != _LF
                raise
            self._torn = False


_stderr: PolledSink | None = None


def stderr_sink() -> PolledSink:
    """The one sink on stderr, shared by the audit trail (its default) and the log."""
    global _stderr  # noqa: PLW0603 - one per process, made on first use
    if _stderr is None:
        _stderr = PolledSink(STDERR_FD)
    return _stderr


class StderrLogHandler(logging.Handler):
    """The daemon's log on stderr, never blocking for long (a stalled journald stream).

    Records that cannot be written are counted, and the count is said once stderr
    takes lines again.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sink = stderr_sink()
        self._lost = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if self._lost:
            text = f"{self._lost} log lines were lost while stderr was not read\n" + text
        try:
            self._sink.write(text.encode(errors="replace"), 0 if self._lost else SINK_STALL_SECONDS)
        except OSError:
            self._lost += 1
        else:
            self._lost = 0
