"""Everything a service needs, built once at start-up and passed to every call (no globals)."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Executor
from dataclasses import dataclass, field

from ledger_server.config import Clock, ServerConfig
from ledger_server.db import Database
from ledger_server.keys import OperatorKeys
from ledger_server.providers import PaymentProvider, SmsProvider


class ChangeSignal:
    """Wakes this process's long-polling boxes early when something they wait for changed here.

    Other processes' changes are found by the pollers' periodic look at the database.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_seconds: float) -> None:
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_seconds)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerContext:
    config: ServerConfig
    database: Database
    keys: OperatorKeys
    clock: Clock
    sms: SmsProvider
    payments: PaymentProvider
    verifier: Executor  # signature checks run here, off the event loop (Ed25519 releases the GIL)
    checkers: Executor | None  # worker processes that decode and verify large ledger batches
    changes: ChangeSignal
    box_keys: dict[str, bytes] = field(default_factory=dict)  # box id -> registered key, filled as met
