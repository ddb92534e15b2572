"""`powerbox server ...`: set up, run and operate the settlement server from a terminal.

The database URL and key directory come from --database-url/--keys or from the environment
(POWERBOX_SERVER_DATABASE_URL, POWERBOX_SERVER_KEYS); see docs/operations.md.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ledger_server import anomalies, auth, keys, registry, reports, settlement
from ledger_server.anomalies import AnomalyKind
from ledger_server.auth import Role
from ledger_server.config import DATABASE_URL_VARIABLE, KEY_DIRECTORY_VARIABLE, ServerConfig
from ledger_server.context import ServerContext
from ledger_server.errors import ServerError
from ledger_server.providers import add_dev_electricity_account
from ledger_server.runtime import open_context
from protocol import cose, sealing
from protocol.tokens import OutletSpec

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Options:
    database_url: str | None
    key_directory: Path | None

    def config(self, **overrides: object) -> ServerConfig:
        return ServerConfig.from_environment(
            database_url=self.database_url, key_directory=self.key_directory, **overrides
        )


def _run(options: _Options, work: Callable[[ServerContext], Awaitable[T]], **overrides: object) -> T:
    """Run `work` with a context; a ServerError becomes a one-line message and exit status 1."""

    async def main() -> T:
        async with open_context(options.config(**overrides)) as context:
            return await work(context)

    try:
        return asyncio.run(main())
    except ServerError as error:
        raise click.ClickException(f"{error.code.name}: {error.detail}") from None


def _parse_day(text: str) -> int:
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a date like 2026-11-18") from None
    return int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp())


def _scoped_prices(items: tuple[str, ...]) -> list[tuple[str, int]]:
    prices = []
    for item in items:
        scope, _, price = item.rpartition("=")
        if not scope or not price.isdigit():
            raise click.BadParameter(f"{item!r} is not SCOPE=PRICE")
        prices.append((scope, int(price)))
    return prices


pass_options = click.make_pass_decorator(_Options)


@click.group()
@click.option(
    "--database-url", envvar=DATABASE_URL_VARIABLE, help="sqlite+aiosqlite:///FILE or postgresql+asyncpg://…"
)
@click.option("--keys", "key_directory", envvar=KEY_DIRECTORY_VARIABLE, type=click.Path(path_type=Path))
@click.pass_context
def server(ctx: click.Context, database_url: str | None, key_directory: Path | None) -> None:
    """The settlement server: accounts, grants, box registry, ledger ingest and settlement."""
    ctx.obj = _Options(database_url=database_url, key_directory=key_directory)


@server.command()
@click.option(
    "--operator", "username", default="operator", show_default=True, help="first operator's username"
)
@click.option("--password", envvar="POWERBOX_SERVER_OPERATOR_PASSWORD", prompt=True, hide_input=True)
@pass_options
def init(options: _Options, username: str, password: str) -> None:
    """Create the operator keys (if absent), the database schema and the first operator."""
    config = options.config()
    created = keys.create_keys(config.key_directory)
    click.echo(f"operator signing key {created.active_signing_kid.hex()} in {config.key_directory}")

    async def work(context: ServerContext) -> int:
        try:
            return await auth.create_staff(context, username=username, password=password, role=Role.OPERATOR)
        except ServerError as error:
            if error.status == 409:
                return 0
            raise

    staff_id = _run(options, work)
    click.echo(f"database ready; operator {username}" + (" exists already" if staff_id == 0 else " created"))


@server.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--dev-sms-log", type=click.Path(path_type=Path), help="also write development SMS here")
@click.option("--release-grace", type=int, help="seconds after expiry before an unused grant is released")
@click.option("--settle-after-ingest/--no-settle-after-ingest", default=True, show_default=True)
@pass_options
def serve(
    options: _Options,
    host: str,
    port: int,
    dev_sms_log: Path | None,
    release_grace: int | None,
    settle_after_ingest: bool,
) -> None:
    """Serve the HTTP API (uvicorn)."""
    import uvicorn

    from ledger_server.app import create_app

    config = options.config(
        dev_sms_log=dev_sms_log, release_grace_seconds=release_grace, settle_after_ingest=settle_after_ingest
    )
    uvicorn.Server(uvicorn.Config(create_app(config), host=host, port=port, log_level="info")).run()


@server.command()
@click.option("--plain", is_flag=True, help="one line per committed step instead of a progress bar")
@click.option("--release-grace", type=int, help="seconds after expiry before an unused grant is released")
@click.option("--chunk", default=200, show_default=True, help="grants released per transaction")
@click.option("--settle-chunk", type=int, help="ledger entries applied per transaction (default 1000)")
@pass_options
def reconcile(
    options: _Options, plain: bool, release_grace: int | None, chunk: int, settle_chunk: int | None
) -> None:
    """Settle every outstanding ledger entry, release expired unused grants, prove the books.

    Each step commits on its own: interrupted anywhere, run it again."""

    async def work(context: ServerContext) -> settlement.ReconcileSummary:
        pending = await settlement.pending_work(context)
        total = pending.entries_to_apply + pending.grants_to_release
        if plain:

            def report_step(stage: settlement.Stage, count: int) -> None:
                click.echo(f"{stage} {count}")
                sys.stdout.flush()

            return await settlement.reconcile(context, release_chunk=chunk, on_progress=report_step)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        ) as progress:
            task = progress.add_task("reconciling", total=total or None)
            return await settlement.reconcile(
                context, release_chunk=chunk, on_progress=lambda _stage, count: progress.advance(task, count)
            )

    summary = _run(options, work, release_grace_seconds=release_grace, settle_chunk_entries=settle_chunk)
    click.echo(
        f"applied {summary.entries_applied} entries of {summary.boxes_settled} boxes, "
        f"released {summary.grants_released} grants, {summary.gaps} boxes waiting on gaps"
    )
    if summary.books.balanced:
        click.echo(f"books balance: {summary.books.accounts} accounts, {summary.books.transfers} transfers")
    else:
        for problem in summary.books.problems:
            click.echo(f"BOOKS: {problem}", err=True)
        raise click.exceptions.Exit(2)


@server.command()
@click.option("--from", "from_day", required=True, help="first day, YYYY-MM-DD (UTC)")
@click.option("--to", "to_day", required=True, help="last day, YYYY-MM-DD (UTC)")
@click.option("--json", "as_json", is_flag=True)
@pass_options
def report(options: _Options, from_day: str, to_day: str, as_json: bool) -> None:
    """Energy and revenue per box per day."""
    from_time, to_time = _parse_day(from_day), _parse_day(to_day) + reports.SECONDS_PER_DAY - 1

    async def work(context: ServerContext) -> list[reports.DailyBoxFigures]:
        return await reports.daily_report(context, from_time=from_time, to_time=to_time)

    rows = _run(options, work)
    if as_json:
        click.echo(json.dumps([asdict(row) for row in rows], indent=2))
        return
    table = Table("day", "box", "sessions", "energy (kWh)", "revenue")
    for row in rows:
        table.add_row(
            row.day,
            row.box_id,
            str(row.sessions),
            reports.format_kwh(row.energy_wh),
            reports.format_fen(row.revenue_fen),
        )
    Console().print(table)


@server.group("box")
def box_group() -> None:
    """Boxes: provision one, list them, stop a session or trip an outlet remotely."""


@box_group.command("provision")
@click.option(
    "--request",
    "request_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="the provision-request.json `powerbox box provision` wrote (box id and public key)",
)
@click.option("--box-id", help="instead of --request")
@click.option("--public-key", help="instead of --request: the box's Ed25519 public key, 64 hex digits")
@click.option(
    "--outlet", "outlets", multiple=True, required=True, help="NUMBER:RATED_POWER_W, once per outlet"
)
@click.option("--latitude", "latitude_microdeg", required=True, type=int, help="microdegrees")
@click.option("--longitude", "longitude_microdeg", required=True, type=int, help="microdegrees")
@click.option("--region", "tariff_region", required=True)
@click.option(
    "--out",
    "certificate_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write the certificate here",
)
@pass_options
def provision_box(
    options: _Options,
    request_file: Path | None,
    box_id: str | None,
    public_key: str | None,
    outlets: tuple[str, ...],
    latitude_microdeg: int,
    longitude_microdeg: int,
    tariff_region: str,
    certificate_file: Path | None,
) -> None:
    """Register a box; write its signed certificate (box.cert) and print each outlet's QR label."""
    if request_file is not None:
        try:
            request = json.loads(request_file.read_text())
            box_id, public_key = str(request["box_id"]), str(request["public_key"])
        except (ValueError, KeyError, TypeError) as error:
            raise click.BadParameter(f"{request_file} is not a provision request: {error}") from None
    if box_id is None or public_key is None:
        raise click.UsageError("give --request, or --box-id and --public-key")
    specs = []
    for item in outlets:
        number, _, power = item.partition(":")
        if not number.isdigit() or not power.isdigit():
            raise click.BadParameter(f"{item!r} is not NUMBER:RATED_POWER_W")
        specs.append(OutletSpec(number=int(number), rated_power_w=int(power)))
    try:
        key = bytes.fromhex(public_key)
    except ValueError:
        raise click.BadParameter("the public key is 64 hex digits") from None
    provisioning = registry.BoxProvisioning(
        box_id=box_id,
        public_key=key,
        outlets=tuple(specs),
        latitude_microdeg=latitude_microdeg,
        longitude_microdeg=longitude_microdeg,
        tariff_region=tariff_region,
    )

    async def work(context: ServerContext) -> registry.ProvisionedBox:
        return await registry.provision_box(context, provisioning)

    provisioned = _run(options, work)
    if certificate_file is not None:
        certificate_file.write_bytes(provisioned.certificate)
        click.echo(f"certificate written to {certificate_file}")
    click.echo(f"certificate {provisioned.certificate.hex()}")
    click.echo(f"advertised name {provisioned.advertised_name}")
    for outlet, label in provisioned.labels:
        click.echo(f"outlet {outlet} label {label}")


