"""At the box, with no network: one visit is one secure connection with the wallet behind it.

    label ──► find the advertisement ──► connect ──► EDHOC, S2 ──► requests
                                          pushes (revocation list, tariff, ack) and the start
                                          request ride right behind message_3 (docs/protocol.md §4.1)

Everything the box answers lands in the wallet as it arrives: the certificate in the box
directory, the session and what is left of its grants, live readings, the verified receipt, the
sealed ledger batch to carry. Errors are the phone's own (`phone_client.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from phone_client.central import (
    DEFAULT_SCAN_TIMEOUT_S,
    BoxLink,
    FoundBox,
    connect_to_box,
    find_box,
)
from phone_client.errors import BoxRefusedError, BoxUnreachableError, PrerequisiteError
from phone_client.wallet import (
    CarriedBatch,
    KnownBox,
    StoredReceipt,
    StoredToken,
    Wallet,
    WalletGrant,
    WalletSession,
)
from protocol import gatt, messages
from protocol.errors import ErrorCode
from protocol.tokens import BoxCertificate

# Link errors after which a fresh connection id is worth one more try (docs/protocol.md §4.1):
# another phone may have picked the same id, or the box made room for a newer phone.
_RETRY_HANDSHAKE = frozenset(
    {
        ErrorCode.FRAME_MALFORMED,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.FRAME_OUT_OF_ORDER,
        ErrorCode.FRAME_UNKNOWN_CONNECTION,
        ErrorCode.FRAME_TOO_MANY_CONNECTIONS,
        ErrorCode.EDHOC_UNEXPECTED_MESSAGE,
    }
)
MAX_CARRY_ENTRIES = 40  # what the reference box hands out at once
# the box sends them right behind the SessionList; this only bounds a box that lost one
RECEIPTS_AFTER_LIST_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PushOutcome:
    """What became of one update this phone relayed to the box."""

    kind: messages.UpdateKind
    version: int  # the version (for an ack: the sequence) this phone offered
    accepted: bool  # the box took it; False: it already held this or newer (STALE_VERSION) or refused
    refused_code: ErrorCode | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveReading:
    session: WalletSession
    reading: messages.MeterReading


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionClosed:
    """The box ended a session (on its own, or answering a stop) and its receipt verified."""

    receipt: StoredReceipt
    session: WalletSession | None


LiveEvent = LiveReading | SessionClosed


class BoxVisit:
    """One connection to one box. Open with `BoxVisit.open(wallet, label, ...)`."""

    def __init__(
        self,
        *,
        wallet: Wallet,
        link: BoxLink,
        label: gatt.QrLabel,
        certificate: BoxCertificate,
        found: FoundBox,
    ) -> None:
        self.wallet = wallet
        self.link = link
        self.label = label
        self.certificate = certificate
        self.found = found
        self.pushes: list[PushOutcome] = []
        self.started: WalletSession | None = None
        self.closed_sessions: list[SessionClosed] = []

    @property
    def box_id(self) -> str:
        return self.certificate.box_id

    # --- opening -----------------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        wallet: Wallet,
        label: gatt.QrLabel,
        *,
        start_grant: WalletGrant | None = None,
        push_updates: bool = True,
        scan_timeout_s: float = DEFAULT_SCAN_TIMEOUT_S,
        clock: Callable[[], int] = lambda: int(time.time()),
    ) -> AsyncIterator[BoxVisit]:
        """Find the labelled box, connect, verify it (S2), relay updates, start a session if
        `start_grant` is given (BoxRefusedError with the box's code if it refuses)."""
        operator_keys = await wallet.require_operator_keys()
        phone_key = await wallet.device_key()
        pushes = await _updates_to_push(wallet, label.box_id) if push_updates else []
        reservation = None
        if start_grant is not None:
            reservation = await wallet.reservation_for(label.box_id, label.outlet)
        found = await find_box(label, timeout_s=scan_timeout_s)

        def start_request(request_id: int) -> messages.PhoneMessage:
            assert start_grant is not None
            return messages.StartSession(
                request_id=request_id, outlet=label.outlet, grant=start_grant.signed, reservation=reservation
            )

        early = [build for _, _, build in pushes]
        if start_grant is not None:
            early.append(start_request)
        async with contextlib.AsyncExitStack() as stack:
            for attempt in (1, 2):
                try:
                    link, _ = await stack.enter_async_context(
                        connect_to_box(
                            found,
                            label=label,
                            phone_key=phone_key,
                            operator_keys=operator_keys,
                            clock=clock,
                            early_requests=early,
                        )
                    )
                    certificate = await link.authenticated()
                    break
                except BoxRefusedError as exc:
                    if attempt == 2 or exc.code not in _RETRY_HANDSHAKE:
                        raise
                    await stack.aclose()
            await wallet.remember_verified_box(certificate)
            visit = cls(wallet=wallet, link=link, label=label, certificate=certificate, found=found)
            answers = link.early_answers
            for (kind, version, _), answer in zip(pushes, answers, strict=False):
                await visit._record_push(kind, version, answer)
            if start_grant is not None:
                await visit._record_start(start_grant, answers[-1])
            try:
                yield visit
            finally:
                await visit._drain()

    # --- what the box answers ------------------------------------------------------------------------

    async def _record_push(
        self,
        kind: messages.UpdateKind,
        version: int,
        answer: asyncio.Future[messages.BoxMessage],
    ) -> None:
        try:
            accepted = await self.link.answer(answer)
        except BoxRefusedError as exc:
            if exc.code is ErrorCode.STALE_VERSION:
                # the box holds this or newer: nothing more to deliver there
                await self.wallet.record_box_version(self.box_id, kind, version)
            self.pushes.append(PushOutcome(kind=kind, version=version, accepted=False, refused_code=exc.code))
            return
        if isinstance(accepted, messages.UpdateAccepted):
            await self.wallet.record_box_version(self.box_id, accepted.kind, accepted.version)
        self.pushes.append(PushOutcome(kind=kind, version=version, accepted=True, refused_code=None))

    async def _record_start(
        self, grant: WalletGrant, answer: asyncio.Future[messages.BoxMessage]
    ) -> WalletSession:
        try:
            started = await self.link.answer(answer)
        except BoxRefusedError as exc:
            await self.wallet.mark_grant_refused(grant.grant_id, exc.code, box_id=self.box_id)
            raise
        if not isinstance(started, messages.SessionStarted):
            raise BoxRefusedError(
                f"unexpected answer {type(started).__name__}", code=ErrorCode.MESSAGE_UNEXPECTED
            )
        self.started = await self.wallet.record_session_started(
            box_id=self.box_id, started=started, grant=grant
        )
        return self.started

    async def _handle(self, message: messages.BoxMessage) -> LiveEvent | None:
        match message:
            case messages.MeterReading():
                session = await self.wallet.record_reading(box_id=self.box_id, reading=message)
                return None if session is None else LiveReading(session=session, reading=message)
            case messages.SessionEnded():
                return await self._closed(message)
        return None

    async def _closed(self, ended: messages.SessionEnded) -> SessionClosed:
        receipt = await self.wallet.store_receipt(
            box_id=self.box_id, session_id=ended.session_id, signed=ended.receipt
        )
        event = SessionClosed(
            receipt=receipt, session=await self.wallet.session(self.box_id, ended.session_id)
        )
        self.closed_sessions.append(event)
        return event

    async def _drain(self) -> None:
        """Keep whatever the box sent that nobody asked for (a reading, a receipt) before leaving."""
        while not self.link.unsolicited.empty():
            await self._handle(self.link.unsolicited.get_nowait())

    # --- requests --------------------------------------------------------------------------------------

    async def start(self, grant: WalletGrant, *, outlet: int | None = None) -> WalletSession:
        """Start a session on `outlet` (the label's by default) paid by `grant`."""
        reservation = await self.wallet.reservation_for(self.box_id, outlet or self.label.outlet)

        def build(request_id: int) -> messages.PhoneMessage:
            return messages.StartSession(
                request_id=request_id,
                outlet=outlet or self.label.outlet,
                grant=grant.signed,
                reservation=reservation,
            )

        future = self.link.send_early(build)
        await self.link._write_out()
        return await self._record_start(grant, future)

    async def top_up(self, session: WalletSession, grant: WalletGrant) -> WalletSession:
        """Add `grant` to a running session of this phone."""
        try:
            answer = await self.link.request(
                lambda request_id: messages.TopUp(
                    request_id=request_id, session_id=session.session_id, grant=grant.signed
                )
            )
        except BoxRefusedError as exc:
            await self.wallet.mark_grant_refused(grant.grant_id, exc.code, box_id=self.box_id)
            raise
        if not isinstance(answer, messages.ToppedUp):
            raise BoxRefusedError(
                f"unexpected answer {type(answer).__name__}", code=ErrorCode.MESSAGE_UNEXPECTED
            )
        return await self.wallet.record_top_up(
            box_id=self.box_id, session_id=session.session_id, grant=grant, balance_fen=answer.balance_fen
        )

    async def stop(self, session: WalletSession) -> StoredReceipt:
        """Stop a running session; its receipt, verified with the box's certificate and kept."""
        answer = await self.link.request(
            lambda request_id: messages.StopSession(request_id=request_id, session_id=session.session_id)
        )
        if not isinstance(answer, messages.SessionEnded):
            raise BoxRefusedError(
                f"unexpected answer {type(answer).__name__}", code=ErrorCode.MESSAGE_UNEXPECTED
            )
        return (await self._closed(answer)).receipt

    async def open_outlet_door(self, session: WalletSession) -> messages.DoorOpened:
        """Open the user-box door of a running or just-ended session (to plug in or unplug)."""
        answer = await self.link.request(
            lambda request_id: messages.OpenOutletDoor(request_id=request_id, session_id=session.session_id)
        )
        if not isinstance(answer, messages.DoorOpened):
            raise BoxRefusedError(
                f"unexpected answer {type(answer).__name__}", code=ErrorCode.MESSAGE_UNEXPECTED
            )
        return answer

    async def unlock(self, token: StoredToken) -> messages.DoorOpened:
        """Open the door an UnlockToken names (a technician's metering-box door, or an outlet door)."""
        answer = await self.link.request(
            lambda request_id: messages.OpenDoorWithToken(request_id=request_id, unlock_token=token.signed)
        )
        if not isinstance(answer, messages.DoorOpened):
            raise BoxRefusedError(
                f"unexpected answer {type(answer).__name__}", code=ErrorCode.MESSAGE_UNEXPECTED
            )
        return answer

    async def list_sessions(self) -> list[WalletSession]:
        """This phone's sessions at this box, as the box sees them now; the wallet follows."""
        answer = await self.link.request(lambda request_id: messages.ListSessions(request_id=request_id))
        if not isinstance(answer, messages.SessionList):
            raise BoxRefusedError(
                f"unexpected answer {type(answer).__name__}", code=ErrorCode.MESSAGE_UNEXPECTED
            )
        await self.wallet.record_session_list(box_id=self.box_id, sessions=answer.sessions)
        await self._receipts_after_list(answer.sessions)
        sessions = []
        for summary in answer.sessions:
            session = await self.wallet.session(self.box_id, summary.session_id)
            if session is not None:
                sessions.append(session)
        return sessions

    async def _receipts_after_list(self, sessions: Sequence[messages.SessionSummary]) -> None:
        """The box follows a SessionList with the SessionEnded of each listed session that ended
        (docs/protocol.md §6.2, ListSessions): keep those receipts, and whatever else arrives meanwhile."""
        waiting = {summary.session_id for summary in sessions if not summary.running}
        deadline = time.monotonic() + RECEIPTS_AFTER_LIST_TIMEOUT_S
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:  # a box that lost a receipt: the session stays "ended while away"
                return
            try:
                message = await self.link.next_message(left)
            except BoxUnreachableError:
                if self.link.failure is not None:
                    raise
                return
            if isinstance(message, messages.SessionEnded):
                waiting.discard(message.session_id)
            await self._handle(message)

    async def collect_entries(self, max_entries: int = MAX_CARRY_ENTRIES) -> CarriedBatch | None:
        """Take the box's unacknowledged ledger entries to carry, sealed to the operator (S9)."""
        answer = await self.link.request(
            lambda request_id: messages.RequestLedgerEntries(request_id=request_id, max_entries=max_entries)
        )
        if not isinstance(answer, messages.LedgerEntries):
            raise BoxRefusedError(
                f"unexpected answer {type(answer).__name__}", code=ErrorCode.MESSAGE_UNEXPECTED
            )
        if answer.box_id != self.box_id:
            raise BoxRefusedError(
                "the box handed over another box's entries", code=ErrorCode.TOKEN_WRONG_AUDIENCE
            )
        return await self.wallet.add_batch(answer)

    async def next_event(self, timeout_s: float | None = None) -> LiveEvent | None:
        """The next live reading or session end, already in the wallet; None when the box said
        nothing for `timeout_s`. BoxUnreachableError when the link fails."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                message = await self.link.next_message(left)
            except BoxUnreachableError:
                if self.link.failure is None:
                    return None  # quiet, not gone
                raise
            event = await self._handle(message)
            if event is not None:
                return event


async def _updates_to_push(
    wallet: Wallet, box_id: str
) -> list[tuple[messages.UpdateKind, int, Callable[[int], messages.PhoneMessage]]]:
    """The newest revocation list, tariff table and this box's ack, unless the box holds them
    already (docs/protocol.md §6.2: a phone relays them on every visit)."""
    pushes: list[tuple[messages.UpdateKind, int, Callable[[int], messages.PhoneMessage]]] = []
    for kind in (messages.UpdateKind.REVOCATION_LIST, messages.UpdateKind.TARIFF_TABLE):
        update = await wallet.update(kind)
        if update is None:
            continue
        held = await wallet.box_version(box_id, kind)
        if held is not None and held >= update.version:
            continue
        signed = update.signed
        if kind is messages.UpdateKind.REVOCATION_LIST:

            def push_revocations(request_id: int, signed: bytes = signed) -> messages.PhoneMessage:
                return messages.PushRevocationList(request_id=request_id, revocation_list=signed)

            pushes.append((kind, update.version, push_revocations))
        else:

            def push_tariff(request_id: int, signed: bytes = signed) -> messages.PhoneMessage:
                return messages.PushTariffTable(request_id=request_id, tariff_table=signed)

            pushes.append((kind, update.version, push_tariff))
    ack = await wallet.ack_for(box_id)
    if ack is not None and not ack.delivered:

        def push_ack(request_id: int, signed: bytes = ack.signed) -> messages.PhoneMessage:
            return messages.PushLedgerAck(request_id=request_id, ledger_ack=signed)

        pushes.append((messages.UpdateKind.LEDGER_ACK, ack.sequence, push_ack))
    return pushes


async def label_for_session(wallet: Wallet, session: WalletSession) -> gatt.QrLabel:
    """The label to come back to a session's box with, from the certificate checked there."""
    box: KnownBox | None = await wallet.box(session.box_id)
    if box is None:
        raise PrerequisiteError(f"box {session.box_id} is not in the wallet's directory: scan its label")
    return box.label(session.outlet)
