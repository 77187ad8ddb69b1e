# Client: the blocking AF_UNIX loop around protocol.py: one reused connection, a lock, retry-once.
# Must not import anything outside the standard library, nor format or parse protocol bytes itself.
"""A blocking, thread-safe client for ``kmsd``.

A database host loads this module with nothing but the standard library, so it
(and the ``protocol``/``errors`` modules it imports) never imports trio, click
or cryptography. All wire formatting and parsing lives in :mod:`kms_client.protocol`;
this module only moves bytes.

Connection rules, shared with :class:`kms_client.AsyncClient`:

* One AF_UNIX stream connection, opened on the first call and reused; a lock
  serialises each request/response exchange, so one ``Client`` may be shared by
  threads (requests from different threads simply queue).
* If the connection turns out to be dead (the daemon restarted: ``EPIPE`` or
  ``ECONNRESET``, or end of stream before the reply), a *repeatable* request is
  sent once more on a fresh connection. ``CREATE`` and ``ROTATE`` are never resent
  automatically: the daemon may have applied them before it went away, and
  resending would create a second version or report ``EXISTS`` for our own key.
* ``timeout`` bounds one whole call (connect, send, receive, and the retry).
  A timeout drops the connection, because a late reply would otherwise be read
  as the answer to the next request.
* Any failure that leaves the stream in an unknown state (timeout, protocol
  violation, interrupt) closes the connection; an ``ERR`` reply does not.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from kms_client.errors import ConnectionFailed, KmsError, ProtocolViolation, Timeout, TooLong
from kms_client.protocol import (
    DEFAULT_DATAKEY_BYTES,
    Create,
    DataKey,
    Decrypt,
    Encrypt,
    Err,
    GenerateDataKey,
    Get,
    Hello,
    Help,
    Info,
    KeyMaterial,
    LineFramer,
    Ping,
    Quit,
    Request,
    Response,
    Rotate,
    parse_response,
    validate_key_id,
)

R = TypeVar("R")

#: Largest response line we accept. Requests are limited to 1 MiB by the daemon,
#: but replies (a ``GET`` of many versions in future, a big ``DEC``) may be longer.
RESPONSE_MAX_LINE = 64 << 20
#: Requests encoded and queued at once by :meth:`Client.pipeline`.
PIPELINE_BATCH = 256
_IO_SIZE = 256 << 10


class _Broken(Exception):
    """The connection died under us; ``sent`` says whether the request left entirely."""

    def __init__(self, sent: bool) -> None:
        super().__init__("connection broken")
        self.sent = sent


def check_request(request: Request[Any]) -> bytes:
    """Return the request's line, refusing requests that would not be one valid line.

    The codec formats whatever it is given, so a key id such as ``"a\\nROTATE b"``
    would smuggle a second request onto the wire and desynchronise every reply
    after it. Key ids are therefore validated here, before anything is sent, and
    raise :class:`~kms_client.errors.BadKeyId` exactly as the daemon would.
    """
    key_id = getattr(request, "key_id", None)
    if isinstance(key_id, str):
        validate_key_id(key_id.encode("ascii", "replace"))
    return request.to_line()


def settle(request: Request[R], response: Response) -> R | KmsError:
    """Turn one parsed response into the request's value, or the error it carries."""
    if isinstance(response, Err):
        return response.to_exception()
    return request.parse_reply(response)


def connection_broken(verb: str, sent: bool, retried: bool) -> ConnectionFailed:
    """The error for a dead connection, saying whether the request may have been applied."""
    if retried:
        return ConnectionFailed("connection to the key daemon broke, and again after reconnecting")
    if not sent:
        return ConnectionFailed(
            f"connection to the key daemon was closed before {verb} was sent"
            " (not applied; not resent automatically)"
        )
    return ConnectionFailed(
        f"connection to the key daemon broke before the reply to {verb}; it may have been applied"
    )


