# `kmsd`: the daemon's command line (init, serve); every failure is one line and an exit code.
# Start-up order lives here: settings, KEK, store, socket, serve; no request handling.
"""The ``kmsd`` command.

Exit codes: 0 success; 1 unexpected error; 2 usage or configuration error;
3 store error (missing, damaged, locked, wrong KEK); 4 KEK source error (file
unreadable, passphrase command failed, Transit refused or unreachable within
--transit-start-timeout); 5 socket error (path taken by a live
daemon or a non-socket file, cannot bind); 6 `verify` found damage; 7 `rekey`
through the running daemon refused or cut short (the message says which).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import trio

from kms_client.cli import OneLineUsageGroup
from kms_client.errors import ConnectionFailed, KmsError, Timeout
from kms_client.protocol import Rekey
from kms_client.sync import Client
from kms_server import __version__, maintenance, systemd
from kms_server.acl import Acl, AclError
from kms_server.audit import AuditError, AuditLog
from kms_server.config import ConfigError, Settings, load
from kms_server.crypto import KEY_SIZE, random_bytes, wipe
from kms_server.dispatch import Dispatcher
from kms_server.files import replace_file, write_new_file
from kms_server.hardening import forbid_core_dumps, harden_process
from kms_server.kek import (
    TRANSIT_KIND,
    KekError,
    KekFile,
    KekSource,
    PassphraseCommand,
    SourceRecordDamaged,
    exposure_of,
    obtain_for_store,
)
from kms_server.maintenance import online_rekeyer
from kms_server.server import (
    AccessControl,
    Reloaded,
    ReloadRejected,
    Server,
    ServerError,
    StoppedWhileStarting,
    StopSignals,
    bind_unix_socket,
    remove_socket,
    run,
)
from kms_server.sink import StderrLogHandler
from kms_server.store import (
    LIVE_LINK,
    LOCK_NAME,
    METADATA_NAME,
    WRITE_LOCK_NAME,
    KeyFileDamaged,
    KeyStore,
    MetadataDamaged,
    StoreError,
    check_private,
    init_store,
    live_generation,
    locked,
    new_store_id,
    read_metadata,
    serving_socket,
)

if TYPE_CHECKING:
    from kms_server.transit import HealthWatch, TransitSource

log = logging.getLogger("kmsd")

EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_KEK = 4
EXIT_SOCKET = 5
EXIT_DAMAGED = 6
EXIT_REFUSED = 7

#: Paths are checked by the code that opens them, which knows the exit code: click's own
#: readability check made a KEK file kmsd may not read a usage error (2), not a KEK one (4).
PATH = click.Path(path_type=Path, readable=False)

DEV_STORE = Path(".kms-dev")
DEV_KEK_NAME = "dev-kek.hex"
DEV_SOCKET = Path("kms.sock")
DEV_KEY = "demo"

_EXIT_FOR: dict[type[Exception], int] = {
    ConfigError: EXIT_CONFIG,
    StoreError: EXIT_STORE,
    KeyFileDamaged: EXIT_STORE,
    SourceRecordDamaged: EXIT_STORE,
    KekError: EXIT_KEK,
    ServerError: EXIT_SOCKET,
    systemd.ActivationError: EXIT_SOCKET,
    AclError: EXIT_CONFIG,
    AuditError: EXIT_CONFIG,
}


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"kmsd: error: {message}", err=True)
    sys.exit(code)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Known failures become ``kmsd: error: ...`` and their exit code, never a traceback."""
    try:
        yield
    except tuple(_EXIT_FOR) as exc:
        fail(str(exc), next(code for kind, code in _EXIT_FOR.items() if isinstance(exc, kind)))
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        fail(
            f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
            EXIT_UNEXPECTED,
        )


def setup_logging(verbose: bool) -> None:
    """The daemon's log on stderr, written so that a reader that stalls (journald) loses
    lines instead of freezing the daemon."""
    handler = StderrLogHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s kmsd[%(process)d] %(levelname)s %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def store_option(required: bool) -> Callable[[Any], Any]:
    return click.option(
        "--store",
        type=PATH,
        required=required,
        help="Store directory (created 0700 by init).",
    )


