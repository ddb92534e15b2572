"""S6/S7 end to end: two server processes on one PostgreSQL; a box and three phones upload
overlapping, duplicated, shuffled batches at the same time; one server is killed mid-way and
restarted; the reconcile job is killed after a few committed steps and run again. Afterwards every
receipt is charged exactly once, every grant settled once, every account balances."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from sqlalchemy import func, select

from ledger_server.db import Database
from ledger_server.providers import last_code_in_log
from ledger_server.schema import grant_charges, journal_transactions
from protocol import cose, proofs, sealing, tariff, testing
from protocol.tokens import BalanceGrant
from tests.ledger_server.conftest import assert_books_balance, free_port
from tests.ledger_server.harness import OPERATOR_PASSWORD, OPERATOR_USERNAME, BoxLedger, b64, key_hex, unb64

PROJECT = Path(__file__).resolve().parents[2]
DEPOSIT = 20_000
GRANT = 300
PRICE = 120


class ServerProcess:
    """`python -m ledger_server serve` in a process of its own, killable with SIGKILL."""

    def __init__(self, url: str, key_directory: Path, sms_log: Path, *, settle_after_ingest: bool) -> None:
        self.url, self.key_directory, self.sms_log = url, key_directory, sms_log
        self.settle_after_ingest = settle_after_ingest
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.log = sms_log

    def start(self) -> None:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "ledger_server",
            "--database-url",
            self.url,
            "--keys",
            str(self.key_directory),
            "serve",
            "--port",
            str(port),
            "--dev-sms-log",
            str(self.sms_log),
            "--release-grace",
            "0",
            "--settle-after-ingest" if self.settle_after_ingest else "--no-settle-after-ingest",
        ]
        self.log = self.sms_log.with_name(f"server-{port}.log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text(errors='replace')}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def server_processes(*servers: ServerProcess) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()


@dataclass(slots=True, kw_only=True)
class Cluster:
    """Sends each request to the next live server, and on to another when one is down."""

    client: httpx.AsyncClient
    servers: list[ServerProcess]
    turn: int = 0

    async def call(
        self, method: str, path: str, *, token: str | None = None, json: Any = None, expect: int = 200
    ) -> Any:
        self.turn += 1
        first = self.turn  # other callers move `turn` while this one awaits
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        last_error: Exception | None = None
        for offset in range(2 * len(self.servers)):
            server = self.servers[(first + offset) % len(self.servers)]
            try:
                response = await self.client.request(
                    method, server.base_url + path, json=json, headers=headers
                )
            except httpx.TransportError as error:  # that server is down (killed): try another
                last_error = error
                await asyncio.sleep(0.05)
                continue
            assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text}"
            return response.json() if response.content else None
        raise AssertionError(f"no server answered {method} {path}: {last_error}")


@dataclass(slots=True, kw_only=True)
class Phone:
    token: str
    user_id: int
    key: Ed25519PrivateKey
    grants: list[BalanceGrant] = field(default_factory=list)


async def login(cluster: Cluster, phone_number: str, sms_log: Path) -> tuple[str, int]:
    await cluster.call("POST", "/v1/auth/shared/code", json={"phone": phone_number}, expect=202)
    code = last_code_in_log(sms_log, phone_number)
    body = await cluster.call("POST", "/v1/auth/shared/token", json={"phone": phone_number, "code": code})
    return body["access_token"], int(body["subject"])


async def new_phone(cluster: Cluster, index: int, sms_log: Path) -> Phone:
    token, user_id = await login(cluster, f"+8613600000{index:03d}", sms_log)
    key = testing.ed25519_key(f"exactly-once phone {index}")
    proof = proofs.sign_possession(
        context=proofs.ProofContext.DEVICE_REGISTRATION,
        subject=f"user:{user_id}",
        nonce=b"",
        key=cose.SigningKey.from_private_key(key),
    )
    await cluster.call(
        "POST",
        "/v1/me/devices",
        token=token,
        json={"public_key": key_hex(key), "proof": b64(proof)},
        expect=201,
    )
    await cluster.call(
        "POST", "/v1/me/top-ups", token=token, json={"amount_fen": DEPOSIT, "idempotency_key": "first"}
    )
    return Phone(token=token, user_id=user_id, key=key)


async def issue(cluster: Cluster, phone: Phone, box_id: str | None, key: str) -> BalanceGrant:
    body = await cluster.call(
        "POST",
        "/v1/me/grants",
        token=phone.token,
        json={
            "phone_key": key_hex(phone.key),
            "amount_fen": GRANT,
            "box_id": box_id,
            "max_price_fen_per_kwh": 200,
            "idempotency_key": key,
        },
        expect=201,
    )
    grant = BalanceGrant.decode_unverified(unb64(body["signed_grant"]))
    phone.grants.append(grant)
    return grant


async def box_token(cluster: Cluster, box_id: str, key: Ed25519PrivateKey) -> str:
    challenge = await cluster.call("POST", "/v1/auth/box/challenge", json={"box_id": box_id})
    proof = proofs.sign_possession(
        context=proofs.ProofContext.BOX_UPLINK,
        subject=box_id,
        nonce=unb64(challenge["nonce"]),
        key=cose.SigningKey.from_private_key(key),
    )
    body = await cluster.call(
        "POST",
        "/v1/auth/box/token",
        json={"box_id": box_id, "nonce": challenge["nonce"], "proof": b64(proof)},
    )
    return str(body["access_token"])


def reconcile_command(url: str, key_directory: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ledger_server",
        "--database-url",
        url,
        "--keys",
        str(key_directory),
        "reconcile",
        "--plain",
        "--settle-chunk",
        "7",
        "--release-grace",
        "0",
    ]


def reconcile_killed_after(url: str, key_directory: Path, *, steps: int) -> int:
    """Run the reconcile job and SIGKILL it once it reports `steps` committed settlement steps."""
    process = subprocess.Popen(
        reconcile_command(url, key_directory),
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    seen = 0
    for line in process.stdout:
        seen += line.startswith("settle ")
        if seen == steps:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    return seen


def reconcile_to_the_end(url: str, key_directory: Path) -> str:
    finished = subprocess.run(
        reconcile_command(url, key_directory),
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout


def window(rng: random.Random, entries: list[bytes]) -> list[bytes]:
    """An overlapping slice of the ledger, with duplicates, shuffled."""
    start = rng.randrange(len(entries))
    chosen = entries[start : start + rng.randrange(1, 25)]
    chosen = chosen + rng.sample(chosen, k=len(chosen) // 2)
    rng.shuffle(chosen)
    return chosen


async def test_every_receipt_is_settled_exactly_once_under_concurrency_and_crashes(
    postgres_url: str, key_directory: Path, tmp_path: Path
) -> None:
    rng = random.Random(2024)
    sms_log = tmp_path / "sms.log"
    settling = ServerProcess(postgres_url, key_directory, sms_log, settle_after_ingest=True)
    storing = ServerProcess(postgres_url, key_directory, sms_log, settle_after_ingest=False)
    with server_processes(settling, storing):
        async with httpx.AsyncClient(timeout=120) as client:
            cluster = Cluster(client=client, servers=[settling, storing])
            only_storing = Cluster(client=client, servers=[storing])
            operator = (
                await cluster.call(
                    "POST",
                    "/v1/auth/staff/token",
                    json={"username": OPERATOR_USERNAME, "password": OPERATOR_PASSWORD},
                )
            )["access_token"]
            await cluster.call(
                "POST",
                "/v1/operator/tariffs",
                token=operator,
                json={"default_price_fen_per_kwh": PRICE},
                expect=201,
            )
            box_keys = {
                box_id: testing.ed25519_key(f"exactly-once {box_id}") for box_id in ("BOX-E1", "BOX-E2")
            }
            for box_id, key in box_keys.items():
                await cluster.call(
                    "POST",
                    "/v1/operator/boxes",
                    token=operator,
                    json={
                        "box_id": box_id,
                        "public_key": key_hex(key),
                        "outlets": [{"number": n, "rated_power_w": 3500} for n in (1, 2)],
                        "latitude_microdeg": 0,
                        "longitude_microdeg": 0,
                        "tariff_region": "X",
                    },
                    expect=201,
                )
            phones = [await new_phone(cluster, index, sms_log) for index in range(3)]

            # What the boxes write while offline: every any-box grant used at BOX-E1, some of them
            # also at BOX-E2 (double spends), and grants for BOX-E2 used there.
            now = int(time.time())
            ledgers = {
                box_id: BoxLedger(box_id=box_id, key=key, time=now) for box_id, key in box_keys.items()
            }
            for ledger in ledgers.values():
                ledger.boot()
            expected_cost: dict[bytes, int] = defaultdict(int)
            owner: dict[bytes, Phone] = {}
            sessions = 0
            double_spent = []
            for phone in phones:
                for number in range(10):
                    grant = await issue(cluster, phone, None, f"any-{number}")
                    energy = rng.randrange(0, 3200)
                    ledgers["BOX-E1"].session(grant, energy_wh=energy, price=PRICE)
                    expected_cost[grant.grant_id] += min(tariff.session_cost_fen(energy, PRICE), GRANT)
                    owner[grant.grant_id] = phone
                    sessions += 1
                    if number < 2:
                        energy = rng.randrange(100, 3200)
                        ledgers["BOX-E2"].session(grant, energy_wh=energy, price=PRICE)
                        expected_cost[grant.grant_id] += min(tariff.session_cost_fen(energy, PRICE), GRANT)
                        double_spent.append(grant.grant_id)
                        sessions += 1
                for number in range(8):
                    grant = await issue(cluster, phone, "BOX-E2", f"e2-{number}")
                    energy = rng.randrange(0, 3200)
                    ledgers["BOX-E2"].session(grant, energy_wh=energy, price=PRICE)
                    expected_cost[grant.grant_id] += min(tariff.session_cost_fen(energy, PRICE), GRANT)
                    owner[grant.grant_id] = phone
                    sessions += 1

            keys = await cluster.call("GET", "/v1/operator-keys")
            encryption_key = X25519PublicKey.from_public_bytes(bytes.fromhex(keys["encryption_public_key"]))
            tokens = {box_id: await box_token(cluster, box_id, key) for box_id, key in box_keys.items()}

            async def box_uploads() -> None:
                entries = ledgers["BOX-E1"].entries
                for round_number in range(12):
                    await cluster.call(
                        "POST",
                        "/v1/box/ledger",
                        token=tokens["BOX-E1"],
                        json={"entries": [b64(e) for e in window(rng, entries)]},
                    )
                    if round_number == 3:
                        settling.kill()  # mid-ingest, mid-settlement: whatever it was doing
                    if round_number == 7:
                        await asyncio.to_thread(settling.start)
                await cluster.call(
                    "POST",
                    "/v1/box/ledger",
                    token=tokens["BOX-E1"],
                    json={"entries": [b64(e) for e in entries]},
                )

            async def unsettled_box_uploads() -> None:
                entries = ledgers["BOX-E2"].entries
                for _ in range(6):
                    await only_storing.call(
                        "POST",
                        "/v1/box/ledger",
                        token=tokens["BOX-E2"],
                        json={"entries": [b64(e) for e in window(rng, entries)]},
                    )
                await only_storing.call(
                    "POST",
                    "/v1/box/ledger",
                    token=tokens["BOX-E2"],
                    json={"entries": [b64(e) for e in entries]},
                )

            async def mule(phone: Phone, index: int) -> None:
                entries = ledgers["BOX-E1"].entries
                for round_number in range(8):
                    sealed = sealing.seal(
                        cbor2.dumps(window(rng, entries)),
                        recipient=encryption_key,
                        ephemeral_key=testing.x25519_key(f"mule {index} {round_number}"),
                        iv=os.urandom(13),
                    )
                    await cluster.call(
                        "POST", "/v1/ledger/sealed", token=phone.token, json={"sealed_batch": b64(sealed)}
                    )

            await asyncio.gather(
                box_uploads(), unsettled_box_uploads(), *(mule(p, i) for i, p in enumerate(phones))
            )

            # The reconcile job, killed after two committed steps, then run again to the end.
            assert await asyncio.to_thread(reconcile_killed_after, postgres_url, key_directory, steps=2) == 2
            finished = await asyncio.to_thread(reconcile_to_the_end, postgres_url, key_directory)
            assert "books balance" in finished

            # Every ledger complete and applied.
            for box_id, ledger in ledgers.items():
                state = await cluster.call("GET", f"/v1/operator/boxes/{box_id}/ledger", token=operator)
                assert (state["contiguous_sequence"], state["applied_sequence"], state["waiting"]) == (
                    len(ledger.entries),
                    len(ledger.entries),
                    0,
                )
            # Every grant charged exactly its receipts; every user's money adds up.
            for phone in phones:
                grants = {
                    g["grant_id"]: g for g in await cluster.call("GET", "/v1/me/grants", token=phone.token)
                }
                for grant in phone.grants:
                    record = grants[grant.grant_id.hex()]
                    assert record["state"] == "settled"
                    assert record["charged_fen"] == expected_cost[grant.grant_id]
                    assert record["captured_fen"] + record["released_fen"] == GRANT
                spent = sum(expected_cost[g.grant_id] for g in phone.grants)
                balances = (await cluster.call("GET", "/v1/me", token=phone.token))["balances"]
                assert balances["frozen_fen"] == 0
                assert balances["available_fen"] - balances["arrears_fen"] == DEPOSIT - spent
            anomalies = await cluster.call("GET", "/v1/operator/anomalies?limit=1000", token=operator)
            assert sorted(
                bytes.fromhex(a["grant_id"]) for a in anomalies if a["kind"] == "double_spend"
            ) == sorted(double_spent)
            assert {a["kind"] for a in anomalies} <= {"double_spend", "gap"}

    database = Database(postgres_url)
    try:
        async with database.connect() as connection:
            charges = (await connection.execute(select(func.count()).select_from(grant_charges))).scalar_one()
            charge_transactions = (
                await connection.execute(
                    select(func.count())
                    .select_from(journal_transactions)
                    .where(journal_transactions.c.kind == "charge")
                )
            ).scalar_one()
    finally:
        await database.close()
    assert charges == sessions
    assert charge_transactions <= sessions  # a zero charge with nothing released moves no money
    await assert_books_balance(postgres_url)
