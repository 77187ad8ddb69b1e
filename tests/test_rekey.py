# KEK rotation (`kmsd rekey`): offline between KEK kinds, online through a serving daemon,
# --repair, and the crash tests: SIGKILL of `kmsd rekey` at 50 random instants, of the daemon too.
"""Issue 4, section 2, on real stores with real ``kmsd`` subprocesses.

Data is encrypted through a live daemon before each rekey and decrypted after
it, so "every key version survives" is checked end to end, not by comparing
files. After a SIGKILL the store must open with exactly one of the two KEKs, and
no ``.tmp-*``, ``.live-*`` or non-live ``gen-*`` entry may remain after the
next open or ``kmsd rekey --repair``.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import trio

from kms_client.errors import Retired
from kms_server import maintenance
from kms_server.crypto import random_bytes
from kms_server.kek import KekFile
from kms_server.maintenance import verify
from kms_server.store import (
    KEYS_DIR,
    LIVE_LINK,
    LOCK_NAME,
    WRITE_LOCK_NAME,
    KeyStore,
    StoreError,
    init_store,
    read_metadata,
    switch_live,
)
from tests.conftest import KMSD, Daemon, kmsd, kmsd_all, make_store
from tests.users import Conn, b64, code_of, running

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_KEK = 4

# --------------------------------------------------------------------------- helpers


def python_command(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


def passphrase(words: str) -> str:
    """A passphrase command printing ``words`` (the KEK is Argon2id of it: ~0.2 s)."""
    return python_command(f"print({words!r})")


def write_kek(path: Path) -> Path:
    path.write_text(random_bytes(32).hex() + "\n")
    path.chmod(0o600)
    return path


def file_kek(path: Path) -> bytearray:
    return KekFile(path).obtain({"kind": "file"})


def kek_args(source: Path | str, prefix: str = "") -> list[str]:
    """``--[prefix]kek-file F`` for a path, ``--[prefix]passphrase-command C`` for a command."""
    if isinstance(source, Path):
        return [f"--{prefix}kek-file", str(source)]
    return [f"--{prefix}passphrase-command", source]


@dataclass
class KekDaemon(Daemon):
    """A daemon whose KEK source may be a file or a passphrase command."""

    source: Path | str | None = None

    def kek_arguments(self) -> list[str]:
        return kek_args(self.source if self.source is not None else self.kek_file)


def new_daemon(root: Path) -> KekDaemon:
    made = make_store(root)
    return KekDaemon(made.root)


def serve_exit_code(daemon: Daemon, source: Path | str) -> int:
    """`kmsd serve` with ``source``, expected to refuse at start-up: its exit code."""
    result = kmsd(
        "serve",
        "--store",
        daemon.store,
        "--socket",
        daemon.socket_path,
        *kek_args(source),
        timeout=20.0,
    )
    assert not Path(daemon.socket_path).exists()
    return result.returncode


def verify_codes(store: Path, *sources: Path | str) -> list[int]:
    """`kmsd verify` exit codes with each KEK source, run side by side."""
    runs = kmsd_all(*(["verify", "--store", store, *kek_args(source)] for source in sources))
    return [result.returncode for result in runs]


@dataclass(frozen=True)
class Sample:
    """One ciphertext made through the daemon, and what it must decrypt to."""

    key_id: str
    version: int
    plaintext: bytes = field(repr=False)
    aad: bytes
    ciphertext: bytes = field(repr=False)
    state: str = "active"

    def dec_line(self) -> bytes:
        line = b"DEC " + self.key_id.encode() + b" " + b64(self.ciphertext)
        return line + (b" " + b64(self.aad) if self.aad else b"")


def populate(socket_path: str, keys: int, versions: int, prefix: str = "rk") -> list[Sample]:
    """``keys`` keys of ``versions`` versions, one ciphertext under each version."""
    samples = []
    with Conn(socket_path) as conn:
        for key in range(keys):
            key_id = f"{prefix}/k{key}"
            assert conn.ask(f"CREATE {key_id}".encode()) == b"OK 1"
            for version in range(1, versions + 1):
                if version > 1:
                    assert conn.ask(f"ROTATE {key_id}".encode()) == f"OK {version}".encode()
                plaintext = random_bytes(1 + (key * 7 + version) % 40)
                aad = f"row={key}.{version}".encode() if version % 2 else b""
                line = f"ENC {key_id} ".encode() + b64(plaintext)
                reply = conn.ask(line + (b" " + b64(aad) if aad else b""))
                assert code_of(reply) == "OK", reply
                ciphertext = base64.b64decode(reply[3:])
                samples.append(Sample(key_id, version, plaintext, aad, ciphertext))
    return samples


def vary_states(socket_path: str, samples: list[Sample]) -> list[Sample]:
    """Retire the first key's version 1, destroy the second key's, give the third a rotation
    period: a rekey must carry the sealed state files and the rotation index too."""
    first, second, third = sorted({sample.key_id for sample in samples})[:3]
    with Conn(socket_path) as conn:
        assert conn.ask(f"RETIRE {first} 1".encode()) == b"OK"
        assert conn.ask(f"DESTROY {second} 1".encode()) == b"OK"
        assert conn.ask(f"CONFIG {third} rotate=90d".encode()) == b"OK"
    states = {(first, 1): "retired", (second, 1): "destroyed"}
    return [
        replace(sample, state=states.get((sample.key_id, sample.version), "active"))
        for sample in samples
    ]


def check_via_socket(socket_path: str, samples: list[Sample]) -> None:
    """Every active version decrypts its ciphertext; retired and destroyed ones stay refused."""
    with Conn(socket_path) as conn:
        for sample in samples:
            reply = conn.ask(sample.dec_line())
            if sample.state == "active":
                assert code_of(reply) == "OK", (sample, reply)
                assert base64.b64decode(reply[3:]) == sample.plaintext, sample
            else:
                assert code_of(reply) == "RETIRED", (sample, reply)


def infos(socket_path: str, samples: list[Sample]) -> dict[str, bytes]:
    with Conn(socket_path) as conn:
        return {key: conn.ask(f"INFO {key}".encode()) for key in {s.key_id for s in samples}}


def check_in_process(store: Path, kek: bytes | bytearray, samples: list[Sample]) -> None:
    """Open the store with the store's own code (this is "the next open") and decrypt every
    surviving version, retired ones included; destroyed ones stay destroyed."""
    opened = KeyStore(store, kek, clock=lambda: "2026-01-01T00:00:00Z")
    try:
        for sample in samples:
            if sample.state == "destroyed":
                with pytest.raises(Retired):
                    opened.version(sample.key_id, sample.version)
                continue
            key = opened.version(sample.key_id, sample.version)
            assert key.decrypt(sample.ciphertext, sample.aad) == sample.plaintext, sample
    finally:
        opened.close()


def leftovers(store: Path) -> list[str]:
    """Entries that must not survive an open or a repair: temporaries, link temporaries,
    generations other than the live one."""
    live = os.readlink(store / LIVE_LINK)
    allowed = {LIVE_LINK, live, LOCK_NAME, WRITE_LOCK_NAME}
    found = sorted(name for name in os.listdir(store) if name not in allowed)
    found += sorted(str(path.relative_to(store)) for path in (store / live).rglob(".tmp-*"))
    return found


def without_counters(replies: dict[str, bytes]) -> dict[str, object]:
    """INFO replies with the usage counters left out: states, times, periods only."""
    counters = {"encryptions", "decryptions", "bytes"}
    documents: dict[str, object] = {}
    for key, reply in replies.items():
        assert code_of(reply) == "OK", reply
        document = json.loads(reply[3:])
        for entry in document["versions"]:
            for name in counters:
                entry.pop(name)
        documents[key] = document
    return documents


def generations(store: Path) -> list[str]:
    return sorted(path.name for path in store.glob("gen-*"))


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def fresh(short_tmp: Path) -> Iterator[KekDaemon]:
    """A stopped daemon over an empty store; killed after the test if a test left it running."""
    daemon = new_daemon(short_tmp / "d")
    try:
        yield daemon
    finally:
        daemon.discard()


@pytest.fixture
def populated(fresh: KekDaemon) -> tuple[KekDaemon, list[Sample], dict[str, bytes]]:
    """A stopped store with 6 keys x 3 versions of data, varied states, and its INFOs."""
    with running(fresh):
        samples = vary_states(fresh.socket_path, populate(fresh.socket_path, 6, 3))
        before = infos(fresh.socket_path, samples)
    return fresh, samples, before


# --------------------------------------------------------------------------- offline


def test_offline_rekey_file_to_file(
    populated: tuple[KekDaemon, list[Sample], dict[str, bytes]],
) -> None:
    daemon, samples, before = populated
    old = daemon.root / "old-kek"
    shutil.copy(daemon.kek_file, old)
    new = write_kek(daemon.root / "new-kek")
    store_id = read_metadata(daemon.store).store_id

    # Refused without the current KEK, or with a wrong one: the store is left as it was.
    wrong = write_kek(daemon.root / "wrong-kek")
    digest = tree_digest(daemon.store / "gen-1")
    refused = kmsd_all(
        ["rekey", "--store", daemon.store, "--new-kek-file", new],
        ["rekey", "--store", daemon.store, "--old-kek-file", wrong, "--new-kek-file", new],
    )
    assert [result.returncode for result in refused] == [EXIT_CONFIG, EXIT_STORE]
    assert generations(daemon.store) == ["gen-1"]
    assert tree_digest(daemon.store / "gen-1") == digest

    result = kmsd("rekey", "--store", daemon.store, "--old-kek-file", old, "--new-kek-file", new)
    assert result.returncode == EXIT_OK, result.stderr
    assert os.readlink(daemon.store / LIVE_LINK) == "gen-2"
    assert generations(daemon.store) == ["gen-2"]
    assert leftovers(daemon.store) == []
    metadata = read_metadata(daemon.store)
    assert (metadata.generation, metadata.store_id) == (2, store_id)

    assert serve_exit_code(daemon, old) == EXIT_STORE
    assert verify_codes(daemon.store, old, new) == [EXIT_STORE, EXIT_OK]
    daemon.source = new
    with running(daemon):
        assert infos(daemon.socket_path, samples) == before  # states, counters, periods kept
        check_via_socket(daemon.socket_path, samples)


def test_offline_rekey_between_kek_kinds(
    populated: tuple[KekDaemon, list[Sample], dict[str, bytes]],
) -> None:
    """file -> passphrase -> passphrase -> file; each old source is refused afterwards."""
    daemon, samples, before = populated
    first = daemon.root / "first-kek"
    shutil.copy(daemon.kek_file, first)
    last = write_kek(daemon.root / "last-kek")
    one, two = passphrase("correct horse"), passphrase("battery staple")
    steps: list[tuple[Path | str, Path | str, int]] = [
        (first, one, EXIT_KEK),  # the old source is of the other kind now
        (one, two, EXIT_STORE),  # same kind, wrong passphrase
        (two, last, EXIT_KEK),
    ]
    for generation, (old, new, old_refused) in enumerate(steps, start=2):
        result = kmsd(
            "rekey", "--store", daemon.store, *kek_args(old, "old-"), *kek_args(new, "new-")
        )
        assert result.returncode == EXIT_OK, result.stderr
        metadata = read_metadata(daemon.store)
        assert metadata.generation == generation
        assert metadata.kek["kind"] == ("file" if isinstance(new, Path) else "passphrase")
        assert generations(daemon.store) == [f"gen-{generation}"]
        codes = [
            result.returncode
            for result in kmsd_all(
                ["verify", "--store", daemon.store, *kek_args(old)],
                ["verify", "--store", daemon.store, *kek_args(new)],
            )
        ]
        assert codes == [old_refused, EXIT_OK]
    assert serve_exit_code(daemon, first) == EXIT_STORE
    daemon.source = last
    with running(daemon):
        assert infos(daemon.socket_path, samples) == before
        check_via_socket(daemon.socket_path, samples)


# --------------------------------------------------------------------------- online


def test_online_rekey_keeps_serving(fresh: KekDaemon) -> None:
    daemon = fresh
    old = daemon.root / "old-kek"
    shutil.copy(daemon.kek_file, old)
    new = write_kek(daemon.root / "new-kek")
    with running(daemon), Conn(daemon.socket_path) as already_open:
        samples = populate(daemon.socket_path, 30, 3)
        before = infos(daemon.socket_path, samples)
        rekey = subprocess.Popen(
            [*KMSD, "rekey", "--store", str(daemon.store), "--new-kek-file", str(new)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        served = during = 0
        rng = random.Random(4)
        with Conn(daemon.socket_path, timeout=60.0) as writer:
            while rekey.poll() is None:
                sample = rng.choice(samples)
                in_progress = (daemon.store / "gen-2").exists() and os.readlink(
                    daemon.store / LIVE_LINK
                ) == "gen-1"
                if in_progress and not during:  # a write arriving mid-rekey waits; not lost
                    writer.sock.sendall(b"CREATE during/rekey\n")
                with Conn(daemon.socket_path) as other:
                    for conn in (already_open, other):
                        reply = conn.ask(sample.dec_line())
                        assert code_of(reply) == "OK", reply
                        assert base64.b64decode(reply[3:]) == sample.plaintext
                        served += 1
                during += in_progress
            _, stderr = rekey.communicate()
            assert rekey.returncode == EXIT_OK, stderr
            assert served > 0
            assert during > 0, "no request was served while the new generation was being built"
            assert writer.reply() == b"OK 1"

        # The daemon switched without a restart: the old generation is gone, new writes go to
        # the new one, sealed under the new KEK.
        assert os.readlink(daemon.store / LIVE_LINK) == "gen-2"
        assert generations(daemon.store) == ["gen-2"]
        assert leftovers(daemon.store) == []
        assert already_open.ask(b"CREATE after/rekey") == b"OK 1"
        assert already_open.ask(b"ROTATE rk/k0") == b"OK 4"
        assert (daemon.store / "gen-2" / KEYS_DIR / "after" / "rekey" / "_v1.key").is_file()
        assert (daemon.store / "gen-2" / KEYS_DIR / "rk" / "k0" / "_v4.key").is_file()
        assert (daemon.store / "gen-2" / KEYS_DIR / "during" / "rekey" / "_v1.key").is_file()
        check_via_socket(daemon.socket_path, samples)
        with Conn(daemon.socket_path) as conn:
            reply = conn.ask(b"ENC after/rekey " + b64(b"new data"))
            assert code_of(reply) == "OK"
            fresh_sample = Sample("after/rekey", 1, b"new data", b"", base64.b64decode(reply[3:]))
        assert verify_codes(daemon.store, old, new) == [
            EXIT_STORE,
            EXIT_OK,
        ]
        after = infos(daemon.socket_path, samples)
        del before["rk/k0"], after["rk/k0"]  # rotated since
        assert without_counters(after) == without_counters(before)  # DECs counted meanwhile
        # And again, through the protocol verb, on the connection opened before all this.
        newer = write_kek(daemon.root / "newer-kek")
        assert already_open.ask(b"REKEY file " + b64(str(newer).encode())) == b"OK 3"
        assert generations(daemon.store) == ["gen-3"]
        check_via_socket(daemon.socket_path, [*samples, fresh_sample])

    assert serve_exit_code(daemon, new) == EXIT_STORE
    daemon.source = newer
    with running(daemon):
        check_via_socket(daemon.socket_path, [*samples, fresh_sample])


def test_online_rekey_refuses_every_new_kek_it_cannot_obtain(fresh: KekDaemon) -> None:
    """Paths and commands that cannot give a KEK are ERR BAD_REQUEST, never INTERNAL, and
    never hold the store: a FIFO nobody writes to, a device, a NUL, a path through a file."""
    daemon = fresh
    fifo = daemon.root / "fifo"
    os.mkfifo(fifo)
    anyones = write_kek(daemon.root / "anyones-kek")
    anyones.chmod(0o666)  # anyone could have put their own KEK there
    arguments = [
        b"file " + b64(str(fifo).encode()),
        b"file " + b64(str(anyones).encode()),
        b"file " + b64(b"/dev/zero"),
        b"file " + b64(b"a\0b"),
        b"passphrase " + b64(b"a\0b"),
        b"passphrase " + b64(b"/etc/passwd/x"),
        b"passphrase " + b64(b"x" * 5000),
    ]
    with running(daemon), Conn(daemon.socket_path) as conn:
        for argument in arguments:
            reply = conn.ask(b"REKEY " + argument)
            assert reply == b"ERR BAD_REQUEST cannot obtain the new KEK; see the daemon log"
        assert conn.ask(b"CREATE after/refusals") == b"OK 1"
    assert generations(daemon.store) == ["gen-1"]
    assert "Traceback" not in daemon.log.read_text()


def test_a_socket_of_another_stores_daemon_is_refused(fresh: KekDaemon, short_tmp: Path) -> None:
    """`rekey --store A --socket B` re-sealed B's store and said it had rekeyed A."""
    other = new_daemon(short_tmp / "other")
    new_kek = write_kek(short_tmp / "new-kek")
    try:
        with running(fresh), running(other):
            wrong = kmsd(
                "rekey", "--store", fresh.store, "--socket", other.socket_path,
                "--new-kek-file", new_kek,
            )  # fmt: skip
            assert wrong.returncode == EXIT_CONFIG, wrong.stderr
            assert generations(fresh.store) == generations(other.store) == ["gen-1"]
            right = kmsd(
                "rekey", "--store", fresh.store, "--socket", fresh.socket_path,
                "--new-kek-file", new_kek,
            )  # fmt: skip
            assert right.returncode == EXIT_OK, right.stderr
            assert generations(fresh.store) == ["gen-2"]
            assert generations(other.store) == ["gen-1"]
    finally:
        other.discard()


