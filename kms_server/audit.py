# The audit trail: one JSON object per request, to stderr or an append-only 0600 file.
# Records who asked for what and the outcome; never key material, plaintext, ciphertext or AAD.
"""Audit log of every request.

Each line is a JSON object::

    {"time":"2026-11-22T16:40:00.123456Z","conn":7,"uid":26,"gid":26,"pid":4242,
     "exe":"/usr/lib/postgresql/17/bin/postgres","verb":"ENC","key_id":"pg/wal",
     "version":3,"result":"OK","bytes_in":98,"bytes_out":82,"us":14}

The fields are built from values that cannot hold secrets: numbers, the verb,
the key id (its grammar has no characters that need JSON escaping) and the
result code. Request arguments other than the key id are never looked at.

Lines are collected while a batch of pipelined requests is served and written
with one ``write`` per batch, before the batch's replies are sent (a client never
holds a key whose use is not yet recorded), so auditing costs a few percent of a
request, not a system call each. The clock is read once per batch (and again after
each request that changes the store): ``time`` is when the batch was served.

A line is built from three parts: the batch's :meth:`AuditLog.head` (time and
connection), the request's :meth:`AuditLog.subject`, and its :meth:`AuditLog.tail`
(duration). The server keeps the subjects a connection produced, by their fields,
so auditing a client that asks for the same key again and again, or encrypts pages
of one size, costs a dict lookup, not a format (the three parts are joined once per
batch).

A file is opened with ``O_APPEND`` and reopened on SIGHUP, so logrotate can move
it away. A sink that is not a regular file (stderr to journald, a FIFO read by a
log collector) is written in pieces that ``poll`` says fit, waiting at most
``SINK_STALL_SECONDS`` a batch: a reader that stops reading must not freeze the
event loop (and with it every connection and SIGTERM). As on a full disk, lines it
cannot take are dropped and the loss is logged; a line cut short is ended before
the next one, so the lines after it are whole JSON objects (the cut one is not).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import stat
import time
from pathlib import Path

from kms_server.acl import Peer

log = logging.getLogger("kmsd.audit")

STDERR_FD = 2
#: Line ends for the durations most requests take: a tuple index instead of formatting.
_TAILS = tuple(f'"us":{micros}}}\n' for micros in range(1000))
#: "000" to "999": a time's microseconds as two lookups (``{:06d}`` cost 1,600 instructions more).
_DIGITS = tuple(f"{number:03d}" for number in range(1000))
_NANOS_PER_SECOND = 1_000_000_000
_LF = ord("\n")
#: How long one batch may wait for a sink that is not reading before its lines are dropped.
SINK_STALL_SECONDS = 0.05


class AuditError(Exception):
    """The audit log file cannot be opened."""


class AuditLog:
    """Where audit lines go: a file descriptor, written once per batch."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd = self._open()
        self._failing = False
        #: The last write stopped inside a line: the next one starts by ending it.
        self._torn = False
        self._written = 0  # bytes of the batch being written that the sink took
        self._watch_sink()
        #: The current second (in ns since the epoch), when the next begins, and the
        #: start of a line's time up to its microseconds: ``{"time":"2026-11-22T16:40:00.``
        self._second_began = 0
        self._next_second = 0
        self._second_text = ""

    def _open(self) -> int:
        if self.path is None:
            return STDERR_FD
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            # Non-blocking open: a FIFO nobody reads would otherwise hang start-up,
            # check-config, or a SIGHUP reopen on the event loop. Writes block again
            # (the polled writer bounds them).
            fd = os.open(self.path, flags | os.O_NONBLOCK, 0o600)
            os.set_blocking(fd, True)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)  # an existing file may have been created looser
            # A FIFO or a device (a log collector, /dev/null) is not ours to chmod.
        except OSError as exc:
            why = "nothing reads that FIFO" if exc.errno == errno.ENXIO else exc.strerror
            raise AuditError(f"cannot open audit log {self.path}: {why}") from None
        return fd

    def _watch_sink(self) -> None:
        """A regular file takes a batch in one write; anything else is polled first."""
        self._stream = not stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLOUT)

    def reopen(self) -> None:
        """After log rotation (SIGHUP): write to a fresh file at the same path."""
        if self.path is None:
            return
        new_fd = self._open()
        old_fd, self._fd = self._fd, new_fd
        os.close(old_fd)
        self._watch_sink()

    def close(self) -> None:
        if self.path is not None and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def connection_prefix(self, connection_id: int, peer: Peer) -> str:
        """The part of every line that is fixed for one connection, JSON-encoded once."""
        return (
            f'"conn":{connection_id},"uid":{peer.uid},"gid":{peer.gid},"pid":{peer.pid},'
            f'"exe":{json.dumps(peer.exe)},'
        )

    def head(self, prefix: str) -> str:
        """The start of every line of a batch: the time (read now) and the connection's fields.

        The time reads ``2026-11-22T16:40:00.123456Z``. Its date part is formatted once a
        second; within the second only small integers are divided and formatted (the
        microseconds since the epoch are a two-digit Python integer: its ``str()`` alone
        cost more than the rest of the head).
        """
        now = time.time_ns()
        if not self._second_began <= now < self._next_second:  # a new second (or set back)
            second = now // _NANOS_PER_SECOND
            self._second_began = second * _NANOS_PER_SECOND
            self._next_second = self._second_began + _NANOS_PER_SECOND
            date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second_text = f'{{"time":"{date}.'
        micros = (now - self._second_began) // 1000
        return f'{self._second_text}{_DIGITS[micros // 1000]}{_DIGITS[micros % 1000]}Z",{prefix}'

    @staticmethod
    def subject(
        verb: str,
        key_id: str | None,
        version: int | None,
        result: str,
        bytes_in: int,
        bytes_out: int,
    ) -> str:
        """The middle of a line: what was asked and what came of it.

        The same arguments give the same subject, so the server keeps it instead of
        formatting it again.
        """
        key = "null" if key_id is None else f'"{key_id}"'
        number = "null" if version is None else version
        return (
            f'"verb":"{verb}","key_id":{key},"version":{number},"result":"{result}",'
            f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
        )

    @staticmethod
    def tail(micros: int) -> str:
        """The end of a line: the request's duration."""
        return _TAILS[micros] if micros < len(_TAILS) else f'"us":{micros}}}\n'

    def write(self, parts: list[str]) -> None:
        """Write a batch of lines, given as their parts, with one system call (a file).

        Best effort on a full disk or a sink that stopped reading: a failure is
        logged, not raised.
        """
        data = "".join(parts).encode()  # ASCII: JSON-escaped, or key ids and codes
        if self._torn:
            data = b"\n" + data
        try:
            if self._stream:
                self._written = 0
                self._write_polled(data)
                self._written = 0  # only a failure's progress is ever read
            else:
                written = os.write(self._fd, data)
                if written < len(data):  # a signal or a full disk cut it short
                    self._written = written
                    while self._written < len(data):
                        self._written += os.write(self._fd, memoryview(data)[self._written :])
        except OSError as exc:
            # A failing audit sink must not take the key service down, but it must be seen.
            if not self._failing:
                log.error("cannot write the audit trail: %s", exc.strerror)
            self._failing = True
            if self._written:  # part of the batch went out: did it stop inside a line?
                self._torn = data[self._written - 1] != _LF
                self._written = 0
        else:
            if self._failing:
                log.error("the audit trail is writable again; lines were lost meanwhile")
            self._failing = False
            self._torn = False

    def _write_polled(self, data: bytes) -> None:
        """Write to a pipe, socket or terminal without ever blocking for long.

        Pieces of ``PIPE_BUF`` bytes: a pipe ``poll`` calls writable takes that much
        without blocking. Raises ``EAGAIN`` when the sink takes no more within the
        stall allowance (none while it is already failing).
        """
        deadline = time.monotonic() + (0.0 if self._failing else SINK_STALL_SECONDS)
        with memoryview(data) as view:
            while self._written < len(data):
                if not self._poller.poll(0):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._poller.poll(remaining * 1000):
                        raise BlockingIOError(errno.EAGAIN, "the audit sink stopped reading")
                piece = view[self._written : self._written + select.PIPE_BUF]
                self._written += os.write(self._fd, piece)
