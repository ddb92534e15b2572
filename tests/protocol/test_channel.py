"""Secure channel (docs/protocol.md §6): round trips, the record format, and every way a record is refused.

EDHOC is not needed here: any function with the exporter's signature will do, so the tests use HKDF
over a fixed secret (RFC 5869) in its place.
"""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.channel import (
    EXPORTER_LABEL_BOX_TO_PHONE_IV,
    EXPORTER_LABEL_BOX_TO_PHONE_KEY,
    EXPORTER_LABEL_PHONE_TO_BOX_IV,
    EXPORTER_LABEL_PHONE_TO_BOX_KEY,
    MAX_COUNTER,
    MAX_PLAINTEXT_SIZE,
    MAX_RECORD_OVERHEAD,
    Exporter,
    Role,
    SecureChannel,
)
from protocol.errors import ChannelError, ErrorCode, LocalProtocolError

CONNECTION_ID = 0x0102


def hkdf_exporter(secret: bytes = b"edhoc stand-in secret") -> Exporter:
    def exporter(label: int, context: bytes, length: int) -> bytes:
        info = cbor2.dumps(label) + context
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)

    return exporter


def pair(
    exporter: Exporter | None = None, *, connection_id: int = CONNECTION_ID
) -> tuple[SecureChannel, SecureChannel]:
    exporter = exporter or hkdf_exporter()
    phone = SecureChannel(exporter=exporter, role=Role.PHONE, connection_id=connection_id)
    box = SecureChannel(exporter=exporter, role=Role.BOX, connection_id=connection_id)
    return phone, box


def refused(channel: SecureChannel, record: bytes, code: ErrorCode) -> None:
    with pytest.raises(ChannelError) as caught:
        channel.open(record)
    assert caught.value.code == code, caught.value
    assert channel.is_closed


def assert_closed(channel: SecureChannel, record: bytes = b"\x00" + bytes(8)) -> None:
    with pytest.raises(ChannelError) as opening:
        channel.open(record)
    with pytest.raises(ChannelError) as sealing:
        channel.seal(b"x")
    assert opening.value.code == sealing.value.code == ErrorCode.CHANNEL_CLOSED


# --- round trips and format ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=40))
def test_round_trip_both_directions(traffic: list[tuple[bool, bytes]]) -> None:
    phone, box = pair()
    for from_phone, message in traffic:
        sender, receiver = (phone, box) if from_phone else (box, phone)
        assert receiver.open(sender.seal(message)) == message
    sent_by_phone = sum(1 for from_phone, _ in traffic if from_phone)
    assert phone.next_send_counter == box.next_receive_counter == sent_by_phone
    assert box.next_send_counter == phone.next_receive_counter == len(traffic) - sent_by_phone


def test_record_matches_the_documented_construction() -> None:
    """record = counter (CBOR uint) || AES-CCM(key, IV xor counter, plaintext, AAD), checked independently."""
    exporter = hkdf_exporter()
    phone, box = pair(exporter)
    for direction, (sender, key_label, iv_label) in enumerate(
        [
            (phone, EXPORTER_LABEL_PHONE_TO_BOX_KEY, EXPORTER_LABEL_PHONE_TO_BOX_IV),
            (box, EXPORTER_LABEL_BOX_TO_PHONE_KEY, EXPORTER_LABEL_BOX_TO_PHONE_IV),
        ]
    ):
        key, iv = exporter(key_label, b"", 16), exporter(iv_label, b"", 13)
        for counter in range(30):
            plaintext = f"message {counter}".encode()
            record = sender.seal(plaintext)
            nonce = (int.from_bytes(iv, "big") ^ counter).to_bytes(13, "big")
            aad = cbor2.dumps(["powerbox channel v1", CONNECTION_ID, direction, counter])
            expected = cbor2.dumps(counter) + AESCCM(key, tag_length=8).encrypt(nonce, plaintext, aad)
            assert record == expected


