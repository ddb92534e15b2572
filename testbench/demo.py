"""`powerbox demo`: the offline story end to end (testbench/story.py), or with `--walkthrough` the
protocol conversation between a phone and a box engine in memory.

In the walk-through every message crosses the real framing, EDHOC and secure channel code; only the
radio is absent. Each message is printed with its size and how many GATT writes or notifications
carry it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rich.console import Console
from rich.table import Table

from phone_client.display import yuan
from protocol import cose, framing, gatt, messages, tokens
from protocol.session import (
    BoxAuthenticated,
    ConnectionFailed,
    LinkKind,
    MessageReceived,
    PhoneEvent,
    PhoneSession,
)
from protocol.testing import ConnectionPair, ScriptedBox, sample_certificate, sample_grant

if TYPE_CHECKING:
    from testbench.system import RunningSystem


class _RecordNames:
    """Names of the messages inside records, in the order each side sent them."""

    def __init__(self) -> None:
        self.by_sender: dict[str, list[str]] = {"phone": [], "box": []}

    def take(self, sender: str) -> str:
        queue = self.by_sender[sender]
        return queue.pop(0) if queue else "record"


NAMES = _RecordNames()


def _send(phone: PhoneSession, message: messages.PhoneMessage) -> None:
    NAMES.by_sender["phone"].append(type(message).__name__)
    phone.send(message)


def _describe(table: Table, pair: ConnectionPair, seen: int) -> int:
    for flight in pair.flights[seen:]:
        reassembler = framing.Reassembler()
        count = 0
        for fragment in flight.fragments:
            count += 1
            event = reassembler.receive(fragment)
            if isinstance(event, framing.MessageReceived):
                link = LinkKind(event.message[0])
                arrow = "phone -> box" if flight.sender == "phone" else "box -> phone"
                unit = "write" if flight.sender == "phone" else "notification"
                name = (
                    NAMES.take(flight.sender) if link is LinkKind.RECORD else f"EDHOC {link.name[6:].lower()}"
                )
                table.add_row(arrow, name, str(len(event.message)), f"{count} {unit}{'s' * (count > 1)}")
                count = 0
    return len(pair.flights)


def _pump(
    pair: ConnectionPair, now: int, console: Console, table: Table, seen: int
) -> tuple[list[PhoneEvent], int]:
    events = pair.pump(now)
    NAMES.by_sender["box"] += [type(e.message).__name__ for e in events if isinstance(e, MessageReceived)]
    for event in events:
        if isinstance(event, ConnectionFailed):
            console.print(f"[red]connection failed: {event.code.name} ({event.detail})")
            raise SystemExit(1)
    return events, _describe(table, pair, seen)


def _received(events: list[PhoneEvent], kind: type[messages.Message]) -> messages.Message:
    for event in events:
        if isinstance(event, MessageReceived) and isinstance(event.message, kind):
            return event.message
    raise SystemExit(f"expected {kind.__name__}, got {events!r}")


@click.command()
@click.option(
    "--walkthrough", is_flag=True, help="Only the protocol walk-through: a phone and a box engine in memory."
)
@click.option(
    "--mtu",
    "att_mtu",
    default=247,
    show_default=True,
    type=click.IntRange(23, 517),
    help="ATT MTU of the walk-through.",
)
@click.option(
    "--keep", is_flag=True, help="After the story, leave everything running to poke at until Ctrl-C."
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write every step's figures to this JSON file.",
)
def demo(walkthrough: bool, att_mtu: int, keep: bool, report_path: Path | None) -> None:
    """The offline story end to end: radio, plant, server, a box and two phones, all on this machine.

    Embedded defaults; everything is torn down at the end (with --keep: at Ctrl-C); the exit status
    is non-zero if a step fails.
    """
    if walkthrough:
        _walkthrough(att_mtu)
    else:
        _story(keep=keep, report_path=report_path)


def _reach(system: RunningSystem) -> dict[str, object]:
    """How to reach each part of the running system from a shell."""
    from testbench.bluez.node import BUS_ADDRESS_VARIABLE
    from testbench.system import OPERATOR_USERNAME

    box = system.box()
    return {
        "server": system.server.base_url,
        "operator": {"username": OPERATOR_USERNAME, "password": system.server.operator_password},
        "box": {"box_id": box.box_id, "config": str(box.config_path), "labels": box.labels},
        "plant": {"host": box.plant.endpoint.host, "port": box.plant.endpoint.port},
        "phones": {
            phone.name: {
                "wallet": str(phone.wallet),
                "environment": {BUS_ADDRESS_VARIABLE: phone.node.bus_address},
            }
            for phone in system.phones
        },
    }


def _poke_at(
    console: Console, report_path: Path | None, reached: dict[str, object]
) -> Callable[[RunningSystem], Awaitable[None]]:
    """Print how to reach every part of the running system (and write it to the report at once, into
    `reached` for the final report), then wait for Ctrl-C or SIGTERM."""

    async def keep(system: RunningSystem) -> None:
        reached.update(_reach(system))
        if report_path is not None:
            await asyncio.to_thread(_write_json, report_path, {"system": reached})
        from testbench.bluez.node import BUS_ADDRESS_VARIABLE
        from testbench.system import OPERATOR_USERNAME

        server, box = system.server.base_url, system.box()
        table = Table(title="the system is up: Ctrl-C stops it all", title_justify="left")
        table.add_column("part", style="bold")
        table.add_column("reach it with")
        table.add_row("server", f"{server}/docs (OpenAPI)")
        table.add_row("operator", f"username {OPERATOR_USERNAME}, password {system.server.operator_password}")
        table.add_row("box", f"powerbox box status --config {box.config_path}")
        table.add_row("box 4G", f"powerbox box uplink off|on --config {box.config_path}")
        table.add_row("plant", f"powerbox plant status --port {box.plant.endpoint.port}")
        table.add_row("loads", f"powerbox plant load --port {box.plant.endpoint.port} OUTLET WATTS")
        for outlet, label in sorted(box.labels.items()):
            table.add_row(f"label {outlet}", label)
        for phone in system.phones:
            table.add_row(
                phone.name,
                f"{BUS_ADDRESS_VARIABLE}={phone.node.bus_address} "
                f"powerbox phone --wallet {phone.wallet} --server {server} status",
            )
        console.print(table)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        console.print("stopping everything")

    return keep


def _story(*, keep: bool, report_path: Path | None) -> None:
    from testbench.story import StoryError, run_offline_story  # the radio and server load only here

    console = Console()
    console.print("[bold]powerbox: the offline story[/] (virtual radio, simulated plant, server on SQLite)")

    def report(step: str, data: dict[str, object]) -> None:
        details = ", ".join(
            f"{k} {v}" for k, v in data.items() if k != "ms" and not isinstance(v, dict | list)
        )
        console.print(f"[green]ok[/] {step} [dim]({data.get('ms')} ms)[/] {details[:160]}")

    reached: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="powerbox-demo-") as directory:
        try:
            result = asyncio.run(
                run_offline_story(
                    Path(directory),
                    report=report,
                    keep=_poke_at(console, report_path, reached) if keep else None,
                )
            )
        except StoryError as exc:
            console.print(f"[red]failed[/] {exc}")
            sys.exit(1)
    if report_path is not None:
        _write_json(report_path, {**result.as_json(), **({"system": reached} if reached else {})})
    _print_money(console, result.statements, result.operator_report)
    if result.scan_to_power_ms is not None:
        console.print(
            f"scan-to-power offline: [bold]{result.scan_to_power_ms:.0f} ms[/] "
            f"({result.scan_to_power_source})"
        )
    console.print(
        f"the money journal balances: {result.books.get('balanced')}; "
        f"whole story {result.total_ms / 1000:.1f} s"
    )
    sys.exit(0)


def _print_money(
    console: Console, statements: dict[str, dict[str, Any]], operator_report: list[dict[str, Any]]
) -> None:
    """Each user's statement and the operator's daily report, as the server settled them."""
    users = Table(title="statements (after settlement)", title_justify="left")
    for column in ("phone", "session", "outlet", "energy", "cost", "ended by", "available", "owed"):
        users.add_column(
            column, justify="right" if column in ("energy", "cost", "available", "owed") else "left"
        )
    for phone, statement in sorted(statements.items()):
        for n, session in enumerate(statement["sessions"] or [None]):
            first = n == 0
            users.add_row(
                phone if first else "",
                "-" if session is None else str(session["session_id"])[:8],
                "" if session is None else str(session["outlet"]),
                "" if session is None else f"{session['energy_wh']} Wh",
                "" if session is None else yuan(int(session["cost_fen"])),
                "" if session is None else str(session["end_reason"]).replace("_", " "),
                yuan(int(statement["available_fen"])) if first else "",
                yuan(int(statement["arrears_fen"])) if first else "",
            )
    console.print(users)
    report = Table(title="operator report (per box per day)", title_justify="left")
    for column in ("box", "day", "sessions", "energy", "revenue"):
        report.add_column(column, justify="left" if column in ("box", "day") else "right")
    for row in operator_report:
        report.add_row(
            str(row["box_id"]),
            str(row["day"]),
            str(row["sessions"]),
            f"{row['energy_wh']} Wh",
            yuan(int(row["revenue_fen"])),
        )
    console.print(report)


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _walkthrough(att_mtu: int) -> None:
    """Walk through unlock, live readings, top-up and stop between a phone and a box, in memory."""
    console = Console()
    now = int(time.time())
    operator = cose.SigningKey.from_private_key(Ed25519PrivateKey.generate())
    box_key = Ed25519PrivateKey.generate()
    phone_key = Ed25519PrivateKey.generate()
    ring = cose.key_ring(operator.public_key)
    certificate = dataclasses.replace(
        sample_certificate(box_key), issued_at=now - 60, expires_at=now + 365 * 86_400
    )
    signed_certificate = certificate.sign(operator)
    ids = itertools.count(1)
    box = ScriptedBox(
        box_key=box_key,
        signed_certificate=signed_certificate,
        operator_keys=ring,
        ephemeral_keys=X25519PrivateKey.generate,
        session_ids=lambda: secrets.token_bytes(8),
    )
    box.now = now
    label = gatt.QrLabel(
        box_id=certificate.box_id,
        outlet=2,
        fingerprint=gatt.box_key_fingerprint(cose.public_key_bytes(box_key.public_key())),
    )
    grant = sample_grant(
        phone_key, issued_at=now - 60, expires_at=now + 86_400, grant_id=secrets.token_bytes(8)
    )
    top_up = sample_grant(
        phone_key,
        issued_at=now - 60,
        expires_at=now + 86_400,
        grant_id=secrets.token_bytes(8),
        amount_fen=300,
    )
    console.print(f"[bold]powerbox protocol walk-through[/] (ATT MTU {att_mtu}, all in memory, no network)")
    console.print(f"QR label on outlet 2: [cyan]{label.encode()}[/]")
    console.print(
        f"balance grant: {len(grant.sign(operator))} bytes, {grant.amount_fen} fen, bound to the phone key"
    )

    table = Table("direction", "message", "bytes", "carried in")
    phone = PhoneSession(
        connection_id=next(ids) + 0x1000,
        phone_key=phone_key,
        ephemeral_key=X25519PrivateKey.generate(),
        label=label,
        operator_keys=ring,
        att_mtu=att_mtu,
    )
    pair = ConnectionPair(phone, box)
    started_at = time.perf_counter()
    phone.connect()
    _send(
        phone, messages.StartSession(request_id=phone.new_request_id(), outlet=2, grant=grant.sign(operator))
    )
    events, seen = _pump(pair, now, console, table, 0)
    elapsed_ms = (time.perf_counter() - started_at) * 1000
    assert any(isinstance(e, BoxAuthenticated) for e in events)
    started = _received(events, messages.SessionStarted)
    assert isinstance(started, messages.SessionStarted)
    round_trips = sum(1 for flight in pair.flights if flight.sender == "phone")

    for second, energy in enumerate((250, 1000, 1750), start=1):
        box.now = now + second * 600
        box.meter(started.session_id, energy_wh=energy, power_w=1500)
        events, seen = _pump(pair, box.now, console, table, seen)
    reading = _received(events, messages.MeterReading)
    assert isinstance(reading, messages.MeterReading)
    _send(
        phone,
        messages.TopUp(
            request_id=phone.new_request_id(), session_id=started.session_id, grant=top_up.sign(operator)
        ),
    )
    events, seen = _pump(pair, box.now, console, table, seen)
    topped = _received(events, messages.ToppedUp)
    assert isinstance(topped, messages.ToppedUp)
    box.now += 600
    box.meter(started.session_id, energy_wh=2600, power_w=1500)
    _send(phone, messages.StopSession(request_id=phone.new_request_id(), session_id=started.session_id))
    events, seen = _pump(pair, box.now, console, table, seen)
    ended = _received(events, messages.SessionEnded)
    assert isinstance(ended, messages.SessionEnded)
    receipt = tokens.LedgerEntry.verify(ended.receipt, cose.key_ring(box_key.public_key()))
    body = receipt.body
    assert isinstance(body, tokens.SessionReceipt)

    console.print(table)
    console.print(
        f"unlock: {round_trips} ATT round trips, {elapsed_ms:.1f} ms for both ends together in memory "
        f"(the radio adds its own latency)"
    )
    console.print(
        f"live reading: {reading.energy_wh} Wh, {reading.power_w} W, cost {reading.cost_fen} fen, "
        f"{reading.remaining_fen} fen left; top-up -> balance {topped.balance_fen} fen"
    )
    console.print(
        f"receipt (box-signed ledger entry #{receipt.sequence}, verified): {body.energy_wh} Wh at "
        f"{body.price_fen_per_kwh} fen/kWh = [bold]{body.cost_fen} fen[/], ended by {body.end_reason.name}"
    )
    sys.exit(0)
