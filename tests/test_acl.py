# The ACL: parsing (every error names its line), decisions (deny by default, patterns), and a
# live daemon that says DENIED, reloads on SIGHUP without dropping connections, refuses bad files.
from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kms_client.protocol import (
    Configure,
    Create,
    Decrypt,
    Destroy,
    Encrypt,
    GenerateDataKey,
    Get,
    Hello,
    Help,
    Info,
    Ping,
    Quit,
    Request,
    Restore,
    Retire,
    Rewrap,
    Rotate,
)
from kms_server.acl import OPERATIONS, Acl, AclError, Grants, KeyPattern, Peer
from tests.conftest import Daemon, assert_fails, kmsd, kmsd_all, make_store
from tests.users import Conn, ask, b64, code_of, running, wait_for

SOURCE = "/etc/kms/acl.toml"
EXIT_CONFIG = 2
ROOT_NAME = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name
NO_USER = "kmst-no-such-user"
NO_GROUP = "kmst-no-such-group"
ALL_OPERATIONS = [
    "create",
    "rotate",
    "info",
    "get",
    "enc",
    "dec",
    "datakey",
    "rewrap",
    "retire",
    "restore",
    "destroy",
    "config",
    "rekey",
]


def toml(*lines: str) -> str:
    """An ACL text whose line N (1-based) is ``lines[N - 1]``."""
    return "\n".join(lines) + "\n"


def quoted(items: list[str]) -> str:
    """A TOML array of basic strings."""
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def parse(text: str) -> Acl:
    return Acl.parse(text, SOURCE)


def error_line(text: str) -> int:
    """The line number an invalid ACL's error names: ``<source>:<N>: ...``."""
    with pytest.raises(AclError) as caught:
        parse(text)
    message = str(caught.value)
    match = re.match(rf"{re.escape(SOURCE)}:(\d+): ", message)
    assert match, f"error does not start with '{SOURCE}:<line>: ': {message!r}"
    return int(match.group(1))


def peer(uid: int = 1000, gid: int = 1000, groups: tuple[int, ...] = ()) -> Peer:
    return Peer(pid=4242, uid=uid, gid=gid, groups=frozenset({gid, *groups}), exe=None)


def key_requests(key_id: str) -> dict[str, Request[Any]]:
    """One request per grantable operation, on ``key_id``."""
    return {
        "create": Create(key_id),
        "rotate": Rotate(key_id),
        "info": Info(key_id),
        "get": Get(key_id),
        "enc": Encrypt(key_id, b"x"),
        "dec": Decrypt(key_id, b"\x01" + bytes(45)),
        "datakey": GenerateDataKey(key_id),
        "rewrap": Rewrap(key_id, b"\x01" + bytes(45)),
        "retire": Retire(key_id, 1),
        "restore": Restore(key_id, 1),
        "destroy": Destroy(key_id, 1),
        "config": Configure(key_id, 60),
    }


# --------------------------------------------------------------------------- parsing: valid


def test_operations_are_exactly_the_key_verbs() -> None:
    assert set(ALL_OPERATIONS) == OPERATIONS


def test_parse_users_and_groups_by_name_and_number_patterns_and_several_rules() -> None:
    acl = parse(
        toml(
            "# who may ask",  # 1
            "[[allow]]",  # 2
            f'users = ["{ROOT_NAME}", 4242]',  # 3
            f'groups = ["{ROOT_GROUP}", 4343]',  # 4
            'keys = ["pg/*", "app/billing", "*"]',  # 5
            'operations = ["get", "datakey"]',  # 6
            "",  # 7
            "[[allow]]",  # 8
            "groups = [0]",  # 9
            'keys = ["x"]',  # 10
            f"operations = {quoted(ALL_OPERATIONS)}",  # 11
            "",  # 12
            "  [[ allow ]]   # indented, spaced header",  # 13
            "users = [0]",  # 14
            'keys = ["a/b/*"]',  # 15
            'operations = ["enc"]',  # 16
        )
    )
    assert acl.source == SOURCE
    first, second, third = acl.rules
    assert (first.line, second.line, third.line) == (2, 8, 13)
    assert first.uids == {0, 4242}
    assert first.gids == {0, 4343}
    assert first.keys == (KeyPattern("pg/*"), KeyPattern("app/billing"), KeyPattern("*"))
    assert first.operations == {"get", "datakey"}
    assert second.uids == frozenset()
    assert second.gids == {0}
    assert second.keys == (KeyPattern("x"),)
    assert second.operations == OPERATIONS
    assert third.uids == {0}
    assert third.operations == {"enc"}


