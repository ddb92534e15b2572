"""The phone's wallet: one SQLite file (aiosqlite) with everything the phone keeps (DESIGN §5).

- the device key (Ed25519, made on first use; grants and tokens are bound to it),
- trusted operator keys, the login and the server it belongs to,
- grants with what is left of them, reservations and unlock tokens,
- sessions this phone started and the receipts of their ends, verified with the box's key,
- the box directory (from certificates the phone verified at the box, and from `nearby`),
- the newest revocation list and tariff table, acks to hand to boxes,
- sealed ledger batches waiting to be carried to the server,
- the last statement fetched from the server.

Every change is one transaction, so a crash or a full disk never leaves half a change. Everything
signed is verified before it is stored, and stored as the exact bytes that were signed. SQLite's
errors become `WalletError` here and never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from phone_client.errors import PrerequisiteError, ReceiptRejectedError, TokenRejectedError, WalletError
from phone_client.server_api import Balances, SettledSession, Statement, StatementLine
from protocol import cose, gatt, messages, tariff, tokens
from protocol.errors import ErrorCode, TokenError
from protocol.tokens import (
    BalanceGrant,
    BoxCertificate,
    EndReason,
    EntryKind,
    LedgerAck,
    LedgerEntry,
    OutletSpec,
    Reservation,
    RevocationList,
    SessionReceipt,
    TariffTable,
    UnlockToken,
)

_Signed = TypeVar("_Signed", bound=tokens.SignedObject)

# "PBXW" in the SQLite header: tells a wallet from any other SQLite file.
APPLICATION_ID = 0x50425857
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE device_key (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    private_key BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE operator_keys (
    key_id BLOB PRIMARY KEY,
    public_key BLOB NOT NULL,
    source TEXT NOT NULL,
    added_at INTEGER NOT NULL
);
CREATE TABLE login (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    server_url TEXT NOT NULL,
    access_token TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    principal TEXT NOT NULL,
    subject TEXT NOT NULL,
    role TEXT NOT NULL,
    device_registered INTEGER NOT NULL
);
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE grants (
    grant_id BLOB PRIMARY KEY,
    signed BLOB NOT NULL,
    state TEXT NOT NULL,
    remaining_fen INTEGER NOT NULL,
    used_at_box TEXT,
    session_id BLOB,
    refused_code INTEGER,
    charged_fen INTEGER,
    added_at INTEGER NOT NULL
);
CREATE TABLE reservations (
    reservation_id BLOB PRIMARY KEY,
    signed BLOB NOT NULL,
    box_id TEXT NOT NULL,
    outlet INTEGER NOT NULL,
    not_before INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE unlock_tokens (
    token_id BLOB PRIMARY KEY,
    signed BLOB NOT NULL,
    box_id TEXT NOT NULL,
    door INTEGER NOT NULL,
    outlet INTEGER NOT NULL,
    not_before INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE boxes (
    box_id TEXT PRIMARY KEY,
    public_key BLOB,
    outlets TEXT NOT NULL,
    latitude_microdeg INTEGER NOT NULL,
    longitude_microdeg INTEGER NOT NULL,
    tariff_region TEXT,
    certificate_expires_at INTEGER,
    price_fen_per_kwh INTEGER,
    verified_at INTEGER,
    updated_at INTEGER NOT NULL
);
CREATE TABLE sessions (
    box_id TEXT NOT NULL,
    session_id BLOB NOT NULL,
    outlet INTEGER NOT NULL,
    state TEXT NOT NULL,
    start_time INTEGER NOT NULL,
    start_register_wh INTEGER NOT NULL,
    tariff_version INTEGER NOT NULL,
    price_fen_per_kwh INTEGER NOT NULL,
    balance_fen INTEGER NOT NULL,
    energy_wh INTEGER NOT NULL,
    cost_fen INTEGER NOT NULL,
    power_w INTEGER NOT NULL,
    voltage_dv INTEGER NOT NULL,
    current_ma INTEGER NOT NULL,
    reading_time INTEGER,
    end_time INTEGER,
    end_reason INTEGER,
    PRIMARY KEY (box_id, session_id)
);
CREATE TABLE session_grants (
    box_id TEXT NOT NULL,
    session_id BLOB NOT NULL,
    position INTEGER NOT NULL,
    grant_id BLOB NOT NULL,
    amount_fen INTEGER NOT NULL,
    PRIMARY KEY (box_id, session_id, position)
);
CREATE TABLE receipts (
    box_id TEXT NOT NULL,
    session_id BLOB NOT NULL,
    sequence INTEGER NOT NULL,
    signed BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (box_id, session_id)
);
CREATE TABLE updates (
    kind INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    issued_at INTEGER NOT NULL,
    signed BLOB NOT NULL
);
CREATE TABLE box_versions (
    box_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (box_id, kind)
);
CREATE TABLE acks (
    box_id TEXT PRIMARY KEY,
    sequence INTEGER NOT NULL,
    signed BLOB NOT NULL,
    issued_at INTEGER NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE carried_batches (
    batch_id INTEGER PRIMARY KEY AUTOINCREMENT,
    box_id TEXT NOT NULL,
    first_sequence INTEGER NOT NULL,
    last_sequence INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    collected_at INTEGER NOT NULL,
    uploaded_at INTEGER,
    UNIQUE (box_id, first_sequence, last_sequence)
);
CREATE TABLE statement_lines (
    position INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    amount_fen INTEGER NOT NULL,
    grant_id BLOB,
    box_id TEXT,
    session_id BLOB
);
CREATE TABLE settled_sessions (
    box_id TEXT NOT NULL,
    session_id BLOB NOT NULL,
    outlet INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    end_time INTEGER,
    energy_wh INTEGER,
    cost_fen INTEGER,
    end_reason TEXT,
    invoiced INTEGER NOT NULL,
    PRIMARY KEY (box_id, session_id)
);
"""

# settings
STATEMENT_META = "statement"


class GrantState(enum.Enum):
    AVAILABLE = "available"  # not yet offered to a box
    IN_SESSION = "in_session"  # paying a running session
    USED = "used"  # its session ended (or a box says it was spent there)
    REFUSED = "refused"  # a box refused it for good: expired, revoked, another phone's...
    SETTLED = "settled"  # the server charged it; the rest went back to the deposit
    RELEASED = "released"  # the server released it unused; all of it went back


# Refusals after which no box will take the grant; others (busy outlet, door open) may pass later.
_FINAL_REFUSALS = frozenset(
    {
        ErrorCode.GRANT_EXPIRED,
        ErrorCode.GRANT_REVOKED,
        ErrorCode.GRANT_WRONG_HOLDER,
        ErrorCode.PHONE_REVOKED,
        ErrorCode.USER_REVOKED,
        ErrorCode.GRANT_TOO_SMALL,
        ErrorCode.TOKEN_TOO_LARGE,
        ErrorCode.TOKEN_UNKNOWN_KEY,
        ErrorCode.TOKEN_BAD_SIGNATURE,
        ErrorCode.TOKEN_MALFORMED,
    }
)


