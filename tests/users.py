# Helpers for the ACL, audit, hardening and real-user tests: raw connections, daemons with
# extra flags, throw-away system users, and Python children that drop to another uid.
"""Shared helpers for ``test_acl``, ``test_audit``, ``test_hardening`` and ``test_real_users``.

Running code as another user: the test process is root, and the project's
interpreter may live where other users cannot reach it (a pyenv under a 0700
``/root``). So a child is started as root with ``sys.executable -c``, imports
everything it needs, then drops to the target uid and gid with an empty group
list (``setgroups``, ``setgid``, ``setuid``: real, effective and saved ids all
change, and the kernel clears every capability) before it touches the daemon.
The kernel takes ``SO_PEERCRED`` at ``connect()``, so the daemon sees the
dropped ids. Changing uid also makes a process undumpable; a child that must be
an ordinary dumpable process (a control, or a daemon that has to make itself
undumpable) asks for ``dumpable=True`` and gets ``PR_SET_DUMPABLE`` 1 back.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.conftest import Daemon

PYTHON = sys.executable


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class Conn:
    """One raw protocol connection: send a request line, read its one reply line."""

    def __init__(self, socket_path: str | Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(socket_path))
        self._buffer = bytearray()

    def __enter__(self) -> Conn:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes: partial lines, many lines, anything."""
        self.sock.sendall(data)

    def ask(self, line: bytes) -> bytes:
        """Send one request line; return its reply line without the LF."""
        self.sock.sendall(line + b"\n")
        return self.reply()

    def reply(self) -> bytes:
        """The next reply line without its LF (after pipelined requests, one per call).

        EOFError when the daemon closed the connection between lines; closing inside
        a line fails the test.
        """
        while (newline := self._buffer.find(b"\n")) < 0:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not self._buffer, f"connection closed inside a line: {bytes(self._buffer)!r}"
                raise EOFError("the daemon closed the connection")
            self._buffer += chunk
        reply = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        return reply

    def read_until_closed(self) -> bytes:
        """Everything left until EOF (or a reset, which Linux gives when we sent unread data)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def ask(socket_path: str | Path, line: bytes) -> bytes:
    with Conn(socket_path) as conn:
        return conn.ask(line)


def code_of(reply: bytes) -> str:
    """``OK`` or the wire error code of a reply line."""
    if reply == b"OK" or reply.startswith(b"OK "):
        return "OK"
    assert reply.startswith(b"ERR "), reply
    return reply.split(b" ")[1].decode()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.02)


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    """Start ``daemon``; stop it (SIGTERM, then SIGKILL if needed) when the block ends."""
    daemon.start()
    try:
        yield daemon
    finally:
        try:
            if daemon.process is not None:
                daemon.stop()
        finally:
            daemon.discard()


def audit_lines(path: Path) -> list[dict[str, object]]:
    """The JSON objects of an audit file (or of a stderr log: lines starting with ``{``)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


# --------------------------------------------------------------------------- system users


@dataclass(frozen=True)
class SystemUser:
    name: str
    uid: int
    gid: int


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


class UserToolFailed(Exception):
    """useradd refused (a read-only /etc, say): the message holds its error output."""


def why_no_system_users() -> str | None:
    """None when this process can create throw-away users, else the reason it cannot."""
    if os.geteuid() != 0:
        return "creating throw-away system users needs root (run the suite as root, as CI does)"
    missing = [tool for tool in ("useradd", "userdel") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (package passwd / shadow-utils)"
    return None


def _run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def delete_system_user(name: str) -> None:
    """Remove ``name`` and its personal group if present (stale ones from a crashed run too)."""
    if user_exists(name):
        result = _run_tool("userdel", name)
        if result.returncode != 0 and user_exists(name):
            result = _run_tool("userdel", "--force", name)
        assert not user_exists(name), f"userdel {name} failed: {result.stderr}"
    if group_exists(name) and shutil.which("groupdel") is not None:
        _run_tool("groupdel", name)


def create_system_user(name: str) -> SystemUser:
    delete_system_user(name)
    result = _run_tool(
        "useradd",
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "--user-group",
        name,
    )
    if result.returncode != 0:
        raise UserToolFailed(f"useradd {name} exited {result.returncode}: {result.stderr.strip()}")
    entry = pwd.getpwnam(name)
    return SystemUser(name, entry.pw_uid, entry.pw_gid)


def yama_restricts_attach() -> bool:
    """Yama ptrace_scope >= 1: opening /proc/<pid>/mem of a non-descendant needs more than
    the same uid even when the target is dumpable (/proc/<pid>/environ is not affected)."""
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text()) >= 1
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- running as a user

_DROP = """\
import ctypes, os, sys
{preload}
_libc = ctypes.CDLL(None, use_errno=True)
os.setgroups({groups})
os.setgid({gid})
os.setuid({uid})
if os.getresuid() != ({uid},) * 3 or os.getresgid() != ({gid},) * 3:
    sys.exit(121)
if sorted(os.getgroups()) != sorted({groups}):
    sys.exit(121)
if {dumpable} and _libc.prctl(4, 1, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 1
    sys.exit(122)
"""

#: Exit status of a child whose privilege drop did not take.
EXIT_DROP_FAILED = (121, 122)


def python_as(
    user: SystemUser,
    code: str,
    *,
    preload: str = "",
    dumpable: bool = False,
    groups: Sequence[int] = (),
) -> list[str]:
    """argv of a root-started Python child that runs ``preload``, becomes ``user``, runs ``code``.

    ``preload`` imports what ``code`` needs while the interpreter's own files are still
    readable; ``code`` runs with the user's uid and gid, exactly the supplementary
    ``groups`` given (none by default), and no capabilities.
    """
    prelude = _DROP.format(
        preload=preload, uid=user.uid, gid=user.gid, dumpable=dumpable, groups=list(groups)
    )
    return [PYTHON, "-c", prelude + code]


@dataclass(frozen=True)
class Ran:
    """A finished child: its pid (what the daemon's audit names), exit status and output."""

    pid: int
    returncode: int
    stdout: str
    stderr: str


def run_as(
    user: SystemUser,
    code: str,
    *args: str,
    preload: str = "",
    groups: Sequence[int] = (),
    timeout: float = 30.0,
) -> Ran:
    """Run ``code`` (with ``args`` in ``sys.argv[1:]``) as ``user``; wait for it to finish."""
    with subprocess.Popen(
        [*python_as(user, code, preload=preload, groups=groups), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
    assert child.returncode not in EXIT_DROP_FAILED, f"could not become {user}: {stderr}"
    return Ran(child.pid, child.returncode, stdout, stderr)
