# Protocol v1 codec: line framing with a length limit, request and response types, parse/format.
# Pure: no sockets, no trio, no os, no time. The daemon and both clients are loops around it.
"""The KMS/1 wire protocol, as specified normatively in ``protocol.md``.

A connection carries request lines from the client and exactly one response line
per request from the server, in order. This module turns bytes into typed values
and back; it never does I/O, so the same code frames a pipelined batch in the
daemon, a blocking call in :class:`kms_client.Client` and an ``await`` in
:class:`kms_client.AsyncClient`.

Errors found while parsing are raised as :class:`~kms_client.errors.KmsError`
subclasses, which carry the wire code the server answers with.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from kms_client.errors import (
    BadKeyId,
    BadRequest,
    KmsError,
    ProtocolViolation,
    TooLong,
    UnknownCommand,
    error_for_code,
)

PROTOCOL_NAME = "KMS/1"
DEFAULT_MAX_LINE = 1 << 20
MAX_KEY_ID_LENGTH = 255
MAX_VERSION = 2**32 - 1
DEFAULT_DATAKEY_BYTES = 32
#: What ``GET`` exports: the 32 bytes of a key version's material.
KEY_MATERIAL_SIZE = 32
MAX_DATAKEY_BYTES = 1024

_KEY_ID_RE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_VERSION_RE = re.compile(rb"[1-9][0-9]{0,9}")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PAD = ord("=")
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]*")  # (a newer daemon may add codes)
#: The symbols that may stand before the padding: those whose bits past the data are zero
#: (4 bits before ``==``, 2 before ``=``), so each value has exactly one spelling.
_CLEAN_BEFORE_TWO_PADS = frozenset(c for v, c in enumerate(_B64_ALPHABET) if not v & 0x0F)
_CLEAN_BEFORE_ONE_PAD = frozenset(c for v, c in enumerate(_B64_ALPHABET) if not v & 0x03)

R = TypeVar("R")


# --------------------------------------------------------------------------- framing

#: Lines shorter than this are framed by one ``bytes.split``; longer ones by ``find``.
_SPLIT_BELOW = 256
#: Bytes of an over-long line kept for the audit: enough for its verb.
_OVERLONG_HEAD = 32


class LineFramer:
    """Splits a byte stream into lines, refusing any line longer than ``max_line``.

    The limit counts the bytes of a line without its LF (and without a CR just
    before the LF). A partial line that already exceeds the limit raises
    :class:`TooLong` at once, so a peer cannot make us buffer without end.

    Lines are sliced straight out of the received chunk (one copy per line);
    only an unfinished line is kept aside, as a list of chunks joined once its
    LF arrives, so large pipelined batches and long lines both cost linear time.
    """

    __slots__ = (
        "_buffer",
        "_max_line",
        "_partial",
        "_partial_size",
        "_start",
        "last_line_size",
        "overlong_head",
        "overlong_size",
        "too_long",
        "wire_sizes",
    )

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._buffer = b""
        self._start = 0
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._max_line = max_line
        #: Bytes the last returned line took on the wire, with its CR and LF.
        self.last_line_size = 0
        #: Set by :meth:`feed_lines` when a line over the limit followed the lines it returned.
        self.too_long = False
        #: The over-long line's first bytes and how many of its bytes had arrived (for the
        #: audit: its verb and size, never its content).
        self.overlong_head = b""
        self.overlong_size = 0
        #: After :meth:`feed_lines`: each returned line's size on the wire (CR and LF
        #: included), or None when every one ended with a bare LF (``len(line) + 1``).
        self.wire_sizes: list[int] | None = None

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        start = self._start
        if start < len(buffer) and buffer.find(b"\n", start) >= 0:
            # Complete lines not read yet stay complete lines, ahead of the new bytes.
            self._buffer = buffer[start:] + data
            self._start = 0
            return
        self._set_aside_tail()
        if self._partial:
            self._partial.append(data)
            self._partial_size += len(data)
            if b"\n" not in data:
                return
            data = b"".join(self._partial)
            self._partial = []
            self._partial_size = 0
        self._buffer = data
        self._start = 0

    def _set_aside_tail(self) -> None:
        if self._start < len(self._buffer):
            tail = self._buffer[self._start :]
            self._partial.append(tail)
            self._partial_size += len(tail)
        self._buffer = b""
        self._start = 0

    def next_line(self) -> bytes | None:
        """Return the next complete line, or ``None`` when more data is needed."""
        buffer = self._buffer
        start = self._start
        newline = buffer.find(b"\n", start)
        if newline < 0:
            self._set_aside_tail()
            if self._partial_size > self._max_line + 1:
                self._overlong(self._partial[0], self._partial_size)
                raise TooLong()
            return None
        end = newline - 1 if newline > start and buffer[newline - 1] == 0x0D else newline
        if end - start > self._max_line:
            self._overlong(buffer[start : start + _OVERLONG_HEAD], newline + 1 - start)
            raise TooLong()
        self._start = newline + 1
        self.last_line_size = newline + 1 - start
        return buffer[start:end]

    def feed_lines(self, data: bytes) -> list[bytes]:
        """Feed ``data`` and return every complete line buffered: ``feed`` then ``lines``, batched.

        Instead of raising :class:`TooLong`, it returns the lines before the
        overlong one and sets :attr:`too_long` (the framer is then spent). Sizes on the
        wire are in :attr:`wire_sizes`. Short lines are split with one
        ``bytes.split`` (in C, about 20x cheaper a line than :meth:`next_line`);
        long ones (whose bytes ``split`` would walk one by one) go through
        :meth:`next_line`, which skips through them with memchr.
        """
        first = data.find(b"\n")
        if (  # one whole line and nothing buffered: a client waiting for each reply
            0 <= first == len(data) - 1
            and first <= self._max_line
            and not self._partial
            and self._start >= len(self._buffer)
            and not self.too_long
            and data[first - 1 : first] != b"\r"
        ):
            self.wire_sizes = None
            return [data[:first]]
        if (
            first < 0
            or first >= _SPLIT_BELOW  # a long first line
            or data.rfind(b"\n") < len(data) - _SPLIT_BELOW  # a long unfinished last line
            or self.too_long
            or self._start < len(self._buffer)
        ):
            return self._feed_lines_one_by_one(data)
        parts = data.split(b"\n")
        partial = self._partial
        if partial:  # the first part completes the line set aside
            partial.append(parts[0])
            parts[0] = first_line = b"".join(partial)
            partial.clear()
            self._partial_size = 0
        else:
            first_line = parts[0]
        tail = parts.pop()
        if b"\r" in data or b"\r" in first_line:
            self.wire_sizes = [len(part) + 1 for part in parts]
            parts = [part[:-1] if part[-1:] == b"\r" else part for part in parts]
        else:
            self.wire_sizes = None
        limit = self._max_line
        if len(data) > limit or len(first_line) > limit:
            for index, part in enumerate(parts):
                if len(part) > limit:
                    self._overlong(part, len(part) + 1)
                    return parts[:index]
        if tail:
            partial.append(tail)
            self._partial_size = len(tail)
            if len(tail) > limit + 1:
                self._overlong(tail, len(tail))
        return parts

    def _overlong(self, start: bytes, size: int) -> None:
        self.too_long = True
        self.overlong_head = start[:_OVERLONG_HEAD]
        self.overlong_size = size

    def _feed_lines_one_by_one(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        sizes: list[int] = []
        if not self.too_long:
            try:
                newline = data.find(b"\n") if self._partial else -1
                if newline >= 0 and self._start >= len(self._buffer):
                    # The unfinished line is joined alone and the rest of ``data`` read in
                    # place: joining all of it (as ``feed`` does) would copy every batch of
                    # long lines once more.
                    self._partial.append(data[: newline + 1])
                    self._buffer, self._start = b"".join(self._partial), 0
                    self._partial.clear()
                    self._partial_size = 0
                    self._collect(lines, sizes)
                    self._buffer, self._start = data, newline + 1
                else:
                    self.feed(data)
                self._collect(lines, sizes)
            except TooLong:
                self.too_long = True
        self.wire_sizes = sizes
        return lines

    def _collect(self, lines: list[bytes], sizes: list[int]) -> None:
        while (line := self.next_line()) is not None:
            lines.append(line)
            sizes.append(self.last_line_size)

    def lines(self) -> Iterator[bytes]:
        """Yield every complete line buffered so far."""
        while (line := self.next_line()) is not None:
            yield line

    @property
    def has_partial_line(self) -> bool:
        """True when bytes of an unfinished line are buffered (a slow or stalled peer)."""
        return bool(self._partial) or self._start < len(self._buffer)


# --------------------------------------------------------------------------- field codecs


#: Key ids already validated, and their text: a dict hit costs a tenth of the regex.
#: Bounded (emptied when full): ids are at most 255 bytes, so it holds at most ~2 MB.
_VALID_KEY_IDS: dict[bytes, str] = {}
_VALID_KEY_IDS_MAX = 4096


def validate_key_id(token: bytes) -> str:
    """Return the key id as text, or raise :class:`BadKeyId`."""
    try:
        key_id = _VALID_KEY_IDS.get(token)
    except TypeError:  # a bytearray or memoryview: not hashable
        token = bytes(token)
        key_id = _VALID_KEY_IDS.get(token)
    if key_id is not None:
        return key_id
    if len(token) > MAX_KEY_ID_LENGTH or _KEY_ID_RE.fullmatch(token) is None:
        raise BadKeyId()
    key_id = token.decode("ascii")
    if len(_VALID_KEY_IDS) >= _VALID_KEY_IDS_MAX:
        _VALID_KEY_IDS.clear()
    _VALID_KEY_IDS[token] = key_id
    return key_id


def parse_version(token: bytes) -> int:
    if _VERSION_RE.fullmatch(token) is None:
        raise BadRequest("version must be an integer from 1")
    version = int(token)
    if version > MAX_VERSION:
        raise BadRequest("version out of range")
    return version


def _decode_stdlib(token: bytes, _altchars: None = None, _validate: bool = True) -> bytes:
    # binascii's strict mode still takes padding past a whole quantum ("0000=",
    # "AAAA===="): only a length that is a multiple of 4, with "=" in the last two
    # places at most, is the one spelling pybase64 (validate=True) accepts.
    size = len(token)
    padding = token.find(b"=")
    if size % 4 or 0 <= padding < size - 2:
        raise binascii.Error("invalid base64 padding")
    return binascii.a2b_base64(token, strict_mode=True)


def _encode_stdlib(value: bytes | bytearray) -> bytes:
    return binascii.b2a_base64(value, newline=False)


# pybase64 (SIMD) decodes and encodes about 15x faster than binascii, which would
# otherwise dominate an 8 KiB ENC. The daemon depends on it; a client without it
# falls back to the standard library with the same strict rules (a test checks
# both agree on valid and invalid input).
#: ``(token, altchars, validate)``: called with positional arguments, since parsing
#: keywords costs pybase64 more than decoding a 64-byte value.
_decode: Callable[[bytes, None, bool], bytes]
#: Standard padded base64 of ``value``.
b64encode: Callable[[bytes | bytearray], bytes]
try:
    import pybase64

    # The C functions themselves, not Python wrappers: in the daemon a Python call
    # level costs as much as encoding a 64-byte ciphertext.
    _decode = pybase64.b64decode
    b64encode = pybase64.b64encode

except ImportError:  # pragma: no cover - exercised by the stdlib-only client test
    _decode = _decode_stdlib
    b64encode = _encode_stdlib


def b64decode_strict(token: bytes) -> bytes:
    """Decode standard padded base64, refusing any other spelling of the same bytes.

    Strict decoding refuses foreign characters, missing or misplaced padding and
    data after padding; the extra check on the last symbol refuses non-zero
    padding bits, so every value has exactly one accepted encoding.
    """
    try:
        value = _decode(token, None, True)
    except (binascii.Error, ValueError):
        raise BadRequest("invalid base64") from None
    if value and token[-1] == _PAD:  # a value decodes from 4 symbols or more
        clean = (
            token[-3] in _CLEAN_BEFORE_TWO_PADS
            if token[-2] == _PAD
            else token[-2] in _CLEAN_BEFORE_ONE_PAD
        )
        if not clean:
            raise BadRequest("invalid base64")
    return value


def _nonempty_b64(token: bytes, what: str) -> bytes:
    value = b64decode_strict(token)
    if not value:
        raise BadRequest(f"{what} must be at least 1 byte")
    return value


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Ok:
    """``OK`` with its space-separated fields.

    ``repr`` shows how many, not what: a field may be an exported key or a plaintext.
    """

    fields: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Ok(<{len(self.fields)} fields>)"


@dataclass(frozen=True, slots=True)
class Err:
    """``ERR <code> <message>``."""

    code: str
    message: str

    def to_exception(self) -> KmsError:
        return error_for_code(self.code, self.message)


Response = Ok | Err


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """A ``GET`` reply: the exported key of one version. ``repr`` hides the key."""

    version: int
    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DataKey:
    """A ``DATAKEY`` reply: a fresh key and the same key wrapped under the named key."""

    key: bytes = field(repr=False)
    wrapped: bytes


def format_ok(*fields: bytes) -> bytes:
    if not fields:
        return b"OK\n"
    return b"".join((b"OK ", b" ".join(fields), b"\n"))  # one copy of a long field, not two


def format_error(error: KmsError) -> bytes:
    return f"ERR {error.code} {error.message}\n".encode("ascii", "replace")


def parse_response(line: bytes) -> Response:
    """Parse one server line (without LF). Raises :class:`ProtocolViolation` on garbage."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolViolation("server sent non-ASCII bytes") from None
    if not text.isprintable():  # control bytes would reach a terminal through messages
        raise ProtocolViolation("server sent control characters")
    if text == "OK":
        return Ok(())
    if text.startswith("OK "):
        fields = tuple(text[3:].split(" "))
        if "" not in fields:
            return Ok(fields)
    elif text.startswith("ERR "):
        code, _, message = text[4:].partition(" ")
        if _ERROR_CODE.fullmatch(code):
            return Err(code, message)
    raise ProtocolViolation("server sent a malformed response")


