# The trio AsyncClient against the real kmsd and scripted servers: the blocking Client's rules,
# plus what only trio has (concurrent tasks on one client, cancellation mid-exchange).
from __future__ import annotations

import math
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from types import NoneType
from typing import Any

import pytest
import trio
import trio.testing

import kms_client
from kms_client import (
    AsyncClient,
    BadCiphertext,
    BadKeyId,
    BadRequest,
    ConnectionFailed,
    KeyExists,
    KeyNotFound,
    KmsError,
    NotExportable,
    ProtocolViolation,
    Retired,
    Timeout,
    TooLong,
    Unavailable,
)
from kms_client.aio import AsyncClient as DirectAsyncClient
from kms_client.protocol import (
    Create,
    Decrypt,
    Encrypt,
    Get,
    Ping,
    Quit,
    Rekey,
    Request,
    Rotate,
)
from tests.conftest import Daemon, serving
from tests.scripted_server import (
    FullQueueListener,
    ScriptedServer,
    hang_up_after_request,
    hang_up_first_then,
    reply_with,
    silent,
)


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(daemon.socket_path) as c:
        yield c


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf, 1e10])
def test_a_timeout_out_of_range_is_refused_at_once(timeout: float) -> None:
    """As the blocking client: a ValueError when made, not an overflow inside a call."""
    with pytest.raises(ValueError, match="timeout"):
        AsyncClient("/nonexistent.sock", timeout)


def test_async_client_is_exported_lazily() -> None:
    assert kms_client.AsyncClient is DirectAsyncClient
    assert "AsyncClient" in kms_client.__all__


async def test_every_method_round_trips(client: AsyncClient) -> None:
    await client.ping()
    assert await client.hello()
    assert "DATAKEY" in await client.help()
    assert await client.create("svc/a", exportable=True) == 1
    first = await client.get("svc/a")
    assert (first.version, len(first.key)) == (1, 32)
    assert await client.rotate("svc/a") == 2
    assert await client.get("svc/a", 1) == first
    assert (await client.info("svc/a"))["latest"] == 2
    ciphertext = await client.encrypt("svc/a", b"\x00\xffdata", aad=b"ctx")
    assert await client.decrypt("svc/a", ciphertext, aad=b"ctx") == b"\x00\xffdata"
    data_key = await client.datakey("svc/a", nbytes=24)
    assert len(data_key.key) == 24
    assert await client.decrypt("svc/a", data_key.wrapped) == data_key.key


async def test_errors_carry_their_wire_code(client: AsyncClient) -> None:
    await client.create("plain")
    ciphertext = await client.encrypt("plain", b"data", aad=b"right")
    with pytest.raises(BadCiphertext) as bad:
        await client.decrypt("plain", ciphertext, aad=b"wrong")
    assert bad.value.code == "BAD_CIPHERTEXT"
    with pytest.raises(NotExportable):
        await client.get("plain")
    with pytest.raises(KeyNotFound) as missing:
        await client.info("missing")
    assert missing.value.code == "NOT_FOUND"
    with pytest.raises(KeyExists):
        await client.create("plain")
    with pytest.raises(BadKeyId):
        await client.get("a\nPING")
    await client.ping()


