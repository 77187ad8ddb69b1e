# `kms`: exit-code table, the encrypted-stream format (pure, with an in-process toy sealer),
# usage via CliRunner, and end to end as a real subprocess against kmsd. Asserts codes, not text.
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from kms_client import BadCiphertext, Client, KeyNotFound, KmsError
from kms_client import cli as kms_cli
from kms_client.cli import (
    EXIT_CODES,
    LOCAL,
    STREAM_HEADER_SIZE,
    STREAM_MAGIC,
    LocalError,
    StreamDamaged,
    decrypt_input,
    encrypt_stream,
    iter_chunks,
    stream_aad,
)
from kms_client.errors import (
    ERROR_CLASSES,
    ConnectionFailed,
    ProtocolViolation,
    Timeout,
    error_for_code,
)
from kms_client.protocol import Decrypt, Encrypt, Request
from tests.conftest import Daemon, terminal_output
from tests.scripted_server import ScriptedServer, reply_with, silent

REPO = Path(__file__).resolve().parent.parent
R = TypeVar("R")

# ---------------------------------------------------------------------- exit-code table

EXPECTED_EXIT_CODES = {
    "CONNECTION_FAILED": 3,
    "TIMEOUT": 4,
    "LOCAL": 5,
    "PROTOCOL_VIOLATION": 6,
    "BAD_REQUEST": 10,
    "UNKNOWN_COMMAND": 11,
    "TOO_LONG": 12,
    "BAD_KEY_ID": 13,
    "NOT_FOUND": 14,
    "EXISTS": 15,
    "NOT_EXPORTABLE": 16,
    "DENIED": 17,
    "BAD_CIPHERTEXT": 18,
    "UNAVAILABLE": 19,
    "INTERNAL": 20,
    "RETIRED": 21,
}


def test_exit_code_table_covers_every_error_class() -> None:
    client_side = {ConnectionFailed.code, Timeout.code, ProtocolViolation.code, LOCAL}
    assert set(EXIT_CODES) == set(ERROR_CLASSES) | client_side
    assert dict(EXIT_CODES) == EXPECTED_EXIT_CODES
    statuses = list(EXIT_CODES.values())
    assert len(set(statuses)) == len(statuses)
    assert not {0, 1, 2} & set(statuses)


@pytest.mark.parametrize(
    "code", ["SOMETHING_NEW", "TIMEOUT", "LOCAL", "CONNECTION_FAILED", "PROTOCOL_VIOLATION"]
)
def test_unknown_server_codes_exit_1_even_when_they_spell_a_client_side_one(code: str) -> None:
    assert kms_cli.exit_code_for(error_for_code(code, "from a newer daemon")) == 1


def test_exit_codes_are_documented() -> None:
    doc = kms_cli.__doc__ or ""
    help_text = CliRunner().invoke(kms_cli.cli, ["--help"]).output
    for status in (0, 1, 2, *EXIT_CODES.values()):
        assert re.search(rf"^{status}\s", doc, re.MULTILINE), status
        assert re.search(rf"^\s+{status}\s", help_text, re.MULTILINE), status
    for code in ERROR_CLASSES:
        assert code in doc
        assert code in help_text


# ---------------------------------------------------------------------- stream format


class ToySealer(Client):
    """Seals like kmsd (authenticated, bound to key id and AAD) without a daemon.

    The stream tests check framing, ordering and finality; they need a sealer
    whose failures depend on exactly the bytes kmsd authenticates, nothing more.
    """

    def __init__(self) -> None:
        super().__init__("/nonexistent/kms.sock")
        self.calls: list[Request[Any]] = []

    @staticmethod
    def _tag(key_id: str, aad: bytes, plaintext: bytes) -> bytes:
        message = key_id.encode() + b"\x00" + len(aad).to_bytes(4, "big") + aad + plaintext
        return hmac.new(b"toy key", message, hashlib.sha256).digest()[:16]

    def call(self, request: Request[R]) -> R:
        self.calls.append(request)
        if isinstance(request, Encrypt):
            if request.key_id == "missing":
                raise KeyNotFound()
            tag = self._tag(request.key_id, request.aad, request.plaintext)
            return cast(R, b"\x01" + tag + request.plaintext)
        if isinstance(request, Decrypt):
            ciphertext = request.ciphertext
            body = ciphertext[17:]
            expected = self._tag(request.key_id, request.aad, body)
            if ciphertext[:1] != b"\x01" or not hmac.compare_digest(ciphertext[1:17], expected):
                raise BadCiphertext()
            return cast(R, body)
        raise AssertionError(f"unexpected {request.verb}")

    def pipeline(self, requests: Sequence[Request[Any]]) -> list[Any]:
        results: list[Any] = []
        for request in requests:
            try:
                results.append(self.call(request))
            except KmsError as error:
                results.append(error)
        return results


