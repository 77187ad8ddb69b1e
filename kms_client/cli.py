# `kms`: click commands over the blocking Client, the chunked encrypted-stream format, exit codes.
# Must not speak the wire protocol itself (Client does) and must never print a traceback.
"""``kms``: the command-line client of ``kmsd``.

Errors are one line on standard error, ``kms: <what failed>``, and a distinct
exit code per kind of failure (``EXIT_CODES`` is the single table):

====  ======================================================================
code  meaning
====  ======================================================================
0     success
1     an error code this client does not know (a newer daemon)
2     usage error (click), or ``kms destroy`` not confirmed
3     cannot connect to the daemon, or the connection broke (CONNECTION_FAILED)
4     the daemon did not answer in time (TIMEOUT)
5     local I/O error (standard input/output, e.g. a broken pipe), or the
      input of ``kms encrypt``/``kms decrypt`` is empty, damaged or truncated,
      or a line of ``kms rewrap``'s input is not base64
6     the daemon's reply does not follow the protocol (PROTOCOL_VIOLATION)
10    BAD_REQUEST
11    UNKNOWN_COMMAND
12    TOO_LONG
13    BAD_KEY_ID (key ids on the command line are checked before connecting)
14    NOT_FOUND
15    EXISTS
16    NOT_EXPORTABLE
17    DENIED
18    BAD_CIPHERTEXT
19    UNAVAILABLE
20    INTERNAL
21    RETIRED
====  ======================================================================

Encrypted stream format (``kms encrypt`` writes it, ``kms decrypt`` reads it)
----------------------------------------------------------------------------
A request line is limited to 1 MiB, so input is encrypted in chunks::

    stream  = header record+
    header  = "KMSS" 0x01 stream-id          ; stream-id: 16 random bytes
    record  = length ciphertext               ; length: 4 bytes, big-endian
    ciphertext = ENC(key, chunk, aad)         ; as the ENC verb returns it, decoded from base64
    aad     = "kms-stream/1" 0x00 stream-id index final user-aad
    index   = 8 bytes big-endian, 0 for the first chunk
    final   = 0x01 for the last chunk, else 0x00

Every chunk holds 256 KiB of plaintext except the last, which holds 1 to 256 KiB.
Empty input cannot be encrypted (the protocol has no empty plaintext). The AAD
binds each record to its stream, its position and whether it ends the stream,
so reordered, dropped, duplicated or spliced records fail to decrypt; a stream
cut at a record boundary, or with data after its final record, is reported as
damaged (exit 5). ``kms decrypt`` writes plaintext as each record opens: when it
fails, discard what it wrote. Input that does not start with ``KMSS`` 0x01 is
taken as one ENC ciphertext (raw, or its base64 line) and decrypted with the user
AAD as given.

Rewrap input and output (``kms rewrap``)
----------------------------------------
One standard base64 ciphertext per line in, the same ciphertext re-encrypted
under the key's latest version per line out, in the same order (white space
around a line is ignored; an empty line is an error). Lines are sent in
pipelined windows (``Client.rewrap_many``) and written as each window returns.
On failure, standard output holds exactly the rewrapped lines before the failing
one, and the error names the failing line's number.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import math
import os
import secrets
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import IO, Any, NoReturn

import click

from kms_client.errors import (
    BadCiphertext,
    BadKeyId,
    ConnectionFailed,
    ErrorCode,
    KmsError,
    ProtocolViolation,
    Timeout,
)
from kms_client.protocol import (
    DEFAULT_DATAKEY_BYTES,
    DEFAULT_MAX_LINE,
    MAX_DATAKEY_BYTES,
    MAX_VERSION,
    Decrypt,
    Encrypt,
    b64decode_strict,
    b64encode,
    parse_period,
    validate_key_id,
)
from kms_client.sync import MAX_TIMEOUT, Client

DEFAULT_SOCKET = "/run/kms/kms.sock"
DEFAULT_TIMEOUT = 10.0

EXIT_OK = 0
EXIT_UNKNOWN = 1
EXIT_USAGE = 2
#: Key of :data:`EXIT_CODES` for failures on our side of the socket (stdin, stdout, stream input).
LOCAL = "LOCAL"

#: Error code (``KmsError.code``, or :data:`LOCAL`) -> exit status. The one table.
EXIT_CODES: dict[str, int] = {
    ConnectionFailed.code: 3,
    Timeout.code: 4,
    LOCAL: 5,
    ProtocolViolation.code: 6,
    ErrorCode.BAD_REQUEST: 10,
    ErrorCode.UNKNOWN_COMMAND: 11,
    ErrorCode.TOO_LONG: 12,
    ErrorCode.BAD_KEY_ID: 13,
    ErrorCode.NOT_FOUND: 14,
    ErrorCode.EXISTS: 15,
    ErrorCode.NOT_EXPORTABLE: 16,
    ErrorCode.DENIED: 17,
    ErrorCode.BAD_CIPHERTEXT: 18,
    ErrorCode.UNAVAILABLE: 19,
    ErrorCode.INTERNAL: 20,
    ErrorCode.RETIRED: 21,
}

# ---------------------------------------------------------------------- stream format

STREAM_MAGIC = b"KMSS\x01"
STREAM_ID_SIZE = 16
STREAM_HEADER_SIZE = len(STREAM_MAGIC) + STREAM_ID_SIZE
STREAM_AAD_PREFIX = b"kms-stream/1\x00"
CHUNK_SIZE = 256 << 10
#: Largest record accepted: a full chunk plus room for any ciphertext envelope (kmsd adds 45).
MAX_RECORD_SIZE = CHUNK_SIZE + 1024
_LENGTH_SIZE = 4
#: Chunks in flight at once (one pipelined batch): overlaps our base64 work with the daemon's.
PIPELINE_DEPTH = 4
#: Largest raw ciphertext whose DEC line (base64, 4/3 larger) fits the daemon's line limit.
MAX_RAW_CIPHERTEXT = (DEFAULT_MAX_LINE - 1024) // 4 * 3
#: Longest input taken for a single ciphertext: its base64 text and a CRLF.
MAX_SINGLE_INPUT = MAX_RAW_CIPHERTEXT // 3 * 4 + 2
#: The standard base64 alphabet: text of only these is a ciphertext's base64, never its raw
#: bytes (a raw ciphertext starts with its format byte, 0x01).
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
#: Longest input line of ``kms rewrap`` (base64 of the largest ciphertext, CRLF, white space).
MAX_REWRAP_LINE = DEFAULT_MAX_LINE


class LocalError(Exception):
    """A failure on our side of the socket; always exit status ``EXIT_CODES[LOCAL]``."""

    code = LOCAL


class UsageProblem(Exception):
    """A request we refuse before connecting (an unconfirmed ``destroy``): exit 2, one line."""


class StreamDamaged(LocalError):
    """The input of ``kms decrypt`` is not a whole, well-formed encrypted stream."""

    def __init__(self) -> None:
        super().__init__("encrypted stream is damaged or truncated")


def stream_aad(stream_id: bytes, index: int, final: bool, user_aad: bytes) -> bytes:
    """The AAD of one record: it binds the record to its stream, position and finality."""
    return (
        STREAM_AAD_PREFIX
        + stream_id
        + index.to_bytes(8, "big")
        + (b"\x01" if final else b"\x00")
        + user_aad
    )


def read_exactly(source: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at end of input (pipes return short reads)."""
    parts: list[bytes] = []
    remaining = size
    try:
        while remaining:
            data = source.read(remaining)
            if not data:
                break
            parts.append(data)
            remaining -= len(data)
    except OSError as exc:
        raise LocalError(f"cannot read standard input: {exc.strerror or exc}") from exc
    return b"".join(parts)