async def test_lifecycle_methods_round_trip(client: AsyncClient) -> None:
    assert await client.create("life", exportable=True, rotate_period=12 * 3600) == 1
    assert (await client.info("life"))["rotate_period"] == 12 * 3600
    old = await client.encrypt("life", b"row", aad=b"ctx")
    assert await client.rotate("life") == 2
    new = await client.rewrap("life", old, aad=b"ctx")
    assert new[1:5] == (2).to_bytes(4, "big")
    assert await client.decrypt("life", new, aad=b"ctx") == b"row"

    await client.retire("life", 1)
    await client.retire("life", 1)
    with pytest.raises(Retired) as retired:
        await client.decrypt("life", old, aad=b"ctx")
    assert retired.value.code == "RETIRED"
    await client.restore("life", 1)
    assert await client.decrypt("life", old, aad=b"ctx") == b"row"
    with pytest.raises(BadRequest):
        await client.destroy("life", 2)
    await client.destroy("life", 1)
    await client.destroy("life", 1)
    with pytest.raises(Retired):
        await client.restore("life", 1)
    states = [entry["state"] for entry in (await client.info("life"))["versions"]]
    assert states == ["destroyed", "active"]

    await client.configure("life", 90 * 86400)
    assert (await client.info("life"))["rotate_period"] == 90 * 86400
    await client.configure("life", None)
    assert (await client.info("life"))["rotate_period"] is None
    with pytest.raises(KeyNotFound):
        await client.configure("nope", 60)
    with pytest.raises(BadRequest):
        await client.rekey("file", "/nonexistent/kms/kek")


async def test_rewrap_many_from_a_list_and_an_async_iterable(client: AsyncClient) -> None:
    await client.create("table")
    rows = [f"row {i}".encode() for i in range(30)]
    old = await client.pipeline([Encrypt("table", row, b"t") for row in rows])
    await client.rotate("table")
    calls: list[tuple[int, int | None]] = []

    def record(done: int, total: int | None) -> None:
        calls.append((done, total))

    new = [ct async for ct in client.rewrap_many("table", old, b"t", record, window=8)]
    assert calls == [(8, 30), (16, 30), (24, 30), (30, 30)]
    assert await client.pipeline([Decrypt("table", ct, b"t") for ct in new]) == rows

    async def rows_from_a_cursor() -> AsyncIterator[bytes]:
        for ciphertext in new:
            await trio.sleep(0)
            yield ciphertext

    calls.clear()
    newer = [ct async for ct in client.rewrap_many("table", rows_from_a_cursor(), b"t", record)]
    assert calls == [(30, None)]  # one window; an async iterable has no length
    assert await client.pipeline([Decrypt("table", ct, b"t") for ct in newer]) == rows


async def test_rewrap_many_stops_at_the_first_failure(client: AsyncClient) -> None:
    await client.create("mixed")
    await client.create("other")
    good = [await client.encrypt("mixed", bytes([i])) for i in range(6)]
    inputs = [*good[:4], await client.encrypt("other", b"x"), *good[4:]]

    def lazily() -> Iterator[bytes]:
        yield from inputs

    got: list[bytes] = []

    async def drain() -> None:
        async with aclosing(client.rewrap_many("mixed", lazily(), window=3)) as stream:
            async for ciphertext in stream:
                got.append(ciphertext)

    with pytest.raises(BadCiphertext):
        await drain()
    assert [await client.decrypt("mixed", ct) for ct in got] == [bytes([i]) for i in range(4)]
    await client.ping()


async def test_rewrap_many_checks_its_arguments_at_the_call(short_tmp: Path) -> None:
    async with AsyncClient(short_tmp / "absent.sock") as c:
        with pytest.raises(ValueError, match="window"):
            c.rewrap_many("k", [b"x"], window=0)
        with pytest.raises(BadKeyId):
            c.rewrap_many("a\nPING", [b"x"])
        assert not c.connected


async def test_connect_reports_a_missing_daemon(short_tmp: Path) -> None:
    with pytest.raises(ConnectionFailed) as error:
        await AsyncClient.connect(short_tmp / "absent.sock")
    assert error.value.code == "CONNECTION_FAILED"


async def test_connect_opens_at_once(daemon: Daemon) -> None:
    c = await AsyncClient.connect(daemon.socket_path)
    assert c.connected
    await c.ping()
    await c.aclose()
    assert not c.connected


async def test_restart_resends_only_repeatable_requests(
    daemon: Daemon, client: AsyncClient
) -> None:
    await client.create("k")
    ciphertext = await client.encrypt("k", b"before")
    await trio.to_thread.run_sync(daemon.restart)
    assert await client.decrypt("k", ciphertext) == b"before"
    await trio.to_thread.run_sync(daemon.restart)
    # The send on the dead connection fails before the LF is delivered: safe to resend.
    assert await client.rotate("k") == 2
    assert (await client.info("k"))["latest"] == 2


