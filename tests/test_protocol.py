# Unit and property tests of the pure codec kms_client/protocol.py: framing, parsing, formatting.
# No sockets and no daemon here; tests/test_vectors.py checks the same rules against a live kmsd.
from __future__ import annotations

import base64
import binascii
import itertools
import json
import operator
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms_client import protocol
from kms_client.errors import (
    BadRequest,
    ErrorCode,
    KeyNotFound,
    KmsError,
    NotExportable,
    ProtocolViolation,
    TooLong,
)
from kms_client.protocol import (
    DEFAULT_MAX_LINE,
    MAX_DATAKEY_BYTES,
    MAX_KEY_ID_LENGTH,
    MAX_VERSION,
    VERBS,
    Create,
    DataKey,
    Decrypt,
    Encrypt,
    Err,
    GenerateDataKey,
    Get,
    Hello,
    Help,
    Info,
    KeyMaterial,
    LineFramer,
    Ok,
    Ping,
    Quit,
    Request,
    Rotate,
    b64decode_strict,
    b64encode,
    format_error,
    format_ok,
    parse_request,
    parse_response,
    validate_key_id,
)

BAD_REQUEST = ErrorCode.BAD_REQUEST
UNKNOWN_COMMAND = ErrorCode.UNKNOWN_COMMAND
BAD_KEY_ID = ErrorCode.BAD_KEY_ID

PROPERTY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def drain(framer: LineFramer) -> list[bytes]:
    return list(framer.lines())


def framed(data: bytes, max_line: int = DEFAULT_MAX_LINE) -> list[bytes]:
    framer = LineFramer(max_line)
    framer.feed(data)
    return drain(framer)


def code_of(line: bytes) -> str:
    with pytest.raises(KmsError) as caught:
        parse_request(line)
    return caught.value.code


# --------------------------------------------------------------------------- LineFramer


def test_lines_end_with_lf_and_one_cr_before_it_is_dropped() -> None:
    assert framed(b"PING\nHELLO\r\n") == [b"PING", b"HELLO"]
    assert framed(b"A\r\r\n") == [b"A\r"]
    assert framed(b"A\rB\n") == [b"A\rB"]
    assert framed(b"\n\r\n") == [b"", b""]


def test_unfinished_line_waits_for_its_lf() -> None:
    framer = LineFramer()
    framer.feed(b"PING\nHEL")
    assert drain(framer) == [b"PING"]
    assert framer.has_partial_line
    framer.feed(b"LO\r")
    assert drain(framer) == []
    assert framer.has_partial_line
    framer.feed(b"\n")
    assert drain(framer) == [b"HELLO"]
    assert not framer.has_partial_line


def test_no_partial_line_at_start_or_after_whole_lines() -> None:
    framer = LineFramer()
    assert not framer.has_partial_line
    assert framer.next_line() is None
    framer.feed(b"PING\nPING\r\n")
    assert drain(framer) == [b"PING", b"PING"]
    assert not framer.has_partial_line


def test_byte_by_byte_feeding_gives_the_same_lines() -> None:
    data = b"PING\r\nCREATE k exportable\nGET k\r\n\r\n\nX\r\r\n"
    framer = LineFramer(64)
    lines: list[bytes] = []
    for byte in data:
        framer.feed(bytes([byte]))
        lines += drain(framer)
    assert lines == framed(data, 64)
    assert lines == [b"PING", b"CREATE k exportable", b"GET k", b"", b"", b"X\r"]


def test_many_lines_in_one_feed() -> None:
    requests = [f"ENC key/{n} aGk=".encode() for n in range(10_000)]
    assert framed(b"\n".join(requests) + b"\n") == requests


def test_lines_at_the_limit_are_accepted_with_lf_or_crlf() -> None:
    assert framed(b"x" * 8 + b"\n" + b"y" * 8 + b"\r\n", max_line=8) == [b"x" * 8, b"y" * 8]


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_LINE == 1 << 20
    assert framed(b"x" * DEFAULT_MAX_LINE + b"\r\n") == [b"x" * DEFAULT_MAX_LINE]
    with pytest.raises(TooLong):
        framed(b"x" * (DEFAULT_MAX_LINE + 1) + b"\n")


