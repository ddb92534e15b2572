"""The offline story of issue 7 (testbench/story.py), once, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testbench.story import run_offline_story

pytestmark = pytest.mark.timeout(150)


async def test_the_offline_story(tmp_path: Path) -> None:
    told: list[tuple[str, dict[str, Any]]] = []
    result = await run_offline_story(tmp_path / "story", report=lambda step, data: told.append((step, data)))

    assert [step for step, _ in told] == [
        "start everything",
        "online preparation",
        "4G goes down",
        "phone 1 unlocks outlet 1 from its label",
        "the balance runs out and the breaker trips",
        "phone 1 comes back",
        "phone 2 uses outlet 2 and carries the ledger",
        "phone 2 syncs with the server",
        "4G returns",
        "the server reconciles",
        "statements, operator report, books",
        "tear down",
    ]
    assert result.scan_to_power_ms is not None
    assert result.scan_to_power_ms > 0
    assert result.books["balanced"] is True
    assert set(result.statements) == {"phone1", "phone2"}
    assert result.step("phone 1 comes back").data["cost_fen"] > 0
    assert result.step("phone 2 uses outlet 2 and carries the ledger").data["cost_fen"] > 0
    # one row per box per UTC day: both sessions ended today at the one box
    (row,) = result.operator_report
    assert row["box_id"] == "BOX-DEMO-1"
    assert row["sessions"] == 2
    assert row["revenue_fen"] == sum(s["sessions"][0]["cost_fen"] for s in result.statements.values())