def test_parse_resolves_a_named_user_and_group_to_their_ids() -> None:
    user = next((u for u in pwd.getpwall() if u.pw_uid != 0), pwd.getpwuid(0))
    group = next((g for g in grp.getgrall() if g.gr_gid != 0), grp.getgrgid(0))
    acl = parse(
        toml(
            "[[allow]]",
            f'users = ["{user.pw_name}"]',
            f'groups = ["{group.gr_name}"]',
            'keys = ["*"]',
            'operations = ["info"]',
        )
    )
    assert acl.rules[0].uids == {user.pw_uid}
    assert acl.rules[0].gids == {group.gr_gid}


def test_a_numeric_id_written_as_a_string_is_that_id_unless_it_names_someone() -> None:
    acl = parse(
        toml(
            "[[allow]]",
            'users = ["4242"]',
            'groups = ["4343"]',
            'keys = ["*"]',
            'operations = ["info"]',
        )
    )
    assert acl.rules[0].uids == {4242}
    assert acl.rules[0].gids == {4343}


def test_an_empty_file_is_valid_and_grants_nothing() -> None:
    acl = parse("# nobody may do anything\n")
    assert acl.rules == ()
    grants = acl.grants_for(peer(uid=0, gid=0))
    for request in key_requests("a").values():
        assert not grants.permits(request)


def test_load_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "acl.toml"
    path.write_text(toml("[[allow]]", "users = [7]", 'keys = ["*"]', 'operations = ["get"]'))
    assert Acl.load(path).source == str(path)
    path.write_text(toml("[[allow]]", "users = [7]", 'keys = ["*"]', 'operations = ["got"]'))
    with pytest.raises(AclError, match=rf"^{re.escape(str(path))}:4: "):
        Acl.load(path)


# --------------------------------------------------------------------------- parsing: errors

GOOD_RULE = (
    "[[allow]]",  # 1
    f'users = ["{ROOT_NAME}"]',  # 2
    'keys = ["*"]',  # 3
    'operations = ["get"]',  # 4
    "",  # 5
)


@pytest.mark.parametrize(
    ("lines", "line"),
    [
        pytest.param(
            (
                *GOOD_RULE,
                "[[allow]]",
                f'users = ["{NO_USER}"]',
                'keys = ["*"]',
                'operations = ["get"]',
            ),
            7,
            id="unknown-user-line-7",
        ),
        pytest.param(
            (
                *GOOD_RULE,
                "[[allow]]",
                "users = [0]",
                f'groups = ["{NO_GROUP}"]',
                'keys = ["*"]',
                'operations = ["get"]',
            ),
            8,
            id="unknown-group-line-8",
        ),
        pytest.param(
            (
                *GOOD_RULE,
                "[[allow]]",
                "users = [0]",
                'keys = ["*"]',
                'operations = ["get", "delete"]',
            ),
            9,
            id="unknown-operation-line-9",
        ),
        pytest.param(
            (
                *GOOD_RULE,
                "[[allow]]",
                "users = [0]",
                'keys = ["pg/*", "pg*"]',
                'operations = ["get"]',
            ),
            8,
            id="bad-key-pattern-line-8",
        ),
        pytest.param(
            (*GOOD_RULE, "[[allow]]", "users = [0]", 'keys = ["pg/*/x"]', 'operations = ["get"]'),
            8,
            id="glob-in-the-middle-line-8",
        ),
        pytest.param(
            (
                *GOOD_RULE,
                "[[allow]]",
                "users = [0]",
                'keys = ["*"]',
                'operations = ["get"]',
                'comment = "typo"',
            ),
            10,
            id="unknown-field-line-10",
        ),
        pytest.param(
            (
                *GOOD_RULE,
                "# a rule for nobody",
                "[[allow]]",
                'keys = ["*"]',
                'operations = ["get"]',
            ),
            7,
            id="no-users-or-groups-line-7",
        ),
        pytest.param(
            (*GOOD_RULE, "[[allow]]", "users = [0]", 'keys = ["*"]', "operations = []"),
            9,
            id="empty-operations-line-9",
        ),
        pytest.param(
            (*GOOD_RULE, "[[allow]]", "users = [0]", "keys = []", 'operations = ["get"]'),
            8,
            id="empty-keys-line-8",
        ),
        pytest.param(
            (*GOOD_RULE, "[[deny]]", "users = [0]"),
            6,
            id="unknown-table-line-6",
        ),
    ],
)
def test_every_error_names_its_line(lines: tuple[str, ...], line: int) -> None:
    assert error_line(toml(*lines)) == line


def test_invalid_toml_names_its_line() -> None:
    # tomllib reports "(at line 8, column 14)"; the contract is "<source>:8: ...".
    text = toml(*GOOD_RULE, "[[allow]]", "users = [0]", "operations = get")
    assert error_line(text) == 8


