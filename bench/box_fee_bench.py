"""Box benchmark: energy given away beyond a grant, and box CPU per unlock.

The real controller and the Modbus driver run against the simulated plant over Modbus TCP on
loopback; simulated time moves as the daemon's poll loop would move it (a poll a second, earlier
when a trip is due), so the figure is the fee-control algorithm's own, at 10 Wh register
resolution. Writes bench/results/box_fee.json and .md.

    .venv/bin/python bench/box_fee_bench.py [--sessions N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

from box_peripheral.hardware import HardwareConfig, HardwareKind, open_hardware
from protocol import messages, tariff
from testbench.box_rig import box_rig
from testbench.plant import plant_process, running_plant

RESULTS = Path(__file__).resolve().parent / "results"
POWERS_W = (100, 500, 1000, 2000, 3500)
PRICE = 120
TARGET_GIVEN_AWAY_WH_AT_3500 = 1.0
TARGET_UNLOCK_CPU_MS = 5.0


async def given_away_mwh(watts: int, amount_fen: int, phase_ms: int, workdir: Path) -> int:
    """One session at constant power from start to trip: mWh delivered beyond what the grant buys."""
    async with running_plant(outlets=4, time_scale=0) as plant:
        config = HardwareConfig(
            kind=HardwareKind.MODBUS_TCP, host=plant.endpoint.host, port=plant.endpoint.port
        )
        hardware = open_hardware(config)
        await hardware.connect()
        try:
            async with box_rig(
                workdir / f"box-{watts}-{phase_ms}.sqlite", hardware=hardware, advance=plant.model.advance
            ) as rig:
                # a grant that starts at a random phase of the meter's 10 Wh step
                plant.model.advance(0)
                phone = rig.phone()
                await rig.start(phone, outlet=1, amount_fen=amount_fen)
                await plant.control.set_load(1, watts)
                rig.advance(phase_ms)
                affordable_wh = tariff.energy_affordable_wh(amount_fen, PRICE)
                assert affordable_wh is not None
                await rig.run_for(affordable_wh * 3_600_000 // watts + 10_000)
                assert phone.received(messages.SessionEnded), "the box never tripped"
                status = await plant.control.status()
                delivered = status.outlets[0].delivered_mwh
                return delivered - affordable_wh * 1000
        finally:
            await hardware.close()


async def unlock_cpu_ms(unlocks: int, workdir: Path) -> list[float]:
    """The box's own CPU per unlock, the plant in another process so its work is not counted."""
    async with plant_process(outlets=4, time_scale=0) as plant:
        config = HardwareConfig(
            kind=HardwareKind.MODBUS_TCP, host=plant.endpoint.host, port=plant.endpoint.port
        )
        hardware = open_hardware(config)
        await hardware.connect()
        samples = []
        try:
            async with box_rig(workdir / "unlock.sqlite", hardware=hardware, advance=lambda ms: None) as rig:
                for index in range(unlocks):
                    phone = rig.phone()
                    before = rig.box_cpu_ns
                    started = await rig.start(phone, outlet=1, amount_fen=100)
                    samples.append((rig.box_cpu_ns - before) / 1e6)
                    await rig.request(
                        phone, messages.StopSession(request_id=1000 + index, session_id=started.session_id)
                    )
        finally:
            await hardware.close()
        return samples


async def run(sessions: int) -> dict[str, Any]:
    rng = random.Random(20261129)
    by_power: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        unlock_cpu = await unlock_cpu_ms(max(20, sessions * 5), Path(directory))
        for watts in POWERS_W:
            results = []
            for _ in range(sessions):
                amount = rng.randint(3, 12)  # 25-100 Wh: enough to cross several register steps
                results.append(await given_away_mwh(watts, amount, rng.randint(0, 999), Path(directory)))
            by_power[str(watts)] = {
                "sessions": sessions,
                "given_away_wh_max": round(max(results) / 1000, 3),
                "given_away_wh_mean": round(statistics.mean(results) / 1000, 3),
                "short_of_grant_wh_max": round(max(0, -min(results)) / 1000, 3),
            }
    at_max = by_power[str(POWERS_W[-1])]["given_away_wh_max"]
    unlock_p50 = statistics.median(unlock_cpu)
    return {
        "benchmark": "box fee control against the simulated plant over Modbus TCP",
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "price_fen_per_kwh": PRICE,
        "meter_register_resolution_wh": 10,
        "by_power_w": by_power,
        "unlock_cpu_ms_p50": round(unlock_p50, 3),
        "unlock_cpu_ms_p95": round(sorted(unlock_cpu)[int(0.95 * (len(unlock_cpu) - 1))], 3),
        "targets": {
            "given_away_wh_at_3500_w_at_most": TARGET_GIVEN_AWAY_WH_AT_3500,
            "unlock_cpu_ms_at_most": TARGET_UNLOCK_CPU_MS,
        },
        "targets_met": {
            "given_away": at_max <= TARGET_GIVEN_AWAY_WH_AT_3500,
            "unlock_cpu": unlock_p50 <= TARGET_UNLOCK_CPU_MS,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="sessions per power level")
    args = parser.parse_args()
    results = asyncio.run(run(args.sessions))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "box_fee.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Box fee control",
        "",
        f"{results['machine']}; ABB B21 register map (10 Wh steps) on the simulated plant over Modbus TCP.",
        "",
        "| load (W) | sessions | given away beyond the grant, max / mean (Wh) "
        "| short of the grant, max (Wh) |",
        "|---|---|---|---|",
    ]
    for watts, figures in results["by_power_w"].items():
        lines.append(
            f"| {watts} | {figures['sessions']} | {figures['given_away_wh_max']} / "
            f"{figures['given_away_wh_mean']} | {figures['short_of_grant_wh_max']} |"
        )
    lines += [
        "",
        f"Box CPU per unlock (handshake + grant check + start with SQLite and Modbus, the plant in its own "
        f"process): "
        f"p50 {results['unlock_cpu_ms_p50']} ms, p95 {results['unlock_cpu_ms_p95']} ms.",
        "",
        f"Targets met: {results['targets_met']}",
        "",
    ]
    (RESULTS / "box_fee.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
