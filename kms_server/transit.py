# KEK source "transit": the store root key is kept only wrapped by an OpenBao/Vault Transit key.
# Speaks HTTP to the key service through hvac; never logs, records or puts a secret in a message.
"""The ``transit`` KEK source: the store's root key lives wrapped by Transit.

At ``kmsd init`` a random 32-byte root key is made here, encrypted once by
the Transit secrets engine of OpenBao (or Vault) and dropped: the store
metadata keeps only the ciphertext (``vault:vN:...``). At start the daemon
asks Transit to decrypt it once and keeps the root (the store's KEK) in memory.
The Transit key never leaves the key service; the root is never written to the
host in clear.

Binding to the store. The wrapped root is encrypted with Transit's ``context``
set to this store's id, which requires a *derived* Transit key
(``bao write transit/keys/NAME derived=true``): Transit derives a per-store key
from the context, so a ciphertext copied into another store's metadata does
not decrypt there. ``associated_data`` would bind as well on a plain AEAD key,
but Transit's ``rewrap`` does not take it (OpenBao 2.7 and Vault alike), so a
root wrapped that way could never be rewrapped after a key rotation; and
``context`` on a key that is *not* derived is silently ignored. So
:meth:`TransitSource.describe_new` refuses a key that is not derived: after
encrypting, it checks that a decrypt under another store's context fails
(this needs no ``read`` permission on the key).

Availability. Several URLs (a cluster's nodes) are tried in turn; connection
failures, a sealed or uninitialised node, a standby with no active node and
other 5xx answers are retried with exponential backoff (0.25 s doubling to
5 s) until ``start_timeout``, then one :class:`KekError` names every node's
last reason. A refused token, a missing key, a refused decrypt and a TLS
failure are final at once, with one exception: OpenBao standbys answer
requests themselves (``disable_standby_reads`` is false by default) and may lag
the active node by a moment, so a refusal from a node whose ``sys/health``
says "standby" is retried like an outage. Each request's connect and read
timeouts are cut to what is left of the deadline (but never below
``MIN_REQUEST_TIMEOUT``), so a node that accepts and never answers overruns it
by about a second per node at most, not by the request timeout. Only plain
:class:`KekError` leaves this module.

Tokens. Either a token file (read at first use and read again after a 403, so
a rotated file is picked up) or AppRole (role-id and secret-id files, login at
``auth/<approle_mount>/login``; a 403 logs in again once). :meth:`health`,
which a running daemon calls now and then, renews a renewable token once half
its TTL has passed (``renew-self``).

Least privilege: the token needs ``update`` on ``MOUNT/encrypt/KEY``,
``MOUNT/decrypt/KEY`` and ``MOUNT/rewrap/KEY``; ``read`` on ``MOUNT/keys/KEY``
is optional (it gives clearer errors at init and a richer health check); the
default policy's ``auth/token/lookup-self`` and ``renew-self``.

Best effort only on wiping: the decrypted root passes through the HTTP
library's buffers and a JSON string, which Python cannot overwrite.
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import hvac
import hvac.exceptions
import requests
import requests.adapters

from kms_server.crypto import KEY_SIZE, random_bytes, wipe
from kms_server.kek import (
    TRANSIT_KIND,
    TRANSIT_START_TIMEOUT,
    KekError,
    SourceRecordDamaged,
    read_small_file,
)

DEFAULT_MOUNT = "transit"
DEFAULT_APPROLE_MOUNT = "approle"
DEFAULT_REQUEST_TIMEOUT = 10.0
CONNECT_TIMEOUT = 3.0
#: A request tried at (or past) a retry deadline still gets this long to answer.
MIN_REQUEST_TIMEOUT = 1.0
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 5.0
#: Renew a renewable token once its remaining TTL falls to this share of its full TTL.
RENEW_AT_FRACTION = 0.5
#: A token, role-id or secret-id file holds one short line: more is not one of them.
MAX_SECRET_SIZE = 4096
#: How long such a file may take to deliver it (a FIFO fed by a secrets agent).
SECRET_FILE_TIMEOUT = 10.0
#: The Transit ``context`` is this label followed by the store id.
CONTEXT_LABEL = b"kmsd store root v1\x00"
BINDING = "context:store-id"
_PROBE_SUFFIX = b"\x00binding-probe"
_CIPHERTEXT = re.compile(r"vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/=]+")
_NAME = re.compile(r"[A-Za-z0-9_.@-][A-Za-z0-9_.@/-]{0,127}")


def _is_name(value: str) -> bool:
    """A mount, key or namespace path: no ``.`` or ``..`` segment (it goes into a URL path)."""
    return _NAME.fullmatch(value) is not None and not {"", ".", ".."} & set(value.split("/"))


T = TypeVar("T")


def binding_context(store_id: str) -> str:
    """The base64 Transit ``context`` binding a wrapped root to ``store_id``."""
    if not store_id:
        raise KekError("a Transit-wrapped root key needs the store id (internal error)")
    return base64.b64encode(CONTEXT_LABEL + store_id.encode()).decode()


def wrapped_version(description: dict[str, Any]) -> int:
    """The Transit key version that wrapped the root recorded in ``description``."""
    return _Wrapped.parse(description).version


@dataclass(frozen=True)
class _Wrapped:
    """The non-secret facts a store's metadata records about its wrapped root."""

    mount: str
    key: str
    ciphertext: str
    version: int
    namespace: str | None

    @classmethod
    def parse(cls, description: dict[str, Any]) -> _Wrapped:
        mount, key, ciphertext = (description.get(n) for n in ("mount", "key", "ciphertext"))
        namespace = description.get("namespace")
        match = _CIPHERTEXT.fullmatch(ciphertext) if isinstance(ciphertext, str) else None
        if (
            description.get("kind") != TRANSIT_KIND
            or description.get("binding") != BINDING
            or not isinstance(mount, str)
            or not _is_name(mount)
            or not isinstance(key, str)
            or not _is_name(key)
            or match is None
            or not (namespace is None or (isinstance(namespace, str) and namespace))
        ):
            raise SourceRecordDamaged(
                "store metadata holds a damaged or unsupported Transit description"
            )
        assert isinstance(ciphertext, str)  # noqa: S101 - matched above
        return cls(mount, key, ciphertext, int(match.group(1)), namespace)

    def describe(self) -> dict[str, Any]:
        description: dict[str, Any] = {
            "kind": TRANSIT_KIND,
            "mount": self.mount,
            "key": self.key,
            "ciphertext": self.ciphertext,
            "binding": BINDING,
        }
        if self.namespace is not None:
            description["namespace"] = self.namespace
        return description


