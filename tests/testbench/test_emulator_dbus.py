"""The org.bluez emulator at the D-Bus level: objects, signals and BlueZ's errors for bad calls."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from testbench.ble_demo.profile import SERVICE_UUID, DemoCharacteristic
from testbench.bluez import BleNode
from testbench.bluez.dbus_service import DBusInterface, ObjectTree
from testbench.testbed import BleTestbed

pytestmark = pytest.mark.timeout(60)

ADAPTER = "/org/bluez/hci0"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"
CHARACTERISTIC = "org.bluez.GattCharacteristic1"
DESCRIPTOR = "org.bluez.GattDescriptor1"


class BusClient:
    """A bare D-Bus client of the emulator (what bleak and bless do, call by call)."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.signals: list[Message] = []
        self._new_signal = asyncio.Event()
        bus.add_message_handler(self._on_message)

    def _on_message(self, message: Message) -> None:
        if message.message_type == MessageType.SIGNAL:
            self.signals.append(message)
            self._new_signal.set()

    def at(self, path: str, interface: str) -> Remote:
        return Remote(self, path, interface)

    async def wait_signal(self, matches: Callable[[Message], bool], within: float = 10.0) -> Message:
        async with asyncio.timeout(within):
            while True:
                for message in self.signals:
                    if matches(message):
                        self.signals.remove(message)
                        return message
                self._new_signal.clear()
                await self._new_signal.wait()

    async def managed_objects(self) -> dict[str, dict[str, dict[str, Variant]]]:
        (objects,) = await self.at("/", "org.freedesktop.DBus.ObjectManager").ok("GetManagedObjects")
        return dict(objects)


class Remote:
    """One interface of one emulator object."""

    def __init__(self, client: BusClient, path: str, interface: str) -> None:
        self.client = client
        self.path = path
        self.interface = interface

    async def call(self, member: str, signature: str = "", *body: Any) -> Message:
        reply = await self.client.bus.call(
            Message(
                destination="org.bluez",
                path=self.path,
                interface=self.interface,
                member=member,
                signature=signature,
                body=list(body),
            )
        )
        assert reply is not None
        return reply

    async def ok(self, member: str, signature: str = "", *body: Any) -> list[Any]:
        reply = await self.call(member, signature, *body)
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        return list(reply.body)

    async def error(self, member: str, signature: str = "", *body: Any) -> tuple[str, str]:
        """The (error name, message) the call fails with."""
        reply = await self.call(member, signature, *body)
        assert reply.message_type == MessageType.ERROR, reply.body
        assert reply.error_name is not None
        return reply.error_name, str(reply.body[0]) if reply.body else ""

    async def error_name(self, member: str, signature: str = "", *body: Any) -> str:
        return (await self.error(member, signature, *body))[0]


@asynccontextmanager
async def client_of(node: BleNode) -> AsyncIterator[BusClient]:
    bus = await MessageBus(bus_address=node.bus_address, negotiate_unix_fd=True).connect()
    client = BusClient(bus)
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=["type='signal',sender='org.bluez'"],
        )
    )
    try:
        yield client
    finally:
        bus.disconnect()


class Advertisement(DBusInterface):
    """An application's LEAdvertisement1, served with the emulator's own object tree."""

    NAME = "org.bluez.LEAdvertisement1"

    def __init__(self, name: str, manufacturer_data: bytes) -> None:
        super().__init__()
        self._name = name
        self._data = manufacturer_data

    def properties(self) -> dict[str, Variant]:
        return {
            "Type": Variant("s", "peripheral"),
            "LocalName": Variant("s", self._name),
            "ManufacturerData": Variant("a{qv}", {0xFFFF: Variant("ay", self._data)}),
            "ServiceData": Variant("a{sv}", {"180f": Variant("ay", b"\x64")}),
        }


def props_changed(path: str, name: str, value: object) -> Callable[[Message], bool]:
    return lambda m: (
        m.member == "PropertiesChanged"
        and m.path == path
        and name in m.body[1]
        and m.body[1][name].value == value
    )


