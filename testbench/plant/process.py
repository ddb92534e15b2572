"""Run the plant as a child process (`python -m testbench.plant run`), for tests and benches
that want it in its own process, as the box daemon will have it.

The child gets the test bench's lifeline (it exits when its stdin closes), so it cannot outlive
a parent killed with SIGKILL; on a normal exit it is terminated and its temporary log removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from testbench._process import ManagedProcess, ProcessExit, python_module_argv

from .client import LOOPBACK, PlantControl, PlantEndpoint
from .model import DEFAULT_RATED_W, MAX_OUTLETS, PlantError, scale_to_milli


@dataclass(frozen=True, slots=True, kw_only=True)
class PlantProcess:
    """A plant running in a child process, and a control client connected to it."""

    endpoint: PlantEndpoint
    control: PlantControl
    process: ManagedProcess

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.alive

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    async def kill(self) -> ProcessExit:
        """SIGKILL it (a power cut of the whole plant)."""
        return await asyncio.to_thread(self.process.kill)


@contextlib.asynccontextmanager
async def plant_process(
    *,
    outlets: int = 4,
    time_scale: float = 1.0,
    rated_w: int = DEFAULT_RATED_W,
    host: str = LOOPBACK,
    log_path: Path | None = None,
    ready_timeout: float = 20.0,
) -> AsyncIterator[PlantProcess]:
    """Start `powerbox plant run` on a free port of `host`; stop it when the block ends."""
    if not isinstance(outlets, int) or not 1 <= outlets <= MAX_OUTLETS:
        raise PlantError(f"the plant has 1 to {MAX_OUTLETS} outlets, not {outlets!r}")
    argv = python_module_argv(
        "testbench.plant", "run",
        "--host", host,
        "--port", "0",
        "--outlets", str(outlets),
        "--time-scale", f"{scale_to_milli(time_scale) / 1000}",
        "--rated-w", str(rated_w),
        "--json",
        "--exit-on-stdin-eof",
    )  # fmt: skip
    temporary_dir = None
    if log_path is None:
        temporary_dir = Path(tempfile.mkdtemp(prefix="powerbox-plant-"))
        log_path = temporary_dir / "plant.log"
    try:
        process, ready = await asyncio.to_thread(
            ManagedProcess.spawn, argv, name="plant", log_path=log_path, ready_timeout=ready_timeout
        )
        try:
            endpoint = PlantEndpoint(host=str(ready["host"]), port=int(ready["port"]))
            async with PlantControl.connect(endpoint) as control:
                yield PlantProcess(endpoint=endpoint, control=control, process=process)
        finally:
            await asyncio.to_thread(process.terminate)
    finally:
        if temporary_dir is not None:
            shutil.rmtree(temporary_dir, ignore_errors=True)