@pytest.mark.parametrize("line", [b"x" * 9 + b"\n", b"x" * 9 + b"\r\n", b"x" * 8 + b"\r\r\n"])
def test_complete_overlong_line_is_too_long(line: bytes) -> None:
    framer = LineFramer(8)
    framer.feed(b"PING\n" + line + b"PING\n")
    assert framer.next_line() == b"PING"
    with pytest.raises(TooLong) as caught:
        framer.next_line()
    assert caught.value.code == ErrorCode.TOO_LONG


def test_partial_overlong_line_is_too_long_before_its_lf() -> None:
    framer = LineFramer(8)
    framer.feed(b"x" * 9)  # could still be 8 bytes and a CR
    assert framer.next_line() is None
    framer.feed(b"x")
    with pytest.raises(TooLong):
        framer.next_line()


def test_partial_overlong_line_after_whole_lines_in_one_feed() -> None:
    framer = LineFramer(8)
    framer.feed(b"PING\nPING\n" + b"x" * 10)
    assert framer.next_line() == b"PING"
    assert framer.next_line() == b"PING"
    with pytest.raises(TooLong):
        framer.next_line()


def test_partial_line_at_the_limit_with_cr_completes() -> None:
    framer = LineFramer(8)
    for chunk in (b"x" * 4, b"x" * 4, b"\r"):
        framer.feed(chunk)
        assert framer.next_line() is None
    framer.feed(b"\n")
    assert framer.next_line() == b"x" * 8


# --------------------------------------------------------------------------- parse_request: valid


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"PING", Ping()),
        (b"ping", Ping()),
        (b"HELLO", Hello()),
        (b"hElLo", Hello()),
        (b"HELP", Help()),
        (b"QUIT", Quit()),
        (b"CREATE k", Create("k")),
        (b"CREATE pg/cluster1/wal exportable", Create("pg/cluster1/wal", exportable=True)),
        (b"create K EXPORTABLE", Create("K", exportable=True)),
        (b"ROTATE a.b_c-d", Rotate("a.b_c-d")),
        (b"INFO 0", Info("0")),
        (b"GET k", Get("k")),
        (b"GET k 1", Get("k", 1)),
        (b"GET k 4294967295", Get("k", MAX_VERSION)),
        (b"ENC k aGk=", Encrypt("k", b"hi")),
        (b"ENC k aGk= dGVuYW50PTQy", Encrypt("k", b"hi", b"tenant=42")),
        (b"Enc k /w==", Encrypt("k", b"\xff")),
        (b"DEC k AAAA", Decrypt("k", b"\0\0\0")),
        (b"DEC k AAAA aGk=", Decrypt("k", b"\0\0\0", b"hi")),
        (b"DATAKEY k", GenerateDataKey("k")),
        (b"DATAKEY k 32", GenerateDataKey("k", 32)),
        (b"DATAKEY k 1", GenerateDataKey("k", 1)),
        (b"datakey k 1024", GenerateDataKey("k", MAX_DATAKEY_BYTES)),
    ],
)
def test_parse_valid_requests(line: bytes, expected: Request[Any]) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    "key_id",
    ["a", "0", "pg/cluster1/wal", "A.b_c-d", "x/y.z", "a--b/c..d", "a" * MAX_KEY_ID_LENGTH],
)
def test_valid_key_ids(key_id: str) -> None:
    assert parse_request(b"GET " + key_id.encode()) == Get(key_id)


def test_help_lists_every_verb_once() -> None:
    assert VERBS == (
        "PING", "HELLO", "HELP", "QUIT", "CREATE", "ROTATE", "INFO", "GET", "ENC", "DEC", "DATAKEY",
        "REWRAP", "RETIRE", "RESTORE", "DESTROY", "CONFIG", "REKEY",
    )  # fmt: skip


