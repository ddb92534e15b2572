"""protocol.edhoc: the RFC 9529 §2 known-answer trace, handshakes, tampering, misuse, fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.edhoc import (
    CredentialKind,
    EadItem,
    EdhocCredential,
    EdhocInitiator,
    EdhocPeerAbortedError,
    EdhocPeerError,
    EdhocResponder,
    EdhocState,
    EdhocTranscript,
    Message1Received,
    Message2Received,
    Message3Received,
    ccs_credential_for_public_key,
    ccs_public_key,
    connection_id_raw,
    cwt_credential,
    decode_error,
    encode_ead,
    encode_error,
    is_error_message,
    parse_ead,
    parse_id_cred_by_value,
)
from protocol.errors import EdhocError, ErrorCode, LocalProtocolError

VECTOR_FILE = Path(__file__).resolve().parent.parent / "vectors" / "rfc9529-chapter2-trace.json"


def _load_trace() -> dict[str, bytes]:
    values: dict[str, str] = json.loads(VECTOR_FILE.read_text())["values"]
    return {name: bytes.fromhex(value) for name, value in values.items()}


TRACE = _load_trace()

# EdhocTranscript field -> the trace's name for the same value (RFC 9529 §2).
TRANSCRIPT_TO_TRACE: dict[str, str] = {
    "message_1": "message_1",
    "h_message_1": "H(message_1)",
    "g_xy": "G_XY",
    "th_2": "TH_2",
    "prk_2e": "PRK_2e",
    "prk_3e2m": "PRK_3e2m",
    "context_2": "context_2",
    "mac_2": "MAC_2",
    "message_to_be_signed_2": "Message to be signed 2",
    "signature_or_mac_2": "Signature_or_MAC_2",
    "plaintext_2": "PLAINTEXT_2",
    "keystream_2": "KEYSTREAM_2",
    "ciphertext_2": "CIPHERTEXT_2",
    "message_2": "message_2",
    "th_3": "TH_3",
    "prk_4e3m": "PRK_4e3m",
    "k_3": "K_3",
    "iv_3": "IV_3",
    "a_3": "A_3",
    "context_3": "context_3",
    "mac_3": "MAC_3",
    "message_to_be_signed_3": "Message to be signed 3",
    "signature_or_mac_3": "Signature_or_MAC_3",
    "plaintext_3": "PLAINTEXT_3",
    "ciphertext_3": "CIPHERTEXT_3",
    "message_3": "message_3",
    "th_4": "TH_4",
    "prk_out": "PRK_out",
    "prk_exporter": "PRK_exporter",
}

# Transcript values the trace also gives in a second, CBOR-wrapped form.
CBOR_WRAPPED: dict[str, str] = {
    "th_2": "TH_2 (CBOR Data Item)",
    "th_3": "TH_3 (CBOR Data Item)",
    "th_4": "TH_4 (CBOR Data Item)",
    "h_message_1": "H(message_1) (CBOR Data Item)",
    "mac_2": "MAC_2 (CBOR Data Item)",
    "mac_3": "MAC_3 (CBOR Data Item)",
    "signature_or_mac_2": "Signature_or_MAC_2 (CBOR Data Item)",
    "signature_or_mac_3": "Signature_or_MAC_3 (CBOR Data Item)",
    "context_2": "context_2 (CBOR byte string)",
    "context_3": "context_3 (CBOR byte string)",
}


# --------------------------------------------------------------------------------------------
# Known-answer test: RFC 9529 §2 (method 0, suite 0, x5t)


def _kat_initiator(connection_id: int | bytes = -14) -> EdhocInitiator:
    # CRED_x enters context_x as a CBOR item: for X.509 that is the DER wrapped in a bstr.
    return EdhocInitiator(
        credential=EdhocCredential(
            id_cred=TRACE["ID_CRED_I"],
            cred=TRACE["CRED_I (CBOR Data Item)"],
            private_key=Ed25519PrivateKey.from_private_bytes(TRACE["SK_I"]),
        ),
        ephemeral_key=X25519PrivateKey.from_private_bytes(TRACE["X"]),
        connection_id=connection_id,
    )


def _kat_responder() -> EdhocResponder:
    return EdhocResponder(
        credential=EdhocCredential(
            id_cred=TRACE["ID_CRED_R"],
            cred=TRACE["CRED_R (CBOR Data Item)"],
            private_key=Ed25519PrivateKey.from_private_bytes(TRACE["SK_R"]),
        ),
        ephemeral_key=X25519PrivateKey.from_private_bytes(TRACE["Y"]),
        connection_id=TRACE["C_R"],
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class KatRun:
    initiator: EdhocInitiator
    responder: EdhocResponder
    received_1: Message1Received
    received_2: Message2Received
    received_3: Message3Received


def _run_kat() -> KatRun:
    initiator, responder = _kat_initiator(), _kat_responder()
    message_1 = initiator.message_1()
    received_1 = responder.receive_message_1(message_1)
    message_2 = responder.message_2()
    received_2 = initiator.receive_message_2(message_2)
    initiator.verify_message_2(
        cred_r=TRACE["CRED_R (CBOR Data Item)"], public_key=Ed25519PublicKey.from_public_bytes(TRACE["PK_R"])
    )
    message_3 = initiator.message_3()
    received_3 = responder.receive_message_3(message_3)
    responder.verify_message_3(
        cred_i=TRACE["CRED_I (CBOR Data Item)"], public_key=Ed25519PublicKey.from_public_bytes(TRACE["PK_I"])
    )
    return KatRun(
        initiator=initiator,
        responder=responder,
        received_1=received_1,
        received_2=received_2,
        received_3=received_3,
    )


@pytest.fixture(scope="module")
def kat() -> KatRun:
    return _run_kat()


def test_kat_inputs_are_consistent() -> None:
    """The trace's key pairs belong together, so a mismatch below is ours, not the file's."""
    sk_i = Ed25519PrivateKey.from_private_bytes(TRACE["SK_I"])
    sk_r = Ed25519PrivateKey.from_private_bytes(TRACE["SK_R"])
    assert sk_i.public_key().public_bytes_raw() == TRACE["PK_I"]
    assert sk_r.public_key().public_bytes_raw() == TRACE["PK_R"]
    assert X25519PrivateKey.from_private_bytes(TRACE["X"]).public_key().public_bytes_raw() == TRACE["G_X"]
    assert X25519PrivateKey.from_private_bytes(TRACE["Y"]).public_key().public_bytes_raw() == TRACE["G_Y"]
    assert TRACE["CRED_R (CBOR Data Item)"] == cbor2.dumps(TRACE["CRED_R"])
    assert TRACE["CRED_I (CBOR Data Item)"] == cbor2.dumps(TRACE["CRED_I"])


def test_kat_transcript_mapping_covers_every_field() -> None:
    assert set(TRANSCRIPT_TO_TRACE) == {field.name for field in dataclasses.fields(EdhocTranscript)}


def test_kat_messages(kat: KatRun) -> None:
    for role in (kat.initiator, kat.responder):
        assert role.state is EdhocState.COMPLETED
        assert role.transcript.message_1 == TRACE["message_1"]
        assert role.transcript.message_2 == TRACE["message_2"]
        assert role.transcript.message_3 == TRACE["message_3"]


@pytest.mark.parametrize("role", ["initiator", "responder"])
@pytest.mark.parametrize("field", sorted(TRANSCRIPT_TO_TRACE))
def test_kat_every_intermediate_value(kat: KatRun, role: str, field: str) -> None:
    transcript: EdhocTranscript = getattr(kat, role).transcript
    assert getattr(transcript, field) == TRACE[TRANSCRIPT_TO_TRACE[field]], (role, field)


@pytest.mark.parametrize("field", sorted(CBOR_WRAPPED))
def test_kat_cbor_wrapped_forms(kat: KatRun, field: str) -> None:
    assert cbor2.dumps(getattr(kat.responder.transcript, field)) == TRACE[CBOR_WRAPPED[field]]


def test_kat_aliases(kat: KatRun) -> None:
    transcript = kat.responder.transcript
    assert transcript.th_2 == TRACE["salt"]  # salt for PRK_2e is TH_2
    assert transcript.message_2 is not None
    g_y_ciphertext_2 = cbor2.loads(transcript.message_2)
    assert g_y_ciphertext_2[:32] == TRACE["G_Y"]
    assert cbor2.dumps(g_y_ciphertext_2[:32]) == TRACE["G_Y (CBOR Data Item)"]
    assert transcript.plaintext_2 is not None
    assert transcript.plaintext_2.startswith(TRACE["C_R (CBOR Data Item)"])
    assert TRACE["message_1"].endswith(TRACE["G_X (CBOR Data Item)"] + TRACE["C_I (CBOR Data Item)"])
    # Empty EAD and message_4-less trace: nothing hides in the optional fields.
    assert TRACE["EAD_1"] == TRACE["EAD_2"] == TRACE["EAD_3"] == b""


def test_kat_received_fields(kat: KatRun) -> None:
    assert kat.received_1 == Message1Received(
        method=0, suites_i=(0,), g_x=TRACE["G_X"], connection_id_i=-14, ead_1=TRACE["EAD_1"]
    )
    assert kat.received_2 == Message2Received(
        connection_id_r=TRACE["C_R"], id_cred_r=TRACE["ID_CRED_R"], ead_2=TRACE["EAD_2"]
    )
    assert kat.received_3 == Message3Received(id_cred_i=TRACE["ID_CRED_I"], ead_3=TRACE["EAD_3"])


def test_kat_session_outputs(kat: KatRun) -> None:
    for role in (kat.initiator, kat.responder):
        assert role.prk_out == TRACE["PRK_out"]
        assert role.exporter(0, b"", 16) == TRACE["OSCORE Master Secret"]
        assert role.exporter(1, b"", 8) == TRACE["OSCORE Master Salt"]
    # RFC 9528 §3.3.3: the Initiator's (client's) OSCORE Sender ID is C_R, the Responder's is C_I.
    assert connection_id_raw(kat.received_2.connection_id_r) == TRACE["Client's OSCORE Sender ID"]
    assert connection_id_raw(kat.received_1.connection_id_i) == TRACE["Server's OSCORE Sender ID"]


def test_kat_connection_id_as_int_or_bytes_is_the_same() -> None:
    assert _kat_initiator(TRACE["C_I"]).message_1() == TRACE["message_1"]
    assert connection_id_raw(-14) == TRACE["C_I"]


# --------------------------------------------------------------------------------------------
# Our own credentials and handshakes


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Party:
    credential: EdhocCredential
    public_key: Ed25519PublicKey


def _party(signing_key: Ed25519PrivateKey, subject: str) -> Party:
    id_cred, cred = ccs_credential_for_public_key(signing_key.public_key(), subject)
    return Party(
        credential=EdhocCredential(id_cred=id_cred, cred=cred, private_key=signing_key),
        public_key=signing_key.public_key(),
    )


def _fixed_ed25519(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


def _fixed_x25519(seed: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


PHONE = _party(_fixed_ed25519(1), "phone-1")
BOX = _party(_fixed_ed25519(2), "box-1")
STRANGER = _party(_fixed_ed25519(3), "stranger")


def _initiator(party: Party = PHONE, ephemeral: X25519PrivateKey | None = None) -> EdhocInitiator:
    return EdhocInitiator(
        credential=party.credential,
        ephemeral_key=ephemeral or _fixed_x25519(10),
        connection_id=b"\x01\x02",
    )


def _responder(party: Party = BOX, ephemeral: X25519PrivateKey | None = None) -> EdhocResponder:
    return EdhocResponder(
        credential=party.credential, ephemeral_key=ephemeral or _fixed_x25519(11), connection_id=7
    )


# Fixed keys and deterministic Ed25519 make these the same bytes in every run.
MESSAGE_1 = _initiator().message_1()


def _responder_after_message_1() -> EdhocResponder:
    responder = _responder()
    responder.receive_message_1(MESSAGE_1)
    return responder


MESSAGE_2 = _responder_after_message_1().message_2()


def _initiator_after_message_1() -> EdhocInitiator:
    initiator = _initiator()
    initiator.message_1()
    return initiator


def _initiator_after_verify_2() -> EdhocInitiator:
    initiator = _initiator_after_message_1()
    initiator.receive_message_2(MESSAGE_2)
    initiator.verify_message_2(cred_r=BOX.credential.cred, public_key=BOX.public_key)
    return initiator


MESSAGE_3 = _initiator_after_verify_2().message_3()


def _responder_after_message_2() -> EdhocResponder:
    responder = _responder_after_message_1()
    responder.message_2()
    return responder


def _handshake(
    initiator: EdhocInitiator,
    responder: EdhocResponder,
    *,
    ead_1: bytes = b"",
    ead_2: bytes = b"",
    ead_3: bytes = b"",
) -> tuple[Message1Received, Message2Received, Message3Received]:
    """Run a handshake, resolving each peer's credential from its by-value ID_CRED."""
    received_1 = responder.receive_message_1(initiator.message_1(ead_1))
    received_2 = initiator.receive_message_2(responder.message_2(ead_2))
    kind, cred_r = parse_id_cred_by_value(received_2.id_cred_r)
    assert kind is CredentialKind.CCS
    initiator.verify_message_2(cred_r=cred_r, public_key=ccs_public_key(cred_r))
    received_3 = responder.receive_message_3(initiator.message_3(ead_3))
    kind, cred_i = parse_id_cred_by_value(received_3.id_cred_i)
    assert kind is CredentialKind.CCS
    responder.verify_message_3(cred_i=cred_i, public_key=ccs_public_key(cred_i))
    return received_1, received_2, received_3


