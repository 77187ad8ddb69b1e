# The daemon's trio life cycle: the Unix listener, one task per connection, limits, graceful stop.
# No request semantics here (dispatch.py) and no wire syntax (kms_client.protocol).
"""Serving protocol v1 on a Unix stream socket with trio.

Each connection is a loop: receive what the client sent, answer every complete
line in order, and send all those answers in one write (a pipelined batch costs
one send). Replies are sent before more is read, so a client that pipelines
without reading stalls only itself: the daemon holds at most one receive of its
requests and about ``MAX_PENDING_REPLIES`` of its replies (a batch whose replies
grow past that sends them before it goes on). A long batch lets the other
connections run every couple of milliseconds, so a big pipelined batch does not
hold them up.

Shutdown (SIGTERM/SIGINT): stop accepting; a connection waiting for input gets
a short last call for requests already on their way, then closes; requests
being served finish within the grace period; the socket file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import trio

from kms_client.errors import Denied, KmsError, TooLong, Unavailable
from kms_client.protocol import (
    DATA_ARGUMENTS,
    DATA_VERBS,
    DEFAULT_MAX_LINE,
    KEYED_VERBS,
    VERBS,
    GenerateDataKey,
    Get,
    Hello,
    Help,
    Info,
    LineFramer,
    Ping,
    Quit,
    Request,
    Rotate,
    format_error,
    parse_request,
    validate_key_id,
)
from kms_server import systemd
from kms_server.acl import Acl, Grants, Peer
from kms_server.audit import AuditError, AuditLog
from kms_server.dispatch import WRITE_REQUESTS, Dispatcher
from kms_server.failures import LastingFailures

log = logging.getLogger("kmsd.server")

#: Bytes asked of the socket per receive: a pipelined batch of up to this much is
#: answered with one send (256 KiB measured ~1.1x the rate of 64 KiB on pipelined GET).
RECEIVE_SIZE = 256 * 1024
#: How long a connection idle at shutdown may still deliver a request already sent.
LAST_CALL = 0.2
#: How long the reply to a write applied during a stop may take to send, grace or not.
WRITE_REPLY_TIMEOUT = 1.0
#: How long a reload (SIGHUP) may take to read the configuration before it is rejected.
RELOAD_TIMEOUT = 10.0
#: The most an idle-timeout deadline may run late (and at most 1/16 of the timeout).
MAX_SLACK = 1.0
#: How long one connection's batch may hold the event loop before it lets others run
#: (a 256 KiB batch of GETs takes ~100 ms; the other connections must not wait for it).
SLICE_NS = 2_000_000
#: Connections accepted at most per scheduling round: the backlog is drained in one go
#: (one accept per round, as trio.serve_listeners does, left new clients waiting in the
#: queue for hundreds of milliseconds while 200 hostile connections kept the loop busy),
#: but a flood of connects still cannot hold the loop for long.
ACCEPT_BATCH = 64
#: accept(2) errors that mean the system is short of file descriptors or memory: wait, retry.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: accept(2) errors about one connection that went away before it was accepted.
_ACCEPT_ABORTED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
#: How long to wait before accepting again when the system is short of resources.
ACCEPT_RETRY_DELAY = 0.1
#: Names of the retried operations whose failures are said once (:class:`LastingFailures`).
_ACCEPT = "accept"
_COUNTERS = "usage counters"
#: Reply bytes a batch may hold before they are sent: without a bound, 216 KB of
#: pipelined ``INFO`` on a key of 100 versions (a 10 KB reply each) made the daemon
#: hold 250 MB of replies for a client that never reads them.
MAX_PENDING_REPLIES = 1024 * 1024
#: ACL decisions cached per connection before the cache is emptied (a client cycling
#: through key ids must not grow it without end).
MAX_CACHED_DECISIONS = 256
_TOO_MANY = format_error(Unavailable("too many connections"))
_DENIED = format_error(Denied())
_TOO_LONG = format_error(TooLong())
_WRITE_TYPES = frozenset(WRITE_REQUESTS)
#: Requests without a payload that a client repeats line for line (a database asking
#: for the same key): each connection keeps the parsed request and its ACL decision
#: by the line's bytes, so a repeated GET is a dict hit instead of a parse.
_KNOWN_TYPES = frozenset({Get, GenerateDataKey, Info, Ping, Hello, Help})
#: Longest line kept in that cache (a GET of a 255-character key id and its version).
MAX_KNOWN_LINE = 280
#: Request lines kept per connection before the cache is emptied: a database asks for a
#: handful of keys on a connection. An entry takes ~500 bytes (~1.7 KB with a 255-byte
#: key id), so 64 of them, with the ACL decisions, bound a connection's caches at
#: ~0.2 MB in the worst case and a daemon at its default 1024 connections at ~0.2 GB.
MAX_KNOWN_LINES = 64
#: Audit subjects kept per connection, by (verb, key id, version, result, sizes): a
#: client repeating a request, or sending payloads of one size (a database encrypting
#: pages), gets its subject from a dict instead of formatting it. Bounded like the
#: known lines (an entry takes at most ~1 KB).
MAX_CACHED_SUBJECTS = 64


class KnownLine:
    """A request line a connection sent before: its parse and its ACL decision.

    Only requests without a payload are kept (a database asking for the same key
    again and again).
    """

    __slots__ = ("key_id", "permitted", "request")

    def __init__(self, request: Request[Any], key_id: str | None, permitted: bool) -> None:
        self.request = request
        self.key_id = key_id
        self.permitted = permitted


@dataclass(frozen=True)
class Reloaded:
    """What a reload (SIGHUP) puts in force: the configuration's ACL and audit log."""

    acl: Acl
    #: Where the ACL came from: None for the default (the daemon's own uid alone).
    acl_path: Path | None
    #: None: stderr.
    audit_path: Path | None
    #: Settings the configuration changed that take effect only at a restart.
    restart_only: tuple[str, ...] = ()


