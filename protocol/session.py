"""Session engines: the phone (EDHOC initiator) and the box (EDHOC responder), sans-IO.

Bytes and `now` in, events and bytes out (docs/protocol.md §4). The I/O shells (the bless GATT
server on the box, the bleak central on the phone) only move fragments between the radio and
these objects and act on the events:

    phone                                   box
    message_1 ------------------------------>        (1st ATT round trip)
              <------------------------------ message_2 (box certificate by value)
    message_3 ------------------------------>
    record(StartSession) ------------------->        (2nd ATT round trip, back to back)
              <------------------------------ record(SessionStarted)

Each framed message starts with one link byte saying what follows (`LinkKind`).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import authorization, edhoc, encoding, framing, gatt, messages
from protocol.channel import Role, SecureChannel
from protocol.errors import (
    ChannelError,
    EdhocError,
    ErrorCode,
    LocalProtocolError,
    MessageError,
    RemoteProtocolError,
    TokenError,
)
from protocol.messages import BoxMessage, ErrorMessage, PhoneMessage
from protocol.tokens import (
    BalanceGrant,
    BoxCertificate,
    LedgerAck,
    Reservation,
    RevocationList,
    TariffTable,
    UnlockToken,
)

# EDHOC connection identifiers (RFC 9528 §3.3): the framing's connection id already tells
# connections apart, so both ends use fixed one-byte values.
CONNECTION_ID_INITIATOR = 0x0E
CONNECTION_ID_RESPONDER = 0x0F


class LinkKind(enum.IntEnum):
    """First byte of every framed message (docs/protocol.md §4.1)."""

    EDHOC_MESSAGE_1 = 1  # followed by the phone's ATT MTU (u16 BE), then message_1
    EDHOC_MESSAGE_2 = 2
    EDHOC_MESSAGE_3 = 3
    RECORD = 4  # a secure-channel record holding one application message
    EDHOC_ERROR = 5  # an EDHOC error message (RFC 9528 §6)
    LINK_ERROR = 6  # CBOR uint error code; the sender has dropped the connection's state


class SessionState(enum.Enum):
    IDLE = "idle"
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSED = "closed"


# Events (frozen records, h11 style).


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeCompleted:
    """Box side: EDHOC finished; `phone_key` authenticated this connection."""

    phone_key: Ed25519PublicKey


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxAuthenticated:
    """Phone side: the box proved it holds the key of this operator-signed certificate (S2)."""

    certificate: BoxCertificate


@dataclass(frozen=True, slots=True, kw_only=True)
class StartRequested:
    """A start request whose grant passed every S1 check; the daemon still checks the outlet."""

    request: messages.StartSession
    grant: BalanceGrant
    reservation: Reservation | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TopUpRequested:
    request: messages.TopUp
    grant: BalanceGrant


@dataclass(frozen=True, slots=True, kw_only=True)
class DoorUnlockRequested:
    request: messages.OpenDoorWithToken
    token: UnlockToken


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateReceived:
    """An operator-signed update a phone relayed; the daemon keeps it if it is newer."""

    request: messages.PushRevocationList | messages.PushTariffTable | messages.PushLedgerAck
    update: RevocationList | TariffTable | LedgerAck


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestReceived:
    """A request that needs no token check: stop, open my outlet door, ledger entries, list."""

    request: (
        messages.StopSession | messages.OpenOutletDoor | messages.RequestLedgerEntries | messages.ListSessions
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRefused:
    """Box side: a request failed its checks; the error has already been queued for the phone."""

    request_id: int
    code: ErrorCode
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived:
    """Phone side: a message from the box."""

    message: BoxMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionFailed:
    """The connection's state is gone. `by_peer`: the other side reported `code`."""

    code: ErrorCode
    detail: str
    by_peer: bool


BoxEvent = (
    HandshakeCompleted
    | StartRequested
    | TopUpRequested
    | DoorUnlockRequested
    | UpdateReceived
    | RequestReceived
    | RequestRefused
    | ConnectionFailed
)
PhoneEvent = BoxAuthenticated | MessageReceived | ConnectionFailed