def test_full_handshake_with_fresh_keys_agrees() -> None:
    phone = _party(Ed25519PrivateKey.generate(), "phone-42")
    box = _party(Ed25519PrivateKey.generate(), "box-7")
    initiator = EdhocInitiator(
        credential=phone.credential, ephemeral_key=X25519PrivateKey.generate(), connection_id=-3
    )
    responder = EdhocResponder(
        credential=box.credential, ephemeral_key=X25519PrivateKey.generate(), connection_id=b"box-7"
    )
    received_1, received_2, received_3 = _handshake(initiator, responder)

    assert initiator.state is responder.state is EdhocState.COMPLETED
    assert received_1.connection_id_i == -3
    assert received_2.connection_id_r == b"box-7"
    assert received_2.id_cred_r == box.credential.id_cred
    assert received_3.id_cred_i == phone.credential.id_cred
    assert initiator.prk_out == responder.prk_out
    assert initiator.transcript == responder.transcript
    assert all(getattr(initiator.transcript, name) is not None for name in TRANSCRIPT_TO_TRACE)
    for label, context, length in [(0, b"", 16), (1, b"", 8), (40000, b"powerbox", 64)]:
        assert initiator.exporter(label, context, length) == responder.exporter(label, context, length)
    assert initiator.exporter(0, b"", 16) != initiator.exporter(1, b"", 16)


