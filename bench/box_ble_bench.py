"""Scan-to-power through bless and bleak over the virtual radio, and the daemon's memory.

One box daemon (bless, Modbus to the simulated plant) and one phone (bleak, phone_client's
central) on their own nodes. Each round: scan for the label's box, connect, EDHOC, start with a
grant behind message_3, until SessionStarted (power flows), then stop and disconnect. Writes
bench/results/box_ble.json and .md.

    .venv/bin/python bench/box_ble_bench.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from protocol import cose, testing
from testbench._process import python_module_argv
from testbench.box_setup import write_box_directory
from testbench.plant import running_plant
from testbench.radio.process import RadioProcess
from testbench.testbed import BleTestbed, ControllerPool

RESULTS = Path(__file__).resolve().parent / "results"
OPERATOR = testing.operator_key()
BOX_KEY = testing.ed25519_key("bench box")
TARGET_SCAN_TO_POWER_P50_MS = 100.0
TARGET_RSS_MB = 80.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def run(rounds: int, workdir: Path) -> dict[str, Any]:
    with RadioProcess.start(controllers=2, log_path=workdir / "radio.log") as radio:
        testbed = BleTestbed(ControllerPool(radio.endpoints), log_dir=workdir)
        try:
            async with running_plant(outlets=4, time_scale=1.0) as plant:
                box = write_box_directory(
                    workdir / "box",
                    box_key=BOX_KEY,
                    certificate=testing.sample_certificate(BOX_KEY),
                    operator=OPERATOR,
                    operator_encryption_key=testing.x25519_key("operator encryption").public_key(),
                    hardware={"kind": "modbus-tcp", "host": plant.endpoint.host, "port": plant.endpoint.port},
                )
                box_node = await testbed.start_node(name="box")
                daemon = await testbed.spawn(
                    box_node,
                    [sys.executable, "-m", "powerbox_cli", "box", "run", "--config", str(box.config_path)],
                    name="box",
                )
                await daemon.wait_event("ready", within=20)
                rss_idle = rss_mb(daemon.pid)
                phone_node = await testbed.start_node(name="phone")
                phone = await testbed.spawn(
                    phone_node, python_module_argv("testbench.phone_agent"), name="phone"
                )
                await phone.wait_event("ready", within=20)
                phone_key = testing.ed25519_key("bench phone")
                scan_to_power: list[float] = []
                connect_to_power: list[float] = []
                for index in range(rounds):
                    grant = testing.sample_grant(
                        phone_key,
                        grant_id=index.to_bytes(8, "big"),
                        box_id=None,
                        issued_at=testing.SAMPLE_TIME,
                        expires_at=2_000_000_000,
                    ).sign(OPERATOR)
                    reply = await phone.request(
                        "connect",
                        {
                            "label": box.label(1 + index % 4).encode(),
                            "phone_key": testing.seed("bench phone").hex(),
                            "operator_keys": [cose.public_key_bytes(OPERATOR.public_key).hex()],
                            "grant": grant.hex(),
                        },
                        within=20,
                    )
                    if not reply.get("ok"):
                        raise RuntimeError(f"round {index}: {reply}")
                    scan_to_power.append(reply["scan_to_answer_ms"])
                    connect_to_power.append(reply["connect_to_answer_ms"])
                    await phone.request(
                        "send",
                        {"message": "StopSession", "fields": {"session_id": reply["answer"]["session_id"]}},
                        within=20,
                    )
                    await phone.request("disconnect", {}, within=20)
                rss_after = rss_mb(daemon.pid)
        finally:
            await testbed.aclose()
    p50 = statistics.median(scan_to_power)
    return {
        "benchmark": "scan-to-power through bless and bleak over the virtual radio",
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "rounds": rounds,
        "scan_to_power_ms_p50": round(p50, 1),
        "scan_to_power_ms_p95": round(percentile(scan_to_power, 0.95), 1),
        "connect_to_power_ms_p50": round(statistics.median(connect_to_power), 1),
        "connect_to_power_ms_p95": round(percentile(connect_to_power, 0.95), 1),
        "daemon_rss_mb_idle": round(rss_idle, 1),
        "daemon_rss_mb_after": round(rss_after, 1),
        "targets": {
            "scan_to_power_ms_p50_at_most": TARGET_SCAN_TO_POWER_P50_MS,
            "rss_mb_at_most": TARGET_RSS_MB,
        },
        "targets_met": {
            "scan_to_power": p50 <= TARGET_SCAN_TO_POWER_P50_MS,
            "rss": max(rss_idle, rss_after) <= TARGET_RSS_MB,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        results = asyncio.run(run(args.rounds, Path(directory)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "box_ble.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Box over BLE",
        "",
        f"{results['machine']}; {results['rounds']} rounds; bless box and bleak phone on the virtual radio.",
        "",
        "| figure | p50 | p95 | target |",
        "|---|---|---|---|",
        f"| scan-to-power (ms) | {results['scan_to_power_ms_p50']} | {results['scan_to_power_ms_p95']} | "
        f"p50 <= {TARGET_SCAN_TO_POWER_P50_MS:g} |",
        f"| connect-to-power (ms) | {results['connect_to_power_ms_p50']} | "
        f"{results['connect_to_power_ms_p95']} | |",
        "",
        f"Daemon RSS: {results['daemon_rss_mb_idle']} MB idle, "
        f"{results['daemon_rss_mb_after']} MB after the rounds "
        f"(target <= {TARGET_RSS_MB:g} MB).",
        "",
        f"Targets met: {results['targets_met']}",
        "",
    ]
    (RESULTS / "box_ble.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
