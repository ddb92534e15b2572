"""The box's GATT server on bless: a thin shell that moves fragments between BlueZ and the controller.

The service of docs/protocol.md §3 plus the Device Information Service. bless calls the write
handler synchronously and gives no central identity; writes are queued and fed to the controller
in order by one task, and notifications go out through `update_value` one fragment at a time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bless import (  # type: ignore[attr-defined]
    BlessGATTCharacteristic,
    BlessServer,
    GATTAttributePermissions,
    GATTCharacteristicProperties,
)

from box_peripheral.controller import SOFTWARE_VERSION, BoxController
from protocol import gatt

log = logging.getLogger("powerbox.box.gatt")

PROTOCOL_VERSIONS = (1,)
MAX_QUEUED_WRITES = 256
STOP_TIMEOUT_S = 3.0


class BoxGattServer:
    def __init__(self, controller: BoxController) -> None:
        self._controller = controller
        self._server: Any = None
        self._writes: asyncio.Queue[bytes] = asyncio.Queue(maxsize=MAX_QUEUED_WRITES)
        self._worker: asyncio.Task[None] | None = None

    @property
    def advertised_name(self) -> str:
        return gatt.advertised_name(self._controller.box_id)

    async def start(self) -> None:
        server = BlessServer(name=self.advertised_name)
        server.read_request_func = self._read
        server.write_request_func = self._write
        # bless advertises the first service it was given: ours, not the DIS
        await server.add_new_service(gatt.SERVICE_UUID)
        await server.add_new_characteristic(
            gatt.SERVICE_UUID,
            gatt.WRITE_CHARACTERISTIC_UUID,
            GATTCharacteristicProperties.write | GATTCharacteristicProperties.write_without_response,
            None,
            GATTAttributePermissions.writeable,
        )
        await server.add_new_characteristic(
            gatt.SERVICE_UUID,
            gatt.NOTIFY_CHARACTERISTIC_UUID,
            GATTCharacteristicProperties.notify,
            None,
            GATTAttributePermissions.readable,
        )
        await server.add_new_characteristic(
            gatt.SERVICE_UUID,
            gatt.INFO_CHARACTERISTIC_UUID,
            GATTCharacteristicProperties.read,
            None,
            GATTAttributePermissions.readable,
        )
        await server.add_new_service(gatt.DEVICE_INFORMATION_SERVICE_UUID)
        for uuid, text in (
            (gatt.MANUFACTURER_NAME_UUID, "powerbox"),
            (gatt.MODEL_NUMBER_UUID, "powerbox outlet box"),
            (gatt.SERIAL_NUMBER_UUID, self._controller.box_id),
            (gatt.SOFTWARE_REVISION_UUID, SOFTWARE_VERSION),
        ):
            await server.add_new_characteristic(
                gatt.DEVICE_INFORMATION_SERVICE_UUID,
                uuid,
                GATTCharacteristicProperties.read,
                bytearray(text.encode()),
                GATTAttributePermissions.readable,
            )
        self._server = server
        self._controller.notify = self._notify
        self._worker = asyncio.create_task(self._feed_controller())
        await server.start()
        log.info("advertising as %s", self.advertised_name)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        if self._server is not None:
            try:
                # a BlueZ that is already gone may never answer: do not let it hold the box up
                await asyncio.wait_for(self._server.stop(), STOP_TIMEOUT_S)
            except Exception as exc:  # bless/dbus errors on the way down change nothing
                log.warning("bless stop: %s", exc or type(exc).__name__)

    def _read(self, characteristic: BlessGATTCharacteristic, **options: Any) -> bytearray:
        if str(characteristic.uuid).lower() == gatt.INFO_CHARACTERISTIC_UUID:
            return bytearray(self._controller.box_info(PROTOCOL_VERSIONS).encode())
        return bytearray(characteristic.value or b"")

    def _write(self, characteristic: BlessGATTCharacteristic, value: Any, **options: Any) -> None:
        if str(characteristic.uuid).lower() != gatt.WRITE_CHARACTERISTIC_UUID:
            return
        try:
            self._writes.put_nowait(bytes(value))
        except asyncio.QueueFull:
            # the phone outruns the box; dropping a fragment makes its message fail with a framing
            # error, which the phone sees and retries: better than unbounded memory
            log.warning("write queue full: fragment dropped")

    async def _feed_controller(self) -> None:
        while True:
            fragment = await self._writes.get()
            try:
                await self._controller.on_write(fragment)
            except Exception:  # never let one bad write stop the radio
                log.exception("unexpected error handling a write")

    def _notify(self, fragment: bytes) -> None:
        server = self._server
        if server is None:
            return
        server.get_characteristic(gatt.NOTIFY_CHARACTERISTIC_UUID).value = bytearray(fragment)
        server.update_value(gatt.SERVICE_UUID, gatt.NOTIFY_CHARACTERISTIC_UUID)
