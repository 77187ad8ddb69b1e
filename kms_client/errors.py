# The closed set of wire error codes and the exception family that carries them.
# Pure: shared by the daemon (which raises these to answer `ERR ...`) and both clients.
"""Error codes of protocol v1 and one exception class per code.

Tests and callers match on ``.code`` (stable), never on messages (human text).
Messages never contain key material or request data: the daemon builds them
from fixed strings only.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every code a v1 server may send after ``ERR``."""

    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
    TOO_LONG = "TOO_LONG"
    BAD_KEY_ID = "BAD_KEY_ID"
    NOT_FOUND = "NOT_FOUND"
    EXISTS = "EXISTS"
    NOT_EXPORTABLE = "NOT_EXPORTABLE"
    DENIED = "DENIED"
    BAD_CIPHERTEXT = "BAD_CIPHERTEXT"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    RETIRED = "RETIRED"


class KmsError(Exception):
    """Base of every error the protocol can report; ``code`` is the wire code.

    A client that receives a code it does not know (a newer server) gets a plain
    ``KmsError`` whose ``code`` is that string.
    """

    code: str = ErrorCode.INTERNAL
    default_message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message if message is not None else self.default_message
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(KmsError):
    code = ErrorCode.BAD_REQUEST
    default_message = "malformed request"


class UnknownCommand(KmsError):
    code = ErrorCode.UNKNOWN_COMMAND
    default_message = "unknown command"


class TooLong(KmsError):
    code = ErrorCode.TOO_LONG
    default_message = "request line too long"


class BadKeyId(KmsError):
    code = ErrorCode.BAD_KEY_ID
    default_message = "invalid key id"


class KeyNotFound(KmsError):
    code = ErrorCode.NOT_FOUND
    default_message = "no such key or version"


class KeyExists(KmsError):
    code = ErrorCode.EXISTS
    default_message = "key already exists"


class NotExportable(KmsError):
    code = ErrorCode.NOT_EXPORTABLE
    default_message = "key is not exportable"


class Denied(KmsError):
    code = ErrorCode.DENIED
    default_message = "permission denied"


class BadCiphertext(KmsError):
    code = ErrorCode.BAD_CIPHERTEXT
    default_message = "ciphertext cannot be decrypted"


class Unavailable(KmsError):
    code = ErrorCode.UNAVAILABLE
    default_message = "service unavailable"


class InternalError(KmsError):
    code = ErrorCode.INTERNAL
    default_message = "internal error"


class Retired(KmsError):
    code = ErrorCode.RETIRED
    default_message = "key version is retired"


class ProtocolViolation(KmsError):
    """Client side only: the server's reply does not follow protocol v1."""

    code = "PROTOCOL_VIOLATION"
    default_message = "server reply does not follow the protocol"


class ConnectionFailed(KmsError):
    """Client side only: the daemon could not be reached, or the connection broke."""

    code = "CONNECTION_FAILED"
    default_message = "cannot reach the key daemon"


class Timeout(KmsError):
    """Client side only: the daemon did not answer within the client's timeout."""

    code = "TIMEOUT"
    default_message = "the key daemon did not answer in time"


ERROR_CLASSES: dict[str, type[KmsError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownCommand,
        TooLong,
        BadKeyId,
        KeyNotFound,
        KeyExists,
        NotExportable,
        Denied,
        BadCiphertext,
        Unavailable,
        InternalError,
        Retired,
    )
}


def error_for_code(code: str, message: str) -> KmsError:
    """Build the exception a client raises for ``ERR <code> <message>``."""
    cls = ERROR_CLASSES.get(code)
    if cls is not None:
        return cls(message)
    unknown = KmsError(message)
    unknown.code = code
    return unknown