def _expect_fields(ok: Ok, count: int) -> tuple[str, ...]:
    if len(ok.fields) != count:
        raise ProtocolViolation("server reply has the wrong number of fields")
    return ok.fields


def _reply_b64(text: str) -> bytes:
    try:
        return b64decode_strict(text.encode("ascii"))
    except KmsError:
        raise ProtocolViolation("server reply holds invalid base64") from None


def _reply_int(text: str) -> int:
    if not text.isdecimal():
        raise ProtocolViolation("server reply holds a non-integer")
    return int(text)


def _data_arguments(key_id: str, data: bytes, aad: bytes) -> list[bytes]:
    """``<key-id> <base64 data> [<base64 aad>]``, shared by ENC, DEC and REWRAP."""
    args = [key_id.encode("ascii"), b64encode(data)]
    if aad:
        args.append(b64encode(aad))
    return args


def _single_b64_reply(ok: Ok) -> bytes:
    return _reply_b64(_expect_fields(ok, 1)[0])


# --------------------------------------------------------------------------- requests
# Requests are plain slotted dataclasses, not frozen ones: a frozen dataclass sets each
# field through object.__setattr__, so building an ENC request cost 750 ns instead of
# 170 ns, a twentieth of a pipelined ENC. Nothing changes a request once it is parsed.