def test_exporter_is_asked_for_the_private_use_labels() -> None:
    calls: list[tuple[int, bytes, int]] = []
    inner = hkdf_exporter()

    def recording(label: int, context: bytes, length: int) -> bytes:
        calls.append((label, context, length))
        return inner(label, context, length)

    SecureChannel(exporter=recording, role=Role.BOX, connection_id=1)
    assert sorted(calls) == [(32768, b"", 16), (32769, b"", 13), (32770, b"", 16), (32771, b"", 13)]


def test_overhead() -> None:
    phone, _ = pair()
    assert len(phone.seal(b"")) == 1 + 8
    phone._send_counter = MAX_COUNTER  # jump ahead rather than seal 2**32 records
    assert len(phone.seal(b"")) == MAX_RECORD_OVERHEAD == 13


# --- replay, reorder, truncation, tampering -----------------------------------------------------


def test_replay_is_refused_and_closes() -> None:
    phone, box = pair()
    first = phone.seal(b"start outlet 3")
    assert box.open(first) == b"start outlet 3"
    refused(box, first, ErrorCode.CHANNEL_REPLAY)
    assert_closed(box, phone.seal(b"next"))


def test_older_record_is_a_replay() -> None:
    phone, box = pair()
    records = [phone.seal(bytes([i])) for i in range(3)]
    box.open(records[0])
    box.open(records[1])
    refused(box, records[0], ErrorCode.CHANNEL_REPLAY)


def test_reorder_is_refused_and_closes() -> None:
    phone, box = pair()
    first, second = phone.seal(b"1"), phone.seal(b"2")
    refused(box, second, ErrorCode.CHANNEL_OUT_OF_ORDER)
    assert_closed(box, first)


def test_gap_is_refused() -> None:
    phone, box = pair()
    records = [phone.seal(bytes([i])) for i in range(3)]
    box.open(records[0])
    refused(box, records[2], ErrorCode.CHANNEL_OUT_OF_ORDER)


def test_every_truncation_is_refused() -> None:
    phone, _ = pair()
    record = phone.seal(b"top up with grant 42")
    for cut in range(len(record)):
        _, box = pair()
        with pytest.raises(ChannelError) as caught:
            box.open(record[:cut])
        # Too short for counter + tag is malformed; anything longer fails authentication.
        assert caught.value.code == (ErrorCode.CHANNEL_MALFORMED if cut < 1 + 8 else ErrorCode.CHANNEL_FORGED)
        assert box.is_closed