class BoxState(Protocol):
    """What the box daemon knows that the S1 checks need."""

    def revocations(self) -> RevocationList | None:
        """The newest revocation list the box holds."""

    def tariff(self) -> tuple[int, int]:
        """(tariff version, price in fen per kWh) in force at this box now."""

    def is_spent(self, grant_id: bytes) -> bool:
        """Whether this grant already paid for a session here."""


def phone_credential(phone_key: Ed25519PublicKey) -> tuple[bytes, bytes]:
    """(ID_CRED_I, CRED_I): the phone's raw public key as a CCS by value (RFC 9528 §3.5.2)."""
    return edhoc.ccs_credential_for_public_key(phone_key, subject="")


def _link_error(code: ErrorCode) -> bytes:
    return bytes([LinkKind.LINK_ERROR]) + encoding.encode(int(code))


def _peer_code(payload: bytes) -> ErrorCode:
    try:
        value = encoding.decode(payload, error=MessageError, code=ErrorCode.MESSAGE_MALFORMED)
        return ErrorCode(value)
    except (MessageError, ValueError, TypeError):
        return ErrorCode.INTERNAL


def _edhoc_peer_code(payload: bytes) -> tuple[ErrorCode, str]:
    try:
        error = edhoc.decode_error(payload)
    except EdhocError:
        return ErrorCode.EDHOC_PEER_ERROR, "unreadable EDHOC error"
    info = error.err_info
    if isinstance(info, str) and info.isdigit() and int(info) in ErrorCode._value2member_map_:
        return ErrorCode(int(info)), f"EDHOC error {error.err_code}"
    return ErrorCode.EDHOC_PEER_ERROR, f"EDHOC error {error.err_code}: {info!r}"


class _Endpoint:
    """What both ends share: an outbox of fragments and the secure channel once open."""

    def __init__(self, *, connection_id: int, att_mtu: int) -> None:
        self.connection_id = connection_id
        self.att_mtu = att_mtu
        self._outbox: list[bytes] = []
        self._channel: SecureChannel | None = None
        self.state = SessionState.IDLE

    def data_to_send(self) -> list[bytes]:
        """Fragments to write (phone) or notify (box), in order; empties the outbox."""
        out, self._outbox = self._outbox, []
        return out

    def _queue(self, link: LinkKind, payload: bytes) -> None:
        self._outbox.extend(
            framing.fragment(self.connection_id, bytes([link]) + payload, att_mtu=self.att_mtu)
        )

    def _seal(self, message: messages.Message) -> None:
        if self._channel is None or self.state is not SessionState.OPEN:
            raise LocalProtocolError("the secure channel is not open", code=ErrorCode.CHANNEL_CLOSED)
        self._queue(LinkKind.RECORD, self._channel.seal(message.encode()))

    def _close(self) -> None:
        self.state = SessionState.CLOSED
        if self._channel is not None:
            self._channel.close()