class Client:
    """A blocking ``kmsd`` client over one reused Unix-socket connection.

    Use it as a context manager, or call :meth:`close`; after ``close()`` a later
    call opens a new connection. Methods raise :class:`~kms_client.errors.KmsError`
    subclasses only: the daemon's ``ERR`` codes, plus the client-side
    ``ConnectionFailed``, ``Timeout`` and ``ProtocolViolation``.
    """

    def __init__(
        self, socket_path: str | os.PathLike[str], timeout: float | None = 10.0
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._framer = LineFramer(RESPONSE_MAX_LINE)

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Say ``QUIT`` (best effort, never blocking) and close the connection.

        We do not wait for the ``OK``: ``close()`` runs on error paths and in
        ``__exit__``, where blocking on a stuck daemon would be worse than the
        daemon finding the peer gone when it writes its reply.
        """
        with self._lock:
            sock = self._sock
            if sock is None:
                return
            try:
                sock.setblocking(False)
                sock.send(Quit().to_line())
            except OSError:
                pass
            finally:
                self._drop()

    @property
    def connected(self) -> bool:
        """True while a connection is open (it may still turn out to be dead)."""
        return self._sock is not None

    # ------------------------------------------------------------------ core

    def call(self, request: Request[R]) -> R:
        """Send one request, wait for its reply and return the parsed value.

        Raises the :class:`KmsError` subclass for an ``ERR`` reply.
        """
        line = check_request(request)
        with self._lock:
            deadline = self._deadline()
            try:
                reply = self._exchange(line, deadline)
            except _Broken as broken:
                if not request.repeatable:
                    raise connection_broken(request.verb, broken.sent, False) from broken
                try:
                    reply = self._exchange(line, deadline)
                except _Broken as again:
                    raise connection_broken(request.verb, again.sent, True) from again
            try:
                result = settle(request, parse_response(reply))
            except ProtocolViolation:
                self._drop()
                raise
            if isinstance(request, Quit):
                self._drop()
        if isinstance(result, KmsError):
            raise result
        return result

    def pipeline(self, requests: Sequence[Request[Any]]) -> list[Any]:
        """Send many requests without waiting, and return their replies in order.

        Each element of the result is the request's value, or the
        :class:`KmsError` instance its ``ERR`` reply carried (not raised, so one
        missing key does not hide the other 9,999 answers). Connection-level
        failures (``ConnectionFailed``, ``Timeout``, ``ProtocolViolation``) are
        raised; a dead connection is replaced once if every unanswered request is
        repeatable. Invalid key ids raise ``BadKeyId`` before anything is sent.

        Sending and receiving are interleaved with a selector, so a batch whose
        replies outgrow the socket buffers cannot deadlock. ``timeout`` here bounds
        each wait for progress, not the whole batch.
        """
        for request in requests:
            check_request(request)
        results: list[Any] = []
        if not requests:
            return results
        with self._lock:
            retried = False
            while True:
                try:
                    self._pipeline_attempt(requests, results)
                    break
                except _Broken as broken:
                    pending = requests[len(results) :]
                    if retried or not all(request.repeatable for request in pending):
                        raise ConnectionFailed(
                            f"connection to the key daemon broke after {len(results)} of"
                            f" {len(requests)} replies; unanswered CREATE or ROTATE requests"
                            " may have been applied"
                        ) from broken
                    retried = True
            if any(isinstance(request, Quit) for request in requests):
                self._drop()
        return results

    # ------------------------------------------------------------------ verbs

    def ping(self) -> None:
        self.call(Ping())

    def hello(self) -> str:
        """Return the daemon's version string (the protocol name is checked)."""
        return self.call(Hello())

    def help(self) -> tuple[str, ...]:
        return self.call(Help())

    def create(self, key_id: str, exportable: bool = False) -> int:
        """Create a key; returns its first version. Never retried automatically."""
        return self.call(Create(key_id, exportable))

    def rotate(self, key_id: str) -> int:
        """Add a version and make it current; returns it. Never retried automatically."""
        return self.call(Rotate(key_id))

    def info(self, key_id: str) -> dict[str, Any]:
        return self.call(Info(key_id))

    def get(self, key_id: str, version: int | None = None) -> KeyMaterial:
        return self.call(Get(key_id, version))

    def encrypt(self, key_id: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        return self.call(Encrypt(key_id, plaintext, aad))

    def decrypt(self, key_id: str, ciphertext: bytes, aad: bytes = b"") -> bytes:
        return self.call(Decrypt(key_id, ciphertext, aad))

    def datakey(self, key_id: str, nbytes: int = DEFAULT_DATAKEY_BYTES) -> DataKey:
        return self.call(GenerateDataKey(key_id, nbytes))

    # ------------------------------------------------------------------ plumbing

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    def _drop(self) -> None:
        """Forget the connection and any half-read reply."""
        sock, self._sock = self._sock, None
        self._framer = LineFramer(RESPONSE_MAX_LINE)
        if sock is not None:
            sock.close()

    def _open(self, deadline: float | None) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectionFailed(f"cannot create a socket: {exc.strerror or exc}") from exc
        try:
            sock.settimeout(self._remaining(deadline))
            sock.connect(self.socket_path)
        except TimeoutError as exc:
            sock.close()
            raise Timeout(f"connecting to {self.socket_path} timed out") from exc
        except OSError as exc:
            sock.close()
            raise ConnectionFailed(
                f"cannot connect to {self.socket_path}: {exc.strerror or exc}"
            ) from exc
        self._sock = sock
        return sock

    def _exchange(self, line: bytes, deadline: float | None) -> bytes:
        """One request line out, one response line back; drops the connection on any failure."""
        sock = self._sock if self._sock is not None else self._open(deadline)
        sent = False
        try:
            sock.settimeout(self._remaining(deadline))
            sock.sendall(line)
            sent = True
            reply = self._read_line(sock, deadline)
            if self._framer.has_partial_line:
                raise ProtocolViolation("server sent data nobody asked for")
            return reply
        except ConnectionError as exc:
            self._drop()
            raise _Broken(sent) from exc
        except TimeoutError as exc:
            self._drop()
            raise Timeout() from exc
        except OSError as exc:
            self._drop()
            raise ConnectionFailed(f"connection to the key daemon failed: {exc}") from exc
        except BaseException:
            self._drop()
            raise

    def _read_line(self, sock: socket.socket, deadline: float | None) -> bytes:
        framer = self._framer
        while True:
            try:
                line = framer.next_line()
            except TooLong:
                raise ProtocolViolation("server reply exceeds the client's line limit") from None
            if line is not None:
                return line
            sock.settimeout(self._remaining(deadline))
            data = sock.recv(_IO_SIZE)
            if not data:
                raise _Broken(sent=True)
            framer.feed(data)

    def _pipeline_attempt(self, requests: Sequence[Request[Any]], results: list[Any]) -> None:
        """Send ``requests[len(results):]`` and append their replies to ``results``.

        Raises :class:`_Broken` (connection dropped) so the caller may retry the
        unanswered tail on a new connection.
        """
        sock = self._sock if self._sock is not None else self._open(self._deadline())
        framer = self._framer
        next_send = len(results)
        outgoing = memoryview(b"")
        selector = selectors.DefaultSelector()
        try:
            # Non-blocking: a blocking AF_UNIX send() waits until *all* bytes are
            # queued, which is exactly the deadlock the selector is here to avoid.
            sock.setblocking(False)
            events = selectors.EVENT_READ | selectors.EVENT_WRITE
            selector.register(sock, events)
            while len(results) < len(requests):
                if not outgoing and next_send < len(requests):
                    batch = requests[next_send : next_send + PIPELINE_BATCH]
                    outgoing = memoryview(b"".join(request.to_line() for request in batch))
                    next_send += len(batch)
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if outgoing else 0)
                if wanted != events:
                    selector.modify(sock, wanted)
                    events = wanted
                ready = selector.select(self.timeout)
                if not ready:
                    raise TimeoutError
                _, mask = ready[0]
                if mask & selectors.EVENT_WRITE and outgoing:
                    try:
                        outgoing = outgoing[sock.send(outgoing[:_IO_SIZE]) :]
                    except BlockingIOError:
                        pass
                    except ConnectionError:
                        # Replies to what did arrive may still be buffered: read on to EOF.
                        outgoing, next_send = memoryview(b""), len(requests)
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(_IO_SIZE)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise _Broken(sent=True)
                    framer.feed(data)
                    self._collect(framer, requests, results)
            if framer.has_partial_line:
                raise ProtocolViolation("server sent data nobody asked for")
        except ConnectionError as exc:
            self._drop()
            raise _Broken(sent=True) from exc
        except TimeoutError as exc:
            self._drop()
            raise Timeout() from exc
        except OSError as exc:
            self._drop()
            raise ConnectionFailed(f"connection to the key daemon failed: {exc}") from exc
        except BaseException:
            self._drop()
            raise
        finally:
            selector.close()

    @staticmethod
    def _collect(framer: LineFramer, requests: Sequence[Request[Any]], results: list[Any]) -> None:
        try:
            for line in framer.lines():
                if len(results) == len(requests):
                    raise ProtocolViolation("server sent more replies than requests")
                request = requests[len(results)]
                results.append(settle(request, parse_response(line)))
        except TooLong:
            raise ProtocolViolation("server reply exceeds the client's line limit") from None

