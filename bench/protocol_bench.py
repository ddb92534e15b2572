"""Protocol benchmark: CPU per handshake + start on each side, bytes and ATT round trips.

Runs the real session engines against each other in memory (no radio), so the figures are the
protocol's own cost. Writes bench/results/protocol.json and bench/results/protocol.md.

    .venv/bin/python bench/protocol_bench.py [--runs N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import cose, framing, gatt, messages, testing
from protocol.session import MessageReceived, PhoneSession
from protocol.testing import SAMPLE_TIME, ConnectionPair, ScriptedBox

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_BOX_CPU_MS = 5.0
TARGET_ROUND_TRIPS = 2
TARGET_GRANT_BYTES = 200


class TimedBox(ScriptedBox):
    """Accumulates the CPU time the box spends on each fragment it receives."""

    cpu_ns = 0

    def receive_fragment(self, fragment: bytes, now: int) -> None:
        started = time.process_time_ns()
        super().receive_fragment(fragment, now)
        self.cpu_ns += time.process_time_ns() - started


class TimedPhone(PhoneSession):
    cpu_ns = 0

    def receive_fragment(self, fragment: bytes, now: int) -> list[Any]:
        started = time.process_time_ns()
        events = super().receive_fragment(fragment, now)
        self.cpu_ns += time.process_time_ns() - started
        return events


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    box_cpu_ms: float
    phone_cpu_ms: float
    phone_to_box_bytes: int
    box_to_phone_bytes: int
    phone_writes: int
    box_notifications: int
    round_trips: int
    message_2_notifications: int
    message_3_and_start_writes: int


def one_run(index: int, att_mtu: int) -> Run:
    operator = testing.operator_key()
    box_key = testing.ed25519_key("box")
    phone_key = testing.ed25519_key("phone")
    ring = cose.key_ring(operator.public_key)
    ids = itertools.count(1)
    box = TimedBox(
        box_key=box_key,
        signed_certificate=testing.sample_certificate(box_key).sign(operator),
        operator_keys=ring,
        ephemeral_keys=lambda: testing.x25519_key(f"bench box {index}"),
        session_ids=lambda: next(ids).to_bytes(8, "big"),
    )
    label = gatt.QrLabel(
        box_id=testing.SAMPLE_BOX_ID,
        outlet=2,
        fingerprint=gatt.box_key_fingerprint(cose.public_key_bytes(box_key.public_key())),
    )
    grant = testing.sample_grant(phone_key, grant_id=index.to_bytes(8, "big")).sign(operator)
    started = time.process_time_ns()
    phone = TimedPhone(
        connection_id=1 + index % 0xFFF0,
        phone_key=phone_key,
        ephemeral_key=testing.x25519_key(f"bench phone {index}"),
        label=label,
        operator_keys=ring,
        att_mtu=att_mtu,
    )
    phone.connect()
    phone.send(messages.StartSession(request_id=phone.new_request_id(), outlet=2, grant=grant))
    phone.cpu_ns += time.process_time_ns() - started
    pair = ConnectionPair(phone, box)
    events = pair.pump(SAMPLE_TIME)
    assert any(
        isinstance(e, MessageReceived) and isinstance(e.message, messages.SessionStarted) for e in events
    )
    phone_flights = [f for f in pair.flights if f.sender == "phone"]
    box_flights = [f for f in pair.flights if f.sender == "box"]
    return Run(
        box_cpu_ms=box.cpu_ns / 1e6,
        phone_cpu_ms=phone.cpu_ns / 1e6,
        phone_to_box_bytes=sum(len(f) for flight in phone_flights for f in flight.fragments),
        box_to_phone_bytes=sum(len(f) for flight in box_flights for f in flight.fragments),
        phone_writes=sum(len(flight.fragments) for flight in phone_flights),
        box_notifications=sum(len(flight.fragments) for flight in box_flights),
        # writes go without response: one round trip is one phone flight answered by the box
        round_trips=len(phone_flights),
        message_2_notifications=len(box_flights[0].fragments),
        message_3_and_start_writes=len(phone_flights[1].fragments),
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    for warm_up in range(20):
        one_run(10_000 + warm_up, 247)
    operator = testing.operator_key()
    grant_size = len(testing.sample_grant(testing.ed25519_key("phone")).sign(operator))
    by_mtu: dict[str, Any] = {}
    for att_mtu in (247, framing.ATT_MTU_MIN):
        runs = [one_run(i, att_mtu) for i in range(args.runs)]
        box_cpu = [r.box_cpu_ms for r in runs]
        phone_cpu = [r.phone_cpu_ms for r in runs]
        first = runs[0]
        by_mtu[str(att_mtu)] = {
            "box_cpu_ms_p50": round(statistics.median(box_cpu), 3),
            "box_cpu_ms_p95": round(percentile(box_cpu, 0.95), 3),
            "phone_cpu_ms_p50": round(statistics.median(phone_cpu), 3),
            "phone_cpu_ms_p95": round(percentile(phone_cpu, 0.95), 3),
            "phone_to_box_bytes": first.phone_to_box_bytes,
            "box_to_phone_bytes": first.box_to_phone_bytes,
            "phone_writes": first.phone_writes,
            "box_notifications": first.box_notifications,
            "att_round_trips_to_power": first.round_trips,
            "message_2_notifications": first.message_2_notifications,
            "message_3_and_start_writes": first.message_3_and_start_writes,
        }
    at_247 = by_mtu["247"]
    results = {
        "benchmark": "protocol: handshake + grant check + start, in memory",
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "runs_per_mtu": args.runs,
        "balance_grant_bytes": grant_size,
        "by_att_mtu": by_mtu,
        "targets": {
            "box_cpu_ms_p50_at_most": TARGET_BOX_CPU_MS,
            "att_round_trips_at_most": TARGET_ROUND_TRIPS,
            "balance_grant_bytes_at_most": TARGET_GRANT_BYTES,
        },
        "targets_met": {
            "box_cpu": at_247["box_cpu_ms_p50"] <= TARGET_BOX_CPU_MS,
            "round_trips": all(m["att_round_trips_to_power"] <= TARGET_ROUND_TRIPS for m in by_mtu.values()),
            "grant_size": grant_size <= TARGET_GRANT_BYTES,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "protocol.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Protocol benchmark",
        "",
        f"{results['machine']}; {args.runs} runs per MTU; grant {grant_size} bytes (target <= 200).",
        "",
        "| ATT MTU | box CPU p50 / p95 (ms) | phone CPU p50 / p95 (ms) | bytes phone->box / box->phone "
        "| writes / notifications | round trips to power | message 2 notifications "
        "| message 3 + start writes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mtu, m in by_mtu.items():
        lines.append(
            f"| {mtu} | {m['box_cpu_ms_p50']} / {m['box_cpu_ms_p95']} | {m['phone_cpu_ms_p50']} / "
            f"{m['phone_cpu_ms_p95']} | {m['phone_to_box_bytes']} / {m['box_to_phone_bytes']} | "
            f"{m['phone_writes']} / {m['box_notifications']} | {m['att_round_trips_to_power']} | "
            f"{m['message_2_notifications']} | {m['message_3_and_start_writes']} |"
        )
    lines += ["", f"Targets met: {results['targets_met']}", ""]
    (RESULTS / "protocol.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
