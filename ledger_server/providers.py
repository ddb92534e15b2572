"""The outside world the server pays and texts through: an SMS provider and a payment provider.

Each is a small interface with a development implementation that logs what it would do. A real
provider is chosen once, at start-up (`app.create_app`); nothing else knows which one runs. Every
payment call carries an idempotency key, so a request retried after a crash never pays twice.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import passwords
from ledger_server.db import Database
from ledger_server.schema import dev_electricity_accounts

log = logging.getLogger(__name__)

_CODE_IN_TEXT = re.compile(r"\b(\d{6})\b")


@dataclass(frozen=True, slots=True, kw_only=True)
class SmsMessage:
    phone: str
    text: str


class SmsProvider(Protocol):
    async def send(self, message: SmsMessage) -> None: ...


class DevSmsProvider:
    """Logs each message, keeps it in memory, and appends it to `log_path` when given."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.log_path = log_path
        self._sent: list[SmsMessage] = []
        self._lock = threading.Lock()

    async def send(self, message: SmsMessage) -> None:
        log.info("SMS to %s: %s", message.phone, message.text)
        with self._lock:
            self._sent.append(message)
            if self.log_path is not None:
                with self.log_path.open("a", encoding="utf-8") as file:
                    file.write(f"{message.phone}\t{message.text}\n")

    def last_code(self, phone: str) -> str | None:
        """The newest one-time code texted to `phone` (what a developer reads off the log)."""
        with self._lock:
            for message in reversed(self._sent):
                if message.phone == phone and (found := _CODE_IN_TEXT.search(message.text)):
                    return found.group(1)
        return None


def last_code_in_log(log_path: Path, phone: str) -> str | None:
    """`DevSmsProvider.last_code` for a server in another process, read from its SMS log."""
    code = None
    for line in log_path.read_text(encoding="utf-8").splitlines():
        recipient, _, text = line.partition("\t")
        if recipient == phone and (found := _CODE_IN_TEXT.search(text)):
            code = found.group(1)
    return code


@dataclass(frozen=True, slots=True, kw_only=True)
class ElectricityAccount:
    number: str
    phone: str


class PaymentProvider(Protocol):
    """Raises `errors.PaymentFailedError` when the provider declines; returns the provider's reference."""

    async def collect_top_up(self, *, user_id: int, amount_fen: int, idempotency_key: str) -> str: ...

    async def charge_electricity_account(
        self, *, account_number: str, amount_fen: int, idempotency_key: str
    ) -> str: ...

    async def refund(self, *, user_id: int, amount_fen: int, idempotency_key: str) -> str: ...

    async def verify_electricity_account(self, number: str, password: str) -> ElectricityAccount | None: ...


def _reference(idempotency_key: str) -> str:
    # Same key, same reference: the idempotency a real provider offers.
    return "dev-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]


class DevPaymentProvider:
    """Approves every payment and logs it. Its electricity accounts live in `dev_electricity_accounts`
    (`powerbox server dev-account` adds one)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def collect_top_up(self, *, user_id: int, amount_fen: int, idempotency_key: str) -> str:
        log.info("dev payment: collect %d fen from user %d (%s)", amount_fen, user_id, idempotency_key)
        return _reference(idempotency_key)

    async def charge_electricity_account(
        self, *, account_number: str, amount_fen: int, idempotency_key: str
    ) -> str:
        log.info("dev payment: charge %d fen to electricity account %s", amount_fen, account_number)
        return _reference(idempotency_key)

    async def refund(self, *, user_id: int, amount_fen: int, idempotency_key: str) -> str:
        log.info("dev payment: refund %d fen to user %d (%s)", amount_fen, user_id, idempotency_key)
        return _reference(idempotency_key)

    async def verify_electricity_account(self, number: str, password: str) -> ElectricityAccount | None:
        async with self._database.connect() as connection:
            row = (
                await connection.execute(
                    select(dev_electricity_accounts).where(
                        dev_electricity_accounts.c.account_number == number
                    )
                )
            ).first()
        if row is None:
            await passwords.verify_password(password, passwords.DUMMY_HASH)  # same time either way
            return None
        if not await passwords.verify_password(password, row.password_hash):
            return None
        return ElectricityAccount(number=row.account_number, phone=row.phone)


async def add_dev_electricity_account(database: Database, *, number: str, password: str, phone: str) -> None:
    password_hash = await passwords.hash_password(password)

    async def work(connection: AsyncConnection) -> None:
        await connection.execute(
            dev_electricity_accounts.insert().values(
                account_number=number, password_hash=password_hash, phone=phone
            )
        )

    await database.transaction(work)
