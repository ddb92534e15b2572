"""Decoding ledger entries and checking their signatures: the CPU-bound half of ingest.

Pure functions, so that a large batch can be handed to worker processes (`check_batch`) and a small
one done here, with the Ed25519 checks on threads (`first_forged` releases the GIL for nearly all its
time). Both give the same answers: the first malformed entry, the first forged one, and which boxes'
keys were not at hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import cose, tokens
from protocol.errors import ErrorCode, TokenError
from protocol.tokens import LedgerEntry


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedEntry:
    """An entry decoded but not yet verified, with what its signature check needs."""

    entry: LedgerEntry
    entry_hash: bytes
    key_id: bytes
    to_be_signed: bytes  # what the signature covers (RFC 9052 §4.4)
    signature: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Malformed:
    index: int
    code: ErrorCode
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckedBatch:
    """What a worker found in (part of) a batch; indices count from the batch's first entry."""

    decoded: tuple[tuple[LedgerEntry, bytes], ...]  # (entry, entry hash), in the batch's order
    malformed: Malformed | None = None
    forged: int | None = None  # the first entry its box's key did not sign
    missing_keys: frozenset[str] = frozenset()  # boxes named whose keys were not given


def parse(raw_entries: Sequence[bytes], *, first_index: int = 0) -> list[ParsedEntry] | Malformed:
    """Decode every entry (strictly, as protocol.tokens does), or say which one is malformed."""
    parsed = []
    for index, signed in enumerate(raw_entries, start=first_index):
        try:
            protected, key_id, payload, signature = cose.parse(signed)
            entry = LedgerEntry.decode_payload(payload)
        except TokenError as error:
            return Malformed(index=index, code=error.code, detail=error.detail)
        parsed.append(
            ParsedEntry(
                entry=entry,
                entry_hash=tokens.entry_hash(signed),
                key_id=key_id,
                to_be_signed=cose.to_be_signed(protected, payload),
                signature=signature,
            )
        )
    return parsed


def first_forged(parsed: Sequence[ParsedEntry], public_key: Ed25519PublicKey) -> int | None:
    """Position in `parsed` of the first entry `public_key` did not sign, or None."""
    key_id = cose.key_id_for(public_key)
    for position, item in enumerate(parsed):
        if item.key_id != key_id:
            return position
        try:
            public_key.verify(item.signature, item.to_be_signed)
        except InvalidSignature:
            return position
    return None


def check_batch(
    raw_entries: Sequence[bytes], keys: Mapping[str, bytes], first_index: int = 0
) -> CheckedBatch:
    """Decode and verify part of a batch in one go (what a worker process runs)."""
    parsed = parse(raw_entries, first_index=first_index)
    if isinstance(parsed, Malformed):
        return CheckedBatch(decoded=(), malformed=parsed)
    missing: set[str] = set()
    public_keys = {box_id: Ed25519PublicKey.from_public_bytes(key) for box_id, key in keys.items()}
    forged = None
    for position, item in enumerate(parsed):
        public_key = public_keys.get(item.entry.box_id)
        if public_key is None:
            missing.add(item.entry.box_id)
        elif forged is None and first_forged([item], public_key) is not None:
            forged = first_index + position
    return CheckedBatch(
        decoded=tuple((item.entry, item.entry_hash) for item in parsed),
        forged=forged,
        missing_keys=frozenset(missing),
    )


def decode_stored(raw_entries: Sequence[bytes]) -> list[LedgerEntry]:
    """Entries read back from the database: verified when stored, so decoding is enough."""
    return [LedgerEntry.decode_unverified(signed) for signed in raw_entries]


def ready() -> bool:
    """A no-op for a worker process to run once started (to start the workers ahead of need)."""
    return True
