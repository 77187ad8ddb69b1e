# The systemd service protocol, spoken directly: sd_notify datagrams and socket activation.
# No libsystemd; every function is a no-op when systemd did not ask for it (plain runs, tests).
"""Readiness, status and watchdog notifications, and inherited listening sockets.

* ``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET`` (a path, or
  an abstract socket when it starts with ``@``), as ``sd_notify(3)`` does.
* :func:`inherited_listener` adopts the socket systemd passed
  (``$LISTEN_PID`` = our pid, ``$LISTEN_FDS`` = 1, descriptor 3), so clients
  may connect before the daemon is up: the kernel queues them.
* :func:`watchdog_period` reads ``$WATCHDOG_USEC`` and returns how often to
  send ``WATCHDOG=1`` (half the timeout, as systemd recommends).
"""

from __future__ import annotations

import os
import socket
import stat

SD_LISTEN_FDS_START = 3


class ActivationError(Exception):
    """systemd passed sockets we cannot serve (not one AF_UNIX stream socket)."""


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines to systemd; False when not under a notify-type service."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sender:
        try:
            sender.connect(address)
            sender.sendall("\n".join(assignments).encode())
        except OSError:
            return False
    return True


def inherited_listener() -> socket.socket | None:
    """The listening socket systemd passed us, or None when not socket-activated."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        raise ActivationError("LISTEN_FDS is not a number") from None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    if count == 0:  # as sd_listen_fds(3): nothing passed, not socket-activated
        return None
    if count != 1:
        raise ActivationError(f"systemd passed {count} sockets; kmsd serves exactly one")
    fd = SD_LISTEN_FDS_START
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ActivationError("the descriptor systemd passed is not a socket")
    listener = socket.socket(fileno=fd)
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        listener.detach()
        raise ActivationError("systemd passed a socket that is not an AF_UNIX stream socket")
    if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listener.detach()
        raise ActivationError(
            "systemd passed a socket that is not listening (a connection: Accept=yes?);"
            " kmsd needs the listening socket (Accept=no)"
        )
    name = listener.getsockname()
    if not isinstance(name, str) or not name or name.startswith("\0"):
        listener.detach()
        raise ActivationError(
            f"systemd passed a socket with no file ({name!r}): an abstract socket has no mode or"
            " group to limit who connects; use a path, such as ListenStream=/run/kms/kms.sock"
        )
    os.set_inheritable(fd, False)
    return listener


def watchdog_period() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is armed for us."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
