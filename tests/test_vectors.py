# The examples of protocol.md, checked two ways: the document against tests/vectors/*.txt, and
# every vector against a live kmsd over a real Unix socket, one request at a time and pipelined.
"""Transcript vectors of protocol v1 (format: ``protocol.md`` section 9.1).

A vector file is ``#`` comment lines saying what the scenario shows (a comment
``# kmsd: ARGS`` adds arguments to ``kmsd serve``), then the transcript, which
must equal the fenced ```` ```transcript <name> ```` block of ``protocol.md``.

Transcript lines: ``C: <request>`` (``\\r``, ``\\t``, ``\\xHH``, ``\\\\`` escapes; a
leading or trailing space written ``\\x20``; ``C:`` alone is an empty line),
``S: <exact reply>``, ``S~ <regex the reply fullmatches>``. A named group of an
``S~`` regex binds a value that later lines use as ``{name}`` (in an ``S~`` line,
regex-escaped). Anything else fails.

Every vector uses its own key ids (checked below), so all vectors run against
one daemon per mode and daemon arguments: from each vector's point of view the
store is empty, and the whole file starts five daemons instead of ~70.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kms_client.errors import ErrorCode
from kms_client.protocol import DEFAULT_MAX_LINE, VERBS
from tests.conftest import Daemon, exchange, make_store

TESTS = Path(__file__).resolve().parent
SPEC = TESTS.parent / "protocol.md"
VECTOR_DIR = TESTS / "vectors"
IO_TIMEOUT = 10.0

_NAME_RE = re.compile(r"[a-z0-9_]+")
_REF_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ESCAPE_RE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rt\\])")
_ESCAPES = {"r": b"\r", "t": b"\t", "\\": b"\\"}
_KMSD_COMMENT = "# kmsd:"
#: Verbs whose first argument is a key id: all but these.
_KEY_VERBS = frozenset(VERBS) - {"PING", "HELLO", "HELP", "QUIT", "REKEY"}
#: Protocol keywords a request may hold and an error message may name (usage texts).
_KEYWORDS = frozenset({*VERBS, "EXPORTABLE", "FILE", "PASSPHRASE"})
#: Replies after which the server closes the connection.
_CLOSING_REPLIES = ("OK BYE", "ERR TOO_LONG ")


class TranscriptError(Exception):
    """protocol.md or a vector file breaks the transcript format."""


# --------------------------------------------------------------------------- the format


def _unescape(text: str) -> bytes:
    out = bytearray()
    position = 0
    while (backslash := text.find("\\", position)) >= 0:
        out += text[position:backslash].encode("ascii")
        match = _ESCAPE_RE.match(text, backslash)
        if match is None:
            raise TranscriptError(f"unknown escape in {text!r}")
        escape = match.group(1)
        out += _ESCAPES[escape] if escape in _ESCAPES else bytes([int(escape[1:], 16)])
        position = match.end()
    return bytes(out + text[position:].encode("ascii"))


def request_bytes(text: str, bound: Mapping[str, str]) -> bytes:
    """The request line a ``C:`` text stands for, LF included, with ``{names}`` filled in."""
    out = bytearray()
    position = 0
    for match in _REF_RE.finditer(text):
        out += _unescape(text[position : match.start()]) + bound[match.group(1)].encode("ascii")
        position = match.end()
    return bytes(out + _unescape(text[position:]) + b"\n")


def _fill(text: str, bound: Mapping[str, str], quote: Callable[[str], str]) -> str:
    return _REF_RE.sub(lambda match: quote(bound[match.group(1)]), text)


@dataclass(frozen=True)
class Exchange:
    """One request line and the reply it must get."""

    request: str
    reply: str
    pattern: bool

    def expected(self, bound: Mapping[str, str]) -> re.Pattern[str] | str:
        if self.pattern:
            return re.compile(_fill(self.reply, bound, re.escape))
        return _fill(self.reply, bound, str)

    @property
    def closes(self) -> bool:
        return not self.pattern and self.reply.startswith(_CLOSING_REPLIES)


def parse_transcript(where: str, body: str) -> tuple[Exchange, ...]:
    """The exchanges of a transcript body; :class:`TranscriptError` on any format error."""
    if not body.endswith("\n"):
        raise TranscriptError(f"{where}: a transcript ends with a newline")
    exchanges: list[Exchange] = []
    request: str | None = None
    bound: set[str] = set()
    for number, line in enumerate(body[:-1].split("\n"), 1):
        at = f"{where}, line {number}"
        if not all(" " <= char <= "~" for char in line):
            raise TranscriptError(f"{at}: only printable ASCII; escape other bytes")
        if exchanges and exchanges[-1].closes:
            raise TranscriptError(f"{at}: nothing may follow a reply that closes the connection")
        prefix, text = line[:3], line[3:]
        if line == "C:" or prefix == "C: ":
            if request is not None:
                raise TranscriptError(f"{at}: a request before the reply to the previous one")
            if text != text.strip():
                raise TranscriptError(f"{at}: write a leading or trailing space as \\x20")
            _unescape(text)
            request = text
        elif prefix in ("S: ", "S~ "):
            if request is None:
                raise TranscriptError(f"{at}: a reply without a request")
            exchanges.append(_exchange(at, Exchange(request, text, prefix == "S~ "), bound))
            request = None
        else:
            raise TranscriptError(f"{at}: unknown line prefix {prefix!r}")
    if request is not None:
        raise TranscriptError(f"{where}: the last request has no reply")
    if not exchanges:
        raise TranscriptError(f"{where}: an empty transcript")
    return tuple(exchanges)


def _exchange(at: str, exchange_: Exchange, bound: set[str]) -> Exchange:
    """Check the names an exchange uses and add those its regex defines to ``bound``."""
    used = set(_REF_RE.findall(exchange_.request)) | set(_REF_RE.findall(exchange_.reply))
    if used - bound:
        raise TranscriptError(f"{at}: {sorted(used - bound)} not defined before")
    if exchange_.pattern:
        try:
            placeholders = dict.fromkeys(bound, "x")
            defined = set(re.compile(_fill(exchange_.reply, placeholders, re.escape)).groupindex)
        except re.error as error:
            raise TranscriptError(f"{at}: bad regex: {error}") from None
        if defined & bound:
            raise TranscriptError(f"{at}: {sorted(defined & bound)} defined twice")
        bound |= defined
    return exchange_


def spec_transcripts(text: str) -> dict[str, str]:
    """The ```transcript <name>``` blocks of protocol.md, by name."""
    blocks: dict[str, str] = {}
    info: str | None = None
    content: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        if info is None:
            if line.startswith("```"):
                info, content = line[3:].strip(), []
            continue
        if line != "```":
            content.append(line + "\n")
            continue
        words = info.split()
        if words[:1] == ["transcript"]:
            if len(words) != 2 or not _NAME_RE.fullmatch(words[1]):
                raise TranscriptError(f"protocol.md line {number}: want ```transcript <name>")
            if words[1] in blocks:
                raise TranscriptError(f"protocol.md: two transcripts named {words[1]}")
            blocks[words[1]] = "".join(content)
        elif any(item.startswith(("C: ", "S: ", "S~ ")) for item in content):
            raise TranscriptError(
                f"protocol.md line {number}: an example outside a transcript block"
            )
        info = None
    if info is not None:
        raise TranscriptError("protocol.md: a code block is not closed")
    return blocks


@dataclass(frozen=True)
class Vector:
    name: str
    comments: tuple[str, ...]
    body: str
    exchanges: tuple[Exchange, ...]
    kmsd_args: tuple[str, ...] = field(default=())


def read_vector(path: Path) -> Vector:
    text = path.read_text(encoding="ascii")
    lines = text.split("\n")
    count = 0
    while count < len(lines) and lines[count].startswith("#"):
        count += 1
    comments = tuple(lines[:count])
    if not any(line[1:].strip() and not line.startswith(_KMSD_COMMENT) for line in comments):
        raise TranscriptError(f"{path.name}: begin with # lines saying what the scenario shows")
    body = "\n".join(lines[count:])
    args = tuple(
        arg
        for line in comments
        if line.startswith(_KMSD_COMMENT)
        for arg in shlex.split(line[len(_KMSD_COMMENT) :])
    )
    return Vector(path.stem, comments, body, parse_transcript(path.name, body), args)


def vector_names() -> list[str]:
    return sorted(path.stem for path in VECTOR_DIR.glob("*.txt"))


def load(name: str) -> Vector:
    return read_vector(VECTOR_DIR / f"{name}.txt")


def request_tokens(text: str) -> list[bytes]:
    return request_bytes(text, _Placeholder())[:-1].split(b" ")


class _Placeholder(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


# --------------------------------------------------------------------------- the document


def test_every_transcript_of_the_spec_is_a_vector_and_back() -> None:
    in_spec = set(spec_transcripts(SPEC.read_text(encoding="utf-8")))
    on_disk = set(vector_names())
    assert in_spec - on_disk == set(), "transcripts of protocol.md without tests/vectors/*.txt"
    assert on_disk - in_spec == set(), "tests/vectors/*.txt not shown in protocol.md"
    assert len(in_spec) >= 25


@pytest.mark.parametrize("name", vector_names())
def test_vector_equals_its_transcript_in_the_spec(name: str) -> None:
    vector = load(name)
    assert vector.body == spec_transcripts(SPEC.read_text(encoding="utf-8")).get(name)


def test_each_vector_has_its_own_key_ids() -> None:
    """What lets every vector share a daemon yet see an empty store."""
    owner: dict[bytes, str] = {}
    for name in vector_names():
        for exchange_ in load(name).exchanges:
            tokens = request_tokens(exchange_.request)
            if tokens[0].upper().decode("ascii", "replace") in _KEY_VERBS and len(tokens) > 1:
                key_id = tokens[1]
                assert owner.setdefault(key_id, name) == name, f"{key_id!r} in {owner[key_id]}"


def test_error_replies_use_the_closed_set_and_hide_the_request() -> None:
    codes = set(ErrorCode)
    for name in vector_names():
        for exchange_ in load(name).exchanges:
            if exchange_.pattern or not exchange_.reply.startswith("ERR "):
                continue
            _, code, message = exchange_.reply.split(" ", 2)
            assert code in codes, f"{name}: {code}"
            for token in request_tokens(exchange_.request)[1:]:
                data = token.decode("ascii", "replace")
                if len(data) >= 3 and data.upper() not in _KEYWORDS:
                    assert data not in message, f"{name}: {message}"


def test_life_cycle_verbs_name_a_key() -> None:
    assert {"REWRAP", "RETIRE", "RESTORE", "DESTROY", "CONFIG"} <= _KEY_VERBS


def test_spec_tables_match_the_code() -> None:
    spec = SPEC.read_text(encoding="utf-8")
    error_row = r"^\| `([A-Z_]+)` \| .* \| (?:connection usable|\*\*connection closed\*\*) \|$"
    table_codes = set(re.findall(error_row, spec, re.MULTILINE))
    assert table_codes == set(ErrorCode)
    assert f"`OK {' '.join(VERBS)}`" in spec


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ("X: PING\nS: OK PONG\n", "unknown line prefix"),
        ("C:PING\nS: OK PONG\n", "unknown line prefix"),
        ("C: PING\nS:OK PONG\n", "unknown line prefix"),
        ("# comment\nC: PING\nS: OK PONG\n", "unknown line prefix"),
        ("\nC: PING\nS: OK PONG\n", "unknown line prefix"),
        ("S: OK PONG\n", "a reply without a request"),
        ("C: PING\nC: PING\nS: OK PONG\n", "a request before the reply"),
        ("C: PING\n", "has no reply"),
        ("C: PING\nS: OK PONG", "ends with a newline"),
        ("", "ends with a newline"),
        ("C: PING \nS: OK PONG\n", "\\x20"),
        ("C: PING\\q\nS: OK PONG\n", "unknown escape"),
        ("C: PING\rS: OK PONG\n", "printable ASCII"),
        ("C: DEC k {ct}\nS: OK\n", "not defined before"),
        ("C: PING\nS~ OK (?P<a>.*\n", "bad regex"),
        ("C: PING\nS~ (?P<a>.*)\nC: PING\nS~ (?P<a>.*)\n", "defined twice"),
        ("C: QUIT\nS: OK BYE\nC: PING\nS: OK PONG\n", "nothing may follow"),
    ],
)
def test_the_format_refuses_malformed_transcripts(body: str, complaint: str) -> None:
    with pytest.raises(TranscriptError, match=re.escape(complaint)):
        parse_transcript("test", body)


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ("```transcript a\nC: PING\nS: OK PONG\n```\n```transcript a\n```\n", "two transcripts"),
        ("```transcript\n```\n", "want ```transcript <name>"),
        ("```transcript A-b\n```\n", "want ```transcript <name>"),
        ("```text\nC: PING\nS: OK PONG\n```\n", "outside a transcript block"),
        ("```transcript a\nC: PING\n", "not closed"),
    ],
)
def test_the_spec_reader_refuses_stray_examples(document: str, complaint: str) -> None:
    with pytest.raises(TranscriptError, match=re.escape(complaint)):
        spec_transcripts(document)


def test_escapes_and_substitution() -> None:
    assert request_bytes("C\\x00\\r\\t\\\\ {a}", {"a": "x+/="}) == b"C\x00\r\t\\ x+/=\n"
    assert request_bytes("", {}) == b"\n"
    exchange_ = Exchange("PING", "OK {k} [a-z]{2}", pattern=True)
    expected = exchange_.expected({"k": "a+b"})
    assert isinstance(expected, re.Pattern)
    assert expected.fullmatch("OK a+b xy")
    assert not expected.fullmatch("OK aab xy")


# --------------------------------------------------------------------------- live daemons


class DaemonPool:
    """One daemon per (mode, kmsd arguments), started on first use, stopped at the end."""

    def __init__(self) -> None:
        self._daemons: dict[tuple[str, tuple[str, ...]], Daemon] = {}

    def get(self, mode: str, args: tuple[str, ...] = ()) -> Daemon:
        key = (mode, args)
        if key not in self._daemons:
            root = Path(tempfile.mkdtemp(prefix="kms-v-", dir="/tmp"))
            daemon = make_store(root / "d")
            daemon.extra_args = list(args)
            self._daemons[key] = daemon
            daemon.start()
        return self._daemons[key]

    def close(self) -> list[int]:
        codes = []
        for daemon in self._daemons.values():
            try:
                if daemon.process is not None:
                    codes.append(daemon.stop())
            finally:
                daemon.discard()
                shutil.rmtree(daemon.root.parent, ignore_errors=True)
        return codes


@pytest.fixture(scope="module")
def daemons() -> Iterator[DaemonPool]:
    pool = DaemonPool()
    try:
        yield pool
    finally:
        codes = pool.close()
    assert codes == [0] * len(codes), "kmsd did not exit cleanly on SIGTERM"


class Connection:
    """A raw client connection that reads replies line by line, however they are batched."""

    def __init__(self, socket_path: str) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(IO_TIMEOUT)
        self._socket.connect(socket_path)
        self._buffer = bytearray()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self._socket.close()

    def send(self, data: bytes) -> None:
        self._socket.sendall(data)

    def _receive(self) -> bytes:
        try:
            return self._socket.recv(65536)
        except ConnectionResetError:  # closed with requests unread: same as end of stream
            return b""

    def read_line(self) -> bytes:
        while (newline := self._buffer.find(b"\n")) < 0:
            chunk = self._receive()
            if not chunk:
                raise AssertionError(f"connection closed; pending {bytes(self._buffer)!r}")
            self._buffer += chunk
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        return line

    def closed_by_server(self) -> bool:
        """True when the server sent nothing more and closed the connection."""
        return not self._buffer and self._receive() == b""


def check_reply(name: str, item: Exchange, line: bytes, bound: dict[str, str]) -> None:
    """Assert that ``line`` is the reply ``item`` wants; bind the values its regex names."""
    try:
        reply = line.decode("ascii")
    except UnicodeDecodeError:
        raise AssertionError(f"{name}: non-ASCII reply {line!r}") from None
    expected = item.expected(bound)
    context = f"{name}: C: {item.request}\n expected {item.reply}\n got {reply}"
    if isinstance(expected, str):
        assert reply == expected, context
    else:
        match = expected.fullmatch(reply)
        assert match is not None, context
        bound.update({k: v for k, v in match.groupdict().items() if v is not None})


def run_vector(conn: Connection, vector: Vector, *, pipelined: bool) -> None:
    """Replay a vector: each request alone, or as many as possible per write."""
    bound: dict[str, str] = {}
    batch: list[Exchange] = []

    def settle() -> None:
        if not batch:
            return
        conn.send(b"".join(request_bytes(item.request, bound) for item in batch))
        for item in batch:
            check_reply(vector.name, item, conn.read_line(), bound)
        batch.clear()

    for item in vector.exchanges:
        if batch and set(_REF_RE.findall(item.request)) - bound.keys():
            settle()
        batch.append(item)
        if not pipelined:
            settle()
    settle()
    if vector.exchanges[-1].closes:
        assert conn.closed_by_server(), f"{vector.name}: the connection should be closed"
    else:
        conn.send(b"PING\n")
        assert conn.read_line() == b"OK PONG", f"{vector.name}: the connection should be usable"


@pytest.mark.parametrize("mode", ["one_by_one", "pipelined"])
@pytest.mark.parametrize(
    "name",
    [name for name in vector_names()],
)
def test_vector_against_kmsd(daemons: DaemonPool, name: str, mode: str) -> None:
    vector = load(name)
    daemon = daemons.get(mode, vector.kmsd_args)
    with Connection(daemon.socket_path) as conn:
        run_vector(conn, vector, pipelined=mode == "pipelined")


def test_vectors_run_in_any_order(daemons: DaemonPool) -> None:
    """protocol.md section 9.1: all transcripts run against one daemon, in any order.

    The test above replays them sorted by name; here they run newest name first on
    a daemon of their own, so ``rekey`` comes before the ``INFO`` transcripts.
    """
    for name in reversed(vector_names()):
        vector = load(name)
        if vector.kmsd_args:
            continue
        with Connection(daemons.get("reversed").socket_path) as conn:
            run_vector(conn, vector, pipelined=False)


# --------------------------------------------------------------------------- beyond transcripts


def test_default_line_limit_is_one_mebibyte(daemons: DaemonPool) -> None:
    daemon = daemons.get("limits")
    at_limit = b"X" * DEFAULT_MAX_LINE
    with Connection(daemon.socket_path) as conn:
        conn.send(at_limit + b"\n" + at_limit + b"\r\n")
        assert conn.read_line() == b"ERR UNKNOWN_COMMAND unknown command"
        assert conn.read_line() == b"ERR UNKNOWN_COMMAND unknown command"
        conn.send(b"PING\n" + at_limit + b"X\nPING\n")
        assert conn.read_line() == b"OK PONG"
        assert conn.read_line() == b"ERR TOO_LONG request line too long"
        assert conn.closed_by_server()


def test_overlong_line_is_refused_before_its_end(daemons: DaemonPool) -> None:
    daemon = daemons.get("limits")
    with Connection(daemon.socket_path) as conn:
        conn.send(b"PING\n" + b"X" * (DEFAULT_MAX_LINE + 2))
        assert conn.read_line() == b"OK PONG"
        assert conn.read_line() == b"ERR TOO_LONG request line too long"
        assert conn.closed_by_server()


def test_requests_after_quit_are_not_answered(daemons: DaemonPool) -> None:
    daemon = daemons.get("limits")
    assert exchange(daemon.socket_path, b"PING\nQUIT\nPING\n") == b"OK PONG\nOK BYE\n"


def test_after_half_close_complete_lines_are_answered(daemons: DaemonPool) -> None:
    daemon = daemons.get("limits")
    assert exchange(daemon.socket_path, b"PING\nping\r\nPING") == b"OK PONG\nOK PONG\n"
