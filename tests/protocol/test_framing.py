"""GATT framing (docs/protocol.md §5): round trips, interleaving, bounded memory, every rejection code."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode, LocalProtocolError
from protocol.framing import (
    ATT_MTU_MAX,
    ATT_MTU_MIN,
    ATT_OVERHEAD,
    CONTINUATION_HEADER_SIZE,
    FIRST_HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    FrameRejected,
    MessageReceived,
    Reassembler,
    fragment,
)

FIRST, LAST = 0x80, 0x40
mtus = st.integers(ATT_MTU_MIN, ATT_MTU_MAX)
connection_ids = st.integers(1, 0xFFFF)


def raw_fragment(
    connection_id: int, control: int, payload: bytes = b"", *, length: int | None = None
) -> bytes:
    """Build a fragment by hand, so tests can say things `fragment()` never would."""
    header = connection_id.to_bytes(2, "big") + bytes([control])
    if length is not None:
        header += length.to_bytes(2, "big")
    return header + payload


def feed(reassembler: Reassembler, fragments: list[bytes]) -> list[MessageReceived | FrameRejected]:
    events = [reassembler.receive(f) for f in fragments]
    return [e for e in events if e is not None]


def rejected(event: object, code: ErrorCode, connection_id: int | None = 7) -> None:
    assert isinstance(event, FrameRejected), event
    assert event.code == code, event
    assert event.connection_id == connection_id


# --- fragment() ---------------------------------------------------------------------------------


def test_overhead_per_fragment() -> None:
    assert FIRST_HEADER_SIZE == 5
    assert CONTINUATION_HEADER_SIZE == 3
    assert ATT_OVERHEAD == 3
    # At the minimum MTU the first fragment carries 15 message bytes and every later one 17.
    fragments = fragment(1, bytes(15 + 17 + 1), att_mtu=23)
    assert [len(f) for f in fragments] == [20, 20, 4]


def test_wire_layout() -> None:
    message = bytes(range(30))
    first, second = fragment(0x1234, message, att_mtu=23)
    assert first == b"\x12\x34\x80\x00\x1e" + message[:15]
    assert second == b"\x12\x34\x41" + message[15:]


def test_empty_message_is_one_first_last_fragment() -> None:
    assert fragment(5, b"", att_mtu=23) == [b"\x00\x05\xc0\x00\x00"]
    event = Reassembler().receive(b"\x00\x05\xc0\x00\x00")
    assert event == MessageReceived(connection_id=5, message=b"")


@pytest.mark.parametrize(
    ("connection_id", "size", "mtu"),
    [
        (0, 1, 23),
        (0x10000, 1, 23),
        (-1, 1, 23),
        (1, MAX_MESSAGE_SIZE + 1, 23),
        (1, 1, ATT_MTU_MIN - 1),
        (1, 1, ATT_MTU_MAX + 1),
    ],
)
def test_fragment_rejects_misuse(connection_id: int, size: int, mtu: int) -> None:
    with pytest.raises(LocalProtocolError):
        fragment(connection_id, bytes(size), att_mtu=mtu)


@settings(max_examples=150, deadline=None)
@given(connection_id=connection_ids, message=st.binary(max_size=MAX_MESSAGE_SIZE), mtu=mtus)
@example(connection_id=1, message=bytes(MAX_MESSAGE_SIZE), mtu=ATT_MTU_MIN)  # 482 fragments: seq wraps
@example(connection_id=0xFFFF, message=bytes(range(256)) * 32, mtu=ATT_MTU_MAX)
def test_round_trip(connection_id: int, message: bytes, mtu: int) -> None:
    fragments = fragment(connection_id, message, att_mtu=mtu)
    assert all(len(f) <= mtu - ATT_OVERHEAD for f in fragments)
    reassembler = Reassembler()
    *head, last = fragments
    assert all(reassembler.receive(f) is None for f in head)
    assert reassembler.receive(last) == MessageReceived(connection_id=connection_id, message=message)
    assert reassembler.buffered_bytes == 0
    assert reassembler.pending_connections == frozenset()


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    messages=st.dictionaries(connection_ids, st.binary(max_size=600), min_size=1, max_size=8),
    mtu=mtus,
)
def test_interleaved_connections_reassemble(
    data: st.DataObject, messages: dict[int, bytes], mtu: int
) -> None:
    queues = {cid: fragment(cid, message, att_mtu=mtu) for cid, message in messages.items()}
    reassembler = Reassembler(max_connections=len(messages))
    received: dict[int, bytes] = {}
    while queues:
        # Any interleaving across connections; order within a connection is kept (GATT is ordered).
        cid = data.draw(st.sampled_from(sorted(queues)))
        event = reassembler.receive(queues[cid].pop(0))
        if not queues[cid]:
            del queues[cid]
            assert isinstance(event, MessageReceived)
            assert event.connection_id == cid
            received[cid] = event.message
        else:
            assert event is None
    assert received == messages


# --- garbage and bounded memory -----------------------------------------------------------------


@st.composite
def plausible_fragments(draw: st.DrawFn) -> bytes:
    """Fragments that get past the first checks, so garbage reaches the deeper states."""
    connection_id = draw(st.integers(0, 5))
    # Flags and sequence drawn apart, with small sequence numbers, so some fragments fit together.
    control = draw(st.sampled_from([0, FIRST, LAST, FIRST | LAST])) | draw(st.integers(0, 3))
    # Small declared lengths, so partial buffers really fill up instead of being refused outright.
    length = draw(st.integers(0, 260)).to_bytes(2, "big") if control & FIRST else b""
    body = draw(st.binary(max_size=80))
    return connection_id.to_bytes(2, "big") + bytes([control]) + length + body


@st.composite
def shuffled_real_fragments(draw: st.DrawFn) -> list[bytes]:
    """Genuine fragments of several connections, shuffled: reordered, mixed, some lost."""
    fragments = [
        f
        for cid in range(1, draw(st.integers(1, 6)) + 1)
        for f in fragment(cid, draw(st.binary(min_size=20, max_size=300)), att_mtu=draw(st.integers(23, 60)))
    ]
    shuffled = draw(st.permutations(fragments))
    return shuffled[: draw(st.integers(0, len(shuffled)))]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.lists(st.one_of(st.binary(max_size=90), plausible_fragments()), max_size=60),
        shuffled_real_fragments(),
    )
)
def test_garbage_never_raises_and_memory_is_bounded(fragments: list[bytes]) -> None:
    max_connections, max_size = 3, 200
    reassembler = Reassembler(max_message_size=max_size, max_connections=max_connections)
    for item in fragments:
        event = reassembler.receive(item)
        assert event is None or isinstance(event, MessageReceived | FrameRejected)
        if isinstance(event, MessageReceived):
            assert len(event.message) <= max_size
        assert len(reassembler.pending_connections) <= max_connections
        assert reassembler.buffered_bytes <= max_connections * max_size


def test_receive_tolerates_non_bytes() -> None:
    event = Reassembler().receive(12345)  # type: ignore[arg-type]  # the radio layer could hand us anything
    rejected(event, ErrorCode.FRAME_MALFORMED, connection_id=None)


# --- each rejection and its code ----------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\x00"])
def test_too_short_for_a_connection_id(data: bytes) -> None:
    rejected(Reassembler().receive(data), ErrorCode.FRAME_MALFORMED, connection_id=None)


def test_no_control_byte() -> None:
    rejected(Reassembler().receive(b"\x00\x07"), ErrorCode.FRAME_MALFORMED)


def test_reserved_connection_id() -> None:
    rejected(Reassembler().receive(raw_fragment(0, FIRST | LAST, length=0)), ErrorCode.FRAME_MALFORMED, None)


@pytest.mark.parametrize("data", [raw_fragment(7, FIRST), raw_fragment(7, FIRST) + b"\x00"])
def test_first_without_length(data: bytes) -> None:
    rejected(Reassembler().receive(data), ErrorCode.FRAME_MALFORMED)


def test_declared_length_above_limit() -> None:
    reassembler = Reassembler(max_message_size=100)
    rejected(reassembler.receive(raw_fragment(7, FIRST, length=101)), ErrorCode.FRAME_TOO_LARGE)
    assert reassembler.receive(raw_fragment(7, FIRST | LAST, b"x" * 100, length=100)) is not None


def test_first_carries_more_than_declared() -> None:
    rejected(Reassembler().receive(raw_fragment(7, FIRST, b"abc", length=2)), ErrorCode.FRAME_TOO_LARGE)


def test_continuation_overflows_declared_length() -> None:
    reassembler = Reassembler()
    assert reassembler.receive(raw_fragment(7, FIRST, b"ab", length=4)) is None
    rejected(reassembler.receive(raw_fragment(7, LAST | 1, b"cde")), ErrorCode.FRAME_TOO_LARGE)
    assert reassembler.pending_connections == frozenset()


def test_last_short_of_declared_length() -> None:
    reassembler = Reassembler()
    rejected(reassembler.receive(raw_fragment(7, FIRST | LAST, b"ab", length=3)), ErrorCode.FRAME_MALFORMED)
    assert reassembler.receive(raw_fragment(7, FIRST, b"ab", length=5)) is None
    rejected(reassembler.receive(raw_fragment(7, LAST | 1, b"c")), ErrorCode.FRAME_MALFORMED)
    assert reassembler.pending_connections == frozenset()


def test_wrong_sequence_drops_the_partial_message() -> None:
    reassembler = Reassembler()
    fragments = fragment(7, bytes(100), att_mtu=23)
    assert reassembler.receive(fragments[0]) is None
    rejected(reassembler.receive(fragments[2]), ErrorCode.FRAME_OUT_OF_ORDER)
    assert reassembler.buffered_bytes == 0
    # The rest of that message is now orphaned, and each orphan is refused, not buffered.
    rejected(reassembler.receive(fragments[1]), ErrorCode.FRAME_OUT_OF_ORDER)
    # The connection recovers with a fresh message.
    assert feed(reassembler, fragment(7, b"again", att_mtu=23)) == [
        MessageReceived(connection_id=7, message=b"again")
    ]


def test_duplicated_fragment_is_out_of_order() -> None:
    reassembler = Reassembler()
    fragments = fragment(7, bytes(100), att_mtu=23)
    assert reassembler.receive(fragments[0]) is None
    assert reassembler.receive(fragments[1]) is None
    rejected(reassembler.receive(fragments[1]), ErrorCode.FRAME_OUT_OF_ORDER)


def test_first_with_nonzero_sequence() -> None:
    rejected(Reassembler().receive(raw_fragment(7, FIRST | LAST | 3, length=0)), ErrorCode.FRAME_OUT_OF_ORDER)


def test_continuation_without_a_message() -> None:
    rejected(Reassembler().receive(raw_fragment(7, LAST | 1, b"x")), ErrorCode.FRAME_OUT_OF_ORDER)


def test_first_while_a_message_is_in_progress() -> None:
    reassembler = Reassembler()
    assert reassembler.receive(raw_fragment(7, FIRST, b"ab", length=4)) is None
    rejected(
        reassembler.receive(raw_fragment(7, FIRST | LAST, b"xy", length=2)), ErrorCode.FRAME_OUT_OF_ORDER
    )
    assert reassembler.pending_connections == frozenset()
    rejected(reassembler.receive(raw_fragment(7, LAST | 1, b"cd")), ErrorCode.FRAME_OUT_OF_ORDER)


def test_too_many_connections() -> None:
    reassembler = Reassembler(max_connections=2)
    assert reassembler.receive(raw_fragment(1, FIRST, b"a", length=2)) is None
    assert reassembler.receive(raw_fragment(2, FIRST, b"a", length=2)) is None
    rejected(
        reassembler.receive(raw_fragment(3, FIRST, b"a", length=2)), ErrorCode.FRAME_TOO_MANY_CONNECTIONS, 3
    )
    # Single-fragment messages need no buffer and still get through.
    assert reassembler.receive(raw_fragment(3, FIRST | LAST, b"ok", length=2)) == MessageReceived(
        connection_id=3, message=b"ok"
    )
    reassembler.forget(1)
    assert reassembler.receive(raw_fragment(3, FIRST, b"a", length=2)) is None
    assert reassembler.pending_connections == frozenset({2, 3})


def test_rejection_leaves_other_connections_alone() -> None:
    reassembler = Reassembler()
    assert reassembler.receive(raw_fragment(1, FIRST, b"a", length=2)) is None
    assert reassembler.receive(raw_fragment(2, FIRST, b"a", length=2)) is None
    rejected(reassembler.receive(raw_fragment(2, 5, b"b")), ErrorCode.FRAME_OUT_OF_ORDER, 2)
    assert reassembler.receive(raw_fragment(1, LAST | 1, b"b")) == MessageReceived(
        connection_id=1, message=b"ab"
    )


def test_forget_drops_state() -> None:
    reassembler = Reassembler()
    assert reassembler.receive(raw_fragment(7, FIRST, b"ab", length=4)) is None
    assert reassembler.buffered_bytes == 2
    reassembler.forget(7)
    reassembler.forget(8)  # unknown ids are fine
    assert reassembler.buffered_bytes == 0
    rejected(reassembler.receive(raw_fragment(7, LAST | 1, b"cd")), ErrorCode.FRAME_OUT_OF_ORDER)


def test_accept_only_ignores_other_connections() -> None:
    phone = Reassembler(accept_only=7)
    other = fragment(8, bytes(50), att_mtu=23)
    mine = fragment(7, b"for me" * 10, att_mtu=23)
    events = feed(phone, [other[0], mine[0], other[1], mine[1], *other[2:], *mine[2:]])
    assert events == [MessageReceived(connection_id=7, message=b"for me" * 10)]
    assert phone.receive(raw_fragment(0, FIRST | LAST, length=0)) is None  # not ours either
    rejected(phone.receive(b"\x00"), ErrorCode.FRAME_MALFORMED, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_message_size": -1},
        {"max_message_size": 0x10000},
        {"max_connections": 0},
        {"accept_only": 0},
        {"accept_only": 0x10000},
    ],
)
def test_reassembler_rejects_bad_configuration(kwargs: dict[str, int]) -> None:
    with pytest.raises(LocalProtocolError):
        Reassembler(**kwargs)


def test_events_are_frozen_slotted_and_validated() -> None:
    event = MessageReceived(connection_id=1, message=b"")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.connection_id = 2  # type: ignore[misc]  # checking the runtime guard
    assert not hasattr(event, "__dict__")
    with pytest.raises(TypeError):
        MessageReceived(1, b"")  # type: ignore[call-arg]  # kw_only
    with pytest.raises(LocalProtocolError):
        MessageReceived(connection_id=0, message=b"")
