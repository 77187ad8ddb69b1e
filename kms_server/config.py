# Settings of `kmsd serve`: defaults, the TOML config file, command-line flags (which win).
# Validation only; nothing here opens the store, reads the KEK or binds the socket.
"""The settings of one daemon, merged from defaults, ``--config FILE`` and flags.

The TOML file uses the flags' long names with ``_`` for ``-``::

    store = "/var/lib/kms"
    socket = "/run/kms/kms.sock"
    socket_mode = "0660"
    kek_file = "/etc/kms/kek"            # or: passphrase_command = "systemd-ask-password kms"
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
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from kms_client.protocol import DEFAULT_MAX_LINE
from kms_server.kek import DEFAULT_COMMAND_TIMEOUT, KekFile, KekSource, PassphraseCommand
from kms_server.server import Limits

DEFAULT_SOCKET = Path("/run/kms/kms.sock")


class ConfigError(Exception):
    """A setting is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class Settings:
    store: Path | None = None
    socket: Path = DEFAULT_SOCKET
    socket_mode: int = 0o600
    kek_file: Path | None = None
    passphrase_command: str | None = None
    passphrase_timeout: float = DEFAULT_COMMAND_TIMEOUT
    max_line: int = DEFAULT_MAX_LINE
    max_connections: int = 1024
    idle_timeout: float = 300.0
    grace_period: float = 10.0
    acl: Path | None = None
    audit_log: Path | None = None
    counter_flush_interval: float = 5.0
    rotation_check_interval: float = 60.0

    def limits(self) -> Limits:
        return Limits(
            max_line=self.max_line,
            max_connections=self.max_connections,
            idle_timeout=self.idle_timeout,
            grace_period=self.grace_period,
            counter_flush_interval=self.counter_flush_interval,
            rotation_check_interval=self.rotation_check_interval,
        )

    def kek_source(self) -> KekSource:
        if self.kek_file is not None and self.passphrase_command is not None:
            raise ConfigError("give one KEK source: --kek-file or --passphrase-command, not both")
        if self.kek_file is not None:
            return KekFile(self.kek_file)
        if self.passphrase_command is not None:
            return PassphraseCommand(self.passphrase_command, self.passphrase_timeout)
        raise ConfigError("no KEK source: give --kek-file or --passphrase-command")

    def require_store(self) -> Path:
        if self.store is None:
            raise ConfigError("no store directory: give --store")
        return self.store


def parse_mode(value: object) -> int:
    """A socket mode from ``"0660"``/``"660"`` (octal text) or an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ConfigError(f"socket_mode {value!r} is not an octal mode like 0660") from None
    else:
        raise ConfigError('socket_mode must be octal text like "0660"')
    if not 0 <= mode <= 0o777:
        raise ConfigError("socket_mode must be between 0000 and 0777")
    return mode


def _coerce(name: str, value: Any) -> Any:
    if name in {"store", "socket", "kek_file", "acl", "audit_log"}:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a non-empty path")
        return Path(value)
    if name == "socket_mode":
        return parse_mode(value)
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


def load(config_file: Path | None, overrides: dict[str, Any]) -> Settings:
    """Defaults, then the TOML file, then flags (``overrides``; ``None`` means not given)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            document = tomllib.loads(config_file.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {config_file}: {exc.strerror}") from None
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
