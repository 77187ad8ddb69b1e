# Fuzzing the wire protocol (issue 3, "Hostile and broken clients"): hypothesis drives a live kmsd
# with random bytes, valid-looking requests, truncated lines and mixed batches, and the pure codec.
from __future__ import annotations

import base64
import contextlib
import itertools
import math
import random
import re
import selectors
import shutil
import socket
import string
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms_client import Client
from kms_client.errors import ERROR_CLASSES, ErrorCode, KmsError, TooLong
from kms_client.protocol import (
    MAX_KEY_ID_LENGTH,
    PROTOCOL_NAME,
    VERBS,
    Create,
    Decrypt,
    Encrypt,
    Err,
    GenerateDataKey,
    Get,
    Hello,
    Help,
    Info,
    LineFramer,
    Ok,
    Ping,
    Quit,
    Request,
    Rotate,
    format_error,
    format_ok,
    parse_request,
    parse_response,
)
from tests.conftest import Daemon, make_store

MAX_LINE = 4096  # small, so TOO_LONG is reachable with cheap examples
IDLE_TIMEOUT = 2.0
IO_TIMEOUT = 10.0  # one conversation taking longer than this is a hang

# Deterministic in CI: the same examples every run, nothing read from or written to a database.
FUZZ = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CODES = frozenset(code.value for code in ErrorCode)
# response = ok / err (protocol.md section 4), matched against a line without its LF.
RESPONSE = re.compile(rb"OK(?: [\x21-\x7e]+)*|ERR (?P<code>[A-Z_]+) [\x20-\x7e]+")

# The codes a v1 request that parsed may still get, per command (protocol.md section 6). DENIED
# and INTERNAL are absent: the fuzzing peer is the daemon's own uid and nothing may fail inside.
EXECUTION_CODES: dict[type[Request[Any]], frozenset[str]] = {
    Ping: frozenset(),
    Hello: frozenset(),
    Help: frozenset(),
    Quit: frozenset(),
    Create: frozenset({ErrorCode.EXISTS}),
    Rotate: frozenset({ErrorCode.NOT_FOUND}),
    Info: frozenset({ErrorCode.NOT_FOUND}),
    Get: frozenset({ErrorCode.NOT_FOUND, ErrorCode.NOT_EXPORTABLE}),
    Encrypt: frozenset({ErrorCode.NOT_FOUND}),
    Decrypt: frozenset({ErrorCode.NOT_FOUND, ErrorCode.BAD_CIPHERTEXT}),
    GenerateDataKey: frozenset({ErrorCode.NOT_FOUND}),
}
# The table of protocol.md section 4. Codes the closed set gained since (RETIRED) are taken as
# execution results of any request naming a key: the fuzzed keys may meet RETIRE and DESTROY.
V1_CODES = frozenset(
    {
        *("BAD_REQUEST", "UNKNOWN_COMMAND", "TOO_LONG", "BAD_KEY_ID", "NOT_FOUND", "EXISTS"),
        *("NOT_EXPORTABLE", "DENIED", "BAD_CIPHERTEXT", "UNAVAILABLE", "INTERNAL"),
    }
)
LATER_CODES = CODES - V1_CODES
# Never the answer to a request that parsed, whatever its verb.
NOT_FOR_PARSED = frozenset({"TOO_LONG", "UNKNOWN_COMMAND", "DENIED", "UNAVAILABLE", "INTERNAL"})
# REKEY makes the daemon read a file or run a command named in the request: not fuzzed.
FUZZED_VERBS = tuple(verb for verb in VERBS if verb != "REKEY")
HEALTH_KEY = "health/key"  # never named by a fuzzed request: RETIRE or DESTROY cannot reach it


# --------------------------------------------------------------------------- the live daemon