def write_out(sink: IO[bytes], data: bytes) -> None:
    try:
        sink.write(data)
    except OSError as exc:
        raise LocalError(f"cannot write standard output: {exc.strerror or exc}") from exc


def iter_chunks(source: IO[bytes], chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[bytes, bool]]:
    """Yield ``(chunk, is_final)``, reading one chunk ahead so the last one is known."""
    current = read_exactly(source, chunk_size)
    if not current:
        raise LocalError("nothing to encrypt: standard input is empty")
    while True:
        following = read_exactly(source, chunk_size) if len(current) == chunk_size else b""
        yield current, not following
        if not following:
            return
        current = following


def _read_record(source: IO[bytes]) -> bytes | None:
    """One record's ciphertext, or ``None`` at a clean end of input."""
    header = read_exactly(source, _LENGTH_SIZE)
    if not header:
        return None
    length = int.from_bytes(header, "big")
    if len(header) < _LENGTH_SIZE or not 1 <= length <= MAX_RECORD_SIZE:
        raise StreamDamaged()
    body = read_exactly(source, length)
    if len(body) < length:
        raise StreamDamaged()
    return body


def iter_records(source: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Yield ``(ciphertext, is_last_in_input)`` for each record after the header."""
    current = _read_record(source)
    if current is None:
        raise StreamDamaged()
    while True:
        following = _read_record(source)
        yield current, following is None
        if following is None:
            return
        current = following


def _first_error(results: Sequence[Any]) -> None:
    for result in results:
        if isinstance(result, KmsError):
            raise result


def encrypt_stream(
    client: Client,
    key_id: str,
    source: IO[bytes],
    sink: IO[bytes],
    user_aad: bytes = b"",
    *,
    stream_id: bytes | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> None:
    """Encrypt ``source`` to ``sink`` in the stream format (see the module docstring).

    Nothing is written before the first chunk is encrypted, so a missing key or
    an unreachable daemon leaves the output empty.
    """
    if stream_id is None:
        stream_id = secrets.token_bytes(STREAM_ID_SIZE)
    chunks = enumerate(iter_chunks(source, chunk_size))
    header = STREAM_MAGIC + stream_id
    while batch := list(islice(chunks, PIPELINE_DEPTH)):
        requests = [
            Encrypt(key_id, chunk, stream_aad(stream_id, index, final, user_aad))
            for index, (chunk, final) in batch
        ]
        results = client.pipeline(requests)
        _first_error(results)
        records = [header]
        for ciphertext in results:
            if not 1 <= len(ciphertext) <= MAX_RECORD_SIZE:
                raise ProtocolViolation("ENC reply does not fit a stream record")
            records += (len(ciphertext).to_bytes(_LENGTH_SIZE, "big"), ciphertext)
        write_out(sink, b"".join(records))
        header = b""


def decrypt_input(
    client: Client, key_id: str, source: IO[bytes], sink: IO[bytes], user_aad: bytes = b""
) -> None:
    """Decrypt an encrypted stream, or one ENC ciphertext, from ``source`` to ``sink``."""
    magic = read_exactly(source, len(STREAM_MAGIC))
    if magic != STREAM_MAGIC:
        _decrypt_raw(client, key_id, magic, source, sink, user_aad)
        return
    stream_id = read_exactly(source, STREAM_ID_SIZE)
    if len(stream_id) < STREAM_ID_SIZE:
        raise StreamDamaged()
    records = enumerate(iter_records(source))
    while batch := list(islice(records, PIPELINE_DEPTH)):
        requests = [
            Decrypt(key_id, ciphertext, stream_aad(stream_id, index, final, user_aad))
            for index, (ciphertext, final) in batch
        ]
        results = client.pipeline(requests)
        opened: list[bytes] = []
        for request, (index, (_, final)), result in zip(requests, batch, results, strict=True):
            if isinstance(result, BadCiphertext):
                write_out(sink, b"".join(opened))
                _classify_failure(client, request, stream_id, index, not final, user_aad, result)
            if isinstance(result, KmsError):
                write_out(sink, b"".join(opened))
                raise result
            opened.append(result)
        write_out(sink, b"".join(opened))


def _classify_failure(
    client: Client,
    request: Decrypt,
    stream_id: bytes,
    index: int,
    other_final: bool,
    user_aad: bytes,
    failure: BadCiphertext,
) -> NoReturn:
    """Tell a cut or over-long stream (exit 5) from a forged or foreign record (exit 18).

    A record that opens with the *other* final flag is authentic but in the
    wrong place: the stream lost its end, or has records after its end.
    """
    aad = stream_aad(stream_id, index, other_final, user_aad)
    try:
        client.decrypt(request.key_id, request.ciphertext, aad)
    except BadCiphertext:
        raise failure from None
    raise StreamDamaged()


def _decrypt_raw(
    client: Client,
    key_id: str,
    head: bytes,
    source: IO[bytes],
    sink: IO[bytes],
    user_aad: bytes,
) -> None:
    data = head + read_exactly(source, MAX_SINGLE_INPUT + 1 - len(head))
    if not data:
        raise LocalError("nothing to decrypt: standard input is empty")
    write_out(sink, client.decrypt(key_id, single_ciphertext(data), user_aad))


def single_ciphertext(data: bytes) -> bytes:
    """The one ciphertext ``data`` holds: raw bytes, or the base64 line ``ENC`` and
    ``kms datakey`` print (so a wrapped data key unwraps without ``base64 -d``).

    Input that cannot be one is :class:`BadCiphertext`, as if the daemon said so.
    """
    text = data.removesuffix(b"\n").removesuffix(b"\r")
    if text and not text.translate(None, _BASE64_ALPHABET):
        try:
            return b64decode_strict(text)
        except KmsError:
            raise BadCiphertext("input is base64 text but not a ciphertext") from None
    if len(data) > MAX_RAW_CIPHERTEXT:  # too long for one
        raise BadCiphertext("input is neither an encrypted stream nor a single ciphertext")
    return data


# ---------------------------------------------------------------------- rewrap input


class CiphertextLines:
    """Iterates the ciphertexts of ``kms rewrap``'s input, one base64 line each.

    A line that is not base64 ends the iteration *cleanly* and is kept in
    :attr:`error`, so every line before it is still rewrapped and written; the
    caller raises the error afterwards.
    """

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.count = 0
        self.error: LocalError | None = None

    def __iter__(self) -> Iterator[bytes]:
        while raw := self._readline():
            self.count += 1
            token = raw.strip()
            try:
                ciphertext = b64decode_strict(token) if token else None
            except KmsError:
                ciphertext = None
            if ciphertext is None or len(raw) > MAX_REWRAP_LINE:
                self.error = LocalError(f"line {self.count}: not a base64 ciphertext")
                return
            yield ciphertext

    def _readline(self) -> bytes:
        """The next line, or a prefix one byte too long to be a ciphertext (never unbounded)."""
        try:
            return self._source.readline(MAX_REWRAP_LINE + 1)
        except OSError as exc:
            raise LocalError(f"cannot read standard input: {exc.strerror or exc}") from exc


def count_lines(source: IO[bytes]) -> int | None:
    """Lines left in ``source`` when it is a regular file (then rewound), else ``None``."""
    try:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            return None
        start = source.tell()
        count, last = 0, b"\n"
        while chunk := source.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
        source.seek(start)
    except (OSError, ValueError):
        return None
    return count + (last != b"\n")


class ProgressMeter:
    """``kms rewrap: 1200/5000 (24%)`` redrawn in place on a terminal, at most 10 times a second."""

    def __init__(self, terminal: IO[str], total: int | None) -> None:
        self._terminal = terminal
        self._total = total
        self._done = 0
        self._drawn_at = -1.0
        self._shown: int | None = None

    def __call__(self, done: int, total: int | None) -> None:
        self._done = done
        if self._total is None:
            self._total = total
        if time.monotonic() - self._drawn_at >= 0.1:
            self._draw()

    def _draw(self) -> None:
        done, total = self._done, self._total
        if total:
            text = f"kms rewrap: {done}/{total} ({100 * done // total}%)"
        else:
            text = f"kms rewrap: {done}"
        self._write(f"\r{text}\x1b[K")
        self._drawn_at = time.monotonic()
        self._shown = done

    def close(self) -> None:
        """Show the final count and end the line, so what follows starts at column 0."""
        if self._shown is None and self._done == 0:
            return
        if self._shown != self._done:
            self._draw()
        self._write("\n")

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._terminal.write(text)
            self._terminal.flush()


def rewrap_lines(
    client: Client,
    key_id: str,
    source: IO[bytes],
    sink: IO[bytes],
    aad: bytes = b"",
    meter: ProgressMeter | None = None,
) -> int:
    """Rewrap each base64 line of ``source`` to ``sink``, in order; returns how many.

    Output is flushed after every window, so a consumer downstream sees steady
    progress and, on failure, exactly the lines before the failing one.
    """
    lines = CiphertextLines(source)
    out: list[bytes] = []
    done = 0

    def window_done(count: int, total: int | None) -> None:
        write_out(sink, b"".join(out))
        out.clear()
        _flush(sink)
        if meter is not None:
            meter(count, total)

    try:
        for ciphertext in client.rewrap_many(key_id, lines, aad, progress=window_done):
            out.append(b64encode(ciphertext) + b"\n")
            done += 1
    except KmsError as error:
        write_out(sink, b"".join(out))
        if not isinstance(error, ConnectionFailed | Timeout | ProtocolViolation):
            error.message = f"line {done + 1}: {error.message}"  # the daemon refused this line
        raise
    if lines.error is not None:
        raise lines.error
    return done


# ---------------------------------------------------------------------- click plumbing


def exit_code_for(error: KmsError | LocalError) -> int:
    if type(error) is KmsError:  # an ERR code this client does not know, even "TIMEOUT"
        return EXIT_UNKNOWN
    return EXIT_CODES.get(str(error.code), EXIT_UNKNOWN)


def _epilog() -> str:
    # "\b" keeps click from re-wrapping the table.
    names = {
        ConnectionFailed.code: "cannot connect to the daemon",
        Timeout.code: "the daemon did not answer in time",
        LOCAL: "local I/O error, or bad encrypt/decrypt/rewrap input",
        ProtocolViolation.code: "the daemon's reply breaks the protocol",
    }
    lines = [
        "\b",
        "Exit codes:",
        "   0  success",
        "   1  unknown error code",
        "   2  usage error (or destroy not confirmed)",
    ]
    for code, status in sorted(EXIT_CODES.items(), key=lambda item: item[1]):
        lines.append(f"  {status:>2}  {names.get(code, code)}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Settings:
    """The global options, shared with every subcommand through ``pass_settings``."""

    socket_path: str
    timeout: float

    def client(self) -> Client:
        return Client(self.socket_path, self.timeout)


pass_settings = click.make_pass_decorator(Settings)


def _key_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Check a key id before connecting: a bad one is BAD_KEY_ID (exit 13), not a usage error."""
    try:
        return validate_key_id(value.encode("ascii", "replace"))
    except BadKeyId:
        raise BadKeyId(
            f"invalid key id {value!r}: use letters, digits, '.', '_' and '-',"
            " '/' between segments, at most 255 characters"
        ) from None


key_argument = click.argument("key_id", metavar="KEY", callback=_key_id)


def _say_error(message: str) -> None:
    with contextlib.suppress(OSError):
        click.echo(f"kms: {' '.join(message.split())}", err=True)


def _silence_stdout() -> None:
    """After EPIPE on stdout, point it at /dev/null so the exit-time flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class OneLineUsageGroup(click.Group):
    """A command group whose usage errors are one line on stderr, like every other error.

    Click would print its usage block (four lines) for an unknown option, a missing
    argument or a bad value; scripts and ``cluster_key_command`` hooks read one line.
    ``error_prefix`` starts the line (``kms: `` or ``kmsd: error: ``).
    """

    error_prefix = "kms: "

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False  # click raises its errors; we print them
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as problem:  # no command: the help, as is
            with contextlib.suppress(OSError):
                click.echo(problem.ctx.get_help(), err=True)
            sys.exit(problem.exit_code)
        except click.ClickException as problem:
            message = problem.format_message()
            context = getattr(problem, "ctx", None)
            if context is not None:
                message += f" Try '{context.command_path} --help'."
            with contextlib.suppress(OSError):
                click.echo(self.error_prefix + " ".join(message.split()), err=True)
            sys.exit(problem.exit_code)
        except click.Abort:  # Ctrl-C at a prompt
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


class KmsGroup(OneLineUsageGroup):
    """Turns every failure into one ``kms: ...`` line and its exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        if sys.stdout is None:  # `>&-`: say so before a request, not after a CREATE
            _say_error("standard output is closed")
            ctx.exit(EXIT_CODES[LOCAL])
        try:
            result = super().invoke(ctx)
            try:
                sys.stdout.flush()
            except OSError as exc:
                raise LocalError(f"cannot write standard output: {exc.strerror or exc}") from exc
        except (KmsError, LocalError) as error:
            if isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.EPIPE:
                _silence_stdout()
            _say_error(str(error))
            ctx.exit(exit_code_for(error))
        except UsageProblem as problem:
            _say_error(str(problem))
            ctx.exit(EXIT_USAGE)
        except OSError as exc:  # a local file or stream we did not wrap: still exit 5
            if exc.errno == errno.EPIPE:
                _silence_stdout()
            _say_error(f"I/O error: {exc.strerror or exc}")
            ctx.exit(EXIT_CODES[LOCAL])
        return result


def _not_nan(seconds: float) -> float:
    if math.isnan(seconds):  # FloatRange's comparisons all let NaN through
        raise click.BadParameter("nan is not a number of seconds.")
    return seconds


@click.group(
    cls=KmsGroup, epilog=_epilog(), context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--socket",
    "socket_path",
    envvar="KMS_SOCKET",
    default=DEFAULT_SOCKET,
    show_default=True,
    metavar="PATH",
    help="The daemon's Unix socket (env KMS_SOCKET).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True, max=MAX_TIMEOUT),
    callback=lambda _ctx, _param, value: _not_nan(value),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for each request.",
)
@click.pass_context
def cli(ctx: click.Context, socket_path: str, timeout: float) -> None:
    """kms: ask the key-management daemon (kmsd) for keys, encryption and decryption."""
    ctx.obj = Settings(socket_path, timeout)


def _stdin() -> IO[bytes]:
    if sys.stdin is None:  # `<&-`
        raise LocalError("standard input is closed")
    return _blocking(sys.stdin.buffer)


def _stdout() -> IO[bytes]:
    return _blocking(sys.stdout.buffer)


def _blocking(stream: IO[bytes]) -> IO[bytes]:
    """``stream`` with its descriptor blocking: a parent may leave a pipe ``O_NONBLOCK``,
    and then a read with nothing ready yet would look like the end of the input."""
    with contextlib.suppress(OSError, ValueError):  # not a file (a test's stand-in)
        os.set_blocking(stream.fileno(), True)
    return stream


@cli.command()
@pass_settings
def ping(settings: Settings) -> None:
    """Check that the daemon answers; prints PONG."""
    with settings.client() as client:
        client.ping()
    click.echo("PONG")


@cli.command()
@key_argument
@click.option("--version", type=click.IntRange(1, MAX_VERSION), help="A past version.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hex", "base64", "raw"]),
    default="hex",
    show_default=True,
    help="raw writes the key bytes with no newline.",
)
@pass_settings
def get(settings: Settings, key_id: str, version: int | None, fmt: str) -> None:
    """Print an exportable key (the current version unless --version)."""
    with settings.client() as client:
        material = client.get(key_id, version)
    if fmt == "raw":
        write_out(_stdout(), material.key)
    elif fmt == "base64":
        click.echo(base64.b64encode(material.key).decode("ascii"))
    else:
        click.echo(material.key.hex())