def test_toml_cut_off_at_the_end_names_the_last_line() -> None:
    text = toml(*GOOD_RULE, "[[allow]]", "users = [0,")  # "(at end of document)"
    assert error_line(text) == len(GOOD_RULE) + 2


def test_a_byte_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "acl.toml"
    path.write_bytes(toml(*GOOD_RULE).encode() + b"# caf\xe9\n")
    with pytest.raises(AclError, match=rf"^{re.escape(str(path))}:{len(GOOD_RULE) + 1}: "):
        Acl.load(path)


def test_an_acl_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    """/dev/zero filled memory and a FIFO hung; the mode check needs a file anyway."""
    with pytest.raises(AclError, match="cannot read ACL /dev/zero: it is not a regular file"):
        Acl.load(Path("/dev/zero"))
    fifo = tmp_path / "acl.fifo"
    os.mkfifo(fifo)  # nobody writes: it would hang start-up or a reload
    with pytest.raises(AclError, match="not a regular file"):
        Acl.load(fifo)
    with pytest.raises(AclError, match="NUL"):
        Acl.load(tmp_path / "a\0b")


def test_a_duplicate_field_names_its_line() -> None:
    text = toml("[[allow]]", "users = [0]", 'keys = ["*"]', "users = [1]", 'operations = ["get"]')
    assert error_line(text) == 4


def test_allow_that_is_not_an_array_of_tables_names_its_line() -> None:
    assert error_line(toml("# rules", "allow = 1")) == 2


def test_unknown_field_is_found_on_its_own_line_not_in_a_longer_field_name() -> None:
    # "user" (a typo) is a substring of "users" on line 2: the error must still name line 5.
    text = toml("[[allow]]", "users = [0]", 'keys = ["*"]', 'operations = ["get"]', "user = [1]")
    assert error_line(text) == 5


def test_unknown_user_in_a_single_quoted_literal_string_names_its_line() -> None:
    # 'name' is TOML's literal string: as valid as "name".
    text = toml("[[allow]]", "keys = ['*']", "operations = ['get']", f"users = ['{NO_USER}']")
    assert error_line(text) == 4


def test_unknown_user_in_a_multi_line_array_names_the_line_of_the_name() -> None:
    text = toml(
        "[[allow]]",
        "users = [",
        f'  "{ROOT_NAME}",',
        f'  "{NO_USER}",',
        "]",
        'keys = ["*"]',
        'operations = ["get"]',
    )
    assert error_line(text) == 4


def test_a_comment_that_looks_like_a_field_is_not_its_line() -> None:
    text = toml(
        "[[allow]]",
        "users = [0]",
        "# groups, keys = see below",
        "keys = []",
        'operations = ["get"]',
    )
    assert error_line(text) == 4


def test_a_name_quoted_in_a_comment_is_not_its_line() -> None:
    text = toml(
        "[[allow]]",
        "users = [",
        f'  # "{NO_USER}" left the company',
        f'  "{ROOT_NAME}",  # "{NO_USER}" too',
        f'  "{NO_USER}",',
        "]",
        'keys = ["*"]',
        'operations = ["get"]',
    )
    assert error_line(text) == 5


@pytest.mark.parametrize("field", ["[allow.extra]", "extra.field = 1"])
def test_an_unknown_sub_table_or_dotted_field_names_its_line(field: str) -> None:
    text = toml("[[allow]]", "users = [0]", 'keys = ["*"]', 'operations = ["get"]', field)
    assert error_line(text) == 5


@pytest.mark.parametrize("uid", ["4294967295", "4294967296", "99999999999"])
def test_an_id_no_process_can_have_is_refused(uid: str) -> None:
    """32-bit ids, and -1 is "no id": such a number could never match anyone."""
    text = toml("[[allow]]", 'keys = ["*"]', 'operations = ["get"]', f"users = [{uid}]")
    assert error_line(text) == 4
    text = toml("[[allow]]", 'keys = ["*"]', 'operations = ["get"]', f'groups = ["{uid}"]')
    assert error_line(text) == 4


def test_errors_in_rules_under_quoted_headers_name_their_line() -> None:
    # [["allow"]] and [['allow']] are the same table array as [[allow]].
    text = toml(*GOOD_RULE, "[['allow']]", "users = [0]", 'keys = ["*"]', 'operations = ["all"]')
    assert error_line(text) == len(GOOD_RULE) + 4