async def test_adapter_objects_and_introspection(ble_testbed: BleTestbed) -> None:
    node = await ble_testbed.start_node(adapters=2)
    async with client_of(node) as client:
        objects = await client.managed_objects()
        assert set(objects) == {"/org/bluez/hci0", "/org/bluez/hci1"}
        adapter = objects[ADAPTER]
        assert {"org.bluez.Adapter1", "org.bluez.GattManager1", "org.bluez.LEAdvertisingManager1"} <= set(
            adapter
        )
        assert adapter["org.bluez.Adapter1"]["Address"].value == node.adapters[0].address
        assert adapter["org.bluez.Adapter1"]["Powered"].value is True
        assert "central" in adapter["org.bluez.Adapter1"]["Roles"].value

        (root,) = await client.at("/", INTROSPECTABLE).ok("Introspect")
        assert "org.freedesktop.DBus.ObjectManager" in root
        assert '<node name="org"/>' in root
        (hci0,) = await client.at(ADAPTER, INTROSPECTABLE).ok("Introspect")
        assert '<method name="RegisterApplication">' in hci0
        assert 'name="Alias" type="s" access="readwrite"' in hci0

        properties = client.at(ADAPTER, PROPERTIES)
        await properties.ok("Set", "ssv", "org.bluez.Adapter1", "Alias", Variant("s", "bench box"))
        await client.wait_signal(props_changed(ADAPTER, "Alias", "bench box"))

        # A powered-off adapter refuses discovery, as BlueZ does.
        await properties.ok("Set", "ssv", "org.bluez.Adapter1", "Powered", Variant("b", False))
        await client.wait_signal(props_changed(ADAPTER, "Powered", False))
        adapter1 = client.at(ADAPTER, "org.bluez.Adapter1")
        assert await adapter1.error_name("StartDiscovery") == "org.bluez.Error.NotReady"
        await properties.ok("Set", "ssv", "org.bluez.Adapter1", "Powered", Variant("b", True))
        await adapter1.ok("StartDiscovery")
        await client.wait_signal(props_changed(ADAPTER, "Discovering", True))


async def test_bad_calls_get_bluez_errors(ble_testbed: BleTestbed) -> None:
    node = await ble_testbed.start_node()
    async with client_of(node) as client:
        adapter = client.at(ADAPTER, "org.bluez.Adapter1")
        assert await adapter.error("StopDiscovery") == ("org.bluez.Error.Failed", "No discovery started")
        await adapter.ok("StartDiscovery")
        assert await adapter.error_name("StartDiscovery") == "org.bluez.Error.InProgress"
        await adapter.ok("StopDiscovery")
        for bad_filter in (
            {"Colour": Variant("s", "blue")},
            {"RSSI": Variant("n", -200)},
            {"RSSI": Variant("s", "loud")},
            {"UUIDs": Variant("as", ["not-a-uuid"])},
            {"RSSI": Variant("n", -60), "Pathloss": Variant("q", 10)},
        ):
            name = await adapter.error_name("SetDiscoveryFilter", "a{sv}", bad_filter)
            assert name == "org.bluez.Error.InvalidArguments"
        name = await adapter.error_name("RemoveDevice", "o", f"{ADAPTER}/dev_00_11")
        assert name == "org.bluez.Error.DoesNotExist"
        assert (
            await adapter.error_name("StartDiscovery", "s", "now")
            == "org.freedesktop.DBus.Error.UnknownMethod"
        )
        missing = client.at("/org/bluez/hci7", "org.bluez.Adapter1")
        assert await missing.error_name("StartDiscovery") == "org.freedesktop.DBus.Error.UnknownObject"

        properties = client.at(ADAPTER, PROPERTIES)
        name = await properties.error_name("Set", "ssv", "org.bluez.Adapter1", "Address", Variant("s", "x"))
        assert name == "org.freedesktop.DBus.Error.PropertyReadOnly"
        name = await properties.error_name("Set", "ssv", "org.bluez.Adapter1", "Alias", Variant("u", 1))
        assert name == "org.bluez.Error.InvalidArguments"
        name = await properties.error_name("Get", "ss", "org.bluez.Adapter1", "Colour")
        assert name == "org.freedesktop.DBus.Error.InvalidArgs"

        gatt = client.at(ADAPTER, "org.bluez.GattManager1")
        reply = await gatt.error("RegisterApplication", "oa{sv}", "/nowhere", {})
        assert reply == ("org.bluez.Error.Failed", "No object received")
        assert (
            await gatt.error_name("UnregisterApplication", "o", "/nowhere") == "org.bluez.Error.DoesNotExist"
        )
        advertising = client.at(ADAPTER, "org.bluez.LEAdvertisingManager1")
        name = await advertising.error_name("RegisterAdvertisement", "oa{sv}", "/nowhere", {})
        assert name == "org.bluez.Error.Failed"
        name = await advertising.error_name("UnregisterAdvertisement", "o", "/nowhere")
        assert name == "org.bluez.Error.DoesNotExist"
        # After all that, the emulator still serves.
        assert ADAPTER in await client.managed_objects()