@dataclass
class Target:
    """The fuzzed daemon and what it holds, so that valid-looking requests sometimes succeed."""

    daemon: Daemon
    keys: tuple[bytes, ...]
    #: Keys for the verbs that retire, restore or destroy versions (each has versions 1-3).
    life_keys: tuple[bytes, ...]
    #: (key id, base64 ciphertext, base64 AAD or b""): DEC of these succeeds.
    sealed: tuple[tuple[bytes, bytes, bytes], ...]
    conversations: int = 0

    @property
    def path(self) -> str:
        return self.daemon.socket_path


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    root = Path(tempfile.mkdtemp(prefix="kms-", dir="/tmp"))
    daemon = make_store(root / "d")
    daemon.extra_args = ["--max-line", str(MAX_LINE), "--idle-timeout", str(IDLE_TIMEOUT)]
    daemon.start()
    try:
        with Client(daemon.socket_path) as client:
            client.create(HEALTH_KEY)
            client.create("fz/plain")
            client.create("fz/exp", exportable=True)
            client.create("fz/rot")
            client.rotate("fz/rot")
            life_keys = ("fz/life/0", "fz/life/1", "fz/life/2")
            for key_id in life_keys:
                client.create(key_id)
                client.rotate(key_id)
                client.rotate(key_id)
            sealed = [
                ("fz/plain", client.encrypt("fz/plain", b"hello"), b""),
                (
                    "fz/plain",
                    client.encrypt("fz/plain", b"tenant data", b"tenant=42"),
                    b"tenant=42",
                ),
                ("fz/exp", client.encrypt("fz/exp", bytes(range(40))), b""),
                ("fz/rot", client.encrypt("fz/rot", b"x", b"\xff"), b"\xff"),
                ("fz/plain", client.datakey("fz/plain", 16).wrapped, b""),
                ("fz/life/0", client.encrypt("fz/life/0", b"life"), b""),
            ]
        yield Target(
            daemon,
            keys=(b"fz/plain", b"fz/exp", b"fz/rot"),
            life_keys=tuple(key_id.encode() for key_id in life_keys),
            sealed=tuple(
                (key_id.encode(), base64.b64encode(ct), base64.b64encode(aad))
                for key_id, ct, aad in sealed
            ),
        )
    finally:
        daemon.discard()
        shutil.rmtree(root, ignore_errors=True)


class Hang(AssertionError):
    """The daemon neither answered nor closed within IO_TIMEOUT."""


class Conversation:
    """One raw connection that writes ``chunks`` in order while reading everything until EOF.

    Non-blocking with a selector, so a batch whose replies outgrow the socket buffers
    cannot deadlock us. A write refused because the daemon already closed (after QUIT or
    TOO_LONG) ends the writing; a reset ends the reading (both mean "closed").
    """

    def __init__(self, chunks: Sequence[bytes], pause: float, half_close: bool) -> None:
        self.pending = deque(chunk for chunk in chunks if chunk)
        self.pause = pause
        self.half_close = half_close
        self.outgoing = memoryview(b"")
        self.writing = True
        self.started = False
        self.received = bytearray()

    def next_chunk(self, sock: socket.socket, selector: selectors.BaseSelector) -> None:
        if not self.writing or self.outgoing:
            return
        if self.pending:
            if self.pause and self.started:
                time.sleep(self.pause)
            self.started = True
            self.outgoing = memoryview(self.pending.popleft())
            return
        self.writing = False
        if self.half_close:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        selector.modify(sock, selectors.EVENT_READ)

    def write(self, sock: socket.socket) -> None:
        try:
            self.outgoing = self.outgoing[sock.send(self.outgoing[:65536]) :]
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            self.outgoing = memoryview(b"")
            self.pending.clear()

    def read(self, sock: socket.socket) -> bool:
        """Read what is there; False at EOF."""
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False
        self.received += data
        return bool(data)

    def run(self, path: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
            selectors.DefaultSelector() as selector,
        ):
            sock.settimeout(timeout)
            sock.connect(path)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while True:
                self.next_chunk(sock, selector)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Hang(f"no EOF in {timeout} s; got {bytes(self.received)[-200:]!r}")
                for _, mask in selector.select(remaining):
                    if mask & selectors.EVENT_WRITE and self.outgoing:
                        self.write(sock)
                    if mask & selectors.EVENT_READ and not self.read(sock):
                        return bytes(self.received)


