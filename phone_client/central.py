"""The phone's BLE central on bleak: a thin shell around `protocol.session.PhoneSession`.

Finds the box of a QR label by its advertisement, connects, subscribes, runs the handshake and
moves fragments both ways; requests and answers are matched by request id, and what the box sends
on its own (live readings, a session it ended) waits in `BoxLink.unsolicited`. bleak's and D-Bus's
errors are translated here and never leave this module (docs/protocol.md §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakBluetoothNotAvailableError, BleakError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from phone_client.errors import BoxNotTrustedError, BoxRefusedError, BoxUnreachableError, PhoneError
from protocol import framing, gatt, messages
from protocol.errors import LocalProtocolError, MessageError
from protocol.session import BoxAuthenticated, ConnectionFailed, MessageReceived, PhoneEvent, PhoneSession
from protocol.tokens import BoxCertificate

__all__ = [
    "BoxLink",
    "BoxNotTrustedError",
    "BoxRefusedError",
    "BoxUnreachableError",
    "FoundBox",
    "connect_to_box",
    "find_box",
    "read_box_info",
]

log = logging.getLogger("powerbox.phone.ble")
_T = TypeVar("_T")

DEFAULT_SCAN_TIMEOUT_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 20.0
DEFAULT_ANSWER_TIMEOUT_S = 10.0


def _dbus_errors() -> tuple[type[BaseException], ...]:
    try:
        from dbus_fast.errors import DBusError
    except ImportError:  # not Linux: bleak speaks CoreBluetooth or WinRT there
        return ()
    return (DBusError,)


# What bleak and the system's Bluetooth stack raise, beside BleakError itself: a missing or
# refused D-Bus socket is an OSError, a link that drops mid-call an EOFError.
_RADIO_ERRORS: tuple[type[BaseException], ...] = (
    BleakError,
    OSError,
    EOFError,
    TimeoutError,
    *_dbus_errors(),
)


@contextlib.contextmanager
def _radio(doing: str) -> Iterator[None]:
    """Translate the radio's errors while `doing` something."""
    try:
        yield
    except BleakBluetoothNotAvailableError as exc:
        raise BoxUnreachableError(f"{doing}: Bluetooth is not available ({exc.args[0]})") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise BoxUnreachableError(
            f"{doing}: no Bluetooth service on this machine (is BlueZ running?)"
        ) from None
    except TimeoutError:
        raise BoxUnreachableError(f"{doing}: timed out") from None
    except _RADIO_ERRORS as exc:
        raise BoxUnreachableError(f"{doing}: {exc or type(exc).__name__}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundBox:
    device: BLEDevice
    name: str
    rssi: int
    scan_ms: int


async def scan_until(
    matches: Callable[[BLEDevice, AdvertisementData], bool], *, timeout_s: float, **scanner_options: Any
) -> tuple[BLEDevice, AdvertisementData] | None:
    """Scan until an advertisement `matches` (the device and it), or None after `timeout_s`.

    The callback is registered before scanning starts: BlueZ reports a device it already knows, if
    unchanged, once as discovery starts, and bleak's find_device_by_filter registers its callback
    only after starting, so it can miss that one report and wait out its whole timeout."""
    found: asyncio.Future[tuple[BLEDevice, AdvertisementData]] = asyncio.get_running_loop().create_future()

    def on_advertisement(device: BLEDevice, advertisement: AdvertisementData) -> None:
        if not found.done() and matches(device, advertisement):
            found.set_result((device, advertisement))

    async with BleakScanner(detection_callback=on_advertisement, **scanner_options):
        try:
            return await asyncio.wait_for(found, timeout_s)
        except TimeoutError:
            return None


async def find_box(label: gatt.QrLabel, *, timeout_s: float = DEFAULT_SCAN_TIMEOUT_S) -> FoundBox:
    """Scan for the advertisement of the box on `label` (name derived from its id + our service).

    Several boxes may share a name (docs/protocol.md §4); the handshake tells the right one."""
    wanted = gatt.advertised_name(label.box_id)
    started = time.monotonic()

    def matches(device: BLEDevice, advertisement: AdvertisementData) -> bool:
        return advertisement.local_name == wanted and gatt.SERVICE_UUID in (
            uuid.lower() for uuid in advertisement.service_uuids
        )

    with _radio("scanning"):
        seen = await scan_until(matches, timeout_s=timeout_s)
    if seen is None:
        raise BoxUnreachableError(f"no box advertising as {wanted} nearby (is it in range and powered?)")
    device, rssi = seen[0], seen[1].rssi
    return FoundBox(device=device, name=wanted, rssi=rssi, scan_ms=int((time.monotonic() - started) * 1000))


async def read_box_info(found: FoundBox, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> gatt.BoxInfo:
    """The box's public facts (versions, which outlets are free), read before any handshake.

    Unauthenticated: a hint for the user, never a reason to trust the box (docs/protocol.md §3)."""
    client = BleakClient(found.device, timeout=timeout_s)
    with _radio("connecting"):
        await client.connect()
    try:
        with _radio("reading the box info"):
            value = await client.read_gatt_char(gatt.INFO_CHARACTERISTIC_UUID)
        try:
            return gatt.BoxInfo.decode(bytes(value))
        except MessageError as exc:
            raise BoxNotTrustedError(f"unreadable box info: {exc.detail}", code=exc.code) from None
    finally:
        with contextlib.suppress(*_RADIO_ERRORS):
            await client.disconnect()


class BoxLink:
    """One secure connection to one box. Use `connect_to_box()`."""

    def __init__(self, client: BleakClient, session: PhoneSession, clock: Callable[[], int]) -> None:
        self._client = client
        self._session = session
        self._clock = clock
        loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[messages.BoxMessage]] = {}
        self._authenticated: asyncio.Future[BoxCertificate] = loop.create_future()
        self._closed: asyncio.Future[PhoneError] = loop.create_future()
        self._write_lock = asyncio.Lock()
        self.unsolicited: asyncio.Queue[messages.BoxMessage] = asyncio.Queue()
        self.failure: PhoneError | None = None
        self.early_answers: list[asyncio.Future[messages.BoxMessage]] = []

    @property
    def certificate(self) -> BoxCertificate | None:
        return self._session.certificate

    @property
    def connection_id(self) -> int:
        return self._session.connection_id

    # --- from the radio ---

    async def _on_notification(self, _: object, data: bytearray) -> None:
        """bleak calls this for every notification; it must never raise."""
        events = self._session.receive_fragment(bytes(data), self._clock())
        await self._write_out()
        for event in events:
            self._dispatch(event)

    def _on_disconnected(self, _: BleakClient) -> None:
        self._fail(BoxUnreachableError("the box disconnected (out of range, or it restarted)"))

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
            case ConnectionFailed(code=code, detail=detail, by_peer=by_peer):
                if by_peer:
                    self._fail(BoxRefusedError(f"the box closed the connection: {detail}", code=code))
                else:
                    self._fail(BoxNotTrustedError(detail, code=code))

    def _fail(self, error: PhoneError) -> None:
        """The connection is over: everyone waiting learns why, once."""
        if self.failure is not None:
            return
        self.failure = error
        self._closed.set_result(error)
        waiting: list[asyncio.Future[BoxCertificate] | asyncio.Future[messages.BoxMessage]] = [
            self._authenticated,
            *self._pending.values(),
        ]
        for future in waiting:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here: nobody may be waiting for an early answer
        self._pending.clear()

    async def _write_out(self) -> None:
        """Write every queued fragment, in order, one writer at a time; a failed write ends the link."""
        async with self._write_lock:
            while fragments := self._session.data_to_send():
                for fragment in fragments:
                    if isinstance(self.failure, BoxUnreachableError):
                        return  # the link is gone; what is left would go nowhere
                    try:
                        await self._client.write_gatt_char(
                            gatt.WRITE_CHARACTERISTIC_UUID, fragment, response=False
                        )
                    except _RADIO_ERRORS as exc:
                        self._fail(
                            BoxUnreachableError(f"write to the box failed: {exc or type(exc).__name__}")
                        )
                        return

    # --- for the caller ---

    async def _wait(self, awaitable: asyncio.Future[_T], timeout_s: float, what: str) -> _T:
        """`awaitable`'s result, unless the link fails or `timeout_s` passes first."""
        closed = asyncio.shield(self._closed)
        either: set[asyncio.Future[_T] | asyncio.Future[PhoneError]] = {awaitable, closed}
        try:
            done, _ = await asyncio.wait(either, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if awaitable in done:
            return awaitable.result()
        if self.failure is not None:
            raise self.failure
        raise BoxUnreachableError(f"the box did not answer {what} in time")

    async def authenticated(self, timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S) -> BoxCertificate:
        """The box's certificate once it passed S2 and proved its key (docs/protocol.md §7.3)."""
        return await self._wait(asyncio.shield(self._authenticated), timeout_s, "the handshake")

    def _send(self, build: Callable[[int], messages.PhoneMessage]) -> asyncio.Future[messages.BoxMessage]:
        if self.failure is not None:
            raise self.failure
        request = build(self._session.new_request_id())
        future: asyncio.Future[messages.BoxMessage] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        try:
            self._session.send(request)
        except LocalProtocolError as exc:
            self._pending.pop(request.request_id, None)
            raise BoxUnreachableError(f"the connection is closed ({exc.detail})") from None
        return future

    async def request(
        self, build: Callable[[int], messages.PhoneMessage], timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S
    ) -> messages.BoxMessage:
        """Send a request built with a fresh request id; the box's answer, or BoxRefusedError."""
        future = self._send(build)
        await self._write_out()
        return await self.answer(future, timeout_s)

    async def answer(
        self, future: asyncio.Future[messages.BoxMessage], timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S
    ) -> messages.BoxMessage:
        """The answer to a request sent earlier (`send_early`); an ErrorMessage becomes BoxRefusedError."""
        try:
            answer = await self._wait(future, timeout_s, "the request")
        finally:
            if not future.done():
                future.cancel()
        if isinstance(answer, messages.ErrorMessage):
            raise BoxRefusedError(answer.code.name, code=answer.code)
        return answer

    def send_early(
        self, build: Callable[[int], messages.PhoneMessage]
    ) -> asyncio.Future[messages.BoxMessage]:
        """Queue a request to go right behind message_3 (before the handshake ends)."""
        return self._send(build)

    async def next_message(self, timeout_s: float | None = None) -> messages.BoxMessage:
        """The next message the box sent on its own (a reading, a session it ended)."""
        getter = asyncio.ensure_future(self.unsolicited.get())
        try:
            return await self._wait(getter, timeout_s if timeout_s is not None else 1e9, "with a message")
        finally:
            if not getter.done():
                getter.cancel()

    async def next_unsolicited(
        self, kind: type[messages.Message], timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S
    ) -> messages.Message:
        deadline = time.monotonic() + timeout_s
        while True:
            message = await self.next_message(max(0.0, deadline - time.monotonic()))
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
    early_requests: Sequence[Callable[[int], messages.PhoneMessage]] = (),
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> AsyncIterator[tuple[BoxLink, asyncio.Future[messages.BoxMessage] | None]]:
    """Connect, subscribe, start EDHOC. `early_requests` (then `early_request`) go right behind
    message_3 with no round trip of their own; their answers are in `link.early_answers`."""
    link: BoxLink | None = None

    def disconnected(client: BleakClient) -> None:
        if link is not None:
            link._on_disconnected(client)

    client = BleakClient(found.device, disconnected_callback=disconnected, timeout=connect_timeout_s)
    with _radio(f"connecting to {found.name}"):
        await client.connect()
    try:
        # bleak on BlueZ reports mtu_size 23 until it acquires a write handle; the write
        # characteristic's own limit is the negotiated ATT MTU less the 3-byte ATT header
        write = client.services.get_characteristic(gatt.WRITE_CHARACTERISTIC_UUID)
        if write is None:
            raise BoxNotTrustedError(f"{found.name} is not a powerbox: no write characteristic")
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
        with _radio("subscribing to the box"):
            await client.start_notify(gatt.NOTIFY_CHARACTERISTIC_UUID, link._on_notification)
        link.early_answers = [link.send_early(build) for build in early_requests]
        early = link.send_early(early_request) if early_request is not None else None
        session.connect()
        await link._write_out()
        yield link, early
    finally:
        with contextlib.suppress(*_RADIO_ERRORS):
            await client.disconnect()
