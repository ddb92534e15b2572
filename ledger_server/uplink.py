"""The box's 4G uplink: one long-poll that brings everything newer than what the box holds
(revocation list, tariff table, ledger ack, reservations, remote commands) and takes back what
the box reports (outlet availability, finished commands). DESIGN §4 "Remote fee control".

A poll returns at once when something is new, otherwise when something becomes new (woken by this
process, or found by a periodic look at the database for changes made by other processes), or when
the box's wait runs out. Commands are sent until the box reports them done: the box keys them by id.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import registry
from ledger_server.context import ServerContext
from ledger_server.errors import MalformedRequestError
from ledger_server.registry import BoxCommand, CommandResult, SignedVersion
from ledger_server.schema import box_commands, box_ledgers, box_outlets, boxes, reservations

MAX_REPORTED_ITEMS = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandCompletion:
    command_id: int
    result: CommandResult
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PollRequest:
    revocation_version: int
    tariff_version: int
    ack_sequence: int
    known_reservations: frozenset[bytes]
    received_commands: frozenset[int]  # in hand, not finished: no need to wake the box for them
    completed_commands: tuple[CommandCompletion, ...]
    outlet_availability: tuple[tuple[int, bool], ...]
    box_time: int | None
    wait_seconds: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PollResponse:
    revocation_list: SignedVersion | None  # None: the box's version is current
    tariff_table: SignedVersion | None
    ledger_ack: bytes | None
    ack_sequence: int
    reservations: tuple[bytes, ...] | None  # every current reservation, or None when unchanged
    commands: tuple[BoxCommand, ...]
    server_time: int

    @property
    def has_news(self) -> bool:
        return any((self.revocation_list, self.tariff_table, self.ledger_ack, self.reservations is not None))


async def _report(context: ServerContext, box_id: str, request: PollRequest) -> None:
    now = context.clock()

    async def work(connection: AsyncConnection) -> None:
        await connection.execute(update(boxes).where(boxes.c.box_id == box_id).values(last_seen_at=now))
        fact_time = request.box_time if request.box_time is not None else now
        for outlet, available in request.outlet_availability:
            await connection.execute(
                update(box_outlets)
                .where(
                    box_outlets.c.box_id == box_id,
                    box_outlets.c.number == outlet,
                    (box_outlets.c.availability_at.is_(None)) | (box_outlets.c.availability_at <= fact_time),
                )
                .values(available=available, availability_at=fact_time)
            )
        for completion in request.completed_commands:
            await connection.execute(
                update(box_commands)
                .where(
                    box_commands.c.command_id == completion.command_id,
                    box_commands.c.box_id == box_id,  # a box finishes its own commands only
                    box_commands.c.completed_at.is_(None),
                )
                .values(completed_at=now, result=completion.result, detail=completion.detail[:200])
            )

    await context.database.transaction(work)


async def _look(context: ServerContext, box_id: str, request: PollRequest) -> tuple[PollResponse, bool]:
    now = context.clock()
    async with context.database.connect() as connection:
        revocations = await registry.latest_revocations(connection)
        tariff = await registry.latest_tariff(connection)
        ledger = (
            await connection.execute(
                select(box_ledgers.c.contiguous_sequence, box_ledgers.c.ack).where(
                    box_ledgers.c.box_id == box_id
                )
            )
        ).one()
        current = (
            await connection.execute(
                select(reservations.c.reservation_id, reservations.c.signed)
                .where(reservations.c.box_id == box_id, reservations.c.expires_at > now)
                .order_by(reservations.c.not_before, reservations.c.reservation_id)
            )
        ).all()
        commands = await registry.commands_for(connection, box_id, open_only=True)
    completed = {completion.command_id for completion in request.completed_commands}
    open_commands = tuple(command for command in commands if command.command_id not in completed)
    reservations_changed = {row.reservation_id for row in current} != request.known_reservations
    response = PollResponse(
        revocation_list=revocations
        if revocations and revocations.version > request.revocation_version
        else None,
        tariff_table=tariff if tariff and tariff.version > request.tariff_version else None,
        ledger_ack=ledger.ack if ledger.contiguous_sequence > request.ack_sequence else None,
        ack_sequence=ledger.contiguous_sequence,
        reservations=tuple(row.signed for row in current) if reservations_changed else None,
        commands=open_commands,
        server_time=now,
    )
    new_commands = any(command.command_id not in request.received_commands for command in open_commands)
    return response, response.has_news or new_commands


def check_poll(request: PollRequest, max_wait: int) -> None:
    if not 0 <= request.wait_seconds <= max_wait:
        raise MalformedRequestError(f"wait_seconds is 0 to {max_wait}")
    too_many = (
        len(request.known_reservations),
        len(request.received_commands),
        len(request.completed_commands),
        len(request.outlet_availability),
    )
    if max(too_many) > MAX_REPORTED_ITEMS:
        raise MalformedRequestError(f"at most {MAX_REPORTED_ITEMS} items per list")


async def poll(context: ServerContext, box_id: str, request: PollRequest) -> PollResponse:
    check_poll(request, context.config.long_poll_max_seconds)
    await _report(context, box_id, request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + request.wait_seconds  # a timer, not business time: the loop's clock
    interval = context.config.long_poll_interval_ms / 1000
    while True:
        response, news = await _look(context, box_id, request)
        remaining = deadline - loop.time()
        if news or remaining <= 0:
            return response
        await context.changes.wait(min(interval, remaining))
