# The cryptographic recipes (kms_server/crypto.py) and the data-ciphertext format (keys.py).
# Known answers come from tests/vectors/xaes-256-gcm.json; hazmat is imported only to cross-check.
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFCMAC, CounterLocation, Mode
from hypothesis import given, settings
from hypothesis import strategies as st

from kms_client.errors import BadCiphertext, InternalError
from kms_server.crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    SEAL_OVERHEAD,
    XAES256GCM,
    AuthenticationFailed,
    argon2id,
    hkdf_sha256,
)
from kms_server.keys import MIN_CIPHERTEXT_SIZE, KeyVersion, ciphertext_version

VECTORS_FILE = Path(__file__).parent / "vectors" / "xaes-256-gcm.json"
DATA_KEY_LABEL = b"kms/1 data key XAES-256-GCM"


def load_vectors() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
    return document


def xaes_vectors() -> list[Any]:
    """One pytest param per known answer, named by the vector's ``name``."""
    return [
        pytest.param(
            {
                field: bytes.fromhex(vector[field])
                for field in ("key", "nonce", "plaintext", "aad", "ciphertext")
            },
            id=vector["name"],
        )
        for vector in load_vectors()["vectors"]
    ]


def flip_bit(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


# --------------------------------------------------------------------------- XAES-256-GCM


def test_vector_file_is_well_formed() -> None:
    document = load_vectors()
    assert document["spec"] == "https://c2sp.org/XAES-256-GCM"
    assert len(document["vectors"]) >= 2
    for vector in document["vectors"]:
        assert len(bytes.fromhex(vector["key"])) == KEY_SIZE
        assert len(bytes.fromhex(vector["nonce"])) == NONCE_SIZE


@pytest.mark.parametrize("vector", xaes_vectors())
def test_xaes_known_answer(vector: dict[str, bytes]) -> None:
    cipher = XAES256GCM(vector["key"])
    aad = vector["aad"] or None
    assert cipher.encrypt(vector["nonce"], vector["plaintext"], aad) == vector["ciphertext"]
    assert cipher.decrypt(vector["nonce"], vector["ciphertext"], aad) == vector["plaintext"]
    sealed = cipher.seal(vector["plaintext"], vector["aad"], nonce=vector["nonce"])
    assert sealed == vector["nonce"] + vector["ciphertext"]
    assert cipher.open(sealed, vector["aad"]) == vector["plaintext"]


def test_xaes_accumulated() -> None:
    """C2SP accumulated test: 10,000 SHAKE-128-fed seals hashed into one digest."""
    accumulated = load_vectors()["accumulated"]
    # Each iteration reads at most 32 + 24 + 1 + 255 + 1 + 255 bytes.
    stream = hashlib.shake_128(b"").digest(accumulated["iterations"] * 568)
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        chunk = stream[position : position + size]
        position += size
        return chunk

    digest = hashlib.shake_128()
    for _ in range(accumulated["iterations"]):
        key, nonce = read(KEY_SIZE), read(NONCE_SIZE)
        plaintext = read(read(1)[0])
        aad = read(read(1)[0])
        cipher = XAES256GCM(key)
        ciphertext = cipher.encrypt(nonce, plaintext, aad)
        assert cipher.decrypt(nonce, ciphertext, aad) == plaintext
        digest.update(ciphertext)
    assert digest.hexdigest(32) == accumulated["digest"]


def kbkdf_cmac_key(key: bytes, nonce_prefix: bytes) -> bytes:
    """The spec's derivation as NIST SP 800-108r1 counter-mode KDF with CMAC-AES."""
    return KBKDFCMAC(
        algorithm=algorithms.AES,
        mode=Mode.CounterMode,
        length=KEY_SIZE,
        rlen=2,
        llen=None,
        location=CounterLocation.BeforeFixed,
        label=None,
        context=None,
        fixed=b"X\x00" + nonce_prefix,
    ).derive(key)


@settings(max_examples=300, deadline=None)
@given(
    key=st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE),
    nonce=st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
)
def test_derive_key_equals_kbkdf_cmac(key: bytes, nonce: bytes) -> None:
    assert XAES256GCM(key).derive_key(nonce[:12]) == kbkdf_cmac_key(key, nonce[:12])


def test_derive_key_many_nonces_under_one_key() -> None:
    """The reused ECB encryptor keeps no state between derivations."""
    key = os.urandom(KEY_SIZE)
    cipher = XAES256GCM(key)
    for _ in range(200):
        prefix = os.urandom(12)
        assert cipher.derive_key(prefix) == kbkdf_cmac_key(key, prefix)
    # Keys whose L block has its top bit set and clear (both branches of the doubling).
    for first in (0x00, 0xFF):
        for _ in range(50):
            key = bytes([first]) + os.urandom(KEY_SIZE - 1)
            prefix = os.urandom(12)
            assert XAES256GCM(key).derive_key(prefix) == kbkdf_cmac_key(key, prefix)


def test_xaes_refuses_wrong_key_size() -> None:
    for size in (0, 16, 31, 33, 64):
        with pytest.raises(ValueError):
            XAES256GCM(bytes(size))


