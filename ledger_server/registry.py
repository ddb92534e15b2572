"""The operator's registry: boxes and their certificates, revocation lists and tariff tables
(monotonic versions), nearby boxes, and remote commands for the uplink (DESIGN §2, §4, §6)."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import journal
from ledger_server.context import ServerContext
from ledger_server.errors import ConflictError, MalformedRequestError, NotFoundError
from ledger_server.schema import (
    box_commands,
    box_ledgers,
    box_outlets,
    boxes,
    grants,
    reservations,
    revocation_lists,
    tariff_tables,
)
from protocol import cose, gatt, tokens
from protocol.tokens import BoxCertificate, OutletSpec, RevocationList, TariffTable

MAX_OUTLETS = 16
MAX_RATED_POWER_W = 100_000
MAX_PRICE_FEN_PER_KWH = 1_000_000
MAX_REVOCATIONS_PER_CALL = 1000
METRES_PER_DEGREE = 111_195  # on the mean Earth radius


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxProvisioning:
    box_id: str
    public_key: bytes
    outlets: tuple[OutletSpec, ...]
    latitude_microdeg: int
    longitude_microdeg: int
    tariff_region: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisionedBox:
    box_id: str
    certificate: bytes
    certificate_expires_at: int
    advertised_name: str
    labels: tuple[tuple[int, str], ...]  # (outlet, QR label text)


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedVersion:
    version: int
    issued_at: int
    signed: bytes


def _check_provisioning(request: BoxProvisioning) -> Ed25519PublicKey:
    if not gatt.is_valid_box_id(request.box_id):
        raise MalformedRequestError("a box id is 1 to 16 of A-Z, 0-9 and '-'")
    try:
        key = Ed25519PublicKey.from_public_bytes(request.public_key)
    except ValueError:
        raise MalformedRequestError("the box public key is not an Ed25519 key") from None
    numbers = [outlet.number for outlet in request.outlets]
    if not 1 <= len(numbers) <= MAX_OUTLETS or len(set(numbers)) != len(numbers):
        raise MalformedRequestError(f"a box has 1 to {MAX_OUTLETS} outlets with distinct numbers")
    if any(not 1 <= outlet.number <= gatt.MAX_OUTLET for outlet in request.outlets):
        raise MalformedRequestError(f"outlets are numbered 1 to {gatt.MAX_OUTLET}")
    if any(not 1 <= outlet.rated_power_w <= MAX_RATED_POWER_W for outlet in request.outlets):
        raise MalformedRequestError(f"rated power is 1 to {MAX_RATED_POWER_W} W")
    if not -90_000_000 <= request.latitude_microdeg <= 90_000_000:
        raise MalformedRequestError("latitude out of range")
    if not -180_000_000 <= request.longitude_microdeg <= 180_000_000:
        raise MalformedRequestError("longitude out of range")
    if not 1 <= len(request.tariff_region) <= 32 or not request.tariff_region.isprintable():
        raise MalformedRequestError("a tariff region is 1 to 32 printable characters")
    return key


async def provision_box(context: ServerContext, request: BoxProvisioning) -> ProvisionedBox:
    """Register a box's key, outlets and place; sign its certificate (the box's EDHOC credential)."""
    public_key = _check_provisioning(request)
    now = context.clock()
    certificate = BoxCertificate(
        box_id=request.box_id,
        box_public_key=public_key,
        outlets=tuple(sorted(request.outlets, key=lambda outlet: outlet.number)),
        latitude_microdeg=request.latitude_microdeg,
        longitude_microdeg=request.longitude_microdeg,
        tariff_region=request.tariff_region,
        issued_at=now,
        expires_at=min(now + context.config.certificate_validity_seconds, tokens.MAX_TIME),
    )
    signed = certificate.sign(context.keys.signer)

    async def work(connection: AsyncConnection) -> None:
        clash = (
            await connection.execute(
                select(boxes.c.box_id).where(
                    (boxes.c.box_id == request.box_id) | (boxes.c.public_key == request.public_key)
                )
            )
        ).first()
        if clash is not None:
            raise ConflictError("a box with this id or key is already provisioned")
        await connection.execute(
            boxes.insert().values(
                box_id=request.box_id,
                public_key=request.public_key,
                latitude_microdeg=request.latitude_microdeg,
                longitude_microdeg=request.longitude_microdeg,
                tariff_region=request.tariff_region,
                certificate=signed,
                certificate_expires_at=certificate.expires_at,
                provisioned_at=now,
            )
        )
        await connection.execute(
            box_outlets.insert(),
            [
                {"box_id": request.box_id, "number": outlet.number, "rated_power_w": outlet.rated_power_w}
                for outlet in certificate.outlets
            ],
        )
        await connection.execute(
            box_ledgers.insert().values(
                box_id=request.box_id,
                contiguous_sequence=0,
                contiguous_hash=tokens.GENESIS_HASH,
                applied_sequence=0,
                applied_time=0,
            )
        )
        await journal.create_revenue_account(connection, request.box_id)

    await context.database.transaction(work)
    return _provisioned(signed, certificate)


def _provisioned(signed: bytes, certificate: BoxCertificate) -> ProvisionedBox:
    fingerprint = gatt.box_key_fingerprint(cose.public_key_bytes(certificate.box_public_key))
    return ProvisionedBox(
        box_id=certificate.box_id,
        certificate=signed,
        certificate_expires_at=certificate.expires_at,
        advertised_name=gatt.advertised_name(certificate.box_id),
        labels=tuple(
            (
                outlet.number,
                gatt.QrLabel(
                    box_id=certificate.box_id, outlet=outlet.number, fingerprint=fingerprint
                ).encode(),
            )
            for outlet in certificate.outlets
        ),
    )


async def provisioned_box(context: ServerContext, box_id: str) -> ProvisionedBox:
    async with context.database.connect() as connection:
        signed = (
            await connection.execute(select(boxes.c.certificate).where(boxes.c.box_id == box_id))
        ).scalar()
    if signed is None:
        raise NotFoundError(f"no box {box_id}")
    return _provisioned(signed, BoxCertificate.decode_unverified(signed))


async def require_box(connection: AsyncConnection, box_id: str, *, lock: bool = False) -> None:
    query = select(boxes.c.box_id).where(boxes.c.box_id == box_id)
    if (await connection.execute(query.with_for_update() if lock else query)).first() is None:
        raise NotFoundError(f"no box {box_id}")


async def require_outlet(connection: AsyncConnection, box_id: str, outlet: int) -> None:
    found = await connection.execute(
        select(box_outlets.c.number).where(box_outlets.c.box_id == box_id, box_outlets.c.number == outlet)
    )
    if found.first() is None:
        raise NotFoundError(f"box {box_id} has no outlet {outlet}")


# --- revocation lists and tariff tables ------------------------------------------------------------

# Signed versions never change once written, so each process decodes each one once.
_revocation_cache: dict[tuple[int, bytes], RevocationList] = {}
_tariff_cache: dict[tuple[int, bytes], TariffTable] = {}


async def latest_revocations(connection: AsyncConnection) -> SignedVersion | None:
    row = (
        await connection.execute(
            select(revocation_lists).order_by(revocation_lists.c.version.desc()).limit(1)
        )
    ).first()
    return (
        None
        if row is None
        else SignedVersion(version=row.version, issued_at=row.issued_at, signed=row.signed)
    )


def decode_revocations(signed: SignedVersion) -> RevocationList:
    key = (signed.version, signed.signed)
    if key not in _revocation_cache:
        _revocation_cache[key] = RevocationList.decode_unverified(signed.signed)
    return _revocation_cache[key]


async def revoke(
    context: ServerContext,
    *,
    grant_ids: Sequence[bytes] = (),
    phone_keys: Sequence[bytes] = (),
    user_ids: Sequence[int] = (),
) -> SignedVersion:
    """A new revocation list version: the previous one plus these, minus grants that have expired
    (a box refuses those anyway, and the list has to fit through BLE)."""
    if len(grant_ids) + len(phone_keys) + len(user_ids) > MAX_REVOCATIONS_PER_CALL:
        raise MalformedRequestError(f"at most {MAX_REVOCATIONS_PER_CALL} revocations per call")
    if any(len(grant_id) != tokens.ID_SIZE for grant_id in grant_ids) or any(
        len(k) != 32 for k in phone_keys
    ):
        raise MalformedRequestError("grant ids are 8 bytes, phone keys 32")
    if any(not 0 <= user_id <= tokens.MAX_USER_ID for user_id in user_ids):
        raise MalformedRequestError("user id out of range")
    now = context.clock()

    async def work(connection: AsyncConnection) -> SignedVersion:
        latest = await latest_revocations(connection)
        previous = None if latest is None else decode_revocations(latest)
        revoked_grants = set(grant_ids) | (previous.grant_ids if previous else frozenset())
        expired = {
            grant_id
            for (grant_id,) in await connection.execute(
                select(grants.c.grant_id).where(
                    grants.c.grant_id.in_(revoked_grants), grants.c.expires_at <= now
                )
            )
        }
        revocations = RevocationList(
            version=(latest.version if latest else 0) + 1,
            issued_at=now,
            grant_ids=frozenset(revoked_grants - expired),
            phone_keys=frozenset(phone_keys) | (previous.phone_keys if previous else frozenset()),
            user_ids=frozenset(user_ids) | (previous.user_ids if previous else frozenset()),
        )
        signed = SignedVersion(
            version=revocations.version, issued_at=now, signed=revocations.sign(context.keys.signer)
        )
        await connection.execute(
            revocation_lists.insert().values(version=signed.version, issued_at=now, signed=signed.signed)
        )
        return signed

    signed = await context.database.transaction(work)
    context.changes.notify()
    return signed


async def latest_tariff(connection: AsyncConnection) -> SignedVersion | None:
    row = (
        await connection.execute(select(tariff_tables).order_by(tariff_tables.c.version.desc()).limit(1))
    ).first()
    return (
        None
        if row is None
        else SignedVersion(version=row.version, issued_at=row.issued_at, signed=row.signed)
    )


async def tariff_version(connection: AsyncConnection, version: int) -> TariffTable | None:
    row = (
        await connection.execute(select(tariff_tables.c.signed).where(tariff_tables.c.version == version))
    ).first()
    return (
        None if row is None else decode_tariff(SignedVersion(version=version, issued_at=0, signed=row.signed))
    )


def decode_tariff(signed: SignedVersion) -> TariffTable:
    key = (signed.version, signed.signed)
    if key not in _tariff_cache:
        _tariff_cache[key] = TariffTable.decode_unverified(signed.signed)
    return _tariff_cache[key]


def _check_price(price: int) -> int:
    if not 0 <= price <= MAX_PRICE_FEN_PER_KWH:
        raise MalformedRequestError(f"a price is 0 to {MAX_PRICE_FEN_PER_KWH} fen per kWh")
    return price


async def set_tariff(
    context: ServerContext,
    *,
    default_price_fen_per_kwh: int,
    region_prices: Iterable[tuple[str, int]] = (),
    box_prices: Iterable[tuple[str, int]] = (),
) -> SignedVersion:
    """A new tariff table version (the whole table: prices not named fall back to the default)."""
    regions = tuple(sorted((region, _check_price(price)) for region, price in region_prices))
    box_scoped = tuple(sorted((box_id, _check_price(price)) for box_id, price in box_prices))
    _check_price(default_price_fen_per_kwh)
    if any(not 1 <= len(scope) <= 32 for scope, _ in regions + box_scoped):
        raise MalformedRequestError("regions and box ids are 1 to 32 characters")
    if len({scope for scope, _ in regions}) != len(regions) or len({b for b, _ in box_scoped}) != len(
        box_scoped
    ):
        raise MalformedRequestError("each region and box has one price")
    now = context.clock()

    async def work(connection: AsyncConnection) -> SignedVersion:
        latest = await latest_tariff(connection)
        table = TariffTable(
            version=(latest.version if latest else 0) + 1,
            issued_at=now,
            default_price_fen_per_kwh=default_price_fen_per_kwh,
            region_prices=regions,
            box_prices=box_scoped,
        )
        signed = SignedVersion(version=table.version, issued_at=now, signed=table.sign(context.keys.signer))
        await connection.execute(
            tariff_tables.insert().values(version=signed.version, issued_at=now, signed=signed.signed)
        )
        return signed

    signed = await context.database.transaction(work)
    context.changes.notify()
    return signed


# --- nearby boxes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OutletState:
    number: int
    rated_power_w: int
    available: bool | None  # None: the box has not told us yet
    reserved_now: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class NearbyBox:
    box_id: str
    distance_m: int
    latitude_microdeg: int
    longitude_microdeg: int
    price_fen_per_kwh: int | None
    last_seen_at: int | None
    outlets: tuple[OutletState, ...]


def distance_m(lat1: int, lon1: int, lat2: int, lon2: int) -> int:
    """Great-circle distance between two points in microdegrees, whole metres (haversine)."""
    phi1, phi2 = math.radians(lat1 / 1e6), math.radians(lat2 / 1e6)
    d_phi, d_lambda = phi2 - phi1, math.radians((lon2 - lon1) / 1e6)
    a = math.sin(d_phi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(d_lambda / 2) ** 2
    return round(2 * METRES_PER_DEGREE * 180 / math.pi * math.asin(min(1.0, math.sqrt(a))))


async def nearby_boxes(
    context: ServerContext, *, latitude_microdeg: int, longitude_microdeg: int, radius_m: int, limit: int
) -> list[NearbyBox]:
    """Boxes within `radius_m`, nearest first, with each outlet's last known availability."""
    now = context.clock()
    latitude_span = radius_m * 1_000_000 // METRES_PER_DEGREE + 1
    async with context.database.connect() as connection:
        candidates = (
            await connection.execute(
                select(boxes).where(
                    boxes.c.latitude_microdeg.between(
                        latitude_microdeg - latitude_span, latitude_microdeg + latitude_span
                    )
                )
            )
        ).all()
        found = sorted(
            (
                (
                    distance_m(
                        latitude_microdeg, longitude_microdeg, row.latitude_microdeg, row.longitude_microdeg
                    ),
                    row,
                )
                for row in candidates
            ),
            key=lambda pair: (pair[0], pair[1].box_id),
        )
        found = [(distance, row) for distance, row in found if distance <= radius_m][:limit]
        box_ids = [row.box_id for _, row in found]
        outlet_rows = (
            await connection.execute(
                select(box_outlets).where(box_outlets.c.box_id.in_(box_ids)).order_by(box_outlets.c.number)
            )
        ).all()
        reserved = {
            (box_id, outlet)
            for box_id, outlet in await connection.execute(
                select(reservations.c.box_id, reservations.c.outlet).where(
                    reservations.c.box_id.in_(box_ids),
                    reservations.c.not_before <= now,
                    reservations.c.expires_at > now,
                )
            )
        }
        latest = await latest_tariff(connection)
    table = None if latest is None else decode_tariff(latest)
    result = []
    for distance, row in found:
        result.append(
            NearbyBox(
                box_id=row.box_id,
                distance_m=distance,
                latitude_microdeg=row.latitude_microdeg,
                longitude_microdeg=row.longitude_microdeg,
                price_fen_per_kwh=None if table is None else table.price_for(row.box_id, row.tariff_region),
                last_seen_at=row.last_seen_at,
                outlets=tuple(
                    OutletState(
                        number=outlet.number,
                        rated_power_w=outlet.rated_power_w,
                        available=outlet.available,
                        reserved_now=(row.box_id, outlet.number) in reserved,
                    )
                    for outlet in outlet_rows
                    if outlet.box_id == row.box_id
                ),
            )
        )
    return result


