"""The one place the server touches its database driver: engine set-up per backend, transactions
with retry, migrations, and the translation of SQLAlchemy/driver exceptions into `ServerError`s.

SQLite (aiosqlite) is the embedded default: write transactions start with BEGIN IMMEDIATE so that
two writers queue on the lock instead of failing half-way. PostgreSQL (asyncpg) serves several
server processes; correctness there rests on row locks (`SELECT ... FOR UPDATE`) and unique keys,
and a transaction that loses a deadlock or serialization race is simply run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Table, event, exc, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

from ledger_server.errors import ConflictError, MalformedRequestError, ServerError, UnavailableError

T = TypeVar("T")
log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x706F77657262  # any constant: serialises migrations of several processes
_WRITE_OPTION = "powerbox_write"
# Serialization failure and deadlock: run again. Unique violation too: a concurrent writer took the
# key first, and the second run finds its row and answers idempotently (or with a clean ConflictError).
_RETRIED_SQLSTATES = {"40001", "40P01", "23505"}
MAX_ATTEMPTS = 8


class DatabaseError(ServerError):
    """An unexpected database failure (a bug or a broken schema), logged with its cause."""


def _is_transient(error: exc.DBAPIError) -> bool:
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate in _RETRIED_SQLSTATES:
        return True
    return "database is locked" in str(error.orig)


def translated(error: BaseException) -> ServerError:
    """The `ServerError` a foreign database exception becomes."""
    if isinstance(error, exc.DataError):  # e.g. a NUL in text, a number out of the column's range
        return MalformedRequestError(f"a value the database cannot store: {error.orig.__class__.__name__}")
    if isinstance(error, exc.IntegrityError):
        return ConflictError(f"conflicts with existing data: {error.orig.__class__.__name__}")
    if isinstance(error, exc.OperationalError | exc.InterfaceError | OSError):
        return UnavailableError(f"database unavailable: {error.__class__.__name__}")
    log.error("database failure", exc_info=error)
    return DatabaseError(f"database failure: {error.__class__.__name__}")


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Foreign database exceptions become ours at this edge (httpcore's `map_exceptions`)."""
    try:
        yield
    except (exc.SQLAlchemyError, OSError) as error:
        raise translated(error) from error