class BoxSession(_Endpoint):
    """One phone's connection to this box: EDHOC responder, then requests checked per S1."""

    def __init__(
        self,
        *,
        connection_id: int,
        box_key: Ed25519PrivateKey,
        signed_certificate: bytes,
        ephemeral_key: X25519PrivateKey,
        operator_keys: Mapping[bytes, Ed25519PublicKey],
        box_id: str,
        box_state: BoxState,
        att_mtu: int = framing.ATT_MTU_MIN,
    ) -> None:
        super().__init__(connection_id=connection_id, att_mtu=att_mtu)
        id_cred, cred = edhoc.cwt_credential(signed_certificate)
        self._edhoc = edhoc.EdhocResponder(
            credential=edhoc.EdhocCredential(id_cred=id_cred, cred=cred, private_key=box_key),
            ephemeral_key=ephemeral_key,
            connection_id=CONNECTION_ID_RESPONDER,
        )
        self._operator_keys = operator_keys
        self._box_id = box_id
        self._box_state = box_state
        self.phone_key: Ed25519PublicKey | None = None

    def send(self, message: BoxMessage) -> None:
        """Queue an application message for this phone (the daemon's answer to an event)."""
        self._seal(message)

    def receive_message(self, data: bytes, now: int) -> list[BoxEvent]:
        """One reassembled message from this connection."""
        if self.state is SessionState.CLOSED:
            return []
        if not data:
            return self.abort(ErrorCode.FRAME_MALFORMED, "empty message")
        link, payload = data[0], data[1:]
        try:
            if link == LinkKind.EDHOC_MESSAGE_1 and self.state is SessionState.IDLE:
                return self._on_message_1(payload)
            if link == LinkKind.EDHOC_MESSAGE_3 and self.state is SessionState.HANDSHAKING:
                return self._on_message_3(payload)
            if link == LinkKind.RECORD and self.state is SessionState.OPEN and self._channel is not None:
                return self._on_record(self._channel.open(payload), now)
            if link in (LinkKind.EDHOC_ERROR, LinkKind.LINK_ERROR):
                self._close()
                code, detail = (
                    _edhoc_peer_code(payload) if link == LinkKind.EDHOC_ERROR else (_peer_code(payload), "")
                )
                return [ConnectionFailed(code=code, detail=detail or "phone reported an error", by_peer=True)]
        except EdhocError as exc:
            if exc.code is ErrorCode.EDHOC_UNSUPPORTED_CIPHER_SUITE:
                # RFC 9528 §6.3: ERR_CODE 2 lists the suites we support, so the phone can retry
                error = self._edhoc.error_for_wrong_suite()
            else:
                error = edhoc.encode_error(1, str(int(exc.code)))
            self._queue(LinkKind.EDHOC_ERROR, error)
            self._close()
            return [ConnectionFailed(code=exc.code, detail=exc.detail, by_peer=False)]
        except ChannelError as exc:
            return self.abort(exc.code, exc.detail)
        return self.abort(ErrorCode.EDHOC_UNEXPECTED_MESSAGE, f"link kind {link} in state {self.state.value}")

    def abort(self, code: ErrorCode, detail: str) -> list[BoxEvent]:
        """Tell the phone `code` and drop this connection's state."""
        self._queue(LinkKind.LINK_ERROR, encoding.encode(int(code)))
        self._close()
        return [ConnectionFailed(code=code, detail=detail, by_peer=False)]

    def _on_message_1(self, payload: bytes) -> list[BoxEvent]:
        if len(payload) < 2:
            raise EdhocError("message_1 without an ATT MTU", code=ErrorCode.EDHOC_MALFORMED)
        mtu = int.from_bytes(payload[:2], "big")
        if not framing.ATT_MTU_MIN <= mtu <= framing.ATT_MTU_MAX:
            raise EdhocError(f"ATT MTU {mtu} out of range", code=ErrorCode.EDHOC_MALFORMED)
        self.att_mtu = mtu
        self.state = SessionState.HANDSHAKING
        self._edhoc.receive_message_1(payload[2:])
        self._queue(LinkKind.EDHOC_MESSAGE_2, self._edhoc.message_2())
        return []

    def _on_message_3(self, payload: bytes) -> list[BoxEvent]:
        received = self._edhoc.receive_message_3(payload)
        phone_key, cred_i = _phone_key_from_id_cred(received.id_cred_i)
        self._edhoc.verify_message_3(cred_i=cred_i, public_key=phone_key)
        self._channel = SecureChannel(
            exporter=self._edhoc.exporter, role=Role.BOX, connection_id=self.connection_id
        )
        self.phone_key = phone_key
        self.state = SessionState.OPEN
        return [HandshakeCompleted(phone_key=phone_key)]

    def _on_record(self, plaintext: bytes, now: int) -> list[BoxEvent]:
        try:
            request = messages.decode_phone_message(plaintext)
        except MessageError as exc:
            return [self._refuse(0, exc)]
        try:
            return [self._check(request, now)]
        except (TokenError, RemoteProtocolError) as exc:
            return [self._refuse(request.request_id, exc)]

    def _refuse(self, request_id: int, exc: RemoteProtocolError) -> RequestRefused:
        self._seal(ErrorMessage(request_id=request_id, code=exc.code))
        return RequestRefused(request_id=request_id, code=exc.code, detail=exc.detail)

    def _check(self, request: PhoneMessage, now: int) -> BoxEvent:
        assert self.phone_key is not None
        keys = self._operator_keys
        match request:
            case messages.StartSession():
                reservation = None
                if request.reservation is not None:
                    reservation = authorization.check_reservation(
                        request.reservation,
                        operator_keys=keys,
                        box_id=self._box_id,
                        outlet=request.outlet,
                        connection_key=self.phone_key,
                        now=now,
                    )
                return StartRequested(
                    request=request, grant=self._grant(request.grant, now), reservation=reservation
                )
            case messages.TopUp():
                return TopUpRequested(request=request, grant=self._grant(request.grant, now))
            case messages.OpenDoorWithToken():
                token = authorization.check_unlock_token(
                    request.unlock_token,
                    operator_keys=keys,
                    box_id=self._box_id,
                    connection_key=self.phone_key,
                    now=now,
                    revocations=self._box_state.revocations(),
                )
                return DoorUnlockRequested(request=request, token=token)
            case messages.PushRevocationList():
                return UpdateReceived(
                    request=request, update=RevocationList.verify(request.revocation_list, keys)
                )
            case messages.PushTariffTable():
                return UpdateReceived(request=request, update=TariffTable.verify(request.tariff_table, keys))
            case messages.PushLedgerAck():
                ack = LedgerAck.verify(request.ledger_ack, keys)
                if ack.box_id != self._box_id:
                    raise TokenError("ack for another box", code=ErrorCode.TOKEN_WRONG_AUDIENCE)
                return UpdateReceived(request=request, update=ack)
            case _:
                return RequestReceived(request=request)

    def _grant(self, signed_grant: bytes, now: int) -> BalanceGrant:
        assert self.phone_key is not None
        _, price = self._box_state.tariff()
        return authorization.check_grant(
            signed_grant,
            operator_keys=self._operator_keys,
            box_id=self._box_id,
            connection_key=self.phone_key,
            now=now,
            revocations=self._box_state.revocations(),
            price_fen_per_kwh=price,
            spent=self._box_state,
        )