# --- remote commands -------------------------------------------------------------------------------


class CommandKind(enum.StrEnum):
    REMOTE_STOP = "remote_stop"  # end the session on the outlet (EndReason.REMOTE_STOP)
    TRIP = "trip"  # open the outlet's breaker now


class CommandResult(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxCommand:
    command_id: int
    box_id: str
    kind: CommandKind
    outlet: int
    session_id: bytes | None
    created_at: int
    completed_at: int | None
    result: CommandResult | None
    detail: str | None


def _command(row: Row[Any]) -> BoxCommand:
    return BoxCommand(
        command_id=row.command_id,
        box_id=row.box_id,
        kind=CommandKind(row.kind),
        outlet=row.outlet,
        session_id=row.session_id,
        created_at=row.created_at,
        completed_at=row.completed_at,
        result=None if row.result is None else CommandResult(row.result),
        detail=row.detail,
    )


async def queue_command(
    context: ServerContext,
    *,
    staff_id: int,
    box_id: str,
    kind: CommandKind,
    outlet: int,
    session_id: bytes | None,
) -> BoxCommand:
    async def work(connection: AsyncConnection) -> BoxCommand:
        await require_box(connection, box_id)
        await require_outlet(connection, box_id, outlet)
        command_id = (
            await connection.execute(
                box_commands.insert()
                .values(
                    box_id=box_id,
                    kind=kind,
                    outlet=outlet,
                    session_id=session_id,
                    created_by=staff_id,
                    created_at=context.clock(),
                )
                .returning(box_commands.c.command_id)
            )
        ).scalar_one()
        row = (
            await connection.execute(select(box_commands).where(box_commands.c.command_id == command_id))
        ).one()
        return _command(row)

    command = await context.database.transaction(work)
    context.changes.notify()
    return command


async def commands_for(connection: AsyncConnection, box_id: str, *, open_only: bool) -> list[BoxCommand]:
    query = select(box_commands).where(box_commands.c.box_id == box_id)
    if open_only:
        query = query.where(box_commands.c.completed_at.is_(None))
    return [_command(row) for row in await connection.execute(query.order_by(box_commands.c.command_id))]


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxSummary:
    box_id: str
    provisioned_at: int
    last_seen_at: int | None
    contiguous_sequence: int
    applied_sequence: int


async def list_boxes(context: ServerContext) -> list[BoxSummary]:
    async with context.database.connect() as connection:
        rows = await connection.execute(
            select(
                boxes.c.box_id,
                boxes.c.provisioned_at,
                boxes.c.last_seen_at,
                box_ledgers.c.contiguous_sequence,
                box_ledgers.c.applied_sequence,
            )
            .join(box_ledgers, box_ledgers.c.box_id == boxes.c.box_id)
            .order_by(boxes.c.box_id)
        )
        return [
            BoxSummary(
                box_id=row.box_id,
                provisioned_at=row.provisioned_at,
                last_seen_at=row.last_seen_at,
                contiguous_sequence=row.contiguous_sequence,
                applied_sequence=row.applied_sequence,
            )
            for row in rows
        ]
