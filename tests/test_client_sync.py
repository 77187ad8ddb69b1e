# The blocking Client against the real kmsd (round trips, errors, restarts, threads, pipelines)
# and against scripted servers for failures kmsd won't make on cue. Tests assert codes, not text.
from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

from kms_client import (
    BadCiphertext,
    BadKeyId,
    Client,
    ConnectionFailed,
    DataKey,
    KeyExists,
    KeyMaterial,
    KeyNotFound,
    KmsError,
    NotExportable,
    ProtocolViolation,
    Timeout,
)
from kms_client.protocol import Decrypt, Encrypt, Get, Ping, Request, Rotate
from tests.conftest import Daemon
from tests.scripted_server import (
    ScriptedServer,
    hang_up_after_request,
    hang_up_first_then,
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


def test_repeatable_request_survives_a_restart(daemon: Daemon, client: Client) -> None:
    client.create("k")
    ciphertext = client.encrypt("k", b"before")
    daemon.restart()
    assert client.decrypt("k", ciphertext) == b"before"
    daemon.restart()
    assert client.pipeline([Ping(), Encrypt("k", b"y")])[0] is None


def test_rotate_is_resent_only_when_never_delivered(daemon: Daemon, client: Client) -> None:
    client.create("k")
    daemon.restart()
    # The old connection is dead, so the send fails (EPIPE) before the line's LF
    # reaches any daemon: resending cannot apply the ROTATE twice.
    assert client.rotate("k") == 2
    assert client.info("k")["latest"] == 2
    daemon.restart()
    with pytest.raises(ConnectionFailed):
        client.pipeline([Ping(), Rotate("k")])  # a pipeline is never resent with a ROTATE in it
    assert client.info("k")["latest"] == 2


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


def test_pipeline_of_ten_thousand(client: Client) -> None:
    client.create("bulk")
    requests: list[Request[Any]] = []
    for i in range(10_000):
        if i % 100 == 99:
            requests.append(Get(f"missing-{i}"))
        else:
            requests.append(Encrypt("bulk", i.to_bytes(4, "big")))
    results = client.pipeline(requests)
    assert len(results) == 10_000
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
