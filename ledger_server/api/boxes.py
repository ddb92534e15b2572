"""Routes for boxes over their 4G uplink: the long-poll and ledger upload (box bearer token)."""

from __future__ import annotations

from fastapi import APIRouter

from ledger_server import ingest, uplink
from ledger_server.api import models
from ledger_server.api.deps import (
    BoxCaller,
    Context,
    command_response,
    from_base64,
    from_hex,
    signed_version_response,
    to_base64,
)
from ledger_server.api.users import batch_response
from ledger_server.registry import CommandResult

router = APIRouter(prefix="/v1/box", tags=["boxes"])


@router.post("/poll")
async def poll(context: Context, caller: BoxCaller, body: models.PollRequestBody) -> models.PollResponseBody:
    """Long-poll: report outlet availability and finished commands; receive whatever is newer than
    what the box says it holds, waiting up to `wait_seconds` for something to be."""
    response = await uplink.poll(
        context,
        caller.box_id,
        uplink.PollRequest(
            revocation_version=body.revocation_version,
            tariff_version=body.tariff_version,
            ack_sequence=body.ack_sequence,
            known_reservations=frozenset(from_hex(r) for r in body.known_reservations),
            received_commands=frozenset(body.received_commands),
            completed_commands=tuple(
                uplink.CommandCompletion(
                    command_id=c.command_id, result=CommandResult(c.result), detail=c.detail
                )
                for c in body.completed_commands
            ),
            outlet_availability=tuple((o.number, o.available) for o in body.outlets),
            box_time=body.box_time,
            wait_seconds=min(body.wait_seconds, context.config.long_poll_max_seconds),
        ),
    )
    return models.PollResponseBody(
        revocation_list=None
        if response.revocation_list is None
        else signed_version_response(response.revocation_list),
        tariff_table=None
        if response.tariff_table is None
        else signed_version_response(response.tariff_table),
        ledger_ack=None if response.ledger_ack is None else to_base64(response.ledger_ack),
        ack_sequence=response.ack_sequence,
        reservations=None if response.reservations is None else [to_base64(r) for r in response.reservations],
        commands=[command_response(command) for command in response.commands],
        server_time=response.server_time,
    )


@router.post("/ledger")
async def upload_ledger(
    context: Context, caller: BoxCaller, body: models.LedgerBatchRequest
) -> models.BatchResultResponse:
    """Upload signed ledger entries (any order, duplicates welcome); answered with a signed
    LedgerAck for the highest contiguous entry."""
    entries = [from_base64(entry, f"entries[{index}]") for index, entry in enumerate(body.entries)]
    (result,) = await ingest.ingest(context, entries, only_box=caller.box_id)
    return batch_response(result)
