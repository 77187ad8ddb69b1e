# `kmsd backup`, `kmsd restore` and `kmsd verify` on real stores: a snapshot taken while the
# daemon serves (and rotates), restored and served again; verify against each kind of damage.
"""Issue 4, section 3.

The backup is taken by the real ``kmsd backup`` while a thread keeps rotating a
key through the running daemon; the restored store is served by a new daemon
and must decrypt every ciphertext made before and return every exported key
version unchanged. ``kmsd verify`` must exit 6 and name exactly the damaged
key for a flipped byte, a truncated file, swapped version files, a file copied
from another key, a missing version (the latest included) and a damaged state
file.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from kms_server.store import (
    KEYS_DIR,
    LIVE_LINK,
    METADATA_NAME,
    RESTORING_MARK,
    ROTATION_NAME,
    STATE_NAME,
)
from tests.conftest import Daemon, assert_fails, kmsd, kmsd_all, make_store
from tests.test_rekey import (
    EXIT_OK,
    EXIT_STORE,
    Sample,
    check_via_socket,
    populate,
    write_kek,
)
from tests.users import Conn, b64, code_of, running

EXIT_DAMAGED = 6


@pytest.fixture
def stopped(short_tmp: Path) -> Iterator[Daemon]:
    """A daemon over an empty store, not started; killed after the test if left running."""
    daemon = make_store(short_tmp / "d")
    try:
        yield daemon
    finally:
        daemon.discard()


def get(conn: Conn, key_id: str, version: int) -> bytes:
    reply = conn.ask(f"GET {key_id} {version}".encode())
    assert code_of(reply) == "OK", (key_id, version, reply)
    number, material = reply[3:].split(b" ")
    assert int(number) == version
    return base64.b64decode(material)


def latest(conn: Conn, key_id: str) -> int:
    reply = conn.ask(f"INFO {key_id}".encode())
    assert code_of(reply) == "OK", reply
    value = json.loads(reply[3:])["latest"]
    assert isinstance(value, int)
    return value


def exportable_keys(socket_path: str, keys: int, versions: int) -> dict[tuple[str, int], bytes]:
    """Exportable keys with several versions; returns every version's material (by GET)."""
    materials = {}
    with Conn(socket_path) as conn:
        for key in range(keys):
            key_id = f"exp/k{key}"
            assert conn.ask(f"CREATE {key_id} exportable".encode()) == b"OK 1"
            for version in range(2, versions + 1):
                assert conn.ask(f"ROTATE {key_id}".encode()) == f"OK {version}".encode()
            for version in range(1, versions + 1):
                materials[key_id, version] = get(conn, key_id, version)
    return materials


@dataclass
class Rotator:
    """A thread that ROTATEs one exportable key (and DECs a ciphertext) until stopped."""

    socket_path: str
    key_id: str
    sample: Sample
    replies: list[tuple[float, int]]
    failures: list[bytes]
    stop: threading.Event

    def run(self) -> None:
        with Conn(self.socket_path) as conn:
            while not self.stop.is_set():
                reply = conn.ask(f"ROTATE {self.key_id}".encode())
                if code_of(reply) != "OK":
                    self.failures.append(reply)
                    return
                self.replies.append((time.monotonic(), int(reply[3:])))
                reply = conn.ask(self.sample.dec_line())
                if code_of(reply) != "OK":
                    self.failures.append(reply)
                    return
                time.sleep(0.005)


