"""``org.bluez.GattManager1``: GATT applications (bless, for instance) served to remote centrals.

As in BlueZ src/gatt-database.c:

* ``RegisterApplication`` reads the application's objects with ``GetManagedObjects`` and adds its
  services to the adapter's GATT server; an application whose owner leaves the bus is removed;
* a remote read or write calls the application's ``ReadValue``/``WriteValue`` with the options
  BlueZ passes (``device``, ``link``, ``mtu``, and ``offset`` when non-zero) and maps its D-Bus
  error to an ATT error (``dbus_error_to_att_ecode``);
* a characteristic that has the write-without-response flag gets every write forwarded without
  waiting for the application, so the central's write request succeeds whatever the
  application answers (``chrc_write_cb`` passes no reply queue then);
* the first central to enable notifications triggers ``StartNotify``, the last one to leave
  ``StopNotify``; a ``PropertiesChanged(Value)`` from the application becomes a notification (or
  an indication) to every subscribed central, truncated to MTU-3 bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from bumble import att
from bumble.device import Connection
from bumble.gatt import Characteristic, Descriptor, Service
from dbus_fast import Message, MessageType, Variant

from testbench.bluez import errors, uuids
from testbench.bluez.dbus_service import EMPTY_RESULT, DBusInterface, Method, MethodCall, MethodResult
from testbench.bluez.errors import AttErrorCode, att_code_for_application_error
from testbench.bluez.remote_gatt import (
    CHARACTERISTIC_INTERFACE,
    DESCRIPTOR_INTERFACE,
    SERVICE_INTERFACE,
)

if TYPE_CHECKING:
    from testbench.bluez.adapter import Adapter

logger = logging.getLogger(__name__)

MANAGER_INTERFACE = "org.bluez.GattManager1"
_OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
_PROPERTIES = "org.freedesktop.DBus.Properties"
MAX_ATTRIBUTE_VALUE = 512  # Core Vol 3, Part F §3.2.9

_Permissions = att.Attribute.Permissions
_Props = Characteristic.Properties

# Characteristic flags (BlueZ gatt-database.c parse_chrc_flags): property bits and permissions.
_CHARACTERISTIC_FLAGS: dict[str, tuple[int, int, int]] = {
    # flag: (property bits, extended property bits, permissions)
    "broadcast": (_Props.BROADCAST, 0, 0),
    "read": (_Props.READ, 0, _Permissions.READABLE),
    "write-without-response": (_Props.WRITE_WITHOUT_RESPONSE, 0, _Permissions.WRITEABLE),
    "write": (_Props.WRITE, 0, _Permissions.WRITEABLE),
    "notify": (_Props.NOTIFY, 0, 0),
    "indicate": (_Props.INDICATE, 0, 0),
    "authenticated-signed-writes": (_Props.AUTHENTICATED_SIGNED_WRITES, 0, _Permissions.WRITEABLE),
    "extended-properties": (_Props.EXTENDED_PROPERTIES, 0, 0),
    "reliable-write": (0, 0x01, _Permissions.WRITEABLE),
    "writable-auxiliaries": (0, 0x02, 0),
    "encrypt-read": (_Props.READ, 0, _Permissions.READABLE | _Permissions.READ_REQUIRES_ENCRYPTION),
    "encrypt-write": (_Props.WRITE, 0, _Permissions.WRITEABLE | _Permissions.WRITE_REQUIRES_ENCRYPTION),
    "encrypt-authenticated-read": (
        _Props.READ,
        0,
        _Permissions.READABLE | _Permissions.READ_REQUIRES_AUTHENTICATION,
    ),
    "encrypt-authenticated-write": (
        _Props.WRITE,
        0,
        _Permissions.WRITEABLE | _Permissions.WRITE_REQUIRES_AUTHENTICATION,
    ),
    "secure-read": (_Props.READ, 0, _Permissions.READABLE | _Permissions.READ_REQUIRES_AUTHENTICATION),
    "secure-write": (_Props.WRITE, 0, _Permissions.WRITEABLE | _Permissions.WRITE_REQUIRES_AUTHENTICATION),
    "authorize": (0, 0, 0),
    "encrypt-notify": (_Props.NOTIFY, 0, 0),
    "encrypt-authenticated-notify": (_Props.NOTIFY, 0, 0),
    "secure-notify": (_Props.NOTIFY, 0, 0),
    "encrypt-indicate": (_Props.INDICATE, 0, 0),
    "encrypt-authenticated-indicate": (_Props.INDICATE, 0, 0),
    "secure-indicate": (_Props.INDICATE, 0, 0),
}
_DESCRIPTOR_FLAGS: dict[str, int] = {
    "read": _Permissions.READABLE,
    "write": _Permissions.WRITEABLE,
    "encrypt-read": _Permissions.READABLE | _Permissions.READ_REQUIRES_ENCRYPTION,
    "encrypt-write": _Permissions.WRITEABLE | _Permissions.WRITE_REQUIRES_ENCRYPTION,
    "encrypt-authenticated-read": _Permissions.READABLE | _Permissions.READ_REQUIRES_AUTHENTICATION,
    "encrypt-authenticated-write": _Permissions.WRITEABLE | _Permissions.WRITE_REQUIRES_AUTHENTICATION,
    "secure-read": _Permissions.READABLE | _Permissions.READ_REQUIRES_AUTHENTICATION,
    "secure-write": _Permissions.WRITEABLE | _Permissions.WRITE_REQUIRES_AUTHENTICATION,
    "authorize": 0,
}
_CEP_UUID = "2900"


class InvalidApplicationError(ValueError):
    """The application's objects do not describe a valid GATT database."""