def transit_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """How to reach Transit (shared by every command that may use a Transit KEK source)."""
    options = [
        click.option(
            "--transit-key",
            default=None,
            metavar="NAME",
            help="Transit key (a derived one) wrapping the root; needed by init, "
            "later read from the store.",
        ),
        click.option("--transit-mount", default=None, help="Transit mount path (transit)."),
        click.option(
            "--transit-token-file",
            type=PATH,
            default=None,
            help="File holding the OpenBao/Vault token (read again after a 403).",
        ),
        click.option(
            "--transit-role-id-file",
            type=PATH,
            default=None,
            help="AppRole role-id file (with --transit-secret-id-file, instead of a token).",
        ),
        click.option(
            "--transit-secret-id-file",
            type=PATH,
            default=None,
            help="AppRole secret-id file.",
        ),
        click.option(
            "--transit-ca",
            type=PATH,
            default=None,
            help="CA certificate file for the key service's TLS.",
        ),
        click.option("--transit-namespace", default=None, help="OpenBao/Vault namespace."),
        click.option(
            "--transit-start-timeout",
            type=float,
            default=None,
            help="Seconds to retry while no Transit node can answer (60).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def kek_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = transit_options(func)
    func = click.option(
        "--kek-transit",
        default=None,
        metavar="URL[,URL...]",
        help="The root key lives wrapped by OpenBao/Vault Transit at these nodes (tried in turn).",
    )(func)
    func = click.option(
        "--passphrase-timeout",
        type=float,
        default=None,
        help="Seconds the passphrase command may take (default 30).",
    )(func)
    func = click.option(
        "--passphrase-command",
        default=None,
        metavar="CMD",
        help="Command (run without a shell) whose first output line is the passphrase; "
        "the KEK is Argon2id of it.",
    )(func)
    return click.option(
        "--kek-file",
        type=PATH,
        default=None,
        help="File holding the KEK: 32 raw bytes or 64 hex characters.",
    )(func)


class KmsdGroup(OneLineUsageGroup):
    error_prefix = "kmsd: error: "


@click.group(
    cls=KmsdGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=__doc__
)
@click.version_option(__version__, prog_name="kmsd")
def main() -> None:
    """kmsd: a key-management daemon; the KEK stays here, clients ask over a Unix socket."""
    hold_standard_descriptors()
    for warning in forbid_core_dumps():  # before any command reads a KEK
        click.echo(f"kmsd: warning: {warning}", err=True)


def hold_standard_descriptors() -> None:
    """Put ``/dev/null`` on each of descriptors 0, 1 and 2 that is closed (``kmsd 2>&-``).

    Otherwise the next file opened takes the free number, and what is written to
    stderr (the log, the default audit trail) would go into it: the store's lock file.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: ``fd``
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # a passphrase command gets it too


@main.command()
@store_option(required=False)
@kek_options
@click.option(
    "--config",
    "config_file",
    type=PATH,
    default=None,
    help="The serve TOML file: its store and KEK settings; flags win.",
)
def init(store: Path | None, config_file: Path | None, **kek_settings: Any) -> None:
    """Create a new, empty key store sealed under a KEK source."""
    with one_line_errors():
        settings = settings_from(config_file, {"store": store, **kek_settings})
        store = settings.require_store()
        source = for_a_new_root(settings.kek_source())
        store_id = new_store_id()
        description = source.describe_new(store_id)
        kek = source.obtain(description, store_id)
        try:
            metadata = init_store(store, kek, description, utc_now(), store_id=store_id)
        finally:
            wipe(kek)
        click.echo(f"initialised store {store} (id {metadata.store_id}, KEK source: {source.kind})")
        warn_if_exposed(source, say_warning)


def as_transit(source: KekSource) -> TransitSource | None:
    """``source`` if it is a Transit source.

    Told by its kind, and the module imported only then: hvac and requests take about
    90 ms to import, which every run of kmsd would pay though few stores use Transit.
    """
    if source.kind != TRANSIT_KIND:
        return None
    from kms_server.transit import TransitSource  # noqa: PLC0415 - see above

    assert isinstance(source, TransitSource)  # noqa: S101 - the only source of that kind
    return source


def for_a_new_root(source: KekSource) -> KekSource:
    """``source``, checked for wrapping a new root: Transit needs its key name (exit 2)."""
    transit = as_transit(source)
    if transit is not None and transit.key is None:
        raise ConfigError("a new Transit-wrapped root needs the Transit key name (--transit-key)")
    return source


def say_warning(message: str) -> None:
    click.echo(f"kmsd: warning: {message}", err=True)


def warn_if_exposed(source: KekSource, say: Callable[[str], None]) -> None:
    """Say that a secret file every user may read should be 0600 (once the KEK was right).

    The secrets: a KEK file, or the Transit token or AppRole secret-id, either of which
    lets its reader have Transit unwrap the root of this store.
    """
    secrets: list[tuple[Path | None, str]] = []
    if isinstance(source, KekFile):
        secrets.append((source.path, "KEK file"))
    elif (transit := as_transit(source)) is not None:
        secrets += [
            (transit.token_file, "Transit token file"),
            (transit.secret_id_file, "AppRole secret-id file"),
        ]
    for path, what in secrets:
        if path is not None and (exposure := exposure_of(path, what)) is not None:
            say(exposure)


def create_dev_store() -> Settings:
    """The ``--dev`` store: ``./.kms-dev`` with a random KEK file inside and a ``demo`` key."""
    kek_file = DEV_STORE / DEV_KEK_NAME
    if not (DEV_STORE / LIVE_LINK).exists():
        DEV_STORE.mkdir(mode=0o700, exist_ok=True)
        if not kek_file.exists():
            fresh = bytearray(random_bytes(KEY_SIZE))
            write_new_file(kek_file, fresh.hex().encode() + b"\n")
            wipe(fresh)
        source = KekFile(kek_file)
        description = source.describe_new()
        kek = source.obtain(description)
        try:
            init_store(DEV_STORE, kek, description, utc_now(), tolerate=frozenset({DEV_KEK_NAME}))
        finally:
            wipe(kek)
    return Settings(store=DEV_STORE, socket=DEV_SOCKET, kek_file=kek_file)


def open_store(settings: Settings, source: KekSource) -> KeyStore:
    """Obtain the KEK and open the store; a wrong KEK fails here, before any socket exists."""
    store_dir = settings.require_store()
    metadata = read_metadata(store_dir)
    kek = obtain_for_store(source, metadata.kek, metadata.store_id)
    try:
        return KeyStore(store_dir, kek, clock=utc_now)
    finally:
        wipe(kek)


def serve_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The settings of ``serve``, shared with ``check-config``."""
    options = [
        click.option(
            "--config",
            "config_file",
            type=PATH,
            default=None,
            help="TOML file with the same settings; flags win.",
        ),
        store_option(required=False),
        click.option(
            "--socket",
            "socket_path",
            type=PATH,
            default=None,
            help="Unix socket path (default /run/kms/kms.sock).",
        ),
        click.option("--socket-mode", default=None, help="Socket permissions, octal (0600)."),
        kek_options,
        click.option("--max-line", type=int, default=None, help="Longest request line (1 MiB)."),
        click.option("--max-connections", type=int, default=None, help="Connections (1024)."),
        click.option(
            "--idle-timeout",
            type=float,
            default=None,
            help="Seconds a connection may stay silent or take to send a line (300).",
        ),
        click.option(
            "--grace-period",
            type=float,
            default=None,
            help="Seconds in-flight requests get at shutdown (10).",
        ),
        click.option(
            "--counter-flush-interval",
            type=float,
            default=None,
            help="Seconds between writes of usage counters (5).",
        ),
        click.option(
            "--rotation-check-interval",
            type=float,
            default=None,
            help="Seconds between checks for keys due for automatic rotation (60).",
        ),
        click.option(
            "--acl",
            type=PATH,
            default=None,
            help="ACL file (TOML). Without one, only kmsd's own uid may use it.",
        ),
        click.option(
            "--audit-log",
            type=PATH,
            default=None,
            help="Append the audit trail (JSON lines) here, 0600; default stderr.",
        ),
        click.option(
            "--transit-health-interval",
            type=float,
            default=None,
            help="Seconds between checks that Transit could unwrap the root again (60).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def settings_from(
    config_file: Path | None, options: dict[str, Any], *, reloading: bool = False
) -> Settings:
    """Merge the TOML file and the flags (which win) into validated settings."""
    overrides = {("socket" if name == "socket_path" else name): v for name, v in options.items()}
    return load(config_file, overrides, regular_file_only=reloading)


@main.command()
@serve_options
@click.option(
    "--dev",
    is_flag=True,
    help="Development default: ./.kms-dev store with a random KEK file, ./kms.sock, "
    "an exportable key 'demo'. Not for production.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def serve(config_file: Path | None, dev: bool, verbose: bool, **options: Any) -> None:
    """Serve protocol v1 on a Unix socket until SIGTERM or SIGINT (SIGHUP reloads)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload request during start-up is moot
    stop = StopSignals()
    stop.install()
    setup_logging(verbose)
    try:
        start_and_serve(config_file, dev, options, stop)
    except StoppedWhileStarting as stopped:
        log.info("%s received while starting: stopped", stopped)


def start_and_serve(
    config_file: Path | None, dev: bool, options: dict[str, Any], stop: StopSignals
) -> None:
    with one_line_errors():
        if dev:
            for line in (
                "DEVELOPMENT MODE: the KEK lies in a file beside the keys it protects.",
                "DEVELOPMENT MODE: this is NOT for production. Use `kmsd init` and a real KEK.",
            ):
                log.warning(line)
            dev_settings = create_dev_store()
            defaults = {
                "store": dev_settings.store,
                "socket_path": dev_settings.socket,
                "kek_file": dev_settings.kek_file,
            }
            options = defaults | {k: v for k, v in options.items() if v is not None}
        settings = settings_from(config_file, options)
        access = load_access(settings)
        for warning in harden_process():
            log.warning("%s", warning)
        source = settings.kek_source()
        store_handle = open_store(settings, source)
        warn_if_exposed(source, log.warning)
        try:
            # From here a SIGTERM is remembered, not raised: the socket is removed, keys wiped.
            stop.begin_serving()
            if dev:
                ensure_demo_key(store_handle)
            reread = rereader(config_file, options, settings)
            serve_store(settings, store_handle, access, source, reread, stop)
        finally:
            store_handle.close()


@main.command("check-config")
@serve_options
def check_config(config_file: Path | None, **options: Any) -> None:
    """Validate settings and the ACL without starting (and without reading the KEK).

    Also what `serve` would stop on before reading the KEK: a directory that is not a
    store, a KEK file it may not read, an audit log it cannot open. With `--acl` and
    no store, only the ACL: what an operator checks after editing it.
    """
    with one_line_errors():
        settings = settings_from(config_file, options)
        if settings.store is None and settings.acl is not None:
            acl = Acl.load(settings.acl)
            click.echo(f"ACL OK: {acl.source} ({len(acl.rules)} rules)")
            return
        read_metadata(settings.require_store())
        settings.kek_source()
        secret_files = [("KEK file", settings.kek_file)]
        if settings.kek_transit is not None:  # its credentials are read only then
            secret_files += [
                ("Transit token file", settings.transit_token_file),
                ("Transit AppRole role-id file", settings.transit_role_id_file),
                ("Transit AppRole secret-id file", settings.transit_secret_id_file),
            ]
        for what, path in secret_files:
            if path is not None and not os.access(path, os.R_OK):
                raise KekError(f"cannot read {what} {path}")
        if settings.audit_log is not None:
            AuditLog.check_sink(settings.audit_log)  # and leaves it as it was
        access = load_access(settings)
        click.echo(f"configuration OK; ACL: {access.acl.source} ({len(access.acl.rules)} rules)")


def load_access(settings: Settings) -> AccessControl:
    """The ACL in force: the file's, or the daemon's own uid alone. Bad files stop here."""
    if settings.acl is None:
        return AccessControl(Acl.owner_only(os.getuid()), None)
    return AccessControl(Acl.load(settings.acl), settings.acl)


def announce_access(access: AccessControl) -> None:
    if access.path is None:
        log.warning(
            "no ACL file (--acl): %s may use the daemon, nobody else",
            access.acl.source.removeprefix("default: "),
        )
    elif not access.acl.rules:
        log.warning("ACL %s has no rules: nobody may use a key", access.path)
    else:
        log.info("ACL %s: %d rules", access.path, len(access.acl.rules))


def ensure_demo_key(store: KeyStore) -> None:
    if not store.exists(DEV_KEY):
        store.add(store.write_version(DEV_KEY, 1, exportable=True))
        log.info("created exportable key %r", DEV_KEY)


def watch_transit(settings: Settings, source: KekSource) -> HealthWatch | None:
    """While serving from memory, check now and then that Transit could unwrap the root again."""
    transit = as_transit(source)
    if transit is None:
        return None
    from kms_server.transit import HealthWatch  # noqa: PLC0415 - only for Transit (as_transit)

    def report(status: str) -> None:
        if status == "ok":
            log.info("Transit: ok again")
        else:
            log.warning("Transit %s (serving from memory; a restart would fail now)", status)

    store_dir = settings.require_store()
    watch = HealthWatch(
        transit, settings.transit_health_interval, report, lambda: read_metadata(store_dir).kek
    )
    watch.start()
    return watch


#: The settings a reload (SIGHUP) puts in force; the others need a restart.
RELOADABLE = frozenset({"acl", "audit_log"})


def rereader(
    config_file: Path | None, options: dict[str, Any], serving: Settings
) -> Callable[[], Reloaded]:
    """What SIGHUP reads: the config file again, with the flags winning as at start.

    A config that came through a pipe (``--config /dev/stdin``) cannot be read again:
    its settings stay, and a reload reads their ACL again and reopens their audit log.
    A config file replaced by something that is not a regular file is rejected.
    """
    from_pipe = config_file is not None and not config_file.is_file()

    def reread() -> Reloaded:
        try:
            fresh = serving if from_pipe else settings_from(config_file, options, reloading=True)
            access = load_access(fresh)
        except (ConfigError, AclError) as error:
            raise ReloadRejected(str(error)) from None
        restart_only = tuple(  # names only: a passphrase command may hold a passphrase
            setting.name
            for setting in fields(Settings)
            if setting.name not in RELOADABLE
            and getattr(fresh, setting.name) != getattr(serving, setting.name)
        )
        return Reloaded(access.acl, fresh.acl, fresh.audit_log, restart_only)

    return reread


def serve_store(
    settings: Settings,
    store: KeyStore,
    access: AccessControl,
    source: KekSource,
    reread: Callable[[], Reloaded],
    stop: StopSignals,
) -> None:
    audit = AuditLog(settings.audit_log)
    inherited = systemd.inherited_listener()
    listener = inherited or bind_unix_socket(settings.socket, settings.socket_mode)
    # A socket systemd passed us is systemd's: we neither chmod nor remove it.
    bound = None if inherited else os.lstat(settings.socket)
    watch = None
    try:
        watch = watch_transit(settings, source)
        rekeyer = online_rekeyer(store, settings.passphrase_timeout)
        dispatcher = Dispatcher(
            store, __version__, rekeyer, (lambda: watch.status) if watch else (lambda: "ok")
        )
        server = Server(dispatcher, listener, settings.limits(), access, audit, reread)
        # Where clients (and `kmsd rekey`) reach us: a socket systemd passed is wherever
        # its ListenStream= put it, whatever our configuration says.
        serving = Path(listener.getsockname()) if inherited else settings.socket
        store.announce(serving)
        mode = (
            "passed by systemd, mode per SocketMode="
            if inherited
            else f"mode {settings.socket_mode:04o}"
        )
        log.info(
            "serving store %s on %s (%s), KEK source: %s",
            settings.store,
            serving,
            mode,
            store.metadata.kek["kind"],
        )
        announce_access(access)
        trio.run(run, server, f"store {settings.store} on {serving}", stop)
    finally:
        if watch is not None:
            watch.stop()
        listener.close()
        audit.close()
        if bound is not None:
            remove_socket(settings.socket, bound)
    log.info("stopped")


# --------------------------------------------------------------------------- lifecycle


def kek_source_options(prefix: str, what: str) -> Callable[[Callable[..., Any]], Any]:
    def decorate(func: Callable[..., Any]) -> Any:
        func = click.option(
            f"--{prefix}kek-transit",
            default=None,
            metavar="URL[,URL...]",
            help=f"The {what} KEK: a root wrapped by Transit (with the --transit-* options).",
        )(func)
        func = click.option(
            f"--{prefix}passphrase-command",
            default=None,
            metavar="CMD",
            help=f"The {what} KEK from a passphrase command (Argon2id).",
        )(func)
        return click.option(
            f"--{prefix}kek-file",
            type=PATH,
            default=None,
            help=f"The {what} KEK file: 32 raw bytes or 64 hex characters.",
        )(func)

    return decorate


def kek_source_from(
    kek_file: Path | None,
    command: str | None,
    timeout: float | None,
    transit_urls: str | None = None,
    transit: dict[str, Any] | None = None,
    flag_prefix: str = "",
) -> KekSource:
    """The KEK source of ``kmsd rekey``'s old or new flags (named so in errors)."""
    return settings_from(
        None,
        {
            "kek_file": kek_file,
            "passphrase_command": command,
            "passphrase_timeout": timeout,
            "kek_transit": transit_urls,
            **(transit or {}),
        },
    ).kek_source(flag_prefix)


def given(*values: object) -> bool:
    return any(value is not None for value in values)


@main.command()
@store_option(required=True)
@kek_source_options("old-", "current")
@kek_source_options("new-", "new")
@click.option("--passphrase-timeout", type=float, default=None, help="Seconds (default 30).")
@click.option(
    "--kek-transit",
    default=None,
    metavar="URL[,URL...]",
    help="With --rewrap: the Transit nodes holding the store's key.",
)
@transit_options
@click.option(
    "--socket",
    "socket_path",
    type=PATH,
    default=None,
    help="A running daemon's socket (default: the one recorded in the store lock).",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Finish or roll back an interrupted rekey, then stop (needs no KEK).",
)
@click.option(
    "--rewrap",
    is_flag=True,
    help="Rewrap the Transit-wrapped root under the newest Transit key version "
    "(Transit's rewrap: no plaintext leaves the key service; the KEK stays the same).",
)
def rekey(
    store: Path,
    old_kek_file: Path | None,
    old_passphrase_command: str | None,
    old_kek_transit: str | None,
    new_kek_file: Path | None,
    new_passphrase_command: str | None,
    new_kek_transit: str | None,
    passphrase_timeout: float | None,
    kek_transit: str | None,
    socket_path: Path | None,
    repair: bool,
    rewrap: bool,
    **transit: Any,
) -> None:
    """Re-seal every key file under a new KEK, crash-safely; online through a running daemon."""
    with one_line_errors():
        if repair:
            removed = maintenance.repair(store)
            click.echo(f"repaired {store}: removed {', '.join(removed) or 'nothing'}")
            return
        if rewrap:
            if kek_transit is None:
                raise ConfigError("--rewrap needs --kek-transit and the Transit credentials")
            source = as_transit(kek_source_from(None, None, None, kek_transit, transit))
            assert source is not None  # noqa: S101 - built from --kek-transit
            before, after = rewrap_stored_root(store, source)
            click.echo(f"rewrapped the root of {store}: Transit key version {before} -> {after}")
            return
        new_source = for_a_new_root(
            kek_source_from(
                new_kek_file,
                new_passphrase_command,
                passphrase_timeout,
                new_kek_transit,
                transit,
                "new-",
            )
        )
        metadata = read_metadata(store)
        old_kek = None
        if given(old_kek_file, old_passphrase_command, old_kek_transit):
            old_source = kek_source_from(
                old_kek_file,
                old_passphrase_command,
                passphrase_timeout,
                old_kek_transit,
                transit,
                "old-",
            )
            old_kek = obtain_for_store(old_source, metadata.kek, metadata.store_id)
            maintenance.check_kek(metadata, old_kek)
        serving = daemon_socket(store, socket_path)
        if serving is not None:
            if old_kek is not None:
                wipe(old_kek)
            generation = rekey_through_daemon(serving, new_source)
            click.echo(f"rekeyed {store} through the running daemon: generation {generation}")
            warn_if_exposed(new_source, say_warning)
            return
        if old_kek is None:
            raise ConfigError(
                "no daemon serves this store: give the current KEK "
                "(--old-kek-file, --old-passphrase-command or --old-kek-transit)"
            )
        description = new_source.describe_new(metadata.store_id)
        new_kek = new_source.obtain(description, metadata.store_id)
        try:
            generation = maintenance.rekey_offline(store, old_kek, new_kek, description)
        finally:
            wipe(old_kek)
            wipe(new_kek)
        click.echo(f"rekeyed {store}: generation {generation}, KEK source {new_source.kind}")
        warn_if_exposed(new_source, say_warning)


def rewrap_stored_root(store_dir: Path, source: TransitSource) -> tuple[int, int]:
    """Replace the wrapped root in the live metadata by its Transit rewrap, under the write lock.

    The KEK does not change, so the check value, every key file and a running
    daemon (which keeps the KEK in memory) stay valid: this may run while it serves.
    """
    from kms_server.transit import wrapped_version  # noqa: PLC0415 - only for Transit (as_transit)

    check_private(store_dir)
    with locked(store_dir / WRITE_LOCK_NAME, blocking=True):
        metadata = read_metadata(store_dir)
        if metadata.kek.get("kind") != TRANSIT_KIND:
            raise KekError(  # a source of another kind than the store's: exit 4, as for serve
                f"--rewrap: this store's KEK comes from a {metadata.kek.get('kind')} "
                "source, not Transit"
            )
        before = wrapped_version(metadata.kek)
        description = source.rewrap(metadata.kek, metadata.store_id)
        path = live_generation(store_dir) / METADATA_NAME
        replace_file(path, replace(metadata, kek=description).to_json())
    return before, wrapped_version(description)


def daemon_socket(store: Path, given: Path | None) -> Path | None:
    """The socket of the daemon serving ``store``: ``given``, or the one it recorded.

    None when no daemon serves it. A ``--socket`` must be the recorded socket when that
    one is visible here (a daemon in a container may record a path only it sees): a
    rekey through another store's daemon would re-seal that store instead.
    """
    if not store_in_use(store):
        return None
    recorded = serving_socket(store)
    if given is None:
        return None if recorded is None else Path(recorded)
    if recorded is not None and os.path.exists(recorded):
        try:
            same = os.path.samefile(given, recorded)
        except OSError:
            same = False
        if not same:
            raise ConfigError(
                f"--socket {given} is not the socket of the daemon serving {store} ({recorded})"
            )
    return given


def store_in_use(store: Path) -> bool:
    try:
        with locked(store / LOCK_NAME, blocking=False):
            return False
    except StoreError:
        return True


def rekey_through_daemon(socket_path: Path, source: KekSource) -> int:
    """Ask the daemon to rekey: it reads the new KEK file or runs the command itself."""
    if isinstance(source, KekFile):
        request = Rekey("file", str(source.path.absolute()))
    elif as_transit(source) is not None:
        fail(
            "a running daemon cannot rekey to a Transit source (REKEY carries a file or a "
            "passphrase command): stop it, rekey offline, start it with --kek-transit",
            EXIT_REFUSED,
        )
    else:
        assert isinstance(source, PassphraseCommand)  # noqa: S101 - the only other kind
        request = Rekey("passphrase", source.command)
    try:
        with Client(socket_path, timeout=600.0) as client:
            return client.call(request)
    except (ConnectionFailed, Timeout) as error:  # not a refusal: it may have been applied
        fail(f"the rekey through the daemon did not complete: {error}", EXIT_REFUSED)
    except KmsError as error:
        fail(f"the daemon refused the rekey: {error}", EXIT_REFUSED)


@main.command()
@store_option(required=True)
@click.option("--out", type=PATH, required=True, help="Backup file.")
def backup(store: Path, out: Path) -> None:
    """Snapshot the sealed store (consistent even while the daemon runs)."""
    with one_line_errors():
        count = maintenance.backup(store, out)
        click.echo(f"backed up {count} files of {store} to {out} (sealed: useless without the KEK)")


@main.command()
@click.option(
    "--in",
    "archive",
    type=PATH,
    required=True,
    help="Backup file made by `kmsd backup`.",
)
@store_option(required=True)
def restore(archive: Path, store: Path) -> None:
    """Restore a backup into an empty store directory."""
    with one_line_errors():
        metadata = maintenance.restore(archive, store)
        click.echo(
            f"restored store {metadata.store_id} (generation {metadata.generation}) into {store}"
        )


@main.command()
@store_option(required=True)
@kek_options
def verify(store: Path, **kek_settings: Any) -> None:
    """Open every key version and check every seal; exit 6 on any damage."""
    with one_line_errors():
        source = settings_from(None, kek_settings).kek_source()
        try:
            metadata = read_metadata(store)
        except MetadataDamaged as damage:
            click.echo(f"DAMAGED (metadata): {damage}")
            sys.exit(EXIT_DAMAGED)
        kek = obtain_for_store(source, metadata.kek, metadata.store_id)
        try:
            reports = maintenance.verify(store, kek)
        finally:
            wipe(kek)
        warn_if_exposed(source, say_warning)
    damaged = 0
    for report in reports:
        if report.problems:
            damaged += 1
            for problem in report.problems:
                click.echo(f"DAMAGED {report.key_id}: {problem}")
        else:
            click.echo(f"ok      {report.key_id} ({report.versions} versions)")
    click.echo(f"{len(reports)} checked, {damaged} damaged")
    if damaged:
        sys.exit(EXIT_DAMAGED)
