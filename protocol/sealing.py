"""Ledger batches sealed to the operator for phones to carry (S9, docs/protocol.md §8.3).

COSE_Encrypt (RFC 9052 §5.1) with one recipient using direct key agreement ECDH-ES + HKDF-256
(RFC 9053 §6.3.1, alg -25) over X25519, content encrypted with AES-CCM-16-64-128 (alg 10). Only
the holder of the operator's X25519 private key can open it; the carrying phone sees sizes only.
The ephemeral key and the IV are passed in: protocol/ draws no randomness of its own.

    COSE_Encrypt = #6.96([ protected: bstr .cbor {1: 10}, unprotected: {5: iv},
                           ciphertext: bstr,
                           [[ protected: bstr .cbor {1: -25},
                              unprotected: {-1: ephemeral COSE_Key, 4: operator kid}, h'' ]] ])
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol import encoding
from protocol.errors import ErrorCode, TokenError

COSE_ENCRYPT_TAG = 96
HEADER_ALG = 1
HEADER_KID = 4
HEADER_IV = 5
HEADER_EPHEMERAL_KEY = -1
ALG_AES_CCM_16_64_128 = 10
ALG_ECDH_ES_HKDF_256 = -25
KEY_BITS = 128
IV_SIZE = 13
TAG_SIZE = 8
CRV_X25519 = 4
KTY_OKP = 1


def x25519_public_bytes(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def encryption_key_id(public_key: X25519PublicKey) -> bytes:
    return hashlib.sha256(x25519_public_bytes(public_key)).digest()[:4]


def _content_key(shared_secret: bytes, recipient_protected: bytes) -> bytes:
    # RFC 9053 §5.2 COSE_KDF_Context; PartyU/PartyV identities are not used.
    context = encoding.encode(
        [ALG_AES_CCM_16_64_128, [None, None, None], [None, None, None], [KEY_BITS, recipient_protected]]
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BITS // 8, salt=None, info=context).derive(
        shared_secret
    )


def _enc_structure(protected: bytes) -> bytes:
    return encoding.encode(["Encrypt", protected, b""])


def seal(
    plaintext: bytes,
    *,
    recipient: X25519PublicKey,
    ephemeral_key: X25519PrivateKey,
    iv: bytes,
) -> bytes:
    """Encrypt `plaintext` so that only `recipient`'s private key opens it."""
    if len(iv) != IV_SIZE:
        raise ValueError(f"iv must be {IV_SIZE} bytes")
    protected = encoding.encode({HEADER_ALG: ALG_AES_CCM_16_64_128})
    recipient_protected = encoding.encode({HEADER_ALG: ALG_ECDH_ES_HKDF_256})
    key = _content_key(ephemeral_key.exchange(recipient), recipient_protected)
    ciphertext = AESCCM(key, tag_length=TAG_SIZE).encrypt(iv, plaintext, _enc_structure(protected))
    ephemeral_public = {
        1: KTY_OKP,
        -1: CRV_X25519,
        -2: x25519_public_bytes(ephemeral_key.public_key()),
    }
    recipient_layer = [
        recipient_protected,
        {HEADER_EPHEMERAL_KEY: ephemeral_public, HEADER_KID: encryption_key_id(recipient)},
        b"",
    ]
    return cbor2.dumps(
        cbor2.CBORTag(COSE_ENCRYPT_TAG, [protected, {HEADER_IV: iv}, ciphertext, [recipient_layer]])
    )


def open_sealed(data: bytes, keys: Mapping[bytes, X25519PrivateKey]) -> bytes:
    """Decrypt a sealed batch with whichever operator key its kid names."""
    fields = encoding.Fields("COSE_Encrypt", error=TokenError, code=ErrorCode.TOKEN_MALFORMED)
    item = encoding.decode(data, error=TokenError, code=ErrorCode.TOKEN_MALFORMED)
    if not isinstance(item, cbor2.CBORTag) or item.tag != COSE_ENCRYPT_TAG:
        raise fields.fail("expected tag 96")
    protected, unprotected, ciphertext, recipients = fields.array(item.value, 4)
    if fields.bytes_(protected, "protected", max_size=16) != encoding.encode(
        {HEADER_ALG: ALG_AES_CCM_16_64_128}
    ):
        raise fields.fail("content algorithm must be AES-CCM-16-64-128")
    iv = fields.bytes_(fields.map(unprotected).get(HEADER_IV), "iv", size=IV_SIZE)
    fields.bytes_(ciphertext, "ciphertext", max_size=1 << 20)
    (recipient_layer,) = fields.array(recipients, 1)
    recipient_protected, recipient_unprotected, empty = fields.array(recipient_layer, 3)
    if recipient_protected != encoding.encode({HEADER_ALG: ALG_ECDH_ES_HKDF_256}) or empty != b"":
        raise fields.fail("recipient must use ECDH-ES + HKDF-256 direct key agreement")
    headers = fields.map(recipient_unprotected)
    kid = fields.bytes_(headers.get(HEADER_KID), "kid", max_size=16)
    ephemeral = fields.map(headers.get(HEADER_EPHEMERAL_KEY))
    if ephemeral.get(1) != KTY_OKP or ephemeral.get(-1) != CRV_X25519:
        raise fields.fail("ephemeral key must be an X25519 OKP key")
    ephemeral_public = X25519PublicKey.from_public_bytes(fields.bytes_(ephemeral.get(-2), "x", size=32))
    private_key = keys.get(kid)
    if private_key is None:
        raise TokenError(f"no operator key with id {kid.hex()}", code=ErrorCode.TOKEN_UNKNOWN_KEY)
    try:
        key = _content_key(private_key.exchange(ephemeral_public), recipient_protected)
        return AESCCM(key, tag_length=TAG_SIZE).decrypt(iv, ciphertext, _enc_structure(protected))
    except (InvalidTag, ValueError):
        raise TokenError("sealed batch does not decrypt", code=ErrorCode.TOKEN_DECRYPTION_FAILED) from None
