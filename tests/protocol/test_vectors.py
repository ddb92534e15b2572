"""The code, tests/vectors/protocol.json and the examples in docs/protocol.md agree.

Besides regenerating, these tests read the vectors the way a mobile developer would: only the
file and the formulas of the spec, with plain `cryptography`, not our session code.
"""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from protocol import cose, gatt, messages, sealing, tariff, tokens
from protocol.session import LinkKind
from protocol.vectors import build_vectors
from scripts.make_vectors import SPEC_FILE, VECTORS_FILE, render_spec, render_vectors_json


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
    return loaded


def test_the_code_reproduces_the_vector_file_byte_for_byte() -> None:
    assert render_vectors_json(build_vectors()) == VECTORS_FILE.read_text()


def test_the_spec_shows_exactly_the_vectors_of_the_file(vectors: dict[str, Any]) -> None:
    current = SPEC_FILE.read_text()
    assert render_spec(current, vectors) == current


def test_every_token_verifies_with_the_keys_in_the_file(vectors: dict[str, Any]) -> None:
    keys = vectors["keys"]
    operator = cose.key_ring(
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(keys["operator_ed25519_public"]))
    )
    box = cose.key_ring(Ed25519PublicKey.from_public_bytes(bytes.fromhex(keys["box_ed25519_public"])))
    kinds: dict[str, type[tokens.SignedObject]] = {
        "box_certificate": tokens.BoxCertificate,
        "balance_grant": tokens.BalanceGrant,
        "balance_grant_any_box": tokens.BalanceGrant,
        "unlock_token": tokens.UnlockToken,
        "revocation_list": tokens.RevocationList,
        "tariff_table": tokens.TariffTable,
        "reservation": tokens.Reservation,
        "ledger_entry_session_ended": tokens.LedgerEntry,
        "ledger_ack": tokens.LedgerAck,
    }
    assert set(kinds) == set(vectors["tokens"])
    for name, cls in kinds.items():
        signed = bytes.fromhex(vectors["tokens"][name]["hex"])
        cls.verify(signed, box if cls is tokens.LedgerEntry else operator)
    grant = bytes.fromhex(vectors["tokens"]["balance_grant"]["hex"])
    assert len(grant) <= tokens.MAX_GRANT_SIZE


def test_the_ledger_in_the_file_is_one_unbroken_chain(vectors: dict[str, Any]) -> None:
    box = cose.key_ring(
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(vectors["keys"]["box_ed25519_public"]))
    )
    previous = tokens.GENESIS_HASH
    for sequence, entry_hex in enumerate(vectors["ledger"], start=1):
        signed = bytes.fromhex(entry_hex)
        entry = tokens.LedgerEntry.verify(signed, box)
        assert (entry.sequence, entry.previous_hash) == (sequence, previous)
        previous = tokens.entry_hash(signed)


def _ccm_open(
    key_hex: str, iv_hex: str, counter: int, connection_id: int, direction: int, body: bytes
) -> bytes:
    # docs/protocol.md §6: nonce = IV xor counter, AAD = ["powerbox channel v1", cid, direction, counter]
    iv = bytes.fromhex(iv_hex)
    nonce = bytes(a ^ b for a, b in zip(iv, counter.to_bytes(13, "big"), strict=True))
    aad = cbor2.dumps(["powerbox channel v1", connection_id, direction, counter])
    return AESCCM(bytes.fromhex(key_hex), tag_length=8).decrypt(nonce, body, aad)


def test_records_decrypt_with_the_spec_formulas_alone(vectors: dict[str, Any]) -> None:
    channel = vectors["channel"]
    counters = {"phone->box": 0, "box->phone": 0}
    seen = 0
    for step in vectors["conversation"]:
        framed = bytes.fromhex(step["framed_message_hex"])
        # the fragments of the file carry exactly this framed message
        payload = b"".join(
            bytes.fromhex(f)[5 if i == 0 else 3 :] for i, f in enumerate(step["fragments_hex"])
        )
        assert payload == framed
        if step["link"] != LinkKind.RECORD.name:
            continue
        direction = step["direction"]
        key, iv = (
            (channel["phone_to_box_key"], channel["phone_to_box_iv"])
            if direction == "phone->box"
            else (channel["box_to_phone_key"], channel["box_to_phone_iv"])
        )
        record = framed[1:]
        counter = cbor2.loads(record[:1]) if record[0] < 24 else cbor2.loads(record[:2])
        assert counter == counters[direction]
        head = 1 if counter < 24 else 2
        plaintext = _ccm_open(
            key,
            iv,
            counter,
            vectors["phone_connection_id"],
            0 if direction == "phone->box" else 1,
            record[head:],
        )
        assert plaintext.hex() == step["plaintext_hex"]
        messages.decode_message(plaintext)
        counters[direction] += 1
        seen += 1
    assert seen >= 8


def test_power_flows_after_two_round_trips_in_the_vectors(vectors: dict[str, Any]) -> None:
    links = [(s["direction"], s["link"]) for s in vectors["conversation"][:5]]
    assert links == [
        ("phone->box", "EDHOC_MESSAGE_1"),
        ("box->phone", "EDHOC_MESSAGE_2"),
        ("phone->box", "EDHOC_MESSAGE_3"),
        ("phone->box", "RECORD"),
        ("box->phone", "RECORD"),
    ]
    assert vectors["conversation"][4]["message"] == "SessionStarted"


def test_the_sealed_batch_opens_with_the_operator_key_only(vectors: dict[str, Any]) -> None:
    sealed = vectors["sealed_batch"]
    operator = X25519PrivateKey.from_private_bytes(bytes.fromhex(vectors["keys"]["operator_x25519_private"]))
    opened = sealing.open_sealed(
        bytes.fromhex(sealed["sealed_hex"]), {sealing.encryption_key_id(operator.public_key()): operator}
    )
    assert opened.hex() == sealed["plaintext_hex"]
    assert [entry.hex() for entry in cbor2.loads(opened)] == vectors["ledger"]


def test_label_advertisement_and_tariff_examples(vectors: dict[str, Any]) -> None:
    label = gatt.QrLabel.decode(vectors["qr_label"])
    box_key = bytes.fromhex(vectors["keys"]["box_ed25519_public"])
    assert label.fingerprint == gatt.box_key_fingerprint(box_key)
    advertisement = gatt.parse_advertising_data(bytes.fromhex(vectors["advertising_data_hex"]))
    assert advertisement.name == vectors["advertised_name"]
    assert gatt.SERVICE_UUID in advertisement.service_uuids
    for example in vectors["tariff"]:
        assert (
            tariff.session_cost_fen(example["energy_wh"], example["price_fen_per_kwh"]) == example["cost_fen"]
        )