def test_every_single_bit_flip_is_refused() -> None:
    phone, _ = pair()
    records = [phone.seal(b"stop session 9") for _ in range(25)]
    record = records[24]  # counter 24 has a two-byte CBOR head, so flips hit both head forms
    for position in range(len(record) * 8):
        tampered = bytearray(record)
        tampered[position // 8] ^= 1 << (position % 8)
        _, box = pair()
        box._receive_counter = 24  # as if records 0..23 had arrived
        with pytest.raises(ChannelError) as caught:
            box.open(bytes(tampered))
        assert caught.value.code in {ErrorCode.CHANNEL_MALFORMED, ErrorCode.CHANNEL_FORGED}
        assert box.is_closed


def test_wrong_connection_id_is_forged() -> None:
    phone, _ = pair(connection_id=1)
    _, box = pair(connection_id=2)
    refused(box, phone.seal(b"hello"), ErrorCode.CHANNEL_FORGED)


def test_record_for_the_other_direction_is_forged() -> None:
    phone, box = pair()
    refused(phone, phone.seal(b"reflected"), ErrorCode.CHANNEL_FORGED)
    refused(box, box.seal(b"reflected"), ErrorCode.CHANNEL_FORGED)


def test_direction_is_bound_even_if_both_directions_shared_keys() -> None:
    """The AAD direction alone stops reflection: here the exporter gives both directions one key and IV."""
    inner = hkdf_exporter()

    def same_both_ways(label: int, context: bytes, length: int) -> bytes:
        return inner(label & ~2, context, length)  # 32770 -> 32768, 32771 -> 32769

    phone, _ = pair(same_both_ways)
    refused(phone, phone.seal(b"reflected"), ErrorCode.CHANNEL_FORGED)


def test_different_session_keys_are_forged() -> None:
    phone, _ = pair(hkdf_exporter(b"session one"))
    _, box = pair(hkdf_exporter(b"session two"))
    refused(box, phone.seal(b"hello"), ErrorCode.CHANNEL_FORGED)


@pytest.mark.parametrize(
    "record",
    [
        b"",
        b"\x00",
        b"\x00" + bytes(7),  # tag cut short
        b"\x20" + bytes(8),  # negative integer, not a uint
        b"\x40" + bytes(8),  # byte string
        b"\x18",  # head missing its byte
        b"\x18\x05" + bytes(8),  # 5 in two bytes: not the shortest form
        b"\x19\x00\x10" + bytes(8),  # likewise
        b"\x1a\x00\x00\x00\x10" + bytes(8),
        b"\x1b" + (2**32).to_bytes(8, "big") + bytes(8),  # beyond MAX_COUNTER
        b"\x1c" + bytes(8),  # reserved additional info
        b"\x1f" + bytes(8),  # indefinite length makes no sense for a uint
    ],
)
def test_malformed_records(record: bytes) -> None:
    _, box = pair()
    refused(box, record, ErrorCode.CHANNEL_MALFORMED)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_only_raises_channel_errors(record: bytes) -> None:
    _, box = pair()
    with pytest.raises(ChannelError):
        box.open(record)
    assert box.is_closed


def test_non_bytes_record_is_malformed() -> None:
    _, box = pair()
    refused(box, "text", ErrorCode.CHANNEL_MALFORMED)  # type: ignore[arg-type]  # hostile caller


# --- closing, exhaustion, misuse ----------------------------------------------------------------


def test_after_an_error_everything_is_closed() -> None:
    phone, box = pair()
    refused(box, b"garbage", ErrorCode.CHANNEL_MALFORMED)
    good = phone.seal(b"valid, but too late")
    assert_closed(box, good)
    # The error code is CLOSED every time, and stays so.
    assert_closed(box, good)


def test_close() -> None:
    phone, box = pair()
    assert not phone.is_closed
    phone.close()
    assert phone.is_closed
    assert_closed(phone, box.seal(b"x"))


def test_send_counter_exhaustion() -> None:
    phone, box = pair()
    phone._send_counter = MAX_COUNTER
    box._receive_counter = MAX_COUNTER
    last = phone.seal(b"last one")
    assert last[:5] == b"\x1a\xff\xff\xff\xff"
    assert box.open(last) == b"last one"
    with pytest.raises(ChannelError) as caught:
        phone.seal(b"one too many")
    assert caught.value.code == ErrorCode.CHANNEL_COUNTER_EXHAUSTED
    assert_closed(phone)
    refused(box, last, ErrorCode.CHANNEL_COUNTER_EXHAUSTED)


def test_construction_misuse() -> None:
    exporter = hkdf_exporter()
    for connection_id in (0, 0x10000, True):
        with pytest.raises(LocalProtocolError):
            SecureChannel(exporter=exporter, role=Role.BOX, connection_id=connection_id)
    with pytest.raises(LocalProtocolError):
        SecureChannel(exporter=exporter, role="box", connection_id=1)  # type: ignore[arg-type]  # misuse
    with pytest.raises(LocalProtocolError):
        SecureChannel(
            exporter=lambda label, context, length: bytes(length + 1), role=Role.BOX, connection_id=1
        )


def test_seal_misuse_changes_nothing() -> None:
    phone, box = pair()
    with pytest.raises(LocalProtocolError):
        phone.seal(bytes(MAX_PLAINTEXT_SIZE + 1))
    with pytest.raises(LocalProtocolError):
        phone.seal("text")  # type: ignore[arg-type]  # misuse
    assert not phone.is_closed
    assert phone.next_send_counter == 0
    assert box.open(phone.seal(bytes(MAX_PLAINTEXT_SIZE))) == bytes(MAX_PLAINTEXT_SIZE)
