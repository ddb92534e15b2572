"""Kill the box daemon with SIGKILL at random moments during sessions, restart it, check the ledger.

After every kill the ledger file is read directly (as an auditor would) and must hold one verified
hash chain that contains every entry seen before; at the end every session that started has
exactly one receipt. Used by the test suite (a short loop) and by bench/ (a long one).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

from protocol import cose, testing, tokens
from protocol.errors import TokenError
from protocol.tokens import EndReason, EntryKind
from testbench._process import python_module_argv
from testbench.app_process import AppProcess
from testbench.bluez.node import BleNode
from testbench.box_setup import ProvisionedBox, write_box_directory
from testbench.plant import Plant
from testbench.testbed import BleTestbed

OPERATOR = testing.operator_key()
BOX_KEY = testing.ed25519_key("crash box")
STEP_TIMEOUT = 20.0


@dataclass
class CrashReport:
    iterations: int = 0
    sessions_started: int = 0
    entries: int = 0
    closed_by_restart: int = 0
    receipts_by_reason: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def read_ledger(database: Path) -> list[bytes]:
    """The committed ledger, read straight from the file the daemon writes."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return [bytes(row[0]) for row in connection.execute("SELECT signed FROM ledger ORDER BY sequence")]


def check_chain(
    entries: list[bytes], seen: dict[int, bytes], report: CrashReport
) -> list[tokens.LedgerEntry]:
    ring = cose.key_ring(BOX_KEY.public_key())
    decoded: list[tokens.LedgerEntry] = []
    previous = tokens.GENESIS_HASH
    for expected_sequence, signed in enumerate(entries, start=1):
        try:
            entry = tokens.LedgerEntry.verify(signed, ring)
        except TokenError as exc:
            report.problems.append(f"entry {expected_sequence}: {exc.code.name}")
            return decoded
        if entry.sequence != expected_sequence or entry.previous_hash != previous:
            report.problems.append(f"entry {entry.sequence}: chain broken")
        previous = tokens.entry_hash(signed)
        decoded.append(entry)
    for sequence, digest in seen.items():
        if sequence > len(entries) or tokens.entry_hash(entries[sequence - 1]) != digest:
            report.problems.append(f"committed entry {sequence} missing or changed after a crash")
    seen.update({entry.sequence: tokens.entry_hash(entries[entry.sequence - 1]) for entry in decoded})
    return decoded


async def _start_box(testbed: BleTestbed, node: BleNode, box: ProvisionedBox) -> AppProcess:
    process = await testbed.spawn(
        node,
        [sys.executable, "-m", "powerbox_cli", "box", "run", "--config", str(box.config_path)],
        name="crash-box",
    )
    await process.wait_event("ready", within=STEP_TIMEOUT)
    return process


async def run_crash_loop(
    testbed: BleTestbed, plant: Plant, workdir: Path, *, iterations: int, seed: int = 7
) -> CrashReport:
    rng = random.Random(seed)  # noqa: S311 - test scheduling, not secrets
    report = CrashReport()
    box = write_box_directory(
        workdir / "box",
        box_key=BOX_KEY,
        certificate=testing.sample_certificate(BOX_KEY),
        operator=OPERATOR,
        operator_encryption_key=testing.x25519_key("operator encryption").public_key(),
        hardware={"kind": "modbus-tcp", "host": plant.endpoint.host, "port": plant.endpoint.port},
        policy={"poll_interval_ms": 200},
    )
    database = box.config_path.parent / "box.sqlite"
    box_node = await testbed.start_node(name="crash-box")
    phone_node = await testbed.start_node(name="crash-phone")
    phone = await testbed.spawn(phone_node, python_module_argv("testbench.phone_agent"), name="crash-phone")
    await phone.wait_event("ready", within=STEP_TIMEOUT)
    phone_key = testing.ed25519_key("crash phone")
    operator_keys = [cose.public_key_bytes(OPERATOR.public_key).hex()]
    seen: dict[int, bytes] = {}
    for outlet in (1, 2, 3, 4):
        await plant.control.set_load(outlet, 2000)
    for iteration in range(iterations):
        process = await _start_box(testbed, box_node, box)
        outlet = 1 + iteration % 4
        grant = testing.sample_grant(
            phone_key,
            grant_id=rng.randbytes(8),
            box_id=None,
            issued_at=testing.SAMPLE_TIME,
            expires_at=2_000_000_000,
        ).sign(OPERATOR)
        reply = await phone.request(
            "connect",
            {
                "label": box.label(outlet).encode(),
                "phone_key": testing.seed("crash phone").hex(),
                "operator_keys": operator_keys,
                "grant": grant.hex(),
            },
            within=STEP_TIMEOUT,
        )
        if reply.get("ok"):
            report.sessions_started += 1
            if rng.random() < 0.3:  # sometimes the user stops before the crash
                await phone.request(
                    "send",
                    {"message": "StopSession", "fields": {"session_id": reply["answer"]["session_id"]}},
                    within=STEP_TIMEOUT,
                )
        else:
            report.problems.append(f"iteration {iteration}: start refused: {reply}")
        await asyncio.sleep(rng.uniform(0.0, 0.6))  # die mid-poll, mid-commit, wherever
        process.kill()
        await process.wait(within=STEP_TIMEOUT)
        await phone.request("disconnect", {}, within=STEP_TIMEOUT)
        check_chain(read_ledger(database), seen, report)
        report.iterations += 1
    # one last start closes whatever the last kill interrupted
    final = await _start_box(testbed, box_node, box)
    await final.stop()
    entries = check_chain(read_ledger(database), seen, report)
    report.entries = len(entries)
    started = {e.body.session_id for e in entries if isinstance(e.body, tokens.SessionStartedBody)}
    receipts = [e.body for e in entries if isinstance(e.body, tokens.SessionReceipt)]
    closed = [r.session_id for r in receipts]
    for session_id in started:
        if closed.count(session_id) != 1:
            report.problems.append(f"session {session_id.hex()} closed {closed.count(session_id)} times")
    for receipt in receipts:
        report.receipts_by_reason[receipt.end_reason.name] = (
            report.receipts_by_reason.get(receipt.end_reason.name, 0) + 1
        )
    report.closed_by_restart = report.receipts_by_reason.get(EndReason.POWER_LOSS.name, 0)
    if len(started) != report.sessions_started:
        report.problems.append(
            f"{report.sessions_started} sessions acknowledged, {len(started)} in the ledger"
        )
    boots = sum(1 for e in entries if e.kind is EntryKind.BOOT)
    if boots != iterations + 1:
        report.problems.append(f"{boots} boot entries for {iterations + 1} starts")
    return report