def test_backup_while_serving_restore_and_serve_again(stopped: Daemon, short_tmp: Path) -> None:
    daemon = stopped
    archive = short_tmp / "kms.backup"
    with running(daemon):
        samples = populate(daemon.socket_path, 10, 3, prefix="bk")
        materials = exportable_keys(daemon.socket_path, 4, 3)
        with Conn(daemon.socket_path) as conn:
            assert conn.ask(b"CREATE busy/k exportable") == b"OK 1"
            assert conn.ask(b"RETIRE bk/k0 1") == b"OK"
            assert conn.ask(b"CONFIG bk/k1 rotate=30d") == b"OK"
        samples = [
            replace(s, state="retired") if (s.key_id, s.version) == ("bk/k0", 1) else s
            for s in samples
        ]

        rotator = Rotator(daemon.socket_path, "busy/k", samples[-1], [], [], threading.Event())
        thread = threading.Thread(target=rotator.run)
        thread.start()
        try:
            while len(rotator.replies) < 3 and thread.is_alive():
                time.sleep(0.01)
            began = time.monotonic()
            result = kmsd("backup", "--store", daemon.store, "--out", archive)
            ended = time.monotonic()
            while rotator.replies[-1][0] <= ended and thread.is_alive():
                time.sleep(0.01)  # the daemon still writes after the backup
        finally:
            rotator.stop.set()
            thread.join()
        assert result.returncode == EXIT_OK, result.stderr
        assert rotator.failures == []
        lowest = max(version for at, version in rotator.replies if at < began)
        highest = min(version for at, version in rotator.replies if at > ended)
        with Conn(daemon.socket_path) as conn:
            for version in range(1, rotator.replies[-1][1] + 1):
                materials["busy/k", version] = get(conn, "busy/k", version)
        kek_text = daemon.kek_file.read_bytes()

    # The archive is private and sealed: no exported key material, no KEK, in any encoding.
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    data = archive.read_bytes()
    kek = bytes.fromhex(kek_text.decode().strip())
    for secret in [*materials.values(), kek]:
        for encoded in (secret, base64.b64encode(secret), secret.hex().encode()):
            assert encoded not in data
    with tarfile.open(archive) as tar:
        assert all(member.isfile() or member.isdir() for member in tar.getmembers())

    # Restore into an empty directory, serve it with the same KEK: everything is there.
    restored = Daemon(short_tmp / "r")
    restored.store.mkdir(mode=0o700, parents=True)
    restored.kek_file.write_bytes(kek_text)
    result = kmsd("restore", "--in", archive, "--store", restored.store)
    assert result.returncode == EXIT_OK, result.stderr
    assert stat.S_IMODE(restored.store.stat().st_mode) == 0o700
    assert (restored.store / LIVE_LINK).is_symlink()
    assert (
        kmsd("verify", "--store", restored.store, "--kek-file", restored.kek_file).returncode == 0
    )
    with running(restored):
        check_via_socket(restored.socket_path, samples)  # the retired version stays retired
        with Conn(restored.socket_path) as conn:
            busy_latest = latest(conn, "busy/k")
            assert lowest <= busy_latest <= highest  # a snapshot from within the backup
            for (key_id, version), material in materials.items():
                if key_id != "busy/k" or version <= busy_latest:
                    assert get(conn, key_id, version) == material, (key_id, version)
            assert code_of(conn.ask(f"GET busy/k {busy_latest + 1}".encode())) == "NOT_FOUND"
            rotating = json.loads(conn.ask(b"INFO bk/k1")[3:])
            assert rotating["rotate_period"] == 30 * 86400  # its state file came along
    assert (restored.store / LIVE_LINK / ROTATION_NAME).is_file()  # and the rotation index


def backed_up(daemon: Daemon, archive: Path) -> Path:
    """A backup of ``daemon``'s store, holding two keys of two versions."""
    with running(daemon):
        populate(daemon.socket_path, 2, 2)
    assert kmsd("backup", "--store", daemon.store, "--out", archive).returncode == EXIT_OK
    return archive


