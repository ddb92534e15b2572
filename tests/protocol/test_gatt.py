"""GATT profile, advertisement, QR label and info characteristic (docs/protocol.md §3-§4)."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode, LocalProtocolError, MessageError
from protocol.gatt import (
    DEVICE_INFORMATION_SERVICE_UUID,
    INFO_CHARACTERISTIC,
    INFO_CHARACTERISTIC_UUID,
    LEGACY_ADVERTISING_MAX,
    MAX_INFO_SIZE,
    NOTIFY_CHARACTERISTIC,
    NOTIFY_CHARACTERISTIC_UUID,
    POWERBOX_CHARACTERISTICS,
    SERVICE_UUID,
    WRITE_CHARACTERISTIC,
    WRITE_CHARACTERISTIC_UUID,
    Advertisement,
    BoxInfo,
    CharacteristicProperty,
    OutletAvailability,
    QrLabel,
    advertised_name,
    advertising_data,
    bluetooth_uuid,
    box_key_fingerprint,
    parse_advertising_data,
)

box_ids = st.from_regex(r"[A-Z0-9-]{1,16}", fullmatch=True)
outlets = st.integers(1, 99)
fingerprints = st.binary(min_size=16, max_size=16)
QR_ALPHANUMERIC = set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:")


# --- profile ------------------------------------------------------------------------------------


def test_uuids_are_fixed_distinct_and_canonical() -> None:
    ours = [SERVICE_UUID, WRITE_CHARACTERISTIC_UUID, NOTIFY_CHARACTERISTIC_UUID, INFO_CHARACTERISTIC_UUID]
    assert SERVICE_UUID == "148a0001-a210-41fe-bc54-1a86f97ada72"  # changing it strands every phone
    assert len(set(ours)) == 4
    for value in ours:
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 4
    assert DEVICE_INFORMATION_SERVICE_UUID == "0000180a-0000-1000-8000-00805f9b34fb"
    assert bluetooth_uuid(0x2A29) == "00002a29-0000-1000-8000-00805f9b34fb"


def test_characteristic_properties() -> None:
    assert POWERBOX_CHARACTERISTICS == (WRITE_CHARACTERISTIC, NOTIFY_CHARACTERISTIC, INFO_CHARACTERISTIC)
    assert WRITE_CHARACTERISTIC.properties == 0x08 | 0x04
    assert NOTIFY_CHARACTERISTIC.properties == CharacteristicProperty.NOTIFY
    assert INFO_CHARACTERISTIC.properties == CharacteristicProperty.READ
    # Bit values of Core 5.4 Vol 3 Part G §3.3.1.1, which bless and BlueZ use too.
    assert int(CharacteristicProperty.NOTIFY) == 0x10
    assert int(CharacteristicProperty.READ) == 0x02


# --- advertisement ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box_id", "name"),
    [
        ("BOX-0042-A", "PBX0042A"),
        ("site7-outlet-12", "PBTLET12"),
        ("A", "PBA"),
        ("", "PB"),
        ("---", "PB"),
        ("straße-ß1", "PBSTRAE1"),  # non-ASCII letters are dropped, not uppercased into two
    ],
)
def test_advertised_name(box_id: str, name: str) -> None:
    assert advertised_name(box_id) == name


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_advertisement_fits_and_parses_back(box_id: str) -> None:
    data = advertising_data(box_id)
    assert len(data) <= LEGACY_ADVERTISING_MAX
    name = advertised_name(box_id)
    assert len(name) <= 8
    assert name.startswith("PB")
    assert name.isascii()
    parsed = parse_advertising_data(data)
    assert parsed == Advertisement(name=name, service_uuids=(SERVICE_UUID,), flags=0x06)
    assert parsed.is_powerbox


def test_advertisement_layout() -> None:
    data = advertising_data("BOX-0042-A")
    assert len(data) == 31
    assert data[:3] == b"\x02\x01\x06"
    assert data[3:5] == b"\x11\x07"
    assert data[5:21] == uuid.UUID(SERVICE_UUID).bytes[::-1]  # little-endian on air
    assert data[21:] == b"\x09\x09PBX0042A"


def test_parse_other_devices_and_partial_data() -> None:
    data = (
        b"\x02\x01\x1a"
        + b"\x05\x03\x0a\x18\x0f\x18"  # 16-bit UUIDs 0x180A, 0x180F
        + b"\x05\x05\x78\x56\x34\x12"  # a 32-bit UUID
        + b"\x04\x08abc"  # shortened name only
        + b"\x03\xff\x4c\x00"  # manufacturer data: skipped
        + b"\x00\x00\x00"  # zero padding ends the significant part
    )
    parsed = parse_advertising_data(data)
    assert parsed.name == "abc"
    assert parsed.flags == 0x1A
    assert parsed.service_uuids == (
        DEVICE_INFORMATION_SERVICE_UUID,
        bluetooth_uuid(0x180F),
        "12345678-0000-1000-8000-00805f9b34fb",
    )
    assert not parsed.is_powerbox
    # A structure running past the end stops parsing; what came before survives.
    truncated = parse_advertising_data(b"\x04\x09PBX" + b"\x11\x07" + bytes(5))
    assert truncated == Advertisement(name="PBX", service_uuids=(), flags=None)
    # A complete name wins over a shortened one, in either order.
    assert parse_advertising_data(b"\x03\x09AB\x02\x08A").name == "AB"
    assert parse_advertising_data(b"\xff\xfe\x09").name is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=62))
def test_parse_never_raises_on_garbage(data: bytes) -> None:
    parsed = parse_advertising_data(data)
    assert isinstance(parsed, Advertisement)
    for value in parsed.service_uuids:
        assert str(uuid.UUID(value)) == value


def test_parse_rejects_non_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        parse_advertising_data("PB")  # type: ignore[arg-type]  # misuse


# --- fingerprint and QR label -------------------------------------------------------------------


def test_fingerprint_of_a_real_key() -> None:
    public = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    fingerprint = box_key_fingerprint(public)
    assert len(fingerprint) == 16
    assert fingerprint == hashlib.sha256(public).digest()[:16]
    label = QrLabel(box_id="BOX-1", outlet=1, fingerprint=fingerprint)
    assert label.matches_key(public)
    assert not label.matches_key(bytes(32))
    for wrong in (b"", bytes(31), bytes(33)):
        with pytest.raises(LocalProtocolError):
            box_key_fingerprint(wrong)


def test_qr_known_answer() -> None:
    label = QrLabel(box_id="SITE7-0042", outlet=3, fingerprint=b"abcdefghijklmnop")
    assert label.encode() == "PBX1:SITE7-0042:3:MFRGGZDFMZTWQ2LKNNWG23TPOA"
    assert QrLabel.decode("PBX1:SITE7-0042:3:MFRGGZDFMZTWQ2LKNNWG23TPOA") == label


@settings(max_examples=200, deadline=None)
@given(box_id=box_ids, outlet=outlets, fingerprint=fingerprints)
def test_qr_round_trip(box_id: str, outlet: int, fingerprint: bytes) -> None:
    label = QrLabel(box_id=box_id, outlet=outlet, fingerprint=fingerprint)
    text = label.encode()
    assert set(text) <= QR_ALPHANUMERIC
    assert len(text) <= 51
    assert QrLabel.decode(text) == label


GOOD_FP = "MFRGGZDFMZTWQ2LKNNWG23TPOA"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "PBX1",
        f"PBX2:BOX:1:{GOOD_FP}",
        f"pbx1:BOX:1:{GOOD_FP}",
        f"PBX1:box:1:{GOOD_FP}",
        f"PBX1::1:{GOOD_FP}",
        f"PBX1:ABCDEFGHIJKLMNOPQ:1:{GOOD_FP}",  # 17-character box id
        f"PBX1:BOX_1:1:{GOOD_FP}",
        f"PBX1:BOX:0:{GOOD_FP}",
        f"PBX1:BOX:100:{GOOD_FP}",
        f"PBX1:BOX:01:{GOOD_FP}",
        f"PBX1:BOX:+1:{GOOD_FP}",
        f"PBX1:BOX:١:{GOOD_FP}",  # Arabic-Indic digit one: int() would take it
        f"PBX1:BOX:1:{GOOD_FP[:-1]}",
        f"PBX1:BOX:1:{GOOD_FP}A",
        f"PBX1:BOX:1:{GOOD_FP}======",
        f"PBX1:BOX:1:{GOOD_FP.lower()}",
        f"PBX1:BOX:1:{GOOD_FP[:-1]}B",  # spare bits set: another spelling of a key, refused
        f"PBX1:BOX:1:{GOOD_FP[:-1]}1",  # not base32
        f"PBX1:BOX:1:{GOOD_FP}:extra",
        f"PBX1:BOX:1:{GOOD_FP}\n",
        f" PBX1:BOX:1:{GOOD_FP}",
        "PBX1:" + "A" * 10_000,
    ],
)
def test_qr_rejects_malformed(text: str) -> None:
    with pytest.raises(MessageError) as caught:
        QrLabel.decode(text)
    assert caught.value.code == ErrorCode.MESSAGE_MALFORMED


def test_qr_rejects_non_text() -> None:
    with pytest.raises(MessageError):
        QrLabel.decode(b"PBX1")  # type: ignore[arg-type]  # a scanner handing over bytes


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from([*sorted(QR_ALPHANUMERIC), "a", "é"]), max_size=60))
def test_qr_decode_is_total(text: str) -> None:
    try:
        label = QrLabel.decode(text)
    except MessageError:
        return
    assert label.encode() == text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"box_id": "", "outlet": 1, "fingerprint": bytes(16)},
        {"box_id": "lower", "outlet": 1, "fingerprint": bytes(16)},
        {"box_id": "BOX", "outlet": 0, "fingerprint": bytes(16)},
        {"box_id": "BOX", "outlet": True, "fingerprint": bytes(16)},
        {"box_id": "BOX", "outlet": 1, "fingerprint": bytes(15)},
    ],
)
def test_qr_label_validates_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        QrLabel(**kwargs)  # type: ignore[arg-type]  # deliberately wrong values


def test_qr_label_is_frozen_and_slotted() -> None:
    label = QrLabel(box_id="B", outlet=1, fingerprint=bytes(16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        label.outlet = 2  # type: ignore[misc]  # checking the runtime guard
    assert not hasattr(label, "__dict__")


# --- info characteristic ------------------------------------------------------------------------

box_infos = st.builds(
    BoxInfo,
    box_id=box_ids,
    protocol_versions=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=16, unique=True).map(tuple),
    outlets=st.lists(outlets, unique=True, max_size=99).flatmap(
        lambda numbers: st.tuples(
            *(st.builds(OutletAvailability, outlet=st.just(n), available=st.booleans()) for n in numbers)
        )
    ),
)


@settings(max_examples=150, deadline=None)
@given(box_infos)
def test_box_info_round_trip(info: BoxInfo) -> None:
    data = info.encode()
    assert len(data) <= MAX_INFO_SIZE
    assert BoxInfo.decode(data) == info


def test_box_info_layout_and_largest_case() -> None:
    info = BoxInfo(
        box_id="BOX-1",
        protocol_versions=(1,),
        outlets=(OutletAvailability(outlet=1, available=True), OutletAvailability(outlet=2, available=False)),
    )
    assert cbor2.loads(info.encode()) == ["BOX-1", [1], [[1, True], [2, False]]]
    largest = BoxInfo(
        box_id="X" * 16,
        protocol_versions=tuple(range(0xFFFF - 15, 0x10000)),
        outlets=tuple(OutletAvailability(outlet=n, available=True) for n in range(1, 100)),
    )
    assert len(largest.encode()) <= MAX_INFO_SIZE


def test_box_info_ignores_appended_fields() -> None:
    data = cbor2.dumps(["BOX-1", [1, 2], [[3, True]], {"future": 1}])
    assert BoxInfo.decode(data) == BoxInfo(
        box_id="BOX-1", protocol_versions=(1, 2), outlets=(OutletAvailability(outlet=3, available=True),)
    )


@pytest.mark.parametrize(
    "value",
    [
        {"box_id": "BOX"},
        ["BOX", [1]],
        [b"BOX", [1], []],
        ["box", [1], []],
        ["BOX", [], []],
        ["BOX", 1, []],
        ["BOX", [-1], []],
        ["BOX", [0x10000], []],
        ["BOX", [1, 1], []],
        ["BOX", [True], []],
        ["BOX", [1], [[1, 1]]],
        ["BOX", [1], [[0, True]]],
        ["BOX", [1], [[100, True]]],
        ["BOX", [1], [[1, True, 0]]],
        ["BOX", [1], [[1, True], [1, False]]],
        ["BOX", [1], {1: True}],
        ["BOX", [1], [[1.0, True]]],
    ],
)
def test_box_info_rejects_malformed(value: object) -> None:
    with pytest.raises(MessageError) as caught:
        BoxInfo.decode(cbor2.dumps(value))
    assert caught.value.code == ErrorCode.MESSAGE_MALFORMED


@pytest.mark.parametrize("data", [b"", b"\xff", b"\x83", cbor2.dumps(["BOX", [1], []]) + b"\x00", bytes(600)])
def test_box_info_rejects_bad_cbor(data: bytes) -> None:
    with pytest.raises(MessageError):
        BoxInfo.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_box_info_decode_only_raises_message_error(data: bytes) -> None:
    try:
        BoxInfo.decode(data)
    except MessageError as error:
        code = error.code
    else:
        return
    assert code == ErrorCode.MESSAGE_MALFORMED