def converse(
    path: str,
    chunks: Sequence[bytes],
    *,
    pause: float = 0.0,
    half_close: bool = True,
    timeout: float = IO_TIMEOUT,
) -> bytes:
    """Write ``chunks`` (``pause`` s apart), half-close, and return all read until EOF."""
    return Conversation(chunks, pause, half_close).run(path, timeout)


def expected_requests(payload: bytes) -> tuple[list[bytes], bool]:
    """The request lines the daemon must answer one by one, and whether TOO_LONG ends it all.

    Reference framing from protocol.md sections 1-2, written independently of LineFramer:
    lines end with LF, one CR before it is dropped, a last line without LF is discarded;
    nothing after QUIT or after an overlong line is answered; an unterminated tail longer
    than max-line + 1 bytes is overlong too (the daemon does not wait for its LF).
    """
    *complete, tail = payload.split(b"\n")
    answered: list[bytes] = []
    for raw in complete:
        line = raw.removesuffix(b"\r")
        if len(line) > MAX_LINE:
            return answered, True
        answered.append(line)
        if line.upper() == b"QUIT":
            return answered, False
    return answered, len(tail) > MAX_LINE + 1


def parsed(line: bytes) -> Request[Any] | str:
    """The request the codec reads in ``line``, or the code of the error it refuses it with."""
    try:
        return parse_request(line)
    except KmsError as error:
        return error.code


def check_reply(line: bytes, reply: bytes) -> None:
    """``reply`` is what protocol v1 allows for request ``line`` (codes only, never messages)."""
    request = parsed(line)
    if isinstance(request, str):
        assert request != ErrorCode.TOO_LONG
        assert reply.startswith(b"ERR "), (line, reply)
        assert reply.split(b" ")[1] == request.encode(), (line, reply)
        return
    response = parse_response(reply)
    if isinstance(response, Err):
        if type(request) in EXECUTION_CODES:
            later = LATER_CODES if hasattr(request, "key_id") else frozenset()
            assert response.code in EXECUTION_CODES[type(request)] | later, (line, reply)
        else:  # a verb protocol.md does not describe yet: any result but a failure
            assert response.code in CODES - NOT_FOR_PARSED, (line, reply)
        return
    # Typed parsing checks the field count and syntax: a malformed OK raises ProtocolViolation.
    value = request.parse_reply(response)
    if isinstance(request, Ping | Quit):
        assert reply == (b"OK PONG" if isinstance(request, Ping) else b"OK BYE")
    elif isinstance(request, Help):
        assert value == VERBS
    elif isinstance(request, Hello):
        assert response.fields[0] == PROTOCOL_NAME
    elif isinstance(request, Create):
        assert value == 1
    elif isinstance(request, Rotate):
        assert value >= 2


def check_conversation(payload: bytes, received: bytes) -> None:
    """Every reply is well formed, one per answered request, in order; nothing after the end."""
    assert received == b"" or received.endswith(b"\n"), received[-200:]
    replies = received.split(b"\n")[:-1]
    for reply in replies:
        match = RESPONSE.fullmatch(reply)
        assert match is not None, reply
        assert match["code"] is None or match["code"].decode() in CODES, reply
    answered, too_long = expected_requests(payload)
    assert len(replies) == len(answered) + too_long, (len(replies), len(answered), too_long)
    for line, reply in zip(answered, replies, strict=False):
        check_reply(line, reply)
    if too_long:
        assert replies[-1].startswith(b"ERR TOO_LONG "), replies[-1]


def fuzz_once(target: Target, payload: bytes, cuts: Sequence[int] = (), pause: float = 0.0) -> None:
    edges = [0, *sorted(min(cut, len(payload)) for cut in cuts), len(payload)]
    chunks = [payload[start:end] for start, end in itertools.pairwise(edges)]
    target.conversations += 1
    check_conversation(payload, converse(target.path, chunks, pause=pause))


def run_fuzz(target: Target, fuzz: Callable[[], None], at_least: int) -> None:
    """Run a hypothesis test against ``target``, check it ran enough conversations and that
    the daemon is still healthy afterwards."""
    before = target.conversations
    fuzz()
    assert target.conversations - before >= at_least
    assert_daemon_healthy(target)


