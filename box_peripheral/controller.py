"""Everything the box decides on its own: sessions, local fee control, interlocks, faults.

The radio shell hands every GATT write to `on_write` and sends what `notify` is given; the poll
loop calls `poll_once` about once a second. The controller talks to the hardware through
`BoxHardware` and keeps every durable fact in `BoxStore`, so a kill -9 at any point leaves a
state a restart can close cleanly (DESIGN §4, docs/protocol.md §8).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from box_peripheral.clock import BoxClock
from box_peripheral.hardware.base import BoxHardware, HardwareError, OutletReading
from box_peripheral.store import (
    CLOCK_HIGH_WATER,
    LAST_SYNC,
    REVOCATION_LIST,
    TARIFF_TABLE,
    BoxStore,
    StoredSession,
    StoreError,
)
from protocol import cose, encoding, gatt, messages, sealing, tariff, tokens
from protocol.errors import ErrorCode, PowerboxError
from protocol.session import (
    BoxConnections,
    BoxEvent,
    ConnectionFailed,
    DoorUnlockRequested,
    HandshakeCompleted,
    RequestReceived,
    RequestRefused,
    StartRequested,
    TopUpRequested,
    UpdateReceived,
)
from protocol.tokens import BoxCertificate, Door, EndReason, EntryKind

log = logging.getLogger("powerbox.box")

SOFTWARE_VERSION = "powerbox 0.1.0"


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxPolicy:
    """Operating limits; defaults suit a market or site box."""

    poll_interval_ms: int = 1000
    idle_power_w: int = 5  # below this an outlet counts as idle
    idle_timeout_s: int = 600
    door_window_s: int = 300  # after a session ends its owner may still open the outlet door
    relay_latency_ms: int = 30  # how early to open the breaker before the balance would run out
    max_carry_entries: int = 40
    max_carry_bytes: int = 6000
    default_price_fen_per_kwh: int = 120


@dataclass(slots=True)
class _Live:
    """What the poll loop keeps per running session, besides the store."""

    # Where the energy register last stepped, to estimate energy finer than its resolution:
    # the register value and the monotonic ms when the step happened (midpoint of two polls).
    anchor_register_wh: int | None = None
    anchor_ms: int = 0
    last_poll_ms: int = 0
    trip_at_ms: int | None = None  # the balance runs out before the next poll: trip then
    connections: set[int] = field(default_factory=set)

    def estimated_mwh(self, register_wh: int, power_w: int, now_ms: int) -> int:
        """Energy register plus what the present power has added since its last step, in mWh."""
        if self.anchor_register_wh is None or register_wh != self.anchor_register_wh:
            # a new step: it happened somewhere since the previous poll; assume halfway
            self.anchor_ms = (
                (self.last_poll_ms + now_ms) // 2 if self.anchor_register_wh is not None else now_ms
            )
            self.anchor_register_wh = register_wh
        self.last_poll_ms = now_ms
        return register_wh * 1000 + power_w * (now_ms - self.anchor_ms) // 3600


class BoxController:
    def __init__(
        self,
        *,
        certificate: BoxCertificate,
        signed_certificate: bytes,
        box_key: cose.SigningKey,
        operator_keys: Mapping[bytes, Ed25519PublicKey],
        operator_encryption_key: X25519PublicKey,
        hardware: BoxHardware,
        store: BoxStore,
        clock: BoxClock,
        policy: BoxPolicy,
        random_bytes: Callable[[int], bytes],
        monotonic_ms: Callable[[], int],
    ) -> None:
        self.certificate = certificate
        self.box_id = certificate.box_id
        self._operator_keys = operator_keys
        self._operator_encryption_key = operator_encryption_key
        self.hardware = hardware
        self.store = store
        self.clock = clock
        self.policy = policy
        self._random = random_bytes
        self._monotonic_ms = monotonic_ms
        self._revocations: tokens.RevocationList | None = None
        self._tariff_table: tokens.TariffTable | None = None
        self._spent: set[bytes] = set()
        self._live: dict[bytes, _Live] = {}
        self._busy_outlets: set[int] = set()
        self._persisted_last_sync = clock.last_sync
        # breakers the box failed to open (bus down): retried every poll until the relay obeys
        self._must_open: set[int] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._reservations: list[tokens.Reservation] = []
        self._lock = asyncio.Lock()
        self.notify: Callable[[bytes], Awaitable[None] | None] = lambda fragment: None
        self.connections = BoxConnections(
            box_key=box_key.private_key,
            signed_certificate=signed_certificate,
            operator_keys=operator_keys,
            box_id=self.box_id,
            box_state=self,
            ephemeral_keys=X25519PrivateKey.generate,
        )

    # BoxState (protocol.session): synchronous views of what the store holds.

    def revocations(self) -> tokens.RevocationList | None:
        return self._revocations

    def tariff(self) -> tuple[int, int]:
        if self._tariff_table is None:
            return 0, self.policy.default_price_fen_per_kwh
        price = self._tariff_table.price_for(self.box_id, self.certificate.tariff_region)
        return self._tariff_table.version, price

    def is_spent(self, grant_id: bytes) -> bool:
        return grant_id in self._spent

    # Start-up and recovery

    async def start(self) -> None:
        """Open breakers, reload state, close sessions a crash interrupted, log the boot."""
        for outlet in self.certificate.outlets:
            await self._open_breaker(outlet.number)
        revocations = await self.store.setting(REVOCATION_LIST)
        if revocations is not None:
            self._revocations = tokens.RevocationList.decode_unverified(revocations)
        table = await self.store.setting(TARIFF_TABLE)
        if table is not None:
            self._tariff_table = tokens.TariffTable.decode_unverified(table)
        await self.store.append(
            kind=EntryKind.BOOT,
            body=tokens.BootBody(software_version=SOFTWARE_VERSION),
            time=self.clock.now(),
            quality=self.clock.quality(),
        )
        for session in await self.store.running_sessions():
            # the register may have moved while we were down, but the breaker was not ours to
            # trust: charge only what was persisted while the box was watching
            await self._close(
                session,
                EndReason.POWER_LOSS,
                end_register_wh=session.last_register_wh,
                end_time=session.last_reading_time,
                entry_time=self.clock.now(),  # the receipt says when power was last seen; the ledger, now
            )
        self._spent = await self.store.spent_grant_ids()
        self._busy_outlets = {s.outlet for s in await self.store.running_sessions()}

    def box_info(self, protocol_versions: tuple[int, ...]) -> gatt.BoxInfo:
        """Public facts for the info characteristic: which outlets can start a session now."""
        return gatt.BoxInfo(
            box_id=self.box_id,
            protocol_versions=protocol_versions,
            outlets=tuple(
                gatt.OutletAvailability(outlet=o.number, available=o.number not in self._busy_outlets)
                for o in self.certificate.outlets
            ),
        )

    # The radio side

    async def on_write(self, fragment: bytes) -> None:
        """One GATT write from any phone."""
        async with self._lock:
            now = self.clock.now()
            for connection_id, event in self.connections.receive_fragment(fragment, now):
                try:
                    await self._handle(connection_id, event, now)
                except PowerboxError as exc:
                    log.warning("request on connection %04x failed: %s", connection_id, exc.detail)
                    self._error(connection_id, _request_id(event), exc.code)
            await self._flush()

    async def _flush(self) -> None:
        for fragment in self.connections.data_to_send():
            result = self.notify(fragment)
            if result is not None:
                await result

    def _error(self, connection_id: int, request_id: int, code: ErrorCode) -> None:
        self.connections.send(connection_id, messages.ErrorMessage(request_id=request_id, code=code))

    def _phone_key(self, connection_id: int) -> bytes:
        session = self.connections.session(connection_id)
        if session is None or session.phone_key is None:
            raise PowerboxError("connection gone", code=ErrorCode.CHANNEL_CLOSED)
        return cose.public_key_bytes(session.phone_key)

    async def _handle(self, connection_id: int, event: BoxEvent, now: int) -> None:
        match event:
            case HandshakeCompleted(phone_key=phone_key):
                owner = cose.public_key_bytes(phone_key)
                for session in await self.store.running_sessions():
                    if session.owner_key == owner:
                        self._live.setdefault(session.session_id, _Live()).connections.add(connection_id)
            case StartRequested():
                await self._start(connection_id, event, now)
            case TopUpRequested():
                await self._top_up(connection_id, event, now)
            case DoorUnlockRequested(request=request, token=token):
                await self._observe_operator_time(token.issued_at)
                await self._open_with_token(connection_id, request.request_id, token)
            case UpdateReceived():
                await self._update(connection_id, event)
            case RequestReceived(request=request):
                await self._request(connection_id, request, now)
            case RequestRefused(request_id=request_id, code=code, detail=detail):
                log.info("refused request %d on %04x: %s (%s)", request_id, connection_id, code.name, detail)
            case ConnectionFailed(code=code, detail=detail):
                log.info("connection %04x closed: %s (%s)", connection_id, code.name, detail)
                for live in self._live.values():
                    live.connections.discard(connection_id)

    async def _observe_operator_time(self, signed_time: int) -> None:
        moved = self.clock.observe_operator_time(signed_time)
        if moved is not None:
            before, after = moved
            await self.store.append(
                kind=EntryKind.CLOCK_ADJUSTED,
                body=tokens.ClockAdjustedBody(previous_time=before, new_time=after),
                time=after,
                quality=self.clock.quality(),
            )

    async def _start(self, connection_id: int, event: StartRequested, now: int) -> None:
        request, grant = event.request, event.grant
        outlet = self.certificate.outlet(request.outlet)
        if outlet is None:
            raise PowerboxError("no such outlet", code=ErrorCode.OUTLET_UNKNOWN)
        if any(s.outlet == outlet.number for s in await self.store.running_sessions()):
            raise PowerboxError("outlet busy", code=ErrorCode.OUTLET_BUSY)
        if event.reservation is None and self._reserved_for_someone_else(
            outlet.number, cose.public_key_bytes(grant.phone_key), now
        ):
            raise PowerboxError("outlet reserved", code=ErrorCode.OUTLET_RESERVED)
        try:
            doors = await self.hardware.read_doors()
            if not doors.metering_box_closed:
                raise PowerboxError("metering-box door open", code=ErrorCode.METERING_DOOR_OPEN)
            start_reading = await self.hardware.read_outlet(outlet.number)
        except HardwareError as exc:
            raise PowerboxError(exc.detail, code=ErrorCode.OUTLET_FAULT) from None
        await self._observe_operator_time(grant.issued_at)
        now = self.clock.now()
        version, price = self.tariff()
        session = StoredSession(
            session_id=self._random(tokens.ID_SIZE),
            outlet=outlet.number,
            owner_key=cose.public_key_bytes(grant.phone_key),
            user_id=grant.user_id,
            grant_ids=(grant.grant_id,),
            grant_amounts_fen=(grant.amount_fen,),
            balance_fen=grant.amount_fen,
            max_end_time=now + grant.max_session_seconds,
            start_time=now,
            start_register_wh=start_reading.energy_wh,
            last_register_wh=start_reading.energy_wh,
            last_reading_time=now,
            last_load_time=now,
            tariff_version=version,
            price_fen_per_kwh=price,
            end_time=None,
            end_reason=None,
        )
        try:
            await self.store.start_session(
                session,
                tokens.SessionStartedBody(
                    session_id=session.session_id,
                    outlet=session.outlet,
                    grant_id=grant.grant_id,
                    user_id=grant.user_id,
                    phone_key=session.owner_key,
                    start_time=now,
                    start_register_wh=session.start_register_wh,
                    tariff_version=version,
                    price_fen_per_kwh=price,
                    amount_fen=grant.amount_fen,
                ),
                quality=self.clock.quality(),
            )
        except StoreError as exc:
            raise PowerboxError(exc.detail, code=exc.code) from None
        self._spent.add(grant.grant_id)
        self._busy_outlets.add(outlet.number)
        self._live[session.session_id] = _Live(connections={connection_id})
        try:
            await self.hardware.set_breaker(outlet.number, True)
        except HardwareError as exc:
            await self._fault(session, exc)
            raise PowerboxError(exc.detail, code=ErrorCode.OUTLET_FAULT) from None
        # the lock pulse takes half a second: power and the answer do not wait for it
        self._pulse_door(Door.OUTLET, outlet.number, session.session_id, answer=None)
        self.connections.send(
            connection_id,
            messages.SessionStarted(
                request_id=request.request_id,
                session_id=session.session_id,
                outlet=outlet.number,
                start_time=now,
                start_register_wh=session.start_register_wh,
                tariff_version=version,
                price_fen_per_kwh=price,
                balance_fen=session.balance_fen,
            ),
        )
        log.info(
            "session %s started on outlet %d for %d fen",
            session.session_id.hex(),
            outlet.number,
            session.balance_fen,
        )

    async def _owned(self, connection_id: int, session_id: bytes) -> StoredSession:
        session = await self.store.session(session_id)
        if session is None:
            raise PowerboxError("unknown session", code=ErrorCode.SESSION_UNKNOWN)
        if session.owner_key != self._phone_key(connection_id):
            raise PowerboxError("not the owner", code=ErrorCode.SESSION_NOT_OWNER)
        return session

    async def _top_up(self, connection_id: int, event: TopUpRequested, now: int) -> None:
        session = await self._owned(connection_id, event.request.session_id)
        if session.end_time is not None:
            raise PowerboxError("session ended", code=ErrorCode.SESSION_UNKNOWN)
        await self._observe_operator_time(event.grant.issued_at)
        try:
            updated = await self.store.top_up(
                session.session_id,
                event.grant.grant_id,
                event.grant.amount_fen,
                time=self.clock.now(),
                quality=self.clock.quality(),
            )
        except StoreError as exc:
            raise PowerboxError(exc.detail, code=exc.code) from None
        self._spent.add(event.grant.grant_id)
        live = self._live.get(updated.session_id)
        if live is not None:
            live.trip_at_ms = None  # the next poll plans again with the larger balance
        self.connections.send(
            connection_id,
            messages.ToppedUp(
                request_id=event.request.request_id,
                session_id=updated.session_id,
                balance_fen=updated.balance_fen,
            ),
        )

    async def _request(
        self,
        connection_id: int,
        request: messages.StopSession
        | messages.OpenOutletDoor
        | messages.RequestLedgerEntries
        | messages.ListSessions,
        now: int,
    ) -> None:
        match request:
            case messages.StopSession():
                session = await self._owned(connection_id, request.session_id)
                if session.end_time is not None:
                    raise PowerboxError("session already ended", code=ErrorCode.SESSION_UNKNOWN)
                await self.end_session(
                    session.session_id,
                    EndReason.USER_STOP,
                    request_id=request.request_id,
                    requester=connection_id,
                )
            case messages.OpenOutletDoor():
                session = await self._owned(connection_id, request.session_id)
                if session.end_time is not None and now - session.end_time > self.policy.door_window_s:
                    raise PowerboxError("session ended too long ago", code=ErrorCode.SESSION_UNKNOWN)
                self._pulse_door(
                    Door.OUTLET,
                    session.outlet,
                    session.session_id,
                    answer=(connection_id, request.request_id),
                )
            case messages.RequestLedgerEntries():
                await self._carry(connection_id, request)
            case messages.ListSessions():
                owner = self._phone_key(connection_id)
                listed = (await self.store.sessions_of(owner, since=now - 86_400))[-messages.MAX_LIST_ITEMS :]
                summaries = []
                for session in listed:
                    live = self._live.get(session.session_id)
                    if live is not None:
                        live.connections.add(connection_id)
                    cost = self._cost(session)
                    summaries.append(
                        messages.SessionSummary(
                            session_id=session.session_id,
                            outlet=session.outlet,
                            start_time=session.start_time,
                            energy_wh=session.energy_wh,
                            cost_fen=cost,
                            remaining_fen=session.balance_fen - cost,
                            running=session.end_time is None,
                        )
                    )
                self.connections.send(
                    connection_id,
                    messages.SessionList(request_id=request.request_id, sessions=tuple(summaries)),
                )
                # the receipts of listed sessions that ended, for an owner who was away at the time
                for session in listed:
                    if session.end_reason is not None:
                        await self._resend_receipt(connection_id, session.session_id, session.end_reason)

    async def _resend_receipt(self, connection_id: int, session_id: bytes, end_reason: EndReason) -> None:
        signed = await self.store.receipt(session_id)
        if signed is None:  # ended before the box kept receipts beside its ledger
            return
        self.connections.send(
            connection_id,
            messages.SessionEnded(request_id=0, session_id=session_id, end_reason=end_reason, receipt=signed),
        )

    def _pulse_door(
        self, door: Door, outlet: int, token_id: bytes, *, answer: tuple[int, int] | None
    ) -> None:
        """Pulse a lock in the background (it lasts about half a second), then log it and answer
        (connection id, request id) with DoorOpened, or with OUTLET_FAULT if the bus failed."""
        task = asyncio.create_task(self._pulse(door, outlet, token_id, answer))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _pulse(self, door: Door, outlet: int, token_id: bytes, answer: tuple[int, int] | None) -> None:
        try:
            await self.hardware.unlock_door(door, outlet)
            failure = None
        except HardwareError as exc:
            log.error("cannot unlock %s %d: %s", door.name, outlet, exc.detail)
            failure = exc
        async with self._lock:
            if failure is None:
                await self.store.append(
                    kind=EntryKind.DOOR_OPENED,
                    body=tokens.DoorBody(door=door, outlet=outlet, token_id=token_id),
                    time=self.clock.now(),
                    quality=self.clock.quality(),
                )
            if answer is not None:
                connection_id, request_id = answer
                reply: messages.BoxMessage = (
                    messages.DoorOpened(request_id=request_id, door=door, outlet=outlet)
                    if failure is None
                    else messages.ErrorMessage(request_id=request_id, code=ErrorCode.OUTLET_FAULT)
                )
                self.connections.send(connection_id, reply)
            await self._flush()

    async def settle(self) -> None:
        """Wait for lock pulses in progress (tests, and a clean shutdown)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _open_with_token(self, connection_id: int, request_id: int, token: tokens.UnlockToken) -> None:
        if token.door is Door.METERING_BOX and await self.store.running_sessions():
            # opening the metering box cuts every outlet (interlock): stop sessions first, remotely or by hand
            raise PowerboxError("sessions running", code=ErrorCode.BOX_BUSY)
        if token.door is Door.OUTLET and self.certificate.outlet(token.outlet) is None:
            raise PowerboxError("no such outlet", code=ErrorCode.OUTLET_UNKNOWN)
        self._pulse_door(token.door, token.outlet, token.token_id, answer=(connection_id, request_id))

    async def _update(self, connection_id: int, event: UpdateReceived) -> None:
        request = event.request
        match request:
            case messages.PushRevocationList():
                signed = request.revocation_list
            case messages.PushTariffTable():
                signed = request.tariff_table
            case messages.PushLedgerAck():
                signed = request.ledger_ack
        kind, version = await self._apply_update(event.update, signed)
        self.connections.send(
            connection_id, messages.UpdateAccepted(request_id=request.request_id, kind=kind, version=version)
        )

    async def _apply_update(
        self, update: tokens.RevocationList | tokens.TariffTable | tokens.LedgerAck, signed: bytes
    ) -> tuple[messages.UpdateKind, int]:
        """Keep a verified operator update (from a phone or the uplink) if it is newer than the box's."""
        await self._observe_operator_time(update.issued_at)
        quality = self.clock.quality()
        match update:
            case tokens.RevocationList():
                if self._revocations is not None and update.version <= self._revocations.version:
                    raise PowerboxError("older revocation list", code=ErrorCode.STALE_VERSION)
                await self.store.replace_versioned(
                    REVOCATION_LIST,
                    signed,
                    kind=EntryKind.REVOCATION_UPDATED,
                    version=update.version,
                    time=self.clock.now(),
                    quality=quality,
                )
                self._revocations = update
                return messages.UpdateKind.REVOCATION_LIST, update.version
            case tokens.TariffTable():
                if self._tariff_table is not None and update.version <= self._tariff_table.version:
                    raise PowerboxError("older tariff table", code=ErrorCode.STALE_VERSION)
                await self.store.replace_versioned(
                    TARIFF_TABLE,
                    signed,
                    kind=EntryKind.TARIFF_UPDATED,
                    version=update.version,
                    time=self.clock.now(),
                    quality=quality,
                )
                self._tariff_table = update
                return messages.UpdateKind.TARIFF_TABLE, update.version
            case tokens.LedgerAck():
                if update.box_id != self.box_id:
                    raise PowerboxError("ack for another box", code=ErrorCode.TOKEN_WRONG_AUDIENCE)
                try:
                    fresh = await self.store.apply_ack(update, signed, time=self.clock.now(), quality=quality)
                except StoreError as exc:
                    raise PowerboxError(exc.detail, code=exc.code) from None
                if not fresh:
                    raise PowerboxError("older ack", code=ErrorCode.STALE_VERSION)
                return messages.UpdateKind.LEDGER_ACK, update.sequence

    async def accept_from_uplink(self, kind: messages.UpdateKind, signed: bytes) -> bool:
        """An update the server sent over 4G: verified like one a phone relays. True if kept."""
        cls: type[tokens.RevocationList | tokens.TariffTable | tokens.LedgerAck] = {
            messages.UpdateKind.REVOCATION_LIST: tokens.RevocationList,
            messages.UpdateKind.TARIFF_TABLE: tokens.TariffTable,
            messages.UpdateKind.LEDGER_ACK: tokens.LedgerAck,
        }[kind]
        async with self._lock:
            try:
                await self._apply_update(cls.verify(signed, self._operator_keys), signed)
            except PowerboxError as exc:
                if exc.code is not ErrorCode.STALE_VERSION:
                    log.warning("uplink %s refused: %s", kind.name, exc.detail)
                return False
            return True

    def replace_reservations(self, signed_reservations: list[bytes]) -> None:
        """Every current reservation for this box, as the server last sent them."""
        reservations = []
        for signed in signed_reservations:
            try:
                reservation = tokens.Reservation.verify(signed, self._operator_keys)
            except PowerboxError as exc:
                log.warning("reservation refused: %s", exc.detail)
                continue
            if reservation.box_id == self.box_id:
                reservations.append(reservation)
        self._reservations = reservations

    def reservation_ids(self) -> list[bytes]:
        return [r.reservation_id for r in self._reservations]

    def _reserved_for_someone_else(self, outlet: int, phone_key: bytes, now: int) -> bool:
        return any(
            r.outlet == outlet
            and r.not_before <= now < r.expires_at
            and cose.public_key_bytes(r.phone_key) != phone_key
            for r in self._reservations
        )

    async def ledger_after_ack(self, limit: int) -> list[bytes]:
        """Entries the operator has not acknowledged yet, oldest first (for the uplink)."""
        return await self.store.entries(after=await self.store.acked_sequence(), limit=limit)

    async def uplink_state(self) -> tuple[int, int, int]:
        """(revocation version, tariff version, acked sequence) the box holds."""
        return (
            0 if self._revocations is None else self._revocations.version,
            0 if self._tariff_table is None else self._tariff_table.version,
            await self.store.acked_sequence(),
        )

    def outlet_availability(self) -> list[tuple[int, bool]]:
        return [(o.number, o.number not in self._busy_outlets) for o in self.certificate.outlets]

    async def _carry(self, connection_id: int, request: messages.RequestLedgerEntries) -> None:
        """Hand a bounded batch of unacknowledged entries to a phone, sealed to the operator (S9)."""
        acked = await self.store.acked_sequence()
        limit = max(1, min(request.max_entries, self.policy.max_carry_entries))
        batch: list[bytes] = []
        size = 0
        for entry in await self.store.entries(after=acked, limit=limit):
            if batch and size + len(entry) > self.policy.max_carry_bytes:
                break
            batch.append(entry)
            size += len(entry)
        if not batch:
            first = last = acked
            sealed = b""
        else:
            first = tokens.LedgerEntry.decode_unverified(batch[0]).sequence
            last = first + len(batch) - 1
            sealed = sealing.seal(
                encoding.encode(batch),
                recipient=self._operator_encryption_key,
                ephemeral_key=X25519PrivateKey.generate(),
                iv=self._random(sealing.IV_SIZE),
            )
        self.connections.send(
            connection_id,
            messages.LedgerEntries(
                request_id=request.request_id,
                box_id=self.box_id,
                first_sequence=first,
                last_sequence=last,
                sealed_batch=sealed,
            ),
        )

    # Fee control and interlocks: the poll loop

    def _cost(self, session: StoredSession) -> int:
        return tariff.charged_cost_fen(session.energy_wh, session.price_fen_per_kwh, session.balance_fen)

    def _limit_wh(self, session: StoredSession) -> int | None:
        """The register value at which the balance is used up; None when energy is free."""
        affordable = tariff.energy_affordable_wh(session.balance_fen, session.price_fen_per_kwh)
        return None if affordable is None else session.start_register_wh + affordable

    async def poll_once(self) -> None:
        """Read doors and meters, enforce every limit, send live readings."""
        async with self._lock:
            await self._poll()
            await self._flush()

    async def _poll(self) -> None:
        now = self.clock.now()
        await self.store.put_setting(CLOCK_HIGH_WATER, now.to_bytes(8, "big"))
        last_sync = self.clock.last_sync
        if last_sync is not None and last_sync != self._persisted_last_sync:
            # kept across restarts (a reboot must not make every entry "never synced"); here, off
            # the unlock path, at most one poll after the operator time was seen
            await self.store.put_setting(LAST_SYNC, last_sync.to_bytes(8, "big"))
            self._persisted_last_sync = last_sync
        await self._retry_open_breakers()
        running = await self.store.running_sessions()
        if not running:
            return
        try:
            doors = await self.hardware.read_doors()
        except HardwareError as exc:
            for session in running:
                await self._fault(session, exc)
            return
        if not doors.metering_box_closed:
            await self._tamper(running)
            return
        for session in running:
            await self._poll_session(session, now)

    async def _poll_session(self, session: StoredSession, now: int) -> None:
        outlet = self.certificate.outlet(session.outlet)
        assert outlet is not None
        try:
            reading = await self.hardware.read_outlet(session.outlet)
        except HardwareError as exc:
            await self._fault(session, exc)
            return
        if reading.energy_wh < session.last_register_wh:
            await self._fault(
                session,
                HardwareError(
                    "energy register went backwards", code=ErrorCode.METER_BAD_READING, outlet=session.outlet
                ),
            )
            return
        live = self._live.setdefault(session.session_id, _Live())
        had_load = reading.power_w >= self.policy.idle_power_w
        await self.store.record_reading(
            session.session_id, register_wh=reading.energy_wh, time=now, had_load=had_load
        )
        session = await self.store.session(session.session_id) or session
        limit = self._limit_wh(session)
        if reading.power_w > outlet.rated_power_w:
            await self.end_session(session.session_id, EndReason.OVERLOAD)
            return
        now_ms = self._monotonic_ms()
        estimated_mwh = live.estimated_mwh(reading.energy_wh, reading.power_w, now_ms)
        if limit is not None and (
            estimated_mwh >= limit * 1000 or (live.trip_at_ms is not None and now_ms >= live.trip_at_ms)
        ):
            await self.end_session(session.session_id, EndReason.BALANCE_EXHAUSTED)
            return
        if now >= session.max_end_time:
            await self.end_session(session.session_id, EndReason.MAX_DURATION)
            return
        if not had_load and now - session.last_load_time >= self.policy.idle_timeout_s:
            await self.end_session(session.session_id, EndReason.IDLE)
            return
        live.trip_at_ms = None
        if limit is not None and reading.power_w > 0:
            # predict one interval ahead: if the balance runs out before the next poll, the poll
            # loop wakes at that moment (less the relay's latency) to trip
            milliseconds_left = (limit * 1000 - estimated_mwh) * 3600 // reading.power_w
            if milliseconds_left <= self.policy.poll_interval_ms + self.policy.relay_latency_ms:
                live.trip_at_ms = now_ms + max(0, milliseconds_left - self.policy.relay_latency_ms)
        self._send_reading(session, reading, now, live)

    def next_wakeup_ms(self) -> int | None:
        """The earliest planned trip, for the poll loop to wake at; None if none is planned."""
        deadlines = [live.trip_at_ms for live in self._live.values() if live.trip_at_ms is not None]
        return min(deadlines, default=None)

    def _send_reading(self, session: StoredSession, reading: OutletReading, now: int, live: _Live) -> None:
        cost = self._cost(session)
        message = messages.MeterReading(
            session_id=session.session_id,
            time=now,
            energy_wh=session.energy_wh,
            power_w=reading.power_w,
            voltage_dv=reading.voltage_dv,
            current_ma=reading.current_ma,
            cost_fen=cost,
            remaining_fen=session.balance_fen - cost,
        )
        for connection_id in list(live.connections):
            if not self.connections.send(connection_id, message):
                live.connections.discard(connection_id)

    async def _open_breaker(self, outlet: int) -> bool:
        """Cut an outlet; if the bus refuses, remember it and retry on every poll."""
        try:
            await self.hardware.set_breaker(outlet, False)
        except HardwareError as exc:
            log.error("cannot open breaker of outlet %d (will retry): %s", outlet, exc.detail)
            self._must_open.add(outlet)
            return False
        self._must_open.discard(outlet)
        return True

    async def _retry_open_breakers(self) -> None:
        for outlet in sorted(self._must_open):
            await self._open_breaker(outlet)

    async def _tamper(self, running: list[StoredSession]) -> None:
        for session in running:
            await self._open_breaker(session.outlet)
        await self.store.append(
            kind=EntryKind.TAMPER,
            body=tokens.TamperBody(tripped_outlets=tuple(s.outlet for s in running)),
            time=self.clock.now(),
            quality=self.clock.quality(),
        )
        for session in running:
            await self.end_session(session.session_id, EndReason.TAMPER, breaker_open=True)

    async def _fault(self, session: StoredSession, error: HardwareError) -> None:
        log.error("fault on outlet %d: %s", session.outlet, error.detail)
        await self._open_breaker(session.outlet)
        await self.store.append(
            kind=EntryKind.FAULT,
            body=tokens.FaultBody(code=error.code, outlet=session.outlet, detail=error.detail[:200]),
            time=self.clock.now(),
            quality=self.clock.quality(),
        )
        current = await self.store.session(session.session_id)
        if current is not None and current.end_time is None:
            await self._close(
                current, EndReason.FAULT, end_register_wh=current.last_register_wh, end_time=self.clock.now()
            )

    async def end_session(
        self,
        session_id: bytes,
        reason: EndReason,
        *,
        request_id: int = 0,
        requester: int | None = None,
        breaker_open: bool = False,
    ) -> bytes | None:
        """Open the breaker, read the final register, sign the receipt, tell the owner."""
        session = await self.store.session(session_id)
        if session is None or session.end_time is not None:
            return None
        end_register = session.last_register_wh
        if not breaker_open:
            await self._open_breaker(session.outlet)
        try:
            final = await self.hardware.read_outlet(session.outlet)
            if final.energy_wh >= session.last_register_wh:
                end_register = final.energy_wh
        except HardwareError as exc:
            log.error("ending session on outlet %d without a final reading: %s", session.outlet, exc.detail)
        return await self._close(
            session,
            reason,
            end_register_wh=end_register,
            end_time=self.clock.now(),
            request_id=request_id,
            requester=requester,
        )

    async def _close(
        self,
        session: StoredSession,
        reason: EndReason,
        *,
        end_register_wh: int,
        end_time: int,
        entry_time: int | None = None,
        request_id: int = 0,
        requester: int | None = None,
    ) -> bytes | None:
        energy = end_register_wh - session.start_register_wh
        receipt = tokens.SessionReceipt(
            session_id=session.session_id,
            grant_ids=session.grant_ids,
            outlet=session.outlet,
            start_time=session.start_time,
            end_time=max(end_time, session.start_time),
            start_register_wh=session.start_register_wh,
            end_register_wh=end_register_wh,
            energy_wh=energy,
            tariff_version=session.tariff_version,
            price_fen_per_kwh=session.price_fen_per_kwh,
            cost_fen=tariff.charged_cost_fen(energy, session.price_fen_per_kwh, session.balance_fen),
            end_reason=reason,
        )
        signed = await self.store.end_session(
            session.session_id, receipt, quality=self.clock.quality(), entry_time=entry_time
        )
        if signed is None:
            return None
        self._busy_outlets.discard(session.outlet)
        live = self._live.pop(session.session_id, None)
        targets = set(live.connections) if live is not None else set()
        if requester is not None:
            targets.add(requester)
        for connection_id in targets:
            self.connections.send(
                connection_id,
                messages.SessionEnded(
                    request_id=request_id if connection_id == requester else 0,
                    session_id=session.session_id,
                    end_reason=reason,
                    receipt=signed,
                ),
            )
        log.info(
            "session %s ended: %s, %d Wh, %d fen",
            session.session_id.hex(),
            reason.name,
            energy,
            receipt.cost_fen,
        )
        return signed

    async def remote_stop(self, *, session_id: bytes | None = None, outlet: int | None = None) -> bool:
        """Remote fee control from the server: stop a session, or trip an outlet (its breaker opens
        whether or not a session runs there). True if the box did what was asked."""
        async with self._lock:
            stopped = False
            for session in await self.store.running_sessions():
                if session.session_id == session_id or session.outlet == outlet:
                    await self.end_session(session.session_id, EndReason.REMOTE_STOP)
                    stopped = True
            if outlet is not None and self.certificate.outlet(outlet) is not None:
                stopped = await self._open_breaker(outlet) or stopped
            await self._flush()
            return stopped


def _request_id(event: BoxEvent) -> int:
    request = getattr(event, "request", None)
    return int(getattr(request, "request_id", 0))