def test_handshake_carries_ead_both_ways() -> None:
    ead_1 = encode_ead([EadItem(label=0, value=b"\xe9"), EadItem(label=-27)])
    ead_2 = encode_ead([EadItem(label=5, value=b"voucher")])
    ead_3 = encode_ead([EadItem(label=0), EadItem(label=0, value=b"")])
    received_1, received_2, received_3 = _handshake(
        _initiator(), _responder(), ead_1=ead_1, ead_2=ead_2, ead_3=ead_3
    )
    assert (received_1.ead_1, received_2.ead_2, received_3.ead_3) == (ead_1, ead_2, ead_3)
    items = parse_ead(received_1.ead_1)
    assert items == (EadItem(label=0, value=b"\xe9"), EadItem(label=-27))
    assert [item.critical for item in items] == [False, True]


@pytest.mark.parametrize(
    ("kid", "compact"),
    [
        (b"\x2d", b"\x2d"),  # one-byte CBOR int -14: sent as that int
        (b"\x0d", b"\x0d"),
        (b"\x18", b"\x41\x18"),  # 0x18 is not a complete int encoding: sent as bstr
        (b"\xff", b"\x41\xff"),
        (b"box-kid", b"\x47box-kid"),
    ],
)
def test_kid_compact_encoding_both_ways(kid: bytes, compact: bytes) -> None:
    """RFC 9528 §3.5.3.2: {4: kid} travels as kid, under the §3.3.2 int rule."""
    id_cred = cbor2.dumps({4: kid})
    box = Party(
        credential=dataclasses.replace(BOX.credential, id_cred=id_cred, cred=BOX.credential.cred),
        public_key=BOX.public_key,
    )
    initiator, responder = _initiator(), _responder(box)
    responder.receive_message_1(initiator.message_1())
    received = initiator.receive_message_2(responder.message_2())
    plaintext_2 = responder.transcript.plaintext_2
    assert plaintext_2 is not None
    assert plaintext_2[1:].startswith(compact)  # after C_R = 7 (one byte)
    assert received.id_cred_r == id_cred  # expanded back to the map
    initiator.verify_message_2(cred_r=box.credential.cred, public_key=box.public_key)
    assert initiator.state is EdhocState.VERIFIED_MESSAGE_2


