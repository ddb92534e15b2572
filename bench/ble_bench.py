"""BLE over the test bench: scan, connect + discover, and write+notify round trips.

Everything is real code from bleak down to bless: a bleak phone process -> its node's D-Bus ->
org.bluez emulator -> virtual radio -> the box node's emulator -> D-Bus -> a bless box process,
and back as a notification. Times are taken inside the phone process, next to bleak.

    .venv/bin/python bench/ble_bench.py            # writes bench/results/ble.json and ble.md
    .venv/bin/python bench/ble_bench.py --quick    # fewer rounds, for a smoke run

Targets (issue 3): round trip p50 <= 5 ms for 200 bytes with one phone; connect + services
resolved <= 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from testbench.ble_demo.control import DemoPhoneProcess
from testbench.radio.process import RadioProcess
from testbench.testbed import BleTestbed, ControllerPool

RESULTS = Path(__file__).parent / "results"
MESSAGE_SIZES = (20, 200, 500)
TARGET_RTT_P50_MS = 5.0
TARGET_CONNECT_P50_MS = 100.0
BOX_NAME = "BENCHBOX"


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """Milliseconds: how many samples and where they fall."""

    samples: int
    p50: float
    p95: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        ordered = sorted(values)
        p95_index = min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))
        return cls(
            samples=len(ordered),
            p50=round(statistics.median(ordered), 3),
            p95=round(ordered[p95_index], 3),
            mean=round(statistics.fmean(ordered), 3),
            max=round(ordered[-1], 3),
        )


def message(phone_index: int, size: int) -> bytes:
    """A distinct message per phone: every phone hears every echo and keeps only its own."""
    prefix = f"P{phone_index}:".encode()
    return (prefix + bytes(range(256)) * 3)[:size]


async def connected_phone(testbed: BleTestbed, node: Any, adapter: str) -> DemoPhoneProcess:
    phone = await testbed.start_demo_phone(node, adapter=adapter, name=f"phone-{adapter}")
    await phone.scan(BOX_NAME)
    await phone.connect()
    await phone.subscribe()
    return phone


async def measure(rounds: int, log_dir: Path) -> dict[str, Any]:
    with RadioProcess.start(controllers=5, log_path=log_dir / "radio.log") as radio:
        testbed = BleTestbed(ControllerPool(radio.endpoints), log_dir=log_dir)
        try:
            box_node = await testbed.start_node(name="box")
            phones_node = await testbed.start_node(adapters=4, name="phones")
            await testbed.start_demo_box(box_node, BOX_NAME, quiet=True)

            # Scan, and connect + services resolved, from the disconnected state each time.
            phone = await testbed.start_demo_phone(phones_node, adapter="hci0")
            scans: list[float] = []
            connects: list[float] = []
            mtu = 0
            for _ in range(rounds // 10 + 5):
                scans.append((await phone.scan(BOX_NAME)).elapsed_ms)
                connected = await phone.connect()
                connects.append(connected.elapsed_ms)
                mtu = connected.mtu
                await phone.disconnect()

            # Round trips with one phone.
            await phone.scan(BOX_NAME)
            await phone.connect()
            await phone.subscribe()
            one_phone: dict[str, Summary] = {}
            for size in MESSAGE_SIZES:
                data = message(0, size)
                await phone.exchange(data, count=5)  # warm up
                one_phone[f"{size}B write request"] = Summary.of(await phone.exchange(data, count=rounds))
                if size <= mtu - 3:
                    round_trips = await phone.exchange(data, response=False, count=rounds)
                    one_phone[f"{size}B write command"] = Summary.of(round_trips)

            # Round trips with four phones at once on the same box.
            phones = [phone] + [
                await connected_phone(testbed, phones_node, adapter.name)
                for adapter in phones_node.adapters[1:]
            ]
            four_phones: dict[str, Summary] = {}
            for size in MESSAGE_SIZES:
                per_phone = await asyncio.gather(
                    *(p.exchange(message(index, size), count=rounds // 2) for index, p in enumerate(phones))
                )
                four_phones[f"{size}B write request"] = Summary.of([t for times in per_phone for t in times])
        finally:
            await testbed.aclose()
    return {
        "mtu": mtu,
        "scan_ms": Summary.of(scans),
        "connect_and_discover_ms": Summary.of(connects),
        "round_trip_ms": {"one_phone": one_phone, "four_phones": four_phones},
    }


def report(results: dict[str, Any], rounds: int) -> dict[str, Any]:
    rtt_200 = results["round_trip_ms"]["one_phone"]["200B write request"].p50
    connect_p50 = results["connect_and_discover_ms"].p50
    return {
        "what": (
            "bleak -> D-Bus -> org.bluez emulator -> virtual radio -> emulator -> D-Bus -> bless, echo back"
        ),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "bleak": version("bleak"),
            "bless": version("bless"),
            "bumble": version("bumble"),
            "dbus-fast": version("dbus-fast"),
        },
        "rounds": rounds,
        "att_mtu": results["mtu"],
        "scan_ms": asdict(results["scan_ms"]),
        "connect_and_discover_ms": asdict(results["connect_and_discover_ms"]),
        "round_trip_ms": {
            phones: {kind: asdict(summary) for kind, summary in table.items()}
            for phones, table in results["round_trip_ms"].items()
        },
        "targets": {
            "round_trip_p50_200B_one_phone_ms": {
                "target": TARGET_RTT_P50_MS,
                "measured": rtt_200,
                "met": rtt_200 <= TARGET_RTT_P50_MS,
            },
            "connect_and_discover_p50_ms": {
                "target": TARGET_CONNECT_P50_MS,
                "measured": connect_p50,
                "met": connect_p50 <= TARGET_CONNECT_P50_MS,
            },
        },
    }


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# BLE test-bench benchmark",
        "",
        f"{data['what']}. Measured {data['measured_at']} on {data['environment']['cpus']} CPUs, "
        f"Python {data['environment']['python']}, bleak {data['environment']['bleak']}, "
        f"bless {data['environment']['bless']}, bumble {data['environment']['bumble']}; "
        f"ATT MTU {data['att_mtu']}, {data['rounds']} rounds per line. Produced by `bench/ble_bench.py`.",
        "",
        "| measurement | samples | p50 ms | p95 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(label: str, summary: dict[str, Any]) -> str:
        return f"| {label} | {summary['samples']} | {summary['p50']} | {summary['p95']} | {summary['max']} |"

    lines.append(row("scan (find by name + service UUID)", data["scan_ms"]))
    lines.append(row("connect + services resolved", data["connect_and_discover_ms"]))
    for phones, table in data["round_trip_ms"].items():
        for kind, summary in table.items():
            lines.append(row(f"write + notify round trip, {kind}, {phones.replace('_', ' ')}", summary))
    lines += ["", "| target | measured p50 | met |", "|---|---:|---|"]
    for name, target in data["targets"].items():
        met = "yes" if target["met"] else "NO"
        lines.append(f"| {name.replace('_', ' ')} <= {target['target']} | {target['measured']} | {met} |")
    lines += [
        "",
        "500-byte messages go out as a long write (prepare + execute) and come back as three",
        "notifications of at most MTU-3 = 244 bytes. With four phones every echo reaches every phone",
        "(bless notifies all subscribers), so each phone's round trip also carries the others' traffic.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=200, help="Round trips per message size (one phone).")
    parser.add_argument("--quick", action="store_true", help="20 rounds: a smoke run.")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Directory for ble.json and ble.md.")
    args = parser.parse_args(argv)
    rounds = 20 if args.quick else max(args.rounds, 10)
    with tempfile.TemporaryDirectory(prefix="ble-bench-") as log_dir:
        results = asyncio.run(measure(rounds, Path(log_dir)))
    data = report(results, rounds)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "ble.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.output / "ble.md").write_text(markdown(data))
    sys.stdout.write(markdown(data))
    return 0 if all(target["met"] for target in data["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
