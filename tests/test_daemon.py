# A real kmsd subprocess on a real Unix socket: tampering, crashes, hostile input, limits, signals.
# Assertions are on wire codes and exit codes; message text is only checked for being one safe line.
from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kms_server.crypto import random_bytes
from tests.conftest import KMSD, Daemon, make_store
from tests.users import Conn, ask, b64

CODES = {
    b"BAD_REQUEST",
    b"UNKNOWN_COMMAND",
    b"TOO_LONG",
    b"BAD_KEY_ID",
    b"NOT_FOUND",
    b"EXISTS",
    b"NOT_EXPORTABLE",
    b"DENIED",
    b"BAD_CIPHERTEXT",
    b"UNAVAILABLE",
    b"INTERNAL",
}


def ok(reply: bytes) -> list[bytes]:
    assert reply.startswith(b"OK"), reply
    return reply.split(b" ")[1:]


def code(reply: bytes) -> bytes:
    assert reply.startswith(b"ERR "), reply
    error_code = reply.split(b" ")[1]
    assert error_code in CODES
    return error_code


def pipeline(socket_path: str, lines: list[bytes], timeout: float = 30.0) -> list[bytes]:
    """Send every line in ONE write from a thread while this thread reads every reply."""
    payload = b"".join(line + b"\n" for line in lines)
    errors: list[BaseException] = []
    with Conn(socket_path, timeout) as conn:

        def write() -> None:
            try:
                conn.send(payload)
            except OSError as exc:
                errors.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            replies = [conn.reply() for _ in lines]
        finally:
            writer.join(timeout)
    assert not errors
    return replies


def wait_exit(daemon: Daemon, timeout: float = 15.0) -> int:
    assert daemon.process is not None
    returncode = daemon.process.wait(timeout)
    daemon.process = None
    return returncode


def assert_one_safe_line(stderr: bytes) -> None:
    text = stderr.decode()
    assert text.endswith("\n")
    assert text.count("\n") == 1, text
    assert "Traceback" not in text


@pytest.fixture
def start_daemon(short_tmp: Path) -> Iterator[Callable[..., Daemon]]:
    """Start extra daemons (own store, own socket) with extra `kmsd serve` arguments."""
    started: list[Daemon] = []

    def start(*extra_args: str, name: str = "x") -> Daemon:
        daemon = make_store(short_tmp / name)
        daemon.extra_args = list(extra_args)
        started.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in started:
        daemon.discard()


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    """One daemon for the many cheap hostile-line cases (starting one costs ~0.3 s)."""
    root = Path(tempfile.mkdtemp(prefix="kms-", dir="/tmp"))
    running = make_store(root / "d")
    running.start()
    try:
        yield running
    finally:
        running.discard()
        shutil.rmtree(root, ignore_errors=True)


def serve_command(store: Path, socket_path: str, kek_file: Path) -> list[str]:
    return [
        *KMSD,
        "serve",
        "--store",
        str(store),
        "--socket",
        socket_path,
        "--kek-file",
        str(kek_file),
    ]


# --------------------------------------------------------------------------- tampering


def flipped(data: bytes, index: int, mask: int) -> bytes:
    damaged = bytearray(data)
    damaged[index] ^= mask
    return bytes(damaged)


def test_every_byte_of_a_ciphertext_flipped_is_bad_ciphertext(shared_daemon: Daemon) -> None:
    daemon = shared_daemon
    path = daemon.socket_path
    assert ask(path, b"CREATE app/db") == b"OK 1"
    assert ask(path, b"CREATE other") == b"OK 1"
    aad = b"row 42"
    cases = [
        (b"ENC app/db " + b64(b"attack at dawn"), b""),
        (b"ENC app/db " + b64(b"attack at dawn") + b" " + b64(aad), aad),
    ]
    samples: list[tuple[bytes, bytes]] = []
    for request, request_aad in cases:
        samples.append((base64.b64decode(ok(ask(path, request))[0]), request_aad))
    assert ask(path, b"ROTATE app/db") == b"OK 2"
    assert ask(path, b"ROTATE app/db") == b"OK 3"
    for request, request_aad in cases:  # now under version 3: a flip may name version 2
        samples.append((base64.b64decode(ok(ask(path, request))[0]), request_aad))

    for ciphertext, request_aad in samples:
        suffix = b" " + b64(request_aad) if request_aad else b""
        lines = [
            b"DEC app/db " + b64(flipped(ciphertext, index, mask)) + suffix
            for index in range(len(ciphertext))
            for mask in (0x01, 0xFF)
        ]
        lines += [
            b"DEC app/db " + b64(ciphertext[:length]) + suffix
            for length in range(1, len(ciphertext))
        ]
        lines += [
            b"DEC app/db " + b64(ciphertext + b"\x00") + suffix,
            b"DEC app/db " + b64(ciphertext) + b" " + b64(request_aad + b"x"),
            b"DEC other " + b64(ciphertext) + suffix,
        ]
        if request_aad:
            lines.append(b"DEC app/db " + b64(ciphertext))
        lines.append(b"DEC app/db " + b64(ciphertext) + suffix)  # the intact one, last
        replies = pipeline(path, lines)
        assert all(code(reply) == b"BAD_CIPHERTEXT" for reply in replies[:-1])
        assert base64.b64decode(ok(replies[-1])[0]) == b"attack at dawn"
        # One indistinguishable error: the very same line every time.
        assert len(set(replies[:-1])) == 1


