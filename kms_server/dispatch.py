# Request -> store and crypto -> response bytes. The daemon's whole behaviour per request.
# No sockets and no trio: fast requests run inline; writes take a thread runner as a parameter.
"""Executes parsed protocol requests against an opened :class:`KeyStore`.

Fast requests (everything but ``CREATE`` and ``ROTATE``) run on the event loop
through :meth:`Dispatcher.respond`: on a cached key they cost a few
microseconds, far less than a thread hop. ``CREATE`` and ``ROTATE`` fsync
files, so :meth:`Dispatcher.respond_write` hands the blocking part to the
runner it is given (``trio.to_thread.run_sync`` in the daemon) and publishes
the result back on the caller's thread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kms_client.errors import BadCiphertext, InternalError, KeyExists, KmsError, NotExportable
from kms_client.protocol import (
    PROTOCOL_NAME,
    VERBS,
    Create,
    Decrypt,
    Encrypt,
    GenerateDataKey,
    Get,
    Hello,
    Help,
    Info,
    Ping,
    Quit,
    Request,
    Rotate,
    b64encode,
    format_error,
    format_ok,
)
from kms_server.crypto import random_bytes
from kms_server.keys import KeyVersion, ciphertext_version
from kms_server.store import KeyStore

log = logging.getLogger("kmsd.dispatch")

T = TypeVar("T")
ThreadRunner = Callable[[Callable[[], T]], Awaitable[T]]

WRITE_REQUESTS = (Create, Rotate)
#: A response line and the key version the request used (None when it used none).
Reply = tuple[bytes, int | None]


class Dispatcher:
    def __init__(self, store: KeyStore, server_version: str) -> None:
        self._store = store
        self._hello = format_ok(PROTOCOL_NAME.encode(), server_version.encode("ascii"))
        self._help = format_ok(*(verb.encode() for verb in VERBS))

    def respond(self, request: Request[Any]) -> Reply:
        """The response line to a fast request and the key version it used (for the audit).

        Every failure becomes an ``ERR`` line.
        """
        try:
            return self._execute(request)
        except KmsError as error:
            return format_error(error), None
        except Exception:
            log.exception("internal error while serving %s", request.verb)
            return format_error(InternalError()), None

    def _execute(self, request: Request[Any]) -> Reply:
        store = self._store
        # Ordered by how often a database asks.
        if type(request) is Encrypt:
            key = store.version(request.key_id)
            ciphertext = key.encrypt(request.plaintext, request.aad)
            return b"OK " + b64encode(ciphertext) + b"\n", key.version
        if type(request) is Decrypt:
            version = ciphertext_version(request.ciphertext)
            try:
                key = store.version(request.key_id, version)
            except KmsError as error:
                if error.code == "NOT_FOUND" and store.exists(request.key_id):
                    raise BadCiphertext() from None
                raise
            return b"OK " + b64encode(key.decrypt(request.ciphertext, request.aad)) + b"\n", version
        if type(request) is Get:
            key = store.version(request.key_id, request.version)
            if not key.exportable:
                raise NotExportable()
            exported = format_ok(str(key.version).encode(), b64encode(bytes(key.material)))
            return exported, key.version
        if type(request) is GenerateDataKey:
            key = store.version(request.key_id)
            data_key = random_bytes(request.nbytes)
            wrapped = key.encrypt(data_key, b"")
            return format_ok(b64encode(data_key), b64encode(wrapped)), key.version
        if type(request) is Ping:
            return b"OK PONG\n", None
        if type(request) is Info:
            return format_ok(self._info(request.key_id).encode()), None
        if type(request) is Hello:
            return self._hello, None
        if type(request) is Help:
            return self._help, None
        if type(request) is Quit:
            return b"OK BYE\n", None
        raise InternalError("request needs the write path")

    def _info(self, key_id: str) -> str:
        record = self._store.record(key_id)
        versions = [self._store.version(key_id, number) for number in record.versions]
        document = {
            "key_id": key_id,
            "latest": record.latest,
            "exportable": versions[-1].exportable,
            "versions": [{"version": v.version, "created": v.created} for v in versions],
        }
        return json.dumps(document, separators=(",", ":"))

    async def respond_write(
        self, request: Create | Rotate, run_blocking: ThreadRunner[Any]
    ) -> Reply:
        """``CREATE``/``ROTATE``: fsync'ed work in ``run_blocking``, cache update here.

        The caller serialises writes (one at a time), so version numbers cannot race.
        """
        store = self._store
        try:
            if isinstance(request, Create):
                if store.exists(request.key_id):
                    raise KeyExists()
                key_id, version, exportable = request.key_id, 1, request.exportable
            else:
                latest = store.version(request.key_id)
                key_id, version, exportable = latest.key_id, latest.version + 1, latest.exportable

            def write() -> KeyVersion:
                return store.write_version(key_id, version, exportable)

            opened: KeyVersion = await run_blocking(write)
            store.add(opened)
            log.info("%s %s: version %d written", request.verb, key_id, opened.version)
            return format_ok(str(opened.version).encode()), opened.version
        except KmsError as error:
            return format_error(error), None
        except Exception:
            log.exception("internal error while serving %s", request.verb)
            return format_error(InternalError()), None
