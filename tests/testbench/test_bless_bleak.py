"""Unmodified bless (box) and unmodified bleak (phone) over the org.bluez emulator and the radio."""

from __future__ import annotations

import asyncio
import time

import pytest

from testbench.ble_demo.control import PhoneCommandError
from testbench.ble_demo.profile import SERVICE_UUID
from testbench.testbed import BleTestbed

pytestmark = pytest.mark.timeout(120)


async def test_scan_connect_exchange_disconnect_reconnect(ble_testbed: BleTestbed) -> None:
    box_node = await ble_testbed.start_node(name="box")
    phone_node = await ble_testbed.start_node(name="phone")
    box = await ble_testbed.start_demo_box(box_node, "BOX1")
    assert box.ready["advertising"] is True
    phone = await ble_testbed.start_demo_phone(phone_node)

    found = await phone.scan("BOX1", service=SERVICE_UUID)
    assert found.address == box_node.adapters[0].address
    connected = await phone.connect()
    assert connected.mtu == 247
    assert connected.max_write_without_response_size == 244
    assert SERVICE_UUID in connected.services
    central = await box.process.wait_event("central_connected", within=10)
    assert central["address"] == phone_node.adapters[0].address

    assert await phone.read("tx") == b"hello"
    assert await phone.read("info") == b"BOX1;writes=0"
    await phone.subscribe()
    assert await phone.exchange(b"with response", response=True)
    write = await box.next_write(characteristic="echo")
    assert write["mtu"] == 247  # the box side sees the negotiated MTU too
    assert write["device"] == f"/org/bluez/hci0/dev_{phone_node.adapters[0].address.replace(':', '_')}"
    assert await phone.exchange(b"without response", response=False)
    await box.notify(b"pushed by the box")
    assert await phone.next_notification() == b"pushed by the box"

    await phone.disconnect()
    await box.process.wait_event("central_disconnected", within=10, address=phone_node.adapters[0].address)
    assert (await box.status())["advertising"] is True

    await phone.scan("BOX1")
    assert (await phone.connect()).mtu == 247
    await phone.subscribe()
    assert await phone.exchange(b"after reconnect")
    assert await phone.read("info") == b"BOX1;writes=3"


async def test_four_phones_on_one_box_at_once(ble_testbed: BleTestbed) -> None:
    box_node = await ble_testbed.start_node(name="box")
    phones_node = await ble_testbed.start_node(adapters=4, name="phones")
    box = await ble_testbed.start_demo_box(box_node, "BOX4")
    phones = await asyncio.gather(
        *(ble_testbed.start_demo_phone(phones_node, adapter=adapter.name) for adapter in phones_node.adapters)
    )

    async def join(phone_index: int) -> list[float]:
        phone = phones[phone_index]
        await phone.scan("BOX4")
        assert (await phone.connect()).mtu == 247
        await phone.subscribe()
        # Every phone hears every echo (bless notifies all subscribers), so messages differ.
        round_trips = []
        for sequence in range(5):
            message = f"phone{phone_index}:{sequence}:".encode() + bytes(range(40))
            round_trips += await phone.exchange(message)
        return round_trips

    results = await asyncio.gather(*(join(index) for index in range(4)))
    assert all(len(round_trips) == 5 for round_trips in results)
    status = await box.status()
    assert status["advertising"] is True  # the box keeps advertising with four phones connected
    assert len(status["centrals"]) == 4
    assert status["writes"] == 20


async def test_box_killed_phones_notice_and_reconnect_after_restart(ble_testbed: BleTestbed) -> None:
    box_node = await ble_testbed.start_node(name="box")
    phones_node = await ble_testbed.start_node(adapters=2, name="phones")
    box = await ble_testbed.start_demo_box(box_node, "BOXK")
    phones = [await ble_testbed.start_demo_phone(phones_node, adapter=a.name) for a in phones_node.adapters]
    for phone in phones:
        await phone.scan("BOXK")
        await phone.connect()
        await phone.subscribe()

    killed_at = time.monotonic()
    box.process.kill()  # the box loses power: bless and its BLE stack die together
    await ble_testbed.kill_node(box_node)
    disconnected_at = await asyncio.gather(*(phone.wait_disconnected(within=10) for phone in phones))
    assert all(moment - killed_at < 2.0 for moment in disconnected_at), [
        t - killed_at for t in disconnected_at
    ]

    box_node = await ble_testbed.restart_node(box_node, name="box")
    box = await ble_testbed.start_demo_box(box_node, "BOXK")
    for index, phone in enumerate(phones):
        assert not await phone.is_connected()
        await phone.scan("BOXK")
        await phone.connect()
        await phone.subscribe()
        assert await phone.exchange(f"back {index}".encode())