def test_key_file_moved_to_another_key_id_is_refused(daemon: Daemon) -> None:
    path = daemon.socket_path
    assert ask(path, b"CREATE a exportable") == b"OK 1"
    assert ask(path, b"CREATE b exportable") == b"OK 1"
    ciphertext = ok(ask(path, b"ENC a " + b64(b"payload")))[0]
    material = ok(ask(path, b"GET a"))[1]
    b_material = ok(ask(path, b"GET b"))[1]
    assert wait_exit_after(daemon, signal.SIGTERM) == 0

    keys = daemon.store / "live" / "keys"
    (keys / "c").mkdir(mode=0o700)
    os.rename(keys / "a" / "_v1.key", keys / "c" / "_v1.key")
    shutil.copyfile(keys / "b" / "_v1.key", keys / "b" / "_v2.key")
    daemon.start()
    replies = pipeline(
        path,
        [
            b"DEC c " + ciphertext,
            b"GET c",
            b"GET c 1",
            b"ENC c " + b64(b"x"),
            b"INFO c",
            b"DATAKEY c",
            b"GET b 2",
            b"GET b",
            b"GET b 1",
            b"DEC a " + ciphertext,
        ],
    )
    assert [code(reply) for reply in replies[:8]] == [b"INTERNAL"] * 8
    assert ok(replies[8]) == [b"1", b_material]
    assert code(replies[9]) == b"INTERNAL"  # a's state still names version 1: damage, not absence
    for reply in replies:
        assert material not in reply
    assert ask(path, b"PING") == b"OK PONG"


def wait_exit_after(daemon: Daemon, sig: int) -> int:
    assert daemon.process is not None
    daemon.process.send_signal(sig)
    return wait_exit(daemon)


def test_wrong_kek_exits_3_before_the_socket_exists(short_tmp: Path) -> None:
    daemon = make_store(short_tmp / "d")
    wrong = random_bytes(32).hex()
    daemon.kek_file.write_text(wrong + "\n")
    result = subprocess.run(daemon.command(), capture_output=True, timeout=30, check=False)
    assert result.returncode == 3
    assert not os.path.lexists(daemon.socket_path)
    assert_one_safe_line(result.stderr)
    assert wrong.encode() not in result.stderr


# --------------------------------------------------------------------------- crashes


def rotate_until_killed(
    socket_path: str,
    acknowledged: list[int],
    records: list[tuple[int, bytes, bytes]],
    failures: list[BaseException],
) -> None:
    """ROTATE, then ENC under the new version, until the daemon dies."""
    try:
        with Conn(socket_path) as conn:
            while True:
                version = int(ok(conn.ask(b"ROTATE crash"))[0])
                acknowledged.append(version)
                plaintext = b"v%d:" % version + os.urandom(8)
                ciphertext = base64.b64decode(ok(conn.ask(b"ENC crash " + b64(plaintext)))[0])
                assert int.from_bytes(ciphertext[1:5], "big") == version
                records.append((version, plaintext, ciphertext))
    except (EOFError, ConnectionError):
        return
    except BaseException as exc:
        failures.append(exc)


@pytest.mark.slow
def test_sigkill_during_rotate_loop_loses_no_acknowledged_version(daemon: Daemon) -> None:
    path = daemon.socket_path
    assert ask(path, b"CREATE crash") == b"OK 1"
    acknowledged: list[int] = [1]
    records: list[tuple[int, bytes, bytes]] = []
    rng = random.Random()
    for _ in range(5):
        failures: list[BaseException] = []
        worker = threading.Thread(
            target=rotate_until_killed, args=(path, acknowledged, records, failures)
        )
        worker.start()
        time.sleep(rng.uniform(0.05, 0.5))
        daemon.kill()
        worker.join(10)
        assert not worker.is_alive()
        assert not failures, failures
        assert os.path.lexists(path)  # the stale socket SIGKILL leaves; start() must cope
        daemon.start()
        info = json.loads(ok(ask(path, b"INFO crash"))[0])
        versions = [entry["version"] for entry in info["versions"]]
        assert versions == list(range(1, info["latest"] + 1))
        assert set(acknowledged) <= set(versions)
        replies = pipeline(path, [b"DEC crash " + b64(ct) for _, _, ct in records])
        assert [base64.b64decode(ok(reply)[0]) for reply in replies] == [
            plaintext for _, plaintext, _ in records
        ]
    assert len(acknowledged) > 5, "too few rotations acknowledged to mean anything"


