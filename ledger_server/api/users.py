"""Routes for users (and, where marked, staff): their own account, money, grants, reservations,
statements and invoices; nearby boxes; the current revocation list and tariff; carrying ledgers.

Every route here acts on the caller's own data: the user id comes from the token, never the request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from ledger_server import auth, grants, ingest, money, registry, reports
from ledger_server.api import models
from ledger_server.api.deps import (
    Caller,
    Context,
    PersonCaller,
    StaffCaller,
    UserCaller,
    balances_response,
    from_base64,
    from_hex,
    signed_version_response,
    to_base64,
)
from ledger_server.errors import NotFoundError
from ledger_server.grants import GrantRecord, GrantRequest, IssuedToken
from ledger_server.ingest import BatchResult
from ledger_server.money import PaymentResult
from ledger_server.reports import Invoice, SessionLine
from ledger_server.schema import users
from protocol.tokens import MAX_TIME, Door

router = APIRouter()


def grant_response(record: GrantRecord) -> models.GrantResponse:
    return models.GrantResponse.model_validate(
        {
            "grant_id": record.grant_id.hex(),
            "signed_grant": to_base64(record.signed),
            "box_id": record.box_id,
            "amount_fen": record.amount_fen,
            "max_price_fen_per_kwh": record.max_price_fen_per_kwh,
            "issued_at": record.issued_at,
            "expires_at": record.expires_at,
            "state": record.state,
            "charged_fen": record.charged_fen,
            "captured_fen": record.captured_fen,
            "excess_fen": record.excess_fen,
            "released_fen": record.released_fen,
        }
    )


def payment_response(result: PaymentResult) -> models.PaymentResponse:
    return models.PaymentResponse(
        payment_id=result.payment_id,
        kind=str(result.kind),
        amount_fen=result.amount_fen,
        provider_reference=result.provider_reference,
        balances=balances_response(result.balances),
    )


def issued_response(issued: IssuedToken) -> models.SignedTokenResponse:
    return models.SignedTokenResponse(
        token_id=issued.token_id.hex(),
        signed=to_base64(issued.signed),
        not_before=issued.not_before,
        expires_at=issued.expires_at,
    )


def session_response(line: SessionLine) -> models.SessionResponse:
    return models.SessionResponse(
        box_id=line.box_id,
        session_id=line.session_id.hex(),
        outlet=line.outlet,
        start_time=line.start_time,
        end_time=line.end_time,
        energy_wh=line.energy_wh,
        cost_fen=line.cost_fen,
        end_reason=line.end_reason,
        invoiced=line.invoiced,
    )


def statement_response(statement: reports.Statement) -> models.StatementResponse:
    return models.StatementResponse.model_validate(
        {
            "user_id": statement.user_id,
            "from_time": statement.from_time,
            "to_time": statement.to_time,
            "balances": balances_response(statement.balances).model_dump(),
            "lines": [
                {
                    "time": line.time,
                    "kind": line.kind,
                    "account": line.account,
                    "amount_fen": line.amount_fen,
                    "grant_id": None if line.grant_id is None else line.grant_id.hex(),
                    "box_id": line.box_id,
                    "session_id": None if line.session_id is None else line.session_id.hex(),
                }
                for line in statement.lines
            ],
            "sessions": [session_response(line).model_dump() for line in statement.sessions],
        }
    )


def invoice_response(invoice: Invoice) -> models.InvoiceResponse:
    return models.InvoiceResponse(
        number=invoice.number,
        created_at=invoice.created_at,
        total_fen=invoice.total_fen,
        energy_wh=invoice.energy_wh,
        sessions=[session_response(line) for line in invoice.sessions],
        html_url=f"/v1/me/invoices/{invoice.number}/html",
    )


def batch_response(result: BatchResult) -> models.BatchResultResponse:
    return models.BatchResultResponse(
        box_id=result.box_id,
        received=result.received,
        stored=result.stored,
        duplicates=result.duplicates,
        forks=result.forks,
        waiting=result.waiting,
        contiguous_sequence=result.contiguous_sequence,
        applied_sequence=result.applied_sequence,
        ledger_ack=None if result.ack is None else to_base64(result.ack),
    )


@router.get("/v1/me", tags=["users"])
async def me(context: Context, caller: UserCaller) -> models.MeResponse:
    async with context.database.connect() as connection:
        row = (await connection.execute(select(users).where(users.c.user_id == caller.user_id))).one()
        balances = await money.read_balances(connection, caller.user_id)
    return models.MeResponse.model_validate(
        {
            "user_id": row.user_id,
            "kind": row.kind,
            "phone": row.phone,
            "electricity_account": row.electricity_account,
            "balances": balances_response(balances).model_dump(),
        }
    )


@router.post("/v1/me/devices", status_code=status.HTTP_201_CREATED, tags=["users", "staff"])
async def register_device(
    context: Context, caller: PersonCaller, body: models.DeviceRequest
) -> models.DeviceResponse:
    """Register a phone's Ed25519 key (grants and tokens are bound to it); proof of possession required."""
    public_key = from_hex(body.public_key)
    await auth.register_device(context, caller, public_key, from_base64(body.proof, "proof"))
    registered = dict(await auth.list_devices(context, caller))
    return models.DeviceResponse(public_key=body.public_key, registered_at=registered[public_key])


