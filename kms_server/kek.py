# KEK sources: where the key-encryption key comes from (file, passphrase command; transit.py).
# Returns the KEK in a wipeable buffer; never writes, logs or returns it anywhere else.
"""Key-encryption-key sources, one per store, chosen at ``kmsd init``.

The store metadata records the source *kind* and, for a passphrase, the
Argon2id parameters and salt, so ``kmsd serve`` can refuse the wrong kind of
source with a clear message and re-derive the same KEK.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import select
import shlex
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from kms_server.crypto import KEY_SIZE, argon2id, random_bytes, wipe

#: RFC 9106 section 4, second recommended option: t=3, p=4, m=64 MiB, 16-byte salt.
ARGON2_ITERATIONS = 3
ARGON2_LANES = 4
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_SALT_SIZE = 16
DEFAULT_COMMAND_TIMEOUT = 30.0
#: The kind a Transit KEK source records (kms_server/transit.py; imported only for it).
TRANSIT_KIND = "transit"
#: How long a Transit KEK source retries at start while no node can answer.
TRANSIT_START_TIMEOUT = 60.0
#: A KEK file holds 32 bytes or 64 hex characters: a larger one (say /dev/zero) is refused.
MAX_KEK_FILE_SIZE = 4096
#: How long a KEK "file" that is a pipe may take to deliver; a regular file reads at once.
KEK_FILE_TIMEOUT = 10.0
#: The longest passphrase a passphrase command may print (its first line).
MAX_PASSPHRASE_SIZE = 64 << 10


class KekError(Exception):
    """The KEK could not be obtained; the message says why and never holds secrets."""


class SourceRecordDamaged(KekError):
    """The store's record of its KEK source does not parse: the store is damaged
    (``kmsd`` exit 3), whatever the source would say."""


class KekSource(Protocol):
    @property
    def kind(self) -> str:
        """The source kind recorded in the store metadata: "file", "passphrase", "transit"."""

    def describe_new(self, store_id: str = "") -> dict[str, Any]:
        """The metadata ``kmsd init`` (or a rekey) records for a store using this source."""

    def obtain(self, description: dict[str, Any], store_id: str = "") -> bytearray:
        """The KEK, given the store's recorded description. May block (KDF, command, HTTP)."""


@dataclass(frozen=True)
class KekFile:
    """32 raw bytes, or 64 hex characters with optional surrounding whitespace."""

    path: Path
    kind: str = "file"

    def describe_new(self, store_id: str = "") -> dict[str, Any]:
        return {"kind": self.kind}

    def obtain(self, description: dict[str, Any], store_id: str = "") -> bytearray:
        data = read_small_file(self.path, MAX_KEK_FILE_SIZE, KEK_FILE_TIMEOUT)
        if len(data) == KEY_SIZE:
            return data
        text = data.strip()
        try:
            if len(text) == 2 * KEY_SIZE:
                return bytearray(binascii.unhexlify(text))
        except binascii.Error:
            pass
        finally:  # the hex spelling of the KEK is not kept around
            wipe(data)
            wipe(text)
        raise KekError(f"KEK file {self.path} must hold 32 raw bytes or 64 hex characters")


def read_small_file(path: Path, limit: int, timeout: float, what: str = "KEK file") -> bytearray:
    """Read ``path`` into a wipeable buffer, refusing more than ``limit`` bytes.

    Never blocks past ``timeout``: the daemon reads a new KEK file for ``REKEY``
    while every store change waits. Opened non-blocking, a FIFO nobody writes to
    reads as empty at once, a pipe that stalls is given up, and a device that
    never ends (``/dev/zero``) is refused at ``limit``. Read straight into the
    buffer, so no copy of the KEK is left in an immutable ``bytes``. A file every
    user may write is refused: what it holds may be anyone's. ``what`` names the
    file in errors (a KEK file, a Transit token file).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise KekError(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError:  # an embedded NUL
        raise KekError(f"cannot read {what}: its path holds a NUL byte") from None
    buffer = bytearray(limit + 1)
    size = 0
    try:
        refuse_if_writable_by_all(fd, path, what)
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        with memoryview(buffer) as view:
            while size < len(buffer):
                try:
                    count = os.readv(fd, [view[size:]])
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise KekError(
                            f"{what} {path} delivered nothing within {timeout:g} s"
                        ) from None
                    poller.poll(remaining * 1000)
                    continue
                if not count:
                    break
                size += count
        if size > limit:
            raise KekError(f"{what} {path} is larger than {limit} bytes: not a {what}")
    except OSError as exc:
        wipe(buffer)
        raise KekError(f"cannot read {what} {path}: {exc.strerror}") from None
    except BaseException:
        wipe(buffer)
        raise
    finally:
        os.close(fd)
    content = buffer[:size]  # a copy, then the read buffer is wiped: shrinking it in
    wipe(buffer)  # place could leave the KEK behind in memory freed by a realloc
    return content


def refuse_if_writable_by_all(fd: int, path: Path, what: str) -> None:
    """A secret file any user could have written is refused: its secret may be theirs.

    Checked on the open descriptor, so it is the file that is read.
    """
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) and mode & stat.S_IWOTH:
        raise KekError(
            f"{what} {path} is writable by every user (mode {stat.S_IMODE(mode):04o}), "
            "so anyone could have put their own there: make a new one under umask 077"
        )


def exposure_of(path: Path, what: str = "KEK file") -> str | None:
    """Why a secret file (a KEK file, a Transit token) is open to every user, or None.

    Said as a warning, not refused. Such a file should be 0600 (made under ``umask
    077``). One every user may read is accepted, so a service does not stop at its next
    restart over a mode, but the daemon says it each time it reads the file (once the
    KEK is found right).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) and mode & stat.S_IROTH:
        return (
            f"{what} {path} is readable by every user (mode {stat.S_IMODE(mode):04o}): "
            f"chmod 600 {path}"
        )
    return None