def _phone_key_from_id_cred(id_cred_i: bytes) -> tuple[Ed25519PublicKey, bytes]:
    """The phone's credential is a CCS by value whose `cnf` holds its Ed25519 key."""
    kind, ccs = edhoc.parse_id_cred_by_value(id_cred_i)
    if kind is not edhoc.CredentialKind.CCS:
        raise EdhocError("the phone must present a CCS by value", code=ErrorCode.EDHOC_BAD_CREDENTIAL)
    return edhoc.ccs_public_key(ccs), ccs


class BoxConnections:
    """The box's side of the GATT link: one reassembler for every write, one BoxSession per phone.

    bless hands the box each write without saying which central sent it, so connections are told
    apart by the framing's connection id (docs/protocol.md §5).
    """

    def __init__(
        self,
        *,
        box_key: Ed25519PrivateKey,
        signed_certificate: bytes,
        operator_keys: Mapping[bytes, Ed25519PublicKey],
        box_id: str,
        box_state: BoxState,
        ephemeral_keys: Callable[[], X25519PrivateKey],
        max_connections: int = 8,
    ) -> None:
        self._reassembler = framing.Reassembler(max_connections=max_connections)
        self._sessions: dict[int, BoxSession] = {}
        self._max_connections = max_connections
        self._new_session = functools.partial(
            BoxSession,
            box_key=box_key,
            signed_certificate=signed_certificate,
            operator_keys=operator_keys,
            box_id=box_id,
            box_state=box_state,
        )
        self._ephemeral_keys = ephemeral_keys
        self._outbox: list[bytes] = []

    def receive_fragment(self, fragment: bytes, now: int) -> list[tuple[int, BoxEvent]]:
        """One GATT write. Returns (connection id, event) pairs; never raises on any input."""
        event = self._reassembler.receive(fragment)
        if event is None:
            return []
        if isinstance(event, framing.FrameRejected):
            if event.connection_id is None:
                return []
            if event.connection_id in self._sessions:
                broken = self._sessions[event.connection_id]
                failed = broken.abort(event.code, event.detail)
                self._outbox.extend(broken.data_to_send())
                self.forget(event.connection_id)
                return [(event.connection_id, failed[0])]
            self._outbox.extend(framing.fragment(event.connection_id, _link_error(event.code), att_mtu=23))
            return []
        connection_id = event.connection_id
        session = self._sessions.get(connection_id)
        if session is None:
            if event.message[:1] != bytes([LinkKind.EDHOC_MESSAGE_1]):
                # a connection we do not know (evicted, or the box restarted): tell it to start over
                # without making room for it, so stale phones cannot push out live ones
                self._outbox.extend(
                    framing.fragment(
                        connection_id, _link_error(ErrorCode.EDHOC_UNEXPECTED_MESSAGE), att_mtu=23
                    )
                )
                return []
            if len(self._sessions) >= self._max_connections:
                # bless never says when a phone left: the least recently heard connection is the
                # likeliest to be gone, so it makes room (its phone, if still there, reconnects)
                self.forget(next(iter(self._sessions)))
            session = self._new_session(connection_id=connection_id, ephemeral_key=self._ephemeral_keys())
            self._sessions[connection_id] = session
        else:
            self._sessions[connection_id] = self._sessions.pop(connection_id)  # most recently heard last
        events = session.receive_message(event.message, now)
        self._outbox.extend(session.data_to_send())
        if session.state is SessionState.CLOSED:
            self.forget(connection_id)
        return [(connection_id, e) for e in events]

    def send(self, connection_id: int, message: BoxMessage) -> bool:
        """Queue a message for one connection; False if that connection is gone."""
        session = self._sessions.get(connection_id)
        if session is None or session.state is not SessionState.OPEN:
            return False
        session.send(message)
        self._outbox.extend(session.data_to_send())
        return True

    def session(self, connection_id: int) -> BoxSession | None:
        return self._sessions.get(connection_id)

    def open_connections(self) -> dict[int, Ed25519PublicKey]:
        return {
            cid: s.phone_key
            for cid, s in self._sessions.items()
            if s.state is SessionState.OPEN and s.phone_key is not None
        }

    def forget(self, connection_id: int) -> None:
        """Drop a connection (closed, or its phone disconnected)."""
        self._sessions.pop(connection_id, None)
        self._reassembler.forget(connection_id)

    def data_to_send(self) -> list[bytes]:
        """Notifications to send, in order."""
        out, self._outbox = self._outbox, []
        return out


