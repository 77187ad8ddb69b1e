# Memory hygiene of a live daemon (no core dumps, locked memory, undumpable) and of the key
# objects in process: no key bytes in any repr, cached material zeroed on close and eviction.
from __future__ import annotations

import base64
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms_client.errors import InternalError
from kms_client.protocol import DataKey, Decrypt, Encrypt, KeyMaterial, Ok, Rewrap
from kms_server.config import Settings
from kms_server.crypto import XAES256GCM
from kms_server.kek import KekFile
from kms_server.keys import KeyVersion
from kms_server.store import KeyStore
from tests.conftest import Daemon, make_store
from tests.users import ask, running, yama_restricts_attach

SECRET = b"kmst-key-material-0123456789abcd"  # 32 printable bytes: visible if ever printed
assert len(SECRET) == 32


def proc_status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def kib(value: str) -> int:
    number, unit = value.split()
    assert unit == "kB"
    return int(number)


# --------------------------------------------------------------------------- live daemon


def test_core_dumps_are_off(daemon: Daemon) -> None:
    assert daemon.process is not None
    assert core_limit(daemon.process.pid) == ("0", "0")


def core_limit(pid: int) -> tuple[str, ...]:
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max core file size\s+(\S+)\s+(\S+)", limits, re.MULTILINE)
    assert match, limits
    return match.groups()


def test_an_offline_command_holding_the_kek_forbids_core_dumps(tmp_path: Path) -> None:
    """`kmsd init` (and `rekey`, `verify`) hold the KEK too: no core file may catch it,
    even when the shell that started them allowed core dumps."""
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("the hard core-size limit is 0 here: nothing to forbid")
    started, gate = tmp_path / "started", tmp_path / "go"
    command = tmp_path / "passphrase"
    command.write_text(
        f"#!/bin/sh\ntouch {started}\n"
        f"while [ ! -e {gate} ]; do sleep 0.05; done\necho correct horse battery\n"
    )
    command.chmod(0o700)
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    allowed = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    init = ["init", "--store", str(tmp_path / "store"), "--passphrase-command", str(command)]
    process = subprocess.Popen(
        ["prlimit", f"--core={allowed}", sys.executable, "-m", "kms_server", *init],
        stdout=subprocess.DEVNULL,
    )
    try:
        while not started.exists():  # the KEK is on its way: main() has run
            assert process.poll() is None, "kmsd init stopped before it asked for the KEK"
            time.sleep(0.05)
        assert core_limit(process.pid) == ("0", "0")
    finally:
        gate.touch()
        assert process.wait(timeout=60) == 0


def may_lock_all_memory() -> bool:
    """CAP_IPC_LOCK (root, unless a container dropped it) or an unlimited RLIMIT_MEMLOCK."""
    cap_ipc_lock = 14
    if int(proc_status(os.getpid(), "CapEff"), 16) >> cap_ipc_lock & 1:
        return True
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] == resource.RLIM_INFINITY


def test_memory_is_locked_now_and_in_future(daemon: Daemon) -> None:
    if not may_lock_all_memory():
        pytest.skip(
            "no CAP_IPC_LOCK and a finite RLIMIT_MEMLOCK: mlockall is refused by design "
            "(run as root with CAP_IPC_LOCK, or with `ulimit -l unlimited`)"
        )
    assert daemon.process is not None
    pid = daemon.process.pid
    assert kib(proc_status(pid, "VmLck")) > 0
    for number in range(10):  # worker threads and new keys map new memory after start
        assert ask(daemon.socket_path, f"CREATE k{number}".encode()) == b"OK 1"
    locked, size = kib(proc_status(pid, "VmLck")), kib(proc_status(pid, "VmSize"))
    assert locked >= 0.9 * size, (locked, size)


PROBE = """
import sys
results = []
for name in ("environ", "mem"):
    try:
        with open(f"/proc/{sys.argv[1]}/{name}", "rb"):
            results.append("readable")
    except PermissionError:
        results.append("PermissionError")
print(" ".join(results))
"""
#: uid 0 without a single capability: like any same-uid process, it may read the
#: /proc/<pid>/environ and mem of a dumpable process of its uid, and not those of an
#: undumpable one (CAP_SYS_PTRACE would be needed).
NO_CAPABILITIES = ["--bounding-set=-all", "--inh-caps=-all", "--"]


