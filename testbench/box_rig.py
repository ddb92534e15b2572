"""A box controller on test hardware and a real SQLite store, with phones joined in memory.

For tests and benchmarks of the box's own logic, without the radio. Time is the caller's: the
wall clock, the monotonic clock and the hardware's energy all move only when `advance` is
called, so fee control is checked exactly, without sleeping. The hardware is the in-memory
driver, or the Modbus driver against an in-process simulated plant.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from box_peripheral.clock import BoxClock
from box_peripheral.controller import BoxController, BoxPolicy
from box_peripheral.hardware.base import BoxHardware
from box_peripheral.hardware.memory import MemoryHardware
from box_peripheral.store import BoxStore
from protocol import cose, gatt, messages, sealing, testing
from protocol.session import MessageReceived, PhoneEvent, PhoneSession
from protocol.tokens import BoxCertificate

OPERATOR = testing.operator_key()
OPERATOR_ENCRYPTION = testing.x25519_key("operator encryption")
BOX_KEY = testing.ed25519_key("box")
START_TIME = testing.SAMPLE_TIME
POLICY = BoxPolicy(poll_interval_ms=1000, idle_timeout_s=60, relay_latency_ms=30, door_window_s=300)
_connection_ids = itertools.count(0x4000)


@dataclass
class Phone:
    key: Ed25519PrivateKey
    session: PhoneSession
    events: list[PhoneEvent] = field(default_factory=list)

    def received(self, kind: type[messages.Message]) -> list[messages.Message]:
        return [
            e.message for e in self.events if isinstance(e, MessageReceived) and isinstance(e.message, kind)
        ]

    def last(self, kind: type[messages.Message]) -> messages.Message:
        found = self.received(kind)
        assert found, f"no {kind.__name__} among {[type(e).__name__ for e in self.events][-10:]}"
        return found[-1]

    def errors(self) -> list[int]:
        return [m.code for m in self.received(messages.ErrorMessage) if isinstance(m, messages.ErrorMessage)]


class Rig:
    def __init__(
        self,
        controller: BoxController,
        hardware: BoxHardware,
        clock: list[int],
        advance: Callable[[int], None],
        operator: cose.SigningKey = OPERATOR,
    ) -> None:
        self.operator = operator
        self.controller = controller
        self.hardware = hardware
        self._clock = clock  # [wall ms, monotonic ms]
        self._advance_hardware = advance
        self.phones: list[Phone] = []
        self._writes: list[bytes] = []
        self.box_cpu_ns = 0  # CPU spent inside the controller on writes (phones' own work excluded)
        controller.notify = self._broadcast

    @property
    def now(self) -> int:
        return self._clock[0] // 1000

    def advance(self, milliseconds: int) -> None:
        self._advance_hardware(milliseconds)
        self._clock[0] += milliseconds
        self._clock[1] += milliseconds

    def _broadcast(self, fragment: bytes) -> None:
        # bless notifies every subscriber; each phone keeps what is addressed to it
        for phone in self.phones:
            phone.events.extend(phone.session.receive_fragment(fragment, self.now))
            self._writes.extend(phone.session.data_to_send())

    async def pump(self) -> None:
        for phone in self.phones:
            self._writes.extend(phone.session.data_to_send())
        while self._writes:
            while self._writes:
                fragment = self._writes.pop(0)
                started = time.process_time_ns()
                await self.controller.on_write(fragment)
                self.box_cpu_ns += time.process_time_ns() - started
            await self.controller.settle()  # door pulses answer when they are done

    async def poll(self) -> None:
        await self.controller.poll_once()
        await self.pump()

    async def run_for(self, milliseconds: int) -> None:
        """What the daemon's poll loop does: poll every interval, or earlier when a trip is due."""
        end = self._clock[1] + milliseconds
        while self._clock[1] < end:
            wake = self._clock[1] + self.controller.policy.poll_interval_ms
            trip = self.controller.next_wakeup_ms()
            if trip is not None:
                wake = min(wake, max(trip, self._clock[1]))
            self.advance(min(wake, end) - self._clock[1])
            await self.poll()

    def phone(self, key: Ed25519PrivateKey | None = None, *, outlet: int = 1) -> Phone:
        key = key or testing.ed25519_key(f"rig phone {len(self.phones)}")
        label = gatt.QrLabel(
            box_id=self.controller.box_id,
            outlet=outlet,
            fingerprint=gatt.box_key_fingerprint(cose.public_key_bytes(BOX_KEY.public_key())),
        )
        session = PhoneSession(
            connection_id=next(_connection_ids),
            phone_key=key,
            ephemeral_key=X25519PrivateKey.generate(),
            label=label,
            operator_keys=cose.key_ring(self.operator.public_key),
            att_mtu=185,
        )
        session.connect()
        phone = Phone(key=key, session=session)
        self.phones.append(phone)
        return phone

    def grant(
        self, phone: Phone, *, amount_fen: int = 500, grant_id: bytes | None = None, **kw: object
    ) -> bytes:
        grant = testing.sample_grant(
            phone.key,
            grant_id=grant_id or secrets.token_bytes(8),
            amount_fen=amount_fen,
            issued_at=START_TIME - 3600,
            expires_at=START_TIME + 30 * 86_400,
        )
        return grant.sign(self.operator)

    async def start(
        self, phone: Phone, *, outlet: int = 1, amount_fen: int = 500, grant: bytes | None = None
    ) -> messages.SessionStarted:
        """Start a session with `grant` (by default a fresh one of `amount_fen`, signed here)."""
        phone.session.send(
            messages.StartSession(
                request_id=phone.session.new_request_id(),
                outlet=outlet,
                grant=grant or self.grant(phone, amount_fen=amount_fen),
            )
        )
        await self.pump()
        started = phone.last(messages.SessionStarted)
        assert isinstance(started, messages.SessionStarted)
        return started

    async def request(self, phone: Phone, message: messages.PhoneMessage) -> None:
        phone.session.send(message)
        await self.pump()


