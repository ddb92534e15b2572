"""Pieces of the emulator that need no radio: advertising data, UUIDs, errors, filters, settings."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from dbus_fast import Variant
from hypothesis import given
from hypothesis import strategies as st

from testbench.bluez import errors, uuids
from testbench.bluez.adapter import DiscoveryFilter
from testbench.bluez.advertising_data import (
    AdvertisementError,
    AdvertisementSpec,
    AdvertisementType,
    build_payload,
    parse_advertising_data,
    spec_from_properties,
)
from testbench.bluez.dbus_service import ObjectTree
from testbench.bluez.emulator import EmulatorSettings

NUS = "6e400001-b5a3-f393-e0a9-e50e24dcca9e"


def test_uuids_are_spelled_as_bluez_does() -> None:
    assert uuids.normalize("180F") == "0000180f-0000-1000-8000-00805f9b34fb"
    assert uuids.normalize("0x180f") == "0000180f-0000-1000-8000-00805f9b34fb"
    assert uuids.normalize(NUS.upper()) == NUS
    assert uuids.from_le_bytes(uuids.to_le_bytes(NUS)) == NUS
    assert uuids.to_le_bytes("2902") == b"\x02\x29"
    with pytest.raises(ValueError, match="not a UUID"):
        uuids.normalize("18")


def test_advertisement_puts_the_name_in_the_scan_response() -> None:
    spec = AdvertisementSpec(
        type=AdvertisementType.PERIPHERAL,
        service_uuids=(NUS,),
        manufacturer_data={0x0059: b"\x01"},
        local_name="A box with a long name",
    )
    payload = build_payload(spec, adapter_discoverable=False, fallback_name=None)
    assert payload.connectable
    assert len(payload.advertising_data) <= 31
    assert len(payload.scan_response_data) <= 31
    fields = parse_advertising_data(payload.advertising_data + payload.scan_response_data)
    assert fields.name == "A box with a long name"
    assert fields.service_uuids == (NUS,)
    assert fields.manufacturer_data == {0x0059: b"\x01"}
    assert fields.flags == 0x04  # BR/EDR not supported; not discoverable


def test_advertisement_that_does_not_fit_is_refused() -> None:
    spec = AdvertisementSpec(service_uuids=(NUS,), manufacturer_data={1: bytes(20)})
    with pytest.raises(AdvertisementError, match="31"):
        build_payload(spec, adapter_discoverable=False, fallback_name=None)


def test_advertisement_properties_are_type_checked() -> None:
    spec = spec_from_properties(
        {
            "Type": Variant("s", "peripheral"),
            "ServiceUUIDs": Variant("as", ["180d"]),
            "ServiceData": Variant("a{sv}", {"180d": Variant("ay", b"\x05")}),
            "Includes": Variant("as", ["tx-power"]),
        }
    )
    assert spec.service_uuids == ("0000180d-0000-1000-8000-00805f9b34fb",)
    assert spec.include_tx_power
    for bad in (
        {"Type": Variant("s", "loud")},
        {"ServiceUUIDs": Variant("s", "180d")},
        {"ManufacturerData": Variant("a{qv}", {1: Variant("s", "text")})},
        {"Includes": Variant("as", ["everything"])},
    ):
        with pytest.raises(AdvertisementError):
            spec_from_properties(bad)


@given(st.binary(max_size=62))
def test_parsing_any_bytes_never_raises(data: bytes) -> None:
    parse_advertising_data(data)


def test_att_errors_map_both_ways_like_bluez() -> None:
    assert errors.gatt_error(0x0E).text == "Operation failed with ATT error: 0x0e"
    assert errors.gatt_error(0x03).name == "org.bluez.Error.NotPermitted"
    assert errors.gatt_error(0x0D).text == "Invalid Length"
    assert errors.gatt_error(0).text == "Operation failed"
    to_att = errors.att_code_for_application_error
    assert to_att("org.bluez.Error.Failed", "0x85", 0x03) == 0x85
    assert to_att("org.bluez.Error.Failed", "no code", 0x03) == 0x80
    assert to_att("org.bluez.Error.Failed", "0x20", 0x03) == 0x0E
    assert to_att("org.bluez.Error.NotPermitted", "", 0x02) == 0x02
    assert to_att("org.bluez.Error.InvalidValueLength", "", 0x03) == 0x0D
    assert to_att("org.freedesktop.DBus.Error.Failed", "boom", 0x03) == 0x0E


def test_discovery_filter_parsing_and_matching() -> None:
    assert DiscoveryFilter.parse({}) is None
    parsed = DiscoveryFilter.parse(
        {"UUIDs": Variant("as", [NUS]), "RSSI": Variant("n", -70), "Transport": Variant("s", "le")}
    )
    assert parsed is not None
    fields = parse_advertising_data(
        build_payload(
            AdvertisementSpec(type=AdvertisementType.PERIPHERAL, service_uuids=(NUS,), local_name="BOX"),
            adapter_discoverable=False,
            fallback_name=None,
        ).advertising_data
    )
    assert parsed.matches("C0:00:00:00:00:01", fields, rssi=-50)
    assert not parsed.matches("C0:00:00:00:00:01", fields, rssi=-90)
    with pytest.raises(errors.BluezError, match="InvalidArguments"):
        DiscoveryFilter.parse({"Transport": Variant("s", "carrier pigeon")})


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="att_mtu"):
        EmulatorSettings(att_mtu=20)
    with pytest.raises(ValueError, match="advertising_interval"):
        EmulatorSettings(advertising_interval_ms=5)


def test_introspection_is_well_formed_xml() -> None:
    class _Bus:
        connected = False

        def add_message_handler(self, handler: object) -> None:
            pass

    tree = ObjectTree(_Bus())  # type: ignore[arg-type]
    root = ET.fromstring(tree.introspect("/").split("\n", 2)[2])
    names = {interface.get("name") for interface in root.iter("interface")}
    assert "org.freedesktop.DBus.ObjectManager" in names