@dataclass(slots=True)
class Request(Generic[R]):
    """Base of every request. ``parse_reply`` turns the server's ``OK`` fields into ``R``."""

    verb: ClassVar[str] = ""
    #: Safe to send again after the daemon restarted mid-call (no state change).
    repeatable: ClassVar[bool] = True

    def arguments(self) -> list[bytes]:
        return []

    def to_line(self) -> bytes:
        return b" ".join([self.verb.encode("ascii"), *self.arguments()]) + b"\n"

    def parse_reply(self, ok: Ok) -> R:
        raise NotImplementedError


@dataclass(slots=True)
class Ping(Request[None]):
    verb: ClassVar[str] = "PING"

    def parse_reply(self, ok: Ok) -> None:
        if ok.fields != ("PONG",):
            raise ProtocolViolation("unexpected reply to PING")


@dataclass(slots=True)
class Hello(Request[str]):
    """Returns the server version; the protocol name is checked here."""

    verb: ClassVar[str] = "HELLO"

    def parse_reply(self, ok: Ok) -> str:
        protocol, server_version = _expect_fields(ok, 2)
        if protocol != PROTOCOL_NAME:
            raise ProtocolViolation("server speaks another protocol version")
        return server_version


@dataclass(slots=True)
class Help(Request[tuple[str, ...]]):
    verb: ClassVar[str] = "HELP"

    def parse_reply(self, ok: Ok) -> tuple[str, ...]:
        return ok.fields


