"""Test vectors: every token and message of docs/protocol.md, built from fixed keys and randomness.

`build_vectors()` is pure and deterministic; `scripts/make_vectors.py` writes its result to
`tests/vectors/protocol.json` and renders the examples of docs/protocol.md from that file, and the
test suite checks the code, the file and the document agree.
"""

from __future__ import annotations

import itertools
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from protocol import channel, cose, framing, gatt, messages, sealing, tariff, testing, tokens
from protocol.session import LinkKind, MessageReceived, PhoneSession
from protocol.testing import SAMPLE_BOX_ID, SAMPLE_TIME, ConnectionPair, ScriptedBox

PHONE_CONNECTION_ID = 0x5A17
VECTOR_MTU = 247


def diagnostic(value: object) -> str:
    """CBOR diagnostic notation (RFC 8949 §8) of a decoded item, for humans reading the spec."""
    if isinstance(value, cbor2.CBORTag):
        return f"{value.tag}({diagnostic(value.value)})"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return f"h'{value.hex()}'"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(diagnostic(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{diagnostic(k)}: {diagnostic(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no diagnostic notation for {type(value).__name__}")


def _nested_diagnostic(data: bytes) -> str:
    """Diagnostic of a COSE object with its bstr-wrapped protected header and payload unwrapped."""
    item = cbor2.loads(data)
    body = item.value if isinstance(item, cbor2.CBORTag) else item
    protected, unprotected, payload, signature = body
    inner = [f"<< {diagnostic(cbor2.loads(protected))} >>", diagnostic(unprotected)]
    inner += [f"<< {diagnostic(cbor2.loads(payload))} >>", diagnostic(signature)]
    text = "[" + ", ".join(inner) + "]"
    return f"{item.tag}({text})" if isinstance(item, cbor2.CBORTag) else text


def _private(key: Ed25519PrivateKey | X25519PrivateKey) -> str:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()


def _token(signed: bytes) -> dict[str, Any]:
    return {"hex": signed.hex(), "size": len(signed), "diagnostic": _nested_diagnostic(signed)}


def build_vectors() -> dict[str, Any]:
    operator = testing.operator_key()
    operator_encryption = testing.x25519_key("operator encryption")
    box_key = testing.ed25519_key("box")
    phone_key = testing.ed25519_key("phone")
    box_ephemeral = testing.x25519_key("box ephemeral 1")
    phone_ephemeral = testing.x25519_key("phone ephemeral")
    ring = cose.key_ring(operator.public_key)

    certificate = testing.sample_certificate(box_key)
    signed_certificate = certificate.sign(operator)
    grant = testing.sample_grant(phone_key)
    top_up_grant = testing.sample_grant(phone_key, grant_id=b"grant-02", amount_fen=300, box_id=None)
    unlock = tokens.UnlockToken(
        token_id=b"unlock-1",
        holder_id=7,
        box_id=SAMPLE_BOX_ID,
        holder_key=phone_key.public_key(),
        door=tokens.Door.METERING_BOX,
        outlet=0,
        not_before=SAMPLE_TIME,
        expires_at=SAMPLE_TIME + 3600,
        issued_at=SAMPLE_TIME,
    )
    revocations = tokens.RevocationList(version=4, issued_at=SAMPLE_TIME, grant_ids=frozenset({b"grant-99"}))
    tariff_table = tokens.TariffTable(
        version=1, issued_at=SAMPLE_TIME, default_price_fen_per_kwh=120, region_prices=(("SH-01", 120),)
    )
    reservation = tokens.Reservation(
        reservation_id=b"reserv-1",
        user_id=1001,
        box_id=SAMPLE_BOX_ID,
        outlet=3,
        phone_key=phone_key.public_key(),
        not_before=SAMPLE_TIME,
        expires_at=SAMPLE_TIME + 900,
        issued_at=SAMPLE_TIME,
    )

    # The conversation, recorded at MTU 247 between a phone and an in-memory box.
    ids = itertools.count(1)
    box = ScriptedBox(
        box_key=box_key,
        signed_certificate=signed_certificate,
        operator_keys=ring,
        ephemeral_keys=lambda: box_ephemeral,
        session_ids=lambda: b"session" + bytes([next(ids)]),
    )
    label = gatt.QrLabel(
        box_id=SAMPLE_BOX_ID,
        outlet=2,
        fingerprint=gatt.box_key_fingerprint(cose.public_key_bytes(box_key.public_key())),
    )
    phone = PhoneSession(
        connection_id=PHONE_CONNECTION_ID,
        phone_key=phone_key,
        ephemeral_key=phone_ephemeral,
        label=label,
        operator_keys=ring,
        att_mtu=VECTOR_MTU,
    )
    pair = ConnectionPair(phone, box)
    phone.connect()
    phone_messages: list[messages.Message] = []

    def send(message: messages.PhoneMessage) -> None:
        phone_messages.append(message)
        phone.send(message)

    send(messages.StartSession(request_id=phone.new_request_id(), outlet=2, grant=grant.sign(operator)))
    box_messages: list[messages.Message] = []

    def pump(now: int) -> None:
        for event in pair.pump(now):
            if isinstance(event, MessageReceived):
                box_messages.append(event.message)

    pump(SAMPLE_TIME)
    session_id = next(iter(box.sessions))
    box.now = SAMPLE_TIME + 1
    box.meter(session_id, energy_wh=1000, power_w=2000)
    pump(SAMPLE_TIME + 1)
    send(
        messages.TopUp(
            request_id=phone.new_request_id(), session_id=session_id, grant=top_up_grant.sign(operator)
        )
    )
    pump(SAMPLE_TIME + 2)
    box.now = SAMPLE_TIME + 3600
    box.meter(session_id, energy_wh=4000, power_w=1500)
    send(messages.StopSession(request_id=phone.new_request_id(), session_id=session_id))
    pump(SAMPLE_TIME + 3600)

    conversation: list[dict[str, Any]] = []
    for flight in pair.flights:
        reassembler = framing.Reassembler()
        carried: list[bytes] = []
        for fragment in flight.fragments:
            carried.append(fragment)
            event = reassembler.receive(fragment)
            if not isinstance(event, framing.MessageReceived):
                continue
            conversation.append(
                {
                    "direction": "phone->box" if flight.sender == "phone" else "box->phone",
                    "link": LinkKind(event.message[0]).name,
                    "framed_message_hex": event.message.hex(),
                    "fragments_hex": [f.hex() for f in carried],
                }
            )
            carried = []
    records = {"phone->box": iter(phone_messages), "box->phone": iter(box_messages)}
    for step in conversation:
        if step["link"] == "RECORD":
            message = next(records[step["direction"]])
            step["plaintext_hex"] = message.encode().hex()
            step["plaintext_diagnostic"] = diagnostic(cbor2.loads(message.encode()))
            step["message"] = type(message).__name__

    receipt_entry = box.ledger[-1]
    batch_plaintext = cbor2.dumps(box.ledger)
    sealed = sealing.seal(
        batch_plaintext,
        recipient=operator_encryption.public_key(),
        ephemeral_key=testing.x25519_key("mule ephemeral"),
        iv=bytes(range(13)),
    )
    exporter = phone._edhoc.exporter

    return {
        "description": "powerbox protocol vectors (docs/protocol.md), written by scripts/make_vectors.py",
        "now": SAMPLE_TIME,
        "keys": {
            "operator_ed25519_private": _private(operator.private_key),
            "operator_ed25519_public": cose.public_key_bytes(operator.public_key).hex(),
            "operator_kid": operator.key_id.hex(),
            "operator_x25519_private": _private(operator_encryption),
            "operator_x25519_public": sealing.x25519_public_bytes(operator_encryption.public_key()).hex(),
            "box_ed25519_private": _private(box_key),
            "box_ed25519_public": cose.public_key_bytes(box_key.public_key()).hex(),
            "phone_ed25519_private": _private(phone_key),
            "phone_ed25519_public": cose.public_key_bytes(phone_key.public_key()).hex(),
            "box_ephemeral_x25519_private": _private(box_ephemeral),
            "phone_ephemeral_x25519_private": _private(phone_ephemeral),
        },
        "tokens": {
            "box_certificate": _token(signed_certificate),
            "balance_grant": _token(grant.sign(operator)),
            "balance_grant_any_box": _token(top_up_grant.sign(operator)),
            "unlock_token": _token(unlock.sign(operator)),
            "revocation_list": _token(revocations.sign(operator)),
            "tariff_table": _token(tariff_table.sign(operator)),
            "reservation": _token(reservation.sign(operator)),
            "ledger_entry_session_ended": _token(receipt_entry),
            "ledger_ack": _token(
                tokens.LedgerAck(
                    box_id=SAMPLE_BOX_ID,
                    sequence=len(box.ledger),
                    entry_hash=tokens.entry_hash(receipt_entry),
                    issued_at=SAMPLE_TIME + 7200,
                ).sign(operator)
            ),
        },
        "qr_label": label.encode(),
        "advertising_data_hex": gatt.advertising_data(SAMPLE_BOX_ID).hex(),
        "advertised_name": gatt.advertised_name(SAMPLE_BOX_ID),
        "phone_connection_id": PHONE_CONNECTION_ID,
        "att_mtu": VECTOR_MTU,
        "channel": {
            "prk_out": phone._edhoc.prk_out.hex(),
            "phone_to_box_key": exporter(
                channel.EXPORTER_LABEL_PHONE_TO_BOX_KEY, b"", channel.KEY_LENGTH
            ).hex(),
            "phone_to_box_iv": exporter(channel.EXPORTER_LABEL_PHONE_TO_BOX_IV, b"", channel.IV_LENGTH).hex(),
            "box_to_phone_key": exporter(
                channel.EXPORTER_LABEL_BOX_TO_PHONE_KEY, b"", channel.KEY_LENGTH
            ).hex(),
            "box_to_phone_iv": exporter(channel.EXPORTER_LABEL_BOX_TO_PHONE_IV, b"", channel.IV_LENGTH).hex(),
        },
        "conversation": conversation,
        "ledger": [entry.hex() for entry in box.ledger],
        "sealed_batch": {
            "ephemeral_x25519_private": _private(testing.x25519_key("mule ephemeral")),
            "iv": bytes(range(13)).hex(),
            "plaintext_hex": batch_plaintext.hex(),
            "sealed_hex": sealed.hex(),
        },
        "tariff": [
            {"energy_wh": e, "price_fen_per_kwh": p, "cost_fen": tariff.session_cost_fen(e, p)}
            for e, p in [(0, 120), (1, 120), (8, 120), (9, 120), (4000, 120), (1234, 99), (999_999, 1)]
        ],
    }