def test_create_and_rotate_write_private_version_files(shared_daemon: Daemon) -> None:
    path = shared_daemon.socket_path
    assert ask(path, b"CREATE pg/cluster1/wal") == b"OK 1"
    assert ask(path, b"ROTATE pg/cluster1/wal") == b"OK 2"
    assert code(ask(path, b"CREATE pg/cluster1/wal")) == b"EXISTS"
    keys = shared_daemon.store / "live" / "keys"
    directory = keys / "pg" / "cluster1" / "wal"
    assert sorted(os.listdir(directory)) == ["_state.seal", "_v1.key", "_v2.key"]
    for name in ("_state.seal", "_v1.key", "_v2.key"):
        assert stat.S_IMODE(os.lstat(directory / name).st_mode) == 0o600
    for level in (keys / "pg", keys / "pg" / "cluster1", directory):
        assert stat.S_IMODE(os.lstat(level).st_mode) == 0o700
    assert list(shared_daemon.store.rglob(".tmp*")) == []


def test_acknowledged_create_and_rotate_survive_sigkill(daemon: Daemon) -> None:
    path = daemon.socket_path
    with Conn(path) as conn:
        assert conn.ask(b"CREATE durable exportable") == b"OK 1"
        assert conn.ask(b"ROTATE durable") == b"OK 2"
        ciphertext = ok(conn.ask(b"ENC durable " + b64(b"kept")))[0]
        material = ok(conn.ask(b"GET durable"))
        daemon.kill()
    daemon.start()
    assert ok(ask(path, b"GET durable")) == material
    assert base64.b64decode(ok(ask(path, b"DEC durable " + ciphertext))[0]) == b"kept"


# --------------------------------------------------------------------------- pipelining, hostility


def test_ten_thousand_pipelined_requests_in_one_write(shared_daemon: Daemon) -> None:
    daemon = shared_daemon
    path = daemon.socket_path
    assert ask(path, b"CREATE pipe") == b"OK 1"
    count = 10_000
    lines = [
        b"PING" if index % 2 else b"ENC pipe " + b64(index.to_bytes(4, "big"))
        for index in range(count)
    ]
    replies = pipeline(path, lines)
    assert len(replies) == count
    assert all(reply == b"OK PONG" for reply in replies[1::2])
    ciphertexts = [ok(reply)[0] for reply in replies[0::2]]
    plaintexts = pipeline(path, [b"DEC pipe " + ct for ct in ciphertexts])
    assert [int.from_bytes(base64.b64decode(ok(reply)[0]), "big") for reply in plaintexts] == list(
        range(0, count, 2)
    )


HOSTILE_LINES = [
    pytest.param(b"", b"BAD_REQUEST", id="empty"),
    pytest.param(b"\r", b"BAD_REQUEST", id="cr-only"),
    pytest.param(b" ", b"BAD_REQUEST", id="space"),
    pytest.param(b"\x00", b"UNKNOWN_COMMAND", id="nul"),
    pytest.param(b"PING\x00", b"UNKNOWN_COMMAND", id="nul-after-verb"),
    pytest.param(b"P\x00ING", b"UNKNOWN_COMMAND", id="nul-in-verb"),
    pytest.param(b"GET k\x00ey", b"BAD_KEY_ID", id="nul-in-key-id"),
    pytest.param(b"ENC hostile \x00AAA", b"BAD_REQUEST", id="nul-in-base64"),
    pytest.param("PİNG".encode(), b"BAD_REQUEST", id="utf8-verb"),
    pytest.param("GET ключ".encode(), b"BAD_KEY_ID", id="utf8-key-id"),
    pytest.param(b"\xff", b"BAD_REQUEST", id="byte-ff"),
    pytest.param(b"PING \xff\xfe", b"BAD_REQUEST", id="ff-argument"),
    pytest.param(b"\xff" * 1000, b"BAD_REQUEST", id="ff-run"),
    pytest.param(b"PING ", b"BAD_REQUEST", id="trailing-space"),
    pytest.param(b"PING  x", b"BAD_REQUEST", id="double-space"),
    pytest.param(b"\tPING", b"UNKNOWN_COMMAND", id="tab"),
    pytest.param(b"GET ../etc", b"BAD_KEY_ID", id="dotdot"),
    pytest.param(b"GET /abs", b"BAD_KEY_ID", id="absolute"),
    pytest.param(b"GET a//b", b"BAD_KEY_ID", id="empty-segment"),
    pytest.param(b"GET " + b"k" * 256, b"BAD_KEY_ID", id="key-id-256"),
    pytest.param(b"ENC hostile !!!!", b"BAD_REQUEST", id="bad-base64"),
    pytest.param(b"ENC hostile QQ", b"BAD_REQUEST", id="unpadded-base64"),
    pytest.param(b"GET hostile 0", b"BAD_REQUEST", id="version-0"),
    pytest.param(b"GET hostile 99999999999", b"BAD_REQUEST", id="version-huge"),
    pytest.param(b"\x1b[2J", b"UNKNOWN_COMMAND", id="escape"),
]
HOSTILE: list[bytes] = [param.values[0] for param in HOSTILE_LINES]  # type: ignore[misc]
EXPECTED: list[bytes] = [param.values[1] for param in HOSTILE_LINES]  # type: ignore[misc]


