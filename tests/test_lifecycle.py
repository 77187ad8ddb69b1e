# Key lifecycle on a live daemon: REWRAP, RETIRE/RESTORE/DESTROY, INFO counters, CONFIG and
# automatic rotation, persistence across SIGTERM and SIGKILL restarts, and the ACL over it all.
"""Issue 4, section 1, end to end through the Unix socket of a real ``kmsd``.

Every test drives a real daemon subprocess over a real store; restarts are real
SIGTERM or SIGKILL. Replies are checked by code (``OK``, ``ERR RETIRED``, ...),
never by message text. Key files are looked up on disk by the documented layout
(``<store>/live -> gen-N``, ``gen-N/keys/<key-id>/_v<N>.key``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kms_server.keys import CREATING, VersionUsage
from kms_server.store import (
    KEYS_DIR,
    STATE_NAME,
    WRITE_LOCK_NAME,
    KeyState,
    KeyStore,
    live_generation,
)
from tests.conftest import Daemon, kmsd, make_store
from tests.test_acl import acl_text
from tests.users import Conn, b64, code_of, running, wait_for

UID = os.getuid()
EXIT_DAMAGED = 6
FAST_FLUSH = ["--counter-flush-interval", "0.5", "--rotation-check-interval", "0.5"]


# --------------------------------------------------------------------------- helpers


def ok(conn: Conn, line: bytes) -> bytes:
    """Send ``line``; assert an ``OK`` reply; return what follows ``OK `` (maybe empty)."""
    reply = conn.ask(line)
    assert code_of(reply) == "OK", (line[:80], reply)
    return reply[3:]


def err(conn: Conn, line: bytes) -> str:
    """Send ``line``; return the error code of its reply (``OK`` if it succeeded)."""
    return code_of(conn.ask(line))


def enc(conn: Conn, key_id: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    line = b"ENC " + key_id + b" " + b64(plaintext) + (b" " + b64(aad) if aad else b"")
    return base64.b64decode(ok(conn, line))


def dec_line(key_id: bytes, ciphertext: bytes, aad: bytes = b"") -> bytes:
    return b"DEC " + key_id + b" " + b64(ciphertext) + (b" " + b64(aad) if aad else b"")


def rewrap_line(key_id: bytes, ciphertext: bytes, aad: bytes = b"") -> bytes:
    return b"REWRAP " + key_id + b" " + b64(ciphertext) + (b" " + b64(aad) if aad else b"")


def dec(conn: Conn, key_id: bytes, ciphertext: bytes, aad: bytes = b"") -> bytes:
    return base64.b64decode(ok(conn, dec_line(key_id, ciphertext, aad)))


def get(conn: Conn, key_id: bytes, version: int) -> bytes:
    number, material = ok(conn, b"GET %s %d" % (key_id, version)).split(b" ")
    assert int(number) == version
    return base64.b64decode(material)


def info(conn: Conn, key_id: bytes) -> dict[str, Any]:
    document = json.loads(ok(conn, b"INFO " + key_id))
    assert isinstance(document, dict)
    return document


def version_entry(document: dict[str, Any], version: int) -> dict[str, Any]:
    (entry,) = [entry for entry in document["versions"] if entry["version"] == version]
    assert isinstance(entry, dict)
    return entry


def header_version(ciphertext: bytes) -> int:
    """The key version a data ciphertext names: format byte 0x01, then 4 bytes big-endian."""
    assert ciphertext[0] == 0x01
    return int.from_bytes(ciphertext[1:5], "big")


def key_file(daemon: Daemon, key_id: str, version: int) -> Path:
    return live_generation(daemon.store).joinpath(KEYS_DIR, *key_id.split("/"), f"_v{version}.key")


def parse_created(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


@pytest.fixture
def fast_daemon(short_tmp: Path) -> Iterator[Daemon]:
    """A daemon that flushes counters and checks rotation periods every 0.5 s."""
    daemon = make_store(short_tmp / "d")
    daemon.extra_args = list(FAST_FLUSH)
    with running(daemon):
        yield daemon


# --------------------------------------------------------------------------- REWRAP


def test_rewrap_moves_a_ciphertext_to_the_latest_version(daemon: Daemon) -> None:
    with Conn(daemon.socket_path) as conn:
        assert ok(conn, b"CREATE rw/k") == b"1"
        plain, aad = b"row 17: card number", b"table=cards"
        first = enc(conn, b"rw/k", plain, aad)
        bare = enc(conn, b"rw/k", plain)
        assert header_version(first) == 1
        assert ok(conn, b"ROTATE rw/k") == b"2"
        assert ok(conn, b"ROTATE rw/k") == b"3"

        moved = base64.b64decode(ok(conn, rewrap_line(b"rw/k", first, aad)))
        assert header_version(moved) == 3
        assert moved != first
        assert dec(conn, b"rw/k", moved, aad) == plain  # REWRAP's output DECs, same plaintext
        assert dec(conn, b"rw/k", first, aad) == plain  # the old ciphertext still opens
        moved_bare = base64.b64decode(ok(conn, rewrap_line(b"rw/k", bare)))
        assert header_version(moved_bare) == 3
        assert dec(conn, b"rw/k", moved_bare) == plain

        # Rewrapping a ciphertext already under the latest version: same version, fresh nonce.
        again = base64.b64decode(ok(conn, rewrap_line(b"rw/k", moved, aad)))
        assert header_version(again) == 3
        assert again != moved
        assert dec(conn, b"rw/k", again, aad) == plain

        # The AAD still binds; the key id still binds; tampering is still caught.
        assert err(conn, rewrap_line(b"rw/k", first, b"table=other")) == "BAD_CIPHERTEXT"
        assert err(conn, rewrap_line(b"rw/k", first)) == "BAD_CIPHERTEXT"
        assert ok(conn, b"CREATE rw/other") == b"1"
        assert err(conn, rewrap_line(b"rw/other", first, aad)) == "BAD_CIPHERTEXT"
        flipped = bytearray(first)
        flipped[-1] ^= 1
        assert err(conn, rewrap_line(b"rw/k", bytes(flipped), aad)) == "BAD_CIPHERTEXT"
        assert err(conn, rewrap_line(b"rw/missing", first, aad)) == "NOT_FOUND"

        # Counted as a decryption under the old version and an encryption under the latest.
        document = info(conn, b"rw/k")
        v1, v3 = version_entry(document, 1), version_entry(document, 3)
        assert v1["decryptions"] == 1 + 2  # two REWRAPs and one DEC of a v1 ciphertext
        assert v3["encryptions"] == 3


# --------------------------------------------------------------------------- RETIRE / RESTORE


def test_retire_refuses_every_use_and_restore_brings_it_back(daemon: Daemon) -> None:
    with Conn(daemon.socket_path) as conn:
        assert ok(conn, b"CREATE rt/k exportable") == b"1"
        old = enc(conn, b"rt/k", b"old secret")
        material_1 = get(conn, b"rt/k", 1)
        assert ok(conn, b"ROTATE rt/k") == b"2"
        file_1 = key_file(daemon, "rt/k", 1)
        sealed_1 = file_1.read_bytes()

        assert ok(conn, b"RETIRE rt/k 1") == b""
        assert err(conn, dec_line(b"rt/k", old)) == "RETIRED"
        assert err(conn, b"GET rt/k 1") == "RETIRED"
        assert err(conn, rewrap_line(b"rt/k", old)) == "RETIRED"
        assert file_1.read_bytes() == sealed_1  # kept on disk, untouched
        assert version_entry(info(conn, b"rt/k"), 1)["state"] == "retired"
        # The latest version is unaffected.
        new = enc(conn, b"rt/k", b"new secret")
        assert header_version(new) == 2
        assert code_of(conn.ask(b"DATAKEY rt/k")) == "OK"
        assert ok(conn, b"RETIRE rt/k 1") == b""  # idempotent

        # Retiring the latest: it can no longer encrypt either.
        assert ok(conn, b"RETIRE rt/k 2") == b""
        for line in (
            b"ENC rt/k " + b64(b"x"),
            b"DATAKEY rt/k",
            b"GET rt/k",
            b"GET rt/k 2",
            dec_line(b"rt/k", new),
            rewrap_line(b"rt/k", new),
        ):
            assert err(conn, line) == "RETIRED", line
        document = info(conn, b"rt/k")
        assert [entry["state"] for entry in document["versions"]] == ["retired", "retired"]

        # RESTORE brings each back, with the very same material.
        assert ok(conn, b"RESTORE rt/k 1") == b""
        assert dec(conn, b"rt/k", old) == b"old secret"
        assert get(conn, b"rt/k", 1) == material_1
        assert err(conn, rewrap_line(b"rt/k", old)) == "RETIRED"  # the latest is still retired
        assert ok(conn, b"RESTORE rt/k 2") == b""
        assert header_version(base64.b64decode(ok(conn, rewrap_line(b"rt/k", old)))) == 2
        assert dec(conn, b"rt/k", new) == b"new secret"
        assert ok(conn, b"RESTORE rt/k 2") == b""  # idempotent
        assert [entry["state"] for entry in info(conn, b"rt/k")["versions"]] == [
            "active",
            "active",
        ]

        # A retired latest does not stop ROTATE: the new version is active.
        assert ok(conn, b"RETIRE rt/k 2") == b""
        assert ok(conn, b"ROTATE rt/k") == b"3"
        assert header_version(enc(conn, b"rt/k", b"x")) == 3

        for line in (
            b"RETIRE rt/k 9",
            b"RESTORE rt/k 9",
            b"RETIRE rt/none 1",
            b"RESTORE rt/none 1",
        ):
            assert err(conn, line) == "NOT_FOUND", line


# --------------------------------------------------------------------------- DESTROY


def test_destroy_shreds_the_file_and_refuses_the_latest(daemon: Daemon) -> None:
    with Conn(daemon.socket_path) as conn:
        assert ok(conn, b"CREATE ds/k exportable") == b"1"
        old = enc(conn, b"ds/k", b"shred me")
        material_1 = get(conn, b"ds/k", 1)
        assert err(conn, b"DESTROY ds/k 1") == "BAD_REQUEST"  # the only, so the latest
        assert key_file(daemon, "ds/k", 1).is_file()
        assert ok(conn, b"ROTATE ds/k") == b"2"
        assert err(conn, b"DESTROY ds/k 2") == "BAD_REQUEST"
        assert key_file(daemon, "ds/k", 2).is_file()

        assert ok(conn, b"DESTROY ds/k 1") == b""
        assert not key_file(daemon, "ds/k", 1).exists()  # crypto-shredded: the file is gone
        assert key_file(daemon, "ds/k", 2).is_file()
        for line in (
            dec_line(b"ds/k", old),
            b"GET ds/k 1",
            rewrap_line(b"ds/k", old),
            b"RESTORE ds/k 1",
            b"RETIRE ds/k 1",
        ):
            assert err(conn, line) == "RETIRED", line
        entry = version_entry(info(conn, b"ds/k"), 1)
        assert entry["state"] == "destroyed"
        assert entry["encryptions"] == 1  # its history stays
        assert "created" not in entry
        assert conn.ask(b"DESTROY ds/k 1") == b"OK"  # idempotent, never undone
        assert not key_file(daemon, "ds/k", 1).exists()
        # A retired version may be destroyed too; the latest stays usable.
        assert ok(conn, b"ROTATE ds/k") == b"3"
        assert ok(conn, b"RETIRE ds/k 2") == b""
        assert ok(conn, b"DESTROY ds/k 2") == b""
        assert not key_file(daemon, "ds/k", 2).exists()
        assert dec(conn, b"ds/k", enc(conn, b"ds/k", b"still fine")) == b"still fine"

    daemon.restart()
    with Conn(daemon.socket_path) as conn:
        document = info(conn, b"ds/k")
        assert [entry["state"] for entry in document["versions"]] == [
            "destroyed",
            "destroyed",
            "active",
        ]
        assert document["latest"] == 3
        assert err(conn, dec_line(b"ds/k", old)) == "RETIRED"
        assert err(conn, b"GET ds/k 1") == "RETIRED"
        assert err(conn, b"RESTORE ds/k 1") == "RETIRED"
    # The material is nowhere in the store, sealed or not (the seal is the only copy ever kept).
    for path in daemon.store.rglob("*"):
        if path.is_file():
            assert material_1 not in path.read_bytes()
            assert base64.b64encode(material_1) not in path.read_bytes()


# --------------------------------------------------------------------------- INFO and counters


def test_info_shows_states_creation_times_and_counters(daemon: Daemon) -> None:
    before = time.time()
    with Conn(daemon.socket_path) as conn:
        assert ok(conn, b"CREATE in/k") == b"1"
        ciphertexts = [enc(conn, b"in/k", b"x" * size) for size in (1, 10, 100)]
        for ciphertext in ciphertexts[:2]:
            dec(conn, b"in/k", ciphertext)
        ok(conn, b"DATAKEY in/k 48")
        assert ok(conn, b"ROTATE in/k") == b"2"
        enc(conn, b"in/k", b"y" * 7)
        assert ok(conn, b"RETIRE in/k 1") == b""
        document = info(conn, b"in/k")
    after = time.time()
    assert document["key_id"] == "in/k"
    assert document["latest"] == 2
    assert document["rotate_period"] is None
    v1, v2 = version_entry(document, 1), version_entry(document, 2)
    assert (v1["state"], v2["state"]) == ("retired", "active")
    assert (v1["encryptions"], v1["decryptions"], v1["bytes"]) == (4, 2, 111 + 11 + 48)
    assert (v2["encryptions"], v2["decryptions"], v2["bytes"]) == (1, 0, 7)
    for entry in (v1, v2):
        assert before - 1 <= parse_created(entry["created"]) <= after + 1


def test_counters_and_state_survive_a_sigterm_restart(short_tmp: Path) -> None:
    """Counters reach disk at shutdown: the periodic flush is set to an hour, so only the
    shutdown flush can have written them."""
    daemon = make_store(short_tmp / "d")
    daemon.extra_args = ["--counter-flush-interval", "3600"]
    with running(daemon):
        with Conn(daemon.socket_path) as conn:
            assert ok(conn, b"CREATE ct/k exportable rotate=90d") == b"1"
            for _ in range(5):
                dec(conn, b"ct/k", enc(conn, b"ct/k", b"abc"))
            assert ok(conn, b"ROTATE ct/k") == b"2"
            assert ok(conn, b"ROTATE ct/k") == b"3"
            enc(conn, b"ct/k", b"defg")
            assert ok(conn, b"RETIRE ct/k 2") == b""
            assert ok(conn, b"DESTROY ct/k 1") == b""
            assert ok(conn, b"CREATE ct/plain") == b"1"
            before = {key: info(conn, key) for key in (b"ct/k", b"ct/plain")}
        assert daemon.stop() == 0
        daemon.start()
        with Conn(daemon.socket_path) as conn:
            after = {key: info(conn, key) for key in (b"ct/k", b"ct/plain")}
    assert after == before  # states, creation times, counters, period, exportable: all kept
    v1 = version_entry(after[b"ct/k"], 1)
    assert (v1["state"], v1["encryptions"], v1["decryptions"], v1["bytes"]) == (
        "destroyed",
        5,
        5,
        30,
    )
    assert version_entry(after[b"ct/k"], 3)["encryptions"] == 1
    assert after[b"ct/k"]["rotate_period"] == 90 * 86400


def test_counters_survive_sigkill_once_flushed(fast_daemon: Daemon) -> None:
    with Conn(fast_daemon.socket_path) as conn:
        assert ok(conn, b"CREATE kc/k") == b"1"
        ciphertext = b""
        for _ in range(7):
            ciphertext = enc(conn, b"kc/k", b"12345")
        dec(conn, b"kc/k", ciphertext)
        time.sleep(1.0)  # a flush has started since (every 0.5 s)
        assert ok(conn, b"CREATE kc/barrier") == b"1"  # queued behind that flush's write
    fast_daemon.stop(signal.SIGKILL)
    fast_daemon.start()
    with Conn(fast_daemon.socket_path) as conn:
        entry = version_entry(info(conn, b"kc/k"), 1)
    assert (entry["encryptions"], entry["decryptions"], entry["bytes"]) == (7, 1, 40)


# --------------------------------------------------------------------------- automatic rotation


def latest(socket_path: str, key_id: bytes) -> int:
    with Conn(socket_path) as conn:
        value = info(conn, key_id)["latest"]
    assert isinstance(value, int)
    return value


def test_automatic_rotation_config_and_its_persistence(fast_daemon: Daemon) -> None:
    path = fast_daemon.socket_path
    with Conn(path) as conn:
        assert ok(conn, b"CREATE ar/auto rotate=2s") == b"1"
        assert ok(conn, b"CREATE ar/later") == b"1"
        assert ok(conn, b"CREATE ar/hourly") == b"1"
        early = enc(conn, b"ar/auto", b"before rotation")
        assert info(conn, b"ar/auto")["rotate_period"] == 2
        assert info(conn, b"ar/later")["rotate_period"] is None
    wait_for(lambda: latest(path, b"ar/auto") >= 2, timeout=8.0, what="automatic rotation")
    with Conn(path) as conn:
        current = info(conn, b"ar/auto")["latest"]
        assert header_version(enc(conn, b"ar/auto", b"after")) >= current
        assert dec(conn, b"ar/auto", early) == b"before rotation"
        assert ok(conn, b"CONFIG ar/auto rotate=off") == b""
        stopped_at = info(conn, b"ar/auto")["latest"]
        assert info(conn, b"ar/auto")["rotate_period"] is None
        assert ok(conn, b"CONFIG ar/hourly rotate=1h") == b""
        # ar/later is already over 2 s old: due at once after this CONFIG
        assert latest(path, b"ar/later") == 1
        assert ok(conn, b"CONFIG ar/later rotate=2s") == b""
        assert err(conn, b"CONFIG ar/missing rotate=1h") == "NOT_FOUND"
    fast_daemon.restart()  # CONFIG persists; rotation resumes after the restart
    with Conn(path) as conn:
        assert info(conn, b"ar/auto")["rotate_period"] is None
        assert info(conn, b"ar/hourly")["rotate_period"] == 3600
        assert info(conn, b"ar/later")["rotate_period"] == 2
    wait_for(lambda: latest(path, b"ar/later") >= 2, timeout=8.0, what="rotation after CONFIG")
    time.sleep(1.0)
    assert latest(path, b"ar/auto") == stopped_at  # rotate=off held for 3+ s and a restart
    assert latest(path, b"ar/hourly") == 1


# --------------------------------------------------------------------------- ACL


def test_lifecycle_verbs_are_acl_operations(short_tmp: Path) -> None:
    daemon = make_store(short_tmp / "d")
    acl = short_tmp / "acl.toml"
    acl.write_text(
        acl_text(
            (["*"], ["create"]),
            (["a/*"], ["get"]),
            (["b/*"], ["retire", "enc"]),
            (["c/*"], ["restore", "destroy", "config", "rotate"]),
            (["d/*"], ["enc", "rewrap"]),
        )
    )
    daemon.extra_args = ["--acl", str(acl)]
    new_kek = short_tmp / "new-kek"
    new_kek.write_text("ab" * 32)
    some_ciphertext = b64(bytes([1, 0, 0, 0, 1]) + bytes(41))
    with running(daemon), Conn(daemon.socket_path) as conn:
        for key in (b"a/x", b"b/x", b"c/x", b"d/x"):
            assert ok(conn, b"CREATE " + key) == b"1"
        # Only `get` on a/*: every lifecycle verb is refused, existing key or not.
        for key in (b"a/x", b"a/none"):
            for line in (
                b"RETIRE %s 1" % key,
                b"RESTORE %s 1" % key,
                b"DESTROY %s 1" % key,
                b"CONFIG %s rotate=1d" % key,
                b"REWRAP %s %s" % (key, some_ciphertext),
                b"ROTATE %s" % key,
            ):
                assert err(conn, line) == "DENIED", line
        assert err(conn, b"REKEY file " + b64(str(new_kek).encode())) == "DENIED"
        assert sorted(path.name for path in daemon.store.glob("gen-*")) == ["gen-1"]
        # Each verb is its own operation.
        assert ok(conn, b"RETIRE b/x 1") == b""
        assert err(conn, b"ENC b/x " + b64(b"x")) == "RETIRED"  # the RETIRE took effect
        for line in (b"RESTORE b/x 1", b"DESTROY b/x 1", b"CONFIG b/x rotate=off"):
            assert err(conn, line) == "DENIED", line
        assert err(conn, b"REWRAP b/x " + some_ciphertext) == "DENIED"  # enc is not rewrap
        assert ok(conn, b"ROTATE c/x") == b"2"
        assert ok(conn, b"DESTROY c/x 1") == b""
        assert ok(conn, b"CONFIG c/x rotate=1d") == b""
        assert err(conn, b"RETIRE c/x 2") == "DENIED"
        ciphertext = enc(conn, b"d/x", b"payload")
        assert header_version(base64.b64decode(ok(conn, rewrap_line(b"d/x", ciphertext)))) == 1
        assert err(conn, b"RETIRE d/x 1") == "DENIED"


# --------------------------------------------------------------------------- races and crashes


@contextlib.contextmanager
def store_writes_held(daemon: Daemon) -> Iterator[None]:
    """Hold the store's write lock (``.write.lock``, as `kmsd backup` does): every write of
    the daemon waits in its worker thread until the block ends."""
    fd = os.open(daemon.store / WRITE_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_an_acknowledged_state_change_survives_a_concurrent_counter_flush(
    short_tmp: Path,
) -> None:
    """ENC (counters now dirty), then RETIRE, while the store's write lock is held (as by a
    backup): the RETIRE waits in its worker thread, and the periodic counter flush snapshots
    the key's state and queues behind it. The RETIRE is acknowledged first; the flush that
    lands after it must not write back the state from before. Same for DESTROY. A graceful
    restart shows what the disk holds."""
    daemon = make_store(short_tmp / "d")
    daemon.extra_args = ["--counter-flush-interval", "0.05"]
    with running(daemon):
        with Conn(daemon.socket_path) as conn:
            for key in (b"fl/retire", b"fl/destroy"):
                assert ok(conn, b"CREATE " + key) == b"1"
                assert ok(conn, b"ROTATE " + key) == b"2"
            for key, verb in ((b"fl/retire", b"RETIRE"), (b"fl/destroy", b"DESTROY")):
                with store_writes_held(daemon):
                    conn.sock.sendall(b"ENC %s %s\n%s %s 1\n" % (key, b64(b"x"), verb, key))
                    time.sleep(0.3)  # six flush intervals: the flush has its snapshot, waits
                assert code_of(conn.reply()) == "OK"
                assert conn.reply() == b"OK"
                time.sleep(0.3)  # the flush has landed
            assert version_entry(info(conn, b"fl/retire"), 1)["state"] == "retired"
            assert version_entry(info(conn, b"fl/destroy"), 1)["state"] == "destroyed"
        assert daemon.stop() == 0  # graceful: whatever is still dirty is flushed
        daemon.start()
        with Conn(daemon.socket_path) as conn:
            assert version_entry(info(conn, b"fl/retire"), 1)["state"] == "retired"
            assert version_entry(info(conn, b"fl/destroy"), 1)["state"] == "destroyed"


def test_a_destroy_interrupted_before_its_unlink_is_finished_when_the_key_is_read(
    daemon: Daemon,
) -> None:
    """DESTROY writes the state "destroyed" durably, then unlinks the sealed file. A crash
    between the two leaves the file (reproduced here exactly: SIGKILL, file put back).
    The daemon finishes the job the first time it reads the key, whatever the request:
    the material must not outlive an acknowledged crypto-shredding in the store, a rekey
    or a backup. Repeating DESTROY also removes it."""
    with Conn(daemon.socket_path) as conn:
        assert ok(conn, b"CREATE sh/k") == b"1"
        assert ok(conn, b"ROTATE sh/k") == b"2"
        assert ok(conn, b"CREATE sh/again") == b"1"
        assert ok(conn, b"ROTATE sh/again") == b"2"
    paths = [key_file(daemon, key_id, 1) for key_id in ("sh/k", "sh/again")]
    sealed = [path.read_bytes() for path in paths]
    with Conn(daemon.socket_path) as conn:
        assert ok(conn, b"DESTROY sh/k 1") == b""
        assert ok(conn, b"DESTROY sh/again 1") == b""
    daemon.stop(signal.SIGKILL)
    for path, data in zip(paths, sealed, strict=True):
        path.write_bytes(data)  # the unlink the crash prevented
        path.chmod(0o600)
    daemon.start()
    with Conn(daemon.socket_path) as conn:
        assert version_entry(info(conn, b"sh/k"), 1)["state"] == "destroyed"
        assert not paths[0].exists(), "the destroyed version's sealed material is still on disk"
        assert paths[1].exists()  # a key not read yet: the daemon lists keys lazily
        assert conn.ask(b"DESTROY sh/again 1") == b"OK"
    assert not paths[1].exists()


def test_a_deleted_state_file_is_damage_not_a_fresh_start(daemon: Daemon) -> None:
    """The state file holds every RETIRE: without it the key must not be served as new."""
    with Conn(daemon.socket_path) as conn:
        assert ok(conn, b"CREATE st/k") == b"1"
        ciphertext = enc(conn, b"st/k", b"old row")
        assert ok(conn, b"ROTATE st/k") == b"2"
        assert ok(conn, b"RETIRE st/k 1") == b""
        assert ok(conn, b"CREATE st/one") == b"1"  # one version, retired: the same
        assert ok(conn, b"RETIRE st/one 1") == b""
    daemon.stop()
    (key_file(daemon, "st/k", 1).parent / STATE_NAME).unlink()
    (key_file(daemon, "st/one", 1).parent / STATE_NAME).unlink()
    verified = kmsd("verify", "--store", daemon.store, "--kek-file", daemon.kek_file)
    assert verified.returncode == EXIT_DAMAGED
    assert b"state file missing" in verified.stdout + verified.stderr
    daemon.start()
    with Conn(daemon.socket_path) as conn:
        assert err(conn, dec_line(b"st/k", ciphertext)) == "INTERNAL"
        assert err(conn, b"INFO st/k") == "INTERNAL"
        assert err(conn, b"CREATE st/k") == "INTERNAL"  # damaged, never overwritten
        assert err(conn, b"ENC st/one " + b64(b"x")) == "INTERNAL"


def test_a_create_cut_short_leaves_nothing_a_new_create_cannot_replace(short_tmp: Path) -> None:
    """CREATE writes the rotation index, then the state (version 1 "creating"), then the
    version file (the commit), then the state again. What a crash before the commit
    leaves (reproduced here: the state sealed as a crash leaves it, the files after it
    removed) is no key for any verb, verify calls it no damage, and a new CREATE, even
    without the period, replaces it."""
    daemon = make_store(short_tmp / "d")
    daemon.extra_args = list(FAST_FLUSH)
    with running(daemon):
        with Conn(daemon.socket_path) as conn:
            assert ok(conn, b"CREATE cs/state-only rotate=1s") == b"1"
            assert ok(conn, b"CREATE cs/index-only rotate=1s") == b"1"
        daemon.stop(signal.SIGKILL)
        store = KeyStore(daemon.store, bytes.fromhex(daemon.kek_file.read_text()), clock=now)
        try:
            store.write_state("cs/state-only", KeyState({1: VersionUsage(state=CREATING)}))
        finally:
            store.close()
        key_file(daemon, "cs/state-only", 1).unlink()
        index_only = key_file(daemon, "cs/index-only", 1).parent
        for path in index_only.iterdir():
            path.unlink()
        index_only.rmdir()
        stale = live_generation(daemon.store) / ".tmp-1-rotation.seal-0123"
        stale.write_bytes(b"half a rotation index")
        verified = kmsd("verify", "--store", daemon.store, "--kek-file", daemon.kek_file)
        assert verified.returncode == 0, verified.stdout  # what a crash leaves is no damage
        daemon.start()
        assert not stale.exists()  # a temporary of a dead writer
        with Conn(daemon.socket_path) as conn:
            for line in (b"ENC cs/state-only " + b64(b"x"), b"INFO cs/state-only"):
                assert err(conn, line) == "NOT_FOUND"
            assert err(conn, b"RETIRE cs/state-only 1") == "NOT_FOUND"
            assert err(conn, b"ENC cs/index-only " + b64(b"x")) == "NOT_FOUND"
            assert ok(conn, b"CREATE cs/state-only") == b"1"
            assert ok(conn, b"CREATE cs/index-only") == b"1"
            time.sleep(2.5)  # past the period the cut-short CREATEs asked for
            for key_id in (b"cs/state-only", b"cs/index-only"):
                document = info(conn, key_id)
                assert document["latest"] == 1, document  # no period: never rotated
                assert document["rotate_period"] is None
                assert version_entry(document, 1)["state"] == "active"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_rotation_index_alone_holds_periods(short_tmp: Path) -> None:
    """CONFIG is one atomic write of the index: a crash leaves the old period or the new,
    never a key with one period in its state and another in the index."""
    daemon = make_store(short_tmp / "d")
    with running(daemon), Conn(daemon.socket_path) as conn:
        assert ok(conn, b"CREATE rv/k rotate=20s") == b"1"
        state_file = key_file(daemon, "rv/k", 1).parent / STATE_NAME
        before = state_file.read_bytes()
        assert ok(conn, b"CONFIG rv/k rotate=1h") == b""
        assert state_file.read_bytes() == before  # not written
        assert info(conn, b"rv/k")["rotate_period"] == 3600
    with running(daemon), Conn(daemon.socket_path) as conn:
        assert info(conn, b"rv/k")["rotate_period"] == 3600
    verified = kmsd("verify", "--store", daemon.store, "--kek-file", daemon.kek_file)
    assert verified.returncode == 0, verified.stdout


def latest_of(conn: Conn, key_id: bytes) -> int:
    value = info(conn, key_id)["latest"]
    assert isinstance(value, int)
    return value


def test_config_rotate_off_stops_a_rotation_already_due(short_tmp: Path) -> None:
    """Keys a and b fall due together. The rotation task starts on a and waits for the store
    write lock (held by the test, as a backup would); meanwhile CONFIG b rotate=off is sent.
    Once the lock is free, a rotates and the CONFIG is acknowledged: b must not rotate now."""
    daemon = make_store(short_tmp / "d")
    daemon.extra_args = ["--rotation-check-interval", "0.05"]
    with running(daemon), Conn(daemon.socket_path) as conn:
        a, b = created_in_one_second(conn)  # so both are due at the same check
        with store_writes_held(daemon):
            time.sleep(1.5)  # both are due; the rotation task waits for the lock on a
            conn.sock.sendall(b"CONFIG " + b + b" rotate=off\n")
            time.sleep(1.0)  # the CONFIG queues behind the same lock
        assert conn.reply() == b"OK"
        time.sleep(0.5)
        assert latest_of(conn, a) >= 2  # the rotation task was indeed under way
        assert latest_of(conn, b) == 1, "rotated after CONFIG rotate=off was acknowledged"


def created_in_one_second(conn: Conn) -> tuple[bytes, bytes]:
    """Create two keys with a 1 s period whose creation times (whole seconds) are equal.

    Both CREATEs are sent early in a wall-clock second; a slow fsync can still push the
    second into the next one, and then another pair is made.
    """
    for attempt in range(5):
        a, b = b"due/a%d" % attempt, b"due/b%d" % attempt
        while time.time() % 1 > 0.2:
            time.sleep(0.01)
        conn.sock.sendall(b"CREATE " + a + b" rotate=1s\nCREATE " + b + b" rotate=1s\n")
        assert [conn.reply(), conn.reply()] == [b"OK 1", b"OK 1"]
        if version_entry(info(conn, a), 1)["created"] == version_entry(info(conn, b), 1)["created"]:
            return a, b
        for key in (a, b):  # out of the way of the test
            assert ok(conn, b"CONFIG " + key + b" rotate=off") == b""
    raise AssertionError("no two CREATEs finished within one wall-clock second")
