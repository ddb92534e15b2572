"""Remote devices (``org.bluez.Device1``): seen in advertisements, connected to, or connected from.

Follows BlueZ src/device.c: ``Connect`` answers once the link is up and the services are then
browsed (``ServicesResolved`` turns true after the GATT objects are exported); ``Disconnect``
cancels a pending connection, succeeds on an idle device and otherwise answers when the link is
down; a lost link clears ``ServicesResolved`` and ``Connected`` and removes the GATT objects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from bumble import core, hci
from bumble.device import Connection
from dbus_fast import Variant

from testbench.bluez import errors
from testbench.bluez.advertising_data import AdvertisedFields
from testbench.bluez.dbus_service import EMPTY_RESULT, DBusInterface, Method, MethodCall, MethodResult
from testbench.bluez.remote_gatt import RemoteGattDatabase

if TYPE_CHECKING:
    from testbench.bluez.adapter import Adapter

logger = logging.getLogger(__name__)

DEVICE_INTERFACE = "org.bluez.Device1"

# BlueZ's error texts for a Connect that did not happen (src/error.h).
CONNECT_CANCELED = "br-connection-canceled"
CONNECT_ABORTED = "le-connection-abort-by-local"


def address_text(address: hci.Address) -> str:
    return address.to_string(with_type_qualifier=False)


class _ConnectCanceledError(Exception):
    """Disconnect was called while Connect was still waiting."""


class RemoteDevice:
    """One remote device as one adapter knows it."""

    def __init__(self, adapter: Adapter, address: hci.Address) -> None:
        self.adapter = adapter
        self.address = address
        self.address_text = address_text(address)
        self.path = f"{adapter.path}/dev_{self.address_text.replace(':', '_')}"
        self.interface = Device1Interface(self)
        self.name: str | None = None
        self.alias: str | None = None
        self.service_uuids: list[str] = []
        self.manufacturer_data: dict[int, bytes] = {}
        self.service_data: dict[str, bytes] = {}
        self.advertising_flags: bytes | None = None
        self.tx_power: int | None = None
        self.appearance: int | None = None
        self.rssi: int | None = None
        self.trusted = False
        self.blocked = False
        # Devices only ever seen in advertisements are dropped a while after discovery ends.
        self.temporary = True
        self.seen_in_this_discovery = False
        self.connection: Connection | None = None
        self.role: hci.Role | None = None
        self.services_resolved = False
        self.gatt: RemoteGattDatabase | None = None
        self.disconnecting = False
        self._connect_task: asyncio.Task[Connection] | None = None
        self._connect_canceled = False
        self._disconnect_waiters: list[asyncio.Future[None]] = []
        self._removal_timer: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None

    # ------------------------------------------------------------------ advertisements

    def on_advertisement(self, fields: AdvertisedFields, rssi: int) -> None:
        changed: dict[str, Variant] = {}
        if fields.name is not None and fields.name != self.name:
            self.name = fields.name
            changed["Name"] = Variant("s", self.name)
            if self.alias is None:
                changed["Alias"] = Variant("s", self.display_alias())
        new_uuids = [u for u in fields.service_uuids if u not in self.service_uuids]
        if new_uuids:
            self.service_uuids.extend(new_uuids)
            changed["UUIDs"] = Variant("as", list(self.service_uuids))
        merged_manufacturer = {**self.manufacturer_data, **fields.manufacturer_data}
        if merged_manufacturer != self.manufacturer_data:
            self.manufacturer_data = merged_manufacturer
            changed["ManufacturerData"] = self._manufacturer_variant()
        merged_service_data = {**self.service_data, **fields.service_data}
        if merged_service_data != self.service_data:
            self.service_data = merged_service_data
            changed["ServiceData"] = self._service_data_variant()
        if fields.flags is not None and bytes([fields.flags]) != self.advertising_flags:
            self.advertising_flags = bytes([fields.flags])
            changed["AdvertisingFlags"] = Variant("ay", self.advertising_flags)
        if fields.tx_power is not None and fields.tx_power != self.tx_power:
            self.tx_power = fields.tx_power
            changed["TxPower"] = Variant("n", self.tx_power)
        if fields.appearance is not None and fields.appearance != self.appearance:
            self.appearance = fields.appearance
            changed["Appearance"] = Variant("q", self.appearance)
        # Every new discovery session hears each device at least once, so a fresh scanner
        # gets a callback even when nothing about the device changed.
        if rssi != self.rssi or not self.seen_in_this_discovery:
            self.rssi = rssi
            changed["RSSI"] = Variant("n", rssi)
        self.seen_in_this_discovery = True
        self.cancel_removal()
        self.interface.emit_properties_changed(changed)

    def forget_rssi(self) -> None:
        """Discovery stopped: the RSSI is stale (BlueZ invalidates it)."""
        self.seen_in_this_discovery = False
        if self.rssi is not None:
            self.rssi = None
            self.interface.emit_properties_changed({}, ["RSSI"])

    def display_alias(self) -> str:
        return self.alias or self.name or self.address_text.replace(":", "-")

    def _manufacturer_variant(self) -> Variant:
        return Variant("a{qv}", {k: Variant("ay", v) for k, v in self.manufacturer_data.items()})

    def _service_data_variant(self) -> Variant:
        return Variant("a{sv}", {k: Variant("ay", v) for k, v in self.service_data.items()})

    # ------------------------------------------------------------------ temporary devices

    def schedule_removal(self) -> None:
        if not self.temporary or self.connected or self._removal_timer is not None:
            return
        self._removal_timer = asyncio.get_running_loop().call_later(
            self.adapter.settings.temporary_device_timeout_s, self._remove_if_idle
        )

    def cancel_removal(self) -> None:
        if self._removal_timer is not None:
            self._removal_timer.cancel()
            self._removal_timer = None

    def _remove_if_idle(self) -> None:
        self._removal_timer = None
        if self.temporary and not self.connected and self._connect_task is None:
            self.adapter.remove_device(self)

    # ------------------------------------------------------------------ connecting (central role)

    async def connect(self) -> None:
        if not self.adapter.powered:
            raise errors.not_ready()
        if self.connected:
            return
        if self._connect_task is not None:
            raise errors.in_progress()
        self.temporary = False
        self.cancel_removal()
        self._connect_canceled = False
        self._connect_task = asyncio.get_running_loop().create_task(self._open_link())
        try:
            connection = await asyncio.shield(self._connect_task)
        except _ConnectCanceledError:
            raise errors.failed(CONNECT_CANCELED) from None
        except (core.BaseBumbleError, hci.HCI_Error, TimeoutError, OSError) as error:
            logger.info("%s: connection to %s failed: %s", self.adapter.name, self.address_text, error)
            raise errors.failed(CONNECT_CANCELED if self._connect_canceled else CONNECT_ABORTED) from None
        finally:
            self._connect_task = None
        self.attach(connection, hci.Role.CENTRAL)

    async def _open_link(self) -> Connection:
        # The kernel makes one LE connection attempt at a time per adapter; so do we.
        async with self.adapter.connect_lock:
            if self._connect_canceled:
                raise _ConnectCanceledError
            self.adapter.connecting_device = self
            try:
                connection = await self.adapter.device.connect_le(
                    self.address, timeout=self.adapter.settings.connect_timeout_s
                )
            finally:
                self.adapter.connecting_device = None
        if self._connect_canceled:
            # The link came up just as Disconnect canceled the attempt: drop it again.
            await connection.disconnect()
            raise _ConnectCanceledError
        return connection

    def attach(self, connection: Connection, role: hci.Role) -> None:
        """A link to this device is up (we connected, or it connected to us)."""
        self.connection = connection
        self.role = role
        self.disconnecting = False
        self.cancel_removal()
        connection.on("disconnection", lambda reason: self._on_disconnection(connection, reason))
        self.interface.emit_properties_changed({"Connected": Variant("b", True)})
        if role == hci.Role.CENTRAL:
            self.adapter.tree.run_soon(
                self._resolve_services(connection), what=f"service discovery on {self.path}"
            )

    async def _resolve_services(self, connection: Connection) -> None:
        client = connection.gatt_client
        try:
            await client.request_mtu(self.adapter.settings.att_mtu)
        except Exception as error:  # a peer that refuses the exchange keeps the default MTU
            logger.info("%s: MTU exchange with %s failed: %s", self.adapter.name, self.address_text, error)
        if self.connection is not connection:
            return
        database = RemoteGattDatabase(self, client)
        try:
            await database.discover()
        except errors.BluezError as error:
            logger.info("%s: service discovery on %s failed: %s", self.adapter.name, self.address_text, error)
            return
        if self.connection is not connection:
            return
        self.gatt = database
        database.export()
        self.services_resolved = True
        self.interface.emit_properties_changed({"ServicesResolved": Variant("b", True)})

    # ------------------------------------------------------------------ disconnecting

    async def disconnect(self) -> None:
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_canceled = True
            if self.adapter.connecting_device is self:
                await self.adapter.cancel_pending_connection()
        if not self.connected:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._disconnect_waiters.append(waiter)
        if not self.disconnecting:
            self.disconnecting = True
            self.adapter.tree.run_soon(self._terminate_link(), what=f"disconnect {self.path}")
        await waiter

    async def _terminate_link(self) -> None:
        delay = self.adapter.settings.disconnect_delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        connection = self.connection
        if connection is not None:
            await connection.disconnect()

    def _on_disconnection(self, connection: Connection, reason: int) -> None:
        if self.connection is not connection:
            return
        logger.info("%s: %s disconnected (reason 0x%02x)", self.adapter.name, self.address_text, reason)
        role = self.role
        self.connection = None
        self.role = None
        self.disconnecting = False
        if self.gatt is not None:
            self.gatt.remove()
            self.gatt = None
        changed: dict[str, Variant] = {}
        if self.services_resolved:
            self.services_resolved = False
            changed["ServicesResolved"] = Variant("b", False)
        changed["Connected"] = Variant("b", False)
        self.interface.emit_properties_changed(changed)
        waiters, self._disconnect_waiters = self._disconnect_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.adapter.on_link_closed(self, role)


class Device1Interface(DBusInterface):
    NAME = DEVICE_INTERFACE
    METHODS: ClassVar[Mapping[str, Method]] = {
        "Connect": Method(),
        "Disconnect": Method(),
        "ConnectProfile": Method((("UUID", "s"),)),
        "DisconnectProfile": Method((("UUID", "s"),)),
        "Pair": Method(),
        "CancelPairing": Method(),
    }

    def __init__(self, device: RemoteDevice) -> None:
        super().__init__()
        self.device = device

    def properties(self) -> dict[str, Variant]:
        device = self.device
        props = {
            "Address": Variant("s", device.address_text),
            "AddressType": Variant("s", "public" if device.address.is_public else "random"),
            "Alias": Variant("s", device.display_alias()),
            "Paired": Variant("b", False),
            "Bonded": Variant("b", False),
            "Trusted": Variant("b", device.trusted),
            "Blocked": Variant("b", device.blocked),
            "LegacyPairing": Variant("b", False),
            "Connected": Variant("b", device.connected),
            "UUIDs": Variant("as", list(device.service_uuids)),
            "Adapter": Variant("o", device.adapter.path),
            "ServicesResolved": Variant("b", device.services_resolved),
        }
        if device.name is not None:
            props["Name"] = Variant("s", device.name)
        if device.appearance is not None:
            props["Appearance"] = Variant("q", device.appearance)
        if device.rssi is not None:
            props["RSSI"] = Variant("n", device.rssi)
        if device.tx_power is not None:
            props["TxPower"] = Variant("n", device.tx_power)
        if device.manufacturer_data:
            props["ManufacturerData"] = device._manufacturer_variant()
        if device.service_data:
            props["ServiceData"] = device._service_data_variant()
        if device.advertising_flags is not None:
            props["AdvertisingFlags"] = Variant("ay", device.advertising_flags)
        return props

    def writable_properties(self) -> frozenset[str]:
        return frozenset({"Alias", "Trusted", "Blocked"})

    async def set_property(self, name: str, value: Variant) -> None:
        device = self.device
        match name:
            case "Alias":
                device.alias = str(value.value) or None
                self.emit_properties_changed({"Alias": Variant("s", device.display_alias())})
            case "Trusted":
                device.trusted = bool(value.value)
                self.emit_properties_changed({"Trusted": Variant("b", device.trusted)})
            case "Blocked":
                device.blocked = bool(value.value)
                self.emit_properties_changed({"Blocked": Variant("b", device.blocked)})
                if device.blocked and device.connected:
                    await device.disconnect()

    async def call(self, call: MethodCall) -> MethodResult:
        match call.member:
            case "Connect":
                if self.device.blocked:
                    raise errors.failed(CONNECT_ABORTED)
                await self.device.connect()
                return EMPTY_RESULT
            case "Disconnect":
                await self.device.disconnect()
                return EMPTY_RESULT
            case "ConnectProfile" | "DisconnectProfile" | "Pair":
                # Security is end to end above GATT (DESIGN.md §3): pairing is not emulated.
                raise errors.not_supported()
            case "CancelPairing":
                raise errors.does_not_exist()
        return await super().call(call)
