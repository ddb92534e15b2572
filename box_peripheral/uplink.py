"""The box's 4G uplink to the settlement server (docs/server-api.md: box login, poll, ledger).

When the link is up the box pushes its unacknowledged ledger entries, and long-polls for newer
revocation lists, tariff tables, acks, reservations and remote commands (remote fee control).
Everything it receives is operator-signed and checked exactly as if a phone had relayed it. Any
failure backs off exponentially; the box never needs the link to sell electricity.

The link can be switched off to simulate 4G going down: `enabled = false` in box.toml, or at run
time a file named `uplink-off` beside the database (`powerbox box uplink off|on`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from box_peripheral.controller import BoxController
from protocol import cose, proofs
from protocol.errors import ErrorCode, PowerboxError
from protocol.messages import UpdateKind

log = logging.getLogger("powerbox.box.uplink")

BATCH_ENTRIES = 200
OFF_SWITCH_NAME = "uplink-off"
MAX_BACKOFF_S = 60.0


class UplinkError(PowerboxError):
    """The server could not be reached or answered something unusable; the box retries later."""

    code = ErrorCode.API_UNAVAILABLE


def off_switch_path(database: Path) -> Path:
    return database.parent / OFF_SWITCH_NAME


@dataclass(slots=True)
class _Commands:
    """Remote commands in hand, and the results to report on the next poll."""

    received: set[int] = field(default_factory=set)
    completed: dict[int, tuple[str, str]] = field(default_factory=dict)


def _retrieve(task: asyncio.Future[httpx.Response]) -> None:
    """Mark an abandoned request's outcome as seen (it was given up on, not forgotten)."""
    if not task.cancelled():
        task.exception()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise UplinkError(f"{what} missing from the server's answer")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UplinkError(f"{what} is not base64") from None