def _string(properties: Mapping[str, Variant], name: str, signature: str = "s") -> Any:
    variant = properties.get(name)
    if not isinstance(variant, Variant) or variant.signature != signature:
        raise InvalidApplicationError(f"{name} missing or not of type {signature}")
    return variant.value


class ApplicationAttribute:
    """A characteristic value or descriptor whose reads and writes go to the application."""

    def __init__(
        self,
        manager: GattManager,
        *,
        owner: str,
        path: str,
        interface: str,
        permissions: int,
        answer_writes_at_once: bool,
    ) -> None:
        self.manager = manager
        self.owner = owner
        self.path = path
        self.interface = interface
        self.permissions = permissions
        self.answer_writes_at_once = answer_writes_at_once

    def attribute_value(self) -> att.AttributeValue[bytes]:
        return att.AttributeValue(read=self.read, write=self.write)

    def _options(self, connection: Connection) -> dict[str, Variant]:
        return {
            "device": Variant("o", self.manager.adapter.device_path(connection)),
            "link": Variant("s", "LE"),
            "mtu": Variant("q", int(connection.att_mtu)),
        }

    async def read(self, connection: Connection) -> bytes:
        if not self.permissions & _Permissions.READABLE:
            raise att.ATT_Error(AttErrorCode.READ_NOT_PERMITTED)
        reply = await self.manager.call_application(
            Message(
                destination=self.owner,
                path=self.path,
                interface=self.interface,
                member="ReadValue",
                signature="a{sv}",
                body=[self._options(connection)],
            )
        )
        if reply.message_type == MessageType.ERROR:
            raise att.ATT_Error(_att_code(reply, AttErrorCode.READ_NOT_PERMITTED))
        if reply.signature != "ay":
            raise att.ATT_Error(AttErrorCode.REQUEST_NOT_SUPPORTED)
        return bytes(reply.body[0])[:MAX_ATTRIBUTE_VALUE]

    async def write(self, connection: Connection, value: bytes) -> None:
        if not self.permissions & _Permissions.WRITEABLE:
            raise att.ATT_Error(AttErrorCode.WRITE_NOT_PERMITTED)
        message = Message(
            destination=self.owner,
            path=self.path,
            interface=self.interface,
            member="WriteValue",
            signature="aya{sv}",
            body=[bytes(value), self._options(connection)],
        )
        if self.answer_writes_at_once:
            self.manager.adapter.tree.bus.send(message)
            return
        reply = await self.manager.call_application(message)
        if reply.message_type == MessageType.ERROR:
            raise att.ATT_Error(_att_code(reply, AttErrorCode.WRITE_NOT_PERMITTED))
        if reply.body:
            raise att.ATT_Error(AttErrorCode.REQUEST_NOT_SUPPORTED)


def _att_code(reply: Message, permission_error: int) -> int:
    text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
    return att_code_for_application_error(reply.error_name or "", text, permission_error)


@dataclass(slots=True, kw_only=True)
class LocalCharacteristic:
    """A registered characteristic and the centrals subscribed to it (mutable state)."""

    owner: str
    path: str
    characteristic: Characteristic[bytes]
    subscribers: dict[int, int] = field(default_factory=dict)  # connection handle -> CCC bits


