# AsyncClient: the same loop as sync.Client on trio: one reused connection, a trio.Lock, retry-once.
# Must not format or parse protocol bytes itself, nor differ from Client in retry/timeout rules.
"""A trio client for ``kmsd`` with the same methods and rules as :class:`kms_client.Client`.

Tasks sharing one ``AsyncClient`` queue on a :class:`trio.Lock`, one exchange
at a time. Repeatable requests are resent once on a fresh connection when the
old one turns out dead; ``CREATE``, ``ROTATE`` and ``REKEY`` never are.
``timeout`` bounds one call (a cancel scope around the wait for other tasks'
calls, connect, send, receive and the retry); when it expires, or the caller's
own cancel scope fires mid-exchange, the connection is closed, because the
reply still in flight would answer the next request.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import aclosing, contextmanager, suppress
from types import TracebackType
from typing import Any, Self, TypeVar

import trio

from kms_client.errors import ConnectionFailed, KmsError, Timeout
from kms_client.protocol import (
    DEFAULT_DATAKEY_BYTES,
    Configure,
    Create,
    DataKey,
    Decrypt,
    Destroy,
    Encrypt,
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
    Restore,
    Retire,
    Rewrap,
    Rotate,
)
from kms_client.sync import (
    CONNECT_RETRY_FIRST,
    CONNECT_RETRY_MAX,
    PIPELINE_BATCH,
    RESPONSE_MAX_LINE,
    REWRAP_WINDOW,
    BrokenConnection,
    Delivery,
    Progress,
    check_request,
    check_rewrap_arguments,
    checked_timeout,
    closed_in_flight,
    collect_replies,
    connection_broken,
    ended_by_too_long,
    expect_idle,
    next_reply_line,
    pipeline_broken,
    pipeline_lines,
    rewrap_total,
    rewrapped,
    settle_reply,
)

R = TypeVar("R")

_RECEIVE_SIZE = 256 << 10
#: How long ``aclose`` may spend saying QUIT before it closes anyway.
_CLOSE_TIMEOUT = 1.0


async def _windows(
    items: Iterable[bytes] | AsyncIterable[bytes], size: int
) -> AsyncGenerator[list[bytes], None]:
    """Lists of up to ``size`` items, from a plain or an async iterable."""
    batch: list[bytes] = []
    if isinstance(items, AsyncIterable):
        async for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
    else:
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


class AsyncClient:
    """A trio ``kmsd`` client over one reused Unix-socket connection.

    ``async with AsyncClient(path) as client`` connects lazily on the first call;
    ``await AsyncClient.connect(path)`` connects at once, so a missing daemon is
    reported there. Errors are the same :class:`KmsError` family as ``Client``.
    """

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float | None = 10.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = checked_timeout(timeout)
        self._lock = trio.Lock()
        self._stream: trio.SocketStream | None = None
        self._framer = LineFramer(RESPONSE_MAX_LINE)
        #: Counts :meth:`aclose` calls: a request that sees it change while in flight
        #: had its connection closed under it and must fail, not reconnect.
        self._closes = 0

    @classmethod
    async def connect(
        cls, socket_path: str | os.PathLike[str], timeout: float | None = 10.0
    ) -> Self:
        """Create a client and open its connection now."""
        client = cls(socket_path, timeout)
        async with client._lock:
            with trio.move_on_after(client._budget()) as scope:
                await client._open()
        if scope.cancelled_caught:
            raise Timeout(f"connecting to {client.socket_path} timed out")
        return client

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Say ``QUIT`` (best effort) and close the connection.

        Shielded and bounded: closing must finish even while the caller is being
        cancelled, and must not hang on a stuck daemon. We do not wait for the OK.
        A request another task still has in flight after a second is cut off: it
        raises :class:`ConnectionFailed` and does not reconnect. The client stays
        usable; its next request opens a new connection.
        """
        self._closes += 1
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_TIMEOUT):
                async with self._lock:
                    if self._stream is not None:
                        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            await self._stream.send_all(Quit().to_line())
            self._drop()

    @property
    def connected(self) -> bool:
        """True while a connection is open (it may still turn out to be dead)."""
        return self._stream is not None

    # ------------------------------------------------------------------ core

    async def call(self, request: Request[R]) -> R:
        """Send one request, wait for its reply and return the parsed value.

        Raises the :class:`KmsError` subclass for an ``ERR`` reply.
        """
        line = check_request(request)
        with trio.move_on_after(self._budget()) as scope:
            async with self._lock:  # waiting for other tasks' calls counts against the timeout
                closes = self._closes
                reply = await self._round_trip(request, line, closes)
                result = settle_reply(request, reply, self._drop)
        if scope.cancelled_caught:
            raise Timeout()
        if isinstance(result, KmsError):
            raise result
        return result

    async def pipeline(self, requests: Sequence[Request[Any]]) -> list[Any]:
        """Send many requests without waiting; return each reply or its ``KmsError``, in order.

        Same contract as :meth:`kms_client.Client.pipeline`: a sender task and the
        receiving loop run concurrently, so large replies cannot deadlock, and
        ``timeout`` bounds each wait for progress rather than the whole batch.
        """
        lines = pipeline_lines(requests)  # each encoded once
        results: list[Any] = []
        if not requests:
            return results
        with trio.move_on_after(self._budget()) as waited:
            await self._lock.acquire()
        if waited.cancelled_caught:
            raise Timeout("timed out waiting for this client's other calls to finish")
        try:
            closes = self._closes
            retried = False
            while True:
                answered = len(results)
                try:
                    await self._pipeline_attempt(requests, lines, results)
                    break
                except BrokenConnection as broken:
                    pending = requests[len(results) :]
                    self._check_not_closed(
                        closes, broken, all(request.repeatable for request in pending)
                    )
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

    async def ping(self) -> None:
        await self.call(Ping())

    async def hello(self) -> str:
        """Return the daemon's version string (the protocol name is checked)."""
        return await self.call(Hello())

    async def help(self) -> tuple[str, ...]:
        return await self.call(Help())

    async def create(
        self, key_id: str, exportable: bool = False, rotate_period: int | None = None
    ) -> int:
        """Create a key; returns its first version. Never retried automatically.

        ``rotate_period`` (seconds): rotate automatically when the latest version is older.
        """
        return await self.call(Create(key_id, exportable, rotate_period))

    async def rotate(self, key_id: str) -> int:
        """Add a version and make it current; returns it. Never retried automatically."""
        return await self.call(Rotate(key_id))

    async def info(self, key_id: str) -> dict[str, Any]:
        return await self.call(Info(key_id))

    async def get(self, key_id: str, version: int | None = None) -> KeyMaterial:
        return await self.call(Get(key_id, version))

    async def encrypt(self, key_id: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        return await self.call(Encrypt(key_id, plaintext, aad))

    async def decrypt(self, key_id: str, ciphertext: bytes, aad: bytes = b"") -> bytes:
        return await self.call(Decrypt(key_id, ciphertext, aad))

    async def datakey(self, key_id: str, nbytes: int = DEFAULT_DATAKEY_BYTES) -> DataKey:
        return await self.call(GenerateDataKey(key_id, nbytes))

    async def rewrap(self, key_id: str, ciphertext: bytes, aad: bytes = b"") -> bytes:
        """Re-encrypt under the key's latest version; the plaintext never leaves the daemon."""
        return await self.call(Rewrap(key_id, ciphertext, aad))

    def rewrap_many(
        self,
        key_id: str,
        ciphertexts: Iterable[bytes] | AsyncIterable[bytes],
        aad: bytes = b"",
        progress: Progress | None = None,
        window: int = REWRAP_WINDOW,
    ) -> AsyncGenerator[bytes, None]:
        """``async for`` every ciphertext rewrapped, in order, ``window`` pipelined at a time.

        The same contract as :meth:`kms_client.Client.rewrap_many`; the input may
        also be an async iterable (rows from an async database cursor). Wrap the
        loop in ``contextlib.aclosing`` if you may leave it early.
        """
        check_rewrap_arguments(key_id, window)
        return self._rewrap_windows(key_id, ciphertexts, aad, progress, window)

    async def _rewrap_windows(
        self,
        key_id: str,
        ciphertexts: Iterable[bytes] | AsyncIterable[bytes],
        aad: bytes,
        progress: Progress | None,
        window: int,
    ) -> AsyncGenerator[bytes, None]:
        total = rewrap_total(ciphertexts)
        done = 0
        # Closed here, not by the garbage collector, when we stop early (an ERR, a break).
        async with aclosing(_windows(ciphertexts, window)) as windows:
            async for batch in windows:
                requests = [Rewrap(key_id, ciphertext, aad) for ciphertext in batch]
                for ciphertext in rewrapped(await self.pipeline(requests)):
                    yield ciphertext
                    done += 1
                if progress is not None:
                    progress(done, total)

    async def retire(self, key_id: str, version: int) -> None:
        """Forbid every use of a version (its sealed file is kept); idempotent."""
        await self.call(Retire(key_id, version))

    async def restore(self, key_id: str, version: int) -> None:
        """Undo :meth:`retire`; idempotent. A destroyed version raises ``Retired``."""
        await self.call(Restore(key_id, version))

    async def destroy(self, key_id: str, version: int) -> None:
        """Erase a version's material for good (not the latest); idempotent."""
        await self.call(Destroy(key_id, version))

    async def configure(self, key_id: str, rotate_period: int | None) -> None:
        """Set the automatic rotation period in seconds, or turn it off with ``None``."""
        await self.call(Configure(key_id, rotate_period))

    async def rekey(self, source: str, argument: str) -> int:
        """Re-seal the store under a new KEK the daemon obtains itself (see ``Client.rekey``)."""
        return await self.call(Rekey(source, argument))

    # ------------------------------------------------------------------ plumbing

    def _budget(self) -> float:
        return math.inf if self.timeout is None else self.timeout

    def _drop(self) -> None:
        """Forget the connection and any half-read reply (synchronous, so safe when cancelled)."""
        stream, self._stream = self._stream, None
        self._framer = LineFramer(RESPONSE_MAX_LINE)
        if stream is not None:
            stream.socket.close()

    async def _open(self) -> trio.SocketStream:
        """Connect, asking again while the daemon's connection queue is full.

        Our own connect, not ``trio.open_unix_socket``: a Unix socket whose listen
        queue is full refuses at once (``EAGAIN``), and trio then waits for the
        unconnected socket to be writable, which it is, and reports it connected.
        """
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectionFailed(f"cannot create a socket: {exc.strerror or exc}") from exc
        try:
            sock.setblocking(False)
            pause = CONNECT_RETRY_FIRST
            while True:
                try:
                    sock.connect(self.socket_path)  # a Unix socket connects at once or refuses
                    break
                except BlockingIOError:
                    await trio.sleep(pause)  # bounded by the caller's timeout scope
                    pause = min(pause * 2, CONNECT_RETRY_MAX)
        except OSError as exc:
            sock.close()
            raise ConnectionFailed(
                f"cannot connect to {self.socket_path}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._stream = stream
        return stream

    @contextmanager
    def _guard(self, sent: bool) -> Iterator[None]:
        """Map stream failures to client errors; any failure, even Cancelled, drops the stream."""
        try:
            yield
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._drop()
            raise BrokenConnection(sent) from exc
        except OSError as exc:
            self._drop()
            raise ConnectionFailed(f"connection to the key daemon failed: {exc}") from exc
        except BaseException:
            self._drop()
            raise

    def _check_not_closed(self, closes: int, broken: BrokenConnection, repeatable: bool) -> None:
        """Fail a request whose connection :meth:`aclose` closed while it was in flight."""
        if self._closes != closes:
            raise closed_in_flight(repeatable, broken) from broken

    async def _round_trip(self, request: Request[Any], line: bytes, closes: int) -> bytes:
        try:
            return await self._exchange(line)
        except BrokenConnection as broken:
            self._check_not_closed(closes, broken, request.repeatable)
            if broken.sent and not request.repeatable:
                raise connection_broken(request, broken.sent, False) from broken
        try:
            return await self._exchange(line)
        except BrokenConnection as again:
            self._check_not_closed(closes, again, request.repeatable)
            raise connection_broken(request, again.sent, True) from again

    async def _exchange(self, line: bytes) -> bytes:
        """One request line out, one response line back."""
        stream = self._stream if self._stream is not None else await self._open()
        with self._guard(sent=False):
            try:
                await stream.send_all(line)
            except trio.BrokenResourceError:
                reply = await self._reply_left_behind(stream)
                if reply is None:
                    raise
                self._drop()  # the daemon has closed its end
                return reply
        with self._guard(sent=True):
            reply = await self._read_line(stream)
            expect_idle(self._framer)
        return reply

    async def _reply_left_behind(self, stream: trio.SocketStream) -> bytes | None:
        """The reply a daemon sent before closing on a request still being sent, if any
        (``ERR TOO_LONG``, ``ERR UNAVAILABLE``). Its end is closed: reading cannot wait."""
        try:
            return await self._read_line(stream)
        except (BrokenConnection, trio.BrokenResourceError, trio.ClosedResourceError):
            return None

    async def _read_line(self, stream: trio.SocketStream) -> bytes:
        framer = self._framer
        while (line := next_reply_line(framer)) is None:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise BrokenConnection(sent=True)
            framer.feed(data)
        return line

    async def _pipeline_attempt(
        self, requests: Sequence[Request[Any]], lines: Sequence[bytes], results: list[Any]
    ) -> None:
        """Send ``requests[len(results):]`` and append their replies to ``results``.

        The nursery's body only records a failure and cancels: an exception
        escaping a nursery would arrive wrapped in an ExceptionGroup.
        """
        budget = self._budget()
        failure: BaseException | None = None
        broken: BaseException | None = None
        delivery = Delivery(len(results))

        with trio.CancelScope(deadline=trio.current_time() + budget) as progress:
            stream = self._stream if self._stream is not None else await self._open()
            framer = self._framer

            async def send_batches() -> None:
                # The socket's own send, not send_all: the bytes each call took tell
                # which requests the daemon may have read if the connection breaks.
                sock = stream.socket
                try:
                    for start in range(len(results), len(requests), PIPELINE_BATCH):
                        batch = lines[start : start + PIPELINE_BATCH]
                        delivery.start(start, batch)
                        with memoryview(b"".join(batch)) as outgoing:
                            taken = 0
                            while taken < len(outgoing):
                                sent = await sock.send(outgoing[taken:])
                                taken += sent
                                delivery.took(sent)
                        progress.deadline = trio.current_time() + budget
                except (OSError, trio.ClosedResourceError):
                    # Replies to what did arrive may still be buffered; the
                    # receiver reads on to EOF and reports the break.
                    pass

            with self._guard(sent=True):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_batches)
                    try:
                        while len(results) < len(requests):
                            data = await stream.receive_some(_RECEIVE_SIZE)
                            if not data:
                                raise BrokenConnection(sent=True)
                            progress.deadline = trio.current_time() + budget
                            framer.feed(data)
                            collect_replies(framer, requests, results)
                        expect_idle(framer)
                    except (
                        BrokenConnection,
                        trio.BrokenResourceError,
                        trio.ClosedResourceError,  # aclose() in another task
                    ) as exc:
                        broken = exc
                        nursery.cancel_scope.cancel()
                    except KmsError as exc:
                        failure = exc
                        nursery.cancel_scope.cancel()
                if broken is not None:
                    # Counted only now that the sender has stopped: a send returns through
                    # a checkpoint after the kernel took its bytes, where this task may
                    # have seen the daemon hang up; they count as delivered all the same.
                    failure = BrokenConnection(sent=True, delivered=delivery.delivered)
                    failure.__cause__ = broken
                if failure is not None:
                    raise failure
        if progress.cancelled_caught:
            self._drop()
            raise Timeout()
