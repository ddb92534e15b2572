"""Application messages: every type round-trips; malformed input is a MessageError, nothing else."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import messages
from protocol.errors import ErrorCode, MessageError
from protocol.tokens import Door, EndReason


def _strategy(annotation: Any) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, __import__("types").UnionType):
        return st.one_of(*(_strategy(a) for a in typing.get_args(annotation)))
    if annotation is type(None):
        return st.none()
    if origin is tuple:
        return st.lists(_strategy(typing.get_args(annotation)[0]), max_size=3).map(tuple)
    if annotation in (ErrorCode, EndReason, Door, messages.UpdateKind):
        return st.sampled_from(list(annotation))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(0, 2**63 - 1)
    if annotation is bytes:
        return st.binary(max_size=300)
    if annotation is str:
        return st.text(max_size=20)
    if dataclasses.is_dataclass(annotation):
        return _dataclass_strategy(annotation)  # type: ignore[arg-type]
    raise AssertionError(annotation)


def _dataclass_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: _strategy(hints[f.name]) for f in dataclasses.fields(cls) if f.init}
    return st.builds(cls, **fields)


ALL_MESSAGES = st.one_of(*(_dataclass_strategy(cls) for cls in messages.MESSAGE_CLASSES.values()))


@settings(max_examples=400, deadline=None)
@given(message=ALL_MESSAGES)
def test_every_message_round_trips(message: messages.Message) -> None:
    assert messages.decode_message(message.encode()) == message


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_is_a_message_error(data: bytes) -> None:
    # a few random byte strings happen to be valid messages: those decode, which is fine
    try:
        messages.decode_message(data)
    except MessageError as exc:
        code = exc.code
    else:
        return
    assert code == ErrorCode.MESSAGE_MALFORMED


@settings(max_examples=300, deadline=None)
@given(message=ALL_MESSAGES, data=st.data())
def test_wrongly_typed_fields_are_refused(message: messages.Message, data: st.DataObject) -> None:
    items = cbor2.loads(message.encode())
    if len(items) < 2:
        return
    index = data.draw(st.integers(1, len(items) - 1))
    items[index] = data.draw(
        st.sampled_from([-1, "text", 1.5, [1], {1: 2}]).filter(lambda v: type(v) is not type(items[index]))
    )
    with pytest.raises(MessageError):
        messages.decode_message(cbor2.dumps(items))


def test_direction_is_checked() -> None:
    started = messages.ToppedUp(request_id=1, session_id=b"s", balance_fen=3).encode()
    with pytest.raises(MessageError) as excinfo:
        messages.decode_phone_message(started)
    assert excinfo.value.code == ErrorCode.MESSAGE_UNEXPECTED
    stop = messages.StopSession(request_id=1, session_id=b"s").encode()
    with pytest.raises(MessageError):
        messages.decode_box_message(stop)


def test_unknown_type_missing_and_extra_fields_are_refused() -> None:
    for raw in (
        [99, 1],
        [messages.MessageType.STOP_SESSION, 1],
        [messages.MessageType.STOP_SESSION, 1, b"s", 3],
        [],
    ):
        with pytest.raises(MessageError):
            messages.decode_message(cbor2.dumps(raw))
    with pytest.raises(MessageError):
        messages.decode_message(messages.StopSession(request_id=1, session_id=b"s").encode() + b"\x00")