# --------------------------------------------------------------------------- parse_request: errors


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b" ",
        b"  ",
        b" PING",
        b"PING ",
        b"GET  k",
        b"GET k ",
        b"FOO  bar",
        b"PING x",
        b"HELLO 1",
        b"HELP x",
        b"QUIT now",
        b"CREATE",
        b"CREATE k exportable exportable",
        b"CREATE k extractable",
        b"ROTATE",
        b"ROTATE k k",
        b"INFO",
        b"INFO k 1",
        b"GET",
        b"GET k 1 2",
        b"ENC k",
        b"ENC k aGk= aGk= aGk=",
        b"DEC",
        b"DEC k aGk= aGk= aGk=",
        b"DATAKEY",
        b"DATAKEY k 1 1",
    ],
)
def test_bad_request_syntax_and_argument_counts(line: bytes) -> None:
    assert code_of(line) == BAD_REQUEST


@pytest.mark.parametrize(
    "version", [b"0", b"01", b"+1", b"-1", b"1.0", b"1e3", b"x", b"4294967296", b"99999999999"]
)
def test_bad_versions(version: bytes) -> None:
    assert code_of(b"GET k " + version) == BAD_REQUEST


@pytest.mark.parametrize("nbytes", [b"0", b"032", b"1025", b"-1", b"x", b"99999999999"])
def test_bad_datakey_sizes(nbytes: bytes) -> None:
    assert code_of(b"DATAKEY k " + nbytes) == BAD_REQUEST


@pytest.mark.parametrize(
    "token",
    [
        b"aGk",  # missing padding
        b"aGk==",  # extra padding
        b"aG=k",  # padding in the middle
        b"aGk=aGk=",  # data after padding
        b"-_8=",  # URL-safe alphabet
        b"a*k=",
        b"=",
        b"====",
        b"aGl=",  # non-zero padding bits: "hi" spelled another way
        b"/x==",
        b"\xc3\xa9==",
    ],
)
def test_bad_base64_in_every_position(token: bytes) -> None:
    assert code_of(b"ENC k " + token) == BAD_REQUEST
    assert code_of(b"ENC k aGk= " + token) == BAD_REQUEST
    assert code_of(b"DEC k " + token) == BAD_REQUEST
    assert code_of(b"DEC k AAAA " + token) == BAD_REQUEST


@pytest.mark.parametrize(
    "line", [b"FOO", b"LIST keys", b"PINGPING", b"PING\tx", b"PING\r", b"PING\x00", b"\x00", b"\t"]
)
def test_unknown_commands(line: bytes) -> None:
    assert code_of(line) == UNKNOWN_COMMAND


@pytest.mark.parametrize("line", [b"\xc3\xa9", b"P\xc3\x8dNG", b"\xff x", b"FOO \x80"])
def test_non_ascii_unknown_verb_is_bad_request(line: bytes) -> None:
    assert code_of(line) == BAD_REQUEST


@pytest.mark.parametrize(
    "key_id",
    [
        b"..",
        b".",
        b"/x",
        b"x/",
        b"/",
        b"a//b",
        b"a/../b",
        b".hidden",
        b"-x",
        b"_v1",
        b"a/_b",
        b"a:b",
        b"a\\b",
        b"a\x00b",
        b"a\rb",
        b"caf\xc3\xa9",
        b"a" * (MAX_KEY_ID_LENGTH + 1),
    ],
)
def test_bad_key_ids_for_every_verb(key_id: bytes) -> None:
    for template in (
        b"CREATE %s",
        b"ROTATE %s",
        b"INFO %s",
        b"GET %s",
        b"GET %s 1",
        b"ENC %s aGk=",
        b"DEC %s aGk=",
        b"DATAKEY %s",
    ):
        assert code_of(template % key_id) == BAD_KEY_ID, template


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"FOO  x", BAD_REQUEST),  # empty token before the verb
        (b"GET .. 1 2", BAD_REQUEST),  # argument count before key id
        (b"GET .. 0", BAD_KEY_ID),  # key id before version
        (b"ENC .. !!!!", BAD_KEY_ID),
        (b"ENC k !!!! !!!!", BAD_REQUEST),
        (b"CREATE .. nonsense", BAD_KEY_ID),
        (b"CONFIG .. nonsense", BAD_KEY_ID),
        (b"CONFIG k nonsense", BAD_REQUEST),
        (b"CONFIG .. rotate=1d extra", BAD_REQUEST),
    ],
)
def test_error_precedence(line: bytes, code: str) -> None:
    assert code_of(line) == code


