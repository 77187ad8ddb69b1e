# Public names of the client package: the two clients, the error family, the reply types.
# Must stay importable without trio (AsyncClient loads lazily) and must hold no logic.
"""Client library for ``kmsd``, the key-management daemon.

``Client`` needs only the standard library; ``AsyncClient`` needs trio and is
imported on first use, so ``import kms_client`` works on a host without trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kms_client.errors import (
    BadCiphertext,
    BadKeyId,
    BadRequest,
    ConnectionFailed,
    Denied,
    ErrorCode,
    InternalError,
    KeyExists,
    KeyNotFound,
    KmsError,
    NotExportable,
    ProtocolViolation,
    Retired,
    Timeout,
    TooLong,
    Unavailable,
    UnknownCommand,
)
from kms_client.protocol import DataKey, KeyMaterial
from kms_client.sync import Client

if TYPE_CHECKING:
    from kms_client.aio import AsyncClient

__all__ = [
    "AsyncClient",
    "BadCiphertext",
    "BadKeyId",
    "BadRequest",
    "Client",
    "ConnectionFailed",
    "DataKey",
    "Denied",
    "ErrorCode",
    "InternalError",
    "KeyExists",
    "KeyMaterial",
    "KeyNotFound",
    "KmsError",
    "NotExportable",
    "ProtocolViolation",
    "Retired",
    "Timeout",
    "TooLong",
    "Unavailable",
    "UnknownCommand",
]


def __getattr__(name: str) -> Any:
    """Import :class:`AsyncClient` (and with it trio) only when someone asks for it."""
    if name == "AsyncClient":
        from kms_client.aio import AsyncClient  # noqa: PLC0415 - lazy on purpose

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
