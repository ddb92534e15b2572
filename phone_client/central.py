"""The phone's BLE central on bleak: a thin shell around `protocol.session.PhoneSession`.

Finds the box of a QR label by its advertisement, connects, subscribes, runs the handshake and
moves fragments both ways; requests and answers are matched by request id. bleak's errors are
translated here and never leave this module (docs/protocol.md §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import framing, gatt, messages
from protocol.errors import ErrorCode, PowerboxError
from protocol.session import BoxAuthenticated, ConnectionFailed, MessageReceived, PhoneEvent, PhoneSession
from protocol.tokens import BoxCertificate

log = logging.getLogger("powerbox.phone.ble")


class BoxUnreachableError(PowerboxError):
    """No box with this label answered, or the radio link failed."""

    code = ErrorCode.CHANNEL_CLOSED


class BoxRefusedError(PowerboxError):
    """The box refused a request; `code` is the box's error code."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundBox:
    device: BLEDevice
    name: str
    rssi: int
    scan_ms: int


async def find_box(label: gatt.QrLabel, *, timeout_s: float = 10.0) -> FoundBox:
    """Scan for the advertisement of the box on `label` (name derived from its id + our service)."""
    wanted = gatt.advertised_name(label.box_id)
    started = time.monotonic()

    def matches(device: BLEDevice, advertisement: AdvertisementData) -> bool:
        return advertisement.local_name == wanted and gatt.SERVICE_UUID in (
            uuid.lower() for uuid in advertisement.service_uuids
        )

    try:
        found = await BleakScanner.find_device_by_filter(matches, timeout=timeout_s)
    except BleakError as exc:
        raise BoxUnreachableError(f"scan failed: {exc}") from None
    if found is None:
        raise BoxUnreachableError(f"no box advertising as {wanted} nearby")
    return FoundBox(device=found, name=wanted, rssi=0, scan_ms=int((time.monotonic() - started) * 1000))


class BoxLink:
    """One secure connection to one box. Use `connect_to_box()`."""

    def __init__(self, client: BleakClient, session: PhoneSession, clock: Callable[[], int]) -> None:
        self._client = client
        self._session = session
        self._clock = clock
        self._pending: dict[int, asyncio.Future[messages.Message]] = {}
        self._authenticated: asyncio.Future[BoxCertificate] = asyncio.get_running_loop().create_future()
        self.unsolicited: asyncio.Queue[messages.Message] = asyncio.Queue()
        self.failure: ConnectionFailed | None = None

    @property
    def certificate(self) -> BoxCertificate | None:
        return self._session.certificate

    async def _on_notification(self, _: object, data: bytearray) -> None:
        events = self._session.receive_fragment(bytes(data), self._clock())
        await self._write_out()
        for event in events:
            self._dispatch(event)

    def _dispatch(self, event: PhoneEvent) -> None:
        match event:
            case BoxAuthenticated(certificate=certificate):
                if not self._authenticated.done():
                    self._authenticated.set_result(certificate)
            case MessageReceived(message=message):
                request_id = getattr(message, "request_id", 0)
                future = self._pending.pop(request_id, None) if request_id else None
                if future is not None and not future.done():
                    future.set_result(message)
                else:
                    self.unsolicited.put_nowait(message)
            case ConnectionFailed():
                self.failure = event
                error = BoxRefusedError(event.detail, code=event.code)
                if not self._authenticated.done():
                    self._authenticated.set_exception(error)
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(error)
                self._pending.clear()

    async def _write_out(self) -> None:
        for fragment in self._session.data_to_send():
            try:
                await self._client.write_gatt_char(gatt.WRITE_CHARACTERISTIC_UUID, fragment, response=False)
            except BleakError as exc:
                raise BoxUnreachableError(f"write failed: {exc}") from None

    async def authenticated(self, timeout_s: float = 10.0) -> BoxCertificate:
        try:
            return await asyncio.wait_for(asyncio.shield(self._authenticated), timeout_s)
        except TimeoutError:
            raise BoxUnreachableError("the box did not answer the handshake") from None

    async def request(
        self, build: Callable[[int], messages.PhoneMessage], timeout_s: float = 10.0
    ) -> messages.Message:
        """Send a request built with a fresh request id; return the box's answer or raise BoxRefusedError."""
        if self.failure is not None:
            raise BoxRefusedError(self.failure.detail, code=self.failure.code)
        request = build(self._session.new_request_id())
        future: asyncio.Future[messages.Message] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        self._session.send(request)
        await self._write_out()
        try:
            answer = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            self._pending.pop(request.request_id, None)
            raise BoxUnreachableError("the box did not answer") from None
        if isinstance(answer, messages.ErrorMessage):
            raise BoxRefusedError(answer.code.name, code=answer.code)
        return answer

    def send_early(self, build: Callable[[int], messages.PhoneMessage]) -> asyncio.Future[messages.Message]:
        """Queue a request to go right behind message_3 (before the handshake ends)."""
        request = build(self._session.new_request_id())
        future: asyncio.Future[messages.Message] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        self._session.send(request)
        return future

    async def next_unsolicited(
        self, kind: type[messages.Message], timeout_s: float = 10.0
    ) -> messages.Message:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BoxUnreachableError(f"no {kind.__name__} from the box")
            try:
                message = await asyncio.wait_for(self.unsolicited.get(), remaining)
            except TimeoutError:
                raise BoxUnreachableError(f"no {kind.__name__} from the box") from None
            if isinstance(message, kind):
                return message


@contextlib.asynccontextmanager
async def connect_to_box(
    found: FoundBox,
    *,
    label: gatt.QrLabel,
    phone_key: Ed25519PrivateKey,
    operator_keys: Mapping[bytes, Ed25519PublicKey],
    clock: Callable[[], int] = lambda: int(time.time()),
    early_request: Callable[[int], messages.PhoneMessage] | None = None,
) -> AsyncIterator[tuple[BoxLink, asyncio.Future[messages.Message] | None]]:
    """Connect, subscribe, start EDHOC (with an optional request right behind message_3)."""
    client = BleakClient(found.device)
    try:
        await client.connect()
    except (BleakError, TimeoutError) as exc:
        raise BoxUnreachableError(f"connect failed: {exc}") from None
    try:
        # bleak on BlueZ reports mtu_size 23 until it acquires a write handle; the write
        # characteristic's own limit is the negotiated ATT MTU less the 3-byte ATT header
        write = client.services.get_characteristic(gatt.WRITE_CHARACTERISTIC_UUID)
        if write is None:
            raise BoxUnreachableError("not a powerbox: no write characteristic")
        att_mtu = max(
            framing.ATT_MTU_MIN, min(framing.ATT_MTU_MAX, write.max_write_without_response_size + 3)
        )
        session = PhoneSession(
            connection_id=1 + secrets.randbelow(framing.MAX_CONNECTION_ID),
            phone_key=phone_key,
            ephemeral_key=X25519PrivateKey.generate(),
            label=label,
            operator_keys=operator_keys,
            att_mtu=att_mtu,
        )
        link = BoxLink(client, session, clock)
        try:
            await client.start_notify(gatt.NOTIFY_CHARACTERISTIC_UUID, link._on_notification)
        except BleakError as exc:
            raise BoxUnreachableError(f"subscribe failed: {exc}") from None
        early = link.send_early(early_request) if early_request is not None else None
        session.connect()
        await link._write_out()
        yield link, early
    finally:
        with contextlib.suppress(BleakError, TimeoutError, EOFError):
            await client.disconnect()