def seal(data: bytes, aad: bytes = b"", chunk_size: int = 4, stream_id: bytes = b"S" * 16) -> bytes:
    sink = io.BytesIO()
    encrypt_stream(
        ToySealer(), "k", io.BytesIO(data), sink, aad, stream_id=stream_id, chunk_size=chunk_size
    )
    return sink.getvalue()


def unseal(data: bytes, aad: bytes = b"") -> bytes:
    sink = io.BytesIO()
    decrypt_input(ToySealer(), "k", io.BytesIO(data), sink, aad)
    return sink.getvalue()


def split_stream(data: bytes) -> tuple[bytes, list[bytes]]:
    header, rest = data[:STREAM_HEADER_SIZE], data[STREAM_HEADER_SIZE:]
    records = []
    while rest:
        length = int.from_bytes(rest[:4], "big")
        records.append(rest[4 : 4 + length])
        rest = rest[4 + length :]
    return header, records


def join_stream(header: bytes, records: Sequence[bytes]) -> bytes:
    return header + b"".join(len(r).to_bytes(4, "big") + r for r in records)


def test_stream_aad_layout() -> None:
    assert stream_aad(b"I" * 16, 258, True, b"user") == (
        b"kms-stream/1\x00" + b"I" * 16 + b"\x00" * 6 + b"\x01\x02" + b"\x01" + b"user"
    )
    assert stream_aad(b"I" * 16, 0, False, b"")[-9:] == b"\x00" * 9


@pytest.mark.parametrize(
    ("size", "expected"),
    [(1, [1]), (4, [4]), (5, [4, 1]), (8, [4, 4]), (9, [4, 4, 1])],
)
def test_chunks_are_read_one_ahead(size: int, expected: list[int]) -> None:
    chunks = list(iter_chunks(io.BytesIO(b"x" * size), chunk_size=4))
    assert [len(chunk) for chunk, _ in chunks] == expected
    assert [final for _, final in chunks] == [False] * (len(expected) - 1) + [True]


def test_empty_input_cannot_be_encrypted() -> None:
    with pytest.raises(LocalError):
        seal(b"")