async def test_remote_gatt_objects_sockets_and_errors(ble_testbed: BleTestbed) -> None:
    """What bleak relies on, down to AcquireWrite/AcquireNotify and the errors of misuse."""
    box_node = await ble_testbed.start_node(name="box")
    phone_node = await ble_testbed.start_node(name="phone")
    box = await ble_testbed.start_demo_box(box_node, "BOXD")
    device_path = f"{ADAPTER}/dev_{box_node.adapters[0].address.replace(':', '_')}"
    async with client_of(phone_node) as client:
        adapter = client.at(ADAPTER, "org.bluez.Adapter1")
        scan_filter = {"UUIDs": Variant("as", [SERVICE_UUID]), "Transport": Variant("s", "le")}
        await adapter.ok("SetDiscoveryFilter", "a{sv}", scan_filter)
        await adapter.ok("StartDiscovery")
        added = await client.wait_signal(lambda m: m.member == "InterfacesAdded" and m.body[0] == device_path)
        found = added.body[1]["org.bluez.Device1"]
        assert found["Name"].value == "BOXD"  # from the scan response, as BlueZ advertises LocalName
        assert SERVICE_UUID in found["UUIDs"].value
        await adapter.ok("StopDiscovery")

        device = client.at(device_path, "org.bluez.Device1")
        assert await device.ok("Disconnect") == []  # an idle device: nothing to do
        await device.ok("Connect")
        await client.wait_signal(props_changed(device_path, "ServicesResolved", True))
        assert await device.error_name("Pair") == "org.bluez.Error.NotSupported"

        objects = await client.managed_objects()
        paths = {
            props[CHARACTERISTIC]["UUID"].value: path
            for path, props in objects.items()
            if CHARACTERISTIC in props
        }
        echo_path = paths[DemoCharacteristic.ECHO.value]
        strict_path = paths[DemoCharacteristic.STRICT.value]
        tx_path = paths[DemoCharacteristic.TX.value]
        echo_props = objects[echo_path][CHARACTERISTIC]
        assert echo_props["MTU"].value == 247
        assert echo_props["Flags"].value == ["write-without-response", "write"]
        assert echo_props["WriteAcquired"].value is False
        assert "WriteAcquired" not in objects[strict_path][CHARACTERISTIC]
        echo = client.at(echo_path, CHARACTERISTIC)
        strict = client.at(strict_path, CHARACTERISTIC)
        tx = client.at(tx_path, CHARACTERISTIC)

        # AcquireNotify: notifications arrive on a socket; AcquireWrite: each message is a write command.
        notify_reply = await tx.call("AcquireNotify", "a{sv}", {})
        assert notify_reply.body[1] == 247
        notify_socket = socket.socket(fileno=notify_reply.unix_fds[0])
        notify_socket.setblocking(False)
        assert (await tx.error("StartNotify"))[1] == "Notify acquired"
        write_reply = await echo.call("AcquireWrite", "a{sv}", {})
        assert write_reply.body[1] == 247
        write_fd = write_reply.unix_fds[0]
        assert (await echo.error("WriteValue", "aya{sv}", b"x", {}))[1] == "Write acquired"
        os.write(write_fd, b"through the socket")
        echoed = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(notify_socket, 512), 5)
        assert echoed == b"through the socket"
        os.close(write_fd)
        await client.wait_signal(props_changed(echo_path, "WriteAcquired", False))
        notify_socket.close()
        await client.wait_signal(props_changed(tx_path, "NotifyAcquired", False))

        # StartNotify sessions and their errors.
        assert (await tx.error("StopNotify"))[1] == "No notify session started"
        assert await echo.error_name("StartNotify") == "org.bluez.Error.NotSupported"
        await tx.ok("StartNotify")
        await client.wait_signal(props_changed(tx_path, "Notifying", True))
        await tx.ok("StartNotify")  # a second call from the same client is fine
        await box.notify(b"as a signal")
        await client.wait_signal(props_changed(tx_path, "Value", b"as a signal"))

        # Writes: option types, write types and ATT errors as BlueZ reports them.
        name = await echo.error_name("WriteValue", "aya{sv}", b"x", {"offset": Variant("s", "0")})
        assert name == "org.bluez.Error.InvalidArguments"
        name = await echo.error_name("WriteValue", "aya{sv}", b"x", {"type": Variant("s", "shout")})
        assert name == "org.bluez.Error.NotSupported"
        # Like BlueZ, an explicit "command" is sent whatever the flags say (the server accepts it).
        await strict.ok("WriteValue", "aya{sv}", b"x", {"type": Variant("s", "command")})
        reply = await strict.error("WriteValue", "aya{sv}", b"fail", {})
        assert reply == ("org.bluez.Error.Failed", "Operation failed with ATT error: 0x0e")
        await strict.ok("WriteValue", "aya{sv}", b"fine", {"type": Variant("s", "request")})
        ccc_path = next(
            path
            for path, props in objects.items()
            if path.startswith(tx_path + "/desc") and props[DESCRIPTOR]["UUID"].value.startswith("00002902")
        )
        ccc = client.at(ccc_path, DESCRIPTOR)
        reply = await ccc.error("WriteValue", "aya{sv}", b"\x01\x00", {})
        assert reply == ("org.bluez.Error.NotPermitted", "Write not permitted")
        assert await ccc.ok("ReadValue", "a{sv}", {}) == [b"\x01\x00"]

        # A remote disconnect: Connected goes false and the GATT objects go away.
        await device.ok("Disconnect")
        await client.wait_signal(props_changed(device_path, "Connected", False))
        assert not [path for path in await client.managed_objects() if path.startswith(device_path + "/")]
        assert await tx.error_name("ReadValue", "a{sv}", {}) == "org.freedesktop.DBus.Error.UnknownObject"

        # RemoveDevice forgets the device; a second time it no longer exists.
        await adapter.ok("RemoveDevice", "o", device_path)
        await client.wait_signal(lambda m: m.member == "InterfacesRemoved" and m.body[0] == device_path)
        assert await adapter.error_name("RemoveDevice", "o", device_path) == "org.bluez.Error.DoesNotExist"