def test_seal_uses_a_fresh_nonce_each_time() -> None:
    cipher = XAES256GCM(os.urandom(KEY_SIZE))
    sealed = [cipher.seal(b"same plaintext", b"same aad") for _ in range(2000)]
    assert len({value[:NONCE_SIZE] for value in sealed}) == len(sealed)
    assert len(set(sealed)) == len(sealed)
    for value in sealed[:10]:
        assert len(value) == len(b"same plaintext") + SEAL_OVERHEAD
        assert cipher.open(value, b"same aad") == b"same plaintext"


def test_open_refuses_every_flipped_bit() -> None:
    cipher = XAES256GCM(os.urandom(KEY_SIZE))
    sealed = cipher.seal(b"secret!", b"context")
    for bit in range(len(sealed) * 8):
        with pytest.raises(AuthenticationFailed):
            cipher.open(flip_bit(sealed, bit), b"context")


def test_open_refuses_truncation_extension_wrong_aad_and_wrong_key() -> None:
    key = os.urandom(KEY_SIZE)
    cipher = XAES256GCM(key)
    sealed = cipher.seal(b"secret!", b"context")
    for length in range(len(sealed)):
        with pytest.raises(AuthenticationFailed):
            cipher.open(sealed[:length], b"context")
    for bad_aad in (b"", b"contexT", b"context\x00", b"contex"):
        with pytest.raises(AuthenticationFailed):
            cipher.open(sealed, bad_aad)
    with pytest.raises(AuthenticationFailed):
        cipher.open(sealed + b"\x00", b"context")
    with pytest.raises(AuthenticationFailed):
        XAES256GCM(flip_bit(key, 0)).open(sealed, b"context")
    assert cipher.open(sealed, b"context") == b"secret!"


def test_authentication_failed_says_nothing_specific() -> None:
    cipher = XAES256GCM(os.urandom(KEY_SIZE))
    sealed = cipher.seal(b"secret!", b"context")
    messages = set()
    for bad in (sealed[:3], flip_bit(sealed, 0), flip_bit(sealed, len(sealed) * 8 - 1)):
        with pytest.raises(AuthenticationFailed) as caught:
            cipher.open(bad, b"context")
        messages.add(str(caught.value))
    assert len(messages) == 1


def secret_spellings(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        repr(secret),
        repr(bytearray(secret)),
    ]


def test_repr_hides_keys() -> None:
    key = os.urandom(KEY_SIZE)
    text = repr(XAES256GCM(key))
    for spelling in secret_spellings(key):
        assert spelling not in text
    version = KeyVersion("app/db", 3, "2026-01-01T00:00:00Z", True, bytearray(key))
    text = repr(version) + str(version)
    for spelling in secret_spellings(key):
        assert spelling not in text
    assert "app/db" in text


# --------------------------------------------------------------------------- HKDF, Argon2id