class ReloadRejected(Exception):
    """The configuration read again at SIGHUP is bad: the one in force stays."""


class ServerError(Exception):
    """The daemon cannot serve: the socket path is taken, unusable or not ours."""


@dataclass(frozen=True)
class Limits:
    """Per-connection and per-daemon limits; every one is configurable."""

    max_line: int = DEFAULT_MAX_LINE
    max_connections: int = 1024
    idle_timeout: float = 300.0
    grace_period: float = 10.0
    #: How often usage counters are written to the key state files.
    counter_flush_interval: float = 5.0
    #: How often keys with an automatic rotation period are checked.
    rotation_check_interval: float = 60.0


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """Bind and listen on ``path`` with permissions ``mode``.

    An existing path is removed only when it is a socket nobody answers on (a
    stale one from a crash); a live daemon or a non-socket file is an error.
    """
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ServerError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", path)
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise ServerError(f"cannot check existing socket {path}: {exc.strerror}") from None
        else:
            raise ServerError(f"another daemon is already serving on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        reason = "path too long for a Unix socket" if exc.errno is None else exc.strerror
        raise ServerError(f"cannot bind {path}: {reason}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    listener.listen(socket.SOMAXCONN)
    return listener


class Server:
    """Owns the accept loop and the connection tasks of one listening socket."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        listener: socket.socket,
        limits: Limits,
        access: AccessControl,
        audit: AuditLog,
        reread: Callable[[], Reloaded],
    ) -> None:
        self._dispatcher = dispatcher
        #: Reads the configuration again (SIGHUP); blocking, so called in a worker thread.
        self._reread = reread
        self._reread_limiter = trio.CapacityLimiter(1)
        listener.setblocking(False)
        self._listener = listener
        self._limits = limits
        self._access = access
        self._audit = audit
        self._write_lock = trio.Lock()
        self._counter_failures = LastingFailures(log)  # said once, until a flush works
        self._connections = 0
        self._connection_ids = itertools.count(1)
        self._stopping = False
        self._stop_requested = trio.Event()
        self._waiting_for_input: set[trio.CancelScope] = set()
        #: Sends of replies to applied writes: shielded from the stop, bounded by it.
        self._answering: set[trio.CancelScope] = set()
        self._grace_end = -math.inf

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Begin a graceful stop (idempotent); the grace period starts now."""
        if not self._stopping:
            self._grace_end = trio.current_time() + self._limits.grace_period
        self._stopping = True
        self._stop_requested.set()

    async def reload(self) -> None:
        """SIGHUP: read the configuration again and put its ACL and audit log in force
        together, or neither: a bad new configuration is rejected, the old one stays.

        The audit log is opened afresh even at an unchanged path (logrotate moved it).
        """

        reloaded = sink = None
        why = f"the configuration did not load within {RELOAD_TIMEOUT:g} s"
        try:
            if self._reread_limiter.borrowed_tokens:  # one given up on still hangs
                raise ReloadRejected("an earlier reload is still reading the configuration")
            # In a thread of its own, given up at the timeout: a file on a hung mount never
            # answers, and the thread must not take a slot the writes need.
            with trio.move_on_after(RELOAD_TIMEOUT):
                reloaded = await trio.to_thread.run_sync(
                    self._reread, abandon_on_cancel=True, limiter=self._reread_limiter
                )
            if reloaded is not None:
                sink = self._audit.open_sink(reloaded.audit_path)
        except (ReloadRejected, AuditError) as error:
            why = str(error)
        except Exception as error:  # a reload must never stop the daemon
            why = f"the configuration could not be read ({type(error).__name__})"
        if reloaded is None or sink is None:
            log.error("reload rejected, the previous ACL and audit log stay in force: %s", why)
            return
        self._access.use(reloaded.acl, reloaded.acl_path)
        self._audit.use_sink(reloaded.audit_path, sink)
        log.info(
            "reloaded: ACL %s (%d rules), audit log %s",
            reloaded.acl.source,
            len(reloaded.acl.rules),
            reloaded.audit_path or "stderr",
        )
        if reloaded.restart_only:
            log.warning(
                "the configuration changes %s: in force only after a restart",
                ", ".join(reloaded.restart_only),
            )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptor:
                acceptor.start_soon(self._accept, connections)
                acceptor.start_soon(self._flush_counters_periodically)
                acceptor.start_soon(self._rotate_periodically)
                task_status.started()
                await self._stop_requested.wait()
                acceptor.cancel_scope.cancel()
            trio.lowlevel.notify_closing(self._listener)
            self._listener.close()
            last_call = trio.current_time() + LAST_CALL
            for scope in self._waiting_for_input:
                scope.deadline = min(scope.deadline, last_call)
            for scope in self._answering:  # a write's reply: sent past the grace, briefly
                scope.deadline = min(scope.deadline, self._grace_end + WRITE_REPLY_TIMEOUT)
            connections.cancel_scope.deadline = self._grace_end
        self._counter_failures.forget(_COUNTERS)  # a failure now is said again, and is final
        await self.flush_counters()
        if self._counter_failures.is_failing(_COUNTERS):
            log.error("usage counters since the last good flush are lost")

    async def _accept(self, connections: trio.Nursery) -> None:
        """Accept connections and start a task for each in ``connections``.

        Each time the socket is readable, up to ``ACCEPT_BATCH`` waiting connections
        are taken at once, with the stdlib socket's own non-blocking ``accept``. Out of
        descriptors or memory, it logs once, retries every ``ACCEPT_RETRY_DELAY``
        while the kernel queues the clients, and logs again once none is left waiting.
        """
        listener = self._listener
        short_of_resources = LastingFailures(log)
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    accepted, _address = listener.accept()
                except BlockingIOError:  # nobody left waiting
                    short_of_resources.worked(
                        _ACCEPT, "accepting connections again: none is waiting any more"
                    )
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_ABORTED_ERRNOS:
                        continue
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    short_of_resources.failed(
                        _ACCEPT, f"cannot accept a connection: {exc.strerror}; retrying"
                    )
                    await trio.sleep(ACCEPT_RETRY_DELAY)
                    break
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(accepted))
                connections.start_soon(self._handle, stream)

    async def flush_counters(self) -> None:
        """Write the usage counters that changed since the last flush (a worker thread)."""
        store = self._dispatcher.store
        async with self._write_lock:
            # Snapshot under the lock: a state change (RETIRE, DESTROY, CONFIG) acknowledged
            # before the flush must not be overwritten by an older copy.
            if not store.dirty:
                return
            dirty, store.dirty = store.dirty, set()
            snapshot = store.state_snapshot(dirty)

            def write() -> None:
                with store.write_lock():
                    for key_id, state in snapshot:
                        store.write_state(key_id, state)

            try:
                await trio.to_thread.run_sync(write)
            except OSError as exc:
                store.dirty |= dirty
                self._counter_failures.failed(
                    _COUNTERS,
                    f"cannot write usage counters: {exc.strerror} "
                    "(kept in memory, tried at each flush)",
                )
                return
            self._counter_failures.worked(_COUNTERS, "usage counters written again")

    async def _flush_counters_periodically(self) -> None:
        while True:
            await trio.sleep(self._limits.counter_flush_interval)
            await self.flush_counters()

    async def _rotate_periodically(self) -> None:
        """Rotate keys whose latest version is older than their rotation period.

        The check reads no files once each key's latest creation time is known, and
        lets the connections run between keys: a first check over many rotating keys
        opens each once, which must not hold up the requests being served.
        """
        failures = LastingFailures(log)  # keys whose check failed: said once, until it works
        while True:
            await trio.sleep(self._limits.rotation_check_interval)
            failures.keep_only(self._dispatcher.store.rotation.keys())  # (still rotating)
            for key_id in list(self._dispatcher.store.rotation):
                await trio.lowlevel.checkpoint()
                try:
                    failure = await self._rotate_if_due(key_id)
                except OSError as error:  # out of descriptors, a failing disk: try again later
                    failure = f"cannot check its rotation: {error}"
                if failure is None:
                    failures.worked(key_id, f"{key_id}: its rotation check works again")
                elif failure:
                    failures.failed(key_id, f"{key_id}: {failure}; will retry at each check")

    async def _rotate_if_due(self, key_id: str) -> str | None:
        """Rotate ``key_id`` if it is due; what went wrong, or ``None``.

        A failed write the dispatcher has already logged (a disk error, said once
        until ``ROTATE`` works again) is the empty string: not said twice.
        """
        dispatcher = self._dispatcher
        if not dispatcher.rotation_due(key_id, time.time()):
            return None
        async with self._write_lock:
            outcome = await dispatcher.rotate_if_due(key_id, trio.to_thread.run_sync)
        if outcome is None:
            return None  # no longer due: CONFIG rotate=off or a ROTATE came first
        reply, version = outcome
        if version is None:
            if dispatcher.write_is_failing(Rotate(key_id)):
                return ""
            return f"automatic rotation failed: {reply.decode().strip()}"
        log.info("%s: rotated automatically to version %d", key_id, version)
        return None

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._connections >= self._limits.max_connections:
            with trio.move_on_after(1.0), contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(_TOO_MANY)
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        try:
            peer = Peer.of(stream.socket)  # type: ignore[arg-type]
            await self._converse(stream, peer, next(self._connection_ids))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-conversation: normal
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    async def _converse(  # noqa: PLR0912, PLR0915 - the per-request loop is inlined on purpose
        self, stream: trio.SocketStream, peer: Peer, connection_id: int
    ) -> None:
        """Serve one connection: receive, answer every complete line, send the batch, repeat.

        Time limits. Waiting for a request line, the client has the idle timeout
        from the moment the server starts waiting for that line (sending part of a
        line does not reset the clock), so a client trickling one byte at a time
        cannot hold a connection; sending a batch of replies, the client has the
        idle timeout to read them (a client that pipelines without reading fills
        the socket buffer and blocks the send, which also stops us reading from
        it: its unsent replies never much exceed ``MAX_PENDING_REPLIES``); requests
        that change the store are never cut. One cancel scope bounds both waits: its
        deadline is moved only when it would fall short, or more than ``slack``
        late, so under load it changes about once per ``slack`` seconds instead of
        twice per request (a fresh scope per wait cost ~8 us each); a limit acts
        within [timeout, timeout + slack].

        A batch that has run for ``SLICE_NS`` writes its audit lines so far and
        yields to the other connections (a cancel-shielded checkpoint, with the
        deadline lifted: requests being served are never cut); one whose replies
        pass ``MAX_PENDING_REPLIES`` also sends them, with the idle timeout. The
        ACL decision for each (verb, key id) is cached for the connection and
        forgotten when the ACL is reloaded; the audit clock is read once per batch.
        The audit lines of a batch are written before its replies are sent: no
        client holds a key whose use is not on record.
        """
        dispatcher = self._dispatcher
        respond = dispatcher.respond
        access = self._access
        audit = self._audit
        audit_head = audit.head
        audit_subject = audit.subject
        audit_tail = audit.tail
        audit_prefix = audit.connection_prefix(connection_id, peer)
        grants = access.grants_for(peer)
        acl_generation = access.generation
        decisions: dict[tuple[str, str | None], bool] = {}
        known_lines: dict[bytes, KnownLine] = {}
        subjects: dict[tuple[str, str | None, int | None, str, int, int], str] = {}
        framer = LineFramer(self._limits.max_line)
        feed_lines = framer.feed_lines
        timeout = self._limits.idle_timeout
        slack = min(MAX_SLACK, timeout / 16)
        waiting = self._waiting_for_input
        # The trio socket's own recv/send: SocketStream's wrappers (a conflict detector
        # and a generator-based error translator each call) cost ~10% of a sequential GET.
        recv = stream.socket.recv
        send = stream.socket.send
        # The clock's own method: trio.current_time() reaches it through two more calls.
        current_time = trio.lowlevel.current_clock().current_time
        line_began = 0.0
        answered = True  # the last batch completed a line: a new one starts now
        #: The client went away (a send failed): what it sent is still served, to its end,
        #: and nothing is sent any more.
        vanished = False
        sending = False
        with trio.CancelScope() as idle:
            deadline = idle.deadline  # mirrored: reading the property costs a call
            while True:
                now = current_time()
                if answered or not framer.has_partial_line:
                    line_began = now
                wanted = line_began + timeout
                if self._stopping:  # a last call for requests already on their way
                    wanted = min(wanted, now + LAST_CALL)
                    deadline = idle.deadline = wanted
                elif deadline < wanted or deadline > wanted + slack:
                    deadline = idle.deadline = wanted + slack
                waiting.add(idle)
                try:
                    data = await recv(RECEIVE_SIZE)
                except OSError:  # ECONNRESET and the like: the client went away
                    return
                finally:
                    waiting.discard(idle)
                if not data:
                    return
                if self._stopping:  # serve() may have moved the deadline meanwhile
                    deadline = idle.deadline
                lines = feed_lines(data)
                if acl_generation != access.generation:
                    grants = access.grants_for(peer)
                    acl_generation = access.generation
                    decisions.clear()
                    known_lines.clear()
                sizes = framer.wire_sizes
                head = audit_head(audit_prefix)
                replies: list[bytes] = []
                trail: list[str] = []
                closing = must_answer = flushed = False
                pending = 0  # bytes in replies
                began = slice_began = perf_counter_ns()
                for number, line in enumerate(lines):
                    if began - slice_began > SLICE_NS or pending > MAX_PENDING_REPLIES:
                        # A long batch lets the others run; a large one sends what it has.
                        audit.write(trail)  # (and keep the trail's buffers small)
                        trail = []
                        if pending > MAX_PENDING_REPLIES:
                            wanted = current_time() + timeout
                            deadline = idle.deadline = wanted + slack
                            sending = True
                            try:
                                if not vanished:
                                    await send_from(send, b"".join(replies), 0)
                            except OSError:  # EPIPE, ECONNRESET: the client went away
                                vanished = True  # (its requests are served all the same)
                            sending = False
                            replies = []
                            pending = 0
                        deadline = idle.deadline = math.inf  # no cut while requests are served
                        await trio.lowlevel.cancel_shielded_checkpoint()
                        slice_began = began = perf_counter_ns()
                        head = audit_head(audit_prefix)
                    version: int | None = None
                    short = len(line) <= MAX_KNOWN_LINE
                    known = known_lines.get(line) if short else None
                    if known is not None:
                        request = known.request
                        key_id = known.key_id
                        permitted = known.permitted
                        verb = request.verb
                    else:
                        try:
                            request = parse_request(line)
                        except KmsError as error:
                            request = None
                            reply = format_error(error)
                            verb, key_id = named_by(line)
                        else:
                            verb = request.verb
                            key_id = getattr(request, "key_id", None)
                            decision = (verb, key_id)
                            decided = decisions.get(decision)
                            if decided is None:
                                if len(decisions) >= MAX_CACHED_DECISIONS:
                                    decisions.clear()
                                decided = decisions[decision] = grants.permits(request)
                            permitted = decided
                            if short and type(request) in _KNOWN_TYPES:
                                if len(known_lines) >= MAX_KNOWN_LINES:
                                    known_lines.clear()
                                known = known_lines[line] = KnownLine(request, key_id, permitted)
                    if request is not None:
                        if not permitted:
                            reply = _DENIED
                        elif type(request) in _WRITE_TYPES:
                            deadline = idle.deadline = math.inf  # a write is never cut
                            async with self._write_lock:
                                with trio.CancelScope(shield=True):  # not even the grace's end
                                    reply, version = await dispatcher.respond_write(
                                        request, trio.to_thread.run_sync
                                    )
                            head = audit_head(audit_prefix)
                            # An applied write must be answered, even if the stop's grace
                            # period ends before this batch does: its reply goes out now.
                            must_answer = True
                        else:
                            reply, version = respond(request)
                            closing = type(request) is Quit
                    replies.append(reply)
                    size_out = len(reply)
                    pending += size_out
                    result = "OK" if reply.startswith(b"OK") else error_code_of(reply)
                    size_in = len(line) + 1 if sizes is None else sizes[number]
                    said = (verb, key_id, version, result, size_in, size_out)
                    subject = subjects.get(said)
                    if subject is None:
                        if len(subjects) >= MAX_CACHED_SUBJECTS:
                            subjects.clear()
                        subject = subjects[said] = audit_subject(*said)
                    ended = perf_counter_ns()
                    micros = (ended - began) // 1000
                    began = ended  # the next request starts here: one clock read a request
                    trail += (head, subject, audit_tail(micros))
                    if must_answer:  # on record, then sent, the grace period's end or not
                        audit.write(trail)
                        trail = []
                        now = current_time()
                        with trio.CancelScope(shield=True) as answering:
                            answering.deadline = (
                                max(now, self._grace_end) + WRITE_REPLY_TIMEOUT
                                if self._stopping
                                else now + timeout
                            )
                            self._answering.add(answering)
                            sending = True
                            try:
                                if not vanished:
                                    await send_from(send, b"".join(replies), 0)
                            except OSError:  # EPIPE, ECONNRESET: the client went away, but
                                vanished = True  # what it sent is still served, as it was
                            finally:
                                self._answering.discard(answering)
                        if answering.cancelled_caught:  # it does not read: close
                            log.info("closing a connection that stopped reading its replies")
                            return
                        sending = False
                        replies = []
                        pending = 0
                        must_answer = False
                        flushed = True
                    if closing:
                        break
                if framer.too_long and not closing:
                    replies.append(_TOO_LONG)
                    verb = verb_of(framer.overlong_head)  # its verb and size: not its content
                    size_in = framer.overlong_size
                    subject = audit_subject(verb, None, None, "TOO_LONG", size_in, len(_TOO_LONG))
                    trail += (head, subject, audit_tail(0))
                    closing = True
                if vanished:  # the batch served and on record; read on, answer no one
                    audit.write(trail)
                    if closing:
                        return
                    answered = True
                    continue
                answered = bool(replies) or flushed
                if replies:
                    audit.write(trail)  # before the replies: no key leaves unrecorded
                    wanted = current_time() + timeout
                    if deadline < wanted or deadline > wanted + slack:
                        deadline = idle.deadline = wanted + slack
                    sending = True
                    batch = replies[0] if len(replies) == 1 else b"".join(replies)
                    try:
                        sent = await send(batch)
                        if sent < len(batch):
                            await send_from(send, batch, sent)
                    except OSError:  # EPIPE, ECONNRESET: the client went away
                        return
                    sending = False
                if closing:
                    return
        if sending:
            log.info("closing a connection that stopped reading its replies")


async def send_from(
    send: Callable[[bytes | memoryview], Awaitable[int]], batch: bytes, sent: int
) -> None:
    """Send ``batch`` from byte ``sent`` on, in as many calls as the socket takes."""
    with memoryview(batch) as view:
        while sent < len(batch):
            sent += await send(view[sent:])


def verb_of(line: bytes) -> str:
    """The verb of a request that failed to parse, for the audit: a known verb or ``-``."""
    verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
    return verb if verb in VERBS else "-"


def named_by(line: bytes) -> tuple[str, str | None]:
    """The verb and key id a request that failed to parse names, for the audit.

    The key id is its second token when the verb takes one and the token is a valid
    key id (``ENC pg/wal !!!`` was an attempt on ``pg/wal``), else None. A verb that
    carries data must have its number of arguments: in ``ENC <base64>`` the one token
    is the plaintext (a key id left out), and base64 often looks like a key id.
    """
    verb = verb_of(line)
    space = line.find(b" ")
    if verb not in KEYED_VERBS or space < 0:
        return verb, None
    if verb in DATA_VERBS and line.count(b" ") not in DATA_ARGUMENTS:
        return verb, None
    start = space + 1
    end = line.find(b" ", start)
    try:
        return verb, validate_key_id(line[start : end if end >= 0 else len(line)])
    except KmsError:
        return verb, None


def error_code_of(reply: bytes) -> str:
    """The code of an ``ERR <code> <message>`` line."""
    return reply[4 : reply.index(b" ", 4)].decode("ascii")


class AccessControl:
    """The ACL in force, reloadable: connections re-derive their grants after a reload."""

    def __init__(self, acl: Acl, path: Path | None) -> None:
        self.acl = acl
        self.path = path
        self.generation = 0

    def grants_for(self, peer: Peer) -> Grants:
        return self.acl.grants_for(peer)

    def use(self, acl: Acl, path: Path | None) -> None:
        """Put ``acl`` in force; every connection re-derives its grants at its next batch."""
        self.acl, self.path = acl, path
        self.generation += 1


class StoppedWhileStarting(BaseException):
    """SIGTERM or SIGINT before the socket is served: unwinds start-up (a passphrase
    command is ended, the KEK wiped) to a clean exit 0."""


class StopSignals:
    """The SIGTERM/SIGINT handler for the daemon's whole life, outside trio's receiver.

    While starting, a signal raises :class:`StoppedWhileStarting` wherever start-up
    is; it is remembered too, for a raise inside a ``__del__`` is only printed:
    :meth:`begin_serving` raises it again before the socket is bound. From then on a
    signal is only remembered: :func:`run` stops at once for one that came before its
    receiver opened, and one trio hands back as the receiver closes (a second SIGTERM
    during the stop) changes nothing, where the default action would kill the daemon
    before its socket is removed.
    """

    def __init__(self) -> None:
        self.caught: int | None = None
        self._starting = True

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.caught is None:
            self.caught = signum
        if self._starting:
            raise StoppedWhileStarting(signal.Signals(signum).name)

    def begin_serving(self) -> None:
        """Stop now for a signal that came while starting; from now on only remember."""
        if self.caught is not None:
            raise StoppedWhileStarting(signal.Signals(self.caught).name)
        self._starting = False


async def run(
    server: Server,
    description: str = "",
    stop_signals: StopSignals | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads.

    Under systemd (``Type=notify``) it reports ``READY=1`` once the socket is
    served, ``RELOADING=1``/``READY=1`` around a reload, ``STOPPING=1`` at
    shutdown, ``STATUS=`` lines, and ``WATCHDOG=1`` pings when a watchdog is armed.
    Signals are obeyed until the stop is complete: a second SIGTERM or SIGINT is
    said and changes nothing (the grace period bounds the stop).
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as helpers:
            async with trio.open_nursery() as serving:
                await serving.start(server.serve)
                status = f"STATUS=serving {description}".rstrip()
                systemd.notify("READY=1", status, f"MAINPID={os.getpid()}")
                period = systemd.watchdog_period()
                if period is not None:
                    helpers.start_soon(_ping_watchdog, period)
                helpers.start_soon(_obey_signals, server, signals, status, helpers)
                if stop_signals is not None and stop_signals.caught is not None:
                    _stop(server, stop_signals.caught)  # it came before the receiver opened
                task_status.started()
            helpers.cancel_scope.cancel()  # serve() returned: stopped and drained


async def _obey_signals(
    server: Server, signals: AsyncIterator[int], status: str, helpers: trio.Nursery
) -> None:
    """Act on each signal; a reload runs beside, so a SIGTERM is obeyed meanwhile (a
    config file on a hung mount must not keep the daemon from stopping)."""
    reloading = trio.Lock()

    async def reload() -> None:
        async with reloading:
            log.info("SIGHUP received: reloading")
            systemd.notify(
                "RELOADING=1",
                f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                "STATUS=reloading the configuration (ACL, audit log)",
            )
            await server.reload()
            if not server.stopping:  # a stop that came meanwhile said STOPPING=1 already
                systemd.notify("READY=1", status)

    async for signum in signals:
        if server.stopping:
            log.info("%s received: already stopping", signal.Signals(signum).name)
        elif signum != signal.SIGHUP:
            _stop(server, signum)
        elif reloading.locked():
            log.info("SIGHUP received: a reload is already under way")
        else:
            helpers.start_soon(reload)


def _stop(server: Server, signum: int) -> None:
    log.info("%s received: stopping", signal.Signals(signum).name)
    systemd.notify("STOPPING=1", "STATUS=stopping: finishing requests in flight")
    server.stop()


async def _ping_watchdog(period: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(period)


def remove_socket(path: Path, bound: os.stat_result) -> None:
    """Remove our socket file, unless something else has replaced it meanwhile."""
    try:
        current = os.lstat(path)
    except FileNotFoundError:
        return
    if (current.st_dev, current.st_ino) == (bound.st_dev, bound.st_ino):
        try:
            path.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot remove socket %s: %s", path, exc.strerror)