class SessionState(enum.Enum):
    RUNNING = "running"
    ENDED = "ended"  # its receipt is here, verified
    ENDED_AWAY = "ended_away"  # ended while the phone was away: the receipt reaches the server by the ledger


@dataclass(frozen=True, slots=True, kw_only=True)
class WalletGrant:
    grant: BalanceGrant
    signed: bytes
    state: GrantState
    remaining_fen: int  # what is left: the amount less what its session cost so far
    used_at_box: str | None
    session_id: bytes | None
    refused_code: ErrorCode | None
    charged_fen: int | None  # the server's figure, once settled

    @property
    def grant_id(self) -> bytes:
        return self.grant.grant_id

    def expired(self, now: int) -> bool:
        return now >= self.grant.expires_at

    def good_at(self, box_id: str) -> bool:
        return self.grant.box_id is None or self.grant.box_id == box_id

    def status(self, now: int) -> str:
        """What a user reads: the state, or "expired" for an unused grant past its time."""
        if self.state is GrantState.AVAILABLE and self.expired(now):
            return "expired"
        return self.state.value


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionGrant:
    grant_id: bytes
    amount_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WalletSession:
    box_id: str
    session_id: bytes
    outlet: int
    state: SessionState
    start_time: int
    start_register_wh: int
    tariff_version: int
    price_fen_per_kwh: int
    balance_fen: int
    grants: tuple[SessionGrant, ...]
    energy_wh: int
    cost_fen: int
    power_w: int
    voltage_dv: int
    current_ma: int
    reading_time: int | None
    end_time: int | None
    end_reason: EndReason | None

    @property
    def remaining_fen(self) -> int:
        return self.balance_fen - self.cost_fen


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredReceipt:
    box_id: str
    sequence: int
    signed: bytes
    receipt: SessionReceipt
    received_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class KnownBox:
    """A box in the directory. `public_key` is known once this phone verified its certificate at
    the box (S2); a box seen only in a server listing has a position and outlets but no key."""

    box_id: str
    public_key: bytes | None
    outlets: tuple[OutletSpec, ...]
    latitude_microdeg: int
    longitude_microdeg: int
    tariff_region: str | None
    certificate_expires_at: int | None
    price_fen_per_kwh: int | None
    verified_at: int | None

    def label(self, outlet: int) -> gatt.QrLabel:
        """The QR label of one of its outlets, to come back without scanning again."""
        if self.public_key is None:
            raise PrerequisiteError(f"box {self.box_id} was never verified at the box: scan its label")
        return gatt.QrLabel(
            box_id=self.box_id, outlet=outlet, fingerprint=gatt.box_key_fingerprint(self.public_key)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredUpdate:
    kind: messages.UpdateKind
    version: int
    issued_at: int
    signed: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredAck:
    box_id: str
    sequence: int
    signed: bytes
    issued_at: int
    delivered: bool  # the box said it holds this ack or a newer one


@dataclass(frozen=True, slots=True, kw_only=True)
class CarriedBatch:
    batch_id: int
    box_id: str
    first_sequence: int
    last_sequence: int
    sealed: bytes
    collected_at: int
    uploaded_at: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredToken:
    """A reservation or an unlock token held for one box."""

    token_id: bytes
    signed: bytes
    box_id: str
    door: tokens.Door
    outlet: int
    not_before: int
    expires_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Login:
    server_url: str
    access_token: str
    expires_at: int
    principal: str
    subject: str
    role: str
    device_registered: bool

    def expired(self, now: int) -> bool:
        return now >= self.expires_at


@dataclass(frozen=True, slots=True, kw_only=True)
class StatementSnapshot:
    statement: Statement
    fetched_at: int


def default_wallet_path() -> Path:
    """The user's data directory: XDG on Linux, Application Support on macOS, APPDATA on Windows."""
    if os.name == "nt":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "powerbox" / "wallet.sqlite"


def _wall_clock() -> int:
    return int(time.time())


def _outlets_text(outlets: Iterable[OutletSpec]) -> str:
    return json.dumps([[o.number, o.rated_power_w] for o in outlets])


def _outlets_from_text(text: str) -> tuple[OutletSpec, ...]:
    try:
        pairs = json.loads(text)
        return tuple(OutletSpec(number=int(n), rated_power_w=int(w)) for n, w in pairs)
    except (ValueError, TypeError) as exc:
        raise WalletError(f"the box directory is damaged: {exc}") from None


class Wallet:
    """Open with `async with Wallet.open(path) as wallet`. Safe to share between tasks."""

    def __init__(self, db: aiosqlite.Connection, path: Path, clock: Callable[[], int]) -> None:
        self._db = db
        self.path = path
        self._clock = clock
        self._lock = asyncio.Lock()

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, *, clock: Callable[[], int] = _wall_clock) -> AsyncIterator[Wallet]:
        """Open the wallet at `path`, creating it (readable by this user only) if it does not exist."""
        _prepare_file(path)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise WalletError(f"cannot open the wallet {path}: {exc}") from None
        try:
            wallet = cls(db, path, clock)
            await wallet._initialise()
            yield wallet
        finally:
            with contextlib.suppress(sqlite3.Error, ValueError):  # already broken: nothing left to save
                await db.close()

    async def _initialise(self) -> None:
        try:
            await self._db.execute("PRAGMA busy_timeout = 10000")
            application_id = await self._scalar("PRAGMA application_id")
            version = await self._scalar("PRAGMA user_version")
            tables = await self._scalar("SELECT count(*) FROM sqlite_master")
        except sqlite3.DatabaseError as exc:
            raise WalletError(f"{self.path} is not a powerbox wallet ({exc})") from None
        if application_id == 0 and tables == 0:
            async with self._transaction() as db:
                # two commands opening a new wallet at once: only the first to get the lock creates it
                async with db.execute("SELECT count(*) FROM sqlite_master") as cursor:
                    row = await cursor.fetchone()
                if row is not None and row[0] == 0:
                    for statement in _statements(SCHEMA):
                        await db.execute(statement)
                    await db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            application_id = await self._scalar("PRAGMA application_id")
            version = await self._scalar("PRAGMA user_version")
        if application_id != APPLICATION_ID:
            raise WalletError(f"{self.path} is an SQLite file of another program, not a powerbox wallet")
        if version > SCHEMA_VERSION:
            raise WalletError(
                f"{self.path} was written by a newer powerbox (wallet version {version}); update powerbox"
            )
        try:
            await self._db.execute("PRAGMA journal_mode = WAL")
            await self._db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise WalletError(f"cannot use the wallet {self.path}: {exc}") from None

    async def _scalar(self, query: str, parameters: Sequence[object] = ()) -> Any:
        async with self._db.execute(query, parameters) as cursor:
            row = await cursor.fetchone()
        return None if row is None else row[0]

    # --- the two ways in: a read, or one transaction per change ------------------------------------

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One change, all or nothing; SQLite errors become WalletError."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise WalletError(f"cannot write the wallet {self.path}: {exc}") from None
            try:
                yield self._db
                await self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):  # gone already: nothing of it was kept
                    await self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise WalletError(f"cannot write the wallet {self.path}: {exc}") from None
                raise

    async def _rows(self, query: str, parameters: Sequence[object] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            try:
                async with self._db.execute(query, parameters) as cursor:
                    return list(await cursor.fetchall())
            except sqlite3.Error as exc:
                raise WalletError(f"cannot read the wallet {self.path}: {exc}") from None

    async def _row(self, query: str, parameters: Sequence[object] = ()) -> sqlite3.Row | None:
        rows = await self._rows(query, parameters)
        return rows[0] if rows else None

    def now(self) -> int:
        return self._clock()

    # --- device key ------------------------------------------------------------------------------

    async def device_key(self) -> Ed25519PrivateKey:
        """The phone's own key; generated the first time anyone asks."""
        row = await self._row("SELECT private_key FROM device_key")
        if row is None:
            fresh = Ed25519PrivateKey.generate().private_bytes(
                Encoding.Raw, PrivateFormat.Raw, NoEncryption()
            )
            async with self._transaction() as db:
                # another process may have made one meanwhile: the first one stays
                await db.execute(
                    "INSERT OR IGNORE INTO device_key (singleton, private_key, created_at) VALUES (1, ?, ?)",
                    (fresh, self.now()),
                )
            row = await self._row("SELECT private_key FROM device_key")
        assert row is not None
        raw = bytes(row[0])
        if len(raw) != 32:
            raise WalletError("the device key in the wallet is damaged")
        return Ed25519PrivateKey.from_private_bytes(raw)

    async def device_public_key(self) -> bytes:
        return cose.public_key_bytes((await self.device_key()).public_key())

    # --- operator keys, server, login --------------------------------------------------------------

    async def trust_operator_key(self, public_key: Ed25519PublicKey, *, source: str) -> bool:
        """Trust `public_key` for certificates, grants and updates; False if it was trusted already."""
        key_id = cose.key_id_for(public_key)
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT OR IGNORE INTO operator_keys (key_id, public_key, source, added_at) VALUES"
                " (?, ?, ?, ?)",
                (key_id, cose.public_key_bytes(public_key), source, self.now()),
            )
            return cursor.rowcount == 1

    async def operator_keys(self) -> dict[bytes, Ed25519PublicKey]:
        keys = {}
        for key_id, raw in await self._rows("SELECT key_id, public_key FROM operator_keys"):
            try:
                keys[bytes(key_id)] = Ed25519PublicKey.from_public_bytes(bytes(raw))
            except ValueError:
                raise WalletError("an operator key in the wallet is damaged") from None
        return keys

    async def require_operator_keys(self) -> dict[bytes, Ed25519PublicKey]:
        keys = await self.operator_keys()
        if not keys:
            raise PrerequisiteError(
                "no operator key is trusted yet: `powerbox phone trust KEY`, or sync with a server once",
                code=ErrorCode.TOKEN_UNKNOWN_KEY,
            )
        return keys

    async def server_url(self) -> str | None:
        row = await self._row("SELECT value FROM settings WHERE name = 'server_url'")
        return None if row is None else str(row[0])

    async def set_server_url(self, url: str | None) -> None:
        async with self._transaction() as db:
            if url is None:
                await db.execute("DELETE FROM settings WHERE name = 'server_url'")
            else:
                await db.execute(
                    "INSERT INTO settings (name, value) VALUES ('server_url', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (url,),
                )

    async def save_login(self, login: Login) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM login")
            await db.execute(
                "INSERT INTO login (singleton, server_url, access_token, expires_at, principal,"
                " subject, role,"
                " device_registered) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (
                    login.server_url,
                    login.access_token,
                    login.expires_at,
                    login.principal,
                    login.subject,
                    login.role,
                    int(login.device_registered),
                ),
            )

    async def login(self) -> Login | None:
        row = await self._row(
            "SELECT server_url, access_token, expires_at, principal, subject, role,"
            " device_registered FROM login"
        )
        if row is None:
            return None
        return Login(
            server_url=row[0],
            access_token=row[1],
            expires_at=row[2],
            principal=row[3],
            subject=row[4],
            role=row[5],
            device_registered=bool(row[6]),
        )

    async def mark_device_registered(self) -> None:
        async with self._transaction() as db:
            await db.execute("UPDATE login SET device_registered = 1")

    async def forget_login(self) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM login")

    # --- grants ----------------------------------------------------------------------------------

    async def add_grant(self, signed: bytes) -> WalletGrant:
        """Keep a grant: it must be operator-signed and bound to this phone's key. Adding it
        again changes nothing."""
        grant = self._verify(BalanceGrant, signed, await self.require_operator_keys())
        if cose.public_key_bytes(grant.phone_key) != await self.device_public_key():
            raise TokenRejectedError(
                "this grant is bound to another phone's key", code=ErrorCode.GRANT_WRONG_HOLDER
            )
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO grants (grant_id, signed, state, remaining_fen, added_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (grant.grant_id, signed, GrantState.AVAILABLE.value, grant.amount_fen, self.now()),
            )
        stored = await self.grant(grant.grant_id)
        assert stored is not None
        return stored

    @staticmethod
    def _verify(kind: type[_Signed], signed: bytes, keys: Mapping[bytes, Ed25519PublicKey]) -> _Signed:
        try:
            return kind.verify(signed, keys)
        except TokenError as exc:
            raise TokenRejectedError(f"not a valid {kind.__name__}: {exc.detail}", code=exc.code) from None

    _GRANT_COLUMNS = "signed, state, remaining_fen, used_at_box, session_id, refused_code, charged_fen"

    def _grant_from_row(self, row: Sequence[Any]) -> WalletGrant:
        signed, state, remaining, box, session, refused, charged = row
        try:
            grant = BalanceGrant.decode_unverified(bytes(signed))
            return WalletGrant(
                grant=grant,
                signed=bytes(signed),
                state=GrantState(state),
                remaining_fen=int(remaining),
                used_at_box=box,
                session_id=None if session is None else bytes(session),
                refused_code=None if refused is None else ErrorCode(refused),
                charged_fen=charged,
            )
        except (TokenError, ValueError) as exc:
            raise WalletError(f"a grant in the wallet is damaged: {exc}") from None

    async def grant(self, grant_id: bytes) -> WalletGrant | None:
        row = await self._row(f"SELECT {self._GRANT_COLUMNS} FROM grants WHERE grant_id = ?", (grant_id,))  # noqa: S608
        return None if row is None else self._grant_from_row(row)

    async def grants(self) -> list[WalletGrant]:
        rows = await self._rows(f"SELECT {self._GRANT_COLUMNS} FROM grants ORDER BY added_at, grant_id")  # noqa: S608
        return [self._grant_from_row(row) for row in rows]

    async def find_grant(self, prefix: str) -> WalletGrant:
        """A grant by (the start of) its hex id, as a user types it."""
        wanted = prefix.strip().lower()
        matches = [g for g in await self.grants() if g.grant_id.hex().startswith(wanted)] if wanted else []
        if len(matches) != 1:
            raise PrerequisiteError(
                f"no grant {prefix!r} in the wallet" if not matches else f"{prefix!r} names several grants"
            )
        return matches[0]

    async def usable_grants(self, *, box_id: str, now: int | None = None) -> list[WalletGrant]:
        """Grants a box will most likely take now: unused, unexpired, for this box or any box, not
        on the newest revocation list this phone holds, and at least the price this phone expects
        there. Box-specific grants first (they are good nowhere else), then the soonest to expire."""
        now = self.now() if now is None else now
        revoked = await self._revocations()
        device_key = await self.device_public_key()
        price = await self.expected_price(box_id)
        usable = []
        for grant in await self.grants():
            details = grant.grant
            if grant.state is not GrantState.AVAILABLE or grant.expired(now) or not grant.good_at(box_id):
                continue
            if revoked is not None and (
                details.grant_id in revoked.grant_ids
                or device_key in revoked.phone_keys
                or details.user_id in revoked.user_ids
            ):
                continue
            if price is not None and details.max_price_fen_per_kwh < price:
                continue
            usable.append(grant)
        usable.sort(key=lambda g: (g.grant.box_id is None, g.grant.expires_at, g.grant_id))
        return usable

    async def choose_grant(self, *, box_id: str, grant_prefix: str | None = None) -> WalletGrant:
        """The grant to spend at `box_id`: the one named, or the best usable one."""
        if grant_prefix is not None:
            # a named grant goes to the box even if this phone thinks it is stale: the box decides
            # (its clock and revocation list are the ones that count) and says why; but one this
            # phone already spent stays here, since another box could not know (S7: arrears)
            named = await self.find_grant(grant_prefix)
            if named.state in (GrantState.USED, GrantState.IN_SESSION):
                where = f" at {named.used_at_box}" if named.used_at_box else ""
                raise PrerequisiteError(
                    f"grant {named.grant_id.hex()[:8]} was already used{where}: a grant pays for one session;"
                    " spending it again would be charged as arrears",
                    code=ErrorCode.GRANT_SPENT,
                )
            return named
        usable = await self.usable_grants(box_id=box_id)
        if usable:
            return usable[0]
        held = [g for g in await self.grants() if g.state is GrantState.AVAILABLE and g.good_at(box_id)]
        now = self.now()
        if held and all(g.expired(now) for g in held):
            raise PrerequisiteError(
                f"every grant for {box_id} in the wallet has expired: request a new one",
                code=ErrorCode.GRANT_EXPIRED,
            )
        if held:
            raise PrerequisiteError(
                f"no grant in the wallet is usable at {box_id} now (revoked, or the price there is above "
                "their limit): request a new one, or name one with --grant",
                code=ErrorCode.GRANT_PRICE_ABOVE_LIMIT,
            )
        raise PrerequisiteError(
            f"no grant for {box_id} in the wallet: `powerbox phone grant request` online, or "
            "`powerbox phone grant import`"
        )

    async def mark_grant_refused(self, grant_id: bytes, code: ErrorCode, *, box_id: str) -> None:
        """A box refused this grant. Final refusals retire it; GRANT_SPENT means a box already has it."""
        async with self._transaction() as db:
            if code is ErrorCode.GRANT_SPENT:
                await db.execute(
                    "UPDATE grants SET state = ?, used_at_box = coalesce(used_at_box, ?), refused_code = ?"
                    " WHERE grant_id = ? AND state = ?",
                    (GrantState.USED.value, box_id, int(code), grant_id, GrantState.AVAILABLE.value),
                )
            elif code in _FINAL_REFUSALS:
                await db.execute(
                    "UPDATE grants SET state = ?, refused_code = ? WHERE grant_id = ? AND state = ?",
                    (GrantState.REFUSED.value, int(code), grant_id, GrantState.AVAILABLE.value),
                )
            else:
                await db.execute(
                    "UPDATE grants SET refused_code = ? WHERE grant_id = ?", (int(code), grant_id)
                )

    async def apply_server_grant(
        self, *, grant_id: bytes, signed: bytes, state: str, charged_fen: int
    ) -> bool:
        """Bring a grant in line with the server (settled, released), adding it if this phone's key
        holds it and the wallet lacks it. False if the grant belongs to another of the user's phones."""
        existing = await self.grant(grant_id)
        if existing is None:
            try:
                existing = await self.add_grant(signed)
            except TokenRejectedError:
                return False
        if state == "settled":
            new_state, remaining = GrantState.SETTLED, existing.grant.amount_fen - charged_fen
        elif state == "released":
            new_state, remaining = GrantState.RELEASED, 0
        else:
            return True
        async with self._transaction() as db:
            await db.execute(
                "UPDATE grants SET state = ?, charged_fen = ?, remaining_fen = ? WHERE grant_id = ?",
                (new_state.value, charged_fen, max(0, remaining), grant_id),
            )
        return True

    # --- sessions --------------------------------------------------------------------------------

    async def record_session_started(
        self, *, box_id: str, started: messages.SessionStarted, grant: WalletGrant
    ) -> WalletSession:
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO sessions (box_id, session_id, outlet, state, start_time,"
                " start_register_wh, tariff_version, price_fen_per_kwh, balance_fen, energy_wh, cost_fen,"
                " power_w, voltage_dv, current_ma) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 0, 0)",
                (
                    box_id,
                    started.session_id,
                    started.outlet,
                    SessionState.RUNNING.value,
                    started.start_time,
                    started.start_register_wh,
                    started.tariff_version,
                    started.price_fen_per_kwh,
                    started.balance_fen,
                ),
            )
            await db.execute(
                "INSERT OR REPLACE INTO session_grants (box_id, session_id, position, grant_id, amount_fen)"
                " VALUES (?, ?, 0, ?, ?)",
                (box_id, started.session_id, grant.grant_id, grant.grant.amount_fen),
            )
            await self._use_grant(db, grant.grant_id, box_id, started.session_id)
        return await self._require_session(box_id, started.session_id)

    async def _use_grant(
        self, db: aiosqlite.Connection, grant_id: bytes, box_id: str, session_id: bytes
    ) -> None:
        await db.execute(
            "UPDATE grants SET state = ?, used_at_box = ?, session_id = ?, refused_code = NULL WHERE"
            " grant_id = ?",
            (GrantState.IN_SESSION.value, box_id, session_id, grant_id),
        )

    async def record_top_up(
        self, *, box_id: str, session_id: bytes, grant: WalletGrant, balance_fen: int
    ) -> WalletSession:
        session = await self._require_session(box_id, session_id)
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO session_grants (box_id, session_id, position, grant_id, amount_fen)"
                " VALUES (?, ?, ?, ?, ?)",
                (box_id, session_id, len(session.grants), grant.grant_id, grant.grant.amount_fen),
            )
            await db.execute(
                "UPDATE sessions SET balance_fen = ? WHERE box_id = ? AND session_id = ?",
                (balance_fen, box_id, session_id),
            )
            await self._use_grant(db, grant.grant_id, box_id, session_id)
        return await self._require_session(box_id, session_id)

    async def record_reading(self, *, box_id: str, reading: messages.MeterReading) -> WalletSession | None:
        """A live reading of one of this phone's sessions; None for a session the wallet does not know."""
        session = await self.session(box_id, reading.session_id)
        if session is None:
            return None
        async with self._transaction() as db:
            await db.execute(
                "UPDATE sessions SET energy_wh = ?, cost_fen = ?, power_w = ?, voltage_dv = ?,"
                " current_ma = ?,"
                " reading_time = ?, balance_fen = ? WHERE box_id = ? AND session_id = ?",
                (
                    reading.energy_wh,
                    reading.cost_fen,
                    reading.power_w,
                    reading.voltage_dv,
                    reading.current_ma,
                    reading.time,
                    reading.cost_fen + reading.remaining_fen,
                    box_id,
                    reading.session_id,
                ),
            )
            await self._charge_grants(db, session.grants, reading.cost_fen)
        return await self.session(box_id, reading.session_id)

    async def _charge_grants(
        self, db: aiosqlite.Connection, grants: Sequence[SessionGrant], cost_fen: int
    ) -> None:
        """What is left of each grant of a session: its cost charged in the order they were used
        (docs/protocol.md §10, the rule settlement follows)."""
        charges = tariff.allocate_cost_fen(cost_fen, [g.amount_fen for g in grants])
        for grant, charge in zip(grants, charges, strict=True):
            await db.execute(
                "UPDATE grants SET remaining_fen = ? WHERE grant_id = ? AND state IN (?, ?)",
                (
                    grant.amount_fen - charge,
                    grant.grant_id,
                    GrantState.IN_SESSION.value,
                    GrantState.USED.value,
                ),
            )

    async def _end_session(
        self,
        db: aiosqlite.Connection,
        session: WalletSession,
        *,
        state: SessionState,
        energy_wh: int,
        cost_fen: int,
        end_time: int | None,
        end_reason: EndReason | None,
    ) -> None:
        await db.execute(
            "UPDATE sessions SET state = ?, energy_wh = ?, cost_fen = ?, power_w = 0, end_time = ?,"
            " end_reason = ? WHERE box_id = ? AND session_id = ?",
            (
                state.value,
                energy_wh,
                cost_fen,
                end_time,
                None if end_reason is None else int(end_reason),
                session.box_id,
                session.session_id,
            ),
        )
        for grant in session.grants:
            await db.execute(
                "UPDATE grants SET state = ? WHERE grant_id = ? AND state = ?",
                (GrantState.USED.value, grant.grant_id, GrantState.IN_SESSION.value),
            )
        await self._charge_grants(db, session.grants, cost_fen)

    async def record_session_list(self, *, box_id: str, sessions: Sequence[messages.SessionSummary]) -> None:
        """What the box says about this phone's sessions after coming back: running ones get fresh
        figures, and one that ended while the phone was away is closed (its receipt is in the
        box's ledger, which reaches the server)."""
        for summary in sessions:
            known = await self.session(box_id, summary.session_id)
            async with self._transaction() as db:
                if known is None:
                    await db.execute(
                        "INSERT INTO sessions (box_id, session_id, outlet, state, start_time,"
                        " start_register_wh,"
                        " tariff_version, price_fen_per_kwh, balance_fen, energy_wh, cost_fen, power_w,"
                        " voltage_dv, current_ma) VALUES (?, ?, ?, ?, ?, 0, 0, 0, ?, ?, ?, 0, 0, 0)",
                        (
                            box_id,
                            summary.session_id,
                            summary.outlet,
                            (SessionState.RUNNING if summary.running else SessionState.ENDED_AWAY).value,
                            summary.start_time,
                            summary.cost_fen + summary.remaining_fen,
                            summary.energy_wh,
                            summary.cost_fen,
                        ),
                    )
                elif known.state is SessionState.RUNNING and not summary.running:
                    await self._end_session(
                        db,
                        known,
                        state=SessionState.ENDED_AWAY,
                        energy_wh=summary.energy_wh,
                        cost_fen=summary.cost_fen,
                        end_time=None,
                        end_reason=None,
                    )
                elif known.state is SessionState.RUNNING:
                    await db.execute(
                        "UPDATE sessions SET energy_wh = ?, cost_fen = ?, balance_fen = ?"
                        " WHERE box_id = ? AND session_id = ?",
                        (
                            summary.energy_wh,
                            summary.cost_fen,
                            summary.cost_fen + summary.remaining_fen,
                            box_id,
                            summary.session_id,
                        ),
                    )
                    await self._charge_grants(db, known.grants, summary.cost_fen)

    _SESSION_COLUMNS = (
        "box_id, session_id, outlet, state, start_time, start_register_wh, tariff_version, price_fen_per_kwh,"
        " balance_fen, energy_wh, cost_fen, power_w, voltage_dv, current_ma, reading_time, end_time,"
        " end_reason"
    )

    async def _session_from_row(self, row: Sequence[Any]) -> WalletSession:
        grants = await self._rows(
            "SELECT grant_id, amount_fen FROM session_grants WHERE box_id = ? AND session_id = ?"
            " ORDER BY position",
            (row[0], row[1]),
        )
        try:
            return WalletSession(
                box_id=row[0],
                session_id=bytes(row[1]),
                outlet=row[2],
                state=SessionState(row[3]),
                start_time=row[4],
                start_register_wh=row[5],
                tariff_version=row[6],
                price_fen_per_kwh=row[7],
                balance_fen=row[8],
                energy_wh=row[9],
                cost_fen=row[10],
                power_w=row[11],
                voltage_dv=row[12],
                current_ma=row[13],
                reading_time=row[14],
                end_time=row[15],
                end_reason=None if row[16] is None else EndReason(row[16]),
                grants=tuple(SessionGrant(grant_id=bytes(g), amount_fen=a) for g, a in grants),
            )
        except ValueError as exc:
            raise WalletError(f"a session in the wallet is damaged: {exc}") from None

    async def session(self, box_id: str, session_id: bytes) -> WalletSession | None:
        row = await self._row(
            f"SELECT {self._SESSION_COLUMNS} FROM sessions WHERE box_id = ? AND session_id = ?",  # noqa: S608
            (box_id, session_id),
        )
        return None if row is None else await self._session_from_row(row)

    async def _require_session(self, box_id: str, session_id: bytes) -> WalletSession:
        session = await self.session(box_id, session_id)
        if session is None:
            raise PrerequisiteError(
                f"no session {session_id.hex()} at {box_id} in the wallet", code=ErrorCode.SESSION_UNKNOWN
            )
        return session

    async def sessions(self, *, running_only: bool = False) -> list[WalletSession]:
        where = " WHERE state = 'running'" if running_only else ""
        rows = await self._rows(f"SELECT {self._SESSION_COLUMNS} FROM sessions{where} ORDER BY start_time")  # noqa: S608
        return [await self._session_from_row(row) for row in rows]

    async def find_session(
        self, *, session_prefix: str | None = None, box_id: str | None = None, running: bool = True
    ) -> WalletSession:
        """The session a user means: named by (the start of) its id, or the only running one (at a box)."""
        candidates = await self.sessions(running_only=running)
        if box_id is not None:
            candidates = [s for s in candidates if s.box_id == box_id]
        if session_prefix is not None:
            wanted = session_prefix.strip().lower()
            candidates = [s for s in await self.sessions() if s.session_id.hex().startswith(wanted)]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise PrerequisiteError(
                "no running session in the wallet"
                if session_prefix is None
                else f"no session {session_prefix!r}",
                code=ErrorCode.SESSION_UNKNOWN,
            )
        raise PrerequisiteError(
            "several sessions are running: name one with --session "
            + ", ".join(s.session_id.hex()[:8] for s in candidates),
            code=ErrorCode.SESSION_UNKNOWN,
        )

    # --- receipts --------------------------------------------------------------------------------

    async def store_receipt(self, *, box_id: str, session_id: bytes, signed: bytes) -> StoredReceipt:
        """Verify a receipt with the box's key from its certificate (docs/protocol.md §8.1), keep it,
        end the session and work out what is left of its grants."""
        box = await self.box(box_id)
        if box is None or box.public_key is None:
            raise ReceiptRejectedError(
                f"no verified certificate of {box_id} to check the receipt with",
                code=ErrorCode.TOKEN_UNKNOWN_KEY,
            )
        entry = verify_receipt(
            signed,
            box_public_key=Ed25519PublicKey.from_public_bytes(box.public_key),
            box_id=box_id,
            session_id=session_id,
        )
        receipt = entry.body
        assert isinstance(receipt, SessionReceipt)
        session = await self.session(box_id, session_id)
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO receipts (box_id, session_id, sequence, signed, received_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (box_id, session_id, entry.sequence, signed, self.now()),
            )
            if session is None:
                await db.execute(
                    "INSERT INTO sessions (box_id, session_id, outlet, state, start_time, start_register_wh,"
                    " tariff_version, price_fen_per_kwh, balance_fen, energy_wh, cost_fen, power_w,"
                    " voltage_dv,"
                    " current_ma, end_time, end_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0,"
                    " 0, 0, ?, ?)",
                    (
                        box_id,
                        session_id,
                        receipt.outlet,
                        SessionState.ENDED.value,
                        receipt.start_time,
                        receipt.start_register_wh,
                        receipt.tariff_version,
                        receipt.price_fen_per_kwh,
                        receipt.cost_fen,
                        receipt.energy_wh,
                        receipt.cost_fen,
                        receipt.end_time,
                        int(receipt.end_reason),
                    ),
                )
            else:
                await self._end_session(
                    db,
                    session,
                    state=SessionState.ENDED,
                    energy_wh=receipt.energy_wh,
                    cost_fen=receipt.cost_fen,
                    end_time=receipt.end_time,
                    end_reason=receipt.end_reason,
                )
        stored = await self.receipt(box_id, session_id)
        assert stored is not None
        return stored

    def _receipt_from_row(self, row: Sequence[Any]) -> StoredReceipt:
        box_id, sequence, signed, received_at = row
        try:
            entry = LedgerEntry.decode_unverified(bytes(signed))
        except TokenError as exc:
            raise WalletError(f"a receipt in the wallet is damaged: {exc.detail}") from None
        assert isinstance(entry.body, SessionReceipt)
        return StoredReceipt(
            box_id=box_id,
            sequence=sequence,
            signed=bytes(signed),
            receipt=entry.body,
            received_at=received_at,
        )

    async def receipt(self, box_id: str, session_id: bytes) -> StoredReceipt | None:
        row = await self._row(
            "SELECT box_id, sequence, signed, received_at FROM receipts WHERE box_id = ? AND session_id = ?",
            (box_id, session_id),
        )
        return None if row is None else self._receipt_from_row(row)

    async def receipts(self) -> list[StoredReceipt]:
        rows = await self._rows(
            "SELECT box_id, sequence, signed, received_at FROM receipts ORDER BY received_at"
        )
        return [self._receipt_from_row(row) for row in rows]

    # --- box directory ---------------------------------------------------------------------------

    async def remember_verified_box(self, certificate: BoxCertificate) -> None:
        """A certificate this phone checked at the box (S2): its key, outlets and position."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO boxes (box_id, public_key, outlets, latitude_microdeg, longitude_microdeg,"
                " tariff_region, certificate_expires_at, verified_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (box_id) DO UPDATE SET"
                " public_key = excluded.public_key, outlets = excluded.outlets,"
                " latitude_microdeg = excluded.latitude_microdeg, longitude_microdeg ="
                " excluded.longitude_microdeg,"
                " tariff_region = excluded.tariff_region, certificate_expires_at ="
                " excluded.certificate_expires_at,"
                " verified_at = excluded.verified_at, updated_at = excluded.updated_at",
                (
                    certificate.box_id,
                    cose.public_key_bytes(certificate.box_public_key),
                    _outlets_text(certificate.outlets),
                    certificate.latitude_microdeg,
                    certificate.longitude_microdeg,
                    certificate.tariff_region,
                    certificate.expires_at,
                    self.now(),
                    self.now(),
                ),
            )

    async def remember_listed_box(
        self,
        *,
        box_id: str,
        outlets: Sequence[OutletSpec],
        latitude_microdeg: int,
        longitude_microdeg: int,
        price_fen_per_kwh: int | None,
    ) -> None:
        """A box from the server's listing: position, outlets, price; never its key."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO boxes (box_id, outlets, latitude_microdeg, longitude_microdeg,"
                " price_fen_per_kwh,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (box_id) DO UPDATE SET"
                " latitude_microdeg = excluded.latitude_microdeg, longitude_microdeg ="
                " excluded.longitude_microdeg,"
                " price_fen_per_kwh = excluded.price_fen_per_kwh, updated_at = excluded.updated_at",
                (
                    box_id,
                    _outlets_text(outlets),
                    latitude_microdeg,
                    longitude_microdeg,
                    price_fen_per_kwh,
                    self.now(),
                ),
            )

    _BOX_COLUMNS = (
        "box_id, public_key, outlets, latitude_microdeg, longitude_microdeg, tariff_region,"
        " certificate_expires_at, price_fen_per_kwh, verified_at"
    )

    def _box_from_row(self, row: Sequence[Any]) -> KnownBox:
        return KnownBox(
            box_id=row[0],
            public_key=None if row[1] is None else bytes(row[1]),
            outlets=_outlets_from_text(row[2]),
            latitude_microdeg=row[3],
            longitude_microdeg=row[4],
            tariff_region=row[5],
            certificate_expires_at=row[6],
            price_fen_per_kwh=row[7],
            verified_at=row[8],
        )

    async def box(self, box_id: str) -> KnownBox | None:
        row = await self._row(f"SELECT {self._BOX_COLUMNS} FROM boxes WHERE box_id = ?", (box_id,))  # noqa: S608
        return None if row is None else self._box_from_row(row)

    async def boxes(self) -> list[KnownBox]:
        return [
            self._box_from_row(row)
            for row in await self._rows(f"SELECT {self._BOX_COLUMNS} FROM boxes ORDER BY box_id")  # noqa: S608
        ]

    async def expected_price(self, box_id: str) -> int | None:
        """The price this phone expects at a box: from the newest tariff table it holds and the box's
        tariff region, else the server's listing; None when it cannot tell."""
        box = await self.box(box_id)
        table = await self.update(messages.UpdateKind.TARIFF_TABLE)
        if table is not None and box is not None and box.tariff_region is not None:
            return TariffTable.decode_unverified(table.signed).price_for(box_id, box.tariff_region)
        return None if box is None else box.price_fen_per_kwh

    # --- revocation lists, tariff tables, acks ------------------------------------------------------

    async def offer_update(self, signed: bytes) -> StoredUpdate | None:
        """Keep a revocation list or tariff table if it is operator-signed and newer than the one
        held; the stored update, or None if it was not newer."""
        keys = await self.require_operator_keys()
        update: RevocationList | TariffTable
        try:
            update = RevocationList.verify(signed, keys)
            kind = messages.UpdateKind.REVOCATION_LIST
        except TokenError as exc:
            if exc.code is not ErrorCode.TOKEN_WRONG_TYPE:
                raise TokenRejectedError(f"not a valid update: {exc.detail}", code=exc.code) from None
            update = self._verify(TariffTable, signed, keys)
            kind = messages.UpdateKind.TARIFF_TABLE
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT INTO updates (kind, version, issued_at, signed) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (kind) DO UPDATE SET version = excluded.version, issued_at ="
                " excluded.issued_at,"
                " signed = excluded.signed WHERE excluded.version > updates.version",
                (int(kind), update.version, update.issued_at, signed),
            )
            kept = cursor.rowcount == 1
        return await self.update(kind) if kept else None

    async def update(self, kind: messages.UpdateKind) -> StoredUpdate | None:
        row = await self._row("SELECT version, issued_at, signed FROM updates WHERE kind = ?", (int(kind),))
        if row is None:
            return None
        return StoredUpdate(kind=kind, version=row[0], issued_at=row[1], signed=bytes(row[2]))

    async def _revocations(self) -> RevocationList | None:
        stored = await self.update(messages.UpdateKind.REVOCATION_LIST)
        return None if stored is None else RevocationList.decode_unverified(stored.signed)

    async def record_box_version(self, box_id: str, kind: messages.UpdateKind, version: int) -> None:
        """What a box said it holds (UpdateAccepted), so the phone knows what it delivered."""
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO box_versions (box_id, kind, version) VALUES (?, ?, ?) ON CONFLICT (box_id, kind)"
                " DO UPDATE SET version = max(version, excluded.version)",
                (box_id, int(kind), version),
            )

    async def box_version(self, box_id: str, kind: messages.UpdateKind) -> int | None:
        row = await self._row(
            "SELECT version FROM box_versions WHERE box_id = ? AND kind = ?", (box_id, int(kind))
        )
        return None if row is None else int(row[0])

    async def offer_ack(self, signed: bytes) -> StoredAck | None:
        """Keep an operator-signed ledger ack for its box if it covers more than the one held."""
        ack = self._verify(LedgerAck, signed, await self.require_operator_keys())
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT INTO acks (box_id, sequence, signed, issued_at, received_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (box_id) DO UPDATE SET sequence = excluded.sequence, signed = excluded.signed,"
                " issued_at = excluded.issued_at, received_at = excluded.received_at"
                " WHERE excluded.sequence > acks.sequence",
                (ack.box_id, ack.sequence, signed, ack.issued_at, self.now()),
            )
            kept = cursor.rowcount == 1
        return await self.ack_for(ack.box_id) if kept else None

    async def ack_for(self, box_id: str) -> StoredAck | None:
        row = await self._row(
            "SELECT box_id, sequence, signed, issued_at FROM acks WHERE box_id = ?", (box_id,)
        )
        if row is None:
            return None
        delivered = await self.box_version(box_id, messages.UpdateKind.LEDGER_ACK)
        return StoredAck(
            box_id=row[0],
            sequence=row[1],
            signed=bytes(row[2]),
            issued_at=row[3],
            delivered=delivered is not None and delivered >= row[1],
        )

    async def acks(self) -> list[StoredAck]:
        acks = []
        for (box_id,) in await self._rows("SELECT box_id FROM acks ORDER BY box_id"):
            ack = await self.ack_for(box_id)
            if ack is not None:
                acks.append(ack)
        return acks

    # --- ledger batches carried for the operator --------------------------------------------------

    async def add_batch(self, batch: messages.LedgerEntries) -> CarriedBatch | None:
        """Keep a sealed batch a box handed over (the phone cannot read it, S9). None when there was
        nothing to carry or this range is carried already."""
        if not batch.sealed_batch:
            return None
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT OR IGNORE INTO carried_batches (box_id, first_sequence, last_sequence,"
                " sealed, collected_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (batch.box_id, batch.first_sequence, batch.last_sequence, batch.sealed_batch, self.now()),
            )
            if cursor.rowcount != 1:
                return None
            batch_id = cursor.lastrowid
            # a batch not yet handed in that this one covers adds nothing: drop it
            await db.execute(
                "DELETE FROM carried_batches WHERE box_id = ? AND uploaded_at IS NULL AND batch_id != ?"
                " AND first_sequence >= ? AND last_sequence <= ?",
                (batch.box_id, batch_id, batch.first_sequence, batch.last_sequence),
            )
        return CarriedBatch(
            batch_id=int(batch_id or 0),
            box_id=batch.box_id,
            first_sequence=batch.first_sequence,
            last_sequence=batch.last_sequence,
            sealed=batch.sealed_batch,
            collected_at=self.now(),
            uploaded_at=None,
        )

    async def batches(self, *, pending_only: bool = False) -> list[CarriedBatch]:
        rows = await self._rows(
            "SELECT batch_id, box_id, first_sequence, last_sequence, sealed, collected_at, uploaded_at"
            " FROM carried_batches WHERE ? = 0 OR uploaded_at IS NULL ORDER BY batch_id",
            (int(pending_only),),
        )
        return [
            CarriedBatch(
                batch_id=row[0],
                box_id=row[1],
                first_sequence=row[2],
                last_sequence=row[3],
                sealed=bytes(row[4]),
                collected_at=row[5],
                uploaded_at=row[6],
            )
            for row in rows
        ]

    async def mark_batch_uploaded(self, batch_id: int) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE carried_batches SET uploaded_at = ? WHERE batch_id = ?", (self.now(), batch_id)
            )

    # --- reservations and unlock tokens -------------------------------------------------------------

    async def add_reservation(self, signed: bytes) -> StoredToken:
        reservation = self._verify(Reservation, signed, await self.require_operator_keys())
        if cose.public_key_bytes(reservation.phone_key) != await self.device_public_key():
            raise TokenRejectedError(
                "this reservation is for another phone", code=ErrorCode.GRANT_WRONG_HOLDER
            )
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO reservations (reservation_id, signed, box_id, outlet,"
                " not_before, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    reservation.reservation_id,
                    signed,
                    reservation.box_id,
                    reservation.outlet,
                    reservation.not_before,
                    reservation.expires_at,
                ),
            )
        return StoredToken(
            token_id=reservation.reservation_id,
            signed=signed,
            box_id=reservation.box_id,
            door=tokens.Door.OUTLET,
            outlet=reservation.outlet,
            not_before=reservation.not_before,
            expires_at=reservation.expires_at,
        )

    async def reservation_for(self, box_id: str, outlet: int, now: int | None = None) -> bytes | None:
        """A reservation of this outlet valid now, to send with the start request."""
        now = self.now() if now is None else now
        row = await self._row(
            "SELECT signed FROM reservations WHERE box_id = ? AND outlet = ? AND not_before <= ? AND"
            " expires_at > ?"
            " ORDER BY expires_at DESC",
            (box_id, outlet, now, now),
        )
        return None if row is None else bytes(row[0])

    async def add_unlock_token(self, signed: bytes) -> StoredToken:
        token = self._verify(UnlockToken, signed, await self.require_operator_keys())
        if cose.public_key_bytes(token.holder_key) != await self.device_public_key():
            raise TokenRejectedError(
                "this unlock token is for another phone", code=ErrorCode.GRANT_WRONG_HOLDER
            )
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO unlock_tokens (token_id, signed, box_id, door, outlet,"
                " not_before, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    token.token_id,
                    signed,
                    token.box_id,
                    int(token.door),
                    token.outlet,
                    token.not_before,
                    token.expires_at,
                ),
            )
        return StoredToken(
            token_id=token.token_id,
            signed=signed,
            box_id=token.box_id,
            door=token.door,
            outlet=token.outlet,
            not_before=token.not_before,
            expires_at=token.expires_at,
        )

    async def unlock_tokens(self, box_id: str | None = None) -> list[StoredToken]:
        rows = await self._rows(
            "SELECT token_id, signed, box_id, door, outlet, not_before, expires_at FROM unlock_tokens"
            " WHERE ? IS NULL OR box_id = ? ORDER BY expires_at",
            (box_id, box_id),
        )
        return [
            StoredToken(
                token_id=bytes(row[0]),
                signed=bytes(row[1]),
                box_id=row[2],
                door=tokens.Door(row[3]),
                outlet=row[4],
                not_before=row[5],
                expires_at=row[6],
            )
            for row in rows
        ]

    # --- the statement -----------------------------------------------------------------------------

    async def save_statement(self, statement: Statement) -> None:
        """Replace the statement kept from the server (balances, money lines, settled sessions)."""
        meta = json.dumps(
            {
                "user_id": statement.user_id,
                "from_time": statement.from_time,
                "to_time": statement.to_time,
                "available_fen": statement.balances.available_fen,
                "frozen_fen": statement.balances.frozen_fen,
                "arrears_fen": statement.balances.arrears_fen,
                "fetched_at": self.now(),
            }
        )
        async with self._transaction() as db:
            await db.execute("DELETE FROM statement_lines")
            await db.execute("DELETE FROM settled_sessions")
            await db.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET"
                " value = excluded.value",
                (STATEMENT_META, meta),
            )
            for position, line in enumerate(statement.lines):
                await db.execute(
                    "INSERT INTO statement_lines (position, time, kind, account, amount_fen,"
                    " grant_id, box_id,"
                    " session_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        position,
                        line.time,
                        line.kind,
                        line.account,
                        line.amount_fen,
                        line.grant_id,
                        line.box_id,
                        line.session_id,
                    ),
                )
            for session in statement.sessions:
                await db.execute(
                    "INSERT OR REPLACE INTO settled_sessions (box_id, session_id, outlet,"
                    " start_time, end_time,"
                    " energy_wh, cost_fen, end_reason, invoiced) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        session.box_id,
                        session.session_id,
                        session.outlet,
                        session.start_time,
                        session.end_time,
                        session.energy_wh,
                        session.cost_fen,
                        session.end_reason,
                        int(session.invoiced),
                    ),
                )

    async def statement(self) -> StatementSnapshot | None:
        row = await self._row("SELECT value FROM settings WHERE name = ?", (STATEMENT_META,))
        if row is None:
            return None
        try:
            meta = json.loads(row[0])
            balances = Balances(
                available_fen=int(meta["available_fen"]),
                frozen_fen=int(meta["frozen_fen"]),
                arrears_fen=int(meta["arrears_fen"]),
            )
            lines = tuple(
                StatementLine(
                    time=r[0],
                    kind=r[1],
                    account=r[2],
                    amount_fen=r[3],
                    grant_id=None if r[4] is None else bytes(r[4]),
                    box_id=r[5],
                    session_id=None if r[6] is None else bytes(r[6]),
                )
                for r in await self._rows(
                    "SELECT time, kind, account, amount_fen, grant_id, box_id, session_id FROM"
                    " statement_lines"
                    " ORDER BY position"
                )
            )
            sessions = tuple(
                SettledSession(
                    box_id=r[0],
                    session_id=bytes(r[1]),
                    outlet=r[2],
                    start_time=r[3],
                    end_time=r[4],
                    energy_wh=r[5],
                    cost_fen=r[6],
                    end_reason=r[7],
                    invoiced=bool(r[8]),
                )
                for r in await self._rows(
                    "SELECT box_id, session_id, outlet, start_time, end_time, energy_wh, cost_fen,"
                    " end_reason,"
                    " invoiced FROM settled_sessions ORDER BY start_time"
                )
            )
            return StatementSnapshot(
                statement=Statement(
                    user_id=int(meta["user_id"]),
                    from_time=int(meta["from_time"]),
                    to_time=int(meta["to_time"]),
                    balances=balances,
                    lines=lines,
                    sessions=sessions,
                ),
                fetched_at=int(meta["fetched_at"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise WalletError(f"the statement in the wallet is damaged: {exc}") from None


def verify_receipt(
    signed: bytes, *, box_public_key: Ed25519PublicKey, box_id: str, session_id: bytes
) -> LedgerEntry:
    """A receipt is good when the box key of its certificate signed it, it names the box, it is a
    SESSION_ENDED entry and it is for this session (docs/protocol.md §8.1)."""
    try:
        entry = LedgerEntry.verify(signed, cose.key_ring(box_public_key))
    except TokenError as exc:
        raise ReceiptRejectedError(f"the receipt does not verify: {exc.detail}", code=exc.code) from None
    if entry.box_id != box_id:
        raise ReceiptRejectedError("the receipt names another box", code=ErrorCode.TOKEN_WRONG_AUDIENCE)
    if entry.kind is not EntryKind.SESSION_ENDED or not isinstance(entry.body, SessionReceipt):
        raise ReceiptRejectedError("the receipt is not a session's end", code=ErrorCode.TOKEN_WRONG_TYPE)
    if entry.body.session_id != session_id:
        raise ReceiptRejectedError("the receipt is for another session", code=ErrorCode.SESSION_UNKNOWN)
    return entry


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


def _prepare_file(path: Path) -> None:
    """Make the wallet's directory and an empty file readable by this user only (it holds the
    device key); refuse paths that cannot be a wallet with a message that says why."""
    try:
        if path.is_dir():
            raise WalletError(f"{path} is a directory; give the wallet file's path")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            if not stat.S_ISREG(path.stat().st_mode):
                raise WalletError(f"{path} is not a regular file") from None
    except OSError as exc:
        raise WalletError(f"cannot use {path} for the wallet: {exc.strerror or exc}") from None
