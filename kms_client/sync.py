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
* If the connection turns out to be dead (the daemon restarted or closed an
  idle connection: ``EPIPE`` or ``ECONNRESET``, or end of stream before the
  reply), the request is sent once more on a fresh connection when that is
  safe: always if the send itself failed (the line's final LF never arrived,
  so the daemon cannot have executed it), and otherwise only for *repeatable*
  requests. A ``CREATE``, ``ROTATE`` or ``REKEY`` whose line was delivered is
  never resent: the daemon may have applied it before it went away. (``RETIRE``,
  ``RESTORE``, ``DESTROY`` and ``CONFIG`` are idempotent, so they may be.)
* If the daemon closes the connection while a request is being sent, a reply
  it left behind is read before anything else: ``ERR TOO_LONG`` for a line over
  its limit, ``ERR UNAVAILABLE`` when it is full. That reply is the answer; the
  request is not sent again.
* ``timeout`` bounds one whole call (waiting for another thread's call to
  finish, connect, send, receive, and the retry). A timeout drops the
  connection, because a late reply would otherwise be read as the answer to the
  next request. A daemon whose connection queue is full is asked again until
  the deadline.
* Any failure that leaves the stream in an unknown state (timeout, protocol
  violation, interrupt) closes the connection; an ``ERR`` reply does not.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from itertools import islice
from types import TracebackType
from typing import Any, Self, TypeVar