@cli.command()
@key_argument
@click.option("--aad", default="", help="Additional authenticated data (the argument's bytes).")
@pass_settings
def encrypt(settings: Settings, key_id: str, aad: str) -> None:
    """Encrypt standard input to standard output as an encrypted stream."""
    with settings.client() as client:
        encrypt_stream(client, key_id, _stdin(), _stdout(), os.fsencode(aad))
    _flush(_stdout())


@cli.command()
@key_argument
@click.option("--aad", default="", help="The AAD given to encrypt.")
@pass_settings
def decrypt(settings: Settings, key_id: str, aad: str) -> None:
    """Decrypt an encrypted stream (or one ENC ciphertext, raw or base64) from standard input."""
    with settings.client() as client:
        decrypt_input(client, key_id, _stdin(), _stdout(), os.fsencode(aad))
    _flush(_stdout())


@cli.command()
@key_argument
@click.option(
    "--bytes",
    "nbytes",
    type=click.IntRange(1, MAX_DATAKEY_BYTES),
    default=DEFAULT_DATAKEY_BYTES,
    show_default=True,
    help="Length of the new data key.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hex", "base64", "json"]),
    default="hex",
    show_default=True,
    help="hex/base64: the key, then the wrapped key in base64, one per line.",
)
@pass_settings
def datakey(settings: Settings, key_id: str, nbytes: int, fmt: str) -> None:
    """Make a fresh data key; print it and the same key wrapped under KEY."""
    with settings.client() as client:
        data_key = client.datakey(key_id, nbytes)
    wrapped = base64.b64encode(data_key.wrapped).decode("ascii")
    if fmt == "json":
        key = base64.b64encode(data_key.key).decode("ascii")
        click.echo(json.dumps({"key": key, "wrapped": wrapped}))
    elif fmt == "base64":
        click.echo(base64.b64encode(data_key.key).decode("ascii"))
        click.echo(wrapped)
    else:
        click.echo(data_key.key.hex())
        click.echo(wrapped)


