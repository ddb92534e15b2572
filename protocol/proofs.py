"""Proofs of key possession for the server API (docs/server-api.md §2).

A box logs in to the uplink by signing the server's nonce with its box key; a phone registers its
device key by signing its account's name with that key. Both are a COSE_Sign1 (see
`protocol.cose`) over the CBOR array `[context, subject, nonce]`: the context string keeps a proof
made for one purpose from being accepted for another, the subject names who is proving, and the
nonce (empty where the server issues none) makes a box login single-use.
"""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import cose, encoding
from protocol.errors import ErrorCode, TokenError

MAX_SUBJECT_LENGTH = 64
MAX_NONCE_SIZE = 64


class ProofContext(enum.StrEnum):
    BOX_UPLINK = "powerbox box uplink v1"
    DEVICE_REGISTRATION = "powerbox device registration v1"


def _payload(context: ProofContext, subject: str, nonce: bytes) -> bytes:
    return encoding.encode([str(context), subject, nonce])


def sign_possession(*, context: ProofContext, subject: str, nonce: bytes, key: cose.SigningKey) -> bytes:
    """What the holder of `key` sends to prove it (the box with its box key, a phone with its device key)."""
    return cose.sign(_payload(context, subject, nonce), key)


def verify_possession(
    signed: bytes, *, context: ProofContext, subject: str, nonce: bytes, public_key: Ed25519PublicKey
) -> None:
    """Raise TokenError unless `signed` is `public_key`'s proof for this context, subject and nonce."""
    verified = cose.verify(signed, cose.key_ring(public_key))
    fields = encoding.Fields("proof of possession", error=TokenError, code=ErrorCode.TOKEN_MALFORMED)
    proof_context, proof_subject, proof_nonce = fields.array(
        encoding.decode(verified.payload, error=TokenError, code=ErrorCode.TOKEN_MALFORMED), 3
    )
    fields.text(proof_context, "context", max_size=64)
    fields.text(proof_subject, "subject", max_size=MAX_SUBJECT_LENGTH)
    fields.bytes_(proof_nonce, "nonce", max_size=MAX_NONCE_SIZE)
    if proof_context != str(context):
        raise TokenError("proof made for another purpose", code=ErrorCode.TOKEN_WRONG_TYPE)
    if proof_subject != subject or proof_nonce != nonce:
        raise TokenError("proof names another subject or nonce", code=ErrorCode.TOKEN_WRONG_AUDIENCE)