from kms_client.errors import (
    BadRequest,
    ConnectionFailed,
    KmsError,
    ProtocolViolation,
    Timeout,
    TooLong,
)
from kms_client.protocol import (
    DEFAULT_DATAKEY_BYTES,
    Configure,
    Create,
    DataKey,
    Decrypt,
    Destroy,
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
    Rekey,
    Request,
    Response,
    Restore,
    Retire,
    Rewrap,
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
#: Ciphertexts per pipelined batch in :meth:`Client.rewrap_many`.
REWRAP_WINDOW = 256
#: ``progress(done, total)``: ciphertexts rewrapped so far, and how many in all if known.
Progress = Callable[[int, int | None], None]
#: How long ``close()`` waits for another thread's call before cutting its connection.
CLOSE_WAIT = 1.0
#: The longest timeout a client takes (about 11.6 days): past any real call, and far
#: within what the system's timers take (a socket or lock timeout overflows at ~292 years).
MAX_TIMEOUT = 1_000_000.0


def checked_timeout(timeout: float | None) -> float | None:
    """``timeout`` if it is None (no limit) or seconds in (0, ``MAX_TIMEOUT``]; else ValueError."""
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:  # (NaN fails both)
        raise ValueError(
            f"timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds, or None"
        )
    return timeout


#: Pauses between connection attempts while the daemon's queue is full (seconds).
CONNECT_RETRY_FIRST = 0.001
CONNECT_RETRY_MAX = 0.05
_IO_SIZE = 256 << 10


class BrokenConnection(Exception):
    """Internal to both clients: the connection died under us (never escapes a client).

    ``sent`` says whether the request had been written entirely. If not, its
    LF never arrived and the daemon cannot have executed it, so any request may
    be resent; if so, only a repeatable one may. For a pipelined batch,
    ``delivered`` is the index of the first request whose line the kernel never
    took whole (``None``: unknown, so every unanswered one may have arrived).
    """

    def __init__(self, sent: bool, delivered: int | None = None) -> None:
        super().__init__("connection broken")
        self.sent = sent
        self.delivered = delivered


class Delivery:
    """Which requests of a pipelined batch the daemon may have read.

    Only a line whose final LF the kernel took can have been executed, so after a
    break the requests past that point are safe to send again, whatever they are
    (the common case: the daemon closed an idle connection and the first send of a
    batch fails with nothing taken).
    """

    def __init__(self, first: int) -> None:
        self._first = first
        self._ends: list[int] = []
        self._taken = 0

    def start(self, first: int, lines: Sequence[bytes]) -> None:
        """A new run of ``lines`` starting at request ``first`` is being sent."""
        self._first = first
        self._ends = list(itertools.accumulate(map(len, lines)))
        self._taken = 0

    def took(self, count: int) -> None:
        """The kernel accepted ``count`` more bytes of the current run."""
        self._taken += count

    @property
    def delivered(self) -> int:
        """The first request the daemon cannot have read whole."""
        return self._first + bisect.bisect_right(self._ends, self._taken)


def pipeline_lines(requests: Sequence[Request[Any]]) -> list[bytes]:
    """Each request's line (see :func:`check_request`), once; ``QUIT`` only as the last.

    The daemon closes the connection after ``QUIT`` and runs nothing sent behind it,
    so a request there would be answered by nobody, or sent again on a new connection
    as if the daemon had gone away: refused before anything is sent.
    """
    if any(type(request) is Quit for request in requests[:-1]):
        raise ValueError("QUIT ends the connection: it may only be a pipeline's last request")
    return [check_request(request) for request in requests]


def check_request(request: Request[Any]) -> bytes:
    """Return the request's line, refusing requests that would not be one valid line.

    The codec formats whatever it is given, so a key id such as ``"a\\nROTATE b"``
    would smuggle a second request onto the wire and desynchronise every reply
    after it. Key ids are therefore validated here, before anything is sent, and
    raise :class:`~kms_client.errors.BadKeyId` exactly as the daemon would; a line
    break in any other field is :class:`~kms_client.errors.BadRequest`. A field of
    the wrong type (a ``bytes`` key id, a ``str`` plaintext) is a ``TypeError``
    that names the request, as from any Python function given the wrong type.
    """
    key_id = getattr(request, "key_id", None)
    if key_id is not None:
        if not isinstance(key_id, str):
            raise TypeError(f"{request.verb}: key_id must be str, not {type(key_id).__name__}")
        validate_key_id(key_id.encode("ascii", "replace"))
    try:
        line = request.to_line()
    except (TypeError, AttributeError) as exc:  # formatting a field of the wrong type
        raise TypeError(f"{request.verb}: an argument has the wrong type ({exc})") from None
    if line.find(b"\n") != len(line) - 1 or b"\r" in line:  # any other field, say a REKEY source
        raise BadRequest("a request field holds a line break")
    if type(request) is Encrypt and not request.plaintext:
        raise BadRequest("plaintext must be at least 1 byte")  # as the daemon says it
    if isinstance(request, Decrypt | Rewrap) and not request.ciphertext:
        raise BadRequest("ciphertext must be at least 1 byte")
    return line


def settle(request: Request[R], response: Response) -> R | KmsError:
    """Turn one parsed response into the request's value, or the error it carries."""
    if isinstance(response, Err):
        return response.to_exception()
    return request.parse_reply(response)


def settle_reply(request: Request[R], reply: bytes, drop: Callable[[], None]) -> R | KmsError:
    """:func:`settle` a reply line; a protocol violation or a ``QUIT`` ends the connection."""
    try:
        result = settle(request, parse_response(reply))
    except ProtocolViolation:
        drop()
        raise
    if isinstance(request, Quit):
        drop()
    return result


def rewrap_total(ciphertexts: object) -> int | None:
    """How many ciphertexts ``rewrap_many`` will see, when the input says (a list does)."""
    return len(ciphertexts) if isinstance(ciphertexts, Sized) else None


def check_rewrap_arguments(key_id: str, window: int) -> None:
    """Checked when ``rewrap_many`` is called, not when its first result is asked for."""
    validate_key_id(key_id.encode("ascii", "replace"))
    if window < 1:
        raise ValueError("window must be at least 1")


def rewrapped(results: Sequence[Any]) -> Iterator[bytes]:
    """The ciphertexts of one window, in order, up to the first error, which is raised."""
    for result in results:
        if isinstance(result, KmsError):
            raise result
        yield result


def closed_in_flight(repeatable: bool, broken: BrokenConnection) -> ConnectionFailed:
    """The error for a request whose connection ``close()`` cut while it was in flight."""
    text = "the client was closed while the request was in flight"
    if broken.sent and not repeatable:
        text += "; it may have been applied"
    return ConnectionFailed(text)


def ended_by_too_long(results: Sequence[Any], answered: int) -> bool:
    """Whether this attempt's connection ended with an ``ERR TOO_LONG`` reply.

    The daemon closes a connection right after that reply and runs nothing past
    the over-long line, so the rest of the batch goes out on a new connection,
    whatever it holds, without using up the one retry (each such attempt answers
    one request at least).
    """
    return len(results) > answered and isinstance(results[-1], TooLong)


def pipeline_broken(
    requests: Sequence[Request[Any]], answered: int, delivered: int | None, retried: bool
) -> ConnectionFailed | None:
    """The error for a pipelined batch whose connection broke, or None to send the rest again.

    The unanswered requests the daemon may have read must all be repeatable for
    the rest to be resent, and only once.
    """
    maybe_read = requests[answered : len(requests) if delivered is None else delivered]
    unsafe = sorted({request.verb for request in maybe_read if not request.repeatable})
    if not retried and not unsafe:
        return None
    text = f"connection to the key daemon broke after {answered} of {len(requests)} replies" + (
        ", and again after reconnecting" if retried else ""
    )
    if unsafe:
        text += f"; unanswered {', '.join(unsafe)} requests may have been applied"
    return ConnectionFailed(text)


def connection_broken(request: Request[Any], sent: bool, retried: bool) -> ConnectionFailed:
    """The error for a dead connection, saying whether the request may have been applied."""
    if retried:
        text = "connection to the key daemon broke, and again after reconnecting"
    else:
        text = f"connection to the key daemon broke before the reply to {request.verb}"
    if sent and not request.repeatable:
        text += f"; the {request.verb} may have been applied"
    return ConnectionFailed(text)


class Client:
    """A blocking ``kmsd`` client over one reused Unix-socket connection.

    Use it as a context manager, or call :meth:`close`; after ``close()`` a later
    call opens a new connection. Methods raise :class:`~kms_client.errors.KmsError`
    subclasses for everything the daemon or the connection does: the daemon's
    ``ERR`` codes, plus the client-side ``ConnectionFailed``, ``Timeout`` and
    ``ProtocolViolation``. An argument of the wrong type is a ``TypeError``.
    """

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float | None = 10.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = checked_timeout(timeout)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self._framer = LineFramer(RESPONSE_MAX_LINE)
        #: Counts :meth:`close` calls: a request that sees it change while in flight
        #: had its connection cut under it and must fail, not reconnect.
        self._closes = 0

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
        daemon finding the peer gone when it writes its reply. A request another
        thread still has in flight after ``CLOSE_WAIT`` seconds has its connection
        shut down: it raises :class:`ConnectionFailed` and does not reconnect. The
        client stays usable; its next request opens a new connection.
        """
        self._closes += 1
        if not self._lock.acquire(timeout=CLOSE_WAIT):
            sock = self._sock
            if sock is not None:  # the thread in flight wakes up and drops it
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            return
        try:
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
        finally:
            self._lock.release()

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
        deadline = self._deadline()
        self._acquire(deadline)
        try:
            closes = self._closes
            try:
                reply = self._exchange(line, deadline)
            except BrokenConnection as broken:
                if self._closes != closes:
                    raise closed_in_flight(request.repeatable, broken) from broken
                if broken.sent and not request.repeatable:
                    raise connection_broken(request, broken.sent, False) from broken
                try:
                    reply = self._exchange(line, deadline)
                except BrokenConnection as again:
                    if self._closes != closes:
                        raise closed_in_flight(request.repeatable, again) from again
                    raise connection_broken(request, again.sent, True) from again
            result = settle_reply(request, reply, self._drop)
        finally:
            self._lock.release()
        if isinstance(result, KmsError):
            raise result
        return result

    def pipeline(self, requests: Sequence[Request[Any]]) -> list[Any]:
        """Send many requests without waiting, and return their replies in order.

        Each element of the result is the request's value, or the
        :class:`KmsError` instance its ``ERR`` reply carried (not raised, so one
        missing key does not hide the other 9,999 answers). Connection-level
        failures (``ConnectionFailed``, ``Timeout``, ``ProtocolViolation``) are
        raised; a dead connection is replaced once, and the unanswered requests
        sent again, if every one of them the daemon may have read is repeatable
        (a line the kernel never took whole cannot have been). A connection the
        daemon ends after ``ERR TOO_LONG`` (it runs nothing past that line) is
        replaced as often as that happens. Invalid key ids raise ``BadKeyId``
        before anything is sent.

        Sending and receiving are interleaved with a selector, so a batch whose
        replies outgrow the socket buffers cannot deadlock. ``timeout`` here bounds
        each wait for progress, not the whole batch.
        """
        lines = pipeline_lines(requests)  # each encoded once
        results: list[Any] = []
        if not requests:
            return results
        self._acquire(self._deadline())
        try:
            closes = self._closes
            retried = False
            while True:
                answered = len(results)
                try:
                    self._pipeline_attempt(requests, lines, results)
                    break
                except BrokenConnection as broken:
                    pending = requests[len(results) :]
                    if self._closes != closes:
                        repeatable = all(request.repeatable for request in pending)
                        raise closed_in_flight(repeatable, broken) from broken
                    if ended_by_too_long(results, answered):
                        continue
                    failure = pipeline_broken(requests, len(results), broken.delivered, retried)
                    if failure is not None:
                        raise failure from broken
                    retried = True
            if any(isinstance(request, Quit) for request in requests):
                self._drop()
        finally:
            self._lock.release()
        return results

    # ------------------------------------------------------------------ verbs

    def ping(self) -> None:
        self.call(Ping())

    def hello(self) -> str:
        """Return the daemon's version string (the protocol name is checked)."""
        return self.call(Hello())

    def help(self) -> tuple[str, ...]:
        return self.call(Help())

    def create(
        self, key_id: str, exportable: bool = False, rotate_period: int | None = None
    ) -> int:
        """Create a key; returns its first version. Never retried automatically.

        ``rotate_period`` (seconds) makes the daemon rotate the key whenever its
        latest version is older; the wire carries it as ``45s``/``30m``/``12h``/``90d``.
        """
        return self.call(Create(key_id, exportable, rotate_period))

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

    def rewrap(self, key_id: str, ciphertext: bytes, aad: bytes = b"") -> bytes:
        """Re-encrypt under the key's latest version; the plaintext never leaves the daemon."""
        return self.call(Rewrap(key_id, ciphertext, aad))

    def rewrap_many(
        self,
        key_id: str,
        ciphertexts: Iterable[bytes],
        aad: bytes = b"",
        progress: Progress | None = None,
        window: int = REWRAP_WINDOW,
    ) -> Iterator[bytes]:
        """Rewrap every ciphertext, in order, ``window`` pipelined requests at a time.

        Yields each new ciphertext in input order. The input is read lazily, one
        window ahead, so a table of any size streams through in constant memory.
        ``progress(done, total)`` is called after each window; ``total`` is
        ``len(ciphertexts)`` when the input has a length, else ``None``. The first
        ``ERR`` (say ``BadCiphertext`` for a row that was never ours) is raised
        after the new ciphertexts of the rows before it have been yielded, so the
        caller knows exactly which row failed. The connection lock is held only
        while a window is on the wire, never while the caller consumes results.
        """
        check_rewrap_arguments(key_id, window)
        return self._rewrap_windows(key_id, ciphertexts, aad, progress, window)

    def _rewrap_windows(
        self,
        key_id: str,
        ciphertexts: Iterable[bytes],
        aad: bytes,
        progress: Progress | None,
        window: int,
    ) -> Iterator[bytes]:
        total = rewrap_total(ciphertexts)
        source = iter(ciphertexts)
        done = 0
        while batch := list(islice(source, window)):
            results = self.pipeline([Rewrap(key_id, ciphertext, aad) for ciphertext in batch])
            for ciphertext in rewrapped(results):
                yield ciphertext
                done += 1
            if progress is not None:
                progress(done, total)

    def retire(self, key_id: str, version: int) -> None:
        """Forbid every use of a version (its sealed file is kept); idempotent."""
        self.call(Retire(key_id, version))

    def restore(self, key_id: str, version: int) -> None:
        """Undo :meth:`retire`; idempotent. A destroyed version raises ``Retired``."""
        self.call(Restore(key_id, version))

    def destroy(self, key_id: str, version: int) -> None:
        """Erase a version's material for good (not the latest); idempotent."""
        self.call(Destroy(key_id, version))

    def configure(self, key_id: str, rotate_period: int | None) -> None:
        """Set the automatic rotation period in seconds, or turn it off with ``None``."""
        self.call(Configure(key_id, rotate_period))

    def rekey(self, source: str, argument: str) -> int:
        """Re-seal the store under a new KEK that the daemon obtains itself.

        ``source`` is ``"file"`` (``argument``: an absolute path the daemon can
        read) or ``"passphrase"`` (``argument``: the command the daemon runs). The
        KEK never crosses the socket. Returns the new store generation. Never
        retried automatically. Give a long ``timeout``: the daemon re-seals every
        key file before it answers.
        """
        return self.call(Rekey(source, argument))

    # ------------------------------------------------------------------ plumbing

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _acquire(self, deadline: float | None) -> None:
        """Take the connection, waiting for other threads' calls until ``deadline`` at most.

        The caller releases ``_lock`` in a ``finally``: a generator context manager
        here cost 1.6 us a call, 4-5% of a round trip.
        """
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.acquire(timeout=wait):
            raise Timeout("timed out waiting for this client's other calls to finish")

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
            self._connect(sock, deadline)
        except TimeoutError as exc:
            sock.close()
            raise Timeout(f"connecting to {self.socket_path} timed out") from exc
        except OSError as exc:
            sock.close()
            raise ConnectionFailed(
                f"cannot connect to {self.socket_path}: {exc.strerror or exc}"
            ) from exc
        self._sock, self._pid = sock, os.getpid()
        return sock

    def _connect(self, sock: socket.socket, deadline: float | None) -> None:
        """Connect, asking again while the daemon's connection queue is full.

        A Unix socket whose listen queue is full refuses at once (``EAGAIN``)
        instead of queueing the caller, as TCP would: a daemon busy accepting
        deserves the rest of the call's time, not an immediate failure.
        """
        pause = CONNECT_RETRY_FIRST
        while True:
            sock.settimeout(self._remaining(deadline))
            try:
                sock.connect(self.socket_path)
            except BlockingIOError:
                remaining = self._remaining(deadline)
                time.sleep(pause if remaining is None else min(pause, remaining))
                pause = min(pause * 2, CONNECT_RETRY_MAX)
            else:
                return

    @contextlib.contextmanager
    def _guard(self, sent: bool) -> Iterator[None]:
        """Map socket failures to client errors; any failure drops the connection.

        After a failure mid-exchange nobody knows what is still in flight, so the
        only safe stream is a new one. ``sent`` says whether the request had been
        written entirely when the block started (for the retry decision).
        """
        try:
            yield
        except ConnectionError as exc:
            self._drop()
            raise BrokenConnection(sent) from exc
        except TimeoutError as exc:
            self._drop()
            raise Timeout() from exc
        except OSError as exc:
            self._drop()
            raise ConnectionFailed(f"connection to the key daemon failed: {exc}") from exc
        except BaseException:
            self._drop()
            raise

    def _connection(self, deadline: float | None) -> socket.socket:
        """The open connection, or a new one; never one inherited across ``fork()``.

        A database forks workers: a parent's connection shared with a child
        would hand each process the other's replies. The child closes only its
        own copy of the descriptor (no QUIT), so the parent's connection lives on.
        """
        if self._sock is not None and self._pid != os.getpid():
            self._drop()
        if self._sock is not None:
            return self._sock
        return self._open(deadline)

    def _exchange(self, line: bytes, deadline: float | None) -> bytes:
        """One request line out, one response line back."""
        sock = self._connection(deadline)
        with self._guard(sent=False):
            sock.settimeout(self._remaining(deadline))
            try:
                sock.sendall(line)
            except ConnectionError:
                reply = self._reply_left_behind(sock, deadline)
                if reply is None:
                    raise
                self._drop()  # the daemon has closed its end
                return reply
        with self._guard(sent=True):
            reply = self._read_line(sock, deadline)
            expect_idle(self._framer)
        return reply

    def _reply_left_behind(self, sock: socket.socket, deadline: float | None) -> bytes | None:
        """The reply a daemon sent before closing on a request still being sent, if any.

        The daemon has closed its end, so reading cannot wait for more than what
        is already buffered here.
        """
        try:
            return self._read_line(sock, deadline)
        except (BrokenConnection, OSError):
            return None

    def _read_line(self, sock: socket.socket, deadline: float | None) -> bytes:
        framer = self._framer
        while (line := next_reply_line(framer)) is None:
            sock.settimeout(self._remaining(deadline))
            data = sock.recv(_IO_SIZE)
            if not data:
                raise BrokenConnection(sent=True)
            framer.feed(data)
        return line

    def _pipeline_attempt(
        self, requests: Sequence[Request[Any]], lines: Sequence[bytes], results: list[Any]
    ) -> None:
        """Send ``requests[len(results):]`` and append their replies to ``results``.

        Raises :class:`BrokenConnection` (connection dropped) so the caller may retry the
        unanswered tail on a new connection.
        """
        sock = self._connection(self._deadline())
        pump = _Pump(sock, self._framer, requests, lines, results)
        try:
            with self._guard(sent=True), selectors.DefaultSelector() as selector:
                # Non-blocking: a blocking AF_UNIX send() waits until *all* bytes are
                # queued, which is exactly the deadlock the selector is here to avoid.
                sock.setblocking(False)
                events = selectors.EVENT_READ | selectors.EVENT_WRITE
                selector.register(sock, events)
                while not pump.done:
                    wanted = selectors.EVENT_READ | (
                        selectors.EVENT_WRITE if pump.wants_write() else 0
                    )
                    if wanted != events:
                        selector.modify(sock, wanted)
                        events = wanted
                    ready = selector.select(self.timeout)
                    if not ready:
                        raise TimeoutError
                    mask = ready[0][1]
                    if mask & selectors.EVENT_WRITE:
                        pump.write()
                    if mask & selectors.EVENT_READ:
                        pump.read()
                expect_idle(self._framer)
        except BrokenConnection as broken:
            broken.delivered = pump.delivery.delivered
            raise


class _Pump:
    """The state of one pipelined batch: what is left to send, what has been answered."""

    def __init__(
        self,
        sock: socket.socket,
        framer: LineFramer,
        requests: Sequence[Request[Any]],
        lines: Sequence[bytes],
        results: list[Any],
    ) -> None:
        self.sock = sock
        self.framer = framer
        self.requests = requests
        self.lines = lines
        self.results = results
        self.next_send = len(results)
        self.outgoing = memoryview(b"")
        self.delivery = Delivery(len(results))

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.requests)

    def wants_write(self) -> bool:
        """Encode the next batch when the previous one has left; True while bytes wait."""
        if not self.outgoing and self.next_send < len(self.requests):
            batch = self.lines[self.next_send : self.next_send + PIPELINE_BATCH]
            self.outgoing = memoryview(b"".join(batch))
            self.delivery.start(self.next_send, batch)
            self.next_send += len(batch)
        return bool(self.outgoing)

    def write(self) -> None:
        try:
            taken = self.sock.send(self.outgoing[:_IO_SIZE])
        except BlockingIOError:
            pass
        except ConnectionError:
            # Replies to what did arrive may still be buffered: stop sending, read on to EOF.
            self.outgoing, self.next_send = memoryview(b""), len(self.requests)
        else:
            self.outgoing = self.outgoing[taken:]
            self.delivery.took(taken)

    def read(self) -> None:
        try:
            data = self.sock.recv(_IO_SIZE)
        except BlockingIOError:
            return
        if not data:
            raise BrokenConnection(sent=True)
        self.framer.feed(data)
        collect_replies(self.framer, self.requests, self.results)


def next_reply_line(framer: LineFramer) -> bytes | None:
    """The next complete reply line; an over-long one is the server's fault, not ours."""
    try:
        return framer.next_line()
    except TooLong:
        raise ProtocolViolation("server reply exceeds the client's line limit") from None


def collect_replies(
    framer: LineFramer, requests: Sequence[Request[Any]], results: list[Any]
) -> None:
    """Settle every buffered reply line against the next unanswered request, in order."""
    while (line := next_reply_line(framer)) is not None:
        if len(results) == len(requests):
            raise ProtocolViolation("server sent more replies than requests")
        results.append(settle(requests[len(results)], parse_response(line)))


def expect_idle(framer: LineFramer) -> None:
    """Between exchanges nothing may be buffered: the server speaks only when asked."""
    if framer.has_partial_line:
        raise ProtocolViolation("server sent data nobody asked for")
