"""A phone for tests and benchmarks: phone_client's bleak central driven by JSON lines on stdin.

Run on a BLE node (its DBUS_SYSTEM_BUS_ADDRESS in the environment):
``python -m testbench.phone_agent``. Each command ``{"cmd": ..., "id": n, ...}`` gets one reply
``{"reply": n, "ok": true, ...}`` or ``{"reply": n, "ok": false, "code": <ErrorCode>, "error": ...}``.
Messages the box sends on its own (live readings, a session ended by the box) come as events.
Byte strings travel as hex.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import typing
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from phone_client.central import BoxLink, BoxRefusedError, BoxUnreachableError, connect_to_box, find_box
from protocol import cose, gatt, messages
from protocol.errors import ErrorCode, PowerboxError


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _describe(message: messages.Message) -> dict[str, Any]:
    fields: dict[str, Any] = {"type": type(message).__name__}
    for name in message.__dataclass_fields__:
        value = getattr(message, name)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, tuple):
            value = [
                {k: (v.hex() if isinstance(v, bytes) else v) for k, v in vars_of(item).items()}
                for item in value
            ]
        elif isinstance(value, int):
            value = int(value)
        fields[name] = value
    return fields


def vars_of(item: object) -> dict[str, Any]:
    return {name: getattr(item, name) for name in getattr(item, "__dataclass_fields__", {})}


class PhoneAgent:
    def __init__(self) -> None:
        self._link: BoxLink | None = None
        self._context: contextlib.AbstractAsyncContextManager[Any] | None = None
        self._pump: asyncio.Task[None] | None = None

    async def _forward_unsolicited(self, link: BoxLink) -> None:
        while True:
            message = await link.unsolicited.get()
            emit({"event": "message", **_describe(message)})

    async def connect(self, command: dict[str, Any]) -> dict[str, Any]:
        """Scan for the labelled box, connect and authenticate; optionally start a session at once."""
        await self.disconnect({})
        label = gatt.QrLabel.decode(command["label"])
        phone_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(command["phone_key"]))
        operator_keys = cose.key_ring(
            *(Ed25519PublicKey.from_public_bytes(bytes.fromhex(k)) for k in command["operator_keys"])
        )
        early: Callable[[int], messages.PhoneMessage] | None = None
        if "grant" in command:
            grant = bytes.fromhex(command["grant"])

            def early(request_id: int) -> messages.PhoneMessage:
                return messages.StartSession(request_id=request_id, outlet=label.outlet, grant=grant)

        scan_started = time.perf_counter()
        found = await find_box(label, timeout_s=float(command.get("timeout_s", 10.0)))
        connect_started = time.perf_counter()
        self._context = connect_to_box(
            found, label=label, phone_key=phone_key, operator_keys=operator_keys, early_request=early
        )
        link, early_answer = await self._context.__aenter__()
        self._link = link
        certificate = await link.authenticated()
        reply: dict[str, Any] = {
            "box_id": certificate.box_id,
            "scan_ms": (connect_started - scan_started) * 1000,
        }
        if early_answer is not None:
            answer = await asyncio.wait_for(early_answer, 10.0)
            if isinstance(answer, messages.ErrorMessage):
                raise BoxRefusedError(answer.code.name, code=answer.code)
            reply["answer"] = _describe(answer)
        reply["connect_to_answer_ms"] = (time.perf_counter() - connect_started) * 1000
        reply["scan_to_answer_ms"] = (time.perf_counter() - scan_started) * 1000
        self._pump = asyncio.create_task(self._forward_unsolicited(link))
        return reply

    def _require_link(self) -> BoxLink:
        if self._link is None:
            raise BoxUnreachableError("not connected")
        return self._link

    async def send(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one request (by message type name, fields as JSON, bytes as hex) and return the answer."""
        link = self._require_link()
        cls = next(c for c in messages.MESSAGE_CLASSES.values() if c.__name__ == command["message"])
        fields = dict(command.get("fields", {}))
        for name, value in list(fields.items()):
            if isinstance(value, str) and name not in ("box_id",):
                fields[name] = bytes.fromhex(value)

        def build(request_id: int) -> messages.PhoneMessage:
            request = cls(request_id=request_id, **fields)  # type: ignore[call-arg]  # any request type
            return typing.cast(messages.PhoneMessage, request)

        answer = await link.request(build)
        return {"answer": _describe(answer)}

    async def disconnect(self, command: dict[str, Any]) -> dict[str, Any]:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self._context is not None:
            context, self._context, self._link = self._context, None, None
            await context.__aexit__(None, None, None)
        return {}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    agent = PhoneAgent()
    handlers = {"connect": agent.connect, "send": agent.send, "disconnect": agent.disconnect}
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    emit({"event": "ready"})
    while line := await reader.readline():
        try:
            command = json.loads(line)
            handler = handlers[command["cmd"]]
        except (ValueError, KeyError, TypeError):
            emit({"event": "bad_command", "line": line.decode(errors="replace")[:200]})
            continue
        try:
            emit({"reply": command.get("id"), "ok": True, **await handler(command)})
        except PowerboxError as exc:
            emit({"reply": command.get("id"), "ok": False, "code": int(exc.code), "error": exc.detail})
        except (KeyError, ValueError, TypeError, StopIteration) as exc:
            emit(
                {
                    "reply": command.get("id"),
                    "ok": False,
                    "code": int(ErrorCode.MESSAGE_MALFORMED),
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
    await agent.disconnect({})


if __name__ == "__main__":
    asyncio.run(main())