def end_session(child: subprocess.Popen[bytes]) -> None:
    """Kill the command's whole session: a grandchild holding the pipe must not outlive it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def first_line_of(output: IO[bytes], deadline: float) -> bytes:
    """The first line of the child's output (without LF or CRLF), read until end of output.

    Only the first line is kept; the rest is read and dropped, so a command that
    prints without end (``yes``) costs no memory and meets the deadline
    (:class:`TimeoutError`). A first line over ``MAX_PASSPHRASE_SIZE`` is refused.
    """
    fd = output.fileno()
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    line = b""
    complete = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if not poller.poll(remaining * 1000):
            continue
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            return line.removesuffix(b"\r")
        if not complete:
            end = chunk.find(b"\n")
            line += chunk if end < 0 else chunk[:end]
            complete = end >= 0
            if len(line) > MAX_PASSPHRASE_SIZE:
                raise KekError(
                    "the passphrase command's first line is longer than"
                    f" {MAX_PASSPHRASE_SIZE} bytes"
                )


@dataclass(frozen=True)
class PassphraseCommand:
    """Runs a command (no shell) and stretches the first line of its output with Argon2id."""

    command: str = field(repr=False)  # it may hold a passphrase (`echo ...`)
    timeout: float = DEFAULT_COMMAND_TIMEOUT
    kind: str = "passphrase"
    #: Run by a serving daemon: what the command writes to stderr would land among the
    #: audit trail's JSON lines (stderr by default), and may hold what it asked for.
    discard_stderr: bool = False

    def describe_new(self, store_id: str = "") -> dict[str, Any]:
        return {
            "kind": self.kind,
            "kdf": "argon2id",
            "iterations": ARGON2_ITERATIONS,
            "lanes": ARGON2_LANES,
            "memory_kib": ARGON2_MEMORY_KIB,
            "salt": base64.b64encode(random_bytes(ARGON2_SALT_SIZE)).decode(),
        }

    def read_passphrase(self) -> bytes:
        try:
            argv = shlex.split(self.command)
        except ValueError as exc:
            raise KekError(f"cannot parse the passphrase command: {exc}") from None
        if not argv:
            raise KekError("the passphrase command is empty")
        try:
            child = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL if self.discard_stderr else None,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise KekError(f"passphrase command not found: {argv[0]}") from None
        except PermissionError:
            raise KekError(f"passphrase command is not executable: {argv[0]}") from None
        except OSError as exc:  # not a program, a path through a file, too long, a loop
            raise KekError(f"cannot run the passphrase command: {exc.strerror}") from None
        except ValueError:  # an embedded NUL
            raise KekError("cannot run the passphrase command: it holds a NUL byte") from None
        try:  # at once: a stop signal (an exception from a handler) must not orphan it
            output = cast("IO[bytes]", child.stdout)  # stdout=PIPE
            deadline = time.monotonic() + self.timeout
            passphrase = first_line_of(output, deadline)
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, TimeoutError):
            end_session(child)
            raise KekError(f"passphrase command did not finish within {self.timeout:g} s") from None
        except BaseException:  # a first line too long, an interrupt, a stop signal
            end_session(child)
            raise
        finally:
            cast("IO[bytes]", child.stdout).close()
        if child.returncode != 0:
            raise KekError(f"passphrase command exited with status {child.returncode}")
        if not passphrase:
            raise KekError("passphrase command printed an empty passphrase")
        return passphrase

    def obtain(self, description: dict[str, Any], store_id: str = "") -> bytearray:
        try:
            salt = base64.b64decode(description["salt"], validate=True)
            iterations = int(description["iterations"])
            lanes = int(description["lanes"])
            memory_kib = int(description["memory_kib"])
        except (KeyError, ValueError, TypeError, binascii.Error):
            raise SourceRecordDamaged(
                "store metadata holds damaged passphrase KDF parameters"
            ) from None
        if description.get("kdf") != "argon2id" or not (
            1 <= iterations <= 100 and 1 <= lanes <= 64 and 8 * lanes <= memory_kib <= 4 << 20
        ):
            raise SourceRecordDamaged("store metadata holds unsupported passphrase KDF parameters")
        passphrase = self.read_passphrase()
        return bytearray(
            argon2id(passphrase, salt, iterations=iterations, lanes=lanes, memory_kib=memory_kib)
        )


def obtain_for_store(
    source: KekSource, description: dict[str, Any], store_id: str = ""
) -> bytearray:
    """The KEK of an existing store, refusing a source of another kind than recorded."""
    recorded = description.get("kind")
    if recorded != source.kind:
        raise KekError(
            f"this store's KEK comes from a {recorded} source, not a {source.kind} source; "
            f"give {_OPTION_FOR_KIND.get(str(recorded), 'the matching KEK option')}"
        )
    return source.obtain(description, store_id)


_OPTION_FOR_KIND = {
    "file": "--kek-file",
    "passphrase": "--passphrase-command",
    TRANSIT_KIND: "--kek-transit",
}