def test_empty_values_are_impossible() -> None:
    assert code_of(b"ENC k ") == BAD_REQUEST
    assert code_of(b"ENC k aGk= ") == BAD_REQUEST
    with pytest.raises(KmsError):
        b64decode_strict(b"=")
    assert b64decode_strict(b"") == b""  # no token can be empty, so this never reaches a request


# --------------------------------------------------------------------------- formatting


ROUND_TRIP = [
    Ping(),
    Hello(),
    Help(),
    Quit(),
    Create("k"),
    Create("pg/cluster1/wal", exportable=True),
    Rotate("k"),
    Info("k"),
    Get("k"),
    Get("k", 1),
    Get("k", MAX_VERSION),
    Encrypt("k", b"hello"),
    Encrypt("k", b"\x00" * 100, b"aad"),
    Decrypt("k", b"\x01" * 46),
    Decrypt("k", b"\x01" * 46, b"\xff"),
    GenerateDataKey("k"),
    GenerateDataKey("k", 1),
    GenerateDataKey("k", MAX_DATAKEY_BYTES),
]


@pytest.mark.parametrize("request_", ROUND_TRIP, ids=repr)
def test_to_line_then_parse_gives_the_same_request(request_: Request[Any]) -> None:
    line = request_.to_line()
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert parse_request(line[:-1]) == request_


def test_to_line_spells_requests_canonically() -> None:
    assert Create("k", exportable=True).to_line() == b"CREATE k exportable\n"
    assert Get("k", 2).to_line() == b"GET k 2\n"
    assert Encrypt("k", b"hi", b"tenant=42").to_line() == b"ENC k aGk= dGVuYW50PTQy\n"
    assert Encrypt("k", b"hi", b"").to_line() == b"ENC k aGk=\n"
    assert GenerateDataKey("k", 32).to_line() == b"DATAKEY k\n"
    assert GenerateDataKey("k", 16).to_line() == b"DATAKEY k 16\n"


def test_format_ok_and_error() -> None:
    assert format_ok() == b"OK\n"
    assert format_ok(b"PONG") == b"OK PONG\n"
    assert format_ok(b"1", b"aGk=") == b"OK 1 aGk=\n"
    for error in (KeyNotFound(), NotExportable(), TooLong()):
        line = format_error(error)
        assert line.endswith(b"\n")
        reply = parse_response(line[:-1])
        assert isinstance(reply, Err)
        assert reply.code == error.code
        assert reply.message


# --------------------------------------------------------------------------- parse_response


def test_parse_ok_replies() -> None:
    assert parse_response(b"OK") == Ok(())
    assert parse_response(b"OK PONG") == Ok(("PONG",))
    assert parse_response(b"OK 1 aGk=") == Ok(("1", "aGk="))


def test_parse_err_replies() -> None:
    reply = parse_response(b"ERR NOT_FOUND no such key or version")
    assert reply == Err("NOT_FOUND", "no such key or version")
    assert isinstance(reply, Err)
    error = reply.to_exception()
    assert isinstance(error, KeyNotFound)
    assert error.code == ErrorCode.NOT_FOUND


def test_every_wire_code_maps_to_its_exception() -> None:
    for code in ErrorCode:
        error = Err(code, "text").to_exception()
        assert error.code == code
        assert type(error) is not KmsError


