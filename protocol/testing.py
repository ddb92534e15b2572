"""Deterministic keys and sample objects for tests, vectors and the walk-through.

Never used by a running box, phone or server: their keys come from their own stores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import cose, messages, tariff, tokens
from protocol.errors import ErrorCode
from protocol.session import (
    BoxConnections,
    BoxEvent,
    PhoneEvent,
    PhoneSession,
    RequestReceived,
    RequestRefused,
    StartRequested,
    TopUpRequested,
    UpdateReceived,
)
from protocol.tokens import (
    BalanceGrant,
    BoxCertificate,
    EndReason,
    EntryBody,
    EntryKind,
    LedgerEntry,
    OutletSpec,
    RevocationList,
    SessionReceipt,
    SessionStartedBody,
    TimeQuality,
)


def seed(label: str) -> bytes:
    return hashlib.sha256(b"powerbox test key " + label.encode()).digest()


def ed25519_key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed(label))


def x25519_key(label: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(seed(label))


def operator_key(label: str = "operator") -> cose.SigningKey:
    return cose.SigningKey.from_private_key(ed25519_key(label))


SAMPLE_TIME = 1_795_000_000  # 2026-11-18, a fixed "now" for vectors
SAMPLE_BOX_ID = "BOX-7F3A21"


def sample_certificate(box_key: Ed25519PrivateKey, *, box_id: str = SAMPLE_BOX_ID) -> BoxCertificate:
    return BoxCertificate(
        box_id=box_id,
        box_public_key=box_key.public_key(),
        outlets=tuple(OutletSpec(number=n, rated_power_w=3500) for n in (1, 2, 3, 4)),
        latitude_microdeg=31_230_416,
        longitude_microdeg=121_473_701,
        tariff_region="SH-01",
        issued_at=SAMPLE_TIME - 86_400,
        expires_at=SAMPLE_TIME + 5 * 365 * 86_400,
    )


def sample_grant(
    phone_key: Ed25519PrivateKey,
    *,
    grant_id: bytes = b"grant-01",
    amount_fen: int = 500,
    box_id: str | None = SAMPLE_BOX_ID,
    max_price_fen_per_kwh: int = 150,
    issued_at: int = SAMPLE_TIME - 3600,
    expires_at: int = SAMPLE_TIME + 7 * 86_400,
) -> BalanceGrant:
    return BalanceGrant(
        grant_id=grant_id,
        user_id=1001,
        box_id=box_id,
        phone_key=phone_key.public_key(),
        amount_fen=amount_fen,
        max_price_fen_per_kwh=max_price_fen_per_kwh,
        max_session_seconds=12 * 3600,
        issued_at=issued_at,
        expires_at=expires_at,
    )


class ScriptedBox:
    """A minimal in-memory box behind `BoxConnections`, for tests, vectors and the walk-through.

    It plays what the box daemon does with each event (spend the grant, start, top up, stop, sign
    the receipt) with no hardware and no storage, so the whole conversation runs in memory.
    """

    def __init__(
        self,
        *,
        box_key: Ed25519PrivateKey,
        signed_certificate: bytes,
        operator_keys: dict[bytes, Ed25519PublicKey],
        box_id: str = SAMPLE_BOX_ID,
        price_fen_per_kwh: int = 120,
        tariff_version: int = 1,
        ephemeral_keys: Callable[[], X25519PrivateKey],
        session_ids: Callable[[], bytes],
    ) -> None:
        self.box_id = box_id
        self.box_signing_key = cose.SigningKey.from_private_key(box_key)
        self.connections = BoxConnections(
            box_key=box_key,
            signed_certificate=signed_certificate,
            operator_keys=operator_keys,
            box_id=box_id,
            box_state=self,
            ephemeral_keys=ephemeral_keys,
        )
        self.price_fen_per_kwh = price_fen_per_kwh
        self.tariff_version = tariff_version
        self.revocation_list: RevocationList | None = None
        self.spent: set[bytes] = set()
        self.sessions: dict[bytes, ScriptedSession] = {}
        self.ledger: list[bytes] = []
        self.refusals: list[RequestRefused] = []
        self._session_ids = session_ids
        self.now = SAMPLE_TIME

    # BoxState
    def revocations(self) -> RevocationList | None:
        return self.revocation_list

    def tariff(self) -> tuple[int, int]:
        return self.tariff_version, self.price_fen_per_kwh

    def is_spent(self, grant_id: bytes) -> bool:
        return grant_id in self.spent

    def receive_fragment(self, fragment: bytes, now: int) -> None:
        self.now = now
        for connection_id, event in self.connections.receive_fragment(fragment, now):
            self._handle(connection_id, event)

    def _handle(self, connection_id: int, event: BoxEvent) -> None:
        match event:
            case StartRequested(request=request, grant=grant):
                if any(s.outlet == request.outlet and s.running for s in self.sessions.values()):
                    self._error(connection_id, request.request_id, ErrorCode.OUTLET_BUSY)
                    return
                self.spent.add(grant.grant_id)
                session = ScriptedSession(
                    session_id=self._session_ids(),
                    outlet=request.outlet,
                    owner=cose.public_key_bytes(grant.phone_key),
                    grant_ids=[grant.grant_id],
                    balance_fen=grant.amount_fen,
                    start_time=self.now,
                    start_register_wh=100_000,
                )
                self.sessions[session.session_id] = session
                self._append(
                    EntryKind.SESSION_STARTED,
                    SessionStartedBody(
                        session_id=session.session_id,
                        outlet=session.outlet,
                        grant_id=grant.grant_id,
                        user_id=grant.user_id,
                        phone_key=session.owner,
                        start_time=self.now,
                        start_register_wh=session.start_register_wh,
                        tariff_version=self.tariff_version,
                        price_fen_per_kwh=self.price_fen_per_kwh,
                        amount_fen=grant.amount_fen,
                    ),
                )
                self.connections.send(
                    connection_id,
                    messages.SessionStarted(
                        request_id=request.request_id,
                        session_id=session.session_id,
                        outlet=session.outlet,
                        start_time=self.now,
                        start_register_wh=session.start_register_wh,
                        tariff_version=self.tariff_version,
                        price_fen_per_kwh=self.price_fen_per_kwh,
                        balance_fen=session.balance_fen,
                    ),
                )
            case TopUpRequested(request=request, grant=grant):
                owned = self._owned(connection_id, request.session_id, request.request_id)
                if owned is None:
                    return
                self.spent.add(grant.grant_id)
                owned.grant_ids.append(grant.grant_id)
                owned.balance_fen += grant.amount_fen
                self.connections.send(
                    connection_id,
                    messages.ToppedUp(
                        request_id=request.request_id,
                        session_id=owned.session_id,
                        balance_fen=owned.balance_fen,
                    ),
                )
            case RequestReceived(request=messages.StopSession() as request):
                owned = self._owned(connection_id, request.session_id, request.request_id)
                if owned is not None:
                    self.end_session(owned.session_id, EndReason.USER_STOP, request_id=request.request_id)
            case RequestReceived(request=messages.ListSessions() as request):
                key = self._phone_key(connection_id)
                summaries = tuple(
                    messages.SessionSummary(
                        session_id=s.session_id,
                        outlet=s.outlet,
                        start_time=s.start_time,
                        energy_wh=s.energy_wh,
                        cost_fen=s.cost_fen(self.price_fen_per_kwh),
                        remaining_fen=s.balance_fen - s.cost_fen(self.price_fen_per_kwh),
                        running=s.running,
                    )
                    for s in self.sessions.values()
                    if s.owner == key
                )
                self.connections.send(
                    connection_id, messages.SessionList(request_id=request.request_id, sessions=summaries)
                )
            case UpdateReceived(request=request, update=RevocationList() as revocations):
                if self.revocation_list is not None and revocations.version <= self.revocation_list.version:
                    self._error(connection_id, request.request_id, ErrorCode.STALE_VERSION)
                    return
                self.revocation_list = revocations
                self.connections.send(
                    connection_id,
                    messages.UpdateAccepted(
                        request_id=request.request_id,
                        kind=messages.UpdateKind.REVOCATION_LIST,
                        version=revocations.version,
                    ),
                )
            case RequestRefused():
                self.refusals.append(event)
            case _:
                pass

    def _phone_key(self, connection_id: int) -> bytes:
        session = self.connections.session(connection_id)
        assert session is not None
        assert session.phone_key is not None
        return cose.public_key_bytes(session.phone_key)

    def _owned(self, connection_id: int, session_id: bytes, request_id: int) -> ScriptedSession | None:
        session = self.sessions.get(session_id)
        if session is None or not session.running:
            self._error(connection_id, request_id, ErrorCode.SESSION_UNKNOWN)
            return None
        if session.owner != self._phone_key(connection_id):
            self._error(connection_id, request_id, ErrorCode.SESSION_NOT_OWNER)
            return None
        return session

    def _error(self, connection_id: int, request_id: int, code: ErrorCode) -> None:
        self.connections.send(connection_id, messages.ErrorMessage(request_id=request_id, code=code))

    def _append(self, kind: EntryKind, body: EntryBody) -> bytes:
        previous = tokens.entry_hash(self.ledger[-1]) if self.ledger else tokens.GENESIS_HASH
        entry = LedgerEntry(
            box_id=self.box_id,
            sequence=len(self.ledger) + 1,
            previous_hash=previous,
            time=self.now,
            time_quality=TimeQuality.SYNCED,
            kind=kind,
            body=body,
        )
        signed = entry.sign(self.box_signing_key)
        self.ledger.append(signed)
        return signed

    def _owner_connections(self, session: ScriptedSession) -> list[int]:
        return [
            cid
            for cid, key in self.connections.open_connections().items()
            if cose.public_key_bytes(key) == session.owner
        ]

    def meter(self, session_id: bytes, *, energy_wh: int, power_w: int) -> None:
        """The meter moved: send a live reading to every connection of the owner."""
        session = self.sessions[session_id]
        session.energy_wh = energy_wh
        cost = session.cost_fen(self.price_fen_per_kwh)
        for connection_id in self._owner_connections(session):
            self.connections.send(
                connection_id,
                messages.MeterReading(
                    session_id=session_id,
                    time=self.now,
                    energy_wh=energy_wh,
                    power_w=power_w,
                    voltage_dv=2300,
                    current_ma=power_w * 10_000 // 2300,
                    cost_fen=cost,
                    remaining_fen=session.balance_fen - cost,
                ),
            )

    def end_session(self, session_id: bytes, reason: EndReason, *, request_id: int = 0) -> bytes:
        session = self.sessions[session_id]
        session.running = False
        receipt = SessionReceipt(
            session_id=session_id,
            grant_ids=tuple(session.grant_ids),
            outlet=session.outlet,
            start_time=session.start_time,
            end_time=self.now,
            start_register_wh=session.start_register_wh,
            end_register_wh=session.start_register_wh + session.energy_wh,
            energy_wh=session.energy_wh,
            tariff_version=self.tariff_version,
            price_fen_per_kwh=self.price_fen_per_kwh,
            cost_fen=session.cost_fen(self.price_fen_per_kwh),
            end_reason=reason,
        )
        signed = self._append(EntryKind.SESSION_ENDED, receipt)
        for connection_id in self._owner_connections(session):
            self.connections.send(
                connection_id,
                messages.SessionEnded(
                    request_id=request_id, session_id=session_id, end_reason=reason, receipt=signed
                ),
            )
        return signed

    def data_to_send(self) -> list[bytes]:
        return self.connections.data_to_send()


@dataclass(slots=True, kw_only=True)
class ScriptedSession:
    session_id: bytes
    outlet: int
    owner: bytes
    grant_ids: list[bytes]
    balance_fen: int
    start_time: int
    start_register_wh: int
    energy_wh: int = 0
    running: bool = True

    def cost_fen(self, price_fen_per_kwh: int) -> int:
        return min(tariff.session_cost_fen(self.energy_wh, price_fen_per_kwh), self.balance_fen)


@dataclass(slots=True)
class Flight:
    """What crossed the link in one direction during one pump step."""

    sender: str
    fragments: list[bytes]


class ConnectionPair:
    """A phone and a box joined by an in-memory link (after h11's ConnectionPair).

    `pump()` moves fragments back and forth until both sides are quiet, and records each flight,
    so tests can count ATT round trips and bytes on the wire.
    """

    def __init__(self, phone: PhoneSession, box: ScriptedBox) -> None:
        self.phone = phone
        self.box = box
        self.flights: list[Flight] = []

    def pump(self, now: int) -> list[PhoneEvent]:
        phone_events: list[PhoneEvent] = []
        while True:
            outgoing = self.phone.data_to_send()
            if outgoing:
                self.flights.append(Flight("phone", outgoing))
                for fragment in outgoing:
                    self.box.receive_fragment(fragment, now)
            incoming = self.box.data_to_send()
            if incoming:
                self.flights.append(Flight("box", incoming))
                for fragment in incoming:
                    phone_events.extend(self.phone.receive_fragment(fragment, now))
            if not outgoing and not incoming:
                return phone_events