@given(
    data=st.binary(min_size=1, max_size=300),
    aad=st.binary(max_size=8),
    chunk_size=st.integers(min_value=1, max_value=64),
)
@settings(max_examples=60, deadline=None)
def test_stream_round_trip(data: bytes, aad: bytes, chunk_size: int) -> None:
    sealed = seal(data, aad, chunk_size)
    header, records = split_stream(sealed)
    assert header == STREAM_MAGIC + b"S" * 16
    assert len(records) == -(-len(data) // chunk_size)
    assert unseal(sealed, aad) == data


def test_nothing_is_written_when_the_first_chunk_fails() -> None:
    sink = io.BytesIO()
    with pytest.raises(KeyNotFound):
        encrypt_stream(ToySealer(), "missing", io.BytesIO(b"data"), sink)
    assert sink.getvalue() == b""


def _drop_last(h: bytes, r: list[bytes]) -> bytes:
    return join_stream(h, r[:-1])


DAMAGE: dict[str, tuple[Callable[[bytes, list[bytes]], bytes], type[Exception]]] = {
    "last record dropped": (_drop_last, StreamDamaged),
    "cut inside a record": (lambda h, r: join_stream(h, r)[:-1], StreamDamaged),
    "cut inside a length": (lambda h, r: join_stream(h, r) + b"\x00\x00", StreamDamaged),
    "record after the final one": (lambda h, r: join_stream(h, [*r, r[-1]]), StreamDamaged),
    "zero length": (lambda h, r: join_stream(h, r) + b"\x00" * 4, StreamDamaged),
    "huge length": (lambda h, r: h + b"\xff" * 4 + r[0], StreamDamaged),
    "header only": (lambda h, r: h, StreamDamaged),
    "short header": (lambda h, r: h[:10], StreamDamaged),
    "records swapped": (lambda h, r: join_stream(h, [r[1], r[0], *r[2:]]), BadCiphertext),
    "record repeated": (lambda h, r: join_stream(h, [r[0], r[0], *r[2:]]), BadCiphertext),
    "flipped bit": (lambda h, r: join_stream(h, [r[0][:-1] + b"\x00", *r[1:]]), BadCiphertext),
    "other stream id": (lambda h, r: join_stream(h[:-1] + b"T", r), BadCiphertext),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_streams_are_refused(case: str) -> None:
    damage, expected = DAMAGE[case]
    header, records = split_stream(seal(b"0123456789", chunk_size=4))
    assert len(records) == 3
    with pytest.raises(expected):
        unseal(damage(header, records))


def test_wrong_aad_is_bad_ciphertext() -> None:
    with pytest.raises(BadCiphertext):
        unseal(seal(b"0123456789", b"right"), b"wrong")


def test_raw_ciphertext_is_decrypted_with_the_aad_as_given() -> None:
    raw = ToySealer().encrypt("k", b"raw secret", b"aad")
    assert unseal(raw, b"aad") == b"raw secret"
    with pytest.raises(BadCiphertext):
        unseal(raw)
    with pytest.raises(LocalError):
        unseal(b"")


def test_a_ciphertext_as_base64_text_is_decrypted_too() -> None:
    """The line ENC and `kms datakey` print opens as it is: no `base64 -d` first."""
    raw = ToySealer().encrypt("k", b"raw secret", b"aad")
    text = base64.b64encode(raw)
    for form in (text, text + b"\n", text + b"\r\n"):
        assert unseal(form, b"aad") == b"raw secret"
    for broken in (text[:-1], text + b"==", text + b"\n\n", b"QUJD"):
        with pytest.raises(BadCiphertext):
            unseal(broken, b"aad")


# ---------------------------------------------------------------------- usage (no daemon)


def invoke(args: list[str], stdin: bytes = b"", socket: str = "/nonexistent/kms.sock") -> Any:
    return CliRunner().invoke(kms_cli.cli, ["--socket", socket, *args], input=stdin)


@pytest.mark.parametrize(
    "args",
    [
        ["get", "k", "--format", "octal"],
        ["get", "k", "--version", "0"],
        ["datakey", "k", "--bytes", "0"],
        ["datakey", "k", "--bytes", "1025"],
        ["frobnicate"],
        ["--timeout", "0", "ping"],
        ["--timeout", "nan", "ping"],
        ["--timeout", "inf", "ping"],
        ["--timeout", "1e10", "ping"],
        ["get"],
        ["create", "k", "--rotate", "90"],
        ["create", "k", "--rotate", "off"],
        ["create", "k", "--rotate", "36501d"],
        ["config", "k"],
        ["config", "k", "--rotate", "1w"],
        ["config", "k", "--rotate", "0s"],
        ["retire", "k"],
        ["retire", "k", "0"],
        ["restore", "k", "x"],
        ["destroy", "k", "4294967296", "--yes"],
        ["rewrap"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = invoke(args)
    assert result.exit_code == 2
    assert result.stderr.startswith("kms: ")
    assert result.stderr.count("\n") == 1  # one line, not click's usage block


@pytest.mark.parametrize(
    "command",
    [
        ["get"],
        ["encrypt"],
        ["decrypt"],
        ["datakey"],
        ["create"],
        ["rotate"],
        ["info"],
        ["rewrap"],
        ["retire", "1"],
        ["restore", "1"],
        ["destroy", "1", "--yes"],
        ["config", "--rotate", "off"],
    ],
)
def test_bad_key_id_exits_13_before_connecting(command: list[str]) -> None:
    result = invoke([command[0], "bad key", *command[1:]])
    assert result.exit_code == 13  # a connection attempt would have been 3
    assert result.stderr.startswith("kms: ")
    assert result.stderr.count("\n") == 1


def test_empty_stdin_exits_5_before_connecting() -> None:
    result = invoke(["encrypt", "k"], stdin=b"")
    assert result.exit_code == 5
    assert result.stdout_bytes == b""


# ---------------------------------------------------------------------- real subprocesses


def kms(
    args: Sequence[str], env: dict[str, str] | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kms_client", *args],
        input=stdin,
        env=env if env is not None else {**os.environ, "KMS_SOCKET": "/nonexistent/kms.sock"},
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=False,
    )


def assert_fails(result: subprocess.CompletedProcess[bytes], status: int) -> None:
    assert result.returncode == status, result.stderr
    assert result.stderr.startswith(b"kms: ")
    assert result.stderr.count(b"\n") == 1  # one line, so never a traceback


def test_no_daemon_exits_3(short_tmp: Path) -> None:
    assert_fails(kms(["--socket", str(short_tmp / "absent.sock"), "ping"]), 3)


def test_scripted_failures_exit_codes(short_tmp: Path) -> None:
    silent_path = str(short_tmp / "silent.sock")
    with ScriptedServer(silent_path, silent):
        assert_fails(kms(["--socket", silent_path, "--timeout", "0.2", "ping"]), 4)
    garbage_path = str(short_tmp / "garbage.sock")
    with ScriptedServer(garbage_path, reply_with(lambda line: b"PONG?\n")):
        assert_fails(kms(["--socket", garbage_path, "ping"]), 6)
    future_path = str(short_tmp / "future.sock")
    with ScriptedServer(future_path, reply_with(lambda line: b"ERR NEW_IN_V2 soon\n")):
        assert_fails(kms(["--socket", future_path, "ping"]), 1)
    short_key_path = str(short_tmp / "short-key.sock")  # a key hook must not get 3 bytes
    with ScriptedServer(short_key_path, reply_with(lambda line: b"OK 1 AAAA\n")):
        result = kms(["--socket", short_key_path, "get", "k", "--format", "hex"])
        assert_fails(result, 6)
        assert result.stdout == b""


def test_key_commands(daemon: Daemon, daemon_env: dict[str, str]) -> None:
    def ok(*args: str) -> bytes:
        result = kms(args, daemon_env)
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        return result.stdout

    assert ok("ping") == b"PONG\n"
    assert ok("create", "demo", "--exportable") == b"1\n"
    assert ok("rotate", "demo") == b"2\n"
    hex_key = ok("get", "demo", "--format", "hex")
    assert re.fullmatch(rb"[0-9a-f]{64}\n", hex_key)
    assert ok("get", "demo") == hex_key
    key = bytes.fromhex(hex_key.decode())
    assert ok("get", "demo", "--format", "raw") == key
    b64_key = ok("get", "demo", "--format", "base64")
    assert b64_key.endswith(b"\n")
    assert base64.b64decode(b64_key[:-1], validate=True) == key
    old = ok("get", "demo", "--version", "1", "--format", "raw")
    assert len(old) == 32
    assert old != key

    info = ok("info", "demo")
    assert info.count(b"\n") == 1  # not a terminal: one line
    assert json.loads(info)["latest"] == 2

    hex_lines = ok("datakey", "demo").splitlines()
    assert re.fullmatch(rb"[0-9a-f]{64}", hex_lines[0])
    b64_lines = ok("datakey", "demo", "--bytes", "16", "--format", "base64").splitlines()
    assert len(base64.b64decode(b64_lines[0])) == 16
    doc = json.loads(ok("datakey", "demo", "--format", "json"))
    with Client(daemon.socket_path) as client:
        for data_key, wrapped in (
            (bytes.fromhex(hex_lines[0].decode()), hex_lines[1]),
            (base64.b64decode(b64_lines[0]), b64_lines[1]),
            (base64.b64decode(doc["key"]), doc["wrapped"].encode()),
        ):
            assert client.decrypt("demo", base64.b64decode(wrapped)) == data_key

    assert_fails(kms(["create", "demo"], daemon_env), 15)
    assert_fails(kms(["get", "nope"], daemon_env), 14)
    assert_fails(kms(["get", "demo", "--version", "9"], daemon_env), 14)
    assert ok("create", "sealed") == b"1\n"
    assert_fails(kms(["get", "sealed"], daemon_env), 16)
    assert_fails(kms(["get", "bad key"], daemon_env), 13)


def test_info_is_indented_on_a_terminal(daemon: Daemon, daemon_env: dict[str, str]) -> None:
    with Client(daemon.socket_path) as client:
        client.create("demo")
    primary, secondary = os.openpty()
    try:
        try:
            result = subprocess.run(
                [sys.executable, "-m", "kms_client", "info", "demo"],
                stdout=secondary,
                stderr=subprocess.PIPE,
                env=daemon_env,
                cwd=REPO,
                timeout=30,
                check=False,
            )
        finally:
            output = terminal_output(primary, secondary).replace(b"\r\n", b"\n")
    finally:
        os.close(primary)
    assert result.returncode == 0, result.stderr
    assert output.startswith(b"{\n  ")
    assert json.loads(output)["key_id"] == "demo"


def test_encrypt_decrypt_round_trips(daemon: Daemon, daemon_env: dict[str, str]) -> None:
    with Client(daemon.socket_path) as client:
        client.create("demo")
        raw = client.encrypt("demo", b"one raw ciphertext", b"ctx")

    every_byte = bytes(range(256)) * 3
    sealed = kms(["encrypt", "demo"], daemon_env, every_byte)
    assert sealed.returncode == 0, sealed.stderr
    assert sealed.stdout.startswith(STREAM_MAGIC)
    assert kms(["decrypt", "demo"], daemon_env, sealed.stdout).stdout == every_byte

    big = os.urandom(600 << 10)
    sealed = kms(["encrypt", "demo", "--aad", "tenant=7"], daemon_env, big)
    assert sealed.returncode == 0, sealed.stderr
    header, records = split_stream(sealed.stdout)
    assert len(records) == 3  # 256 KiB + 256 KiB + 88 KiB
    opened = kms(["decrypt", "demo", "--aad", "tenant=7"], daemon_env, sealed.stdout)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == big

    assert_fails(kms(["decrypt", "demo", "--aad", "tenant=8"], daemon_env, sealed.stdout), 18)
    assert_fails(kms(["decrypt", "demo"], daemon_env, sealed.stdout), 18)
    aad = ["--aad", "tenant=7"]
    assert_fails(kms(["decrypt", "demo", *aad], daemon_env, join_stream(header, records[:2])), 5)
    assert_fails(kms(["decrypt", "demo", *aad], daemon_env, sealed.stdout[:-100]), 5)
    assert_fails(kms(["decrypt", "demo", *aad], daemon_env, sealed.stdout + b"\x00"), 5)
    swapped = join_stream(header, [records[1], records[0], records[2]])
    assert_fails(kms(["decrypt", "demo", *aad], daemon_env, swapped), 18)
    assert_fails(kms(["encrypt", "demo"], daemon_env, b""), 5)
    assert_fails(kms(["encrypt", "nope"], daemon_env, b"x"), 14)
    assert_fails(kms(["decrypt", "demo"], daemon_env, b"neither a stream nor a ciphertext\n"), 18)
    too_long_for_one = os.urandom(900_000)  # neither, and past any single ciphertext: 18 too
    assert_fails(kms(["decrypt", "demo"], daemon_env, too_long_for_one), 18)

    opened = kms(["decrypt", "demo", "--aad", "ctx"], daemon_env, raw)
    assert (opened.returncode, opened.stdout) == (0, b"one raw ciphertext")
    as_text = base64.b64encode(raw) + b"\n"
    opened = kms(["decrypt", "demo", "--aad", "ctx"], daemon_env, as_text)
    assert (opened.returncode, opened.stdout) == (0, b"one raw ciphertext")

    made = kms(["datakey", "demo", "--format", "hex"], daemon_env, b"")
    assert made.returncode == 0, made.stderr
    key_hex, wrapped = made.stdout.splitlines()
    unwrapped = kms(["decrypt", "demo"], daemon_env, wrapped + b"\n")
    assert (unwrapped.returncode, unwrapped.stdout.hex()) == (0, key_hex.decode())


def test_a_non_blocking_stdin_is_read_to_its_end(
    daemon: Daemon, daemon_env: dict[str, str]
) -> None:
    """A parent may leave its pipe O_NONBLOCK: a moment with nothing to read must not
    end the input (it did: exit 0 and half the data sealed, or half the lines rewrapped)."""
    with Client(daemon.socket_path) as client:
        client.create("demo")
        old = [client.encrypt("demo", bytes([n]) * 10) for n in range(6)]
    lines = b"".join(base64.b64encode(ciphertext) + b"\n" for ciphertext in old)
    for args, data in ((["encrypt", "demo"], os.urandom(2000)), (["rewrap", "demo"], lines)):
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "kms_client", *args],
                stdin=read_end,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=daemon_env,
                cwd=REPO,
            )
        finally:
            os.close(read_end)
        with os.fdopen(write_end, "wb") as writer:
            writer.write(data[: len(data) // 2])
            writer.flush()
            time.sleep(0.5)  # the reader finds nothing ready, often
            writer.write(data[len(data) // 2 :])
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        if args[0] == "encrypt":
            assert kms(["decrypt", "demo"], daemon_env, out).stdout == data
        else:
            assert out.count(b"\n") == len(old)


@pytest.mark.parametrize(
    ("args", "closed"),
    [
        (["ping"], "stdout"),
        (["create", "closed/out"], "stdout"),
        (["encrypt", "demo"], "stdin"),
        (["rewrap", "demo"], "stdin"),
    ],
)
def test_a_closed_standard_stream_exits_5(
    daemon: Daemon, daemon_env: dict[str, str], args: list[str], closed: str
) -> None:
    """`>&-` or `<&-`: one line and exit 5, never a traceback, and (stdout) no request:
    a CREATE applied and then reported as failed would be retried into EXISTS."""
    redirect = ">&-" if closed == "stdout" else "<&-"
    command = shlex.join([sys.executable, "-m", "kms_client", *args])
    result = subprocess.run(
        ["sh", "-c", f"{command} {redirect}"],
        env=daemon_env,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert result.returncode == 5, result.stderr
    assert result.stderr.startswith(b"kms: ")
    assert result.stderr.count(b"\n") == 1
    if args[0] == "create":
        with Client(daemon.socket_path) as client, pytest.raises(KeyNotFound):
            client.info("closed/out")


def test_no_command_prints_the_help_as_it_is() -> None:
    """Not crushed onto one line, as click's other usage errors are."""
    result = kms([])
    assert result.returncode == 2
    assert result.stderr.startswith(b"Usage: ")
    assert b"\nCommands:\n" in result.stderr


@pytest.mark.parametrize("args", [["ping"], ["encrypt", "demo"]])
def test_broken_stdout_exits_5(daemon: Daemon, daemon_env: dict[str, str], args: list[str]) -> None:
    with Client(daemon.socket_path) as client:
        client.create("demo")
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout fails with EPIPE
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "kms_client", *args],
            stdin=subprocess.PIPE,
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=daemon_env,
            cwd=REPO,
        )
    finally:
        os.close(write_end)
    _, stderr = process.communicate(os.urandom(300 << 10), timeout=30)
    assert process.returncode == 5, stderr
    assert stderr.startswith(b"kms: ")
    assert stderr.count(b"\n") == 1