@pytest.mark.parametrize(
    ("second_rule", "line"),
    [
        ('{ users = [0], keys = ["a/*"], operations = ["enc", "all"] },', 3),
        ('{ users = [0], keyz = ["a/*"], operations = ["enc"] },', 3),
        (f'{{ users = ["{NO_USER}"], keys = ["a/*"], operations = ["enc"] }},', 3),
        ('{ users = [0], keys = [], operations = ["enc"] },', 3),
        ('{ keys = ["a/*"], operations = ["enc"] },', 3),
    ],
    ids=["unknown-operation", "unknown-field", "unknown-user", "empty-keys", "nobody"],
)
def test_errors_in_inline_table_rules_name_their_line(second_rule: str, line: int) -> None:
    text = toml(
        "allow = [",
        '  { users = [0], keys = ["*"], operations = ["get"] },',
        f"  {second_rule}",
        "]",
    )
    assert error_line(text) == line


@pytest.mark.parametrize("value", ['"root"', "[-1]", "[true]", "[1.5]", '[["root"]]'], ids=str)
def test_users_of_the_wrong_type_name_the_users_line(value: str) -> None:
    text = toml("[[allow]]", 'keys = ["*"]', f"users = {value}", 'operations = ["get"]')
    assert error_line(text) == 3


@pytest.mark.parametrize("operation", ["GET", "ping", "all", "*", ""])
def test_only_lower_case_key_operations_may_be_granted(operation: str) -> None:
    text = toml("[[allow]]", "users = [0]", 'keys = ["*"]', f'operations = ["{operation}"]')
    assert error_line(text) == 4


@pytest.mark.parametrize("pattern", ["", "/*", "pg/", "pg/**", "*/x", ".x", "a b", "café", "pg/?"])
def test_invalid_key_patterns_are_refused(pattern: str) -> None:
    text = toml("[[allow]]", "users = [0]", f'keys = ["{pattern}"]', 'operations = ["get"]')
    assert error_line(text) == 3


# --------------------------------------------------------------------------- decisions


def grants_of(text: str, who: Peer) -> Grants:
    return parse(text).grants_for(who)


def test_deny_by_default_but_ping_hello_help_quit_are_always_allowed() -> None:
    text = toml(
        "[[allow]]", "users = [1]", 'keys = ["*"]', f"operations = {quoted(ALL_OPERATIONS)}"
    )
    grants = grants_of(text, peer(uid=2, gid=2))
    for operation, request in key_requests("any").items():
        assert not grants.permits(request), operation
    for request in (Ping(), Hello(), Help(), Quit()):
        assert grants.permits(request)


def test_a_user_rule_grants_exactly_its_operations() -> None:
    text = toml("[[allow]]", "users = [1000]", 'keys = ["*"]', 'operations = ["get", "datakey"]')
    grants = grants_of(text, peer(uid=1000))
    allowed = {op for op, request in key_requests("k").items() if grants.permits(request)}
    assert allowed == {"get", "datakey"}


def test_prefix_pattern_covers_everything_below_but_no_sibling() -> None:
    text = toml("[[allow]]", "users = [1000]", 'keys = ["pg/*"]', 'operations = ["get"]')
    grants = grants_of(text, peer(uid=1000))
    for key_id in ("pg/a", "pg/a/b", "pg/cluster1/wal/x", "pg/0"):
        assert grants.permits(Get(key_id)), key_id
    for key_id in ("pg", "pgx/a", "pgx", "pg-a", "apg/a", "x/pg/a", "PG/a"):
        assert not grants.permits(Get(key_id)), key_id


def test_exact_pattern_covers_only_that_key() -> None:
    text = toml("[[allow]]", "users = [1000]", 'keys = ["app/billing"]', 'operations = ["enc"]')
    grants = grants_of(text, peer(uid=1000))
    assert grants.permits(Encrypt("app/billing", b"x"))
    for key_id in ("app/billing/x", "app/billingx", "app", "app/Billing", "app/billin"):
        assert not grants.permits(Encrypt(key_id, b"x")), key_id


def test_star_covers_every_key() -> None:
    text = toml("[[allow]]", "users = [1000]", 'keys = ["*"]', 'operations = ["info"]')
    grants = grants_of(text, peer(uid=1000))
    for key_id in ("a", "pg/a/b", "Z.9_-"):
        assert grants.permits(Info(key_id))


def test_an_operation_granted_on_one_key_is_not_granted_on_another() -> None:
    text = toml(
        "[[allow]]",
        "users = [1000]",
        'keys = ["pg/*"]',
        'operations = ["get"]',
        "[[allow]]",
        "users = [1000]",
        'keys = ["app/x"]',
        'operations = ["enc"]',
    )
    grants = grants_of(text, peer(uid=1000))
    assert grants.permits(Get("pg/a"))
    assert grants.permits(Encrypt("app/x", b"x"))
    assert not grants.permits(Get("app/x"))
    assert not grants.permits(Encrypt("pg/a", b"x"))


