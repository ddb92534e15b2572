"""`powerbox tui` (testbench/tui): a scenario driven by key presses through textual's Pilot against
the real running system, and a snapshot of the main screen rendered from a fixed state."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import Static

from protocol.errors import ErrorCode
from testbench.system import running_system
from testbench.tui import BenchApp, LiveBench, StaticBench
from testbench.tui.state import (
    AccountView,
    AnomalyView,
    Balances,
    BenchState,
    BoxLedgerView,
    BoxView,
    GrantView,
    LogEntry,
    LogLevel,
    OutletView,
    PhoneView,
    ReceiptView,
    ServerView,
    SessionView,
)

SCREEN = (150, 44)
WAIT_S = 40.0


# --- the scenario, on the real system -----------------------------------------------------------


async def _until(
    pilot: Pilot[Any], app: BenchApp, check: Callable[[BenchState], bool], what: str
) -> BenchState:
    """Let the app run until `check` holds for its state (bounded); the state then."""
    deadline = time.monotonic() + WAIT_S
    while not check(app.state):
        if time.monotonic() > deadline:
            log = "\n".join(f"{e.source} {e.level.value} {e.code} {e.text}" for e in app.state.log)
            raise AssertionError(f"timed out waiting for {what}; the log:\n{log}")
        await pilot.pause(0.1)
    return app.state


def _text(app: BenchApp, selector: str) -> str:
    content = app.query_one(selector, Static).content
    return content.plain if isinstance(content, Text) else str(content)


@pytest.mark.timeout(150)
async def test_a_scenario_driven_from_the_keyboard(tmp_path: Path) -> None:
    async with running_system(tmp_path / "system") as system, LiveBench.open(system) as bench:
        app = BenchApp(bench)
        async with app.run_test(size=SCREEN) as pilot:
            # a failed action is news in the log, with its code where it has one, never a crash
            await pilot.press("x")
            state = await _until(
                pilot,
                app,
                lambda s: any(e.level is LogLevel.ERROR and e.source == "phone1" for e in s.log),
                "phone 1's stop without a session to fail",
            )
            (failed,) = [e for e in state.log if e.level is LogLevel.ERROR]
            assert (failed.code, failed.code_name) == (int(ErrorCode.SESSION_UNKNOWN), "SESSION_UNKNOWN")
            assert app.is_running

            await pilot.press("r")  # sign up with a deposit, then a grant
            state = await _until(
                pilot,
                app,
                lambda s: s.phones[0].user_id is not None and s.phones[0].grants_available_fen > 0,
                "phone 1's grant",
            )
            assert state.phones[0].grants_available_fen == 500
            await _until(pilot, app, lambda s: bool(s.server.accounts), "phone 1's account on the server")
            assert "phone1 (user" in _text(app, "#server-body")

            await pilot.press("l")  # plug a load into outlet 1 (selected from the start)
            await _until(pilot, app, lambda s: s.box.outlet(1).load_w > 0, "a load on outlet 1")

            await pilot.press("s")
            state = await _until(
                pilot,
                app,
                lambda s: bool(s.phones[0].sessions) and s.box.outlet(1).power_w > 0,
                "power on outlet 1 and the session on phone 1",
            )
            (session,) = state.phones[0].sessions
            assert session.outlet == 1
            await _until(pilot, app, lambda s: s.box.outlet(1).session_id is not None, "the box's session")
            await pilot.pause()
            assert "2,000" in _text(app, "#outlet-1")
            assert session.session_id in _text(app, "#phone-1 .phone-body")

            await pilot.press("g")  # 4G off
            await _until(pilot, app, lambda s: not s.box.uplink_on, "4G to go off")
            await pilot.pause()
            assert "4G uplink OFF" in _text(app, "#box-summary")
            assert "4G OFF" in str(app.query_one("#box").border_title)

            await pilot.press("x")
            state = await _until(pilot, app, lambda s: bool(s.phones[0].receipts), "phone 1's receipt")
            (receipt,) = state.phones[0].receipts
            assert receipt.session_id == session.session_id
            assert receipt.end_reason == "USER_STOP"
            await _until(pilot, app, lambda s: s.box.outlet(1).power_w == 0, "outlet 1's breaker to open")
            await pilot.pause()
            assert f"#{receipt.sequence} {receipt.session_id}" in _text(app, "#phone-1 .phone-body")

            # with 4G off, phone 1 carries the box's ledger to the server
            await pilot.press("v")
            await _until(pilot, app, lambda s: s.phones[0].batches_to_carry > 0, "the ledger in phone 1")
            await pilot.press("y")
            state = await _until(
                pilot,
                app,
                lambda s: s.phones[0].busy is None and s.phones[0].last_result.startswith("sync:"),
                "phone 1's sync",
            )
            assert state.phones[0].batches_to_carry == 0
            assert any(e.level is LogLevel.OK and e.text.startswith("handed in") for e in state.log)
            state = await _until(
                pilot,
                app,
                lambda s: bool(s.server.boxes) and s.server.boxes[0].contiguous_sequence >= receipt.sequence,
                "the server to hold the box's ledger up to the receipt",
            )
            assert state.server.books_balanced is True
            await pilot.press("q")


# --- the main screen, from a fixed state --------------------------------------------------------


def _sample_state() -> BenchState:
    """A moment in the offline story: 4G is down, phone 1 draws 2 kW on outlet 1, phone 2 has
    stopped on outlet 2 and holds its receipt."""
    plugged_in = (0,) * 40 + (2000,) * 20  # 30 s of samples: power on for the last 10 s
    return BenchState(
        box=BoxView(
            box_id="BOX-DEMO-1",
            uplink_on=False,
            metering_door_closed=True,
            outlets=(
                OutletView(
                    number=1,
                    rated_w=3500,
                    load_w=2000,
                    power_w=2000,
                    energy_wh=412,
                    breaker_closed=True,
                    door_closed=False,
                    lock_energized=False,
                    session_id="5be1c0de",
                    session_balance_fen=500,
                    power_history_w=plugged_in,
                ),
                OutletView(
                    number=2,
                    rated_w=3500,
                    load_w=0,
                    power_w=0,
                    energy_wh=131,
                    breaker_closed=False,
                    door_closed=True,
                    lock_energized=False,
                    power_history_w=(1500,) * 30 + (0,) * 30,
                ),
                *(
                    OutletView(
                        number=n,
                        rated_w=3500,
                        load_w=0,
                        power_w=0,
                        energy_wh=0,
                        breaker_closed=False,
                        door_closed=True,
                        lock_energized=False,
                        power_history_w=(0,) * 60,
                    )
                    for n in (3, 4)
                ),
            ),
            last_sequence=9,
            acked_sequence=4,
        ),
        phones=(
            PhoneView(
                name="phone1",
                number="+8613900000001",
                user_id="1",
                grants_available_fen=500,
                grants=(
                    GrantView(
                        grant_id="0a1b2c3d",
                        status="in_session",
                        box_id="BOX-DEMO-1",
                        amount_fen=500,
                        remaining_fen=0,
                    ),
                    GrantView(
                        grant_id="4e5f6a7b",
                        status="available",
                        box_id="BOX-DEMO-1",
                        amount_fen=500,
                        remaining_fen=500,
                    ),
                ),
                sessions=(
                    SessionView(
                        session_id="5be1c0de",
                        box_id="BOX-DEMO-1",
                        outlet=1,
                        state="running",
                        energy_wh=395,
                        cost_fen=47,
                        remaining_fen=453,
                        power_w=2000,
                    ),
                ),
                last_result="start: power on at outlet 1: session 5be1c0de, ¥5.00",
            ),
            PhoneView(
                name="phone2",
                number="+8613900000002",
                user_id="2",
                grants_available_fen=0,
                receipts=(
                    ReceiptView(
                        sequence=7,
                        session_id="77aa0e11",
                        box_id="BOX-DEMO-1",
                        outlet=2,
                        energy_wh=131,
                        cost_fen=16,
                        end_reason="USER_STOP",
                    ),
                ),
                batches_to_carry=1,
                balances=Balances(available_fen=1500, frozen_fen=500, arrears_fen=0),
                busy="sync",
                last_result="visit: carrying BOX-DEMO-1's entries 5-9 (sealed)",
            ),
        ),
        server=ServerView(
            base_url="http://127.0.0.1:8040",
            as_of=1_750_000_100,
            boxes=(
                BoxLedgerView(
                    box_id="BOX-DEMO-1", last_seen_at=1_750_000_000, contiguous_sequence=4, applied_sequence=4
                ),
            ),
            accounts=(
                AccountView(
                    phone="phone1",
                    user_id="1",
                    balances=Balances(available_fen=1000, frozen_fen=1000, arrears_fen=0),
                ),
                AccountView(
                    phone="phone2",
                    user_id="2",
                    balances=Balances(available_fen=1500, frozen_fen=500, arrears_fen=0),
                ),
            ),
            anomaly_count=1,
            anomalies=(
                AnomalyView(
                    anomaly_id=1,
                    kind="gap",
                    code=603,
                    detail="entries 6-9 wait for entry 5",
                    box_id="BOX-DEMO-1",
                    resolved=True,
                ),
            ),
            books_balanced=True,
            journal_accounts=7,
            journal_transactions=6,
        ),
        log=(
            LogEntry(serial=1, at_s=3, level=LogLevel.ACTION, source="phone1", text="register"),
            LogEntry(
                serial=2,
                at_s=6,
                level=LogLevel.OK,
                source="phone1",
                text="signed up as user 1, ¥20.00 deposited; grant 0a1b2c3d of ¥5.00",
            ),
            LogEntry(serial=3, at_s=9, level=LogLevel.ACTION, source="BOX-DEMO-1", text="toggle 4G"),
            LogEntry(serial=4, at_s=9, level=LogLevel.OK, source="BOX-DEMO-1", text="4G off"),
            LogEntry(serial=5, at_s=12, level=LogLevel.ACTION, source="phone2", text="top up"),
            LogEntry(
                serial=6,
                at_s=13,
                level=LogLevel.ERROR,
                source="phone2",
                text="no running session (`--session` names one)",
                code=511,
                code_name="SESSION_UNKNOWN",
            ),
            LogEntry(serial=7, at_s=15, level=LogLevel.ACTION, source="phone1", text="start (outlet 1)"),
            LogEntry(
                serial=8,
                at_s=16,
                level=LogLevel.OK,
                source="phone1",
                text="power on at outlet 1: session 5be1c0de, ¥5.00",
            ),
        ),
    )


def test_the_main_screen(snap_compare: Callable[..., bool]) -> None:
    """The box with its outlets and power plots, both phones, the server, the log and the keys."""
    assert snap_compare(BenchApp(StaticBench(_sample_state())), terminal_size=SCREEN)