def test_kid_credential_for_initiator_completes() -> None:
    phone = dataclasses.replace(PHONE.credential, id_cred=cbor2.dumps({4: b"\x21"}))
    initiator = EdhocInitiator(credential=phone, ephemeral_key=_fixed_x25519(10), connection_id=0)
    responder = _responder()
    responder.receive_message_1(initiator.message_1())
    initiator.receive_message_2(responder.message_2())
    initiator.verify_message_2(cred_r=BOX.credential.cred, public_key=BOX.public_key)
    received = responder.receive_message_3(initiator.message_3())
    assert received.id_cred_i == cbor2.dumps({4: b"\x21"})
    responder.verify_message_3(cred_i=PHONE.credential.cred, public_key=PHONE.public_key)
    assert responder.prk_out == initiator.prk_out


# --------------------------------------------------------------------------------------------
# Authentication failures


def test_wrong_responder_key_is_bad_signature() -> None:
    initiator = _initiator_after_message_1()
    initiator.receive_message_2(MESSAGE_2)
    with pytest.raises(EdhocError) as caught:
        initiator.verify_message_2(cred_r=BOX.credential.cred, public_key=STRANGER.public_key)
    assert caught.value.code is ErrorCode.EDHOC_BAD_SIGNATURE
    assert initiator.state is EdhocState.FAILED


def test_wrong_responder_credential_is_bad_signature() -> None:
    initiator = _initiator_after_message_1()
    initiator.receive_message_2(MESSAGE_2)
    with pytest.raises(EdhocError) as caught:
        initiator.verify_message_2(cred_r=STRANGER.credential.cred, public_key=BOX.public_key)
    assert caught.value.code is ErrorCode.EDHOC_BAD_SIGNATURE


def test_wrong_initiator_key_is_bad_signature() -> None:
    responder = _responder_after_message_2()
    responder.receive_message_3(MESSAGE_3)
    with pytest.raises(EdhocError) as caught:
        responder.verify_message_3(cred_i=PHONE.credential.cred, public_key=STRANGER.public_key)
    assert caught.value.code is ErrorCode.EDHOC_BAD_SIGNATURE
    assert responder.state is EdhocState.FAILED
    with pytest.raises(LocalProtocolError):
        responder.exporter(0, b"", 16)


def test_impersonating_initiator_is_rejected() -> None:
    """A stranger who signs with its own key but claims the phone's credential fails."""
    impostor = EdhocCredential(
        id_cred=PHONE.credential.id_cred, cred=PHONE.credential.cred, private_key=_fixed_ed25519(3)
    )
    initiator = EdhocInitiator(
        credential=impostor, ephemeral_key=_fixed_x25519(10), connection_id=b"\x01\x02"
    )
    initiator.message_1()
    initiator.receive_message_2(MESSAGE_2)
    initiator.verify_message_2(cred_r=BOX.credential.cred, public_key=BOX.public_key)
    responder = _responder_after_message_2()
    responder.receive_message_3(initiator.message_3())
    with pytest.raises(EdhocError) as caught:
        responder.verify_message_3(cred_i=PHONE.credential.cred, public_key=PHONE.public_key)
    assert caught.value.code is ErrorCode.EDHOC_BAD_SIGNATURE


def _state_of(machine: EdhocInitiator | EdhocResponder) -> EdhocState:
    return machine.state  # a call, so mypy does not carry narrowing across state changes


def _receive_and_verify_2(initiator: EdhocInitiator, message_2: bytes) -> None:
    initiator.receive_message_2(message_2)
    initiator.verify_message_2(cred_r=BOX.credential.cred, public_key=BOX.public_key)


def _receive_and_verify_3(responder: EdhocResponder, message_3: bytes) -> None:
    responder.receive_message_3(message_3)
    responder.verify_message_3(cred_i=PHONE.credential.cred, public_key=PHONE.public_key)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0, max_value=len(MESSAGE_2) - 1), mask=st.integers(1, 255))
def test_tampered_message_2_is_rejected(position: int, mask: int) -> None:
    tampered = bytearray(MESSAGE_2)
    tampered[position] ^= mask
    initiator = _initiator_after_message_1()
    with pytest.raises(EdhocError):
        _receive_and_verify_2(initiator, bytes(tampered))
    assert initiator.state is EdhocState.FAILED


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0, max_value=len(MESSAGE_3) - 1), mask=st.integers(1, 255))
def test_tampered_message_3_is_rejected(position: int, mask: int) -> None:
    tampered = bytearray(MESSAGE_3)
    tampered[position] ^= mask
    responder = _responder_after_message_2()
    with pytest.raises(EdhocError):
        _receive_and_verify_3(responder, bytes(tampered))
    assert responder.state is EdhocState.FAILED


