# Request -> store and crypto -> response bytes. The daemon's whole behaviour per request.
# No sockets and no trio: fast requests run inline; writes take a thread runner as a parameter.
"""Executes parsed protocol requests against an opened :class:`KeyStore`.

Fast requests (key use and inspection) run on the event loop through
:meth:`Dispatcher.respond`: on a cached key they cost a few microseconds, far
less than a thread hop. Requests that change the store fsync files, so
:meth:`Dispatcher.respond_write` plans on the caller's thread, hands the
blocking part to the runner it is given (``trio.to_thread.run_sync`` in the
daemon), and applies the result back on the caller's thread. The caller runs
one write at a time, so plans cannot race.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from kms_client.errors import (
    BadCiphertext,
    BadRequest,
    InternalError,
    KeyExists,
    KeyNotFound,
    KmsError,
    NotExportable,
    Retired,
)
from kms_client.protocol import (
    PROTOCOL_NAME,
    VERBS,
    Configure,
    Create,
    Decrypt,
    Destroy,
    Encrypt,
    GenerateDataKey,
    Get,
    Hello,
    Help,
    Info,
    Ping,
    Quit,
    Rekey,
    Request,
    Restore,
    Retire,
    Rewrap,
    Rotate,
    b64encode,
    format_error,
    format_ok,
)
from kms_server.crypto import random_bytes
from kms_server.failures import LastingFailures
from kms_server.keys import ACTIVE, DESTROYED, RETIRED, KeyVersion, ciphertext_version
from kms_server.store import KeyState, KeyStore

log = logging.getLogger("kmsd.dispatch")

T = TypeVar("T")
ThreadRunner = Callable[[Callable[[], T]], Awaitable[T]]
#: Re-seals the store under a new KEK from ``(source kind, argument)``; returns the generation.
Rekeyer = Callable[[str, str, ThreadRunner[Any]], Awaitable[int]]

WRITE_REQUESTS = (Create, Rotate, Retire, Restore, Destroy, Configure, Rekey)
#: A response line and the key version the request used (None when it used none).
Reply = tuple[bytes, int | None]


class Dispatcher:
    def __init__(
        self,
        store: KeyStore,
        server_version: str,
        rekeyer: Rekeyer | None = None,
        kek_status: Callable[[], str] = lambda: "ok",
    ) -> None:
        self.store = store
        self._rekeyer = rekeyer
        #: Writes ("ROTATE k") whose last try failed on the disk: logged once until they work.
        self._failing_writes = LastingFailures(log)
        #: "ok", or "degraded: <why>" while an upstream key service cannot unwrap the root.
        self._kek_status = kek_status
        self._hello = format_ok(PROTOCOL_NAME.encode(), server_version.encode("ascii"))
        self._help = format_ok(*(verb.encode() for verb in VERBS))

    # ----------------------------------------------------------------- fast path (event loop)

    def respond(  # noqa: PLR0912 - one flat dispatch: a call level costs ~0.3 us here
        self, request: Request[Any]
    ) -> Reply:
        """The response line to a fast request and the key version it used (for the audit).

        Every failure becomes an ``ERR`` line.
        """
        try:  # one call level, not two: this runs for every request on the event loop
            store = self.store
            # Ordered by how often a database asks. A reply is joined, not added up: an
            # 8 KiB ENC's would otherwise be copied twice.
            if type(request) is Encrypt:
                key = store.usable(request.key_id)
                ciphertext = key.encrypt(request.plaintext, request.aad)
                self._count(key, encryptions=1, size=len(request.plaintext))
                return b"".join((b"OK ", b64encode(ciphertext), b"\n")), key.version
            if type(request) is Decrypt:
                key = self._key_for(request.key_id, request.ciphertext)
                plaintext = key.decrypt(request.ciphertext, request.aad)
                self._count(key, decryptions=1, size=len(plaintext))
                return b"".join((b"OK ", b64encode(plaintext), b"\n")), key.version
            if type(request) is Get:
                key = store.usable(request.key_id, request.version)
                if not key.exportable:
                    raise NotExportable()
                exported = key.export_reply
                if not exported:
                    material = key.live_material()  # encoded straight from the wiped buffer
                    exported += format_ok(str(key.version).encode(), b64encode(material))
                return bytes(exported), key.version
            if type(request) is GenerateDataKey:
                key = store.usable(request.key_id)
                data_key = random_bytes(request.nbytes)
                wrapped = key.encrypt(data_key, b"")
                self._count(key, encryptions=1, size=request.nbytes)
                return format_ok(b64encode(data_key), b64encode(wrapped)), key.version
            if type(request) is Rewrap:
                old = self._key_for(request.key_id, request.ciphertext)
                plaintext = old.decrypt(request.ciphertext, request.aad)
                new = store.usable(request.key_id)
                ciphertext = new.encrypt(plaintext, request.aad)
                self._count(old, decryptions=1, size=len(plaintext))
                self._count(new, encryptions=1, size=len(plaintext))
                return b"".join((b"OK ", b64encode(ciphertext), b"\n")), new.version
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
        except KmsError as error:
            return format_error(error), None
        except Exception:
            log.exception("internal error while serving %s", request.verb)
            return format_error(InternalError()), None

    def _key_for(self, key_id: str, ciphertext: bytes) -> KeyVersion:
        """The usable version a ciphertext names; a version the key lacks is BAD_CIPHERTEXT."""
        store = self.store
        version = ciphertext_version(ciphertext)
        try:
            return store.usable(key_id, version)
        except KmsError as error:
            if error.code == "NOT_FOUND" and store.exists(key_id):
                raise BadCiphertext() from None
            raise

    def _count(
        self, key: KeyVersion, *, encryptions: int = 0, decryptions: int = 0, size: int
    ) -> None:
        usage = key.usage
        usage.encryptions += encryptions
        usage.decryptions += decryptions
        usage.bytes += size
        self.store.dirty.add(key.key_id)

    def _info(self, key_id: str) -> str:
        """The INFO document. It opens at most the latest version (for ``exportable``):
        the rest comes from the key's state, so a key with thousands of versions does
        not hold up the event loop or flood the cache with versions nobody uses."""
        store = self.store
        record = store.record(key_id)
        versions = []
        for number in record.versions:
            usage = record.usage(number)
            entry: dict[str, Any] = {"version": number, "state": usage.state}
            if usage.state != DESTROYED:
                entry["created"] = store.created(key_id, number)
            entry |= {
                "encryptions": usage.encryptions,
                "decryptions": usage.decryptions,
                "bytes": usage.bytes,
            }
            versions.append(entry)
        document = {
            "key_id": key_id,
            "latest": record.latest,
            "exportable": self._exportable(key_id),
            "rotate_period": store.rotation.get(key_id),
            "versions": versions,
            "kek": {"source": store.metadata.kek["kind"], "status": self._kek_status()},
        }
        # One field on the wire: compact separators leave spaces only inside strings
        # (a degraded KEK status says why), and there they are escaped.
        return json.dumps(document, separators=(",", ":")).replace(" ", "\\u0020")

    # ----------------------------------------------------------------- writes

    async def respond_write(self, request: Request[Any], run_blocking: ThreadRunner[Any]) -> Reply:
        """A request that changes the store: blocking work in ``run_blocking``.

        The caller serialises writes (one at a time), so version numbers cannot race.
        """
        key_id: str | None = getattr(request, "key_id", None)
        what = _write_name(request)
        try:
            reply = await self._write(request, run_blocking)
        except KmsError as error:
            return format_error(error), None
        except OSError as error:  # a full or failing disk: one line, no traceback
            self._failing_writes.failed(what, f"{what} failed: {error}")
            self.store.resync(key_id)
            return format_error(InternalError()), None
        except Exception:
            log.exception("internal error while serving %s", request.verb)
            self.store.resync(key_id)
            return format_error(InternalError()), None
        self._failing_writes.worked(what, f"{what} works again")
        return reply

    def write_is_failing(self, request: Request[Any]) -> bool:
        """True while this write's last try failed on the disk (and was logged)."""
        return self._failing_writes.is_failing(_write_name(request))

    async def _write(self, request: Request[Any], run_blocking: ThreadRunner[Any]) -> Reply:
        if isinstance(request, Create):
            return await self._create(request, run_blocking)
        if isinstance(request, Rotate):
            return await self.rotate(request.key_id, run_blocking)
        if isinstance(request, Retire | Restore | Destroy):
            return await self._change_version_state(request, run_blocking)
        if isinstance(request, Configure):
            return await self._configure(request.key_id, request.rotate_period, run_blocking)
        if isinstance(request, Rekey):
            if self._rekeyer is None:
                raise InternalError("this daemon cannot rekey")
            generation = await self._rekeyer(request.source, request.argument, run_blocking)
            return format_ok(str(generation).encode()), None
        raise InternalError("unknown write request")

    async def _create(self, request: Create, run_blocking: ThreadRunner[Any]) -> Reply:
        store = self.store
        if not store.ready_for_create(request.key_id):
            raise KeyExists()
        state = KeyState()
        rotation = dict(store.rotation)
        rotation.pop(request.key_id, None)  # an entry a CREATE cut short left behind
        if request.rotate_period is not None:
            rotation[request.key_id] = request.rotate_period
        index_changes = rotation != store.rotation

        def write() -> KeyVersion:
            # Rotation index, state ("creating"), version file (the commit), state: a crash
            # before the commit leaves an index entry and a state that are no key, which a
            # retried CREATE overwrites, never a key that exists without them.
            with store.write_lock():
                if index_changes:
                    store.write_rotation(rotation)
                return store.write_version(request.key_id, 1, request.exportable, state)

        opened: KeyVersion = await run_blocking(write)
        store.add(opened)
        store.rotation = rotation
        log.info("CREATE %s: version 1 written", request.key_id)
        return format_ok(b"1"), 1

    async def rotate(self, key_id: str, run_blocking: ThreadRunner[Any]) -> Reply:
        """Write the next version (also used by automatic rotation)."""
        store = self.store
        record = store.record(key_id)
        # The new version copies the latest's exportable flag; a latest version whose
        # file is missing (damage, or a CREATE a crash cut short) refuses the ROTATE.
        exportable = store.version(key_id).exportable
        number = record.latest + 1
        state = KeyState(dict(record.state.usage))

        def write() -> KeyVersion:
            with store.write_lock():
                opened = store.write_version(key_id, number, exportable)
                state.usage[number] = opened.usage
                store.write_state(key_id, state)
            return opened

        opened: KeyVersion = await run_blocking(write)
        store.add(opened)
        log.info("ROTATE %s: version %d written", key_id, number)
        return format_ok(str(number).encode()), number

    async def rotate_if_due(self, key_id: str, run_blocking: ThreadRunner[Any]) -> Reply | None:
        """Automatic rotation: rotate ``key_id`` if it is still due (None when it no longer is).

        The caller holds the write lock, so a ``CONFIG rotate=off`` acknowledged
        after the key was found due is seen here and wins.
        """
        if not self.rotation_due(key_id, time.time()):
            return None
        return await self.respond_write(Rotate(key_id), run_blocking)

    def rotation_due(self, key_id: str, now: float) -> bool:
        """True when the key has a rotation period and its latest version is that old."""
        store = self.store
        period = store.rotation.get(key_id)
        if period is None:
            return False
        try:
            return now - store.latest_created(key_id) >= period
        except KmsError:
            return False

    def _exportable(self, key_id: str) -> bool:
        """Whether the key may be exported: its latest version file says (ROTATE copies it)."""
        store = self.store
        record = store.record(key_id)
        for number in reversed(record.files):
            return store.version(key_id, number).exportable
        return False

    async def _change_version_state(
        self, request: Retire | Restore | Destroy, run_blocking: ThreadRunner[Any]
    ) -> Reply:
        store = self.store
        key_id, number = request.key_id, request.version
        record = store.record(key_id)
        if number not in record.versions:
            raise KeyNotFound()
        current = record.usage(number).state
        if current == DESTROYED:
            if not isinstance(request, Destroy):
                raise Retired("key version was destroyed")

            state = KeyState(dict(record.state.usage))  # a copy for the worker thread

            def finish() -> None:  # a DESTROY cut short after its state: its file, its list
                with store.write_lock():
                    store.remove_version_file(key_id, number)
                    store.end_erase(key_id, state)

            await run_blocking(finish)  # OK only once the file is gone for sure
            record = store.record(key_id)  # the cached one now (see below)
            record.files = [v for v in record.files if v != number]
            return format_ok(), number
        if isinstance(request, Destroy) and number == record.latest:
            raise BadRequest("the latest version cannot be destroyed; rotate first")
        target = {Retire: RETIRED, Restore: ACTIVE, Destroy: DESTROYED}[type(request)]
        state = KeyState(dict(record.state.usage))
        state.usage[number] = replace(record.usage(number), state=target)

        def write() -> None:
            with store.write_lock():
                if target == DESTROYED:  # a crash before the file is gone: the next start
                    store.begin_erase(key_id)  # finishes it (store._finish_erase)
                store.write_state(key_id, state)  # durable first: a crash leaves it destroyed
                if target == DESTROYED:
                    store.remove_version_file(key_id, number)
                    store.end_erase(key_id, state)

        await run_blocking(write)
        # Meanwhile other connections may have evicted the key and read it back: change
        # the record the cache holds now, not the one we started from.
        record = store.record(key_id)
        record.usage(number).state = target
        if target == DESTROYED:
            record.files = [v for v in record.files if v != number]
            opened = record.opened.pop(number, None)
            if opened is not None:
                opened.wipe()
        log.info("%s %s: version %d is now %s", request.verb, key_id, number, target)
        return format_ok(), number

    async def _configure(
        self, key_id: str, period: int | None, run_blocking: ThreadRunner[Any]
    ) -> Reply:
        store = self.store
        store.record(key_id)  # NOT_FOUND for no such key
        rotation = dict(store.rotation)
        if period is None:
            rotation.pop(key_id, None)
        else:
            rotation[key_id] = period

        def write() -> None:
            # The index alone holds periods: one atomic write, so a crash leaves the
            # old period or the new one.
            with store.write_lock():
                store.write_rotation(rotation)

        await run_blocking(write)  # even unchanged: a CONFIG repairs an index read badly
        store.rotation = rotation
        log.info("CONFIG %s: rotation period %s", key_id, period)
        return format_ok(), None


def _write_name(request: Request[Any]) -> str:
    """How the log names a write: ``ROTATE pg/wal``, ``REKEY``."""
    key_id: str | None = getattr(request, "key_id", None)
    return request.verb if key_id is None else f"{request.verb} {key_id}"
