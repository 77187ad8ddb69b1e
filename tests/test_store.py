# The sealed key store (kms_server/store.py) and KEK sources (kek.py), in-process on real files.
# No daemon here: tests/test_daemon.py covers the same guarantees through the socket.
from __future__ import annotations

import base64
import errno
import json
import os
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from kms_client.errors import KeyExists, KeyNotFound
from kms_client.protocol import parse_request
from kms_server import files as files_module
from kms_server import server as server_module
from kms_server import store as store_module
from kms_server.acl import Acl
from kms_server.audit import AuditLog
from kms_server.crypto import KEY_SIZE, random_bytes
from kms_server.dispatch import WRITE_REQUESTS, Dispatcher
from kms_server.files import replace_file, write_new_file
from kms_server.kek import (
    ARGON2_MEMORY_KIB,
    MAX_KEK_FILE_SIZE,
    KekError,
    KekFile,
    PassphraseCommand,
    obtain_for_store,
    read_small_file,
)
from kms_server.keys import CREATING, KeyVersion, VersionUsage
from kms_server.maintenance import verify
from kms_server.server import AccessControl, Limits, Reloaded, Server
from kms_server.store import (
    ERASING_NAME,
    KEYS_DIR,
    LIVE_LINK,
    METADATA_NAME,
    ROTATION_NAME,
    STATE_NAME,
    STORE_FORMAT,
    KeyFileDamaged,
    KeyRecord,
    KeyState,
    KeyStore,
    Sealer,
    StoreError,
    init_store,
    kek_check_value,
    live_generation,
    parse_time,
    read_metadata,
)

NOW = "2026-01-01T00:00:00Z"


def clock() -> str:
    return NOW


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def new_store(directory: Path, kek: bytes | None = None) -> bytes:
    """Initialise a store under a file-kind KEK; returns the KEK."""
    kek = kek if kek is not None else random_bytes(KEY_SIZE)
    init_store(directory, kek, {"kind": "file"}, NOW)
    return kek


@pytest.fixture
def kek() -> bytes:
    return random_bytes(KEY_SIZE)


@pytest.fixture
def store_dir(tmp_path: Path, kek: bytes) -> Path:
    directory = tmp_path / "store"
    new_store(directory, kek)
    return directory


@pytest.fixture
def store(store_dir: Path, kek: bytes) -> Iterator[KeyStore]:
    opened = KeyStore(store_dir, kek, clock=clock)
    try:
        yield opened
    finally:
        opened.close()


def write_key(store: KeyStore, key_id: str, version: int = 1, exportable: bool = False) -> bytes:
    """Write and publish a version; returns a copy of its material."""
    opened = store.write_version(key_id, version, exportable)
    store.add(opened)
    return bytes(opened.material)


def generation(store_dir: Path) -> Path:
    """The live generation directory (``<store>/gen-N``, named by the ``live`` link)."""
    return live_generation(store_dir)


def metadata_file(store_dir: Path) -> Path:
    return generation(store_dir) / METADATA_NAME


def key_file(store_dir: Path, key_id: str, version: int) -> Path:
    return generation(store_dir).joinpath(KEYS_DIR, *key_id.split("/"), f"_v{version}.key")


def temp_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.startswith(".tmp")]


# --------------------------------------------------------------------------- init and open


def test_init_creates_private_layout_and_metadata(store_dir: Path, kek: bytes) -> None:
    assert sorted(path.name for path in store_dir.iterdir()) == sorted([LIVE_LINK, "gen-1"])
    live = store_dir / LIVE_LINK
    assert live.is_symlink()
    assert os.readlink(live) == "gen-1"  # relative: the store may be moved or restored elsewhere
    first = store_dir / "gen-1"
    assert generation(store_dir) == first
    assert mode_of(store_dir) == 0o700
    assert mode_of(first) == 0o700
    assert mode_of(first / KEYS_DIR) == 0o700
    assert mode_of(first / METADATA_NAME) == 0o600
    assert sorted(path.name for path in first.iterdir()) == sorted([KEYS_DIR, METADATA_NAME])
    document = json.loads((first / METADATA_NAME).read_text())
    assert document["format"] == STORE_FORMAT
    assert document["generation"] == 1
    uuid.UUID(document["store_id"])
    assert document["kek"] == {"kind": "file"}
    assert document["kek_check"] == kek_check_value(kek, document["store_id"])
    assert document["created"] == NOW
    assert kek.hex() not in (first / METADATA_NAME).read_text()


def test_init_into_existing_empty_dir_tightens_its_mode(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    directory.mkdir(mode=0o755)
    new_store(directory)
    assert mode_of(directory) == 0o700


def test_store_ids_differ_between_stores(tmp_path: Path, kek: bytes) -> None:
    new_store(tmp_path / "a", kek)
    new_store(tmp_path / "b", kek)
    first, second = read_metadata(tmp_path / "a"), read_metadata(tmp_path / "b")
    assert first.store_id != second.store_id
    assert first.kek_check != second.kek_check


def test_passphrase_store_records_argon2id_parameters(tmp_path: Path) -> None:
    source = PassphraseCommand(shlex.join([sys.executable, "-c", "print('correct horse')"]))
    description = source.describe_new()
    kek = source.obtain(description)
    init_store(tmp_path / "store", kek, description, NOW)
    recorded = read_metadata(tmp_path / "store").kek
    assert recorded["kind"] == "passphrase"
    assert recorded["kdf"] == "argon2id"
    assert (recorded["iterations"], recorded["lanes"], recorded["memory_kib"]) == (3, 4, 65536)
    assert len(base64.b64decode(recorded["salt"], validate=True)) == 16
    assert source.describe_new()["salt"] != recorded["salt"]
    KeyStore(tmp_path / "store", obtain_for_store(source, recorded), clock=clock).close()


def test_init_refuses_non_empty_dir(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    directory.mkdir()
    (directory / "precious").write_bytes(b"do not touch")
    with pytest.raises(StoreError):
        new_store(directory)
    assert sorted(os.listdir(directory)) == ["precious"]
    assert (directory / "precious").read_bytes() == b"do not touch"


def test_init_refuses_an_existing_store_and_a_file(store_dir: Path, tmp_path: Path) -> None:
    before = metadata_file(store_dir).read_bytes()
    with pytest.raises(StoreError):
        new_store(store_dir)
    assert metadata_file(store_dir).read_bytes() == before
    assert sorted(os.listdir(store_dir)) == sorted([LIVE_LINK, "gen-1"])
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StoreError):
        new_store(tmp_path / "file")


def test_open_refuses_wrong_kek(store_dir: Path, kek: bytes) -> None:
    for wrong in (random_bytes(KEY_SIZE), bytes(KEY_SIZE), kek[:-1] + bytes([kek[-1] ^ 1])):
        with pytest.raises(StoreError):
            KeyStore(store_dir, wrong, clock=clock)
    KeyStore(store_dir, kek, clock=clock).close()


def test_open_refuses_a_missing_store(tmp_path: Path, kek: bytes) -> None:
    """A missing store is a StoreError (kmsd exit 3), like every other unusable store."""
    with pytest.raises(StoreError):
        KeyStore(tmp_path / "nothing", kek, clock=clock)


def test_open_refuses_missing_or_damaged_metadata(tmp_path: Path, kek: bytes) -> None:
    directory = tmp_path / "store"
    new_store(directory, kek)
    metadata = metadata_file(directory)
    good = metadata.read_bytes()
    for damaged in (
        b"",
        b"{",
        b"[]",
        good.replace(b"kms-store/1", b"kms-store/9"),
        json.dumps({"format": STORE_FORMAT}).encode(),
    ):
        metadata.write_bytes(damaged)
        with pytest.raises(StoreError):
            KeyStore(directory, kek, clock=clock)
    metadata.write_bytes(good)
    KeyStore(directory, kek, clock=clock).close()
    metadata.unlink()
    with pytest.raises(StoreError):
        KeyStore(directory, kek, clock=clock)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(None, id="missing"),
        pytest.param("gen-2", id="dangling"),
        pytest.param("../elsewhere", id="outside"),
        pytest.param("keys", id="not-a-generation"),
        pytest.param("gen-0", id="generation-zero"),
    ],
)
def test_open_refuses_a_missing_or_strange_live_link(
    store_dir: Path, kek: bytes, target: str | None
) -> None:
    (store_dir / LIVE_LINK).unlink()
    if target is not None:
        os.symlink(target, store_dir / LIVE_LINK)
    with pytest.raises(StoreError):
        KeyStore(store_dir, kek, clock=clock)
    assert (store_dir / "gen-1" / METADATA_NAME).is_file()  # nothing removed on the way


