# The audit trail of a live daemon: one JSON object per request with the right values, a 0600
# file appended across restarts and reopened on SIGHUP, stderr by default, and never a secret.
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kms_server.audit import AuditError, AuditLog
from kms_server.kek import PassphraseCommand
from kms_server.store import read_metadata
from tests.conftest import KMS, KMSD, Daemon, make_store
from tests.users import Conn, ask, audit_lines, b64, code_of, running, wait_for

FIELDS = {
    "time",
    "conn",
    "uid",
    "gid",
    "pid",
    "exe",
    "verb",
    "key_id",
    "version",
    "result",
    "bytes_in",
    "bytes_out",
    "us",
}
TIME_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
UID, GID = os.getuid(), os.getgid()
ACL = f"""
[[allow]]
users = [{UID}]
keys = ["s/*"]
operations = ["create", "rotate", "info", "get", "enc", "dec", "datakey"]
"""


def audited_daemon(root: Path, *extra: str) -> Daemon:
    """A store whose daemon will audit to ``root/audit.log`` (ACL: this uid, keys s/*)."""
    daemon = make_store(root)
    (root / "acl.toml").write_text(ACL)
    daemon.extra_args = [
        "--acl",
        str(root / "acl.toml"),
        "--audit-log",
        str(root / "audit.log"),
        *extra,
    ]
    return daemon


@pytest.fixture
def audited(short_tmp: Path) -> Iterator[Daemon]:
    with running(audited_daemon(short_tmp / "d")) as daemon:
        yield daemon


def audit_file(daemon: Daemon) -> Path:
    return daemon.root / "audit.log"


def audit_since_now(daemon: Daemon) -> Callable[[], list[dict[str, Any]]]:
    """Reads the audit records written after this call (start-up readiness PINGs excluded)."""
    path = audit_file(daemon)
    skip = len(audit_lines(path))
    return lambda: audit_lines(path)[skip:]


# --------------------------------------------------------------------------- values


