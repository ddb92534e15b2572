"""`cose.parse` + `cose.to_be_signed` + the key's check is `cose.verify` split in two."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature

from protocol import cose, testing

KEY = cose.SigningKey.from_private_key(testing.ed25519_key("split"))


def test_the_split_accepts_what_verify_accepts_and_refuses_a_flipped_bit() -> None:
    signed = cose.sign(b"payload", KEY)
    protected, kid, payload, signature = cose.parse(signed)
    assert (kid, payload) == (KEY.key_id, cose.verify(signed, cose.key_ring(KEY.public_key)).payload)
    KEY.public_key.verify(signature, cose.to_be_signed(protected, payload))
    with pytest.raises(InvalidSignature):
        KEY.public_key.verify(signature, cose.to_be_signed(protected, payload + b"!"))
