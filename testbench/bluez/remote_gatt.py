"""A connected peripheral's GATT database as BlueZ exports it to clients such as bleak.

Objects sit at ``<device>/serviceXXXX/charYYYY/descZZZZ`` with the handles in hex (bleak reads
handles from the last four digits of the path). Behaviour follows BlueZ src/gatt-client.c: the
write procedure is chosen from the ``type`` option and the characteristic's flags, values longer
than MTU-3 go out as a long write for requests and fail for commands, ``AcquireWrite`` and
``AcquireNotify`` hand out SEQPACKET sockets and report the negotiated MTU.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from bumble import att, core
from bumble.gatt_client import CharacteristicProxy, Client, DescriptorProxy, ServiceProxy
from dbus_fast import Variant

from testbench.bluez import errors, uuids
from testbench.bluez.dbus_service import EMPTY_RESULT, DBusInterface, Method, MethodCall, MethodResult
from testbench.bluez.errors import AttErrorCode

if TYPE_CHECKING:
    from testbench.bluez.device import RemoteDevice

logger = logging.getLogger(__name__)

SERVICE_INTERFACE = "org.bluez.GattService1"
CHARACTERISTIC_INTERFACE = "org.bluez.GattCharacteristic1"
DESCRIPTOR_INTERFACE = "org.bluez.GattDescriptor1"

_T = TypeVar("_T")

# Characteristic property bits (Core Vol 3, Part G §3.3.1.1) and BlueZ's names for them.
PROPERTY_FLAGS: tuple[tuple[int, str], ...] = (
    (0x01, "broadcast"),
    (0x02, "read"),
    (0x04, "write-without-response"),
    (0x08, "write"),
    (0x10, "notify"),
    (0x20, "indicate"),
    (0x40, "authenticated-signed-writes"),
    (0x80, "extended-properties"),
)
EXTENDED_PROPERTY_FLAGS: tuple[tuple[int, str], ...] = (
    (0x01, "reliable-write"),
    (0x02, "writable-auxiliaries"),
)
PROP_READ, PROP_WRITE_WITHOUT_RESPONSE, PROP_WRITE, PROP_NOTIFY, PROP_INDICATE = 0x02, 0x04, 0x08, 0x10, 0x20
EXT_PROP_RELIABLE_WRITE = 0x01

CCC_UUID = "00002902-0000-1000-8000-00805f9b34fb"
CEP_UUID = "00002900-0000-1000-8000-00805f9b34fb"

# SEQPACKET sockets carry one ATT value per message; BlueZ reads 512 at most.
_SOCKET_READ_SIZE = 512


def _offset_and_type(options: Mapping[str, Variant]) -> tuple[int, str | None]:
    """BlueZ parse_options: ``offset`` must be a uint16 and ``type`` a string."""
    offset, write_type = 0, None
    for key, variant in options.items():
        if key.lower() == "offset":
            if not isinstance(variant, Variant) or variant.signature != "q":
                raise errors.invalid_arguments()
            offset = int(variant.value)
        elif key.lower() == "type":
            if not isinstance(variant, Variant) or variant.signature != "s":
                raise errors.invalid_arguments()
            write_type = str(variant.value)
    return offset, write_type


async def gatt_operation(operation: Awaitable[_T]) -> _T:
    """Run a bumble GATT client operation; failures become BlueZ's D-Bus errors."""
    try:
        return await operation
    except att.ATT_Error as error:
        raise errors.gatt_error(int(error.error_code)) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # bumble cancels the pending response when the link drops.
        raise errors.gatt_error(0) from None
    except (core.BaseBumbleError, TimeoutError, OSError):
        raise errors.gatt_error(0) from None


class _ReadOperation:
    """A read in flight; BlueZ lets a second ReadValue at the same offset join it."""

    def __init__(self, offset: int, task: asyncio.Task[bytes]) -> None:
        self.offset = offset
        self.task = task


