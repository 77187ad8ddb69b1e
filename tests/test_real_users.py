# Real second uids: throw-away system users run clients against a root daemon whose ACL grants
# one of them pg/*; and a daemon run as an unprivileged user is undumpable to its own uid.
from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kms_client import Client, KeyNotFound
from tests.conftest import KMSD, Daemon, make_store
from tests.users import (
    Ran,
    SystemUser,
    UserToolFailed,
    ask,
    audit_lines,
    code_of,
    create_system_user,
    delete_system_user,
    group_exists,
    python_as,
    run_as,
    running,
    user_exists,
    wait_for,
    why_no_system_users,
    yama_restricts_attach,
)

PG, OTHER = "kmst-pg", "kmst-other"
ROOT_NAME = pwd.getpwuid(0).pw_name
EXIT_DENIED = 17  # `kms` exit status for ERR DENIED

#: Runs request lines (sys.argv[2:]) through the stdlib Client on sys.argv[1]; prints
#: {"pid", "uid", "gid", "results": [[code, base64 key of a GET or null], ...]}.
CLIENT = """
socket_path, *lines = sys.argv[1:]
results = []
with Client(socket_path) as client:
    for line in lines:
        try:
            value = client.call(parse_request(line.encode()))
        except KmsError as error:
            results.append([str(error.code), None])
        else:
            key = base64.b64encode(value.key).decode() if isinstance(value, KeyMaterial) else None
            results.append(["OK", key])
print(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "results": results}))
"""
CLIENT_IMPORTS = (
    "import base64, json\n"
    "from kms_client import Client, KeyMaterial, KmsError\n"
    "from kms_client.protocol import parse_request"
)
#: The `kms` command line, arguments in sys.argv[1:].
CLI = "sys.argv[0] = 'kms'\nkms_client.cli.main()"
CLI_IMPORTS = "import gettext, locale, kms_client.cli"  # click translates help texts lazily
#: Which of /proc/<pid>/environ and /proc/<pid>/mem (pid in sys.argv[1]) this process may open.
PROBE = """
results = []
for name in ("environ", "mem"):
    try:
        with open(f"/proc/{sys.argv[1]}/{name}", "rb"):
            results.append("readable")
    except PermissionError:
        results.append("PermissionError")
print(" ".join(results))
"""


@pytest.fixture(scope="session")
def users() -> Iterator[dict[str, SystemUser]]:
    """Two throw-away system users, created for this run and deleted after it."""
    reason = why_no_system_users()
    if reason is not None:
        pytest.skip(f"real-user tests need throw-away system users: {reason}")
    made: dict[str, SystemUser] = {}
    try:
        try:
            for name in (PG, OTHER):
                made[name] = create_system_user(name)  # removes a stale one from a crashed run
        except UserToolFailed as error:
            pytest.skip(f"real-user tests need throw-away system users: {error}")
        yield made
    finally:
        for name in (PG, OTHER):
            delete_system_user(name)


