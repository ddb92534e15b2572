"""The README's main command: the offline story (testbench/story.py) end to end, once, through
`powerbox demo --keep --report`, and the in-memory protocol walk-through."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from powerbox_cli import main

STORY_STEPS = [
    "start everything",
    "online preparation",
    "4G goes down",
    "phone 1 unlocks outlet 1 from its label",
    "the balance runs out and the breaker trips",
    "phone 1 comes back and gets its receipt",
    "phone 2 uses outlet 2 and carries the ledger",
    "phone 2 syncs with the server",
    "4G returns",
    "the server reconciles",
    "statements, operator report, books",
    "tear down",
]
STORY_TIMEOUT_S = 150


def test_demo_walks_through_unlock_to_receipt() -> None:
    result = CliRunner().invoke(main, ["demo", "--walkthrough", "--mtu", "23"])
    assert result.exit_code == 0, result.output
    steps = ("EDHOC message_1", "StartSession", "SessionStarted", "MeterReading", "ToppedUp", "SessionEnded")
    for step in steps:
        assert step in result.output
    assert "2 ATT round trips" in result.output
    assert "ended by USER_STOP" in result.output


def test_every_subcommand_is_listed() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output


def _powerbox(*args: str, env: dict[str, str] | None = None) -> Any:
    """`powerbox ARGS --json`-style command as a process; its JSON output."""
    done = subprocess.run(
        [sys.executable, "-m", "powerbox_cli", *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout) if done.stdout.lstrip().startswith(("{", "[")) else done.stdout


def _listening(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


@pytest.mark.timeout(STORY_TIMEOUT_S + 60)
async def test_the_main_command_tells_the_story_keeps_the_system_up_and_stops_it_all(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "powerbox_cli", "demo", "--keep", "--report", str(report_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    try:
        async with asyncio.timeout(STORY_TIMEOUT_S):
            while not report_path.exists():
                assert demo.returncode is None, "the demo exited before the system was up"
                await asyncio.sleep(0.2)
        system = json.loads(report_path.read_text())["system"]

        # everything is still up to poke at, from a shell
        plant = system["plant"]
        plant_status = await asyncio.to_thread(
            _powerbox, "plant", "status", "--json", "--host", plant["host"], "--port", str(plant["port"])
        )
        assert [o["breaker_closed"] for o in plant_status["outlets"]] == [False] * 4
        box_config = system["box"]["config"]
        box_status = await asyncio.to_thread(_powerbox, "box", "status", "--json", "--config", box_config)
        assert box_status["box_id"] == system["box"]["box_id"]
        assert box_status["running_sessions"] == []
        phone1 = system["phones"]["phone1"]
        wallet = await asyncio.to_thread(
            _powerbox, "phone", "--wallet", phone1["wallet"], "--server", system["server"],
            "--json", "status", env={**os.environ, **phone1["environment"]},
        )  # fmt: skip
        assert wallet["login"] is not None
        async with httpx.AsyncClient(base_url=system["server"]) as client:
            login = await client.post("/v1/auth/staff/token", json=system["operator"])
            assert login.status_code == 200

        demo.send_signal(signal.SIGINT)
        output, _ = await asyncio.wait_for(demo.communicate(), 60)
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
    text = output.decode()
    assert demo.returncode == 0, text
    assert "the system is up" in text
    for step in STORY_STEPS:
        assert f"ok {step}" in text
    assert "scan-to-power offline" in text
    assert "statements (after settlement)" in text
    assert "operator report (per box per day)" in text
    assert "the money journal balances: True" in text
    # nothing left running: the plant and the server are gone with the demo
    assert not _listening(plant["host"], plant["port"])
    host, port = system["server"].removeprefix("http://").split(":")
    assert not _listening(host, int(port))

    result = json.loads(report_path.read_text())
    steps = {step["name"]: step for step in result["steps"]}
    assert list(steps) == STORY_STEPS
    assert result["scan_to_power_ms"] > 0
    assert result["books"]["balanced"] is True
    # the operator's ack for what phone 2 carried reached the box (through a phone or over 4G)
    assert box_status["acked_sequence"] >= steps["phone 2 syncs with the server"]["acked_sequence"] > 0
    came_back = steps["phone 1 comes back and gets its receipt"]
    assert came_back["end_reason"] == "BALANCE_EXHAUSTED"
    assert came_back["cost_fen"] > 0
    assert steps["phone 2 uses outlet 2 and carries the ledger"]["cost_fen"] > 0
    statements = result["statements"]
    assert set(statements) == {"phone1", "phone2"}
    assert [s["cost_fen"] for s in statements["phone1"]["sessions"]] == [came_back["cost_fen"]]
    # one row per box per UTC day: both sessions ended today at the one box
    (row,) = result["operator_report"]
    assert row["box_id"] == system["box"]["box_id"]
    assert row["sessions"] == 2
    assert row["revenue_fen"] == sum(s["sessions"][0]["cost_fen"] for s in statements.values())