@pytest.mark.parametrize(("line", "expected"), HOSTILE_LINES)
def test_hostile_line_gets_err_and_the_connection_stays_usable(
    shared_daemon: Daemon, line: bytes, expected: bytes
) -> None:
    assert shared_daemon.process is not None
    assert shared_daemon.process.poll() is None
    with Conn(shared_daemon.socket_path) as conn:
        conn.send(line + b"\n" + b"PING\n")
        assert code(conn.reply()) == expected
        assert conn.reply() == b"OK PONG"
        assert conn.ask(b"HELLO").startswith(b"OK KMS/1 ")


def test_all_hostile_lines_pipelined(shared_daemon: Daemon) -> None:
    assert len(HOSTILE) == len(HOSTILE_LINES)
    replies = pipeline(shared_daemon.socket_path, [*HOSTILE, b"PING"])
    assert [code(reply) for reply in replies[:-1]] == EXPECTED
    assert replies[-1] == b"OK PONG"


def huge_line_is_refused(socket_path: str, line: bytes) -> None:
    """Send ``line`` from a thread; expect ERR TOO_LONG, then the daemon closes."""
    with Conn(socket_path) as conn:

        def write() -> None:
            with contextlib.suppress(OSError):  # the daemon closes while we still send
                conn.send(line)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            assert code(conn.reply()) == b"TOO_LONG"
            started = time.monotonic()
            conn.read_until_closed()
            assert time.monotonic() - started < 5.0
        finally:
            with contextlib.suppress(OSError):  # unblocks the writer, if still sending
                conn.sock.shutdown(socket.SHUT_RDWR)
            writer.join(10)


def test_two_mebibyte_line_is_too_long_and_closes(shared_daemon: Daemon) -> None:
    daemon = shared_daemon
    huge_line_is_refused(daemon.socket_path, b"ENC k " + b"A" * (2 << 20) + b"\n")
    huge_line_is_refused(daemon.socket_path, b"\x00\xff" * (1 << 20))  # no LF at all
    assert ask(daemon.socket_path, b"PING") == b"OK PONG"


