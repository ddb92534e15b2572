"""Large batches are decoded and verified in worker processes, and the batch job decodes stored
entries there: the answers are the same as on the event loop (here every batch counts as large)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocol import sealing, testing
from protocol.errors import ErrorCode
from tests.ledger_server.conftest import RunningServer, api_for, running_server
from tests.ledger_server.harness import Api, BoxLedger, b64


@pytest.fixture
def server_with_workers(database_url: str, key_directory: Path) -> Iterator[RunningServer]:
    with running_server(
        database_url, key_directory, verify_processes=2, process_batch_threshold=2, settle_after_ingest=False
    ) as running:
        yield running


@pytest.fixture
async def api_with_workers(server_with_workers: RunningServer) -> AsyncIterator[Api]:
    async with api_for(server_with_workers) as api:
        yield api


async def test_worker_processes_check_store_and_settle_like_the_event_loop(api_with_workers: Api) -> None:
    api = api_with_workers
    user = await api.shared_user()
    phone = await api.user_device(user)
    await api.top_up(user, 3000)
    await api.set_tariff(120)
    ledgers = {}
    for box_id in ("BOX-P1", "BOX-P2"):
        key = testing.ed25519_key(f"worker {box_id}")
        await api.provision(box_id, key)
        ledger = BoxLedger(box_id=box_id, key=key)
        ledger.boot()
        for energy in (1000, 2000):
            ledger.session((await api.grant(user, phone, 500)).grant, energy_wh=energy)
        ledgers[box_id] = ledger
    token = await api.box_token("BOX-P1", testing.ed25519_key("worker BOX-P1"))

    # Refusals come back exactly as from the event loop.
    forger = BoxLedger(box_id="BOX-P1", key=testing.ed25519_key("not BOX-P1"))
    forger.boot()
    entries = ledgers["BOX-P1"].entries
    forged = [b64(entries[0]), b64(forger.entries[0]), b64(entries[1])]
    bad = await api.error("POST", "/v1/box/ledger", token=token, json={"entries": forged}, expect=400)
    assert bad == ErrorCode.LEDGER_BAD_SIGNATURE
    garbled = [b64(entries[0]), b64(b"\xff\x00")]
    assert (
        await api.error("POST", "/v1/box/ledger", token=token, json={"entries": garbled}, expect=400)
        == ErrorCode.TOKEN_MALFORMED
    )
    other = [b64(e) for e in ledgers["BOX-P2"].entries]
    assert await api.error("POST", "/v1/box/ledger", token=token, json={"entries": other}, expect=403) == (
        ErrorCode.API_FORBIDDEN
    )

    # A carried batch with two boxes: the second box's key is looked up on the way.
    keys = await api.call("GET", "/v1/operator-keys")
    recipient = X25519PublicKey.from_public_bytes(bytes.fromhex(keys["encryption_public_key"]))
    sealed = sealing.seal(
        cbor2.dumps(ledgers["BOX-P1"].entries + ledgers["BOX-P2"].entries),
        recipient=recipient,
        ephemeral_key=testing.x25519_key("two boxes"),
        iv=bytes(13),
    )
    results = await api.call(
        "POST", "/v1/ledger/sealed", token=user.token, json={"sealed_batch": b64(sealed)}
    )
    assert [(r["box_id"], r["contiguous_sequence"], r["applied_sequence"]) for r in results] == [
        ("BOX-P1", 5, 0),
        ("BOX-P2", 5, 0),
    ]

    # Not settled on ingest here: the batch job decodes the stored entries in the workers.
    summary = await api.reconcile()
    assert (summary["entries_applied"], summary["boxes_settled"]) == (10, 2)
    assert await api.balances(user) == {
        "available_fen": 3000 - 2 * (120 + 240),
        "frozen_fen": 0,
        "arrears_fen": 0,
    }
    assert [a["kind"] for a in await api.anomalies()] == ["bad_signature"]
