"""Who is calling: users (two kinds), staff (operators and technicians) and boxes, each proven
in its own way and then carried by a short-lived bearer token (DESIGN §7 S8).

    shared user        phone number + one-time code by SMS
    account user       electricity account number + its password + one-time code to its phone
    staff              username + password
    box                signs a server nonce with its box key (`protocol.proofs`)

Tokens are random; the database keeps only their SHA-256, so every server process accepts them and
a leaked database does not leak live tokens.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import journal, passwords
from ledger_server.context import ServerContext
from ledger_server.errors import (
    AuthenticationFailedError,
    ConflictError,
    ForbiddenError,
    MalformedRequestError,
    NotFoundError,
    RateLimitedError,
    UnauthenticatedError,
)
from ledger_server.providers import SmsMessage
from ledger_server.schema import access_tokens, box_challenges, boxes, devices, one_time_codes, staff, users
from protocol import proofs
from protocol.errors import ErrorCode, TokenError

PHONE_PATTERN = re.compile(r"\+?[0-9]{6,15}")
ACCOUNT_PATTERN = re.compile(r"[0-9A-Za-z-]{4,32}")
USERNAME_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{2,63}")
CHALLENGE_SECONDS = 120


class PrincipalKind(enum.StrEnum):
    USER = "user"
    STAFF = "staff"
    BOX = "box"


class Role(enum.StrEnum):
    USER = "user"
    OPERATOR = "operator"
    TECHNICIAN = "technician"
    BOX = "box"


class UserKind(enum.StrEnum):
    SHARED = "shared"  # phone number, pays from a deposit
    ACCOUNT = "account"  # bound to an electricity account, pays from it


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    kind: PrincipalKind
    subject: str  # user id, staff id or box id
    role: Role

    @property
    def user_id(self) -> int:
        if self.kind is not PrincipalKind.USER:
            raise ForbiddenError("only users may do this")
        return int(self.subject)

    @property
    def staff_id(self) -> int:
        if self.kind is not PrincipalKind.STAFF:
            raise ForbiddenError("only staff may do this")
        return int(self.subject)

    @property
    def box_id(self) -> str:
        if self.kind is not PrincipalKind.BOX:
            raise ForbiddenError("only boxes may do this")
        return self.subject

    def require(self, *roles: Role) -> None:
        if self.role not in roles:
            raise ForbiddenError(f"needs the role {' or '.join(roles)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessToken:
    token: str
    expires_at: int
    principal: Principal


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def issue_token(
    context: ServerContext, connection: AsyncConnection, principal: Principal
) -> AccessToken:
    token = secrets.token_urlsafe(32)
    expires_at = context.clock() + context.config.access_token_seconds
    await connection.execute(
        access_tokens.insert().values(
            token_hash=_digest(token),
            principal_kind=principal.kind,
            principal_id=principal.subject,
            role=principal.role,
            expires_at=expires_at,
        )
    )
    return AccessToken(token=token, expires_at=expires_at, principal=principal)


async def authenticate(context: ServerContext, token: str) -> Principal:
    async with context.database.connect() as connection:
        row = (
            await connection.execute(
                select(access_tokens).where(
                    access_tokens.c.token_hash == _digest(token), access_tokens.c.expires_at > context.clock()
                )
            )
        ).first()
    if row is None:
        raise UnauthenticatedError("unknown or expired token")
    return Principal(kind=PrincipalKind(row.principal_kind), subject=row.principal_id, role=Role(row.role))


async def revoke_token(context: ServerContext, token: str) -> None:
    async def work(connection: AsyncConnection) -> None:
        await connection.execute(delete(access_tokens).where(access_tokens.c.token_hash == _digest(token)))

    await context.database.transaction(work)


async def forget_expired(context: ServerContext, connection: AsyncConnection) -> None:
    now = context.clock()
    await connection.execute(delete(access_tokens).where(access_tokens.c.expires_at <= now))
    await connection.execute(delete(box_challenges).where(box_challenges.c.expires_at <= now))
    await connection.execute(delete(one_time_codes).where(one_time_codes.c.expires_at <= now - 86_400))


# --- one-time codes --------------------------------------------------------------------------------


def _code_digest(login: str, code: str) -> bytes:
    return _digest(f"{login}\x00{code}")


async def _send_code(context: ServerContext, login: str, phone: str) -> int:
    now = context.clock()
    code = f"{secrets.randbelow(10**6):06d}"

    async def work(connection: AsyncConnection) -> None:
        recent = (
            await connection.execute(
                select(func.count())
                .select_from(one_time_codes)
                .where(one_time_codes.c.login == login, one_time_codes.c.created_at > now - 3600)
            )
        ).scalar_one()
        if recent >= context.config.one_time_codes_per_hour:
            raise RateLimitedError("too many codes asked for; try again later")
        await connection.execute(
            one_time_codes.insert().values(
                login=login,
                code_hash=_code_digest(login, code),
                created_at=now,
                expires_at=now + context.config.one_time_code_seconds,
                attempts=0,
                used=False,
            )
        )

    await context.database.transaction(work)
    await context.sms.send(
        SmsMessage(phone=phone, text=f"Your powerbox code is {code}. It expires in 5 minutes.")
    )
    return context.config.one_time_code_seconds


class _CodeCheck(enum.Enum):
    ACCEPTED = enum.auto()
    WRONG = enum.auto()
    EXHAUSTED = enum.auto()


async def _consume_code(context: ServerContext, login: str, code: str) -> None:
    """Accept `code` once; count a wrong guess (committed even though the request fails)."""
    now = context.clock()

    async def work(connection: AsyncConnection) -> _CodeCheck:
        row = (
            await connection.execute(
                select(one_time_codes)
                .where(
                    one_time_codes.c.login == login,
                    one_time_codes.c.used.is_(False),
                    one_time_codes.c.expires_at > now,
                )
                .order_by(one_time_codes.c.created_at.desc(), one_time_codes.c.code_id.desc())
                .limit(1)
                .with_for_update()
            )
        ).first()
        if row is None:
            return _CodeCheck.WRONG
        if row.attempts >= context.config.one_time_code_attempts:
            return _CodeCheck.EXHAUSTED
        accepted = hmac.compare_digest(row.code_hash, _code_digest(login, code))
        await connection.execute(
            update(one_time_codes)
            .where(one_time_codes.c.code_id == row.code_id)
            .values(attempts=row.attempts + 1, used=accepted)
        )
        return _CodeCheck.ACCEPTED if accepted else _CodeCheck.WRONG

    match await context.database.transaction(work):
        case _CodeCheck.EXHAUSTED:
            raise RateLimitedError("too many wrong codes; ask for a new one")
        case _CodeCheck.WRONG:
            raise AuthenticationFailedError("wrong or expired code")
        case _CodeCheck.ACCEPTED:
            return


def _check_phone(phone: str) -> str:
    if not PHONE_PATTERN.fullmatch(phone):
        raise MalformedRequestError("a phone number is 6 to 15 digits, optionally after '+'")
    return phone


def _check_account_number(number: str) -> str:
    if not ACCOUNT_PATTERN.fullmatch(number):
        raise MalformedRequestError("an electricity account number is 4 to 32 letters, digits or '-'")
    return number


async def request_shared_code(context: ServerContext, phone: str) -> int:
    phone = _check_phone(phone)
    return await _send_code(context, f"phone:{phone}", phone)


async def _user_token(
    context: ServerContext, *, login: str, kind: UserKind, phone: str, account: str | None
) -> AccessToken:
    now = context.clock()

    async def work(connection: AsyncConnection) -> AccessToken:
        user_id = (await connection.execute(select(users.c.user_id).where(users.c.login == login))).scalar()
        if user_id is None:
            user_id = (
                await connection.execute(
                    users.insert()
                    .values(kind=kind, login=login, phone=phone, electricity_account=account, created_at=now)
                    .returning(users.c.user_id)
                )
            ).scalar_one()
            await journal.create_user_accounts(connection, user_id)
        principal = Principal(kind=PrincipalKind.USER, subject=str(user_id), role=Role.USER)
        return await issue_token(context, connection, principal)

    return await context.database.transaction(work)


async def login_shared_user(context: ServerContext, phone: str, code: str) -> AccessToken:
    """A shared user signs up or logs in with the code texted to their phone."""
    phone = _check_phone(phone)
    login = f"phone:{phone}"
    await _consume_code(context, login, code)
    return await _user_token(context, login=login, kind=UserKind.SHARED, phone=phone, account=None)


async def request_account_code(context: ServerContext, number: str, password: str) -> int:
    """The electricity account's provider checks the password; the code goes to the account's phone."""
    number = _check_account_number(number)
    account = await context.payments.verify_electricity_account(number, password)
    if account is None:
        raise AuthenticationFailedError("unknown account or wrong password")
    return await _send_code(context, f"account:{number}", account.phone)


async def login_account_user(context: ServerContext, number: str, password: str, code: str) -> AccessToken:
    number = _check_account_number(number)
    account = await context.payments.verify_electricity_account(number, password)
    if account is None:
        raise AuthenticationFailedError("unknown account or wrong password")
    login = f"account:{number}"
    await _consume_code(context, login, code)
    return await _user_token(context, login=login, kind=UserKind.ACCOUNT, phone=account.phone, account=number)


# --- staff -----------------------------------------------------------------------------------------


async def create_staff(context: ServerContext, *, username: str, password: str, role: Role) -> int:
    if not USERNAME_PATTERN.fullmatch(username):
        raise MalformedRequestError(
            "a username is 3 to 64 of a-z, 0-9, '_', '.', '-', starting with a letter"
        )
    if role not in (Role.OPERATOR, Role.TECHNICIAN):
        raise MalformedRequestError("staff are operators or technicians")
    if len(password) < 8:
        raise MalformedRequestError("a staff password has at least 8 characters")
    password_hash = await passwords.hash_password(password)

    async def work(connection: AsyncConnection) -> int:
        if (await connection.execute(select(staff.c.staff_id).where(staff.c.username == username))).first():
            raise ConflictError(f"staff member {username} exists")
        inserted = await connection.execute(
            staff.insert()
            .values(username=username, password_hash=password_hash, role=role, created_at=context.clock())
            .returning(staff.c.staff_id)
        )
        return int(inserted.scalar_one())

    return await context.database.transaction(work)


async def first_operator_id(connection: AsyncConnection) -> int:
    """The operator that command-line actions are recorded under (the one `init` created)."""
    found = (
        await connection.execute(
            select(staff.c.staff_id).where(staff.c.role == Role.OPERATOR).order_by(staff.c.staff_id).limit(1)
        )
    ).scalar()
    if found is None:
        raise NotFoundError("no operator yet: run `powerbox server init`")
    return int(found)


async def login_staff(context: ServerContext, username: str, password: str) -> AccessToken:
    async with context.database.connect() as connection:
        row = (await connection.execute(select(staff).where(staff.c.username == username))).first()
    stored = passwords.DUMMY_HASH if row is None else row.password_hash
    if not await passwords.verify_password(password, stored) or row is None:
        raise AuthenticationFailedError("unknown username or wrong password")
    principal = Principal(kind=PrincipalKind.STAFF, subject=str(row.staff_id), role=Role(row.role))

    async def work(connection: AsyncConnection) -> AccessToken:
        return await issue_token(context, connection, principal)

    return await context.database.transaction(work)


# --- boxes -----------------------------------------------------------------------------------------


async def box_challenge(context: ServerContext, box_id: str) -> tuple[bytes, int]:
    """A fresh nonce for the box to sign. Unknown boxes get one too: the answer tells nothing."""
    nonce = secrets.token_bytes(32)
    expires_at = context.clock() + CHALLENGE_SECONDS

    async def work(connection: AsyncConnection) -> None:
        await connection.execute(
            box_challenges.insert().values(nonce=nonce, box_id=box_id, expires_at=expires_at)
        )

    await context.database.transaction(work)
    return nonce, expires_at


async def login_box(context: ServerContext, box_id: str, nonce: bytes, signed_proof: bytes) -> AccessToken:
    now = context.clock()

    async def take_nonce(connection: AsyncConnection) -> bytes | None:
        # Single use: the nonce is gone (committed) before the proof is even looked at.
        taken = await connection.execute(
            delete(box_challenges).where(
                box_challenges.c.nonce == nonce,
                box_challenges.c.box_id == box_id,
                box_challenges.c.expires_at > now,
            )
        )
        if taken.rowcount != 1:
            return None
        key = (await connection.execute(select(boxes.c.public_key).where(boxes.c.box_id == box_id))).scalar()
        return None if key is None else bytes(key)

    public_key = await context.database.transaction(take_nonce)
    if public_key is None:
        raise AuthenticationFailedError("unknown box or stale challenge")
    try:
        proofs.verify_possession(
            signed_proof,
            context=proofs.ProofContext.BOX_UPLINK,
            subject=box_id,
            nonce=nonce,
            public_key=Ed25519PublicKey.from_public_bytes(public_key),
        )
    except TokenError:
        raise AuthenticationFailedError("the proof does not verify with the box key") from None

    async def work(connection: AsyncConnection) -> AccessToken:
        principal = Principal(kind=PrincipalKind.BOX, subject=box_id, role=Role.BOX)
        return await issue_token(context, connection, principal)

    return await context.database.transaction(work)


# --- device keys -----------------------------------------------------------------------------------


def device_subject(principal: Principal) -> str:
    """What a phone signs when registering its key for this user or staff member."""
    return f"{principal.kind}:{principal.subject}"


async def register_device(
    context: ServerContext, principal: Principal, public_key: bytes, proof: bytes
) -> None:
    if principal.kind is PrincipalKind.BOX:
        raise ForbiddenError("boxes have no devices")
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        proofs.verify_possession(
            proof,
            context=proofs.ProofContext.DEVICE_REGISTRATION,
            subject=device_subject(principal),
            nonce=b"",
            public_key=key,
        )
    except ValueError:
        raise MalformedRequestError("not an Ed25519 public key") from None
    except TokenError as error:
        raise MalformedRequestError(f"proof of possession refused: {error.code.name}") from None

    async def work(connection: AsyncConnection) -> None:
        owner = (
            await connection.execute(
                select(devices.c.owner_kind, devices.c.owner_id).where(devices.c.public_key == public_key)
            )
        ).first()
        if owner is not None:
            if (owner.owner_kind, str(owner.owner_id)) != (principal.kind, principal.subject):
                raise ConflictError("this key is registered to someone else")
            return
        await connection.execute(
            devices.insert().values(
                public_key=public_key,
                owner_kind=principal.kind,
                owner_id=int(principal.subject),
                registered_at=context.clock(),
            )
        )

    await context.database.transaction(work)


async def list_devices(context: ServerContext, principal: Principal) -> list[tuple[bytes, int]]:
    async with context.database.connect() as connection:
        rows = await connection.execute(
            select(devices.c.public_key, devices.c.registered_at)
            .where(devices.c.owner_kind == principal.kind, devices.c.owner_id == int(principal.subject))
            .order_by(devices.c.registered_at)
        )
        return [(row.public_key, row.registered_at) for row in rows]


async def require_device(connection: AsyncConnection, principal: Principal, public_key: bytes) -> None:
    """The key must be a registered device of the caller (a grant bound to another's key is useless)."""
    row = (
        await connection.execute(
            select(devices.c.owner_kind, devices.c.owner_id).where(devices.c.public_key == public_key)
        )
    ).first()
    if row is None or (row.owner_kind, str(row.owner_id)) != (principal.kind, principal.subject):
        raise NotFoundError("no such registered device", code=ErrorCode.DEVICE_UNKNOWN)
