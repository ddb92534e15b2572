"""Proofs of possession: accepted for exactly their key, purpose, subject and nonce."""

from __future__ import annotations

import pytest

from protocol import cose, encoding, testing
from protocol.errors import ErrorCode, TokenError
from protocol.proofs import ProofContext, sign_possession, verify_possession

BOX = cose.SigningKey.from_private_key(testing.ed25519_key("box"))
NONCE = bytes(range(16))


def proof(
    context: ProofContext = ProofContext.BOX_UPLINK, subject: str = "BOX-1", nonce: bytes = NONCE
) -> bytes:
    return sign_possession(context=context, subject=subject, nonce=nonce, key=BOX)


def test_a_proof_verifies_for_its_key_purpose_subject_and_nonce() -> None:
    verify_possession(
        proof(), context=ProofContext.BOX_UPLINK, subject="BOX-1", nonce=NONCE, public_key=BOX.public_key
    )


@pytest.mark.parametrize(
    ("signed", "code"),
    [
        (proof(context=ProofContext.DEVICE_REGISTRATION), ErrorCode.TOKEN_WRONG_TYPE),
        (proof(subject="BOX-2"), ErrorCode.TOKEN_WRONG_AUDIENCE),
        (proof(nonce=b"another nonce"), ErrorCode.TOKEN_WRONG_AUDIENCE),
        (
            sign_possession(
                context=ProofContext.BOX_UPLINK,
                subject="BOX-1",
                nonce=NONCE,
                key=testing.operator_key("other"),
            ),
            ErrorCode.TOKEN_UNKNOWN_KEY,
        ),
        (cose.sign(encoding.encode(["x"]), BOX), ErrorCode.TOKEN_MALFORMED),
        (b"\xff", ErrorCode.TOKEN_MALFORMED),
    ],
)
def test_anything_else_is_refused_with_its_code(signed: bytes, code: ErrorCode) -> None:
    with pytest.raises(TokenError) as raised:
        verify_possession(
            signed, context=ProofContext.BOX_UPLINK, subject="BOX-1", nonce=NONCE, public_key=BOX.public_key
        )
    assert raised.value.code is code


def test_a_tampered_signature_is_refused() -> None:
    signed = bytearray(proof())
    signed[-1] ^= 1
    with pytest.raises(TokenError) as raised:
        verify_possession(
            bytes(signed),
            context=ProofContext.BOX_UPLINK,
            subject="BOX-1",
            nonce=NONCE,
            public_key=BOX.public_key,
        )
    assert raised.value.code is ErrorCode.TOKEN_BAD_SIGNATURE

