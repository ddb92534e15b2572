"""Back online: hand in what the phone carried, take back acks, refresh grants and the statement.

    operator keys ─► revocation list, tariff table ─► carried batches (answers hold acks)
                  ─► (logged in) grants, statement

Each step is kept in the wallet as it completes, so a sync cut short by the network loses
nothing and the next one carries on. Ingest is idempotent on the server: a batch whose answer
was lost is simply handed in again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from phone_client.errors import ServerRefusedError
from phone_client.server_api import ServerApi
from phone_client.wallet import GrantState, Wallet
from protocol import messages
from protocol.errors import ErrorCode


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchOutcome:
    box_id: str
    first_sequence: int
    last_sequence: int
    acked_sequence: int | None  # what the ack the server returned covers
    refused_code: ErrorCode | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReport:
    operator_keys_added: int
    revocation_version: int | None  # the newest the wallet now holds
    tariff_version: int | None
    batches: tuple[BatchOutcome, ...]
    grants_added: int  # grants of this phone's key the wallet did not hold (requested elsewhere)
    grants_settled: int  # grants the server settled or released since the last sync
    statement_fetched: bool
    notes: tuple[str, ...] = field(default=())


async def sync(
    wallet: Wallet, api: ServerApi, *, progress: Callable[[str], None] = lambda step: None
) -> SyncReport:
    """One full exchange with the server (see the module docstring)."""
    notes: list[str] = []
    progress("operator keys")
    added = 0
    for key in (await api.operator_keys()).signing_keys:
        added += await wallet.trust_operator_key(key, source=api.base_url)

    if api.token is None:
        # everything past the public keys needs a login (the server's rule, DESIGN §7 S8)
        return SyncReport(
            operator_keys_added=added,
            revocation_version=await _version(wallet, messages.UpdateKind.REVOCATION_LIST),
            tariff_version=await _version(wallet, messages.UpdateKind.TARIFF_TABLE),
            batches=(),
            grants_added=0,
            grants_settled=0,
            statement_fetched=False,
            notes=("not logged in: only the operator keys were refreshed (`powerbox phone login ...`)",),
        )

    progress("revocation list and tariff table")
    for latest in (await api.latest_revocations(), await api.latest_tariff()):
        if latest is not None:
            await wallet.offer_update(latest.signed)

    outcomes = []
    pending = await wallet.batches(pending_only=True)
    for index, batch in enumerate(pending, start=1):
        progress(
            f"ledger batch {index} of {len(pending)}"
            f" ({batch.box_id} {batch.first_sequence}-{batch.last_sequence})"
        )
        try:
            results = await api.upload_sealed_batch(batch.sealed)
        except ServerRefusedError as exc:
            if exc.status >= 500 or exc.code in (ErrorCode.API_UNAUTHENTICATED, ErrorCode.API_RATE_LIMITED):
                raise
            # the server has seen it and will never take it: carrying it again changes nothing
            await wallet.mark_batch_uploaded(batch.batch_id)
            outcomes.append(
                BatchOutcome(
                    box_id=batch.box_id,
                    first_sequence=batch.first_sequence,
                    last_sequence=batch.last_sequence,
                    acked_sequence=None,
                    refused_code=exc.code,
                )
            )
            continue
        acked = None
        for result in results:
            if result.ledger_ack is not None:
                stored = await wallet.offer_ack(result.ledger_ack)
                if result.box_id == batch.box_id:
                    acked = result.contiguous_sequence if stored is None else stored.sequence
        await wallet.mark_batch_uploaded(batch.batch_id)
        outcomes.append(
            BatchOutcome(
                box_id=batch.box_id,
                first_sequence=batch.first_sequence,
                last_sequence=batch.last_sequence,
                acked_sequence=acked,
                refused_code=None,
            )
        )

    grants_added = grants_settled = 0
    statement_fetched = False
    login = await wallet.login()
    if login is None or login.principal != "user":
        notes.append("staff login: no grants or statement to refresh")
    else:
        progress("grants")
        before = {g.grant_id: g.state for g in await wallet.grants()}
        for grant in await api.grants():
            await wallet.apply_server_grant(
                grant_id=grant.grant_id,
                signed=grant.signed_grant,
                state=grant.state,
                charged_fen=grant.charged_fen,
            )
        closed = (GrantState.SETTLED, GrantState.RELEASED)
        for held in await wallet.grants():
            if held.grant_id not in before:
                grants_added += 1
            if held.state in closed and before.get(held.grant_id) not in closed:
                grants_settled += 1
        progress("statement")
        await wallet.save_statement(await api.statement())
        statement_fetched = True

    return SyncReport(
        operator_keys_added=added,
        revocation_version=await _version(wallet, messages.UpdateKind.REVOCATION_LIST),
        tariff_version=await _version(wallet, messages.UpdateKind.TARIFF_TABLE),
        batches=tuple(outcomes),
        grants_added=grants_added,
        grants_settled=grants_settled,
        statement_fetched=statement_fetched,
        notes=tuple(notes),
    )


async def _version(wallet: Wallet, kind: messages.UpdateKind) -> int | None:
    held = await wallet.update(kind)
    return None if held is None else held.version