def operator_encryption_keys() -> dict[bytes, X25519PrivateKey]:
    return {sealing.encryption_key_id(OPERATOR_ENCRYPTION.public_key()): OPERATOR_ENCRYPTION}


@asynccontextmanager
async def box_rig(
    database: Path,
    *,
    hardware: BoxHardware | None = None,
    advance: Callable[[int], None] | None = None,
    clock: list[int] | None = None,
    policy: BoxPolicy = POLICY,
    operator: cose.SigningKey = OPERATOR,
    operator_encryption_key: X25519PublicKey | None = None,
    signed_certificate: bytes | None = None,
) -> AsyncIterator[Rig]:
    """A started box controller; reuse `database`, `hardware` and `clock` to model a restart.

    Without `hardware`, a MemoryHardware; with another driver, `advance` moves its time.
    """
    if hardware is None:
        hardware = MemoryHardware(outlets=(1, 2, 3, 4))
    if advance is None:
        if not isinstance(hardware, MemoryHardware):
            raise TypeError("pass `advance` to move the time of this hardware")
        advance = hardware.advance
    clock = clock if clock is not None else [START_TIME * 1000, 0]
    ring = cose.key_ring(operator.public_key)
    if signed_certificate is None:
        signed_certificate = testing.sample_certificate(BOX_KEY).sign(operator)
    certificate = BoxCertificate.verify(signed_certificate, ring)
    signing_key = cose.SigningKey.from_private_key(BOX_KEY)
    async with BoxStore.open(database, box_id=certificate.box_id, box_key=signing_key) as store:
        high_water, last_sync = await store.clock_state()
        controller = BoxController(
            certificate=certificate,
            signed_certificate=signed_certificate,
            box_key=signing_key,
            operator_keys=ring,
            operator_encryption_key=operator_encryption_key or OPERATOR_ENCRYPTION.public_key(),
            hardware=hardware,
            store=store,
            clock=BoxClock(wall=lambda: clock[0] // 1000, high_water=high_water, last_sync=last_sync),
            policy=policy,
            random_bytes=secrets.token_bytes,
            monotonic_ms=lambda: clock[1],
        )
        await controller.start()
        yield Rig(controller, hardware, clock, advance, operator)
