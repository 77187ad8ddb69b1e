# One opened key version in memory and the data-ciphertext format that ENC/DEC/DATAKEY use.
# No disk, no protocol parsing: store.py makes KeyVersion objects, dispatch.py calls them.
"""Opened key versions and the ciphertext format of protocol v1.

A data ciphertext (what ``ENC`` returns, base64 on the wire) is::

    0x01 | version (4 bytes, big-endian) | nonce (24) | AES-GCM ciphertext | tag (16)

The XAES-256-GCM additional data binds it to the key id, the version and the
caller's AAD, so a flipped bit, a ciphertext presented under another key id, a
different AAD or a truncation all fail to open, with the one error
:class:`~kms_client.errors.BadCiphertext`.

The daemon never encrypts with the exported material itself: the data key is
``HKDF-SHA256(material, info="kms/1 data key XAES-256-GCM")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kms_client.errors import BadCiphertext, InternalError
from kms_server.crypto import (
    KEY_SIZE,
    SEAL_OVERHEAD,
    XAES256GCM,
    AuthenticationFailed,
    hkdf_sha256,
    wipe,
)

CIPHERTEXT_FORMAT = 0x01
_HEADER_SIZE = 5
#: Smallest valid ciphertext: header, nonce, tag and one byte of plaintext.
MIN_CIPHERTEXT_SIZE = _HEADER_SIZE + SEAL_OVERHEAD + 1
_DATA_KEY_LABEL = b"kms/1 data key XAES-256-GCM"
_AAD_PREFIX = b"kms/1 data\x00"


def ciphertext_version(ciphertext: bytes) -> int:
    """The key version a ciphertext names; :class:`BadCiphertext` if it cannot be one."""
    if len(ciphertext) < MIN_CIPHERTEXT_SIZE or ciphertext[0] != CIPHERTEXT_FORMAT:
        raise BadCiphertext()
    return int.from_bytes(ciphertext[1:_HEADER_SIZE], "big")


ACTIVE = "active"
RETIRED = "retired"
DESTROYED = "destroyed"
#: Version 1 in the state a CREATE writes before its version file: no key without that
#: file (a crash cut the CREATE short), an active version with it.
CREATING = "creating"


@dataclass(slots=True)
class VersionUsage:
    """A version's state, usage counters and creation time, persisted in the key's state file.

    ``created`` repeats the time sealed in the version's own file, so ``INFO`` and
    the rotation check need not open every version to learn it. It is None for a
    version written before state files kept it, until that version is next opened.
    """

    state: str = ACTIVE
    encryptions: int = 0
    decryptions: int = 0
    bytes: int = 0
    created: str | None = None


@dataclass(eq=False, slots=True)
class KeyVersion:
    """The material of one key version, opened from its sealed file.

    ``material`` is a mutable buffer so :meth:`wipe` can overwrite it when the
    version leaves the cache or the daemon stops. ``repr`` shows no key bytes.
    """

    key_id: str
    version: int
    created: str
    exportable: bool
    material: bytearray = field(repr=False)
    usage: VersionUsage = field(default_factory=VersionUsage)
    #: The ``GET`` reply for this version, built by the dispatcher on the first ``GET``
    #: so a repeated one is a copy: it holds the material, so it is a mutable buffer,
    #: wiped with it.
    export_reply: bytearray = field(init=False, repr=False, default_factory=bytearray)
    _cipher: XAES256GCM | None = field(init=False, repr=False)
    _aad_head: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.material) != KEY_SIZE:
            raise ValueError("key material must be 32 bytes")
        self._cipher = XAES256GCM(hkdf_sha256(self.material, _DATA_KEY_LABEL))
        self._aad_head = (
            _AAD_PREFIX
            + self.key_id.encode("ascii")
            + b"\x00"
            + bytes([CIPHERTEXT_FORMAT])
            + self.version.to_bytes(4, "big")
        )

    def _live_cipher(self) -> XAES256GCM:
        if self._cipher is None:
            raise InternalError("key version was wiped")
        return self._cipher

    def live_material(self) -> bytearray:
        """The material, or ``INTERNAL`` once wiped (never export the zeros)."""
        self._live_cipher()
        return self.material

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        header = self._aad_head[-_HEADER_SIZE:]
        return header + self._live_cipher().seal(plaintext, self._aad_head + aad)

    def decrypt(self, ciphertext: bytes, aad: bytes) -> bytes:
        """Open a ciphertext made by :meth:`encrypt` under this very version."""
        if ciphertext[:_HEADER_SIZE] != self._aad_head[-_HEADER_SIZE:]:
            raise BadCiphertext()
        try:
            return self._live_cipher().open(ciphertext[_HEADER_SIZE:], self._aad_head + aad)
        except AuthenticationFailed:
            raise BadCiphertext() from None

    def wipe(self) -> None:
        """Overwrite the material and drop the derived cipher: a wiped version is unusable."""
        wipe(self.material)
        wipe(self.export_reply)
        self.export_reply.clear()
        self._cipher = None