class RemoteGattDatabase:
    """The services of one connected peripheral, discovered once and exported until disconnect."""

    def __init__(self, device: RemoteDevice, client: Client) -> None:
        self.device = device
        self.client = client
        self.services: list[RemoteService] = []
        self.characteristics: list[RemoteCharacteristic] = []
        self._exported_paths: list[str] = []

    @property
    def mtu(self) -> int:
        return int(self.client.mtu)

    async def discover(self) -> None:
        """Discover every service, characteristic and descriptor (BlueZ's GATT browse)."""
        client = self.client
        for service_proxy in await gatt_operation(client.discover_services()):
            service = RemoteService(self, service_proxy)
            self.services.append(service)
            characteristics = await gatt_operation(client.discover_characteristics([], service_proxy))
            for characteristic_proxy in characteristics:
                descriptors = await gatt_operation(client.discover_descriptors(characteristic_proxy))
                # bumble never records this and would rediscover on every subscribe.
                characteristic_proxy.descriptors_discovered = True
                characteristic = RemoteCharacteristic(service, characteristic_proxy)
                for descriptor_proxy in descriptors:
                    descriptor = RemoteDescriptor(characteristic, descriptor_proxy)
                    characteristic.descriptors.append(descriptor)
                    if descriptor.uuid == CEP_UUID:
                        characteristic.extended_properties = await self._read_extended_properties(
                            descriptor_proxy
                        )
                service.characteristics.append(characteristic)
                self.characteristics.append(characteristic)

    async def _read_extended_properties(self, descriptor: DescriptorProxy) -> int:
        try:
            value = await gatt_operation(self.client.read_value(descriptor.handle))
        except errors.BluezError:
            return 0
        return int.from_bytes(value[:2], "little") if len(value) >= 2 else 0

    def export(self) -> None:
        tree = self.device.adapter.tree
        for service in self.services:
            tree.export(service.object_path, [service])
            self._exported_paths.append(service.object_path)
            for characteristic in service.characteristics:
                tree.export(characteristic.object_path, [characteristic])
                self._exported_paths.append(characteristic.object_path)
                for descriptor in characteristic.descriptors:
                    tree.export(descriptor.object_path, [descriptor])
                    self._exported_paths.append(descriptor.object_path)

    def remove(self) -> None:
        """The link is gone: release sockets and remove every object, deepest first."""
        for characteristic in self.characteristics:
            characteristic.release_everything()
        tree = self.device.adapter.tree
        for path in reversed(self._exported_paths):
            tree.unexport(path)
        self._exported_paths.clear()


class RemoteService(DBusInterface):
    NAME = SERVICE_INTERFACE

    def __init__(self, database: RemoteGattDatabase, proxy: ServiceProxy) -> None:
        super().__init__()
        self.database = database
        self.proxy = proxy
        self.handle = int(proxy.handle)
        self.uuid = uuids.from_bumble(proxy.uuid)
        self.object_path = f"{database.device.path}/service{self.handle:04x}"
        self.characteristics: list[RemoteCharacteristic] = []

    def properties(self) -> dict[str, Variant]:
        return {
            "Handle": Variant("q", self.handle),
            "UUID": Variant("s", self.uuid),
            "Device": Variant("o", self.database.device.path),
            "Primary": Variant("b", True),
            "Includes": Variant("ao", []),
        }