def test_a_rekey_to_a_kek_file_every_user_may_read_says_so(fresh: KekDaemon) -> None:
    """Accepted, as at start, and said both by the daemon and by `kmsd rekey`."""
    daemon = fresh
    readable = write_kek(daemon.root / "readable-kek")
    readable.chmod(0o644)
    with running(daemon):
        result = kmsd("rekey", "--store", daemon.store, "--new-kek-file", readable)
        assert result.returncode == EXIT_OK, result.stderr
        assert result.stderr.startswith(b"kmsd: warning: KEK file ")
        assert result.stderr.count(b"\n") == 1
    assert f"REKEY: KEK file {readable} is readable by every user" in daemon.log.read_text()


def test_online_rekey_to_a_passphrase_and_back(fresh: KekDaemon) -> None:
    """The daemon obtains the new KEK itself, of either kind; restarts use the new source."""
    daemon = fresh
    back = write_kek(daemon.root / "back-kek")
    words = passphrase("online passphrase")
    with running(daemon):
        samples = populate(daemon.socket_path, 3, 2)
        result = kmsd("rekey", "--store", daemon.store, "--new-passphrase-command", words)
        assert result.returncode == EXIT_OK, result.stderr
        assert read_metadata(daemon.store).kek["kind"] == "passphrase"
        check_via_socket(daemon.socket_path, samples)
        # A failing passphrase command: the daemon refuses (exit 7), nothing changes.
        # What it writes to stderr is not let into the daemon's (the audit trail's).
        chatty = "import sys; sys.stderr.write('KMST-CHATTY-PROMPT'); exit(3)"
        failing = kmsd(
            "rekey", "--store", daemon.store, "--new-passphrase-command", python_command(chatty)
        )
        assert failing.returncode == 7
        assert generations(daemon.store) == ["gen-2"]
        check_via_socket(daemon.socket_path, samples)
    assert b"KMST-CHATTY-PROMPT" not in daemon.log.read_bytes()
    for line in daemon.log.read_bytes().splitlines():  # log lines, and JSON lines whole
        assert line[:1] != b"{" or json.loads(line)["verb"]
    daemon.source = words
    with running(daemon):
        check_via_socket(daemon.socket_path, samples)
        result = kmsd("rekey", "--store", daemon.store, "--new-kek-file", back)
        assert result.returncode == EXIT_OK, result.stderr
        check_via_socket(daemon.socket_path, samples)
    assert serve_exit_code(daemon, words) == EXIT_KEK
    daemon.source = back
    with running(daemon):
        check_via_socket(daemon.socket_path, samples)