@dataclass(slots=True)
class Quit(Request[None]):
    verb: ClassVar[str] = "QUIT"

    def parse_reply(self, ok: Ok) -> None:
        return None


@dataclass(slots=True)
class Create(Request[int]):
    """``rotate_period`` (seconds) asks the daemon to rotate the key when its latest
    version is older; ``None`` means never."""

    verb: ClassVar[str] = "CREATE"
    repeatable: ClassVar[bool] = False
    key_id: str
    exportable: bool = False
    rotate_period: int | None = None

    def arguments(self) -> list[bytes]:
        args = [self.key_id.encode("ascii")]
        if self.exportable:
            args.append(b"exportable")
        if self.rotate_period is not None:
            args.append(b"rotate=" + format_period(self.rotate_period).encode("ascii"))
        return args

    def parse_reply(self, ok: Ok) -> int:
        return _reply_int(_expect_fields(ok, 1)[0])


@dataclass(slots=True)
class Rotate(Request[int]):
    verb: ClassVar[str] = "ROTATE"
    repeatable: ClassVar[bool] = False
    key_id: str

    def arguments(self) -> list[bytes]:
        return [self.key_id.encode("ascii")]

    def parse_reply(self, ok: Ok) -> int:
        return _reply_int(_expect_fields(ok, 1)[0])


