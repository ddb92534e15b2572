"""One emulated adapter (``/org/bluez/hciN``): a bumble host on one controller of the radio.

The adapter owns its remote devices, its discovery sessions (one per D-Bus client, as in BlueZ
src/adapter.c, with per-client filters and clean-up when the client leaves the bus), its GATT
applications and its advertisements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from bumble import hci
from bumble.core import PhysicalTransport
from bumble.device import Advertisement, Connection
from bumble.host import Host
from dbus_fast import Variant

from testbench.bluez import errors, uuids
from testbench.bluez.advertising import AdvertisingManager
from testbench.bluez.advertising_data import AdvertisedFields, parse_advertising_data
from testbench.bluez.dbus_service import EMPTY_RESULT, DBusInterface, Method, MethodCall, MethodResult
from testbench.bluez.device import RemoteDevice, address_text
from testbench.bluez.host import ControllerLink, EmulatedDevice
from testbench.bluez.local_gatt import GattManager
from testbench.radio.hub import ControllerEndpoint

if TYPE_CHECKING:
    from testbench.bluez.dbus_service import ObjectTree
    from testbench.bluez.emulator import EmulatorSettings, NameWatcher

logger = logging.getLogger(__name__)

ADAPTER_INTERFACE = "org.bluez.Adapter1"

_DISCOVERY_FILTER_SIGNATURES = {
    "UUIDs": "as",
    "RSSI": "n",
    "Pathloss": "q",
    "Transport": "s",
    "DuplicateData": "b",
    "Discoverable": "b",
    "Pattern": "s",
    "AutoConnect": "b",
}
_PATHLOSS_MAX = 137


def static_random_address(endpoint: ControllerEndpoint) -> hci.Address:
    """A static random address (two top bits set) unique to the controller's port."""
    port = endpoint.port
    return hci.Address(f"C0:00:00:00:{port >> 8:02X}:{port & 0xFF:02X}", hci.Address.RANDOM_DEVICE_ADDRESS)


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveryFilter:
    """One client's ``SetDiscoveryFilter`` (BlueZ adapter.c ``parse_discovery_filter_dict``)."""

    uuids: frozenset[str] = frozenset()
    rssi: int | None = None
    pathloss: int | None = None
    transport: str = "auto"
    duplicate_data: bool = False
    discoverable: bool = False
    pattern: str | None = None
    auto_connect: bool = False

    @classmethod
    def parse(cls, entries: Mapping[str, Variant]) -> DiscoveryFilter | None:
        """None for an empty dict (clears the filter); InvalidArguments when malformed."""
        if not entries:
            return None
        values: dict[str, Any] = {}
        for key, variant in entries.items():
            expected = _DISCOVERY_FILTER_SIGNATURES.get(key)
            if expected is None or not isinstance(variant, Variant) or variant.signature != expected:
                raise errors.invalid_arguments()
            values[key] = variant.value
        try:
            parsed_uuids = frozenset(uuids.normalize(u) for u in values.get("UUIDs", ()))
        except ValueError:
            raise errors.invalid_arguments() from None
        rssi: int | None = values.get("RSSI")
        pathloss: int | None = values.get("Pathloss")
        transport: str = values.get("Transport", "auto")
        if rssi is not None and not -127 <= rssi <= 20:
            raise errors.invalid_arguments()
        if pathloss is not None and pathloss > _PATHLOSS_MAX:
            raise errors.invalid_arguments()
        if rssi is not None and pathloss is not None:
            raise errors.invalid_arguments()
        if transport not in ("auto", "bredr", "le"):
            raise errors.invalid_arguments()
        pattern: str = values.get("Pattern", "")
        return cls(
            uuids=parsed_uuids,
            rssi=rssi,
            pathloss=pathloss,
            transport=transport,
            duplicate_data=bool(values.get("DuplicateData", False)),
            discoverable=bool(values.get("Discoverable", False)),
            pattern=pattern or None,
            auto_connect=bool(values.get("AutoConnect", False)),
        )

    def matches(self, address: str, fields: AdvertisedFields, rssi: int) -> bool:
        if self.transport == "bredr":
            return False
        if self.uuids and self.uuids.isdisjoint([*fields.service_uuids, *fields.service_data]):
            return False
        if self.rssi is not None and rssi < self.rssi:
            return False
        if (
            self.pathloss is not None
            and fields.tx_power is not None
            and fields.tx_power - rssi > self.pathloss
        ):
            return False
        if self.discoverable and not (fields.flags or 0) & 0x03:
            return False
        return not (
            self.pattern is not None
            and not address.startswith(self.pattern)
            and not (fields.name or "").startswith(self.pattern)
        )


