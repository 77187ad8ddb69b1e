# The sealed key store on disk: layout, store metadata, atomic durable writes, a lazy LRU cache.
# Blocking file I/O only; no sockets, no trio. Writes run in a worker thread, one at a time.
"""A key-per-file store whose file system is the index.

Layout under the store directory (every directory 0700, every file 0600)::

    kms-store.json            metadata: format, store id, KEK source and KDF, KEK check
    .lock                     flock'ed by the one daemon that serves the store
    keys/<key-id>/_v<N>.key   one sealed file per key version

A key id's ``/``-separated segments become directories. Segments start with a
letter or digit, so the ``_v<N>.key`` names and ``.tmp-*`` files can never
collide with a key id.

A key file is::

    b"KMSK" | 0x01 | header length (2 bytes) | header (JSON) | XAES-256-GCM seal of the material

sealed under a key derived from the KEK, with the store id, key id, version and
the whole header as additional data. A file copied to another name, another
version or another store does not open; neither does a file with an edited
header (creation time, exportable flag).

Writes go to a temporary file that is fsync'ed, then hard-linked to its final
name (which fails if the name exists, so nothing is ever overwritten), then the
directory is fsync'ed. A crash leaves the old state or the new one.
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
import stat
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kms_client.errors import InternalError, KeyExists, KeyNotFound
from kms_server.crypto import (
    KEY_SIZE,
    XAES256GCM,
    AuthenticationFailed,
    constant_time_equal,
    hkdf_sha256,
    random_bytes,
    wipe,
)
from kms_server.keys import KeyVersion

log = logging.getLogger("kmsd.store")

STORE_FORMAT = "kms-store/1"
METADATA_NAME = "kms-store.json"
LOCK_NAME = ".lock"
KEYS_DIR = "keys"
KEY_FILE_MAGIC = b"KMSK\x01"
_KEY_FILE_RE = re.compile(r"_v([1-9][0-9]{0,9})\.key")
_WRAP_LABEL = b"kms/1 key file wrapping"
_CHECK_LABEL = b"kms/1 KEK check value"
DEFAULT_CACHE_KEYS = 10_000


class StoreError(Exception):
    """The store cannot be used: missing, damaged, locked or opened with the wrong KEK."""


class KeyFileDamaged(InternalError):
    """A key file failed authentication: copied, edited or corrupted. Never served."""

    default_message = "a key file failed its integrity check; see the daemon log"


def file_name(version: int) -> str:
    return f"_v{version}.key"


# --------------------------------------------------------------------------- durable files


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(path: Path, stop_at: Path) -> None:
    """Create ``path`` and missing parents below ``stop_at`` as 0700, durably."""
    missing: list[Path] = []
    probe = path
    while probe != stop_at and not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        fsync_directory(directory.parent)


TEMPORARY_PREFIX = ".tmp-"


def temporary_path(path: Path) -> Path:
    """A temporary name beside ``path`` carrying our pid, so leftovers can be told apart."""
    return path.parent / f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}-{uuid.uuid4().hex}"


def remove_stale_temporaries(directory: Path, names: list[str]) -> None:
    """Unlink temporary files left by a writer that died (another pid) in ``directory``.

    The store is locked by one daemon, so a temporary file of another pid can
    only be the remains of a crash; ours may belong to a write in progress.
    """
    ours = f"{TEMPORARY_PREFIX}{os.getpid()}-"
    for name in names:
        if name.startswith(TEMPORARY_PREFIX) and not name.startswith(ours):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
                log.info("removed %s, left by an interrupted write", directory / name)


def write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path`` atomically and durably; never overwrite.

    Raises :class:`FileExistsError` when ``path`` already exists.
    """
    temporary = temporary_path(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)
    finally:
        os.unlink(temporary)
    fsync_directory(path.parent)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably, replacing any old content."""
    temporary = temporary_path(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    fsync_directory(path.parent)


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class StoreMetadata:
    """What ``kms-store.json`` records. ``kek`` describes the KEK source and its KDF."""

    store_id: str
    created: str
    kek: dict[str, Any]
    kek_check: str
    format: str = STORE_FORMAT

    def to_json(self) -> bytes:
        document = {
            "format": self.format,
            "store_id": self.store_id,
            "created": self.created,
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
                kek=dict(document["kek"]),
                kek_check=str(document["kek_check"]),
                format=str(document["format"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"store metadata {METADATA_NAME} is damaged") from exc
        if metadata.format != STORE_FORMAT:
            raise StoreError(f"unsupported store format {metadata.format!r}")
        if not isinstance(metadata.kek.get("kind"), str):
            raise StoreError(f"store metadata {METADATA_NAME} names no KEK source")
        return metadata


def kek_check_value(kek: bytes | bytearray, store_id: str) -> str:
    value = hkdf_sha256(kek, _CHECK_LABEL + b"\x00" + store_id.encode())
    return base64.b64encode(value).decode()


def read_metadata(store_dir: Path) -> StoreMetadata:
    path = store_dir / METADATA_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(
            f"{store_dir} is not a key store (no {METADATA_NAME}); run `kmsd init`"
        ) from None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    return StoreMetadata.from_json(data)


def init_store(
    store_dir: Path,
    kek: bytes | bytearray,
    kek_description: dict[str, Any],
    now: str,
    *,
    tolerate: frozenset[str] = frozenset(),
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
    store_id = str(uuid.uuid4())
    metadata = StoreMetadata(
        store_id=store_id,
        created=now,
        kek=kek_description,
        kek_check=kek_check_value(kek, store_id),
    )
    (store_dir / KEYS_DIR).mkdir(mode=0o700)
    write_new_file(store_dir / METADATA_NAME, metadata.to_json())
    fsync_directory(store_dir)
    return metadata


def check_private(store_dir: Path) -> None:
    """Refuse a store directory that group or others may enter: keys must stay private."""
    mode = store_dir.stat().st_mode
    if mode & 0o077:
        raise StoreError(
            f"{store_dir} is accessible to group or others (mode {stat.S_IMODE(mode):04o}); "
            "run: chmod 700 " + str(store_dir)
        )


# --------------------------------------------------------------------------- key files


def _key_file_aad(store_id: str, key_id: str, version: int, head: bytes) -> bytes:
    return (
        b"kms/1 key file\x00"
        + store_id.encode()
        + b"\x00"
        + key_id.encode("ascii")
        + b"\x00"
        + version.to_bytes(4, "big")
        + head
    )


@dataclass
class KeyRecord:
    """What the cache knows of one key: its versions on disk and those opened so far."""

    key_id: str
    directory: Path
    versions: list[int]
    opened: dict[int, KeyVersion] = field(default_factory=dict)

    @property
    def latest(self) -> int:
        return self.versions[-1]

    def wipe(self) -> None:
        for version in self.opened.values():
            version.wipe()
        self.opened.clear()


class KeyStore:
    """An opened store: verifies the KEK, then opens key versions lazily and caches them.

    Start-up reads only the metadata, so it costs the same for ten keys or a
    million. A key's directory is listed on first use, a version's file is
    opened on first use; both stay in an LRU cache of ``cache_keys`` keys
    whose material is wiped on eviction.
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
        self.metadata = read_metadata(store_dir)
        check_private(store_dir)
        expected = self.metadata.kek_check.encode()
        if not constant_time_equal(kek_check_value(kek, self.metadata.store_id).encode(), expected):
            raise StoreError("wrong KEK: it does not match the store's check value")
        self._keys_dir = store_dir / KEYS_DIR
        self._wrapper = XAES256GCM(hkdf_sha256(kek, _WRAP_LABEL))
        self._clock = clock
        self._cache: OrderedDict[str, KeyRecord] = OrderedDict()
        self._cache_keys = cache_keys
        self._lock_fd = self._take_lock()

    def __repr__(self) -> str:
        return f"<KeyStore {str(self.directory)!r} cached={len(self._cache)}>"

    def _take_lock(self) -> int:
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(f"{self.directory} is in use by another kmsd") from None
            raise
        return fd

    def close(self) -> None:
        """Wipe every cached key and release the store lock."""
        for record in self._cache.values():
            record.wipe()
        self._cache.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ----------------------------------------------------------------- reading

    def _key_directory(self, key_id: str) -> Path:
        return self._keys_dir.joinpath(*key_id.split("/"))

    def _scan(self, key_id: str) -> KeyRecord | None:
        directory = self._key_directory(key_id)
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return None
        remove_stale_temporaries(directory, names)
        versions = sorted(
            int(match.group(1)) for name in names if (match := _KEY_FILE_RE.fullmatch(name))
        )
        if not versions:
            return None
        return KeyRecord(key_id, directory, versions)

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
            _, evicted = self._cache.popitem(last=False)
            evicted.wipe()

    def version(self, key_id: str, version: int | None = None) -> KeyVersion:
        """An opened key version (the latest when ``version`` is None)."""
        record = self.record(key_id)
        number = record.latest if version is None else version
        opened = record.opened.get(number)
        if opened is not None:
            return opened
        if number not in record.versions:
            raise KeyNotFound()
        opened = self._open_file(key_id, number, record.directory / file_name(number))
        record.opened[number] = opened
        return opened

    def _open_file(self, key_id: str, version: int, path: Path) -> KeyVersion:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyNotFound() from None
        try:
            if not data.startswith(KEY_FILE_MAGIC):
                raise ValueError("bad magic")
            head_length = int.from_bytes(data[5:7], "big")
            head = data[: 7 + head_length]
            header = json.loads(head[7:])
            material = bytearray(
                self._wrapper.open(
                    data[len(head) :],
                    _key_file_aad(self.metadata.store_id, key_id, version, head),
                )
            )
            created = header["created"]
            exportable = header["exportable"]
            if not isinstance(created, str) or not isinstance(exportable, bool):
                raise TypeError("bad header")
        except (ValueError, KeyError, TypeError, AuthenticationFailed):
            log.error("key file %s failed its integrity check: refusing to serve it", path)
            raise KeyFileDamaged() from None
        return KeyVersion(key_id, version, created, exportable, material)

    # ----------------------------------------------------------------- writing (worker thread)

    def _seal_file(
        self, key_id: str, version: int, created: str, exportable: bool, material: bytearray
    ) -> bytes:
        header = json.dumps({"created": created, "exportable": exportable}).encode()
        head = KEY_FILE_MAGIC + len(header).to_bytes(2, "big") + header
        aad = _key_file_aad(self.metadata.store_id, key_id, version, head)
        return head + self._wrapper.seal(bytes(material), aad)

    def write_version(self, key_id: str, version: int, exportable: bool) -> KeyVersion:
        """Seal fresh material as a new version file. Blocking (fsync): run in a worker thread.

        Touches no cache state, so it is safe beside the event loop; the caller
        publishes the result with :meth:`add` once back on the loop.
        Raises :class:`KeyExists` if that version's file already exists.
        """
        directory = self._key_directory(key_id)
        make_private_dirs(directory, self._keys_dir)
        created = self._clock()
        material = bytearray(random_bytes(KEY_SIZE))
        sealed = self._seal_file(key_id, version, created, exportable, material)
        try:
            write_new_file(directory / file_name(version), sealed)
        except FileExistsError:
            wipe(material)
            raise KeyExists() from None
        return KeyVersion(key_id, version, created, exportable, material)

    def exists(self, key_id: str) -> bool:
        return key_id in self._cache or self._scan(key_id) is not None

    def add(self, opened: KeyVersion) -> None:
        """Publish a version just written by :meth:`write_version` to the cache."""
        record = self._cache.get(opened.key_id) or self._scan(opened.key_id)
        if record is None:
            record = KeyRecord(opened.key_id, self._key_directory(opened.key_id), [])
        self._remember(record)
        if opened.version not in record.versions:
            record.versions = sorted([*record.versions, opened.version])
        record.opened[opened.version] = opened
