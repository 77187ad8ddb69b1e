# Shared fixtures: a real kmsd subprocess on a real Unix socket over a real store in a temp dir.
# No mocks: tests talk to the daemon exactly as users do (socket, CLI, socat).
from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kms_client.protocol import Encrypt
from kms_server.crypto import random_bytes
from kms_server.kek import KekFile
from kms_server.store import init_store

KMSD = [sys.executable, "-m", "kms_server"]


def kmsd(
    *args: object, timeout: float = 60.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """One ``kmsd`` command line (never a shell), its output captured, no input."""
    return subprocess.run(
        [*KMSD, *map(str, args)],
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def kmsd_all(*commands: Sequence[object]) -> list[subprocess.CompletedProcess[bytes]]:
    """Independent ``kmsd`` runs, a few at a time: each costs ~0.3 s of interpreter start-up."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: kmsd(*args), commands))


def assert_fails(result: subprocess.CompletedProcess[bytes], exit_code: int) -> None:
    """The failure has its documented exit code and exactly one line on stderr."""
    stderr = result.stderr.decode()
    assert result.returncode == exit_code, stderr
    assert stderr.endswith("\n")
    assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr


KMS = [sys.executable, "-m", "kms_client"]
START_TIMEOUT = 15.0


def exchange(socket_path: str | Path, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, half-close, and read everything the daemon answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(socket_path))
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def terminal_output(primary: int, secondary: int) -> bytes:
    """Everything written to a pty by a child that has exited; closes ``secondary``.

    With our copy of the terminal side closed, reading ends when the buffer is
    drained (EIO on Linux), not when one read happens to come back short: the
    kernel hands pty output to the other side asynchronously.
    """
    os.close(secondary)
    shown = b""
    while select.select([primary], [], [], 10)[0]:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: drained, and no terminal side is open
            break
        if not chunk:
            break
        shown += chunk
    return shown


def wait_until_serving(socket_path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kmsd exited with {process.returncode}:\n{log.read_text()}")
        try:
            if exchange(socket_path, b"PING\n", timeout=2.0) == b"OK PONG\n":
                return
        except OSError:
            pass
        time.sleep(0.02)
    process.kill()
    raise RuntimeError(f"kmsd did not start within {START_TIMEOUT} s:\n{log.read_text()}")


@dataclass
class Daemon:
    """One kmsd subprocess serving ``store`` on ``socket_path`` with a KEK file."""

    root: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def kek_file(self) -> Path:
        return self.root / "kek"

    @property
    def socket_path(self) -> str:
        return str(self.root / "kms.sock")

    @property
    def log(self) -> Path:
        return self.root / "kmsd.log"

    def kek_arguments(self) -> list[str]:
        return ["--kek-file", str(self.kek_file)]

    def command(self) -> list[str]:
        return [
            *KMSD,
            "serve",
            "--store",
            str(self.store),
            "--socket",
            self.socket_path,
            *self.kek_arguments(),
            *self.extra_args,
        ]

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stderr=log, stdin=subprocess.DEVNULL)
        wait_until_serving(Path(self.socket_path), self.process, self.log)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def discard(self) -> None:
        """Teardown after a test that may have failed: kill any process left running."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def env(self) -> dict[str, str]:
        return {**os.environ, "KMS_SOCKET": self.socket_path}


def make_store(root: Path) -> Daemon:
    """A fresh, empty store with a random KEK file, initialised in-process (fast)."""
    daemon = Daemon(root)
    root.mkdir(mode=0o700, exist_ok=True)
    daemon.kek_file.write_bytes(random_bytes(32).hex().encode() + b"\n")
    daemon.kek_file.chmod(0o600)
    source = KekFile(daemon.kek_file)
    description = source.describe_new()
    init_store(daemon.store, source.obtain(description), description, "2026-01-01T00:00:00Z")
    return daemon


@contextlib.contextmanager
def serving(root: Path, *extra_args: str) -> Iterator[Daemon]:
    """A daemon over a fresh store, started with extra ``kmsd serve`` arguments."""
    started = make_store(root)
    started.extra_args = list(extra_args)
    started.start()
    try:
        yield started
    finally:
        try:
            if started.process is not None:
                started.stop()
        finally:
            started.discard()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: AF_UNIX socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kms-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Daemon]:
    """A running daemon over an empty store; stopped (SIGTERM) after the test."""
    running = make_store(short_tmp / "d")
    running.start()
    try:
        yield running
    finally:
        try:
            if running.process is not None:
                running.stop()
        finally:
            running.discard()


@pytest.fixture
def daemon_env(daemon: Daemon) -> dict[str, str]:
    """Environment for `kms` CLI subprocesses: KMS_SOCKET points at the daemon."""
    return daemon.env()


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[Encrypt]:
    """Every ``ENC`` request a client encodes into a line, once per encoding."""
    requests: list[Encrypt] = []
    to_line = Encrypt.to_line

    def counting_to_line(self: Encrypt) -> bytes:
        requests.append(self)
        return to_line(self)

    monkeypatch.setattr(Encrypt, "to_line", counting_to_line)
    return requests