@box_group.command("list")
@pass_options
def list_boxes(options: _Options) -> None:
    """Every box, when it was last heard from, and how far its ledger is settled."""

    async def work(context: ServerContext) -> list[registry.BoxSummary]:
        return await registry.list_boxes(context)

    table = Table("box", "last seen (UTC)", "entries contiguous", "applied")
    for box in _run(options, work):
        seen = reports.format_time(box.last_seen_at) if box.last_seen_at is not None else "never"
        table.add_row(box.box_id, seen, str(box.contiguous_sequence), str(box.applied_sequence))
    Console().print(table)


def _queue_command(options: _Options, box_id: str, kind: registry.CommandKind, outlet: int) -> None:
    async def work(context: ServerContext) -> registry.BoxCommand:
        async with context.database.connect() as connection:
            operator_id = await auth.first_operator_id(connection)
        return await registry.queue_command(
            context, staff_id=operator_id, box_id=box_id, kind=kind, outlet=outlet, session_id=None
        )

    command = _run(options, work)
    click.echo(
        f"command {command.command_id} queued: {kind} outlet {outlet} of {box_id} (sent on its next poll)"
    )


@box_group.command("stop")
@click.argument("box_id")
@click.option("--outlet", required=True, type=int)
@pass_options
def remote_stop(options: _Options, box_id: str, outlet: int) -> None:
    """End the session on an outlet remotely (the box writes its receipt)."""
    _queue_command(options, box_id, registry.CommandKind.REMOTE_STOP, outlet)