def slow_rekey(seconds: float) -> bytes:
    """A REKEY line whose passphrase command takes ``seconds``."""
    command = python_command(f"import time; time.sleep({seconds}); print('pass {seconds}')")
    return b"REKEY passphrase " + b64(command.encode()) + b"\n"


def test_a_rekey_applied_after_the_grace_period_is_still_answered(fresh: KekDaemon) -> None:
    """REKEY is not repeatable: applied while the daemon stopped, past its grace period,
    its reply was dropped (the client saw EOF and could not tell it had happened)."""
    daemon = fresh
    daemon.extra_args = ["--grace-period", "1"]
    with running(daemon), Conn(daemon.socket_path) as conn:
        assert conn.ask(b"PING") == b"OK PONG"
        conn.send(slow_rekey(3))
        time.sleep(0.5)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        assert conn.reply() == b"OK 2"
        assert conn.read_until_closed() == b""
        assert daemon.process.wait(20) == 0
    assert generations(daemon.store) == ["gen-2"]


def test_a_write_applied_before_the_stop_is_answered_whatever_follows_it(
    fresh: KekDaemon,
) -> None:
    """B's REKEY is applied, then its next request waits for the write lock behind A's
    slow REKEY while the grace period ends: B's reply was in its unsent batch, dropped."""
    daemon = fresh
    daemon.extra_args = ["--grace-period", "0.5"]
    with running(daemon), Conn(daemon.socket_path) as b, Conn(daemon.socket_path) as a:
        assert b.ask(b"CREATE k1") == b"OK 1"
        b.send(slow_rekey(1) + b"ROTATE k1\n")
        time.sleep(0.3)
        a.send(slow_rekey(3))
        time.sleep(1.5)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        assert b.reply() == b"OK 2"
        assert a.reply() == b"OK 3"
        assert daemon.process.wait(20) == 0