def test_one_json_object_per_request_with_the_right_values(audited: Daemon) -> None:
    started = datetime.now(UTC)
    skip = len(audit_file(audited).read_text().splitlines())
    # (request line, verb, key_id, version, result); the DEC line needs the ENC reply.
    script: list[tuple[bytes, str, str | None, int | None, str]] = []
    replies: list[bytes] = []
    with Conn(audited.socket_path) as conn:

        def step(
            line: bytes, verb: str, key_id: str | None, version: int | None, result: str
        ) -> bytes:
            reply = conn.ask(line)
            assert code_of(reply) == result, (line, reply)
            script.append((line, verb, key_id, version, result))
            replies.append(reply)
            return reply

        step(b"PING", "PING", None, None, "OK")
        step(b"CREATE s/k", "CREATE", "s/k", 1, "OK")
        ciphertext_v1 = step(b"ENC s/k " + b64(b"hello"), "ENC", "s/k", 1, "OK").split(b" ")[1]
        step(b"ROTATE s/k", "ROTATE", "s/k", 2, "OK")
        step(b"DEC s/k " + ciphertext_v1, "DEC", "s/k", 1, "OK")
        step(b"ENC s/k " + b64(b"hello"), "ENC", "s/k", 2, "OK")
        step(b"DATAKEY s/k 16", "DATAKEY", "s/k", 2, "OK")
        step(b"INFO s/k", "INFO", "s/k", None, "OK")
        step(b"GET s/k", "GET", "s/k", None, "NOT_EXPORTABLE")
        step(b"INFO s/none", "INFO", "s/none", None, "NOT_FOUND")
        step(b"CREATE s/k", "CREATE", "s/k", None, "EXISTS")
        step(b"DEC s/k " + b64(bytes(46)), "DEC", "s/k", None, "BAD_CIPHERTEXT")
        step(b"GET t/x", "GET", "t/x", None, "DENIED")
        step(b"FROB x", "-", None, None, "UNKNOWN_COMMAND")
        step(b"GET", "GET", None, None, "BAD_REQUEST")
        step(b"GET ../x", "GET", None, None, "BAD_KEY_ID")
        # A request that does not parse is put on the key it names, when it names one.
        step(b"ENC s/k !!!", "ENC", "s/k", None, "BAD_REQUEST")
        # ... but the one token of a data verb without its key id is the data.
        step(b"ENC " + b64(b"SECRETPASSWD"), "ENC", None, None, "BAD_REQUEST")
        step(b"DEC " + ciphertext_v1, "DEC", None, None, "BAD_REQUEST")
        step(b"DATAKEY s/k 0", "DATAKEY", "s/k", None, "BAD_REQUEST")
        step(b"INFO s/k extra", "INFO", "s/k", None, "BAD_REQUEST")
        step(b"PING s/k", "PING", None, None, "BAD_REQUEST")
        step(b"REKEY file", "REKEY", None, None, "BAD_REQUEST")
        step(b"ping", "PING", None, None, "OK")
        step(b"QUIT", "QUIT", None, None, "OK")

    lines = audit_file(audited).read_text().splitlines()[skip:]
    assert len(lines) == len(script)
    records = [json.loads(line) for line in lines]
    exe = os.readlink("/proc/self/exe")
    connection = records[0]["conn"]
    assert isinstance(connection, int)
    previous_time = ""
    for record, (line, verb, key_id, version, result), reply in zip(
        records, script, replies, strict=True
    ):
        assert set(record) == FIELDS, record
        assert (record["verb"], record["key_id"], record["version"], record["result"]) == (
            verb,
            key_id,
            version,
            result,
        ), line
        assert record["conn"] == connection
        assert (record["uid"], record["gid"], record["pid"]) == (UID, GID, os.getpid())
        assert record["exe"] == exe
        assert record["bytes_in"] == len(line) + 1
        assert record["bytes_out"] == len(reply) + 1
        assert isinstance(record["us"], int)
        assert 0 <= record["us"] < 10_000_000
        assert TIME_FORMAT.fullmatch(record["time"]), record["time"]
        assert record["time"] >= previous_time
        previous_time = record["time"]
    first = datetime.strptime(records[0]["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((first - started).total_seconds()) < 30


def test_a_repeated_request_line_is_audited_with_its_own_outcome_each_time(
    audited: Daemon,
) -> None:
    """The server keeps a repeated line's parse and each audit subject: a new outcome shows."""
    audit = audit_since_now(audited)
    with Conn(audited.socket_path) as conn:
        assert conn.ask(b"GET s/r").startswith(b"ERR NOT_FOUND")
        assert conn.ask(b"CREATE s/r exportable") == b"OK 1"
        first = conn.ask(b"GET s/r")
        assert conn.ask(b"GET s/r") == first
        assert conn.ask(b"ROTATE s/r") == b"OK 2"
        second = conn.ask(b"GET s/r")
        assert second.startswith(b"OK 2 ")
        assert second != first
        assert conn.ask(b"GET s/r\r") == second  # the same line, one byte more on the wire
        conn.sock.sendall(b"GET s/r\nGET s/r\n")  # pipelined
        assert [conn.reply(), conn.reply()] == [second, second]
        # Payloads of one size: the same subject fields but for the key id and result.
        for key_id in (b"s/r", b"s/r", b"s/q", b"s/r"):
            conn.ask(b"ENC " + key_id + b" " + base64.b64encode(os.urandom(64)))
    records = [(r["verb"], r["version"], r["result"], r["bytes_in"]) for r in audit()]
    assert [r["key_id"] for r in audit()[-4:]] == ["s/r", "s/r", "s/q", "s/r"]
    assert records == [
        ("GET", None, "NOT_FOUND", 8),
        ("CREATE", 1, "OK", 22),
        ("GET", 1, "OK", 8),
        ("GET", 1, "OK", 8),
        ("ROTATE", 2, "OK", 11),
        ("GET", 2, "OK", 8),
        ("GET", 2, "OK", 9),
        ("GET", 2, "OK", 8),
        ("GET", 2, "OK", 8),
        ("ENC", 2, "OK", 97),
        ("ENC", 2, "OK", 97),
        ("ENC", None, "NOT_FOUND", 97),
        ("ENC", 2, "OK", 97),
    ]


def test_a_client_cycling_through_many_request_lines_is_answered_and_audited_right(
    audited: Daemon,
) -> None:
    """More distinct lines than a connection keeps: the cache empties and starts again."""
    audit = audit_since_now(audited)
    names = [f"s/many{number}" for number in range(300)]
    with Conn(audited.socket_path) as conn:
        assert conn.ask(b"CREATE s/many7 exportable") == b"OK 1"
        for _ in range(2):
            conn.sock.sendall(b"".join(f"GET {name}\n".encode() for name in names))
            replies = [conn.reply() for _ in names]
            assert [code_of(reply) for reply in replies] == [
                "OK" if name == "s/many7" else "NOT_FOUND" for name in names
            ]
    records = audit()[1:]
    assert [r["key_id"] for r in records] == names * 2
    assert [r["result"] for r in records] == [code_of(reply) for reply in replies] * 2


def test_each_connection_has_its_own_id_and_the_client_pid(audited: Daemon) -> None:
    audit = audit_since_now(audited)
    ask(audited.socket_path, b"PING")
    client = subprocess.run(
        [*KMS, "--socket", audited.socket_path, "ping"],
        capture_output=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert client.returncode == 0, client.stderr
    wait_for(lambda: any(r["verb"] == "QUIT" for r in audit()), what="the CLI's QUIT")
    ask(audited.socket_path, b"PING")
    records = audit()
    assert [(r["verb"], r["result"]) for r in records] == [("PING", "OK")] * 2 + [
        ("QUIT", "OK"),
        ("PING", "OK"),
    ]
    mine, cli, cli_quit, mine_again = records
    assert cli_quit["conn"] == cli["conn"]
    assert cli_quit["pid"] == cli["pid"]
    assert mine["pid"] == mine_again["pid"] == os.getpid()
    assert cli["pid"] != os.getpid()
    assert cli["exe"] == os.path.realpath(sys.executable)
    assert len({mine["conn"], cli["conn"], mine_again["conn"]}) == 3


def test_the_pid_is_that_of_the_client_process(audited: Daemon) -> None:
    audit = audit_since_now(audited)
    client = subprocess.Popen(
        [*KMS, "--socket", audited.socket_path, "ping"],
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    assert client.wait(20) == 0
    wait_for(lambda: len(audit()) == 2, what="the CLI's PING and QUIT")
    assert [(r["verb"], r["result"], r["pid"]) for r in audit()] == [
        ("PING", "OK", client.pid),
        ("QUIT", "OK", client.pid),
    ]


def test_pipelined_requests_each_get_a_line(audited: Daemon) -> None:
    audit = audit_since_now(audited)
    with Conn(audited.socket_path) as conn:
        conn.sock.sendall(b"PING\nCREATE s/p\nGET t/x\nBOGUS\nPING\nPING\n")
        replies = [code_of(conn.reply()) for _ in range(6)]
    assert replies == ["OK", "OK", "DENIED", "UNKNOWN_COMMAND", "OK", "OK"]
    results = [(r["verb"], r["result"]) for r in audit()]
    assert results == [
        ("PING", "OK"),
        ("CREATE", "OK"),
        ("GET", "DENIED"),
        ("-", "UNKNOWN_COMMAND"),
        ("PING", "OK"),
        ("PING", "OK"),
    ]


def test_bytes_in_counts_every_byte_of_a_crlf_line(audited: Daemon) -> None:
    audit = audit_since_now(audited)
    with Conn(audited.socket_path) as conn:
        conn.sock.sendall(b"PING\r\n")
        assert conn.reply() == b"OK PONG"
        assert conn.ask(b"PING") == b"OK PONG"
    assert [r["bytes_in"] for r in audit()] == [len(b"PING\r\n"), len(b"PING\n")]


# --------------------------------------------------------------------------- the file


def drain(fd: int) -> bytes:
    """Everything a non-blocking pipe holds now."""
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 20):
            data += chunk
    return data


def test_a_sink_that_stops_reading_drops_lines_and_never_tears_one(tmp_path: Path) -> None:
    """A full pipe takes part of a batch: the next batch first ends the cut line, so
    every later line is a whole JSON object; the stall is bounded and logged."""
    fifo = tmp_path / "collector"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        audit = AuditLog(fifo)
        line = '{"verb":"PING","pad":"' + "x" * 180 + '"}\n'
        started = time.monotonic()
        for _ in range(2000):  # ~400 KB into a 64 KiB pipe nobody reads
            audit.write([line] * 3)
        assert time.monotonic() - started < 5.0  # one short wait, then drops at once
        drained = drain(reader)
        audit.write(['{"verb":"AFTER"}\n'])
        drained += drain(reader)
        audit.close()
    finally:
        os.close(reader)
    lines = drained.split(b"\n")
    assert lines[-1] == b""
    assert b'{"verb":"AFTER"}' in lines  # whole, not glued onto a cut line
    torn = [text for text in lines[:-1] if not text.endswith(b"}")]
    assert len(torn) <= 1  # at most the one line the full pipe cut
    for text in lines[:-1]:
        if text.endswith(b"}"):
            json.loads(text)


def test_a_fifo_nobody_reads_is_refused_at_open_not_waited_on(tmp_path: Path) -> None:
    """Opening it for writing would block until a reader came: at start, in check-config,
    or in a SIGHUP reopen on the event loop."""
    fifo = tmp_path / "collector"
    os.mkfifo(fifo)
    with pytest.raises(AuditError, match="nothing reads that FIFO"):
        AuditLog(fifo)


def test_a_stalled_fifo_sink_freezes_nothing(short_tmp: Path) -> None:
    """A log collector that stops reading: the daemon keeps answering everyone, logs the
    loss, and still stops on SIGTERM."""
    daemon = audited_daemon(short_tmp / "d")
    fifo = short_tmp / "collector"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opens, never reads
    try:
        daemon.extra_args[-1] = str(fifo)
        with running(daemon):
            with Conn(daemon.socket_path) as conn:
                for _ in range(1500):
                    assert conn.ask(b"PING") == b"OK PONG"
            assert ask(daemon.socket_path, b"PING") == b"OK PONG"
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(10) == 0
            daemon.process = None
        assert "cannot write the audit trail" in daemon.log.read_text()
    finally:
        os.close(reader)


def test_a_stalled_stderr_freezes_nothing(short_tmp: Path) -> None:
    """journald that stops reading: the audit trail and the log both go to stderr, a pipe
    nobody reads. The log's own lines blocked the daemon for good (SIGTERM unheeded)."""
    daemon = make_store(short_tmp / "d")
    read_end, write_end = os.pipe()  # held open, never read
    try:
        process = subprocess.Popen(
            daemon.command(), stdout=write_end, stderr=write_end, stdin=subprocess.DEVNULL
        )
        daemon.process = process
        deadline = time.monotonic() + 30
        while not os.path.exists(daemon.socket_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        with Conn(daemon.socket_path) as conn:
            for number in range(150):  # each CREATE logs a line; each request an audit line
                assert conn.ask(b"CREATE s/k%d" % number) == b"OK 1"
                assert conn.ask(b"PING") == b"OK PONG"
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        daemon.process = None
        os.set_blocking(read_end, False)
        said = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 1 << 16):
                said += chunk
        assert len(said) >= 50_000  # the pipe filled up: the reader really stalled
    finally:
        daemon.discard()
        os.close(read_end)
        os.close(write_end)


def test_a_log_line_after_a_cut_audit_line_starts_a_line_of_its_own(short_tmp: Path) -> None:
    """The audit trail and the log share stderr: a log line written after an audit line
    the stalled reader cut short was glued onto it."""
    daemon = make_store(short_tmp / "d")
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    said = bytearray()

    def drain() -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 1 << 16):
                said.extend(chunk)

    try:
        process = subprocess.Popen(daemon.command(), stderr=write_end, stdin=subprocess.DEVNULL)
        daemon.process = process
        deadline = time.monotonic() + 30
        while not os.path.exists(daemon.socket_path) and time.monotonic() < deadline:
            drain()
            time.sleep(0.01)
        with Conn(daemon.socket_path) as conn:
            for _ in range(40):  # nobody reads stderr meanwhile: audit batches get cut
                conn.send(b"PING\n" * 300)
                for _ in range(300):
                    assert conn.reply() == b"OK PONG"
            drain()  # read again
            assert conn.ask(b"CREATE s/after") == b"OK 1"  # logs a line
            time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        daemon.process = None
        drain()
    finally:
        daemon.discard()
        os.close(read_end)
        os.close(write_end)
    lines = bytes(said).splitlines()
    assert any(line.endswith(b"log lines were lost while stderr was not read") for line in lines)
    glued = [line for line in lines if line.startswith(b"{") and b"lost while stderr" in line]
    glued += [line for line in lines if b" kmsd[" in line and not line.startswith(b"20")]
    assert glued == []


def test_an_over_long_line_is_audited_with_its_verb_and_size(short_tmp: Path) -> None:
    daemon = audited_daemon(short_tmp / "d", "--max-line", "200")
    with running(daemon):
        for line in (b"ENC s/a " + b"A" * 400, b"\x00garbage" * 50):
            with Conn(daemon.socket_path) as conn:
                assert code_of(conn.ask(line)) == "TOO_LONG"
    found = [e for e in audit_lines(daemon.root / "audit.log") if e["result"] == "TOO_LONG"]
    assert [(entry["verb"], entry["result"]) for entry in found] == [
        ("ENC", "TOO_LONG"),
        ("-", "TOO_LONG"),
    ]
    for entry in found:
        assert isinstance(entry["bytes_in"], int)
        assert 200 < entry["bytes_in"] <= 501
        assert "AAAA" not in json.dumps(entry)


def test_an_audit_log_that_cannot_be_opened_stops_start_up(short_tmp: Path) -> None:
    daemon = audited_daemon(short_tmp / "d")
    missing = short_tmp / "no-such-dir" / "audit.log"
    result = subprocess.run(
        [*daemon.command()[:-1], str(missing)],  # the last argument is the audit path
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(daemon.socket_path).exists()


def test_the_audit_file_is_0600(audited: Daemon) -> None:
    ask(audited.socket_path, b"PING")
    assert stat.S_IMODE(audit_file(audited).stat().st_mode) == 0o600


def test_the_time_is_utc_to_the_microsecond_across_seconds_and_a_clock_set_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head formats the date once a second and only the microseconds per batch:
    each reading must still be the wall clock's, also when it steps back (NTP)."""
    audit = AuditLog(tmp_path / "audit.log")
    readings = [
        1_795_000_000_000_000_000,  # 2026-11-18T09:46:40.000000Z
        1_795_000_000_000_999_999,  # the same microsecond: nanoseconds are cut, not rounded
        1_795_000_000_999_999_000,  # the end of that second
        1_795_000_001_000_001_000,  # the next second
        1_794_999_999_123_456_789,  # set back to the second before
        1_795_000_000_000_042_000,
    ]
    clock = iter(readings)
    monkeypatch.setattr("kms_server.audit.time.time_ns", lambda: next(clock))
    try:
        for reading in readings:
            head = audit.head('"conn":1,')
            second, nanos = divmod(reading, 10**9)
            expected = datetime.fromtimestamp(second, UTC).replace(microsecond=nanos // 1000)
            assert head == f'{{"time":"{expected:%Y-%m-%dT%H:%M:%S.%f}Z","conn":1,'
    finally:
        audit.close()


def test_an_existing_looser_file_is_made_0600_but_a_fifo_is_left_alone(tmp_path: Path) -> None:
    loose = tmp_path / "audit.log"
    loose.touch(mode=0o644)
    loose.chmod(0o644)
    AuditLog(loose).close()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600

    # A log collector's FIFO (or a device such as /dev/null) is not the daemon's to chmod.
    fifo = tmp_path / "collector"
    os.mkfifo(fifo, 0o644)
    fifo.chmod(0o644)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        audit = AuditLog(fifo)
        audit.write(['{"verb":"PING"}\n'])
        audit.close()
        assert os.read(reader, 100) == b'{"verb":"PING"}\n'
    finally:
        os.close(reader)
    assert stat.S_IMODE(fifo.stat().st_mode) == 0o644


def test_the_audit_file_is_appended_across_a_restart(short_tmp: Path) -> None:
    daemon = audited_daemon(short_tmp / "d")
    with running(daemon):
        for _ in range(3):
            ask(daemon.socket_path, b"CREATE s/before")
        before = audit_file(daemon).read_bytes()
        daemon.restart()
        ask(daemon.socket_path, b"CREATE s/after")
    after = audit_file(daemon).read_bytes()
    assert after.startswith(before)
    old = [json.loads(line) for line in before.splitlines()]
    assert [r["result"] for r in old if r["verb"] == "CREATE"] == ["OK", "EXISTS", "EXISTS"]
    new = [json.loads(line) for line in after[len(before) :].splitlines()]
    assert {r["verb"] for r in new[:-1]} == {"PING"}  # the restart's readiness probes
    assert (new[-1]["verb"], new[-1]["key_id"], new[-1]["result"]) == ("CREATE", "s/after", "OK")


def test_sighup_reopens_the_audit_file_after_rotation(audited: Daemon) -> None:
    assert audited.process is not None
    path = audit_file(audited)
    rotated = path.with_name("audit.log.1")
    ask(audited.socket_path, b"PING")
    path.rename(rotated)
    ask(audited.socket_path, b"HELLO")  # still the open file, now named audit.log.1
    assert not path.exists()

    audited.process.send_signal(signal.SIGHUP)
    wait_for(path.exists, what="the daemon to create a new audit.log")
    ask(audited.socket_path, b"HELP")

    assert [r["verb"] for r in audit_lines(rotated)][-2:] == ["PING", "HELLO"]
    assert [r["verb"] for r in audit_lines(path)] == ["HELP"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert audited.process.poll() is None


def test_sighup_without_rotation_keeps_appending_to_the_same_file(audited: Daemon) -> None:
    assert audited.process is not None
    path = audit_file(audited)
    audit = audit_since_now(audited)
    ask(audited.socket_path, b"GET t/x")
    inode = path.stat().st_ino
    # Also grant t/*: the new ACL in force shows the reload (and with it the reopen) is done.
    acl = audited.root / "acl.toml"
    acl.write_text(ACL.replace('"s/*"', '"s/*", "t/*"'))
    audited.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: code_of(ask(audited.socket_path, b"GET t/x")) == "NOT_FOUND",
        what="the reload",
    )
    assert path.stat().st_ino == inode
    results = [r["result"] for r in audit()]
    assert results[0] == "DENIED"
    assert results[-1] == "NOT_FOUND"
    assert set(results[1:-1]) <= {"DENIED"}


def test_without_the_flag_the_audit_goes_to_stderr(daemon: Daemon) -> None:
    with Conn(daemon.socket_path) as conn:
        assert conn.ask(b"CREATE k") == b"OK 1"
        assert code_of(conn.ask(b"GET k")) == "NOT_EXPORTABLE"
    records = [r for r in audit_lines(daemon.log) if r.get("pid") == os.getpid()]
    assert all(set(r) == FIELDS for r in records)
    probes = [r for r in records if r["verb"] == "PING"]  # the fixture's readiness checks
    assert probes
    assert all(r["result"] == "OK" for r in probes)
    assert [(r["verb"], r["key_id"], r["result"]) for r in records if r["verb"] != "PING"] == [
        ("CREATE", "k", "OK"),
        ("GET", "k", "NOT_EXPORTABLE"),
    ]
    assert not list(daemon.root.glob("*audit*"))


# --------------------------------------------------------------------------- no secrets


def encodings(secret: bytes) -> dict[str, bytes]:
    """Every spelling of ``secret`` a careless log line could hold.

    Base64 is taken of the secret from offsets 0, 1 and 2, whole 3-byte groups only: a
    secret embedded at any position of a larger base64-encoded buffer contains one of
    those three as a substring, whatever its alignment.
    """
    forms = {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "base64": base64.b64encode(secret),
        "urlsafe": base64.urlsafe_b64encode(secret),
    }
    for offset in (0, 1, 2):
        part = secret[offset:]
        part = part[: len(part) // 3 * 3]
        forms[f"base64@{offset}"] = base64.b64encode(part)
        forms[f"urlsafe@{offset}"] = base64.urlsafe_b64encode(part)
    return forms


def leaks(secrets: dict[str, bytes], haystacks: dict[str, bytes]) -> list[str]:
    found = []
    for name, secret in secrets.items():
        assert len(secret) >= 16, name  # long enough that a match is no coincidence
        for form, needle in encodings(secret).items():
            for where, haystack in haystacks.items():
                if needle in haystack:
                    found.append(f"{name} ({form}) in {where}")
    return found


def test_the_secret_grep_would_find_a_secret_at_any_alignment() -> None:
    secret = os.urandom(32)
    for prefix in (b"", b"a", b"ab", b"abc"):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            blob = b"log line " + encode(prefix + secret + b"tail") + b"\n"
            assert leaks({"s": secret}, {"log": blob}), (prefix, encode)
    assert leaks({"s": secret}, {"log": b"x" + secret.hex().upper().encode()})
    assert not leaks({"s": secret}, {"log": b"nothing here"})


def distinctive(label: str) -> bytes:
    return f"KMST-{label}-".encode() + os.urandom(24) + b"-END"


def key_id_like_secret() -> bytes:
    """18 bytes whose base64 (no padding, letters and digits only) is a valid key id."""
    while not re.fullmatch(rb"[A-Za-z0-9]{24}", b64(secret := os.urandom(18))):
        pass
    return secret


def test_no_secret_reaches_the_audit_file_or_the_daemon_log(audited: Daemon) -> None:
    plaintext, aad = distinctive("PLAINTEXT"), distinctive("AAD")
    secrets: dict[str, bytes] = {
        "kek": bytes.fromhex(audited.kek_file.read_text().strip()),
        "plaintext": plaintext,
        "aad": aad,
    }
    with Conn(audited.socket_path) as conn:
        assert conn.ask(b"CREATE s/exp exportable") == b"OK 1"
        _, version, key = conn.ask(b"GET s/exp").split(b" ")
        secrets["key v1"] = base64.b64decode(key)
        assert conn.ask(b"GET s/exp 1") == b"OK 1 " + key

        _, ciphertext = conn.ask(b"ENC s/exp " + b64(plaintext) + b" " + b64(aad)).split(b" ")
        secrets["ciphertext"] = base64.b64decode(ciphertext)
        assert conn.ask(b"DEC s/exp " + ciphertext + b" " + b64(aad)) == b"OK " + b64(plaintext)

        _, data_key, wrapped = conn.ask(b"DATAKEY s/exp").split(b" ")
        secrets["data key"] = base64.b64decode(data_key)
        secrets["wrapped data key"] = base64.b64decode(wrapped)
        assert conn.ask(b"DEC s/exp " + wrapped) == b"OK " + data_key
        _, data_key_48, wrapped_48 = conn.ask(b"DATAKEY s/exp 48").split(b" ")
        secrets["data key 48"] = base64.b64decode(data_key_48)
        secrets["wrapped data key 48"] = base64.b64decode(wrapped_48)

        assert conn.ask(b"ROTATE s/exp") == b"OK 2"
        secrets["key v2"] = base64.b64decode(conn.ask(b"GET s/exp").split(b" ")[2])

        # Failures carrying secrets are as silent as successes.
        secrets["key-id-like plaintext"] = key_id_like_secret()
        tampered = bytearray(secrets["ciphertext"])
        tampered[-1] ^= 1
        for line, result in (
            (b"ENC s/none " + b64(plaintext) + b" " + b64(aad), "NOT_FOUND"),
            (b"DEC s/exp " + b64(bytes(tampered)) + b" " + b64(aad), "BAD_CIPHERTEXT"),
            (b"DEC s/exp " + ciphertext + b" " + b64(aad + b"x"), "BAD_CIPHERTEXT"),
            (b"DEC s/exp " + ciphertext, "BAD_CIPHERTEXT"),
            (b"ENC t/denied " + b64(plaintext) + b" " + b64(aad), "DENIED"),
            (b"FROB " + b64(plaintext), "UNKNOWN_COMMAND"),
            (b"ENC s/exp " + b64(plaintext) + b" " + b64(aad) + b" extra", "BAD_REQUEST"),
            (b"ENC s/exp " + b64(plaintext)[:-1] + b" " + b64(aad), "BAD_REQUEST"),
            (b"GET " + b64(secrets["key v1"]), "BAD_KEY_ID"),
            # The key id left out: a lone base64 token that reads as a key id is data.
            (b"ENC " + b64(secrets["key-id-like plaintext"]), "BAD_REQUEST"),
            (b"DEC " + b64(secrets["ciphertext"]), "BAD_REQUEST"),
            (b"REWRAP " + b64(secrets["ciphertext"]), "BAD_REQUEST"),
            (b64(secrets["key v1"]) + b" s/exp", "UNKNOWN_COMMAND"),
        ):
            assert code_of(conn.ask(line)) == result, line
    assert version == b"1"
    audited.stop()  # shutdown lines (and any wipe messages) are in the log too

    audit, log = audit_file(audited).read_bytes(), audited.log.read_bytes()
    assert len(audit.splitlines()) >= 20  # the grep looked at a real trail
    found = leaks(secrets, {"audit log": audit, "daemon stderr": log})
    assert not found, found


@pytest.fixture
def passphrase_script(short_tmp: Path) -> tuple[Path, bytes]:
    passphrase = b"KMST-PASSPHRASE-" + os.urandom(12).hex().encode()
    script = short_tmp / "ask-passphrase"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{passphrase.decode()}'\n")
    script.chmod(0o700)
    return script, passphrase


def test_a_passphrase_reaches_no_log(
    short_tmp: Path, passphrase_script: tuple[Path, bytes]
) -> None:
    script, passphrase = passphrase_script
    root = short_tmp / "p"
    root.mkdir(mode=0o700)
    store = root / "store"
    init = subprocess.run(
        [*KMSD, "init", "--store", str(store), "--passphrase-command", str(script)],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert init.returncode == 0, init.stderr

    class PassphraseDaemon(Daemon):
        def command(self) -> list[str]:
            return [
                *KMSD,
                "serve",
                "--store",
                str(store),
                "--socket",
                self.socket_path,
                "--passphrase-command",
                str(script),
                "--audit-log",
                str(root / "audit.log"),
            ]

    daemon = PassphraseDaemon(root)
    with running(daemon), Conn(daemon.socket_path) as conn:
        assert conn.ask(b"CREATE pp exportable") == b"OK 1"
        assert code_of(conn.ask(b"GET pp")) == "OK"
        assert code_of(conn.ask(b"ENC pp " + b64(b"data"))) == "OK"

    kek = PassphraseCommand(str(script)).obtain(read_metadata(store).kek)
    haystacks = {
        "init stdout": init.stdout,
        "init stderr": init.stderr,
        "daemon stderr": daemon.log.read_bytes(),
        "audit log": (root / "audit.log").read_bytes(),
    }
    verbs = [r["verb"] for r in audit_lines(root / "audit.log")]
    assert verbs[-3:] == ["CREATE", "GET", "ENC"]
    found = leaks({"passphrase": passphrase, "kek": bytes(kek)}, haystacks)
    assert not found, found