def test_small_max_line_boundary(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("--max-line", "100")
    path = daemon.socket_path
    at_limit = b"CREATE " + b"k" * 93
    assert len(at_limit) == 100
    with Conn(path) as conn:
        assert conn.ask(at_limit) == b"OK 1"
        assert code(conn.ask(b"GET " + b"k" * 96)) == b"NOT_FOUND"
        assert code(conn.ask(b"GET " + b"k" * 96 + b"\r")) == b"NOT_FOUND"  # CR not counted
        assert conn.ask(b"PING") == b"OK PONG"
        assert code(conn.ask(b"GET " + b"k" * 97)) == b"TOO_LONG"
        assert conn.read_until_closed() == b""
    huge_line_is_refused(path, b"P" * 200)  # too long before any LF arrives
    assert ask(path, b"PING") == b"OK PONG"


def test_vanishing_clients_do_not_disturb_others(shared_daemon: Daemon) -> None:
    daemon = shared_daemon
    path = daemon.socket_path
    assert ask(path, b"CREATE steady") == b"OK 1"
    with Conn(path) as steady:
        assert steady.ask(b"PING") == b"OK PONG"
        for half in (b"ENC steady QUJD", b"CREATE ghost", b"DEC steady ", b"\xff\x00"):
            with Conn(path) as ghost:
                ghost.send(half)
            assert steady.ask(b"PING") == b"OK PONG"
        # A client that pipelines thousands of requests and leaves without reading.
        with Conn(path) as rude:
            rude.send(b"ENC steady QUJD\n" * 5000)
        # A client that floods without reading stalls only itself.
        stalled = Conn(path)
        try:
            stalled.sock.setblocking(False)
            try:
                for _ in range(2000):
                    stalled.sock.send(b"PING\n" * 1000)
            except BlockingIOError:
                pass
            ciphertext = ok(steady.ask(b"ENC steady " + b64(b"fine")))[0]
            assert base64.b64decode(ok(steady.ask(b"DEC steady " + ciphertext))[0]) == b"fine"
        finally:
            stalled.close()
        assert code(steady.ask(b"INFO ghost")) == b"NOT_FOUND"
    assert daemon.process is not None
    assert daemon.process.poll() is None


# --------------------------------------------------------------------------- socket file life cycle


def test_stale_socket_file_is_removed_at_start(short_tmp: Path) -> None:
    daemon = make_store(short_tmp / "d")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(daemon.socket_path)
    stale.close()  # leaves the file behind, as a crash would
    assert stat.S_ISSOCK(os.lstat(daemon.socket_path).st_mode)
    daemon.start()
    try:
        assert ask(daemon.socket_path, b"PING") == b"OK PONG"
        daemon.kill()
        assert stat.S_ISSOCK(os.lstat(daemon.socket_path).st_mode)
        daemon.start()
        assert ask(daemon.socket_path, b"PING") == b"OK PONG"
    finally:
        if daemon.process is not None:
            daemon.stop()


def test_second_daemon_on_the_same_socket_refuses_to_start(daemon: Daemon, short_tmp: Path) -> None:
    before = os.lstat(daemon.socket_path)
    other = make_store(short_tmp / "other")
    result = subprocess.run(
        serve_command(other.store, daemon.socket_path, other.kek_file),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 5
    assert_one_safe_line(result.stderr)
    # The same store is locked by the first daemon: refused too (store error).
    result = subprocess.run(daemon.command(), capture_output=True, timeout=30, check=False)
    assert result.returncode == 3
    assert_one_safe_line(result.stderr)
    after = os.lstat(daemon.socket_path)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert ask(daemon.socket_path, b"PING") == b"OK PONG"


def test_regular_file_at_the_socket_path_is_kept(short_tmp: Path) -> None:
    daemon = make_store(short_tmp / "d")
    Path(daemon.socket_path).write_bytes(b"not a socket")
    result = subprocess.run(daemon.command(), capture_output=True, timeout=30, check=False)
    assert result.returncode == 5
    assert_one_safe_line(result.stderr)
    assert Path(daemon.socket_path).read_bytes() == b"not a socket"


def test_socket_mode(shared_daemon: Daemon, start_daemon: Callable[..., Daemon]) -> None:
    daemon = shared_daemon
    mode = os.lstat(daemon.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    group = start_daemon("--socket-mode", "0660")
    assert stat.S_IMODE(os.lstat(group.socket_path).st_mode) == 0o660


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_0_and_removes_the_socket(daemon: Daemon, sig: signal.Signals) -> None:
    with Conn(daemon.socket_path) as idle:
        assert idle.ask(b"PING") == b"OK PONG"
        assert wait_exit_after(daemon, sig) == 0
        assert idle.read_until_closed() == b""
    assert not os.path.lexists(daemon.socket_path)


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT), (signal.SIGINT,) * 2],
    ids=["TERM-TERM", "TERM-INT", "INT-INT"],
)
def test_a_second_signal_while_stopping_changes_nothing(
    start_daemon: Callable[..., Daemon], signals: tuple[signal.Signals, ...]
) -> None:
    """It killed the daemon (status -15, socket left) or made it exit 130: trio handed the
    pending signal back to the default action as its receiver closed."""
    daemon = start_daemon("--grace-period", "1")
    assert daemon.process is not None
    with Conn(daemon.socket_path) as stalled:
        stalled.send(b"INFO x\n" * 40_000)  # never reads its replies: the stop takes the grace
        time.sleep(0.3)
        for sig in signals:
            daemon.process.send_signal(sig)
            time.sleep(0.2)
        assert wait_exit(daemon) == 0
    assert not os.path.lexists(daemon.socket_path)
    log = daemon.log.read_text()
    assert "received: already stopping" in log
    assert log.rstrip().endswith("stopped")