def test_restore_refuses_a_non_empty_directory_and_bad_archives(
    stopped: Daemon, short_tmp: Path
) -> None:
    daemon = stopped
    archive = backed_up(daemon, short_tmp / "kms.backup")

    occupied = short_tmp / "occupied"
    occupied.mkdir(mode=0o700)
    (occupied / "precious").write_bytes(b"keep me")
    empty = short_tmp / "empty"
    empty.mkdir(mode=0o755)
    garbage = short_tmp / "garbage.backup"
    garbage.write_bytes(b"this is not a tar archive" * 40)
    escaping = short_tmp / "escaping.backup"
    metadata = (daemon.store / LIVE_LINK / METADATA_NAME).read_bytes()
    good = {f"kms-backup/{METADATA_NAME}": metadata}
    escaping.write_bytes(tar_with(good | {"kms-backup/../../escaped": b"x"}))
    linking = short_tmp / "linking.backup"
    linking.write_bytes(tar_with(good, symlinks={"kms-backup/keys/x/_v1.key": "/etc/passwd"}))
    results = kmsd_all(
        ["restore", "--in", archive, "--store", occupied],
        ["restore", "--in", archive, "--store", daemon.store],  # an existing store
        ["restore", "--in", garbage, "--store", short_tmp / "g"],
        ["restore", "--in", escaping, "--store", short_tmp / "e"],
        ["restore", "--in", linking, "--store", short_tmp / "l"],
        ["restore", "--in", short_tmp / "missing.backup", "--store", short_tmp / "m"],
        ["restore", "--in", archive, "--store", empty],
    )
    assert [result.returncode for result in results] == [EXIT_STORE] * 6 + [EXIT_OK]
    for refused in results[:6]:
        assert refused.stderr.count(b"\n") == 1, refused.stderr  # one line each
    assert sorted(os.listdir(occupied)) == ["precious"]
    assert (occupied / "precious").read_bytes() == b"keep me"
    assert not (short_tmp / "escaped").exists()
    assert not (short_tmp.parent / "escaped").exists()
    assert stat.S_IMODE(empty.stat().st_mode) == 0o700
    assert kmsd("verify", "--store", empty, "--kek-file", daemon.kek_file).returncode == EXIT_OK
    # Useless without the KEK.
    other = write_kek(short_tmp / "other-kek")
    assert kmsd("verify", "--store", empty, "--kek-file", other).returncode == EXIT_STORE


def test_a_restore_cut_short_can_be_run_again(stopped: Daemon, short_tmp: Path) -> None:
    """A restore killed part way (reproduced by what it leaves: its mark, part of a
    generation, no `live`) is emptied and done again; a store without `live` and
    without the mark is someone's damaged store, and is left alone."""
    daemon = stopped
    archive = backed_up(daemon, short_tmp / "kms.backup")
    cut_short = short_tmp / "cut-short"
    (cut_short / "gen-1" / "keys").mkdir(mode=0o700, parents=True)
    (cut_short / "gen-1" / METADATA_NAME).write_bytes(b"half of it")
    (cut_short / RESTORING_MARK).write_bytes(b"")
    damaged = short_tmp / "damaged"
    (damaged / "gen-1").mkdir(mode=0o700, parents=True)
    results = kmsd_all(
        ["restore", "--in", archive, "--store", cut_short],
        ["restore", "--in", archive, "--store", damaged],
    )
    assert [result.returncode for result in results] == [EXIT_OK, EXIT_STORE]
    assert sorted(os.listdir(cut_short)) == ["gen-1", "live"]  # and no mark left
    assert kmsd("verify", "--store", cut_short, "--kek-file", daemon.kek_file).returncode == 0
    assert os.listdir(damaged) == ["gen-1"]
    # Cut short after `live`, before its mark was removed: no store yet, for any command.
    (cut_short / RESTORING_MARK).write_bytes(b"")
    verified = kmsd("verify", "--store", cut_short, "--kek-file", daemon.kek_file)
    assert_fails(verified, EXIT_STORE)
    assert kmsd("restore", "--in", archive, "--store", cut_short).returncode == EXIT_OK
    assert kmsd("verify", "--store", cut_short, "--kek-file", daemon.kek_file).returncode == 0


