"""The signed objects of DESIGN §2 as frozen dataclasses: CWT claims in a COSE_Sign1.

Every object is a CWT (RFC 8392) signed with EdDSA (see `protocol.cose`). Standard claims carry
what they are meant for (`sub aud exp nbf iat cti cnf`); everything powerbox-specific sits in ONE
private-use claim, key -65537, as an array whose first element is the object type. One private
key instead of several keeps a grant under 200 bytes, and the type tag stops an object of one
kind being accepted as another (docs/protocol.md §7).

    claims = { ? 1 iss, ? 2 sub, ? 3 aud, ? 4 exp, ? 5 nbf, ? 6 iat, ? 7 cti, ? 8 cnf,
               -65537: [object_type, ...fields] }
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import cose, encoding
from protocol.errors import ErrorCode, TokenError

CLAIM_ISS = 1
CLAIM_SUB = 2
CLAIM_AUD = 3
CLAIM_EXP = 4
CLAIM_NBF = 5
CLAIM_IAT = 6
CLAIM_CTI = 7
CLAIM_CNF = 8
CLAIM_POWERBOX = -65537  # RFC 8392 §9.1: integers below -65536 are for private use
CNF_COSE_KEY = 1  # RFC 8747 §3.2

# COSE_Key for an Ed25519 public key (RFC 9053 §7.2): kty OKP, crv Ed25519, x.
COSE_KEY_KTY = 1
COSE_KEY_CRV = -1
COSE_KEY_X = -2
KTY_OKP = 1
CRV_ED25519 = 6

MAX_GRANT_SIZE = 200
ID_SIZE = 8
HASH_SIZE = 32
GENESIS_HASH = bytes(HASH_SIZE)
MAX_TIME = 2**32 - 1  # seconds since 1970: good until 2106, and 5 bytes of CBOR
MAX_USER_ID = 2**32 - 1


class ObjectType(enum.IntEnum):
    """First element of the private claim: which object this is (docs/protocol.md §7)."""

    BOX_CERTIFICATE = 1
    BALANCE_GRANT = 2
    UNLOCK_TOKEN = 3
    REVOCATION_LIST = 4
    TARIFF_TABLE = 5
    RESERVATION = 6
    LEDGER_ENTRY = 7
    LEDGER_ACK = 8


class Door(enum.IntEnum):
    METERING_BOX = 0
    OUTLET = 1


class TimeQuality(enum.IntEnum):
    """How far the box trusts its clock when it stamps an entry (after OCMF's time status)."""

    SYNCED = 0  # moved forward by an operator-signed time within the last day
    INFORMATIVE = 1  # running on its own since the last sync
    UNKNOWN = 2  # never synced since provisioning


class EndReason(enum.IntEnum):
    USER_STOP = 1
    BALANCE_EXHAUSTED = 2
    OVERLOAD = 3
    TAMPER = 4
    IDLE = 5
    MAX_DURATION = 6
    REMOTE_STOP = 7
    POWER_LOSS = 8
    FAULT = 9


class EntryKind(enum.IntEnum):
    BOOT = 1
    SESSION_STARTED = 2
    SESSION_TOPPED_UP = 3
    SESSION_ENDED = 4
    DOOR_OPENED = 5
    DOOR_CLOSED = 6
    TAMPER = 7
    FAULT = 8
    CLOCK_ADJUSTED = 9
    REVOCATION_UPDATED = 10
    TARIFF_UPDATED = 11
    ACK_RECEIVED = 12


def _fields(what: str) -> encoding.Fields:
    return encoding.Fields(what, error=TokenError, code=ErrorCode.TOKEN_MALFORMED)


def encode_cose_key(public_key: Ed25519PublicKey) -> dict[int, object]:
    return {COSE_KEY_KTY: KTY_OKP, COSE_KEY_CRV: CRV_ED25519, COSE_KEY_X: cose.public_key_bytes(public_key)}


def decode_cose_key(value: object, fields: encoding.Fields) -> Ed25519PublicKey:
    key = fields.map(value)
    if set(key) != {COSE_KEY_KTY, COSE_KEY_CRV, COSE_KEY_X}:
        raise fields.fail("COSE_Key must have exactly kty, crv and x")
    if key[COSE_KEY_KTY] != KTY_OKP or key[COSE_KEY_CRV] != CRV_ED25519:
        raise fields.fail("COSE_Key must be OKP Ed25519")
    return Ed25519PublicKey.from_public_bytes(fields.bytes_(key[COSE_KEY_X], "x", size=32))


def _encode_cnf(public_key: Ed25519PublicKey) -> dict[int, object]:
    return {CNF_COSE_KEY: encode_cose_key(public_key)}


def _decode_cnf(value: object, fields: encoding.Fields) -> Ed25519PublicKey:
    cnf = fields.map(value)
    if set(cnf) != {CNF_COSE_KEY}:
        raise fields.fail("cnf must hold exactly one COSE_Key")
    return decode_cose_key(cnf[CNF_COSE_KEY], fields)


def same_key(a: Ed25519PublicKey, b: Ed25519PublicKey) -> bool:
    return cose.public_key_bytes(a) == cose.public_key_bytes(b)


class _Claims:
    """Reads the claims map of one object; refuses unknown or missing claims."""

    def __init__(self, claims: dict[Any, Any], fields: encoding.Fields, allowed: set[int]) -> None:
        unknown = set(claims) - allowed - {CLAIM_POWERBOX}
        if unknown:
            raise fields.fail(f"unexpected claims {sorted(map(str, unknown))}")
        self._claims = claims
        self._fields = fields

    def required(self, key: int) -> object:
        if key not in self._claims:
            raise TokenError(f"missing claim {key}", code=ErrorCode.TOKEN_MISSING_CLAIM)
        return self._claims[key]

    def optional(self, key: int) -> object | None:
        return self._claims.get(key)


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedObject:
    """Shared encode/sign/verify for every CWT-shaped object (docs/protocol.md §7)."""

    object_type: ClassVar[ObjectType]
    allowed_claims: ClassVar[frozenset[int]]

    def claims(self) -> dict[int, object]:
        raise NotImplementedError

    @classmethod
    def from_claims(cls, claims: _Claims, private: list[Any], fields: encoding.Fields) -> Self:
        raise NotImplementedError

    def encode_payload(self) -> bytes:
        return encoding.encode(self.claims())

    def sign(self, key: cose.SigningKey) -> bytes:
        return cose.sign(self.encode_payload(), key)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        fields = _fields(cls.__name__)
        raw = fields.map(encoding.decode(payload, error=TokenError, code=ErrorCode.TOKEN_MALFORMED))
        if CLAIM_POWERBOX not in raw:
            raise TokenError("not a powerbox object", code=ErrorCode.TOKEN_WRONG_TYPE)
        private = fields.array(raw[CLAIM_POWERBOX], minimum=1)
        if private[0] != cls.object_type:
            raise TokenError(
                f"expected {cls.object_type.name}, got type {private[0]!r}", code=ErrorCode.TOKEN_WRONG_TYPE
            )
        try:
            return cls.from_claims(_Claims(raw, fields, set(cls.allowed_claims)), private[1:], fields)
        except (ValueError, TypeError) as exc:  # e.g. an invalid curve point inside a COSE_Key
            raise fields.fail(str(exc)) from None

    @classmethod
    def verify(cls, data: bytes, keys: Mapping[bytes, Ed25519PublicKey]) -> Self:
        """Check the signature against trusted `keys`, then decode. Validity times are the caller's."""
        return cls.decode_payload(cose.verify(data, keys).payload)

    @classmethod
    def decode_unverified(cls, data: bytes) -> Self:
        """Decode without checking the signature (to display, or to pick the key)."""
        return cls.decode_payload(cose.parse(data)[2])


def _time(value: object, name: str, fields: encoding.Fields) -> int:
    return fields.uint(value, name, maximum=MAX_TIME)


def _id(value: object, name: str, fields: encoding.Fields) -> bytes:
    return fields.bytes_(value, name, size=ID_SIZE)


def _text_id(value: object, name: str, fields: encoding.Fields) -> str:
    text = fields.text(value, name, max_size=16)
    if not text or not all(c.isascii() and (c.isalnum() or c == "-") for c in text) or text.upper() != text:
        raise fields.fail(f"{name} must be 1-16 characters of A-Z, 0-9 and '-'")
    return text


def _check_window(not_before: int, expires: int, fields: encoding.Fields) -> None:
    if expires <= not_before:
        raise fields.fail("expiry must follow the start of validity")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutletSpec:
    number: int
    rated_power_w: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxCertificate(SignedObject):
    """Operator-signed identity of a box; also its EDHOC credential (CWT by value)."""

    object_type: ClassVar[ObjectType] = ObjectType.BOX_CERTIFICATE
    allowed_claims: ClassVar[frozenset[int]] = frozenset({CLAIM_SUB, CLAIM_IAT, CLAIM_EXP, CLAIM_CNF})

    box_id: str
    box_public_key: Ed25519PublicKey
    outlets: tuple[OutletSpec, ...]
    latitude_microdeg: int
    longitude_microdeg: int
    tariff_region: str
    issued_at: int
    expires_at: int

    def claims(self) -> dict[int, object]:
        return {
            CLAIM_SUB: self.box_id,
            CLAIM_IAT: self.issued_at,
            CLAIM_EXP: self.expires_at,
            CLAIM_CNF: _encode_cnf(self.box_public_key),
            CLAIM_POWERBOX: [
                self.object_type,
                [[outlet.number, outlet.rated_power_w] for outlet in self.outlets],
                self.latitude_microdeg,
                self.longitude_microdeg,
                self.tariff_region,
            ],
        }

    @classmethod
    def from_claims(cls, claims: _Claims, private: list[Any], fields: encoding.Fields) -> Self:
        outlets_raw, latitude, longitude, region = fields.array(private, 4)
        outlets = []
        for item in fields.array(outlets_raw):
            number, rated = fields.array(item, 2)
            outlets.append(
                OutletSpec(
                    number=fields.uint(number, "outlet", maximum=99),
                    rated_power_w=fields.uint(rated, "rated power", maximum=100_000),
                )
            )
        numbers = [outlet.number for outlet in outlets]
        if not outlets or len(set(numbers)) != len(numbers) or 0 in numbers:
            raise fields.fail("outlets must be distinct numbers from 1")
        issued = _time(claims.required(CLAIM_IAT), "iat", fields)
        expires = _time(claims.required(CLAIM_EXP), "exp", fields)
        _check_window(issued, expires, fields)
        return cls(
            box_id=_text_id(claims.required(CLAIM_SUB), "box id", fields),
            box_public_key=_decode_cnf(claims.required(CLAIM_CNF), fields),
            outlets=tuple(outlets),
            latitude_microdeg=_bounded_int(latitude, "latitude", 90_000_000, fields),
            longitude_microdeg=_bounded_int(longitude, "longitude", 180_000_000, fields),
            tariff_region=fields.text(region, "tariff region", max_size=32),
            issued_at=issued,
            expires_at=expires,
        )

    def outlet(self, number: int) -> OutletSpec | None:
        return next((outlet for outlet in self.outlets if outlet.number == number), None)


def _bounded_int(value: object, name: str, bound: int, fields: encoding.Fields) -> int:
    number = fields.int_(value, name)
    if not -bound <= number <= bound:
        raise fields.fail(f"{name} out of range")
    return number


@dataclass(frozen=True, slots=True, kw_only=True)
class BalanceGrant(SignedObject):
    """Single-use prepaid amount bound to one phone key (`cnf`, RFC 8747)."""

    object_type: ClassVar[ObjectType] = ObjectType.BALANCE_GRANT
    allowed_claims: ClassVar[frozenset[int]] = frozenset(
        {CLAIM_SUB, CLAIM_AUD, CLAIM_IAT, CLAIM_EXP, CLAIM_CTI, CLAIM_CNF}
    )

    grant_id: bytes
    user_id: int
    box_id: str | None  # None: valid at any box
    phone_key: Ed25519PublicKey
    amount_fen: int
    max_price_fen_per_kwh: int
    max_session_seconds: int
    issued_at: int
    expires_at: int

    def claims(self) -> dict[int, object]:
        claims: dict[int, object] = {
            CLAIM_CTI: self.grant_id,
            CLAIM_SUB: self.user_id,
            CLAIM_IAT: self.issued_at,
            CLAIM_EXP: self.expires_at,
            CLAIM_CNF: _encode_cnf(self.phone_key),
            CLAIM_POWERBOX: [
                self.object_type,
                self.amount_fen,
                self.max_price_fen_per_kwh,
                self.max_session_seconds,
            ],
        }
        if self.box_id is not None:
            claims[CLAIM_AUD] = self.box_id
        return claims

    @classmethod
    def from_claims(cls, claims: _Claims, private: list[Any], fields: encoding.Fields) -> Self:
        amount, max_price, max_seconds = fields.array(private, 3)
        audience = claims.optional(CLAIM_AUD)
        issued = _time(claims.required(CLAIM_IAT), "iat", fields)
        expires = _time(claims.required(CLAIM_EXP), "exp", fields)
        _check_window(issued, expires, fields)
        return cls(
            grant_id=_id(claims.required(CLAIM_CTI), "grant id", fields),
            user_id=fields.uint(claims.required(CLAIM_SUB), "user id", maximum=MAX_USER_ID),
            box_id=None if audience is None else _text_id(audience, "box id", fields),
            phone_key=_decode_cnf(claims.required(CLAIM_CNF), fields),
            amount_fen=fields.uint(amount, "amount", maximum=10**9),
            max_price_fen_per_kwh=fields.uint(max_price, "price limit", maximum=10**6),
            max_session_seconds=fields.uint(max_seconds, "maximum session length", maximum=31 * 86400),
            issued_at=issued,
            expires_at=expires,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UnlockToken(SignedObject):
    """Opens one door of one box within a time window, for the holder of `holder_key`."""

    object_type: ClassVar[ObjectType] = ObjectType.UNLOCK_TOKEN
    allowed_claims: ClassVar[frozenset[int]] = frozenset(
        {CLAIM_SUB, CLAIM_AUD, CLAIM_NBF, CLAIM_IAT, CLAIM_EXP, CLAIM_CTI, CLAIM_CNF}
    )

    token_id: bytes
    holder_id: int
    box_id: str
    holder_key: Ed25519PublicKey
    door: Door
    outlet: int  # 0 for the metering-box door
    not_before: int
    expires_at: int
    issued_at: int

    def claims(self) -> dict[int, object]:
        return {
            CLAIM_CTI: self.token_id,
            CLAIM_SUB: self.holder_id,
            CLAIM_AUD: self.box_id,
            CLAIM_NBF: self.not_before,
            CLAIM_EXP: self.expires_at,
            CLAIM_IAT: self.issued_at,
            CLAIM_CNF: _encode_cnf(self.holder_key),
            CLAIM_POWERBOX: [self.object_type, self.door, self.outlet],
        }

    @classmethod
    def from_claims(cls, claims: _Claims, private: list[Any], fields: encoding.Fields) -> Self:
        door_raw, outlet_raw = fields.array(private, 2)
        door = fields.enum(door_raw, "door", Door)
        outlet = fields.uint(outlet_raw, "outlet", maximum=99)
        if (door is Door.METERING_BOX) != (outlet == 0):
            raise fields.fail("outlet is 0 exactly for the metering-box door")
        not_before = _time(claims.required(CLAIM_NBF), "nbf", fields)
        expires = _time(claims.required(CLAIM_EXP), "exp", fields)
        _check_window(not_before, expires, fields)
        return cls(
            token_id=_id(claims.required(CLAIM_CTI), "token id", fields),
            holder_id=fields.uint(claims.required(CLAIM_SUB), "holder id", maximum=MAX_USER_ID),
            box_id=_text_id(claims.required(CLAIM_AUD), "box id", fields),
            holder_key=_decode_cnf(claims.required(CLAIM_CNF), fields),
            door=door,
            outlet=outlet,
            not_before=not_before,
            expires_at=expires,
            issued_at=_time(claims.required(CLAIM_IAT), "iat", fields),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationList(SignedObject):
    """Monotonic; the newest version a box has seen wins. Phone keys listed by raw bytes."""

    object_type: ClassVar[ObjectType] = ObjectType.REVOCATION_LIST
    allowed_claims: ClassVar[frozenset[int]] = frozenset({CLAIM_IAT})

    version: int
    issued_at: int
    grant_ids: frozenset[bytes] = field(default_factory=frozenset)
    phone_keys: frozenset[bytes] = field(default_factory=frozenset)
    user_ids: frozenset[int] = field(default_factory=frozenset)

    def claims(self) -> dict[int, object]:
        return {
            CLAIM_IAT: self.issued_at,
            CLAIM_POWERBOX: [
                self.object_type,
                self.version,
                sorted(self.grant_ids),
                sorted(self.phone_keys),
                sorted(self.user_ids),
            ],
        }

    @classmethod
    def from_claims(cls, claims: _Claims, private: list[Any], fields: encoding.Fields) -> Self:
        version, grants, keys, users = fields.array(private, 4)
        return cls(
            version=fields.uint(version, "version"),
            issued_at=_time(claims.required(CLAIM_IAT), "iat", fields),
            grant_ids=frozenset(_id(item, "grant id", fields) for item in fields.array(grants)),
            phone_keys=frozenset(fields.bytes_(item, "phone key", size=32) for item in fields.array(keys)),
            user_ids=frozenset(
                fields.uint(item, "user id", maximum=MAX_USER_ID) for item in fields.array(users)
            ),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TariffTable(SignedObject):
    """Monotonic; price per kWh in fen: a default, per tariff region, and per box (most specific wins)."""

    object_type: ClassVar[ObjectType] = ObjectType.TARIFF_TABLE
    allowed_claims: ClassVar[frozenset[int]] = frozenset({CLAIM_IAT})

    version: int
    issued_at: int
    default_price_fen_per_kwh: int
    region_prices: tuple[tuple[str, int], ...] = ()
    box_prices: tuple[tuple[str, int], ...] = ()

    def claims(self) -> dict[int, object]:
        return {
            CLAIM_IAT: self.issued_at,
            CLAIM_POWERBOX: [
                self.object_type,
                self.version,
                self.default_price_fen_per_kwh,
                [list(item) for item in self.region_prices],
                [list(item) for item in self.box_prices],
            ],
        }

    @classmethod
    def from_claims(cls, claims: _Claims, private: list[Any], fields: encoding.Fields) -> Self:
        version, default, regions, boxes = fields.array(private, 4)

        def prices(raw: object, name: str) -> tuple[tuple[str, int], ...]:
            out = []
            for item in fields.array(raw):
                scope, price = fields.array(item, 2)
                out.append(
                    (fields.text(scope, name, max_size=32), fields.uint(price, "price", maximum=10**6))
                )
            return tuple(out)

        return cls(
            version=fields.uint(version, "version"),
            issued_at=_time(claims.required(CLAIM_IAT), "iat", fields),
            default_price_fen_per_kwh=fields.uint(default, "price", maximum=10**6),
            region_prices=prices(regions, "region"),
            box_prices=prices(boxes, "box id"),
        )

    def price_for(self, box_id: str, region: str) -> int:
        for scope, price in self.box_prices:
            if scope == box_id:
                return price
        for scope, price in self.region_prices:
            if scope == region:
                return price
        return self.default_price_fen_per_kwh


@dataclass(frozen=True, slots=True, kw_only=True)
class Reservation(SignedObject):
    """Holds one outlet of one box for one phone key during a window."""

    object_type: ClassVar[ObjectType] = ObjectType.RESERVATION
    allowed_claims: ClassVar[frozenset[int]] = frozenset(
        {CLAIM_SUB, CLAIM_AUD, CLAIM_NBF, CLAIM_EXP, CLAIM_IAT, CLAIM_CTI, CLAIM_CNF}
    )

    reservation_id: bytes
    user_id: int
    box_id: str
    outlet: int
    phone_key: Ed25519PublicKey
    not_before: int
    expires_at: int
    issued_at: int

    def claims(self) -> dict[int, object]:
        return {
            CLAIM_CTI: self.reservation_id,
            CLAIM_SUB: self.user_id,
            CLAIM_AUD: self.box_id,
            CLAIM_NBF: self.not_before,
            CLAIM_EXP: self.expires_at,
            CLAIM_IAT: self.issued_at,
            CLAIM_CNF: _encode_cnf(self.phone_key),
            CLAIM_POWERBOX: [self.object_type, self.outlet],
        }

    @classmethod
    def from_claims(cls, claims: _Claims, private: list[Any], fields: encoding.Fields) -> Self:
        (outlet,) = fields.array(private, 1)
        not_before = _time(claims.required(CLAIM_NBF), "nbf", fields)
        expires = _time(claims.required(CLAIM_EXP), "exp", fields)
        _check_window(not_before, expires, fields)
        return cls(
            reservation_id=_id(claims.required(CLAIM_CTI), "reservation id", fields),
            user_id=fields.uint(claims.required(CLAIM_SUB), "user id", maximum=MAX_USER_ID),
            box_id=_text_id(claims.required(CLAIM_AUD), "box id", fields),
            outlet=fields.uint(outlet, "outlet", maximum=99),
            phone_key=_decode_cnf(claims.required(CLAIM_CNF), fields),
            not_before=not_before,
            expires_at=expires,
            issued_at=_time(claims.required(CLAIM_IAT), "iat", fields),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerAck(SignedObject):
    """Operator's word that entries up to `sequence` (whose hash is `entry_hash`) are safe."""

    object_type: ClassVar[ObjectType] = ObjectType.LEDGER_ACK
    allowed_claims: ClassVar[frozenset[int]] = frozenset({CLAIM_SUB, CLAIM_IAT})

    box_id: str
    sequence: int
    entry_hash: bytes
    issued_at: int

    def claims(self) -> dict[int, object]:
        return {
            CLAIM_SUB: self.box_id,
            CLAIM_IAT: self.issued_at,
            CLAIM_POWERBOX: [self.object_type, self.sequence, self.entry_hash],
        }

    @classmethod
    def from_claims(cls, claims: _Claims, private: list[Any], fields: encoding.Fields) -> Self:
        sequence, entry_hash = fields.array(private, 2)
        return cls(
            box_id=_text_id(claims.required(CLAIM_SUB), "box id", fields),
            sequence=fields.uint(sequence, "sequence"),
            entry_hash=fields.bytes_(entry_hash, "entry hash", size=HASH_SIZE),
            issued_at=_time(claims.required(CLAIM_IAT), "iat", fields),
        )


# Ledger entry bodies: one typed record per kind, CBOR arrays on the wire (docs/protocol.md §8).


@dataclass(frozen=True, slots=True, kw_only=True)
class BootBody:
    software_version: str

    def to_cbor(self) -> list[object]:
        return [self.software_version]

    @classmethod
    def from_cbor(cls, raw: object, fields: encoding.Fields) -> Self:
        (version,) = fields.array(raw, 1)
        return cls(software_version=fields.text(version, "software version", max_size=32))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStartedBody:
    session_id: bytes
    outlet: int
    grant_id: bytes
    user_id: int
    phone_key: bytes
    start_time: int
    start_register_wh: int
    tariff_version: int
    price_fen_per_kwh: int
    amount_fen: int

    def to_cbor(self) -> list[object]:
        return [
            self.session_id,
            self.outlet,
            self.grant_id,
            self.user_id,
            self.phone_key,
            self.start_time,
            self.start_register_wh,
            self.tariff_version,
            self.price_fen_per_kwh,
            self.amount_fen,
        ]

    @classmethod
    def from_cbor(cls, raw: object, fields: encoding.Fields) -> Self:
        (sid, outlet, grant, user, key, start, register, version, price, amount) = fields.array(raw, 10)
        return cls(
            session_id=_id(sid, "session id", fields),
            outlet=fields.uint(outlet, "outlet", maximum=99),
            grant_id=_id(grant, "grant id", fields),
            user_id=fields.uint(user, "user id", maximum=MAX_USER_ID),
            phone_key=fields.bytes_(key, "phone key", size=32),
            start_time=_time(start, "start time", fields),
            start_register_wh=fields.uint(register, "register"),
            tariff_version=fields.uint(version, "tariff version"),
            price_fen_per_kwh=fields.uint(price, "price", maximum=10**6),
            amount_fen=fields.uint(amount, "amount", maximum=10**9),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionToppedUpBody:
    session_id: bytes
    grant_id: bytes
    amount_fen: int

    def to_cbor(self) -> list[object]:
        return [self.session_id, self.grant_id, self.amount_fen]

    @classmethod
    def from_cbor(cls, raw: object, fields: encoding.Fields) -> Self:
        sid, grant, amount = fields.array(raw, 3)
        return cls(
            session_id=_id(sid, "session id", fields),
            grant_id=_id(grant, "grant id", fields),
            amount_fen=fields.uint(amount, "amount", maximum=10**9),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionReceipt:
    """Body of a SESSION_ENDED entry: what the user is charged for and why the session ended."""

    session_id: bytes
    grant_ids: tuple[bytes, ...]
    outlet: int
    start_time: int
    end_time: int
    start_register_wh: int
    end_register_wh: int
    energy_wh: int
    tariff_version: int
    price_fen_per_kwh: int
    cost_fen: int
    end_reason: EndReason

    def to_cbor(self) -> list[object]:
        return [
            self.session_id,
            list(self.grant_ids),
            self.outlet,
            self.start_time,
            self.end_time,
            self.start_register_wh,
            self.end_register_wh,
            self.energy_wh,
            self.tariff_version,
            self.price_fen_per_kwh,
            self.cost_fen,
            self.end_reason,
        ]

    @classmethod
    def from_cbor(cls, raw: object, fields: encoding.Fields) -> Self:
        (sid, grants, outlet, start, end, reg_start, reg_end, energy, version, price, cost, reason) = (
            fields.array(raw, 12)
        )
        receipt = cls(
            session_id=_id(sid, "session id", fields),
            grant_ids=tuple(_id(item, "grant id", fields) for item in fields.array(grants, minimum=1)),
            outlet=fields.uint(outlet, "outlet", maximum=99),
            start_time=_time(start, "start time", fields),
            end_time=_time(end, "end time", fields),
            start_register_wh=fields.uint(reg_start, "start register"),
            end_register_wh=fields.uint(reg_end, "end register"),
            energy_wh=fields.uint(energy, "energy"),
            tariff_version=fields.uint(version, "tariff version"),
            price_fen_per_kwh=fields.uint(price, "price", maximum=10**6),
            cost_fen=fields.uint(cost, "cost", maximum=10**10),
            end_reason=fields.enum(reason, "end reason", EndReason),
        )
        if receipt.end_time < receipt.start_time:
            raise fields.fail("session ends before it starts")
        if receipt.end_register_wh - receipt.start_register_wh != receipt.energy_wh:
            raise fields.fail("energy disagrees with the meter registers")
        return receipt


@dataclass(frozen=True, slots=True, kw_only=True)
class DoorBody:
    door: Door
    outlet: int
    token_id: bytes  # the UnlockToken or session that opened it; empty for a forced/closed event

    def to_cbor(self) -> list[object]:
        return [self.door, self.outlet, self.token_id]

    @classmethod
    def from_cbor(cls, raw: object, fields: encoding.Fields) -> Self:
        door, outlet, token = fields.array(raw, 3)
        return cls(
            door=fields.enum(door, "door", Door),
            outlet=fields.uint(outlet, "outlet", maximum=99),
            token_id=fields.bytes_(token, "token id", max_size=ID_SIZE),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TamperBody:
    tripped_outlets: tuple[int, ...]

    def to_cbor(self) -> list[object]:
        return [list(self.tripped_outlets)]

    @classmethod
    def from_cbor(cls, raw: object, fields: encoding.Fields) -> Self:
        (outlets,) = fields.array(raw, 1)
        return cls(tripped_outlets=tuple(fields.uint(o, "outlet", maximum=99) for o in fields.array(outlets)))


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultBody:
    code: ErrorCode
    outlet: int  # 0: the whole box
    detail: str

    def to_cbor(self) -> list[object]:
        return [self.code, self.outlet, self.detail]

    @classmethod
    def from_cbor(cls, raw: object, fields: encoding.Fields) -> Self:
        code, outlet, detail = fields.array(raw, 3)
        return cls(
            code=fields.enum(code, "error code", ErrorCode),
            outlet=fields.uint(outlet, "outlet", maximum=99),
            detail=fields.text(detail, "detail", max_size=200),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ClockAdjustedBody:
    previous_time: int
    new_time: int

    def to_cbor(self) -> list[object]:
        return [self.previous_time, self.new_time]

    @classmethod
    def from_cbor(cls, raw: object, fields: encoding.Fields) -> Self:
        previous, new = fields.array(raw, 2)
        return cls(
            previous_time=_time(previous, "previous time", fields), new_time=_time(new, "time", fields)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionBody:
    """REVOCATION_UPDATED, TARIFF_UPDATED and ACK_RECEIVED: the version (or acked sequence) now held."""

    version: int

    def to_cbor(self) -> list[object]:
        return [self.version]

    @classmethod
    def from_cbor(cls, raw: object, fields: encoding.Fields) -> Self:
        (version,) = fields.array(raw, 1)
        return cls(version=fields.uint(version, "version"))


EntryBody = (
    BootBody
    | SessionStartedBody
    | SessionToppedUpBody
    | SessionReceipt
    | DoorBody
    | TamperBody
    | FaultBody
    | ClockAdjustedBody
    | VersionBody
)

BODY_TYPES: dict[EntryKind, type[EntryBody]] = {
    EntryKind.BOOT: BootBody,
    EntryKind.SESSION_STARTED: SessionStartedBody,
    EntryKind.SESSION_TOPPED_UP: SessionToppedUpBody,
    EntryKind.SESSION_ENDED: SessionReceipt,
    EntryKind.DOOR_OPENED: DoorBody,
    EntryKind.DOOR_CLOSED: DoorBody,
    EntryKind.TAMPER: TamperBody,
    EntryKind.FAULT: FaultBody,
    EntryKind.CLOCK_ADJUSTED: ClockAdjustedBody,
    EntryKind.REVOCATION_UPDATED: VersionBody,
    EntryKind.TARIFF_UPDATED: VersionBody,
    EntryKind.ACK_RECEIVED: VersionBody,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry(SignedObject):
    """One box-signed, hash-chained record. `entry_hash` of the signed bytes links the next one."""

    object_type: ClassVar[ObjectType] = ObjectType.LEDGER_ENTRY
    allowed_claims: ClassVar[frozenset[int]] = frozenset({CLAIM_ISS, CLAIM_IAT})

    box_id: str
    sequence: int  # first entry is 1
    previous_hash: bytes  # GENESIS_HASH for the first entry
    time: int
    time_quality: TimeQuality
    kind: EntryKind
    body: EntryBody

    def __post_init__(self) -> None:
        if not isinstance(self.body, BODY_TYPES[self.kind]):
            raise TypeError(f"{self.kind.name} needs a {BODY_TYPES[self.kind].__name__} body")

    def claims(self) -> dict[int, object]:
        return {
            CLAIM_ISS: self.box_id,
            CLAIM_IAT: self.time,
            CLAIM_POWERBOX: [
                self.object_type,
                self.sequence,
                self.previous_hash,
                self.time_quality,
                self.kind,
                self.body.to_cbor(),
            ],
        }

    @classmethod
    def from_claims(cls, claims: _Claims, private: list[Any], fields: encoding.Fields) -> Self:
        sequence, previous, quality, kind_raw, body = fields.array(private, 5)
        kind = fields.enum(kind_raw, "entry kind", EntryKind)
        return cls(
            box_id=_text_id(claims.required(CLAIM_ISS), "box id", fields),
            sequence=fields.uint(sequence, "sequence", maximum=2**63),
            previous_hash=fields.bytes_(previous, "previous hash", size=HASH_SIZE),
            time=_time(claims.required(CLAIM_IAT), "time", fields),
            time_quality=fields.enum(quality, "time quality", TimeQuality),
            kind=kind,
            body=BODY_TYPES[kind].from_cbor(body, fields),
        )


def entry_hash(signed_entry: bytes) -> bytes:
    """Chain link: SHA-256 over the whole signed COSE_Sign1 (docs/protocol.md §8)."""
    return hashlib.sha256(signed_entry).digest()


def check_grant_size(signed_grant: bytes) -> None:
    if len(signed_grant) > MAX_GRANT_SIZE:
        raise TokenError(f"grant is {len(signed_grant)} bytes", code=ErrorCode.TOKEN_TOO_LARGE)