def test_group_rules_apply_through_primary_and_supplementary_groups() -> None:
    text = toml("[[allow]]", "groups = [27]", 'keys = ["*"]', 'operations = ["get"]')
    assert grants_of(text, peer(uid=5, gid=27)).permits(Get("k"))
    assert grants_of(text, peer(uid=5, gid=5, groups=(27,))).permits(Get("k"))
    assert not grants_of(text, peer(uid=27, gid=5, groups=(28,))).permits(Get("k"))


def test_a_user_rule_does_not_apply_to_a_group_of_the_same_number() -> None:
    text = toml("[[allow]]", "users = [27]", 'keys = ["*"]', 'operations = ["get"]')
    assert not grants_of(text, peer(uid=5, gid=27)).permits(Get("k"))
    assert grants_of(text, peer(uid=27, gid=5)).permits(Get("k"))


def test_owner_only_grants_everything_to_that_uid_alone() -> None:
    acl = Acl.owner_only(1234)
    owner = acl.grants_for(peer(uid=1234))
    stranger = acl.grants_for(peer(uid=1235, gid=1234))
    for operation, request in key_requests("any/key").items():
        assert owner.permits(request), operation
        assert not stranger.permits(request), operation


def test_key_pattern_covers() -> None:
    assert KeyPattern("*").covers("x")
    assert KeyPattern("a/*").covers("a/b")
    assert not KeyPattern("a/*").covers("a")
    assert KeyPattern("a").covers("a")
    assert not KeyPattern("a").covers("a/b")


# --------------------------------------------------------------------------- live daemon

UID = os.getuid()


def acl_text(*rules: tuple[list[str], list[str]]) -> str:
    """Rules for this process's uid: (key patterns, operations) each."""
    lines: list[str] = []
    for keys, operations in rules:
        lines += [
            "[[allow]]",
            f"users = [{UID}]",
            f"keys = {quoted(keys)}",
            f"operations = {quoted(operations)}",
        ]
    return toml(*lines)


GET_A_CREATE_ALL = acl_text((["a/*"], ["get"]), (["*"], ["create"]))
ENC_A_CREATE_ALL = acl_text((["a/*"], ["enc"]), (["*"], ["create"]))


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.fixture
def acl_daemon(short_tmp: Path) -> Iterator[Daemon]:
    """A daemon whose ACL lets this uid `get` under a/* and `create` anything."""
    daemon = make_store(short_tmp / "d")
    acl = short_tmp / "acl.toml"
    acl.write_text(GET_A_CREATE_ALL)
    daemon.extra_args = ["--acl", str(acl)]
    with running(daemon):
        yield daemon


def acl_path(daemon: Daemon) -> Path:
    return Path(daemon.extra_args[daemon.extra_args.index("--acl") + 1])


def test_live_denied_comes_before_any_look_at_the_store(acl_daemon: Daemon) -> None:
    with Conn(acl_daemon.socket_path) as conn:
        assert code_of(conn.ask(b"GET a/x")) == "NOT_FOUND"  # granted: the store answers
        assert conn.ask(b"CREATE a/x exportable") == b"OK 1"
        assert conn.ask(b"CREATE b exportable") == b"OK 1"
        assert code_of(conn.ask(b"GET a/x")) == "OK"
        assert code_of(conn.ask(b"GET a/x 1")) == "OK"
        assert code_of(conn.ask(b"GET a/x 2")) == "NOT_FOUND"
        # Not granted: DENIED whether the key exists or not, byte for byte the same reply.
        existing, missing = conn.ask(b"GET b"), conn.ask(b"GET nothere")
        assert code_of(existing) == "DENIED"
        assert existing == missing
        for line in (
            b"ENC a/x " + b64(b"plaintext"),
            b"DEC a/x " + b64(bytes(46)),
            b"DATAKEY a/x",
            b"INFO a/x",
            b"ROTATE a/x",
            b"ROTATE b",
            b"GET a",
            b"GET ax/y",
        ):
            assert code_of(conn.ask(line)) == "DENIED", line
        # Malformed requests are refused for what they are, before the ACL (protocol.md 3).
        assert code_of(conn.ask(b"GET b 0")) == "BAD_REQUEST"
        assert code_of(conn.ask(b"ENC b !!!!")) == "BAD_REQUEST"
        assert code_of(conn.ask(b"GET ..")) == "BAD_KEY_ID"
        # Always allowed, and the connection is still usable after every DENIED.
        assert conn.ask(b"PING") == b"OK PONG"
        assert code_of(conn.ask(b"HELLO")) == "OK"
        assert code_of(conn.ask(b"HELP")) == "OK"
        assert conn.ask(b"QUIT") == b"OK BYE"
    assert code_of(ask(acl_daemon.socket_path, b"ROTATE a/x")) == "DENIED"