@dataclass(slots=True)
class Info(Request[dict[str, Any]]):
    verb: ClassVar[str] = "INFO"
    key_id: str

    def arguments(self) -> list[bytes]:
        return [self.key_id.encode("ascii")]

    def parse_reply(self, ok: Ok) -> dict[str, Any]:
        try:
            info = json.loads(" ".join(ok.fields))
        except ValueError:
            raise ProtocolViolation("INFO reply is not JSON") from None
        if not isinstance(info, dict):
            raise ProtocolViolation("INFO reply is not a JSON object")
        return info


@dataclass(slots=True)
class Get(Request[KeyMaterial]):
    verb: ClassVar[str] = "GET"
    key_id: str
    version: int | None = None

    def arguments(self) -> list[bytes]:
        args = [self.key_id.encode("ascii")]
        if self.version is not None:
            args.append(str(self.version).encode("ascii"))
        return args

    def parse_reply(self, ok: Ok) -> KeyMaterial:
        """The key, checked: a short key must never reach a ``cluster_key_command`` hook."""
        version, key = _expect_fields(ok, 2)
        material = KeyMaterial(_reply_int(version), _reply_b64(key))
        if len(material.key) != KEY_MATERIAL_SIZE:
            raise ProtocolViolation(
                f"GET reply holds a key of {len(material.key)} bytes, not {KEY_MATERIAL_SIZE}"
            )
        if material.version < 1 or self.version not in (None, material.version):
            raise ProtocolViolation("GET reply names another version than asked for")
        return material


