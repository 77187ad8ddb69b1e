# kmsd driven by plain socat, as an operator would: printf '...' | socat - UNIX-CONNECT:path.
# Needs the socat binary (Debian package socat; `make test` installs it); no Python client involved.
"""Protocol v1 through socat: what ``protocol.md`` promises to anyone with a shell.

``-t 5`` only lets socat wait up to 5 s (default 0.5 s) for the last replies
after its input ended, so a slow machine cannot truncate the output.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import Daemon
from tests.test_vectors import (
    DaemonPool,
    Vector,
    check_reply,
    load,
    request_bytes,
    vector_names,
)

SOCAT = shutil.which("socat")
pytestmark = pytest.mark.skipif(SOCAT is None, reason="socat is not installed (make test-deps)")

KEY_B64 = r"[A-Za-z0-9+/]{43}="
_NO_VALUES: dict[str, str] = {}


def shell_session(daemon: Daemon, printf_format: str, *address_options: str) -> list[str]:
    """Run `printf FORMAT | socat - UNIX-CONNECT:PATH[,options]` in sh; return stdout lines."""
    address = ",".join([f"UNIX-CONNECT:{daemon.socket_path}", *address_options])
    command = f"printf {shlex.quote(printf_format)} | socat -t 5 - {shlex.quote(address)}"
    result = subprocess.run(["sh", "-c", command], capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"\n")
    return result.stdout.decode("ascii").splitlines()


def test_operator_session(daemon: Daemon) -> None:
    replies = shell_session(
        daemon, "PING\\nCREATE k exportable\\nGET k\\nGET k 2\\nget k 1\\nQUIT\\nPING\\n"
    )
    assert len(replies) == 6, replies
    assert replies[:2] == ["OK PONG", "OK 1"]
    match = re.fullmatch(rf"OK 1 ({KEY_B64})", replies[2])
    assert match is not None, replies[2]
    assert replies[3] == "ERR NOT_FOUND no such key or version"
    assert replies[4] == f"OK 1 {match.group(1)}"
    assert replies[5] == "OK BYE"  # the PING after QUIT is not answered


def test_crlf_session(daemon: Daemon) -> None:
    # socat's crlf option turns every LF we write into CR LF on the socket.
    replies = shell_session(
        daemon, "PING\\nCREATE c exportable\\nGET c 1\\nINFO c\\nPING\\r\\n", "crlf"
    )
    assert replies[:2] == ["OK PONG", "OK 1"]
    assert re.fullmatch(rf"OK 1 {KEY_B64}", replies[2]), replies[2]
    assert replies[3].startswith('OK {"key_id":"c","latest":1,"exportable":true,')
    # Proof that socat really sent CR LF: our own CR became a second one, "PING\r\r\n",
    # and only one CR before the LF is ignored.
    assert replies[4] == "ERR UNKNOWN_COMMAND unknown command"
    assert len(replies) == 5


# --------------------------------------------------------------------------- vectors via socat


def socat_vectors() -> list[str]:
    """Vectors socat can replay: every request is known before any reply is read."""
    return [
        name
        for name in vector_names()
        if not load(name).kmsd_args
        and not any("{" in exchange.request for exchange in load(name).exchanges)
    ]


@pytest.fixture(scope="module")
def socat_daemon() -> Iterator[Daemon]:
    pool = DaemonPool()
    try:
        yield pool.get("socat")
    finally:
        codes = pool.close()
    assert codes == [0]


def replay_through_socat(daemon: Daemon, vector: Vector) -> None:
    requests = b"".join(request_bytes(item.request, _NO_VALUES) for item in vector.exchanges)
    assert SOCAT is not None
    result = subprocess.run(
        [SOCAT, "-t", "5", "-", f"UNIX-CONNECT:{daemon.socket_path}"],
        input=requests,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split(b"\n")
    assert replies.pop() == b"", "the output ends with a complete line"
    assert len(replies) == len(vector.exchanges), replies
    bound: dict[str, str] = {}
    for item, reply in zip(vector.exchanges, replies, strict=True):
        check_reply(vector.name, item, reply, bound)


def test_most_vectors_replay_through_socat() -> None:
    assert len(socat_vectors()) >= 20


@pytest.mark.parametrize("name", socat_vectors())
def test_vector_through_socat(socat_daemon: Daemon, name: str) -> None:
    replay_through_socat(socat_daemon, load(name))