def test_live_sighup_reload_changes_decisions_on_an_open_connection(acl_daemon: Daemon) -> None:
    assert acl_daemon.process is not None
    enc = b"ENC a/x " + b64(b"plaintext")
    with Conn(acl_daemon.socket_path) as conn:
        assert conn.ask(b"CREATE a/x exportable") == b"OK 1"
        assert code_of(conn.ask(b"GET a/x")) == "OK"
        assert code_of(conn.ask(enc)) == "DENIED"

        write_atomically(acl_path(acl_daemon), ENC_A_CREATE_ALL)
        acl_daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: code_of(conn.ask(enc)) == "OK", what="the reloaded ACL to grant ENC")

        assert code_of(conn.ask(b"GET a/x")) == "DENIED"
        assert conn.ask(b"PING") == b"OK PONG"
        assert code_of(ask(acl_daemon.socket_path, b"GET a/x")) == "DENIED"
        assert code_of(ask(acl_daemon.socket_path, enc)) == "OK"
    assert acl_daemon.process.poll() is None


def test_live_bad_acl_at_reload_is_rejected_and_the_old_one_stays(acl_daemon: Daemon) -> None:
    assert acl_daemon.process is not None
    enc = b"ENC a/x " + b64(b"plaintext")
    path = acl_path(acl_daemon)
    with Conn(acl_daemon.socket_path) as conn:
        assert conn.ask(b"CREATE a/x exportable") == b"OK 1"
        bad = toml("[[allow]]", f"users = [{UID}]", f'groups = ["{NO_GROUP}"]', 'keys = ["*"]')
        write_atomically(path, bad)
        acl_daemon.process.send_signal(signal.SIGHUP)
        # The daemon log names the rejected file and line (the contract's prefix, not wording).
        wait_for(lambda: f"{path}:3:" in acl_daemon.log.read_text(), what="the rejection log")

        assert code_of(conn.ask(b"GET a/x")) == "OK"
        assert code_of(conn.ask(enc)) == "DENIED"
        with Conn(acl_daemon.socket_path) as fresh:
            assert code_of(fresh.ask(b"GET a/x")) == "OK"
            assert code_of(fresh.ask(enc)) == "DENIED"
            assert fresh.ask(b"CREATE c") == b"OK 1"
        assert acl_daemon.process.poll() is None

        # A good file at the next SIGHUP is taken: reloading still works after a rejection.
        write_atomically(path, ENC_A_CREATE_ALL)
        acl_daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: code_of(conn.ask(enc)) == "OK", what="the good ACL after a bad one")
        assert code_of(conn.ask(b"GET a/x")) == "DENIED"


def test_live_sighup_reads_the_config_file_again(short_tmp: Path) -> None:
    """SIGHUP reads --config again: its ACL and audit log are put in force together, or
    neither; a bad config is rejected and the old one stays; flags still win."""
    daemon = make_store(short_tmp / "d")
    first_acl, second_acl = short_tmp / "acl1.toml", short_tmp / "acl2.toml"
    first_acl.write_text(GET_A_CREATE_ALL)
    second_acl.write_text(ENC_A_CREATE_ALL)
    first_audit, second_audit = short_tmp / "audit1.log", short_tmp / "audit2.log"
    config = short_tmp / "kmsd.toml"

    def configure(*lines: str) -> None:
        write_atomically(config, "\n".join(lines) + "\n")

    def reload_and_wait(said: str) -> None:
        seen = daemon.log.read_text().count(said)
        daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(lambda: daemon.log.read_text().count(said) > seen, what=said)

    configure(f'acl = "{first_acl}"', f'audit_log = "{first_audit}"')
    daemon.extra_args = ["--config", str(config)]
    enc = b"ENC a/x " + b64(b"plaintext")
    with running(daemon), Conn(daemon.socket_path) as conn:
        assert conn.ask(b"CREATE a/x exportable") == b"OK 1"
        assert code_of(conn.ask(enc)) == "DENIED"

        # An ACL that parses beside an audit log that cannot be opened: neither is taken.
        configure(f'acl = "{second_acl}"', f'audit_log = "{short_tmp}/no/such/dir/audit.log"')
        reload_and_wait("reload rejected")
        assert code_of(conn.ask(enc)) == "DENIED"
        configure("this is = not [ toml")
        reload_and_wait("reload rejected")
        assert code_of(conn.ask(enc)) == "DENIED"
        # Neither crashed the daemon (it exited 1): bytes that are not UTF-8, a NUL in a path.
        config.write_bytes(b"# caf\xe9\n")
        reload_and_wait("reload rejected")
        configure(f'acl = "{second_acl}"', 'audit_log = "/tmp/x\\u0000y"')
        reload_and_wait("reload rejected")
        assert code_of(conn.ask(enc)) == "DENIED"
        assert b'"verb":"ENC"' in first_audit.read_bytes()

        configure(f'acl = "{second_acl}"', f'audit_log = "{second_audit}"', "max_connections = 7")
        reload_and_wait("reloaded: ACL")
        assert code_of(conn.ask(enc)) == "OK"
        assert code_of(conn.ask(b"GET a/x")) == "DENIED"
        assert b'"verb":"GET"' in second_audit.read_bytes()
        assert b'"verb":"GET"' not in first_audit.read_bytes()
        assert "max_connections: in force only after a restart" in daemon.log.read_text()

    # A flag wins over the file at a reload as at start.
    daemon.extra_args = ["--config", str(config), "--acl", str(first_acl)]
    with running(daemon), Conn(daemon.socket_path) as conn:
        reload_and_wait("reloaded: ACL")
        assert code_of(conn.ask(enc)) == "DENIED"
        assert code_of(conn.ask(b"GET a/x")) == "OK"