@dataclass(slots=True, kw_only=True)
class DiscoveryClient:
    """A D-Bus client that set a filter or started discovery on this adapter (mutable state)."""

    owner: str
    unwatch: Callable[[], None]
    filter: DiscoveryFilter | None = None
    discovering: bool = False


class Adapter:
    """One ``hciN``: bumble host, D-Bus objects and the state BlueZ keeps per adapter."""

    def __init__(
        self,
        *,
        index: int,
        endpoint: ControllerEndpoint,
        settings: EmulatorSettings,
        tree: ObjectTree,
        names: NameWatcher,
        address: hci.Address | None = None,
    ) -> None:
        self.index = index
        self.name = f"hci{index}"
        self.path = f"/org/bluez/{self.name}"
        self.endpoint = endpoint
        self.settings = settings
        self.tree = tree
        self.names = names
        self.address = address or static_random_address(endpoint)
        self.system_name = settings.adapter_name
        self.alias: str | None = None
        self.powered = True
        self.discoverable = False
        self.discoverable_timeout = 180
        self.pairable = True
        self.pairable_timeout = 0
        self.connectable = True
        self.devices: dict[str, RemoteDevice] = {}
        self.connect_lock = asyncio.Lock()
        self.connecting_device: RemoteDevice | None = None
        self._discovery_clients: dict[str, DiscoveryClient] = {}
        self._scanning = False
        self._scan_lock = asyncio.Lock()
        self.interface = Adapter1Interface(self)
        self.advertising = AdvertisingManager(self)
        self.gatt = GattManager(self)
        self._link: ControllerLink | None = None
        self._device: EmulatedDevice | None = None

    @property
    def device(self) -> EmulatedDevice:
        assert self._device is not None, "adapter not started"
        return self._device

    @property
    def alias_or_name(self) -> str:
        return self.alias or self.system_name

    @property
    def link_lost(self) -> asyncio.Future[None]:
        assert self._link is not None
        return self._link.lost

    async def start(self) -> None:
        self._link = await ControllerLink.open(self.endpoint)
        host = Host(controller_source=self._link.source, controller_sink=self._link.sink)
        device = EmulatedDevice(
            name=self.alias_or_name, address=self.address, host=host, att_mtu=self.settings.att_mtu
        )
        device.on("advertisement", self._on_advertisement)
        device.on("connection", self._on_connection)
        device.on("characteristic_subscription", self.gatt.on_subscription)
        self._device = device
        await device.power_on()
        self.tree.export(self.path, [self.interface, self.gatt.interface, self.advertising.interface])
        self.tree.add_signal_handler(self.gatt.on_signal)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()

    # ------------------------------------------------------------------ devices

    def device_for(self, address: hci.Address) -> RemoteDevice:
        key = address_text(address)
        device = self.devices.get(key)
        if device is None:
            device = RemoteDevice(self, address)
            self.devices[key] = device
        return device

    def remove_device(self, device: RemoteDevice) -> None:
        device.cancel_removal()
        if self.devices.get(device.address_text) is device:
            del self.devices[device.address_text]
        self.tree.unexport_tree(device.path)

    def device_path(self, connection: Connection) -> str:
        return self.device_for(connection.peer_address).path

    async def cancel_pending_connection(self) -> None:
        with contextlib.suppress(hci.HCI_Error):
            await self.device.send_sync_command(hci.HCI_LE_Create_Connection_Cancel_Command())

    def _on_connection(self, connection: Connection) -> None:
        if connection.transport != PhysicalTransport.LE:
            return
        if connection.role == hci.Role.PERIPHERAL:
            # A central connected to us: BlueZ creates (or reuses) the Device1 for it.
            device = self.device_for(connection.peer_address)
            if not self.tree.has_object(device.path):
                self.tree.export(device.path, [device.interface])
            device.attach(connection, hci.Role.PERIPHERAL)
            self.gatt.on_connection(connection)
            self.tree.run_soon(self.advertising.refresh(), what=f"{self.name}: re-advertise")
        # Links we opened as central are attached by RemoteDevice.connect.

    def on_link_closed(self, device: RemoteDevice, role: hci.Role | None) -> None:
        if role == hci.Role.PERIPHERAL:
            self.tree.run_soon(self.advertising.refresh(), what=f"{self.name}: re-advertise")
        if not self._scanning:
            device.schedule_removal()

    # ------------------------------------------------------------------ discovery

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        if not self._scanning:
            return
        # The accumulated advertisement plus scan response (data_bytes holds only the last report).
        fields = parse_advertising_data(bytes(advertisement.data))
        address = advertisement.address
        text = address_text(address)
        rssi = int(advertisement.rssi)
        active_filters = [client.filter for client in self._discovery_clients.values() if client.discovering]
        if not any(f is None or f.matches(text, fields, rssi) for f in active_filters):
            return
        device = self.device_for(address)
        if not self.tree.has_object(device.path):
            device.on_advertisement(fields, rssi)
            self.tree.export(device.path, [device.interface])
        else:
            device.on_advertisement(fields, rssi)

    def _client(self, owner: str) -> DiscoveryClient:
        client = self._discovery_clients.get(owner)
        if client is None:
            unwatch = self.names.watch(owner, lambda: self._on_client_gone(owner))
            client = DiscoveryClient(owner=owner, unwatch=unwatch)
            self._discovery_clients[owner] = client
        return client

    def _on_client_gone(self, owner: str) -> None:
        client = self._discovery_clients.pop(owner, None)
        if client is not None and client.discovering:
            self.tree.run_soon(self._update_scanning(), what=f"{self.name}: discovery update")

    def _forget_client(self, owner: str) -> None:
        client = self._discovery_clients.pop(owner, None)
        if client is not None:
            client.unwatch()

    async def set_discovery_filter(self, owner: str, entries: Mapping[str, Variant]) -> None:
        if not self.powered:
            raise errors.not_ready()
        discovery_filter = DiscoveryFilter.parse(entries)
        client = self._discovery_clients.get(owner)
        if client is None and discovery_filter is None:
            return
        client = self._client(owner)
        client.filter = discovery_filter
        if not client.discovering and discovery_filter is None:
            self._forget_client(owner)

    async def start_discovery(self, owner: str) -> None:
        if not self.powered:
            raise errors.not_ready()
        client = self._client(owner)
        if client.discovering:
            raise errors.busy()
        client.discovering = True
        for device in self.devices.values():
            device.seen_in_this_discovery = False
        await self._update_scanning()

    async def stop_discovery(self, owner: str) -> None:
        if not self.powered:
            raise errors.not_ready()
        client = self._discovery_clients.get(owner)
        if client is None or not client.discovering:
            raise errors.failed("No discovery started")
        self._forget_client(owner)
        await self._update_scanning()

    async def _update_scanning(self) -> None:
        async with self._scan_lock:
            wanted = self.powered and any(c.discovering for c in self._discovery_clients.values())
            if wanted == self._scanning:
                return
            if wanted:
                await self.device.start_scanning(legacy=True, active=True, filter_duplicates=False)
                self._scanning = True
            else:
                self._scanning = False
                await self.device.stop_scanning(legacy=True)
                for device in list(self.devices.values()):
                    device.forget_rssi()
                    device.schedule_removal()
            self.interface.emit_properties_changed({"Discovering": Variant("b", self._scanning)})

    @property
    def discovering(self) -> bool:
        return self._scanning

    async def remove_device_by_path(self, path: str) -> None:
        device = next((d for d in self.devices.values() if d.path == path), None)
        if device is None or not self.tree.has_object(path):
            raise errors.does_not_exist()
        if not self.powered:
            raise errors.not_ready()
        device.temporary = True
        if device.connected:
            await device.disconnect()
        self.remove_device(device)

    # ------------------------------------------------------------------ power

    async def set_powered(self, powered: bool) -> None:
        if powered == self.powered:
            return
        self.powered = powered
        if not powered:
            for device in list(self.devices.values()):
                if device.connected:
                    await device.disconnect()
            # Powering off ends every discovery session; clients start again afterwards.
            for owner in list(self._discovery_clients):
                self._forget_client(owner)
            await self._update_scanning()
        await self.advertising.refresh()
        self.interface.emit_properties_changed(
            {"Powered": Variant("b", powered), "PowerState": Variant("s", "on" if powered else "off")}
        )

    def local_uuids(self) -> list[str]:
        return self.gatt.service_uuids()


