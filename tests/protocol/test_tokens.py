"""Signed objects: round trips, independent COSE verification, and rejection of every mutation."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cwt import COSE, COSEKey
from hypothesis import given, settings
from hypothesis import strategies as st
from pycose.keys.curves import Ed25519
from pycose.keys.okp import OKPKey
from pycose.messages.sign1message import Sign1Message

from protocol import cose, tokens
from protocol.errors import ErrorCode, TokenError
from protocol.testing import (
    SAMPLE_BOX_ID,
    SAMPLE_TIME,
    ed25519_key,
    operator_key,
    sample_certificate,
    sample_grant,
)
from protocol.tokens import (
    BalanceGrant,
    BoxCertificate,
    Door,
    EndReason,
    EntryKind,
    LedgerAck,
    LedgerEntry,
    Reservation,
    RevocationList,
    SessionReceipt,
    SignedObject,
    TariffTable,
    TimeQuality,
    UnlockToken,
)

OPERATOR = operator_key()
OTHER_OPERATOR = operator_key("another operator")
BOX = cose.SigningKey.from_private_key(ed25519_key("box"))
PHONE = ed25519_key("phone")
TRUSTED = cose.key_ring(OPERATOR.public_key)

RECEIPT = SessionReceipt(
    session_id=b"sess-001",
    grant_ids=(b"grant-01", b"grant-02"),
    outlet=2,
    start_time=SAMPLE_TIME,
    end_time=SAMPLE_TIME + 3600,
    start_register_wh=120_000,
    end_register_wh=121_500,
    energy_wh=1500,
    tariff_version=3,
    price_fen_per_kwh=120,
    cost_fen=180,
    end_reason=EndReason.USER_STOP,
)


def sample_objects() -> list[tuple[SignedObject, cose.SigningKey]]:
    """One of each kind, with the key that signs it."""
    return [
        (sample_certificate(BOX.private_key), OPERATOR),
        (sample_grant(PHONE), OPERATOR),
        (sample_grant(PHONE, box_id=None, grant_id=b"grant-02"), OPERATOR),
        (
            UnlockToken(
                token_id=b"unlock-1",
                holder_id=7,
                box_id=SAMPLE_BOX_ID,
                holder_key=PHONE.public_key(),
                door=Door.METERING_BOX,
                outlet=0,
                not_before=SAMPLE_TIME,
                expires_at=SAMPLE_TIME + 3600,
                issued_at=SAMPLE_TIME,
            ),
            OPERATOR,
        ),
        (
            RevocationList(
                version=4,
                issued_at=SAMPLE_TIME,
                grant_ids=frozenset({b"grant-99"}),
                phone_keys=frozenset({bytes(32)}),
                user_ids=frozenset({13}),
            ),
            OPERATOR,
        ),
        (
            TariffTable(
                version=3,
                issued_at=SAMPLE_TIME,
                default_price_fen_per_kwh=120,
                region_prices=(("SH-01", 110),),
                box_prices=((SAMPLE_BOX_ID, 100),),
            ),
            OPERATOR,
        ),
        (
            Reservation(
                reservation_id=b"reserv-1",
                user_id=1001,
                box_id=SAMPLE_BOX_ID,
                outlet=3,
                phone_key=PHONE.public_key(),
                not_before=SAMPLE_TIME,
                expires_at=SAMPLE_TIME + 900,
                issued_at=SAMPLE_TIME,
            ),
            OPERATOR,
        ),
        (
            LedgerAck(box_id=SAMPLE_BOX_ID, sequence=41, entry_hash=bytes(range(32)), issued_at=SAMPLE_TIME),
            OPERATOR,
        ),
        (
            LedgerEntry(
                box_id=SAMPLE_BOX_ID,
                sequence=42,
                previous_hash=bytes(range(32)),
                time=SAMPLE_TIME + 3600,
                time_quality=TimeQuality.SYNCED,
                kind=EntryKind.SESSION_ENDED,
                body=RECEIPT,
            ),
            BOX,
        ),
    ]


SAMPLES = sample_objects()
IDS = [f"{type(obj).__name__}-{i}" for i, (obj, _) in enumerate(SAMPLES)]


@pytest.mark.parametrize(("obj", "key"), SAMPLES, ids=IDS)
def test_round_trip(obj: SignedObject, key: cose.SigningKey) -> None:
    signed = obj.sign(key)
    assert type(obj).verify(signed, cose.key_ring(key.public_key)) == obj
    assert type(obj).decode_unverified(signed) == obj


@pytest.mark.parametrize(("obj", "key"), SAMPLES, ids=IDS)
def test_pycose_verifies_every_object(obj: SignedObject, key: cose.SigningKey) -> None:
    message = Sign1Message.decode(obj.sign(key))
    message.key = OKPKey(crv=Ed25519, x=cose.public_key_bytes(key.public_key))
    assert message.verify_signature()
    assert message.payload == obj.encode_payload()


@pytest.mark.parametrize(("obj", "key"), SAMPLES, ids=IDS)
def test_python_cwt_verifies_every_object(obj: SignedObject, key: cose.SigningKey) -> None:
    public = COSEKey.new({1: 1, -1: 6, -2: cose.public_key_bytes(key.public_key), 3: -8, 2: key.key_id})
    assert COSE.new().decode(obj.sign(key), keys=[public]) == obj.encode_payload()


@pytest.mark.parametrize(("obj", "key"), SAMPLES, ids=IDS)
def test_every_single_byte_change_is_rejected(obj: SignedObject, key: cose.SigningKey) -> None:
    signed = obj.sign(key)
    ring = cose.key_ring(key.public_key)
    for position in range(len(signed)):
        for flip in (0x01, 0x80, 0xFF):
            mutated = bytearray(signed)
            mutated[position] ^= flip
            with pytest.raises(TokenError):
                type(obj).verify(bytes(mutated), ring)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_mutations_truncations_and_extensions_are_rejected(data: st.DataObject) -> None:
    obj, key = data.draw(st.sampled_from(SAMPLES))
    signed = obj.sign(key)
    position = data.draw(st.integers(0, len(signed) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != signed[position]))
    cut = data.draw(st.integers(0, len(signed) - 1))
    tail = data.draw(st.binary(min_size=1, max_size=8))
    ring = cose.key_ring(key.public_key)
    for candidate in (
        signed[:position] + bytes([value]) + signed[position + 1 :],
        signed[:cut],
        signed + tail,
    ):
        with pytest.raises(TokenError):
            type(obj).verify(candidate, ring)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=300))
def test_garbage_gives_token_errors_only(garbage: bytes) -> None:
    for cls in (BalanceGrant, BoxCertificate, LedgerEntry, RevocationList):
        with pytest.raises(TokenError):
            cls.verify(garbage, TRUSTED)


def test_an_untrusted_key_is_refused_with_its_own_code() -> None:
    signed = sample_grant(PHONE).sign(OTHER_OPERATOR)
    with pytest.raises(TokenError) as excinfo:
        BalanceGrant.verify(signed, TRUSTED)
    assert excinfo.value.code == ErrorCode.TOKEN_UNKNOWN_KEY


def test_a_signature_by_another_key_under_a_trusted_kid_is_forged() -> None:
    impostor = cose.SigningKey(private_key=OTHER_OPERATOR.private_key, key_id=OPERATOR.key_id)
    with pytest.raises(TokenError) as excinfo:
        BalanceGrant.verify(sample_grant(PHONE).sign(impostor), TRUSTED)
    assert excinfo.value.code == ErrorCode.TOKEN_BAD_SIGNATURE


def test_one_kind_is_never_accepted_as_another() -> None:
    certificate = sample_certificate(BOX.private_key).sign(OPERATOR)
    with pytest.raises(TokenError) as excinfo:
        BalanceGrant.verify(certificate, TRUSTED)
    assert excinfo.value.code == ErrorCode.TOKEN_WRONG_TYPE


def _resign(claims: dict[int, object]) -> bytes:
    return cose.sign(cbor2.dumps(claims), OPERATOR)


def test_missing_unknown_and_badly_typed_claims_are_refused() -> None:
    claims = sample_grant(PHONE).claims()
    missing = {k: v for k, v in claims.items() if k != tokens.CLAIM_CNF}
    with pytest.raises(TokenError) as excinfo:
        BalanceGrant.verify(_resign(missing), TRUSTED)
    assert excinfo.value.code == ErrorCode.TOKEN_MISSING_CLAIM

    for bad in (
        {**claims, 99: 1},
        {**claims, tokens.CLAIM_EXP: "soon"},
        {**claims, tokens.CLAIM_CTI: b"short"},
    ):
        with pytest.raises(TokenError) as excinfo:
            BalanceGrant.verify(_resign(bad), TRUSTED)
        assert excinfo.value.code == ErrorCode.TOKEN_MALFORMED


def test_a_cnf_that_is_not_a_valid_ed25519_key_is_malformed() -> None:
    claims = sample_grant(PHONE).claims()
    claims[tokens.CLAIM_CNF] = {1: {1: 1, -1: 4, -2: bytes(32)}}  # X25519, not Ed25519
    with pytest.raises(TokenError) as excinfo:
        BalanceGrant.verify(_resign(claims), TRUSTED)
    assert excinfo.value.code == ErrorCode.TOKEN_MALFORMED


def test_a_grant_at_its_largest_fits_200_bytes() -> None:
    largest = BalanceGrant(
        grant_id=b"\xff" * 8,
        user_id=tokens.MAX_USER_ID,
        box_id="BOX-FFFFFFFFFFFF",
        phone_key=PHONE.public_key(),
        amount_fen=10**9,
        max_price_fen_per_kwh=10**6,
        max_session_seconds=31 * 86400,
        issued_at=tokens.MAX_TIME - 1,
        expires_at=tokens.MAX_TIME,
    )
    signed = largest.sign(OPERATOR)
    assert len(signed) <= tokens.MAX_GRANT_SIZE
    tokens.check_grant_size(signed)
    with pytest.raises(TokenError) as excinfo:
        tokens.check_grant_size(signed + bytes(tokens.MAX_GRANT_SIZE))
    assert excinfo.value.code == ErrorCode.TOKEN_TOO_LARGE


def test_receipt_must_agree_with_its_meter_registers() -> None:
    entry = SAMPLES[-1][0]
    assert isinstance(entry, LedgerEntry)
    claims = entry.claims()
    private = list(claims[tokens.CLAIM_POWERBOX])  # type: ignore[call-overload]
    body = list(private[5])
    body[7] = 1499  # energy_wh no longer end - start
    private[5] = body
    claims[tokens.CLAIM_POWERBOX] = private
    with pytest.raises(TokenError):
        LedgerEntry.verify(cose.sign(cbor2.dumps(claims), BOX), cose.key_ring(BOX.public_key))


def test_ledger_entry_refuses_a_body_of_the_wrong_kind() -> None:
    with pytest.raises(TypeError):
        LedgerEntry(
            box_id=SAMPLE_BOX_ID,
            sequence=1,
            previous_hash=tokens.GENESIS_HASH,
            time=SAMPLE_TIME,
            time_quality=TimeQuality.UNKNOWN,
            kind=EntryKind.BOOT,
            body=RECEIPT,
        )


def test_tariff_table_most_specific_price_wins() -> None:
    table = SAMPLES[5][0]
    assert isinstance(table, TariffTable)
    assert table.price_for(SAMPLE_BOX_ID, "SH-01") == 100
    assert table.price_for("BOX-OTHER", "SH-01") == 110
    assert table.price_for("BOX-OTHER", "BJ-02") == 120


def test_public_key_helpers_agree() -> None:
    key = PHONE.public_key()
    assert isinstance(
        tokens.decode_cose_key(tokens.encode_cose_key(key), tokens._fields("t")), Ed25519PublicKey
    )
    assert tokens.same_key(key, Ed25519PublicKey.from_public_bytes(cose.public_key_bytes(key)))