class _NotifySocket:
    """The client's end of an AcquireNotify socket: notifications are written to it."""

    def __init__(self, sock: socket.socket, on_hangup: Callable[[], None]) -> None:
        self.sock = sock
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._on_readable, on_hangup)

    def _on_readable(self, on_hangup: Callable[[], None]) -> None:
        try:
            data = self.sock.recv(_SOCKET_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            on_hangup()

    def send(self, value: bytes) -> None:
        try:
            self.sock.send(value)
        except OSError as error:  # a full or closed socket drops the value, as BlueZ does
            logger.debug("notification socket: %s", error)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _WriteSocket:
    """The client's end of an AcquireWrite socket: each message is one write command."""

    def __init__(
        self, sock: socket.socket, on_value: Callable[[bytes], None], on_hangup: Callable[[], None]
    ) -> None:
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable, on_value, on_hangup)

    def _on_readable(self, on_value: Callable[[bytes], None], on_hangup: Callable[[], None]) -> None:
        try:
            data = self.sock.recv(_SOCKET_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            on_value(data)
        else:
            on_hangup()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def _socket_pair() -> tuple[socket.socket, int]:
    """(our end, the fd to hand to the client) of a non-blocking SEQPACKET pair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs.detach()


class RemoteCharacteristic(DBusInterface):
    NAME = CHARACTERISTIC_INTERFACE
    METHODS: ClassVar[Mapping[str, Method]] = {
        "ReadValue": Method((("options", "a{sv}"),), (("value", "ay"),)),
        "WriteValue": Method((("value", "ay"), ("options", "a{sv}"))),
        "AcquireWrite": Method((("options", "a{sv}"),), (("fd", "h"), ("mtu", "q"))),
        "AcquireNotify": Method((("options", "a{sv}"),), (("fd", "h"), ("mtu", "q"))),
        "StartNotify": Method(),
        "StopNotify": Method(),
    }

    def __init__(self, service: RemoteService, proxy: CharacteristicProxy[Any]) -> None:
        super().__init__()
        self.service = service
        self.proxy = proxy
        self.value_handle = int(proxy.handle)
        # The declaration sits just before the value; BlueZ names the object after it.
        self.handle = self.value_handle - 1
        self.uuid = uuids.from_bumble(proxy.uuid)
        self.properties_bits = int(proxy.properties)
        self.extended_properties = 0
        self.object_path = f"{service.object_path}/char{self.handle:04x}"
        self.descriptors: list[RemoteDescriptor] = []
        self.value = b""
        self.notifying = False
        self._notify_sessions: dict[str, Callable[[], None]] = {}  # owner -> stop watching it
        self._subscribed = False
        self._subscribing: asyncio.Task[None] | None = None
        self._notify_socket: _NotifySocket | None = None
        self._write_socket: _WriteSocket | None = None
        self._read_operation: _ReadOperation | None = None
        self._write_in_progress = False

    @property
    def _client(self) -> Client:
        return self.service.database.client

    @property
    def _mtu(self) -> int:
        return self.service.database.mtu

    def flags(self) -> list[str]:
        names = [name for bit, name in PROPERTY_FLAGS if self.properties_bits & bit]
        names += [name for bit, name in EXTENDED_PROPERTY_FLAGS if self.extended_properties & bit]
        return names

    def properties(self) -> dict[str, Variant]:
        props = {
            "Handle": Variant("q", self.handle),
            "UUID": Variant("s", self.uuid),
            "Service": Variant("o", self.service.object_path),
            "Value": Variant("ay", self.value),
            "Flags": Variant("as", self.flags()),
            "MTU": Variant("q", self._mtu),
        }
        if self.properties_bits & (PROP_NOTIFY | PROP_INDICATE):
            props["Notifying"] = Variant("b", self.notifying)
        if self.properties_bits & PROP_WRITE_WITHOUT_RESPONSE:
            props["WriteAcquired"] = Variant("b", self._write_socket is not None)
        if self.properties_bits & PROP_NOTIFY:
            props["NotifyAcquired"] = Variant("b", self._notify_socket is not None)
        return props

    async def call(self, call: MethodCall) -> MethodResult:
        match call.member:
            case "ReadValue":
                return MethodResult(body=[await self._read_value(call.args[0])])
            case "WriteValue":
                await self._write_value(bytes(call.args[0]), call.args[1])
                return EMPTY_RESULT
            case "AcquireWrite":
                return self._acquire_write()
            case "AcquireNotify":
                return await self._acquire_notify(call.sender)
            case "StartNotify":
                await self._start_notify(call.sender)
                return EMPTY_RESULT
            case "StopNotify":
                await self._stop_notify(call.sender)
                return EMPTY_RESULT
        return await super().call(call)

    # ---------------------------------------------------------------- reads

    async def _read_value(self, options: Mapping[str, Variant]) -> bytes:
        offset, _ = _offset_and_type(options)
        operation = self._read_operation
        if operation is not None:
            if operation.offset != offset:
                raise errors.in_progress()
            return await asyncio.shield(operation.task)
        task = asyncio.get_running_loop().create_task(self._read_from(offset))
        self._read_operation = _ReadOperation(offset, task)
        try:
            value = await asyncio.shield(task)
        finally:
            self._read_operation = None
        self._store_value(value if offset == 0 else self.value[:offset] + value)
        return value

    async def _read_from(self, offset: int) -> bytes:
        if offset == 0:
            return bytes(await gatt_operation(self._client.read_value(self.value_handle)))
        return await read_blobs(self._client, self.value_handle, offset, self._mtu)

    def _store_value(self, value: bytes) -> None:
        self.value = bytes(value)
        self.emit_properties_changed({"Value": Variant("ay", self.value)})

    # ---------------------------------------------------------------- writes

    async def _write_value(self, value: bytes, options: Mapping[str, Variant]) -> None:
        if self._write_socket is not None:
            raise errors.not_permitted("Write acquired")
        if self._write_in_progress:
            raise errors.in_progress()
        offset, write_type = _offset_and_type(options)
        props = self.properties_bits
        reliable = (write_type is None and self.extended_properties & EXT_PROP_RELIABLE_WRITE) or (
            write_type is not None and write_type.lower() == "reliable"
        )
        request = (write_type is None and props & PROP_WRITE) or (
            write_type is not None and write_type.lower() == "request"
        )
        if reliable or request:
            self._write_in_progress = True
            try:
                if not reliable and len(value) <= self._mtu - 3 and offset == 0:
                    await gatt_operation(
                        self._client.write_value(self.value_handle, value, with_response=True)
                    )
                else:
                    await write_long(
                        self._client, self.value_handle, value, offset, self._mtu, reliable=bool(reliable)
                    )
            finally:
                self._write_in_progress = False
            return
        if (
            (write_type is not None and write_type.lower() != "command")
            or offset
            or (write_type is None and not props & PROP_WRITE_WITHOUT_RESPONSE)
        ):
            raise errors.not_supported()
        if len(value) > self._mtu - 3:
            # The ATT layer refuses a PDU larger than the MTU (shared/att.c encode_pdu).
            raise errors.failed("Failed to initiate write")
        await gatt_operation(self._client.write_value(self.value_handle, value, with_response=False))

    # ---------------------------------------------------------------- acquired sockets

    def _acquire_write(self) -> MethodResult:
        if self._write_socket is not None:
            raise errors.not_permitted("Write acquired")
        if not self.properties_bits & PROP_WRITE_WITHOUT_RESPONSE:
            raise errors.not_supported()
        ours, theirs = _socket_pair()
        self._write_socket = _WriteSocket(ours, self._on_socket_write, self._release_write_socket)
        self.emit_properties_changed({"WriteAcquired": Variant("b", True)})
        return MethodResult(body=[0, self._mtu], unix_fds=[theirs])

    def _on_socket_write(self, value: bytes) -> None:
        if len(value) > self._mtu - 3:
            logger.debug(
                "%s: dropped a %d-byte socket write (MTU %d)", self.object_path, len(value), self._mtu
            )
            return
        self.service.database.device.adapter.tree.run_soon(
            self._client.write_value(self.value_handle, value, with_response=False),
            what=f"write command to {self.object_path}",
        )

    def _release_write_socket(self) -> None:
        if self._write_socket is not None:
            self._write_socket.close()
            self._write_socket = None
            self.emit_properties_changed({"WriteAcquired": Variant("b", False)})

    async def _acquire_notify(self, owner: str) -> MethodResult:
        if self._notify_socket is not None:
            raise errors.not_permitted("Notify acquired")
        if self._notify_sessions:
            raise errors.in_progress()
        if not self.properties_bits & (PROP_NOTIFY | PROP_INDICATE):
            raise errors.not_supported()
        await self._subscribe()
        ours, theirs = _socket_pair()
        self._notify_socket = _NotifySocket(ours, self._release_notify_socket)
        self.emit_properties_changed({"NotifyAcquired": Variant("b", True)})
        return MethodResult(body=[0, self._mtu], unix_fds=[theirs])

    def _release_notify_socket(self) -> None:
        if self._notify_socket is None:
            return
        self._notify_socket.close()
        self._notify_socket = None
        self.emit_properties_changed({"NotifyAcquired": Variant("b", False)})
        self._unsubscribe_if_unused()

    # ---------------------------------------------------------------- notifications

    async def _start_notify(self, owner: str) -> None:
        device = self.service.database.device
        if device.disconnecting:
            raise errors.not_connected()
        if self._notify_socket is not None:
            raise errors.not_permitted("Notify acquired")
        if not self.properties_bits & (PROP_NOTIFY | PROP_INDICATE):
            raise errors.not_supported()
        if owner in self._notify_sessions:
            if self._subscribed:
                return
            raise errors.in_progress()
        self._notify_sessions[owner] = device.adapter.names.watch(owner, lambda: self._drop_session(owner))
        try:
            await self._subscribe()
        except BaseException:
            self._drop_session(owner)
            raise
        if not self.notifying:
            self.notifying = True
            self.emit_properties_changed({"Notifying": Variant("b", True)})

    async def _stop_notify(self, owner: str) -> None:
        if self._notify_socket is not None:
            self._release_notify_socket()
            return
        if owner not in self._notify_sessions:
            raise errors.failed("No notify session started")
        self._drop_session(owner)

    def _drop_session(self, owner: str) -> None:
        stop_watching = self._notify_sessions.pop(owner, None)
        if stop_watching is None:
            return
        stop_watching()
        if not self._notify_sessions and self.notifying:
            self.notifying = False
            self.emit_properties_changed({"Notifying": Variant("b", False)})
        self._unsubscribe_if_unused()

    async def _subscribe(self) -> None:
        """Enable notifications at the peripheral once, however many local clients ask."""
        if self._subscribed:
            return
        if self._subscribing is None:
            self._subscribing = asyncio.get_running_loop().create_task(
                gatt_operation(self._client.subscribe(self.proxy, self._on_value, prefer_notify=True))
            )
        try:
            await asyncio.shield(self._subscribing)
        finally:
            self._subscribing = None
        self._subscribed = True

    def _unsubscribe_if_unused(self) -> None:
        if self._notify_sessions or self._notify_socket is not None or not self._subscribed:
            return
        self._subscribed = False
        if self.service.database.device.connected:
            self.service.database.device.adapter.tree.run_soon(
                self._disable_notifications(), what=f"disable notifications on {self.object_path}"
            )

    async def _disable_notifications(self) -> None:
        try:
            await gatt_operation(self._client.unsubscribe(self.proxy, self._on_value))
        except errors.BluezError as error:  # best effort, as in BlueZ: the peer may be gone
            logger.debug("%s: disabling notifications failed: %s", self.object_path, error)

    def _on_value(self, value: bytes) -> None:
        """A notification or indication from the peripheral."""
        if self._notify_socket is not None:
            self._notify_socket.send(bytes(value))
        if self._notify_sessions:
            self._store_value(bytes(value))

    def release_everything(self) -> None:
        """On disconnect: close sockets (clients see a hang-up) and forget sessions."""
        if self._write_socket is not None:
            self._write_socket.close()
            self._write_socket = None
        if self._notify_socket is not None:
            self._notify_socket.close()
            self._notify_socket = None
        for stop_watching in self._notify_sessions.values():
            stop_watching()
        self._notify_sessions.clear()
        self._subscribed = False


class RemoteDescriptor(DBusInterface):
    NAME = DESCRIPTOR_INTERFACE
    METHODS: ClassVar[Mapping[str, Method]] = {
        "ReadValue": Method((("options", "a{sv}"),), (("value", "ay"),)),
        "WriteValue": Method((("value", "ay"), ("options", "a{sv}"))),
    }

    def __init__(self, characteristic: RemoteCharacteristic, proxy: DescriptorProxy) -> None:
        super().__init__()
        self.characteristic = characteristic
        self.proxy = proxy
        self.handle = int(proxy.handle)
        self.uuid = uuids.from_bumble(proxy.type)
        self.object_path = f"{characteristic.object_path}/desc{self.handle:04x}"
        self.value = b""
        self._busy = False

    @property
    def _client(self) -> Client:
        return self.characteristic.service.database.client

    def properties(self) -> dict[str, Variant]:
        return {
            "Handle": Variant("q", self.handle),
            "UUID": Variant("s", self.uuid),
            "Characteristic": Variant("o", self.characteristic.object_path),
            "Value": Variant("ay", self.value),
        }

    async def call(self, call: MethodCall) -> MethodResult:
        match call.member:
            case "ReadValue":
                offset, _ = _offset_and_type(call.args[0])
                mtu = self.characteristic.service.database.mtu
                if offset:
                    value = await read_blobs(self._client, self.handle, offset, mtu)
                else:
                    value = bytes(await gatt_operation(self._client.read_value(self.handle)))
                self.value = value
                self.emit_properties_changed({"Value": Variant("ay", value)})
                return MethodResult(body=[value])
            case "WriteValue":
                await self._write(bytes(call.args[0]), call.args[1])
                return EMPTY_RESULT
        return await super().call(call)

    async def _write(self, value: bytes, options: Mapping[str, Variant]) -> None:
        if self._busy:
            raise errors.in_progress()
        offset, _ = _offset_and_type(options)
        if self.uuid == CCC_UUID:
            # Notifications are configured with StartNotify/StopNotify, never by hand.
            raise errors.not_permitted("Write not permitted")
        mtu = self.characteristic.service.database.mtu
        self._busy = True
        try:
            if len(value) <= mtu - 3 and not offset:
                await gatt_operation(self._client.write_value(self.handle, value, with_response=True))
            else:
                await write_long(self._client, self.handle, value, offset, mtu, reliable=False)
        finally:
            self._busy = False


# ---------------------------------------------------------------------- long procedures


async def read_blobs(client: Client, handle: int, offset: int, mtu: int) -> bytes:
    """Read Long Characteristic Value from ``offset`` (Core Vol 3, Part G §4.8.3)."""
    value = b""
    while True:
        response = await gatt_operation(
            client.send_request(att.ATT_Read_Blob_Request(attribute_handle=handle, value_offset=offset))
        )
        if response.op_code == att.Opcode.ATT_ERROR_RESPONSE:
            if response.error_code == AttErrorCode.ATTRIBUTE_NOT_LONG and not value:
                raise errors.gatt_error(int(response.error_code))
            if (
                response.error_code in (AttErrorCode.ATTRIBUTE_NOT_LONG, AttErrorCode.INVALID_OFFSET)
                and value
            ):
                return value
            raise errors.gatt_error(int(response.error_code))
        part = bytes(response.part_attribute_value)
        value += part
        if len(part) < mtu - 1:
            return value
        offset += len(part)


async def write_long(
    client: Client, handle: int, value: bytes, offset: int, mtu: int, *, reliable: bool
) -> None:
    """Write Long / Reliable Writes (Core Vol 3, Part G §4.9.4-5) with parts of MTU-5 bytes."""
    part_size = mtu - 5
    starts = range(0, len(value), part_size) if value else range(1)
    for start in starts:
        part = value[start : start + part_size]
        response = await gatt_operation(
            client.send_request(
                att.ATT_Prepare_Write_Request(
                    attribute_handle=handle, value_offset=offset + start, part_attribute_value=part
                )
            )
        )
        failed_code: int | None = None
        if response.op_code == att.Opcode.ATT_ERROR_RESPONSE:
            failed_code = int(response.error_code)
        elif reliable and (
            bytes(response.part_attribute_value) != part or response.value_offset != offset + start
        ):
            failed_code = -1
        if failed_code is not None:
            await gatt_operation(client.send_request(att.ATT_Execute_Write_Request(flags=0x00)))
            if failed_code < 0:
                raise errors.failed("Bad address")  # BlueZ reports a reliable-write mismatch as EFAULT
            raise errors.gatt_error(failed_code)
    response = await gatt_operation(client.send_request(att.ATT_Execute_Write_Request(flags=0x01)))
    if response.op_code == att.Opcode.ATT_ERROR_RESPONSE:
        raise errors.gatt_error(int(response.error_code))
