"""Routes for operators: staff, box provisioning, remote commands, revocations, tariffs,
anomalies, reconciliation, the books, reports, and any user's statement."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, status

from ledger_server import anomalies, auth, ingest, journal, registry, reports, settlement
from ledger_server.anomalies import AnomalyKind
from ledger_server.api import models
from ledger_server.api.deps import (
    Context,
    OperatorCaller,
    command_response,
    from_hex,
    signed_version_response,
    to_base64,
)
from ledger_server.api.users import batch_response, statement_response
from ledger_server.auth import Role
from ledger_server.journal import BooksReport
from ledger_server.registry import BoxProvisioning, CommandKind, ProvisionedBox
from protocol.tokens import MAX_TIME, OutletSpec

router = APIRouter(prefix="/v1/operator", tags=["operator"])

BoxIdPath = Annotated[str, Path(max_length=16)]
UserIdPath = Annotated[int, Path(ge=1, le=2**31 - 1)]


def provisioned_response(box: ProvisionedBox) -> models.ProvisionedBoxResponse:
    return models.ProvisionedBoxResponse(
        box_id=box.box_id,
        certificate=to_base64(box.certificate),
        certificate_expires_at=box.certificate_expires_at,
        advertised_name=box.advertised_name,
        labels=[models.QrLabelResponse(outlet=outlet, label=label) for outlet, label in box.labels],
    )


def books_response(books: BooksReport) -> models.BooksResponse:
    return models.BooksResponse(
        balanced=books.balanced,
        accounts=books.accounts,
        transactions=books.transactions,
        transfers=books.transfers,
        total_fen=books.total_fen,
        problems=list(books.problems),
    )


@router.post("/staff", status_code=status.HTTP_201_CREATED)
async def create_staff(
    context: Context, caller: OperatorCaller, body: models.StaffRequest
) -> models.StaffResponse:
    del caller
    staff_id = await auth.create_staff(
        context, username=body.username, password=body.password, role=Role(body.role)
    )
    return models.StaffResponse(staff_id=staff_id, username=body.username, role=body.role)


@router.post("/boxes", status_code=status.HTTP_201_CREATED)
async def provision_box(
    context: Context, caller: OperatorCaller, body: models.ProvisionRequest
) -> models.ProvisionedBoxResponse:
    """Register a box (its key, outlets, rated power, place); returns its signed BoxCertificate and
    the QR label text for each outlet door."""
    del caller
    provisioned = await registry.provision_box(
        context,
        BoxProvisioning(
            box_id=body.box_id,
            public_key=from_hex(body.public_key),
            outlets=tuple(OutletSpec(number=o.number, rated_power_w=o.rated_power_w) for o in body.outlets),
            latitude_microdeg=body.latitude_microdeg,
            longitude_microdeg=body.longitude_microdeg,
            tariff_region=body.tariff_region,
        ),
    )
    return provisioned_response(provisioned)


@router.get("/boxes")
async def list_boxes(context: Context, caller: OperatorCaller) -> list[models.BoxSummaryResponse]:
    del caller
    return [
        models.BoxSummaryResponse(
            box_id=box.box_id,
            provisioned_at=box.provisioned_at,
            last_seen_at=box.last_seen_at,
            contiguous_sequence=box.contiguous_sequence,
            applied_sequence=box.applied_sequence,
        )
        for box in await registry.list_boxes(context)
    ]


@router.get("/boxes/{box_id}")
async def get_box(
    context: Context, caller: OperatorCaller, box_id: BoxIdPath
) -> models.ProvisionedBoxResponse:
    del caller
    return provisioned_response(await registry.provisioned_box(context, box_id))


@router.get("/boxes/{box_id}/ledger")
async def box_ledger(
    context: Context, caller: OperatorCaller, box_id: BoxIdPath
) -> models.BatchResultResponse:
    """Where the box's ledger stands: contiguous, applied, waiting entries and the latest ack."""
    del caller
    return batch_response(await ingest.ledger_state(context, box_id))


@router.post("/boxes/{box_id}/commands", status_code=status.HTTP_201_CREATED)
async def queue_command(
    context: Context, caller: OperatorCaller, box_id: BoxIdPath, body: models.CommandRequest
) -> models.CommandResponse:
    """Stop a session or trip an outlet remotely; the box receives it on its next uplink poll."""
    command = await registry.queue_command(
        context,
        staff_id=caller.staff_id,
        box_id=box_id,
        kind=CommandKind(body.kind),
        outlet=body.outlet,
        session_id=None if body.session_id is None else from_hex(body.session_id),
    )
    return command_response(command)