def assert_daemon_healthy(target: Target) -> None:
    """Alive, serving a well-behaved client, and nothing alarming in its log."""
    process = target.daemon.process
    assert process is not None
    assert process.poll() is None, target.daemon.log.read_text()[-2000:]
    with Client(target.path, timeout=IO_TIMEOUT) as client:
        client.ping()
        assert client.hello()
        ciphertext = client.encrypt(HEALTH_KEY, b"still serving", b"aad")
        assert client.decrypt(HEALTH_KEY, ciphertext, b"aad") == b"still serving"
        data_key = client.datakey(HEALTH_KEY)
        assert client.decrypt(HEALTH_KEY, data_key.wrapped) == data_key.key
    log = target.daemon.log.read_text(errors="replace")
    assert "Traceback" not in log
    assert "internal error" not in log.lower()
    assert '"result":"INTERNAL"' not in log


# --------------------------------------------------------------------------- strategies


def weighted(*choices: tuple[int, st.SearchStrategy[bytes]]) -> st.SearchStrategy[bytes]:
    """``st.one_of`` with weights (one_of drops repeated strategies, so it cannot weigh)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


_ALNUM = string.ascii_letters + string.digits
_SEGMENT = st.builds(
    str.__add__, st.sampled_from(_ALNUM), st.text(_ALNUM + "._-", max_size=10)
).map(str.encode)
RANDOM_KEY_IDS = st.one_of(
    st.lists(_SEGMENT, min_size=1, max_size=4).map(b"/".join).map(lambda k: b"fz/new/" + k),
    st.just(b"fz/" + b"L" * (MAX_KEY_ID_LENGTH - 3)),
)
INVALID_KEY_IDS = st.one_of(
    st.sampled_from(
        [
            *(b"..", b".", b"/x", b"x/", b"/", b"a//b", b"a/../b", b".hidden", b"-x", b"_v1"),
            *(b"a:b", b"a\\b", b"a\x00b", b"a\rb", b"a\tb", b"caf\xc3\xa9", b"fz/plain/"),
            *(b"fz/" + b"L" * (MAX_KEY_ID_LENGTH - 2), b"FZ/PLAIN\xff"),
        ]
    ),
    st.builds(bytes.__add__, _SEGMENT, st.sampled_from([b"/", b"*", b"\x7f", b"\xe2\x80\x8b"])),
)

_B64_CHARS = (string.ascii_letters + string.digits + "+/").encode()
VALID_B64 = st.binary(min_size=1, max_size=48).map(base64.b64encode)


def _spoil(token: bytes, how: int, where: int) -> bytes:
    """A near miss of valid base64: each way is one that lenient decoders accept or repair."""
    position = where % max(len(token), 1)
    if how == 0:
        return token.rstrip(b"=")  # missing padding
    if how == 1:
        return token + b"="  # extra padding
    if how == 2 and token.endswith(b"="):  # non-canonical: set the unused bits of the last symbol
        stripped = token.rstrip(b"=")
        last = _B64_CHARS.index(stripped[-1:])
        bits = 0x0F if token.endswith(b"==") else 0x03
        spoiled = _B64_CHARS[last | bits]
        return stripped[:-1] + bytes([spoiled]) + token[len(stripped) :]
    if how == 3:  # a foreign byte: URL-safe alphabet, padding inside, white space, non-ASCII
        foreign = [b"-", b"_", b"=", b"*", b"\t", b"\r", b"\x00", b"\xc3\xa9", b"."][where % 9]
        return token[:position] + foreign + token[position + 1 :]
    if how == 4:
        return token[:position]  # truncated anywhere (length no longer a multiple of 4)
    return token.lower()


NEAR_B64 = st.builds(_spoil, VALID_B64, st.integers(0, 5), st.integers(0, 1000))
NUMBERS = st.one_of(
    st.sampled_from(
        [
            *(b"0", b"1", b"2", b"3", b"01", b"007", b"16", b"32", b"1024", b"1025"),
            *(b"4294967295", b"4294967296", b"99999999999", b"-1", b"+1", b"1.0", b"1e3"),
            *(b"0x10", b"\xd9\xa1"),  # hex; ARABIC-INDIC ONE, which int() of a str accepts
        ]
    ),
    st.integers(0, 10**40).map(lambda n: str(n).encode()),
    st.builds(bytes.__add__, st.sampled_from([b"0", b"00"]), st.integers(1, 99).map(b"%d".__mod__)),
)
EXPORTABLE = st.sampled_from(
    [b"exportable", b"EXPORTABLE", b"Exportable", b"exportabl", b"exportables", b"exportable\x00"]
)
ROTATE_OPTIONS = st.builds(
    bytes.__add__,
    st.sampled_from([b"rotate=", b"ROTATE=", b"rotate", b"rotate=="]),
    st.one_of(
        st.sampled_from([b"1s", b"45s", b"30m", b"12h", b"90d", b"36500d", b"36501d", b"off"]),
        st.sampled_from([b"OFF", b"0s", b"01d", b"1", b"d", b"1w", b"-1d", b"1.5h", b""]),
        NUMBERS,
    ),
)
ASCII_TOKENS = st.text(
    st.characters(min_codepoint=0, max_codepoint=127, exclude_characters="\n"),
    min_size=1,
    max_size=12,
).map(str.encode)
NON_ASCII_TOKENS = st.one_of(
    st.text(st.characters(min_codepoint=128), min_size=1, max_size=6).map(str.encode),
    st.binary(min_size=1, max_size=8).filter(lambda b: not b.isascii() and b"\n" not in b),
)


def _long_b64(size: int, seed: int) -> bytes:
    return base64.b64encode(random.Random(seed).randbytes(size))


# Base64 tokens whose request lines straddle --max-line: some fit, some are TOO_LONG.
LONG_TOKENS = st.one_of(
    st.builds(_long_b64, st.integers(3000, 3090), st.integers(0, 2**32)),
    st.integers(MAX_LINE - 20, MAX_LINE + 20).map(lambda n: b"A" * n),
)

VERB_CHOICES = [verb for verb in FUZZED_VERBS if verb != "QUIT"] * 4 + ["QUIT"]  # QUIT ends it
NEAR_MISS_VERBS = sorted(
    {
        spelled
        for verb in FUZZED_VERBS
        for spelled in (
            verb[:-1],
            verb + "S",
            "X" + verb,
            verb * 2,
            verb + "\x00",
            verb + "\r",
            "\t" + verb,
            verb.replace("I", "\u0130").replace("E", "\u00c9"),
        )
    }
    | {"", "LIST", "FOO", "OK", "ERR", "PONG", "BYE", "KMS/1", "\x1b[2J"}
)


@st.composite
def verbs(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(NEAR_MISS_VERBS)).encode()
    verb = draw(st.sampled_from(VERB_CHOICES))
    lower = draw(st.integers(0, 2 ** len(verb) - 1))  # one bit per letter: random case
    return "".join(c.lower() if lower >> i & 1 else c for i, c in enumerate(verb)).encode()


VERB_SPELLINGS = verbs()


# The argument kinds each verb takes ("?" = optional), to build requests that often parse.
# A verb of VERBS missing here gets free-form arguments.
SCHEMAS: dict[str, list[str]] = {
    "PING": [],
    "HELLO": [],
    "HELP": [],
    "QUIT": [],
    "CREATE": ["key", "?exportable", "?rotate"],
    "ROTATE": ["key"],
    "INFO": ["key"],
    "GET": ["key", "?version"],
    "ENC": ["key", "b64", "?b64"],
    "DEC": ["key", "ciphertext", "?b64"],
    "DATAKEY": ["key", "?nbytes"],
    "REWRAP": ["key", "ciphertext", "?b64"],
    "RETIRE": ["lifekey", "version"],
    "RESTORE": ["lifekey", "version"],
    "DESTROY": ["lifekey", "version"],
    "CONFIG": ["lifekey", "rotate"],
}
SEPARATORS = st.sampled_from([b" "] * 20 + [b"  ", b"\t", b"\r", b" \r", b"\x0b", b"\x00"])
ENDINGS = st.sampled_from([b"\n"] * 8 + [b"\r\n", b"\r\r\n"])


def argument_kinds(target: Target) -> dict[str, st.SearchStrategy[bytes]]:
    """A strategy per argument kind, built once per test (building them per draw is slow)."""
    existing = st.sampled_from(target.keys)
    real_ciphertexts = st.sampled_from([sealed[1] for sealed in target.sealed])
    kinds: dict[str, st.SearchStrategy[bytes]] = {
        "key": weighted((4, existing), (1, RANDOM_KEY_IDS), (2, INVALID_KEY_IDS)),
        "lifekey": weighted(
            (4, st.sampled_from(target.life_keys)), (1, RANDOM_KEY_IDS), (2, INVALID_KEY_IDS)
        ),
        "b64": weighted((3, VALID_B64), (2, NEAR_B64), (1, real_ciphertexts)),
        "ciphertext": st.one_of(
            real_ciphertexts,
            st.builds(_spoil, real_ciphertexts, st.integers(0, 5), st.integers(0, 1000)),
            VALID_B64,
        ),
        "version": st.one_of(st.sampled_from([b"1", b"2", b"3"]), NUMBERS),
        "nbytes": st.one_of(st.sampled_from([b"1", b"16", b"32", b"1024"]), NUMBERS),
        "exportable": weighted((3, EXPORTABLE), (1, ASCII_TOKENS)),
        "rotate": weighted((3, ROTATE_OPTIONS), (1, ASCII_TOKENS)),
    }
    kinds["any"] = st.one_of(
        *kinds.values(), NUMBERS, ASCII_TOKENS, NON_ASCII_TOKENS, INVALID_KEY_IDS, LONG_TOKENS
    )
    kinds["sealed"] = st.sampled_from([b" ".join(filter(None, sealed)) for sealed in target.sealed])
    return kinds


@st.composite
def request_lines(draw: st.DrawFn, kinds: dict[str, st.SearchStrategy[bytes]]) -> bytes:
    """One valid-looking request line with its line ending."""
    verb = draw(VERB_SPELLINGS)
    schema = SCHEMAS.get(verb.decode("ascii", "replace").upper(), [])
    shape = draw(st.integers(0, 7))
    if shape == 0:  # free form: 0-4 tokens of any kind
        kinds_drawn = ["any"] * draw(st.integers(0, 4))
    elif shape == 1 and schema and schema[1:2] == ["ciphertext"]:
        kinds_drawn = ["sealed"]  # key, its own ciphertext and AAD: DEC that succeeds
    else:  # the verb's own arguments, optional ones kept or not, then perhaps damaged
        kinds_drawn = [
            k.lstrip("?") for k in schema if not k.startswith("?") or draw(st.booleans())
        ]
        damage = draw(st.integers(0, 9))
        if damage == 0 and kinds_drawn:
            kinds_drawn.pop()
        elif damage == 1:
            kinds_drawn.append("any")
        elif damage == 2 and kinds_drawn:
            kinds_drawn[draw(st.integers(0, len(kinds_drawn) - 1))] = "any"
    tokens = [verb]
    for kind in kinds_drawn:
        tokens.extend(draw(kinds[kind]).split(b" ") if kind == "sealed" else [draw(kinds[kind])])
    line = tokens[0]
    for token in tokens[1:]:
        line += draw(SEPARATORS) + token
    edge = draw(st.integers(0, 30))
    if edge == 0:
        line = b" " + line
    elif edge == 1:
        line += b" "
    return line + draw(ENDINGS)


RANDOM_BYTES = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"\n", b"\n", b"\r\n", b"\r", b" ", b"\x00"]),
    ),
    max_size=30,
).map(b"".join)


def truncated(line: bytes, cut: int) -> bytes:
    """``line`` (with its ending) cut before its LF: never a complete request."""
    body = line[: line.rindex(b"\n")]
    return body[: cut % (len(body) + 1)]


@st.composite
def chunkings(draw: st.DrawFn, size: int) -> list[int]:
    if size == 0 or draw(st.booleans()):
        return []  # one write
    return draw(st.lists(st.integers(0, size), max_size=12))


# --------------------------------------------------------------------------- live fuzzing


def test_random_bytes_with_newlines(target: Target) -> None:
    """(a) Arbitrary bytes with LF, CR and spaces sprinkled in, in one write or several."""

    @FUZZ
    @given(data=st.data(), payload=RANDOM_BYTES)
    def fuzz(data: st.DataObject, payload: bytes) -> None:
        fuzz_once(target, payload, data.draw(chunkings(len(payload))))

    run_fuzz(target, fuzz, at_least=1000)


def test_valid_looking_requests_and_truncated_lines(target: Target) -> None:
    """(b) + (c) Batches of valid-looking requests, split anywhere, perhaps cut mid-line."""
    kinds = argument_kinds(target)

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        lines = data.draw(st.lists(request_lines(kinds), min_size=0, max_size=8))
        payload = b"".join(lines)
        ending = data.draw(st.integers(0, 3))
        if ending == 0:  # a request cut at a random point, no LF: discarded without a reply
            payload += truncated(data.draw(request_lines(kinds)), data.draw(st.integers()))
        elif ending == 1 and lines:  # the batch's own last line loses its LF
            payload = payload[: payload.rindex(b"\n")]
        cuts = data.draw(chunkings(len(payload)))
        pause = data.draw(st.sampled_from([0.0] * 7 + [0.0005])) if cuts else 0.0
        fuzz_once(target, payload, cuts, pause)

    run_fuzz(target, fuzz, at_least=1000)


def test_mixed_batches_in_one_write(target: Target) -> None:
    """(d) Many lines of every kind pipelined in one write, perhaps with an unfinished tail."""
    kinds = argument_kinds(target)

    any_line = weighted(
        (12, request_lines(kinds)),
        (3, st.builds(bytes.__add__, RANDOM_BYTES, ENDINGS)),
        (1, st.builds(bytes.__add__, LONG_TOKENS, ENDINGS)),
    )

    @settings(FUZZ, max_examples=600)
    @given(
        lines=st.lists(any_line, min_size=3, max_size=60),
        tail=st.one_of(
            st.just(b""), RANDOM_BYTES.map(lambda b: b.replace(b"\n", b"")), LONG_TOKENS
        ),
    )
    def fuzz(lines: list[bytes], tail: bytes) -> None:
        fuzz_once(target, b"".join(lines) + tail)

    run_fuzz(target, fuzz, at_least=500)


def test_truncated_line_without_half_close_is_closed_by_the_idle_timeout(target: Target) -> None:
    """A client that stops mid-line and stays connected gets its replies, then is cut off."""
    started = time.monotonic()
    received = converse(
        target.path,
        [b"PING\r\nENC fz/plain aGk=\n", b"DEC fz/plain " + target.sealed[0][1][:10]],
        pause=0.05,
        half_close=False,
        timeout=IDLE_TIMEOUT + 8.0,
    )
    elapsed = time.monotonic() - started
    check_conversation(b"PING\r\nENC fz/plain aGk=\n", received)
    assert IDLE_TIMEOUT - 0.5 <= elapsed <= IDLE_TIMEOUT + 5.0, elapsed


def read_lines(sock: socket.socket, count: int) -> list[bytes]:
    buffer = b""
    while buffer.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
    return buffer.split(b"\n")[:-1]


def test_partial_line_clock_starts_when_the_daemon_waits_for_it(short_tmp: Path) -> None:
    """Time the daemon spends answering a batch does not count against the line after it.

    A pipelined batch that ends mid-line (any large receive does) leaves a partial line;
    protocol.md section 1 gives the client --idle-timeout seconds for it from "the server
    starting to wait for it", that is after the batch is served, however long that took.
    (It once started at the receive, and a batch served for longer than the timeout cut
    the connection at once.) Here the client completes the line at once.
    """
    idle = 1.0
    daemon = make_store(short_tmp / "slow")
    daemon.extra_args = ["--idle-timeout", str(idle)]
    daemon.start()
    try:
        with Client(daemon.socket_path) as client:
            client.create("s")
            started = time.monotonic()
            client.pipeline([Rotate("s")] * 100)
            per_rotate = (time.monotonic() - started) / 100
        count = math.ceil(3 * idle / per_rotate)  # a batch served in about 3 idle timeouts
        if count > 7000:  # "ROTATE s\n" * 7000 still arrives in one 64 KiB receive
            pytest.skip(f"ROTATE takes {per_rotate * 1e6:.0f} us here: too fast to reproduce")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.connect(daemon.socket_path)
            sock.sendall(b"ROTATE s\n" * count + b"PI")
            replies = read_lines(sock, count)
            assert len(replies) == count
            assert all(reply.startswith(b"OK ") for reply in replies)
            try:  # the client completes its line the moment the daemon can read it
                sock.sendall(b"NG\n")
                sock.shutdown(socket.SHUT_WR)
                rest = read_lines(sock, 1)
            except (BrokenPipeError, ConnectionResetError):
                rest = []
        assert rest == [b"OK PONG"]
    finally:
        daemon.kill()


def test_daemon_survives_the_fuzzing(target: Target) -> None:
    """Runs last (file order): the daemon took every conversation above and still serves."""
    assert_daemon_healthy(target)
    with Client(target.path) as client:
        assert client.rotate(HEALTH_KEY) == 2  # created once, rotated only here
        assert client.info(HEALTH_KEY)["latest"] == 2


# --------------------------------------------------------------------------- the pure codec


def reference_lines(data: bytes, max_line: int) -> tuple[list[bytes], bool]:
    """What a framer must yield for ``data``, and whether it then raises TooLong."""
    *complete, tail = data.split(b"\n")
    lines: list[bytes] = []
    for raw in complete:
        line = raw.removesuffix(b"\r")
        if len(line) > max_line:
            return lines, True
        lines.append(line)
    return lines, len(tail) > max_line + 1


STREAMS = st.lists(
    st.one_of(
        st.binary(max_size=30),
        st.sampled_from([b"\n", b"\r\n", b"\r", b"\r\r\n", b"PING\n", b"x" * 70, b"y" * 130]),
    ),
    max_size=40,
).map(b"".join)


@settings(FUZZ, max_examples=1000)
@given(data=st.data(), stream=STREAMS, max_line=st.sampled_from([1, 2, 8, 63, 64, 65, 128, 4096]))
def test_line_framer_chunking_matches_a_reference_split(
    data: st.DataObject, stream: bytes, max_line: int
) -> None:
    """Fed in any chunking and drained after each feed (as every caller does), LineFramer
    yields exactly the reference lines, in order, and raises TooLong exactly when due."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=25)))
    edges = [0, *cuts, len(stream)]
    framer = LineFramer(max_line)
    lines: list[bytes] = []
    too_long = False
    try:
        for start, end in itertools.pairwise(edges):
            framer.feed(stream[start:end])
            lines.extend(framer.lines())
    except TooLong:
        too_long = True
    expected, expected_too_long = reference_lines(stream, max_line)
    assert (lines, too_long) == (expected, expected_too_long)
    if not too_long:
        assert framer.has_partial_line == bool(stream.split(b"\n")[-1])


PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)
FIELDS = st.lists(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1).map(str.encode),
    max_size=6,
)


@settings(FUZZ, max_examples=500)
@given(error_class=st.sampled_from(sorted(ERROR_CLASSES.values(), key=str)), message=PRINTABLE)
def test_format_error_parses_back(error_class: type[KmsError], message: str) -> None:
    for error in (error_class(), error_class(message)):
        line = format_error(error)
        assert line.endswith(b"\n")
        assert RESPONSE.fullmatch(line[:-1])
        assert parse_response(line[:-1]) == Err(error.code, error.message)


@settings(FUZZ, max_examples=500)
@given(fields=FIELDS)
def test_format_ok_parses_back(fields: list[bytes]) -> None:
    line = format_ok(*fields)
    assert line.endswith(b"\n")
    assert b"\n" not in line[:-1]
    assert RESPONSE.fullmatch(line[:-1])
    assert parse_response(line[:-1]) == Ok(tuple(field.decode() for field in fields))
