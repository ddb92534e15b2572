"""Fixtures for the settlement server: a throwaway PostgreSQL cluster, migrated template databases
(one fresh copy per test), and the server on a loopback port, on SQLite and on PostgreSQL.

After every test that ran a server, the books of its database are proven balanced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, text, update
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from ledger_server import keys
from ledger_server.app import create_app
from ledger_server.auth import Role, create_staff
from ledger_server.config import ServerConfig
from ledger_server.db import Database
from ledger_server.journal import check_books
from ledger_server.providers import DevSmsProvider
from ledger_server.runtime import open_context
from ledger_server.schema import accounts, metadata, staff
from testbench.server_thread import ServerThread
from tests.ledger_server.harness import OPERATOR_PASSWORD, OPERATOR_USERNAME, START_TIME, Api, MutableClock

_databases = itertools.count(1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- PostgreSQL ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresCluster:
    host: str
    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{database}"


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    on_path = shutil.which("initdb")
    if found:
        return Path(found[-1]).parent
    if on_path:
        return Path(on_path).parent
    pytest.fail(
        "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): "
        "the server tests need it; `./run.sh test` installs it with apt"
    )


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: drop to the postgres user when we are root.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    binaries = _postgres_bin()
    data = Path(tempfile.mkdtemp(prefix="powerbox-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    log = data / "server.log"
    try:
        subprocess.run(
            _as_postgres(
                [
                    str(binaries / "initdb"),
                    "-D",
                    str(data / "db"),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = (
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        subprocess.run(
            _as_postgres(
                [
                    str(binaries / "pg_ctl"),
                    "-D",
                    str(data / "db"),
                    "-o",
                    options,
                    "-l",
                    str(log),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        details = getattr(error, "stderr", b"") or b""
        logged = log.read_text(errors="replace") if log.exists() else ""
        shutil.rmtree(data, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {error}\n{details.decode(errors='replace')}\n{logged}")
    try:
        yield PostgresCluster(host="127.0.0.1", port=port, user="postgres")
    finally:
        subprocess.run(
            _as_postgres([str(binaries / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"]),
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(data, ignore_errors=True)


# --- keys and template databases -------------------------------------------------------------------


@pytest.fixture(scope="session")
def key_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("operator-keys")
    keys.create_keys(directory)
    return directory


async def _prepare_template(url: str, key_directory: Path) -> None:
    """Migrate and add the first operator: what `powerbox server init` does."""
    async with open_context(ServerConfig(database_url=url, key_directory=key_directory)) as context:
        await create_staff(
            context, username=OPERATOR_USERNAME, password=OPERATOR_PASSWORD, role=Role.OPERATOR
        )


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory, key_directory: Path) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    asyncio.run(_prepare_template(f"sqlite+aiosqlite:///{path}", key_directory))
    return path


@pytest.fixture(scope="session")
def postgres_template(postgres: PostgresCluster, key_directory: Path) -> str:
    async def create() -> None:
        await _administer(postgres, "CREATE DATABASE powerbox_template")
        await _prepare_template(postgres.url("powerbox_template"), key_directory)

    asyncio.run(create())
    return "powerbox_template"


async def _administer(cluster: PostgresCluster, statement: str) -> None:
    engine = create_async_engine(cluster.url("postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


def new_sqlite_database(template: Path, directory: Path) -> str:
    path = directory / f"server-{next(_databases)}.db"
    shutil.copyfile(template, path)
    return f"sqlite+aiosqlite:///{path}"


def new_postgres_database(cluster: PostgresCluster, template: str) -> str:
    name = f"powerbox_test_{os.getpid()}_{next(_databases)}"

    asyncio.run(_administer(cluster, f"CREATE DATABASE {name} TEMPLATE {template}"))
    return cluster.url(name)


async def _empty_database(url: str) -> None:
    """Back to the template's state: one operator, the external accounts at zero, nothing else.

    Much faster than CREATE DATABASE (which copies the whole template, catalogs and all)."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            for table in reversed(metadata.sorted_tables):
                if table is staff:
                    await connection.execute(delete(staff).where(staff.c.username != OPERATOR_USERNAME))
                elif table is accounts:
                    await connection.execute(delete(accounts).where(accounts.c.kind != "external"))
                    await connection.execute(update(accounts).values(balance_fen=0))
                else:
                    await connection.execute(delete(table))
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def postgres_pool() -> list[str]:
    """Emptied test databases ready for reuse."""
    return []


@pytest.fixture
def postgres_url(
    postgres: PostgresCluster, postgres_template: str, postgres_pool: list[str]
) -> Iterator[str]:
    url = postgres_pool.pop() if postgres_pool else new_postgres_database(postgres, postgres_template)
    yield url
    asyncio.run(_empty_database(url))
    postgres_pool.append(url)


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    return new_sqlite_database(sqlite_template, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database with one operator, on each backend."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    assert isinstance(url, str)
    return url


async def assert_books_balance(url: str) -> None:
    database = Database(url)
    try:
        async with database.connect() as connection:
            books = await check_books(connection)
    finally:
        await database.close()
    assert books.balanced, "\n".join(books.problems)


# --- a server on a loopback port -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningServer:
    base_url: str
    database_url: str
    config: ServerConfig
    clock: MutableClock
    sms: DevSmsProvider


def server_config(url: str, key_directory: Path, **overrides: Any) -> ServerConfig:
    config = ServerConfig(
        database_url=url,
        key_directory=key_directory,
        long_poll_interval_ms=50,
        verify_threads=2,
        release_grace_seconds=0,
    )
    return dataclasses.replace(config, **overrides)


@contextlib.contextmanager
def running_server(url: str, key_directory: Path, **overrides: Any) -> Iterator[RunningServer]:
    clock = MutableClock(START_TIME)
    sms = DevSmsProvider()
    config = server_config(url, key_directory, **overrides)
    thread = ServerThread(create_app(config, clock=clock, sms=sms))
    thread.start()
    try:
        yield RunningServer(
            base_url=f"http://127.0.0.1:{thread.port}", database_url=url, config=config, clock=clock, sms=sms
        )
    finally:
        thread.stop()
    asyncio.run(assert_books_balance(url))


@pytest.fixture
def server(database_url: str, key_directory: Path) -> Iterator[RunningServer]:
    with running_server(database_url, key_directory) as running:
        yield running


@pytest.fixture
def sqlite_server(sqlite_url: str, key_directory: Path) -> Iterator[RunningServer]:
    with running_server(sqlite_url, key_directory) as running:
        yield running


@contextlib.asynccontextmanager
async def api_for(running: RunningServer) -> AsyncIterator[Api]:
    async with httpx.AsyncClient(base_url=running.base_url, timeout=60) as client:
        yield Api(client=client, clock=running.clock, sms=running.sms)


@pytest.fixture
async def api(server: RunningServer) -> AsyncIterator[Api]:
    async with api_for(server) as client:
        yield client


@pytest.fixture
async def sqlite_api(sqlite_server: RunningServer) -> AsyncIterator[Api]:
    async with api_for(sqlite_server) as client:
        yield client
