# The `kmsd` command line as operators run it: real subprocesses, real stores, real sockets.
# Checks exit codes and that every failure is one line on stderr; never the wording itself.
from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from kms_server import __version__
from kms_server.crypto import random_bytes
from tests.conftest import (
    KMSD,
    Daemon,
    assert_fails,
    exchange,
    kmsd,
    kmsd_all,
    make_store,
    wait_until_serving,
)

EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_KEK = 4
EXIT_SOCKET = 5


@contextmanager
def serving(
    *args: str | Path, socket_path: Path, log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`kmsd serve ARGS` until the block ends, then SIGTERM; the exit code must be 0."""
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            [*KMSD, "serve", *map(str, args)], stderr=stderr, stdin=subprocess.DEVNULL, cwd=cwd
        )
    try:
        wait_until_serving(socket_path, process, log)
        yield process
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert not socket_path.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def ask(socket_path: Path, line: bytes) -> bytes:
    return exchange(socket_path, line + b"\n")


def python_command(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


def write_kek(path: Path) -> bytes:
    kek = random_bytes(32)
    path.write_text(kek.hex() + "\n")
    path.chmod(0o600)
    return kek


# --------------------------------------------------------------------------- init


def test_init_with_kek_file_makes_a_usable_store(short_tmp: Path) -> None:
    write_kek(short_tmp / "kek")
    result = kmsd("init", "--store", short_tmp / "store", "--kek-file", short_tmp / "kek")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr.decode()
    assert stat.S_IMODE((short_tmp / "store").stat().st_mode) == 0o700
    metadata = json.loads((short_tmp / "store" / "live" / "kms-store.json").read_text())
    assert metadata["kek"]["kind"] == "file"
    daemon = Daemon(short_tmp)
    daemon.start()
    try:
        assert ask(Path(daemon.socket_path), b"CREATE first") == b"OK 1\n"
        assert ask(Path(daemon.socket_path), b"PING") == b"OK PONG\n"
    finally:
        assert daemon.stop() == 0


def test_init_twice_is_refused(short_tmp: Path) -> None:
    write_kek(short_tmp / "kek")
    first = kmsd("init", "--store", short_tmp / "store", "--kek-file", short_tmp / "kek")
    assert first.returncode == 0
    before = (short_tmp / "store" / "live" / "kms-store.json").read_bytes()
    write_kek(short_tmp / "kek2")
    for kek in ("kek", "kek2"):
        assert_fails(
            kmsd("init", "--store", short_tmp / "store", "--kek-file", short_tmp / kek),
            EXIT_STORE,
        )
    assert (short_tmp / "store" / "live" / "kms-store.json").read_bytes() == before


def test_init_refuses_a_non_empty_directory(short_tmp: Path) -> None:
    write_kek(short_tmp / "kek")
    (short_tmp / "store").mkdir()
    (short_tmp / "store" / "data").write_text("precious")
    assert_fails(
        kmsd("init", "--store", short_tmp / "store", "--kek-file", short_tmp / "kek"), EXIT_STORE
    )
    assert os.listdir(short_tmp / "store") == ["data"]


def test_missing_or_double_kek_source_is_a_usage_error(short_tmp: Path) -> None:
    write_kek(short_tmp / "kek")
    store = short_tmp / "store"
    daemon = make_store(short_tmp / "d")
    results = kmsd_all(
        ["init", "--store", store],
        [
            "init",
            "--store",
            store,
            "--kek-file",
            short_tmp / "kek",
            "--passphrase-command",
            python_command("print('x')"),
        ],
        ["serve", "--store", daemon.store, "--socket", daemon.socket_path],
        ["serve", "--socket", daemon.socket_path, "--kek-file", daemon.kek_file],
    )
    for result in results:
        assert_fails(result, EXIT_CONFIG)
    assert not store.exists()
    assert not os.path.lexists(daemon.socket_path)


def test_usage_errors_are_one_line(short_tmp: Path) -> None:
    results = kmsd_all(
        ["bogus"],
        ["init"],
        ["serve", "--bogus"],
        ["serve", "--max-line", "many"],
        ["check-config", "--config"],
    )
    for result in results:
        assert_fails(result, EXIT_CONFIG)
        assert result.stderr.startswith(b"kmsd: error: ")


def test_a_config_that_is_no_text_file_is_a_one_line_error(short_tmp: Path) -> None:
    """/dev/zero filled memory; bytes that are not UTF-8 were a traceback."""
    latin = short_tmp / "latin1.toml"
    latin.write_bytes(b"# caf\xe9\n")
    nul_audit = short_tmp / "nul.toml"
    nul_audit.write_text('audit_log = "/tmp/a\\u0000b"\n')
    daemon = make_store(short_tmp / "d")
    results = kmsd_all(
        ["check-config", "--config", "/dev/zero"],
        ["check-config", "--config", str(latin)],
        ["check-config", "--config", str(nul_audit), "--store", str(daemon.store),
         "--kek-file", str(daemon.kek_file)],
    )  # fmt: skip
    for result in results:
        assert_fails(result, EXIT_CONFIG)
        assert result.stderr.startswith(b"kmsd: error: ")
    # A config through a pipe is read to its end, as any file.
    piped = subprocess.run(
        [*KMSD, "check-config", "--config", "/dev/stdin", "--store", str(daemon.store),
         "--kek-file", str(daemon.kek_file)],
        input=b"max_connections = 9\n",
        capture_output=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr


def test_unreadable_or_malformed_kek_file(short_tmp: Path) -> None:
    store = short_tmp / "store"
    (short_tmp / "short").write_bytes(b"abc\n")
    (short_tmp / "adir").mkdir()
    daemon = make_store(short_tmp / "d")
    bad_files = (short_tmp / "missing", short_tmp / "adir", short_tmp / "short")
    results = kmsd_all(
        *(["init", "--store", store, "--kek-file", kek_file] for kek_file in bad_files),
        *(
            [
                "serve",
                "--store",
                daemon.store,
                "--socket",
                daemon.socket_path,
                "--kek-file",
                kek_file,
            ]
            for kek_file in bad_files
        ),
    )
    for result in results:
        assert_fails(result, EXIT_KEK)
    assert not store.exists()
    assert not os.path.lexists(daemon.socket_path)


def test_passphrase_store_end_to_end(short_tmp: Path) -> None:
    store = short_tmp / "store"
    socket_path = short_tmp / "kms.sock"
    good = python_command("print('correct horse battery staple')")
    result = kmsd("init", "--store", store, "--passphrase-command", good)
    assert result.returncode == 0, result.stderr
    recorded = json.loads((store / "live" / "kms-store.json").read_text())["kek"]
    assert (recorded["kind"], recorded["kdf"]) == ("passphrase", "argon2id")
    assert (recorded["iterations"], recorded["lanes"], recorded["memory_kib"]) == (3, 4, 65536)
    assert len(base64.b64decode(recorded["salt"])) == 16

    with serving(
        "--store",
        store,
        "--socket",
        socket_path,
        "--passphrase-command",
        good,
        socket_path=socket_path,
        log=short_tmp / "serve.log",
    ):
        assert ask(socket_path, b"CREATE pw exportable") == b"OK 1\n"
        assert ask(socket_path, b"GET pw").startswith(b"OK 1 ")

    write_kek(short_tmp / "kek")
    wrong, kek_file, failing = kmsd_all(
        [
            "serve",
            "--store",
            store,
            "--socket",
            socket_path,
            "--passphrase-command",
            python_command("print('correct horse battery stapler')"),
        ],
        ["serve", "--store", store, "--socket", socket_path, "--kek-file", short_tmp / "kek"],
        [
            "serve",
            "--store",
            store,
            "--socket",
            socket_path,
            "--passphrase-command",
            python_command("import sys; sys.exit(3)"),
        ],
    )
    assert_fails(wrong, EXIT_STORE)
    assert b"stapler" not in wrong.stderr
    assert_fails(kek_file, EXIT_KEK)
    assert_fails(failing, EXIT_KEK)
    assert not socket_path.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_starting_is_a_clean_exit(short_tmp: Path, sig: signal.Signals) -> None:
    """A stop while the passphrase command runs (systemctl stop during a slow start): the
    command is ended, nothing is bound, exit 0 and a log line (it was death by SIGTERM)."""
    store, socket_path = short_tmp / "store", short_tmp / "kms.sock"
    words = python_command("print('slow to come')")
    assert kmsd("init", "--store", store, "--passphrase-command", words).returncode == 0
    marker = short_tmp / "command-ran"
    slow = python_command(
        f"import os, pathlib, time; pathlib.Path({str(marker)!r}).write_text(str(os.getpid()));"
        " time.sleep(30)"
    )
    process = subprocess.Popen(
        [*KMSD, "serve", "--store", str(store), "--socket", str(socket_path),
         "--passphrase-command", slow],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    command_pid = int(marker.read_text())
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert f"{sig.name} received while starting: stopped".encode() in stderr
    assert b"Traceback" not in stderr
    assert not socket_path.exists()
    with pytest.raises(ProcessLookupError):  # the command was ended (and reaped) with it
        os.kill(command_pid, 0)


def test_a_closed_stderr_does_not_send_the_log_into_the_store_lock(short_tmp: Path) -> None:
    """`kmsd serve 2>&-`: the store lock took descriptor 2, and the log and the audit trail
    went into it, over the socket path `kmsd rekey` reads there."""
    daemon = make_store(short_tmp / "d")
    process = subprocess.Popen(
        ["sh", "-c", 'exec "$@" 2>&-', "sh", *daemon.command()], stdin=subprocess.DEVNULL
    )
    try:
        wait_until_serving(Path(daemon.socket_path), process, daemon.log)
        assert exchange(daemon.socket_path, b"CREATE k\n") == b"OK 1\n"
        assert (daemon.store / ".lock").read_text() == f"{Path(daemon.socket_path).absolute()}\n"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0


def test_a_passphrase_command_gets_open_standard_descriptors_under_a_closed_stderr(
    short_tmp: Path,
) -> None:
    """The /dev/null put on a closed descriptor 2 was not inheritable: the command ran with
    descriptor 2 closed, so its first open file took it, and its diagnostics went there."""
    command = python_command("import os; os.fstat(2); print('words')")
    result = subprocess.run(
        ["sh", "-c", 'exec "$@" 2>&-', "sh", *KMSD, "init", "--store",
         str(short_tmp / "store"), "--passphrase-command", command],
        capture_output=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout


def test_file_store_refuses_a_passphrase_source(short_tmp: Path) -> None:
    daemon = make_store(short_tmp / "d")
    assert_fails(
        kmsd(
            "serve",
            "--store",
            daemon.store,
            "--socket",
            daemon.socket_path,
            "--passphrase-command",
            python_command("print('x')"),
        ),
        EXIT_KEK,
    )


# --------------------------------------------------------------------------- serve errors


def test_serve_store_and_socket_errors(short_tmp: Path) -> None:
    stores = {name: make_store(short_tmp / name) for name in ("d", "open", "long", "nodir")}
    stores["open"].store.chmod(0o755)  # a store group and others may enter

    def serve(
        name: str, *extra: object, store: object = None, socket: object = None
    ) -> list[object]:
        daemon = stores[name]
        return [
            "serve",
            "--store",
            store or daemon.store,
            "--socket",
            socket or daemon.socket_path,
            "--kek-file",
            daemon.kek_file,
            *extra,
        ]

    cases = {
        EXIT_STORE: [serve("d", store=short_tmp / "nostore"), serve("open")],
        EXIT_SOCKET: [
            serve("long", socket=short_tmp / ("s" * 120)),
            serve("nodir", socket=short_tmp / "missing-dir" / "kms.sock"),
        ],
        EXIT_CONFIG: [
            serve("d", "--socket-mode", "1777"),
            serve("d", "--max-line", "10"),
            serve("d", "--max-connections", "0"),
        ],
    }
    results = kmsd_all(*(args for group in cases.values() for args in group))
    expected = [exit_code for exit_code, group in cases.items() for _ in group]
    for result, exit_code in zip(results, expected, strict=True):
        assert_fails(result, exit_code)
    assert not os.path.lexists(stores["d"].socket_path)


# --------------------------------------------------------------------------- --config


def test_a_kek_file_kmsd_may_not_read_is_a_kek_error(short_tmp: Path) -> None:
    """Root without capabilities (setpriv) cannot read a mode-0000 file, like any user."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to drop the capabilities")
    kek = short_tmp / "kek"
    write_kek(kek)
    kek.chmod(0)
    capless = [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--", *KMSD]
    store = short_tmp / "store"
    result = subprocess.run(
        [*capless, "init", "--store", str(store), "--kek-file", str(kek)],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert_fails(result, EXIT_KEK)
    assert not store.exists()


def test_a_kek_file_every_user_may_write_is_refused(short_tmp: Path) -> None:
    """Anyone could have put their own KEK there: init, serve and verify refuse it."""
    kek = short_tmp / "kek"
    daemon = make_store(short_tmp / "d")
    shutil.copy(daemon.kek_file, kek)  # the store's own KEK: refused for its mode alone
    kek.chmod(0o666)
    store = short_tmp / "store"
    results = kmsd_all(
        ["init", "--store", store, "--kek-file", kek],
        ["serve", "--store", daemon.store, "--socket", daemon.socket_path, "--kek-file", kek],
        ["verify", "--store", daemon.store, "--kek-file", kek],
    )
    for result in results:
        assert_fails(result, EXIT_KEK)
    assert not store.exists()
    assert not os.path.lexists(daemon.socket_path)


def test_a_kek_file_every_user_may_read_is_used_with_a_warning(short_tmp: Path) -> None:
    """Accepted, so a service does not stop at a restart over a mode, but said each time."""
    kek = short_tmp / "kek"
    write_kek(kek)
    kek.chmod(0o644)
    result = kmsd("init", "--store", short_tmp / "store", "--kek-file", kek)
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().count("\n") == 1  # one warning line, and it names the file
    assert result.stderr.startswith(b"kmsd: warning: ")
    assert str(kek).encode() in result.stderr
    daemon = Daemon(short_tmp)
    daemon.start()
    try:
        assert ask(Path(daemon.socket_path), b"PING") == b"OK PONG\n"
    finally:
        assert daemon.stop() == 0
    assert f"KEK file {kek} is readable by every user" in daemon.log.read_text()
    verified = kmsd("verify", "--store", short_tmp / "store", "--kek-file", kek)
    assert verified.returncode == 0, verified.stdout
    assert verified.stderr.startswith(b"kmsd: warning: KEK file ")
    kek.chmod(0o600)
    quiet = kmsd("init", "--store", short_tmp / "store2", "--kek-file", kek)
    assert quiet.returncode == 0
    assert quiet.stderr == b""


def test_config_file_and_flags_that_override_it(short_tmp: Path) -> None:
    daemon = make_store(short_tmp / "d")
    config_socket = short_tmp / "config.sock"
    flag_socket = short_tmp / "flag.sock"
    config = short_tmp / "kmsd.toml"
    config.write_text(
        f'store = "{daemon.store}"\n'
        f'socket = "{config_socket}"\n'
        f'kek_file = "{daemon.kek_file}"\n'
        'socket_mode = "0660"\n'
        "max_connections = 8\n"
        "idle_timeout = 30\n"
    )
    with serving("--config", config, socket_path=config_socket, log=short_tmp / "a.log"):
        assert stat.S_IMODE(config_socket.lstat().st_mode) == 0o660
        assert ask(config_socket, b"CREATE from-config") == b"OK 1\n"
    with serving(
        "--config",
        config,
        "--socket",
        flag_socket,
        "--socket-mode",
        "0600",
        socket_path=flag_socket,
        log=short_tmp / "b.log",
    ):
        assert not config_socket.exists()
        assert stat.S_IMODE(flag_socket.lstat().st_mode) == 0o600
        assert ask(flag_socket, b"INFO from-config").startswith(b"OK {")
    # A wrong KEK in the file, the right one on the command line: the flag wins.
    (short_tmp / "wrong-kek").write_text(random_bytes(32).hex())
    config.write_text(
        config.read_text().replace(str(daemon.kek_file), str(short_tmp / "wrong-kek"))
    )
    assert_fails(kmsd("serve", "--config", config), EXIT_STORE)
    with serving(
        "--config",
        config,
        "--kek-file",
        daemon.kek_file,
        socket_path=config_socket,
        log=short_tmp / "c.log",
    ):
        assert ask(config_socket, b"PING") == b"OK PONG\n"


def test_init_reads_the_serve_config_file(short_tmp: Path) -> None:
    """One TOML file for init and serve: its store and KEK source; flags still win."""
    kek = short_tmp / "kek"
    write_kek(kek)
    store = short_tmp / "store"
    socket_path = short_tmp / "kms.sock"
    config = short_tmp / "kmsd.toml"
    config.write_text(f'store = "{store}"\nkek_file = "{kek}"\nsocket = "{socket_path}"\n')
    result = kmsd("init", "--config", config)
    assert result.returncode == 0, result.stderr
    assert (store / "live").exists()
    other = short_tmp / "other"
    assert kmsd("init", "--config", config, "--store", other).returncode == 0
    assert (other / "live").exists()
    with serving("--config", config, socket_path=socket_path, log=short_tmp / "kmsd.log"):
        assert ask(socket_path, b"PING") == b"OK PONG\n"


def test_config_file_errors(short_tmp: Path) -> None:
    daemon = make_store(short_tmp / "d")
    base = (
        f'store = "{daemon.store}"\nsocket = "{daemon.socket_path}"\n'
        f'kek_file = "{daemon.kek_file}"\n'
    )
    configs = []
    for index, extra in enumerate(
        (
            'sockett = "/tmp/typo"\n',
            'max_line = "big"\n',
            "socket_mode = 440\n",  # a TOML number is decimal: 440 would be 0o670
            "idle_timeout = -1\n",
            "this is not toml\n",
        )
    ):
        configs.append(short_tmp / f"kmsd{index}.toml")
        configs[-1].write_text(base + extra)
    configs.append(short_tmp / "missing.toml")
    for result in kmsd_all(*(["serve", "--config", config] for config in configs)):
        assert_fails(result, EXIT_CONFIG)
    assert not os.path.lexists(daemon.socket_path)


# --------------------------------------------------------------------------- --dev


def test_dev_mode(short_tmp: Path) -> None:
    cwd = short_tmp / "dev"
    cwd.mkdir()
    socket_path = cwd / "kms.sock"
    log = short_tmp / "dev.log"
    with serving("--dev", socket_path=socket_path, log=log, cwd=cwd):
        assert stat.S_IMODE((cwd / ".kms-dev").stat().st_mode) == 0o700
        assert stat.S_ISSOCK(socket_path.lstat().st_mode)
        first = ask(socket_path, b"GET demo")
        assert first.startswith(b"OK 1 ")
        assert len(base64.b64decode(first.split()[2])) == 32
    assert "not for production" in log.read_text().lower()
    metadata = cwd / ".kms-dev" / "live" / "kms-store.json"
    store_id = json.loads(metadata.read_text())["store_id"]
    with serving("--dev", socket_path=socket_path, log=log, cwd=cwd):
        assert ask(socket_path, b"GET demo") == first
        info = json.loads(ask(socket_path, b"INFO demo")[3:])
        assert info["latest"] == 1
        assert info["exportable"] is True
    assert json.loads(metadata.read_text())["store_id"] == store_id
    for path in (cwd / ".kms-dev").rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# --------------------------------------------------------------------------- help, version


def test_help_and_version() -> None:
    script = Path(sys.executable).parent / "kmsd"
    with ThreadPoolExecutor(max_workers=2) as pool:
        version = pool.submit(
            subprocess.run,
            [str(script), "--version"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        help_text, serve_help = kmsd_all(["--help"], ["serve", "--help"])
    assert help_text.returncode == 0
    assert b"init" in help_text.stdout
    assert b"serve" in help_text.stdout
    assert serve_help.returncode == 0
    assert b"--passphrase-command" in serve_help.stdout
    assert version.result().returncode == 0
    assert __version__.encode() in version.result().stdout


# --------------------------------------------------------------------------- non-finite numbers


def exit_before_serving(
    args: Sequence[str | Path], socket_path: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run `kmsd ARGS`; fail the test if it gets as far as serving on ``socket_path``."""
    process = subprocess.Popen(
        [*KMSD, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while process.poll() is None and not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if process.poll() is None:
        process.kill()
        process.communicate()
        pytest.fail(f"kmsd {' '.join(map(str, args))} did not refuse its settings; it served")
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "case",
    [
        "idle-timeout-nan",
        "grace-period-nan",
        "config-idle-timeout-nan",
        "passphrase-timeout-nan",
        "passphrase-timeout-inf",
    ],
)
def test_non_finite_durations_are_config_errors(short_tmp: Path, case: str) -> None:
    """NaN/inf durations are configuration errors, refused before serving.

    Regression (fixed in 860080b, config._coerce): --idle-timeout nan crashed the
    daemon on its first connection, --grace-period nan at SIGTERM, and
    --passphrase-timeout nan/inf inside subprocess.communicate, each with a traceback.
    """
    daemon = make_store(short_tmp / "d")
    socket_path = Path(daemon.socket_path)
    serve = daemon.command()[len(KMSD) :]
    if case.startswith("passphrase-timeout"):
        result = kmsd(
            "init",
            "--store",
            short_tmp / "pw",
            "--passphrase-command",
            python_command("print('pw')"),
            "--passphrase-timeout",
            case.rsplit("-", maxsplit=1)[-1],
        )
    elif case == "config-idle-timeout-nan":
        config = short_tmp / "nan.toml"
        config.write_text(
            f'store = "{daemon.store}"\nsocket = "{socket_path}"\n'
            f'kek_file = "{daemon.kek_file}"\nidle_timeout = nan\n'
        )
        result = exit_before_serving(["serve", "--config", config], socket_path)
    else:
        flag = "--" + case.removesuffix("-nan")
        result = exit_before_serving([*serve, flag, "nan"], socket_path)
    assert_fails(result, EXIT_CONFIG)


def test_a_damaged_rotation_index_stops_serve_with_one_line_and_the_store_exit_code(
    short_tmp: Path,
) -> None:
    daemon = make_store(short_tmp / "d")
    (daemon.store / "live" / "rotation.seal").write_bytes(b"not a sealed document")
    result = kmsd(*daemon.command()[len(KMSD) :])
    assert result.returncode == 3
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr
    log_line, error_line = stderr.splitlines()  # the log names the file, then one error line
    assert "rotation.seal failed its integrity check" in log_line
    assert error_line.startswith("kmsd: error: ")
    assert not Path(daemon.socket_path).exists()
