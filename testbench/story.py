"""The offline story of issue 7, end to end, on embedded defaults (the start of `powerbox demo`).

Everything runs on this machine: the virtual radio and one org.bluez emulator node per device
(testbench.radio, testbench.bluez), the simulated Modbus plant (testbench.plant), the settlement
server on SQLite in a thread of this process (uvicorn), one box daemon (`powerbox box run`) with
four outlets provisioned through the server, and two phones, each the phone CLI
(`python -m powerbox_cli phone --json ...`) on its own node with its own wallet.

`run_offline_story` walks the story step by step, timing each step and calling
`report(step, data)` after it; any failure is raised as `StoryError` naming the step. Everything
is torn down at the end, on success or failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbench.system import COMMAND_TIMEOUT_S, RunningSystem, eventually, running_system

Report = Callable[[str, dict[str, Any]], None]


class StoryError(RuntimeError):
    """A step of the story failed; `step` names it."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"step {step!r} failed: {detail}")
        self.step = step
        self.detail = detail


@dataclass(frozen=True, slots=True)
class StepTiming:
    name: str
    ms: float
    data: dict[str, Any]


@dataclass(slots=True)
class StoryResult:
    steps: list[StepTiming] = field(default_factory=list)
    scan_to_power_ms: float | None = None
    scan_to_power_source: str = ""
    statements: dict[str, dict[str, Any]] = field(default_factory=dict)
    operator_report: list[dict[str, Any]] = field(default_factory=list)
    books: dict[str, Any] = field(default_factory=dict)
    total_ms: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "steps": [{"name": t.name, "ms": t.ms, **t.data} for t in self.steps],
            "scan_to_power_ms": self.scan_to_power_ms,
            "scan_to_power_source": self.scan_to_power_source,
            "statements": self.statements,
            "operator_report": self.operator_report,
            "books": self.books,
            "total_ms": self.total_ms,
        }

    def step(self, name: str) -> StepTiming:
        for timing in self.steps:
            if timing.name == name:
                return timing
        raise KeyError(name)


# --- the story ------------------------------------------------------------------------------------


class _Steps:
    """Times each step, reports it, and turns its failure into a StoryError naming it."""

    def __init__(self, result: StoryResult, report: Report) -> None:
        self._result = result
        self._report = report
        self.data: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[dict[str, Any]]:
        data: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            yield data
        except StoryError:
            raise
        except Exception as exc:  # every failure names its step
            raise StoryError(name, f"{type(exc).__name__}: {exc}") from exc
        ms = (time.perf_counter() - started) * 1000
        timing = StepTiming(name=name, ms=round(ms, 1), data=data)
        self._result.steps.append(timing)
        self._report(name, {"ms": timing.ms, **data})


