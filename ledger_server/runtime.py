"""Builds the `ServerContext` for the HTTP app and for the command line alike."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import journal, keys, verification
from ledger_server.config import Clock, ServerConfig, system_clock
from ledger_server.context import ChangeSignal, ServerContext
from ledger_server.db import Database
from ledger_server.providers import DevPaymentProvider, DevSmsProvider, PaymentProvider, SmsProvider


@asynccontextmanager
async def open_context(
    config: ServerConfig,
    *,
    clock: Clock = system_clock,
    sms: SmsProvider | None = None,
    payments: PaymentProvider | None = None,
    migrate: bool = True,
) -> AsyncIterator[ServerContext]:
    """Database (migrated to the newest schema), operator keys and providers, closed on exit."""
    database = Database(config.database_url)
    verifier = ThreadPoolExecutor(max_workers=config.verify_threads, thread_name_prefix="verify")
    # Started on first use; "spawn" because forking a process with threads running is unsafe.
    checkers = (
        ProcessPoolExecutor(
            max_workers=config.verify_processes, mp_context=multiprocessing.get_context("spawn")
        )
        if config.verify_processes > 0
        else None
    )
    try:
        operator_keys = keys.load_keys(config.key_directory)
        if migrate:
            await database.migrate()

        async def prepare(connection: AsyncConnection) -> None:
            await journal.create_external_accounts(database, connection)

        await database.transaction(prepare)
        yield ServerContext(
            config=config,
            database=database,
            keys=operator_keys,
            clock=clock,
            sms=sms if sms is not None else DevSmsProvider(config.dev_sms_log),
            payments=payments if payments is not None else DevPaymentProvider(database),
            verifier=verifier,
            checkers=checkers,
            changes=ChangeSignal(),
        )
    finally:
        verifier.shutdown(wait=False, cancel_futures=True)
        if checkers is not None:
            checkers.shutdown(wait=True, cancel_futures=True)
        await database.close()


async def start_checkers(context: ServerContext) -> None:
    """Start the worker processes now rather than on the first large batch."""
    if context.checkers is not None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(context.checkers, verification.ready)
                for _ in range(context.config.verify_processes)
            )
        )