class PhoneSession(_Endpoint):
    """The phone's connection to one box: EDHOC initiator with the S2 check, then requests."""

    def __init__(
        self,
        *,
        connection_id: int,
        phone_key: Ed25519PrivateKey,
        ephemeral_key: X25519PrivateKey,
        label: gatt.QrLabel,
        operator_keys: Mapping[bytes, Ed25519PublicKey],
        att_mtu: int = framing.ATT_MTU_MIN,
    ) -> None:
        super().__init__(connection_id=connection_id, att_mtu=att_mtu)
        id_cred, cred = phone_credential(phone_key.public_key())
        self._edhoc = edhoc.EdhocInitiator(
            credential=edhoc.EdhocCredential(id_cred=id_cred, cred=cred, private_key=phone_key),
            ephemeral_key=ephemeral_key,
            connection_id=CONNECTION_ID_INITIATOR,
        )
        self._label = label
        self._operator_keys = operator_keys
        self._reassembler = framing.Reassembler(max_connections=1, accept_only=connection_id)
        self._pending: list[PhoneMessage] = []
        self._next_request_id = 1
        self.certificate: BoxCertificate | None = None

    def connect(self) -> None:
        """Queue EDHOC message_1, preceded by the ATT MTU so the box can size its notifications."""
        if self.state is not SessionState.IDLE:
            raise LocalProtocolError("already connecting", code=ErrorCode.INTERNAL)
        self.state = SessionState.HANDSHAKING
        self._queue(LinkKind.EDHOC_MESSAGE_1, self.att_mtu.to_bytes(2, "big") + self._edhoc.message_1())

    def new_request_id(self) -> int:
        request_id = self._next_request_id
        self._next_request_id = request_id % 0xFFFF + 1
        return request_id

    def send(self, message: PhoneMessage) -> None:
        """Queue a request; before the handshake ends it goes right after message_3."""
        if self.state is SessionState.OPEN:
            self._seal(message)
        elif self.state in (SessionState.IDLE, SessionState.HANDSHAKING):
            self._pending.append(message)
        else:
            raise LocalProtocolError("connection closed", code=ErrorCode.CHANNEL_CLOSED)

    def receive_fragment(self, fragment: bytes, now: int) -> list[PhoneEvent]:
        """One notification; fragments of other phones' connections are ignored."""
        if self.state is SessionState.CLOSED:
            return []
        event = self._reassembler.receive(fragment)
        if event is None:
            return []
        if isinstance(event, framing.FrameRejected):
            if event.connection_id is None:
                return []  # too short to be addressed to anyone: not ours to act on
            return self.abort(event.code, event.detail)
        return self.receive_message(event.message, now)

    def receive_message(self, data: bytes, now: int) -> list[PhoneEvent]:
        if self.state is SessionState.CLOSED:
            return []
        if not data:
            return self.abort(ErrorCode.FRAME_MALFORMED, "empty message")
        link, payload = data[0], data[1:]
        try:
            if link == LinkKind.EDHOC_MESSAGE_2 and self.state is SessionState.HANDSHAKING:
                return self._on_message_2(payload, now)
            if link == LinkKind.RECORD and self.state is SessionState.OPEN and self._channel is not None:
                return self._on_record(self._channel.open(payload))
            if link in (LinkKind.EDHOC_ERROR, LinkKind.LINK_ERROR):
                self._close()
                code, detail = (
                    _edhoc_peer_code(payload) if link == LinkKind.EDHOC_ERROR else (_peer_code(payload), "")
                )
                return [ConnectionFailed(code=code, detail=detail or "box reported an error", by_peer=True)]
        except (EdhocError, TokenError) as exc:
            self._queue(LinkKind.EDHOC_ERROR, edhoc.encode_error(1, str(int(exc.code))))
            self._close()
            return [ConnectionFailed(code=exc.code, detail=exc.detail, by_peer=False)]
        except ChannelError as exc:
            return self.abort(exc.code, exc.detail)
        return self.abort(ErrorCode.EDHOC_UNEXPECTED_MESSAGE, f"link kind {link} in state {self.state.value}")

    def abort(self, code: ErrorCode, detail: str) -> list[PhoneEvent]:
        """Tell the box `code` and drop this connection's state."""
        self._queue(LinkKind.LINK_ERROR, encoding.encode(int(code)))
        self._close()
        return [ConnectionFailed(code=code, detail=detail, by_peer=False)]

    def _on_message_2(self, payload: bytes, now: int) -> list[PhoneEvent]:
        received = self._edhoc.receive_message_2(payload)
        kind, signed_certificate = edhoc.parse_id_cred_by_value(received.id_cred_r)
        if kind is not edhoc.CredentialKind.CWT:
            raise EdhocError(
                "the box must present its certificate by value", code=ErrorCode.EDHOC_BAD_CREDENTIAL
            )
        certificate = authorization.check_box_certificate(
            signed_certificate, operator_keys=self._operator_keys, label=self._label, now=now
        )
        self._edhoc.verify_message_2(cred_r=signed_certificate, public_key=certificate.box_public_key)
        self._queue(LinkKind.EDHOC_MESSAGE_3, self._edhoc.message_3())
        self._channel = SecureChannel(
            exporter=self._edhoc.exporter, role=Role.PHONE, connection_id=self.connection_id
        )
        self.state = SessionState.OPEN
        self.certificate = certificate
        pending, self._pending = self._pending, []
        for message in pending:
            self._seal(message)
        return [BoxAuthenticated(certificate=certificate)]

    def _on_record(self, plaintext: bytes) -> list[PhoneEvent]:
        try:
            return [MessageReceived(message=messages.decode_box_message(plaintext))]
        except MessageError as exc:
            return self.abort(exc.code, exc.detail)