class Adapter1Interface(DBusInterface):
    NAME = ADAPTER_INTERFACE
    METHODS: ClassVar[Mapping[str, Method]] = {
        "StartDiscovery": Method(),
        "StopDiscovery": Method(),
        "SetDiscoveryFilter": Method((("properties", "a{sv}"),)),
        "GetDiscoveryFilters": Method((), (("filters", "as"),)),
        "RemoveDevice": Method((("device", "o"),)),
    }

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter = adapter

    def properties(self) -> dict[str, Variant]:
        adapter = self.adapter
        return {
            "Address": Variant("s", address_text(adapter.address)),
            "AddressType": Variant("s", "random"),
            "Name": Variant("s", adapter.system_name),
            "Alias": Variant("s", adapter.alias_or_name),
            "Class": Variant("u", 0),
            "Connectable": Variant("b", adapter.connectable),
            "Powered": Variant("b", adapter.powered),
            "PowerState": Variant("s", "on" if adapter.powered else "off"),
            "Discoverable": Variant("b", adapter.discoverable),
            "DiscoverableTimeout": Variant("u", adapter.discoverable_timeout),
            "Pairable": Variant("b", adapter.pairable),
            "PairableTimeout": Variant("u", adapter.pairable_timeout),
            "Discovering": Variant("b", adapter.discovering),
            "UUIDs": Variant("as", adapter.local_uuids()),
            "Modalias": Variant("s", "usb:v1D6Bp0246d0548"),
            "Roles": Variant("as", ["central", "peripheral"]),
            "Manufacturer": Variant("q", 0x05F1),
            "Version": Variant("y", 0x0D),
        }

    def writable_properties(self) -> frozenset[str]:
        return frozenset(
            {
                "Alias",
                "Powered",
                "Discoverable",
                "DiscoverableTimeout",
                "Pairable",
                "PairableTimeout",
                "Connectable",
            }
        )

    async def set_property(self, name: str, value: Variant) -> None:
        adapter = self.adapter
        match name:
            case "Alias":
                # An empty alias restores the system name (BlueZ adapter.c property_set_alias).
                adapter.alias = str(value.value) or None
                self.emit_properties_changed({"Alias": Variant("s", adapter.alias_or_name)})
                await adapter.advertising.refresh()
            case "Powered":
                await adapter.set_powered(bool(value.value))
            case "Discoverable":
                adapter.discoverable = bool(value.value)
                self.emit_properties_changed({"Discoverable": value})
                await adapter.advertising.refresh()
            case "DiscoverableTimeout":
                adapter.discoverable_timeout = int(value.value)
                self.emit_properties_changed({name: value})
            case "Pairable":
                adapter.pairable = bool(value.value)
                self.emit_properties_changed({name: value})
            case "PairableTimeout":
                adapter.pairable_timeout = int(value.value)
                self.emit_properties_changed({name: value})
            case "Connectable":
                adapter.connectable = bool(value.value)
                self.emit_properties_changed({name: value})

    async def call(self, call: MethodCall) -> MethodResult:
        adapter = self.adapter
        match call.member:
            case "StartDiscovery":
                await adapter.start_discovery(call.sender)
                return EMPTY_RESULT
            case "StopDiscovery":
                await adapter.stop_discovery(call.sender)
                return EMPTY_RESULT
            case "SetDiscoveryFilter":
                await adapter.set_discovery_filter(call.sender, call.args[0])
                return EMPTY_RESULT
            case "GetDiscoveryFilters":
                return MethodResult(body=[list(_DISCOVERY_FILTER_SIGNATURES)])
            case "RemoveDevice":
                await adapter.remove_device_by_path(str(call.args[0]))
                return EMPTY_RESULT
        return await super().call(call)