def test_tampered_message_3_ciphertext_is_decryption_failure() -> None:
    tampered = bytearray(MESSAGE_3)
    tampered[-1] ^= 1  # inside the tag, CBOR framing intact
    responder = _responder_after_message_2()
    with pytest.raises(EdhocError) as caught:
        responder.receive_message_3(bytes(tampered))
    assert caught.value.code is ErrorCode.EDHOC_DECRYPTION_FAILED


def test_replayed_message_3_from_other_session_is_rejected() -> None:
    """A message_3 from another session does not decrypt under this session's keys."""
    responder = EdhocResponder(credential=BOX.credential, ephemeral_key=_fixed_x25519(99), connection_id=7)
    responder.receive_message_1(MESSAGE_1)
    responder.message_2()
    with pytest.raises(EdhocError) as caught:
        responder.receive_message_3(MESSAGE_3)
    assert caught.value.code is ErrorCode.EDHOC_DECRYPTION_FAILED


# --------------------------------------------------------------------------------------------
# API misuse: out-of-order calls raise LocalProtocolError and change nothing


def _calls_out_of_order_initiator() -> list[tuple[str, Callable[[EdhocInitiator], object]]]:
    return [
        ("receive_message_2", lambda i: i.receive_message_2(MESSAGE_2)),
        ("verify_message_2", lambda i: i.verify_message_2(cred_r=b"\xa0", public_key=BOX.public_key)),
        ("message_3", lambda i: i.message_3()),
        ("exporter", lambda i: i.exporter(0, b"", 16)),
        ("prk_out", lambda i: i.prk_out),
    ]


@pytest.mark.parametrize(("name", "call"), _calls_out_of_order_initiator())
def test_initiator_refuses_calls_before_message_1(
    name: str, call: Callable[[EdhocInitiator], object]
) -> None:
    initiator = _initiator()
    with pytest.raises(LocalProtocolError):
        call(initiator)
    assert initiator.state is EdhocState.START, name


def test_initiator_refuses_repeats_and_skips() -> None:
    initiator = _initiator_after_message_1()
    with pytest.raises(LocalProtocolError):
        initiator.message_1()
    with pytest.raises(LocalProtocolError):
        initiator.verify_message_2(cred_r=BOX.credential.cred, public_key=BOX.public_key)
    initiator.receive_message_2(MESSAGE_2)
    with pytest.raises(LocalProtocolError):
        initiator.message_3()  # must verify first
    with pytest.raises(LocalProtocolError):
        initiator.receive_message_2(MESSAGE_2)
    assert initiator.state is EdhocState.RECEIVED_MESSAGE_2
    initiator.verify_message_2(cred_r=BOX.credential.cred, public_key=BOX.public_key)
    initiator.message_3()
    with pytest.raises(LocalProtocolError):
        initiator.message_3()
    assert _state_of(initiator) is EdhocState.COMPLETED


def test_responder_refuses_out_of_order_calls() -> None:
    responder = _responder()
    for call in (
        responder.message_2,
        lambda: responder.receive_message_3(MESSAGE_3),
        lambda: responder.verify_message_3(cred_i=PHONE.credential.cred, public_key=PHONE.public_key),
        lambda: responder.prk_out,
        responder.error_for_wrong_suite,
    ):
        with pytest.raises(LocalProtocolError):
            call()
        assert responder.state is EdhocState.START
    responder.receive_message_1(MESSAGE_1)
    with pytest.raises(LocalProtocolError):
        responder.receive_message_1(MESSAGE_1)
    with pytest.raises(LocalProtocolError):
        responder.receive_message_3(MESSAGE_3)
    responder.message_2()
    with pytest.raises(LocalProtocolError):
        responder.message_2()
    with pytest.raises(LocalProtocolError):
        responder.verify_message_3(cred_i=PHONE.credential.cred, public_key=PHONE.public_key)
    assert responder.state is EdhocState.WAIT_MESSAGE_3


def test_failed_machine_refuses_everything() -> None:
    responder = _responder()
    with pytest.raises(EdhocError):
        responder.receive_message_1(b"\xff")
    assert responder.state is EdhocState.FAILED
    for call in (
        lambda: responder.receive_message_1(MESSAGE_1),
        responder.message_2,
        lambda: responder.receive_message_3(MESSAGE_3),
        lambda: responder.exporter(0, b"", 16),
    ):
        with pytest.raises(LocalProtocolError):
            call()
    assert responder.state is EdhocState.FAILED


def test_bad_arguments_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        EdhocInitiator(credential=PHONE.credential, ephemeral_key=_fixed_x25519(1), connection_id=24)
    with pytest.raises(LocalProtocolError):
        EdhocInitiator(
            credential=PHONE.credential, ephemeral_key=_fixed_x25519(1), connection_id=0, suites=(2,)
        )
    with pytest.raises(LocalProtocolError):
        EdhocResponder(credential=BOX.credential, ephemeral_key=_fixed_x25519(1), connection_id=0, suites=())
    not_a_map = dataclasses.replace(PHONE.credential, id_cred=b"\x41\x00")
    with pytest.raises(LocalProtocolError):
        EdhocInitiator(credential=not_a_map, ephemeral_key=_fixed_x25519(1), connection_id=0)
    initiator = _initiator()
    with pytest.raises(LocalProtocolError):
        initiator.message_1(ead_1=b"\x61a")  # a text string is not an EAD item
    assert initiator.state is EdhocState.START
    completed = _initiator_after_verify_2()
    completed.message_3()
    with pytest.raises(LocalProtocolError):
        completed.exporter(-1, b"", 16)
    with pytest.raises(LocalProtocolError):
        completed.exporter(0, b"", 0)