def created_in_the_end(daemon: Daemon, key_ids: list[bytes]) -> bool:
    """Wait for the last of ``key_ids`` to exist, then whether every one of them does."""
    deadline = time.monotonic() + 30
    while ask(daemon.socket_path, b"INFO " + key_ids[-1]).startswith(b"ERR NOT_FOUND"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return all(ask(daemon.socket_path, b"INFO " + key_id).startswith(b"OK ") for key_id in key_ids)


def test_writes_pipelined_by_a_client_that_closed_are_all_applied(daemon: Daemon) -> None:
    """A write's reply is sent at once; the first one to a closed client fails, and the
    rest of what it sent must still be served (only 1 of 200 keys was created)."""
    key_ids = [b"gone/k%d" % number for number in range(200)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(daemon.socket_path)
        conn.sendall(b"".join(b"CREATE " + key_id + b"\n" for key_id in key_ids))
    assert created_in_the_end(daemon, key_ids)


def test_writes_sent_after_a_first_reply_by_a_client_that_closed_are_applied(
    daemon: Daemon,
) -> None:
    """What is still in the socket when the client is found gone is served too: only the
    batch at hand was (300 keys of 600)."""
    first = [b"first/k%d" % number for number in range(300)]
    then = [b"then/k%d" % number for number in range(300)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(daemon.socket_path)
        conn.sendall(b"".join(b"CREATE " + key_id + b"\n" for key_id in first))
        assert conn.recv(5) == b"OK 1\n"
        conn.sendall(b"".join(b"CREATE " + key_id + b"\n" for key_id in then))
    assert created_in_the_end(daemon, first + then)


def test_request_in_flight_at_sigterm_is_answered(daemon: Daemon) -> None:
    with Conn(daemon.socket_path) as conn:
        assert conn.ask(b"PING") == b"OK PONG"
        conn.send(b"CREATE inflight\n")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        assert conn.reply() == b"OK 1"
        assert conn.read_until_closed() == b""
    assert wait_exit(daemon) == 0
    daemon.start()
    assert ok(ask(daemon.socket_path, b"INFO inflight"))


@pytest.mark.parametrize("paced", [False, True], ids=["one-write", "paced-batches"])
def test_pipelined_requests_at_sigterm_end_at_a_request_boundary(
    daemon: Daemon, paced: bool
) -> None:
    """Every reply to what was sent, or a close between replies; never a partial line."""
    path = daemon.socket_path
    assert ask(path, b"CREATE drain") == b"OK 1"
    count = 30_000
    lines = [b"ENC drain " + b64(index.to_bytes(4, "big")) + b"\n" for index in range(count)]
    with Conn(path) as conn:
        assert conn.ask(b"PING") == b"OK PONG"

        def write() -> None:
            try:
                if not paced:
                    conn.send(b"".join(lines))
                    return
                for start in range(0, count, 500):  # batches that end on a line boundary
                    conn.send(b"".join(lines[start : start + 500]))
                    time.sleep(0.002)
            except OSError:
                pass  # closed at shutdown before we finished sending: allowed

        writer = threading.Thread(target=write)
        writer.start()
        first = conn.reply() + b"\n"  # the daemon is under way
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        data = first + conn.read_until_closed()
        writer.join(10)
    assert wait_exit(daemon) == 0
    assert data == b"" or data.endswith(b"\n"), "a partial reply line"
    replies = data.splitlines()
    assert 0 < len(replies) <= count  # requests on their way at SIGTERM were answered
    ciphertexts = [ok(reply)[0] for reply in replies]
    daemon.start()
    plaintexts = pipeline(path, [b"DEC drain " + ct for ct in ciphertexts])
    assert [int.from_bytes(base64.b64decode(ok(reply)[0]), "big") for reply in plaintexts] == list(
        range(len(replies))
    )


# --------------------------------------------------------------------------- limits


def test_max_connections(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("--max-connections", "3")
    path = daemon.socket_path
    first = [Conn(path) for _ in range(3)]
    try:
        for conn in first:
            assert conn.ask(b"PING") == b"OK PONG"
        with Conn(path) as fourth:
            assert fourth.read_until_closed() == b"ERR UNAVAILABLE too many connections\n"
        for conn in first:
            assert conn.ask(b"PING") == b"OK PONG"
        first.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the daemon notices the close asynchronously
            reply = first_reply(path)
            if reply == b"OK PONG" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert reply == b"OK PONG"
    finally:
        for conn in first:
            conn.close()


class FewFilesDaemon(Daemon):
    """A daemon that may open only ``FEW_FILES`` descriptors (it holds about 12 at rest;
    its /proc/<pid>/fd cannot be counted by a non-root test, the daemon being undumpable)."""

    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={FEW_FILES}", "--", *super().command()]


FEW_FILES = 32


def test_out_of_descriptors_the_daemon_keeps_serving_and_accepts_later(short_tmp: Path) -> None:
    """More clients than the daemon may open files for: accept(2) fails with EMFILE.
    The daemon logs it, serves the connections it has, and takes the waiting clients
    (queued by the kernel) as descriptors free up; it never exits or spins."""
    daemon = FewFilesDaemon(short_tmp / "few")
    make_store(daemon.root)
    daemon.start()
    waiting = [Conn(daemon.socket_path) for _ in range(2 * FEW_FILES)]
    try:
        for conn in waiting:
            conn.send(b"PING\n")
        served = waiting[:4]  # accepted first, as the kernel queued them
        for conn in served:
            assert conn.reply() == b"OK PONG"
        deadline = time.monotonic() + 10
        while b"cannot accept a connection" not in daemon.log.read_bytes():
            assert time.monotonic() < deadline, "accept never ran out of descriptors"
            time.sleep(0.05)
        for conn in served:
            assert conn.ask(b"PING") == b"OK PONG"  # its connections are unharmed
            conn.close()  # which frees descriptors for the clients still queued
        for conn in waiting[len(served) :]:
            assert conn.reply() == b"OK PONG"
            conn.close()
        assert first_reply(daemon.socket_path) == b"OK PONG"
        assert daemon.stop() == 0
        log = daemon.log.read_text()
        assert log.count("cannot accept a connection") == 1  # once, not every 0.1 s
        assert "accepting connections again" in log
    finally:
        for conn in waiting:
            conn.close()
        daemon.discard()


def test_a_rotation_check_that_cannot_open_files_does_not_stop_the_daemon(
    short_tmp: Path,
) -> None:
    """The first rotation check after a start reads each rotating key's files. Out of
    descriptors (EMFILE), that read fails: the daemon logs it once and goes on."""
    daemon = FewFilesDaemon(short_tmp / "few")
    make_store(daemon.root)
    daemon.start()
    assert ask(daemon.socket_path, b"CREATE rot/k rotate=1h") == b"OK 1"
    daemon.stop()
    daemon.extra_args = ["--rotation-check-interval", "0.5"]
    daemon.start()  # rot/k is in the rotation index, not yet read
    held = [Conn(daemon.socket_path) for _ in range(2 * FEW_FILES)]
    try:
        deadline = time.monotonic() + 10
        while b"cannot check its rotation" not in daemon.log.read_bytes():
            assert daemon.process is not None
            assert daemon.process.poll() is None, "the daemon died"
            assert time.monotonic() < deadline, "the rotation check never ran out of descriptors"
            time.sleep(0.05)
        time.sleep(1.0)  # two more checks, still short of descriptors
        for conn in held:
            conn.close()
        assert first_reply(daemon.socket_path) == b"OK PONG"
        assert daemon.stop() == 0
        assert daemon.log.read_text().count("cannot check its rotation") == 1
    finally:
        for conn in held:
            conn.close()
        daemon.discard()


def test_a_counter_flush_that_keeps_failing_is_logged_once(short_tmp: Path) -> None:
    """The key's directory made immutable (chattr +i: even root may not write there)."""
    daemon = make_store(short_tmp / "d")
    daemon.extra_args = ["--counter-flush-interval", "0.1"]
    daemon.start()
    try:
        assert ask(daemon.socket_path, b"CREATE flush/k") == b"OK 1"
        directory = daemon.store.joinpath("live", "keys", "flush", "k").resolve()
        if (
            subprocess.run(["chattr", "+i", directory], capture_output=True, check=False).returncode
            != 0
        ):
            pytest.skip("chattr +i is not supported on this file system")
        try:
            for _ in range(3):  # each makes the counters dirty; a flush follows every 0.1 s
                assert ask(daemon.socket_path, b"ENC flush/k aGk=").startswith(b"OK ")
                time.sleep(0.4)
        finally:
            subprocess.run(["chattr", "-i", directory], check=True)
        deadline = time.monotonic() + 10
        while b"usage counters written again" not in daemon.log.read_bytes():
            assert time.monotonic() < deadline, "the flush never recovered"
            time.sleep(0.05)
        assert daemon.log.read_text().count("cannot write usage counters") == 1
        assert not [name for name in os.listdir(directory) if name.startswith(".tmp-")]
    finally:
        daemon.stop()


def test_idle_connection_is_closed(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("--idle-timeout", "1")
    with Conn(daemon.socket_path) as conn:
        for _ in range(6):  # busy for longer than the timeout, never idle for that long
            assert conn.ask(b"PING") == b"OK PONG"
            time.sleep(0.2)
        started = time.monotonic()
        assert conn.ask(b"PING") == b"OK PONG"
        assert conn.read_until_closed() == b""
        assert 1.0 <= time.monotonic() - started < 5.0
    assert ask(daemon.socket_path, b"PING") == b"OK PONG"


def test_slow_client_is_cut_off_even_while_sending(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("--idle-timeout", "1")
    stop = threading.Event()
    with Conn(daemon.socket_path) as conn:

        def trickle() -> None:
            try:
                for byte in b"ENC k " + b"A" * 100:
                    conn.send(bytes([byte]))
                    if stop.wait(0.3):
                        return
            except OSError:
                return

        sender = threading.Thread(target=trickle)
        started = time.monotonic()
        sender.start()
        try:
            assert conn.read_until_closed() == b""
            assert time.monotonic() - started < 2.5
        finally:
            stop.set()
            sender.join(5)
    assert ask(daemon.socket_path, b"PING") == b"OK PONG"


def flood_without_reading(socket_path: str) -> Conn:
    """A client that pipelines until its socket is full and never reads a reply."""
    conn = Conn(socket_path)
    conn.sock.setblocking(False)
    try:
        for _ in range(10_000):
            conn.sock.send(b"PING\n" * 1000)
    except BlockingIOError:
        pass
    return conn


def first_reply(socket_path: str) -> bytes:
    """The reply to one PING on a new connection, or b"" if the daemon closed it first."""
    try:
        with Conn(socket_path, timeout=5) as conn:
            return conn.ask(b"PING")
    except (EOFError, ConnectionError):
        return b""


def resident_kib(pid: int, field: str = "VmHWM") -> int:
    """A process's memory from /proc: its peak (VmHWM) or current (VmRSS) resident size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_pipelined_large_replies_are_sent_as_they_pile_up(
    start_daemon: Callable[..., Daemon],
) -> None:
    """A client may pipeline requests with large replies (INFO on a key of 100 versions:
    10 KB each) and read nothing for a while: the daemon holds about 1 MiB of replies
    for it, not the 54 MB its 5,000 requests ask for, and loses none of them."""
    daemon = start_daemon()
    assert daemon.process is not None
    with Conn(daemon.socket_path) as conn:
        assert conn.ask(b"CREATE big") == b"OK 1"
        conn.send(b"ROTATE big\n" * 99)
        assert [conn.reply() for _ in range(99)][-1] == b"OK 100"
        info = conn.ask(b"INFO big")
        assert len(info) > 10_000
        before = resident_kib(daemon.process.pid, "VmRSS")
        conn.send(b"INFO big\n" * 5_000)  # 45 KB: the socket takes it all at once
        time.sleep(1.5)  # unbounded, the daemon had answered all by now
        grown = resident_kib(daemon.process.pid) - before
        assert grown < 20_000, f"the daemon grew by {grown} KiB"
        for _ in range(5_000):
            assert conn.reply() == info
        assert conn.ask(b"PING") == b"OK PONG"


def test_client_that_stops_reading_does_not_hold_a_slot_forever(
    start_daemon: Callable[..., Daemon],
) -> None:
    """A client that pipelines and never reads its replies loses its slot.

    Regression (fixed in 860080b, Server._send): send_all had no timeout, so
    such clients could take every --max-connections slot for good.
    """
    daemon = start_daemon("--idle-timeout", "1", "--max-connections", "1")
    stalled = flood_without_reading(daemon.socket_path)
    try:
        deadline = time.monotonic() + 4.0  # idle timeout 1 s, plus a generous margin
        reply = b""
        while time.monotonic() < deadline:
            reply = first_reply(daemon.socket_path)
            if reply == b"OK PONG":
                break
            time.sleep(0.2)
        assert reply == b"OK PONG", "the stalled client still holds the only connection slot"
    finally:
        stalled.close()


def test_shutdown_with_a_stalled_client_is_bounded_by_the_grace_period(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon("--grace-period", "1")
    stalled = flood_without_reading(daemon.socket_path)
    try:
        assert ask(daemon.socket_path, b"PING") == b"OK PONG"
        started = time.monotonic()
        assert wait_exit_after(daemon, signal.SIGTERM) == 0
        assert time.monotonic() - started < 4.0
        assert not os.path.lexists(daemon.socket_path)
    finally:
        stalled.close()


# --------------------------------------------------------------------------- no secrets in the log


def spellings(secret: bytes) -> list[bytes]:
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


def test_log_holds_no_secrets(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("--verbose")
    path = daemon.socket_path
    text_secret = b"hunter2-correct-horse-battery-staple"
    binary_secret = os.urandom(48)
    aad_secret = os.urandom(24)
    lines = [
        b"CREATE vault exportable",
        b"CREATE sealed",
        b"GET vault",
        b"ENC vault " + b64(text_secret),
        b"ENC sealed " + b64(binary_secret) + b" " + b64(aad_secret),
        b"DATAKEY vault",
        b"DATAKEY sealed 64",
        b"GET sealed",
        b"ENC missing " + b64(text_secret),
        b"ENC vault " + b64(text_secret) + b"!",
        b"XYZZY " + text_secret,
        b"ROTATE vault",
        b"GET vault 2",
    ]
    replies = pipeline(path, lines)
    assert [reply[:2] for reply in replies] == [
        b"OK",
        b"OK",
        b"OK",
        b"OK",
        b"OK",
        b"OK",
        b"OK",
        b"ER",
        b"ER",
        b"ER",
        b"ER",
        b"OK",
        b"OK",
    ]
    secrets = [text_secret, binary_secret, aad_secret, bytes.fromhex(daemon.kek_file.read_text())]
    secrets.append(base64.b64decode(ok(replies[2])[1]))
    secrets.append(base64.b64decode(ok(replies[12])[1]))
    secrets += [base64.b64decode(ok(replies[index])[0]) for index in (5, 6)]
    ciphertext = ok(replies[4])[0]
    decrypted = pipeline(
        path,
        [
            b"DEC sealed " + ciphertext + b" " + b64(aad_secret),
            b"DEC sealed " + ciphertext,
            b"DEC sealed " + ciphertext[:-8] + b"AAAAAAAA" + b" " + b64(aad_secret),
        ],
    )
    assert base64.b64decode(ok(decrypted[0])[0]) == binary_secret
    assert code(decrypted[1]) == code(decrypted[2]) == b"BAD_CIPHERTEXT"
    assert wait_exit_after(daemon, signal.SIGTERM) == 0
    log = daemon.log.read_bytes()
    assert log  # it did log (verbose), so the check below means something
    for secret in secrets:
        for spelling in spellings(secret):
            assert spelling not in log
    for reply in [*replies, *decrypted]:
        if reply.startswith(b"ERR"):
            for secret in secrets:
                for spelling in spellings(secret):
                    assert spelling not in reply