def test_a_config_that_came_through_a_pipe_keeps_its_settings_at_a_reload(
    short_tmp: Path,
) -> None:
    """`--config /dev/stdin` cannot be read again: a reload read it as empty and put the
    default ACL and stderr in place of the ones it named."""
    daemon = make_store(short_tmp / "d")
    acl = short_tmp / "acl.toml"
    acl.write_text(ENC_A_CREATE_ALL)
    audit = short_tmp / "audit.log"
    daemon.extra_args = ["--config", "/dev/stdin"]
    config = f'acl = "{acl}"\naudit_log = "{audit}"\n'.encode()
    with daemon.log.open("ab") as log:
        daemon.process = subprocess.Popen(daemon.command(), stdin=subprocess.PIPE, stderr=log)
    try:
        assert daemon.process.stdin is not None
        daemon.process.stdin.write(config)
        daemon.process.stdin.close()
        wait_for(lambda: os.path.exists(daemon.socket_path), what="the daemon to serve")
        enc = b"ENC a/x " + b64(b"plaintext")
        assert ask(daemon.socket_path, b"CREATE a/x") == b"OK 1"
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded: ACL" in daemon.log.read_text(), what="the reload")
        assert f"reloaded: ACL {acl}" in daemon.log.read_text()
        assert code_of(ask(daemon.socket_path, enc)) == "OK"
        assert b'"verb":"ENC"' in audit.read_bytes()
    finally:
        daemon.stop()


def test_a_config_replaced_by_a_fifo_is_rejected_at_reload_and_the_daemon_stops(
    short_tmp: Path,
) -> None:
    """A FIFO nobody writes in the config's place: the reload refuses it at once (it hung
    the reload, and SIGTERM with it); the daemon serves on and stops. A reload that hangs
    on a regular file (a hung mount) is test_store's."""
    daemon = make_store(short_tmp / "d")
    config = short_tmp / "kmsd.toml"
    config.write_text("max_connections = 9\n")
    daemon.extra_args = ["--config", str(config)]
    with running(daemon):
        config.unlink()
        os.mkfifo(config)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "not a regular file" in daemon.log.read_text(), what="the rejection")
        assert ask(daemon.socket_path, b"PING") == b"OK PONG"
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(10) == 0
        daemon.process = None


def assert_one_line_naming(result: subprocess.CompletedProcess[bytes], where: str) -> None:
    assert_fails(result, EXIT_CONFIG)
    assert where in result.stderr.decode(), result.stderr


BAD_OPERATION_ON_LINE_4 = toml("[[allow]]", "users = [0]", 'keys = ["*"]', 'operations = ["nuke"]')


def test_serve_with_a_bad_acl_exits_2_with_one_line_naming_the_line(short_tmp: Path) -> None:
    store = make_store(short_tmp / "d")
    bad = short_tmp / "bad.toml"
    bad.write_text(BAD_OPERATION_ON_LINE_4)
    result = kmsd(*store.command()[3:], "--acl", bad)
    assert_one_line_naming(result, f"{bad}:4:")
    assert not Path(store.socket_path).exists()


def test_serve_with_a_missing_acl_exits_2(short_tmp: Path) -> None:
    store = make_store(short_tmp / "d")
    result = kmsd(*store.command()[3:], "--acl", short_tmp / "missing.toml")
    assert_one_line_naming(result, str(short_tmp / "missing.toml"))
    assert not Path(store.socket_path).exists()