async def test_advertisement_registration(ble_testbed: BleTestbed) -> None:
    """RegisterAdvertisement reads LEAdvertisement1 from the caller and refuses what BlueZ refuses."""
    advertiser_node = await ble_testbed.start_node(name="advertiser")
    scanner_node = await ble_testbed.start_node(name="scanner")
    async with client_of(advertiser_node) as advertiser, client_of(scanner_node) as scanner:
        applications = ObjectTree(advertiser.bus)  # the advertiser serves LEAdvertisement1 objects
        applications.export("/ads/good", [Advertisement("ADV1", b"\x01\x02")])
        applications.export("/ads/too_long", [Advertisement("ADV2", b"\x00" * 30)])
        manager = advertiser.at(ADAPTER, "org.bluez.LEAdvertisingManager1")
        properties = advertiser.at(ADAPTER, PROPERTIES)
        await manager.ok("RegisterAdvertisement", "oa{sv}", "/ads/good", {})
        name = await manager.error_name("RegisterAdvertisement", "oa{sv}", "/ads/good", {})
        assert name == "org.bluez.Error.AlreadyExists"
        reply = await manager.error("RegisterAdvertisement", "oa{sv}", "/ads/too_long", {})
        assert reply == ("org.bluez.Error.Failed", "Failed to register advertisement")
        (active,) = await properties.ok("Get", "ss", "org.bluez.LEAdvertisingManager1", "ActiveInstances")
        assert active.value == 1

        await scanner.at(ADAPTER, "org.bluez.Adapter1").ok("StartDiscovery")
        added = await scanner.wait_signal(lambda m: m.member == "InterfacesAdded" and "dev_" in m.body[0])
        device = added.body[1]["org.bluez.Device1"]
        assert device["Name"].value == "ADV1"
        assert device["ManufacturerData"].value[0xFFFF].value == b"\x01\x02"
        assert device["ServiceData"].value["0000180f-0000-1000-8000-00805f9b34fb"].value == b"\x64"

        await manager.ok("UnregisterAdvertisement", "o", "/ads/good")
        (active,) = await properties.ok("Get", "ss", "org.bluez.LEAdvertisingManager1", "ActiveInstances")
        assert active.value == 0
