"""The virtual radio, driven by bumble host stacks in this process (no D-Bus involved)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from bumble import core, hci
from bumble.core import AdvertisingData
from bumble.device import Advertisement, Connection, Device
from bumble.host import Host

from testbench.bluez.host import ControllerLink
from testbench.radio import ControllerEndpoint, VirtualRadio

pytestmark = pytest.mark.timeout(60)

BOX_ADDRESS = "C0:00:00:00:00:01"
ADVERTISEMENT = bytes(AdvertisingData([(AdvertisingData.FLAGS, bytes([0x06]))]))
SCAN_RESPONSE = bytes(AdvertisingData([(AdvertisingData.COMPLETE_LOCAL_NAME, b"BOX")]))


@asynccontextmanager
async def host_on(endpoint: ControllerEndpoint, address: str) -> AsyncIterator[tuple[Device, ControllerLink]]:
    link = await ControllerLink.open(endpoint)
    device = Device(name=address, address=hci.Address(address), host=Host(link.source, link.sink))
    await device.power_on()
    try:
        yield device, link
    finally:
        link.close()


async def advertise(device: Device) -> None:
    await device.start_advertising(
        advertising_data=ADVERTISEMENT,
        scan_response_data=SCAN_RESPONSE,
        advertising_interval_min=20,
        advertising_interval_max=20,
    )


def disconnection_of(connection: Connection) -> asyncio.Future[int]:
    reason: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_disconnection(code: int) -> None:
        if not reason.done():
            reason.set_result(code)

    connection.on("disconnection", on_disconnection)
    return reason


async def test_only_one_of_racing_centrals_gets_the_advertiser() -> None:
    async with VirtualRadio(controllers=4) as radio:
        endpoints = radio.endpoints
        async with (
            host_on(endpoints[0], BOX_ADDRESS) as (box, _),
            host_on(endpoints[1], "C0:00:00:00:01:01") as (phone1, _),
            host_on(endpoints[2], "C0:00:00:00:01:02") as (phone2, _),
            host_on(endpoints[3], "C0:00:00:00:01:03") as (phone3, _),
        ):
            await advertise(box)

            async def try_connect(phone: Device) -> Connection | None:
                try:
                    return await phone.connect_le(hci.Address(BOX_ADDRESS), timeout=1.0)
                except Exception:
                    return None

            results = await asyncio.gather(*(try_connect(p) for p in (phone1, phone2, phone3)))
            winners = [connection for connection in results if connection is not None]
            assert len(winners) == 1  # the others never heard the box again: it stopped advertising
            assert len(radio.controllers[0].le_connections) == 1
            assert sum(len(c.le_connections) for c in radio.controllers[1:]) == 1  # no phantom links
            # The winner's link carries ATT: the MTU exchange completes.
            assert await winners[0].gatt_client.request_mtu(247) == 247


async def test_dead_host_is_torn_down_and_peers_see_link_loss() -> None:
    async with VirtualRadio(controllers=3) as radio:
        endpoints = radio.endpoints
        async with (
            host_on(endpoints[0], BOX_ADDRESS) as (box, box_link),
            host_on(endpoints[1], "C0:00:00:00:01:01") as (phone, _),
            host_on(endpoints[2], "C0:00:00:00:01:02") as (scanner, scanner_link),
        ):
            await advertise(box)
            await scanner.start_scanning(legacy=True)
            connection = await phone.connect_le(hci.Address(BOX_ADDRESS), timeout=5.0)
            await advertise(box)  # advertising again, as a box with room for more phones does
            lost = disconnection_of(connection)

            box_link.close()  # the box's host process disappears
            assert await asyncio.wait_for(lost, 2.0) == hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR
            box_controller = radio.controllers[0]
            assert not box_controller.le_legacy_advertiser.enabled
            assert not box_controller.le_connections

            scanner_link.close()
            await asyncio.wait_for(scanner_link.lost, 2.0)
            await asyncio.wait_for(radio.wait_host_gone(2), 2.0)  # the radio reads the EOF
            assert not radio.controllers[2].le_scan_enable


async def test_a_new_host_gets_a_clean_controller() -> None:
    async with VirtualRadio(controllers=2) as radio:
        endpoints = radio.endpoints
        async with host_on(endpoints[1], "C0:00:00:00:01:01") as (phone, _):
            async with host_on(endpoints[0], BOX_ADDRESS) as (box, _):
                await advertise(box)
                first = await phone.connect_le(hci.Address(BOX_ADDRESS), timeout=5.0)
                lost = disconnection_of(first)
            await asyncio.wait_for(lost, 2.0)
            async with host_on(endpoints[0], BOX_ADDRESS) as (box, _):
                await advertise(box)
                second = await phone.connect_le(hci.Address(BOX_ADDRESS), timeout=5.0)
                assert await second.gatt_client.request_mtu(247) == 247


async def test_active_scanners_get_the_scan_response() -> None:
    async with VirtualRadio(controllers=3) as radio:
        endpoints = radio.endpoints
        async with (
            host_on(endpoints[0], BOX_ADDRESS) as (box, _),
            host_on(endpoints[1], "C0:00:00:00:01:01") as (active, _),
            host_on(endpoints[2], "C0:00:00:00:01:02") as (passive, _),
        ):
            await advertise(box)
            heard: dict[str, asyncio.Future[Advertisement]] = {}
            for name, scanner, is_active in (("active", active, True), ("passive", passive, False)):
                future: asyncio.Future[Advertisement] = asyncio.get_running_loop().create_future()
                scanner.on("advertisement", lambda a, f=future: None if f.done() else f.set_result(a))
                heard[name] = future
                await scanner.start_scanning(legacy=True, active=is_active)
            active_advertisement = await asyncio.wait_for(heard["active"], 2.0)
            passive_advertisement = await asyncio.wait_for(heard["passive"], 2.0)
            assert b"BOX" in bytes(active_advertisement.data)
            assert b"BOX" not in bytes(passive_advertisement.data)


async def test_cancelled_connection_attempt_completes() -> None:
    async with (
        VirtualRadio(controllers=1) as radio,
        host_on(radio.endpoints[0], "C0:00:00:00:01:01") as (phone, _),
    ):
        with pytest.raises(core.TimeoutError):
            await phone.connect_le(hci.Address(BOX_ADDRESS), timeout=0.2)
        assert radio.controllers[0].pending_le_connection is None
        assert not phone.is_le_connecting


async def test_link_loss_delay_models_the_supervision_timeout() -> None:
    async with VirtualRadio(controllers=2, link_loss_delay=0.3) as radio:
        endpoints = radio.endpoints
        async with (
            host_on(endpoints[1], "C0:00:00:00:01:01") as (phone, _),
            host_on(endpoints[0], BOX_ADDRESS) as (box, box_link),
        ):
            await advertise(box)
            connection = await phone.connect_le(hci.Address(BOX_ADDRESS), timeout=5.0)
            lost = disconnection_of(connection)
            started = asyncio.get_running_loop().time()
            box_link.close()
            await asyncio.wait_for(lost, 2.0)
            assert asyncio.get_running_loop().time() - started >= 0.3


def test_endpoint_parsing() -> None:
    assert ControllerEndpoint.parse("127.0.0.1:7000") == ControllerEndpoint(host="127.0.0.1", port=7000)
    assert ControllerEndpoint.parse("7001").port == 7001
    for bad in ("host:", "host:notaport", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match=r"endpoint|range"):
            ControllerEndpoint.parse(bad)