# --------------------------------------------------------------------------- repair


def half_made_rekey(store: Path) -> None:
    """The remains of a rekey that died before its switch: gen-2 holds some of the re-sealed
    files, and a link temporary was never renamed."""
    shutil.copytree(store / "gen-1", store / "gen-2")
    for path in sorted((store / "gen-2" / KEYS_DIR).rglob("_v2.key")):
        path.unlink()
    os.symlink("gen-2", store / ".live-0123456789abcdef")


def test_repair_rolls_back_a_half_made_generation(
    populated: tuple[KekDaemon, list[Sample], dict[str, bytes]],
) -> None:
    daemon, samples, _ = populated
    store = daemon.store
    live_before = tree_digest(store / "gen-1")
    half_made_rekey(store)
    result = kmsd("rekey", "--store", store, "--repair")
    assert result.returncode == EXIT_OK, result.stderr
    assert os.readlink(store / LIVE_LINK) == "gen-1"
    assert generations(store) == ["gen-1"]
    assert leftovers(store) == []
    assert tree_digest(store / "gen-1") == live_before  # the live generation is untouched
    assert verify_codes(store, daemon.kek_file) == [EXIT_OK]

    # A daemon's open cleans up the same way; while it serves, repair is refused.
    half_made_rekey(store)
    with running(daemon):
        assert leftovers(store) == []
        check_via_socket(daemon.socket_path, samples)
        shutil.copytree(store / "gen-1", store / "gen-2")
        refused = kmsd("rekey", "--store", store, "--repair")
        assert refused.returncode == EXIT_STORE
        assert generations(store) == ["gen-1", "gen-2"]
        check_via_socket(daemon.socket_path, samples)
    assert kmsd("rekey", "--store", store, "--repair").returncode == EXIT_OK
    assert generations(store) == ["gen-1"]