def test_open_removes_generations_that_are_not_live(store_dir: Path, kek: bytes) -> None:
    """The remains of a rekey (a half-made next generation, the previous one) go at open."""
    first = KeyStore(store_dir, kek, clock=clock)
    material = write_key(first, "app", 1, exportable=True)
    first.close()
    shutil.copytree(store_dir / "gen-1", store_dir / "gen-2")  # half-made or finished: unlinked
    (store_dir / "gen-7").mkdir(mode=0o700)
    os.symlink("gen-1", store_dir / ".live-0123abcd")  # a link switch that never happened
    reopened = KeyStore(store_dir, kek, clock=clock)
    try:
        assert sorted(os.listdir(store_dir)) == sorted([LIVE_LINK, "gen-1", ".lock"])
        assert bytes(reopened.version("app", 1).material) == material
    finally:
        reopened.close()


def test_open_refuses_a_store_others_can_enter(store_dir: Path, kek: bytes) -> None:
    store_dir.chmod(0o750)
    with pytest.raises(StoreError):
        KeyStore(store_dir, kek, clock=clock)


def test_second_open_is_refused_while_the_first_holds_the_lock(store_dir: Path, kek: bytes) -> None:
    first = KeyStore(store_dir, kek, clock=clock)
    try:
        with pytest.raises(StoreError):
            KeyStore(store_dir, kek, clock=clock)
    finally:
        first.close()
    KeyStore(store_dir, kek, clock=clock).close()


# --------------------------------------------------------------------------- writing


def test_versions_are_private_files_named_by_key_id(store: KeyStore, store_dir: Path) -> None:
    write_key(store, "pg/cluster1/wal", 1)
    write_key(store, "pg/cluster1/wal", 2)
    write_key(store, "solo", 1)
    for version in (1, 2):
        path = key_file(store_dir, "pg/cluster1/wal", version)
        assert path.is_file()
        assert mode_of(path) == 0o600
    assert mode_of(key_file(store_dir, "solo", 1)) == 0o600
    for directory in ("keys/pg", "keys/pg/cluster1", "keys/pg/cluster1/wal", "keys/solo"):
        assert mode_of(generation(store_dir) / directory) == 0o700
    assert not (store_dir / KEYS_DIR).exists()  # key files live in the generation only
    assert temp_files(store_dir) == []


def test_write_version_never_overwrites(store: KeyStore, store_dir: Path) -> None:
    material = write_key(store, "app", 1)
    before = key_file(store_dir, "app", 1).read_bytes()
    with pytest.raises(KeyExists):
        store.write_version("app", 1, exportable=True)
    assert key_file(store_dir, "app", 1).read_bytes() == before
    assert bytes(store.version("app", 1).material) == material
    assert temp_files(store_dir) == []


def test_writes_survive_reopening(store_dir: Path, kek: bytes) -> None:
    first = KeyStore(store_dir, kek, clock=clock)
    materials = {
        version: write_key(first, "app/db", version, exportable=True) for version in (1, 2, 3)
    }
    first.close()
    second = KeyStore(store_dir, kek, clock=clock)
    try:
        assert second.record("app/db").versions == [1, 2, 3]
        assert second.version("app/db").version == 3
        for version, material in materials.items():
            opened = second.version("app/db", version)
            assert bytes(opened.material) == material
            assert opened.exportable is True
            assert opened.created == NOW
        with pytest.raises(KeyNotFound):
            second.version("app/db", 4)
        with pytest.raises(KeyNotFound):
            second.version("app/dc")
    finally:
        second.close()


def test_close_wipes_cached_material(store_dir: Path, kek: bytes) -> None:
    opened = KeyStore(store_dir, kek, clock=clock)
    write_key(opened, "a")
    version = opened.version("a")
    opened.close()
    assert version.material == bytearray(KEY_SIZE)


# --------------------------------------------------------------------------- refusing damaged files


@pytest.mark.parametrize(
    ("target_key", "target_version"),
    [
        pytest.param("b", 1, id="other-key-id"),
        pytest.param("a/b", 1, id="nested-key-id"),
        pytest.param("a", 2, id="other-version"),
    ],
)
def test_copied_key_file_is_refused(
    store_dir: Path, kek: bytes, target_key: str, target_version: int
) -> None:
    first = KeyStore(store_dir, kek, clock=clock)
    material = write_key(first, "a", 1, exportable=True)
    first.close()
    target = key_file(store_dir, target_key, target_version)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(key_file(store_dir, "a", 1), target)
    reopened = KeyStore(store_dir, kek, clock=clock)
    try:
        with pytest.raises(KeyFileDamaged) as caught:
            reopened.version(target_key, target_version)
        assert caught.value.code == "INTERNAL"
        assert material.hex() not in str(caught.value)
        # The original still opens.
        assert bytes(reopened.version("a", 1).material) == material
    finally:
        reopened.close()