@box_group.command("trip")
@click.argument("box_id")
@click.option("--outlet", required=True, type=int)
@pass_options
def trip(options: _Options, box_id: str, outlet: int) -> None:
    """Open an outlet's breaker remotely."""
    _queue_command(options, box_id, registry.CommandKind.TRIP, outlet)


@server.command()
@click.option("--grant", "grant_ids", multiple=True, help="grant id, 16 hex digits")
@click.option("--phone-key", "phone_keys", multiple=True, help="phone key, 64 hex digits")
@click.option("--user", "user_ids", multiple=True, type=int)
@pass_options
def revoke(
    options: _Options, grant_ids: tuple[str, ...], phone_keys: tuple[str, ...], user_ids: tuple[int, ...]
) -> None:
    """Issue the next revocation list with these grants, phone keys or users added."""
    try:
        grants_raw = [bytes.fromhex(g) for g in grant_ids]
        keys_raw = [bytes.fromhex(k) for k in phone_keys]
    except ValueError:
        raise click.BadParameter("ids and keys are hex") from None

    async def work(context: ServerContext) -> registry.SignedVersion:
        return await registry.revoke(
            context, grant_ids=grants_raw, phone_keys=keys_raw, user_ids=list(user_ids)
        )

    click.echo(f"revocation list version {_run(options, work).version}")