@router.get("/boxes/{box_id}/commands")
async def list_commands(
    context: Context, caller: OperatorCaller, box_id: BoxIdPath
) -> list[models.CommandResponse]:
    del caller
    async with context.database.connect() as connection:
        commands = await registry.commands_for(connection, box_id, open_only=False)
    return [command_response(command) for command in commands]


@router.post("/revocations", status_code=status.HTTP_201_CREATED)
async def revoke(
    context: Context, caller: OperatorCaller, body: models.RevokeRequest
) -> models.SignedVersionResponse:
    """Issue the next revocation list version: the previous one plus these."""
    del caller
    signed = await registry.revoke(
        context,
        grant_ids=[from_hex(g) for g in body.grant_ids],
        phone_keys=[from_hex(k) for k in body.phone_keys],
        user_ids=body.user_ids,
    )
    return signed_version_response(signed)


@router.post("/tariffs", status_code=status.HTTP_201_CREATED)
async def set_tariff(
    context: Context, caller: OperatorCaller, body: models.TariffRequest
) -> models.SignedVersionResponse:
    """Issue the next tariff table version (the whole table)."""
    del caller
    signed = await registry.set_tariff(
        context,
        default_price_fen_per_kwh=body.default_price_fen_per_kwh,
        region_prices=[(p.scope, p.price_fen_per_kwh) for p in body.region_prices],
        box_prices=[(p.scope, p.price_fen_per_kwh) for p in body.box_prices],
    )
    return signed_version_response(signed)


AnomalyKindName = Literal[
    "double_spend",
    "fork",
    "gap",
    "bad_signature",
    "unknown_box",
    "cost_mismatch",
    "clock",
    "unknown_grant",
    "late_receipt",
]


@router.get("/anomalies")
async def list_anomalies(
    context: Context,
    caller: OperatorCaller,
    kind: AnomalyKindName | None = None,
    box_id: Annotated[str | None, Query(max_length=16)] = None,
    unresolved: bool = False,
    after_id: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[models.AnomalyResponse]:
    """What the server found wrong in the ledgers, oldest first (page with `after_id`)."""
    del caller
    found = await anomalies.list_anomalies(
        context,
        kind=None if kind is None else AnomalyKind(kind),
        box_id=box_id,
        unresolved_only=unresolved,
        after_id=after_id,
        limit=limit,
    )
    return [
        models.AnomalyResponse(
            anomaly_id=item.anomaly_id,
            kind=str(item.kind),
            code=int(item.kind.code),
            detail=item.detail,
            box_id=item.box_id,
            sequence=item.sequence,
            grant_id=None if item.grant_id is None else item.grant_id.hex(),
            user_id=item.user_id,
            created_at=item.created_at,
            resolved_at=item.resolved_at,
        )
        for item in found
    ]


@router.post("/reconcile")
async def reconcile(context: Context, caller: OperatorCaller) -> models.ReconcileResponse:
    """Run the batch job once: settle what is outstanding, release expired grants, prove the books."""
    del caller
    summary = await settlement.reconcile(context)
    return models.ReconcileResponse(
        entries_applied=summary.entries_applied,
        boxes_settled=summary.boxes_settled,
        grants_released=summary.grants_released,
        gaps=summary.gaps,
        books=books_response(summary.books),
    )


@router.get("/books")
async def books(context: Context, caller: OperatorCaller) -> models.BooksResponse:
    """Prove the double-entry journal: every account balances and no money was made or lost."""
    del caller
    async with context.database.connect() as connection:
        return books_response(await journal.check_books(connection))


@router.get("/reports/daily")
async def daily_report(
    context: Context,
    caller: OperatorCaller,
    from_time: Annotated[int, Query(ge=0, le=MAX_TIME)],
    to_time: Annotated[int, Query(ge=0, le=MAX_TIME)],
) -> list[models.DailyFiguresResponse]:
    """Energy and revenue per box per UTC day (by the day sessions ended)."""
    del caller
    return [
        models.DailyFiguresResponse(
            box_id=row.box_id,
            day=row.day,
            sessions=row.sessions,
            energy_wh=row.energy_wh,
            revenue_fen=row.revenue_fen,
        )
        for row in await reports.daily_report(context, from_time=from_time, to_time=to_time)
    ]


@router.get("/users/{user_id}/statement")
async def user_statement(
    context: Context,
    caller: OperatorCaller,
    user_id: UserIdPath,
    from_time: Annotated[int, Query(ge=0, le=MAX_TIME)] = 0,
    to_time: Annotated[int, Query(ge=0, le=MAX_TIME)] = MAX_TIME,
) -> models.StatementResponse:
    del caller
    return statement_response(await reports.statement(context, user_id, from_time=from_time, to_time=to_time))