@dataclass(slots=True, kw_only=True)
class Application:
    """A registered application (mutable: its watch and match rule are set once registered)."""

    owner: str
    path: str
    services: list[Service]
    characteristics: list[LocalCharacteristic]
    service_uuids: list[str]
    unwatch: Callable[[], None] | None = None
    match_rule: str = ""


class GattManager:
    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.interface = GattManager1Interface(self)
        self.applications: list[Application] = []
        self._by_characteristic: dict[int, LocalCharacteristic] = {}
        self._by_owner_path: dict[tuple[str, str], LocalCharacteristic] = {}

    # ------------------------------------------------------------------ registration

    def _find(self, owner: str, path: str) -> Application | None:
        return next((a for a in self.applications if a.owner == owner and a.path == path), None)

    async def register(self, owner: str, app_path: str) -> None:
        if not app_path.startswith("/"):
            raise errors.failed("Failed to register application")
        if self._find(owner, app_path) is not None:
            raise errors.already_exists()
        reply = await self.call_application(
            Message(destination=owner, path=app_path, interface=_OBJECT_MANAGER, member="GetManagedObjects")
        )
        if reply.message_type != MessageType.METHOD_RETURN or reply.signature != "a{oa{sa{sv}}}":
            raise errors.failed("No object received")
        objects: dict[str, dict[str, dict[str, Variant]]] = reply.body[0]
        prefix = app_path.rstrip("/") + "/"
        mine = {p: i for p, i in objects.items() if p == app_path or p.startswith(prefix) or app_path == "/"}
        if not mine:
            raise errors.failed("No object received")
        try:
            application = self._build(owner, app_path, mine)
        except InvalidApplicationError as error:
            logger.info("%s: application %s%s refused: %s", self.adapter.name, owner, app_path, error)
            raise errors.failed("No valid service object found") from None
        if self._find(owner, app_path) is not None:
            raise errors.already_exists()
        application.match_rule = (
            f"type='signal',sender='{owner}',interface='{_PROPERTIES}',member='PropertiesChanged'"
        )
        await self._add_match(application.match_rule)
        application.unwatch = self.adapter.names.watch(owner, lambda: self._drop_owner(owner))
        server = self.adapter.device.stable_gatt_server
        for service in application.services:
            server.add_service(service)
        for local in application.characteristics:
            self._by_characteristic[id(local.characteristic)] = local
            self._by_owner_path[(owner, local.path)] = local
        self.applications.append(application)
        self.adapter.interface.emit_properties_changed({"UUIDs": Variant("as", self.service_uuids())})
        logger.info(
            "%s: registered application %s%s (%d services)",
            self.adapter.name,
            owner,
            app_path,
            len(application.services),
        )

    def _build(
        self, owner: str, app_path: str, objects: Mapping[str, Mapping[str, Mapping[str, Variant]]]
    ) -> Application:
        service_paths = [p for p, interfaces in objects.items() if SERVICE_INTERFACE in interfaces]
        if not service_paths:
            raise InvalidApplicationError("no GattService1 object")
        characteristics_by_service: dict[str, list[str]] = {p: [] for p in service_paths}
        descriptors_by_characteristic: dict[str, list[str]] = {}
        for path, interfaces in objects.items():
            if CHARACTERISTIC_INTERFACE in interfaces:
                service_path = _string(interfaces[CHARACTERISTIC_INTERFACE], "Service", "o")
                if service_path not in characteristics_by_service:
                    raise InvalidApplicationError(
                        f"{path}: service {service_path} is not part of the application"
                    )
                characteristics_by_service[service_path].append(path)
                descriptors_by_characteristic.setdefault(path, [])
        for path, interfaces in objects.items():
            if DESCRIPTOR_INTERFACE in interfaces:
                characteristic_path = _string(interfaces[DESCRIPTOR_INTERFACE], "Characteristic", "o")
                if characteristic_path not in descriptors_by_characteristic:
                    raise InvalidApplicationError(f"{path}: characteristic {characteristic_path} is unknown")
                descriptors_by_characteristic[characteristic_path].append(path)

        services: list[Service] = []
        locals_: list[LocalCharacteristic] = []
        service_uuids: list[str] = []
        for service_path in service_paths:
            service_props = objects[service_path][SERVICE_INTERFACE]
            service_uuid = _uuid(service_props)
            primary = bool(_string(service_props, "Primary", "b"))
            characteristics: list[Characteristic[bytes]] = []
            for characteristic_path in characteristics_by_service[service_path]:
                local = self._build_characteristic(
                    owner,
                    characteristic_path,
                    objects[characteristic_path][CHARACTERISTIC_INTERFACE],
                    [
                        (p, objects[p][DESCRIPTOR_INTERFACE])
                        for p in descriptors_by_characteristic[characteristic_path]
                    ],
                )
                characteristics.append(local.characteristic)
                locals_.append(local)
            services.append(Service(uuids.to_bumble(service_uuid), characteristics, primary=primary))
            service_uuids.append(service_uuid)
        return Application(
            owner=owner,
            path=app_path,
            services=services,
            characteristics=locals_,
            service_uuids=service_uuids,
        )

    def _build_characteristic(
        self,
        owner: str,
        path: str,
        props: Mapping[str, Variant],
        descriptor_objects: list[tuple[str, Mapping[str, Variant]]],
    ) -> LocalCharacteristic:
        flags = _string(props, "Flags", "as")
        if not flags:
            raise InvalidApplicationError(f"{path}: no Flags")
        property_bits, extended_bits, permissions = 0, 0, 0
        for flag in flags:
            if flag not in _CHARACTERISTIC_FLAGS:
                raise InvalidApplicationError(f"{path}: invalid characteristic flag {flag!r}")
            bits, extended, permission = _CHARACTERISTIC_FLAGS[flag]
            property_bits |= bits
            extended_bits |= extended
            permissions |= permission
        if extended_bits:
            property_bits |= _Props.EXTENDED_PROPERTIES
        value = ApplicationAttribute(
            self,
            owner=owner,
            path=path,
            interface=CHARACTERISTIC_INTERFACE,
            permissions=permissions,
            answer_writes_at_once=bool(property_bits & _Props.WRITE_WITHOUT_RESPONSE),
        )
        descriptors: list[Descriptor] = []
        if extended_bits:
            descriptors.append(
                Descriptor(
                    uuids.to_bumble(_CEP_UUID), _Permissions.READABLE, extended_bits.to_bytes(2, "little")
                )
            )
        for descriptor_path, descriptor_props in descriptor_objects:
            descriptor_permissions = 0
            for flag in _string(descriptor_props, "Flags", "as"):
                if flag not in _DESCRIPTOR_FLAGS:
                    raise InvalidApplicationError(f"{descriptor_path}: invalid descriptor flag {flag!r}")
                descriptor_permissions |= _DESCRIPTOR_FLAGS[flag]
            descriptor_value = ApplicationAttribute(
                self,
                owner=owner,
                path=descriptor_path,
                interface=DESCRIPTOR_INTERFACE,
                permissions=descriptor_permissions,
                answer_writes_at_once=False,
            )
            descriptors.append(
                Descriptor(
                    uuids.to_bumble(_uuid(descriptor_props)),
                    _Permissions(descriptor_permissions),
                    descriptor_value.attribute_value(),
                )
            )
        characteristic: Characteristic[bytes] = Characteristic(
            uuids.to_bumble(_uuid(props)),
            Characteristic.Properties(property_bits),
            _Permissions(permissions),
            value.attribute_value(),
            descriptors,
        )
        return LocalCharacteristic(owner=owner, path=path, characteristic=characteristic)

    async def unregister(self, owner: str, app_path: str) -> None:
        application = self._find(owner, app_path)
        if application is None:
            raise errors.does_not_exist()
        await self._remove(application)

    def _drop_owner(self, owner: str) -> None:
        for application in [a for a in self.applications if a.owner == owner]:
            self.adapter.tree.run_soon(
                self._remove(application), what=f"{self.adapter.name}: remove application"
            )

    async def _remove(self, application: Application) -> None:
        if application not in self.applications:
            return
        self.applications.remove(application)
        if application.unwatch is not None:
            application.unwatch()
        server = self.adapter.device.stable_gatt_server
        for service in application.services:
            server.remove_service(service)
        for local in application.characteristics:
            self._by_characteristic.pop(id(local.characteristic), None)
            self._by_owner_path.pop((local.owner, local.path), None)
        if application.match_rule:
            await self._remove_match(application.match_rule)
        self.adapter.interface.emit_properties_changed({"UUIDs": Variant("as", self.service_uuids())})
        logger.info("%s: removed application %s%s", self.adapter.name, application.owner, application.path)

    def service_uuids(self) -> list[str]:
        return list(dict.fromkeys(u for a in self.applications for u in a.service_uuids))

    # ------------------------------------------------------------------ calls into applications

    async def call_application(self, message: Message) -> Message:
        """Call the application; a vanished one answers with an error, never an exception."""
        try:
            reply = await self.adapter.tree.bus.call(message)
        except Exception as error:
            return Message.new_error(message, "org.freedesktop.DBus.Error.NoReply", str(error))
        if reply is None:
            return Message.new_error(message, "org.freedesktop.DBus.Error.NoReply", "no reply")
        return reply

    async def _add_match(self, rule: str) -> None:
        await self._bus_call("AddMatch", rule)

    async def _remove_match(self, rule: str) -> None:
        await self._bus_call("RemoveMatch", rule)

    async def _bus_call(self, member: str, rule: str) -> None:
        bus = self.adapter.tree.bus
        if not bus.connected:
            return
        await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature="s",
                body=[rule],
            )
        )

    def _tell_application(self, local: LocalCharacteristic, member: str) -> None:
        bus = self.adapter.tree.bus
        if bus.connected:
            bus.send(
                Message(
                    destination=local.owner,
                    path=local.path,
                    interface=CHARACTERISTIC_INTERFACE,
                    member=member,
                )
            )

    # ------------------------------------------------------------------ subscriptions and notifications

    def on_connection(self, connection: Connection) -> None:
        connection.on("disconnection", lambda reason: self._forget_connection(connection.handle))

    def on_subscription(
        self, connection: Connection, characteristic: Characteristic[bytes], notify: bool, indicate: bool
    ) -> None:
        local = self._by_characteristic.get(id(characteristic))
        if local is None:
            return
        bits = (0x01 if notify else 0) | (0x02 if indicate else 0)
        was_subscribed = bool(local.subscribers)
        if bits:
            local.subscribers[connection.handle] = bits
        else:
            local.subscribers.pop(connection.handle, None)
        if local.subscribers and not was_subscribed:
            self._tell_application(local, "StartNotify")
        elif was_subscribed and not local.subscribers:
            self._tell_application(local, "StopNotify")

    def _forget_connection(self, handle: int) -> None:
        for local in list(self._by_owner_path.values()):
            if local.subscribers.pop(handle, None) is not None and not local.subscribers:
                self._tell_application(local, "StopNotify")

    def on_signal(self, message: Message) -> None:
        if message.member != "PropertiesChanged" or message.interface != _PROPERTIES:
            return
        local = self._by_owner_path.get((message.sender or "", message.path or ""))
        if local is None or message.signature != "sa{sv}as" or message.body[0] != CHARACTERISTIC_INTERFACE:
            return
        value = message.body[1].get("Value")
        if not isinstance(value, Variant) or value.signature != "ay":
            return
        self._notify(local, bytes(value.value)[:MAX_ATTRIBUTE_VALUE])

    def _notify(self, local: LocalCharacteristic, value: bytes) -> None:
        device = self.adapter.device
        for handle, bits in list(local.subscribers.items()):
            connection = device.lookup_connection(handle)
            if connection is None:
                continue
            if bits & 0x01:
                pdu = att.ATT_Handle_Value_Notification(
                    attribute_handle=local.characteristic.handle,
                    attribute_value=value[: connection.att_mtu - 3],
                )
                device.gatt_server.send_gatt_pdu(connection, bytes(pdu))
            elif bits & 0x02:
                self.adapter.tree.run_soon(
                    self._indicate(local, connection, value), what=f"indication on {local.path}"
                )

    async def _indicate(self, local: LocalCharacteristic, connection: Connection, value: bytes) -> None:
        await self.adapter.device.indicate_subscriber(connection, local.characteristic, value)
        self._tell_application(local, "Confirm")


def _uuid(props: Mapping[str, Variant]) -> str:
    try:
        return uuids.normalize(_string(props, "UUID"))
    except ValueError as error:
        raise InvalidApplicationError(str(error)) from None


class GattManager1Interface(DBusInterface):
    NAME = MANAGER_INTERFACE
    METHODS: ClassVar[Mapping[str, Method]] = {
        "RegisterApplication": Method((("application", "o"), ("options", "a{sv}"))),
        "UnregisterApplication": Method((("application", "o"),)),
    }

    def __init__(self, manager: GattManager) -> None:
        super().__init__()
        self.manager = manager

    def properties(self) -> dict[str, Variant]:
        return {}

    async def call(self, call: MethodCall) -> MethodResult:
        match call.member:
            case "RegisterApplication":
                await self.manager.register(call.sender, str(call.args[0]))
                return EMPTY_RESULT
            case "UnregisterApplication":
                await self.manager.unregister(call.sender, str(call.args[0]))
                return EMPTY_RESULT
        return await super().call(call)
