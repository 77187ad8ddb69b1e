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

A file is opened with ``O_APPEND`` and opened again on SIGHUP (at the path the
configuration names then), so logrotate can move it away. A sink that is not a
regular file (stderr to journald, a FIFO read by a log collector) is written in
pieces that ``poll`` says fit, waiting at most
``SINK_STALL_SECONDS`` a batch: a reader that stops reading must not freeze the
event loop (and with it every connection and SIGTERM). As on a full disk, lines it
cannot take are dropped and the loss is logged; a line cut short is ended before
the next one, so the lines after it are whole JSON objects (the cut one is not).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import time
from pathlib import Path

from kms_server.acl import Peer
from kms_server.sink import SINK_STALL_SECONDS, STDERR_FD, PolledSink, stderr_sink

log = logging.getLogger("kmsd.audit")

#: Line ends for the durations most requests take: a tuple index instead of formatting.
_TAILS = tuple(f'"us":{micros}}}\n' for micros in range(1000))
#: "000" to "999": a time's microseconds as two lookups (``{:06d}`` cost 1,600 instructions more).
_DIGITS = tuple(f"{number:03d}" for number in range(1000))
_NANOS_PER_SECOND = 1_000_000_000


def sink_for(fd: int) -> PolledSink:
    return stderr_sink() if fd == STDERR_FD else PolledSink(fd)


class AuditError(Exception):
    """The audit log file cannot be opened."""


def _cannot_open(path: Path, exc: OSError) -> AuditError:
    why = "nothing reads that FIFO" if exc.errno == errno.ENXIO else exc.strerror
    return AuditError(f"cannot open audit log {path}: {why}")


class AuditLog:
    """Where audit lines go: a file descriptor, written once per batch."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd = self.open_sink(path)
        self._sink = sink_for(self._fd)
        self._failing = False
        #: The current second (in ns since the epoch), when the next begins, and the
        #: start of a line's time up to its microseconds: ``{"time":"2026-11-22T16:40:00.``
        self._second_began = 0
        self._next_second = 0
        self._second_text = ""

    @staticmethod
    def open_sink(path: Path | None) -> int:
        """A descriptor for the audit lines: ``path`` opened for appending, or stderr."""
        if path is None:
            return STDERR_FD
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            # Non-blocking open: a FIFO nobody reads would otherwise hang start-up,
            # check-config, or a SIGHUP reopen on the event loop. Writes block again
            # (the polled writer bounds them).
            fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
            os.set_blocking(fd, True)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)  # an existing file may have been created looser
            # A FIFO or a device (a log collector, /dev/null) is not ours to chmod.
        except OSError as exc:
            raise _cannot_open(path, exc) from None
        except ValueError:  # an embedded NUL
            raise AuditError("cannot open the audit log: its path holds a NUL byte") from None
        return fd

    @staticmethod
    def check_sink(path: Path) -> None:
        """Whether :meth:`open_sink` could open ``path``, found without creating the file
        or changing its mode (``kmsd check-config`` only checks)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            if not path.parent.is_dir():
                raise _cannot_open(path, exc) from None
            if not os.access(path.parent, os.W_OK | os.X_OK):  # serve could not create it
                denied = PermissionError(errno.EACCES, "Permission denied")
                raise _cannot_open(path, denied) from None
            return
        except OSError as exc:
            raise _cannot_open(path, exc) from None
        except ValueError:  # an embedded NUL
            raise AuditError("cannot open the audit log: its path holds a NUL byte") from None
        os.close(fd)

    def use_sink(self, path: Path | None, fd: int) -> None:
        """Write to ``fd`` from :meth:`open_sink` from now on (a reload: a new path, or a
        fresh file at the same path after log rotation); the previous file is closed."""
        old_path, old_fd = self.path, self._fd
        self.path, self._fd, self._sink = path, fd, sink_for(fd)
        if old_path is not None:
            with contextlib.suppress(OSError):  # EIO on a network file system: written already
                os.close(old_fd)

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
        try:  # ASCII: JSON-escaped, or key ids and codes
            self._sink.write("".join(parts).encode(), 0 if self._failing else SINK_STALL_SECONDS)
        except OSError as exc:
            # A failing audit sink must not take the key service down, but it must be seen.
            if not self._failing:
                log.error("cannot write the audit trail: %s", exc.strerror)
            self._failing = True
        else:
            if self._failing:
                log.error("the audit trail is writable again; lines were lost meanwhile")
            self._failing = False