def test_transcript_is_read_only() -> None:
    transcript = _initiator_after_verify_2().transcript
    with pytest.raises(dataclasses.FrozenInstanceError):
        transcript.th_2 = b""  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# message_1 validation and cipher suite negotiation (RFC 9528 §5.2.3, §6.3)


def _message_1(
    *, method: bytes = b"\x00", suites: object = 0, g_x: bytes | None = None, tail: bytes = b""
) -> bytes:
    g_x = _fixed_x25519(10).public_key().public_bytes_raw() if g_x is None else g_x
    return method + cbor2.dumps(suites) + cbor2.dumps(g_x) + b"\x21" + tail


def _receive_1_code(message_1: bytes) -> ErrorCode:
    with pytest.raises(EdhocError) as caught:
        _responder().receive_message_1(message_1)
    return caught.value.code


@pytest.mark.parametrize("suites", [2, [0, 2], [0, 6], [6, 2]])
def test_unsupported_selected_suite(suites: object) -> None:
    responder = _responder()
    with pytest.raises(EdhocError) as caught:
        responder.receive_message_1(_message_1(suites=suites))
    assert caught.value.code is ErrorCode.EDHOC_UNSUPPORTED_CIPHER_SUITE
    assert responder.state is EdhocState.FAILED
    error = responder.error_for_wrong_suite()
    assert error == b"\x02\x00"
    assert is_error_message(error)
    assert decode_error(error) == EdhocPeerError(err_code=2, err_info=(0,))

    # The Initiator receives the error where it expects message_2.
    initiator = _initiator_after_message_1()
    with pytest.raises(EdhocPeerAbortedError) as aborted:
        initiator.receive_message_2(error)
    assert aborted.value.code is ErrorCode.EDHOC_PEER_ERROR
    assert aborted.value.peer_error.err_info == (0,)
    assert initiator.state is EdhocState.FAILED


def test_less_preferred_suite_we_do_not_support_is_skipped() -> None:
    received = _responder().receive_message_1(_message_1(suites=[6, 24, 0]))
    assert received.suites_i == (6, 24, 0)


def test_unsupported_method() -> None:
    responder = _responder()
    with pytest.raises(EdhocError) as caught:
        responder.receive_message_1(_message_1(method=b"\x03"))
    assert caught.value.code is ErrorCode.EDHOC_UNSUPPORTED_METHOD
    with pytest.raises(LocalProtocolError):
        responder.error_for_wrong_suite()  # error code 2 is only for suite rejections


@pytest.mark.parametrize(
    ("message_1", "why"),
    [
        (_message_1(suites=[0]), "one-element SUITES_I array"),
        (_message_1(suites=[]), "empty SUITES_I array"),
        (_message_1(suites="0"), "SUITES_I not an int"),
        (_message_1(method=b"\x18\x00"), "non-deterministic METHOD"),
        (_message_1(method=b"\xf4"), "METHOD false"),
        (_message_1(g_x=b"\x01" * 31), "short G_X"),
        (_message_1(g_x=b"\x00" * 32), "low-order G_X"),
        (_message_1()[:-1] + b"\x41\x21", "C_I 0x21 sent as bstr instead of int"),
        (_message_1()[:-1] + b"\x18\x18", "C_I int outside -24..23"),
        (_message_1()[:-1] + b"\x61a", "C_I text string"),
        (_message_1(tail=b"\x61a"), "EAD_1 item is a text string"),
        (_message_1(tail=b"\x00\x40\x40"), "EAD_1 value without label"),
        (_message_1(tail=b"\x00\x5f\x41a\xff"), "EAD_1 indefinite-length value"),
        (_message_1()[:-1], "missing C_I"),
        (b"", "empty"),
    ],
)
def test_malformed_message_1(message_1: bytes, why: str) -> None:
    assert _receive_1_code(message_1) is ErrorCode.EDHOC_MALFORMED, why


def test_message_1_with_ead_and_int_connection_id() -> None:
    ead = encode_ead([EadItem(label=0, value=b"\x00" * 10), EadItem(label=-1, value=b"x")])
    received = _responder().receive_message_1(_message_1(tail=ead))
    assert received.connection_id_i == -2
    assert received.ead_1 == ead


# --------------------------------------------------------------------------------------------
# Error messages (RFC 9528 §6)


@pytest.mark.parametrize(
    ("err_code", "err_info", "decoded"),
    [
        (1, "Method not supported", "Method not supported"),
        (2, 0, (0,)),
        (2, [9, 8], (9, 8)),
        (3, True, True),
        (-7, {"why": [1, 2]}, {"why": [1, 2]}),
    ],
)
def test_error_message_round_trip(err_code: int, err_info: object, decoded: object) -> None:
    error = encode_error(err_code, err_info)
    assert is_error_message(error)
    assert decode_error(error) == EdhocPeerError(err_code=err_code, err_info=decoded)