@dataclass(slots=True)
class Encrypt(Request[bytes]):
    verb: ClassVar[str] = "ENC"
    key_id: str
    plaintext: bytes = field(repr=False)
    aad: bytes = field(default=b"", repr=False)

    def arguments(self) -> list[bytes]:
        return _data_arguments(self.key_id, self.plaintext, self.aad)

    def parse_reply(self, ok: Ok) -> bytes:
        return _single_b64_reply(ok)


@dataclass(slots=True)
class _CiphertextCommand(Request[bytes]):
    """``<VERB> <key-id> <base64 ciphertext> [<base64 aad>]``, answered with one value."""

    key_id: str
    ciphertext: bytes = field(repr=False)  # request data: never in a log line or a traceback
    aad: bytes = field(default=b"", repr=False)

    def arguments(self) -> list[bytes]:
        return _data_arguments(self.key_id, self.ciphertext, self.aad)

    def parse_reply(self, ok: Ok) -> bytes:
        return _single_b64_reply(ok)


@dataclass(slots=True)
class Decrypt(_CiphertextCommand):
    verb: ClassVar[str] = "DEC"


@dataclass(slots=True)
class GenerateDataKey(Request[DataKey]):
    verb: ClassVar[str] = "DATAKEY"
    key_id: str
    nbytes: int = DEFAULT_DATAKEY_BYTES

    def arguments(self) -> list[bytes]:
        args = [self.key_id.encode("ascii")]
        if self.nbytes != DEFAULT_DATAKEY_BYTES:
            args.append(str(self.nbytes).encode("ascii"))
        return args

    def parse_reply(self, ok: Ok) -> DataKey:
        key, wrapped = _expect_fields(ok, 2)
        data_key = DataKey(_reply_b64(key), _reply_b64(wrapped))
        if len(data_key.key) != self.nbytes:
            raise ProtocolViolation("DATAKEY reply holds a key of another size than asked for")
        return data_key


@dataclass(slots=True)
class Rewrap(_CiphertextCommand):
    """Re-encrypt a ciphertext under the key's latest version, inside the daemon."""

    verb: ClassVar[str] = "REWRAP"


@dataclass(slots=True)
class _VersionCommand(Request[None]):
    key_id: str
    version: int

    def arguments(self) -> list[bytes]:
        return [self.key_id.encode("ascii"), str(self.version).encode("ascii")]

    def parse_reply(self, ok: Ok) -> None:
        _expect_fields(ok, 0)


@dataclass(slots=True)
class Retire(_VersionCommand):
    """The version can no longer encrypt, decrypt or be fetched; its file is kept."""

    verb: ClassVar[str] = "RETIRE"


@dataclass(slots=True)
class Restore(_VersionCommand):
    """Undo ``RETIRE``."""

    verb: ClassVar[str] = "RESTORE"


@dataclass(slots=True)
class Destroy(_VersionCommand):
    """Erase the version's material for good (crypto-shredding); not the latest."""

    verb: ClassVar[str] = "DESTROY"


@dataclass(slots=True)
class Configure(Request[None]):
    """Set or clear (``None``) a key's automatic rotation period, in seconds."""

    verb: ClassVar[str] = "CONFIG"
    key_id: str
    rotate_period: int | None

    def arguments(self) -> list[bytes]:
        period = "off" if self.rotate_period is None else format_period(self.rotate_period)
        return [self.key_id.encode("ascii"), b"rotate=" + period.encode("ascii")]

    def parse_reply(self, ok: Ok) -> None:
        _expect_fields(ok, 0)


@dataclass(slots=True)
class Rekey(Request[int]):
    """Re-seal the whole store under a new KEK that the daemon obtains itself.

    ``source`` is ``file`` (``argument``: the path of a KEK file) or
    ``passphrase`` (``argument``: the passphrase command). The reply is the new
    store generation. The KEK itself never crosses the socket.
    """

    verb: ClassVar[str] = "REKEY"
    repeatable: ClassVar[bool] = False
    source: str
    argument: str = field(repr=False)  # a command may hold a passphrase

    def arguments(self) -> list[bytes]:
        return [self.source.encode("ascii"), b64encode(self.argument.encode())]

    def parse_reply(self, ok: Ok) -> int:
        return _reply_int(_expect_fields(ok, 1)[0])