def test_a_restore_into_a_directory_another_restore_holds_is_refused(
    stopped: Daemon, short_tmp: Path
) -> None:
    """Another restore under way holds the directory's flock (held here, as it would
    be): its mark must not be taken for a cut-short restore's and emptied."""
    archive = backed_up(stopped, short_tmp / "kms.backup")
    target = short_tmp / "target"
    (target / "gen-1").mkdir(mode=0o700, parents=True)
    (target / "gen-1" / METADATA_NAME).write_bytes(b"being written")
    (target / RESTORING_MARK).write_bytes(b"")
    held = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = kmsd("restore", "--in", archive, "--store", target)
        assert_fails(result, EXIT_STORE)
        assert b"another restore" in result.stderr
        assert (target / "gen-1" / METADATA_NAME).read_bytes() == b"being written"
    finally:
        os.close(held)
    assert kmsd("restore", "--in", archive, "--store", target).returncode == EXIT_OK
    assert kmsd("verify", "--store", target, "--kek-file", stopped.kek_file).returncode == 0


def tar_with(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


# --------------------------------------------------------------------------- verify


def verify_report(result_stdout: bytes) -> tuple[set[str], set[str]]:
    """The key ids `kmsd verify` reported ok and DAMAGED."""
    good, damaged = set(), set()
    for line in result_stdout.decode().splitlines():
        if line.startswith("ok "):
            good.add(line[3:].strip().rsplit(" (", 1)[0])  # "ok  <key-id> (<n> versions)"
        elif line.startswith("DAMAGED "):
            damaged.add(line.removeprefix("DAMAGED ").split(": ", 1)[0])  # "<key-id>: why"
    return good, damaged


def key_dir(store: Path, key_id: str) -> Path:
    return store.joinpath(LIVE_LINK, KEYS_DIR, *key_id.split("/"))


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def swap(first: Path, second: Path) -> None:
    temporary = first.with_name("swap")
    first.rename(temporary)
    second.rename(first)
    temporary.rename(second)


KEYS = [f"v/k{n}" for n in range(9)]
Damage = Callable[[Path], object]
#: Damage to one store copy, and the one key it must be reported under.
DAMAGES: dict[str, tuple[Damage, str]] = {
    "flipped-byte": (lambda s: flip_middle_byte(key_dir(s, "v/k0") / "_v2.key"), "v/k0"),
    "truncated": (lambda s: truncate(key_dir(s, "v/k1") / "_v1.key"), "v/k1"),
    "emptied": (lambda s: (key_dir(s, "v/k2") / "_v3.key").write_bytes(b""), "v/k2"),
    "swapped-versions": (
        lambda s: swap(key_dir(s, "v/k3") / "_v1.key", key_dir(s, "v/k3") / "_v2.key"),
        "v/k3",
    ),
    "copied-from-another-key": (
        lambda s: shutil.copyfile(key_dir(s, "v/k0") / "_v1.key", key_dir(s, "v/k4") / "_v1.key"),
        "v/k4",
    ),
    "missing-version": (lambda s: (key_dir(s, "v/k5") / "_v2.key").unlink(), "v/k5"),
    "missing-latest": (lambda s: (key_dir(s, "v/k6") / "_v3.key").unlink(), "v/k6"),
    "damaged-state": (lambda s: flip_middle_byte(key_dir(s, "v/k7") / STATE_NAME), "v/k7"),
    "state-from-another-key": (
        lambda s: shutil.copyfile(key_dir(s, "v/k0") / STATE_NAME, key_dir(s, "v/k8") / STATE_NAME),
        "v/k8",
    ),
    "damaged-rotation-index": (
        lambda s: flip_middle_byte(s / LIVE_LINK / ROTATION_NAME),
        "(rotation index)",
    ),
}


def test_verify_finds_each_kind_of_damage_and_names_the_key(
    stopped: Daemon, short_tmp: Path
) -> None:
    daemon = stopped
    with running(daemon), Conn(daemon.socket_path) as conn:
        for key_id in KEYS:
            assert conn.ask(f"CREATE {key_id}".encode()) == b"OK 1"
            assert conn.ask(f"ROTATE {key_id}".encode()) == b"OK 2"
            assert conn.ask(f"ROTATE {key_id}".encode()) == b"OK 3"
            assert code_of(conn.ask(f"ENC {key_id} ".encode() + b64(b"x"))) == "OK"
        assert conn.ask(b"CONFIG v/k0 rotate=1d") == b"OK"
        assert conn.ask(b"DESTROY v/k8 1") == b"OK"  # a destroyed version is no damage

    copies = {}
    for name, (damage, _) in DAMAGES.items():
        copy = short_tmp / f"copy-{name}"
        shutil.copytree(daemon.store, copy, symlinks=True)
        damage(copy)
        copies[name] = copy
    kek = ["--kek-file", daemon.kek_file]
    clean, *damaged_runs = kmsd_all(
        ["verify", "--store", daemon.store, *kek],
        *(["verify", "--store", copy, *kek] for copy in copies.values()),
    )
    assert clean.returncode == EXIT_OK, clean.stdout
    good, bad = verify_report(clean.stdout)
    assert (good, bad) == ({*KEYS, "(rotation index)"}, set())
    for (name, (_, culprit)), result in zip(DAMAGES.items(), damaged_runs, strict=True):
        assert result.returncode == EXIT_DAMAGED, (name, result.stdout, result.stderr)
        good, bad = verify_report(result.stdout)
        assert bad == {culprit}, (name, result.stdout)
        assert good == {*KEYS, "(rotation index)"} - {culprit}, (name, result.stdout)


def test_verify_refuses_a_wrong_kek_and_damaged_metadata(stopped: Daemon, short_tmp: Path) -> None:
    daemon = stopped
    with running(daemon):
        populate(daemon.socket_path, 2, 2)
    wrong = write_kek(short_tmp / "wrong-kek")
    broken = short_tmp / "broken"
    shutil.copytree(daemon.store, broken, symlinks=True)
    (broken / LIVE_LINK / METADATA_NAME).write_bytes(b"{")
    misplaced = short_tmp / "misplaced"
    shutil.copytree(daemon.store, misplaced, symlinks=True)
    metadata_path = misplaced / LIVE_LINK / METADATA_NAME
    metadata = json.loads(metadata_path.read_text())
    metadata["generation"] += 1  # names a generation directory it is not in
    metadata_path.write_text(json.dumps(metadata))
    results = kmsd_all(
        ["verify", "--store", daemon.store, "--kek-file", wrong],
        ["verify", "--store", short_tmp / "nothing", "--kek-file", daemon.kek_file],
        ["verify", "--store", broken, "--kek-file", daemon.kek_file],
        ["verify", "--store", misplaced, "--kek-file", daemon.kek_file],
        ["serve", "--store", misplaced, "--kek-file", daemon.kek_file, "--socket", short_tmp / "s"],
    )
    codes = [result.returncode for result in results]
    assert codes == [EXIT_STORE, EXIT_STORE, EXIT_DAMAGED, EXIT_DAMAGED, EXIT_STORE]
    assert b"DAMAGED (metadata)" in results[2].stdout


def test_a_missing_store_is_a_store_error(stopped: Daemon, short_tmp: Path) -> None:
    """Exit 3 is "store error (missing, damaged, locked, wrong KEK)", for every command."""
    archive = short_tmp / "kms.backup"
    assert kmsd("backup", "--store", stopped.store, "--out", archive).returncode == EXIT_OK
    a_file = short_tmp / "a-file"
    a_file.write_bytes(b"not a directory")
    results = kmsd_all(
        ["backup", "--store", short_tmp / "nothing", "--out", short_tmp / "out.backup"],
        ["restore", "--in", archive, "--store", a_file],
        ["verify", "--store", short_tmp / "nothing", "--kek-file", stopped.kek_file],
    )
    assert [result.returncode for result in results] == [EXIT_STORE] * 3, [
        result.stderr for result in results
    ]
    assert not (short_tmp / "out.backup").exists()
    assert a_file.read_bytes() == b"not a directory"


def test_a_backup_that_cannot_be_written_names_its_file(stopped: Daemon, short_tmp: Path) -> None:
    out = short_tmp / "absent" / "kms.backup"  # as unwritable as a full disk, and safe here
    result = kmsd("backup", "--store", stopped.store, "--out", out)
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode().strip() == f"kmsd: error: No such file or directory: {out}"