def test_error_message_from_initiator_aborts_responder() -> None:
    responder = _responder_after_message_2()
    with pytest.raises(EdhocPeerAbortedError) as caught:
        responder.receive_message_3(encode_error(1, "Unknown credential"))
    assert caught.value.peer_error == EdhocPeerError(err_code=1, err_info="Unknown credential")
    assert responder.state is EdhocState.FAILED


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x01",  # code 1 needs a text string
        b"\x02\x81\x00",  # SUITES_R as a one-element array
        b"\x02\x61a",
        b"\x03\xf4",  # code 3 needs true
        b"\x01",
        b"\x01\x61a\x00",
        b"\x61a\x61a",
    ],
)
def test_malformed_error_messages(data: bytes) -> None:
    with pytest.raises(EdhocError) as caught:
        decode_error(data)
    assert caught.value.code is ErrorCode.EDHOC_MALFORMED


@pytest.mark.parametrize(("err_code", "err_info"), [(0, "x"), (1, 5), (2, []), (2, "0"), (2, [True]), (3, 1)])
def test_encode_error_refuses_bad_arguments(err_code: int, err_info: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_error(err_code, err_info)


def test_is_error_message_rule() -> None:
    assert not is_error_message(MESSAGE_2)
    assert not is_error_message(MESSAGE_3)
    assert not is_error_message(b"")
    assert not is_error_message(b"\x1c")  # not well-formed
    # message_1 also starts with an int: the rule only applies where message_2+ is expected.
    assert is_error_message(MESSAGE_1)


# --------------------------------------------------------------------------------------------
# Credential helpers


def test_ccs_credential_layout() -> None:
    key = _fixed_ed25519(1).public_key()
    id_cred, cred = ccs_credential_for_public_key(key, "phone-1")
    x = key.public_bytes_raw()
    assert cbor2.loads(cred) == {2: "phone-1", 8: {1: {1: 1, -1: 6, -2: x}}}
    assert cbor2.loads(id_cred) == {14: cbor2.loads(cred)}
    assert parse_id_cred_by_value(id_cred) == (CredentialKind.CCS, cred)
    assert ccs_public_key(cred).public_bytes_raw() == x


def test_cwt_credential_by_value() -> None:
    cose_sign1 = [b"\xa1\x01\x27", {}, cbor2.dumps({2: "box-1"}), b"\x00" * 64]
    untagged = cbor2.dumps(cose_sign1)
    tagged = cbor2.dumps(cbor2.CBORTag(61, cbor2.CBORTag(18, cose_sign1)))
    id_cred, cred = cwt_credential(tagged)
    assert cred == untagged  # CRED_x is the untagged CWT (RFC 9528 §3.5.2)
    assert cbor2.loads(id_cred) == {13: cose_sign1}  # kcwt holds the CWT itself
    assert parse_id_cred_by_value(id_cred) == (CredentialKind.CWT, untagged)
    # A bstr-wrapped kcwt value is accepted as well.
    assert parse_id_cred_by_value(cbor2.dumps({13: tagged})) == (CredentialKind.CWT, untagged)
    with pytest.raises(LocalProtocolError):
        cwt_credential(untagged + b"\x00")


def test_handshake_with_cwt_credential() -> None:
    cwt = cbor2.dumps([b"\xa1\x01\x27", {}, b"claims", b"\x01" * 64])
    id_cred, cred = cwt_credential(cwt)
    box = EdhocCredential(id_cred=id_cred, cred=cred, private_key=_fixed_ed25519(2))
    initiator = _initiator()
    responder = EdhocResponder(credential=box, ephemeral_key=_fixed_x25519(11), connection_id=7)
    responder.receive_message_1(initiator.message_1())
    received = initiator.receive_message_2(responder.message_2())
    kind, cred_r = parse_id_cred_by_value(received.id_cred_r)
    assert (kind, cred_r) == (CredentialKind.CWT, cwt)
    initiator.verify_message_2(cred_r=cred_r, public_key=BOX.public_key)
    assert initiator.state is EdhocState.VERIFIED_MESSAGE_2


@pytest.mark.parametrize(
    "id_cred",
    [
        cbor2.dumps({4: b"kid"}),
        cbor2.dumps({13: [1], 14: {2: "x"}}),
        cbor2.dumps({14: b"not a map"}),
    ],
)
def test_id_cred_without_single_credential_by_value(id_cred: bytes) -> None:
    with pytest.raises(EdhocError) as caught:
        parse_id_cred_by_value(id_cred)
    assert caught.value.code is ErrorCode.EDHOC_BAD_CREDENTIAL


def test_ccs_without_ed25519_key() -> None:
    with pytest.raises(EdhocError) as caught:
        ccs_public_key(cbor2.dumps({2: "x", 8: {1: {1: 1, -1: 4, -2: b"\x00" * 32}}}))
    assert caught.value.code is ErrorCode.EDHOC_BAD_CREDENTIAL


# --------------------------------------------------------------------------------------------
# Truncated and garbage input: only EdhocError, ever


def _only_edhoc_errors(call: Callable[[], object]) -> None:
    with contextlib.suppress(EdhocError):
        call()


def test_truncated_messages_are_malformed() -> None:
    for length in range(len(MESSAGE_1)):
        with pytest.raises(EdhocError):
            _responder().receive_message_1(MESSAGE_1[:length])
    for length in range(len(MESSAGE_2)):
        with pytest.raises(EdhocError):
            _initiator_after_message_1().receive_message_2(MESSAGE_2[:length])
    for length in range(len(MESSAGE_3)):
        with pytest.raises(EdhocError):
            _responder_after_message_2().receive_message_3(MESSAGE_3[:length])


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(EdhocError):
        _initiator_after_message_1().receive_message_2(MESSAGE_2 + b"\x00")
    with pytest.raises(EdhocError):
        _responder_after_message_2().receive_message_3(MESSAGE_3 + b"\x40")


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.binary(max_size=80)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.integers(-30, 30), children, max_size=3)
    ),
    max_leaves=12,
)
cbor_sequences = st.lists(_cbor_values, max_size=6).map(
    lambda values: b"".join(cbor2.dumps(v) for v in values)
)
garbage = st.binary(max_size=300) | cbor_sequences