def test_repair_of_a_missing_store_is_a_store_error(short_tmp: Path) -> None:
    """Exit 3 is "store error (missing, damaged, locked, wrong KEK)"; nothing is created."""
    result = kmsd("rekey", "--store", short_tmp / "nothing", "--repair")
    assert result.returncode == EXIT_STORE, result.stderr
    assert not (short_tmp / "nothing").exists()


def test_repair_finishes_a_switched_rekey(
    populated: tuple[KekDaemon, list[Sample], dict[str, bytes]],
) -> None:
    """A rekey that died after the switch: the old generation is still there; repair
    removes it and the new KEK rules."""
    daemon, samples, _ = populated
    store = daemon.store
    old = daemon.root / "old-kek"
    shutil.copy(daemon.kek_file, old)
    new = write_kek(daemon.root / "new-kek")
    shutil.copytree(store / "gen-1", daemon.root / "gen-1-copy")
    result = kmsd("rekey", "--store", store, "--old-kek-file", old, "--new-kek-file", new)
    assert result.returncode == EXIT_OK, result.stderr
    shutil.copytree(daemon.root / "gen-1-copy", store / "gen-1")  # as if never removed
    assert generations(store) == ["gen-1", "gen-2"]
    result = kmsd("rekey", "--store", store, "--repair")
    assert result.returncode == EXIT_OK, result.stderr
    assert generations(store) == ["gen-2"]
    assert leftovers(store) == []
    assert verify_codes(store, old, new) == [EXIT_STORE, EXIT_OK]
    check_in_process(store, file_kek(new), samples)


