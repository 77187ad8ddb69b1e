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

import grp
import os
import pwd
import re
import socket
import struct
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms_client.protocol import VERBS, Request, validate_key_id

#: Verbs every peer may send: they touch no key.
ALWAYS_ALLOWED = frozenset({"PING", "HELLO", "HELP", "QUIT"})
#: The operation names an ACL may grant: the lower-cased key verbs.
OPERATIONS = frozenset(verb.lower() for verb in VERBS if verb not in ALWAYS_ALLOWED)

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_MAX_GROUPS = 256
_RULE_HEADER = re.compile(r"^\s*\[\[\s*allow\s*\]\]")
_RULE_KEYS = frozenset({"users", "groups", "keys", "operations"})


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
        groups = {gid}
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _MAX_GROUPS)
            groups.update(struct.unpack(f"{len(raw) // 4}I", raw))
        except OSError:
            pass  # older kernel: the primary group only
        try:
            exe: str | None = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = None
        return cls(pid, uid, gid, frozenset(groups), exe)


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
        try:
            text = path.read_text()
        except OSError as exc:
            raise AclError(f"cannot read ACL {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise AclError(f"ACL {path} is not UTF-8 text") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str) -> Acl:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AclError(f"{source}: not valid TOML: {exc}") from None
        lines = text.splitlines()
        headers = [n for n, line in enumerate(lines, 1) if _RULE_HEADER.match(line)]
        unknown = set(document) - {"allow"}
        if unknown:
            name = sorted(unknown)[0]
            raise AclError(
                f"{source}:{_find_line(lines, name, 1, len(lines))}: unknown table {name!r}; "
                "rules are [[allow]] tables"
            )
        raw_rules = document.get("allow", [])
        if not isinstance(raw_rules, list):
            raise AclError(f"{source}: 'allow' must be an array of tables ([[allow]])")
        rules = []
        for index, raw in enumerate(raw_rules):
            first = headers[index] if index < len(headers) else 1
            last = headers[index + 1] - 1 if index + 1 < len(headers) else len(lines)
            rules.append(_parse_rule(raw, source, lines, first, last))
        return cls(tuple(rules), source)


def _find_line(lines: list[str], needle: str, first: int, last: int) -> int:
    """The line of ``needle`` within a rule (tomllib keeps no positions), else its header."""
    for number in range(first, last + 1):
        if needle in lines[number - 1]:
            return number
    return first


def _parse_rule(raw: dict[str, Any], source: str, lines: list[str], first: int, last: int) -> Rule:
    def fail(needle: str, message: str) -> AclError:
        return AclError(f"{source}:{_find_line(lines, needle, first, last)}: {message}")

    for name in raw:
        if name not in _RULE_KEYS:
            raise fail(name, f"unknown rule field {name!r} (use users, groups, keys, operations)")
    uids = frozenset(_resolve(raw.get("users", []), "users", _uid_of, fail))
    gids = frozenset(_resolve(raw.get("groups", []), "groups", _gid_of, fail))
    if not uids and not gids:
        raise fail("[[", "a rule must name at least one user or group")
    keys = []
    for pattern in _strings(raw.get("keys"), "keys", fail):
        if not _valid_pattern(pattern):
            raise fail(f'"{pattern}"', f"invalid key pattern {pattern!r} (id, prefix/*, or *)")
        keys.append(KeyPattern(pattern))
    operations = set()
    for operation in _strings(raw.get("operations"), "operations", fail):
        if operation not in OPERATIONS:
            raise fail(
                f'"{operation}"',
                f"unknown operation {operation!r} (known: {', '.join(sorted(OPERATIONS))})",
            )
        operations.add(operation)
    return Rule(first, uids, gids, tuple(keys), frozenset(operations))


def _strings(value: object, field: str, fail: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise fail(field, f"{field} must be a non-empty list of strings")
    return value


def _resolve(value: object, field: str, lookup: Any, fail: Any) -> list[int]:
    if not isinstance(value, list):
        raise fail(field, f"{field} must be a list of names or numeric ids")
    ids = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            ids.append(item)
            continue
        if not isinstance(item, str):
            raise fail(field, f"{field} must hold names or numeric ids")
        resolved = lookup(item)
        if resolved is None:
            what = "user" if field == "users" else "group"
            raise fail(f'"{item}"', f"unknown {what} {item!r}")
        ids.append(resolved)
    return ids


def _valid_pattern(pattern: str) -> bool:
    if pattern == "*":
        return True
    base = pattern[:-2] if pattern.endswith("/*") else pattern
    try:
        validate_key_id(base.encode("ascii"))
    except (UnicodeEncodeError, ValueError, Exception):
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
