"""The demo box: an unmodified bless GATT server that echoes what phones write.

Run on a node: ``DBUS_SYSTEM_BUS_ADDRESS=... python -m testbench.ble_demo.box --name BOX1``.
It prints JSON events on stdout (``ready``, ``write``, ``central_connected``,
``central_disconnected``...) and takes JSON commands on stdin (``notify``, ``status``, ``stop``).

bless hands its write callback neither the central nor the options BlueZ sent, so the box also
watches the bus: the WriteValue calls BlueZ makes (their ``mtu`` and ``device`` options) and the
``Device1`` objects of connected centrals. A real box can do the same to tell phones apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from testbench.ble_demo.profile import DEFAULT_CHUNK, FAIL_PREFIX, SERVICE_UUID, DemoCharacteristic

logger = logging.getLogger("demo-box")


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


class DemoBox:
    def __init__(self, *, name: str, adapter: str, chunk: int, report_writes: bool) -> None:
        self.name = name
        self.adapter = adapter
        self.chunk = chunk
        self.report_writes = report_writes
        self.writes = 0
        self.server: Any = None
        self._last_options: dict[str, Any] = {}

    async def start(self) -> None:
        from bless import (  # type: ignore[attr-defined]  # bless has no type information
            BlessServer,
            GATTAttributePermissions,
            GATTCharacteristicProperties,
        )

        props, perms = GATTCharacteristicProperties, GATTAttributePermissions
        server = BlessServer(name=self.name, adapter=self.adapter)
        server.read_request_func = self._on_read
        server.write_request_func = self._on_write
        await server.add_new_service(SERVICE_UUID)
        characteristics = (
            (DemoCharacteristic.ECHO, props.write | props.write_without_response, None, perms.writeable),
            (DemoCharacteristic.STRICT, props.write, None, perms.writeable),
            (DemoCharacteristic.TX, props.read | props.notify, bytearray(b"hello"), perms.readable),
            (DemoCharacteristic.INFO, props.read, None, perms.readable),
        )
        for characteristic, properties, value, permissions in characteristics:
            await server.add_new_characteristic(
                SERVICE_UUID, characteristic.value, properties, value, permissions
            )
        await server.start()
        self.server = server
        # bless drops the options of WriteValue; read them off its bus connection first.
        server.bus.add_message_handler(self._observe_call)

    def _observe_call(self, message: Any) -> None:
        if getattr(message, "member", None) == "WriteValue" and len(message.body) == 2:
            self._last_options = {key: variant.value for key, variant in message.body[1].items()}

    def _on_read(self, characteristic: Any, **_: Any) -> bytearray:
        if characteristic.uuid == DemoCharacteristic.INFO.value:
            return bytearray(f"{self.name};writes={self.writes}".encode())
        return bytearray(characteristic.value or b"")

    def _on_write(self, characteristic: Any, value: Any, **_: Any) -> None:
        data = bytes(value)
        self.writes += 1
        role = DemoCharacteristic(characteristic.uuid)
        if self.report_writes:
            emit(
                "write",
                characteristic=role.name.lower(),
                length=len(data),
                mtu=self._last_options.get("mtu"),
                device=self._last_options.get("device"),
                link=self._last_options.get("link"),
            )
        if role is DemoCharacteristic.STRICT and data.startswith(FAIL_PREFIX):
            raise RuntimeError("the application rejected this write")
        self.notify(data)

    def notify(self, data: bytes) -> None:
        """Send ``data`` to every subscribed phone, in notifications of at most ``chunk`` bytes."""
        tx = self.server.get_characteristic(DemoCharacteristic.TX.value)
        for start in range(0, max(len(data), 1), self.chunk):
            tx.value = bytearray(data[start : start + self.chunk])
            self.server.update_value(SERVICE_UUID, DemoCharacteristic.TX.value)

    async def status(self) -> dict[str, Any]:
        return {
            "advertising": bool(await self.server.is_advertising()),
            "subscribed": bool(await self.server.is_connected()),
            "writes": self.writes,
        }


class CentralWatcher:
    """Reports centrals connecting to and leaving our adapter (Device1.Connected)."""

    def __init__(self, adapter: str) -> None:
        self.prefix = f"/org/bluez/{adapter}/"
        self.connected: set[str] = set()
        self.bus: MessageBus | None = None

    async def start(self) -> None:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self.bus = bus
        bus.add_message_handler(self._on_message)
        for rule in (
            "type='signal',sender='org.bluez',interface='org.freedesktop.DBus.Properties',"
            "member='PropertiesChanged',arg0='org.bluez.Device1'",
            "type='signal',sender='org.bluez',interface='org.freedesktop.DBus.ObjectManager',member='InterfacesAdded'",
        ):
            await bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="AddMatch",
                    signature="s",
                    body=[rule],
                )
            )

    def _on_message(self, message: Message) -> None:
        if message.message_type != MessageType.SIGNAL:
            return
        if message.member == "InterfacesAdded" and message.signature == "oa{sa{sv}}":
            path, interfaces = message.body
            device = interfaces.get("org.bluez.Device1")
            if device is not None and path.startswith(self.prefix):
                connected = device.get("Connected")
                if connected is not None and connected.value:
                    self._connected(path, device["Address"].value)
        elif message.member == "PropertiesChanged" and (message.path or "").startswith(self.prefix):
            changed = message.body[1]
            if "Connected" in changed:
                address = (message.path or "").rsplit("dev_", 1)[-1].replace("_", ":")
                if changed["Connected"].value:
                    self._connected(message.path or "", address)
                elif message.path in self.connected:
                    self.connected.discard(message.path or "")
                    emit("central_disconnected", address=address, path=message.path)

    def _connected(self, path: str, address: str) -> None:
        if path not in self.connected:
            self.connected.add(path)
            emit("central_connected", address=address, path=path)


async def serve(args: argparse.Namespace) -> int:
    watcher = CentralWatcher(args.adapter)
    await watcher.start()
    box = DemoBox(name=args.name, adapter=args.adapter, chunk=args.chunk, report_writes=not args.quiet)
    await box.start()
    emit("ready", name=args.name, **(await box.status()))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        try:
            command = json.loads(line)
            name = command["cmd"]
        except (ValueError, KeyError, TypeError):
            emit("error", message=f"not a command: {line!r}")
            continue
        if name == "notify":
            box.notify(bytes.fromhex(command.get("data", "")))
            emit("notified")
        elif name == "status":
            emit("status", **(await box.status()), centrals=sorted(watcher.connected))
        elif name == "stop":
            await box.server.stop()
            emit("stopped")
            return 0
        else:
            emit("error", message=f"unknown command {name!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbench.ble_demo.box", description=__doc__)
    parser.add_argument("--name", required=True, help="Advertised local name.")
    parser.add_argument("--adapter", default="hci0")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="Largest notification, in bytes.")
    parser.add_argument("--quiet", action="store_true", help="No event per write (for benchmarks).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