# --------------------------------------------------------------------------- periods

_PERIOD_RE = re.compile(rb"([1-9][0-9]{0,9})([smhd])")
_PERIOD_UNITS = {b"s": 1, b"m": 60, b"h": 3600, b"d": 86400}
MAX_PERIOD = 100 * 365 * 86400


def parse_period(token: bytes) -> int:
    """``90d``, ``12h``, ``30m`` or ``45s`` as seconds (at most 100 years)."""
    match = _PERIOD_RE.fullmatch(token)
    if match is None:
        raise BadRequest("a period is a number and a unit: 45s, 30m, 12h or 90d")
    seconds = int(match.group(1)) * _PERIOD_UNITS[match.group(2)]
    if seconds > MAX_PERIOD:
        raise BadRequest("a period is at most 100 years")
    return seconds


def format_period(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# --------------------------------------------------------------------------- request parsing


def _no_args(cls: type[Request[Any]]) -> Any:
    def parse(args: list[bytes]) -> Request[Any]:
        if args:
            raise BadRequest(f"{cls.verb} takes no arguments")
        return cls()

    return parse


def _parse_create(args: list[bytes]) -> Create:
    if not 1 <= len(args) <= 3:
        raise BadRequest("usage: CREATE <key-id> [exportable] [rotate=<period>]")
    key_id = validate_key_id(args[0])
    exportable = False
    rotate_period = None
    for option in args[1:]:
        if option.lower() == b"exportable" and not exportable:
            exportable = True
        elif option[:7].lower() == b"rotate=" and rotate_period is None:
            rotate_period = parse_period(option[7:])
        else:
            raise BadRequest("unknown or repeated CREATE option")
    return Create(key_id, exportable, rotate_period)


#: The verbs that carry data (base64) after the key id, and how many arguments they take.
DATA_VERBS = frozenset({"ENC", "DEC", "REWRAP"})
DATA_ARGUMENTS = range(2, 4)


def _data_command(cls: type[Encrypt | Decrypt | Rewrap], what: str) -> Any:
    """The parser of ``<VERB> <key-id> <base64 data> [<base64 aad>]`` (ENC, DEC, REWRAP)."""
    usage = f"usage: {cls.verb} <key-id> <base64 {what}> [<base64 aad>]"
    empty = f"{what} must be at least 1 byte"

    def parse(args: list[bytes]) -> Encrypt | Decrypt | Rewrap:
        if len(args) not in DATA_ARGUMENTS:
            raise BadRequest(usage)
        key_id = validate_key_id(args[0])
        data = b64decode_strict(args[1])
        if not data:
            raise BadRequest(empty)
        aad = _nonempty_b64(args[2], "aad") if len(args) == 3 else b""
        return cls(key_id, data, aad)

    return parse


def _version_command(cls: type[_VersionCommand]) -> Any:
    def parse(args: list[bytes]) -> _VersionCommand:
        if len(args) != 2:
            raise BadRequest(f"usage: {cls.verb} <key-id> <version>")
        return cls(validate_key_id(args[0]), parse_version(args[1]))

    return parse


def _parse_config(args: list[bytes]) -> Configure:
    usage = "usage: CONFIG <key-id> rotate=<period>|rotate=off"
    if len(args) != 2:
        raise BadRequest(usage)
    key_id = validate_key_id(args[0])  # the key id first, as for every verb
    if args[1][:7].lower() != b"rotate=":
        raise BadRequest(usage)
    value = args[1][7:]
    return Configure(key_id, None if value.lower() == b"off" else parse_period(value))


REKEY_SOURCES = ("file", "passphrase")


def _parse_rekey(args: list[bytes]) -> Rekey:
    if len(args) != 2 or args[0].decode("ascii", "replace") not in REKEY_SOURCES:
        raise BadRequest("usage: REKEY file|passphrase <base64 path or command>")
    try:
        argument = _nonempty_b64(args[1], "argument").decode()
    except UnicodeDecodeError:
        raise BadRequest("the REKEY argument must be UTF-8") from None
    return Rekey(args[0].decode("ascii"), argument)


def _parse_rotate(args: list[bytes]) -> Rotate:
    if len(args) != 1:
        raise BadRequest("usage: ROTATE <key-id>")
    return Rotate(validate_key_id(args[0]))


def _parse_info(args: list[bytes]) -> Info:
    if len(args) != 1:
        raise BadRequest("usage: INFO <key-id>")
    return Info(validate_key_id(args[0]))


def _parse_get(args: list[bytes]) -> Get:
    if not 1 <= len(args) <= 2:
        raise BadRequest("usage: GET <key-id> [<version>]")
    key_id = validate_key_id(args[0])
    return Get(key_id, parse_version(args[1]) if len(args) == 2 else None)


def _parse_datakey(args: list[bytes]) -> GenerateDataKey:
    if not 1 <= len(args) <= 2:
        raise BadRequest("usage: DATAKEY <key-id> [<nbytes>]")
    key_id = validate_key_id(args[0])
    nbytes = DEFAULT_DATAKEY_BYTES
    if len(args) == 2:
        if _VERSION_RE.fullmatch(args[1]) is None or int(args[1]) > MAX_DATAKEY_BYTES:
            raise BadRequest(f"nbytes must be an integer from 1 to {MAX_DATAKEY_BYTES}")
        nbytes = int(args[1])
    return GenerateDataKey(key_id, nbytes)


_PARSERS: dict[bytes, Any] = {
    b"PING": _no_args(Ping),
    b"HELLO": _no_args(Hello),
    b"HELP": _no_args(Help),
    b"QUIT": _no_args(Quit),
    b"CREATE": _parse_create,
    b"ROTATE": _parse_rotate,
    b"INFO": _parse_info,
    b"GET": _parse_get,
    b"ENC": _data_command(Encrypt, "plaintext"),
    b"DEC": _data_command(Decrypt, "ciphertext"),
    b"DATAKEY": _parse_datakey,
    b"REWRAP": _data_command(Rewrap, "ciphertext"),
    b"RETIRE": _version_command(Retire),
    b"RESTORE": _version_command(Restore),
    b"DESTROY": _version_command(Destroy),
    b"CONFIG": _parse_config,
    b"REKEY": _parse_rekey,
}

#: The verbs, in the order ``HELP`` lists them.
VERBS: tuple[str, ...] = tuple(verb.decode("ascii") for verb in _PARSERS)
#: The verbs whose first argument is a key id.
KEYED_VERBS = frozenset(VERBS) - {"PING", "HELLO", "HELP", "QUIT", "REKEY"}


_LONG_LINE = 512


def _split_long(line: bytes) -> list[bytes]:
    """``line.split(b" ")`` for long lines: ``find`` uses memchr, about 5x faster than
    ``split``'s byte loop on an 11 KB base64 token; short lines keep ``split``."""
    tokens = []
    start = 0
    find = line.find
    while (space := find(b" ", start)) >= 0:
        tokens.append(line[start:space])
        start = space + 1
    tokens.append(line[start:])
    return tokens


def parse_request(line: bytes) -> Request[Any]:
    """Parse one request line (without its LF) into a typed request.

    Raises :class:`BadRequest`, :class:`UnknownCommand` or :class:`BadKeyId`;
    the connection stays usable after any of them.
    """
    if not line:
        raise BadRequest("empty request")
    tokens = line.split(b" ") if len(line) < _LONG_LINE else _split_long(line)
    if b"" in tokens:
        raise BadRequest("tokens are separated by single spaces")
    verb = tokens[0]
    parser = _PARSERS.get(verb) or _PARSERS.get(verb.upper())  # upper case first: cheaper
    if parser is None:
        if not line.isascii():
            raise BadRequest("request is not ASCII")
        raise UnknownCommand()
    request: Request[Any] = parser(tokens[1:])
    return request
