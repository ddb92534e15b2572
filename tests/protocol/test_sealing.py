"""Batches sealed to the operator: only the operator opens them, python-cwt agrees (S9)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cwt import COSE, COSEKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import sealing, testing
from protocol.errors import ErrorCode, TokenError

OPERATOR = testing.x25519_key("operator encryption")
KEYS = {sealing.encryption_key_id(OPERATOR.public_key()): OPERATOR}
IV = bytes(range(13))


def seal(plaintext: bytes, ephemeral: str = "mule") -> bytes:
    return sealing.seal(
        plaintext, recipient=OPERATOR.public_key(), ephemeral_key=testing.x25519_key(ephemeral), iv=IV
    )


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=2000))
def test_round_trip(plaintext: bytes) -> None:
    assert sealing.open_sealed(seal(plaintext), KEYS) == plaintext


def test_python_cwt_opens_what_we_seal() -> None:
    private = OPERATOR.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    key = COSEKey.new(
        {
            1: 1,
            -1: 4,
            -2: sealing.x25519_public_bytes(OPERATOR.public_key()),
            -4: private,
            3: -25,
            2: sealing.encryption_key_id(OPERATOR.public_key()),
        }
    )
    assert (
        COSE.new().decode(seal(b"ledger entries"), keys=[key], context={"alg": "AES-CCM-16-64-128"})
        == b"ledger entries"
    )


def test_the_carrier_cannot_open_it_and_nothing_leaks_but_the_size() -> None:
    mule = testing.x25519_key("a curious mule")
    sealed = seal(b"user 1001 used 4000 Wh")
    with pytest.raises(TokenError) as excinfo:
        sealing.open_sealed(sealed, {sealing.encryption_key_id(OPERATOR.public_key()): mule})
    assert excinfo.value.code == ErrorCode.TOKEN_DECRYPTION_FAILED
    assert b"1001" not in sealed
    assert b"Wh" not in sealed
    with pytest.raises(TokenError) as excinfo:
        sealing.open_sealed(sealed, {})
    assert excinfo.value.code == ErrorCode.TOKEN_UNKNOWN_KEY


def test_every_byte_change_is_rejected() -> None:
    sealed = seal(b"ledger entries")
    for position in range(len(sealed)):
        mutated = bytearray(sealed)
        mutated[position] ^= 0x01
        with pytest.raises(TokenError):
            sealing.open_sealed(bytes(mutated), KEYS)


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_is_a_token_error(garbage: bytes) -> None:
    with pytest.raises(TokenError):
        sealing.open_sealed(garbage, KEYS)