@router.get("/v1/me/devices", tags=["users", "staff"])
async def list_devices(context: Context, caller: PersonCaller) -> list[models.DeviceResponse]:
    return [
        models.DeviceResponse(public_key=key.hex(), registered_at=at)
        for key, at in await auth.list_devices(context, caller)
    ]


@router.post("/v1/me/top-ups", tags=["users"])
async def top_up(context: Context, caller: UserCaller, body: models.PaymentRequest) -> models.PaymentResponse:
    """Add to the deposit through the payment provider (idempotent per key)."""
    return payment_response(
        await money.top_up(context, caller.user_id, body.amount_fen, body.idempotency_key)
    )


@router.post("/v1/me/withdrawals", tags=["users"])
async def withdraw(
    context: Context, caller: UserCaller, body: models.PaymentRequest
) -> models.PaymentResponse:
    """Pay part of the available deposit back (idempotent per key)."""
    return payment_response(
        await money.withdraw(context, caller.user_id, body.amount_fen, body.idempotency_key)
    )


@router.post("/v1/me/grants", status_code=status.HTTP_201_CREATED, tags=["users"])
async def request_grant(
    context: Context, caller: UserCaller, body: models.GrantRequestBody
) -> models.GrantResponse:
    """Freeze `amount_fen` and receive a signed BalanceGrant bound to one of your phone keys."""
    record = await grants.issue_grant(
        context,
        caller,
        GrantRequest(
            phone_key=from_hex(body.phone_key),
            amount_fen=body.amount_fen,
            box_id=body.box_id,
            valid_seconds=body.valid_seconds,
            max_price_fen_per_kwh=body.max_price_fen_per_kwh,
            max_session_seconds=body.max_session_seconds,
            idempotency_key=body.idempotency_key,
        ),
    )
    return grant_response(record)


@router.get("/v1/me/grants", tags=["users"])
async def list_grants(context: Context, caller: UserCaller) -> list[models.GrantResponse]:
    return [grant_response(record) for record in await grants.list_grants(context, caller.user_id)]


@router.post("/v1/me/reservations", status_code=status.HTTP_201_CREATED, tags=["users"])
async def reserve(
    context: Context, caller: UserCaller, body: models.ReservationRequest
) -> models.SignedTokenResponse:
    """Hold an outlet for one of your phones; the box learns of it by its uplink."""
    issued = await grants.reserve(
        context,
        caller,
        box_id=body.box_id,
        outlet=body.outlet,
        phone_key=from_hex(body.phone_key),
        starts_at=body.starts_at,
        duration_seconds=body.duration_seconds,
    )
    return issued_response(issued)


@router.get("/v1/me/statement", tags=["users"])
async def my_statement(
    context: Context,
    caller: UserCaller,
    from_time: Annotated[int, Query(ge=0, le=MAX_TIME)] = 0,
    to_time: Annotated[int, Query(ge=0, le=MAX_TIME)] = MAX_TIME,
) -> models.StatementResponse:
    """Money in and out of your accounts, and your sessions, within a window."""
    return statement_response(
        await reports.statement(context, caller.user_id, from_time=from_time, to_time=to_time)
    )


@router.post("/v1/me/invoices", status_code=status.HTTP_201_CREATED, tags=["users"])
async def create_invoice(
    context: Context, caller: UserCaller, body: models.InvoiceRequest
) -> models.InvoiceResponse:
    """Invoice chosen settled sessions of yours (each session once)."""
    wanted = [(item.box_id, from_hex(item.session_id)) for item in body.sessions]
    return invoice_response(await reports.create_invoice(context, caller.user_id, wanted))


