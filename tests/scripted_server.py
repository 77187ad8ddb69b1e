# A scripted stand-in for kmsd on a real Unix socket, for failures kmsd won't produce on cue.
# Must not imitate kmsd beyond what each test scripts: no keys, no crypto, no protocol parsing.
"""Misbehaving servers for client tests: silent, garbage-speaking, or hanging up.

Each accepted connection runs ``handler(conn, index)`` in its own thread, where
``index`` counts connections from 0, so a test can script "answer on the first
connection, hang up on the second" and then check how many connections the
client opened (``server.connections``).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

Handler = Callable[[socket.socket, int], None]


def lines(conn: socket.socket) -> Iterator[bytes]:
    """Yield request lines (without LF) until the client hangs up or the server stops."""
    buffer = b""
    while True:
        try:
            data = conn.recv(65536)
        except OSError:
            return
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line


def reply_with(answer: Callable[[bytes], bytes]) -> Handler:
    """Answer every request line with ``answer(line)`` (which includes the LF)."""

    def handler(conn: socket.socket, index: int) -> None:
        for line in lines(conn):
            conn.sendall(answer(line))

    return handler


def silent(conn: socket.socket, index: int) -> None:
    """Read requests and never answer."""
    for _ in lines(conn):
        pass


def hang_up_after_request(conn: socket.socket, index: int) -> None:
    """Read one request, then close without answering (a daemon dying mid-request)."""
    for _ in lines(conn):
        return


def hang_up_first_then(answer: Callable[[bytes], bytes]) -> Handler:
    """Hang up on the first connection after one request; answer on every later one."""
    replying = reply_with(answer)

    def handler(conn: socket.socket, index: int) -> None:
        if index == 0:
            hang_up_after_request(conn, index)
        else:
            replying(conn, index)

    return handler


class ScriptedServer:
    """A listener that runs ``handler`` in a thread per connection.

    ``connections`` is exact whenever it is read: a Unix socket's connect() returns
    once the connection is queued, so reading it first accepts whatever is queued.
    """

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._accepted = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def connections(self) -> int:
        self._accept_queued()
        return self._accepted

    def __enter__(self) -> ScriptedServer:
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._listener.setblocking(False)
        accept = threading.Thread(target=self._accept_loop, daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._accept_queued()  # counted, then hung up on like the others
        self._closed.set()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                select.select([self._listener], [], [], 0.05)
            except (OSError, ValueError):  # closed
                return
            self._accept_queued()

    def _accept_queued(self) -> None:
        with self._lock:
            while not self._closed.is_set():
                try:
                    conn, _ = self._listener.accept()
                except OSError:  # none queued (EAGAIN), or closed
                    return
                conn.setblocking(True)
                index = self._accepted
                self._accepted += 1
                self._conns.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        try:
            self.handler(conn, index)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class FullQueueListener:
    """A listening socket whose queue is full and which accepts nobody (yet).

    A Unix socket then refuses a connect() at once (``EAGAIN``), unlike TCP. After
    :meth:`serve_late` it starts, 0.3 s later, accepting every waiting connection
    and answering each with ``OK PONG``, so a client that kept trying gets in.
    """

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(0)
        self.listener.settimeout(10.0)
        self.queued: list[socket.socket] = []
        self.served: list[socket.socket] = []
        self._late: threading.Thread | None = None
        while True:
            waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiting.setblocking(False)
            try:
                waiting.connect(path)
            except BlockingIOError:
                waiting.close()
                break
            self.queued.append(waiting)

    def __enter__(self) -> FullQueueListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._late is not None:
            self._late.join()
        for conn in [*self.queued, *self.served]:
            conn.close()
        self.listener.close()

    def serve_late(self) -> None:
        """Accept the queued connections and one more (the client's), 0.3 s from now."""

        def accept_all() -> None:
            time.sleep(0.3)
            for _ in range(len(self.queued) + 1):
                conn = self.listener.accept()[0]
                conn.sendall(b"OK PONG\n")  # the queued ones never asked: nobody reads it
                self.served.append(conn)

        self._late = threading.Thread(target=accept_all)
        self._late.start()