async def test_concurrent_tasks_share_one_client(client: AsyncClient) -> None:
    await client.create("shared")

    async def work(worker: int) -> None:
        for i in range(100):
            plaintext = f"{worker}:{i}".encode()
            ciphertext = await client.encrypt("shared", plaintext)
            assert await client.decrypt("shared", ciphertext) == plaintext

    async with trio.open_nursery() as nursery:
        for worker in range(8):
            nursery.start_soon(work, worker)


async def test_quit_may_only_end_a_pipeline(client: AsyncClient) -> None:
    with pytest.raises(ValueError, match="QUIT"):
        await client.pipeline([Ping(), Quit(), Create("after/quit")])
    assert await client.pipeline([Ping(), Quit()]) == [None, None]
    with pytest.raises(KeyNotFound):
        await client.info("after/quit")


async def test_pipeline_of_ten_thousand(client: AsyncClient, encoded: list[Encrypt]) -> None:
    await client.create("bulk")
    requests: list[Request[Any]] = [
        Get(f"missing-{i}") if i % 100 == 99 else Encrypt("bulk", i.to_bytes(4, "big"))
        for i in range(10_000)
    ]
    results = await client.pipeline(requests)
    assert len(results) == 10_000
    assert len(encoded) == 9_900  # each payload base64-encoded once, not checked and sent
    assert all(isinstance(results[i], KeyNotFound) for i in range(99, 10_000, 100))
    sample = range(0, 10_000, 41)
    opened = await client.pipeline([Decrypt("bulk", results[i]) for i in sample if i % 100 != 99])
    assert opened == [i.to_bytes(4, "big") for i in sample if i % 100 != 99]


# ---------------------------------------------------------------------- scripted failures


async def test_timeout_drops_the_connection(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, silent) as server:
        async with AsyncClient(path, timeout=0.2) as c:
            with pytest.raises(Timeout) as error:
                await c.ping()
            assert error.value.code == "TIMEOUT"
            assert not c.connected
            with pytest.raises(Timeout):
                await c.pipeline([Ping()] * 3)
            assert not c.connected
        assert server.connections == 2


async def test_cancellation_mid_exchange_drops_the_connection(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, silent) as server:
        async with AsyncClient(path, timeout=None) as c:
            with trio.move_on_after(0.1):
                await c.ping()
            assert not c.connected  # a late PONG must not answer the next request
            with trio.move_on_after(0.1):
                await c.pipeline([Ping()] * 5)
            assert not c.connected
        assert server.connections == 2


async def test_hang_up_before_reply_retries_once_only_when_repeatable(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, hang_up_after_request) as server:
        async with AsyncClient(path) as c:
            with pytest.raises(ConnectionFailed):
                await c.ping()
            assert server.connections == 2
            with pytest.raises(ConnectionFailed):
                await c.rotate("k")
            assert server.connections == 3
            with pytest.raises(ConnectionFailed):
                await c.rekey("passphrase", "cat /new/passphrase")
            assert server.connections == 4


async def test_pipeline_resends_only_repeatable_requests(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, hang_up_first_then(lambda line: b"OK PONG\n")) as server:
        async with AsyncClient(path) as c:
            assert await c.pipeline([Ping()] * 500) == [None] * 500
            assert server.connections == 2
    with ScriptedServer(path + "2", hang_up_first_then(lambda line: b"OK 2\n")) as server:
        async with AsyncClient(path + "2") as c:
            with pytest.raises(ConnectionFailed):
                await c.pipeline([Ping(), Rotate("k")])
            assert server.connections == 1