async def run_offline_story(
    workdir: Path, *, report: Report, keep: Callable[[RunningSystem], Awaitable[None]] | None = None
) -> StoryResult:
    """Bring everything up in `workdir`, walk the offline story, tear everything down.

    With `keep`, the system stays up after the story until `keep(system)` returns."""
    result = StoryResult()
    steps = _Steps(result, report)
    began = time.perf_counter()
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        async with steps.step("start everything") as data:
            system = await stack.enter_async_context(running_system(workdir))
            box = system.box()
            plant, labels, operator, server, phones = (
                box.plant.control,
                box.labels,
                system.operator,
                system.server,
                system.phones,
            )
            data.update(server=server.base_url, box_id=box.box_id, outlets=len(labels))
        phone1, phone2 = phones

        async with steps.step("online preparation") as data:
            for phone, grant in ((phone1, "0.30"), (phone2, "2")):
                logged_in = await phone.sign_up(server, deposit_yuan="10")
                granted = await phone.run("grant", "request", grant, "--box", box.box_id, expect="grant")
                data[phone.name] = {
                    "user": logged_in["subject"],
                    "available_fen": logged_in["available_fen"],
                    "grant_fen": granted["amount_fen"],
                }
            steps.data["users"] = {p.name: data[p.name]["user"] for p in phones}

        async with steps.step("4G goes down") as data:
            await box.uplink(False)
            # a long poll in flight is dropped within half a second of the switch
            steps.data["off_at"] = int(time.time()) + 1
            data["switch"] = "powerbox box uplink off"

        async with steps.step("phone 1 unlocks outlet 1 from its label") as data:
            await plant.set_load(1, 3000)  # a big load: the small grant runs out in seconds
            spawned = time.perf_counter()
            process, started = await phone1.spawn_until(
                "start", labels[1], "--readings", "1", first="session_started"
            )
            powered_ms = (time.perf_counter() - spawned) * 1000
            outlet = (await plant.status()).outlet(1)
            left = await process.wait_event("left_running", within=COMMAND_TIMEOUT_S)
            await process.wait(within=COMMAND_TIMEOUT_S)
            if not outlet.breaker_closed:
                raise RuntimeError("the box said power on but outlet 1's breaker is open")
            # the phone's own figure, from reading the label to SessionStarted (scan, connect,
            # handshake, start); the command's wall time adds the interpreter's start-up
            result.scan_to_power_ms = started["scan_to_power_ms"]
            result.scan_to_power_source = "measured by the phone: label read to SessionStarted"
            data["command_wall_ms"] = round(powered_ms, 1)
            steps.data["session1"] = started["session_id"]
            data.update(
                scan_to_power_ms=result.scan_to_power_ms,
                session=started["session_id"][:8],
                balance_fen=started["balance_fen"],
                walked_away=left["interrupted"] is False,
            )

        async with steps.step("the balance runs out and the breaker trips") as data:
            tripped_at = time.perf_counter()

            async def breaker_open() -> bool:
                return not (await plant.status()).outlet(1).breaker_closed

            await eventually(breaker_open, "outlet 1's breaker to trip")
            data["waited_ms"] = round((time.perf_counter() - tripped_at) * 1000, 1)
            await plant.unplug(1)

        async with steps.step("phone 1 comes back and gets its receipt") as data:
            came_back = await phone1.run("watch", expect="ended_while_away")
            receipt = came_back["receipt"]
            if receipt is None:
                raise RuntimeError("the box did not hand phone 1 the receipt of its session")
            if receipt["end_reason"] != "BALANCE_EXHAUSTED" or came_back["remaining_fen"] != 0:
                raise RuntimeError(
                    f"the session ended by {receipt['end_reason']} with {came_back['remaining_fen']}"
                    " fen left: not at the balance"
                )
            data.update(
                end_reason=receipt["end_reason"],
                energy_wh=receipt["energy_wh"],
                cost_fen=receipt["cost_fen"],
                receipt=f"#{receipt['sequence']}, verified with the box's certificate",
            )
            steps.data["cost1"] = receipt["cost_fen"]

        async with steps.step("phone 2 uses outlet 2 and carries the ledger") as data:
            await plant.set_load(2, 2000)
            started2 = await phone2.run("start", labels[2], "--readings", "3", expect="session_started")
            ended2 = await phone2.run("stop", expect="session_ended")
            await plant.unplug(2)
            carried = await phone2.run("visit", box.box_id, expect="visited")
            batch = carried["batch"]
            if batch is None:
                raise RuntimeError("the box handed phone 2 no ledger entries")
            data.update(
                session=started2["session_id"][:8],
                cost_fen=ended2["cost_fen"],
                energy_wh=ended2["energy_wh"],
                verified=ended2["verified"],
                entries=f"{batch['first_sequence']}-{batch['last_sequence']}",
            )
            steps.data["cost2"] = ended2["cost_fen"]
            steps.data["last_sequence"] = batch["last_sequence"]

        async with steps.step("phone 2 syncs with the server") as data:
            # while 4G is off the box says nothing to the server: its entries come with phone 2
            before = await operator.box(box.box_id)
            if before["last_seen_at"] is None or before["last_seen_at"] > steps.data["off_at"]:
                raise RuntimeError(f"the server heard from the box with 4G off: {before}")
            if before["contiguous_sequence"] >= steps.data["last_sequence"]:
                raise RuntimeError(f"the server had the box's entries before phone 2 brought them: {before}")
            synced = await phone2.run("sync", expect="synced")
            outcomes = synced["batches"]
            if not outcomes or outcomes[-1]["acked_sequence"] != steps.data["last_sequence"]:
                raise RuntimeError(f"the server did not ack the carried batch: {outcomes}")
            data.update(
                server_had=before["contiguous_sequence"],
                acked_sequence=outcomes[-1]["acked_sequence"],
                grants_settled=synced["grants_settled"],
            )

        async with steps.step("4G returns") as data:
            await box.uplink(True)
            on_at = time.time()
            await eventually(
                lambda: operator.box_seen(box.box_id, since=on_at),
                "the box to reach the server over 4G again",
            )
            data["switch"] = "powerbox box uplink on"

        async with steps.step("the server reconciles") as data:
            reconciled = await operator.call("POST", "/v1/operator/reconcile")
            data.update(
                {k: reconciled[k] for k in ("entries_applied", "boxes_settled", "grants_released", "gaps")}
            )

        async with steps.step("statements, operator report, books") as data:
            for phone in phones:
                await phone.run("sync", expect="synced")
                statement = await phone.run("statement", expect="statement")
                result.statements[phone.name] = statement
                data[phone.name] = {
                    "available_fen": statement["available_fen"],
                    "sessions": len(statement["sessions"]),
                }
            expected = {"phone1": steps.data["cost1"], "phone2": steps.data["cost2"]}
            for name, cost in expected.items():
                charged = [s["cost_fen"] for s in result.statements[name]["sessions"]]
                if charged != [cost]:
                    raise RuntimeError(f"{name}'s statement charges {charged}, the box said {cost}")
            now = int(time.time())
            result.operator_report = await operator.call(
                "GET",
                "/v1/operator/reports/daily",
                params={"from_time": now - 86_400, "to_time": now + 86_400},
            )
            result.books = await operator.call("GET", "/v1/operator/books")
            if not result.books["balanced"]:
                raise RuntimeError(f"the money journal does not balance: {result.books['problems']}")
            anomalies = await operator.call("GET", "/v1/operator/anomalies")
            data.update(
                report=result.operator_report,
                books_balanced=result.books["balanced"],
                anomalies=len(anomalies),
            )

        if keep is not None:
            await keep(system)
        async with steps.step("tear down"):
            await stack.aclose()
    result.total_ms = round((time.perf_counter() - began) * 1000, 1)
    return result