def test_an_acl_without_rules_is_served_with_a_warning(short_tmp: Path) -> None:
    """Valid (nobody may use a key: deny by default), but rarely meant: said at start."""
    daemon = make_store(short_tmp / "d")
    empty = short_tmp / "empty.toml"
    empty.write_text("# every rule removed\n")
    daemon.extra_args = ["--acl", str(empty)]
    with running(daemon), Conn(daemon.socket_path) as conn:
        assert conn.ask(b"PING") == b"OK PONG"
        assert code_of(conn.ask(b"INFO k")) == "DENIED"
    assert f"ACL {empty} has no rules: nobody may use a key" in daemon.log.read_text()


def test_check_config_validates_without_starting(short_tmp: Path) -> None:
    store = make_store(short_tmp / "d")
    good, bad = short_tmp / "good.toml", short_tmp / "bad.toml"
    good.write_text(GET_A_CREATE_ALL)
    bad.write_text(BAD_OPERATION_ON_LINE_4)
    # A socket path in a directory that does not exist: check-config must not need it.
    socket_path = short_tmp / "absent" / "kms.sock"
    common = ["--store", store.store, "--kek-file", store.kek_file, "--socket", socket_path]

    result = kmsd("check-config", *common, "--acl", good)
    assert result.returncode == 0, result.stderr
    result = kmsd("check-config", *common, "--acl", bad)
    assert_one_line_naming(result, f"{bad}:4:")
    result = kmsd("check-config", *common)  # no ACL: the owner-only default is valid
    assert result.returncode == 0, result.stderr

    assert not socket_path.parent.exists()
    assert not (store.store / ".lock").exists()  # the store was never opened

    # What serve would stop on before reading the KEK, check-config stops on too.
    results = kmsd_all(
        ["check-config", *common, "--audit-log", short_tmp / "absent" / "audit.log"],
        ["check-config", "--store", short_tmp / "no-store", "--kek-file", store.kek_file],
        ["check-config", "--store", store.store, "--kek-file", short_tmp / "no-kek"],
    )
    assert [result.returncode for result in results] == [2, 3, 4]
    for result in results:
        assert result.stderr.count(b"\n") == 1, result.stderr
    # An audit log it could open is left as it was: not created, not chmod-ed.
    fresh, loose = short_tmp / "fresh-audit.log", short_tmp / "loose-audit.log"
    loose.write_bytes(b"old line\n")
    loose.chmod(0o644)
    results = kmsd_all(
        ["check-config", *common, "--audit-log", fresh],
        ["check-config", *common, "--audit-log", loose],
        ["check-config", *common, "--audit-log", short_tmp],  # a directory
    )
    assert [result.returncode for result in results] == [0, 0, 2]
    assert not fresh.exists()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o644
    assert loose.read_bytes() == b"old line\n"

    # An ACL alone, as after editing it: no store needed.
    result = kmsd("check-config", "--acl", good)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"ACL OK: ")
    assert_one_line_naming(kmsd("check-config", "--acl", bad), f"{bad}:4:")
    assert kmsd("check-config").returncode == 2  # nothing to check


def test_an_acl_every_user_may_write_is_refused(short_tmp: Path) -> None:
    """Anyone could grant themselves every key: the ACL is refused, however well formed."""
    acl = short_tmp / "acl.toml"
    acl.write_text(GET_A_CREATE_ALL)
    acl.chmod(0o666)
    assert_one_line_naming(kmsd("check-config", "--acl", acl), str(acl))
    acl.chmod(0o664)  # a group of editors may write it
    assert kmsd("check-config", "--acl", acl).returncode == 0


def test_check_config_succeeds_while_a_daemon_holds_the_store(acl_daemon: Daemon) -> None:
    # It neither takes the store lock nor binds the socket, so it works beside a live daemon.
    result = kmsd(
        "check-config",
        "--store",
        acl_daemon.store,
        "--kek-file",
        acl_daemon.kek_file,
        "--socket",
        acl_daemon.socket_path,
        "--acl",
        acl_path(acl_daemon),
    )
    assert result.returncode == 0, result.stderr
    assert ask(acl_daemon.socket_path, b"PING") == b"OK PONG"


def test_without_acl_the_daemon_says_only_its_own_uid_may_use_it(daemon: Daemon) -> None:
    assert ask(daemon.socket_path, b"CREATE k") == b"OK 1"
    warnings = [line for line in daemon.log.read_text().splitlines() if " WARNING " in line]
    assert any(re.search(rf"\buid {UID}\b", line) for line in warnings), warnings