@pytest.fixture
def capless_root() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("runs processes as uid 0 without capabilities: needs root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return [setpriv, *NO_CAPABILITIES]


def probe(prefix: list[str], pid: int) -> str:
    result = subprocess.run(
        [*prefix, sys.executable, "-c", PROBE, str(pid)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_daemon_is_not_dumpable(short_tmp: Path, capless_root: list[str]) -> None:
    class CaplessDaemon(Daemon):
        def command(self) -> list[str]:
            return [*capless_root, *super().command()]

    control = subprocess.Popen([*capless_root, "sleep", "30"])
    try:
        with running(CaplessDaemon(make_store(short_tmp / "d").root)) as daemon:
            assert daemon.process is not None
            assert proc_status(daemon.process.pid, "CapEff") == "0000000000000000"
            # Same uid, same (no) capabilities: only dumpability tells the two apart.
            readable = (
                "readable PermissionError" if yama_restricts_attach() else "readable readable"
            )
            assert probe(capless_root, control.pid) == readable
            assert probe(capless_root, daemon.process.pid) == "PermissionError PermissionError"
            # Without CAP_IPC_LOCK mlockall may be refused: a warning, and the daemon serves.
            assert ask(daemon.socket_path, b"CREATE k") == b"OK 1"
    finally:
        control.kill()
        control.wait()


# --------------------------------------------------------------------------- repr


def spellings(secret: bytes) -> list[str]:
    encoded = [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret),
        repr(bytearray(secret)),
    ]
    for offset in (1, 2):
        part = secret[offset:]
        encoded.append(base64.b64encode(part[: len(part) // 3 * 3]).decode())
    if secret.isascii():
        encoded.append(secret.decode())
    return encoded


def assert_hidden(text: str, *secrets: bytes) -> None:
    for secret in secrets:
        for spelling in spellings(secret):
            assert spelling not in text, f"{spelling!r} appears in {text!r}"


@pytest.mark.parametrize("secret", [SECRET, bytes(range(200, 232))], ids=["printable", "binary"])
def test_reprs_of_key_holding_objects_show_no_key_bytes(secret: bytes) -> None:
    version = KeyVersion("pg/db1", 3, "2026-01-01T00:00:00Z", True, bytearray(secret))
    objects: list[object] = [
        version,
        XAES256GCM(secret),
        KeyMaterial(3, secret),
        DataKey(secret, b"wrapped"),
        Encrypt("pg/db1", secret, secret[::-1]),
        Decrypt("pg/db1", b"\x01" + bytes(45), secret),
        Decrypt("pg/db1", secret),  # a ciphertext is request data too
        Rewrap("pg/db1", secret),
        Ok(("3", base64.b64encode(secret).decode())),  # a GET reply as the client parsed it
    ]
    for thing in objects:
        assert_hidden(repr(thing), secret, secret[::-1])
        assert_hidden(str(thing), secret, secret[::-1])
    assert "pg/db1" in repr(version)  # the repr still says which key it is


def test_settings_repr_hides_a_passphrase_command() -> None:
    """A command line may carry the passphrase itself (``echo ...``), so it is never shown."""
    settings = Settings(passphrase_command="echo correct-horse-battery")  # noqa: S106
    assert "correct-horse" not in repr(settings)
    assert "correct-horse" not in str(settings)


@pytest.fixture
def store(short_tmp: Path) -> Iterator[tuple[KeyStore, bytes]]:
    daemon = make_store(short_tmp / "d")
    kek = KekFile(daemon.kek_file).obtain({"kind": "file"})
    opened = KeyStore(daemon.store, kek, clock=lambda: "2026-01-01T00:00:00Z", cache_keys=2)
    try:
        yield opened, bytes(kek)
    finally:
        opened.close()


def test_repr_of_a_key_store_shows_neither_kek_nor_cached_keys(
    store: tuple[KeyStore, bytes],
) -> None:
    keys, kek = store
    version = keys.write_version("a", 1, exportable=True)
    keys.add(version)
    material = bytes(keys.version("a").material)
    text = repr(keys)
    assert_hidden(text, kek, material)
    assert_hidden(repr(keys.record("a")), kek, material)


def test_close_wipes_every_cached_key(store: tuple[KeyStore, bytes]) -> None:
    keys, _ = store
    for key_id in ("a", "b"):
        keys.add(keys.write_version(key_id, 1, exportable=False))
    cached = [keys.version("a"), keys.version("b")]
    buffers = [version.material for version in cached]
    assert all(any(buffer) for buffer in buffers)
    ciphertext = cached[0].encrypt(b"x", b"")
    keys.close()
    assert all(buffer == bytearray(32) for buffer in buffers)
    with pytest.raises(InternalError):  # a wiped version cannot be used by mistake
        cached[0].decrypt(ciphertext, b"")


def test_eviction_wipes_the_evicted_key(store: tuple[KeyStore, bytes]) -> None:
    keys, _ = store  # the cache holds 2 keys
    keys.add(keys.write_version("a", 1, exportable=False))
    evicted = keys.version("a")
    buffer = evicted.material
    assert any(buffer)
    for key_id in ("b", "c"):
        keys.add(keys.write_version(key_id, 1, exportable=False))
    assert buffer == bytearray(32)
    again = keys.version("a")  # reopened from disk: a fresh buffer
    assert again is not evicted
    assert any(again.material)
