"""COSE_Sign1 with EdDSA (RFC 9052 §4.2, RFC 9053 §2.2) on cbor2 and `cryptography`.

A small codec rather than a general COSE library: we only ever need one algorithm, one header
layout and byte-exact control of the size of a grant. The structure is the RFC's, and the tests
check every token with two independent COSE implementations (pycose and python-cwt).

    COSE_Sign1 = #6.18([ protected: bstr .cbor {1: -8, 4: kid}, unprotected: {}, payload: bstr,
                         signature: bstr .size 64 ])
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol import encoding
from protocol.errors import ErrorCode, TokenError

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4
ALG_EDDSA = -8
KEY_ID_SIZE = 4


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id_for(public_key: Ed25519PublicKey) -> bytes:
    """kid = first 4 bytes of SHA-256 over the raw public key: stable, and rotation-friendly."""
    return hashlib.sha256(public_key_bytes(public_key)).digest()[:KEY_ID_SIZE]


@dataclass(frozen=True, slots=True, kw_only=True)
class SigningKey:
    """An Ed25519 private key with its COSE key id."""

    private_key: Ed25519PrivateKey
    key_id: bytes

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        return cls(private_key=private_key, key_id=key_id_for(private_key.public_key()))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


@dataclass(frozen=True, slots=True, kw_only=True)
class Sign1:
    """A verified COSE_Sign1: who signed it and what it says."""

    key_id: bytes
    payload: bytes


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    # RFC 9052 §4.4: Sig_structure with empty external_aad.
    return encoding.encode(["Signature1", protected, b"", payload])


def to_be_signed(protected: bytes, payload: bytes) -> bytes:
    """The bytes the signature of a parsed COSE_Sign1 covers: for a caller that splits `verify` into
    `parse` here and the Ed25519 check elsewhere (the server checks batches on worker threads)."""
    return _sig_structure(protected, payload)


def sign(payload: bytes, key: SigningKey) -> bytes:
    """Wrap `payload` in a tagged COSE_Sign1 signed by `key`."""
    protected = encoding.encode({HEADER_ALG: ALG_EDDSA, HEADER_KID: key.key_id})
    signature = key.private_key.sign(_sig_structure(protected, payload))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


def parse(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Split a COSE_Sign1 into (protected, kid, payload, signature) without verifying it."""
    item = encoding.decode(data, error=TokenError, code=ErrorCode.TOKEN_MALFORMED)
    fields = encoding.Fields("COSE_Sign1", error=TokenError, code=ErrorCode.TOKEN_MALFORMED)
    if isinstance(item, cbor2.CBORTag):
        # Tagged as sent by the operator; untagged where EDHOC carries a CWT by value (RFC 9528 §3.5.2).
        if item.tag != COSE_SIGN1_TAG:
            raise fields.fail("expected tag 18 or an untagged COSE_Sign1")
        item = item.value
    protected, unprotected, payload, signature = fields.array(item, 4)
    fields.bytes_(protected, "protected header", max_size=64)
    fields.map(unprotected)
    fields.bytes_(payload, "payload", max_size=16384)
    fields.bytes_(signature, "signature", size=64)
    headers = fields.map(encoding.decode(protected, error=TokenError, code=ErrorCode.TOKEN_MALFORMED))
    if unprotected or set(headers) != {HEADER_ALG, HEADER_KID} or headers[HEADER_ALG] != ALG_EDDSA:
        raise fields.fail("headers must be exactly {1: -8, 4: kid}, all protected")
    kid = fields.bytes_(headers[HEADER_KID], "kid", max_size=16)
    return protected, kid, payload, signature


def verify(data: bytes, keys: Mapping[bytes, Ed25519PublicKey]) -> Sign1:
    """Verify a COSE_Sign1 against a set of trusted keys indexed by key id."""
    protected, kid, payload, signature = parse(data)
    public_key = keys.get(kid)
    if public_key is None:
        raise TokenError(f"no trusted key with id {kid.hex()}", code=ErrorCode.TOKEN_UNKNOWN_KEY)
    try:
        public_key.verify(signature, _sig_structure(protected, payload))
    except InvalidSignature:
        raise TokenError("signature does not verify", code=ErrorCode.TOKEN_BAD_SIGNATURE) from None
    return Sign1(key_id=kid, payload=payload)


def key_ring(*public_keys: Ed25519PublicKey) -> dict[bytes, Ed25519PublicKey]:
    """Trusted keys by kid, e.g. every operator key still in rotation."""
    return {key_id_for(key): key for key in public_keys}
