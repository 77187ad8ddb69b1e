# The only module that imports cryptography.hazmat: XAES-256-GCM, HKDF, Argon2id recipes.
# It knows nothing of key ids, files or the protocol; callers pass bytes and AAD.
"""Small cryptographic recipes over pyca/cryptography primitives.

XAES-256-GCM follows the C2SP specification (https://c2sp.org/XAES-256-GCM):
a 256-bit key and a 192-bit random nonce. The first 96 bits of the nonce pick a
per-message AES-256-GCM key derived with one CMAC-style AES block operation
(NIST SP 800-108r1 counter-mode KDF with CMAC); the last 96 bits are the GCM
nonce. Random nonces are then safe for an effectively unlimited number of
messages per key, unlike AES-GCM's 2^32.

Every failure to open a sealed value (short input, wrong key, wrong AAD, a
flipped bit) is the one exception :class:`AuthenticationFailed`, so nothing
upstream can tell which check failed.
"""

from __future__ import annotations

import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16
#: Bytes a sealed value adds to its plaintext: the nonce and the GCM tag.
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE


class AuthenticationFailed(Exception):
    """A sealed value did not open: wrong key, wrong AAD, damaged or truncated."""

    def __init__(self) -> None:
        super().__init__("authentication failed")


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def constant_time_equal(left: bytes, right: bytes) -> bool:
    return hmac.compare_digest(left, right)


def wipe(buffer: bytearray) -> None:
    """Overwrite a key buffer in place (best effort: Python may hold other copies)."""
    buffer[:] = bytes(len(buffer))


def hkdf_sha256(key_material: bytes | bytearray, info: bytes, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256 (RFC 5869) with no salt: separates uses of one key by ``info`` label."""
    # The bytearray itself: a bytes() copy of key material could never be wiped.
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key_material)


def argon2id(
    passphrase: bytes,
    salt: bytes,
    *,
    iterations: int,
    lanes: int,
    memory_kib: int,
    length: int = KEY_SIZE,
) -> bytes:
    """Argon2id (RFC 9106). Slow on purpose: call it from a worker thread."""
    return Argon2id(
        salt=salt, length=length, iterations=iterations, lanes=lanes, memory_cost=memory_kib
    ).derive(passphrase)


class XAES256GCM:
    """XAES-256-GCM under one key, keeping one AES-ECB encryptor for key derivation.

    The subkey ``K1`` is computed once; each message then costs one 32-byte ECB
    call to derive its AES-256-GCM key. ``repr`` never shows key bytes.
    """

    __slots__ = ("_ecb", "_k1")

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("XAES-256-GCM needs a 32-byte key")
        self._ecb = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()  # noqa: S305 - the spec's single-block derivation
        l_block = int.from_bytes(self._ecb.update(bytes(16)), "big")
        k1 = (l_block << 1) & ((1 << 128) - 1)
        if l_block >> 127:
            k1 ^= 0x87
        # K1 XOR the constant prefixes 0x00 0x01 'X' 0x00 and 0x00 0x02 'X' 0x00 of the
        # two derivation blocks; the per-message 12 nonce bytes are XORed in later.
        self._k1 = k1

    def __repr__(self) -> str:
        return "<XAES256GCM key=hidden>"

    def derive_key(self, nonce_prefix: bytes) -> bytes:
        """The AES-256-GCM key for the 12-byte first half of a nonce (spec section 2)."""
        suffix = int.from_bytes(nonce_prefix, "big")
        block_1 = ((0x0001_5800 << 96) | suffix) ^ self._k1
        block_2 = ((0x0002_5800 << 96) | suffix) ^ self._k1
        return self._ecb.update(block_1.to_bytes(16, "big") + block_2.to_bytes(16, "big"))

    def encrypt(self, nonce: bytes, plaintext: bytes | bytearray, aad: bytes | None) -> bytes:
        """Ciphertext and tag (without the nonce) for a 24-byte nonce."""
        return AESGCM(self.derive_key(nonce[:12])).encrypt(nonce[12:], plaintext, aad)

    def decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes | None) -> bytes:
        try:
            return AESGCM(self.derive_key(nonce[:12])).decrypt(nonce[12:], ciphertext, aad)
        except InvalidTag:
            raise AuthenticationFailed() from None

    def seal(self, plaintext: bytes | bytearray, aad: bytes, nonce: bytes | None = None) -> bytes:
        """``nonce || ciphertext || tag`` under a fresh random nonce (or a given one, for tests)."""
        if nonce is None:
            nonce = os.urandom(NONCE_SIZE)
        return nonce + self.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`seal`; any failure is :class:`AuthenticationFailed`."""
        if len(sealed) < SEAL_OVERHEAD:
            raise AuthenticationFailed()
        return self.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