@server.command("set-tariff")
@click.option("--default", "default_price", required=True, type=int, help="fen per kWh")
@click.option("--region", "regions", multiple=True, help="REGION=PRICE")
@click.option("--box", "box_prices", multiple=True, help="BOX_ID=PRICE")
@pass_options
def set_tariff(
    options: _Options, default_price: int, regions: tuple[str, ...], box_prices: tuple[str, ...]
) -> None:
    """Issue the next tariff table version."""
    region_prices, per_box = _scoped_prices(regions), _scoped_prices(box_prices)

    async def work(context: ServerContext) -> registry.SignedVersion:
        return await registry.set_tariff(
            context, default_price_fen_per_kwh=default_price, region_prices=region_prices, box_prices=per_box
        )

    click.echo(f"tariff table version {_run(options, work).version}")


@server.command("list-anomalies")
@click.option("--kind", type=click.Choice([kind.value for kind in AnomalyKind]))
@click.option("--box", "box_id")
@click.option("--unresolved", is_flag=True)
@pass_options
def list_anomalies(options: _Options, kind: str | None, box_id: str | None, unresolved: bool) -> None:
    """What the server found wrong in the ledgers."""

    async def work(context: ServerContext) -> list[anomalies.AnomalyRecord]:
        return await anomalies.list_anomalies(
            context,
            kind=None if kind is None else AnomalyKind(kind),
            box_id=box_id,
            unresolved_only=unresolved,
            limit=1000,
        )

    table = Table("id", "kind", "box", "seq", "detail")
    for item in _run(options, work):
        table.add_row(
            str(item.anomaly_id), item.kind, item.box_id or "", str(item.sequence or ""), item.detail
        )
    Console().print(table)


@server.command("add-staff")
@click.argument("username")
@click.option("--role", type=click.Choice(["operator", "technician"]), required=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@pass_options
def add_staff(options: _Options, username: str, role: str, password: str) -> None:
    """Create an operator or technician login."""

    async def work(context: ServerContext) -> int:
        return await auth.create_staff(context, username=username, password=password, role=Role(role))

    click.echo(f"staff member {_run(options, work)} created")


@server.group("keys")
def keys_group() -> None:
    """Operator key rotation: add a key, let boxes and phones learn it, then activate it."""


@keys_group.command("add-signing")
@click.option("--activate", is_flag=True, help="sign with it from now on")
@pass_options
def add_signing_key(options: _Options, activate: bool) -> None:
    kid = keys.add_signing_key(options.config().key_directory, activate=activate)
    click.echo(f"signing key {kid.hex()}" + (" (active)" if activate else ""))


@keys_group.command("activate")
@click.argument("key_id")
@pass_options
def activate_signing_key(options: _Options, key_id: str) -> None:
    try:
        keys.activate_signing_key(options.config().key_directory, bytes.fromhex(key_id))
    except (ValueError, ServerError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"signing key {key_id} active")


@keys_group.command("list")
@pass_options
def list_keys(options: _Options) -> None:
    """Key ids and public keys (what box.toml's [operator] section and the phones need)."""
    loaded = keys.load_keys(options.config().key_directory)
    for kid, key in sorted(loaded.signing_keys.items()):
        active = " active" if kid == loaded.active_signing_kid else ""
        click.echo(f"signing {kid.hex()} {cose.public_key_bytes(key.public_key).hex()}{active}")
    for kid, private in sorted(loaded.encryption_keys.items()):
        active = " active" if kid == loaded.active_encryption_kid else ""
        click.echo(
            f"encryption {kid.hex()} {sealing.x25519_public_bytes(private.public_key()).hex()}{active}"
        )


@server.command("dev-account")
@click.argument("number")
@click.option("--phone", required=True)
@click.option("--password", prompt=True, hide_input=True)
@pass_options
def dev_account(options: _Options, number: str, phone: str, password: str) -> None:
    """Add an electricity account to the development payment provider."""

    async def work(context: ServerContext) -> None:
        await add_dev_electricity_account(context.database, number=number, password=password, phone=phone)

    _run(options, work)
    click.echo(f"development electricity account {number} added")
