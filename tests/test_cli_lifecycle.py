# `kms` life-cycle commands (create --rotate, config, retire, restore, destroy, rewrap) as real
# subprocesses against kmsd, terminals included (a pty). Asserts exit codes and bytes, not text.
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kms_client import Client
from kms_client.protocol import Encrypt
from tests.conftest import Daemon, terminal_output

REPO = Path(__file__).resolve().parent.parent
KMS = [sys.executable, "-m", "kms_client"]


def kms(
    args: Sequence[str], env: dict[str, str], stdin: bytes | int = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run `kms`; ``stdin`` is bytes for a pipe, or a file descriptor (a file, a pty)."""
    return subprocess.run(
        [*KMS, *args],
        input=stdin if isinstance(stdin, bytes) else None,
        stdin=None if isinstance(stdin, bytes) else stdin,
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )


def ok(args: Sequence[str], env: dict[str, str], stdin: bytes = b"") -> bytes:
    result = kms(args, env, stdin)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    return result.stdout


def fails(result: subprocess.CompletedProcess[bytes], status: int) -> bytes:
    """Assert one ``kms: ...`` line on stderr and the exit status; return stdout."""
    assert result.returncode == status, result.stderr
    assert result.stderr.startswith(b"kms: ")
    assert result.stderr.count(b"\n") == 1
    return result.stdout


def info(env: dict[str, str], key_id: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(ok(["info", key_id], env))
    return document


def states(env: dict[str, str], key_id: str) -> list[str]:
    return [entry["state"] for entry in info(env, key_id)["versions"]]


def lines_of(ciphertexts: Sequence[bytes]) -> bytes:
    return b"".join(base64.b64encode(ct) + b"\n" for ct in ciphertexts)


def decoded(output: bytes) -> list[bytes]:
    return [base64.b64decode(line, validate=True) for line in output.splitlines()]


# ---------------------------------------------------------------------- create, config


def test_create_with_rotation_and_config(daemon_env: dict[str, str]) -> None:
    assert ok(["create", "auto", "--rotate", "90d"], daemon_env) == b"1\n"
    assert info(daemon_env, "auto")["rotate_period"] == 90 * 86400
    assert ok(["create", "both", "--exportable", "--rotate", "12h"], daemon_env) == b"1\n"
    both = info(daemon_env, "both")
    assert (both["exportable"], both["rotate_period"]) == (True, 12 * 3600)
    assert ok(["create", "plain"], daemon_env) == b"1\n"
    assert info(daemon_env, "plain")["rotate_period"] is None

    assert ok(["config", "plain", "--rotate", "30m"], daemon_env) == b""
    assert info(daemon_env, "plain")["rotate_period"] == 1800
    assert ok(["config", "plain", "--rotate", "OFF"], daemon_env) == b""
    assert info(daemon_env, "plain")["rotate_period"] is None
    fails(kms(["config", "missing", "--rotate", "1d"], daemon_env), 14)
    fails(kms(["create", "auto", "--rotate", "1d"], daemon_env), 15)


# ---------------------------------------------------------------------- retire, restore, destroy


def test_retire_restore_destroy(daemon: Daemon, daemon_env: dict[str, str]) -> None:
    with Client(daemon.socket_path) as client:
        client.create("life", exportable=True)
        old = client.encrypt("life", b"secret")
        client.rotate("life")
    raw = base64.b64encode(old)

    assert ok(["retire", "life", "1"], daemon_env) == b""
    assert ok(["retire", "life", "1"], daemon_env) == b""  # idempotent
    assert states(daemon_env, "life") == ["retired", "active"]
    fails(kms(["get", "life", "--version", "1"], daemon_env), 21)
    fails(kms(["decrypt", "life"], daemon_env, old), 21)
    fails(kms(["rewrap", "life"], daemon_env, raw + b"\n"), 21)
    assert ok(["restore", "life", "1"], daemon_env) == b""
    assert ok(["restore", "life", "1"], daemon_env) == b""
    assert ok(["decrypt", "life"], daemon_env, old) == b"secret"

    fails(kms(["destroy", "life", "2", "--yes"], daemon_env), 10)  # the latest version
    fails(kms(["destroy", "life", "3", "--yes"], daemon_env), 14)
    fails(kms(["retire", "nope", "1"], daemon_env), 14)
    assert ok(["destroy", "life", "1", "--yes"], daemon_env) == b""
    assert ok(["destroy", "life", "1", "-y"], daemon_env) == b""  # idempotent
    assert states(daemon_env, "life") == ["destroyed", "active"]
    fails(kms(["restore", "life", "1"], daemon_env), 21)
    fails(kms(["decrypt", "life"], daemon_env, old), 21)


def test_destroy_refuses_without_a_terminal_or_yes(
    daemon: Daemon, daemon_env: dict[str, str]
) -> None:
    with Client(daemon.socket_path) as client:
        client.create("keep")
        client.rotate("keep")
    fails(kms(["destroy", "keep", "1"], daemon_env, b"y\n"), 2)  # a pipe cannot confirm
    with open(os.devnull, "rb") as devnull:
        fails(kms(["destroy", "keep", "1"], daemon_env, devnull.fileno()), 2)
    assert states(daemon_env, "keep") == ["active", "active"]  # nothing was sent


def _destroy_on_a_terminal(
    env: dict[str, str], answer: bytes
) -> subprocess.CompletedProcess[bytes]:
    primary, secondary = os.openpty()
    try:
        os.write(primary, answer)  # typed ahead: the terminal holds it until kms reads
        return kms(["destroy", "asked", "1"], env, secondary)
    finally:
        os.close(primary)
        os.close(secondary)


def test_destroy_asks_on_a_terminal(daemon: Daemon, daemon_env: dict[str, str]) -> None:
    with Client(daemon.socket_path) as client:
        client.create("asked")
        client.rotate("asked")
    declined = _destroy_on_a_terminal(daemon_env, b"n\n")
    assert declined.returncode == 2, declined.stderr
    assert declined.stderr.startswith(b"Destroy version 1 of asked for good?")
    assert b"kms: " in declined.stderr.splitlines()[-1]  # after the question (no echo here)
    assert states(daemon_env, "asked") == ["active", "active"]
    confirmed = _destroy_on_a_terminal(daemon_env, b"y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmed.stderr.startswith(b"Destroy version 1 of asked for good?")  # on stderr
    assert confirmed.stdout == b""
    assert states(daemon_env, "asked") == ["destroyed", "active"]


# ---------------------------------------------------------------------- rewrap


def test_rewrap_streams_lines_in_order(daemon: Daemon, daemon_env: dict[str, str]) -> None:
    rows = [f"row {i}".encode() for i in range(700)]  # several windows of 256
    with Client(daemon.socket_path) as client:
        client.create("table")
        old = client.pipeline([Encrypt("table", row, b"tbl") for row in rows])
        client.rotate("table")

    output = ok(["rewrap", "table", "--aad", "tbl"], daemon_env, lines_of(old))
    new = decoded(output)
    assert len(new) == 700
    assert all(ct[1:5] == (2).to_bytes(4, "big") for ct in new)
    with Client(daemon.socket_path) as client:
        assert [client.decrypt("table", ct, b"tbl") for ct in new] == rows
        counters = client.info("table")["versions"]
    assert (counters[0]["decryptions"], counters[1]["encryptions"]) == (700, 700)

    # CRLF, white space around a line and a last line without LF are accepted.
    messy = b"  " + base64.b64encode(old[0]) + b" \r\n" + base64.b64encode(old[1])
    assert len(decoded(ok(["rewrap", "table", "--aad", "tbl"], daemon_env, messy))) == 2
    assert ok(["rewrap", "table"], daemon_env, b"") == b""  # no rows, nothing to do


def test_rewrap_failure_keeps_the_lines_before_it(
    daemon: Daemon, daemon_env: dict[str, str]
) -> None:
    with Client(daemon.socket_path) as client:
        client.create("rows")
        client.create("elsewhere")
        good = client.pipeline([Encrypt("rows", i.to_bytes(2, "big")) for i in range(300)])
        foreign = client.encrypt("elsewhere", b"x")
        client.rotate("rows")

    bad_row = lines_of([*good[:260], foreign, *good[260:]])
    result = kms(["rewrap", "rows"], daemon_env, bad_row)
    assert len(decoded(fails(result, 18))) == 260  # exactly the lines before line 261

    not_base64 = lines_of(good[:5]) + b"not base64!\n" + lines_of(good[5:10])
    result = kms(["rewrap", "rows"], daemon_env, not_base64)
    assert len(decoded(fails(result, 5))) == 5
    fails(kms(["rewrap", "rows"], daemon_env, lines_of(good[:3]) + b"\n"), 5)  # an empty line
    fails(kms(["rewrap", "missing"], daemon_env, lines_of(good[:1])), 14)
    fails(kms(["rewrap", "rows", "--aad", "other"], daemon_env, lines_of(good[:1])), 18)


def _rewrap_with_a_terminal(env: dict[str, str], stdin: bytes | int) -> tuple[int, bytes, bytes]:
    """Run `kms rewrap meter` with stderr on a pty; return (status, stdout, what the pty got).

    ``stdin`` is the input for a pipe, or a file descriptor to read it from.
    """
    primary, secondary = os.openpty()
    try:
        try:
            process = subprocess.Popen(
                [*KMS, "rewrap", "meter"],
                stdin=subprocess.PIPE if isinstance(stdin, bytes) else stdin,
                stdout=subprocess.PIPE,
                stderr=secondary,
                env=env,
                cwd=REPO,
            )
            stdout, _ = process.communicate(stdin if isinstance(stdin, bytes) else None, timeout=60)
        finally:
            shown = terminal_output(primary, secondary)
    finally:
        os.close(primary)
    return process.returncode, stdout, shown


def test_rewrap_shows_progress_only_on_a_terminal(
    daemon: Daemon, daemon_env: dict[str, str], short_tmp: Path
) -> None:
    with Client(daemon.socket_path) as client:
        client.create("meter")
        old = client.pipeline([Encrypt("meter", bytes([i % 256])) for i in range(600)])
        client.rotate("meter")
    data = lines_of(old)

    # Not a terminal (a pipe): silent.
    silent = kms(["rewrap", "meter"], daemon_env, data)
    assert silent.returncode == 0
    assert silent.stderr == b""
    assert len(decoded(silent.stdout)) == 600

    # A terminal and input from a pipe: a running count, total unknown.
    status, stdout, shown = _rewrap_with_a_terminal(daemon_env, data)
    assert status == 0
    assert len(decoded(stdout)) == 600
    assert b"\r" in shown
    assert b"kms rewrap: 600" in shown
    assert b"600/" not in shown

    # A terminal and input from a file: the lines are counted first, so a percentage.
    path = short_tmp / "rows.b64"
    path.write_bytes(data)
    with path.open("rb") as source:
        status, stdout, shown = _rewrap_with_a_terminal(daemon_env, source.fileno())
    assert status == 0
    assert len(decoded(stdout)) == 600
    assert b"kms rewrap: 600/600 (100%)" in shown