# --------------------------------------------------------------------------- crash tests


@dataclass
class CrashLog:
    """What the SIGKILLs hit, for the assertion messages and the coverage check."""

    seed: int
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def which_kek_opens(store: Path, old: Path, new: Path, *, cli: bool) -> Path:
    """The one KEK the store opens with; asserts that exactly one does, and that it finds
    every seal intact. ``cli``: ask `kmsd verify` (both at once); else the same check
    in-process (``maintenance.verify``, what `kmsd verify` runs), to save start-up time."""
    if cli:
        codes = [
            result.returncode
            for result in kmsd_all(
                ["verify", "--store", store, "--kek-file", old],
                ["verify", "--store", store, "--kek-file", new],
            )
        ]
        assert sorted(codes) == [EXIT_OK, EXIT_STORE], codes
        return old if codes[0] == EXIT_OK else new
    opens = []
    for path in (old, new):
        try:
            reports = verify(store, file_kek(path))
        except StoreError:
            continue
        assert [report for report in reports if report.problems] == []
        opens.append(path)
    assert len(opens) == 1, opens
    return opens[0]


#: A helper process that imports `kmsd` once, then forks a child per command that runs the
#: `kmsd` command line (kms_server.cli.main) exactly as `python -m kms_server` would. Each
#: child is a real process doing a real `kmsd rekey`, minus the ~0.4 s interpreter start-up:
#: its pid is reported, and it is reaped only when the test asks, so a pid the test kills is
#: never one the system has reused.
FORK_SERVER = """
import json, os, sys
from kms_server.cli import main

def child(args):
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    try:
        main(args, prog_name="kmsd")
    except SystemExit as stop:
        code = stop.code
        os._exit(code if isinstance(code, int) else int(code is not None))
    except BaseException:
        os._exit(1)
    os._exit(0)

for line in sys.stdin:
    if line.startswith("["):
        pid = os.fork()
        if pid == 0:
            child(json.loads(line))
        print(pid, flush=True)
    else:
        _, status = os.waitpid(int(line.split()[1]), 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
"""