async def test_a_pipelined_write_the_daemon_read_is_never_sent_again(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket ``send`` returns through a (shielded) checkpoint after the kernel took
    the bytes; a daemon that read the line and hung up can wake the receiver there.
    Stretched here to 50 ms so it always happens: the bytes of that send count all the
    same, and the write is not sent again on a new connection."""
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        socket_type = type(probe)
    real_send = socket_type.send

    async def send_then_dawdle(self: Any, *args: Any) -> int:
        sent: int = await real_send(self, *args)
        with trio.CancelScope(shield=True):  # as trio's own checkpoint there is
            await trio.sleep(0.05)
        return sent

    monkeypatch.setattr(socket_type, "send", send_then_dawdle)
    for request in [Rotate("k"), Create("k"), Rekey("file", "/x")]:
        path = str(short_tmp / f"{request.verb}.sock")
        with ScriptedServer(path, hang_up_first_then(lambda line: b"OK 2\n")) as server:
            async with AsyncClient(path) as c:
                with pytest.raises(ConnectionFailed, match="may have been applied"):
                    await c.pipeline([request])
            assert server.connections == 1


async def test_protocol_violations(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    replies = {b"PING": b"HELLO WORLD\n", b"HELP": b"OK A\nOK B\n", b"INFO k": b"OK [1]\n"}
    with ScriptedServer(path, reply_with(lambda line: replies[line])):
        async with AsyncClient(path) as c:
            for call in (c.ping, c.help, lambda: c.info("k")):
                with pytest.raises(ProtocolViolation):
                    await call()
                assert not c.connected


async def test_unknown_error_code(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, reply_with(lambda line: b"ERR FUTURE_CODE later\n")):
        async with AsyncClient(path) as c:
            with pytest.raises(KmsError) as error:
                await c.ping()
            assert error.value.code == "FUTURE_CODE"
            assert [r.code for r in await c.pipeline([Ping()] * 2)] == ["FUTURE_CODE"] * 2


async def test_pipeline_with_huge_replies_does_not_deadlock(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    # A client that sent everything before reading would deadlock here: 64 requests and
    # 64 replies of ~340 KiB each, far beyond the socket buffers in both directions.
    payload = b"OK " + b"QUJD" * (85 << 10) + b"\n"
    big = b"\0" * (256 << 10)
    with ScriptedServer(path, reply_with(lambda line: payload)):
        async with AsyncClient(path, timeout=5) as c:
            results = await c.pipeline([Encrypt("k", big) for _ in range(64)])
    assert len(results) == 64
    assert all(r == b"ABC" * (85 << 10) for r in results)


@pytest.mark.parametrize("pipelined", [False, True], ids=["call", "pipeline"])
async def test_aclose_under_a_call_in_flight_fails_that_call_and_never_reconnects(
    short_tmp: Path, pipelined: bool
) -> None:
    """Closing a client another task is waiting on ends that wait with ConnectionFailed.

    The in-flight request must neither reconnect behind the closer's back (leaving
    an open connection on a closed client) nor escape as a raw ExceptionGroup.
    """
    path = str(short_tmp / "s.sock")

    def silent_then_pong(conn: socket.socket, index: int) -> None:
        handler = silent if index == 0 else reply_with(lambda line: b"OK PONG\n")
        handler(conn, index)

    with ScriptedServer(path, silent_then_pong) as server:
        c = AsyncClient(path, timeout=30)
        failures: list[BaseException] = []

        async def waiting() -> None:
            try:
                if pipelined:
                    await c.pipeline([Ping()] * 3)
                else:
                    await c.ping()
            except Exception as exc:  # the test inspects what escaped
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting)
            await trio.testing.wait_all_tasks_blocked()  # its request is in flight
            with trio.fail_after(5):
                await c.aclose()
        assert len(failures) == 1
        assert type(failures[0]) is ConnectionFailed, repr(failures[0])
        assert "closed" in str(failures[0])
        assert not c.connected
        assert server.connections == 1
        with trio.fail_after(5):
            await c.ping()  # the client stays usable: a new connection
        assert server.connections == 2
        await c.aclose()


async def test_an_over_long_request_is_too_long_and_sent_once(short_tmp: Path) -> None:
    with serving(short_tmp / "d", "--max-line", "4096") as daemon:
        async with AsyncClient(daemon.socket_path) as c:
            await c.create("k")
            for size in (3_500, 2_000_000):  # caught at the end of the line, or while sending
                with pytest.raises(TooLong):
                    await c.encrypt("k", b"x" * size)
                assert await c.encrypt("k", b"fine")
        stderr = daemon.log.read_text()
    assert stderr.count('"result":"TOO_LONG"') == 2


async def test_a_full_daemon_is_unavailable_not_a_broken_connection(short_tmp: Path) -> None:
    with serving(short_tmp / "d", "--max-connections", "1") as daemon:
        async with AsyncClient(daemon.socket_path) as holder:
            await holder.ping()
            for _ in range(20):
                async with AsyncClient(daemon.socket_path) as c:
                    with pytest.raises(Unavailable):
                        await c.ping()


async def test_pipeline_after_an_idle_close_is_sent_again_even_with_a_rotate(
    short_tmp: Path,
) -> None:
    with serving(short_tmp / "d", "--idle-timeout", "0.3") as daemon:
        async with AsyncClient(daemon.socket_path) as c:
            await c.create("k")
            await trio.sleep(1.0)  # the daemon closes the idle connection
            assert await c.pipeline([Rotate("k"), Ping()]) == [2, None]
            assert (await c.info("k"))["latest"] == 2


async def test_a_full_connection_queue_is_waited_on_until_the_timeout(short_tmp: Path) -> None:
    """trio's own connect takes a refused one (EAGAIN) for a connected socket: ours retries."""
    path = str(short_tmp / "full.sock")
    with FullQueueListener(path) as listener:
        started = trio.current_time()
        with pytest.raises(Timeout):
            await AsyncClient.connect(path, timeout=0.5)
        assert trio.current_time() - started >= 0.45
        listener.serve_late()
        async with AsyncClient(path, timeout=5.0) as c:
            await c.ping()


