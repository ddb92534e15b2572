"""SIGKILL the box daemon at random moments during sessions: the ledger never loses a committed entry.

The loop is short here (CI); bench/box_crash_bench.py runs it long.
"""

from __future__ import annotations

import os
from pathlib import Path

from testbench.crash_loop import run_crash_loop
from testbench.plant import running_plant
from testbench.testbed import BleTestbed

ITERATIONS = int(os.environ.get("POWERBOX_CRASH_ITERATIONS", "50"))


async def test_kill_9_during_sessions_loses_nothing_and_closes_each_session_once(
    ble_testbed: BleTestbed, tmp_path: Path
) -> None:
    async with running_plant(outlets=4, time_scale=1.0) as plant:
        report = await run_crash_loop(ble_testbed, plant, tmp_path, iterations=ITERATIONS)
    assert report.problems == []
    assert report.iterations == ITERATIONS
    assert report.sessions_started == ITERATIONS
    assert report.closed_by_restart >= 1  # some sessions were really cut by a kill
    assert sum(report.receipts_by_reason.values()) == report.sessions_started