class _Refusal(KekError):
    """A node's answer refusing the request; final only from the active node (see _call_node)."""


class _Retry(Exception):
    """This node cannot answer now (down, sealed, no leader): try the next one, later again."""


def _check_url(url: str) -> str:
    """The URL without a trailing slash; errors never echo credentials or a query."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("Transit URLs must not hold credentials; use a token file or AppRole")
    shown = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))  # a query may hold one
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Transit URL {shown!r} must look like https://host:8200")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(f"Transit URL {shown!r} must be scheme://host:port only")
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535
        port = 0
    if port == 0:
        raise ValueError(f"Transit URL {shown!r} has no valid port (1 to 65535)")
    return url.rstrip("/")


def _check_name(what: str, value: str | None) -> str | None:
    if value is not None and not _is_name(value.strip("/")):
        raise ValueError(f"{what} {value!r} is not a valid OpenBao path segment")
    return None if value is None else value.strip("/")


def _read_secret(path: Path, what: str) -> str:
    """The one line of a small secret file; errors name the file, never its content.

    Read as a KEK file is: one that every user may write is refused (its credentials
    may be anyone's), and a FIFO or a device cannot hang or exhaust the daemon.
    """
    data = read_small_file(path, MAX_SECRET_SIZE, SECRET_FILE_TIMEOUT, f"Transit {what} file")
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        raise KekError(f"the Transit {what} file {path} is not text") from None
    finally:
        wipe(data)
    if not text or "\n" in text:
        raise KekError(f"the Transit {what} file {path} must hold one non-empty line")
    if not text.isprintable():  # a CR, a tab: no HTTP header could carry it
        raise KekError(f"the Transit {what} file {path} holds a control character")
    return text


def _first_error(exc: hvac.exceptions.VaultError) -> str:
    """The key service's own first error line (never the response body), shortened."""
    errors = exc.errors
    first = errors if isinstance(errors, str) else next(iter(errors or ()), "")
    text = " ".join(str(first).split())
    return text[:200] or f"HTTP error {type(exc).__name__}"


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (args, reason, cause, context), breadth first."""
    seen: list[BaseException] = []
    queue = [exc]
    while queue and len(seen) < 32:
        current = queue.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        inner = [*current.args, getattr(current, "reason", None)]
        inner += [current.__cause__, current.__context__]
        queue.extend(item for item in inner if isinstance(item, BaseException))
    return seen


def _tls_reason(exc: BaseException) -> str:
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {cause.verify_message}"
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLError) and cause.reason:
            return f"TLS error {cause.reason}"
    return "TLS handshake failed"


def _connection_reason(exc: BaseException) -> str:
    causes = _causes(exc)
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return "connection refused"
    if any(isinstance(c, requests.Timeout | TimeoutError) for c in causes):
        return "timed out"
    if any(type(c).__name__ == "NameResolutionError" for c in causes):
        return "unknown host"
    return "unreachable"


def _data(response: object, what: str) -> dict[str, Any]:
    if not isinstance(response, dict) or not isinstance(response.get("data"), dict):
        raise KekError(f"the Transit service sent an unexpected answer to {what}")
    data: dict[str, Any] = response["data"]
    return data


def _translate(
    exc: Exception,
    url: str,
    what: str,
    refusal: Callable[[hvac.exceptions.VaultError], _Refusal] | None,
) -> Exception:
    """A failure of one request to one node: :class:`_Retry` (try elsewhere, later) or final."""
    if isinstance(exc, requests.exceptions.SSLError):
        reason = _tls_reason(exc)
        hint = (
            "the server does not speak TLS: is its URL http://?"
            if "WRONG_VERSION_NUMBER" in reason
            else "give the CA file with --transit-ca"
        )
        return _Refusal(f"TLS failure talking to {url}: {reason} ({hint})")
    if isinstance(exc, requests.RequestException):
        return _Retry(_connection_reason(exc))
    assert isinstance(exc, hvac.exceptions.VaultError)  # noqa: S101 - the only other kind
    if "HTTP request to an HTTPS server" in (exc.text or ""):  # Go's answer, not JSON
        return _Refusal(f"{url} speaks TLS: give its URL as https://")
    reason = _first_error(exc)
    if isinstance(exc, hvac.exceptions.VaultDown):
        return _Retry("sealed" if "sealed" in reason else f"unavailable: {reason}")
    if isinstance(exc, hvac.exceptions.VaultNotInitialized):
        return _Retry("not initialized")
    if isinstance(
        exc,
        hvac.exceptions.InternalServerError
        | hvac.exceptions.BadGateway
        | hvac.exceptions.RateLimitExceeded
        | hvac.exceptions.PreconditionFailed
        | hvac.exceptions.UnexpectedError,
    ):
        return _Retry(reason)
    if refusal is not None and isinstance(
        exc, hvac.exceptions.InvalidRequest | hvac.exceptions.InvalidPath
    ):
        return refusal(exc)
    return _Refusal(f"Transit refused the {what}: {reason}")


def _read_key(client: hvac.Client, mount: str, key: str) -> Any:
    """The answer to reading ``<mount>/keys/<key>``, or ``None`` when there is no such key.

    ``hvac.Client.read`` gives ``None`` for any 404; a mount that does not exist is
    a 404 too, with "no handler for route", and is refused as such.
    """
    try:
        return client.adapter.get(f"/v1/{mount}/keys/{key}")
    except hvac.exceptions.InvalidPath as error:
        if "no handler for route" in _first_error(error):
            raise _Refusal(f"no Transit secrets engine at mount {mount!r}") from None
        return None


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    """Every request with a short connect timeout (a dead node is skipped fast) and a read one,
    both cut to ``time_left()`` seconds when that is not ``None``."""

    def __init__(self, read_timeout: float, time_left: Callable[[], float | None]) -> None:
        super().__init__()
        self._read_timeout = read_timeout
        self._time_left = time_left

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        connect, read = CONNECT_TIMEOUT, self._read_timeout
        left = self._time_left()
        if left is not None:
            connect, read = min(connect, left), min(read, left)
        return super().send(request, stream, (connect, read), verify, cert, proxies)


class TransitSource:
    """A KEK source backed by OpenBao/Vault Transit; see the module docstring.

    ``key``, ``mount`` and ``namespace`` left ``None`` mean "as recorded in the
    store" when opening one (``init`` needs ``key``; ``mount`` defaults to
    ``transit``); given and different from the record, they are refused.
    Invalid settings raise :class:`ValueError` (one line, for a config error).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        key: str | None = None,
        mount: str | None = None,
        token_file: Path | None = None,
        role_id_file: Path | None = None,
        secret_id_file: Path | None = None,
        approle_mount: str = DEFAULT_APPROLE_MOUNT,
        ca_file: Path | None = None,
        namespace: str | None = None,
        start_timeout: float = TRANSIT_START_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not urls:
            raise ValueError("give at least one Transit URL")
        self.urls = tuple(_check_url(url) for url in urls)
        self.key = _check_name("Transit key name", key)
        self.mount = _check_name("Transit mount", mount)
        self.approle_mount = _check_name("AppRole mount", approle_mount) or DEFAULT_APPROLE_MOUNT
        self.namespace = _check_name("namespace", namespace)
        approle = (role_id_file, secret_id_file)
        if token_file is not None and any(approle):
            raise ValueError("give a Transit token file or AppRole files, not both")
        if any(approle) and not all(approle):
            raise ValueError("AppRole needs both a role-id file and a secret-id file")
        if token_file is None and not any(approle):
            raise ValueError("no Transit credentials: give a token file or AppRole files")
        if not (start_timeout >= 0 and request_timeout > 0):
            raise ValueError("Transit timeouts must be positive numbers of seconds")
        self.token_file = token_file
        self.role_id_file = role_id_file
        self.secret_id_file = secret_id_file
        self.ca_file = ca_file
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.RLock()
        #: When the retries of the call under way end (``None``: a single pass, no cut).
        self._deadline: float | None = None
        self._clients: dict[str, hvac.Client] = {}
        self._token: str | None = None
        self._wrapped: _Wrapped | None = None
        #: The store whose root was unwrapped here: the health check unwraps it again.
        self._store_id: str | None = None

    @property
    def kind(self) -> str:
        return TRANSIT_KIND

    def __repr__(self) -> str:
        return f"TransitSource({list(self.urls)!r}, key={self.key!r}, mount={self.mount!r})"

    # ----------------------------------------------------------------- KekSource

    def describe_new(self, store_id: str = "") -> dict[str, Any]:
        """Make a random root key, have Transit wrap it bound to ``store_id``, drop it."""
        if self.key is None:
            raise KekError("a new Transit-wrapped root needs the Transit key name (--transit-key)")
        mount, key = self.mount or DEFAULT_MOUNT, self.key
        context = binding_context(store_id)
        self._call(lambda client: self._check_key_for_init(client, mount, key), "key check")
        root = bytearray(random_bytes(KEY_SIZE))
        try:
            plaintext = base64.b64encode(root).decode()
            answer = self._call(
                lambda client: client.write_data(
                    f"{mount}/encrypt/{key}",
                    data={"plaintext": plaintext, "context": context},
                ),
                f"encrypt with Transit key {key!r}",
                refusal=lambda error: self._refusal(error, mount, key),
            )
        finally:
            wipe(root)
        ciphertext = _data(answer, "encrypt").get("ciphertext")
        if not isinstance(ciphertext, str) or not (match := _CIPHERTEXT.fullmatch(ciphertext)):
            raise KekError("the Transit service sent an unexpected answer to encrypt")
        wrapped = _Wrapped(mount, key, ciphertext, int(match.group(1)), self.namespace)
        self._check_binding(wrapped, store_id)
        with self._lock:
            self._wrapped = wrapped
        return wrapped.describe()

    def obtain(self, description: dict[str, Any], store_id: str = "") -> bytearray:
        """Transit decrypt, once (retried only while no node can answer): the store's KEK."""
        wrapped = self._recorded(description)
        answer = self._on_wrapped_root("decrypt", wrapped, store_id)
        text = _data(answer, "decrypt").get("plaintext")
        try:
            root = bytearray(base64.b64decode(str(text), validate=True))
        except (binascii.Error, ValueError):
            raise KekError("the Transit service sent an unexpected answer to decrypt") from None
        if len(root) != KEY_SIZE:
            wipe(root)
            raise KekError(
                f"Transit key {wrapped.key!r} unwrapped something that is not a 32-byte root key"
            )
        with self._lock:
            self._wrapped = wrapped
            self._store_id = store_id
        return root

    def _on_wrapped_root(self, operation: str, wrapped: _Wrapped, store_id: str) -> Any:
        """Transit ``decrypt`` or ``rewrap`` of the store's wrapped root, bound to its id."""
        context = binding_context(store_id)
        return self._call(
            lambda client: client.write_data(
                f"{wrapped.mount}/{operation}/{wrapped.key}",
                data={"ciphertext": wrapped.ciphertext, "context": context},
            ),
            f"{operation} with Transit key {wrapped.key!r}",
            refusal=lambda error: self._refusal(error, wrapped.mount, wrapped.key, wrapped),
        )

    def rewrap(self, description: dict[str, Any], store_id: str = "") -> dict[str, Any]:
        """The description with the root rewrapped under the newest Transit key version.

        Transit decrypts and re-encrypts inside the key service: no plaintext
        crosses the network. The KEK itself is unchanged (the store's check value
        stays valid); only the recorded ciphertext changes. Already newest: the
        same version comes back (a fresh ciphertext of it).
        """
        wrapped = self._recorded(description)
        answer = self._on_wrapped_root("rewrap", wrapped, store_id)
        ciphertext = _data(answer, "rewrap").get("ciphertext")
        if not isinstance(ciphertext, str) or not (match := _CIPHERTEXT.fullmatch(ciphertext)):
            raise KekError("the Transit service sent an unexpected answer to rewrap")
        rewrapped = _Wrapped(
            wrapped.mount, wrapped.key, ciphertext, int(match.group(1)), wrapped.namespace
        )
        with self._lock:
            self._wrapped = rewrapped
        return rewrapped.describe()

    # ----------------------------------------------------------------- running daemon

    def health(self, description: dict[str, Any] | None = None) -> str:
        """``"ok"`` or ``"degraded: <why>"``: could a restart unwrap the root now?

        One pass over the nodes, no retries (bounded by the request timeout per
        node). Renews the token when it is renewable and half its TTL is gone.
        Then asks Transit to unwrap the store's root, as a restart would: the
        ciphertext in ``description`` (the store's current metadata, which a
        rewrap may have changed since start) or else the one last wrapped or
        unwrapped here. The answer is dropped; only whether it came matters. A
        token that lost ``decrypt``, a deleted key or a raised
        ``min_decryption_version`` shows here, not at the next restart. With
        ``read`` on the key, a raised minimum is named as such.
        """
        try:
            if description is not None:
                wrapped = self._recorded(description)
                with self._lock:
                    self._wrapped = wrapped
            current = self._wrapped
            self._call(
                self._check_health,
                "health check",
                timeout=0.0,
                refusal=None
                if current is None
                else lambda error: self._refusal(error, current.mount, current.key, current),
            )
        except KekError as error:
            return f"degraded: {error}"
        return "ok"

    def renew_token(self) -> int | None:
        """``renew-self`` now if the token is renewable; its new TTL in seconds, else None."""
        return self._call(lambda client: self._renew(client, force=True), "token renewal", 0.0)

    # ----------------------------------------------------------------- internals

    def _recorded(self, description: dict[str, Any]) -> _Wrapped:
        wrapped = _Wrapped.parse(description)
        for what, given, recorded in (
            ("key", self.key, wrapped.key),
            ("mount", self.mount, wrapped.mount),
            ("namespace", self.namespace, wrapped.namespace),
        ):
            if given is not None and given != recorded:
                raise KekError(
                    f"this store's root is wrapped by Transit {what} {recorded!r}, "
                    f"not {given!r}; fix the Transit {what} setting"
                )
        if self.namespace is None and wrapped.namespace is not None:
            raise KekError(
                f"this store's root is wrapped in namespace {wrapped.namespace!r}: "
                "give the Transit namespace"
            )
        return wrapped

    def _check_key_for_init(self, client: hvac.Client, mount: str, key: str) -> None:
        """With ``read`` on the key: refuse a missing, underived or non-encrypting key early."""
        try:
            answer = _read_key(client, mount, key)
        except hvac.exceptions.Forbidden:
            return  # a least-privilege token; the binding probe still checks derivation
        if answer is None:
            raise _Refusal(f"Transit key {key!r} not found at mount {mount!r}")
        info = _data(answer, "key read")
        if not info.get("supports_encryption", True):
            raise _Refusal(f"Transit key {key!r} ({info.get('type')}) cannot encrypt")
        if info.get("derived") is not True:
            raise self._underived(key)

    @staticmethod
    def _underived(key: str) -> _Refusal:
        return _Refusal(
            f"Transit key {key!r} is not a derived key, so it cannot bind the wrapped root to "
            f"this store: create one with derived=true (bao write transit/keys/NAME derived=true)"
        )

    def _check_binding(self, wrapped: _Wrapped, store_id: str) -> None:
        """A decrypt under another store's context must fail, else ``context`` was ignored."""
        other = base64.b64encode(CONTEXT_LABEL + store_id.encode() + _PROBE_SUFFIX).decode()

        def probe(client: hvac.Client) -> bool:
            try:
                client.write_data(
                    f"{wrapped.mount}/decrypt/{wrapped.key}",
                    data={"ciphertext": wrapped.ciphertext, "context": other},
                )
            except hvac.exceptions.InvalidRequest as exc:
                if "message authentication failed" in _first_error(exc):
                    return True
                raise
            return False

        if not self._call(probe, "binding check"):
            raise self._underived(wrapped.key)

    def _refusal(
        self,
        error: hvac.exceptions.VaultError,
        mount: str,
        key: str,
        wrapped: _Wrapped | None = None,
    ) -> _Refusal:
        """A 400/404 from Transit, as one line saying what to do."""
        reason = _first_error(error)
        if isinstance(error, hvac.exceptions.InvalidPath) or "no handler for route" in reason:
            return _Refusal(f"no Transit secrets engine at mount {mount!r}")
        if "encryption key not found" in reason or "key not found" in reason:
            return _Refusal(f"Transit key {key!r} not found at mount {mount!r}")
        if "disallowed by policy" in reason and wrapped is not None:
            return _Refusal(
                f"Transit key {key!r} refuses to decrypt the store's root (wrapped by version "
                f"{wrapped.version}): its min_decryption_version is above that; lower it, "
                "and rewrap (kmsd rekey --rewrap) before raising it again"
            )
        if "message authentication failed" in reason and wrapped is not None:
            return _Refusal(
                f"the wrapped root does not open under Transit key {key!r} for this store: "
                "the metadata comes from another store, or the key was replaced"
            )
        return _Refusal(f"Transit refused the request on key {key!r}: {reason}")

    def _client(self, url: str) -> hvac.Client:
        client = self._clients.get(url)
        if client is None:
            verify: bool | str = True
            if self.ca_file is not None:
                if not self.ca_file.is_file():
                    raise KekError(f"cannot read the Transit CA file {self.ca_file}")
                verify = str(self.ca_file)
            session = requests.Session()
            session.verify = verify
            for scheme in ("http://", "https://"):
                session.mount(scheme, _TimeoutAdapter(self.request_timeout, self._time_left))
            client = hvac.Client(url=url, verify=verify, namespace=self.namespace, session=session)
            self._clients[url] = client
        if self._token is not None:
            client.token = self._token
        return client

    def _login(self, client: hvac.Client) -> None:
        """Set ``self._token``: from the token file, or by an AppRole login at this node."""
        if self.token_file is not None:
            self._token = _read_secret(self.token_file, "token")
        else:
            assert self.role_id_file is not None  # noqa: S101 - checked in __init__
            assert self.secret_id_file is not None  # noqa: S101
            role_id = _read_secret(self.role_id_file, "AppRole role-id")
            secret_id = _read_secret(self.secret_id_file, "AppRole secret-id")
            try:
                answer = client.write_data(
                    f"auth/{self.approle_mount}/login",
                    data={"role_id": role_id, "secret_id": secret_id},
                )
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
                raise _Refusal(
                    f"AppRole login refused at {client.url}: invalid role-id or secret-id "
                    f"(files {self.role_id_file}, {self.secret_id_file})"
                ) from None
            except hvac.exceptions.InvalidPath:
                raise _Refusal(f"no AppRole auth method at auth/{self.approle_mount}") from None
            token = answer.get("auth", {}).get("client_token") if isinstance(answer, dict) else None
            if not isinstance(token, str) or not token:
                raise KekError("the AppRole login sent an unexpected answer")
            self._token = token
        client.token = self._token

    def _renew(self, client: hvac.Client, *, force: bool) -> int | None:
        info = client.read("auth/token/lookup-self")
        data = _data(info, "token lookup")
        ttl, full = int(data.get("ttl") or 0), int(data.get("creation_ttl") or 0)
        if not data.get("renewable") or ttl <= 0:
            return None
        if not force and ttl > full * RENEW_AT_FRACTION:
            return ttl
        answer = client.write_data("auth/token/renew-self")
        auth = answer.get("auth") if isinstance(answer, dict) else None
        if not isinstance(auth, dict):
            raise KekError("the Transit service sent an unexpected answer to renew-self")
        return int(auth.get("lease_duration") or 0)

    def _check_health(self, client: hvac.Client) -> None:
        self._renew(client, force=False)
        wrapped = self._wrapped
        if wrapped is None:
            return
        try:
            answer = _read_key(client, wrapped.mount, wrapped.key)
        except hvac.exceptions.Forbidden:
            self._check_unwrap(client, wrapped)  # no read permission: the unwrap tells all
            return
        if answer is not None:
            self._check_unwrap(client, wrapped)
        if answer is None:
            raise _Refusal(f"Transit key {wrapped.key!r} not found at mount {wrapped.mount!r}")
        minimum = int(_data(answer, "key read").get("min_decryption_version") or 0)
        if minimum > wrapped.version:
            raise _Refusal(
                f"Transit key {wrapped.key!r} has min_decryption_version {minimum}, above the "
                f"store's wrapped version {wrapped.version}: a restart would fail"
            )

    def _check_unwrap(self, client: hvac.Client, wrapped: _Wrapped) -> None:
        """Transit decrypts the store's root as a restart would; the plaintext is dropped."""
        if self._store_id is None:
            return  # not unwrapped here yet: nothing to check against
        client.write_data(
            f"{wrapped.mount}/decrypt/{wrapped.key}",
            data={"ciphertext": wrapped.ciphertext, "context": binding_context(self._store_id)},
        )

    def _call(
        self,
        operation: Callable[[hvac.Client], T],
        what: str,
        timeout: float | None = None,
        refusal: Callable[[hvac.exceptions.VaultError], _Refusal] | None = None,
    ) -> T:
        """Run ``operation`` on the first node that can answer, retrying until ``timeout``."""
        with self._lock:
            budget = self.start_timeout if timeout is None else timeout
            deadline = self._clock() + budget
            outer, self._deadline = self._deadline, deadline if budget > 0 else None
            try:
                return self._call_until(operation, what, refusal, budget, deadline)
            finally:
                self._deadline = outer

    def _call_until(
        self,
        operation: Callable[[hvac.Client], T],
        what: str,
        refusal: Callable[[hvac.exceptions.VaultError], _Refusal] | None,
        budget: float,
        deadline: float,
    ) -> T:
        """The retry loop of :meth:`_call` (its lock held)."""
        delay = FIRST_BACKOFF
        reasons: dict[str, str] = {}
        while True:
            for url in self.urls:
                try:
                    return self._call_node(url, operation, what, refusal)
                except _Retry as retry:
                    reasons[url] = str(retry)
                except _Refusal as refused:  # callers see plain KekError, nothing else
                    raise KekError(str(refused)) from None
            remaining = deadline - self._clock()
            if remaining <= 0:
                summary = "; ".join(f"{url}: {why}" for url, why in reasons.items())
                within = f" within {budget:g} s" if budget > 0 else ""
                raise KekError(f"no Transit node could answer{within} ({summary})")
            self._sleep(min(delay, remaining))  # the last try comes at the deadline
            delay = min(2 * delay, MAX_BACKOFF)

    def _time_left(self) -> float | None:
        """Seconds a request may take now: ``None`` outside a retried call."""
        if self._deadline is None:
            return None
        return max(self._deadline - self._clock(), MIN_REQUEST_TIMEOUT)

    def _call_node(
        self,
        url: str,
        operation: Callable[[hvac.Client], T],
        what: str,
        refusal: Callable[[hvac.exceptions.VaultError], _Refusal] | None,
    ) -> T:
        """One node. A refusal from a standby is not final: it may lag behind the active node."""
        client = self._client(url)
        try:
            return self._call_logged_in(client, operation, what, refusal)
        except _Refusal as error:
            if self._is_standby(client):
                raise _Retry(f"standby not in step yet? {error}") from None
            raise

    def _call_logged_in(
        self,
        client: hvac.Client,
        operation: Callable[[hvac.Client], T],
        what: str,
        refusal: Callable[[hvac.exceptions.VaultError], _Refusal] | None,
    ) -> T:
        """Log in if needed; on a 403 read the token file again or log in again, once."""
        fresh = relogin = False  # fresh: the token was read or obtained during this call
        while True:
            try:
                if self._token is None or relogin:
                    previous = self._token
                    self._login(client)
                    if relogin and self.token_file is not None and self._token == previous:
                        raise self._denied(client, what)  # the token file did not change
                    fresh = True
                return operation(client)
            except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
                if fresh:
                    raise self._denied(client, what) from None
                relogin = True
            except (requests.RequestException, hvac.exceptions.VaultError) as exc:
                raise _translate(exc, client.url, what, refusal) from None

    @staticmethod
    def _is_standby(client: hvac.Client) -> bool:
        """``sys/health`` says 429 (standby) or 473 (performance standby)."""
        try:
            answer = client.session.get(f"{client.url}/v1/sys/health")
        except requests.RequestException:
            return False
        return answer.status_code in (429, 473)

    def _denied(self, client: hvac.Client, what: str) -> _Refusal:
        """A 403: a dead token, or a live one whose policy lacks this path?"""
        credential = "token" if self.token_file is not None else "AppRole token"
        try:
            client.read("auth/token/lookup-self")
        except hvac.exceptions.Forbidden:
            return _Refusal(
                f"{client.url} refused the Transit {credential} (403 permission denied: "
                "invalid, expired or revoked)"
            )
        except (hvac.exceptions.VaultError, requests.RequestException):
            pass
        else:
            return _Refusal(
                f"{client.url} refused the {what} (403 permission denied): the {credential}'s "
                "policy does not allow it"
            )
        return _Refusal(f"{client.url} refused the {what} (403 permission denied)")


