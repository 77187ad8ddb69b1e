# The blocking Client against the real kmsd (round trips, errors, restarts, threads, pipelines)
# and against scripted servers for failures kmsd won't make on cue. Tests assert codes, not text.
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import NoneType
from typing import Any

import pytest

from kms_client import (
    BadCiphertext,
    BadKeyId,
    BadRequest,
    Client,
    ConnectionFailed,
    DataKey,
    KeyExists,
    KeyMaterial,
    KeyNotFound,
    KmsError,
    NotExportable,
    ProtocolViolation,
    Retired,
    Timeout,
    TooLong,
    Unavailable,
)
from kms_client.protocol import (
    Create,
    Decrypt,
    Encrypt,
    Get,
    Ping,
    Quit,
    Rekey,
    Request,
    Rewrap,
    Rotate,
)
from kms_server.crypto import random_bytes
from tests.conftest import Daemon, serving
from tests.scripted_server import (
    FullQueueListener,
    ScriptedServer,
    hang_up_after_request,
    hang_up_first_then,
    lines,
    reply_with,
    silent,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(daemon: Daemon) -> Any:
    with Client(daemon.socket_path) as c:
        yield c


# ---------------------------------------------------------------------- end to end


def test_every_method_round_trips(client: Client) -> None:
    client.ping()
    assert client.hello()
    assert {"PING", "ENC", "DEC", "DATAKEY"} <= set(client.help())

    assert client.create("app/db.main", exportable=True) == 1
    first = client.get("app/db.main")
    assert isinstance(first, KeyMaterial)
    assert (first.version, len(first.key)) == (1, 32)
    assert client.rotate("app/db.main") == 2
    assert client.get("app/db.main").version == 2
    assert client.get("app/db.main", 1) == first

    info = client.info("app/db.main")
    assert (info["key_id"], info["latest"], info["exportable"]) == ("app/db.main", 2, True)

    ciphertext = client.encrypt("app/db.main", b"\x00secret\xff", aad=b"page 7")
    assert client.decrypt("app/db.main", ciphertext, aad=b"page 7") == b"\x00secret\xff"
    assert client.decrypt("app/db.main", client.encrypt("app/db.main", b"x")) == b"x"

    data_key = client.datakey("app/db.main", nbytes=16)
    assert isinstance(data_key, DataKey)
    assert len(data_key.key) == 16
    assert client.decrypt("app/db.main", data_key.wrapped) == data_key.key
    assert len(client.datakey("app/db.main").key) == 32


def test_errors_carry_their_wire_code(client: Client) -> None:
    client.create("plain")
    ciphertext = client.encrypt("plain", b"data", aad=b"right")
    with pytest.raises(BadCiphertext) as bad:
        client.decrypt("plain", ciphertext, aad=b"wrong")
    assert bad.value.code == "BAD_CIPHERTEXT"
    with pytest.raises(BadCiphertext):
        client.decrypt("plain", ciphertext)
    with pytest.raises(NotExportable) as not_exportable:
        client.get("plain")
    assert not_exportable.value.code == "NOT_EXPORTABLE"
    with pytest.raises(KeyNotFound) as missing:
        client.get("missing")
    assert missing.value.code == "NOT_FOUND"
    with pytest.raises(KeyNotFound):
        client.encrypt("plain-v9", b"x")
    with pytest.raises(KeyExists) as exists:
        client.create("plain")
    assert exists.value.code == "EXISTS"
    with pytest.raises(KmsError) as bad_request:
        client.get("plain", 0)  # versions start at 1: the daemon refuses it
    assert bad_request.value.code == "BAD_REQUEST"
    client.ping()  # an ERR reply leaves the connection usable


@pytest.mark.parametrize("key_id", ["", "a b", "a\nROTATE b", "../etc", "é", "x" * 256, "a//b"])
def test_bad_key_ids_are_refused_before_sending(short_tmp: Path, key_id: str) -> None:
    # No daemon at this path: reaching the socket would raise ConnectionFailed instead.
    with Client(short_tmp / "absent.sock") as c:
        with pytest.raises(BadKeyId) as error:
            c.encrypt(key_id, b"x")
        assert error.value.code == "BAD_KEY_ID"
        with pytest.raises(BadKeyId):
            c.pipeline([Ping(), Get(key_id)])
        assert not c.connected


@pytest.mark.parametrize(
    "request_",
    [
        Rekey("file x\nROTATE demo", "path"),
        Rekey("file\r", "path"),
        Get("demo", "1\nPING"),  # type: ignore[arg-type]
        Encrypt("demo", b""),  # refused by the daemon too: say why here, send nothing
        Decrypt("demo", b""),
        Rewrap("demo", b""),
    ],
    ids=[
        "rekey-source-lf",
        "rekey-source-cr",
        "version-lf",
        "enc-empty",
        "dec-empty",
        "rewrap-empty",
    ],
)
def test_a_line_break_in_any_field_is_refused_before_sending(
    short_tmp: Path, request_: Request[Any]
) -> None:
    with Client(short_tmp / "absent.sock") as c:
        with pytest.raises(BadRequest):
            c.pipeline([request_])
        assert not c.connected


def test_repeatable_request_survives_a_restart(daemon: Daemon, client: Client) -> None:
    client.create("k")
    ciphertext = client.encrypt("k", b"before")
    daemon.restart()
    assert client.decrypt("k", ciphertext) == b"before"
    daemon.restart()
    pong, ciphertext = client.pipeline([Ping(), Encrypt("k", b"y")])
    assert pong is None
    assert isinstance(ciphertext, bytes)
    assert client.decrypt("k", ciphertext) == b"y"


def test_rotate_is_resent_only_when_never_delivered(daemon: Daemon, client: Client) -> None:
    client.create("k")
    daemon.restart()
    # The old connection is dead, so the send fails (EPIPE) before the line's LF
    # reaches any daemon: resending cannot apply the ROTATE twice.
    assert client.rotate("k") == 2
    assert client.info("k")["latest"] == 2
    daemon.restart()
    # The same for a pipeline: its first send fails with nothing taken, so even its ROTATE
    # is sent again (test_pipeline_resends_only_repeatable_requests: once delivered, never).
    assert client.pipeline([Ping(), Rotate("k")]) == [None, 3]
    assert client.info("k")["latest"] == 3


def test_dead_daemon_is_connection_failed(daemon: Daemon, client: Client) -> None:
    client.ping()
    daemon.kill()
    with pytest.raises(ConnectionFailed):
        client.ping()  # resent once, and the stale socket file refuses the reconnect
    with pytest.raises(ConnectionFailed):
        client.ping()


def test_missing_socket_is_connection_failed(short_tmp: Path) -> None:
    with Client(short_tmp / "absent.sock") as c, pytest.raises(ConnectionFailed) as error:
        c.ping()
    assert error.value.code == "CONNECTION_FAILED"


def test_one_client_shared_by_threads(client: Client) -> None:
    client.create("shared")
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(200):
                plaintext = f"{worker}:{i}".encode()
                aad = worker.to_bytes(2, "big")
                assert client.decrypt("shared", client.encrypt("shared", plaintext, aad), aad) == (
                    plaintext
                )
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_quit_may_only_end_a_pipeline(client: Client) -> None:
    """The daemon runs nothing after QUIT: a request behind it is refused before sending,
    not sent again on a new connection as if the daemon had gone away."""
    with pytest.raises(ValueError, match="QUIT"):
        client.pipeline([Ping(), Quit(), Create("after/quit")])
    assert client.pipeline([Ping(), Quit()]) == [None, None]
    with pytest.raises(KeyNotFound):
        client.info("after/quit")  # never created; and the client goes on, reconnected


def test_pipeline_of_ten_thousand(client: Client, encoded: list[Encrypt]) -> None:
    client.create("bulk")
    requests: list[Request[Any]] = []
    for i in range(10_000):
        if i % 100 == 99:
            requests.append(Get(f"missing-{i}"))
        else:
            requests.append(Encrypt("bulk", i.to_bytes(4, "big")))
    results = client.pipeline(requests)
    assert len(results) == 10_000
    assert len(encoded) == 9_900  # each payload base64-encoded once, not checked and sent
    for i in (99, 199, 9_999):
        assert isinstance(results[i], KeyNotFound)
    sample = [i for i in range(0, 10_000, 37) if i % 100 != 99]
    opened = client.pipeline([Decrypt("bulk", results[i]) for i in sample])
    assert opened == [i.to_bytes(4, "big") for i in sample]
    assert client.pipeline([]) == []


STDLIB_ONLY = r"""
import sys
repo, socket_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo)
BLOCKED = {
    "trio", "cryptography", "click", "pybase64", "outcome", "sniffio", "attr", "attrs",
    "idna", "sortedcontainers", "cffi", "_cffi_backend", "kms_server", "hypothesis", "pytest",
}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
        return None

sys.meta_path.insert(0, Block())
before = set(sys.modules)
import kms_client
import kms_client.sync
from kms_client import Client, KeyNotFound

with Client(socket_path) as client:
    client.ping()
    client.create("stdlib")
    assert client.decrypt("stdlib", client.encrypt("stdlib", b"x" * 1000)) == b"x" * 1000
    try:
        client.info("nope")
    except KeyNotFound:
        pass
    else:
        raise AssertionError("INFO of a missing key did not raise KeyNotFound")
new = {name.partition(".")[0] for name in set(sys.modules) - before}
outside = sorted(new - set(sys.stdlib_module_names) - {"kms_client"})
assert not outside, outside
try:
    kms_client.AsyncClient
except ImportError:
    pass
else:
    raise AssertionError("AsyncClient imported with trio blocked")
print("stdlib only")
"""


# ---------------------------------------------------------------------- key life cycle

DAY = 86400


def states(client: Client, key_id: str) -> list[str]:
    return [entry["state"] for entry in client.info(key_id)["versions"]]


def test_lifecycle_methods_round_trip(client: Client) -> None:
    assert client.create("life", exportable=True, rotate_period=90 * DAY) == 1
    assert client.info("life")["rotate_period"] == 90 * DAY
    old = client.encrypt("life", b"row 1", aad=b"t=1")
    key1 = client.get("life", 1)
    assert client.rotate("life") == 2

    new = client.rewrap("life", old, aad=b"t=1")
    assert new[1:5] == (2).to_bytes(4, "big")  # now under version 2
    assert client.decrypt("life", new, aad=b"t=1") == b"row 1"
    with pytest.raises(BadCiphertext):
        client.rewrap("life", old)  # the AAD is part of what REWRAP must open

    client.retire("life", 1)
    client.retire("life", 1)  # idempotent
    assert states(client, "life") == ["retired", "active"]
    for call in (
        lambda: client.decrypt("life", old, aad=b"t=1"),
        lambda: client.rewrap("life", old, aad=b"t=1"),
        lambda: client.get("life", 1),
    ):
        with pytest.raises(Retired) as retired:
            call()
        assert retired.value.code == "RETIRED"
    client.restore("life", 1)
    client.restore("life", 1)  # idempotent
    assert client.decrypt("life", old, aad=b"t=1") == b"row 1"
    assert client.get("life", 1) == key1  # the same material came back

    with pytest.raises(BadRequest):
        client.destroy("life", 2)  # the latest version
    client.destroy("life", 1)
    client.destroy("life", 1)  # idempotent
    assert states(client, "life") == ["destroyed", "active"]
    assert "created" not in client.info("life")["versions"][0]
    with pytest.raises(Retired):
        client.restore("life", 1)
    with pytest.raises(Retired):
        client.decrypt("life", old, aad=b"t=1")
    assert client.decrypt("life", new, aad=b"t=1") == b"row 1"

    client.configure("life", 3600)
    assert client.info("life")["rotate_period"] == 3600
    client.configure("life", 45)
    assert client.info("life")["rotate_period"] == 45
    client.configure("life", None)
    assert client.info("life")["rotate_period"] is None
    with pytest.raises(BadRequest):
        client.configure("life", 0)
    with pytest.raises(BadRequest):
        client.configure("life", 101 * 365 * DAY)
    for missing in (
        lambda: client.retire("nope", 1),
        lambda: client.restore("life", 9),
        lambda: client.destroy("life", 9),
        lambda: client.configure("nope", None),
        lambda: client.rewrap("nope", old),
    ):
        with pytest.raises(KeyNotFound):
            missing()


def test_retiring_the_latest_version_stops_encryption(client: Client) -> None:
    client.create("frozen")
    client.retire("frozen", 1)
    with pytest.raises(Retired):
        client.encrypt("frozen", b"x")
    with pytest.raises(Retired):
        client.datakey("frozen")
    assert client.rotate("frozen") == 2
    assert client.decrypt("frozen", client.encrypt("frozen", b"x")) == b"x"


def test_rewrap_many_streams_in_order_with_progress(client: Client) -> None:
    client.create("table")
    rows = [f"row {i}".encode() for i in range(50)]
    old = [client.encrypt("table", row, aad=b"tbl") for row in rows]
    client.rotate("table")
    calls: list[tuple[int, int | None]] = []
    new = list(
        client.rewrap_many(
            "table",
            old,
            aad=b"tbl",
            progress=lambda done, total: calls.append((done, total)),
            window=7,
        )
    )
    assert [ct[1:5] for ct in new] == [(2).to_bytes(4, "big")] * 50
    assert client.pipeline([Decrypt("table", ct, b"tbl") for ct in new]) == rows
    assert calls == [(n, 50) for n in (7, 14, 21, 28, 35, 42, 49, 50)]
    assert list(client.rewrap_many("table", [])) == []


def test_rewrap_many_reads_its_input_lazily(client: Client) -> None:
    client.create("lazy")
    old = [client.encrypt("lazy", bytes([i])) for i in range(20)]
    pulled = 0

    def source() -> Iterator[bytes]:
        nonlocal pulled
        for ciphertext in old:
            pulled += 1
            yield ciphertext

    calls: list[tuple[int, int | None]] = []
    stream = client.rewrap_many(
        "lazy", source(), progress=lambda done, total: calls.append((done, total)), window=8
    )
    assert pulled == 0  # nothing happens before the first result is asked for
    first = next(stream)
    assert pulled == 8  # one window ahead, not the whole input
    rest = list(stream)
    assert [client.decrypt("lazy", ct) for ct in [first, *rest]] == [bytes([i]) for i in range(20)]
    assert calls == [(8, None), (16, None), (20, None)]  # a generator has no length


def test_rewrap_many_stops_at_the_first_failure(client: Client) -> None:
    client.create("mixed")
    good = [client.encrypt("mixed", bytes([i])) for i in range(10)]
    client.create("other")  # a ciphertext of another key is BAD_CIPHERTEXT here
    inputs = [*good[:5], client.encrypt("other", b"x"), *good[5:]]
    got: list[bytes] = []
    stream = client.rewrap_many("mixed", inputs, window=4)
    with pytest.raises(BadCiphertext):
        got.extend(stream)
    assert len(got) == 5  # every row before the failing one, and none after
    assert [client.decrypt("mixed", ct) for ct in got] == [bytes([i]) for i in range(5)]
    client.ping()  # the connection is still usable


def test_rewrap_many_checks_its_arguments_at_the_call(short_tmp: Path) -> None:
    with Client(short_tmp / "absent.sock") as c:
        with pytest.raises(ValueError, match="window"):
            c.rewrap_many("k", [b"x"], window=0)
        with pytest.raises(BadKeyId):
            c.rewrap_many("bad key", [b"x"])
        assert not c.connected


def test_rewrap_many_of_thousands_after_rotation(client: Client) -> None:
    client.create("bulk")
    rows = [i.to_bytes(4, "big") * 8 for i in range(3000)]
    sealed = client.pipeline([Encrypt("bulk", row, b"bulk") for row in rows])
    client.rotate("bulk")
    new = list(client.rewrap_many("bulk", sealed, aad=b"bulk"))
    client.retire("bulk", 1)  # the old version is no longer needed
    assert client.pipeline([Decrypt("bulk", ct, b"bulk") for ct in new]) == rows
    versions = client.info("bulk")["versions"]
    assert (versions[0]["decryptions"], versions[1]["encryptions"]) == (3000, 3000)


def test_usage_counters_survive_a_restart(daemon: Daemon, client: Client) -> None:
    client.create("counted")
    for _ in range(3):
        client.decrypt("counted", client.encrypt("counted", b"12345"))
    client.datakey("counted", 16)
    expected = {"encryptions": 4, "decryptions": 3, "bytes": 3 * 5 * 2 + 16}
    entry = client.info("counted")["versions"][0]
    assert {name: entry[name] for name in expected} == expected
    daemon.restart()  # SIGTERM: the daemon writes the counters before it exits
    entry = client.info("counted")["versions"][0]
    assert {name: entry[name] for name in expected} == expected


def test_counters_are_flushed_while_serving(short_tmp: Path) -> None:
    with serving(short_tmp / "d", "--counter-flush-interval", "0.2") as started:
        with Client(started.socket_path) as c:
            c.create("flushed")
            c.encrypt("flushed", b"abc")
            time.sleep(0.5)  # a flush has started since (every 0.2 s)
            c.create("barrier")  # queued behind that flush's write, however slow its fsync
        started.kill()  # no shutdown flush: only what was flushed survives
        started.start()
        with Client(started.socket_path) as c:
            entry = c.info("flushed")["versions"][0]
    assert (entry["encryptions"], entry["bytes"]) == (1, 3)


def test_automatic_rotation_and_turning_it_off(short_tmp: Path) -> None:
    with (
        serving(short_tmp / "d", "--rotation-check-interval", "0.2") as started,
        Client(started.socket_path) as c,
    ):
        c.create("auto", rotate_period=1)
        deadline = time.monotonic() + 10
        while c.info("auto")["latest"] < 2:
            assert time.monotonic() < deadline, "no automatic rotation within 10 s"
            time.sleep(0.1)
        c.configure("auto", None)
        time.sleep(0.5)  # a rotation already due when CONFIG ran may still finish
        latest = c.info("auto")["latest"]
        time.sleep(1.5)
        assert c.info("auto")["latest"] == latest
        assert c.info("auto")["rotate_period"] is None


def test_rekey_through_the_daemon(daemon: Daemon, client: Client) -> None:
    client.create("kept")
    sealed = client.encrypt("kept", b"before the rekey")
    new_kek = daemon.root / "kek.new"
    new_kek.write_bytes(random_bytes(32).hex().encode())
    new_kek.chmod(0o600)
    with pytest.raises(BadRequest):
        client.rekey("file", str(daemon.root / "missing"))
    with pytest.raises(BadRequest):
        client.rekey("vault", "x")
    generation = client.rekey("file", str(new_kek))
    assert generation == 2  # a fresh store is generation 1
    assert client.decrypt("kept", sealed) == b"before the rekey"
    client.create("after")
    daemon.stop()
    daemon.kek_file.write_bytes(new_kek.read_bytes())  # the next start needs the new KEK
    daemon.start()
    assert client.decrypt("kept", sealed) == b"before the rekey"
    assert client.rotate("after") == 2


def test_client_needs_only_the_standard_library(daemon: Daemon) -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-c", STDLIB_ONLY, str(REPO), daemon.socket_path],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"stdlib only\n"


# ---------------------------------------------------------------------- scripted failures


def test_timeout_drops_the_connection(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, silent) as server, Client(path, timeout=0.2) as c:
        with pytest.raises(Timeout) as error:
            c.ping()
        assert error.value.code == "TIMEOUT"
        assert not c.connected
        with pytest.raises(Timeout):
            c.pipeline([Ping()] * 3)
        assert server.connections == 2


def test_garbage_reply_is_a_protocol_violation(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    replies = {b"PING": b"HELLO WORLD\n", b"HELLO": b"OK KMS/9 1.0\n", b"HELP": b"OK A\nOK B\n"}
    with ScriptedServer(path, reply_with(lambda line: replies[line])) as server:
        with Client(path) as c:
            for call in (c.ping, c.hello, c.help):
                with pytest.raises(ProtocolViolation) as error:
                    call()
                assert error.value.code == "PROTOCOL_VIOLATION"
                assert not c.connected
        assert server.connections == 3


def test_unknown_error_code_is_a_plain_kms_error(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    answer = reply_with(lambda line: b"ERR FUTURE_CODE from v2\n")
    with ScriptedServer(path, answer), Client(path) as c:
        with pytest.raises(KmsError) as error:
            c.ping()
        assert error.value.code == "FUTURE_CODE"
        assert c.connected
        assert [r.code for r in c.pipeline([Ping(), Ping()])] == ["FUTURE_CODE"] * 2


def test_hang_up_before_reply_retries_once_only_when_repeatable(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, hang_up_after_request) as server, Client(path) as c:
        with pytest.raises(ConnectionFailed):
            c.ping()
        assert server.connections == 2
        with pytest.raises(ConnectionFailed):
            c.rotate("k")
        assert server.connections == 3
        with pytest.raises(ConnectionFailed):
            c.rekey("file", "/new/kek")  # REKEY is not repeatable either
        assert server.connections == 4
        with pytest.raises(ConnectionFailed):
            c.retire("k", 1)  # idempotent, so resent once
        assert server.connections == 6


def test_pipeline_resends_only_repeatable_requests(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, hang_up_first_then(lambda line: b"OK PONG\n")) as server:
        with Client(path) as c:
            assert c.pipeline([Ping()] * 500) == [None] * 500
        assert server.connections == 2
    with ScriptedServer(path + "2", hang_up_first_then(lambda line: b"OK 2\n")) as server:
        with Client(path + "2") as c, pytest.raises(ConnectionFailed):
            c.pipeline([Ping(), Rotate("k")])
        assert server.connections == 1


def test_pipeline_after_an_idle_close_is_sent_again_even_with_a_rotate(short_tmp: Path) -> None:
    with (
        serving(short_tmp / "d", "--idle-timeout", "0.3") as daemon,
        Client(daemon.socket_path) as c,
    ):
        c.create("k")
        time.sleep(1.0)  # the daemon closes the idle connection
        assert c.pipeline([Rotate("k"), Ping()]) == [2, None]
        assert c.info("k")["latest"] == 2


def test_an_over_long_request_is_too_long_and_sent_once(short_tmp: Path) -> None:
    """The daemon answers ERR TOO_LONG and closes while the client is still sending: the
    reply it left behind is the answer; the request is not sent a second time."""
    with serving(short_tmp / "d", "--max-line", "4096") as daemon:
        with Client(daemon.socket_path) as c:
            c.create("k")
            for size in (3_500, 2_000_000):  # caught at the end of the line, or while sending
                with pytest.raises(TooLong):
                    c.encrypt("k", b"x" * size)
                assert c.encrypt("k", b"fine")  # and the client goes on, on a new connection
        stderr = daemon.log.read_text()
    assert stderr.count('"result":"TOO_LONG"') == 2


def test_a_pipeline_goes_on_after_each_too_long(short_tmp: Path) -> None:
    big = b"x" * 4_000
    with serving(short_tmp / "d", "--max-line", "4096") as daemon, Client(daemon.socket_path) as c:
        c.create("k")
        results = c.pipeline(
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


def test_a_full_daemon_is_unavailable_not_a_broken_connection(short_tmp: Path) -> None:
    with (
        serving(short_tmp / "d", "--max-connections", "1") as daemon,
        Client(daemon.socket_path) as holder,
    ):
        holder.ping()
        for _ in range(20):
            with Client(daemon.socket_path) as c, pytest.raises(Unavailable):
                c.ping()


def test_a_full_connection_queue_is_waited_on_until_the_timeout(short_tmp: Path) -> None:
    """A listener that never accepts: once its queue is full, connect() refuses at once
    (EAGAIN), and the client keeps trying for its timeout instead of failing at once."""
    path = str(short_tmp / "full.sock")
    with FullQueueListener(path) as listener:
        started = time.monotonic()
        with Client(path, timeout=0.5) as c, pytest.raises(Timeout):
            c.ping()
        assert time.monotonic() - started >= 0.45
        listener.serve_late()  # the server starts accepting while the client waits
        with Client(path, timeout=5.0) as c:
            c.ping()


def test_timeout_covers_the_wait_for_another_threads_call(short_tmp: Path) -> None:
    """One call holds the lock for 1 s; three calls queued behind it run out of time.

    The first call has a long timeout and the queued ones a short one (a call reads
    the timeout when it starts), so each queued call runs out while the first still
    holds the lock, whichever thread the lock would favour.
    """
    path = str(short_tmp / "s.sock")
    arrived = threading.Event()

    def slow(line: bytes) -> bytes:
        arrived.set()
        time.sleep(1.0)
        return b"OK PONG\n"

    with ScriptedServer(path, reply_with(slow)), Client(path, timeout=5.0) as c:
        outcomes: list[str] = []

        def call() -> None:
            try:
                c.ping()
                outcomes.append("ok")
            except Timeout:
                outcomes.append("timeout")

        threads = [threading.Thread(target=call) for _ in range(4)]
        threads[0].start()
        assert arrived.wait(10)  # the first call holds the lock
        c.timeout = 0.3
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcomes == ["timeout", "timeout", "timeout", "ok"]  # before the first ended


def test_close_cuts_a_call_in_flight_in_another_thread(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    arrived = threading.Event()

    def read_and_never_answer(conn: socket.socket, index: int) -> None:
        for _ in lines(conn):
            arrived.set()

    with ScriptedServer(path, read_and_never_answer) as server:
        c = Client(path, timeout=None)
        failures: list[BaseException] = []

        def stuck() -> None:
            try:
                c.rotate("k")
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=stuck)
        thread.start()
        assert arrived.wait(10)  # the ROTATE is in flight
        started = time.monotonic()
        c.close()
        assert time.monotonic() - started < 3.0
        thread.join(5.0)
        assert not thread.is_alive()
        assert [type(f) for f in failures] == [ConnectionFailed]
        assert "may have been applied" in str(failures[0])
        assert server.connections == 1  # cut, and not reconnected


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.get(b"k"), id="bytes-key-id"),
        pytest.param(lambda c: c.get(5), id="int-key-id"),
        pytest.param(lambda c: c.encrypt("k", "text"), id="str-plaintext"),
        pytest.param(lambda c: c.create("k", False, "90d"), id="str-period"),
        pytest.param(lambda c: c.pipeline([Get(b"k")]), id="pipelined-bytes-key-id"),  # type: ignore[arg-type]
    ],
)
def test_an_argument_of_the_wrong_type_is_a_type_error(short_tmp: Path, call: Any) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, reply_with(lambda line: b"OK\n")) as server, Client(path) as c:
        with pytest.raises(TypeError):
            call(c)
        assert server.connections == 0  # refused before anything was sent


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf, 1e10])
def test_a_timeout_out_of_range_is_refused_at_once(timeout: float) -> None:
    """NaN, infinity or centuries would fail deep in a call (a lock or socket timeout
    overflows): the client refuses them when made, with a ValueError."""
    with pytest.raises(ValueError, match="timeout"):
        Client("/nonexistent.sock", timeout)


def test_pipeline_with_huge_replies_does_not_deadlock(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    # A client that sent everything before reading would deadlock here: 64 requests and
    # 64 replies of ~340 KiB each, far beyond the socket buffers in both directions.
    payload = b"OK " + b"QUJD" * (85 << 10) + b"\n"
    big = b"\0" * (256 << 10)
    with ScriptedServer(path, reply_with(lambda line: payload)), Client(path, timeout=5) as c:
        results = c.pipeline([Encrypt("k", big) for _ in range(64)])
    assert len(results) == 64
    assert all(r == b"ABC" * (85 << 10) for r in results)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_opens_its_own_connection(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, reply_with(lambda line: b"OK PONG\n")) as server, Client(path) as c:
        c.ping()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads alive
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            status = 1
            try:
                c.ping()
                status = 0
            finally:
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0
        assert server.connections == 2  # the child did not borrow the parent's connection
        c.ping()
        assert server.connections == 2  # and the parent's connection survived the child


def test_stale_socket_file_is_connection_failed(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    with ScriptedServer(path, silent):
        pass  # bound and closed: the file stays, nobody listens
    with Client(path) as c, pytest.raises(ConnectionFailed):
        c.ping()