def edit_header(data: bytes, old: bytes, new: bytes, fix_length: bool) -> bytes:
    head_length = int.from_bytes(data[5:7], "big")
    header = data[7 : 7 + head_length]
    assert old in header
    edited = header.replace(old, new)
    length = len(edited) if fix_length else head_length
    return data[:5] + length.to_bytes(2, "big") + edited + data[7 + head_length :]


@pytest.mark.parametrize(
    ("old", "new", "fix_length"),
    [
        pytest.param(b"false", b"true ", False, id="exportable-same-length"),
        pytest.param(b"false", b"true", True, id="exportable-relengthed"),
        pytest.param(b"2026", b"2025", False, id="created"),
    ],
)
def test_edited_header_is_refused(
    store: KeyStore, store_dir: Path, old: bytes, new: bytes, fix_length: bool
) -> None:
    store.write_version("locked", 1, exportable=False)  # not published: opened from disk
    path = key_file(store_dir, "locked", 1)
    path.write_bytes(edit_header(path.read_bytes(), old, new, fix_length))
    with pytest.raises(KeyFileDamaged):
        store.version("locked")
    with pytest.raises(KeyFileDamaged):
        store.version("locked")  # refused again: a failed file is never cached


def test_every_damaged_byte_and_truncation_is_refused(store: KeyStore, store_dir: Path) -> None:
    store.write_version("k", 1, exportable=True)
    path = key_file(store_dir, "k", 1)
    good = path.read_bytes()
    for index in range(len(good)):
        for mask in (0x01, 0x80):
            damaged = bytearray(good)
            damaged[index] ^= mask
            path.write_bytes(bytes(damaged))
            with pytest.raises(KeyFileDamaged):
                store.version("k")
    for length in range(len(good)):
        path.write_bytes(good[:length])
        with pytest.raises(KeyFileDamaged):
            store.version("k")
    path.write_bytes(good)
    assert store.version("k").exportable is True


def test_key_file_from_another_store_with_the_same_kek_is_refused(
    tmp_path: Path, kek: bytes
) -> None:
    new_store(tmp_path / "one", kek)
    new_store(tmp_path / "two", kek)
    one = KeyStore(tmp_path / "one", kek, clock=clock)
    write_key(one, "shared", 1, exportable=True)
    one.close()
    target = key_file(tmp_path / "two", "shared", 1)
    target.parent.mkdir(mode=0o700)
    assert target.parent.parent.parent.name == "gen-1"
    shutil.copyfile(key_file(tmp_path / "one", "shared", 1), target)
    two = KeyStore(tmp_path / "two", kek, clock=clock)
    try:
        with pytest.raises(KeyFileDamaged):
            two.version("shared")
    finally:
        two.close()


def test_unrelated_names_in_a_key_directory_are_ignored(store_dir: Path, kek: bytes) -> None:
    first = KeyStore(store_dir, kek, clock=clock)
    write_key(first, "k", 1)
    first.close()
    directory = key_file(store_dir, "k", 1).parent
    for name in (".tmp-_v2.key-0123", "_v0.key", "_v01.key", "_v2.key.bak", "v3.key", "_v4"):
        (directory / name).write_bytes(b"junk")
    reopened = KeyStore(store_dir, kek, clock=clock)
    try:
        assert reopened.record("k").versions == [1]
        assert reopened.version("k").version == 1
    finally:
        reopened.close()