class HealthWatch:
    """A thread calling ``source.health()`` every ``interval`` seconds while kmsd serves.

    ``status`` is the latest answer (``"ok"`` at start: the root was just
    unwrapped), for ``INFO``-style status; ``on_change(status)`` is called on
    every transition, e.g. to log "degraded: ..." as a warning and "ok" when it
    recovers. The daemon keeps serving from memory either way. Blocking calls
    only: start it before ``trio.run`` and stop it after. ``description``, if
    given, returns the store's current Transit description (re-read each time,
    so a ``kmsd rekey --rewrap`` while serving is taken into account).
    """

    def __init__(
        self,
        source: TransitSource,
        interval: float,
        on_change: Callable[[str], None],
        description: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.source = source
        self.interval = interval
        self._description = description
        self.status = "ok"
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transit-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.source.request_timeout + CONNECT_TIMEOUT)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            # Any failure is shown as the status, never fatal to the daemon or this thread.
            try:
                current = self._description() if self._description else None
            except Exception as error:
                status = f"degraded: cannot read the store's Transit description: {error}"
            else:
                if current is not None and current.get("kind") != TRANSIT_KIND:
                    self._report("ok")  # rekeyed away from Transit: nothing left to watch
                    return
                try:
                    status = self.source.health(current)
                except Exception as error:
                    status = f"degraded: health check failed: {type(error).__name__}"
            self._report(status)

    def _report(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self._on_change(status)
