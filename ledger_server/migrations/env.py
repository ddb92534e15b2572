"""Alembic environment: runs on the connection `ledger_server.db` hands over, or (from the alembic
command line, e.g. to write a new revision) on its own engine built from `sqlalchemy.url`."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from ledger_server.db import null_pool_engine
from ledger_server.schema import metadata

config = context.config


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_on_own_engine(url: str) -> None:
    engine = null_pool_engine(url)
    async with engine.connect() as connection:
        await connection.run_sync(run_on)
        await connection.commit()
    await engine.dispose()


handed_over = config.attributes.get("connection")
if isinstance(handed_over, Connection):
    run_on(handed_over)
else:
    asyncio.run(run_on_own_engine(config.get_main_option("sqlalchemy.url") or ""))
