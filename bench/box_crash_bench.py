"""The crash-safety loop, long: SIGKILL the box daemon N times during sessions over the virtual radio.

Writes bench/results/box_crash.json. The test suite runs the same loop with 50 iterations.

    .venv/bin/python bench/box_crash_bench.py [--iterations N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from testbench.crash_loop import run_crash_loop
from testbench.plant import running_plant
from testbench.radio.process import RadioProcess
from testbench.testbed import BleTestbed, ControllerPool

RESULTS = Path(__file__).resolve().parent / "results"


async def run(iterations: int, workdir: Path) -> dict[str, object]:
    with RadioProcess.start(controllers=4, log_path=workdir / "radio.log") as radio:
        testbed = BleTestbed(ControllerPool(radio.endpoints), log_dir=workdir)
        try:
            async with running_plant(outlets=4, time_scale=1.0) as plant:
                started = time.monotonic()
                report = await run_crash_loop(testbed, plant, workdir, iterations=iterations)
                elapsed = time.monotonic() - started
        finally:
            await testbed.aclose()
    return {
        "benchmark": "box crash loop (SIGKILL during sessions)",
        "seconds": round(elapsed, 1),
        **asdict(report),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        results = asyncio.run(run(args.iterations, Path(directory)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "box_crash.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
