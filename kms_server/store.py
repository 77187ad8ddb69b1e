# The sealed key store on disk: generations, metadata, key and state files, a lazy LRU cache.
# Blocking file I/O only; no sockets, no trio. Writes run in a worker thread, one at a time.
"""A key-per-file store whose file system is the index.

Layout under the store directory (every directory 0700, every file 0600)::

    .lock                          flock'ed by the one daemon serving the store;
                                   holds that daemon's socket path
    .write.lock                    flock'ed around every write, and by backups
    live -> gen-3                  the live generation (a symlink, switched atomically)
    gen-3/kms-store.json           metadata: format, store id, generation, KEK source
                                   and KDF, KEK check value
    .restoring                     only while ``kmsd restore`` fills the directory
    gen-3/rotation.seal            sealed: keys with an automatic rotation period
    gen-3/erasing                  only while DESTROYs erase files: their key ids
    gen-3/keys/<key-id>/_v<N>.key  one sealed file per key version
    gen-3/keys/<key-id>/_state.seal  sealed: per-version state, counters, creation time

A key id's ``/``-separated segments become directories. Segments start with a
letter or digit, so ``_v<N>.key``, ``_state.seal`` and ``.tmp-*`` names never
collide with a key id.

A key file is::

    b"KMSK" | 0x01 | header length (2 bytes) | header (JSON) | XAES-256-GCM seal of the material

sealed under a key derived from the KEK, with the store id, key id, version and
the whole header as additional data. A file copied to another name, another
version or another store does not open; neither does a file with an edited
header (creation time, exportable flag). State files and the rotation index are
sealed the same way, bound to their key id.

Re-sealing everything under a new KEK (``rekey``) writes a whole new generation
beside the live one, fsyncs it, and switches the ``live`` link with one atomic
rename. Opening a store removes any generation that is not live: the remains of
an interrupted rekey (rolled back) or the previous generation (finished).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kms_client.errors import InternalError, KeyExists, KeyNotFound, KmsError, Retired
from kms_client.protocol import validate_key_id
from kms_server.crypto import (
    KEY_SIZE,
    XAES256GCM,
    AuthenticationFailed,
    constant_time_equal,
    hkdf_sha256,
    random_bytes,
)
from kms_server.files import (
    fsync_directory,
    make_private_dirs,
    remove_stale_temporaries,
    replace_file,
    write_new_file,
)
from kms_server.keys import ACTIVE, CREATING, DESTROYED, KeyVersion, VersionUsage

log = logging.getLogger("kmsd.store")

STORE_FORMAT = "kms-store/1"
METADATA_NAME = "kms-store.json"
LOCK_NAME = ".lock"
WRITE_LOCK_NAME = ".write.lock"
LIVE_LINK = "live"
GENERATION_PREFIX = "gen-"
KEYS_DIR = "keys"
STATE_NAME = "_state.seal"
ROTATION_NAME = "rotation.seal"
#: In a store directory while ``kmsd restore`` fills it (see maintenance.restore).
RESTORING_MARK = ".restoring"
#: Lists the keys DESTROYs are erasing, each from before its state says so until its file
#: is gone: what a crash (or a failing disk) left between the two, the next start
#: finishes (unsealed: key ids).
ERASING_NAME = "erasing"
KEY_FILE_MAGIC = b"KMSK\x01"
_KEY_FILE_RE = re.compile(r"_v([1-9][0-9]{0,9})\.key")
_GENERATION_RE = re.compile(r"gen-([1-9][0-9]{0,9})")
_WRAP_LABEL = b"kms/1 key file wrapping"
_CHECK_LABEL = b"kms/1 KEK check value"
DEFAULT_CACHE_KEYS = 10_000


class StoreError(Exception):
    """The store cannot be used: missing, damaged, locked or opened with the wrong KEK."""


class MetadataDamaged(StoreError):
    """The store's metadata does not parse or contradicts the store's layout."""


class KeyFileDamaged(InternalError):
    """A key or state file failed authentication: copied, edited or corrupted. Never served."""

    default_message = "a key file failed its integrity check; see the daemon log"


def file_name(version: int) -> str:
    return f"_v{version}.key"


def parse_time(text: str) -> float:
    """Seconds since the epoch of a ``YYYY-MM-DDTHH:MM:SSZ`` creation time."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class StoreMetadata:
    """What ``kms-store.json`` records. ``kek`` describes the KEK source and its KDF."""

    store_id: str
    created: str
    generation: int
    kek: dict[str, Any]
    kek_check: str
    format: str = STORE_FORMAT

    def to_json(self) -> bytes:
        document = {
            "format": self.format,
            "store_id": self.store_id,
            "created": self.created,
            "generation": self.generation,
            "kek": self.kek,
            "kek_check": self.kek_check,
        }
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> StoreMetadata:
        try:
            document = json.loads(data)
            metadata = cls(
                store_id=str(document["store_id"]),
                created=str(document["created"]),
                generation=int(document["generation"]),
                kek=dict(document["kek"]),
                kek_check=str(document["kek_check"]),
                format=str(document["format"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataDamaged(f"store metadata {METADATA_NAME} is damaged") from exc
        if metadata.format != STORE_FORMAT:
            raise StoreError(f"unsupported store format {metadata.format!r}")
        if not isinstance(metadata.kek.get("kind"), str):
            raise StoreError(f"store metadata {METADATA_NAME} names no KEK source")
        return metadata

    def for_new_kek(self, kek: bytes | bytearray, description: dict[str, Any]) -> StoreMetadata:
        return replace(
            self,
            generation=self.generation + 1,
            kek=description,
            kek_check=kek_check_value(kek, self.store_id),
        )


def kek_check_value(kek: bytes | bytearray, store_id: str) -> str:
    value = hkdf_sha256(kek, _CHECK_LABEL + b"\x00" + store_id.encode())
    return base64.b64encode(value).decode()


def live_generation(store_dir: Path) -> Path:
    """The directory of the live generation, as the ``live`` link names it.

    A store that ``kmsd restore`` has not finished (its mark is still there) is none.
    """
    if (store_dir / RESTORING_MARK).exists():
        raise StoreError(f"a kmsd restore into {store_dir} was cut short: run it again")
    try:
        target = os.readlink(store_dir / LIVE_LINK)
    except FileNotFoundError:
        if not store_dir.is_dir():
            raise StoreError(f"store directory {store_dir} does not exist") from None
        raise StoreError(
            f"{store_dir} is not a key store (no {LIVE_LINK}); run `kmsd init`"
        ) from None
    except OSError as exc:
        raise StoreError(f"cannot read {store_dir / LIVE_LINK}: {exc.strerror}") from None
    if _GENERATION_RE.fullmatch(target) is None:
        raise StoreError(f"{store_dir / LIVE_LINK} points to {target!r}, not a generation")
    return store_dir / target


def read_metadata(store_dir: Path) -> StoreMetadata:
    generation = live_generation(store_dir)
    path = generation / METADATA_NAME
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    metadata = StoreMetadata.from_json(data)
    if generation.name != generation_directory(store_dir, metadata.generation).name:
        raise MetadataDamaged(
            f"store metadata {METADATA_NAME} names generation {metadata.generation},"
            f" but it lies in {generation.name}"
        )
    return metadata


def switch_live(store_dir: Path, generation: Path) -> None:
    """Point ``live`` at ``generation`` with one atomic rename, durably."""
    temporary = store_dir / f".live-{uuid.uuid4().hex}"
    os.symlink(generation.name, temporary)
    os.replace(temporary, store_dir / LIVE_LINK)
    fsync_directory(store_dir)


def remove_other_generations(store_dir: Path) -> list[str]:
    """Remove every generation but the live one, and stray link temporaries.

    Call only while holding the store lock. Returns what was removed.
    """
    live = live_generation(store_dir).name
    removed = []
    for entry in os.scandir(store_dir):
        stale_generation = _GENERATION_RE.fullmatch(entry.name) and entry.name != live
        if stale_generation or entry.name.startswith(".live-"):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
    if removed:
        fsync_directory(store_dir)
    return removed


def init_store(
    store_dir: Path,
    kek: bytes | bytearray,
    kek_description: dict[str, Any],
    now: str,
    *,
    tolerate: frozenset[str] = frozenset(),
    store_id: str | None = None,
) -> StoreMetadata:
    """Create a new, empty store in ``store_dir``, which must be missing or empty.

    ``tolerate`` names files that may already be there (the dev mode's KEK file).
    """
    if store_dir.exists():
        if not store_dir.is_dir():
            raise StoreError(f"{store_dir} exists and is not a directory")
        if any(entry.name not in tolerate for entry in store_dir.iterdir()):
            raise StoreError(f"{store_dir} is not empty; refusing to initialise over it")
        os.chmod(store_dir, 0o700)
    else:
        make_private_dirs(store_dir, Path(store_dir.anchor or "."))
    store_id = store_id or new_store_id()
    metadata = StoreMetadata(
        store_id=store_id,
        created=now,
        generation=1,
        kek=kek_description,
        kek_check=kek_check_value(kek, store_id),
    )
    write_generation_skeleton(store_dir, metadata)
    switch_live(store_dir, generation_directory(store_dir, 1))
    return metadata


def new_store_id() -> str:
    return str(uuid.uuid4())


def generation_directory(store_dir: Path, generation: int) -> Path:
    return store_dir / f"{GENERATION_PREFIX}{generation}"


def write_generation_skeleton(store_dir: Path, metadata: StoreMetadata) -> Path:
    """A new generation directory holding its metadata and an empty ``keys``."""
    generation = generation_directory(store_dir, metadata.generation)
    generation.mkdir(mode=0o700)
    (generation / KEYS_DIR).mkdir(mode=0o700)
    write_new_file(generation / METADATA_NAME, metadata.to_json())
    fsync_directory(generation)
    fsync_directory(store_dir)
    return generation


def check_private(store_dir: Path) -> None:
    """Refuse a store directory that group or others may enter: keys must stay private."""
    try:
        mode = store_dir.stat().st_mode
    except FileNotFoundError:
        raise StoreError(f"store directory {store_dir} does not exist") from None
    except OSError as exc:
        raise StoreError(f"cannot use store directory {store_dir}: {exc.strerror}") from None
    if mode & 0o077:
        raise StoreError(
            f"{store_dir} is accessible to group or others (mode {stat.S_IMODE(mode):04o}); "
            "run: chmod 700 " + str(store_dir)
        )


@contextlib.contextmanager
def locked(path: Path, *, blocking: bool, busy: str | None = None) -> Iterator[int]:
    """Hold an exclusive flock on ``path`` for the ``with`` block: a lock file (created
    0600), or a directory itself. Held elsewhere and not ``blocking``: ``busy`` is the
    error (by default, that a running kmsd holds it)."""
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(busy or f"{path.parent} is in use by a running kmsd") from None
            raise
        yield fd
    finally:
        os.close(fd)


def serving_socket(store_dir: Path) -> str | None:
    """The socket path a running daemon wrote into the store lock, if any."""
    try:
        text = (store_dir / LOCK_NAME).read_text().strip()
    except OSError:
        return None
    return text or None


# --------------------------------------------------------------------------- sealing


class Sealer:
    """Seals and opens the files of one store generation under a key derived from its KEK."""

    def __init__(self, kek: bytes | bytearray, store_id: str) -> None:
        self._wrapper = XAES256GCM(hkdf_sha256(kek, _WRAP_LABEL))
        self._store_id = store_id.encode()

    def __repr__(self) -> str:
        return "<Sealer key=hidden>"

    def _aad(self, kind: bytes, key_id: str, version: int, head: bytes) -> bytes:
        return (
            b"kms/1 "
            + kind
            + b"\x00"
            + self._store_id
            + b"\x00"
            + key_id.encode("ascii")
            + b"\x00"
            + version.to_bytes(4, "big")
            + head
        )

    def seal_key_file(self, version: KeyVersion) -> bytes:
        header = json.dumps({"created": version.created, "exportable": version.exportable})
        head = KEY_FILE_MAGIC + len(header).to_bytes(2, "big") + header.encode()
        aad = self._aad(b"key file", version.key_id, version.version, head)
        return head + self._wrapper.seal(version.material, aad)  # no unwipeable copy

    def open_key_file(self, key_id: str, version: int, data: bytes, path: Path) -> KeyVersion:
        try:
            if not data.startswith(KEY_FILE_MAGIC):
                raise ValueError("bad magic")
            head = data[: 7 + int.from_bytes(data[5:7], "big")]
            header = json.loads(head[7:])
            aad = self._aad(b"key file", key_id, version, head)
            material = bytearray(self._wrapper.open(data[len(head) :], aad))
            created, exportable = header["created"], header["exportable"]
            if not isinstance(created, str) or not isinstance(exportable, bool):
                raise TypeError("bad header")
        except (ValueError, KeyError, TypeError, AuthenticationFailed):
            log.error("key file %s failed its integrity check: refusing to serve it", path)
            raise KeyFileDamaged() from None
        return KeyVersion(key_id, version, created, exportable, material)

    def seal_document(self, kind: bytes, name: str, document: dict[str, Any]) -> bytes:
        return self._wrapper.seal(json.dumps(document).encode(), self._aad(kind, name, 0, b""))

    def open_document(self, kind: bytes, name: str, data: bytes, path: Path) -> dict[str, Any]:
        try:
            document = json.loads(self._wrapper.open(data, self._aad(kind, name, 0, b"")))
            if not isinstance(document, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError, AuthenticationFailed):
            log.error("%s failed its integrity check: refusing to use it", path)
            raise KeyFileDamaged() from None
        return document


# --------------------------------------------------------------------------- key state


@dataclass
class KeyState:
    """Each version's state, counters and creation time.

    A key's rotation period is not here: the rotation index alone holds it, so
    ``CONFIG`` is one atomic write and a crash cannot leave two periods. (State
    files written before kept a copy under ``rotate_period``; it is ignored.)
    """

    usage: dict[int, VersionUsage] = field(default_factory=dict)

    def destroyed(self) -> set[int]:
        """The versions DESTROY erased (or is erasing: their files may still be there)."""
        return {number for number, usage in self.usage.items() if usage.state == DESTROYED}

    def to_document(self) -> dict[str, Any]:
        return {
            "versions": {
                str(number): {
                    "state": usage.state,
                    "encryptions": usage.encryptions,
                    "decryptions": usage.decryptions,
                    "bytes": usage.bytes,
                }
                | ({} if usage.created is None else {"created": usage.created})
                for number, usage in sorted(self.usage.items())
            },
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> KeyState:
        state = cls()
        for number, entry in dict(document.get("versions", {})).items():
            created = entry.get("created")
            state.usage[int(number)] = VersionUsage(
                state=str(entry["state"]),
                encryptions=int(entry["encryptions"]),
                decryptions=int(entry["decryptions"]),
                bytes=int(entry["bytes"]),
                created=created if isinstance(created, str) else None,
            )
        return state


@dataclass
class KeyRecord:
    """What the cache knows of one key: versions on disk, its state, versions opened so far."""

    key_id: str
    files: list[int]
    state: KeyState
    opened: dict[int, KeyVersion] = field(default_factory=dict)

    @property
    def versions(self) -> list[int]:
        """Every version the key has had, destroyed ones included."""
        return sorted(set(self.files) | set(self.state.usage))

    def __post_init__(self) -> None:
        #: The highest version, kept up to date by :meth:`KeyStore.add` (read per request).
        self.latest = max([*self.files, *self.state.usage], default=0)

    def usage(self, version: int) -> VersionUsage:
        return self.state.usage.setdefault(version, VersionUsage())

    def wipe(self) -> None:
        for version in self.opened.values():
            version.wipe()
        self.opened.clear()


def _unfinished_create(state: KeyState) -> bool:
    """A state naming version 1 alone, never used: nothing to lose if it is replaced."""
    if set(state.usage) != {1}:
        return False
    usage = state.usage[1]
    return not (usage.encryptions or usage.decryptions or usage.bytes) and usage.state == ACTIVE


# --------------------------------------------------------------------------- the store


class KeyStore:
    """An opened store: verifies the KEK, then opens key versions lazily and caches them.

    Start-up reads only the metadata and the rotation index, so it costs the
    same for ten keys or a million. A key's directory is listed on first use, a
    version's file opened on first use; both stay in an LRU cache of
    ``cache_keys`` keys whose material is wiped on eviction.
    """

    def __init__(
        self,
        store_dir: Path,
        kek: bytes | bytearray,
        *,
        clock: Callable[[], str],
        cache_keys: int = DEFAULT_CACHE_KEYS,
    ) -> None:
        self.directory = store_dir
        #: Version files linked but not yet durable (their directory's fsync is on its
        #: way, in a worker thread): reads do not see them, so no request uses a version
        #: a power cut could still take back.
        self._unsettled: set[tuple[str, int]] = set()
        check_private(store_dir)
        live_generation(store_dir)  # a clear error for a directory that is not a store
        self._lock = locked(store_dir / LOCK_NAME, blocking=False)
        self._lock_fd = self._lock.__enter__()
        try:
            # Read and check only under the lock: an offline rekey cannot switch generations.
            self.metadata = read_metadata(store_dir)
            expected = self.metadata.kek_check.encode()
            check = kek_check_value(kek, self.metadata.store_id).encode()
            if not constant_time_equal(check, expected):
                raise StoreError("wrong KEK: it does not match the store's check value")
            for name in remove_other_generations(store_dir):
                log.info("removed %s: left by an interrupted or finished rekey", name)
            self.generation = live_generation(store_dir)
            # A crash mid-write of the rotation index leaves its temporary file here.
            remove_stale_temporaries(self.generation, os.listdir(self.generation))
            self.sealer = Sealer(kek, self.metadata.store_id)
            self._clock = clock
            self._cache: OrderedDict[str, KeyRecord] = OrderedDict()
            self._cache_keys = cache_keys
            self.rotation = self._read_rotation()
            self._finish_erase()
        except BaseException:
            self._lock.__exit__(None, None, None)  # any failure to open leaves the store free
            raise
        #: Keys whose usage counters changed since the last flush.
        self.dirty: set[str] = set()
        #: When each key's latest version was created (Unix seconds), learned once: the
        #: periodic rotation check reads it here instead of opening every rotating key.
        self._latest_created: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<KeyStore {str(self.directory)!r} cached={len(self._cache)}>"

    def announce(self, socket_path: Path) -> None:
        """Record the serving socket in the lock file, for `kmsd rekey` to find us."""
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{socket_path.absolute()}\n".encode(), 0)

    def close(self) -> None:
        """Wipe every cached key and release the store lock."""
        for record in self._cache.values():
            record.wipe()
        self._cache.clear()
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):  # a failing disk must not fail the stop
                os.ftruncate(self._lock_fd, 0)
            self._lock.__exit__(None, None, None)
            self._lock_fd = -1

    def _finish_erase(self) -> None:
        """Finish the DESTROYs a crash (or a failing disk) cut short between their state
        and the erasure of their files (see :meth:`begin_erase`): reading a key erases
        every file its state calls destroyed; one cut short before its state was
        written erases nothing. The list is kept until every key on it was read."""
        erasing = self._erasing(forgiving=True)
        for key_id in list(erasing):
            try:
                record = self._scan(key_id)
            except KmsError as error:  # damaged: verify and the next use report it
                log.error("cannot finish a DESTROY of %s: %s", key_id, error)
            except OSError as error:  # short of descriptors, a failing disk: next start
                log.error("cannot finish a DESTROY of %s yet: %s", key_id, error)
                continue
            else:
                if record is not None and record.state.destroyed() & set(record.files):
                    continue  # a file it could not erase: the next start tries again
            erasing.remove(key_id)
        try:
            self._write_erasing(erasing)
        except OSError as error:  # the keys on it were read: the next start reads them again
            log.error("cannot update %s: %s", ERASING_NAME, error)

    def _erasing(self, *, forgiving: bool = False) -> list[str]:
        """The key ids of the ``erasing`` list. One that cannot be read is an error for a
        DESTROY (rewriting it would drop the keys on it), not for a start."""
        try:
            return read_erasing(self.generation)
        except OSError as error:
            if not forgiving:
                raise
            log.error("cannot read %s: %s", ERASING_NAME, error)
            return []

    def _write_erasing(self, erasing: list[str]) -> None:
        path = self.generation / ERASING_NAME
        if erasing:
            replace_file(path, "".join(f"{key_id}\n" for key_id in erasing).encode())
        elif path.exists():
            path.unlink()
            fsync_directory(self.generation)

    def begin_erase(self, key_id: str) -> None:
        """Before a DESTROY's state is written: add the key to the list, durably (worker
        thread, under the write lock)."""
        erasing = self._erasing()
        if key_id not in erasing:
            self._write_erasing([*erasing, key_id])

    def end_erase(self, key_id: str, state: KeyState) -> None:
        """After a destroyed version's file is gone: off the list, unless a file of another
        of the versions ``state`` calls destroyed is still there (worker thread, write lock)."""
        if state.destroyed() & set(key_file_versions(self.key_directory(key_id))):
            return
        self._write_erasing([named for named in self._erasing() if named != key_id])

    def write_lock(self) -> contextlib.AbstractContextManager[int]:
        """Exclusive with other writers and with backups (blocking: worker threads only)."""
        return locked(self.directory / WRITE_LOCK_NAME, blocking=True)

    # ----------------------------------------------------------------- reading

    def key_directory(self, key_id: str) -> Path:
        return self.generation.joinpath(KEYS_DIR, *key_id.split("/"))

    def _read_rotation(self) -> dict[str, int]:
        path = self.generation / ROTATION_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        document = self.sealer.open_document(b"rotation", "", data, path)
        return {str(key): int(period) for key, period in document.items()}

    def _scan(self, key_id: str) -> KeyRecord | None:
        directory = self.key_directory(key_id)
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return None
        remove_stale_temporaries(directory, names)
        files = sorted(
            number
            for name in names
            if (match := _KEY_FILE_RE.fullmatch(name))
            and (key_id, number := int(match.group(1))) not in self._unsettled
        )
        if not files and STATE_NAME not in names:
            return None
        if files and STATE_NAME not in names:
            # CREATE writes the state file first, so only a deletion takes it away, and
            # with it every RETIRE and DESTROY: serving the key would undo them.
            log.error("key %s: its state file is missing: refusing to serve it", key_id)
            raise KeyFileDamaged()
        path = directory / STATE_NAME
        state = KeyState.from_document(
            self.sealer.open_document(b"state", key_id, path.read_bytes(), path)
        )
        first = state.usage.get(1)
        if first is not None and first.state == CREATING:
            if 1 not in files:
                return None  # a CREATE a crash cut short before its commit: no key
            first.state = ACTIVE  # committed; its next state write says so
        leftovers = sorted(state.destroyed() & set(files))
        if leftovers:  # a DESTROY cut short after its state was written: finish it
            for number in leftovers:
                try:
                    with contextlib.suppress(FileNotFoundError):
                        (directory / file_name(number)).unlink()
                except OSError as error:  # a failing disk: kept in ``files``, so a DESTROY
                    log.error(  # retried tries again; the key serves all the same
                        "key %s: cannot erase destroyed version %d: %s", key_id, number, error
                    )
                    continue
                files.remove(number)
                log.info("key %s: erased version %d, destroyed before a crash", key_id, number)
            with contextlib.suppress(OSError):  # the next read or start erases it again
                fsync_directory(directory)
        return KeyRecord(key_id, files, state)

    def ready_for_create(self, key_id: str) -> bool:
        """Whether a CREATE of ``key_id`` may write it: no such key (a CREATE cut short
        is none, see :meth:`_scan`), or only a state naming version 1, never used,
        without its file: a key whose only file was lost, which a CREATE may replace
        without losing anything. The stale record is dropped from the cache, so the
        CREATE publishes a fresh one.
        """
        record = self._cache.get(key_id) or self._scan(key_id)
        if record is None:
            return True
        if record.files or not _unfinished_create(record.state):
            return False
        self._cache.pop(key_id, None)
        return True

    def resync(self, key_id: str | None) -> None:
        """After a write that failed part-way: forget what memory holds about ``key_id``
        and the rotation index, so both are read again from what the disk now says.

        A failed ROTATE may have left its version file, a failed DESTROY its state:
        serving from memory would hide one and, at the next counter flush, write the
        old state back over the other. Usage counters not yet flushed are carried
        over to the versions the disk still has (counts only grow, so memory's are
        the larger); when the key cannot be read again, they are lost.
        """
        if key_id is not None:
            self._latest_created.pop(key_id, None)
            stale = self._cache.pop(key_id, None)
            if stale is not None:
                if key_id in self.dirty:
                    self.dirty.discard(key_id)
                    self._carry_counters(stale)
                stale.wipe()
        try:
            self.rotation = self._read_rotation()
        except (OSError, KmsError) as error:  # keep the index in memory; CONFIG rewrites it
            log.error("cannot read the rotation index again: %s", error)

    def _carry_counters(self, stale: KeyRecord) -> None:
        """Read ``stale``'s key again and give it the counters ``stale`` has not flushed."""
        try:
            fresh = self._scan(stale.key_id)
        except (OSError, KmsError):
            return
        if fresh is None:
            return
        for number, counted in stale.state.usage.items():
            usage = fresh.state.usage.get(number)
            if usage is not None:
                usage.encryptions = max(usage.encryptions, counted.encryptions)
                usage.decryptions = max(usage.decryptions, counted.decryptions)
                usage.bytes = max(usage.bytes, counted.bytes)
        self._remember(fresh)
        self.dirty.add(stale.key_id)

    def record(self, key_id: str) -> KeyRecord:
        """The cached record of ``key_id``, listing its directory on a miss."""
        record = self._cache.get(key_id)
        if record is not None:
            self._cache.move_to_end(key_id)
            return record
        record = self._scan(key_id)
        if record is None:
            raise KeyNotFound()
        self._remember(record)
        return record

    def _remember(self, record: KeyRecord) -> None:
        self._cache[record.key_id] = record
        self._cache.move_to_end(record.key_id)
        while len(self._cache) > self._cache_keys:
            evicted_id, evicted = self._cache.popitem(last=False)
            if evicted_id in self.dirty:
                # Its counters are not flushed yet: keep it (oldest) and stop here; the
                # cache stays over its size until the next flush (every few seconds).
                self._cache[evicted_id] = evicted
                self._cache.move_to_end(evicted_id, last=False)
                break
            evicted.wipe()

    def version(self, key_id: str, version: int | None = None) -> KeyVersion:
        """An opened key version (the latest when ``version`` is None), retired or not;
        a destroyed one is ``RETIRED``."""
        record = self.record(key_id)
        number = record.latest if version is None else version
        opened = record.opened.get(number)
        if opened is not None:
            return opened
        usage = record.state.usage.get(number)  # never create an entry for a probe
        if usage is not None and usage.state == DESTROYED:  # (its file, if a failing disk
            raise Retired("key version was destroyed")  # kept it, is never opened)
        if number not in record.files:
            if usage is None:
                raise KeyNotFound()
            log.error(
                "key %s version %d: its file is missing: refusing to serve it", key_id, number
            )
            raise KeyFileDamaged()
        path = self.key_directory(key_id) / file_name(number)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyNotFound() from None
        opened = self.sealer.open_key_file(key_id, number, data, path)
        usage = opened.usage = record.usage(number)
        if usage.created is None:  # a state file from before creation times were kept
            usage.created = opened.created
            self.dirty.add(key_id)  # the next counter flush records it
        record.opened[number] = opened
        return opened

    def usable(self, key_id: str, version: int | None = None) -> KeyVersion:
        """Like :meth:`version`, but a retired or destroyed version is ``ERR RETIRED``.

        Every key use starts here: a version already opened is found without a call
        into :meth:`record` and :meth:`version` (each costs ~0.3 us in the daemon).
        """
        record = self._cache.get(key_id)
        opened = None
        if record is not None:
            self._cache.move_to_end(key_id)
            opened = record.opened.get(record.latest if version is None else version)
        if opened is None:
            opened = self.version(key_id, version)
        if opened.usage.state != ACTIVE:
            raise Retired()
        return opened

    def latest_created(self, key_id: str) -> float:
        """When the key's latest version was created (Unix seconds), learned once."""
        created = self._latest_created.get(key_id)
        if created is None:
            created = parse_time(self.created(key_id, self.record(key_id).latest))
            self._latest_created[key_id] = created
        return created

    def created(self, key_id: str, version: int) -> str:
        """When a version was made: from the key's state, opening the version only when
        the state does not know (a version written before state files kept it)."""
        usage = self.record(key_id).state.usage.get(version)
        if usage is not None and usage.created is not None:
            return usage.created
        return self.version(key_id, version).created

    def exists(self, key_id: str) -> bool:
        return key_id in self._cache or self._scan(key_id) is not None

    # ----------------------------------------------------------------- writing (worker thread)

    def write_version(
        self, key_id: str, version: int, exportable: bool, state: KeyState | None = None
    ) -> KeyVersion:
        """Seal fresh material as a new version file. Blocking (fsync): run in a worker thread.

        Touches no cache state, so it is safe beside the event loop; the caller
        publishes the result with :meth:`add` once back on the loop.
        Raises :class:`KeyExists` if that version's file already exists. Version 1
        makes a key in three writes: its state file with version 1 ``creating``, the
        version file (the commit), then the state (``state``, a fresh one when not
        given) with version 1 active. So a key's version files never exist without
        its state file (a missing one can only be a deletion), and a state whose
        version 1 is still ``creating`` without its file is a CREATE a crash cut
        short, not a key (see :meth:`_scan`), which no read writes a state for.
        """
        directory = self.key_directory(key_id)
        make_private_dirs(directory, self.generation / KEYS_DIR)
        path = directory / file_name(version)
        new_key = version == 1
        if new_key and path.exists():
            raise KeyExists()  # never overwrite the state of a key that exists
        material = bytearray(random_bytes(KEY_SIZE))
        opened = KeyVersion(key_id, version, self._clock(), exportable, material)
        opened.usage.created = opened.created  # the caller puts this usage in the state file
        state = KeyState() if state is None else state
        try:
            if new_key:
                pending = replace(opened.usage, state=CREATING)
                self.write_state(key_id, KeyState({**state.usage, version: pending}))
            self._unsettled.add((key_id, version))
            try:
                write_new_file(path, self.sealer.seal_key_file(opened))
            finally:
                self._unsettled.discard((key_id, version))
        except BaseException as error:
            opened.wipe()  # memory's copy: the disk has the material if the commit happened
            if isinstance(error, FileExistsError):
                raise KeyExists() from None
            if new_key and not path.exists():  # no commit: nothing half-made stays
                with contextlib.suppress(OSError):
                    (directory / STATE_NAME).unlink()
            raise
        if new_key:
            state.usage[version] = opened.usage
            try:
                self.write_state(key_id, state)
            except OSError as error:  # committed all the same: "creating" with its file
                log.error("CREATE %s: version 1 stays 'creating' on disk: %s", key_id, error)
        return opened

    def write_state(self, key_id: str, state: KeyState) -> None:
        """Persist a key's state file (blocking: worker thread)."""
        document = self.sealer.seal_document(b"state", key_id, state.to_document())
        replace_file(self.key_directory(key_id) / STATE_NAME, document)

    def write_rotation(self, rotation: dict[str, int]) -> None:
        """Persist the rotation index (blocking: worker thread)."""
        document = self.sealer.seal_document(b"rotation", "", dict(rotation))
        replace_file(self.generation / ROTATION_NAME, document)

    def remove_version_file(self, key_id: str, version: int) -> None:
        """Crypto-shred one version: unlink its sealed file, durably (worker thread)."""
        directory = self.key_directory(key_id)
        with contextlib.suppress(FileNotFoundError):
            (directory / file_name(version)).unlink()
        fsync_directory(directory)

    def add(self, opened: KeyVersion) -> KeyRecord:
        """Publish a version just written by :meth:`write_version` to the cache."""
        record = self._cache.get(opened.key_id) or self._scan(opened.key_id)
        if record is None:
            record = KeyRecord(opened.key_id, [], KeyState())
        self._remember(record)
        if opened.version not in record.files:
            record.files = sorted([*record.files, opened.version])
        record.latest = max(record.latest, opened.version)
        self._latest_created.pop(opened.key_id, None)
        if opened.version in record.opened:  # a request on another connection opened it
            opened.wipe()  # from its file meanwhile: one copy of the material is enough
            return record
        # Both carry the creation time: write_version set it, the state file just written has it.
        opened.usage = record.state.usage.setdefault(opened.version, opened.usage)
        record.opened[opened.version] = opened
        return record

    def state_snapshot(self, key_ids: set[str]) -> list[tuple[str, KeyState]]:
        """Copies of the states of ``key_ids`` still cached, for a flush in a worker thread."""
        snapshot = []
        for key_id in key_ids:
            record = self._cache.get(key_id)
            if record is not None:
                state = KeyState(
                    {number: replace(usage) for number, usage in record.state.usage.items()}
                )
                snapshot.append((key_id, state))
        return snapshot

    def adopt_generation(self, generation: Path, metadata: StoreMetadata, sealer: Sealer) -> None:
        """Serve from a generation a rekey just made live. Cached keys stay valid."""
        self.generation = generation
        self.metadata = metadata
        self.sealer = sealer


def read_erasing(generation: Path) -> list[str]:
    """The key ids of a generation's ``erasing`` list; OSError if it cannot be read.

    Unsealed, so each line is checked as a key id: none can name a path outside the store.
    """
    try:
        lines = (generation / ERASING_NAME).read_bytes().split()
    except FileNotFoundError:
        return []
    erasing = []
    for line in lines:
        try:
            erasing.append(validate_key_id(line))
        except KmsError:
            log.error("ignored %r in %s: not a key id", line[:40], ERASING_NAME)
    return erasing


def walk_key_ids(keys_dir: Path) -> Iterator[str]:
    for directory, _, names in os.walk(keys_dir):
        if any(_KEY_FILE_RE.fullmatch(name) for name in names) or STATE_NAME in names:
            yield Path(directory).relative_to(keys_dir).as_posix()


def key_file_versions(directory: Path) -> list[int]:
    return sorted(
        int(match.group(1))
        for name in os.listdir(directory)
        if (match := _KEY_FILE_RE.fullmatch(name))
    )
