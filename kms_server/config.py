# Settings of `kmsd serve`: defaults, the TOML config file, command-line flags (which win).
# Validation only; nothing here opens the store, reads the KEK or binds the socket.
"""The settings of one daemon, merged from defaults, ``--config FILE`` and flags.

The TOML file uses the flags' long names with ``_`` for ``-``::

    store = "/var/lib/kms"
    socket = "/run/kms/kms.sock"
    socket_mode = "0660"
    kek_file = "/etc/kms/kek"            # or: passphrase_command = "systemd-ask-password kms"
    # or the root key wrapped by OpenBao/Vault Transit (see kms_server/transit.py):
    # kek_transit = ["https://bao1:8200", "https://bao2:8200"]   # tried in turn
    # transit_key = "kms-root"           # a derived key (init; later read from the store)
    # transit_mount = "transit"
    # transit_token_file = "/etc/kms/bao-token"  # or transit_role_id_file + transit_secret_id_file
    # transit_ca = "/etc/kms/bao-ca.pem"
    # transit_namespace = "team-a"
    # transit_start_timeout = 60         # seconds of retries while no node can answer
    # transit_health_interval = 60       # seconds between checks while serving
    max_line = 1048576
    max_connections = 1024
    idle_timeout = 300
    grace_period = 10
    acl = "/etc/kms/acl.toml"            # who may do what; without it only kmsd's own uid
    audit_log = "/var/log/kms/audit.log" # default: stderr (journald)

Unknown keys are refused, so a typo cannot silently leave a default in force.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kms_server.files import read_small_text_file
from kms_server.kek import (
    DEFAULT_COMMAND_TIMEOUT,
    TRANSIT_START_TIMEOUT,
    KekFile,
    KekSource,
    PassphraseCommand,
)
from kms_server.server import Limits

if TYPE_CHECKING:
    from kms_server.transit import TransitSource

DEFAULT_SOCKET = Path("/run/kms/kms.sock")
#: A config is a few settings; more than this is not one (a device such as /dev/zero).
MAX_CONFIG_SIZE = 1 << 20
#: The limits' defaults live in :class:`Limits`; settings start from them.
_LIMITS = Limits()


class ConfigError(Exception):
    """A setting is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class Settings:
    store: Path | None = None
    socket: Path = DEFAULT_SOCKET
    socket_mode: int = 0o600
    kek_file: Path | None = None
    passphrase_command: str | None = field(default=None, repr=False)  # may hold a passphrase
    passphrase_timeout: float = DEFAULT_COMMAND_TIMEOUT
    max_line: int = _LIMITS.max_line
    max_connections: int = _LIMITS.max_connections
    idle_timeout: float = _LIMITS.idle_timeout
    grace_period: float = _LIMITS.grace_period
    acl: Path | None = None
    audit_log: Path | None = None
    counter_flush_interval: float = _LIMITS.counter_flush_interval
    rotation_check_interval: float = _LIMITS.rotation_check_interval
    kek_transit: tuple[str, ...] | None = None
    transit_key: str | None = None
    transit_mount: str | None = None
    transit_token_file: Path | None = None
    transit_role_id_file: Path | None = None
    transit_secret_id_file: Path | None = None
    transit_ca: Path | None = None
    transit_namespace: str | None = None
    transit_start_timeout: float = TRANSIT_START_TIMEOUT
    transit_health_interval: float = 60.0

    def limits(self) -> Limits:
        return Limits(
            max_line=self.max_line,
            max_connections=self.max_connections,
            idle_timeout=self.idle_timeout,
            grace_period=self.grace_period,
            counter_flush_interval=self.counter_flush_interval,
            rotation_check_interval=self.rotation_check_interval,
        )

    def kek_source(self, flag_prefix: str = "") -> KekSource:
        """The one KEK source given; errors name the flags with ``flag_prefix`` (``new-``)."""
        flags = [
            f"--{flag_prefix}{name}" for name in ("kek-file", "passphrase-command", "kek-transit")
        ]
        given = [
            flag
            for flag, value in zip(
                flags, (self.kek_file, self.passphrase_command, self.kek_transit), strict=True
            )
            if value is not None
        ]
        if len(given) > 1:
            raise ConfigError(f"give one KEK source, not {' and '.join(given)}")
        if self.kek_file is not None:
            return KekFile(self.kek_file)
        if self.passphrase_command is not None:
            return PassphraseCommand(self.passphrase_command, self.passphrase_timeout)
        if self.kek_transit is not None:
            return self.transit_source(self.kek_transit)
        raise ConfigError(f"no KEK source: give {flags[0]}, {flags[1]} or {flags[2]}")

    def transit_source(self, urls: tuple[str, ...]) -> TransitSource:
        # Imported here: hvac and requests take about 90 ms to import, a cost every start
        # of kmsd paid (each `kmsd init`, `verify`, `serve`...) though few stores use Transit.
        from kms_server.transit import TransitSource  # noqa: PLC0415

        try:
            return TransitSource(
                urls,
                key=self.transit_key,
                mount=self.transit_mount,
                token_file=self.transit_token_file,
                role_id_file=self.transit_role_id_file,
                secret_id_file=self.transit_secret_id_file,
                ca_file=self.transit_ca,
                namespace=self.transit_namespace,
                start_timeout=self.transit_start_timeout,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def require_store(self) -> Path:
        if self.store is None:
            raise ConfigError("no store directory: give --store")
        return self.store


def parse_mode(value: object) -> int:
    """A socket mode from ``"0660"``/``"660"`` (octal text).

    A TOML number is refused: ``socket_mode = 660`` is decimal 660, which is mode
    0o1224, and ``440`` would quietly be 0o670, opening the socket to its group.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(
            f'socket_mode must be quoted octal text like "0660", not the number {value}'
            " (a TOML number is decimal)"
        )
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ConfigError(f"socket_mode {value!r} is not an octal mode like 0660") from None
    else:
        raise ConfigError('socket_mode must be octal text like "0660"')
    if not 0 <= mode <= 0o777:
        raise ConfigError("socket_mode must be between 0000 and 0777")
    return mode


_PATHS = frozenset(
    {
        "store",
        "socket",
        "kek_file",
        "acl",
        "audit_log",
        "transit_token_file",
        "transit_role_id_file",
        "transit_secret_id_file",
        "transit_ca",
    }
)


def _urls(value: object) -> tuple[str, ...]:
    """``kek_transit``: a TOML list of URLs, or one string with commas (the flag)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError("kek_transit must be a URL, URLs separated by commas, or a list")
    urls = tuple(item.strip() for item in items if item.strip())
    if not urls:
        raise ConfigError("kek_transit must name at least one URL")
    return urls


def _coerce(name: str, value: Any) -> Any:
    if name in _PATHS:  # text from the file, a Path from a flag
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{name} must be a non-empty path")
        return Path(value)
    if name == "socket_mode":
        return parse_mode(value)
    if name == "kek_transit":
        return _urls(value)
    if name in {"transit_key", "transit_mount", "transit_namespace"}:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name} must be a non-empty name")
        return value.strip()
    if name == "passphrase_command":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError("passphrase_command must be a non-empty command line")
        return value
    if name in {"max_line", "max_connections"}:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer")
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number of seconds")
    return float(value)


_NAMES = frozenset(f.name for f in fields(Settings))


def load(
    config_file: Path | None, overrides: dict[str, Any], *, regular_file_only: bool = False
) -> Settings:
    """Defaults, then the TOML file, then flags (``overrides``; ``None`` means not given).

    ``regular_file_only``: refuse a config that is not a regular file (a reload: a FIFO
    put in its place would hang or read as empty).
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            _, data = read_small_text_file(
                config_file, MAX_CONFIG_SIZE, regular_file_only=regular_file_only
            )
            document = tomllib.loads(data.decode())
        except OSError as exc:
            raise ConfigError(f"cannot read config {config_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config {config_file} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {config_file} is not valid TOML: {exc}") from None
        for name, value in document.items():
            if name not in _NAMES:
                raise ConfigError(f"config {config_file}: unknown setting {name!r}")
            values[name] = _coerce(name, value)
    for name, value in overrides.items():
        if value is not None:
            values[name] = _coerce(name, value)
    settings = replace(Settings(), **values)
    if settings.max_line < 64:
        raise ConfigError("max_line must be at least 64 bytes")
    return settings