class ForkServer:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, line: str) -> int:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def start(self, *args: object) -> int:
        """Fork a child running `kmsd <args>`; its pid."""
        return self._ask(json.dumps([str(arg) for arg in args]))

    def reap(self, pid: int) -> int:
        """Wait for the child; its exit code (negative: the signal that ended it)."""
        return self._ask(f"reap {pid}")

    def close(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(10)
        self.process.stdout.close()


def has_exited(pid: int) -> bool:
    """True once a child of the fork server is a zombie (it is reaped only on request)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return status.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def rekey_args(store: Path, old: Path, new: Path) -> list[object]:
    return ["rekey", "--store", store, "--old-kek-file", old, "--new-kek-file", new]


@pytest.fixture
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.slow
def test_sigkill_of_offline_rekey_at_50_random_instants(
    fresh: KekDaemon, fork_server: ForkServer
) -> None:
    """50 SIGKILLs of `kmsd rekey` on 30 keys x 3 versions, at instants drawn between 0 and
    the measured duration of a full rekey, stratified so the whole range is covered: 10 of
    `python -m kms_server rekey` (start-up included), 40 of forked `kmsd rekey` children
    (see FORK_SERVER), whose time is all rekey work."""
    daemon = fresh
    with running(daemon):
        samples = vary_states(daemon.socket_path, populate(daemon.socket_path, 30, 3))
        before = infos(daemon.socket_path, samples)
    store = daemon.store
    keks = [Path(shutil.copy(daemon.kek_file, daemon.root / "kek-0"))]

    # The duration of one full rekey of this store, each way (forked: the longest of three).
    keks.append(write_kek(daemon.root / "kek-1"))
    started = time.monotonic()
    assert kmsd(*rekey_args(store, keks[0], keks[1])).returncode == EXIT_OK
    subprocess_duration = time.monotonic() - started
    forked_duration = 0.0
    for _ in range(3):
        keks.append(write_kek(daemon.root / f"kek-{len(keks)}"))
        started = time.monotonic()
        pid = fork_server.start(*rekey_args(store, keks[-2], keks[-1]))
        assert fork_server.reap(pid) == EXIT_OK
        forked_duration = max(forked_duration, time.monotonic() - started)
    current = keks[-1]

    log = CrashLog(seed=int.from_bytes(random_bytes(4), "big"))
    rng = random.Random(log.seed)
    plan = [("subprocess", slot, 10) for slot in range(10)]
    plan += [("forked", slot, 40) for slot in range(40)]
    rng.shuffle(plan)
    for attempt, (how, slot, slots) in enumerate(plan):
        new = write_kek(daemon.root / f"kek-{len(keks)}")
        keks.append(new)
        if how == "subprocess":
            process = subprocess.Popen(
                [*KMSD, *map(str, rekey_args(store, Path(current), new))],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(subprocess_duration * (slot + rng.random()) / slots)
            process.send_signal(signal.SIGKILL)
            code = process.wait()
        else:
            pid = fork_server.start(*rekey_args(store, Path(current), new))
            time.sleep(forked_duration * (slot + rng.random()) / slots)
            os.kill(pid, signal.SIGKILL)  # our unreaped child: the pid cannot have been reused
            code = fork_server.reap(pid)
        context = f"seed {log.seed}, attempt {attempt}, {how} slot {slot}, exit {code}"
        assert code in {0, -signal.SIGKILL}, context
        live = os.readlink(store / LIVE_LINK)
        others = [name for name in generations(store) if name != live]
        # Ask `kmsd verify` every tenth time; the in-process equivalent otherwise.
        opener = which_kek_opens(store, Path(current), new, cli=attempt % 10 == 0)
        if code == 0:
            log.count("finished")
            assert opener == new, context
        elif opener == current:
            log.count("rolled back, half-made generation" if others else "rolled back, clean")
        else:
            log.count("switched, old generation left" if others else "switched, cleaned")
        if attempt % 10 == 5:  # and `kmsd rekey --repair` before the next open, sometimes
            repaired = kmsd("rekey", "--store", store, "--repair")
            assert repaired.returncode == EXIT_OK, (context, repaired.stderr)
            assert leftovers(store) == [], context
        check_in_process(store, file_kek(opener), samples)  # the next open, then every version
        assert leftovers(store) == [], context
        current = opener

    print(
        f"SIGKILL outcomes (rekey {subprocess_duration:.2f} s as a subprocess, "
        f"{forked_duration:.2f} s forked): {log}"
    )
    assert sum(log.outcomes.values()) == 50
    assert log.outcomes.get("rolled back, half-made generation", 0) >= 10, log
    daemon.source = Path(current)
    with running(daemon):
        assert infos(daemon.socket_path, samples) == before
        check_via_socket(daemon.socket_path, samples)


@pytest.mark.slow
def test_sigkill_of_the_daemon_during_online_rekey(fresh: KekDaemon) -> None:
    """SIGKILL the daemon at random instants of a REKEY; each restart (with whichever KEK
    the store now opens with) cleans up and decrypts every version, and is the daemon the
    next REKEY is killed in."""
    daemon = fresh
    store = daemon.store
    seed = int.from_bytes(random_bytes(4), "big")
    rng = random.Random(seed)
    outcomes: list[tuple[str, list[str]]] = []
    with running(daemon):
        samples = vary_states(daemon.socket_path, populate(daemon.socket_path, 20, 3))
        # The duration of one whole online rekey, as the daemon sees it.
        first = write_kek(daemon.root / "kek-first")
        with Conn(daemon.socket_path, timeout=60.0) as conn:
            started = time.monotonic()
            reply = conn.ask(b"REKEY file " + b64(str(first).encode()))
            duration = time.monotonic() - started
        assert reply == b"OK 2"
        shutil.copy(first, daemon.kek_file)
        for attempt in range(4):
            context = f"seed {seed}, attempt {attempt}"
            current = shutil.copy(daemon.kek_file, daemon.root / f"kek-current-{attempt}")
            new = write_kek(daemon.root / f"kek-{attempt}")
            with Conn(daemon.socket_path, timeout=60.0) as conn:
                conn.sock.sendall(b"REKEY file " + b64(str(new).encode()) + b"\n")
                time.sleep(duration * (attempt + rng.random()) / 4)  # one instant per quarter
                daemon.stop(signal.SIGKILL)
            live = os.readlink(store / LIVE_LINK)
            others = [name for name in generations(store) if name != live]
            opener = which_kek_opens(store, Path(current), new, cli=attempt % 2 == 0)
            outcomes.append(("new" if opener == new else "old", others))
            shutil.copy(opener, daemon.kek_file)
            daemon.start()  # the next open cleans up; every version still decrypts
            assert leftovers(store) == [], context
            check_via_socket(daemon.socket_path, samples)
    print(f"daemon SIGKILL outcomes (duration {duration:.2f} s, seed {seed}): {outcomes}")
    assert leftovers(store) == []
    # The first kills land in the first half of a rekey, before its switch: the case
    # this test exists for (an interrupted re-seal rolled back at the next start).
    assert any(outcome == "old" for outcome, _ in outcomes), (seed, outcomes)


def test_rewrap_of_a_store_whose_kek_is_not_transit_is_a_kek_source_error(
    fresh: KekDaemon,
) -> None:
    """A source of another kind than the store's exits 4, as `serve` does."""
    token = fresh.root / "token"
    token.write_text("s.unused\n")
    result = kmsd(
        "rekey", "--store", fresh.store, "--rewrap",
        "--kek-transit", "http://127.0.0.1:9", "--transit-token-file", token,
    )  # fmt: skip
    assert result.returncode == EXIT_KEK, result.stderr
    assert result.stderr.count(b"\n") == 1


# --------------------------------------------------------------------------- failed writes
# The daemon's online REKEY in process, on a real store, with one file-system step made to
# fail (EIO, ENOSPC) where a dying or full disk would fail it.


def online_rekey(store: KeyStore, new_kek_file: Path) -> int:
    rekey = maintenance.online_rekeyer(store, passphrase_timeout=10.0)

    async def run() -> int:
        return await rekey("file", str(new_kek_file), trio.to_thread.run_sync)

    return trio.run(run)


@pytest.fixture
def served_store(short_tmp: Path) -> Iterator[tuple[KeyStore, Path]]:
    store_dir = short_tmp / "s"
    kek = random_bytes(32)
    init_store(store_dir, kek, {"kind": "file"}, "2026-01-01T00:00:00Z")
    new_kek_file = short_tmp / "new-kek"
    new_kek_file.write_text(random_bytes(32).hex())
    new_kek_file.chmod(0o600)
    store = KeyStore(store_dir, kek, clock=lambda: "2026-01-01T00:00:00Z")
    try:
        store.add(store.write_version("before", 1, exportable=True))
        yield store, new_kek_file
    finally:
        store.close()


def test_online_rekey_whose_switch_is_not_made_durable_still_takes_effect(
    served_store: tuple[KeyStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename of ``live`` happened, its directory fsync failed: the new generation is
    the store now, so the daemon must write there and say the rekey was done."""
    store, new_kek_file = served_store
    real_switch = switch_live

    def switch_then_fail(store_dir: Path, generation: Path) -> None:
        real_switch(store_dir, generation)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(maintenance, "switch_live", switch_then_fail)
    assert online_rekey(store, new_kek_file) == 2
    store.add(store.write_version("after", 1, exportable=True))
    live_keys = store.directory / LIVE_LINK / KEYS_DIR
    assert read_metadata(store.directory).generation == 2
    assert (live_keys / "after").is_dir()  # where a restart will look for it
    assert (live_keys / "before").is_dir()


def test_online_rekey_that_fails_before_the_switch_leaves_no_generation_behind(
    served_store: tuple[KeyStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, new_kek_file = served_store

    def full_disk(store_dir: Path, generation: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maintenance, "switch_live", full_disk)
    with pytest.raises(OSError):
        online_rekey(store, new_kek_file)
    generations = sorted(p.name for p in store.directory.iterdir() if p.name.startswith("gen-"))
    assert generations == ["gen-1"]  # the half-made gen-2 does not keep the disk full
    assert store.metadata.generation == 1
    store.add(store.write_version("after", 1, exportable=False))
    assert read_metadata(store.directory).generation == 1


def test_online_rekey_whose_cleanup_fails_is_still_done(
    served_store: tuple[KeyStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, new_kek_file = served_store

    def cannot_remove(store_dir: Path) -> list[str]:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(maintenance, "remove_other_generations", cannot_remove)
    assert online_rekey(store, new_kek_file) == 2
    assert read_metadata(store.directory).generation == 2