class Database:
    """An async engine plus the transaction discipline every service uses."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.engine: AsyncEngine = create_async_engine(url, connect_args={"timeout": 60})
            _configure_sqlite(self.engine)
        elif url.startswith("postgresql"):
            self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
        else:
            raise ServerError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")
        self.is_postgresql = self.engine.dialect.name == "postgresql"
        # SQLite has one writer at a time. Queue this process's writers here rather than on the file
        # lock, whose busy handler sleeps in growing steps; other processes still meet the file lock.
        self._sqlite_writer = None if self.is_postgresql else asyncio.Lock()

    async def close(self) -> None:
        await self.engine.dispose()

    async def transaction(self, work: Callable[[AsyncConnection], Awaitable[T]], *, write: bool = True) -> T:
        """Run `work` in one transaction, again from the start if it loses a lock race.

        `work` must therefore only touch the database (and pure computation) until it returns.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if write and self._sqlite_writer is not None:
                        await stack.enter_async_context(self._sqlite_writer)
                    connection = await stack.enter_async_context(self.engine.connect())
                    if write:
                        await connection.execution_options(**{_WRITE_OPTION: True})
                    async with connection.begin():
                        return await work(connection)
            except exc.DBAPIError as error:
                if attempt < MAX_ATTEMPTS and _is_transient(error):
                    log.info("retrying a transaction after %s", error.orig.__class__.__name__)
                    continue
                raise translated(error) from error
            except (exc.SQLAlchemyError, OSError) as error:
                raise translated(error) from error
        raise AssertionError("unreachable: the last attempt returns or raises")

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A plain connection for read-only work that needs no retry."""
        with translate_errors():
            async with self.engine.connect() as connection:
                yield connection

    def driver_sql(self, statement: str) -> str:
        """`statement` written with `?` placeholders, in the driver's own style ($1, $2... for asyncpg)."""
        if not self.is_postgresql:
            return statement
        parts = statement.split("?")
        return "".join(part + (f"${n}" if n < len(parts) else "") for n, part in enumerate(parts, start=1))

    async def execute_many(
        self, connection: AsyncConnection, statement: str, rows: Sequence[Sequence[object]]
    ) -> None:
        """Run a `?`-placeholder statement once per row, straight through the driver.

        The ledger's hot path writes several rows per entry; SQLAlchemy's per-row parameter handling
        costs about ten times what the driver itself does (5 us against 0.4 us a row, measured), so
        these few statements skip it. Values must already be what the driver takes: int, str, bytes,
        bool or None."""
        if rows:
            await connection.exec_driver_sql(self.driver_sql(statement), list(map(tuple, rows)))

    async def fetch_in(
        self,
        connection: AsyncConnection,
        statement: str,
        values: Sequence[object],
        *,
        before: Sequence[object] = (),
        lock: bool = False,
    ) -> list[tuple[Any, ...]]:
        """Rows of a `?`-placeholder SELECT whose `IN ({})` takes `values`, through the driver (see
        `execute_many`); `before` fills the placeholders ahead of the list. `lock` appends FOR UPDATE
        on PostgreSQL (SQLite's writer already holds the whole database)."""
        found: list[tuple[Any, ...]] = []
        for start in range(0, len(values), 1000):
            part = values[start : start + 1000]
            sql = statement.format(", ".join("?" for _ in part)) + (
                " FOR UPDATE" if lock and self.is_postgresql else ""
            )
            result = await connection.exec_driver_sql(self.driver_sql(sql), (*before, *part))
            found.extend(tuple(row) for row in result.all())
        return found

    async def insert_many(
        self,
        connection: AsyncConnection,
        table: Table,
        columns: Sequence[str],
        rows: Sequence[Sequence[object]],
        *,
        ignore_conflicts: bool = False,
    ) -> None:
        """INSERT `rows` (values in `columns` order) into `table` through `execute_many`."""
        for column in columns:
            table.c[column]
        # Names from our own Table and its checked columns; the values travel as parameters.
        statement = (
            f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"  # noqa: S608
            + (" ON CONFLICT DO NOTHING" if ignore_conflicts else "")
        )
        await self.execute_many(connection, statement, rows)

    def insert_ignoring_conflicts(self, table: Table) -> Any:
        """INSERT ... ON CONFLICT DO NOTHING on either backend (duplicates are normal in ingest)."""
        if self.is_postgresql:
            return postgresql.insert(table).on_conflict_do_nothing()
        return sqlite.insert(table).on_conflict_do_nothing()

    async def migrate(self) -> None:
        """Bring the schema to the newest migration; safe when several processes start at once."""
        with translate_errors():
            async with self.engine.connect() as connection:
                if self.is_postgresql:
                    await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
                    await connection.commit()
                try:
                    await connection.run_sync(_upgrade_to_head)
                    await connection.commit()
                finally:
                    if self.is_postgresql:
                        await connection.execute(
                            text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK}
                        )
                        await connection.commit()


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _upgrade_to_head(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


def _configure_sqlite(engine: AsyncEngine) -> None:
    # SQLAlchemy's recipe for real transactions on pysqlite/aiosqlite: the driver emits no BEGIN of
    # its own; we emit BEGIN IMMEDIATE for writers (take the write lock first, queue on the busy
    # handler) and a deferred BEGIN for readers.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged entry must survive power loss (S5)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def null_pool_engine(url: str) -> AsyncEngine:
    """An engine without pooling, for one-shot tools (migrations from the alembic command line)."""
    return create_async_engine(url, poolclass=NullPool)