async def test_timeout_covers_the_wait_for_other_tasks_calls(short_tmp: Path) -> None:
    """One call holds the lock for 1 s; three calls queued behind it run out of time.

    The first call has a long timeout and the queued ones a short one (a call reads
    the timeout when it starts), so each queued call runs out while the first still
    holds the lock, whatever order the queue is in.
    """
    path = str(short_tmp / "s.sock")

    def slow(line: bytes) -> bytes:
        time.sleep(1.0)
        return b"OK PONG\n"

    with ScriptedServer(path, reply_with(slow)):
        async with AsyncClient(path, timeout=5.0) as c:
            outcomes: list[str] = []

            async def call(pipelined: bool) -> None:
                try:
                    await (c.pipeline([Ping()]) if pipelined else c.ping())
                    outcomes.append("ok")
                except Timeout:
                    outcomes.append("timeout")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, False)
                await trio.testing.wait_all_tasks_blocked()  # it holds the lock
                c.timeout = 0.3
                for pipelined in (False, False, True):
                    nursery.start_soon(call, pipelined)
                with trio.fail_after(5):
                    while len(outcomes) < 3:
                        await trio.sleep(0.01)
            assert outcomes == ["timeout", "timeout", "timeout", "ok"]  # before the first ended


async def test_a_pipeline_goes_on_after_each_too_long(short_tmp: Path) -> None:
    big = b"x" * 4_000
    with serving(short_tmp / "d", "--max-line", "4096") as daemon:
        async with AsyncClient(daemon.socket_path) as c:
            await c.create("k")
            results = await c.pipeline(
                [
                    Encrypt("k", b"a"),
                    Encrypt("k", big),
                    Encrypt("k", b"b"),
                    Rotate("k"),
                    Encrypt("k", big),
                    Ping(),
                ]
            )
    assert [type(result) for result in results] == [bytes, TooLong, bytes, int, TooLong, NoneType]
    assert results[3] == 2
