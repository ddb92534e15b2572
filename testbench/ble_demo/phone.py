"""The demo phone: an unmodified bleak client driven by JSON commands on stdin.

Run on a node: ``DBUS_SYSTEM_BUS_ADDRESS=... python -m testbench.ble_demo.phone --adapter hci0``.
Every command line ``{"cmd": ..., "id": n, ...}`` gets one reply ``{"reply": n, "ok": ...}``;
notifications the phone is not waiting for and disconnections are reported as events. Timings
are taken here, next to bleak, so the JSON pipe adds nothing to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bleak import BleakClient
from bleak.args.bluez import BlueZScannerArgs
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.exc import BleakDBusError, BleakGATTProtocolError

from phone_client.central import scan_until
from testbench.ble_demo.profile import DEFAULT_CHUNK, SERVICE_UUID, DemoCharacteristic

logger = logging.getLogger("demo-phone")


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class CommandError(Exception):
    """A command that cannot run in the phone's current state."""


def _error_details(error: BaseException) -> dict[str, Any]:
    details: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, BleakGATTProtocolError):
        details["att_code"] = int(error.code)
    if isinstance(error, BleakDBusError):
        details["dbus_error"] = error.dbus_error
    return details


class DemoPhone:
    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.device: BLEDevice | None = None
        self.client: BleakClient | None = None
        self.notifications: asyncio.Queue[bytes] = asyncio.Queue()
        self.waiting_for_echo = False

    def _bluez(self) -> BlueZScannerArgs:
        return {"adapter": self.adapter}

    def _require_client(self) -> BleakClient:
        if self.client is None or not self.client.is_connected:
            raise CommandError("not connected")
        return self.client

    def _characteristic(self, name: str) -> BleakGATTCharacteristic:
        client = self._require_client()
        characteristic = client.services.get_characteristic(DemoCharacteristic.by_name(name).value)
        if characteristic is None:
            raise CommandError(f"the box has no {name} characteristic")
        return characteristic

    async def scan(self, name: str, service: str = SERVICE_UUID, timeout_s: float = 10.0) -> dict[str, Any]:
        started = time.perf_counter()
        seen = await scan_until(
            lambda _device, advertisement: advertisement.local_name == name,
            timeout_s=timeout_s,
            service_uuids=[service],
            bluez=self._bluez(),
        )
        elapsed = time.perf_counter() - started
        if seen is None:
            raise CommandError(f"{name} not found within {timeout_s} s")
        device = self.device = seen[0]
        return {"address": device.address, "name": device.name, "elapsed_ms": elapsed * 1000}

    async def connect(self, timeout_s: float = 10.0) -> dict[str, Any]:
        if self.device is None:
            raise CommandError("scan first")
        self.notifications = asyncio.Queue()
        client = BleakClient(self.device, disconnected_callback=self._on_disconnected, timeout=timeout_s)
        started = time.perf_counter()
        await client.connect()
        elapsed = time.perf_counter() - started
        self.client = client
        # The documented way to learn the negotiated MTU on BlueZ (bleak's mtu_size example).
        await client._backend._acquire_mtu()  # type: ignore[attr-defined]
        rx = client.services.get_characteristic(DemoCharacteristic.ECHO.value)
        return {
            "elapsed_ms": elapsed * 1000,
            "mtu": client.mtu_size,
            "max_write_without_response_size": rx.max_write_without_response_size if rx else None,
            "services": sorted(service.uuid for service in client.services),
        }

    def _on_disconnected(self, client: BleakClient) -> None:
        emit({"event": "disconnected", "t": time.monotonic(), "address": client.address})

    def _on_notification(self, _: BleakGATTCharacteristic, data: bytearray) -> None:
        if self.waiting_for_echo:
            self.notifications.put_nowait(bytes(data))
        else:
            emit({"event": "notification", "data": bytes(data).hex(), "t": time.monotonic()})

    async def subscribe(self) -> dict[str, Any]:
        await self._require_client().start_notify(self._characteristic("tx"), self._on_notification)
        return {}

    async def unsubscribe(self) -> dict[str, Any]:
        await self._require_client().stop_notify(self._characteristic("tx"))
        return {}

    async def read(self, characteristic: str) -> dict[str, Any]:
        value = await self._require_client().read_gatt_char(self._characteristic(characteristic))
        return {"data": bytes(value).hex()}

    async def write(self, characteristic: str, data: str, response: bool = True) -> dict[str, Any]:
        await self._require_client().write_gatt_char(
            self._characteristic(characteristic), bytes.fromhex(data), response
        )
        return {}

    async def exchange(
        self,
        data: str,
        characteristic: str = "echo",
        response: bool = True,
        chunk: int = DEFAULT_CHUNK,
        timeout_s: float = 5.0,
        count: int = 1,
    ) -> dict[str, Any]:
        """Write ``data`` and wait for its echo, ``count`` times; the round-trip times in ms.

        Echoes of other phones' messages (bless notifies every subscriber) are skipped, so each
        phone must send distinct data.
        """
        message = bytes.fromhex(data)
        target = self._characteristic(characteristic)
        client = self._require_client()
        expected = [message[i : i + chunk] for i in range(0, max(len(message), 1), chunk)]
        round_trips: list[float] = []
        self.waiting_for_echo = True
        try:
            for _ in range(count):
                while not self.notifications.empty():  # echoes of earlier rounds are not ours
                    self.notifications.get_nowait()
                started = time.perf_counter()
                await client.write_gatt_char(target, message, response)
                await asyncio.wait_for(self._await_chunks(expected), timeout_s)
                round_trips.append((time.perf_counter() - started) * 1000)
        finally:
            self.waiting_for_echo = False
        return {"round_trips_ms": round_trips}

    async def _await_chunks(self, expected: list[bytes]) -> None:
        index = 0
        while index < len(expected):
            if await self.notifications.get() == expected[index]:
                index += 1

    async def disconnect(self) -> dict[str, Any]:
        if self.client is not None:
            await self.client.disconnect()
            self.client = None
        return {}

    async def status(self) -> dict[str, Any]:
        connected = self.client is not None and self.client.is_connected
        return {"connected": connected}


async def serve(args: argparse.Namespace) -> int:
    phone = DemoPhone(args.adapter)
    handlers: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
        "scan": phone.scan,
        "connect": phone.connect,
        "subscribe": phone.subscribe,
        "unsubscribe": phone.unsubscribe,
        "read": phone.read,
        "write": phone.write,
        "exchange": phone.exchange,
        "disconnect": phone.disconnect,
        "status": phone.status,
    }
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit({"event": "ready", "adapter": args.adapter})
    while line := await reader.readline():
        try:
            command = json.loads(line)
            name = command.pop("cmd")
            request_id = command.pop("id", None)
        except (ValueError, KeyError, TypeError, AttributeError):
            emit({"event": "error", "message": f"not a command: {line!r}"})
            continue
        if name == "exit":
            break
        handler = handlers.get(name)
        if handler is None:
            emit({"reply": request_id, "ok": False, "error": {"type": "UnknownCommand", "message": name}})
            continue
        try:
            result = await handler(**command)
        except Exception as error:  # reported to the driver; the phone keeps serving
            emit({"reply": request_id, "ok": False, "error": _error_details(error)})
        else:
            emit({"reply": request_id, "ok": True, **result})
    await phone.disconnect()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbench.ble_demo.phone", description=__doc__)
    parser.add_argument("--adapter", default="hci0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # bleak warns that bluetoothctl is missing; the emulator answers for BlueZ >= 5.55.
    logging.getLogger("bleak.backends.bluezdbus.version").setLevel(logging.ERROR)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