@pytest.fixture(scope="module")
def public_dir() -> Iterator[Path]:
    """A 0755 directory: every user can reach a socket in it (the store inside stays 0700)."""
    path = Path(tempfile.mkdtemp(prefix="kmsu-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


ACL = f"""
# The README's PostgreSQL example, with a throw-away user for postgres.
[[allow]]
users = ["{PG}"]
keys = ["pg/*"]
operations = ["get", "datakey"]

[[allow]]
users = ["{ROOT_NAME}"]
keys = ["*"]
operations = ["get", "enc", "dec", "datakey", "info", "create", "rotate", "rewrap",
              "retire", "restore", "destroy", "config", "rekey"]

# Members of kmst-pg's group, primary or supplementary, may read the metadata of shared/*.
[[allow]]
groups = ["{PG}"]
keys = ["shared/*"]
operations = ["info"]
"""


@pytest.fixture(scope="module")
def root_daemon(users: dict[str, SystemUser], public_dir: Path) -> Iterator[Daemon]:
    """kmsd as root with the PostgreSQL ACL, a world-writable socket, keys pg/db1 and other/key."""
    daemon = make_store(public_dir / "root")
    daemon.root.chmod(0o755)
    (daemon.root / "acl.toml").write_text(ACL)
    daemon.extra_args = [
        "--acl",
        str(daemon.root / "acl.toml"),
        "--audit-log",
        str(daemon.root / "audit.log"),
        "--socket-mode",
        "0666",
    ]
    with running(daemon):
        with Client(daemon.socket_path) as root:
            assert root.create("pg/db1", exportable=True) == 1
            assert root.create("other/key", exportable=True) == 1
            assert root.create("shared/doc") == 1
        yield daemon


def as_client(
    user: SystemUser, daemon: Daemon, *lines: str, groups: tuple[int, ...] = ()
) -> tuple[Ran, list[list[str | None]]]:
    ran = run_as(user, CLIENT, daemon.socket_path, *lines, preload=CLIENT_IMPORTS, groups=groups)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert (report["pid"], report["uid"], report["gid"]) == (ran.pid, user.uid, user.gid)
    results: list[list[str | None]] = report["results"]
    return ran, results


def as_cli(user: SystemUser, daemon: Daemon, *args: str) -> Ran:
    return run_as(user, CLI, "--socket", daemon.socket_path, *args, preload=CLI_IMPORTS)


def audited_as(daemon: Daemon, ran: Ran, user: SystemUser, expected: list[tuple[str, str]]) -> None:
    """The audit names the child's pid with the user's uid and gid, for each of its requests."""
    path = daemon.root / "audit.log"

    def mine() -> list[dict[str, object]]:
        return [r for r in audit_lines(path) if r["pid"] == ran.pid]

    # The client's closing QUIT may be read after the child has exited: wait for all lines.
    wait_for(lambda: len(mine()) >= len(expected), what=f"audit lines of pid {ran.pid}")
    records = mine()
    assert [(r["verb"], r["result"]) for r in records] == expected
    assert {(r["uid"], r["gid"]) for r in records} == {(user.uid, user.gid)}


def test_the_socket_is_open_to_everyone_so_the_acl_decides(root_daemon: Daemon) -> None:
    path = Path(root_daemon.socket_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666
    for directory in (path.parent, path.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) & 0o005 == 0o005


def test_the_granted_user_gets_and_wraps_keys_under_pg(
    users: dict[str, SystemUser], root_daemon: Daemon
) -> None:
    with Client(root_daemon.socket_path) as root:
        key = root.get("pg/db1").key
    ran, results = as_client(
        users[PG],
        root_daemon,
        "GET pg/db1",
        "GET pg/db1 1",
        "DATAKEY pg/db1",
        "DATAKEY pg/db1 64",
        "PING",
    )
    exported = base64.b64encode(key).decode()
    assert results == [["OK", exported], ["OK", exported], ["OK", None], ["OK", None], ["OK", None]]
    audited_as(
        root_daemon,
        ran,
        users[PG],
        [
            ("GET", "OK"),
            ("GET", "OK"),
            ("DATAKEY", "OK"),
            ("DATAKEY", "OK"),
            ("PING", "OK"),
            ("QUIT", "OK"),
        ],
    )


def test_the_granted_user_is_denied_everything_else(
    users: dict[str, SystemUser], root_daemon: Daemon
) -> None:
    lines = [
        "GET other/key",
        "GET pg",
        "GET pgx/db1",
        "ENC pg/db1 aGk=",
        "INFO pg/db1",
        "ROTATE pg/db1",
        "CREATE pg/y",
        "DATAKEY other/key",
    ]
    ran, results = as_client(users[PG], root_daemon, *lines)
    assert [code for code, _ in results] == ["DENIED"] * len(lines)
    audited_as(
        root_daemon,
        ran,
        users[PG],
        [(line.split(" ")[0], "DENIED") for line in lines] + [("QUIT", "OK")],
    )

    cli = as_cli(users[PG], root_daemon, "create", "pg/x")
    assert cli.returncode == EXIT_DENIED, cli.stderr
    assert cli.stdout == ""
    audited_as(root_daemon, cli, users[PG], [("CREATE", "DENIED"), ("QUIT", "OK")])

    with Client(root_daemon.socket_path) as root:  # nothing was changed behind the DENIEDs
        with pytest.raises(KeyNotFound):
            root.info("pg/x")
        with pytest.raises(KeyNotFound):
            root.info("pg/y")
        assert root.info("pg/db1")["latest"] == 1


def test_another_user_is_denied_every_key_but_may_ping(
    users: dict[str, SystemUser], root_daemon: Daemon
) -> None:
    lines = ["PING", "HELLO", "GET pg/db1", "DATAKEY pg/db1", "GET other/key", "CREATE other/new"]
    ran, results = as_client(users[OTHER], root_daemon, *lines)
    assert [code for code, _ in results] == ["OK", "OK", "DENIED", "DENIED", "DENIED", "DENIED"]
    audited_as(
        root_daemon,
        ran,
        users[OTHER],
        [("PING", "OK"), ("HELLO", "OK")]
        + [(line.split(" ")[0], "DENIED") for line in lines[2:]]
        + [("QUIT", "OK")],
    )

    cli = as_cli(users[OTHER], root_daemon, "get", "pg/db1")
    assert cli.returncode == EXIT_DENIED, cli.stderr
    assert cli.stdout == ""  # not a byte of the key
    audited_as(root_daemon, cli, users[OTHER], [("GET", "DENIED"), ("QUIT", "OK")])


def test_group_rules_see_primary_and_supplementary_groups(
    users: dict[str, SystemUser], root_daemon: Daemon
) -> None:
    pg, other = users[PG], users[OTHER]
    # kmst-pg: the group is its primary group.
    _, results = as_client(pg, root_daemon, "INFO shared/doc", "GET shared/doc")
    assert [code for code, _ in results] == ["OK", "DENIED"]
    # kmst-other without the group: refused.
    _, results = as_client(other, root_daemon, "INFO shared/doc")
    assert [code for code, _ in results] == ["DENIED"]
    # kmst-other with kmst-pg's group as a supplementary group (SO_PEERGROUPS): served,
    # and only for what the group rule grants.
    ran, results = as_client(
        other, root_daemon, "INFO shared/doc", "GET pg/db1", "INFO pg/db1", groups=(pg.gid,)
    )
    assert [code for code, _ in results] == ["OK", "DENIED", "DENIED"]
    audited_as(
        root_daemon,
        ran,
        other,
        [("INFO", "OK"), ("GET", "DENIED"), ("INFO", "DENIED"), ("QUIT", "OK")],
    )
    # The group last among 300: past the 256 that Python's getsockopt can read.
    many = (*range(60000, 60299), pg.gid)
    _, results = as_client(other, root_daemon, "INFO shared/doc", groups=many)
    assert [code for code, _ in results] == ["OK"]


def test_root_itself_is_audited_as_uid_0(root_daemon: Daemon) -> None:
    with Client(root_daemon.socket_path) as root:
        root.ping()
    records = [r for r in audit_lines(root_daemon.root / "audit.log") if r["pid"] == os.getpid()]
    assert records
    assert {(r["uid"], r["gid"]) for r in records} == {(0, os.getgid())}


# --------------------------------------------------------------------------- a daemon as a user

RUN_KMSD = "sys.argv[0] = 'kmsd'\nkms_server.cli.main()"


@dataclass
class DaemonAs(Daemon):
    """kmsd started as root, become ``user`` (dumpable again) before its own start-up."""

    user: SystemUser | None = None

    def command(self) -> list[str]:
        assert self.user is not None
        serve = super().command()[len(KMSD) :]
        return [
            *python_as(self.user, RUN_KMSD, preload="import kms_server.cli", dumpable=True),
            *serve,
        ]


def chown_tree(root: Path, user: SystemUser) -> None:
    for directory, _, files in os.walk(root):
        os.chown(directory, user.uid, user.gid)
        for name in files:
            os.chown(Path(directory) / name, user.uid, user.gid)


@pytest.fixture(scope="module")
def other_daemon(users: dict[str, SystemUser], public_dir: Path) -> Iterator[DaemonAs]:
    """kmsd running as kmst-other, over its own store (0700, its own), without an ACL file."""
    other = users[OTHER]
    store = make_store(public_dir / "other")
    chown_tree(store.root, other)
    store.root.chmod(0o755)
    daemon = DaemonAs(store.root, ["--socket-mode", "0666"], user=other)
    with running(daemon):
        yield daemon


def status_ids(pid: int, field: str) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return {int(value) for value in line.split()[1:]}
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def probe(user: SystemUser, pid: int) -> str:
    ran = run_as(user, PROBE, str(pid))
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.strip()


def test_a_daemon_run_by_a_user_is_undumpable_to_that_user(
    users: dict[str, SystemUser], other_daemon: DaemonAs
) -> None:
    other = users[OTHER]
    assert other_daemon.process is not None
    pid = other_daemon.process.pid
    assert status_ids(pid, "Uid") == {other.uid}
    assert status_ids(pid, "Gid") == {other.gid}

    # Controls of the same uid: one started exactly like the daemon but not running kmsd,
    # one `sleep` exec'ed by setpriv. Both are ordinary dumpable processes.
    controls = [
        subprocess.Popen(
            python_as(
                other, "print('ready', flush=True)\nimport time\ntime.sleep(30)", dumpable=True
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
    ]
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        controls.append(
            subprocess.Popen(
                [
                    setpriv,
                    f"--reuid={other.uid}",
                    f"--regid={other.gid}",
                    "--clear-groups",
                    "sleep",
                    "30",
                ],
                text=True,
            )
        )
    try:
        assert controls[0].stdout is not None
        assert controls[0].stdout.readline() == "ready\n"
        if len(controls) > 1:
            wait_for(
                lambda: os.readlink(f"/proc/{controls[1].pid}/exe").endswith("/sleep"),
                what="setpriv to exec sleep",
            )
        # Under Yama ptrace_scope >= 1 even a dumpable non-child's mem is closed: environ decides.
        readable = "readable PermissionError" if yama_restricts_attach() else "readable readable"
        for control in controls:
            assert status_ids(control.pid, "Uid") == {other.uid}
            assert probe(other, control.pid) == readable
        assert probe(other, pid) == "PermissionError PermissionError"
    finally:
        for control in controls:
            control.kill()
            control.communicate()  # reaps it and closes its pipe


def test_without_an_acl_only_the_daemon_uid_is_served(
    users: dict[str, SystemUser], other_daemon: DaemonAs
) -> None:
    # root is a real second uid here: not the daemon's, so refused.
    assert code_of(ask(other_daemon.socket_path, b"CREATE by-root")) == "DENIED"
    assert ask(other_daemon.socket_path, b"PING") == b"OK PONG"

    _, results = as_client(users[PG], other_daemon, "PING", "CREATE by-pg", "INFO mine")
    assert [code for code, _ in results] == ["OK", "DENIED", "DENIED"]

    _, results = as_client(
        users[OTHER], other_daemon, "CREATE mine exportable", "GET mine", "INFO mine"
    )
    assert [code for code, _ in results] == ["OK", "OK", "OK"]
    key_files = list((other_daemon.store / "live" / "keys" / "mine").iterdir())
    assert key_files
    assert {(f.stat().st_uid, f.stat().st_gid) for f in key_files} == {
        (users[OTHER].uid, users[OTHER].gid)
    }


def test_users_are_gone_after_deletion() -> None:
    """delete_system_user also clears stale users (the fixture's start-up relies on it)."""
    if why_no_system_users() is not None:
        pytest.skip(str(why_no_system_users()))
    name = "kmst-tmp"
    delete_system_user(name)
    assert not user_exists(name)
    try:
        create_system_user(name)
        assert user_exists(name)
        again = create_system_user(name)  # a stale one is replaced, not an error
        assert pwd.getpwnam(name).pw_uid == again.uid
        assert [entry.pw_name for entry in pwd.getpwall()].count(name) == 1
        delete_system_user(name)
        assert not user_exists(name)
        assert not group_exists(name)
    finally:
        delete_system_user(name)