class Uplink:
    def __init__(
        self,
        controller: BoxController,
        *,
        server: str,
        box_key: cose.SigningKey,
        off_switch: Path,
        long_poll_s: int = 20,
        enabled: bool = True,
        client: httpx.AsyncClient | None = None,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        self._controller = controller
        self._box_key = box_key
        self._off_switch = off_switch
        self._long_poll_s = long_poll_s
        self._enabled = enabled
        self._client = client or httpx.AsyncClient(base_url=server, timeout=long_poll_s + 10)
        self._token: str | None = None
        self._commands = _Commands()
        self._backoff_s = 1.0
        self._jitter = random_fraction
        self.connected = False  # as of the last exchange: for status displays

    def is_on(self) -> bool:
        return self._enabled and not self._off_switch.exists()

    async def run(self) -> None:
        """Forever: push, poll, apply; back off on failure; idle while switched off."""
        try:
            while True:
                if not self.is_on():
                    self.connected = False
                    self._token = None
                    await asyncio.sleep(0.5)
                    continue
                try:
                    await self._exchange()
                    self._backoff_s = 1.0
                    self.connected = True
                except UplinkError as exc:
                    self.connected = False
                    delay = self._backoff_s * (0.5 + self._jitter())
                    log.info("uplink: %s; retrying in %.1f s", exc.detail, delay)
                    self._backoff_s = min(MAX_BACKOFF_S, self._backoff_s * 2)
                    await self._sleep_unless_switched(delay)
        finally:
            await self._client.aclose()

    async def _sleep_unless_switched(self, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        # the switch is a file another process touches: look at it twice a second
        while asyncio.get_running_loop().time() < deadline and self.is_on():  # noqa: ASYNC110
            await asyncio.sleep(min(0.5, seconds))

    async def _call(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        if not self.is_on():
            raise UplinkError("switched off")
        headers = {"Authorization": f"Bearer {self._token}"} if auth and self._token else {}
        request = asyncio.ensure_future(self._client.post(path, json=body, headers=headers))
        try:
            # the 4G switch can go off in the middle of a long poll: give up on the request then
            while not request.done():
                await asyncio.wait({request}, timeout=0.5)
                if not self.is_on():
                    raise UplinkError("switched off")
        finally:
            if not request.done():
                request.cancel()
            request.add_done_callback(_retrieve)
        try:
            response = request.result()
        except httpx.HTTPError as exc:
            raise UplinkError(f"{path}: {type(exc).__name__}") from None
        if response.status_code == 401 and auth:
            self._token = None
            raise UplinkError("the server asked the box to log in again")
        if response.status_code >= 400:
            raise UplinkError(f"{path}: HTTP {response.status_code} {response.text[:200]}")
        try:
            answer = response.json()
        except ValueError:
            raise UplinkError(f"{path}: the answer is not JSON") from None
        if not isinstance(answer, dict):
            raise UplinkError(f"{path}: unexpected answer")
        return answer

    async def _login(self) -> None:
        box_id = self._controller.box_id
        challenge = await self._call("/v1/auth/box/challenge", {"box_id": box_id}, auth=False)
        nonce = _unb64(challenge.get("nonce"), "nonce")
        proof = proofs.sign_possession(
            context=proofs.ProofContext.BOX_UPLINK, subject=box_id, nonce=nonce, key=self._box_key
        )
        token = await self._call(
            "/v1/auth/box/token", {"box_id": box_id, "nonce": _b64(nonce), "proof": _b64(proof)}, auth=False
        )
        access = token.get("access_token")
        if not isinstance(access, str):
            raise UplinkError("no access token in the login answer")
        self._token = access

    async def _exchange(self) -> None:
        if self._token is None:
            await self._login()
        await self._push_ledger()
        await self._poll()

    async def _push_ledger(self) -> None:
        while entries := await self._controller.ledger_after_ack(BATCH_ENTRIES):
            answer = await self._call("/v1/box/ledger", {"entries": [_b64(e) for e in entries]})
            ack = answer.get("ledger_ack")
            if ack is None:
                return  # the server holds them but waits for a gap to fill: nothing to prune yet
            kept = await self._controller.accept_from_uplink(UpdateKind.LEDGER_ACK, _unb64(ack, "ledger_ack"))
            if not kept:
                return
            if len(entries) < BATCH_ENTRIES:
                return

    async def _poll(self) -> None:
        revocation_version, tariff_version, ack_sequence = await self._controller.uplink_state()
        body = {
            "revocation_version": revocation_version,
            "tariff_version": tariff_version,
            "ack_sequence": ack_sequence,
            "known_reservations": [r.hex() for r in self._controller.reservation_ids()],
            "received_commands": sorted(self._commands.received),
            "completed_commands": [
                {"command_id": command_id, "result": result, "detail": detail}
                for command_id, (result, detail) in self._commands.completed.items()
            ],
            "outlets": [{"number": n, "available": a} for n, a in self._controller.outlet_availability()],
            "box_time": self._controller.clock.now(),
            "wait_seconds": self._long_poll_s,
        }
        answer = await self._call("/v1/box/poll", body)
        self._commands.completed.clear()  # reported
        for name, kind in (
            ("revocation_list", UpdateKind.REVOCATION_LIST),
            ("tariff_table", UpdateKind.TARIFF_TABLE),
        ):
            update = answer.get(name)
            if isinstance(update, dict):
                await self._controller.accept_from_uplink(kind, _unb64(update.get("signed"), name))
        if answer.get("ledger_ack") is not None:
            await self._controller.accept_from_uplink(
                UpdateKind.LEDGER_ACK, _unb64(answer["ledger_ack"], "ack")
            )
        reservations = answer.get("reservations")
        if isinstance(reservations, list):
            self._controller.replace_reservations([_unb64(r, "reservation") for r in reservations])
        for command in answer.get("commands", []):
            await self._run_command(command)

    async def _run_command(self, command: object) -> None:
        if not isinstance(command, dict) or not isinstance(command.get("command_id"), int):
            raise UplinkError("malformed remote command")
        command_id = command["command_id"]
        if command_id in self._commands.received:
            return
        self._commands.received.add(command_id)
        outlet = command.get("outlet")
        session = command.get("session_id")
        try:
            session_id = bytes.fromhex(session) if isinstance(session, str) else None
        except ValueError:
            session_id = None
        kind = command.get("kind")
        if kind == "remote_stop":
            done = await self._controller.remote_stop(
                session_id=session_id, outlet=outlet if session_id is None else None
            )
        elif kind == "trip" and isinstance(outlet, int):
            done = await self._controller.remote_stop(outlet=outlet)
        else:
            self._commands.completed[command_id] = ("failed", f"unknown command {kind!r}")
            return
        log.info("remote %s on outlet %s: %s", kind, outlet, "done" if done else "nothing to stop")
        self._commands.completed[command_id] = ("done", "") if done else ("failed", "nothing running there")
        self._commands.received.discard(command_id)
