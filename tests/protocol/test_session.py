"""PhoneSession against a box behind BoxConnections, joined in memory (h11's ConnectionPair).

Covers the whole conversation (handshake, start, readings, top-up, stop, receipt, reconnect) and
every S1-S3 failure with the error code the phone sees.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import cose, framing, gatt, messages, testing, tokens
from protocol.errors import ErrorCode
from protocol.session import (
    BoxAuthenticated,
    ConnectionFailed,
    LinkKind,
    MessageReceived,
    PhoneEvent,
    PhoneSession,
    SessionState,
)
from protocol.testing import SAMPLE_BOX_ID, SAMPLE_TIME, ConnectionPair, ScriptedBox
from protocol.tokens import EndReason, LedgerEntry, RevocationList, SessionReceipt

OPERATOR = testing.operator_key()
ROGUE_OPERATOR = testing.operator_key("rogue")
RING = cose.key_ring(OPERATOR.public_key)
BOX_KEY = testing.ed25519_key("box")
PHONE_KEY = testing.ed25519_key("phone")
OTHER_PHONE_KEY = testing.ed25519_key("other phone")
NOW = SAMPLE_TIME


def label_for(box_key: Ed25519PrivateKey = BOX_KEY, *, outlet: int = 2) -> gatt.QrLabel:
    fingerprint = gatt.box_key_fingerprint(cose.public_key_bytes(box_key.public_key()))
    return gatt.QrLabel(box_id=SAMPLE_BOX_ID, outlet=outlet, fingerprint=fingerprint)


LABEL = label_for()


@pytest.fixture
def box() -> ScriptedBox:
    counter = itertools.count(1)
    return ScriptedBox(
        box_key=BOX_KEY,
        signed_certificate=testing.sample_certificate(BOX_KEY).sign(OPERATOR),
        operator_keys=RING,
        ephemeral_keys=lambda: testing.x25519_key(f"box ephemeral {next(counter)}"),
        session_ids=lambda: next(counter).to_bytes(8, "big"),
    )


_connection_ids: Iterator[int] = itertools.count(0x100)


def new_phone(
    *,
    key: Ed25519PrivateKey = PHONE_KEY,
    label: gatt.QrLabel = LABEL,
    att_mtu: int = 247,
    connection_id: int | None = None,
) -> PhoneSession:
    phone = PhoneSession(
        connection_id=connection_id or next(_connection_ids),
        phone_key=key,
        ephemeral_key=testing.x25519_key(f"phone ephemeral {connection_id}"),
        label=label,
        operator_keys=RING,
        att_mtu=att_mtu,
    )
    phone.connect()
    return phone


def received(events: list[PhoneEvent]) -> list[messages.Message]:
    return [event.message for event in events if isinstance(event, MessageReceived)]


def only(events: list[PhoneEvent], kind: type[messages.Message]) -> messages.Message:
    found = [m for m in received(events) if isinstance(m, kind)]
    assert len(found) == 1, events
    return found[0]


def start(pair: ConnectionPair, grant: bytes, *, outlet: int = 2) -> list[PhoneEvent]:
    pair.phone.send(messages.StartSession(request_id=pair.phone.new_request_id(), outlet=outlet, grant=grant))
    return pair.pump(NOW)


def error_code(events: list[PhoneEvent]) -> ErrorCode:
    message = only(events, messages.ErrorMessage)
    assert isinstance(message, messages.ErrorMessage)
    return message.code


def signed_grant(
    *,
    signer: cose.SigningKey = OPERATOR,
    holder: Ed25519PrivateKey = PHONE_KEY,
    grant_id: bytes = b"grant-01",
    amount_fen: int = 500,
    box_id: str | None = SAMPLE_BOX_ID,
    max_price_fen_per_kwh: int = 150,
    expires_at: int = NOW + 86_400,
) -> bytes:
    grant = testing.sample_grant(
        holder,
        grant_id=grant_id,
        amount_fen=amount_fen,
        box_id=box_id,
        max_price_fen_per_kwh=max_price_fen_per_kwh,
        expires_at=expires_at,
    )
    return grant.sign(signer)


def test_handshake_start_readings_top_up_stop_and_receipt(box: ScriptedBox) -> None:
    pair = ConnectionPair(new_phone(), box)
    events = start(pair, signed_grant())
    assert isinstance(events[0], BoxAuthenticated)
    assert events[0].certificate.box_id == SAMPLE_BOX_ID
    started = only(events, messages.SessionStarted)
    assert isinstance(started, messages.SessionStarted)
    assert (started.outlet, started.balance_fen, started.price_fen_per_kwh) == (2, 500, 120)
    # power flows after two ATT round trips: message_1 -> message_2, message_3 + start -> started
    assert [flight.sender for flight in pair.flights] == ["phone", "box", "phone", "box"]

    box.meter(started.session_id, energy_wh=1000, power_w=2000)
    reading = only(pair.pump(NOW + 1), messages.MeterReading)
    assert isinstance(reading, messages.MeterReading)
    assert (reading.energy_wh, reading.cost_fen, reading.remaining_fen) == (1000, 120, 380)

    pair.phone.send(
        messages.TopUp(
            request_id=pair.phone.new_request_id(),
            session_id=started.session_id,
            grant=signed_grant(grant_id=b"grant-02", amount_fen=300),
        )
    )
    topped = only(pair.pump(NOW + 2), messages.ToppedUp)
    assert isinstance(topped, messages.ToppedUp)
    assert topped.balance_fen == 800

    box.meter(started.session_id, energy_wh=5000, power_w=2000)
    pair.pump(NOW + 3)
    pair.phone.send(
        messages.StopSession(request_id=pair.phone.new_request_id(), session_id=started.session_id)
    )
    ended = only(pair.pump(NOW + 4), messages.SessionEnded)
    assert isinstance(ended, messages.SessionEnded)
    assert ended.end_reason is EndReason.USER_STOP
    entry = LedgerEntry.verify(ended.receipt, cose.key_ring(BOX_KEY.public_key()))
    assert isinstance(entry.body, SessionReceipt)
    assert entry.body.grant_ids == (b"grant-01", b"grant-02")
    assert (entry.body.energy_wh, entry.body.cost_fen) == (5000, 600)


@pytest.mark.parametrize("att_mtu", [23, 24, 100, 185, 247, 517])
def test_the_conversation_works_at_any_mtu(box: ScriptedBox, att_mtu: int) -> None:
    pair = ConnectionPair(new_phone(att_mtu=att_mtu), box)
    assert isinstance(only(start(pair, signed_grant()), messages.SessionStarted), messages.SessionStarted)
    assert all(len(f) <= att_mtu - framing.ATT_OVERHEAD for flight in pair.flights for f in flight.fragments)


def test_walk_away_and_reconnect_to_a_running_session(box: ScriptedBox) -> None:
    first = ConnectionPair(new_phone(), box)
    started = only(start(first, signed_grant()), messages.SessionStarted)
    assert isinstance(started, messages.SessionStarted)
    box.connections.forget(first.phone.connection_id)  # the phone walked out of range

    again = ConnectionPair(new_phone(), box)
    again.phone.send(messages.ListSessions(request_id=again.phone.new_request_id()))
    listing = only(again.pump(NOW + 60), messages.SessionList)
    assert isinstance(listing, messages.SessionList)
    assert [s.session_id for s in listing.sessions] == [started.session_id]
    again.phone.send(
        messages.StopSession(request_id=again.phone.new_request_id(), session_id=started.session_id)
    )
    assert isinstance(only(again.pump(NOW + 61), messages.SessionEnded), messages.SessionEnded)


def test_another_phone_cannot_stop_my_session(box: ScriptedBox) -> None:
    mine = ConnectionPair(new_phone(), box)
    started = only(start(mine, signed_grant()), messages.SessionStarted)
    assert isinstance(started, messages.SessionStarted)
    theirs = ConnectionPair(new_phone(key=OTHER_PHONE_KEY), box)
    theirs.phone.send(
        messages.StopSession(request_id=theirs.phone.new_request_id(), session_id=started.session_id)
    )
    assert error_code(theirs.pump(NOW)) is ErrorCode.SESSION_NOT_OWNER


# S1: the box starts a session only for a good grant.


@pytest.mark.parametrize(
    ("grant", "code"),
    [
        (lambda: signed_grant(signer=ROGUE_OPERATOR), ErrorCode.TOKEN_UNKNOWN_KEY),
        (
            lambda: signed_grant(
                signer=cose.SigningKey(private_key=ROGUE_OPERATOR.private_key, key_id=OPERATOR.key_id)
            ),
            ErrorCode.TOKEN_BAD_SIGNATURE,
        ),
        (lambda: signed_grant(expires_at=NOW), ErrorCode.GRANT_EXPIRED),
        (lambda: signed_grant(holder=OTHER_PHONE_KEY), ErrorCode.GRANT_WRONG_HOLDER),
        (lambda: signed_grant(box_id="BOX-ELSEWHERE"), ErrorCode.GRANT_WRONG_BOX),
        (lambda: signed_grant(max_price_fen_per_kwh=119), ErrorCode.GRANT_PRICE_ABOVE_LIMIT),
        (lambda: signed_grant(amount_fen=0), ErrorCode.GRANT_TOO_SMALL),
        (lambda: b"\xd2\x84garbage", ErrorCode.TOKEN_MALFORMED),
        (lambda: testing.sample_certificate(BOX_KEY).sign(OPERATOR), ErrorCode.TOKEN_WRONG_TYPE),
    ],
    ids=[
        "forged",
        "bad-signature",
        "expired",
        "wrong-cnf",
        "wrong-box",
        "price",
        "zero",
        "garbage",
        "not-a-grant",
    ],
)
def test_bad_grants_are_refused_with_their_code(
    box: ScriptedBox, grant: Callable[[], bytes], code: ErrorCode
) -> None:
    pair = ConnectionPair(new_phone(), box)
    events = start(pair, grant())
    assert error_code(events) is code
    assert not box.sessions
    assert pair.phone.state is SessionState.OPEN  # a refusal is an answer, not a broken link


def test_revoked_grant_phone_and_user_are_refused(box: ScriptedBox) -> None:
    for revocations, code in [
        (
            RevocationList(version=1, issued_at=NOW, grant_ids=frozenset({b"grant-01"})),
            ErrorCode.GRANT_REVOKED,
        ),
        (
            RevocationList(
                version=2,
                issued_at=NOW,
                phone_keys=frozenset({cose.public_key_bytes(PHONE_KEY.public_key())}),
            ),
            ErrorCode.PHONE_REVOKED,
        ),
        (RevocationList(version=3, issued_at=NOW, user_ids=frozenset({1001})), ErrorCode.USER_REVOKED),
    ]:
        box.revocation_list = revocations
        assert error_code(start(ConnectionPair(new_phone(), box), signed_grant())) is code


def test_a_revocation_list_pushed_by_a_phone_takes_effect(box: ScriptedBox) -> None:
    pair = ConnectionPair(new_phone(), box)
    revocations = RevocationList(version=7, issued_at=NOW, grant_ids=frozenset({b"grant-01"}))
    pair.phone.send(
        messages.PushRevocationList(
            request_id=pair.phone.new_request_id(), revocation_list=revocations.sign(OPERATOR)
        )
    )
    accepted = only(pair.pump(NOW), messages.UpdateAccepted)
    assert isinstance(accepted, messages.UpdateAccepted)
    assert accepted.version == 7
    assert error_code(start(pair, signed_grant())) is ErrorCode.GRANT_REVOKED
    forged = revocations.sign(ROGUE_OPERATOR)
    pair.phone.send(
        messages.PushRevocationList(request_id=pair.phone.new_request_id(), revocation_list=forged)
    )
    assert error_code(pair.pump(NOW)) is ErrorCode.TOKEN_UNKNOWN_KEY


def test_a_spent_grant_is_refused(box: ScriptedBox) -> None:
    grant = signed_grant()
    assert isinstance(
        only(start(ConnectionPair(new_phone(), box), grant), messages.SessionStarted), messages.SessionStarted
    )
    assert error_code(start(ConnectionPair(new_phone(), box), grant, outlet=3)) is ErrorCode.GRANT_SPENT


# S2: the phone proceeds only with the box on its label.


def test_wrong_fingerprint_is_refused_and_nothing_is_sent(box: ScriptedBox) -> None:
    other = label_for(testing.ed25519_key("some other box"))
    pair = ConnectionPair(new_phone(label=other), box)
    pair.phone.send(messages.StartSession(request_id=1, outlet=2, grant=signed_grant()))
    events = pair.pump(NOW)
    failed = [e for e in events if isinstance(e, ConnectionFailed)]
    assert [f.code for f in failed] == [ErrorCode.EDHOC_WRONG_BOX]
    assert not box.sessions
    assert not box.spent
    # the grant never left the phone: only message_1 and the EDHOC error went out
    sent = [flight for flight in pair.flights if flight.sender == "phone"]
    assert [f.fragments[0][5] for f in sent] == [LinkKind.EDHOC_MESSAGE_1, LinkKind.EDHOC_ERROR]


def test_certificate_signed_by_an_unknown_operator_is_refused() -> None:
    counter = itertools.count(1)
    rogue_box = ScriptedBox(
        box_key=BOX_KEY,
        signed_certificate=testing.sample_certificate(BOX_KEY).sign(ROGUE_OPERATOR),
        operator_keys=RING,
        ephemeral_keys=lambda: testing.x25519_key(f"rogue ephemeral {next(counter)}"),
        session_ids=lambda: next(counter).to_bytes(8, "big"),
    )
    pair = ConnectionPair(new_phone(), rogue_box)
    failed = [e for e in pair.pump(NOW) if isinstance(e, ConnectionFailed)]
    assert [f.code for f in failed] == [ErrorCode.TOKEN_UNKNOWN_KEY]


def test_a_box_that_does_not_hold_its_certificate_key_is_refused() -> None:
    counter = itertools.count(1)
    impostor = ScriptedBox(
        box_key=testing.ed25519_key("impostor"),  # signs message 2 with the wrong key
        signed_certificate=testing.sample_certificate(BOX_KEY).sign(OPERATOR),
        operator_keys=RING,
        ephemeral_keys=lambda: testing.x25519_key(f"impostor ephemeral {next(counter)}"),
        session_ids=lambda: next(counter).to_bytes(8, "big"),
    )
    pair = ConnectionPair(new_phone(), impostor)
    failed = [e for e in pair.pump(NOW) if isinstance(e, ConnectionFailed)]
    assert [f.code for f in failed] == [ErrorCode.EDHOC_BAD_SIGNATURE]


# S3: replayed, reordered and tampered traffic gets nothing.


def _capture_handshake(box: ScriptedBox) -> tuple[ConnectionPair, list[bytes]]:
    pair = ConnectionPair(new_phone(connection_id=0x777), box)
    events = start(pair, signed_grant())
    assert isinstance(only(events, messages.SessionStarted), messages.SessionStarted)
    phone_fragments = [f for flight in pair.flights if flight.sender == "phone" for f in flight.fragments]
    return pair, phone_fragments


def test_replayed_message_3_and_start_get_nothing(box: ScriptedBox) -> None:
    _, recorded = _capture_handshake(box)
    box.connections.forget(0x777)
    box.data_to_send()
    for fragment in recorded:  # an eavesdropper replays the whole phone side
        box.receive_fragment(fragment, NOW)
    replies = box.data_to_send()
    assert len(box.sessions) == 1  # no second session
    kinds = [framing.Reassembler().receive(f) for f in replies]
    # the box answered message_1 with a fresh message_2, then refused the old message_3
    last = kinds[-1]
    assert isinstance(last, framing.MessageReceived)
    assert last.message[0] in (LinkKind.EDHOC_ERROR, LinkKind.LINK_ERROR)


def test_replayed_and_reordered_records_close_the_connection(box: ScriptedBox) -> None:
    pair, recorded = _capture_handshake(box)
    record_fragment = recorded[-1]
    box.receive_fragment(record_fragment, NOW)  # replay the start record
    events = [e for f in box.data_to_send() for e in pair.phone.receive_fragment(f, NOW)]
    assert [e.code for e in events if isinstance(e, ConnectionFailed)] == [ErrorCode.CHANNEL_REPLAY]
    assert box.connections.session(0x777) is None
    assert len(box.sessions) == 1


def test_tampered_records_are_rejected(box: ScriptedBox) -> None:
    pair, _ = _capture_handshake(box)
    pair.phone.send(messages.ListSessions(request_id=9))
    (fragment,) = pair.phone.data_to_send()
    tampered = bytearray(fragment)
    tampered[-1] ^= 0x01
    box.receive_fragment(bytes(tampered), NOW)
    events = [e for f in box.data_to_send() for e in pair.phone.receive_fragment(f, NOW)]
    assert [e.code for e in events if isinstance(e, ConnectionFailed)] == [ErrorCode.CHANNEL_FORGED]


def test_a_phone_ignores_notifications_for_other_connections(box: ScriptedBox) -> None:
    pair, _ = _capture_handshake(box)
    stranger = framing.fragment(0x999, bytes([LinkKind.LINK_ERROR, 0x01]), att_mtu=247)
    assert pair.phone.receive_fragment(stranger[0], NOW) == []
    assert pair.phone.receive_fragment(b"\x01", NOW) == []  # too short to name a connection
    assert pair.phone.state is SessionState.OPEN


def test_garbage_from_the_radio_never_raises(box: ScriptedBox) -> None:
    garbage = [
        b"",
        b"\x00",
        b"\x00\x01\xc0\x00\x01\x07",
        b"\x12\x34\xc0\x00\x03\x01\x00\x17",
        bytes(range(40)),
    ]
    for fragment in garbage:
        box.receive_fragment(fragment, NOW)
    box.data_to_send()
    assert not box.sessions
    phone = new_phone()
    for fragment in garbage:
        phone.receive_fragment(fragment, NOW)


def test_operator_signed_ack_for_this_box_only() -> None:
    ack = tokens.LedgerAck(box_id="BOX-OTHER", sequence=1, entry_hash=bytes(32), issued_at=NOW)
    counter = itertools.count(1)
    box = ScriptedBox(
        box_key=BOX_KEY,
        signed_certificate=testing.sample_certificate(BOX_KEY).sign(OPERATOR),
        operator_keys=RING,
        ephemeral_keys=lambda: testing.x25519_key(f"ack ephemeral {next(counter)}"),
        session_ids=lambda: next(counter).to_bytes(8, "big"),
    )
    pair = ConnectionPair(new_phone(), box)
    pair.phone.send(messages.PushLedgerAck(request_id=4, ledger_ack=ack.sign(OPERATOR)))
    assert error_code(pair.pump(NOW)) is ErrorCode.TOKEN_WRONG_AUDIENCE


def test_several_phones_interleaved_fragment_by_fragment_are_told_apart(box: ScriptedBox) -> None:
    """bless gives the box writes without a sender: only the connection id separates phones."""
    keys = [testing.ed25519_key(f"crowd phone {i}") for i in range(4)]
    phones = [new_phone(key=key, att_mtu=23, connection_id=0x2000 + i) for i, key in enumerate(keys)]
    for i, phone in enumerate(phones):
        phone.send(
            messages.StartSession(
                request_id=1,
                outlet=i + 1,
                grant=signed_grant(holder=keys[i], grant_id=b"crowd-0" + bytes([i])),
            )
        )
    results: dict[int, list[PhoneEvent]] = {p.connection_id: [] for p in phones}
    for _ in range(10):
        queues = [p.data_to_send() for p in phones]
        # round-robin: one write from each phone in turn, as a busy radio would deliver them
        for fragments in itertools.zip_longest(*queues):
            for fragment in fragments:
                if fragment is not None:
                    box.receive_fragment(fragment, NOW)
        for notification in box.data_to_send():  # bless notifies every subscriber
            for phone in phones:
                results[phone.connection_id].extend(phone.receive_fragment(notification, NOW))
    for i, phone in enumerate(phones):
        started = only(results[phone.connection_id], messages.SessionStarted)
        assert isinstance(started, messages.SessionStarted)
        assert started.outlet == i + 1
    assert len(box.sessions) == 4


def test_a_full_box_makes_room_by_dropping_the_least_recently_heard_connection(box: ScriptedBox) -> None:
    pairs = [ConnectionPair(new_phone(connection_id=0x3000 + i), box) for i in range(9)]
    for pair in pairs[:8]:
        pair.pump(NOW)
    pairs[0].phone.send(messages.ListSessions(request_id=1))  # phone 0 speaks again: phone 1 is now oldest
    pairs[0].pump(NOW)
    pairs[8].pump(NOW)  # the ninth phone arrives
    assert box.connections.session(0x3001) is None
    assert box.connections.session(0x3000) is not None
    assert box.connections.session(0x3008) is not None
    pairs[1].phone.send(messages.ListSessions(request_id=1))
    failed = [e for e in pairs[1].pump(NOW) if isinstance(e, ConnectionFailed)]
    assert [f.code for f in failed] == [ErrorCode.EDHOC_UNEXPECTED_MESSAGE]  # told to reconnect
    # the stale phone's record did not push out a live connection
    assert all(box.connections.session(0x3000 + i) is not None for i in (0, *range(2, 9)))
