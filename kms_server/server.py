# The daemon's trio life cycle: the Unix listener, one task per connection, limits, graceful stop.
# No request semantics here (dispatch.py) and no wire syntax (kms_client.protocol).
"""Serving protocol v1 on a Unix stream socket with trio.

Each connection is a loop: receive what the client sent, answer every complete
line in order, and send all those answers in one write (a pipelined batch costs
one send). Replies are sent before more is read, so a client that pipelines
without reading stalls only itself: the daemon never buffers more than one
batch of replies for it.

Shutdown (SIGTERM/SIGINT): stop accepting; a connection waiting for input gets
a short last call for requests already on their way, then closes; requests
being served finish within the grace period; the socket file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import socket
import stat
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from time import perf_counter_ns

import trio

from kms_client.errors import Denied, KmsError, TooLong, Unavailable
from kms_client.protocol import (
    DEFAULT_MAX_LINE,
    VERBS,
    LineFramer,
    Quit,
    format_error,
    parse_request,
)
from kms_server.acl import Acl, AclError, Grants, Peer
from kms_server.audit import AuditError, AuditLog
from kms_server.dispatch import WRITE_REQUESTS, Dispatcher

log = logging.getLogger("kmsd.server")

RECEIVE_SIZE = 64 * 1024
#: How long a connection idle at shutdown may still deliver a request already sent.
LAST_CALL = 0.2
_TOO_MANY = format_error(Unavailable("too many connections"))
_DENIED = format_error(Denied())


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
    ) -> None:
        self._dispatcher = dispatcher
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
        self._limits = limits
        self._access = access
        self._audit = audit
        self._write_lock = trio.Lock()
        self._connections = 0
        self._connection_ids = itertools.count(1)
        self._stopping = False
        self._stop_requested = trio.Event()
        self._waiting_for_input: set[trio.CancelScope] = set()

    def stop(self) -> None:
        """Begin a graceful stop (idempotent)."""
        self._stopping = True
        self._stop_requested.set()

    async def reload(self) -> None:
        """SIGHUP: reload the ACL (kept as it was if the new one is bad), reopen the audit log."""
        await self._access.reload()
        try:
            self._audit.reopen()
        except AuditError as error:
            log.error("%s; still writing to the previous audit log", error)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptor:
                await acceptor.start(
                    partial(
                        trio.serve_listeners,
                        self._handle,
                        [self._listener],
                        handler_nursery=connections,
                    )
                )
                acceptor.start_soon(self._flush_counters_periodically)
                acceptor.start_soon(self._rotate_periodically)
                task_status.started()
                await self._stop_requested.wait()
                acceptor.cancel_scope.cancel()
            await self._listener.aclose()
            last_call = trio.current_time() + LAST_CALL
            for scope in self._waiting_for_input:
                scope.deadline = min(scope.deadline, last_call)
            connections.cancel_scope.deadline = trio.current_time() + self._limits.grace_period
        await self.flush_counters()

    async def flush_counters(self) -> None:
        """Write the usage counters that changed since the last flush (a worker thread)."""
        store = self._dispatcher.store
        if not store.dirty:
            return
        dirty, store.dirty = store.dirty, set()
        snapshot = store.state_snapshot(dirty)

        def write() -> None:
            with store.write_lock():
                for key_id, state in snapshot:
                    store.write_state(key_id, state)

        async with self._write_lock:
            try:
                await trio.to_thread.run_sync(write)
            except OSError as exc:
                store.dirty |= dirty
                log.error("cannot write usage counters: %s; will retry", exc.strerror)

    async def _flush_counters_periodically(self) -> None:
        while True:
            await trio.sleep(self._limits.counter_flush_interval)
            await self.flush_counters()

    async def _rotate_periodically(self) -> None:
        """Rotate keys whose latest version is older than their rotation period."""
        while True:
            await trio.sleep(self._limits.rotation_check_interval)
            for key_id in self._dispatcher.rotations_due(time.time()):
                async with self._write_lock:
                    reply, version = await self._dispatcher.rotate_safely(
                        key_id, trio.to_thread.run_sync
                    )
                if version is not None:
                    log.info("%s: rotated automatically to version %d", key_id, version)
                else:
                    log.error("%s: automatic rotation failed: %s", key_id, reply.decode().strip())

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

    async def _receive(
        self, stream: trio.SocketStream, framer: LineFramer, line_began: float
    ) -> bytes | None:
        """The next bytes from the client, or None when it is idle or too slow.

        A partial line must be completed within the idle timeout of its first
        byte, so a client trickling one byte at a time cannot hold a connection.
        """
        timeout = self._limits.idle_timeout
        deadline = (line_began if framer.has_partial_line else trio.current_time()) + timeout
        if self._stopping:
            deadline = min(deadline, trio.current_time() + LAST_CALL)
        with trio.CancelScope(deadline=deadline) as scope:
            self._waiting_for_input.add(scope)
            try:
                return await stream.receive_some(RECEIVE_SIZE)
            finally:
                self._waiting_for_input.discard(scope)
        return None

    async def _send(self, stream: trio.SocketStream, data: bytes) -> bool:
        """Send replies; False when the client has not read them within the idle timeout.

        A client that pipelines without reading fills the socket buffer and
        blocks this send, which also stops us reading from it: its unsent
        replies never exceed one batch. The timeout then frees its slot.
        """
        with trio.move_on_after(self._limits.idle_timeout):
            await stream.send_all(data)
            return True
        log.info("closing a connection that stopped reading its replies")
        return False

    async def _converse(  # noqa: PLR0912, PLR0915 - the per-request loop is inlined on purpose
        self, stream: trio.SocketStream, peer: Peer, connection_id: int
    ) -> None:
        dispatcher = self._dispatcher
        access = self._access
        audit = self._audit
        audit_prefix = audit.connection_prefix(connection_id, peer)
        grants = access.grants_for(peer)
        acl_generation = access.generation
        framer = LineFramer(self._limits.max_line)
        line_began = trio.current_time()
        while True:
            if not framer.has_partial_line:
                line_began = trio.current_time()
            data = await self._receive(stream, framer, line_began)
            if not data:
                return
            framer.feed(data)
            if acl_generation != access.generation:
                grants = access.grants_for(peer)
                acl_generation = access.generation
            replies: list[bytes] = []
            trail: list[str] = []
            closing = False
            try:
                for line in framer.lines():
                    began = perf_counter_ns()
                    version: int | None = None
                    key_id: str | None = None
                    try:
                        request = parse_request(line)
                    except KmsError as error:
                        reply = format_error(error)
                        verb = verb_of(line)
                    else:
                        verb = request.verb
                        key_id = getattr(request, "key_id", None)
                        if not grants.permits(request):
                            reply = _DENIED
                        elif isinstance(request, WRITE_REQUESTS):
                            async with self._write_lock:
                                reply, version = await dispatcher.respond_write(
                                    request, trio.to_thread.run_sync
                                )
                        else:
                            reply, version = dispatcher.respond(request)
                            closing = type(request) is Quit
                    replies.append(reply)
                    trail.append(
                        audit.line(
                            audit_prefix,
                            verb,
                            key_id,
                            version,
                            result_of(reply),
                            framer.last_line_size,
                            len(reply),
                            (perf_counter_ns() - began) // 1000,
                        )
                    )
                    if closing:
                        break
            except TooLong as error:
                replies.append(format_error(error))
                trail.append(
                    audit.line(audit_prefix, "-", None, None, error.code, 0, len(replies[-1]), 0)
                )
                closing = True
            audit.write(trail)
            if replies and not await self._send(stream, b"".join(replies)):
                return
            if closing:
                return


def verb_of(line: bytes) -> str:
    """The verb of a request that failed to parse, for the audit: a known verb or ``-``."""
    verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
    return verb if verb in VERBS else "-"


def result_of(reply: bytes) -> str:
    """``OK`` or the error code of a response line."""
    if reply.startswith(b"OK"):
        return "OK"
    return reply[4 : reply.index(b" ", 4)].decode("ascii")


class AccessControl:
    """The ACL in force, reloadable: connections re-derive their grants after a reload."""

    def __init__(self, acl: Acl, path: Path | None) -> None:
        self.acl = acl
        self.path = path
        self.generation = 0

    def grants_for(self, peer: Peer) -> Grants:
        return self.acl.grants_for(peer)

    async def reload(self) -> None:
        if self.path is None:
            return
        try:
            acl = await trio.to_thread.run_sync(Acl.load, self.path)
        except AclError as error:
            log.error("ACL reload rejected, the previous ACL stays in force: %s", error)
            return
        self.acl = acl
        self.generation += 1
        log.info("ACL reloaded from %s: %d rules", self.path, len(acl.rules))


async def run(
    server: Server,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP received: reloading")
                    await server.reload()
                    continue
                log.info("%s received: stopping", signal.Signals(signum).name)
                server.stop()
                break


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