@settings(max_examples=300, deadline=None)
@given(data=garbage)
def test_garbage_message_1(data: bytes) -> None:
    _only_edhoc_errors(lambda: _responder().receive_message_1(data))


@settings(max_examples=300, deadline=None)
@given(data=garbage)
def test_garbage_message_2(data: bytes) -> None:
    initiator = _initiator_after_message_1()
    _only_edhoc_errors(lambda: initiator.receive_message_2(data))


@settings(max_examples=300, deadline=None)
@given(data=garbage)
def test_garbage_message_3(data: bytes) -> None:
    responder = _responder_after_message_2()
    _only_edhoc_errors(lambda: responder.receive_message_3(data))


@settings(max_examples=300, deadline=None)
@given(data=garbage)
def test_garbage_to_decoders(data: bytes) -> None:
    assert isinstance(is_error_message(data), bool)
    _only_edhoc_errors(lambda: decode_error(data))
    _only_edhoc_errors(lambda: parse_ead(data))
    _only_edhoc_errors(lambda: parse_id_cred_by_value(data))
    _only_edhoc_errors(lambda: ccs_public_key(data))


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0, max_value=len(MESSAGE_1) - 1), mask=st.integers(1, 255))
def test_mutated_message_1(position: int, mask: int) -> None:
    mutated = bytearray(MESSAGE_1)
    mutated[position] ^= mask
    _only_edhoc_errors(lambda: _responder().receive_message_1(bytes(mutated)))


def _craft_message_2(plaintext_2: bytes) -> bytes:
    """Encrypt an arbitrary PLAINTEXT_2 under the keys of MESSAGE_2's session (RFC 9528 §5.3.2).

    KEYSTREAM_2 depends only on PRK_2e and TH_2 (G_Y and message_1), not on the plaintext.
    """
    prk_2e, th_2 = SESSION_2.prk_2e, SESSION_2.th_2
    assert prk_2e is not None
    assert th_2 is not None
    info = cbor2.dumps(0) + cbor2.dumps(th_2) + cbor2.dumps(len(plaintext_2))
    keystream = HKDFExpand(hashes.SHA256(), len(plaintext_2), info).derive(prk_2e)
    ciphertext_2 = bytes(a ^ b for a, b in zip(plaintext_2, keystream, strict=True))
    return cbor2.dumps(cbor2.loads(MESSAGE_2)[:32] + ciphertext_2)


def _session_2_transcript() -> EdhocTranscript:
    initiator = _initiator_after_message_1()
    initiator.receive_message_2(MESSAGE_2)
    return initiator.transcript


SESSION_2 = _session_2_transcript()
SIGNATURE = cbor2.dumps(b"\x00" * 64)


def test_crafted_message_2_matches_real_one() -> None:
    assert SESSION_2.plaintext_2 is not None
    assert _craft_message_2(SESSION_2.plaintext_2) == MESSAGE_2


@pytest.mark.parametrize(
    ("plaintext_2", "why"),
    [
        (b"\x41\x21\x2d" + SIGNATURE, "C_R 0x21 sent as bstr instead of int"),
        (b"\x07\x41\x2d" + SIGNATURE, "kid 0x2d sent as bstr instead of int"),
        (b"\x07\x38\x20" + SIGNATURE, "kid int outside -24..23"),
        (b"\x07\xa0" + SIGNATURE, "empty ID_CRED_R map"),
        (b"\x07\x2d" + cbor2.dumps(b"\x00" * 63), "short signature"),
        (b"\x07\x2d" + SIGNATURE + b"\x61a", "EAD_2 text string"),
        (b"\x07\x2d", "no signature"),
        (b"\x07\xf5" + SIGNATURE, "ID_CRED_R true"),
    ],
)
def test_malformed_plaintext_2(plaintext_2: bytes, why: str) -> None:
    initiator = _initiator_after_message_1()
    with pytest.raises(EdhocError) as caught:
        initiator.receive_message_2(_craft_message_2(plaintext_2))
    assert caught.value.code is ErrorCode.EDHOC_MALFORMED, why


def test_wellformed_forged_plaintext_2_fails_signature() -> None:
    initiator = _initiator_after_message_1()
    received = initiator.receive_message_2(_craft_message_2(b"\x07\x2d" + SIGNATURE + b"\x00"))
    assert received == Message2Received(connection_id_r=7, id_cred_r=cbor2.dumps({4: b"\x2d"}), ead_2=b"\x00")
    with pytest.raises(EdhocError) as caught:
        initiator.verify_message_2(cred_r=BOX.credential.cred, public_key=BOX.public_key)
    assert caught.value.code is ErrorCode.EDHOC_BAD_SIGNATURE


@settings(max_examples=300, deadline=None)
@given(plaintext_2=cbor_sequences.filter(lambda data: 0 < len(data) <= 8160))
def test_garbage_plaintext_2_under_valid_keys(plaintext_2: bytes) -> None:
    """Well-encrypted but malformed PLAINTEXT_2: only the parser stands between it and us."""
    initiator = _initiator_after_message_1()
    _only_edhoc_errors(lambda: initiator.receive_message_2(_craft_message_2(plaintext_2)))