def test_state_file_is_bound_to_its_key(store_dir: Path, kek: bytes) -> None:
    """A key's sealed state (version states, counters) does not open under another key id,
    and an edited one does not open at all."""
    first = KeyStore(store_dir, kek, clock=clock)
    for key_id in ("a", "b"):
        write_key(first, key_id)
    first.write_state("a", KeyState({1: VersionUsage(encryptions=60)}))
    first.write_state("b", KeyState({1: VersionUsage()}))
    first.close()
    a_state = key_file(store_dir, "a", 1).parent / STATE_NAME
    b_state = key_file(store_dir, "b", 1).parent / STATE_NAME
    good_b = b_state.read_bytes()
    shutil.copyfile(a_state, b_state)
    reopened = KeyStore(store_dir, kek, clock=clock)
    try:
        assert reopened.record("a").usage(1).encryptions == 60
        with pytest.raises(KeyFileDamaged):
            reopened.record("b")
        edited = bytearray(good_b)
        edited[len(edited) // 2] ^= 1
        b_state.write_bytes(bytes(edited))
        with pytest.raises(KeyFileDamaged):
            reopened.record("b")
        b_state.write_bytes(good_b)
        assert reopened.record("b").usage(1).encryptions == 0
    finally:
        reopened.close()


# --------------------------------------------------------------------------- cache


def test_lru_eviction_wipes_material_and_reloads(store_dir: Path, kek: bytes) -> None:
    small = KeyStore(store_dir, kek, clock=clock, cache_keys=2)
    try:
        materials = {key_id: write_key(small, key_id) for key_id in ("a", "b")}
        first = small.version("a")
        assert bytes(first.material) == materials["a"]
        small.version("b")  # "a" is now the least recently used
        materials["c"] = write_key(small, "c")  # evicts "a"
        assert first.material == bytearray(KEY_SIZE)
        assert bytes(small.version("b").material) == materials["b"]
        again = small.version("a")  # reloaded from disk; evicts "c"
        assert again is not first
        assert bytes(again.material) == materials["a"]
        assert again.decrypt(again.encrypt(b"x", b""), b"") == b"x"
        assert bytes(small.version("c").material) == materials["c"]
    finally:
        small.close()


@pytest.fixture
def fast_tmp() -> Iterator[Path]:
    """A temp dir on tmpfs when there is one: creating 100,000 files on ext4 takes 10-30 s."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="kms-big-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_large_store_opens_and_serves_lazily(fast_tmp: Path) -> None:
    """100,000 key versions (1,000 keys x 100) in the live generation.

    The keys the test opens are sealed by the store's own code path (minus fsync), with
    a state file each; the other 99,700 files are genuine sealed files too, but sealed for
    a template key (sealing 100,000 files costs ~7 s; opening must not read them anyway,
    and would refuse them if it did).
    """
    kek = random_bytes(KEY_SIZE)
    directory = fast_tmp / "big"
    new_store(directory, kek)
    builder = KeyStore(directory, kek, clock=clock)
    keys, versions, opened_keys = 1000, 100, (0, 499, 999)

    def sealed(key_id: str, version: int) -> bytes:
        material = bytearray(random_bytes(KEY_SIZE))
        return builder.sealer.seal_key_file(KeyVersion(key_id, version, NOW, False, material))

    template = [sealed("tenant/template", version) for version in range(1, versions + 1)]
    keys_dir = generation(directory) / KEYS_DIR / "tenant"
    for key in range(keys):
        key_dir = keys_dir / f"k{key}"
        key_dir.mkdir(mode=0o700, parents=True)
        for version in range(1, versions + 1):
            if key in opened_keys:
                data = sealed(f"tenant/k{key}", version)
            else:
                data = template[version - 1]
            fd = os.open(key_dir / f"_v{version}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
    for key in opened_keys:
        builder.write_state(f"tenant/k{key}", KeyState({1: VersionUsage(encryptions=key)}))
    builder.close()
    assert sum(1 for _ in keys_dir.rglob("_v*.key")) == keys * versions

    # Laziness is shown by what is NOT read, not by a stopwatch: every other key file is
    # a copy of another key's file, which fails its check when opened; so opening the
    # store and these keys proves that nothing else was opened.
    opened = KeyStore(directory, kek, clock=clock)
    try:
        for key in opened_keys:
            latest = opened.version(f"tenant/k{key}")
            assert latest.version == versions
            assert opened.version(f"tenant/k{key}", 1).version == 1
            assert opened.record(f"tenant/k{key}").usage(1).encryptions == key
        with pytest.raises(KeyFileDamaged):  # the template copies are refused when opened
            opened.version("tenant/k1", 1)
    finally:
        opened.close()


# --------------------------------------------------------------------------- KEK sources


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(bytes(range(32)), id="raw"),
        pytest.param(bytes(range(32)).hex().encode(), id="hex"),
        pytest.param(bytes(range(32)).hex().encode() + b"\n", id="hex-newline"),
        pytest.param(bytes(range(32)).hex().upper().encode() + b"\r\n", id="hex-upper-crlf"),
    ],
)
def test_kek_file_accepts(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "kek"
    path.write_bytes(content)
    source = KekFile(path)
    assert source.describe_new() == {"kind": "file"}
    assert bytes(source.obtain({"kind": "file"})) == bytes(range(32))


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(bytes(31), id="31-raw"),
        pytest.param(bytes(33), id="33-raw"),
        pytest.param(bytes(range(32)) + b"\n", id="raw-newline"),
        pytest.param(b"ab" * 31 + b"a", id="63-hex"),
        pytest.param(b"ab" * 32 + b"a", id="65-hex"),
        pytest.param(b"zz" * 32, id="64-non-hex"),
        pytest.param(b"ab" * 16 + b" " + b"ab" * 16, id="hex-inner-space"),
        pytest.param(b"ab" * 64, id="128-hex"),
    ],
)
def test_kek_file_refuses(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "kek"
    path.write_bytes(content)
    with pytest.raises(KekError):
        KekFile(path).obtain({"kind": "file"})


def test_kek_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(KekError):
        KekFile(tmp_path / "missing").obtain({"kind": "file"})
    with pytest.raises(KekError):
        KekFile(tmp_path).obtain({"kind": "file"})  # a directory


def test_kek_file_that_never_ends_or_never_comes_is_refused_at_once(tmp_path: Path) -> None:
    """A device or a FIFO nobody writes to must not hang the daemon (a REKEY holds every
    store change while it reads) nor fill its memory."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), Path("/dev/null"), Path("a\0b")):
        started = time.monotonic()
        with pytest.raises(KekError):
            KekFile(path).obtain({"kind": "file"})
        assert time.monotonic() - started < 3.0, path


def test_kek_file_that_is_a_stalled_pipe_is_given_up(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer that holds the pipe open and writes nothing
    try:
        with pytest.raises(KekError, match=r"delivered nothing within 0\.3 s"):
            read_small_file(fifo, MAX_KEK_FILE_SIZE, 0.3)
    finally:
        os.close(writer)
    # A writer that writes, then takes a while to close (say a shell's `<(...)`).
    kek = bytes(range(32)).hex().encode()
    writer = os.open(fifo, os.O_RDWR)
    os.write(writer, kek)
    closing = threading.Timer(0.2, os.close, [writer])
    closing.start()
    try:
        assert read_small_file(fifo, MAX_KEK_FILE_SIZE, 10.0) == kek
    finally:
        closing.join()


def python_command(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


def small_kdf(source: PassphraseCommand) -> dict[str, object]:
    """The recorded description with a cheap memory cost, for tests of the command path."""
    return source.describe_new() | {"memory_kib": 64}


def test_passphrase_command_derives_a_stable_kek() -> None:
    source = PassphraseCommand(python_command("print('correct horse')"))
    description = source.describe_new()
    assert description["memory_kib"] == ARGON2_MEMORY_KIB
    kek = source.obtain(description)
    assert len(kek) == KEY_SIZE
    assert source.obtain(description) == kek
    cheap = small_kdf(source)
    cheap_kek = source.obtain(cheap)
    # Only the first line counts; a CR before its LF is dropped.
    same = PassphraseCommand(python_command("import sys; sys.stdout.write('correct horse\\r\\nx')"))
    assert same.obtain(cheap) == cheap_kek
    other = PassphraseCommand(python_command("print('correct horsf')"))
    assert other.obtain(cheap) != cheap_kek
    assert source.obtain(small_kdf(source)) != cheap_kek  # another salt


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(python_command("import sys; print('secret'); sys.exit(3)"), id="exit-3"),
        pytest.param(python_command("pass"), id="no-output"),
        pytest.param(python_command("print()"), id="empty-line"),
        pytest.param("/nonexistent/kms-passphrase-helper", id="missing-executable"),
        pytest.param("", id="empty-command"),
        pytest.param("'unbalanced", id="unparsable"),
        pytest.param("/etc/passwd/x", id="through-a-file"),
        pytest.param("x" * 5000, id="name-too-long"),
        pytest.param("a\0b", id="nul"),
        pytest.param("/dev/null", id="not-a-program"),
    ],
)
def test_passphrase_command_failures(command: str) -> None:
    source = PassphraseCommand(command, timeout=5.0)
    started = time.monotonic()
    with pytest.raises(KekError) as caught:
        source.obtain(small_kdf(source))
    assert time.monotonic() - started < 3.0
    assert "secret" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_passphrase_command_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "helper"
    script.write_text("#!/bin/sh\necho secret\n")
    script.chmod(0o600)
    with pytest.raises(KekError):
        PassphraseCommand(str(script)).obtain(small_kdf(PassphraseCommand(str(script))))


@pytest.mark.parametrize(
    "command",
    [
        pytest.param("sleep 30", id="sleep"),
        pytest.param(
            python_command(
                "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
            ),
            id="grandchild-holds-pipe",
        ),
    ],
)
def test_hanging_passphrase_command_times_out(command: str) -> None:
    source = PassphraseCommand(command, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(KekError):
        source.obtain(small_kdf(source))
    assert time.monotonic() - started < 4.0


def test_passphrase_command_that_prints_without_end_keeps_memory_and_deadline() -> None:
    """`yes` prints forever: only the first line is kept, and the timeout still holds."""
    started = time.monotonic()
    with pytest.raises(KekError, match="did not finish"):
        PassphraseCommand("yes", timeout=1.0).obtain(small_kdf(PassphraseCommand("yes")))
    assert time.monotonic() - started < 3.0
    flood = python_command("import sys; sys.stdout.write('x' * (1 << 20))")
    with pytest.raises(KekError, match="first line is longer"):
        PassphraseCommand(flood).read_passphrase()
    # The rest of the output is read and dropped; the first line is the passphrase.
    chatty = python_command("import sys; sys.stdout.write('words\\r\\n' + 'y' * (1 << 22))")
    assert PassphraseCommand(chatty).read_passphrase() == b"words"


def test_passphrase_obtain_refuses_damaged_kdf_parameters() -> None:
    source = PassphraseCommand(python_command("print('x')"))
    good = small_kdf(source)
    for damaged in (
        {k: v for k, v in good.items() if k != "salt"},
        good | {"salt": "not base64!"},
        good | {"kdf": "scrypt"},
        good | {"iterations": 0},
        good | {"lanes": 0},
        good | {"memory_kib": 1 << 30},
        good | {"iterations": "three"},
    ):
        with pytest.raises(KekError):
            source.obtain(damaged)


def test_obtain_for_store_refuses_another_source_kind(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_bytes(random_bytes(KEY_SIZE))
    passphrase = PassphraseCommand(python_command("print('x')"))
    with pytest.raises(KekError):
        obtain_for_store(KekFile(path), passphrase.describe_new())
    with pytest.raises(KekError):
        obtain_for_store(passphrase, {"kind": "file"})
    with pytest.raises(KekError):
        obtain_for_store(KekFile(path), {})
    assert bytes(obtain_for_store(KekFile(path), {"kind": "file"})) == path.read_bytes()


@pytest.mark.parametrize(
    ("request_line", "check"),
    [
        (b"RETIRE a 1", lambda record: record.usage(1).state == "retired"),
        (
            b"DESTROY a 1",
            lambda record: record.usage(1).state == "destroyed" and 1 not in record.opened,
        ),
    ],
)
def test_a_state_change_lands_on_the_record_cached_after_its_write(
    store_dir: Path, kek: bytes, request_line: bytes, check: Callable[[KeyRecord], bool]
) -> None:
    """Other connections may evict the key and read it back while the write runs."""
    store = KeyStore(store_dir, kek, clock=clock, cache_keys=1)
    try:
        write_key(store, "a")
        write_key(store, "a", 2)
        write_key(store, "b")
        store.record("a")
        store.version("a", 1)

        async def evicted_and_read_back_meanwhile(work: Callable[[], object]) -> object:
            store.record("b")  # another connection's request evicts "a"...
            store.version("a", 1)  # ...and one reads it back from the state on disk
            return work()  # before this write lands

        request = parse_request(request_line)
        dispatcher = Dispatcher(store, "test")
        reply, _ = trio.run(dispatcher.respond_write, request, evicted_and_read_back_meanwhile)
        assert reply == b"OK\n"
        assert check(store.record("a"))
    finally:
        store.close()


def test_a_store_that_fails_to_open_is_left_unlocked(store_dir: Path, kek: bytes) -> None:
    (store_dir / LIVE_LINK / ROTATION_NAME).write_bytes(b"not a sealed document")
    failures = []  # kept: a traceback keeps the half-made store alive, and its lock with it
    for _ in range(2):  # the second open finds the store free, and the same damage
        with pytest.raises(KeyFileDamaged) as failure:
            KeyStore(store_dir, kek, clock=clock)
        failures.append(failure)


def test_a_failed_write_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for a full or failing disk, which this machine cannot safely provide.
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        replace_file(tmp_path / "state.seal", b"sealed")
    with pytest.raises(OSError, match="No space"):
        write_new_file(tmp_path / "_v1.key", b"sealed")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def failing_replace(source: object, target: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output"):
        replace_file(tmp_path / "state.seal", b"sealed")
    assert list(tmp_path.iterdir()) == []


def test_the_rotation_check_opens_a_key_once_not_at_every_check(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every minute the daemon asks which keys are due: after the first time, it reads no
    file (a store of many rotating keys must not be decrypted on the event loop each
    minute, evicting the keys in use). A new version is seen at once."""
    now = [NOW]
    store = KeyStore(store_dir, kek, clock=lambda: now[0])
    dispatcher = Dispatcher(store, "test")

    def write(line: bytes) -> bytes:
        request = parse_request(line)
        return trio.run(dispatcher.respond_write, request, trio.to_thread.run_sync)[0]

    try:
        assert write(b"CREATE rot/k rotate=1h") == b"OK 1\n"
        created = parse_time(NOW)
        assert not dispatcher.rotation_due("rot/k", created + 3599)
        assert dispatcher.rotation_due("rot/k", created + 3600)
        opened: list[tuple[str, int | None]] = []
        real_version = KeyStore.version

        def counting_version(self: KeyStore, key_id: str, version: int | None = None) -> KeyVersion:
            opened.append((key_id, version))
            return real_version(self, key_id, version)

        monkeypatch.setattr(KeyStore, "version", counting_version)
        for minute in range(10):
            assert dispatcher.rotation_due("rot/k", created + 3600 + 60 * minute)
        assert opened == []
        assert not dispatcher.rotation_due("rot/none", created + 3600)  # no period
        now[0] = "2026-01-01T02:00:00Z"
        assert write(b"ROTATE rot/k") == b"OK 2\n"
        assert not dispatcher.rotation_due("rot/k", created + 7200 + 3599)  # version 2 is new
        assert dispatcher.rotation_due("rot/k", created + 7200 + 3600)
    finally:
        store.close()


def test_info_opens_only_the_latest_version_and_upgrades_an_old_state_file(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INFO on a key with many versions reads their creation times from the key's state,
    not by decrypting every version on the event loop (2,000 versions held it up for
    0.36 s) and keeping them all in the cache. A state file written before it kept
    creation times is upgraded by the next counter flush after one slow INFO."""
    hours = iter(range(24))
    store = KeyStore(store_dir, kek, clock=lambda: f"2026-01-01T{next(hours):02d}:00:00Z")
    dispatcher = Dispatcher(store, "test")
    for line in [b"CREATE many exportable", *[b"ROTATE many"] * 4]:
        request = parse_request(line)
        assert trio.run(dispatcher.respond_write, request, trio.to_thread.run_sync)[0][:2] == b"OK"
    expected = dispatcher.respond(parse_request(b"INFO many"))[0]
    store.close()
    created = [version["created"] for version in json.loads(expected[3:])["versions"]]
    assert created == [f"2026-01-01T{hour:02d}:00:00Z" for hour in range(5)]

    opened: list[int] = []
    real_open = Sealer.open_key_file

    def counting_open(
        self: Sealer, key_id: str, version: int, data: bytes, path: Path
    ) -> KeyVersion:
        opened.append(version)
        return real_open(self, key_id, version, data, path)

    monkeypatch.setattr(Sealer, "open_key_file", counting_open)

    def info_after_restart() -> bytes:
        opened.clear()
        store = KeyStore(store_dir, kek, clock=clock)
        try:
            reply = Dispatcher(store, "test").respond(parse_request(b"INFO many"))[0]
            for key_id, state in store.state_snapshot(store.dirty):  # the counter flush
                store.write_state(key_id, state)
        finally:
            store.close()
        return reply

    assert info_after_restart() == expected
    assert opened == [5]  # the latest, for "exportable"

    # A state file from before creation times were kept: INFO opens each version once.
    store = KeyStore(store_dir, kek, clock=clock)
    state = store.record("many").state
    for usage in state.usage.values():
        usage.created = None
    store.write_state("many", state)
    store.close()
    assert info_after_restart() == expected
    assert sorted(opened) == [1, 2, 3, 4, 5]
    assert info_after_restart() == expected
    assert opened == [5]


# --------------------------------------------------------------------------- failed writes
# A full or failing disk, which this machine cannot safely provide, stood in for by one
# file-system step that raises (ENOSPC, EIO) at the point a real one would.


class FailingWrites:
    """The daemon's write path on a real store, with one step made to fail once."""

    def __init__(self, store_dir: Path, kek: bytes) -> None:
        self.store = KeyStore(store_dir, kek, clock=clock)
        self.dispatcher = Dispatcher(self.store, "test")

    def __enter__(self) -> FailingWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()

    def ask(self, line: bytes) -> bytes:
        request = parse_request(line)
        if type(request) not in WRITE_REQUESTS:
            return self.dispatcher.respond(request)[0]
        return trio.run(self.dispatcher.respond_write, request, trio.to_thread.run_sync)[0]

    def flush_counters(self) -> None:
        """What the daemon's periodic counter flush writes."""
        for key_id, state in self.store.state_snapshot(self.store.dirty):
            self.store.write_state(key_id, state)
        self.store.dirty.clear()


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, after: bool) -> None:
    """Make ``owner.name`` raise ENOSPC once: before doing its work, or after it."""
    real = getattr(owner, name)
    calls = []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) > 1:
            return real(*args, **kwargs)
        if after:
            real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(owner, name, failing)


def problems(store_dir: Path, kek: bytes) -> list[str]:
    return [problem for report in verify(store_dir, kek) for problem in report.problems]


def test_a_rotate_whose_state_write_fails_does_not_block_the_next(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The version file is written, the state is not: the next ROTATE answered EXISTS
    for good. Now the daemon reads the key again and goes on past that version."""
    caplog.set_level("INFO")
    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"CREATE f/r") == b"OK 1\n"
        for _ in range(3):
            assert writes.ask(b"ENC f/r aGk=").startswith(b"OK ")  # counted, not yet flushed
        for _ in range(2):
            fail_once(monkeypatch, KeyStore, "write_state", after=False)
            assert writes.ask(b"ROTATE f/r").startswith(b"ERR INTERNAL")
        failed = [r for r in caplog.records if "ROTATE f/r failed" in r.getMessage()]
        assert [r.exc_info for r in failed] == [None]  # one line, once, with the cause
        assert "No space left on device" in failed[0].getMessage()
        info = json.loads(writes.dispatcher.respond(parse_request(b"INFO f/r"))[0][3:])
        assert info["versions"][0]["encryptions"] == 3  # carried over the re-read
        assert writes.ask(b"ROTATE f/r") == b"OK 4\n"  # 2 and 3 were written, never acknowledged
        assert any("ROTATE f/r works again" in r.getMessage() for r in caplog.records)
    assert problems(store_dir, kek) == []


def test_an_automatic_rotation_that_keeps_failing_is_logged_once(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The rotation check retries a ROTATE that fails on the disk at every check: the
    dispatcher says why once, the check does not say it a second time, and the first
    rotation that works is said once."""
    caplog.set_level("INFO")
    tries = []

    def full_disk(*args: object, **kwargs: object) -> KeyVersion:
        tries.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    with (
        FailingWrites(store_dir, kek) as writes,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unused_listener,
    ):
        assert writes.ask(b"CREATE f/auto rotate=1s") == b"OK 1\n"  # due: its clock is in 2026-01
        server = Server(
            writes.dispatcher,
            unused_listener,
            Limits(rotation_check_interval=0.01),
            AccessControl(Acl.owner_only(os.getuid()), None),
            AuditLog(None),
            lambda: Reloaded(Acl.owner_only(os.getuid()), None, None),
        )

        async def rotate_until_it_works() -> None:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server._rotate_periodically)
                    while len(tries) < 3:
                        await trio.sleep(0.01)
                    monkeypatch.undo()
                    while writes.store.record("f/auto").latest < 2:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()

        monkeypatch.setattr(KeyStore, "write_version", full_disk)
        trio.run(rotate_until_it_works)
    said = [r.getMessage() for r in caplog.records if "f/auto" in r.getMessage()]
    assert [m for m in said if "No space left" in m or "failed" in m] == [
        "ROTATE f/auto failed: [Errno 28] No space left on device"
    ]
    assert said.count("ROTATE f/auto works again") == 1


def test_a_destroy_cut_short_by_a_failing_disk_stays_destroyed(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state says destroyed and the file is unlinked, then the directory fsync fails:
    memory must not keep serving version 1, nor flush its old state over the new one."""
    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"CREATE f/d") == b"OK 1\n"
        ciphertext = writes.ask(b"ENC f/d aGk=").split()[1]
        assert writes.ask(b"ROTATE f/d") == b"OK 2\n"
        fail_once(monkeypatch, KeyStore, "remove_version_file", after=True)
        assert writes.ask(b"DESTROY f/d 1").startswith(b"ERR INTERNAL")
        assert writes.ask(b"DEC f/d " + ciphertext).startswith(b"ERR RETIRED")
        assert writes.ask(b"ENC f/d aGk=").startswith(b"OK ")  # version 2 serves on
        writes.flush_counters()
    assert problems(store_dir, kek) == []


def test_a_destroy_cut_short_before_its_erasure_is_finished_at_the_next_start(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state says destroyed, the file is still there (a crash, stood in for by a
    failing unlink): the next start erases it, not the next use of the key, so a backup
    or a key nobody reads again does not keep it; verify calls it no damage meanwhile."""
    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"CREATE f/e") == b"OK 1\n"
        assert writes.ask(b"ROTATE f/e") == b"OK 2\n"
        fail_once(monkeypatch, KeyStore, "remove_version_file", after=False)
        assert writes.ask(b"DESTROY f/e 1").startswith(b"ERR INTERNAL")
    version_file = store_dir / LIVE_LINK / KEYS_DIR / "f" / "e" / "_v1.key"
    assert version_file.exists()
    assert problems(store_dir, kek) == []
    KeyStore(store_dir, kek, clock=clock).close()  # a start, and nothing asked of f/e
    assert not version_file.exists()
    assert not (store_dir / LIVE_LINK / ERASING_NAME).exists()
    assert problems(store_dir, kek) == []


def test_a_create_that_fails_after_its_commit_is_a_whole_key(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version file is linked, then a later step of its write fails (the directory
    fsync): the key exists, so its state stays and it serves; a retry says EXISTS."""
    with FailingWrites(store_dir, kek) as writes:
        fail_once(monkeypatch, store_module, "write_new_file", after=True)
        assert writes.ask(b"CREATE f/late exportable").startswith(b"ERR INTERNAL")
        assert writes.ask(b"GET f/late").startswith(b"OK 1 ")
        assert writes.ask(b"CREATE f/late").startswith(b"ERR EXISTS")
    assert problems(store_dir, kek) == []


def test_a_destroyed_file_that_cannot_be_erased_is_tried_again(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that refuses to erase a destroyed version's file: the key's other versions
    serve on; a repeated DESTROY tries again and says INTERNAL until the file is gone,
    never OK before; a start that cannot erase it keeps the key on the erasing list, and
    the next one erases it."""
    real_unlink = Path.unlink

    def failing_unlink(path: Path, missing_ok: bool = False) -> None:
        if path.name == "_v1.key" and path.parent.name == "u":
            raise OSError(errno.EIO, "Input/output error")
        real_unlink(path, missing_ok)

    version_file = store_dir / LIVE_LINK / KEYS_DIR / "f" / "u" / "_v1.key"
    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"CREATE f/u") == b"OK 1\n"
        assert writes.ask(b"ROTATE f/u") == b"OK 2\n"
        monkeypatch.setattr(Path, "unlink", failing_unlink)
        assert writes.ask(b"DESTROY f/u 1").startswith(b"ERR INTERNAL")
        assert writes.ask(b"ENC f/u aGk=").startswith(b"OK ")
        assert writes.ask(b"INFO f/u").startswith(b"OK ")
        assert writes.ask(b"GET f/u 1").startswith(b"ERR RETIRED")
        assert writes.ask(b"DESTROY f/u 1").startswith(b"ERR INTERNAL")  # not OK: still there
        assert writes.ask(b"CREATE f/v") == b"OK 1\n"
        assert writes.ask(b"ROTATE f/v") == b"OK 2\n"
        assert writes.ask(b"DESTROY f/v 1") == b"OK\n"  # f/u stays on the erasing list
        monkeypatch.undo()
        assert writes.ask(b"DESTROY f/w 1").startswith(b"ERR NOT_FOUND")
    assert version_file.exists()
    monkeypatch.setattr(Path, "unlink", failing_unlink)
    KeyStore(store_dir, kek, clock=clock).close()  # a start that cannot erase it either
    monkeypatch.undo()
    assert version_file.exists()
    assert (store_dir / LIVE_LINK / ERASING_NAME).read_bytes() == b"f/u\n"
    assert problems(store_dir, kek) == []
    KeyStore(store_dir, kek, clock=clock).close()
    assert not version_file.exists()
    assert not (store_dir / LIVE_LINK / ERASING_NAME).exists()
    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"DESTROY f/u 1") == b"OK\n"
    assert problems(store_dir, kek) == []


def test_a_key_stays_on_the_erasing_list_while_any_destroyed_file_is_left(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1's file cannot be erased; version 2's DESTROY then works: the key stays
    listed, so the next start erases version 1's file."""
    real_unlink = Path.unlink

    def failing_unlink(path: Path, missing_ok: bool = False) -> None:
        if path.name == "_v1.key":
            raise OSError(errno.EIO, "Input/output error")
        real_unlink(path, missing_ok)

    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"CREATE f/m") == b"OK 1\n"
        assert writes.ask(b"ROTATE f/m") == b"OK 2\n"
        assert writes.ask(b"ROTATE f/m") == b"OK 3\n"
        monkeypatch.setattr(Path, "unlink", failing_unlink)
        assert writes.ask(b"DESTROY f/m 1").startswith(b"ERR INTERNAL")
        assert writes.ask(b"DESTROY f/m 2") == b"OK\n"
        monkeypatch.undo()
    assert (store_dir / LIVE_LINK / ERASING_NAME).read_bytes() == b"f/m\n"
    KeyStore(store_dir, kek, clock=clock).close()
    assert not (store_dir / LIVE_LINK / KEYS_DIR / "f" / "m" / "_v1.key").exists()
    assert not (store_dir / LIVE_LINK / ERASING_NAME).exists()
    assert problems(store_dir, kek) == []


def test_a_reload_that_hangs_is_given_up_and_holds_off_the_next_until_it_ends(
    store_dir: Path,
    kek: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A config on a hung mount: the reload is rejected at its timeout, its thread left
    behind; the next SIGHUP is refused while that thread still hangs, not stacked on it
    (abandoned threads took the worker slots writes need); once it ends, reloads work."""
    monkeypatch.setattr(server_module, "RELOAD_TIMEOUT", 0.2)
    hang = threading.Event()
    owner = Acl.owner_only(os.getuid())

    def reread() -> Reloaded:
        hang.wait(30)
        return Reloaded(owner, None, None)

    with (
        FailingWrites(store_dir, kek) as writes,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unused_listener,
    ):
        server = Server(
            writes.dispatcher,
            unused_listener,
            Limits(),
            AccessControl(owner, None),
            AuditLog(None),
            reread,
        )

        async def reload_three_times() -> None:
            with trio.fail_after(20):
                await server.reload()  # given up at the timeout
                await server.reload()  # refused at once: the first still hangs
                hang.set()
                while server._reread_limiter.borrowed_tokens:
                    await trio.sleep(0.01)
                await server.reload()  # works

        caplog.set_level("INFO")
        trio.run(reload_three_times)
    said = [r.getMessage() for r in caplog.records if "reload" in r.getMessage()]
    assert len(said) == 3, said
    assert said[0].endswith("did not load within 0.2 s")
    assert said[1].endswith("an earlier reload is still reading the configuration")
    assert said[2].startswith("reloaded: ACL")


def test_a_destroy_retried_once_the_disk_works_erases_the_file(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"CREATE f/r") == b"OK 1\n"
        assert writes.ask(b"ROTATE f/r") == b"OK 2\n"
        fail_once(monkeypatch, KeyStore, "remove_version_file", after=False)
        assert writes.ask(b"DESTROY f/r 1").startswith(b"ERR INTERNAL")
        assert writes.ask(b"DESTROY f/r 1") == b"OK\n"
        assert not (store_dir / LIVE_LINK / KEYS_DIR / "f" / "r" / "_v1.key").exists()
        assert not (store_dir / LIVE_LINK / ERASING_NAME).exists()
    assert problems(store_dir, kek) == []


def test_a_version_file_not_yet_durable_is_not_read(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the link of a new version file and the fsync of its directory, a request
    on another connection must not use it: a power cut could still take it back."""
    real_fsync_directory = files_module.fsync_directory

    def read_at_its_fsync(writes: FailingWrites, key_id: str, version: int) -> list[object]:
        """What a read of ``key_id`` sees at the first fsync after that version's link."""
        seen: list[object] = []

        def fsync_directory(path: Path) -> None:
            if not seen and path.joinpath(f"_v{version}.key").exists():
                record = writes.store._scan(key_id)
                seen.append(None if record is None else record.files)
            real_fsync_directory(path)

        monkeypatch.setattr(files_module, "fsync_directory", fsync_directory)
        return seen

    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"CREATE f/rot") == b"OK 1\n"
        seen = read_at_its_fsync(writes, "f/rot", 2)
        assert writes.ask(b"ROTATE f/rot") == b"OK 2\n"
        assert seen == [[1]]  # version 2 not yet there for a read
        seen = read_at_its_fsync(writes, "f/new", 1)
        assert writes.ask(b"CREATE f/new") == b"OK 1\n"
        assert seen == [None]  # no key yet for a read


def test_a_create_whose_version_file_fails_is_no_key(
    store_dir: Path, kek: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CREATE failed on its version file (or, its commit made, on the state file after it):
    no file stays, so nothing is a key, for any verb or the rotation check, until a new
    CREATE makes it."""
    with FailingWrites(store_dir, kek) as writes:
        fail_once(monkeypatch, store_module, "write_new_file", after=False)
        assert writes.ask(b"CREATE f/c exportable rotate=1s").startswith(b"ERR INTERNAL")
        fail_once(monkeypatch, KeyStore, "write_state", after=False)
        assert writes.ask(b"CREATE f/c exportable rotate=1s").startswith(b"ERR INTERNAL")
        assert not (store_dir / LIVE_LINK / KEYS_DIR / "f" / "c" / "_v1.key").exists()
        assert not (store_dir / LIVE_LINK / KEYS_DIR / "f" / "c" / STATE_NAME).exists()
        assert writes.ask(b"GET f/c").startswith(b"ERR NOT_FOUND")
        assert writes.ask(b"ROTATE f/c").startswith(b"ERR NOT_FOUND")
        assert not writes.dispatcher.rotation_due("f/c", time.time() + 3600)
        assert writes.ask(b"CREATE f/c exportable") == b"OK 1\n"
        assert writes.ask(b"GET f/c").startswith(b"OK 1 ")
    assert problems(store_dir, kek) == []


def test_a_create_cut_short_is_no_key_and_one_committed_is_whole(
    store_dir: Path, kek: bytes
) -> None:
    """What a crash leaves between CREATE's writes, made here by hand: the "creating"
    state without the version file is no key for any verb, and a new CREATE replaces
    it; the version file with that state is a whole key, active. Verify calls neither
    damage, and nothing is written by reading them."""
    with FailingWrites(store_dir, kek) as writes:
        for key_id in ("f/before", "f/after"):
            assert writes.ask(f"CREATE {key_id}".encode()) == b"OK 1\n"
            writes.store.write_state(key_id, KeyState({1: VersionUsage(state=CREATING)}))
    (store_dir / LIVE_LINK / KEYS_DIR / "f" / "before" / "_v1.key").unlink()
    state_file = store_dir / LIVE_LINK / KEYS_DIR / "f" / "after" / STATE_NAME
    written = state_file.read_bytes()
    assert problems(store_dir, kek) == []
    with FailingWrites(store_dir, kek) as writes:
        for line in (b"GET f/before", b"ENC f/before aGk=", b"INFO f/before", b"RETIRE f/before 1"):
            assert writes.ask(line).startswith(b"ERR NOT_FOUND"), line
        assert writes.ask(b"ENC f/after aGk=").startswith(b"OK ")
        assert writes.ask(b"CREATE f/after").startswith(b"ERR EXISTS")
        assert state_file.read_bytes() == written
        assert writes.ask(b"CREATE f/before") == b"OK 1\n"
        assert writes.ask(b"RETIRE f/after 1") == b"OK\n"
    assert problems(store_dir, kek) == []


def test_a_state_without_its_first_version_is_reported_not_rotated(
    store_dir: Path, kek: bytes
) -> None:
    """A key whose only version file was lost is not hidden (GET and ROTATE refuse it,
    verify reports it; a CREATE cut short is told apart by its "creating" version), and
    a new CREATE may replace it: it was never used, so nothing is lost."""
    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"CREATE f/lost exportable") == b"OK 1\n"
        assert writes.ask(b"GET f/lost").startswith(b"OK 1 ")
    (store_dir / LIVE_LINK / KEYS_DIR / "f" / "lost" / "_v1.key").unlink()
    with FailingWrites(store_dir, kek) as writes:  # a restart finds the state alone
        assert writes.ask(b"GET f/lost").startswith(b"ERR INTERNAL")
        assert writes.ask(b"ROTATE f/lost").startswith(b"ERR INTERNAL")
    assert problems(store_dir, kek) == ["version 1: file missing (a new CREATE replaces the key)"]
    with FailingWrites(store_dir, kek) as writes:
        assert writes.ask(b"CREATE f/lost exportable") == b"OK 1\n"
    assert problems(store_dir, kek) == []
