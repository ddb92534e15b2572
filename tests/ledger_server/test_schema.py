"""Migrations: they build exactly the tables the code uses, on both backends, and run safely twice."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ledger_server.config import ServerConfig
from ledger_server.db import Database
from ledger_server.runtime import open_context
from ledger_server.schema import metadata
from tests.ledger_server.conftest import PostgresCluster, _administer


def _differences(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


async def _check(url: str, key_directory: Path) -> None:
    config = ServerConfig(database_url=url, key_directory=key_directory)
    for _ in range(2):  # a second start finds the schema current and changes nothing
        async with open_context(config):
            pass
    database = Database(url)
    try:
        async with database.connect() as connection:
            assert await connection.run_sync(_differences) == []
            version = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
            assert version == "0001"
    finally:
        await database.close()


async def test_migrations_build_the_schema_on_sqlite(tmp_path: Path, key_directory: Path) -> None:
    await _check(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}", key_directory)


async def test_migrations_build_the_schema_on_postgresql(
    postgres: PostgresCluster, key_directory: Path
) -> None:
    await _administer(postgres, "CREATE DATABASE powerbox_fresh")
    await _check(postgres.url("powerbox_fresh"), key_directory)