def test_hkdf_sha256_rfc5869_case_3() -> None:
    """RFC 5869 test case 3: no salt, no info."""
    okm = hkdf_sha256(bytes([0x0B] * 22), b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    assert hkdf_sha256(bytearray([0x0B] * 22), b"", 42) == okm


def test_hkdf_labels_separate_uses() -> None:
    material = os.urandom(KEY_SIZE)
    assert hkdf_sha256(material, b"a") != hkdf_sha256(material, b"b")
    assert len(hkdf_sha256(material, b"a")) == KEY_SIZE


def test_argon2id_rfc9106_vector_through_the_same_primitive() -> None:
    """RFC 9106 section 5.3 (needs secret and AD, which the recipe does not expose).

    Pins the parameter mapping the recipe relies on: ``lanes`` is p and
    ``memory_cost`` is in KiB.
    """
    tag = Argon2id(
        salt=bytes([0x02] * 16),
        length=32,
        iterations=3,
        lanes=4,
        memory_cost=32,
        ad=bytes([0x04] * 12),
        secret=bytes([0x03] * 8),
    ).derive(bytes([0x01] * 32))
    assert tag.hex() == "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"


def test_argon2id_recipe_is_the_primitive_deterministic_and_parameter_sensitive() -> None:
    base: dict[str, Any] = {"iterations": 3, "lanes": 4, "memory_kib": 64}
    salt = bytes(range(16))
    reference = argon2id(b"passphrase", salt, **base)
    assert reference == Argon2id(
        salt=salt, length=32, iterations=3, lanes=4, memory_cost=64
    ).derive(b"passphrase")
    assert argon2id(b"passphrase", salt, **base) == reference
    assert len(reference) == KEY_SIZE
    variants = [
        argon2id(b"passphrasf", salt, **base),
        argon2id(b"passphrase", bytes(16), **base),
        argon2id(b"passphrase", salt, **(base | {"iterations": 2})),
        argon2id(b"passphrase", salt, **(base | {"lanes": 2})),
        argon2id(b"passphrase", salt, **(base | {"memory_kib": 128})),
    ]
    assert len({reference, *variants}) == len(variants) + 1
    assert len(argon2id(b"passphrase", salt, **base, length=16)) == 16


# --------------------------------------------------------------------------- KeyVersion


def key_version(
    key_id: str = "app/db", version: int = 1, material: bytes | None = None
) -> KeyVersion:
    if material is None:
        material = os.urandom(KEY_SIZE)
    return KeyVersion(key_id, version, "2026-01-01T00:00:00Z", False, bytearray(material))


def test_key_version_round_trip() -> None:
    key = key_version()
    for plaintext, aad in (
        (b"x", b""),
        (b"hello world" * 100, b""),
        (b"pt", b"aad"),
        (os.urandom(8192), os.urandom(64)),
    ):
        ciphertext = key.encrypt(plaintext, aad)
        assert len(ciphertext) == len(plaintext) + MIN_CIPHERTEXT_SIZE - 1
        assert ciphertext_version(ciphertext) == 1
        assert key.decrypt(ciphertext, aad) == plaintext
    first, second = key.encrypt(b"same", b""), key.encrypt(b"same", b"")
    assert first != second


def test_ciphertext_names_its_version() -> None:
    key = key_version(version=70_000)
    ciphertext = key.encrypt(b"data", b"")
    assert ciphertext[0] == 0x01
    assert ciphertext_version(ciphertext) == 70_000
    with pytest.raises(BadCiphertext):
        ciphertext_version(b"\x02" + ciphertext[1:])
    for length in range(MIN_CIPHERTEXT_SIZE):
        with pytest.raises(BadCiphertext):
            ciphertext_version(ciphertext[:length])


def test_key_version_refuses_every_flipped_bit() -> None:
    """All 368 bits of a 1-byte-plaintext ciphertext, header included.

    The header (format byte and version) must be authenticated by the
    KeyVersion itself, not only by the caller's choice of version.
    """
    key = key_version()
    ciphertext = key.encrypt(b"s", b"aad")
    assert len(ciphertext) == MIN_CIPHERTEXT_SIZE
    accepted = []
    for bit in range(len(ciphertext) * 8):
        try:
            key.decrypt(flip_bit(ciphertext, bit), b"aad")
        except BadCiphertext:
            continue
        accepted.append(bit)
    assert accepted == [], f"flipped bits accepted: {accepted}"


def test_key_version_refuses_every_truncation_and_extension() -> None:
    key = key_version()
    ciphertext = key.encrypt(b"sixteen byte pt.", b"")
    for length in range(len(ciphertext)):
        with pytest.raises(BadCiphertext):
            key.decrypt(ciphertext[:length], b"")
    with pytest.raises(BadCiphertext):
        key.decrypt(ciphertext + b"\x00", b"")


def test_key_version_binds_key_id_version_and_aad() -> None:
    material = os.urandom(KEY_SIZE)
    key = key_version("app/db", 2, material)
    ciphertext = key.encrypt(b"payload", b"row 17")
    for other in (
        key_version("app/dc", 2, material),
        key_version("app/db", 1, material),
        key_version("app/db", 3, material),
        key_version("app/db", 2),
    ):
        with pytest.raises(BadCiphertext):
            other.decrypt(ciphertext, b"row 17")
    for aad in (b"", b"row 18", b"row 17\x00"):
        with pytest.raises(BadCiphertext):
            key.decrypt(ciphertext, aad)
    assert key.decrypt(ciphertext, b"row 17") == b"payload"


def test_data_key_is_not_the_exported_material() -> None:
    material = os.urandom(KEY_SIZE)
    key = key_version("app/db", 1, material)
    header = b"\x01" + (1).to_bytes(4, "big")
    aad = b"kms/1 data\x00app/db\x00" + header
    # The documented derivation opens what the KeyVersion sealed ...
    ciphertext = key.encrypt(b"payload", b"")
    derived = XAES256GCM(hkdf_sha256(material, DATA_KEY_LABEL))
    assert derived.open(ciphertext[5:], aad) == b"payload"
    # ... the raw (exportable) material does not, in either direction.
    with pytest.raises(AuthenticationFailed):
        XAES256GCM(material).open(ciphertext[5:], aad)
    forged = header + XAES256GCM(material).seal(b"payload", aad)
    with pytest.raises(BadCiphertext):
        key.decrypt(forged, b"")
    assert key.decrypt(header + derived.seal(b"payload", aad), b"") == b"payload"


def test_key_version_wipe_and_size_check() -> None:
    key = key_version()
    export_reply = key.export_reply
    export_reply += b"OK 1 " + bytes(key.live_material()) + b"\n"  # as the dispatcher builds it
    key.wipe()
    assert key.material == bytearray(KEY_SIZE)
    assert export_reply == key.export_reply == bytearray()  # overwritten, then emptied
    with pytest.raises(InternalError):
        key.live_material()  # a GET of a wiped version exports no zeros
    for size in (0, 16, 31, 33):
        with pytest.raises(ValueError):
            KeyVersion("k", 1, "2026-01-01T00:00:00Z", False, bytearray(size))