@router.get("/v1/me/invoices", tags=["users"])
async def list_invoices(context: Context, caller: UserCaller) -> list[models.InvoiceSummary]:
    return [
        models.InvoiceSummary(number=number, created_at=created_at, total_fen=total)
        for number, created_at, total in await reports.list_invoices(context, caller.user_id)
    ]


InvoiceNumber = Annotated[str, Path(max_length=40)]


@router.get("/v1/me/invoices/{number}", tags=["users"])
async def get_invoice(context: Context, caller: UserCaller, number: InvoiceNumber) -> models.InvoiceResponse:
    return invoice_response(await reports.get_invoice(context, caller.user_id, number))


@router.get("/v1/me/invoices/{number}/html", response_class=HTMLResponse, tags=["users"])
async def invoice_page(context: Context, caller: UserCaller, number: InvoiceNumber) -> HTMLResponse:
    """The invoice as a printable page, exactly as issued."""
    return HTMLResponse((await reports.get_invoice(context, caller.user_id, number)).html)


@router.get("/v1/boxes/nearby", tags=["users", "staff"])
async def nearby(
    context: Context,
    caller: PersonCaller,
    latitude_microdeg: Annotated[int, Query(ge=-90_000_000, le=90_000_000)],
    longitude_microdeg: Annotated[int, Query(ge=-180_000_000, le=180_000_000)],
    radius_m: Annotated[int, Query(ge=1, le=50_000)] = 2000,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[models.NearbyBoxResponse]:
    """Boxes within `radius_m`, nearest first, with each outlet's last known availability."""
    del caller
    found = await registry.nearby_boxes(
        context,
        latitude_microdeg=latitude_microdeg,
        longitude_microdeg=longitude_microdeg,
        radius_m=radius_m,
        limit=limit,
    )
    return [
        models.NearbyBoxResponse(
            box_id=box.box_id,
            distance_m=box.distance_m,
            latitude_microdeg=box.latitude_microdeg,
            longitude_microdeg=box.longitude_microdeg,
            price_fen_per_kwh=box.price_fen_per_kwh,
            last_seen_at=box.last_seen_at,
            outlets=[
                models.OutletStateResponse(
                    number=outlet.number,
                    rated_power_w=outlet.rated_power_w,
                    available=outlet.available,
                    reserved_now=outlet.reserved_now,
                )
                for outlet in box.outlets
            ],
        )
        for box in found
    ]


@router.get("/v1/revocations/latest", tags=["users", "staff", "boxes"])
async def latest_revocations(context: Context, caller: Caller) -> models.SignedVersionResponse:
    """The newest signed revocation list, for a phone to carry to boxes."""
    del caller
    async with context.database.connect() as connection:
        latest = await registry.latest_revocations(connection)
    if latest is None:
        raise NotFoundError("no revocation list issued yet")
    return signed_version_response(latest)


@router.get("/v1/tariffs/latest", tags=["users", "staff", "boxes"])
async def latest_tariff(context: Context, caller: Caller) -> models.SignedVersionResponse:
    """The newest signed tariff table."""
    del caller
    async with context.database.connect() as connection:
        latest = await registry.latest_tariff(connection)
    if latest is None:
        raise NotFoundError("no tariff table issued yet")
    return signed_version_response(latest)


@router.post("/v1/ledger/sealed", tags=["ledger"])
async def carry_sealed_batch(
    context: Context, caller: PersonCaller, body: models.SealedBatchRequest
) -> list[models.BatchResultResponse]:
    """Hand in a ledger batch a phone carried from a box (sealed to the operator: the phone cannot
    read it). The answer holds a signed LedgerAck for each box, for the phone to carry back."""
    del caller
    results = await ingest.ingest_sealed(context, from_base64(body.sealed_batch, "sealed_batch"))
    return [batch_response(result) for result in results]


@router.post("/v1/technician/unlock-tokens", status_code=status.HTTP_201_CREATED, tags=["staff"])
async def unlock_token(
    context: Context, caller: StaffCaller, body: models.UnlockTokenRequest
) -> models.SignedTokenResponse:
    """An UnlockToken for one door of one box, bound to one of your phone keys."""
    issued = await grants.issue_unlock_token(
        context,
        caller,
        box_id=body.box_id,
        door=Door.METERING_BOX if body.door == "metering_box" else Door.OUTLET,
        outlet=body.outlet,
        phone_key=from_hex(body.phone_key),
        valid_seconds=body.valid_seconds,
    )
    return issued_response(issued)