def _period(value: str | None, allow_off: bool) -> int | None:
    """``45s``, ``30m``, ``12h`` or ``90d`` as seconds; ``off`` as ``None`` where allowed."""
    if value is None or (allow_off and value.lower() == "off"):
        return None
    try:
        return parse_period(value.encode("ascii"))
    except (UnicodeEncodeError, KmsError):
        raise click.BadParameter(
            f"{value!r} is not a period: a number and s, m, h or d (45s, 30m, 12h, 90d),"
            " at most 100 years" + (", or off" if allow_off else "")
        ) from None


def _period_or_off(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return _period(value, allow_off=True)


def _period_only(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return _period(value, allow_off=False)


version_argument = click.argument("version", type=click.IntRange(1, MAX_VERSION))


@cli.command()
@key_argument
@click.option("--exportable", is_flag=True, help="Allow GET to export the key.")
@click.option(
    "--rotate",
    "rotate_period",
    metavar="PERIOD",
    callback=_period_only,
    help="Rotate automatically when the latest version is this old (45s, 30m, 12h, 90d).",
)
@pass_settings
def create(settings: Settings, key_id: str, exportable: bool, rotate_period: int | None) -> None:
    """Create a key; prints its version (1)."""
    with settings.client() as client:
        click.echo(client.create(key_id, exportable, rotate_period))


@cli.command()
@key_argument
@click.option(
    "--rotate",
    "rotate_period",
    metavar="PERIOD|off",
    callback=_period_or_off,
    required=True,
    help="Automatic rotation period (45s, 30m, 12h, 90d), or off.",
)
@pass_settings
def config(settings: Settings, key_id: str, rotate_period: int | None) -> None:
    """Set or turn off a key's automatic rotation."""
    with settings.client() as client:
        client.configure(key_id, rotate_period)


@cli.command()
@key_argument
@click.option(
    "--aad", default="", help="The AAD the ciphertexts were made with (the same for all)."
)
@pass_settings
def rewrap(settings: Settings, key_id: str, aad: str) -> None:
    """Re-encrypt base64 ciphertexts (one per line on stdin) under KEY's latest version.

    Writes the new ciphertexts, one per line and in order, to standard output.
    The plaintexts never leave the daemon. Shows progress on standard error when
    it is a terminal.
    """
    source = _stdin()
    meter = None
    if _is_terminal(sys.stderr):
        meter = ProgressMeter(sys.stderr, count_lines(source))
    try:
        with settings.client() as client:
            rewrap_lines(client, key_id, source, _stdout(), os.fsencode(aad), meter)
    finally:
        if meter is not None:
            meter.close()


@cli.command()
@key_argument
@version_argument
@pass_settings
def retire(settings: Settings, key_id: str, version: int) -> None:
    """Forbid every use of a version (ERR RETIRED) while keeping it; undo with restore."""
    with settings.client() as client:
        client.retire(key_id, version)


@cli.command()
@key_argument
@version_argument
@pass_settings
def restore(settings: Settings, key_id: str, version: int) -> None:
    """Make a retired version usable again."""
    with settings.client() as client:
        client.restore(key_id, version)


@cli.command()
@key_argument
@version_argument
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_settings
def destroy(settings: Settings, key_id: str, version: int, yes: bool) -> None:
    """Erase a version's key material for good (never the latest version).

    Whatever is still encrypted under it can never be decrypted again. Asks for
    confirmation on a terminal; elsewhere, give --yes.
    """
    if not yes:
        if not _is_terminal(sys.stdin):
            raise UsageProblem(
                "destroy erases key material for good; standard input is not a terminal"
                " to confirm on, so give --yes"
            )
        question = (
            f"Destroy version {version} of {key_id} for good? Data still encrypted under it"
            " can never be decrypted again"
        )
        try:
            confirmed = click.confirm(question, default=False, err=True)
        except click.Abort:
            confirmed = False
        if not confirmed:
            raise UsageProblem("not confirmed: nothing destroyed")
    with settings.client() as client:
        client.destroy(key_id, version)


@cli.command()
@key_argument
@pass_settings
def rotate(settings: Settings, key_id: str) -> None:
    """Add a new version and make it current; prints the new version."""
    with settings.client() as client:
        click.echo(client.rotate(key_id))


@cli.command()
@key_argument
@pass_settings
def info(settings: Settings, key_id: str) -> None:
    """Print what the daemon knows about a key, as JSON (indented on a terminal)."""
    with settings.client() as client:
        details = client.info(key_id)
    pretty = sys.stdout.isatty()
    click.echo(json.dumps(details, indent=2 if pretty else None))


def _is_terminal(stream: IO[str] | None) -> bool:
    if stream is None:  # closed (`<&-`)
        return False
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


def _flush(sink: IO[bytes]) -> None:
    try:
        sink.flush()
    except OSError as exc:
        raise LocalError(f"cannot write standard output: {exc.strerror or exc}") from exc


def main() -> None:
    """Entry point of the ``kms`` script and ``python -m kms_client``."""
    cli.main(prog_name="kms")