async def test_phone_killed_box_sees_it(ble_testbed: BleTestbed) -> None:
    box_node = await ble_testbed.start_node(name="box")
    phone_node = await ble_testbed.start_node(name="phone")
    box = await ble_testbed.start_demo_box(box_node, "BOXP")
    phone = await ble_testbed.start_demo_phone(phone_node)
    await phone.scan("BOXP")
    await phone.connect()
    await phone.subscribe()
    await box.process.wait_event("central_connected", within=10)
    assert (await box.status())["subscribed"] is True

    killed_at = time.monotonic()
    phone.process.kill()
    await ble_testbed.kill_node(phone_node)
    gone = await box.process.wait_event("central_disconnected", within=10)
    assert gone["t"] - killed_at < 2.0
    assert gone["address"] == phone_node.adapters[0].address
    status = await box.status()
    assert status["subscribed"] is False  # BlueZ called StopNotify when the last subscriber left
    assert status["centrals"] == []
    assert status["advertising"] is True


async def test_writes_longer_than_the_mtu_behave_as_with_bluez(ble_testbed: BleTestbed) -> None:
    box_node = await ble_testbed.start_node(name="box")
    phone_node = await ble_testbed.start_node(name="phone")
    box = await ble_testbed.start_demo_box(box_node, "BOXL")
    phone = await ble_testbed.start_demo_phone(phone_node)
    await phone.scan("BOXL")
    await phone.connect()
    await phone.subscribe()

    # A write request longer than MTU-3 becomes a long write; the application gets it in one piece.
    message = bytes(range(256)) + bytes(range(244))
    assert await phone.exchange(message, response=True)
    assert (await box.next_write(characteristic="echo"))["length"] == 500

    # A write command must fit one PDU: MTU-3 goes through, one byte more fails at the phone.
    assert await phone.exchange(b"c" * 244, response=False)
    with pytest.raises(PhoneCommandError) as too_long:
        await phone.write("echo", b"c" * 245, response=False)
    assert too_long.value.failure.dbus_error == "org.bluez.Error.Failed"

    # 512 bytes is the longest attribute value (Core Vol 3, Part F §3.2.9).
    with pytest.raises(PhoneCommandError) as over_limit:
        await phone.write("echo", b"x" * 600, response=True)
    assert over_limit.value.failure.att_code == 0x0D  # invalid attribute value length
    assert await phone.exchange(b"still serving")


async def test_application_exception_becomes_an_att_error(ble_testbed: BleTestbed) -> None:
    box_node = await ble_testbed.start_node(name="box")
    phone_node = await ble_testbed.start_node(name="phone")
    box = await ble_testbed.start_demo_box(box_node, "BOXE")
    phone = await ble_testbed.start_demo_phone(phone_node)
    await phone.scan("BOXE")
    await phone.connect()
    await phone.subscribe()

    with pytest.raises(PhoneCommandError) as rejected:
        await phone.write("strict", b"fail: please", response=True)
    assert rejected.value.failure.type == "BleakGATTProtocolError"
    assert rejected.value.failure.att_code == 0x0E  # unlikely error: BlueZ's answer to a failed app call
    assert await phone.exchange(b"the box keeps serving", characteristic="strict")

    # As with BlueZ: a characteristic with write-without-response acknowledges writes before the
    # application runs, so the same exception never reaches the phone there.
    await phone.write("echo", b"fail: unnoticed", response=True)
    assert await phone.exchange(b"and keeps echoing")
    assert (await box.status())["writes"] == 4


async def test_box_and_phone_on_one_bus(ble_testbed: BleTestbed) -> None:
    node = await ble_testbed.start_node(adapters=2, name="shared")
    await ble_testbed.start_demo_box(node, "BOXS", adapter="hci0")
    phone = await ble_testbed.start_demo_phone(node, adapter="hci1")
    assert (await phone.scan("BOXS")).address == node.adapters[0].address
    assert (await phone.connect()).mtu == 247
    await phone.subscribe()
    assert await phone.exchange(b"same bus, two adapters")
