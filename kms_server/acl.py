# Who may ask: peer credentials from the kernel, the TOML access-control list, and its decisions.
# Deny by default. No sockets beyond reading SO_PEERCRED; no request execution.
"""Peer-credential access control.

The kernel tells us who is on the other end of each connection
(``SO_PEERCRED``: pid, uid, gid; ``SO_PEERGROUPS``: supplementary groups), so
there is no password or token on the socket to leak. An ACL file grants
operations on key ids to users and groups::

    # /etc/kms/acl.toml
    [[allow]]
    users = ["postgres"]              # user names or uids
    groups = []                       # group names or gids
    keys = ["pg/*"]                   # exact ids, "prefix/*" (anything below), or "*"
    operations = ["get", "datakey"]

    [[allow]]
    users = ["root"]
    keys = ["*"]
    operations = ["create", "rotate", "info", "get", "enc", "dec", "datakey"]

Anything not granted is ``ERR DENIED``; ``PING``, ``HELLO``, ``HELP`` and
``QUIT`` are always allowed. Operations are named one by one (there is no
"all"), so a verb added in a later release is never granted by an old rule.
Without an ACL file only the daemon's own uid may do anything.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import pwd
import re
import socket
import stat
import struct
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms_client.errors import KmsError
from kms_client.protocol import VERBS, Request, validate_key_id
from kms_server.files import read_small_text_file

#: An ACL is a few rules; more than this is not one (a device such as /dev/zero).
MAX_ACL_SIZE = 1 << 20

#: Verbs every peer may send: they touch no key.
ALWAYS_ALLOWED = frozenset({"PING", "HELLO", "HELP", "QUIT"})
#: The operation names an ACL may grant: the lower-cased key verbs.
OPERATIONS = frozenset(verb.lower() for verb in VERBS if verb not in ALWAYS_ALLOWED)

log = logging.getLogger("kmsd.acl")

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_MAX_GROUPS = 256
_RULE_HEADER = re.compile(r"""^\s*\[\[\s*(?:allow|"allow"|'allow')\s*\]\]""")
#: A line that opens an inline-table rule: ``{ ...`` or ``allow = [{ ...``.
_INLINE_RULE = re.compile(r"""^\s*(?:(?:allow|"allow"|'allow')\s*=\s*\[\s*)?\{""")
_RULE_KEYS = frozenset({"users", "groups", "keys", "operations"})
#: Ids are 32-bit, and (uid_t) -1 means "no id".
MAX_ID = 2**32 - 1


class AclError(Exception):
    """The ACL file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    exe: str | None

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        groups = {gid, *_peer_groups(sock)}
        try:
            exe: str | None = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = None
        return cls(pid, uid, gid, frozenset(groups), exe)


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups (``SO_PEERGROUPS``), as they were when it connected.

    Python's ``getsockopt`` takes at most 1024 bytes (256 groups); a peer in more
    groups gets ``ERANGE`` there and is asked again through libc with room for the
    kernel's limit, so none of its group grants is lost. A kernel before 4.13 has no
    such option: the primary group only.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _MAX_GROUPS)
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            return ()
        try:
            raw = _many_peer_groups(sock.fileno())
        except OSError as error:  # never seen; the grants of its groups do not apply
            log.warning("cannot read the groups of a peer in over 256 groups: %s", error)
            return ()
    return struct.unpack(f"{len(raw) // 4}I", raw)


def _many_peer_groups(fd: int) -> bytes:
    """``SO_PEERGROUPS`` through libc, with room for ``NGROUPS_MAX`` groups."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(4 * os.sysconf("SC_NGROUPS_MAX"))
    size = ctypes.c_uint32(len(buffer))
    if libc.getsockopt(fd, socket.SOL_SOCKET, _SO_PEERGROUPS, buffer, ctypes.byref(size)):
        error = ctypes.get_errno()
        raise OSError(error, f"SO_PEERGROUPS: {os.strerror(error)}")
    return buffer.raw[: size.value]


@dataclass(frozen=True)
class KeyPattern:
    """``*`` (every key), ``prefix/*`` (every key below prefix), or one exact key id."""

    text: str

    def covers(self, key_id: str) -> bool:
        text = self.text
        if text == "*":
            return True
        if text.endswith("/*"):
            return key_id.startswith(text[:-1])
        return key_id == text


@dataclass(frozen=True)
class Rule:
    line: int
    uids: frozenset[int]
    gids: frozenset[int]
    keys: tuple[KeyPattern, ...]
    operations: frozenset[str]

    def applies_to(self, peer: Peer) -> bool:
        return peer.uid in self.uids or not self.gids.isdisjoint(peer.groups)


class Grants:
    """What one peer may do, precomputed at connect (and after each ACL reload)."""

    __slots__ = ("_by_operation",)

    def __init__(self, rules: Iterable[Rule]) -> None:
        by_operation: dict[str, list[KeyPattern]] = {}
        for rule in rules:
            for operation in rule.operations:
                by_operation.setdefault(operation, []).extend(rule.keys)
        self._by_operation = {op: tuple(patterns) for op, patterns in by_operation.items()}

    def permits(self, request: Request[Any]) -> bool:
        verb = request.verb
        if verb in ALWAYS_ALLOWED:
            return True
        patterns = self._by_operation.get(verb.lower())
        if not patterns:
            return False
        key_id: str = getattr(request, "key_id", "")
        return any(pattern.covers(key_id) for pattern in patterns)


@dataclass(frozen=True)
class Acl:
    """An ordered set of rules and where they came from (for log lines)."""

    rules: tuple[Rule, ...]
    source: str

    def grants_for(self, peer: Peer) -> Grants:
        return Grants(rule for rule in self.rules if rule.applies_to(peer))

    @classmethod
    def owner_only(cls, uid: int) -> Acl:
        """The default without an ACL file: the daemon's own uid may do everything."""
        everything = Rule(0, frozenset({uid}), frozenset(), (KeyPattern("*"),), OPERATIONS)
        return cls((everything,), f"default: only uid {uid} ({user_name(uid)})")

    @classmethod
    def load(cls, path: Path) -> Acl:
        """Read and parse an ACL file; one that every user may write grants nothing."""
        try:
            # A regular file: its mode guards it; a FIFO could hang start-up or a reload.
            status, data = read_small_text_file(path, MAX_ACL_SIZE, regular_file_only=True)
        except OSError as exc:
            raise AclError(f"cannot read ACL {path}: {exc.strerror}") from None
        if status.st_mode & stat.S_IWOTH:
            raise AclError(
                f"ACL {path} is writable by every user (mode {stat.S_IMODE(status.st_mode):04o}), "
                f"so anyone could grant themselves every key: chmod o-w {path}"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise AclError(f"{path}:{line}: not UTF-8 text") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str) -> Acl:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # Python 3.11's TOMLDecodeError has no lineno; its message ends "(at line N, ...)".
            where = re.search(r"at line (\d+)", str(exc))
            # "(at end of document)" has no number: the last line it is.
            line = f":{where.group(1) if where else max(1, len(text.splitlines()))}"
            raise AclError(f"{source}{line}: not valid TOML: {exc}") from None
        text_lines = text.splitlines()
        whole = _Lines(source, text_lines, 1, len(text_lines))
        unknown = set(document) - {"allow"}
        if unknown:
            name = sorted(unknown)[0]
            raise whole.error(name, None, f"unknown table {name!r}; rules are [[allow]] tables")
        raw_rules = document.get("allow", [])
        if not isinstance(raw_rules, list):
            raise whole.error("allow", None, "'allow' must be an array of tables ([[allow]])")
        headers = [n for n, line in enumerate(text_lines, 1) if _RULE_HEADER.match(line)]
        if not headers:  # inline tables, one a line: each rule's line is its span
            headers = [n for n, line in enumerate(text_lines, 1) if _INLINE_RULE.match(line)]
            if len(headers) != len(raw_rules):
                headers = []
        rules = []
        for index, raw in enumerate(raw_rules):
            first = headers[index] if index < len(headers) else 1
            last = headers[index + 1] - 1 if index + 1 < len(headers) else len(text_lines)
            rules.append(_parse_rule(raw, _Lines(source, text_lines, first, last)))
        return cls(tuple(rules), source)


@dataclass(frozen=True)
class _Lines:
    """The text of one rule (lines ``first``..``last``), to name the line of an error.

    tomllib keeps no positions, so a field is found as ``name =`` at the start
    of a line (or after ``{`` or ``,``, in an inline table), and a value as a
    quoted string between its field and the next.
    """

    source: str
    lines: list[str]
    first: int
    last: int

    def _field_start(self, name: str) -> int | None:
        """The line where key or table ``name`` is defined (``name =`` or ``[[name]]``)."""
        quoted = rf"""(?:{re.escape(name)}|"{re.escape(name)}"|'{re.escape(name)}')"""
        # `name =`, a dotted `name.sub =`, `[name]`, or a sub-table `[allow.name]`.
        pattern = re.compile(
            rf"(?:^\s*|[{{,]\s*)(?:{quoted}\s*[=.])|^\s*\[+(?:[^\]#]*\.)?\s*{quoted}\s*\]"
        )
        for number in range(self.first, self.last + 1):
            if pattern.search(_without_comment(self.lines[number - 1])):
                return number
        return None

    def line_of(self, name: str, value: str | None) -> int:
        start = self._field_start(name)
        if start is None:
            return self.first
        if value is None:
            return start
        field_start = re.compile(r"^\s*[A-Za-z_\"'][^=]*=")
        quoted = (f'"{value}"', f"'{value}'")
        for number in range(start, self.last + 1):
            line = _without_comment(self.lines[number - 1])
            if number > start and field_start.match(line):
                break
            if any(q in line for q in quoted):
                return number
        return start

    def error(self, name: str, value: str | None, message: str) -> AclError:
        return AclError(f"{self.source}:{self.line_of(name, value)}: {message}")


def _without_comment(line: str) -> str:
    """``line`` up to its comment: a ``#`` outside a quoted string (a value's own ``#``
    stays; a comment that quotes a name must not be taken for where it is)."""
    quote = ""
    escaped = False
    for index, char in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#":
            return line[:index]
    return line


def _parse_rule(raw: dict[str, Any], where: _Lines) -> Rule:
    for name in raw:
        if name not in _RULE_KEYS:
            raise where.error(
                name, None, f"unknown rule field {name!r} (use users, groups, keys, operations)"
            )
    uids = frozenset(_resolve(raw.get("users", []), "users", _uid_of, where))
    gids = frozenset(_resolve(raw.get("groups", []), "groups", _gid_of, where))
    if not uids and not gids:
        raise AclError(f"{where.source}:{where.first}: a rule must name at least one user or group")
    keys = []
    for pattern in _strings(raw.get("keys"), "keys", where):
        if not _valid_pattern(pattern):
            raise where.error(
                "keys", pattern, f"invalid key pattern {pattern!r} (id, prefix/*, or *)"
            )
        keys.append(KeyPattern(pattern))
    operations = set()
    for operation in _strings(raw.get("operations"), "operations", where):
        if operation not in OPERATIONS:
            raise where.error(
                "operations",
                operation,
                f"unknown operation {operation!r} (known: {', '.join(sorted(OPERATIONS))})",
            )
        operations.add(operation)
    return Rule(where.first, uids, gids, tuple(keys), frozenset(operations))


def _strings(value: object, field: str, where: _Lines) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise where.error(field, None, f"{field} must be a non-empty list of strings")
    return value


def _resolve(value: object, field: str, lookup: Any, where: _Lines) -> list[int]:
    if not isinstance(value, list):
        raise where.error(field, None, f"{field} must be a list of names or numeric ids")
    ids = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < MAX_ID:  # a typo must not grant nothing silently
                raise where.error(field, None, f"{field}: {item} is not a uid or gid")
            ids.append(item)
            continue
        if not isinstance(item, str):
            raise where.error(field, None, f"{field} must hold names or numeric ids")
        resolved = lookup(item)
        if resolved is None and item.isascii() and item.isdigit() and int(item) < MAX_ID:
            resolved = int(item)  # a numeric id written as a string; names are tried first
        if resolved is None:
            what = "user" if field == "users" else "group"
            raise where.error(field, item, f"unknown {what} {item!r}")
        ids.append(resolved)
    return ids


def _valid_pattern(pattern: str) -> bool:
    if pattern == "*":
        return True
    base = pattern[:-2] if pattern.endswith("/*") else pattern
    try:
        validate_key_id(base.encode("ascii"))
    except (UnicodeEncodeError, KmsError):
        return False
    return True


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