def test_unknown_code_from_a_newer_server_is_a_plain_kms_error() -> None:
    reply = parse_response(b"ERR RATE_LIMITED slow down")
    assert isinstance(reply, Err)
    error = reply.to_exception()
    assert type(error) is KmsError
    assert error.code == "RATE_LIMITED"


@pytest.mark.parametrize(
    "line",
    [
        *(b"", b"PONG", b"ok PONG", b"OKAY", b"OK\xff", b"ERR", b"ERR ", b"ERRX y", b"\xffOK"),
        *(b"OK ", b"OK 1 ", b"OK a  b"),  # empty fields (an empty "plaintext" or key)
        *(b"ERR not_found x", b"ERR  x", b"ERR BAD_REQUEST \x1b]0;title\x07"),  # to a terminal
    ],
)
def test_garbage_replies_are_protocol_violations(line: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_response(line)


def test_typed_replies() -> None:
    key = bytes(range(32))
    encoded = base64.b64encode(key).decode()
    Ping().parse_reply(Ok(("PONG",)))
    assert Hello().parse_reply(Ok(("KMS/1", "0.1.0"))) == "0.1.0"
    assert Help().parse_reply(Ok(VERBS)) == VERBS
    assert Create("k").parse_reply(Ok(("1",))) == 1
    assert Rotate("k").parse_reply(Ok(("7",))) == 7
    assert Get("k").parse_reply(Ok(("2", encoded))) == KeyMaterial(2, key)
    assert Encrypt("k", b"x").parse_reply(Ok(("aGk=",))) == b"hi"
    assert Decrypt("k", b"x").parse_reply(Ok(("aGk=",))) == b"hi"
    assert GenerateDataKey("k").parse_reply(Ok((encoded, "aGk="))) == DataKey(key, b"hi")
    info = {"key_id": "k", "latest": 1, "exportable": False, "versions": []}
    assert Info("k").parse_reply(Ok((json.dumps(info, separators=(",", ":")),))) == info


@pytest.mark.parametrize(
    ("request_", "ok"),
    [
        (Ping(), Ok(("PANG",))),
        (Hello(), Ok(("KMS/2", "1.0"))),
        (Hello(), Ok(("KMS/1",))),
        (Create("k"), Ok(("one",))),
        (Get("k"), Ok(("1",))),
        (Get("k"), Ok(("1", "aGl="))),
        (Get("k"), Ok(("1", "AAAA"))),  # 3 bytes: a short key for a key hook
        (Get("k"), Ok(("1", base64.b64encode(bytes(33)).decode()))),
        (Get("k"), Ok(("0", base64.b64encode(bytes(32)).decode()))),
        (Get("k", 1), Ok(("2", base64.b64encode(bytes(32)).decode()))),  # not the one asked
        (GenerateDataKey("k", 16), Ok((base64.b64encode(bytes(32)).decode(), "aGk="))),
        (Encrypt("k", b"x"), Ok(("a*k=",))),
        (Encrypt("k", b"x"), Ok(("aGk=", "aGk="))),
        (GenerateDataKey("k"), Ok(("aGk=",))),
        (Info("k"), Ok(("{nope",))),
        (Info("k"), Ok(("[1]",))),
    ],
)
def test_malformed_typed_replies_are_protocol_violations(request_: Request[Any], ok: Ok) -> None:
    with pytest.raises(ProtocolViolation):
        request_.parse_reply(ok)


# --------------------------------------------------------------------------- secrets in repr

SECRET = b"\x8fTOPSECRET\x00\x01\x02-material-\xfe"


def secret_spellings() -> list[str]:
    return ["TOPSECRET", SECRET.hex(), base64.b64encode(SECRET).decode(), repr(SECRET)]


@pytest.mark.parametrize(
    "value",
    [
        Encrypt("k", SECRET),
        Encrypt("k", b"x", SECRET),
        Decrypt("k", b"ciphertext", SECRET),
        KeyMaterial(1, SECRET),
        DataKey(SECRET, b"wrapped"),
    ],
    ids=["enc-plaintext", "enc-aad", "dec-aad", "key-material", "data-key"],
)
def test_repr_never_shows_secret_bytes(value: object) -> None:
    text = repr(value) + str(value)
    for spelling in secret_spellings():
        assert spelling not in text


def test_repr_still_names_what_it_is() -> None:
    assert "key_id='k'" in repr(Encrypt("k", SECRET))
    assert "version=1" in repr(KeyMaterial(1, SECRET))
    assert repr(b"the wrapped key") in repr(DataKey(SECRET, b"the wrapped key"))


# --------------------------------------------------------------------------- properties

_ALNUM = string.ascii_letters + string.digits
_B64_ALPHABET = _ALNUM + "+/"
# Built from st.text rather than st.from_regex: about ten times faster to generate.
_SEGMENT = st.builds(operator.add, st.sampled_from(_ALNUM), st.text(_ALNUM + "._-", max_size=12))
KEY_IDS = (
    st.lists(_SEGMENT, min_size=1, max_size=5)
    .map("/".join)
    .filter(lambda key_id: len(key_id) <= MAX_KEY_ID_LENGTH)
)
VERSIONS = st.none() | st.integers(1, MAX_VERSION)
PAYLOADS = st.binary(min_size=1, max_size=64)

REQUESTS: st.SearchStrategy[Request[Any]] = st.one_of(
    st.sampled_from([Ping(), Hello(), Help(), Quit()]),
    st.builds(Create, KEY_IDS, st.booleans()),
    st.builds(Rotate, KEY_IDS),
    st.builds(Info, KEY_IDS),
    st.builds(Get, KEY_IDS, VERSIONS),
    st.builds(Encrypt, KEY_IDS, PAYLOADS, st.just(b"") | PAYLOADS),
    st.builds(Decrypt, KEY_IDS, PAYLOADS, st.just(b"") | PAYLOADS),
    st.builds(GenerateDataKey, KEY_IDS, st.integers(1, MAX_DATAKEY_BYTES)),
)

B64_LIKE = st.builds(
    operator.add,
    st.text(_B64_ALPHABET, max_size=12).map(str.encode),
    st.sampled_from([b"", b"=", b"==", b"==="]),
)

# Lines built from protocol-like tokens reach far deeper into the parsers than random bytes.
_TOKENS = st.one_of(
    st.sampled_from([*VERBS, "exportable", "EXPORTABLE"]).map(str.encode),
    st.sampled_from([verb.lower() for verb in VERBS]).map(str.encode),
    KEY_IDS.map(str.encode),
    B64_LIKE,
    st.integers(-(10**12), 10**12).map(lambda n: str(n).encode()),
    st.binary(max_size=8),
    st.just(b""),
)
PROTOCOLISH_LINES = st.lists(_TOKENS, min_size=1, max_size=5).map(b" ".join)


def _parses_or_refuses(line: bytes) -> None:
    refused: str | None = None
    try:
        request = parse_request(line)
    except KmsError as error:
        refused = error.code
    if refused is not None:
        assert refused in (BAD_REQUEST, UNKNOWN_COMMAND, BAD_KEY_ID)
        return
    assert line.isascii()
    assert b"\n" not in line
    # Whatever is accepted has one canonical spelling that parses back to the same request.
    assert parse_request(request.to_line()[:-1]) == request


@PROPERTY
@given(st.binary(max_size=80))
def test_arbitrary_bytes_only_raise_kms_errors(line: bytes) -> None:
    _parses_or_refuses(line)


@PROPERTY
@given(PROTOCOLISH_LINES)
def test_protocol_like_lines_only_raise_kms_errors(line: bytes) -> None:
    _parses_or_refuses(line)


@PROPERTY
@given(REQUESTS)
def test_valid_requests_round_trip(request_: Request[Any]) -> None:
    line = request_.to_line()
    assert line.endswith(b"\n")
    assert b"\n" not in line[:-1]
    assert b"  " not in line
    assert parse_request(line[:-1]) == request_


@PROPERTY
@given(st.binary(max_size=64))
def test_base64_round_trips(value: bytes) -> None:
    token = b64encode(value)
    assert token == base64.b64encode(value)
    assert b64decode_strict(token) == value


@PROPERTY
@given(B64_LIKE)
def test_base64_has_one_accepted_spelling_per_value(token: bytes) -> None:
    try:
        value = b64decode_strict(token)
    except BadRequest:
        return
    assert b64encode(value) == token


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(
        st.binary(max_size=60)
        | st.lists(st.sampled_from([b"ab", b"\r", b"\n", b"x" * 7])).map(b"".join)
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    edges = [0, *cuts, len(data)]
    return data, [data[start:end] for start, end in itertools.pairwise(edges)]


def _frame_all(chunks: list[bytes], max_line: int) -> tuple[list[bytes], bool]:
    framer = LineFramer(max_line)
    lines: list[bytes] = []
    try:
        for chunk in chunks:
            framer.feed(chunk)
            for line in framer.lines():
                lines.append(line)
    except TooLong:
        return lines, True
    return lines, False


@PROPERTY
@given(chunked(), st.integers(1, 10))
def test_split_points_do_not_change_the_lines(
    case: tuple[bytes, list[bytes]], max_line: int
) -> None:
    data, chunks = case
    whole = _frame_all([data], max_line)
    assert _frame_all(chunks, max_line) == whole
    lines, too_long = whole
    if not too_long:
        expected = [line.removesuffix(b"\r") for line in data.split(b"\n")[:-1]]
        assert lines == expected
    assert all(len(line) <= max_line for line in lines)


# --------------------------------------------------------------------------- feed_lines (daemon)

_SEGMENTS = st.lists(
    st.one_of(
        st.binary(max_size=20),
        st.sampled_from(
            [b"\n", b"\r\n", b"\r", b"PING\n", b"GET k\r\n", b"x" * 63, b"y" * 300, b"z" * 700]
        ),
    ),
    max_size=30,
).map(b"".join)


def _frame_one_by_one(chunks: list[bytes], max_line: int) -> tuple[list[bytes], list[int], bool]:
    framer = LineFramer(max_line)
    lines: list[bytes] = []
    sizes: list[int] = []
    try:
        for chunk in chunks:
            framer.feed(chunk)
            while (line := framer.next_line()) is not None:
                lines.append(line)
                sizes.append(framer.last_line_size)
    except TooLong:
        return lines, sizes, True
    return lines, sizes, False


@PROPERTY
@given(st.data(), _SEGMENTS, st.sampled_from([1, 8, 64, 256, 299, 300, 301, 1000, 1 << 20]))
def test_feed_lines_equals_feed_then_lines(
    data: st.DataObject, stream: bytes, max_line: int
) -> None:
    """Batched framing gives the same lines, wire sizes, TooLong point and partial state."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in itertools.pairwise([0, *cuts, len(stream)])]
    framer = LineFramer(max_line)
    lines: list[bytes] = []
    sizes: list[int] = []
    for chunk in chunks:
        batch = framer.feed_lines(chunk)
        wire = framer.wire_sizes
        sizes += [len(line) + 1 for line in batch] if wire is None else wire[: len(batch)]
        lines += batch
        if framer.too_long:
            break
    assert (lines, sizes, framer.too_long) == _frame_one_by_one(chunks, max_line)
    if not framer.too_long:
        assert framer.has_partial_line == bool(stream.split(b"\n")[-1])


def test_feed_lines_stops_before_an_overlong_line_and_stays_spent() -> None:
    framer = LineFramer(8)
    assert framer.feed_lines(b"PING\r\nPING\n" + b"x" * 9 + b"\nPING\n") == [b"PING", b"PING"]
    assert framer.too_long
    assert framer.wire_sizes is not None
    assert framer.wire_sizes[:2] == [6, 5]
    assert framer.feed_lines(b"PING\n") == []


def test_feed_lines_after_a_partial_line_completes_it() -> None:
    framer = LineFramer()
    assert framer.feed_lines(b"PING\nGE") == [b"PING"]
    assert framer.has_partial_line
    assert framer.feed_lines(b"T k\r") == []
    assert framer.feed_lines(b"\nPING\n") == [b"GET k", b"PING"]
    assert framer.wire_sizes == [7, 5]
    assert not framer.has_partial_line


def test_feed_twice_before_draining_keeps_complete_lines() -> None:
    """Complete lines not read yet stay lines (not part of the partial one) after a feed."""
    framer = LineFramer(8)
    framer.feed(b"PING\nPING\nPING\n")
    framer.feed(b"PI")
    assert framer.next_line() == b"PING"
    assert list(framer.lines()) == [b"PING", b"PING"]
    framer.feed(b"NG\n")
    assert list(framer.lines()) == [b"PING"]


# --------------------------------------------------------------------------- key id cache


def test_validated_key_ids_are_cached_without_changing_answers() -> None:
    for _ in range(2):  # the second round answers from the cache
        assert validate_key_id(b"pg/wal") == "pg/wal"
        assert validate_key_id(bytearray(b"pg/wal")) == "pg/wal"  # type: ignore[arg-type]
        for bad in (b"/pg", b"pg//wal", b"x" * (MAX_KEY_ID_LENGTH + 1), b"p\xc3\xa9"):
            with pytest.raises(KmsError):
                validate_key_id(bad)
    for number in range(protocol._VALID_KEY_IDS_MAX + 10):
        validate_key_id(f"k{number}".encode())
    assert len(protocol._VALID_KEY_IDS) <= protocol._VALID_KEY_IDS_MAX


# --------------------------------------------------------------------------- base64 backends

try:
    import pybase64

    HAVE_PYBASE64 = True
except ImportError:  # pragma: no cover - the daemon depends on it
    HAVE_PYBASE64 = False
needs_pybase64 = pytest.mark.skipif(not HAVE_PYBASE64, reason="pybase64 is not installed")

_B64_SYMBOLS = st.sampled_from([*_B64_ALPHABET, "=", "-", "_", " ", "\n", "*"])
B64_ANY = st.one_of(
    B64_LIKE,
    st.lists(_B64_SYMBOLS, max_size=16).map(lambda chars: "".join(chars).encode()),
    st.builds(operator.add, B64_LIKE, st.sampled_from([b"=", b"==", b"A", b"AAAA", b"===="])),
    st.binary(max_size=12),
)


def _outcome(decode: Any, token: bytes) -> bytes | None:
    try:
        value: bytes = decode(token)
    except (binascii.Error, ValueError, KmsError):
        return None
    return value


@needs_pybase64
@pytest.mark.parametrize(
    "token", [b"0000=", b"0000==", b"AAAA====", b"AAAA=", b"aGk=A", b"AA=A", b"====", b"A"]
)
def test_stdlib_decoder_refuses_padding_pybase64_refuses(token: bytes) -> None:
    assert _outcome(lambda t: pybase64.b64decode(t, validate=True), token) is None
    assert _outcome(protocol._decode_stdlib, token) is None


@needs_pybase64
@PROPERTY
@given(st.one_of(B64_ANY, st.binary(max_size=48).map(base64.b64encode)))
def test_stdlib_and_pybase64_decoders_agree(token: bytes) -> None:
    """The fallback a client without pybase64 uses accepts exactly what the daemon accepts."""
    assert _outcome(protocol._decode_stdlib, token) == _outcome(
        lambda t: pybase64.b64decode(t, validate=True), token
    )


@needs_pybase64
@PROPERTY
@given(st.one_of(B64_ANY, st.binary(max_size=48).map(base64.b64encode)))
def test_b64decode_strict_is_the_same_with_either_backend(token: bytes) -> None:
    with_pybase64 = _outcome(b64decode_strict, token)
    saved = protocol._decode
    protocol._decode = protocol._decode_stdlib
    try:
        with_stdlib = _outcome(b64decode_strict, token)
    finally:
        protocol._decode = saved
    assert with_stdlib == with_pybase64
